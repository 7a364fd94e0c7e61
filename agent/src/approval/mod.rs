//! Just-in-time approval: the queue of held statements and who may decide them.
pub mod control;
pub mod notify;

use std::{
    collections::BTreeMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{
    audit::{AuditLog, Record},
    policy::Approvers,
};

/// Approval request ids: random, so an id seen before the agent restarted (in a list, a
/// webhook, a chat message) does not name a new request, and a mistyped one hardly ever
/// names another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApprovalId(pub u64);

impl std::fmt::Display for ApprovalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What an approver sees about a held statement (also the webhook's JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: ApprovalId,
    pub identity: Option<String>,
    pub pid: Option<u32>,
    /// The uid of the process whose statement is held.
    #[serde(default)]
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub resource: Option<String>,
    pub database: Option<String>,
    pub statement: String,
    /// Bound parameter values of an extended-protocol execution (`$1`, `$2`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Option<String>>,
    /// For a SQL `EXECUTE`: the text of the prepared statement it runs, whose rule holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<String>,
    pub rule: String,
    /// RFC 3339 times.
    pub requested_at: String,
    pub expires_at: String,
}

/// How a held statement was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approved {
        by: u32,
        reason: Option<String>,
    },
    Denied {
        by: u32,
        reason: Option<String>,
    },
    TimedOut,
    /// The client cancelled the statement (CancelRequest) or went away.
    Cancelled,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Approved { .. } => "approved",
            Verdict::Denied { .. } => "denied",
            Verdict::TimedOut => "timeout",
            Verdict::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no pending approval request {0}")]
    NotFound(ApprovalId),
    #[error(
        "request {0} comes from a process running as uid {1}, the decider's own uid; another approver must decide it"
    )]
    OwnUid(ApprovalId, u32),
}

/// At most this many requests wait at once, and this many of one identity: a process that
/// floods the queue must not bury the requests approvers need to see, nor make the list too
/// long to read (a request shows up to 96 KiB of SQL and parameters).
pub const MAX_PENDING: usize = 64;
pub const MAX_PENDING_PER_IDENTITY: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("{MAX_PENDING_PER_IDENTITY} statements of this identity are waiting for approval already")]
    Identity,
    #[error("{MAX_PENDING} statements are waiting for approval on this host already")]
    Agent,
}

struct Entry {
    request: Request,
    tx: oneshot::Sender<Verdict>,
}

/// Held statements waiting for a decision.
pub struct Approvals {
    pending: Mutex<BTreeMap<ApprovalId, Entry>>,
    /// Ids are a counter permuted under this run's random keys.
    next: AtomicU64,
    ids: RandomState,
}

impl Default for Approvals {
    fn default() -> Self {
        Self { pending: Mutex::new(BTreeMap::new()), next: AtomicU64::new(1), ids: RandomState::new() }
    }
}

/// A submitted request; dropping it withdraws the request.
pub struct Ticket<'a> {
    pub id: ApprovalId,
    pub rx: oneshot::Receiver<Verdict>,
    approvals: &'a Approvals,
    /// Written if the ticket is dropped while its request is still pending: the session ended
    /// (the agent stopped, or the server closed it) before anyone decided.
    abandoned: Option<(AuditLog, Record)>,
}

impl Ticket<'_> {
    /// Withdraws the request; a decision made before that is returned, so the approver who was
    /// told it took effect and the audit trail agree. The caller records the outcome.
    pub fn withdraw(mut self) -> Option<Verdict> {
        self.abandoned = None;
        // A decision is sent under the lock, so after taking it there is one or none.
        self.approvals.lock().remove(&self.id);
        self.rx.try_recv().ok()
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let pending = self.approvals.lock().remove(&self.id).is_some();
        let Some((audit, mut record)) = self.abandoned.take() else { return };
        if !pending {
            // Decided, but the session ended before it read the decision: the approver was
            // told it took effect, so the trail says who decided, and that nothing ran.
            let Ok(verdict) = self.rx.try_recv() else { return };
            record.verdict = Some(verdict.as_str().into());
            if let Verdict::Approved { by, reason } | Verdict::Denied { by, reason } = verdict {
                record.approver = Some(by);
                let reason = reason.map(|r| format!(" (reason: {r})")).unwrap_or_default();
                record.detail = Some(format!("the session ended before the decision took effect{reason}"));
            }
        }
        audit.append(record);
    }
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ApprovalId, Entry>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_id(&self) -> ApprovalId {
        let pending = self.lock();
        loop {
            let id = self.permute(self.next.fetch_add(1, Ordering::Relaxed) as u32);
            // The pending check matters only once the counter wraps, after 2^32 requests.
            if id != 0 && !pending.contains_key(&ApprovalId(id.into())) {
                return ApprovalId(id.into());
            }
        }
    }

    /// A permutation of the 32-bit numbers keyed by this run's random keys (a four-round
    /// Feistel network): unlike a hash, it never gives two requests of one run the same id, so
    /// an id from an old list or message cannot name a later request of the same run.
    fn permute(&self, n: u32) -> u32 {
        let (mut left, mut right) = ((n >> 16) as u16, n as u16);
        for round in 0..4u8 {
            let f = self.ids.hash_one((round, right)) as u16;
            (left, right) = (right, left ^ f);
        }
        (u32::from(left) << 16) | u32::from(right)
    }

    /// Queues a request (its id from `next_id`) until it is decided or the ticket is dropped;
    /// `abandoned` is written to `audit` if the ticket is dropped undecided. Refused when the
    /// queue is full, for the requester's identity or for everyone.
    pub fn submit(&self, request: Request, abandoned: Option<(AuditLog, Record)>) -> Result<Ticket<'_>, QueueFull> {
        let (tx, rx) = oneshot::channel();
        let id = request.id;
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING {
            return Err(QueueFull::Agent);
        }
        if pending.values().filter(|e| e.request.identity == request.identity).count() >= MAX_PENDING_PER_IDENTITY {
            return Err(QueueFull::Identity);
        }
        pending.insert(id, Entry { request, tx });
        drop(pending);
        Ok(Ticket { id, rx, approvals: self, abandoned })
    }

    pub fn list(&self) -> Vec<Request> {
        self.lock().values().map(|e| e.request.clone()).collect()
    }

    /// Decides a request. `by`: the deciding uid, which must not be the requester's own (an
    /// agent that escaped its cgroup under that uid must not approve itself); root may.
    pub fn decide(&self, id: ApprovalId, verdict: Verdict, by: Option<u32>) -> Result<Request, DecideError> {
        let mut pending = self.lock();
        let entry = pending.get(&id).ok_or(DecideError::NotFound(id))?;
        if let Some(uid) = by
            && uid != 0
            && entry.request.uid == Some(uid)
        {
            return Err(DecideError::OwnUid(id, uid));
        }
        let entry = pending.remove(&id).ok_or(DecideError::NotFound(id))?;
        // Sent under the lock (a oneshot send never blocks): a session withdrawing its request
        // meanwhile finds either the request or this decision (`Ticket::withdraw`).
        let _ = entry.tx.send(verdict);
        drop(pending);
        Ok(entry.request)
    }
}

/// The process on the other end of the control socket, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// It runs inside a cgroup the policy enrolls (or its cgroup could not be read).
    pub enrolled: bool,
    /// Its uid also runs a process inside an enrolled cgroup: the caller may be something that
    /// process started outside it (`systemd-run --user`, a terminal multiplexer, `at`).
    pub uid_enrolled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("processes in enrolled cgroups may never decide approvals")]
    Enrolled,
    #[error("uid {0} is not an approver (root and the policy's spec.approvers may decide)")]
    NotApprover(u32),
    #[error(
        "uid {0} runs processes in an enrolled cgroup, so this caller may have been started by one of them; \
         decide as another approver or as root"
    )]
    UidEnrolled(u32),
}

/// Root or a listed uid/gid may decide, unless it runs under enforcement itself: an agent must
/// never approve its own (or any) held statement.
pub fn authorize(peer: &Peer, approvers: &Approvers) -> Result<(), Refusal> {
    if peer.enrolled {
        return Err(Refusal::Enrolled);
    }
    // Root is not held to this: an enrolled process running as root could leave its cgroup
    // anyway (README, "Just-in-time approval").
    if peer.uid != 0 && peer.uid_enrolled {
        return Err(Refusal::UidEnrolled(peer.uid));
    }
    let by_group = std::iter::once(peer.gid).chain(peer.groups.iter().copied()).any(|g| approvers.gids.contains(&g));
    if peer.uid == 0 || approvers.uids.contains(&peer.uid) || by_group {
        Ok(())
    } else {
        Err(Refusal::NotApprover(peer.uid))
    }
}

pub use crate::audit::printable;

impl Request {
    /// The request as `tollgate approvals list` shows it to an approver. Every value comes from
    /// the client and is escaped (`printable`); a statement's lines are shown as lines, each
    /// behind its label column, so no text of it can pass for the label of another value;
    /// parameters are quoted as SQL literals, NULL is not.
    pub fn display(&self) -> String {
        let or_dash = |v: &Option<String>| printable(v.as_deref().unwrap_or("-"));
        let number = |v: Option<u32>| v.map_or_else(|| "-".into(), |v| v.to_string());
        let mut out = format!(
            "{:>4}  {}  pid {}  uid {}  {}  resource {}  db {}  rule {}  expires {}\n",
            self.id,
            or_dash(&self.identity),
            number(self.pid),
            number(self.uid),
            or_dash(&self.exe),
            or_dash(&self.resource),
            or_dash(&self.database),
            printable(&self.rule),
            printable(&self.expires_at)
        );
        let mut block = |label: &str, text: &str| {
            for (i, line) in text.split('\n').enumerate() {
                out.push_str(&format!("      {:<9} | {}\n", if i == 0 { label } else { "" }, printable(line)));
            }
        };
        block("statement", &self.statement);
        if let Some(runs) = &self.runs {
            block("runs", runs);
        }
        for (i, v) in self.parameters.iter().enumerate() {
            let v = v.as_deref().map_or_else(|| "NULL".into(), |v| format!("'{}'", v.replace('\'', "''")));
            block(&format!("${}", i + 1), &v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: ApprovalId) -> Request {
        Request {
            id,
            identity: Some("bot".into()),
            pid: Some(1),
            uid: Some(1000),
            exe: None,
            resource: Some("db".into()),
            database: None,
            statement: "DELETE FROM orders WHERE id = 1".into(),
            parameters: Vec::new(),
            runs: None,
            rule: "hold".into(),
            requested_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-01-01T00:05:00Z".into(),
        }
    }

    #[test]
    fn an_approver_can_tell_every_part_of_a_request_apart() {
        let mut r = request(ApprovalId(7));
        // A real line break, a literal backslash-n that psql users read as one, and a line that
        // tries to pass for the statement's `runs`.
        r.statement = "DELETE FROM orders -- \\nWHERE id = 42\nruns      | SELECT 1\u{202e}".into();
        r.runs = Some("PREPARE d AS DELETE FROM orders".into());
        r.parameters = vec![Some("5 $2=NULL".into()), None, Some("NULL".into()), Some("it's\n".into())];
        let shown = r.display();
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].starts_with("   7  bot  pid 1  uid 1000  -  resource db"), "{shown}");
        assert_eq!(
            lines[1..],
            [
                r"      statement | DELETE FROM orders -- \\nWHERE id = 42",
                r"                | runs      | SELECT 1\u{202e}",
                r"      runs      | PREPARE d AS DELETE FROM orders",
                r"      $1        | '5 $2=NULL'",
                r"      $2        | NULL",
                r"      $3        | 'NULL'",
                r"      $4        | 'it''s",
                r"                | '",
            ],
            "{shown}"
        );
    }

    #[test]
    fn decisions_reach_the_waiting_ticket_once() {
        let a = Approvals::default();
        let id = a.next_id();
        let mut t = a.submit(request(id), None).unwrap();
        assert_eq!(a.list().len(), 1);
        let yes = Verdict::Approved { by: 1000, reason: None };
        assert_eq!(a.decide(id, yes.clone(), Some(1000)), Err(DecideError::OwnUid(id, 1000)), "not its own uid");
        a.decide(id, Verdict::Approved { by: 0, reason: None }, Some(0)).unwrap();
        assert_eq!(t.rx.try_recv().unwrap(), Verdict::Approved { by: 0, reason: None });
        assert_eq!(a.decide(id, Verdict::Denied { by: 0, reason: None }, Some(0)), Err(DecideError::NotFound(id)));
        assert!(a.list().is_empty());
    }

    #[test]
    fn a_decision_made_before_the_session_withdrew_is_the_one_it_records() {
        let a = Approvals::default();
        let id = a.next_id();
        let t = a.submit(request(id), None).unwrap();
        // The session's timeout fired; before it withdrew, an approver decided.
        a.decide(id, Verdict::Approved { by: 0, reason: None }, Some(0)).unwrap();
        assert_eq!(t.withdraw(), Some(Verdict::Approved { by: 0, reason: None }));
        let id = a.next_id();
        let t = a.submit(request(id), None).unwrap();
        assert_eq!(t.withdraw(), None);
        assert_eq!(a.decide(id, Verdict::Denied { by: 0, reason: None }, Some(0)), Err(DecideError::NotFound(id)));
    }

    #[test]
    fn ids_are_not_a_sequence_and_never_repeat_a_pending_one() {
        let a = Approvals::default();
        let ids: Vec<_> = (0..1000).map(|_| a.next_id()).collect();
        let b = Approvals::default();
        assert_ne!(b.next_id(), ids[0], "another run starts elsewhere");
        assert!(ids.windows(2).filter(|w| w[1].0 == w[0].0 + 1).count() < 5, "not consecutive");
        let tickets: Vec<_> = ids
            .iter()
            .take(MAX_PENDING)
            .enumerate()
            .map(|(i, &id)| a.submit(Request { identity: Some(format!("bot{i}")), ..request(id) }, None).unwrap())
            .collect();
        for _ in 0..1000 {
            assert!(!tickets.iter().any(|t| t.id == a.next_id()));
        }
    }

    #[test]
    fn ids_of_one_run_never_repeat() {
        let a = Approvals::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let id = a.next_id();
            assert_ne!(id.0, 0);
            assert!(seen.insert(id), "{id} given twice");
        }
        // A random 32-bit id per request would repeat one within 200,000 with near certainty.
    }

    #[test]
    fn a_ticket_dropped_undecided_leaves_its_record_on_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, writer) = AuditLog::open(dir.path()).unwrap();
        let a = Approvals::default();
        let record = |detail: &str| {
            let mut r = Record::new(crate::audit::Kind::Approval);
            r.verdict = Some("cancelled".into());
            r.detail = Some(detail.into());
            Some((audit.clone(), r))
        };
        // The session ended while held: its record is written.
        drop(a.submit(request(a.next_id()), record("abandoned")).unwrap());
        // Decided and read by the session (which writes its own record), or withdrawn by it:
        // nothing more.
        let id = a.next_id();
        let mut t = a.submit(request(id), record("decided")).unwrap();
        a.decide(id, Verdict::Approved { by: 0, reason: None }, Some(0)).unwrap();
        assert!(t.rx.try_recv().is_ok());
        drop(t);
        assert_eq!(a.submit(request(a.next_id()), record("withdrawn")).unwrap().withdraw(), None);
        // Decided, but the session ended before reading it: who decided, and that nothing ran.
        let id = a.next_id();
        let t = a.submit(request(id), record("unread")).unwrap();
        a.decide(id, Verdict::Denied { by: 1001, reason: Some("no".into()) }, Some(1001)).unwrap();
        drop(t);
        drop(audit);
        writer.join();
        let trail = std::fs::read_to_string(crate::audit::trail_path(dir.path())).unwrap();
        let lines: Vec<serde_json::Value> = trail.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{trail}");
        assert_eq!(lines[0]["detail"], "abandoned");
        assert_eq!(
            (&lines[1]["verdict"], &lines[1]["approver"], &lines[1]["detail"]),
            (&"denied".into(), &1001.into(), &"the session ended before the decision took effect (reason: no)".into())
        );
    }

    #[test]
    fn one_identity_cannot_fill_the_queue_nor_all_of_them_together_overflow_it() {
        let a = Approvals::default();
        let of = |who: String| Request { identity: Some(who), ..request(a.next_id()) };
        let bots: Vec<_> = (0..MAX_PENDING_PER_IDENTITY).map(|_| a.submit(of("bot".into()), None).unwrap()).collect();
        assert_eq!(a.submit(of("bot".into()), None).err(), Some(QueueFull::Identity));
        let others: Vec<_> = (bots.len()..MAX_PENDING).map(|i| a.submit(of(format!("o{i}")), None).unwrap()).collect();
        assert_eq!(a.submit(of("late".into()), None).err(), Some(QueueFull::Agent));
        drop(bots);
        assert!(a.submit(of("bot".into()), None).is_ok(), "room again once decided or withdrawn");
        drop(others);
    }

    #[test]
    fn dropping_a_ticket_withdraws_the_request() {
        let a = Approvals::default();
        let id = a.next_id();
        drop(a.submit(request(id), None).unwrap());
        assert!(a.list().is_empty());
        assert!(a.decide(id, Verdict::TimedOut, None).is_err());
    }

    #[test]
    fn what_an_approver_reads_shows_every_character_that_counts() {
        assert_eq!(printable("DELETE FROM t\n"), "DELETE FROM t\\n");
        // Right-to-left override and zero-width space: the terminal would show another text.
        assert_eq!(printable("a\u{202E}b\u{200B}c"), "a\\u{202e}b\\u{200b}c");
        assert_eq!(printable("plain é"), "plain é");
        assert_eq!(printable("a\u{2028}b\u{E0041}c\u{FE0F}"), "a\\u{2028}b\\u{e0041}c\\u{fe0f}");
    }

    #[test]
    fn who_may_decide() {
        let approvers = Approvers { uids: vec![1000], gids: vec![50] };
        let peer = |uid, gid, groups: &[u32], enrolled| Peer {
            uid,
            gid,
            groups: groups.to_vec(),
            enrolled,
            uid_enrolled: false,
        };
        assert_eq!(authorize(&peer(0, 0, &[], false), &approvers), Ok(()));
        assert_eq!(authorize(&peer(1000, 1000, &[], false), &approvers), Ok(()));
        assert_eq!(authorize(&peer(1001, 50, &[], false), &approvers), Ok(()));
        assert_eq!(authorize(&peer(1001, 1001, &[7, 50], false), &approvers), Ok(()));
        assert_eq!(authorize(&peer(1001, 1001, &[7], false), &approvers), Err(Refusal::NotApprover(1001)));
        assert_eq!(
            authorize(&peer(0, 0, &[], true), &approvers),
            Err(Refusal::Enrolled),
            "root inside an enrolled cgroup"
        );
        let escaped = Peer { uid_enrolled: true, ..peer(1000, 1000, &[], false) };
        assert_eq!(authorize(&escaped, &approvers), Err(Refusal::UidEnrolled(1000)), "its uid runs enrolled processes");
        assert_eq!(authorize(&Peer { uid_enrolled: true, ..peer(0, 0, &[], false) }, &approvers), Ok(()));
    }
}
