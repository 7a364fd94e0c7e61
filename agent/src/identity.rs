//! Process attribution: turns a kernel record into who made the connection.
use std::fs;

use agent_common::ConnRecord;

use crate::{
    audit::Record,
    kernel::event,
    policy::Policy,
};

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
    pub fn from_record(rec: &ConnRecord, policy: &Policy) -> Self {
        let identity = event::index(rec.identity).and_then(|i| policy.identities.get(i));
        let exe = fs::read_link(format!("/proc/{}/exe", rec.tgid)).ok().map(|p| p.display().to_string());
        let cgroup = crate::cgroup::path_of_pid(rec.tgid).or_else(|| identity.map(|i| i.cgroup.to_string()));
        Self {
            identity: identity.map(|i| i.name.clone()),
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
