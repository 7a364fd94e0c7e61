//! Process attribution: turns a kernel record into who made the connection.
use std::{
    collections::HashMap,
    fs,
    time::{Duration, Instant},
};

use agent_common::ConnRecord;

use crate::{audit::Record, ids::View, kernel::event};

/// The kernel-attested facts about the process behind a connection, plus what /proc adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub identity: Option<String>,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    /// What lets the process undo its own enforcement (`privileges`).
    pub privileges: Vec<&'static str>,
}

impl Attribution {
    /// `exe` and `cgroup` come from /proc while the process lives; a process that already
    /// exited keeps the kernel facts only (and its identity's cgroup).
    pub fn from_record(rec: &ConnRecord, view: &View) -> Self {
        Self::build(rec, view, proc_facts(rec.tgid))
    }

    /// Like `from_record`, but reuses /proc facts read for the same process within the last
    /// second: a busy process emits thousands of events, and /proc reads dominate their cost.
    pub fn from_record_cached(rec: &ConnRecord, view: &View, cache: &mut ProcCache) -> Self {
        let facts = cache.get(rec.tgid, rec.comm);
        Self::build(rec, view, facts)
    }

    fn build(rec: &ConnRecord, view: &View, ProcFacts { exe, cgroup, privileges }: ProcFacts) -> Self {
        let cgroup = cgroup.or_else(|| view.identity(rec.identity).map(|(_, i)| i.cgroup.to_string()));
        Self {
            identity: view.identity_name(rec.identity).map(str::to_owned),
            pid: rec.pid,
            tgid: rec.tgid,
            uid: rec.uid,
            gid: rec.gid,
            comm: event::comm(rec),
            exe,
            cgroup,
            privileges,
        }
    }

    pub fn fill(&self, r: &mut Record) {
        r.identity = self.identity.clone();
        r.pid = Some(self.pid);
        r.tgid = Some(self.tgid);
        r.uid = Some(self.uid);
        r.gid = Some(self.gid);
        r.comm = Some(self.comm.clone());
        r.exe = self.exe.clone();
        r.cgroup = self.cgroup.clone();
        r.privileges = (!self.privileges.is_empty()).then(|| self.privileges.iter().map(|p| p.to_string()).collect());
    }
}

/// What /proc says of a live process.
#[derive(Debug, Clone, Default)]
struct ProcFacts {
    exe: Option<String>,
    cgroup: Option<String>,
    privileges: Vec<&'static str>,
}

fn proc_facts(tgid: u32) -> ProcFacts {
    let exe = fs::read_link(format!("/proc/{tgid}/exe")).ok().map(|p| p.display().to_string());
    let privileges = fs::read_to_string(format!("/proc/{tgid}/status")).map(|s| privileges(&s)).unwrap_or_default();
    ProcFacts { exe, cgroup: crate::cgroup::path_of_pid(tgid), privileges }
}

/// Capabilities that undo enforcement, by bit: setting the socket mark the proxy's own
/// connections carry, and changing or detaching the eBPF programs and maps.
const ESCAPE_CAPABILITIES: [(u32, &str); 3] = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN"), (39, "CAP_BPF")];

/// What in a `/proc/PID/status` text lets the process undo its enforcement: an effective uid
/// of 0 (root owns the cgroup files, so it may move itself out of its cgroup) and the
/// `ESCAPE_CAPABILITIES` it holds.
fn privileges(status: &str) -> Vec<&'static str> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let mut out = Vec::new();
    if field("Uid:").and_then(|u| u.split_whitespace().nth(1)) == Some("0") {
        out.push("uid 0");
    }
    if let Some(caps) = field("CapEff:").and_then(|c| u64::from_str_radix(c, 16).ok()) {
        out.extend(ESCAPE_CAPABILITIES.iter().filter(|(bit, _)| caps & (1 << bit) != 0).map(|(_, name)| *name));
    }
    out
}

/// Short-lived cache of /proc facts, keyed by tgid and comm (an exec changes the comm, which
/// starts a new entry; the TTL bounds staleness from pid reuse or cgroup moves).
#[derive(Default)]
pub struct ProcCache {
    entries: HashMap<(u32, [u8; 16]), (Instant, ProcFacts)>,
}

const PROC_CACHE_TTL: Duration = Duration::from_secs(1);
const PROC_CACHE_MAX: usize = 4096;

impl ProcCache {
    fn get(&mut self, tgid: u32, comm: [u8; 16]) -> ProcFacts {
        let now = Instant::now();
        if let Some((at, facts)) = self.entries.get(&(tgid, comm))
            && now.duration_since(*at) < PROC_CACHE_TTL
        {
            return facts.clone();
        }
        if self.entries.len() >= PROC_CACHE_MAX {
            self.entries.retain(|_, (at, _)| now.duration_since(*at) < PROC_CACHE_TTL);
            if self.entries.len() >= PROC_CACHE_MAX {
                self.entries.clear();
            }
        }
        let facts = proc_facts(tgid);
        self.entries.insert((tgid, comm), (now, facts.clone()));
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileges_that_undo_enforcement() {
        let status = |uid: &str, caps: &str| format!("Name:\tpsql\nUid:\t{uid}\nGid:\t0\t0\t0\t0\nCapEff:\t{caps}\n");
        assert_eq!(
            privileges(&status("0\t0\t0\t0", "000001fffeffffff")),
            ["uid 0", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_BPF"]
        );
        assert!(privileges(&status("1000\t1000\t1000\t1000", "0000000000000000")).is_empty());
        // The effective uid counts: a set-uid program's process is root's.
        assert_eq!(privileges(&status("1000\t0\t0\t0", "0000000000000000")), ["uid 0"]);
        assert_eq!(privileges(&status("1000\t1000\t1000\t1000", "0000000000001000")), ["CAP_NET_ADMIN"]);
        assert!(privileges("").is_empty(), "a process gone: nothing known");
    }
}
