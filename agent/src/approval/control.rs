//! The local control socket: `tollgate approvals` lists and decides held statements over it.
//! The kernel tells who is calling (SO_PEERCRED); the policy says who may decide.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ApprovalId, Peer, Request, Verdict, authorize};
use crate::{
    audit::{Kind, Record},
    proxy::Shared,
};

/// Longest request line accepted; a command is a few hundred bytes.
const MAX_LINE: u64 = 64 << 10;
/// A command is one line, sent at once: a client has this long to send it and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REASON: usize = 1024;
/// Most control connections open at once per non-root uid (anyone may connect): one local user
/// cannot use up the agent's descriptors or lock approvers out. Root is not counted.
const MAX_CLIENTS_PER_UID: usize = 8;
/// Most control connections open at once of all non-root uids together: a user with many
/// uids (rootless containers map 65,536) cannot use up the descriptors the proxy needs. The
/// policy's approvers are not counted, so such a user cannot lock them out either.
const MAX_CLIENTS: usize = 64;
/// Most refusals written to the trail per second per calling uid, one record each; the rest are
/// counted and the count goes in that uid's next refusal written, so a flood cannot fill the
/// disk or hide another uid's attempt.
const MAX_REFUSALS_PER_SECOND: u32 = 10;
/// And of all uids together, so many uids cannot flood the trail either.
const MAX_ALL_REFUSALS_PER_SECOND: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot reach the agent's control socket {path} (is the agent running with this --state-dir?): {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the agent sent an unreadable answer: {0}")]
    Answer(String),
    #[error(
        "the agent closed the connection without answering (it allows {CLIENT_TIMEOUT:?} per command); \
         a decision may or may not have been made: check `tollgate approvals list` or the audit trail"
    )]
    NoAnswer,
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    List,
    Approve { id: ApprovalId, reason: Option<String> },
    Deny { id: ApprovalId, reason: Option<String> },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<Request>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<Request>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Binds the socket (replacing a stale one); anyone may connect, the peer check decides.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io { path: path.to_owned(), source };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let l = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(l)
}

/// Open control connections per uid.
#[derive(Default)]
struct Clients(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// A counted connection; dropping it frees the slot.
struct Slot(Arc<Clients>, u32);

impl Clients {
    /// `approver`: named by the policy (by uid or primary gid), so not held to MAX_CLIENTS.
    fn enter(self: &Arc<Self>, uid: u32, approver: bool) -> Option<Slot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if uid != 0 && !approver && open.iter().filter(|(u, _)| **u != 0).map(|(_, n)| n).sum::<usize>() >= MAX_CLIENTS
        {
            return None;
        }
        let n = open.entry(uid).or_default();
        if uid != 0 && *n >= MAX_CLIENTS_PER_UID {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), uid))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    let clients = Arc::new(Clients::default());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    crate::timer::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // A peer the kernel cannot name counts as one more connection of nobody's.
        let (uid, gid) = stream.peer_cred().map_or((u32::MAX, u32::MAX), |c| (c.uid(), c.gid()));
        let approver = {
            let view = shared.view();
            let a = &view.policy.approvers;
            a.uids.contains(&uid) || a.gids.contains(&gid)
        };
        let Some(slot) = clients.enter(uid, approver) else {
            let why = format!(
                "too many control connections at once (at most {MAX_CLIENTS_PER_UID} per uid, {MAX_CLIENTS} of all \
                 non-root uids but approvers)"
            );
            audit_refusal(&shared, None, Some(uid), &why);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::timer::timeout(CLIENT_TIMEOUT, handle(stream, &shared)).await {
                warn!(error = %e, "control client timed out");
            }
            drop(slot);
        });
    }
}

fn peer_of(stream: &UnixStream, shared: &Shared) -> Option<Peer> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid()? as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // The pid must still be the process that connected (same real uid), or its groups and
    // cgroup say nothing about the caller.
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok());
    if uid != Some(cred.uid()) {
        return None;
    }
    let groups = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    // A process whose cgroup cannot be read counts as enrolled: fail closed.
    let enrolled = match crate::cgroup::path_of_pid(pid) {
        None => true,
        Some(path) => {
            let view = shared.view();
            view.policy.cgroups().iter().any(|c| {
                let c = c.as_str();
                path == c || path.strip_prefix(c).is_some_and(|rest| rest.starts_with('/'))
            })
        }
    };
    // Looked at later, only for a caller the other checks let through (`handle`).
    Some(Peer { uid: cred.uid(), gid: cred.gid(), groups, enrolled, uid_enrolled: false })
}

/// Whether a process of `uid` (real, effective, saved or filesystem) runs in one of `cgroups`
/// or below it. Unsure (no cgroup2 mount, too many cgroups to look at) counts as yes.
fn uid_runs_enrolled(uid: u32, cgroups: &[crate::policy::CgroupPath]) -> bool {
    let Ok(mount) = crate::cgroup::cgroup2_mount() else { return true };
    let mut dirs: Vec<PathBuf> = cgroups.iter().map(|c| mount.join(c.relative())).collect();
    let mut looked = 0;
    while let Some(dir) = dirs.pop() {
        looked += 1;
        if looked > 10_000 {
            return true;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
            if uids.split_whitespace().any(|u| u.parse() == Ok(uid)) {
                return true;
            }
        }
        let children = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        dirs.extend(children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    false
}

async fn handle(stream: UnixStream, shared: &Shared) {
    let peer = peer_of(&stream, shared);
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let reply = match BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await {
        Err(e) => Reply { error: Some(format!("cannot read the request: {e}")), ..Default::default() },
        Ok(_) => match serde_json::from_str::<Command>(&line) {
            Err(e) => Reply { error: Some(format!("malformed request: {e}")), ..Default::default() },
            Ok(cmd) => {
                let mut peer = peer;
                // Reads /proc for every enrolled process: only for a non-root caller the other
                // checks let through, and off the agent's event loop.
                if let Some(p) = &mut peer
                    && p.uid != 0
                    && authorize(p, &shared.view().policy.approvers).is_ok()
                {
                    let uid = p.uid;
                    let cgroups: Vec<_> = shared.view().policy.cgroups().into_iter().cloned().collect();
                    let walk = tokio::task::spawn_blocking(move || uid_runs_enrolled(uid, &cgroups));
                    p.uid_enrolled = walk.await.unwrap_or(true);
                }
                execute(cmd, peer, shared)
            }
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

/// Per calling uid (`None`: unidentified): refusals written to the trail in the current second,
/// and those not written one by one since the last one that was.
#[derive(Default)]
struct RefusalLog {
    second: u64,
    written: u32,
    unwritten: u64,
}

/// Refused attempts not recorded because all uids together were over their budget.
static UNWRITTEN_ANY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

static REFUSALS: std::sync::Mutex<Option<std::collections::HashMap<Option<u32>, RefusalLog>>> =
    std::sync::Mutex::new(None);

/// An `approval` record with verdict `refused`: every refused attempt is on the trail, one
/// record each up to MAX_REFUSALS_PER_SECOND per calling uid (so one uid's flood cannot hide
/// another's attempt) and MAX_ALL_REFUSALS_PER_SECOND in all, the rest counted in that uid's
/// next one.
fn audit_refusal(shared: &Shared, cmd: Option<&Command>, uid: Option<u32>, why: &str) {
    warn!(uid, why, ?cmd, "approval command refused");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let unwritten = {
        let mut logs = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
        let logs = logs.get_or_insert_with(Default::default);
        if logs.len() > 1024 {
            logs.retain(|_, l| l.second == now || l.unwritten > 0);
        }
        let all: u32 = logs.values().filter(|l| l.second == now).map(|l| l.written).sum();
        let log = logs.entry(uid).or_default();
        if log.second != now {
            (log.second, log.written) = (now, 0);
        }
        if log.written >= MAX_REFUSALS_PER_SECOND {
            log.unwritten += 1;
            return;
        }
        // Over the budget of all uids: counted for whoever is recorded next, so an attempt of
        // a uid that does not try again is not lost from the trail.
        if all >= MAX_ALL_REFUSALS_PER_SECOND {
            UNWRITTEN_ANY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        log.written += 1;
        std::mem::take(&mut log.unwritten)
    };
    let unwritten_any = UNWRITTEN_ANY.swap(0, std::sync::atomic::Ordering::Relaxed);
    let mut r = Record::new(Kind::Approval);
    if let Some(Command::Approve { id, .. } | Command::Deny { id, .. }) = cmd {
        r.approval_id = Some(id.0);
    }
    r.approver = uid;
    r.verdict = Some("refused".into());
    r.error = Some(why.to_string());
    r.detail = Some(match cmd {
        Some(Command::List) => "list".to_string(),
        Some(Command::Approve { .. }) => "approve".to_string(),
        Some(Command::Deny { .. }) => "deny".to_string(),
        // Turned away before it could say what it wanted.
        None => "connect".to_string(),
    });
    if unwritten > 0 {
        r.count = Some(unwritten);
        r.detail =
            r.detail.map(|d| format!("{d}; {unwritten} earlier refused attempts were too many to record one by one"));
    }
    if unwritten_any > 0 {
        r.detail = r.detail.map(|d| {
            format!("{d}; {unwritten_any} refused attempts of any uid came too many at once to record one by one")
        });
    }
    shared.audit.append(r);
}

fn execute(cmd: Command, peer: Option<Peer>, shared: &Shared) -> Reply {
    let refuse = |msg: String| Reply { error: Some(msg), ..Default::default() };
    let Some(peer) = peer else {
        let why = "cannot identify the calling process";
        audit_refusal(shared, Some(&cmd), None, why);
        return refuse(why.into());
    };
    let approvers = shared.view().policy.approvers.clone();
    if let Err(refusal) = authorize(&peer, &approvers) {
        audit_refusal(shared, Some(&cmd), Some(peer.uid), &refusal.to_string());
        return refuse(refusal.to_string());
    }
    if let Command::Approve { reason: Some(r), .. } | Command::Deny { reason: Some(r), .. } = &cmd
        && r.len() > MAX_REASON
    {
        return refuse(format!("the reason may be at most {MAX_REASON} bytes"));
    }
    let by = peer.uid;
    match &cmd {
        Command::List => Reply { pending: Some(shared.approvals.list()), ..Default::default() },
        Command::Approve { id, reason: r } => decide(shared, &cmd, *id, Verdict::Approved { by, reason: r.clone() }),
        Command::Deny { id, reason: r } => decide(shared, &cmd, *id, Verdict::Denied { by, reason: r.clone() }),
    }
}

/// Carries out `cmd`, an Approve or Deny of request `id`, as `verdict`.
fn decide(shared: &Shared, cmd: &Command, id: ApprovalId, verdict: Verdict) -> Reply {
    let what = verdict.as_str();
    let by = match &verdict {
        Verdict::Approved { by, .. } | Verdict::Denied { by, .. } => Some(*by),
        _ => None,
    };
    match shared.approvals.decide(id, verdict, by) {
        Ok(req) => {
            info!(%id, decision = what, "approval decided");
            Reply { decided: Some(req), ..Default::default() }
        }
        Err(e) => {
            // Deciding one's own request is the telling attempt: on the trail like the others.
            if let super::DecideError::OwnUid(..) = e {
                audit_refusal(shared, Some(cmd), by, &e.to_string());
            }
            Reply { error: Some(e.to_string()), ..Default::default() }
        }
    }
}

/// The longest reply a client reads: a list of every pending request at its longest, each
/// control character escaped in six bytes.
const MAX_REPLY: u64 = (super::MAX_PENDING as u64) * 6 * (100 << 10) + (1 << 20);

/// Client side: sends one command and returns the agent's reply.
pub async fn call(state_dir: &Path, cmd: &Command) -> Result<Reply, ControlError> {
    let path = socket_path(state_dir);
    let mut s =
        UnixStream::connect(&path).await.map_err(|source| ControlError::Connect { path: path.clone(), source })?;
    let mut line = serde_json::to_vec(cmd).map_err(|e| ControlError::Answer(e.to_string()))?;
    line.push(b'\n');
    let io = |source| ControlError::Io { path: path.clone(), source };
    s.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_REPLY)).read_line(&mut answer).await.map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::NoAnswer);
    }
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| ControlError::Answer(e.to_string()))?;
    match reply.error {
        Some(e) => Err(ControlError::Refused(e)),
        None => Ok(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_connections_are_bounded_per_uid_and_in_all_but_roots() {
        let clients = Arc::new(Clients::default());
        let one: Vec<_> = (0..MAX_CLIENTS_PER_UID).map(|_| clients.enter(1000, false).unwrap()).collect();
        assert!(clients.enter(1000, false).is_none(), "per uid");
        let many: Vec<_> =
            (0..MAX_CLIENTS - one.len()).map(|i| clients.enter(100_000 + i as u32, false).unwrap()).collect();
        assert!(clients.enter(200_000, false).is_none(), "in all");
        assert!(clients.enter(0, false).is_some(), "root is never turned away");
        assert!(clients.enter(2000, true).is_some(), "nor an approver");
        drop(many);
        assert!(clients.enter(200_000, false).is_some());
    }

    #[test]
    fn commands_are_strict_json() {
        let c: Command = serde_json::from_str(r#"{"op":"approve","id":7,"reason":"ok"}"#).unwrap();
        assert_eq!(c, Command::Approve { id: ApprovalId(7), reason: Some("ok".into()) });
        assert!(serde_json::from_str::<Command>(r#"{"op":"approve","id":7,"extra":1}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"op":"approve_all"}"#).is_err());
    }
}
