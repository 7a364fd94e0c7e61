//! The local proxy: accepts redirected connections, learns their origin from the kernel, checks
//! the grant, records the session and dispatches to the resource's protocol handler.
pub mod conn;
pub mod loops;
pub mod memory;
pub mod postgres;
pub mod tcp;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, info_span, warn};

use crate::{
    approval::Approvals,
    audit::{AuditLog, Kind, Record},
    identity::Attribution,
    ids::View,
    kernel::{Origins, event, plan::boot_ns},
    mask::Masker,
    policy::{Access, Grant, Mode, Protocol},
};

/// How long the proxy waits for an upstream to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Oldest kernel hand-over record the proxy accepts.
const MAX_RECORD_AGE: Duration = Duration::from_secs(30);

/// Each grant's masker, shared by its sessions (with the catalogs they read,
/// `Masker::with_origins`) while the grant's masking rules stay as they are.
#[derive(Default)]
struct Maskers(Mutex<HashMap<String, Arc<Masker>>>);

impl Maskers {
    /// The masker of `grant` (None: it masks nothing): the one its sessions have had, unless a
    /// reload changed its rules.
    fn of(&self, grant: &Grant, key: [u8; 32]) -> Option<Arc<Masker>> {
        if grant.masking.is_empty() {
            return None;
        }
        let mut maskers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = maskers.get(&grant.name).filter(|m| m.rules() == grant.masking.as_slice()) {
            return Some(m.clone());
        }
        // Maskers no session holds (of grants a reload removed or changed) go at the next change.
        maskers.retain(|_, m| Arc::strong_count(m) > 1);
        let m = Arc::new(Masker::new(&grant.masking, key));
        maskers.insert(grant.name.clone(), m.clone());
        Some(m)
    }
}

/// What every connection handler needs.
pub struct Shared {
    view: RwLock<Arc<View>>,
    pub audit: AuditLog,
    pub origins: Mutex<Origins>,
    pub cancel: postgres::CancelKeys,
    pub approvals: Approvals,
    /// Keys the `hash` masking style, so hashed values stay equal across sessions and restarts.
    mask_key: [u8; 32],
    maskers: Maskers,
    /// The agent's CA for client-side TLS, and cached TLS configurations.
    pub tls: crate::tls::Authority,
    /// What sessions may buffer of large messages, together.
    pub memory: Arc<memory::MessageMemory>,
    next_session: AtomicU64,
}

impl Shared {
    pub fn new(
        view: Arc<View>,
        audit: AuditLog,
        origins: Origins,
        mask_key: [u8; 32],
        tls: crate::tls::Authority,
        memory: Arc<memory::MessageMemory>,
    ) -> Self {
        Self {
            view: RwLock::new(view),
            audit,
            origins: Mutex::new(origins),
            cancel: postgres::CancelKeys::default(),
            approvals: Approvals::default(),
            mask_key,
            maskers: Default::default(),
            tls,
            memory,
            next_session: AtomicU64::new(1),
        }
    }

    pub fn masker(&self, grant: &Grant) -> Option<Arc<Masker>> {
        self.maskers.of(grant, self.mask_key)
    }

    /// The policy in force with its ids.
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_view(&self, v: Arc<View>) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// Accepts connections until `stop` is cancelled; sessions run on `tracker`, on `loops`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
    loops: Arc<loops::Loops>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    crate::timer::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Look the origin up right away: the kernel's record is keyed by this peer address,
        // which may be reused once this connection is gone.
        let origin = shared.origins.lock().unwrap_or_else(|e| e.into_inner()).take(peer);
        let shared = shared.clone();
        let stop = stop.clone();
        let session = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", session, %peer);
        loops.spawn(&tracker, stream, span, move |stream| async move {
            match stream {
                Ok(stream) => handle(stream, peer, origin, session, &shared, stop).await,
                Err(e) => {
                    let mut r = Record::new(Kind::SessionRejected);
                    r.session = Some(session);
                    r.reason = Some("handoff_failed".into());
                    r.detail = Some(format!("connection from {peer} could not be moved to a session loop: {e}"));
                    warn!(error = %e, "could not move a connection to a session loop; closed it");
                    shared.audit.append(r);
                }
            }
        });
    }
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    origin: Option<agent_common::ConnRecord>,
    session: u64,
    shared: &Shared,
    stop: CancellationToken,
) {
    let Some(rec) = origin else {
        let mut r = Record::new(Kind::SessionRejected);
        r.session = Some(session);
        r.reason = Some("no_kernel_record".into());
        r.detail = Some(format!("connection from {peer} was not redirected by the kernel; refused"));
        shared.audit.append(r);
        warn!("refused a connection that the kernel did not redirect");
        return;
    };
    let view = shared.view();
    let policy = &view.policy;
    let who = Attribution::from_record(&rec, &view);
    let dst = event::destination(&rec);
    let resource = view.resource(rec.resource);
    let mut base = Record::new(Kind::SessionStart);
    who.fill(&mut base);
    base.session = Some(session);
    base.destination = Some(dst.to_string());
    base.cookie = Some(rec.cookie);
    base.l4 = Some("tcp".into());

    // The hand-over happens as the client's handshake completes; an old record is one left
    // behind (by connections never accepted before an agent stopped) and is not trusted.
    let age = Duration::from_nanos(boot_ns().saturating_sub(rec.ts_boot_ns));
    if age > MAX_RECORD_AGE {
        reject(shared, base, "stale_kernel_record", None);
        return;
    }
    let Some((res_idx, res)) = resource else {
        // The policy changed between the kernel's decision and accept(): the resource is gone.
        reject(shared, base, "resource_removed", None);
        return;
    };
    base.resource = Some(res.name.clone());
    let access = match view.identity(rec.identity) {
        Some((id, _)) => policy.access(id, res_idx, OffsetDateTime::now_utc()),
        None => Access::NotGranted,
    };
    let (rule, granted) = match access {
        Access::Granted { grant } => (grant.to_string(), true),
        Access::Expired { grant } => (grant.to_string(), false),
        Access::NotGranted => ("no-grant".to_string(), false),
    };
    base.rule = Some(rule.clone());
    if !granted {
        if policy.mode == Mode::Enforce {
            reject(shared, base, if rule == "no-grant" { "not_granted" } else { "grant_expired" }, Some(rule));
            return;
        }
        base.would_deny = Some(true);
    }
    base.verdict = Some("allow".into());

    // The session is on disk before a byte goes upstream.
    if let Err(e) = shared.audit.append_durable(base.clone()).await {
        warn!(error = %e, "audit unavailable; refusing the connection");
        return;
    }
    info!(identity = ?who.identity, resource = %res.name, %dst, "session start");

    let started = Instant::now();
    let mut end = base;
    end.kind = Kind::SessionEnd;
    end.verdict = None;
    match (res.protocol, &res.credentials) {
        (Protocol::Postgres, Some(credentials)) => {
            // Monitor mode without a grant: statements are judged by no rules (all allowed).
            let no_rules = Grant {
                name: "monitor".into(),
                identities: Vec::new(),
                resources: Vec::new(),
                expires: None,
                rules: Vec::new(),
                default: crate::policy::rules::Action::Allow,
                masking: Vec::new(),
                read_only: false,
            };
            let grant = policy.grant(&rule).unwrap_or(&no_rules);
            let mut session_base = base_for_statements(&end);
            session_base.kind = Kind::Statement;
            let webhook = || shared.view().policy.webhook.clone();
            let pg = postgres::Session {
                id: session,
                audit: &shared.audit,
                base: session_base,
                grant,
                credentials,
                upstream: dst,
                cancel: &shared.cancel,
                mark: agent_common::AGENT_MARK,
                enforce: policy.mode == Mode::Enforce,
                approvals: &shared.approvals,
                webhook: &webhook,
                masker: shared.masker(grant),
                held: Default::default(),
                resource: res,
                authority: &shared.tls,
                statement_audit: policy.statement_audit,
                memory: &shared.memory,
            };
            let outcome = postgres::serve(client, pg, &stop).await;
            let login = outcome.upstream_auth.as_deref().map(|a| format!("upstream login {a}; ")).unwrap_or_default();
            end.detail = Some(format!("{login}{} statements, {} denied", outcome.statements, outcome.denied));
            end.duration_ms = Some(started.elapsed().as_millis() as u64);
            end.error = outcome.error.clone();
            info!(statements = outcome.statements, denied = outcome.denied, error = ?outcome.error, "session end");
        }
        _ => {
            let outcome = tcp::relay(client, dst, CONNECT_TIMEOUT, &stop).await;
            end.bytes_up = Some(outcome.bytes_up);
            end.bytes_down = Some(outcome.bytes_down);
            end.duration_ms = Some(started.elapsed().as_millis() as u64);
            end.error = outcome.error.clone();
            info!(up = outcome.bytes_up, down = outcome.bytes_down, error = ?outcome.error, "session end");
        }
    }
    shared.audit.append(end);
}

/// Identity, destination and session fields every statement record repeats.
fn base_for_statements(r: &Record) -> Record {
    let mut b = r.clone();
    b.would_deny = None;
    b.verdict = None;
    b.rule = None;
    b.l4 = None;
    b.cookie = None;
    b
}

fn reject(shared: &Shared, mut r: Record, reason: &str, rule: Option<String>) {
    r.kind = Kind::SessionRejected;
    r.verdict = Some("deny".into());
    r.reason = Some(reason.into());
    if rule.is_some() {
        r.rule = rule;
    }
    warn!(reason, "session refused");
    shared.audit.append(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{Glob, Rule, Style, Target};

    fn grant(name: &str, style: Style) -> Grant {
        Grant {
            name: name.into(),
            identities: Vec::new(),
            resources: Vec::new(),
            expires: None,
            rules: Vec::new(),
            default: crate::policy::rules::Action::Allow,
            masking: vec![Rule { name: "m".into(), target: Target::Columns(vec![Glob::new("email")]), style }],
            read_only: false,
        }
    }

    /// Sessions share their grant's masker, and so the catalogs it keeps; a reload that changes
    /// the rules gets a new one.
    #[test]
    fn sessions_of_a_grant_share_its_masker_until_its_rules_change() {
        let maskers = Maskers::default();
        let key = [7; 32];
        let first = maskers.of(&grant("g", Style::Hash), key).unwrap();
        assert!(Arc::ptr_eq(&first, &maskers.of(&grant("g", Style::Hash), key).unwrap()));
        assert!(!Arc::ptr_eq(&first, &maskers.of(&grant("other", Style::Hash), key).unwrap()));
        let changed = maskers.of(&grant("g", Style::Redact), key).unwrap();
        assert!(!Arc::ptr_eq(&first, &changed) && changed.rules()[0].style == Style::Redact);
        let mut unmasked = grant("g", Style::Hash);
        unmasked.masking.clear();
        assert!(maskers.of(&unmasked, key).is_none());
    }
}
