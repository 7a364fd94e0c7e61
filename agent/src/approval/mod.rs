//! Just-in-time approval: the queue of held statements and who may decide them.
pub mod control;
pub mod notify;

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::policy::Approvers;

/// Approval request ids: unique within one agent run.
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

struct Entry {
    request: Request,
    tx: oneshot::Sender<Verdict>,
}

/// Held statements waiting for a decision.
pub struct Approvals {
    pending: Mutex<BTreeMap<ApprovalId, Entry>>,
    next: AtomicU64,
}

impl Default for Approvals {
    fn default() -> Self {
        Self { pending: Mutex::new(BTreeMap::new()), next: AtomicU64::new(1) }
    }
}

/// A submitted request; dropping it withdraws the request.
pub struct Ticket<'a> {
    pub id: ApprovalId,
    pub rx: oneshot::Receiver<Verdict>,
    approvals: &'a Approvals,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.approvals.lock().remove(&self.id);
    }
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ApprovalId, Entry>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_id(&self) -> ApprovalId {
        ApprovalId(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues a request (its id from `next_id`) until it is decided or the ticket is dropped.
    pub fn submit(&self, request: Request) -> Ticket<'_> {
        let (tx, rx) = oneshot::channel();
        let id = request.id;
        self.lock().insert(id, Entry { request, tx });
        Ticket { id, rx, approvals: self }
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
        drop(pending);
        // The session may have given up in the same instant; the decision is then moot.
        let _ = entry.tx.send(verdict);
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("processes in enrolled cgroups may never decide approvals")]
    Enrolled,
    #[error("uid {0} is not an approver (root and the policy's spec.approvers may decide)")]
    NotApprover(u32),
}

/// Root or a listed uid/gid may decide, unless it runs under enforcement itself: an agent must
/// never approve its own (or any) held statement.
pub fn authorize(peer: &Peer, approvers: &Approvers) -> Result<(), Refusal> {
    if peer.enrolled {
        return Err(Refusal::Enrolled);
    }
    let by_group = std::iter::once(peer.gid).chain(peer.groups.iter().copied()).any(|g| approvers.gids.contains(&g));
    if peer.uid == 0 || approvers.uids.contains(&peer.uid) || by_group {
        Ok(())
    } else {
        Err(Refusal::NotApprover(peer.uid))
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
    fn decisions_reach_the_waiting_ticket_once() {
        let a = Approvals::default();
        let id = a.next_id();
        let mut t = a.submit(request(id));
        assert_eq!(a.list().len(), 1);
        let yes = Verdict::Approved { by: 1000, reason: None };
        assert_eq!(a.decide(id, yes.clone(), Some(1000)), Err(DecideError::OwnUid(id, 1000)), "not its own uid");
        a.decide(id, Verdict::Approved { by: 0, reason: None }, Some(0)).unwrap();
        assert_eq!(t.rx.try_recv().unwrap(), Verdict::Approved { by: 0, reason: None });
        assert_eq!(a.decide(id, Verdict::Denied { by: 0, reason: None }, Some(0)), Err(DecideError::NotFound(id)));
        assert!(a.list().is_empty());
    }

    #[test]
    fn dropping_a_ticket_withdraws_the_request() {
        let a = Approvals::default();
        let id = a.next_id();
        drop(a.submit(request(id)));
        assert!(a.list().is_empty());
        assert!(a.decide(id, Verdict::TimedOut, None).is_err());
    }

    #[test]
    fn who_may_decide() {
        let approvers = Approvers { uids: vec![1000], gids: vec![50] };
        let peer = |uid, gid, groups: &[u32], enrolled| Peer { uid, gid, groups: groups.to_vec(), enrolled };
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
    }
}
