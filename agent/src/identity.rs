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

    fn build(rec: &ConnRecord, view: &View, (exe, cgroup): ProcFacts) -> Self {
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
    }
}

/// (exe, cgroup path) of a live process.
type ProcFacts = (Option<String>, Option<String>);

fn proc_facts(tgid: u32) -> ProcFacts {
    let exe = fs::read_link(format!("/proc/{tgid}/exe")).ok().map(|p| p.display().to_string());
    (exe, crate::cgroup::path_of_pid(tgid))
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
