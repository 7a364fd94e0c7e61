//! cgroup v2 helpers: find the mount, create cgroups, read ids, move processes.
use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::policy::CgroupPath;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The kernel's id of a cgroup (the inode number of its cgroup2 directory), as
/// `bpf_get_current_cgroup_id` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

/// Mount point of the cgroup2 filesystem, from `/proc/self/mountinfo` (it is not always
/// `/sys/fs/cgroup`: hybrid hosts mount it at `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_mountinfo(&info).ok_or(CgroupError::NoCgroup2)
}

fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source opts
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup under a known cgroup2 mount.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub path: CgroupPath,
    pub dir: PathBuf,
}

impl Cgroup {
    pub fn new(mount: &Path, path: &CgroupPath) -> Self {
        Self { path: path.clone(), dir: mount.join(path.relative()) }
    }

    fn err(&self, source: io::Error) -> CgroupError {
        CgroupError::Io { path: self.dir.clone(), source }
    }

    pub fn exists(&self) -> bool {
        self.dir.join("cgroup.procs").exists()
    }

    /// Creates the cgroup and its parents; true if it did not exist.
    pub fn create(&self) -> Result<bool, CgroupError> {
        if self.exists() {
            return Ok(false);
        }
        fs::create_dir_all(&self.dir).map_err(|e| self.err(e))?;
        Ok(true)
    }

    pub fn id(&self) -> Result<CgroupId, CgroupError> {
        Ok(CgroupId(fs::metadata(&self.dir).map_err(|e| self.err(e))?.ino()))
    }

    pub fn open(&self) -> Result<fs::File, CgroupError> {
        fs::File::open(&self.dir).map_err(|e| self.err(e))
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let mut f = fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs")).map_err(|e| self.err(e))?;
        f.write_all(format!("{pid}\n").as_bytes()).map_err(|e| self.err(e))
    }

    /// A cgroup above this one (below the mount) whose `cgroup.procs` someone other than root
    /// may write, and who: the kernel lets a process move itself to any cgroup under a common
    /// ancestor whose `cgroup.procs` it may write, so processes of that user can leave this
    /// cgroup for one not enrolled (a subtree delegated to a user, as systemd does). The
    /// cgroup's own children are enrolled with it, so only those above count.
    pub fn left_by(&self) -> Option<(PathBuf, String)> {
        let above = self.path.relative().split('/').count().saturating_sub(1);
        self.dir.ancestors().skip(1).take(above).find_map(|dir| {
            let meta = fs::metadata(dir.join("cgroup.procs")).ok()?;
            let who = if meta.mode() & 0o002 != 0 {
                "any user".to_string()
            } else if meta.uid() != 0 {
                format!("uid {}", meta.uid())
            } else if meta.mode() & 0o020 != 0 {
                format!("gid {}", meta.gid())
            } else {
                return None;
            };
            Some((dir.to_path_buf(), who))
        })
    }

    /// Removes the cgroup if it is empty (no processes, no children).
    pub fn remove(&self) -> Result<(), CgroupError> {
        match fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// The cgroup2 path of a process (`0::/path` in `/proc/PID/cgroup`), if it still exists.
pub fn path_of_pid(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_above_that_others_may_write_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let mount = tempfile::tempdir().unwrap();
        let path = CgroupPath::parse("/agents/team/bot").unwrap();
        let cg = Cgroup::new(mount.path(), &path);
        for dir in ["", "agents", "agents/team", "agents/team/bot"] {
            let d = mount.path().join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
            fs::set_permissions(d.join("cgroup.procs"), fs::Permissions::from_mode(0o644)).unwrap();
        }
        let owned_by_us = nix::unistd::geteuid().is_root();
        let set = |dir: &str, mode: u32| {
            fs::set_permissions(mount.path().join(dir).join("cgroup.procs"), fs::Permissions::from_mode(mode)).unwrap()
        };
        if owned_by_us {
            assert_eq!(cg.left_by(), None);
        }
        // The cgroup itself, and the mount's root, do not count: only the cgroups between.
        set("agents/team/bot", 0o666);
        set("", 0o666);
        if owned_by_us {
            assert_eq!(cg.left_by(), None);
        }
        set("agents", 0o664);
        if owned_by_us {
            let gid = fs::metadata(mount.path().join("agents/cgroup.procs")).unwrap().gid();
            assert_eq!(cg.left_by(), Some((mount.path().join("agents"), format!("gid {gid}"))));
        }
        set("agents/team", 0o666);
        assert_eq!(cg.left_by(), Some((mount.path().join("agents/team"), "any user".into())));
        if owned_by_us {
            set("agents/team", 0o644);
            nix::unistd::chown(&mount.path().join("agents/team/cgroup.procs"), Some(1000.into()), None).unwrap();
            assert_eq!(cg.left_by(), Some((mount.path().join("agents/team"), "uid 1000".into())));
        }
    }

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        assert_eq!(parse_mountinfo(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        assert_eq!(parse_mountinfo("1 2 0:1 / /a\\040b rw - cgroup2 cgroup2 rw\n"), Some(PathBuf::from("/a b")));
    }
}
