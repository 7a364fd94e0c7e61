//! Counting a running proxy's user-space instructions with valgrind's callgrind.
//!
//! Instruction counts repeat run after run on this machine, where timings move by ±15 %, so
//! a small change shows in them that no timed run could resolve. They leave out the kernel's
//! share (syscalls, loopback delivery, wake-ups), which is most of a proxy's CPU here.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util;

/// Where the wrapped processes write their counts.
pub struct Callgrind {
    dir: PathBuf,
}

/// Instructions a process executed between a zeroing and a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    /// In SHA-256 compression: valgrind cannot run the SHA extensions, so this part is the
    /// portable code's count, several times what the hardware path executes natively.
    pub sha256: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts { total: self.total.saturating_sub(o.total), sha256: self.sha256.saturating_sub(o.sha256) }
    }
}

impl Callgrind {
    /// Checks that valgrind runs, and makes `dir` writable by every user (pgbouncer runs as
    /// `postgres`).
    pub fn new(dir: &Path) -> anyhow::Result<Callgrind> {
        util::output(Command::new("valgrind").arg("--version")).context("--instructions needs valgrind")?;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        Ok(Callgrind { dir: dir.to_path_buf() })
    }

    /// The arguments that run a program under callgrind: put them before the program's own.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--quiet".into(),
            // What `parse` reads, whatever a .valgrindrc or VALGRIND_OPTS says.
            "--dump-instr=no".into(),
            "--dump-line=yes".into(),
            "--compress-strings=yes".into(),
            "--compress-pos=yes".into(),
            "--collect-jumps=no".into(),
            "--separate-threads=no".into(),
            "--cache-sim=no".into(),
            "--branch-sim=no".into(),
            format!("--callgrind-out-file={}/%p.out", self.dir.display()),
        ]
    }

    /// Runs `work` and returns the instructions process `pid` executed meanwhile, and the dump
    /// they were read from (for `callgrind_annotate`).
    pub fn count(&self, pid: u32, work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<(Counts, PathBuf)> {
        control(pid, "-z")?;
        work()?;
        // What the work left in flight (closing the session, sealing its last records) lands
        // in this count, in every run alike, not at a point that depends on timing.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let before = self.dumps(pid)?;
        control(pid, "-d")?;
        for _ in 0..50 {
            if let Some(new) = self.dumps(pid)?.into_iter().find(|p| !before.contains(p)) {
                // The file appears when callgrind starts writing it: a dump ends with `totals:`.
                let dump = std::fs::read_to_string(&new)?;
                if dump.contains("\ntotals:") {
                    return Ok((parse(&dump).with_context(|| format!("{}", new.display()))?, new));
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("callgrind wrote no dump for process {pid}")
    }

    fn dumps(&self, pid: u32) -> anyhow::Result<Vec<PathBuf>> {
        let prefix = format!("{pid}.out.");
        Ok(std::fs::read_dir(&self.dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
            .collect())
    }
}

/// Sends a command to a process under callgrind, as the process's own user: valgrind's
/// control channel is named after it, and root's attempt on another user's process reports
/// success and does nothing.
fn control(pid: u32, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(format!("/proc/{pid}"))?.uid();
    let mut cmd = match uid {
        0 => Command::new("callgrind_control"),
        _ => {
            let user = nix::unistd::User::from_uid(uid.into())?.with_context(|| format!("no user {uid}"))?;
            let mut c = Command::new("runuser");
            c.args(["-u", &user.name, "--", "callgrind_control"]);
            c
        }
    };
    util::output(cmd.arg(what).arg(pid.to_string())).map(drop)
}

/// Sums a callgrind dump's instructions, and those of SHA-256 compression functions. A cost
/// line is a line number and the Ir; the line after a `calls=` line is the callee's inclusive
/// cost, already counted in the callee's own lines. The sum must equal the dump's `totals:`.
pub fn parse(dump: &str) -> anyhow::Result<Counts> {
    let mut names = std::collections::HashMap::new();
    let mut in_sha = false;
    let mut skip_next = false;
    let mut counts = Counts::default();
    let mut seen_events = false;
    let mut totals = None;
    for line in dump.lines() {
        if let Some(p) = line.strip_prefix("positions:")
            && p.trim() != "line"
        {
            bail!("expected positions by line only, found {line:?}");
        }
        if let Some(t) = line.strip_prefix("totals:") {
            totals = t.trim().parse::<u64>().ok();
            continue;
        }
        // `fn=(id) name` (or `cfn=`, a callee) names a function the first time, `fn=(id)` after.
        let (callee, rest) = match (line.strip_prefix("fn="), line.strip_prefix("cfn=")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => (false, ""),
        };
        if !rest.is_empty() {
            let (id, name) = rest.split_once(' ').unwrap_or((rest, ""));
            if !name.is_empty() {
                names.insert(id.to_string(), name.to_string());
            }
            if !callee {
                let name = names.get(id).map(String::as_str).unwrap_or("");
                in_sha = name.contains("sha256") && name.contains("compress");
            }
            continue;
        }
        if line.starts_with("events:") {
            if line.trim() != "events: Ir" {
                bail!("expected Ir as the only event, found {line:?}");
            }
            seen_events = true;
            continue;
        }
        if line.starts_with("calls=") {
            skip_next = true;
            continue;
        }
        let first = line.bytes().next();
        if !matches!(first, Some(b'0'..=b'9' | b'+' | b'-' | b'*')) {
            continue;
        }
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let ir: u64 = line.split_whitespace().nth(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        counts.total += ir;
        if in_sha {
            counts.sha256 += ir;
        }
    }
    if !seen_events {
        bail!("not a callgrind dump (no events line)");
    }
    if totals != Some(counts.total) {
        bail!("the costs sum to {}, the dump's totals say {totals:?}: misread", counts.total);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_costs_are_summed_and_call_costs_skipped() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\
                    fn=(1) main\n3 10\n+1 5\ncfn=(2) sha2::sha256::compress256\ncalls=2 0\n4 100\n\
                    fn=(2)\n0 100\n\
                    fn=(3) other\n* 7\ntotals: 122\n";
        assert_eq!(parse(dump).unwrap(), Counts { total: 122, sha256: 100 });
    }

    #[test]
    fn a_file_that_is_not_a_dump_is_an_error() {
        assert!(parse("hello\n").is_err());
        // Costs that do not add up to the dump's totals mean a misread.
        assert!(parse("events: Ir\nfn=(1) a\n1 5\ncalls=1 0\n2 7\ntotals: 12\n").is_err());
        assert!(parse("events: Ir\npositions: instr line\nfn=(1) a\n0x1 1 5\ntotals: 5\n").is_err());
    }
}
