//! PostgreSQL proxy: terminates the client's login, logs in upstream with the resource's
//! credential, and judges every statement before it is forwarded.
mod upstream;
pub mod wire;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    sync::Mutex,
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::wire::{Frame, Startup};
use crate::{
    audit::{AuditLog, Kind, Record},
    policy::{Credentials, Grant, rules::Action},
    sql,
};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest statement text kept in an audit record.
const MAX_AUDITED_SQL: usize = 16 << 10;
const SQLSTATE_DENIED: &str = "42501";
const SQLSTATE_PROTOCOL: &str = "08P01";
const SQLSTATE_CONNECTION: &str = "08006";

/// A backend's process id and cancel key, as BackendKeyData carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub key: i32,
}

/// Fake backend keys handed to clients, mapped to the real server's, for CancelRequest.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<BackendKey, (SocketAddr, BackendKey)>>);

impl CancelKeys {
    fn issue(&self, session: u64, upstream: SocketAddr, real: BackendKey) -> BackendKey {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(session);
        let fake = BackendKey { pid: (session & 0x7fff_ffff) as i32, key: h.finish() as i32 };
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(fake, (upstream, real));
        fake
    }

    fn get(&self, fake: BackendKey) -> Option<(SocketAddr, BackendKey)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&fake).copied()
    }

    fn forget(&self, fake: BackendKey) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&fake);
    }
}

/// What a session needs from the proxy.
pub struct Session<'a> {
    pub id: u64,
    pub audit: &'a AuditLog,
    /// Identity fields, destination and resource already filled in.
    pub base: Record,
    pub grant: &'a Grant,
    pub credentials: &'a Credentials,
    pub upstream: SocketAddr,
    pub cancel: &'a CancelKeys,
    pub mark: u32,
    /// False in monitor mode: denials are recorded (`would_deny`) but statements go through.
    pub enforce: bool,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub statements: u64,
    pub denied: u64,
    pub error: Option<String>,
}

/// Reads the password file; it must not be readable by group or others.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{}: must not be readable by group or others (chmod 600)", path.display()));
    }
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), frames: &[Frame]) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    w.write_all(&out).await
}

/// Reads the client's startup, answering SSL/GSS requests with "no".
async fn read_startup(client: &mut TcpStream) -> Result<Startup, String> {
    loop {
        let mut len = [0u8; 4];
        client.read_exact(&mut len).await.map_err(|e| e.to_string())?;
        let len = wire::startup_len(len).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; len - 4];
        client.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        match wire::parse_startup(&body).map_err(|e| e.to_string())? {
            Startup::Ssl | Startup::GssEnc => client.write_all(b"N").await.map_err(|e| e.to_string())?,
            other => return Ok(other),
        }
    }
}

pub async fn serve(mut client: TcpStream, s: Session<'_>, stop: &CancellationToken) -> Outcome {
    let startup = match tokio::time::timeout(STARTUP_TIMEOUT, read_startup(&mut client)).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => {
            let _ =
                send(&mut client, &[wire::error_response(SQLSTATE_PROTOCOL, &format!("tollgate: {e}"), None, None)])
                    .await;
            return Outcome { error: Some(format!("startup: {e}")), ..Default::default() };
        }
        Err(_) => return Outcome { error: Some("startup timed out".into()), ..Default::default() },
    };
    let params = match startup {
        Startup::Cancel { pid, key } => return cancel(s.cancel, BackendKey { pid, key }, s.mark).await,
        Startup::Startup { params } => params,
        Startup::Ssl | Startup::GssEnc => unreachable!("answered in read_startup"),
    };
    let database = params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.clone());
    let mut base = s.base.clone();
    base.database = database.or_else(|| params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()));
    base.db_user = Some(s.credentials.user.clone());

    let login = async {
        let password = read_secret(&s.credentials.password_file)?;
        let stream = crate::proxy::tcp::connect_marked(s.upstream, s.mark).await.map_err(|e| e.to_string())?;
        upstream::login(stream, s.upstream, &s.credentials.user, &password, &params).await.map_err(|e| e.to_string())
    };
    let up = match tokio::time::timeout(STARTUP_TIMEOUT, login).await.unwrap_or_else(|_| Err("timed out".into())) {
        Ok(up) => up,
        Err(e) => {
            let msg = format!("tollgate: cannot log in to {}: {e}", s.upstream);
            let _ = send(&mut client, &[wire::error_response(SQLSTATE_CONNECTION, &msg, None, None)]).await;
            return Outcome { error: Some(msg), ..Default::default() };
        }
    };
    let fake = s.cancel.issue(s.id, s.upstream, BackendKey { pid: up.backend_pid, key: up.backend_key });
    // The client's own password (if any) is never asked for: its kernel identity is its login.
    let mut hello = vec![wire::auth_ok()];
    hello.extend(up.parameters.iter().cloned());
    hello.push(wire::backend_key_data(fake.pid, fake.key));
    hello.push(wire::ready_for_query(b'I'));
    if let Err(e) = send(&mut client, &hello).await {
        s.cancel.forget(fake);
        return Outcome { error: Some(e.to_string()), ..Default::default() };
    }

    // Small request/response messages: Nagle plus delayed ACKs would add 40 ms stalls.
    let _ = client.set_nodelay(true);
    let _ = up.stream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = up.stream.into_split();
    let (inject_tx, inject_rx) = mpsc::unbounded_channel();
    let (expect_tx, expect_rx) = mpsc::unbounded_channel();
    let results = Results { audit: s.audit.clone(), base: base.clone(), expect: expect_rx };
    let down = tokio::spawn(downstream(up_r, up.leftover, client_w, inject_rx, results));
    let outcome = tokio::select! {
        o = upstream_direction(client_r, up_w, &s, &base, inject_tx, expect_tx) => o,
        _ = stop.cancelled() => Outcome { error: Some("agent shutting down".into()), ..Default::default() },
    };
    down.abort();
    s.cancel.forget(fake);
    outcome
}

async fn cancel(keys: &CancelKeys, fake: BackendKey, mark: u32) -> Outcome {
    let Some((addr, BackendKey { pid, key })) = keys.get(fake) else {
        return Outcome { error: Some("cancel request with an unknown key".into()), ..Default::default() };
    };
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, key, &mut out);
    match crate::proxy::tcp::connect_marked(addr, mark).await {
        Ok(mut up) => {
            let _ = up.write_all(&out).await;
            info!(backend = pid, "forwarded a cancel request");
            Outcome::default()
        }
        Err(e) => Outcome { error: Some(format!("cancel: {e}")), ..Default::default() },
    }
}

/// A forwarded sync point (a Query, or a batch ending in Sync) whose result is awaited.
struct Expect {
    /// Sequence numbers of the `statement` records it carries out.
    refs: Vec<u64>,
    started: std::time::Instant,
}

/// What the server answered for one sync point.
#[derive(Default)]
struct Tally {
    rows: u64,
    commands: u64,
    error: Option<String>,
}

impl Tally {
    fn see(&mut self, f: &Frame) {
        match f.tag {
            b'C' => {
                self.commands += 1;
                // "SELECT 5", "INSERT 0 1", "UPDATE 3": the row count is the last word.
                let tag = f.body.split(|&b| b == 0).next().unwrap_or(&[]);
                if let Some(n) = std::str::from_utf8(tag).ok().and_then(|t| t.rsplit(' ').next()?.parse::<u64>().ok()) {
                    self.rows += n;
                }
            }
            b'E' if self.error.is_none() => self.error = wire::error_message(&f.body),
            _ => {}
        }
    }
}

/// Writes a `statement_result` record for each ReadyForQuery the server sends.
struct Results {
    audit: AuditLog,
    base: Record,
    expect: mpsc::UnboundedReceiver<Expect>,
}

impl Results {
    fn record(&mut self, t: Tally) {
        // The expectation was queued before its messages were written upstream, so it is here.
        let Ok(e) = self.expect.try_recv() else { return };
        let mut r = self.base.clone();
        r.kind = Kind::StatementResult;
        r.refs = Some(e.refs);
        r.count = Some(t.rows);
        r.duration_ms = Some(e.started.elapsed().as_millis() as u64);
        r.detail = Some(format!("{} commands", t.commands));
        r.error = t.error;
        self.audit.append(r);
    }
}

/// Frames to send the client once the server has answered `after` sync points.
struct Inject {
    after: u64,
    frames: Vec<Frame>,
    /// Append a ReadyForQuery with the server's current transaction status.
    ready: bool,
}

/// Server -> client: relays frames, tracks ReadyForQuery, and slots in the proxy's own
/// answers (denials) at the right place in the response stream.
async fn downstream(
    mut up: OwnedReadHalf,
    mut buf: BytesMut,
    mut client: OwnedWriteHalf,
    mut injections: mpsc::UnboundedReceiver<Inject>,
    mut results: Results,
) -> std::io::Result<()> {
    let mut ready_seen = 0u64;
    let mut tally = Tally::default();
    let mut status = b'I';
    let mut pending: VecDeque<Inject> = VecDeque::new();
    let mut out = BytesMut::new();
    let mut open = true;
    loop {
        while let Some(f) = wire::decode(&mut buf).map_err(std::io::Error::other)? {
            f.encode(&mut out);
            tally.see(&f);
            if f.tag == b'Z' {
                results.record(std::mem::take(&mut tally));
                ready_seen += 1;
                status = wire::ready_status(&f.body).unwrap_or(status);
                flush_injections(&mut pending, ready_seen, status, &mut out);
            }
        }
        if !out.is_empty() {
            client.write_all(&out).await?;
            out.clear();
        }
        tokio::select! {
            n = up.read_buf(&mut buf), if open => {
                if n? == 0 {
                    open = false;
                    if pending.is_empty() {
                        return Ok(());
                    }
                }
            }
            inj = injections.recv() => match inj {
                Some(i) => {
                    pending.push_back(i);
                    flush_injections(&mut pending, ready_seen, status, &mut out);
                }
                None => return Ok(()),
            },
        }
    }
}

fn flush_injections(pending: &mut VecDeque<Inject>, ready_seen: u64, status: u8, out: &mut BytesMut) {
    while pending.front().is_some_and(|i| i.after <= ready_seen) {
        let i = pending.pop_front().unwrap();
        for f in &i.frames {
            f.encode(out);
        }
        if i.ready {
            wire::ready_for_query(status).encode(out);
        }
    }
}

/// Client -> server: judges simple queries one by one and extended-protocol batches up to each
/// Sync (or Flush) as a whole; nothing of a denied batch reaches the server.
async fn upstream_direction(
    mut client: OwnedReadHalf,
    mut up: OwnedWriteHalf,
    s: &Session<'_>,
    base: &Record,
    inject: mpsc::UnboundedSender<Inject>,
    expect: mpsc::UnboundedSender<Expect>,
) -> Outcome {
    // Judgement records of named prepared statements, so later executions are tied to them.
    let mut prepared: HashMap<String, u64> = HashMap::new();
    let mut batch_refs: Vec<u64> = Vec::new();
    let mut o = Outcome::default();
    let mut buf = BytesMut::new();
    let mut syncs = 0u64;
    let mut batch: Vec<Frame> = Vec::new();
    let mut skip_until_sync = false;
    let mut cache: HashMap<String, sql::Classification> = HashMap::new();
    let deny_frame = |rule: &str, message: Option<&str>| {
        wire::error_response(
            SQLSTATE_DENIED,
            &format!("tollgate: statement denied by rule \"{rule}\""),
            message,
            Some("the agent's policy does not allow this statement"),
        )
    };
    loop {
        let frame = loop {
            match wire::decode(&mut buf) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => {
                    let _ = inject.send(Inject {
                        after: syncs,
                        frames: vec![wire::error_response(SQLSTATE_PROTOCOL, &format!("tollgate: {e}"), None, None)],
                        ready: false,
                    });
                    o.error = Some(e.to_string());
                    return o;
                }
            }
            match client.read_buf(&mut buf).await {
                Ok(0) => return o,
                Ok(_) => {}
                Err(e) => {
                    o.error = Some(e.to_string());
                    return o;
                }
            }
        };
        let mut forward: Vec<Frame> = Vec::new();
        match frame.tag {
            b'Q' => {
                let text = match wire::query_text(&frame.body) {
                    Ok(t) => t.to_string(),
                    Err(e) => {
                        o.error = Some(e.to_string());
                        return o;
                    }
                };
                o.statements += 1;
                match judge(s, base, &mut cache, &text).await {
                    Ok((None, seq)) => {
                        let _ = expect.send(Expect { refs: vec![seq], started: std::time::Instant::now() });
                        forward.push(frame);
                        syncs += 1;
                    }
                    Ok((Some((rule, msg)), _)) => {
                        o.denied += 1;
                        let _ = inject.send(Inject {
                            after: syncs,
                            frames: vec![deny_frame(&rule, msg.as_deref())],
                            ready: true,
                        });
                    }
                    Err(e) => {
                        o.error = Some(e);
                        return o;
                    }
                }
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => {
                if !skip_until_sync {
                    batch.push(frame);
                }
            }
            b'H' | b'S' => {
                let is_sync = frame.tag == b'S';
                if skip_until_sync {
                    if is_sync {
                        skip_until_sync = false;
                        let _ = inject.send(Inject { after: syncs, frames: Vec::new(), ready: true });
                    }
                    continue;
                }
                let mut denied = None;
                let mut parsed: Vec<(String, u64)> = Vec::new();
                for f in &batch {
                    if f.tag == b'B' {
                        if let Ok(name) = wire::bind_statement(&f.body)
                            && let Some(seq) = prepared.get(name)
                        {
                            batch_refs.push(*seq);
                        }
                        continue;
                    }
                    if f.tag != b'P' {
                        continue;
                    }
                    let (name, text) = match wire::parse_message(&f.body) {
                        Ok((n, t)) => (n.to_string(), t.to_string()),
                        Err(e) => {
                            o.error = Some(e.to_string());
                            return o;
                        }
                    };
                    o.statements += 1;
                    match judge(s, base, &mut cache, &text).await {
                        Ok((None, seq)) => parsed.push((name, seq)),
                        Ok((Some(d), _)) => {
                            denied = Some(d);
                            break;
                        }
                        Err(e) => {
                            o.error = Some(e);
                            return o;
                        }
                    }
                }
                match denied {
                    None => {
                        for (name, seq) in parsed {
                            if name.is_empty() {
                                batch_refs.push(seq);
                            } else {
                                prepared.insert(name, seq);
                            }
                        }
                        forward.append(&mut batch);
                        forward.push(frame);
                        if is_sync {
                            let refs = std::mem::take(&mut batch_refs);
                            let _ = expect.send(Expect { refs, started: std::time::Instant::now() });
                            syncs += 1;
                        }
                    }
                    Some((rule, msg)) => {
                        o.denied += 1;
                        batch.clear();
                        batch_refs.clear();
                        // As a server does after an error: skip to Sync, then one ReadyForQuery.
                        let _ = inject.send(Inject {
                            after: syncs,
                            frames: vec![deny_frame(&rule, msg.as_deref())],
                            ready: is_sync,
                        });
                        skip_until_sync = !is_sync;
                    }
                }
            }
            // COPY data from the client: its COPY statement was judged already.
            b'd' | b'c' | b'f' => forward.push(frame),
            b'X' => {
                let _ = send(&mut up, &[frame]).await;
                return o;
            }
            b'F' => {
                // The function-call sub-protocol names functions by OID, outside any SQL the
                // rules could judge: refused.
                o.denied += 1;
                let _ = inject.send(Inject {
                    after: syncs,
                    frames: vec![deny_frame("function-call-protocol", None)],
                    ready: true,
                });
            }
            other => {
                let msg = format!("tollgate: unexpected message type {:?}", other as char);
                let _ = inject.send(Inject {
                    after: syncs,
                    frames: vec![wire::error_response(SQLSTATE_PROTOCOL, &msg, None, None)],
                    ready: false,
                });
                o.error = Some(msg);
                return o;
            }
        }
        if !forward.is_empty()
            && let Err(e) = send(&mut up, &forward).await
        {
            o.error = Some(e.to_string());
            return o;
        }
    }
}

/// Classifies and decides one query string, and records it durably before it may be
/// forwarded. `Ok(None)`: allowed; `Ok(Some((rule, message)))`: denied.
/// Denied: the rule and its message.
type Denial = Option<(String, Option<String>)>;

async fn judge(
    s: &Session<'_>,
    base: &Record,
    cache: &mut HashMap<String, sql::Classification>,
    text: &str,
) -> Result<(Denial, u64), String> {
    let class = match cache.get(text) {
        Some(c) => c.clone(),
        None => {
            let c = sql::classify(text);
            if cache.len() >= 1024 {
                cache.clear();
            }
            cache.insert(text.to_string(), c.clone());
            c
        }
    };
    let d = crate::policy::rules::decide(&s.grant.name, &s.grant.rules, s.grant.default, &class);
    let mut r = base.clone();
    r.kind = Kind::Statement;
    r.statement = Some(truncate(text, MAX_AUDITED_SQL));
    r.statement_kinds = Some(class.kinds_str());
    r.verdict = Some(d.action.as_str().into());
    r.rule = Some(d.rule.clone());
    r.detail = d.message.clone();
    let monitored = d.action == Action::Deny && !s.enforce;
    if monitored {
        r.verdict = Some("allow".into());
        r.would_deny = Some(true);
    }
    let seq = s.audit.append_durable(r).await.map_err(|e| format!("audit unavailable: {e}"))?;
    match d.action {
        Action::Allow => Ok((None, seq)),
        Action::Deny if monitored => Ok((None, seq)),
        Action::Deny => {
            warn!(session = s.id, rule = %d.rule, "statement denied");
            Ok((Some((d.rule, d.message)), seq))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
