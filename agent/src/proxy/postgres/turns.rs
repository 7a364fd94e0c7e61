//! Turns on the threads that classify long texts, handed out in turn among identities.
//!
//! A few threads (one per CPU) classify texts too long for an event loop. Taken first come,
//! first served, one identity sending many such texts from many sessions kept every other
//! identity's long statements waiting behind all of its own. Here each identity waits in its own
//! line, and a freed turn goes to the next identity in a ring, so another identity's text waits
//! for at most one text of each identity ahead of it.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use foldhash::{HashMap, HashMapExt};
use tokio::sync::oneshot;

/// The turns and who waits for them.
pub struct Turns {
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// Each identity's waiters, first come first.
    lines: HashMap<Arc<str>, VecDeque<oneshot::Sender<Turn>>>,
    /// Identities with waiters, in the order they are served.
    ring: VecDeque<Arc<str>>,
}

/// A turn on a classifier thread; dropping it hands it to the next waiter.
pub struct Turn {
    /// None once handed back unused (`release`), which must not release it again.
    turns: Option<Arc<Turns>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(turns) = self.turns.take() {
            turns.release();
        }
    }
}

impl Turns {
    pub fn new(count: usize) -> Arc<Turns> {
        Arc::new(Turns { state: Mutex::new(State { free: count, lines: HashMap::new(), ring: VecDeque::new() }) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a turn in `identity`'s line.
    pub async fn take(self: &Arc<Self>, identity: &str) -> Turn {
        let waiting = {
            let mut st = self.state();
            if st.free > 0 && st.ring.is_empty() {
                st.free -= 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                let st = &mut *st;
                let line = st.lines.entry(identity.into()).or_default();
                if line.is_empty() {
                    st.ring.push_back(identity.into());
                }
                line.push_back(tx);
                Some(rx)
            }
        };
        match waiting {
            None => Turn { turns: Some(self.clone()) },
            // Senders stay in their line until served: one is never dropped unsent.
            Some(rx) => rx.await.expect("a waiter's sender is kept until it is sent a turn"),
        }
    }

    /// The next waiter, in ring order: its identity goes to the back of the ring if it has more.
    fn next(st: &mut State) -> Option<oneshot::Sender<Turn>> {
        let identity = st.ring.pop_front()?;
        let line = st.lines.get_mut(&identity).expect("an identity in the ring has a line");
        let tx = line.pop_front().expect("an identity in the ring has a waiter");
        if line.is_empty() {
            st.lines.remove(&identity);
        } else {
            st.ring.push_back(identity);
        }
        Some(tx)
    }

    fn release(self: &Arc<Self>) {
        loop {
            let tx = {
                let mut st = self.state();
                match Turns::next(&mut st) {
                    Some(tx) => tx,
                    None => {
                        st.free += 1;
                        return;
                    }
                }
            };
            // A waiter that has gone (its session ended) gives the turn back unused: on to the
            // next, the turn emptied first so that dropping it does not come back here.
            match tx.send(Turn { turns: Some(self.clone()) }) {
                Ok(()) => return,
                Err(mut turn) => turn.turns = None,
            }
        }
    }

    /// Turns free and identities waiting (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let st = self.state();
        (st.free, st.ring.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    /// Starts a task that takes a turn for `who` and, once it has it, notes `label` in `order`
    /// and holds the turn until its sender is dropped.
    fn waiter(
        turns: &Arc<Turns>,
        who: &'static str,
        label: &'static str,
        order: &Arc<StdMutex<Vec<&'static str>>>,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (done, hold) = oneshot::channel::<()>();
        let (turns, order) = (turns.clone(), order.clone());
        let task = tokio::spawn(async move {
            let _turn = turns.take(who).await;
            order.lock().unwrap().push(label);
            let _ = hold.await;
        });
        (task, done)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn one_identitys_many_texts_do_not_keep_anothers_waiting() {
        let turns = Turns::new(1);
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut held = std::collections::HashMap::new();
        // A holds the only turn and queues five more texts; then B queues one.
        for label in ["a0", "a1", "a2", "a3", "a4", "a5"] {
            held.insert(label, waiter(&turns, "a", label, &order));
            settle().await;
        }
        held.insert("b0", waiter(&turns, "b", "b0", &order));
        settle().await;
        assert_eq!(turns.counts(), (0, 2));
        // The holder (the last to get a turn) finishes, and the turn goes on.
        while !held.is_empty() {
            let holder = *order.lock().unwrap().last().unwrap();
            let (task, done) = held.remove(holder).expect("each holder finishes once");
            drop(done);
            task.await.unwrap();
            settle().await;
        }
        assert_eq!(*order.lock().unwrap(), ["a0", "a1", "b0", "a2", "a3", "a4", "a5"]);
        assert_eq!(turns.counts(), (1, 0), "the turn is free again, nobody waits");
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_does_not_take_a_turn_with_it() {
        let turns = Turns::new(1);
        let first = turns.take("a").await;
        let order = Arc::new(StdMutex::new(Vec::new()));
        let (gone, _keep) = waiter(&turns, "b", "b0", &order);
        settle().await;
        let (task, done) = waiter(&turns, "c", "c0", &order);
        settle().await;
        gone.abort();
        let _ = gone.await;
        drop(first);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["c0"], "the turn skipped the waiter that went away");
        drop(done);
        task.await.unwrap();
        assert_eq!(turns.counts(), (1, 0));
        // Taken and given back many times from many tasks, the count of turns stays whole.
        let many = Turns::new(2);
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let many = many.clone();
                tokio::spawn(async move {
                    let who = ["x", "y", "z"][i % 3];
                    let _turn = many.take(who).await;
                    settle().await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(many.counts(), (2, 0));
    }
}
