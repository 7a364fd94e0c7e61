//! The agent-wide budget for buffering large protocol messages, shared by every session.
//!
//! A proxy that reads each message whole before it judges or masks it holds up to the
//! protocol's 64 MiB per message, for as long as the sender takes to finish it. Without a
//! common bound a few sessions that send, or ask the server for, large messages (or send all
//! but the last byte of one and wait) take the agent's memory, and with it every other
//! session. Each direction of a session buffers up to `FREE` bytes on its own; past that it
//! draws on the budget before it reads on, for what it holds and what its next read may add
//! (not for what a message's header announces), and is refused when the budget is spent.
//! What a direction holds of it, it may hold only so long while it waits on a peer, and the
//! sessions of one identity together only a share of it, so one agent sending or asking for
//! large messages from many sessions cannot keep every other identity's out.

use std::{
    future::Future,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt};

/// What one direction of a session may buffer without drawing on the budget: ordinary
/// statements and rows never touch the shared counter.
pub const FREE: usize = 256 << 10;

/// The smallest budget the agent accepts: one message of the protocol's largest size.
pub const MIN_BUDGET: usize = super::postgres::wire::MAX_MESSAGE;

/// The budget when the operator sets none.
pub const DEFAULT_BUDGET: usize = 512 << 20;

/// How long a message holding budget may wait on its peers when the operator sets nothing:
/// the agent's clients are processes on its own host, whose largest messages take well under
/// a second to pass.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// What one identity's sessions may hold of a budget of `limit` bytes when the operator sets
/// nothing: a quarter, so it takes four identities to spend it all, but never less than one
/// message of the largest size.
pub fn default_share(limit: usize) -> usize {
    (limit / 4).max(MIN_BUDGET).min(limit)
}

/// Bytes of large messages the agent's sessions may hold at once, each identity's together,
/// and for how long.
#[derive(Debug)]
pub struct MessageMemory {
    limit: usize,
    used: AtomicUsize,
    share: usize,
    /// What each identity with a session open holds. An entry lives while that identity's
    /// sessions do, so identities dropped by a reload leave nothing behind.
    shares: Mutex<HashMap<Arc<str>, Weak<Share>>>,
    wait: Duration,
}

/// What one identity's sessions hold of the budget.
#[derive(Debug)]
struct Share {
    identity: Arc<str>,
    used: AtomicUsize,
}

/// Bytes may be added to `counter` while it stays at most `limit`.
fn add_within(counter: &AtomicUsize, bytes: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&after| after <= limit)
        })
        .is_ok()
}

impl MessageMemory {
    /// A budget of `limit` bytes, of which one identity's sessions may hold `share`, and which
    /// a message (or a batch waiting for its `Sync`) may hold while it waits `wait` in all on
    /// the peers it passes between.
    pub fn new(limit: usize, share: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            share: share.min(limit),
            shares: Mutex::new(HashMap::new()),
            wait,
        })
    }

    /// Bytes drawn now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// `identity`'s share, shared by its sessions' directions.
    fn share_of(&self, identity: &str) -> Arc<Share> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(share) = shares.get(identity).and_then(Weak::upgrade) {
            return share;
        }
        // Entries whose sessions have all ended go as a new identity comes: the map stays as
        // large as the identities with sessions open.
        shares.retain(|_, s| s.strong_count() > 0);
        let identity: Arc<str> = identity.into();
        let share = Arc::new(Share { identity: identity.clone(), used: AtomicUsize::new(0) });
        shares.insert(identity, Arc::downgrade(&share));
        share
    }

    /// Takes `bytes` for `share`'s identity. Where both bounds refuse, the budget's is named:
    /// raising the share would not help.
    fn take(&self, share: &Share, bytes: usize) -> Result<(), Scope> {
        if !add_within(&self.used, bytes, self.limit) {
            return Err(Scope::Agent);
        }
        if !add_within(&share.used, bytes, self.share) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(Scope::Identity);
        }
        Ok(())
    }

    fn give(&self, share: &Share, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        share.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Which bound refused a draw.
enum Scope {
    Agent,
    Identity,
}

/// The budget, or the identity's share of it, could not cover what a session was about to
/// buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Exhausted {
    #[error(
        "the agent's memory for large messages is spent ({in_use_mib} of {limit_mib} MiB held by open sessions): \
         this session cannot hold {wanted_mib} MiB of large messages now; retry later, or have the agent's operator \
         raise `tollgate run --message-memory`"
    )]
    Agent { wanted_mib: usize, in_use_mib: usize, limit_mib: usize },
    #[error(
        "identity {identity}'s sessions hold {in_use_mib} of the {limit_mib} MiB of the agent's memory for large \
         messages that one identity may hold: this session cannot hold {wanted_mib} MiB of large messages now; retry \
         later, or have the agent's operator raise `tollgate run --message-memory-per-identity`"
    )]
    Identity { identity: Arc<str>, wanted_mib: usize, in_use_mib: usize, limit_mib: usize },
}

/// A direction held budget and waited on a peer longer than the agent allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "this session held {held_mib} MiB of the agent's memory for large messages while it waited {secs} s for a \
     message to pass, which other sessions may need: a message over 256 KiB must be sent whole, and read, \
     without pauses (`tollgate run --message-timeout`)"
)]
pub struct Overstayed {
    pub held_mib: usize,
    pub secs: u64,
}

/// One direction's draw on the budget, given back as the direction buffers less and when it
/// is dropped (the session ends).
#[derive(Debug)]
pub struct Draw {
    memory: Arc<MessageMemory>,
    share: Arc<Share>,
    held: usize,
    /// Time spent waiting on peers while holding, since `restart_clock`.
    waited: Duration,
}

impl Draw {
    /// A direction of a session of `identity` (sessions without one share the share of "").
    pub fn new(memory: Arc<MessageMemory>, identity: &str) -> Self {
        let share = memory.share_of(identity);
        Self { memory, share, held: 0, waited: Duration::ZERO }
    }

    /// Starts counting the wait of a new message (or batch) afresh.
    pub fn restart_clock(&mut self) {
        self.waited = Duration::ZERO;
    }

    /// Awaits `io`, a wait on a peer (for bytes of a message, or for it to take them). While
    /// the direction holds budget the wait counts, and `Err` comes once the count since
    /// `restart_clock` reaches the budget's allowance: whoever holds memory others may need
    /// must not hold it idle. Without a hold no timer is set, so ordinary messages cost nothing.
    pub async fn wait<F: Future>(&mut self, io: F) -> Result<F::Output, Overstayed> {
        if self.held == 0 {
            return Ok(io.await);
        }
        let overstayed = Overstayed { held_mib: self.held.div_ceil(1 << 20), secs: self.memory.wait.as_secs() };
        let Some(left) = self.memory.wait.checked_sub(self.waited).filter(|l| !l.is_zero()) else {
            return Err(overstayed);
        };
        let started = Instant::now();
        let done = crate::timer::timeout(left, io).await;
        self.waited += started.elapsed();
        done.map_err(|_| overstayed)
    }

    /// Whether the direction holds more than its free share.
    pub fn holds(&self) -> bool {
        self.held > 0
    }

    /// Makes the draw match a direction that may hold `bytes` after its next read (of a
    /// message in progress, and whole messages not yet passed on): `Err` when the budget
    /// cannot cover the growth, and then the draw is as it was.
    pub fn cover(&mut self, bytes: usize) -> Result<(), Exhausted> {
        let want = bytes.saturating_sub(FREE);
        if want <= self.held {
            if want < self.held {
                self.memory.give(&self.share, self.held - want);
                self.held = want;
            }
            return Ok(());
        }
        if let Err(scope) = self.memory.take(&self.share, want - self.held) {
            const MIB: usize = 1 << 20;
            let wanted_mib = bytes.div_ceil(MIB);
            return Err(match scope {
                Scope::Agent => Exhausted::Agent {
                    wanted_mib,
                    in_use_mib: self.memory.in_use().div_ceil(MIB),
                    limit_mib: self.memory.limit / MIB,
                },
                Scope::Identity => Exhausted::Identity {
                    identity: self.share.identity.clone(),
                    wanted_mib,
                    in_use_mib: self.share.used.load(Ordering::Relaxed).div_ceil(MIB),
                    limit_mib: self.memory.share / MIB,
                },
            });
        }
        self.held = want;
        Ok(())
    }
}

impl Drop for Draw {
    fn drop(&mut self) {
        if self.held > 0 {
            self.memory.give(&self.share, self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn budget(limit: usize) -> Arc<MessageMemory> {
        MessageMemory::new(limit, limit, DEFAULT_WAIT)
    }

    #[test]
    fn small_buffers_never_draw() {
        let m = budget(MIN_BUDGET);
        let mut d = Draw::new(m.clone(), "bot");
        d.cover(FREE).unwrap();
        assert_eq!(m.in_use(), 0);
        d.cover(FREE + 1).unwrap();
        assert_eq!(m.in_use(), 1, "only what is past the free share");
    }

    #[test]
    fn draws_grow_shrink_and_are_given_back_on_drop() {
        let m = budget(100 * MIB);
        let mut a = Draw::new(m.clone(), "bot");
        let mut b = Draw::new(m.clone(), "bot");
        a.cover(60 * MIB + FREE).unwrap();
        assert_eq!(m.in_use(), 60 * MIB);
        let refused = b.cover(50 * MIB).unwrap_err();
        assert_eq!(refused, Exhausted::Agent { wanted_mib: 50, in_use_mib: 60, limit_mib: 100 });
        assert!(refused.to_string().contains("--message-memory"), "{refused}");
        assert_eq!(m.in_use(), 60 * MIB, "a refused draw takes nothing");
        b.cover(40 * MIB + FREE).unwrap();
        assert_eq!(m.in_use(), 100 * MIB, "the whole budget may be used");
        a.cover(10).unwrap();
        assert_eq!(m.in_use(), 40 * MIB, "a direction that buffers less gives back");
        drop(b);
        assert_eq!(m.in_use(), 0);
        a.cover(100 * MIB + FREE).unwrap();
        drop(a);
        assert_eq!(m.in_use(), 0);
    }

    #[test]
    fn one_identity_holds_only_its_share_whatever_its_sessions() {
        let m = MessageMemory::new(200 * MIB, 80 * MIB, DEFAULT_WAIT);
        let (mut a1, mut a2) = (Draw::new(m.clone(), "bot"), Draw::new(m.clone(), "bot"));
        a1.cover(50 * MIB + FREE).unwrap();
        let refused = a2.cover(40 * MIB + FREE).unwrap_err();
        assert_eq!(
            refused,
            Exhausted::Identity { identity: "bot".into(), wanted_mib: 41, in_use_mib: 50, limit_mib: 80 }
        );
        assert!(
            refused.to_string().contains("identity bot's")
                && refused.to_string().contains("--message-memory-per-identity")
        );
        assert_eq!(m.in_use(), 50 * MIB, "a refused draw takes nothing of either");
        a2.cover(30 * MIB + FREE).unwrap();
        // Other identities have the rest, each up to its own share.
        let (mut b, mut c, mut d) =
            (Draw::new(m.clone(), "admin"), Draw::new(m.clone(), "other"), Draw::new(m.clone(), "third"));
        b.cover(80 * MIB + FREE).unwrap();
        c.cover(40 * MIB + FREE).unwrap();
        // All four shares are within bounds, but the budget is spent.
        assert!(matches!(d.cover(1 + FREE), Err(Exhausted::Agent { in_use_mib: 200, limit_mib: 200, .. })));
        // What one session of an identity gives back, another of the same identity may take.
        drop(a1);
        a2.cover(80 * MIB + FREE).unwrap();
        drop(c);
        assert!(matches!(a2.cover(80 * MIB + FREE + 1), Err(Exhausted::Identity { .. })));
        drop((a2, b, d));
        assert_eq!(m.in_use(), 0);
        assert!(m.shares.lock().unwrap().values().all(|s| s.strong_count() == 0), "nothing holds a share");
        Draw::new(m.clone(), "new");
        assert_eq!(m.shares.lock().unwrap().len(), 1, "shares of identities without sessions are let go");
    }

    #[test]
    fn the_default_share_is_a_quarter_but_at_least_one_largest_message() {
        assert_eq!(default_share(DEFAULT_BUDGET), DEFAULT_BUDGET / 4);
        assert_eq!(default_share(MIN_BUDGET), MIN_BUDGET);
        assert_eq!(default_share(2 * MIN_BUDGET), MIN_BUDGET);
        assert_eq!(default_share(8 * MIN_BUDGET), 2 * MIN_BUDGET);
    }

    #[test]
    fn concurrent_draws_never_exceed_the_budget_or_a_share() {
        let m = MessageMemory::new(64 * MIB, 40 * MIB, DEFAULT_WAIT);
        let (peak, peak_share) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (m, peak, peak_share) = (m.clone(), peak.clone(), peak_share.clone());
                std::thread::spawn(move || {
                    let mut d = Draw::new(m.clone(), ["a", "b", "c"][i % 3]);
                    for n in 0..2_000usize {
                        let _ = d.cover(FREE + ((n * 7 + i) % 24) * MIB);
                        peak.fetch_max(m.in_use(), Ordering::Relaxed);
                        peak_share.fetch_max(d.share.used.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 64 * MIB);
        assert!(peak_share.load(Ordering::Relaxed) <= 40 * MIB);
        assert_eq!(m.in_use(), 0, "every draw given back");
    }

    #[tokio::test]
    async fn waits_while_holding_are_limited_in_all_until_the_clock_restarts() {
        let m = MessageMemory::new(64 * MIB, 64 * MIB, Duration::from_millis(300));
        let mut d = Draw::new(m.clone(), "bot");
        let nap = || crate::timer::sleep(Duration::from_millis(200));
        // Without a hold, waits are not timed.
        d.wait(crate::timer::sleep(Duration::from_millis(400))).await.unwrap();
        d.cover(FREE + 3 * MIB).unwrap();
        d.wait(nap()).await.unwrap();
        // The second wait of the same message exceeds what is left, and is cut short.
        let started = Instant::now();
        let e = d.wait(nap()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(190), "{:?}", started.elapsed());
        assert_eq!(e, Overstayed { held_mib: 3, secs: 0 });
        assert!(e.to_string().contains("--message-timeout"), "{e}");
        // Nothing is left until the clock restarts, for the next message.
        assert!(d.wait(std::future::ready(())).await.is_err());
        d.restart_clock();
        d.wait(nap()).await.unwrap();
        // A direction that holds nothing more is not timed, whatever it waited before.
        d.cover(FREE).unwrap();
        d.wait(crate::timer::sleep(Duration::from_millis(400))).await.unwrap();
    }
}
