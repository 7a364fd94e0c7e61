//! The state directory: its layout, the bpffs pin directory derived from it, the run lock and
//! the status file a running agent keeps.
use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::Ids;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("another agent is running with state dir {0}")]
    Locked(PathBuf),
    #[error("{path}: unreadable state file: {source}")]
    Status { path: PathBuf, source: serde_json::Error },
    #[error(
        "{path}: {why}; the state directory and every directory above it must be owned by root or the agent's \
         user and writable by no one else (a sticky directory such as /tmp excepted)"
    )]
    Unsafe { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_owned(), source }
}

/// Refuses a state directory someone other than root or `uid` could tamper with: its owner,
/// or anyone who may write to it or a directory above it, could replace the control socket
/// (and answer approvers), the mask key or the trail. `as_given`: each part of the path as
/// written, before it exists, symlinks included (owned by root or `uid`, or they could point
/// anywhere); otherwise the resolved path, each part of which must exist.
fn check_owners(dir: &Path, uid: u32, as_given: bool) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    for d in dir.ancestors() {
        let meta = match if as_given { fs::symlink_metadata(d) } else { fs::metadata(d) } {
            Ok(m) => m,
            Err(e) if as_given && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StateError::Io { path: d.to_owned(), source: e }),
        };
        let unsafe_dir = |why: String| Err(StateError::Unsafe { path: d.to_owned(), why });
        if meta.uid() != 0 && meta.uid() != uid {
            return unsafe_dir(format!("owned by uid {}", meta.uid()));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if !meta.file_type().is_symlink() && meta.mode() & 0o022 != 0 && !(sticky && d != dir) {
            return unsafe_dir(format!("writable by group or others (mode {:o})", meta.mode() & 0o7777));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// Uses `root` as given if it does not exist yet; canonicalises it otherwise, so the pin
    /// directory is the same however the path is spelled.
    pub fn new(root: &Path) -> Self {
        let root = fs::canonicalize(root).or_else(|_| std::path::absolute(root)).unwrap_or_else(|_| root.to_owned());
        Self { root }
    }

    /// Creates the directory. Mode 0711: approvers who are not root must reach the control
    /// socket inside, but may not list the directory; the trail has its own 0700 directory.
    /// Directories it creates above it are 0755, so approvers can reach it too.
    pub fn create(root: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let uid = nix::unistd::geteuid().as_raw();
        // Before anything is created through a path someone else controls.
        check_owners(&std::path::absolute(root).map_err(io_err(root))?, uid, true)?;
        fs::DirBuilder::new().recursive(true).mode(0o755).create(root).map_err(io_err(root))?;
        let root = fs::canonicalize(root).map_err(io_err(root))?;
        check_owners(&root, uid, false)?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o711)).map_err(io_err(&root))?;
        Ok(Self { root })
    }

    /// The key of the `hash` masking style: created once (0600) so hashes stay stable.
    pub fn mask_key(&self) -> Result<[u8; 32], StateError> {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let path = self.root.join("mask.key");
        match fs::read(&path) {
            Ok(k) if k.len() == 32 => return Ok(k.try_into().expect("32 bytes")),
            Ok(_) => {
                return Err(StateError::Io {
                    path,
                    source: io::Error::new(io::ErrorKind::InvalidData, "a mask key must be 32 bytes"),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StateError::Io { path, source: e }),
        }
        let mut key = [0u8; 32];
        fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).map_err(io_err(&path))?;
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io_err(&path))?;
        std::io::Write::write_all(&mut f, &key).and_then(|()| f.sync_all()).map_err(io_err(&path))?;
        Ok(key)
    }

    /// bpffs directory for this agent's pins: one per state dir, so agents never collide.
    pub fn pin_dir(&self) -> PathBuf {
        let digest = Sha256::digest(self.root.as_os_str().as_encoded_bytes());
        Path::new(BPFFS).join("tollgate").join(hex::encode(&digest[..8]))
    }

    pub fn audit_dir(&self) -> PathBuf {
        crate::audit::dir(&self.root)
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("agent.json")
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// Takes the run lock, retrying for a moment (a `status` may hold it briefly).
    pub fn lock_wait(&self) -> Result<fs::File, StateError> {
        for _ in 0..20 {
            match self.lock() {
                Err(StateError::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(50)),
                other => return other,
            }
        }
        self.lock()
    }

    /// Takes the run lock; held while the returned file lives.
    pub fn lock(&self) -> Result<fs::File, StateError> {
        let path = self.lock_path();
        let file =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                StateError::Locked(self.root.clone())
            } else {
                StateError::Io { path, source: e }
            });
        }
        Ok(file)
    }

    /// True while an agent holds the run lock.
    pub fn is_locked(&self) -> bool {
        if !self.lock_path().exists() {
            return false;
        }
        matches!(self.lock(), Err(StateError::Locked(_)))
    }

    pub fn write_status(&self, status: &Status) -> Result<(), StateError> {
        self.write_json(&self.status_path(), status)
    }

    pub fn read_status(&self) -> Result<Option<Status>, StateError> {
        self.read_json(&self.status_path())
    }

    /// Stable identity/resource ids; they must outlive the agent, like the pinned maps that
    /// carry them.
    pub fn read_ids(&self) -> Result<Ids, StateError> {
        Ok(self.read_json(&self.root.join("ids.json"))?.unwrap_or_default())
    }

    pub fn write_ids(&self, ids: &Ids) -> Result<(), StateError> {
        self.write_json(&self.root.join("ids.json"), ids)
    }

    /// Kernel loss counters already reported on the audit trail.
    pub fn read_reported(&self) -> Result<Reported, StateError> {
        Ok(self.read_json(&self.root.join("reported.json"))?.unwrap_or_default())
    }

    pub fn write_reported(&self, r: &Reported) -> Result<(), StateError> {
        self.write_json(&self.root.join("reported.json"), r)
    }

    /// Replaces a JSON file atomically and durably.
    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), StateError> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(value).expect("state files serialise");
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, path: &Path) -> Result<Option<T>, StateError> {
        match fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|source| StateError::Status { path: path.to_owned(), source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::Io { path: path.to_owned(), source: e }),
        }
    }
}

/// Totals of the kernel's loss counters that are already on the audit trail.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reported {
    pub events_dropped: u64,
    pub handoff_failed: u64,
}

/// What a running agent reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub started: String,
    pub policy_file: PathBuf,
    pub policy_name: String,
    pub mode: String,
    pub listen: Vec<String>,
    pub pin_dir: PathBuf,
    pub cgroups: Vec<String>,
    pub identities: usize,
    pub resources: usize,
    pub grants: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_others_could_tamper_with_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let ok = base.path().join("ok");
        StateDir::create(&ok).unwrap();
        assert_eq!(fs::metadata(&ok).unwrap().permissions().mode() & 0o777, 0o711);
        // Under a sticky, world-writable directory (like /tmp): fine.
        let sticky = base.path().join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        StateDir::create(&sticky.join("state")).unwrap();
        // Under a group-writable one, or one that someone else owns: refused.
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o775)).unwrap();
        let e = StateDir::create(&open.join("state")).unwrap_err().to_string();
        assert!(e.contains("writable by group or others (mode 775)") && e.contains("/open:"), "{e}");
        let theirs = base.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        // (Only root can give a directory away; the tests run as root.)
        if me == 0 {
            nix::unistd::chown(&theirs, Some(65534.into()), None).unwrap();
            let e = check_owners(&theirs, me, false).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
            // A symlink under /tmp-like directories, someone else's, pointing at a directory
            // of root's: refused before anything is created or changed through it.
            let link = sticky.join("link");
            std::os::unix::fs::symlink(&ok, &link).unwrap();
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(65534.into()),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let e = StateDir::create(&link.join("state")).unwrap_err().to_string();
            assert!(e.contains("/link:") && e.contains("owned by uid 65534"), "{e}");
            assert!(!ok.join("state").exists(), "nothing was created through it");
        }
    }

    #[test]
    fn pin_dirs_differ_per_state_dir_and_lock_is_exclusive() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = StateDir::new(a.path());
        let sb = StateDir::new(b.path());
        assert_ne!(sa.pin_dir(), sb.pin_dir());
        assert_eq!(sa.pin_dir(), StateDir::new(&a.path().join(".")).pin_dir());
        assert!(!sa.is_locked());
        let held = sa.lock().unwrap();
        assert!(matches!(sa.lock(), Err(StateError::Locked(_))));
        assert!(sa.is_locked());
        drop(held);
        assert!(!sa.is_locked());
    }
}
