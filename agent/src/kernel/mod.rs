//! The kernel edge: load the eBPF object, pin maps and links in bpffs, attach to cgroups, keep
//! the maps in step with the policy, and read events and counters.
pub mod event;
pub mod plan;

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use agent_common::{
    Config, ConnRecord, DestKey, GrantKey, GrantValue, IdentityKey, IdentityValue, MAX_GRANTS, MAX_IDENTITIES,
    MAX_RESOURCES, PeerKey, ResourceValue, counters, maps, programs,
};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, PinnedLink},
    },
};

use crate::cgroup::CgroupId;
pub use plan::Plan;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "policy too large for the kernel maps: {identities} identity entries (max {}), {resources} resource addresses (max {}), {grants} grant pairs (max {})",
        MAX_IDENTITIES,
        MAX_RESOURCES,
        MAX_GRANTS
    )]
    TooLarge { identities: usize, resources: usize, grants: usize },
}

/// The eBPF object built by agent/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TOLLGATE_EBPF_OBJECT"));

const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Mounts bpffs at /sys/fs/bpf unless it is already there.
pub fn ensure_bpffs() -> Result<(), KernelError> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| KernelError::Bpffs(format!("reading /proc/self/mountinfo: {e}")))?;
    let mounted = info.lines().any(|l| {
        let mut it = l.split(" - ");
        let left = it.next().unwrap_or("");
        let fstype = it.next().and_then(|r| r.split_whitespace().next()).unwrap_or("");
        fstype == "bpf" && left.split_whitespace().nth(4) == Some(crate::state::BPFFS)
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), crate::state::BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| KernelError::Bpffs(format!("mount -t bpf bpf {}: {e}", crate::state::BPFFS)))
}

/// Pin layout under the agent's pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn cgroup_links(&self, id: CgroupId) -> PathBuf {
        self.links().join(id.0.to_string())
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// Cgroup ids that have pinned links.
    pub fn attached_cgroups(&self) -> Vec<CgroupId> {
        let Ok(rd) = fs::read_dir(self.links()) else { return Vec::new() };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok().map(CgroupId)).collect()
    }

    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// Number of pinned links (a measure of active enforcement).
    pub fn link_count(&self) -> usize {
        self.attached_cgroups()
            .into_iter()
            .filter_map(|c| fs::read_dir(self.cgroup_links(c)).ok())
            .map(|rd| rd.count())
            .sum()
    }

    /// Detaches every link of a cgroup by removing its pins.
    pub fn detach_cgroup(&self, id: CgroupId) -> Result<(), KernelError> {
        let dir = self.cgroup_links(id);
        remove_pins(&dir, |_| true)?;
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KernelError::Io { path: dir, source: e }),
        }
    }

    /// Removes everything pinned: detaches all programs and drops the maps.
    pub fn remove_all(&self) -> Result<(), KernelError> {
        for id in self.attached_cgroups() {
            self.detach_cgroup(id)?;
        }
        for dir in [self.links(), self.maps()] {
            remove_pins(&dir, |_| true)?;
            let _ = fs::remove_dir(&dir);
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(KernelError::Io { path: self.root.clone(), source: e }),
        }
        // The shared parent goes too once no agent uses it (fails harmlessly if one does).
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }
}

fn remove_pins(dir: &Path, which: impl Fn(&str) -> bool) -> Result<(), KernelError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(KernelError::Io { path: dir.to_owned(), source: e }),
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if which(&name) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(KernelError::Io { path, source: e }),
            }
        }
    }
    Ok(())
}

/// The loaded programs and the maps the agent updates.
pub struct Kernel {
    ebpf: Ebpf,
    pins: Pins,
    /// Distinguishes this agent's link pins from those of the agent it replaced.
    generation: String,
    attached: HashSet<CgroupId>,
}

impl Kernel {
    /// Loads the programs; maps already pinned under `pins` (by a previous agent) are reused.
    pub fn load(pins: Pins) -> Result<Self, KernelError> {
        let maps_dir = pins.maps();
        fs::create_dir_all(&maps_dir).map_err(|e| KernelError::Pin { path: maps_dir.clone(), source: e })?;
        fs::create_dir_all(pins.links()).map_err(|e| KernelError::Pin { path: pins.links(), source: e })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| KernelError::Program { name, source })?;
        }
        let prog: &mut SockOps = program(&mut ebpf, programs::SOCKOPS)?;
        prog.load().map_err(|source| KernelError::Program { name: programs::SOCKOPS, source })?;
        let generation = format!("{}-{}", std::process::id(), plan::boot_ns());
        Ok(Self { ebpf, pins, generation, attached: HashSet::new() })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Attaches every program to a cgroup and pins the links; then removes the links of older
    /// generations on that cgroup. Both generations run during the switch, which is harmless
    /// because they share the maps and ignore connections already pointed at the proxy.
    pub fn attach(&mut self, id: CgroupId, cgroup: &fs::File) -> Result<(), KernelError> {
        let dir = self.pins.cgroup_links(id);
        fs::create_dir_all(&dir).map_err(|e| KernelError::Pin { path: dir.clone(), source: e })?;
        // bpffs refuses names containing dots.
        let suffix = format!("-{}", self.generation);
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let link_id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog.take_link(link_id).map_err(|source| KernelError::Program { name, source })?;
            let fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| KernelError::Program {
                name,
                source: ProgramError::IOError(io::Error::other(e.to_string())),
            })?;
            pin_link(fd, dir.join(format!("{name}{suffix}")))?;
        }
        let name = programs::SOCKOPS;
        let prog: &mut SockOps = program(&mut self.ebpf, name)?;
        let link_id =
            prog.attach(cgroup, CgroupAttachMode::Single).map_err(|source| KernelError::Program { name, source })?;
        let link = prog.take_link(link_id).map_err(|source| KernelError::Program { name, source })?;
        let fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| KernelError::Program {
            name,
            source: ProgramError::IOError(io::Error::other(e.to_string())),
        })?;
        pin_link(fd, dir.join(format!("{name}{suffix}")))?;
        remove_pins(&dir, |n| !n.ends_with(&suffix))?;
        self.attached.insert(id);
        Ok(())
    }

    /// Whether this agent has attached its own programs to the cgroup.
    pub fn is_attached(&self, id: CgroupId) -> bool {
        self.attached.contains(&id)
    }

    pub fn detach(&mut self, id: CgroupId) -> Result<(), KernelError> {
        self.attached.remove(&id);
        self.pins.detach_cgroup(id)
    }

    /// Makes the maps hold exactly what the plan says, in an order where every intermediate
    /// state is at most as permissive as the old or the new policy: stale grants go first,
    /// new grants last, and the config (where the proxy is) at the very end.
    pub fn sync(&mut self, plan: &Plan) -> Result<(), KernelError> {
        if plan.identities.len() > MAX_IDENTITIES as usize
            || plan.resources.len() > MAX_RESOURCES as usize
            || plan.grants.len() > MAX_GRANTS as usize
        {
            return Err(KernelError::TooLarge {
                identities: plan.identities.len(),
                resources: plan.resources.len(),
                grants: plan.grants.len(),
            });
        }
        remove_stale::<GrantKey, GrantValue>(&mut self.ebpf, maps::GRANTS, &plan.grants)?;
        remove_stale::<IdentityKey, IdentityValue>(&mut self.ebpf, maps::IDENTITIES, &plan.identities)?;
        remove_stale::<DestKey, ResourceValue>(&mut self.ebpf, maps::RESOURCES, &plan.resources)?;
        upsert::<IdentityKey, IdentityValue>(&mut self.ebpf, maps::IDENTITIES, &plan.identities)?;
        upsert::<DestKey, ResourceValue>(&mut self.ebpf, maps::RESOURCES, &plan.resources)?;
        upsert::<GrantKey, GrantValue>(&mut self.ebpf, maps::GRANTS, &plan.grants)?;
        let name = maps::CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(|source| KernelError::Map { name, source })?;
        cfg.set(0, plan.config, 0).map_err(|source| KernelError::Map { name, source })
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let name = maps::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map { name, source })
    }

    /// Takes the counters (once).
    pub fn take_counters(&mut self) -> Result<Counters, KernelError> {
        let name = maps::COUNTERS;
        let map = self.ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
        PerCpuArray::try_from(map).map(Counters).map_err(|source| KernelError::Map { name, source })
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(KernelError::Program {
        name,
        source: ProgramError::IOError(io::Error::other("not in the eBPF object")),
    })?;
    prog.try_into().map_err(|source| KernelError::Program { name, source })
}

fn pin_link(link: FdLink, path: PathBuf) -> Result<(), KernelError> {
    let pinned: PinnedLink = link
        .pin(&path)
        .map_err(|e| KernelError::Pin { path: path.clone(), source: io::Error::other(e.to_string()) })?;
    // Dropping the handle closes our fd; the pin keeps the link (and the program) attached.
    drop(pinned);
    Ok(())
}

fn hash_map<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>, KernelError> {
    let map = ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
    BpfHashMap::try_from(map).map_err(|source| KernelError::Map { name, source })
}

fn remove_stale<K: Pod + Eq + std::hash::Hash, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &[(K, V)],
) -> Result<(), KernelError> {
    let mut m = hash_map::<K, V>(ebpf, name)?;
    let keep: HashSet<K> = want.iter().map(|(k, _)| *k).collect();
    let stale: Vec<K> = m.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
    for k in stale {
        m.remove(&k).map_err(|source| KernelError::Map { name, source })?;
    }
    Ok(())
}

fn upsert<K: Pod, V: Pod + PartialEq>(ebpf: &mut Ebpf, name: &'static str, want: &[(K, V)]) -> Result<(), KernelError> {
    let mut m = hash_map::<K, V>(ebpf, name)?;
    for (k, v) in want {
        if m.get(k, 0).ok().as_ref() != Some(v) {
            m.insert(k, v, 0).map_err(|source| KernelError::Map { name, source })?;
        }
    }
    Ok(())
}

/// Kernel counters (summed over CPUs).
pub struct Counters(PerCpuArray<MapData, u64>);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub events_sent: u64,
    pub events_dropped: u64,
    pub handoff_failed: u64,
}

impl Counters {
    pub fn read(&self) -> CounterValues {
        let sum = |i: u32| self.0.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        CounterValues {
            events_sent: sum(counters::EVENTS_SENT),
            events_dropped: sum(counters::EVENTS_DROPPED),
            handoff_failed: sum(counters::HANDOFF_FAILED),
        }
    }

    /// Opens the pinned counters of an agent (for `status`).
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        let name = maps::COUNTERS;
        let data = MapData::from_pin(pins.map(name)).map_err(|source| KernelError::Map { name, source })?;
        let map = Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })?;
        PerCpuArray::try_from(map).map(Counters).map_err(|source| KernelError::Map { name, source })
    }
}

/// The proxy's view of the hand-over map: the kernel record of a redirected connection, found
/// by the client's address.
pub struct Origins(BpfHashMap<MapData, PeerKey, ConnRecord>);

impl Origins {
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        let name = maps::ORIGINS;
        let data = MapData::from_pin(pins.map(name)).map_err(|source| KernelError::Map { name, source })?;
        let map = Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })?;
        BpfHashMap::try_from(map).map(Origins).map_err(|source| KernelError::Map { name, source })
    }

    /// Forgets every hand-over record (at start-up: none of them can be accepted any more).
    pub fn clear(&mut self) -> usize {
        let keys: Vec<PeerKey> = self.0.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| self.0.remove(k).is_ok()).count()
    }

    /// Looks up and removes the record for a client address.
    pub fn take(&mut self, peer: std::net::SocketAddr) -> Option<ConnRecord> {
        let key = PeerKey { addr: plan::addr6(peer.ip()), port: u32::from(peer.port()) };
        let rec = self.0.get(&key, 0).ok()?;
        let _ = self.0.remove(&key);
        Some(rec)
    }
}
