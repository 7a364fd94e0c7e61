//! `tollgate run`: wires policy, kernel, proxy and audit together and handles signals.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    approval,
    audit::{self, AuditLog, Kind, Record},
    cgroup::{self, Cgroup, CgroupId},
    identity::{Attribution, ProcCache},
    ids::{Ids, View},
    kernel::{
        self, Counters, Kernel, Origins, Pins, event,
        plan::{self, Clock, Inputs, ProxyAddrs},
    },
    policy::{self, CgroupPath, Mode, Policy, Protocol, ResourceAddress},
    proxy::{self, Shared},
    state::{Reported, StateDir, Status},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("cannot start the proxy's event loops: {0}")]
    Threads(#[source] std::io::Error),
    #[error("proxy cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Reload(String),
    #[error("resource {resource}: cannot resolve {address}: {error}")]
    Resolve { resource: String, address: String, error: String },
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Control(#[from] crate::approval::control::ControlError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

pub struct RunOptions {
    pub policy_file: PathBuf,
    pub state_dir: PathBuf,
    /// Event loops for sessions (`proxy::loops`): 1 runs them all on the caller's runtime.
    pub threads: usize,
    /// Bytes of large messages the sessions may buffer together (`proxy::memory`).
    pub message_memory: usize,
    /// What one identity's sessions may buffer of that together.
    pub message_memory_per_identity: usize,
    /// How long a message holding some of that memory may wait on its peers in all.
    pub message_timeout: std::time::Duration,
}

/// Resolves each resource's address (host names via the system resolver). A resource that
/// does not resolve is an error: its traffic would otherwise count as unlisted, which under
/// `unlisted: allow` would send it around the proxy.
fn resolve(policy: &Policy) -> Result<Vec<Vec<SocketAddr>>, AgentError> {
    policy
        .resources
        .iter()
        .map(|r| match &r.address {
            ResourceAddress::Socket(sa) => Ok(vec![*sa]),
            ResourceAddress::Host { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| AgentError::Resolve {
                        resource: r.name.clone(),
                        address: r.address.to_string(),
                        error: e.to_string(),
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(AgentError::Resolve {
                        resource: r.name.clone(),
                        address: r.address.to_string(),
                        error: "no addresses".into(),
                    });
                }
                Ok(addrs)
            }
        })
        .collect()
}

/// Where PostgreSQL builds put their Unix sockets by default (Debian's and upstream's).
const PG_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// Socket files through which a PostgreSQL resource on this host can also be reached. The
/// agent cannot refuse Unix connects here (README, "Known limits"), so it names them.
fn unix_sockets_around(policy: &Policy, resolved: &[Vec<SocketAddr>]) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileTypeExt;
    let local: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|a| IpAddr::V4(a.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
            })
            .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for (r, addrs) in policy.resources.iter().zip(resolved) {
        if r.protocol != Protocol::Postgres {
            continue;
        }
        let mut ports: Vec<u16> =
            addrs.iter().filter(|a| a.ip().is_loopback() || local.contains(&a.ip())).map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        for port in ports {
            for dir in PG_SOCKET_DIRS {
                let path = Path::new(dir).join(format!(".s.PGSQL.{port}"));
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                    out.push((r.name.clone(), path));
                }
            }
        }
    }
    out
}

/// Creates missing identity cgroups and returns their ids.
fn cgroup_ids(mount: &Path, policy: &Policy) -> Result<HashMap<CgroupPath, (CgroupId, Cgroup)>, AgentError> {
    let mut out = HashMap::new();
    for path in policy.cgroups() {
        let cg = Cgroup::new(mount, path);
        if cg.create()? {
            info!(cgroup = %path, "created cgroup");
        }
        out.insert(path.clone(), (cg.id()?, cg));
    }
    Ok(out)
}

/// Accept backlog of the proxy listeners. Bursts of connects from an enrolled process land in
/// this queue; the 128 a plain bind gives overflows, and every overflow costs the client a 1 s
/// SYN retransmission. The kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

struct Agent {
    options: RunOptions,
    state: StateDir,
    mount: PathBuf,
    kernel: Kernel,
    shared: Arc<Shared>,
    proxy: ProxyAddrs,
    listen: Vec<SocketAddr>,
    started: String,
}

impl Agent {
    /// Brings the kernel maps and attachments in line with `view`.
    fn apply(&mut self, view: &View) -> Result<(), AgentError> {
        let policy = &view.policy;
        let resolved = resolve(policy)?;
        let cgroups = cgroup_ids(&self.mount, policy)?;
        let ids: HashMap<CgroupPath, CgroupId> = cgroups.iter().map(|(p, (id, _))| (p.clone(), *id)).collect();
        let plan = plan::plan(&Inputs {
            policy,
            cgroup_ids: &ids,
            resolved: &resolved,
            proxy: self.proxy,
            ids: &view.ids,
            clock: Clock::now(),
        });
        for (addr, first, second) in &plan.conflicts {
            warn!(%addr, first, second, "two resources resolve to the same address; the first wins");
        }
        for (resource, path) in unix_sockets_around(policy, &resolved) {
            warn!(
                resource,
                path = %path.display(),
                "the server also accepts connections on this Unix socket, which enrolled processes can reach around the proxy; keep it out of their reach (README, Known limits)"
            );
        }
        for (_, cg) in cgroups.values() {
            if let Some((above, who)) = cg.left_by() {
                warn!(
                    cgroup = %cg.path,
                    above = %above.display(),
                    who,
                    "processes of this user may write cgroup.procs above an enrolled cgroup, so they can move themselves out of it and are then not enforced; enroll identities outside cgroup trees delegated to the users they run as"
                );
            }
        }
        self.kernel.sync(&plan)?;
        for (id, cg) in cgroups.values() {
            if !self.kernel.is_attached(*id) {
                self.kernel.attach(*id, &cg.open()?)?;
                info!(cgroup = %cg.path, id = id.0, "enforcing");
            }
        }
        let wanted: Vec<CgroupId> = cgroups.values().map(|(id, _)| *id).collect();
        for id in self.kernel.pins().attached_cgroups() {
            if !wanted.contains(&id) {
                self.kernel.detach(id)?;
                info!(id = id.0, "no longer enforcing a cgroup the policy dropped");
            }
        }
        Ok(())
    }

    /// A view of `policy` with ids assigned (and persisted) for any new names.
    fn view_of(&self, policy: Policy, current: &Ids) -> Result<View, AgentError> {
        // A CA file that cannot be read is found now, not by the first session that needs it.
        self.shared.tls.refresh();
        for r in &policy.resources {
            self.shared
                .tls
                .client_config(&r.tls.upstream)
                .map_err(|e| AgentError::Reload(format!("resource {}: {e}", r.name)))?;
        }
        if let Some(ca_file) = policy.webhook.as_ref().and_then(|w| w.ca_file.as_deref()) {
            crate::tls::verifying(ca_file).map_err(|e| AgentError::Reload(format!("notify.ca_file: {e}")))?;
        }
        let mut ids = current.clone();
        if ids.assign(&policy) {
            self.state.write_ids(&ids)?;
        }
        Ok(View { policy, ids })
    }

    fn status(&self, policy: &Policy) -> Status {
        Status {
            pid: std::process::id(),
            started: self.started.clone(),
            policy_file: self.options.policy_file.clone(),
            policy_name: policy.name.clone(),
            mode: match policy.mode {
                Mode::Enforce => "enforce".into(),
                Mode::Monitor => "monitor".into(),
            },
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
            pin_dir: self.kernel.pins().root.clone(),
            cgroups: policy.cgroups().iter().map(|c| c.to_string()).collect(),
            identities: policy.identities.len(),
            resources: policy.resources.len(),
            grants: policy.grants.len(),
        }
    }

    fn reload(&mut self) -> Result<Arc<View>, AgentError> {
        let new = policy::load(&self.options.policy_file)?;
        let current = self.shared.view();
        if new.listen != current.policy.listen {
            return Err(AgentError::Reload(
                "spec.proxy.listen cannot change while the agent runs; restart it instead".into(),
            ));
        }
        let view = Arc::new(self.view_of(new, &current.ids)?);
        // Readers see the new names before the kernel starts using their ids.
        self.shared.set_view(view.clone());
        if let Err(e) = self.apply(&view) {
            // Put the previous policy back in the kernel; if that fails too, say so loudly.
            self.shared.set_view(current.clone());
            if let Err(e2) = self.apply(&current) {
                error!(error = %e2, "restoring the previous policy failed; the kernel holds a mix of both");
            }
            return Err(e);
        }
        self.state.write_status(&self.status(&view.policy))?;
        Ok(view)
    }
}

fn policy_record(kind: Kind, policy_file: &Path, name: Option<&str>, error: Option<String>) -> Record {
    let mut r = Record::new(kind);
    r.policy = name.map(str::to_owned);
    r.detail = Some(policy_file.display().to_string());
    r.error = error;
    r
}

pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    // Before anything is logged: a SIGHUP sent as soon as "ready" shows would otherwise find
    // the default action (exit) in place; one sent during start-up is taken once ready.
    // SIGTERM and SIGINT keep theirs until then, so a start that waits can be stopped.
    let sig = |k| signal(k).map_err(|source| AgentError::Io { what: "installing signal handlers", source });
    let mut hup = sig(SignalKind::hangup())?;
    let threads = options.threads;
    let policy = policy::load(&options.policy_file)?;
    let state = StateDir::create(&options.state_dir)?;
    let _lock = state.lock_wait()?;
    kernel::ensure_bpffs()?;
    let mount = cgroup::cgroup2_mount()?;
    let (audit_log, audit_thread) = AuditLog::open(&state.audit_dir())?;
    audit_log.set_rotation(policy.trail_rotation);

    // Listen first: the kernel is told where the proxy is only once it is there.
    let mut listeners = Vec::new();
    for addr in &policy.listen {
        listeners.push(listen_on(*addr).map_err(|source| AgentError::Listen { addr: *addr, source })?);
    }
    let listen: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()
        .map_err(|source| AgentError::Io { what: "listener address", source })?;
    let proxy = ProxyAddrs {
        v4: *listen.iter().find(|a| a.is_ipv4()).expect("validated: an IPv4 listener exists"),
        v6: listen.iter().find(|a| a.is_ipv6()).copied(),
    };

    let pins = Pins { root: state.pin_dir() };
    let adopted = pins.exists();
    let mut kernel = Kernel::load(pins.clone())?;
    let events = kernel.take_events()?;
    let counters = kernel.take_counters()?;
    let mut origins = Origins::open(&pins)?;
    // Records left by connections a previous agent never accepted can never be used.
    let stale = origins.clear();
    if stale > 0 {
        info!(stale, "dropped hand-over records left by a previous agent");
    }
    let reported = state.read_reported()?;
    let ids = state.read_ids()?;
    let placeholder = Arc::new(View { policy: policy.clone(), ids: ids.clone() });
    let authority = crate::tls::Authority::load_or_create(&state.root.join("tls"))?;
    let memory = proxy::memory::MessageMemory::new(
        options.message_memory,
        options.message_memory_per_identity,
        options.message_timeout,
    );
    let shared = Arc::new(Shared::new(placeholder, audit_log.clone(), origins, state.mask_key()?, authority, memory));
    let mut agent = Agent {
        options,
        state,
        mount,
        kernel,
        shared: shared.clone(),
        proxy,
        listen: listen.clone(),
        started: audit::now_rfc3339(),
    };
    let view = Arc::new(agent.view_of(policy, &ids)?);
    shared.set_view(view.clone());
    agent.apply(&view)?;
    let policy = &view.policy;

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let loops = Arc::new(proxy::loops::Loops::start(threads).map_err(AgentError::Threads)?);
    for l in listeners {
        tokio::spawn(proxy::serve(l, shared.clone(), stop.clone(), tracker.clone(), loops.clone()));
    }
    let control = approval::control::bind(&approval::control::socket_path(&agent.state.root))?;
    tokio::spawn(approval::control::serve(control, shared.clone(), stop.clone()));
    let events_task = tokio::spawn(read_events(events, shared.clone(), stop.clone()));
    let counters_task =
        tokio::spawn(watch_counters(counters, reported, agent.state.clone(), audit_log.clone(), stop.clone()));

    agent.state.write_status(&agent.status(policy))?;
    let mut start = Record::new(Kind::AgentStart);
    start.policy = Some(policy.name.clone());
    start.detail = Some(format!(
        "listen {}; pins {}{}",
        listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        pins.root.display(),
        if adopted { " (adopted from a previous agent)" } else { "" }
    ));
    audit_log.append_durable(start).await?;
    audit_log.append(policy_record(Kind::PolicyLoad, &agent.options.policy_file, Some(&policy.name), None));
    info!(
        policy = %policy.name,
        listen = ?listen,
        cgroups = ?policy.cgroups().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        adopted,
        loops = loops.count(),
        "ready: enforcement active"
    );

    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match agent.reload() {
                    Ok(v) => {
                        info!(policy = %v.policy.name, "policy reloaded");
                        audit_log.set_rotation(v.policy.trail_rotation);
                        audit_log.append(policy_record(Kind::PolicyLoad, &agent.options.policy_file, Some(&v.policy.name), None));
                    }
                    Err(e) => {
                        error!(error = %e, "policy reload rejected; the previous policy stays in force");
                        audit_log.append(policy_record(Kind::PolicyRejected, &agent.options.policy_file, None, Some(e.to_string())));
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    info!("shutting down: closing sessions");
    stop.cancel();
    tracker.close();
    if crate::timer::timeout(Duration::from_secs(5), tracker.wait()).await.is_err() {
        warn!("sessions still open after 5s; the audit trail closes when the last ends (each has a deadline)");
    }
    let _ = events_task.await;
    let _ = counters_task.await;
    audit_log.append_durable(Record::new(Kind::AgentStop)).await?;
    let _ = std::fs::remove_file(agent.state.status_path());
    drop(agent);
    drop(shared);
    drop(audit_log);
    // Sessions still open hold the trail open; on this loop (`--threads 1`) they must keep
    // being polled to reach their deadlines, so the join waits off the loop.
    let _ = tokio::task::spawn_blocking(move || audit_thread.join()).await;
    info!(
        pins = %pins.root.display(),
        "stopped; enforcement stays pinned (connections to protected resources are refused) until `tollgate run` starts again or `tollgate uninstall` removes it"
    );
    Ok(())
}

/// Turns kernel events into `connect` audit records.
async fn read_events(rb: RingBuf<MapData>, shared: Arc<Shared>, stop: CancellationToken) {
    // SAFETY: the ring buffer owns its map fd and returns that same fd until it is dropped,
    // which happens only with the AsyncFd.
    let mut fd = match unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            let e = e.into_parts().1;
            error!(error = %e, "cannot poll the event ring buffer; connection attempts will not be audited");
            return;
        }
    };
    let poll = Duration::from_millis(agent_common::EVENTS_POLL_MS);
    let mut procs = ProcCache::default();
    let mut warned = Warned::default();
    loop {
        // The kernel wakes us only once a batch is pending; the timeout drains stragglers.
        match crate::timer::timeout(poll, fd.readable_mut()).await {
            Ok(Ok(mut guard)) => {
                drain(guard.get_inner_mut(), &shared, &mut procs, &mut warned);
                guard.clear_ready();
            }
            Ok(Err(e)) => {
                error!(error = %e, "event ring buffer poll failed");
                return;
            }
            Err(_) => drain(fd.get_mut(), &shared, &mut procs, &mut warned),
        }
        if stop.is_cancelled() {
            // Drain what is left so the trail has every attempt up to the stop.
            drain(fd.get_mut(), &shared, &mut procs, &mut warned);
            return;
        }
    }
}

/// Enrolled processes already reported for holding privileges that undo enforcement, by
/// identity, uid and executable (bounded: past the bound, the records still say it).
#[derive(Default)]
struct Warned(std::collections::HashSet<(Option<String>, Option<u32>, Option<String>)>);

impl Warned {
    fn note(&mut self, r: &Record) {
        let Some(privileges) = &r.privileges else { return };
        if self.0.len() >= 1024 || !self.0.insert((r.identity.clone(), r.uid, r.exe.clone())) {
            return;
        }
        warn!(
            identity = r.identity.as_deref().unwrap_or("-"),
            uid = r.uid,
            exe = r.exe.as_deref().unwrap_or("-"),
            privileges = %privileges.join(", "),
            "an enrolled process holds privileges that let it undo its own enforcement; run agents under their own non-root users without these capabilities"
        );
    }
}

fn drain(rb: &mut RingBuf<MapData>, shared: &Shared, procs: &mut ProcCache, warned: &mut Warned) {
    let mut view = None;
    let mut clock = None;
    while let Some(item) = rb.next() {
        let view = view.get_or_insert_with(|| shared.view());
        let clock = clock.get_or_insert_with(Clock::now);
        match event::decode(&item) {
            Ok(ev) => {
                let r = connect_record(&ev, view, clock, procs);
                warned.note(&r);
                shared.audit.append(r);
            }
            Err(e) => error!(error = %e, "malformed kernel event"),
        }
    }
}

fn connect_record(ev: &agent_common::Event, view: &View, clock: &Clock, procs: &mut ProcCache) -> Record {
    let rec = &ev.record;
    let mut r = Record::new(Kind::Connect);
    Attribution::from_record_cached(rec, view, procs).fill(&mut r);
    r.destination = Some(event::destination(rec).to_string());
    r.resource = view.resource_name(rec.resource).map(str::to_owned);
    r.hook = Some(event::hook_name(ev.hook).into());
    r.l4 = Some(if ev.l4 == agent_common::L4_UDP { "udp" } else { "tcp" }.into());
    r.verdict = Some(event::verdict_name(ev.verdict).into());
    r.reason = Some(event::reason_name(ev.reason).into());
    r.would_deny = (ev.would_deny != 0).then_some(true);
    r.cookie = Some(rec.cookie);
    let at = clock.wall_of(rec.ts_boot_ns);
    r.rule = Some(event::rule(ev, view, at));
    r.kernel_time = at.format(&time::format_description::well_known::Rfc3339).ok();
    r
}

/// Reports kernel-side losses (ring buffer full, hand-over failures) as audit records,
/// including those that happened while no agent was running (the totals already reported are
/// kept in the state dir).
async fn watch_counters(
    counters: Counters,
    mut reported: Reported,
    state: StateDir,
    audit: AuditLog,
    stop: CancellationToken,
) {
    let mut tick = crate::timer::interval(Duration::from_secs(1));
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = counters.read();
        // Counters restart from zero when the maps are created anew (after an uninstall).
        let dropped = now.events_dropped.checked_sub(reported.events_dropped).unwrap_or(now.events_dropped);
        let failed = now.handoff_failed.checked_sub(reported.handoff_failed).unwrap_or(now.handoff_failed);
        if dropped > 0 {
            warn!(dropped, "kernel events dropped: ring buffer full");
            let mut r = Record::new(Kind::EventsDropped);
            r.count = Some(dropped);
            r.detail = Some(format!("total dropped since the maps were created: {}", now.events_dropped));
            audit.append(r);
        }
        if failed > 0 {
            warn!(failed, "kernel could not hand connection records to the proxy");
            let mut r = Record::new(Kind::EventsDropped);
            r.count = Some(failed);
            r.reason = Some("handoff_failed".into());
            r.detail = Some("redirected connections the proxy could not attribute (refused)".into());
            audit.append(r);
        }
        if dropped > 0 || failed > 0 || now.events_dropped < reported.events_dropped {
            reported = Reported { events_dropped: now.events_dropped, handoff_failed: now.handoff_failed };
            if let Err(e) = state.write_reported(&reported) {
                error!(error = %e, "cannot record which kernel losses were reported");
            }
        }
        if stopping {
            break;
        }
    }
}
