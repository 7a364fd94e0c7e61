//! PostgreSQL proxy: terminates the client's login, logs in upstream with the resource's
//! credential, and judges every statement before it is forwarded.
mod fetches;
pub mod rows;
mod statements;
pub mod track;
mod turns;
mod upstream;
pub mod wire;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    os::{fd::RawFd, unix::fs::PermissionsExt},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};
// Seeded per map, and several times faster than SipHash on the short names looked up for every
// Bind: these maps are per session, keyed by what its own client sends.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    fetches::Fetches,
    statements::Statements,
    track::{Op, Tracker},
    wire::{Frame, Startup},
};
use super::{
    conn::{self, Conn},
    memory::{self, Draw, Exhausted, MessageMemory},
};
use crate::{
    approval::{Approvals, Request, Verdict, notify},
    audit::{Approved, AuditLog, Cut, Kind, Record, Refs, ResultBase, ResultRecord, StatementBase, StatementRecord},
    mask::{Charset, Masker},
    policy::{
        Credentials, Grant, Resource, StatementAudit, Webhook,
        rules::{Action, Decision},
    },
    sql,
};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a held session whose client sent more than it buffers asks whether the client
/// has gone.
const PEER_LOOK: Duration = Duration::from_secs(1);

/// Most extended-protocol messages held back waiting for their Sync or Flush.
const MAX_BATCH: usize = 10_000;
/// Bytes a session reads at once (at least), per direction.
const READ_CHUNK: usize = 16 << 10;
/// A server message longer than this is masked on a blocking thread (`downstream`). Messages
/// this large are rare, and the hand-off costs a thread wake-up each.
const MASK_ELSEWHERE: usize = 256 << 10;
/// A drained buffer bigger than this is let go: one big message (a 60 MiB query, a wide row)
/// must not keep its size for the rest of a session that may idle for days.
const KEEP_CAPACITY: usize = 64 << 10;

/// Lets go of the memory of a drained buffer past KEEP_CAPACITY.
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = BytesMut::new();
    }
}

/// How far ahead of what has arrived of a large message the budget covers it: a session's
/// share grows with the bytes its peer sends, so a header alone, announcing 64 MiB, holds
/// little.
const COVER_AHEAD: usize = 1 << 20;

/// Readies `buf` for the next read of a session's direction that holds `batched` bytes of
/// whole messages besides: covers what it holds and COVER_AHEAD more of the message in
/// progress, gives a large message an allocation of its declared size at once (its pages are
/// touched only as its bytes come, and there are no doublings on the way), and lets go of a
/// large allocation once its message is through (what follows it is copied out), so the
/// memory goes back with the budget's share. While a batch is held, its frames may share that
/// allocation anyway: it goes when they do.
fn ready_buffer(buf: &mut BytesMut, draw: &mut Draw, batched: usize) -> Result<(), Exhausted> {
    let declared = wire::declared(buf);
    if declared <= memory::FREE && batched == 0 && draw.holds() {
        *buf = BytesMut::from(&buf[..]);
    }
    draw.cover(declared.min(buf.len() + COVER_AHEAD) + batched)?;
    trim(buf);
    buf.reserve(if declared > memory::FREE { declared - buf.len() } else { READ_CHUNK });
    Ok(())
}

/// Distinct statement shapes whose classification a session keeps, and most bytes of their
/// keys (a key is about as long as its text, at most `CLASSIFY_ELSEWHERE`).
const CLASSIFICATION_CACHE: usize = 1024;
const CLASSIFICATION_CACHE_BYTES: usize = 4 << 20;
/// Texts longer than this are scanned and classified on a blocking thread, as many at a time
/// for the whole agent as it has CPUs, and not cached: scanning and parsing take time and
/// memory in proportion to a text's length (up to `sql::MAX_TEXT_BYTES` and `MAX_TOKENS`),
/// which an event loop's other sessions must not wait for, nor sessions sending such texts
/// together multiply.
const CLASSIFY_ELSEWHERE: usize = 8 << 10;
static LARGE_CLASSIFICATIONS: std::sync::OnceLock<Arc<turns::Turns>> = std::sync::OnceLock::new();

/// Classifies a text longer than `CLASSIFY_ELSEWHERE`, waiting for a turn in `identity`'s line.
async fn classify_elsewhere(text: &Arc<str>, identity: &str) -> sql::Classification {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let turns = LARGE_CLASSIFICATIONS.get_or_init(|| turns::Turns::new(cpus));
    let _turn = turns.take(identity).await;
    let text = text.clone();
    let classified = tokio::task::spawn_blocking(move || {
        let c = sql::classify(&text);
        // The parse tree may have taken hundreds of megabytes, freed by now: given back to the
        // system rather than kept in the allocator's arenas.
        // SAFETY: malloc_trim only releases free memory; it takes no pointers.
        unsafe { libc::malloc_trim(0) };
        c
    })
    .await;
    classified.unwrap_or_else(|e| sql::Classification::unparseable(format!("the classifier failed: {e}")))
}
/// Longest statement text kept in an audit record.
const MAX_AUDITED_SQL: usize = 16 << 10;
/// Texts longer than this are found, checked, copied and hashed on a blocking thread: for
/// 64 MiB that takes tens of milliseconds, which the loop's other sessions would wait.
const TEXT_ELSEWHERE: usize = 1 << 20;

/// The SQL text `pick` reads in a message's `body`, owned (`TEXT_ELSEWHERE`).
async fn owned_text(
    body: &bytes::Bytes,
    pick: fn(&[u8]) -> Result<&str, wire::WireError>,
) -> Result<Arc<str>, wire::WireError> {
    if body.len() <= TEXT_ELSEWHERE {
        return pick(body).map(Arc::from);
    }
    let b = body.clone();
    match tokio::task::spawn_blocking(move || pick(&b).map(Arc::from)).await {
        Ok(text) => text,
        Err(_) => pick(body).map(Arc::from),
    }
}

/// Most bytes of bound parameters a statement held for approval may carry: all of them are
/// shown to the approver.
const MAX_SHOWN_PARAMETERS: usize = 64 << 10;
const SQLSTATE_DENIED: &str = "42501";
const SQLSTATE_SYSTEM: &str = "58000";
const SQLSTATE_PROTOCOL: &str = "08P01";
const SQLSTATE_CONNECTION: &str = "08006";
const SQLSTATE_REJECTED: &str = "08004";
const SQLSTATE_SHUTDOWN: &str = "57P01";
const SQLSTATE_OUT_OF_MEMORY: &str = "53200";

/// Startup parameters passed on to the server. Others (`options`, `replication`,
/// `standard_conforming_strings`...) could make the server read or run things differently from
/// what the proxy judges, so a client that sends them is refused.
const STARTUP_PARAMS: [&str; 10] = [
    "user",
    "database",
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "search_path",
    "lc_monetary",
];
/// Client encodings a session may ask for, as the server names them and their aliases (letters
/// and digits only, lower case, as the server compares them): UTF-8, and encodings in which
/// every byte of a non-ASCII character is 0x80 or above. In the others (SJIS, BIG5, GBK, UHC,
/// JOHAB, GB18030, SHIFT_JIS_2004 under any alias) a byte inside a character can be a backslash
/// or a quote, so the server would split the text differently from the (UTF-8) classifier.
const SAFE_ENCODINGS: [&str; 63] = [
    "utf8",
    "unicode",
    "sqlascii",
    "latin1",
    "latin2",
    "latin3",
    "latin4",
    "latin5",
    "latin6",
    "latin7",
    "latin8",
    "latin9",
    "latin10",
    "iso88591",
    "iso88592",
    "iso88593",
    "iso88594",
    "iso88595",
    "iso88596",
    "iso88597",
    "iso88598",
    "iso88599",
    "iso885910",
    "iso885913",
    "iso885914",
    "iso885915",
    "iso885916",
    "win",
    "win866",
    "win874",
    "win1250",
    "win1251",
    "win1252",
    "win1253",
    "win1254",
    "win1255",
    "win1256",
    "win1257",
    "win1258",
    "windows866",
    "windows874",
    "windows1250",
    "windows1251",
    "windows1252",
    "windows1253",
    "windows1254",
    "windows1255",
    "windows1256",
    "windows1257",
    "windows1258",
    "alt",
    "abc",
    "tcvn",
    "tcvn5712",
    "vscii",
    "koi8",
    "koi8r",
    "koi8u",
    "eucjp",
    "euccn",
    "euckr",
    "euctw",
    "eucjis2004",
];

/// An encoding's name as the server compares them: letters and digits only, lower case
/// (`EUC_JP`, `euc-jp` and `eucjp` are one).
fn encoding_key(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).collect::<String>().to_ascii_lowercase()
}

/// Whether a client encoding, by any of the server's names for it, is one of SAFE_ENCODINGS.
fn safe_encoding(name: &str) -> bool {
    SAFE_ENCODINGS.contains(&encoding_key(name).as_str())
}

/// How text is made of characters under a client encoding, by any of the server's names for it
/// (the multi-byte lengths are the server's `pg_*_mblen`).
fn charset(encoding: &str) -> Charset {
    match encoding_key(encoding).as_str() {
        "utf8" | "unicode" => Charset::Utf8,
        // No conversion: bytes of whatever the server holds. A byte each never shows more than
        // four characters of any encoding.
        "sqlascii" => Charset::SingleByte,
        "eucjp" | "eucjis2004" | "euckr" => Charset::Euc { ss2: 2, ss3: 3 },
        "euctw" => Charset::Euc { ss2: 4, ss3: 3 },
        "euccn" => Charset::Euc { ss2: 2, ss3: 2 },
        // The rest of SAFE_ENCODINGS: no other client encoding gets past login.
        _ => Charset::SingleByte,
    }
}

/// A ParameterStatus body's name and value.
pub(super) fn parameter(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = body.split(|&b| b == 0);
    Some((parts.next()?, parts.next()?))
}

/// The client encoding's charset, if a ParameterStatus body reports the client encoding.
pub(crate) fn reported_charset(body: &[u8]) -> Option<Charset> {
    let (name, value) = parameter(body)?;
    name.eq_ignore_ascii_case(b"client_encoding").then(|| charset(&String::from_utf8_lossy(value)))
}

/// What is wrong with a ParameterStatus the server sends, if it says the server now reads SQL
/// differently from the classifier: `standard_conforming_strings` off, or a client encoding
/// whose characters can hold a quote or backslash byte. Statements are refused before they
/// could change these, but a function the classifier cannot look into could; the session then
/// ends at the server's word.
fn lexing_setting(body: &[u8]) -> Option<String> {
    let (name, value) = parameter(body)?;
    let (name, value) = (String::from_utf8_lossy(name), String::from_utf8_lossy(value));
    let unsafe_ = if name.eq_ignore_ascii_case("standard_conforming_strings") {
        !value.eq_ignore_ascii_case("on")
    } else if name.eq_ignore_ascii_case("client_encoding") {
        !safe_encoding(&value)
    } else {
        false
    };
    unsafe_.then(|| format!("the server now has {name} = {value}, under which it reads SQL differently from the proxy"))
}

/// Whether a ParameterStatus body reports a server encoding into which UTF-8 names go as they
/// are (UTF8, or SQL_ASCII, which converts nothing).
fn unconverted_server(body: &[u8]) -> bool {
    let Some((name, value)) = parameter(body) else { return false };
    name.eq_ignore_ascii_case(b"server_encoding")
        && (value.eq_ignore_ascii_case(b"UTF8") || value.eq_ignore_ascii_case(b"SQL_ASCII"))
}

/// What is wrong with a ParameterStatus the server sends during a session: what
/// `lexing_setting` finds, or any new client encoding. Statements cannot change it through the
/// proxy, so a function did; names, texts and masking follow the encoding the session logged
/// in with.
fn session_setting(body: &[u8]) -> Option<String> {
    lexing_setting(body).or_else(|| {
        let (name, value) = parameter(body)?;
        name.eq_ignore_ascii_case(b"client_encoding").then(|| {
            format!(
                "the server now has client_encoding = {}, set by a function; the proxy reads names and text in the \
                 encoding the session logged in with",
                String::from_utf8_lossy(value)
            )
        })
    })
}

fn check_startup_params(params: &[(String, String)]) -> Result<(), String> {
    for (i, (k, v)) in params.iter().enumerate() {
        if !STARTUP_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(k)) {
            return Err(format!("startup parameter {k:?} is not allowed through the proxy"));
        }
        // The server takes the last of the same name; the audit trail must name what it takes.
        if params[..i].iter().any(|(seen, _)| seen.eq_ignore_ascii_case(k)) {
            return Err(format!("startup parameter {k:?} is given twice"));
        }
        if k.eq_ignore_ascii_case("client_encoding") && !safe_encoding(v) {
            return Err(format!(
                "client_encoding {v:?} is not supported through the proxy; use UTF8 (multibyte encodings other \
                 than UTF-8 and EUC are refused)"
            ));
        }
    }
    Ok(())
}

/// A backend's process id and cancel key, as BackendKeyData carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub key: i32,
}

/// Where a client's CancelRequest goes: the real backend, or the session's held statement.
#[derive(Clone)]
struct CancelTarget {
    upstream: SocketAddr,
    /// As the session's own connection is encrypted.
    encryption: upstream::Encryption,
    real: BackendKey,
    /// The approval request the session waits on (0: none).
    held: Arc<AtomicU64>,
    /// Only a process of the same identity may cancel the session's statements.
    identity: Option<String>,
}

impl CancelTarget {
    /// Another identity's process must not stop this session's statements, key or not.
    fn may_cancel(&self, from: &Option<String>) -> Result<(), String> {
        if self.identity.is_some() && &self.identity == from {
            return Ok(());
        }
        let of = |i: &Option<String>| i.clone().unwrap_or_else(|| "none".into());
        Err(format!(
            "cancel request refused: the session belongs to identity {}, the request came from {}",
            of(&self.identity),
            of(from)
        ))
    }
}

/// Backend keys handed to clients, mapped to the real server's, for CancelRequest. A client
/// gets its backend's real pid (what `pg_backend_pid()` and notifications show it) and a
/// secret key of the agent's, so the server's own key never leaves the agent.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<BackendKey, CancelTarget>>);

/// A key issued to a session; the mapping goes when the session does, however it ends.
struct IssuedKey<'a> {
    keys: &'a CancelKeys,
    key: BackendKey,
}

impl Drop for IssuedKey<'_> {
    fn drop(&mut self) {
        self.keys.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

impl CancelKeys {
    fn issue(&self, target: CancelTarget) -> IssuedKey<'_> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut key = [0u8; 4];
            crate::tls::fill_random(&mut key);
            let fake = BackendKey { pid: target.real.pid, key: i32::from_ne_bytes(key) };
            // Two servers may have backends of the same pid: never replace another's entry.
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(fake) {
                e.insert(target);
                return IssuedKey { keys: self, key: fake };
            }
        }
    }

    fn get(&self, fake: BackendKey) -> Option<CancelTarget> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&fake).cloned()
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
    pub approvals: &'a Approvals,
    /// The webhook the policy names now (a reload may change or remove it mid-session).
    pub webhook: &'a (dyn Fn() -> Option<Webhook> + Sync),
    /// Present when the grant masks results.
    pub masker: Option<Arc<Masker>>,
    /// The approval request this session waits on (0: none), for CancelRequest.
    pub held: Arc<AtomicU64>,
    pub resource: &'a Resource,
    pub authority: &'a crate::tls::Authority,
    pub statement_audit: StatementAudit,
    pub memory: &'a Arc<MessageMemory>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub statements: u64,
    pub denied: u64,
    pub error: Option<String>,
    /// How the server checked the proxy's credential, once logged in.
    pub upstream_auth: Option<String>,
}

/// Why the proxy could not log in upstream.
enum LoginError {
    /// The server refused (its own words), or reported a setting the proxy refuses (the
    /// proxy's words about it): the client may read either.
    Server(String),
    /// Everything else: the secret file, TLS, reaching the server, looking up columns.
    Agent(String),
}

impl LoginError {
    fn agent(e: impl ToString) -> Self {
        LoginError::Agent(e.to_string())
    }
}

/// Reads the password file: a regular file (not through a symlink), owned by root or the
/// agent's user, not readable by group or others; checked on the handle it is read from.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => format!("{}: is a symbolic link; name the file itself", path.display()),
                _ => at(e),
            },
        )?;
    let meta = f.metadata().map_err(at)?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "{}: owned by uid {}; must be owned by root or the agent's user",
            path.display(),
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{}: must not be readable by group or others (chmod 600)", path.display()));
    }
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(at)?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), frames: &[Frame]) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    w.write_all(&out).await
}

async fn read_startup_packet(client: &mut Conn) -> Result<Startup, String> {
    let mut len = [0u8; 4];
    client.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = wire::startup_len(len).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len - 4];
    client.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    wire::parse_startup(&body).map_err(|e| e.to_string())
}

/// Reads the client's startup. A TLS request is accepted (the agent terminates TLS with a
/// certificate for the resource's name) when the resource says so, and declined otherwise;
/// GSS encryption is always declined. On error, the stream is handed back when it still works.
async fn read_startup(mut client: Conn, s: &Session<'_>) -> Result<(Conn, Startup), (Option<Conn>, String)> {
    // PostgreSQL 17's direct TLS: a handshake record (0x16) where a startup's length would be.
    if let Conn::Plain(tcp) = &client {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.is_ok_and(|n| n == 1) && first[0] == 0x16 {
            let Conn::Plain(tcp) = client else { unreachable!("matched above") };
            if !s.resource.tls.accept_client {
                // A TLS client cannot read a plain error: the log and the trail say why.
                return Err((
                    None,
                    "the client started TLS directly, and the resource does not accept client TLS".into(),
                ));
            }
            client = accept_tls(tcp, s).await.map_err(|e| (None, e))?;
            let Conn::Server(tls) = &client else { unreachable!("accepted above") };
            if tls.get_ref().1.alpn_protocol() != Some(crate::tls::POSTGRES_ALPN) {
                let e = "a client that starts TLS directly must ask for the \"postgresql\" protocol (ALPN)";
                return Err((Some(client), e.into()));
            }
        }
    }
    loop {
        let packet = match read_startup_packet(&mut client).await {
            Ok(p) => p,
            Err(e) => return Err((Some(client), e)),
        };
        let answer: &[u8] = match packet {
            Startup::Ssl | Startup::GssEnc if client.is_tls() => {
                return Err((Some(client), "encryption requested twice".into()));
            }
            Startup::Ssl if s.resource.tls.accept_client => b"S",
            Startup::Ssl | Startup::GssEnc => b"N",
            other => return Ok((client, other)),
        };
        if let Err(e) = client.write_all(answer).await {
            return Err((None, e.to_string()));
        }
        if answer == b"S" {
            let Conn::Plain(tcp) = client else { unreachable!("plain until TLS is accepted") };
            client = accept_tls(tcp, s).await.map_err(|e| (None, e))?;
        }
    }
}

/// Terminates the client's TLS with the agent's certificate for the resource.
async fn accept_tls(tcp: TcpStream, s: &Session<'_>) -> Result<Conn, String> {
    let config = s.authority.server_config(s.resource).map_err(|e| e.to_string())?;
    match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => Ok(Conn::Server(Box::new(tls))),
        Err(e) => Err(format!("client TLS handshake: {e}")),
    }
}

pub async fn serve(client: TcpStream, s: Session<'_>, stop: &CancellationToken) -> Outcome {
    // Small request/response messages (TLS records too): Nagle plus delayed ACKs would add
    // 40 ms stalls.
    let _ = client.set_nodelay(true);
    let startup = crate::timer::timeout(STARTUP_TIMEOUT, read_startup(Conn::Plain(client), &s));
    let Some(startup) = unless_stopped(stop, startup).await else {
        return Outcome { error: Some(STOPPING.into()), ..Default::default() };
    };
    let (mut client, startup) = match startup {
        Ok(Ok(st)) => st,
        Ok(Err((client, e))) => {
            if let Some(mut client) = client {
                let msg = format!("tollgate: {e}");
                let _ = send(&mut client, &[wire::fatal_response(SQLSTATE_PROTOCOL, &msg)]).await;
            }
            return Outcome { error: Some(format!("startup: {e}")), ..Default::default() };
        }
        Err(_) => return Outcome { error: Some("startup timed out".into()), ..Default::default() },
    };
    let (params, negotiate) = match startup {
        Startup::Cancel { pid, key } => return cancel(&s, BackendKey { pid, key }, stop).await,
        // A newer 3.x or protocol options: the client learns that this is 3.0 without them,
        // as from a server that knows no better, and goes on.
        Startup::Startup { params, minor, options } => {
            (params, (minor > 0 || !options.is_empty()).then(|| wire::negotiate_protocol_version(&options)))
        }
        Startup::Ssl | Startup::GssEnc => unreachable!("answered in read_startup"),
    };
    if let Err(e) = check_startup_params(&params) {
        let msg = format!("tollgate: {e}");
        let _ = send(&mut client, &[wire::fatal_response(SQLSTATE_REJECTED, &msg)]).await;
        return Outcome { error: Some(msg), ..Default::default() };
    }
    let database = params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.clone());
    // The server's default database is named after the user it logs in, which is ours.
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| s.credentials.user.clone());
    if let Some(allowed) = &s.resource.databases
        && !allowed.contains(&database)
    {
        let msg = format!(
            "tollgate: resource {} serves the databases {}, not {database:?}",
            s.resource.name,
            allowed.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", ")
        );
        let _ = send(&mut client, &[wire::fatal_response(SQLSTATE_REJECTED, &msg)]).await;
        return Outcome { error: Some(msg), ..Default::default() };
    }
    let mut base = s.base.clone();
    base.database = Some(database.clone());
    base.db_user = Some(s.credentials.user.clone());

    let login = async {
        let password = read_secret(&s.credentials.password_file).map_err(LoginError::Agent)?;
        let tls = s.authority.client_config(&s.resource.tls.upstream).map_err(LoginError::agent)?;
        let encryption = match tls {
            None => None,
            Some(config) => Some((config, crate::tls::server_name(&s.resource.address).map_err(LoginError::agent)?)),
        };
        let tcp = crate::proxy::tcp::connect_marked(s.upstream, s.mark).await.map_err(LoginError::agent)?;
        let _ = tcp.set_nodelay(true);
        let stream = match encryption.clone() {
            None => Conn::Plain(tcp),
            Some((config, name)) => {
                upstream::start_tls(tcp, s.upstream, config, name).await.map_err(LoginError::agent)?
            }
        };
        let unverified = s.resource.tls.upstream == crate::policy::UpstreamTls::Require;
        let (user, auth) = (&s.credentials.user, s.credentials.auth);
        // Set at login, where the server ranks it above the role's and database's own settings;
        // the client cannot send it (`STARTUP_PARAMS`) and statements that change it are refused.
        let mut params = params.clone();
        if s.grant.read_only && s.enforce {
            params.push(("default_transaction_read_only".into(), "on".into()));
        }
        let login = upstream::login(stream, s.upstream, user, &password, &params, auth, unverified);
        let mut up = match login.await {
            Ok(up) => up,
            Err(upstream::UpstreamError::Refused(why)) => return Err(LoginError::Server(why)),
            Err(e) => return Err(LoginError::agent(e)),
        };
        // Set for the role or database (ALTER ROLE ... SET), out of the client's reach.
        if let Some(why) = up.parameters.iter().find_map(|f| lexing_setting(&f.body)) {
            return Err(LoginError::Server(why));
        }
        let masker = match &s.masker {
            Some(m) if m.has_column_rules() => {
                let (origins, tables) = up.column_origins(s.upstream, m).await.map_err(LoginError::agent)?;
                Some(Arc::new(m.with_origins(&database, origins, tables)))
            }
            other => other.clone(),
        };
        Ok::<_, LoginError>((up, masker, encryption))
    };
    let Some(login) = unless_stopped(stop, crate::timer::timeout(STARTUP_TIMEOUT, login)).await else {
        let msg = format!("tollgate: {STOPPING}");
        let _ = send(&mut client, &[wire::fatal_response(SQLSTATE_SHUTDOWN, &msg)]).await;
        return Outcome { error: Some(STOPPING.into()), ..Default::default() };
    };
    let (up, masker, encryption) = match login.unwrap_or_else(|_| Err(LoginError::Agent("timed out".into()))) {
        Ok(up) => up,
        Err(e) => {
            let resource = &s.resource.name;
            // The agent's own trouble (its secret file, TLS, the server's address) is for the
            // operator, not for the process it guards.
            let told = match &e {
                LoginError::Server(why) => why.as_str(),
                LoginError::Agent(_) => "the agent's log says why",
            };
            let msg = format!("tollgate: cannot log in to resource {resource}: {told}");
            let _ = send(&mut client, &[wire::fatal_response(SQLSTATE_CONNECTION, &msg)]).await;
            let why = match e {
                LoginError::Server(why) | LoginError::Agent(why) => why,
            };
            return Outcome { error: Some(format!("cannot log in to {}: {why}", s.upstream)), ..Default::default() };
        }
    };
    let target = CancelTarget {
        upstream: s.upstream,
        encryption,
        real: BackendKey { pid: up.backend_pid, key: up.backend_key },
        held: s.held.clone(),
        identity: base.identity.clone(),
    };
    info!(auth = %up.auth.name(), channel_binding = up.channel_binding, "logged in upstream");
    let upstream_auth = format!("{}{}", up.auth.name(), if up.channel_binding { " with channel binding" } else { "" });
    let fake = s.cancel.issue(target);
    // The client's own password (if any) is never asked for: its kernel identity is its login.
    let mut hello: Vec<Frame> = negotiate.into_iter().collect();
    hello.push(wire::auth_ok());
    hello.extend(up.parameters.iter().cloned());
    hello.push(wire::backend_key_data(fake.key.pid, fake.key.key));
    hello.push(wire::ready_for_query(b'I'));
    if let Err(e) = send(&mut client, &hello).await {
        return Outcome { error: Some(e.to_string()), ..Default::default() };
    }

    let client_fd = client.fd();
    let (client_r, client_w) = client.split();
    let (up_r, up_w) = up.stream.split();
    let (inject_tx, inject_rx) = mpsc::unbounded_channel();
    let (expect_tx, expect_rx) = mpsc::unbounded_channel();
    let charset = up.parameters.iter().find_map(|f| reported_charset(&f.body)).unwrap_or_default();
    let (ops_tx, masking) = match &masker {
        Some(m) => {
            let (tx, rx) = mpsc::unbounded_channel();
            // `partial` keeps the last four characters, as the client's encoding makes them.
            let m = if charset == m.charset() { m.clone() } else { Arc::new(m.with_charset(charset)) };
            (Some(tx), Some((Tracker::new(m), rx)))
        }
        None => (None, None),
    };
    // Outcome records point at their statement records (`refs`); who and where is there, so
    // they repeat only what a reader filters by.
    let result_base = ResultBase::new(base.identity.clone(), base.resource.clone(), base.session);
    let completions = Arc::new(Completions::default());
    let results = Results::new(s.audit.clone(), result_base, expect_rx, completions.clone());
    let both = Arc::new(Both { stand_in: StandIn::new(s.id), progress: Progress::default() });
    let identity = base.identity.as_deref().unwrap_or_default();
    let server = FromServer { up: up_r, buf: up.leftover, draw: Draw::new(s.memory.clone(), identity) };
    let down = tokio::spawn(downstream(server, client_w, inject_rx, results, masking, both.clone()));
    let mut side = ClientSide {
        s: &s,
        masker,
        ascii_names: charset != Charset::Utf8 || !up.parameters.iter().any(|f| unconverted_server(&f.body)),
        base: &base,
        statement_base: Arc::new(StatementBase::new(&base)),
        client: client_r,
        client_fd,
        buf: BytesMut::new(),
        draw: Draw::new(s.memory.clone(), identity),
        batched: 0,
        to_down: ToDownstream { inject: inject_tx, expect: expect_tx, ops: ops_tx },
        syncs: 0,
        prepared: Statements::default(),
        dealloc_portals: HashMap::new(),
        forgotten: HashMap::new(),
        holds_lost: false,
        portals: Portals::default(),
        indirect_portals: HashSet::new(),
        fetches: Fetches::default(),
        sql_prepared: HashMap::new(),
        unsynced_refs: Refs::new(),
        unsynced_approvals: Vec::new(),
        unsynced: false,
        completions,
        defining: Vec::new(),
        syncs_since_execute: 0,
        unbinding: Vec::new(),
        defined: VecDeque::new(),
        cache: HashMap::new(),
        cache_bytes: 0,
        shape: Vec::new(),
        both,
        copy_from: None,
        copy_ins_left: 0,
        copy_portals: HashMap::new(),
        outcome: Outcome { upstream_auth: Some(upstream_auth), ..Default::default() },
    };
    let mut down = down;
    let mut down_done = false;
    let result = tokio::select! {
        r = side.run(up_w) => r,
        _ = stop.cancelled() => Err("agent shutting down".into()),
        // The server side ended (server gone, or data that could not be masked): nothing more
        // may be forwarded, since its answers could not be relayed.
        r = &mut down => {
            down_done = true;
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("server side: {e}")),
                Err(e) => Err(format!("server side: {e}")),
            }
        }
    };
    let mut outcome = std::mem::take(&mut side.outcome);
    if let Err(e) = result {
        outcome.error = Some(e);
    }
    drop(side);
    // Let the server's last answers (and injected denials) reach the client, briefly.
    if !down_done && crate::timer::timeout(Duration::from_secs(1), &mut down).await.is_err() {
        down.abort();
    }
    drop(fake);
    outcome
}

const STOPPING: &str = "the agent is shutting down";

/// `work`, unless the agent stops first (`None`): the phases before a session relays do not
/// hold up the agent's shutdown until their own deadlines.
async fn unless_stopped<T>(stop: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        r = work => Some(r),
    }
}

async fn cancel(s: &Session<'_>, fake: BackendKey, stop: &CancellationToken) -> Outcome {
    let Some(target) = s.cancel.get(fake) else {
        return Outcome { error: Some("cancel request with an unknown key".into()), ..Default::default() };
    };
    if let Err(error) = target.may_cancel(&s.base.identity) {
        return Outcome { error: Some(error), ..Default::default() };
    }
    let BackendKey { pid, key } = target.real;
    let tls = target.encryption.is_some();
    let forward = async {
        let tcp = crate::proxy::tcp::connect_marked(target.upstream, s.mark)
            .await
            .map_err(|source| upstream::UpstreamError::Io { addr: target.upstream, source })?;
        upstream::cancel(tcp, target.upstream, target.encryption.clone(), pid, key).await
    };
    // The server gets the cancel first, also when a held statement is withdrawn below: for
    // what the client pipelined before it (a backend with nothing running ignores it), and
    // before the withdrawal lets the client go on, so it does not land on the next statement.
    let forwarded = unless_stopped(stop, crate::timer::timeout(STARTUP_TIMEOUT, forward)).await;
    let held = target.held.load(Ordering::Relaxed);
    if held != 0 {
        // The held statement never reached the server: cancelling it means withdrawing the
        // request.
        let _ = s.approvals.decide(crate::approval::ApprovalId(held), Verdict::Cancelled, None);
        info!(approval = held, "cancel request withdrew a held statement");
    }
    match forwarded {
        None => Outcome { error: Some(STOPPING.into()), ..Default::default() },
        Some(Ok(Ok(()))) => {
            info!(backend = pid, tls, "forwarded a cancel request");
            Outcome::default()
        }
        Some(Ok(Err(e))) => Outcome { error: Some(format!("cancel: {e}")), ..Default::default() },
        Some(Err(_)) => Outcome { error: Some("cancel: timed out".into()), ..Default::default() },
    }
}

/// A forwarded sync point (a Query, or a batch ending in Sync) whose result is awaited.
struct Expect {
    /// Sequence numbers of the `statement` records it carries out.
    refs: Refs,
    /// Approvals those statements went through.
    approvals: Vec<Approved>,
    started: std::time::Instant,
    /// Its number, when the client side waits to learn how its batch went (see `Completions`).
    defines: Option<u64>,
}

/// How the server answered the sync points whose batches the client side waits to settle: how
/// many Parse and Close messages it completed (ParseComplete, CloseComplete), and whether an
/// error came. After an error the server skips the rest of a batch: of a batch's Parses and
/// Closes, in order, the first that many took effect and the others did not, whatever the
/// client believes. Points stay until the client side has applied them (`forget`): no more
/// than the sync points with Parses or Closes it has sent and not yet settled.
#[derive(Default)]
struct Completions {
    /// Point -> answer.
    answers: Mutex<std::collections::BTreeMap<u64, Answer>>,
    recorded: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy)]
struct Answer {
    completed: usize,
    failed: bool,
}

impl Completions {
    fn record(&self, point: u64, answer: Answer) {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).insert(point, answer);
        self.recorded.notify_one();
    }

    /// The answer to sync point `point`, once it is in.
    fn of(&self, point: u64) -> Option<Answer> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).get(&point).copied()
    }

    fn forget(&self, point: u64) {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).remove(&point);
    }

    async fn wait(&self, point: u64) {
        while self.of(point).is_none() {
            self.recorded.notified().await;
        }
    }
}

/// What both sides of a session use.
struct Both {
    stand_in: StandIn,
    progress: Progress,
}

/// How far the server side has got, for the client side to wait on (`Progress::copying`).
#[derive(Default)]
struct Progress {
    /// Sync points answered.
    answered: AtomicU64,
    /// The last sync point answered outside a transaction (ReadyForQuery `I`): the server has
    /// dropped every portal bound up to it.
    idle: AtomicU64,
    /// The sync point whose answer started the COPY FROM STDIN now running (0: none).
    copy_in: AtomicU64,
    /// The client side waits for a change: only then does the server side notify.
    waiting: std::sync::atomic::AtomicBool,
    changed: tokio::sync::Notify,
}

impl Progress {
    /// Called before the answers counted go out: the client may send its next message as soon
    /// as it has them.
    fn publish(&self, answered: u64, idle: u64, copy_in: Option<u64>) {
        self.answered.store(answered, Ordering::SeqCst);
        self.idle.store(idle, Ordering::SeqCst);
        self.copy_in.store(copy_in.unwrap_or(0), Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// Waits until the server has answered sync point `point` or started a COPY FROM STDIN in
    /// that answer; returns whether the COPY runs.
    async fn copying(&self, point: u64) -> bool {
        self.waiting.store(true, Ordering::SeqCst);
        let copying = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // A COPY that started in this answer, or (after Syncs the server ignored during an
            // earlier COPY of the same query were counted answered) in a later one.
            let copy_in = self.copy_in.load(Ordering::SeqCst);
            if copy_in != 0 && copy_in >= point {
                break true;
            }
            if self.answered.load(Ordering::SeqCst) >= point {
                break false;
            }
            changed.await;
        };
        self.waiting.store(false, Ordering::SeqCst);
        copying
    }
}

/// A Parse or Close the server may or may not carry out (see `Completions`).
enum Def {
    /// What the name stood for before, put back if the Parse did not take effect.
    Parse { name: String, seq: u64, replaced: Option<Prepared> },
    /// A Close of a statement the session knows (name, `seq` of its record); of a portal or an
    /// unknown name: `None`. Until the server is known to have done it, Binds are judged by it.
    Close { statement: Option<(String, u64)> },
}

/// What the server answered for one sync point.
#[derive(Default)]
struct Tally {
    rows: u64,
    /// DataRows since the last CommandComplete or PortalSuspended: a suspended portal's part
    /// comes with no row count of its own.
    unsettled_rows: u64,
    commands: u64,
    error: Option<String>,
    /// An ErrorResponse came (with or without a message).
    failed: bool,
    masked: crate::mask::Counts,
    /// ParseComplete and CloseComplete messages.
    completed: usize,
    /// The sync point was never answered on its own: the server ignored its Sync (COPY).
    void: bool,
}

impl Tally {
    fn see(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'1' | b'3' => self.completed += 1,
            b'D' => self.unsettled_rows += 1,
            b's' => self.rows = self.rows.saturating_add(std::mem::take(&mut self.unsettled_rows)),
            b'C' => {
                self.unsettled_rows = 0;
                self.commands += 1;
                // "SELECT 5", "INSERT 0 1", "UPDATE 3": the row count is the last word. Read
                // from the bytes: this runs for every statement the server completes.
                let tag = body.split(|&b| b == 0).next().unwrap_or(&[]);
                let last = tag.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
                // At most 19 digits: always below u64::MAX.
                if (1..=19).contains(&last.len()) && last.iter().all(u8::is_ascii_digit) {
                    let n = last.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                    self.rows = self.rows.saturating_add(n);
                }
            }
            b'E' if !self.failed => {
                self.failed = true;
                self.error = wire::error_message(body);
            }
            _ => {}
        }
    }
}

/// Writes a `statement_result` record for each ReadyForQuery the server sends.
struct Results {
    audit: AuditLog,
    base: Arc<ResultBase>,
    expect: mpsc::UnboundedReceiver<Expect>,
    completions: Arc<Completions>,
    /// Statements of sync points the server answered together with a later one, and their
    /// approvals.
    carried: Refs,
    carried_approvals: Vec<Approved>,
}

impl Results {
    fn new(
        audit: AuditLog,
        base: ResultBase,
        expect: mpsc::UnboundedReceiver<Expect>,
        completions: Arc<Completions>,
    ) -> Self {
        Results {
            audit,
            base: Arc::new(base),
            expect,
            completions,
            carried: Refs::new(),
            carried_approvals: Vec::new(),
        }
    }

    fn record(&mut self, t: Tally) {
        // The expectation was queued before its messages were written upstream, so it is here.
        let Ok(mut e) = self.expect.try_recv() else { return };
        if let Some(point) = e.defines {
            self.completions.record(point, Answer { completed: t.completed, failed: t.failed });
        }
        if t.void {
            self.carried.append(&mut e.refs);
            self.carried_approvals.append(&mut e.approvals);
            return;
        }
        if !self.carried.is_empty() {
            e.refs.append(&mut self.carried);
            e.refs.sort_unstable();
        }
        if !self.carried_approvals.is_empty() {
            e.approvals.append(&mut self.carried_approvals);
            e.approvals.sort_unstable_by_key(|a| a.approval_id);
        }
        // A lone Sync, or a refusal's stand-in: no statement of the client's was carried out.
        if e.refs.is_empty() {
            return;
        }
        self.audit.append_result(ResultRecord {
            base: self.base.clone(),
            refs: e.refs,
            count: t.rows,
            duration_ms: e.started.elapsed().as_millis() as u64,
            commands: t.commands,
            error: t.error,
            approvals: e.approvals,
            masked: (!t.masked.is_empty()).then(|| t.masked.to_map()),
        });
    }
}

/// What the client side tells the server side.
enum Note {
    Inject(Inject),
    /// The client ended a COPY FROM STDIN after sending `n` Syncs since the Execute that may have
    /// started it, the first answering sync point `first`. If the server did take COPY data,
    /// it ignored those Syncs: their points are answered by the one after the COPY ends.
    VoidSyncs {
        first: u64,
        n: u64,
    },
}

/// The proxy's own answers, slotted into the server's.
enum Inject {
    /// A protocol error that ends the session: out once the answers to the first `after` sync
    /// points are.
    Fatal { after: u64, frame: Frame },
    /// A refusal, in place of the error the server answers sync point `point`'s stand-in with
    /// (see `StandIn`). When an earlier error in the same batch made the server skip the
    /// stand-in, that error alone is the answer, as it would be without the proxy.
    Denial { point: u64, frame: Frame },
}

impl Inject {
    /// How many answers go out before it.
    fn after(&self) -> u64 {
        match self {
            Inject::Fatal { after, .. } => *after,
            Inject::Denial { point, .. } => *point,
        }
    }
}

/// What the proxy forwards in place of a refused message: a Parse of a bare identifier, which
/// PostgreSQL rejects with a syntax error quoting it, as it would reject the client's own bad
/// SQL. So the server does what it does after any error (aborts the transaction block, rolls
/// back the batch's implicit transaction, skips to Sync) and its ReadyForQuery says so. The
/// identifier is the session's own, so the error it draws is told from any other, in any
/// message language.
struct StandIn(String);

impl StandIn {
    fn new(session: u64) -> StandIn {
        use std::hash::{BuildHasher, Hasher};
        // Unguessable is not needed: a client that made its own error quote it would only get
        // a denial in its place.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(session);
        StandIn(format!("tollgate_denied_{:016x}", h.finish()))
    }

    /// The Parse to forward; the name is the identifier too, so the statement it would define
    /// can never clash with one of the client's.
    fn parse(&self) -> Frame {
        wire::parse(&self.0, &self.0)
    }

    /// Whether this ErrorResponse is the one a stand-in drew.
    fn drew(&self, error: &[u8]) -> bool {
        error.windows(self.0.len()).any(|w| w == self.0.as_bytes())
    }
}

/// Why the client side of a session stopped before the client said goodbye. The client is told
/// in an ErrorResponse, after the answers to what went before; the rest of the agent goes on.
#[derive(Debug, thiserror::Error)]
enum Stop {
    /// A message the proxy cannot read: it judges nothing it cannot read.
    #[error("tollgate: {0}")]
    Malformed(#[from] wire::WireError),
    /// A statement's record could not be written, so the statement may not go on.
    #[error("tollgate: audit unavailable: {0}")]
    Audit(#[source] crate::audit::AuditError),
    #[error("tollgate: sending to the server failed: {0}")]
    Server(#[source] std::io::Error),
    /// Reading from the client failed: nobody is left to tell.
    #[error("client connection: {0}")]
    Client(#[source] std::io::Error),
    /// Told to the client already (`ClientSide::fail`).
    #[error("{0}")]
    Told(String),
}

impl Stop {
    fn sqlstate(&self) -> &'static str {
        match self {
            Stop::Malformed(_) | Stop::Told(_) => SQLSTATE_PROTOCOL,
            Stop::Audit(_) => SQLSTATE_SYSTEM,
            Stop::Server(_) | Stop::Client(_) => SQLSTATE_CONNECTION,
        }
    }
}

/// Channels from the client side of a session to its server side.
struct ToDownstream {
    inject: mpsc::UnboundedSender<Note>,
    expect: mpsc::UnboundedSender<Expect>,
    /// Present when the grant masks: what each forwarded message will be answered with.
    ops: Option<mpsc::UnboundedSender<Op>>,
}

/// The server connection as the server side reads it: the socket, what was read past the
/// login, and the share of the budget for large messages that its buffer holds.
struct FromServer<R> {
    up: R,
    buf: BytesMut,
    draw: Draw,
}

/// Server -> client: relays frames (masking them when the grant says so), tracks ReadyForQuery,
/// and puts the proxy's own answers (denials, protocol errors) in their place in the stream.
async fn downstream(
    server: FromServer<impl AsyncRead + Unpin>,
    mut client: impl AsyncWrite + Unpin,
    mut notes: mpsc::UnboundedReceiver<Note>,
    mut results: Results,
    mut masking: Option<(Tracker, mpsc::UnboundedReceiver<Op>)>,
    both: Arc<Both>,
) -> std::io::Result<()> {
    let FromServer { mut up, mut buf, mut draw } = server;
    let (stand_in, progress) = (&both.stand_in, &both.progress);
    let mut ready_seen = 0u64;
    // The last of those answered outside a transaction.
    let mut idle = 0u64;
    let mut tally = Tally::default();
    let mut pending: VecDeque<Inject> = VecDeque::new();
    let mut out = BytesMut::new();
    let mut injecting = true;
    // Sync points answered in the current read, recorded after the answer is relayed.
    let mut finished: Vec<Tally> = Vec::new();
    let mut copy = CopyIn::default();
    loop {
        // A large answer's share of the budget may wait only so long for the client to read it.
        draw.restart_clock();
        // A note the client side queued concerns answers the buffer may already hold (a
        // pipelining client): it must be in `pending` before the buffer's frames are looked at.
        while let Ok(n) = notes.try_recv() {
            copy.note(n, &mut pending);
        }
        // What the client side sent upstream was announced before it was sent, so the operations
        // behind every answer in `buf` are in the channel by now (and voided Syncs among them).
        if let Some((tracker, ops)) = &mut masking {
            while let Ok(op) = ops.try_recv() {
                tracker.push(op);
            }
        }
        copy.settle(&mut ready_seen, &mut tally, &mut finished, masking.as_mut().map(|m| &mut m.0));
        // ... and an error due already (no answer outstanding before it) goes out now: no
        // answer may come to carry it.
        flush_injections(&mut pending, ready_seen, &mut out);
        match &mut masking {
            // Nothing to rewrite: frames are looked at in place and relayed as read.
            None => {
                let (mut pos, mut relayed) = (0, 0);
                while let Some((tag, len)) = wire::peek(&buf[pos..]).map_err(std::io::Error::other)? {
                    let body = &buf[pos + 5..pos + len];
                    if tag == b'S'
                        && let Some(why) = session_setting(body)
                    {
                        out.extend_from_slice(&buf[relayed..pos]);
                        return end_for_lexing(why, &mut out, &mut finished, &mut results, &mut client).await;
                    }
                    let mut own = false;
                    if !pending.is_empty() {
                        let denial = denial_for(&mut pending, ready_seen + 1, (tag, body), tally.failed, stand_in);
                        if let Some(d) = denial {
                            out.extend_from_slice(&buf[relayed..pos]);
                            d.encode(&mut out);
                            tally.see(d.tag, &d.body);
                            own = tag == b'E';
                            relayed = if own { pos + len } else { pos };
                        }
                    }
                    if !own {
                        tally.see(tag, body);
                    }
                    copy.see(tag, &mut ready_seen, &mut tally, &mut finished, None);
                    pos += len;
                    if tag == b'Z' {
                        finished.push(std::mem::take(&mut tally));
                        ready_seen += 1;
                        if body.first() == Some(&b'I') {
                            idle = ready_seen;
                        }
                    }
                    // After a ReadyForQuery, or a CopyInResponse that voided Syncs.
                    if pending.front().is_some_and(|i| i.after() <= ready_seen) {
                        out.extend_from_slice(&buf[relayed..pos]);
                        relayed = pos;
                        flush_injections(&mut pending, ready_seen, &mut out);
                    }
                }
                progress.publish(ready_seen, idle, copy.started_at);
                if out.is_empty() {
                    draw.wait(client.write_all(&buf[..pos])).await.map_err(std::io::Error::other)??;
                } else {
                    out.extend_from_slice(&buf[relayed..pos]);
                }
                buf.advance(pos);
            }
            Some((tracker, _)) => {
                while let Some((tag, len)) = wire::peek(&buf).map_err(std::io::Error::other)? {
                    // Told before the frame is masked: masking may rewrite the error's texts.
                    let denial = match pending.is_empty() {
                        true => None,
                        false => denial_for(&mut pending, ready_seen + 1, (tag, &buf[5..len]), tally.failed, stand_in),
                    };
                    if tag == b'S'
                        && let Some(why) = session_setting(&buf[5..len])
                    {
                        return end_for_lexing(why, &mut out, &mut finished, &mut results, &mut client).await;
                    }
                    let relayed = if len > MASK_ELSEWHERE {
                        // Masking a large message (a row, COPY data or an error of up to 64 MiB
                        // the client chose) can take seconds: on a thread of its own, not this
                        // loop's, whose other sessions would wait for it. The tracker goes
                        // with it and comes back.
                        let frame = Frame { tag, body: buf.split_to(len).freeze().slice(5..) };
                        if tag == b'D' {
                            tally.see(b'D', &[]);
                        }
                        let stand_in = Tracker::new(tracker.masker());
                        let mut t = std::mem::replace(tracker, stand_in);
                        let (t, relayed, masked) = tokio::task::spawn_blocking(move || {
                            let mut rows = BytesMut::new();
                            let relayed = match frame.tag {
                                b'D' => t.write_data_row(&frame.body, &mut rows).map(|()| None),
                                _ => t.on_frame(frame),
                            };
                            (t, relayed, rows)
                        })
                        .await
                        .map_err(std::io::Error::other)?;
                        *tracker = t;
                        if out.is_empty() {
                            out = masked;
                        } else {
                            out.extend_from_slice(&masked);
                        }
                        relayed
                    } else if tag == b'D' {
                        // Rows, the bulk of a result: masked straight into the output.
                        let row = tracker.write_data_row(&buf[5..len], &mut out);
                        buf.advance(len);
                        tally.see(b'D', &[]);
                        row.map(|()| None)
                    } else {
                        let Some(f) = wire::decode(&mut buf).map_err(std::io::Error::other)? else { break };
                        tracker.on_frame(f)
                    };
                    let f = match relayed {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(e) => {
                            // Never relay what could not be masked: tell the client, then close.
                            let msg = format!("tollgate: {e}");
                            wire::fatal_response(SQLSTATE_PROTOCOL, &msg).encode(&mut out);
                            for t in finished.drain(..) {
                                results.record(t);
                            }
                            client.write_all(&out).await?;
                            return Err(std::io::Error::other(e));
                        }
                    };
                    let own = denial.as_ref().is_some_and(|_| f.tag == b'E');
                    if let Some(d) = denial {
                        d.encode(&mut out);
                        tally.see(d.tag, &d.body);
                    }
                    if !own {
                        f.encode(&mut out);
                        tally.see(f.tag, &f.body);
                    }
                    copy.see(f.tag, &mut ready_seen, &mut tally, &mut finished, Some(tracker));
                    if f.tag == b'Z' {
                        tally.masked = tracker.take_counts();
                        finished.push(std::mem::take(&mut tally));
                        ready_seen += 1;
                        if f.body.first() == Some(&b'I') {
                            idle = ready_seen;
                        }
                    }
                    flush_injections(&mut pending, ready_seen, &mut out);
                }
                progress.publish(ready_seen, idle, copy.started_at);
            }
        }
        if !out.is_empty() {
            draw.wait(client.write_all(&out)).await.map_err(std::io::Error::other)??;
            out.clear();
            trim(&mut out);
        }
        // Recorded once the answer is on its way: the audit queue's lock stays off the path
        // between server and client.
        for t in finished.drain(..) {
            results.record(t);
        }
        // Large answers draw on the budget as they come (a client may ask the server for
        // many). Room is made for the next read too: a full buffer makes read_buf ask for 64
        // bytes, one syscall per small row.
        if let Err(e) = ready_buffer(&mut buf, &mut draw, 0) {
            let msg = format!("tollgate: {e}");
            wire::fatal_response(SQLSTATE_OUT_OF_MEMORY, &msg).encode(&mut out);
            client.write_all(&out).await?;
            return Err(std::io::Error::other(e));
        }
        // Notes are taken at the top of the loop whichever branch wakes it, so the order of the
        // branches does not matter: no random draw per wake-up.
        tokio::select! {
            biased;
            n = up.read_buf(&mut buf) => {
                if n? == 0 {
                    // The server is gone: what the client side still has to say goes out, then
                    // the end (no more answers will come to wait for).
                    while let Ok(n) = notes.try_recv() {
                        copy.note(n, &mut pending);
                    }
                    flush_injections(&mut pending, u64::MAX, &mut out);
                    if !out.is_empty() {
                        client.write_all(&out).await?;
                    }
                    return Ok(());
                }
            }
            note = notes.recv(), if injecting => match note {
                // Settled and flushed at the top of the loop, like notes taken there.
                Some(n) => copy.note(n, &mut pending),
                // The client side is done; the server's last answers still go out.
                None => injecting = false,
            },
        }
    }
}

/// Ends a session whose server reads SQL differently from the proxy now (`lexing_setting`):
/// what went before goes out, then a fatal error saying why.
async fn end_for_lexing(
    why: String,
    out: &mut BytesMut,
    finished: &mut Vec<Tally>,
    results: &mut Results,
    client: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    tracing::warn!(%why, "ending the session");
    wire::fatal_response(SQLSTATE_PROTOCOL, &format!("tollgate: {why}; the session ends")).encode(out);
    for t in finished.drain(..) {
        results.record(t);
    }
    client.write_all(out).await?;
    Err(std::io::Error::other(why))
}

/// The server side's view of a COPY FROM STDIN started by an extended-protocol Execute, whose
/// Syncs sent meanwhile the server ignores (see `Note::VoidSyncs`).
#[derive(Default)]
struct CopyIn {
    /// The sync point being answered when the server asked for COPY data.
    started_at: Option<u64>,
    /// Syncs sent during a possible COPY: (first point, count).
    void: Option<(u64, u64)>,
}

impl CopyIn {
    fn note(&mut self, note: Note, pending: &mut VecDeque<Inject>) {
        match note {
            Note::Inject(i) => pending.push_back(i),
            Note::VoidSyncs { first, n } => self.void = Some((first, n)),
        }
    }

    /// Follows the server: CopyInResponse starts a COPY; a ReadyForQuery ends any.
    fn see(
        &mut self,
        tag: u8,
        ready_seen: &mut u64,
        tally: &mut Tally,
        finished: &mut Vec<Tally>,
        tracker: Option<&mut Tracker>,
    ) {
        match tag {
            b'G' => {
                self.started_at = Some(*ready_seen + 1);
                self.settle(ready_seen, tally, finished, tracker);
            }
            b'Z' => {
                // This answers point `ready_seen + 1`: if the Syncs to void start there, the
                // server never took COPY data and answered them itself.
                if self.void.is_some_and(|(first, _)| first <= *ready_seen + 1) {
                    self.void = None;
                }
                self.started_at = None;
            }
            _ => {}
        }
    }

    /// Once both the server's CopyInResponse and the client's Syncs are known, the Syncs'
    /// points count as answered, by the answer still to come. The Parses and Closes completed
    /// so far (in `tally`) belong to the first: its batch began the COPY.
    fn settle(
        &mut self,
        ready_seen: &mut u64,
        tally: &mut Tally,
        finished: &mut Vec<Tally>,
        tracker: Option<&mut Tracker>,
    ) {
        let Some((first, n)) = self.void else { return };
        // An Execute's COPY starts in the answer to the Sync sent with it, a simple Query's in
        // the answer to the Query, before any Sync.
        if self.started_at.is_none_or(|start| start > first) {
            return;
        }
        self.void = None;
        *ready_seen += n;
        let completed = std::mem::take(&mut tally.completed);
        finished.push(Tally { void: true, completed, ..Default::default() });
        finished.extend((1..n).map(|_| Tally { void: true, ..Default::default() }));
        if let Some(t) = tracker {
            t.void_syncs(n);
        }
    }
}

/// Injections due once the answers counted in `ready_seen` are out. A denial lands here only
/// when its answer never came (the server left, or ignored its stand-in's Sync in a COPY).
fn flush_injections(pending: &mut VecDeque<Inject>, ready_seen: u64, out: &mut BytesMut) {
    while pending.front().is_some_and(|i| i.after() <= ready_seen) {
        let (Inject::Fatal { frame, .. } | Inject::Denial { frame, .. }) = pending.pop_front().unwrap();
        frame.encode(out);
    }
}

/// For the server's ErrorResponse (`tag` E, `body`) or ReadyForQuery in its answer to sync
/// point `point`, `failed` if that answer had an error already: the denial to send in the
/// error's place (E), or before the ReadyForQuery if no error came (Z; a server does not do
/// that). A denial whose stand-in the server skipped after an earlier error is dropped, also
/// when that error went out before the denial was queued (the client side judges the batch
/// while the server answers the work sent at a Flush before it).
fn denial_for(
    pending: &mut VecDeque<Inject>,
    point: u64,
    (tag, body): (u8, &[u8]),
    failed: bool,
    stand_in: &StandIn,
) -> Option<Frame> {
    if !matches!(tag, b'E' | b'Z') || !matches!(pending.front(), Some(Inject::Denial { point: p, .. }) if *p == point) {
        return None;
    }
    let Some(Inject::Denial { frame, .. }) = pending.pop_front() else { unreachable!() };
    let ours = if tag == b'E' { stand_in.drew(body) } else { !failed };
    ours.then_some(frame)
}

/// What statement names stand for at a point of a batch being judged: the batch's own Parses
/// before it (in order: a batch may parse a name twice), else the session's, less those that
/// DEALLOCATEs earlier in the batch dropped.
#[derive(Default)]
struct BatchView<'b> {
    parsed: HashMap<&'b str, &'b Prepared>,
    all_gone: bool,
    gone: HashSet<String>,
}

impl<'b> BatchView<'b> {
    fn parse(&mut self, name: &'b str, p: &'b Prepared) {
        self.parsed.insert(name, p);
    }

    fn deallocate(&mut self, d: &sql::Deallocates) {
        match d {
            sql::Deallocates::None => {}
            sql::Deallocates::Names(names) => {
                for n in names {
                    self.parsed.remove(n.as_str());
                    self.gone.insert(n.clone());
                }
            }
            sql::Deallocates::All => {
                self.parsed.retain(|n, _| n.is_empty());
                self.all_gone = true;
            }
        }
    }

    /// What `name` stands for, dropped or not.
    fn get_any<'s>(&self, name: &str, session: &'s Statements) -> Option<&'s Prepared>
    where
        'b: 's,
    {
        self.parsed.get(name).copied().or_else(|| session.get(name))
    }

    fn get<'s>(&self, name: &str, session: &'s Statements) -> Option<&'s Prepared>
    where
        'b: 's,
    {
        match self.parsed.get(name) {
            Some(p) => Some(*p),
            None if !name.is_empty() && (self.all_gone || self.gone.contains(name)) => None,
            None => session.get(name),
        }
    }
}

/// Portals re-bound or closed, with the registration each one ends (see `ClientSide::unbinding`).
type Unbinds = Vec<(String, Registry)>;

/// Which of the client side's portal registrations an unbinding ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registry {
    /// `dealloc_portals`
    Dealloc,
    /// `copy_portals`
    Copy,
    /// `fetches`' portals bound to a FETCH or an EXECUTE
    Fetch,
}

/// What a Bind made a portal from, as its statement stood at that Bind (masking).
struct Bound {
    /// The `COPY ... TO STDOUT` an Execute of it runs (handed on to the tracker).
    copy_out: Option<sql::CopyOut>,
    /// Whether its computed result columns are redacted (`Masker::computed`).
    computed: bool,
    /// Cursors it declares or closes (an unknown statement may close all).
    cursors: sql::Deallocates,
    /// It declares a WITH HOLD cursor (an unknown statement may).
    hold: bool,
    /// It returns rows of a query written elsewhere (`Classification::indirect`; an unknown
    /// statement may).
    indirect: bool,
}

/// A judged statement text, remembered per prepared-statement name.
#[derive(Clone)]
struct Prepared {
    /// Sequence number of its `statement` record.
    seq: u64,
    class: Arc<sql::Classification>,
    text: Arc<str>,
    /// Executions wait for approval under this rule.
    hold: Option<(String, Duration)>,
    /// Whether its computed result columns are redacted (`Masker::computed`), worked out once here
    /// rather than at every Bind of it.
    computed: bool,
    /// `text` is only the start of the text, kept so (`Prepared::keep`): never shown to an
    /// approver as what runs.
    cut: bool,
}

impl Prepared {
    /// Shortens the text of a statement kept past its own judgement (for SQL EXECUTE's holds) to
    /// what a record holds.
    fn keep(mut self) -> Prepared {
        if self.text.len() > MAX_AUDITED_SQL {
            self.text = truncate(&self.text, MAX_AUDITED_SQL).into();
            self.cut = true;
        }
        self
    }
}

/// The `statement` record of what each portal was last bound to, so that a result of a portal
/// executed again in a later batch (a cursor fetched in parts) refers to it. The unnamed
/// portal, which nearly every client uses, takes no allocation.
///
/// A remembered portal must never stand for another one the server made under its name:
/// everything is forgotten at whatever may end a transaction or roll back to a savepoint
/// (which drop portals) or make portals by SQL (DECLARE, functions that open cursors).
/// BEGIN, SAVEPOINT and RELEASE keep them, as the server does. A Bind the server refuses
/// leaves its transaction failed, so nothing runs until a ROLLBACK, which forgets. What is
/// forgotten too early only leaves later results unattributed.
#[derive(Default)]
struct Portals {
    unnamed: Option<u64>,
    named: HashMap<String, u64>,
}

/// Most named portals remembered.
const MAX_PORTALS: usize = 1024;

impl Portals {
    /// `portal` is bound to `p`, which runs when it is executed.
    fn bind(&mut self, portal: &str, p: &Prepared) {
        let c = &p.class;
        if c.ends_transaction || c.cursors != sql::Deallocates::None || !c.functions.is_empty() {
            self.forget_all();
        }
        if portal.is_empty() {
            self.unnamed = Some(p.seq);
        } else if let Some(seq) = self.named.get_mut(portal) {
            *seq = p.seq;
        } else {
            if self.named.len() >= MAX_PORTALS {
                self.named.clear();
            }
            self.named.insert(portal.to_string(), p.seq);
        }
    }

    fn forget_all(&mut self) {
        self.unnamed = None;
        if !self.named.is_empty() {
            self.named.clear();
        }
    }

    fn get(&self, portal: &str) -> Option<u64> {
        if portal.is_empty() { self.unnamed } else { self.named.get(portal).copied() }
    }

    fn close(&mut self, portal: &str) {
        if portal.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(portal);
        }
    }
}

/// An extended-protocol batch that may go through.
struct Judged {
    /// The `statement` records it carries out.
    refs: Refs,
    /// Approvals its statements went through.
    approvals: Vec<Approved>,
    /// The statements its Parses define, in order.
    parsed: Vec<(String, Prepared)>,
    fetches: fetches::Changes,
}

/// The verdict on one statement text.
enum Judgement {
    Forward(Prepared),
    Deny { rule: String, message: Option<String> },
}

/// Why a statement did not go through: the rule and the text the client sees.
struct Refusal {
    rule: String,
    message: Option<String>,
}

/// Client -> server state of one session.
struct ClientSide<'s, 'a, R> {
    s: &'s Session<'a>,
    /// The client or the server encoding is not UTF-8: statement, portal and cursor names must
    /// be ASCII. The server converts names from the client's encoding to its own, and some
    /// conversions make one name of two (EUC_JIS_2004 has characters both precomposed and as
    /// base and combining mark): the proxy would track and judge one statement while the server
    /// ran the other.
    ascii_names: bool,
    /// The session's masker (`Session::masker` with what the server's catalog said).
    masker: Option<Arc<Masker>>,
    base: &'s Record,
    /// The session's part of every statement record, serialised once.
    statement_base: Arc<StatementBase>,
    client: R,
    /// `client`'s socket, to notice it closing while `buf` is too full to read on.
    client_fd: RawFd,
    buf: BytesMut,
    /// What `buf` and the batch hold of the budget for large messages.
    draw: Draw,
    /// Bytes of the extended-protocol batch read so far and not yet forwarded or refused.
    batched: usize,
    to_down: ToDownstream,
    /// Sync points forwarded so far; injections are placed after this many answers.
    syncs: u64,
    prepared: Statements,
    /// Portals bound to a statement that deallocates (SQL DEALLOCATE, DISCARD ALL), which it
    /// does when they are executed.
    dealloc_portals: HashMap<String, (u64, sql::Deallocates)>,
    /// Records of statements forwarded at a Flush, carried out by the next Sync, and their
    /// approvals.
    unsynced_refs: Refs,
    unsynced_approvals: Vec<Approved>,
    /// Messages went to the server at a Flush and no Sync has followed yet.
    unsynced: bool,
    completions: Arc<Completions>,
    /// Parses and Closes forwarded since the last Sync, in order.
    defining: Vec<Def>,
    /// Syncs forwarded since the last Execute (a COPY FROM STDIN may have started there).
    syncs_since_execute: u64,
    /// Statements under an approval rule that a DEALLOCATE made the proxy forget: the server
    /// may still have them (the DEALLOCATE may fail, or not have run yet), so an SQL EXECUTE
    /// of one is held by its rule all the same.
    forgotten: HashMap<String, Prepared>,
    /// A held statement did not fit in `forgotten`: which name the server may still run it
    /// under is unknown, so no SQL EXECUTE is let through any more.
    holds_lost: bool,
    /// The statement record of what each portal was last bound to.
    portals: Portals,
    /// Masking: portals bound to a FETCH or an SQL EXECUTE (or a statement the proxy does not
    /// know), as `announce_batch` treats them.
    indirect_portals: HashSet<String>,
    /// FETCH statements and portals, and which of them may be described.
    fetches: Fetches,
    /// Statements made with SQL PREPARE (as far as the proxy saw them forwarded), with the
    /// judgement of the text that made them: its approval rule holds each EXECUTE.
    sql_prepared: HashMap<String, Prepared>,
    /// Portals bound to a deallocating or COPY FROM STDIN statement (with the sync point of that
    /// Bind) that the client since re-bound or closed: forgotten once the server is known to
    /// have done that (no error in the batch), unless bound to such a statement again later.
    unbinding: Unbinds,
    /// Parses and Closes of sync points whose answers are not in yet, and the portals their
    /// batches unbound.
    defined: VecDeque<(u64, Vec<Def>, Unbinds)>,
    /// Classifications by statement shape (`sql::shape`).
    cache: HashMap<Box<[u8]>, Arc<sql::Classification>>,
    /// Bytes of `cache`'s keys.
    cache_bytes: usize,
    /// The shape of the statement at hand, in a buffer each statement reuses.
    shape: Vec<u8>,
    both: Arc<Both>,
    /// The sync point whose answer may start a COPY FROM STDIN the client has not ended yet,
    /// and how many such COPYs it may still start.
    copy_from: Option<u64>,
    copy_ins_left: usize,
    /// Portals bound to a COPY FROM STDIN statement (a later batch may execute one).
    copy_portals: HashMap<String, u64>,
    outcome: Outcome,
}

fn deny_frame(r: &Refusal) -> Frame {
    wire::error_response(
        SQLSTATE_DENIED,
        &format!("tollgate: statement denied by rule \"{}\"", r.rule),
        r.message.as_deref(),
        Some("the agent's policy does not allow this statement"),
    )
}

impl<R: AsyncRead + Unpin> ClientSide<'_, '_, R> {
    /// Ends the session with a protocol error, after the answers to what went before.
    fn fail(&self, msg: &str) -> Stop {
        self.tell(SQLSTATE_PROTOCOL, msg)
    }

    /// Ends the session with an error, after the answers to what went before.
    fn tell(&self, sqlstate: &str, msg: &str) -> Stop {
        let frame = wire::fatal_response(sqlstate, msg);
        let _ = self.to_down.inject.send(Note::Inject(Inject::Fatal { after: self.syncs, frame }));
        Stop::Told(msg.into())
    }

    /// Refuses what the client sent: a stand-in goes to the server in its place (see `StandIn`),
    /// and the server side swaps the error it draws for the denial. `end` is the client's Sync,
    /// or the proxy's own for a simple Query or FunctionCall; else the batch was refused at a
    /// Flush and the rest of it is skipped (by the caller) up to the client's Sync.
    fn refuse(&mut self, r: &Refusal, end: Option<Frame>, forward: &mut Vec<Frame>) {
        self.outcome.denied += 1;
        self.fetches.reset();
        let frame = deny_frame(r);
        let _ = self.to_down.inject.send(Note::Inject(Inject::Denial { point: self.syncs + 1, frame }));
        forward.push(self.both.stand_in.parse());
        match end {
            Some(sync) => {
                forward.push(sync);
                self.synced();
            }
            // The error reaches the client at its Flush, as the server's own would.
            None => forward.push(wire::flush()),
        }
    }

    /// Whether the computed result columns of a statement are redacted; `class` is `None` for
    /// a statement the proxy does not know, which may read anything.
    fn computed(&self, class: Option<&sql::Classification>) -> bool {
        let Some(m) = self.masker.as_ref() else { return false };
        match class {
            Some(c) => m.computed(&c.tables, &c.reads, c.indirect),
            None => m.computed([], &sql::Reads::default(), true),
        }
    }

    fn op(&self, op: Op) {
        if let Some(tx) = &self.to_down.ops {
            let _ = tx.send(op);
        }
    }

    /// Reads the next whole frame; `Ok(None)` when the client closed.
    async fn next_frame(&mut self) -> Result<Option<Frame>, Stop> {
        // All that came before has gone on: the waits counted from here are the next message's
        // (or, while a batch is held, the batch's until its Sync).
        if self.batched == 0 {
            self.draw.restart_clock();
        }
        loop {
            if let Some(f) = wire::decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            // A client that sends most of a large message and waits holds its share meanwhile,
            // for as long as the budget allows.
            if let Err(e) = ready_buffer(&mut self.buf, &mut self.draw, self.batched) {
                return Err(self.tell(SQLSTATE_OUT_OF_MEMORY, &format!("tollgate: {e}")));
            }
            let read = match self.draw.wait(self.client.read_buf(&mut self.buf)).await {
                Ok(read) => read.map_err(Stop::Client)?,
                Err(e) => return Err(self.tell(SQLSTATE_OUT_OF_MEMORY, &format!("tollgate: {e}"))),
            };
            if read == 0 {
                return Ok(None);
            }
        }
    }

    /// Sends `bytes` to the server, within what the budget allows a large message to wait for
    /// a server busy with what came before it.
    async fn send_up(&mut self, up: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), Stop> {
        match self.draw.wait(up.write_all(bytes)).await {
            Ok(sent) => sent.map_err(Stop::Server),
            Err(e) => Err(self.tell(SQLSTATE_OUT_OF_MEMORY, &format!("tollgate: {e}"))),
        }
    }

    /// Classifies and decides one statement text, recording it durably before it may be
    /// forwarded. Texts of one shape are classified once per session.
    async fn judge(&mut self, text: Arc<str>) -> Result<Judgement, Stop> {
        let shaped = text.len() <= CLASSIFY_ELSEWHERE && sql::shape_into(&text, &mut self.shape);
        let class = match shaped {
            true => match self.cache.get(self.shape.as_slice()) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(sql::classify(&text));
                    let key = self.shape.as_slice();
                    if self.cache.len() >= CLASSIFICATION_CACHE
                        || self.cache_bytes + key.len() > CLASSIFICATION_CACHE_BYTES
                    {
                        self.cache.clear();
                        self.cache_bytes = 0;
                    }
                    self.cache_bytes += key.len();
                    self.cache.insert(key.into(), c.clone());
                    c
                }
            },
            // Longer than `sql::MAX_TEXT_BYTES`: refused at once, unscanned.
            false if (CLASSIFY_ELSEWHERE + 1..=sql::MAX_TEXT_BYTES).contains(&text.len()) => {
                Arc::new(classify_elsewhere(&text, self.base.identity.as_deref().unwrap_or_default()).await)
            }
            false => Arc::new(sql::classify(&text)),
        };
        // An idle session keeps a buffer the size of common statements, not of its longest.
        if self.shape.capacity() > 4096 {
            self.shape = Vec::new();
        }
        let mut d = crate::policy::rules::judge(self.s.grant, &class);
        if self.ascii_names
            && d.action != Action::Deny
            && let Some(name) = class.names().into_iter().find(|n| !n.is_ascii())
        {
            d = Decision {
                action: Action::Deny,
                rule: NAME_ENCODING.into(),
                message: Some(name_encoding_message(name)),
            };
        }
        // In monitor mode a masking refusal stands even where the rules deny too.
        if (d.action != Action::Deny || !self.s.enforce)
            && let Some(m) = &self.masker
            && let Some(why) = rows::statement_refusal(&class, m)
        {
            d = Decision { action: Action::Deny, rule: "masking".into(), message: Some(why) };
        }
        // Masking is not relaxed in monitor mode, so neither are the refusals that keep it whole.
        let monitored = d.action != Action::Allow && !self.s.enforce && d.rule != "masking" && d.rule != NAME_ENCODING;
        let r = StatementRecord {
            base: self.statement_base.clone(),
            // What lies past the cut is still accounted for: the digest ties the record to the
            // client's text, and the names say what it touched.
            cut: match text.len() {
                ..=MAX_AUDITED_SQL => None,
                n if n <= TEXT_ELSEWHERE => Some(Box::new(Cut::of(&text, &class.tables, &class.functions))),
                _ => {
                    let (t, c) = (text.clone(), class.clone());
                    let cut = tokio::task::spawn_blocking(move || Cut::of(&t, &c.tables, &c.functions)).await;
                    Some(Box::new(cut.unwrap_or_else(|_| Cut::of(&text, &class.tables, &class.functions))))
                }
            },
            statement: if text.len() <= MAX_AUDITED_SQL {
                text.clone()
            } else {
                truncate(&text, MAX_AUDITED_SQL).into()
            },
            kinds: class.kinds.iter().map(|k| k.as_str()).collect(),
            verdict: if monitored { "allow" } else { d.action.as_str() },
            would_deny: monitored,
            rule: d.rule.clone(),
            detail: match d.action {
                Action::Approve { .. } if monitored => Some("monitor mode: would be held for approval".into()),
                _ => d.message.clone(),
            },
        };
        let seq = match self.s.statement_audit {
            StatementAudit::Durable => self.s.audit.append_durable(r).await,
            StatementAudit::Written => self.s.audit.append_written(r).await,
        }
        .map_err(Stop::Audit)?;
        let hold = match d.action {
            Action::Approve { timeout } if !monitored => Some((d.rule.to_string(), timeout)),
            _ => None,
        };
        match d.action {
            Action::Deny if !monitored => {
                warn!(session = self.s.id, rule = %d.rule, "statement denied");
                Ok(Judgement::Deny { rule: d.rule.to_string(), message: d.message })
            }
            _ => {
                let computed = self.computed(Some(&class));
                Ok(Judgement::Forward(Prepared { seq, class, text, hold, computed, cut: false }))
            }
        }
    }

    /// Holds a statement until an approver decides, then each statement the session parsed that
    /// it runs with SQL EXECUTE and that waits for approval (an `EXECUTE s` runs what `s` was
    /// judged as, and each run is a request of its own); `Ok(Ok(approvals))` when it may go
    /// ahead. `executed`: those statements, as `executed_holds` found them where `p` runs.
    async fn hold_all(
        &mut self,
        p: &Prepared,
        parameters: Vec<Option<String>>,
        executed: Vec<Prepared>,
    ) -> Result<Result<Vec<Approved>, Refusal>, Stop> {
        let mut approvals = Vec::new();
        for target in std::iter::once(None).chain(executed.iter().map(Some)) {
            match self.hold(p, parameters.clone(), target).await? {
                Ok(a) => approvals.extend(a),
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(approvals))
    }

    /// Holds a statement until an approver decides; `Ok(Ok(_))` when it may go ahead, with the
    /// approval if it was held. `runs`: the prepared statement `p` runs with SQL EXECUTE, whose
    /// rule holds it this time.
    async fn hold(
        &mut self,
        p: &Prepared,
        parameters: Vec<Option<String>>,
        runs: Option<&Prepared>,
    ) -> Result<Result<Option<Approved>, Refusal>, Stop> {
        let Some((rule, timeout)) = &runs.unwrap_or(p).hold else { return Ok(Ok(None)) };
        // An approver decides on what is shown; what runs must be all of it.
        let shown: usize = parameters.iter().flatten().map(String::len).sum();
        if p.text.len() > MAX_AUDITED_SQL
            || p.cut
            || runs.is_some_and(|r| r.text.len() > MAX_AUDITED_SQL || r.cut)
            || shown > MAX_SHOWN_PARAMETERS
        {
            let message = format!(
                "a statement held for approval is refused when it is longer than an approver is shown in full \
                 ({} KiB of SQL, {} KiB of parameters)",
                MAX_AUDITED_SQL >> 10,
                MAX_SHOWN_PARAMETERS >> 10
            );
            return self.refuse_hold(p, runs, rule, message).await;
        }
        let approvals = self.s.approvals;
        let id = approvals.next_id();
        let now = time::OffsetDateTime::now_utc();
        let fmt =
            |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let request = Request {
            id,
            identity: self.base.identity.clone(),
            pid: self.base.pid,
            uid: self.base.uid,
            exe: self.base.exe.clone(),
            resource: self.base.resource.clone(),
            database: self.base.database.clone(),
            statement: p.text.to_string(),
            parameters,
            runs: runs.map(|r| r.text.to_string()),
            rule: rule.clone(),
            requested_at: fmt(now),
            expires_at: fmt(now + *timeout),
        };
        // Written should the session end while the statement is held.
        let mut abandoned = self.base.clone();
        abandoned.kind = Kind::Approval;
        abandoned.refs = Some([p.seq].into_iter().chain(runs.map(|r| r.seq)).collect());
        abandoned.approval_id = Some(id.0);
        abandoned.rule = Some(rule.clone());
        abandoned.verdict = Some(Verdict::Cancelled.as_str().into());
        abandoned.detail = Some("the session ended while the statement was held".into());
        let mut ticket = match approvals.submit(request.clone(), Some((self.s.audit.clone(), abandoned))) {
            Ok(t) => t,
            Err(full) => return self.refuse_hold(p, runs, rule, format!("not held: {full}")).await,
        };
        self.s.held.store(id.0, Ordering::Relaxed);
        info!(session = self.s.id, %id, rule = %rule, "statement held for approval");
        if let Some(hook) = (self.s.webhook)() {
            notify::spawn(hook, request, self.s.mark);
        }
        let deadline = crate::timer::sleep(*timeout);
        tokio::pin!(deadline);
        let mut look = crate::timer::interval(PEER_LOOK);
        let verdict = loop {
            let full = self.buf.len() >= wire::MAX_MESSAGE
                || self.draw.cover(self.buf.len() + READ_CHUNK + self.batched).is_err();
            tokio::select! {
                v = &mut ticket.rx => break v.unwrap_or(Verdict::Cancelled),
                _ = &mut deadline => break Verdict::TimedOut,
                // Keep reading so a client that gives up is noticed; what it sends meanwhile
                // waits in the buffer, bounded.
                n = self.client.read_buf(&mut self.buf), if !full => match n {
                    Ok(0) | Err(_) => break Verdict::Cancelled,
                    Ok(_) => {}
                },
                // Past the bound its FIN sits behind unread data: ask the socket instead.
                _ = look.tick(), if full => if conn::peer_closed(self.client_fd) {
                    break Verdict::Cancelled;
                },
            }
        };
        self.s.held.store(0, Ordering::Relaxed);
        let verdict = match verdict {
            // An approver may have decided in the same instant, and been told so.
            Verdict::TimedOut | Verdict::Cancelled => ticket.withdraw().unwrap_or(verdict),
            decided => decided,
        };
        let mut r = self.base.clone();
        r.kind = Kind::Approval;
        r.refs = Some([p.seq].into_iter().chain(runs.map(|r| r.seq)).collect());
        r.approval_id = Some(id.0);
        r.rule = Some(rule.clone());
        r.verdict = Some(verdict.as_str().into());
        let (approver, reason) = match &verdict {
            Verdict::Approved { by, reason } | Verdict::Denied { by, reason } => (Some(*by), reason.clone()),
            _ => (None, None),
        };
        r.approver = approver;
        r.detail = reason.clone();
        self.s.audit.append_durable(r).await.map_err(Stop::Audit)?;
        info!(session = self.s.id, %id, decision = verdict.as_str(), "approval decided");
        let message = match verdict {
            Verdict::Approved { by, .. } => return Ok(Ok(Some(Approved { approval_id: id.0, approver: by }))),
            Verdict::Denied { by, reason } => format!(
                "approval request {id} was denied by uid {by}{}",
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            ),
            Verdict::TimedOut => format!("approval request {id} was not decided within {}s", timeout.as_secs()),
            Verdict::Cancelled => format!("approval request {id} was cancelled"),
        };
        Ok(Err(Refusal { rule: rule.clone(), message: Some(message) }))
    }

    /// Refuses to hold a statement its rule would hold. Its statement record says `approve`:
    /// the trail says why no approver was asked.
    async fn refuse_hold<T>(
        &mut self,
        p: &Prepared,
        runs: Option<&Prepared>,
        rule: &str,
        message: String,
    ) -> Result<Result<T, Refusal>, Stop> {
        let mut r = self.base.clone();
        r.kind = Kind::Approval;
        r.refs = Some([p.seq].into_iter().chain(runs.map(|r| r.seq)).collect());
        r.rule = Some(rule.to_string());
        r.verdict = Some("refused".into());
        r.error = Some(message.clone());
        self.s.audit.append_durable(r).await.map_err(Stop::Audit)?;
        Ok(Err(Refusal { rule: rule.to_string(), message: Some(message) }))
    }

    /// Relays the client's messages to the server until the client ends the session (`Ok`), or
    /// it must end: then the client is told why, after the answers to what went before.
    async fn run(&mut self, up: impl AsyncWrite + Unpin) -> Result<(), String> {
        match self.relay(up).await {
            Ok(()) => Ok(()),
            Err(Stop::Told(msg)) => Err(msg),
            Err(e @ Stop::Client(_)) => Err(e.to_string()),
            Err(e) => {
                let msg = e.to_string();
                // The audit error's text (paths, OS errors) is for the agent's log only.
                let told = match e {
                    Stop::Audit(_) => "tollgate: the audit trail cannot be written, so nothing more is forwarded",
                    _ => &msg,
                };
                self.tell(e.sqlstate(), told);
                Err(msg)
            }
        }
    }

    async fn relay(&mut self, mut up: impl AsyncWrite + Unpin) -> Result<(), Stop> {
        let mut batch: Vec<Frame> = Vec::new();
        let mut skip_until_sync = false;
        let mut wbuf = BytesMut::new();
        // Kept across frames (like `batch`): no allocation per transaction.
        let mut forward: Vec<Frame> = Vec::new();
        loop {
            let Some(frame) = self.next_frame().await? else { return Ok(()) };
            if let Some(point) = self.copy_from
                && !matches!(frame.tag, b'd' | b'c' | b'f' | b'H' | b'S' | b'X')
            {
                // The server would take this message as part of the COPY and answer two sync
                // points with one ReadyForQuery: the proxy's count of answers would be off for
                // the rest of the session. Well-behaved clients wait for the answer anyway.
                if self.both.clone().progress.copying(point).await {
                    let msg = "tollgate: only CopyData, CopyDone or CopyFail may follow COPY FROM STDIN";
                    let frame = wire::fatal_response(SQLSTATE_PROTOCOL, msg);
                    let _ = self.to_down.inject.send(Note::Inject(Inject::Fatal { after: 0, frame }));
                    return Err(Stop::Told(msg.into()));
                }
                (self.copy_from, self.copy_ins_left) = (None, 0);
            }
            match frame.tag {
                b'Q' | b'F' if !batch.is_empty() || skip_until_sync || self.unsynced => {
                    // A simple query (or function call) inside an unfinished extended-protocol
                    // batch: the server would answer it out of the order the proxy tracks.
                    // Refused, clearly.
                    let msg =
                        "tollgate: a simple Query or FunctionCall inside an extended-protocol batch (send Sync first)";
                    return Err(self.fail(msg));
                }
                b'Q' => {
                    let text = owned_text(&frame.body, wire::query_text).await?;
                    self.outcome.statements += 1;
                    // A simple query runs in the unnamed portal, and may end the transaction
                    // (which drops every portal) or declare cursors (which are portals).
                    self.portals.forget_all();
                    let refusal = match self.judge(text).await? {
                        Judgement::Deny { rule, message } => Some(Refusal { rule, message }),
                        Judgement::Forward(p) => {
                            let mut idle = self.both.progress.idle.load(Ordering::SeqCst);
                            let mut chained =
                                self.fetches.chained(&p.class, idle, |n| self.prepared.get(n).map(|s| &*s.class));
                            // A Close of the portal sent before may have ended what it was bound
                            // to: once the server has answered it, judged again.
                            if chained.is_some() {
                                self.settle_portal_closes().await;
                                idle = self.both.progress.idle.load(Ordering::SeqCst);
                                chained =
                                    self.fetches.chained(&p.class, idle, |n| self.prepared.get(n).map(|s| &*s.class));
                            }
                            let known = |n: &str| {
                                self.prepared.contains_key(n)
                                    || self.sql_prepared.contains_key(n)
                                    || p.class.prepares.contains(n)
                                    || self.forgotten.contains_key(n)
                            };
                            let held = match unknown_executed(&p.class, self.holds_lost, known) {
                                Some(r) => Err(r),
                                None if chained.is_some() => {
                                    Err(Refusal { rule: FETCH_DESCRIBE.into(), message: chained })
                                }
                                None => {
                                    let executed = executed_holds(
                                        &p.class,
                                        |n| self.prepared.get(n),
                                        [&self.sql_prepared, &self.forgotten],
                                    );
                                    self.hold_all(&p, Vec::new(), executed).await?
                                }
                            };
                            let (approvals, refusal) = match held {
                                Ok(a) => (Some(a), None),
                                Err(r) => (None, Some(r)),
                            };
                            if let Some(approvals) = approvals {
                                let _ = self.to_down.expect.send(Expect {
                                    refs: Refs::from_slice(&[p.seq]),
                                    approvals,
                                    started: Instant::now(),
                                    defines: None,
                                });
                                self.op(Op::Query {
                                    copies: p.class.copy_out.iter().cloned().collect(),
                                    computed: p.computed,
                                    cursors: p.class.cursors.clone(),
                                    hold: p.class.hold_cursor,
                                });
                                self.deallocate(&p.class.deallocates, &HashSet::new());
                                self.prepared_in_sql(&p);
                                forward.push(frame);
                                self.syncs += 1;
                                self.fetches.reset();
                                if p.class.copy_in > 0 {
                                    (self.copy_from, self.copy_ins_left) = (Some(self.syncs), p.class.copy_in);
                                }
                                // A COPY it starts takes no Syncs.
                                self.syncs_since_execute = 0;
                            }
                            refusal
                        }
                    };
                    if let Some(r) = refusal {
                        self.refuse(&r, Some(wire::sync()), &mut forward);
                    }
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if !skip_until_sync {
                        self.batched += frame.body.len();
                        if batch.len() >= MAX_BATCH || self.batched > wire::MAX_MESSAGE {
                            let msg = format!(
                                "tollgate: more than {MAX_BATCH} messages or {} bytes without Sync or Flush",
                                wire::MAX_MESSAGE
                            );
                            return Err(self.fail(&msg));
                        }
                        batch.push(frame);
                    }
                }
                // The server skips to this Sync too, from the stand-in's error on.
                b'H' | b'S' if skip_until_sync => {
                    if frame.tag == b'S' {
                        skip_until_sync = false;
                        forward.push(frame);
                        self.synced();
                    }
                }
                b'H' | b'S' => {
                    let is_sync = frame.tag == b'S';
                    match self.judge_batch(&batch, is_sync).await? {
                        Ok(Judged { mut refs, mut approvals, parsed, fetches }) => {
                            // A Flush alone leaves the server where it was.
                            let work = !batch.is_empty();
                            if batch.iter().any(|f| f.tag == b'E') {
                                self.syncs_since_execute = 0;
                            }
                            self.forward_batch(&mut batch, parsed, &mut forward)?;
                            forward.push(frame);
                            self.fetches.commit(fetches, self.syncs + 1);
                            // Statements forwarded at a Flush are carried out by the next Sync.
                            self.unsynced_refs.append(&mut refs);
                            self.unsynced_approvals.append(&mut approvals);
                            if is_sync {
                                self.synced();
                            } else if work {
                                self.unsynced = true;
                            }
                        }
                        Err(r) => {
                            batch.clear();
                            // Work sent at an earlier Flush shares the stand-in's batch: the
                            // server rolls it back, as it would after the client's own error.
                            self.refuse(&r, is_sync.then_some(frame), &mut forward);
                            skip_until_sync = !is_sync;
                        }
                    }
                }
                // COPY data from the client: its COPY statement was judged already.
                b'd' => forward.push(frame),
                b'c' | b'f' => {
                    // The end of a COPY FROM STDIN: Syncs the client sent since the Execute that
                    // started it (libpq and tokio-postgres send one with it) were ignored by the
                    // server if it did take COPY data, which only the server side can tell.
                    // Outside a COPY the server ignores these, and answers the Syncs.
                    if self.copy_from.is_some() {
                        let n = std::mem::take(&mut self.syncs_since_execute);
                        if n > 0 {
                            let _ = self.to_down.inject.send(Note::VoidSyncs { first: self.syncs + 1 - n, n });
                        }
                        self.copy_ins_left = self.copy_ins_left.saturating_sub(1);
                        if self.copy_ins_left == 0 {
                            self.copy_from = None;
                        }
                    }
                    forward.push(frame);
                }
                b'X' => {
                    let _ = send(&mut up, &[frame]).await;
                    return Ok(());
                }
                b'F' => {
                    // The function-call sub-protocol names functions by OID, outside any SQL the
                    // rules could judge: refused.
                    let r = Refusal { rule: "function-call-protocol".into(), message: None };
                    self.refuse(&r, Some(wire::sync()), &mut forward);
                }
                other => {
                    let msg = format!("tollgate: unexpected message type {:?}", other as char);
                    return Err(self.fail(&msg));
                }
            }
            if !forward.is_empty() {
                for f in forward.drain(..) {
                    if f.body.len() <= memory::FREE {
                        f.encode(&mut wbuf);
                        continue;
                    }
                    // A large message goes out from where it is: a copy would double it.
                    f.encode_header(&mut wbuf);
                    self.send_up(&mut up, &wbuf).await?;
                    wbuf.clear();
                    self.send_up(&mut up, &f.body).await?;
                }
                self.send_up(&mut up, &wbuf).await?;
                wbuf.clear();
                trim(&mut wbuf);
                // Frame lists that held a batch of thousands shrink back too.
                if forward.capacity() > 1024 {
                    forward.shrink_to(64);
                }
                if batch.is_empty() && batch.capacity() > 1024 {
                    batch.shrink_to(64);
                }
            }
            // Forwarded (written whole) or refused.
            if batch.is_empty() {
                self.batched = 0;
            }
        }
    }

    /// Notes a Sync on its way to the server: its answer carries out the statements forwarded
    /// since the last one.
    fn synced(&mut self) {
        let mut refs = std::mem::take(&mut self.unsynced_refs);
        refs.sort_unstable();
        refs.dedup();
        let approvals = std::mem::take(&mut self.unsynced_approvals);
        let mut defines = None;
        if !self.defining.is_empty() || !self.unbinding.is_empty() {
            defines = Some(self.syncs + 1);
            let (defs, unbinds) = (std::mem::take(&mut self.defining), std::mem::take(&mut self.unbinding));
            self.defined.push_back((self.syncs + 1, defs, unbinds));
        }
        self.syncs_since_execute += 1;
        let _ = self.to_down.expect.send(Expect { refs, approvals, started: Instant::now(), defines });
        self.op(Op::Sync);
        self.syncs += 1;
        self.unsynced = false;
        self.fetches.reset();
    }

    /// Forgets the named statements a DEALLOCATE or DISCARD ALL on its way to the server drops,
    /// except those in `keep` (parsed after it). If it then fails, their Binds are refused as
    /// unknown: never judged by a text the server may no longer have, or may have replaced with
    /// one made by SQL PREPARE.
    fn deallocate(&mut self, d: &sql::Deallocates, keep: &HashSet<String>) {
        if *d == sql::Deallocates::None {
            return;
        }
        let gone = |name: &str| match d {
            sql::Deallocates::None => false,
            sql::Deallocates::Names(names) => names.contains(name) && !keep.contains(name),
            sql::Deallocates::All => !name.is_empty() && !keep.contains(name),
        };
        let names: Vec<String> =
            self.prepared.keys().chain(self.sql_prepared.keys()).filter(|n| gone(n)).cloned().collect();
        for name in names {
            let dropped = [self.prepared.remove(&name), self.sql_prepared.remove(&name)];
            self.forget_held(name, dropped.into_iter().flatten());
        }
    }

    /// Keeps the held one of `dropped`, what statement `name` stood for until the proxy let
    /// it go, in `forgotten`: the server may still have it, and an SQL EXECUTE of the name is
    /// then held by its rule all the same. One without a hold leaves what was forgotten before:
    /// that may still be live.
    fn forget_held(&mut self, name: String, dropped: impl IntoIterator<Item = Prepared>) {
        if let Some(p) = dropped.into_iter().find(|p| p.hold.is_some()) {
            // Bounded: past that, SQL EXECUTE is refused (an SQL PREPARE of the name, refused
            // by the server, would otherwise make it known without its hold).
            self.forgotten.remove(&name);
            if self.forgotten.len() < MAX_FORGOTTEN {
                self.forgotten.insert(name, p.keep());
            } else {
                self.holds_lost = true;
            }
        }
    }

    /// Whether the server still has statement `name`. One the client closed is gone once the
    /// server has carried out the Close; until its Sync has gone out, it counts as still there.
    async fn still_prepared(&mut self, name: &str) -> bool {
        self.settle_name(name).await;
        self.prepared.contains_key(name)
    }

    /// Waits until the server's answers have settled what `name` stands for: Parses and
    /// Closes of it in earlier sync points may not have taken effect.
    async fn settle_name(&mut self, name: &str) {
        loop {
            self.settle();
            let pending = self.defined.iter().find(|(_, defs, _)| {
                defs.iter().any(|d| match d {
                    Def::Parse { name: n, .. } | Def::Close { statement: Some((n, _)) } => n == name,
                    Def::Close { statement: None } => false,
                })
            });
            match pending {
                Some(&(point, _, _)) => self.completions.wait(point).await,
                None => return,
            }
        }
    }

    /// Notes the statements an SQL PREPARE in `p` makes. The server refuses a name it already
    /// has, so one the proxy believes a Parse made is not what the proxy believes (the server
    /// dropped it unseen): forgotten, so a Bind of it is refused rather than judged by the old
    /// text.
    fn prepared_in_sql(&mut self, p: &Prepared) {
        for name in &p.class.prepares {
            // The server may as well have kept it, and refuse this PREPARE (the name is taken):
            // an EXECUTE of the name may run it.
            let dropped = self.prepared.remove(name);
            self.forget_held(name.clone(), dropped);
        }
        self.holds_lost |= !remember_prepared(&mut self.sql_prepared, p);
    }

    /// Waits until the server has answered every Close of a statement sent with a Sync.
    async fn settle_closes(&mut self) {
        loop {
            self.settle();
            let pending = self
                .defined
                .iter()
                .find(|(_, defs, _)| defs.iter().any(|d| matches!(d, Def::Close { statement: Some(_) })));
            match pending {
                Some(&(point, _, _)) => self.completions.wait(point).await,
                None => return,
            }
        }
    }

    /// Waits for the answers to batches that close portals the FETCH guard remembers, and
    /// applies them.
    async fn settle_portal_closes(&mut self) {
        loop {
            self.settle();
            let pending =
                self.defined.iter().find(|(_, _, unbinds)| unbinds.iter().any(|(_, r)| *r == Registry::Fetch));
            match pending {
                Some(&(point, _, _)) => self.completions.wait(point).await,
                None => return,
            }
        }
    }

    /// Applies the answers that are in: a Parse that did not take effect is undone, a Close
    /// that did forgets its statement, one that did not keeps it; portals re-bound or closed in
    /// a batch with no error no longer deallocate.
    fn settle(&mut self) {
        while let Some(answer) = self.defined.front().and_then(|(point, ..)| self.completions.of(*point)) {
            let (point, defs, unbinds) = self.defined.pop_front().expect("front exists");
            self.completions.forget(point);
            if !answer.failed {
                for (portal, registry) in unbinds {
                    match registry {
                        Registry::Dealloc if self.dealloc_portals.get(&portal).is_some_and(|(at, _)| *at <= point) => {
                            self.dealloc_portals.remove(&portal);
                        }
                        Registry::Copy if self.copy_portals.get(&portal).is_some_and(|at| *at <= point) => {
                            self.copy_portals.remove(&portal);
                        }
                        Registry::Fetch => self.fetches.unbound(&portal, point),
                        _ => {}
                    }
                }
            }
            let done = answer.completed;
            // Last first: each undone Parse puts back what the one before it replaced, and a
            // Close carried out before them finds the statement it closed.
            for (i, d) in defs.into_iter().enumerate().rev() {
                let took = i < done;
                match d {
                    Def::Parse { name, seq, replaced }
                        if !took && self.prepared.get(&name).is_some_and(|p| p.seq == seq) =>
                    {
                        match replaced {
                            Some(old) => self.prepared.insert(name, old),
                            None => self.prepared.remove(&name),
                        };
                    }
                    Def::Close { statement: Some((name, seq)) } if took => {
                        self.fetches.closed(&name, point);
                        if self.prepared.get(&name).is_some_and(|p| p.seq == seq) {
                            self.prepared.remove(&name);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Judges an extended-protocol batch: every Parse, then every Bind (one refusal refuses the
    /// batch), and only then does each execution a rule holds wait for approval, so nobody is
    /// asked to approve a batch that is refused anyway.
    async fn judge_batch(&mut self, batch: &[Frame], ends_in_sync: bool) -> Result<Result<Judged, Refusal>, Stop> {
        // Every Bind is read whole, as the server will read it, before anything of the batch
        // is judged: its parameters are shown to approvers and its result formats decide how
        // rows are masked, so the proxy must see the same ones the server uses.
        for f in batch.iter().filter(|f| f.tag == b'B') {
            wire::bind(&f.body)?;
        }
        if self.ascii_names
            && let Some(name) = non_ascii_name(batch)?
        {
            return Ok(Err(Refusal { rule: NAME_ENCODING.into(), message: Some(name_encoding_message(name)) }));
        }
        if let Some(name) = overlong_name(batch)? {
            return Ok(Err(Refusal {
                rule: "name-too-long".into(),
                message: Some(format!(
                    "statement and portal names may have at most {MAX_NAME} bytes, a byte past ASCII counting \
                     three (the server may cut \"{}...\" short)",
                    truncate(name, 20)
                )),
            }));
        }
        if !self.defined.is_empty() {
            self.settle();
        }
        let mut parsed: Vec<(String, Prepared)> = Vec::new();
        // Statements closed so far in the batch: room for as many new ones.
        let mut closed: Vec<&str> = Vec::new();
        for f in batch.iter().filter(|f| matches!(f.tag, b'P' | b'C')) {
            if f.tag == b'C' {
                if let Ok((b'S', name)) = wire::describe_target(&f.body) {
                    closed.push(name);
                }
                continue;
            }
            let name = wire::parse_name(&f.body)?.to_string();
            let text = owned_text(&f.body, wire::parse_text).await?;
            // The server refuses to redefine a named statement; the proxy must not believe it
            // did, or a later Bind would be judged by the wrong text.
            if !name.is_empty() && (self.still_prepared(&name).await || parsed.iter().any(|(n, _)| *n == name)) {
                return Ok(Err(Refusal {
                    rule: "duplicate-prepared-statement".into(),
                    message: Some(format!("prepared statement \"{name}\" already exists; Close it first")),
                }));
            }
            if !name.is_empty() {
                let full = |this: &Self| {
                    let more = parsed.iter().filter(|(n, _)| !n.is_empty()).map(|(_, p)| p);
                    this.prepared.full(more, &closed, text.len())
                };
                // A Close already sent may make room once the server has carried it out.
                if full(self).is_some() {
                    self.settle_closes().await;
                }
                if let Some(why) = full(self) {
                    return Ok(Err(Refusal { rule: "too-many-prepared-statements".into(), message: Some(why) }));
                }
            }
            self.outcome.statements += 1;
            match self.judge(text).await? {
                Judgement::Forward(p) => parsed.push((name, p)),
                Judgement::Deny { rule, message } => return Ok(Err(Refusal { rule, message })),
            }
        }
        if !self.defined.is_empty() {
            // A statement parsed or closed in a batch whose answer is not in yet may not be what
            // the proxy believes (its Parse or Close skipped after an error): its Binds wait.
            // So do Describes of statements: whether one is a FETCH decides whether it may go.
            for f in batch.iter().filter(|f| matches!(f.tag, b'B' | b'D')) {
                let stmt = match f.tag {
                    b'B' => wire::bind_names(&f.body)?.1,
                    _ => match wire::describe_target(&f.body)? {
                        (b'S', name) => name,
                        _ => continue,
                    },
                };
                if !parsed.iter().any(|(n, _)| n == stmt) {
                    self.settle_name(stmt).await;
                }
            }
        }
        let mut refs = Refs::new();
        // Portals bound in this batch: an Execute of one is that Bind's.
        let mut bound: smallvec::SmallVec<[&str; 2]> = smallvec::SmallVec::new();
        // Executions to hold, with their parameters and what they run by SQL EXECUTE.
        let mut holds: Vec<(Prepared, Vec<Option<String>>, Vec<Prepared>)> = Vec::new();
        // DEALLOCATEs count at their Bind, and at their portal's Execute.
        let mut view = BatchView::default();
        let mut parses = parsed.iter();
        // Portals bound in this batch, with what they deallocate: an Execute of one runs that
        // binding (or nothing, if the Bind failed), whatever an earlier batch bound.
        let mut bound_here: HashMap<&str, sql::Deallocates> = HashMap::new();
        let idle = self.both.progress.idle.load(Ordering::SeqCst);
        self.fetches.prune(idle);
        let mut fetches = self.fetches.batch(idle);
        let fetch_refusal = |message| Refusal { rule: FETCH_DESCRIBE.into(), message: Some(message) };
        for f in batch {
            match f.tag {
                b'P' => {
                    if let Some((n, p)) = parses.next() {
                        view.parse(n, p);
                        if let Err(why) = fetches.parse(n, fetches.runs(&p.class)) {
                            return Ok(Err(fetch_refusal(why)));
                        }
                    }
                }
                b'D' => {
                    let (target, name) = wire::describe_target(&f.body)?;
                    let statement = || view.get(name, &self.prepared).map(|p| fetches.runs(&p.class));
                    if let Err(why) = fetches.describe(target, name, statement) {
                        return Ok(Err(fetch_refusal(why)));
                    }
                }
                b'C' => fetches.run(),
                b'B' => {
                    let (portal, stmt) = wire::bind_names(&f.body)?;
                    let known = view.get(stmt, &self.prepared);
                    // A statement the session never parsed (made by SQL PREPARE, or gone) cannot
                    // be judged: refused, though the server would only have said it is unknown.
                    let Some(p) = known else {
                        return Ok(Err(Refusal {
                            rule: "unknown-prepared-statement".into(),
                            message: Some(format!(
                                "prepared statement \"{stmt}\" was not parsed in this session; only statements \
                                 sent with Parse can be bound"
                            )),
                        }));
                    };
                    refs.push(p.seq);
                    bound.push(portal);
                    if let Err(why) = fetches.bind(portal, fetches.runs(&p.class), self.masker.is_some()) {
                        return Ok(Err(fetch_refusal(why)));
                    }
                    // Its Sync would be taken into the COPY: the proxy could not count answers.
                    if p.class.copy_in > 0 && !ends_in_sync {
                        return Ok(Err(Refusal {
                            rule: "copy-at-flush".into(),
                            message: Some("send COPY ... FROM STDIN in a batch that ends with Sync".into()),
                        }));
                    }
                    if p.class.deallocates != sql::Deallocates::None {
                        view.deallocate(&p.class.deallocates);
                    }
                    if p.class.deallocates != sql::Deallocates::None
                        || !bound_here.is_empty()
                        || !self.dealloc_portals.is_empty()
                    {
                        bound_here.insert(portal, p.class.deallocates.clone());
                    }
                    // Every execution is its own request: each Bind carries its own parameters.
                    let known = |n: &str| {
                        view.get_any(n, &self.prepared).is_some()
                            || self.sql_prepared.contains_key(n)
                            || p.class.prepares.contains(n)
                            || self.forgotten.contains_key(n)
                    };
                    if let Some(r) = unknown_executed(&p.class, self.holds_lost, known) {
                        return Ok(Err(r));
                    }
                    if p.hold.is_some() || !p.class.executes.is_empty() {
                        let p = p.clone();
                        // Not `get`: a name a DEALLOCATE earlier in the batch dropped may be there.
                        let executed = executed_holds(
                            &p.class,
                            |n| view.get_any(n, &self.prepared),
                            [&self.sql_prepared, &self.forgotten],
                        );
                        holds.push((p, wire::bind_parameters(&f.body)?, executed));
                    }
                }
                b'E' => {
                    fetches.run();
                    let portal = wire::execute_portal(&f.body)?;
                    // A portal an earlier batch bound to COPY FROM STDIN, executed at a Flush: the
                    // client's next message would wait for an answer only its own Sync brings.
                    let rebound = self.unbinding.iter().any(|(n, r)| n == portal && matches!(r, Registry::Copy));
                    if !ends_in_sync && !bound.contains(&portal) && !rebound && self.copy_portals.contains_key(portal) {
                        return Ok(Err(Refusal {
                            rule: "copy-at-flush".into(),
                            message: Some("send COPY ... FROM STDIN in a batch that ends with Sync".into()),
                        }));
                    }
                    if !bound_here.is_empty() || !self.dealloc_portals.is_empty() {
                        let bound = bound_here.get(portal).or_else(|| self.dealloc_portals.get(portal).map(|(_, d)| d));
                        if let Some(d) = bound {
                            view.deallocate(d);
                        }
                    }
                    // A portal an earlier batch bound (a cursor fetched in parts): this batch's
                    // result is that statement's too.
                    if !bound.contains(&portal)
                        && let Some(seq) = self.portals.get(portal)
                    {
                        refs.push(seq);
                    }
                }
                _ => {}
            }
        }
        for (name, p) in &parsed {
            if name.is_empty() && !refs.contains(&p.seq) {
                refs.push(p.seq);
            }
        }
        refs.sort_unstable();
        refs.dedup();
        let fetches = fetches.changes();
        let mut approvals = Vec::new();
        for (p, params, executed) in holds {
            match self.hold_all(&p, params, executed).await? {
                Ok(mut a) => approvals.append(&mut a),
                Err(r) => return Ok(Err(r)),
            }
        }
        Ok(Ok(Judged { refs, approvals, parsed, fetches }))
    }

    /// Moves an approved batch to `forward`, noting what it changes: the statements it parses
    /// and closes, the portals it binds to a DEALLOCATE or a COPY FROM STDIN, and (with masking,
    /// `announce_batch`) what the server will answer.
    fn forward_batch(
        &mut self,
        batch: &mut Vec<Frame>,
        parsed: Vec<(String, Prepared)>,
        forward: &mut Vec<Frame>,
    ) -> Result<(), Stop> {
        // Parses and Closes in order: which of them the server carries out shows in its answer.
        let mut parsed = parsed.into_iter();
        // DEALLOCATEs this batch may run (at a Bind of one, or an Execute of its portal), with
        // the names parsed after them, which they leave alone. Applied once the batch is
        // forwarded: an Execute before one still finds its statement.
        let mut deallocs: Vec<(sql::Deallocates, HashSet<String>)> = Vec::new();
        // Portals bound (or closed) in this batch: an Execute of one runs that binding or
        // nothing, whatever an earlier batch bound.
        let mut bound_here: HashMap<&str, sql::Deallocates> = HashMap::new();
        let mut copy_here: HashMap<&str, bool> = HashMap::new();
        let masking = self.to_down.ops.is_some();
        // With masking: what each Bind binds, as its statement stands at that point of the batch.
        let mut binds: Vec<Bound> = Vec::new();
        for (i, f) in batch.iter().enumerate() {
            let d = match f.tag {
                b'P' => {
                    let Some((name, p)) = parsed.next() else { continue };
                    let seq = p.seq;
                    let replaced = self.prepared.insert(name.clone(), p);
                    self.defining.push(Def::Parse { name, seq, replaced });
                    continue;
                }
                b'C' => {
                    match wire::describe_target(&f.body) {
                        Ok((b'S', name)) => {
                            // The name may be parsed again once the server has done it.
                            let statement = self.prepared.get(name).map(|p| (name.to_string(), p.seq));
                            self.defining.push(Def::Close { statement });
                        }
                        Ok((_, portal)) => {
                            self.portals.close(portal);
                            if self.dealloc_portals.contains_key(portal) {
                                self.unbinding.push((portal.to_string(), Registry::Dealloc));
                                bound_here.insert(portal, sql::Deallocates::None);
                            }
                            if self.copy_portals.contains_key(portal) {
                                self.unbinding.push((portal.to_string(), Registry::Copy));
                                copy_here.insert(portal, false);
                            }
                            if self.fetches.bound(portal) {
                                self.unbinding.push((portal.to_string(), Registry::Fetch));
                            }
                            self.defining.push(Def::Close { statement: None });
                        }
                        Err(_) => self.defining.push(Def::Close { statement: None }),
                    }
                    continue;
                }
                b'B' => {
                    let (portal, stmt) = wire::bind_names(&f.body)?;
                    // Bound again after its Close: whatever it is bound to now, the guard
                    // learns from this batch.
                    if !self.unbinding.is_empty() {
                        self.unbinding.retain(|(u, r)| !(u == portal && *r == Registry::Fetch));
                    }
                    let statement = self.prepared.get(stmt);
                    if let Some(p) = statement {
                        self.portals.bind(portal, p);
                    }
                    if let Some(p) = statement.filter(|p| !p.class.prepares.is_empty()).cloned() {
                        self.prepared_in_sql(&p);
                    }
                    let statement = self.prepared.get(stmt);
                    let copy_in = statement.is_some_and(|p| p.class.copy_in > 0);
                    if masking {
                        binds.push(Bound {
                            copy_out: statement.and_then(|p| p.class.copy_out.first().cloned()),
                            computed: match statement {
                                Some(p) => p.computed,
                                None => self.computed(None),
                            },
                            cursors: statement.map_or(sql::Deallocates::All, |p| p.class.cursors.clone()),
                            hold: statement.is_none_or(|p| p.class.hold_cursor),
                            indirect: statement.is_none_or(|p| p.class.indirect),
                        });
                    }
                    if copy_in {
                        self.copy_portals.insert(portal.to_string(), self.syncs + 1);
                        self.unbinding.retain(|(u, r)| !(u == portal && *r == Registry::Copy));
                    } else if self.copy_portals.contains_key(portal) {
                        self.unbinding.push((portal.to_string(), Registry::Copy));
                    }
                    if copy_in || !self.copy_portals.is_empty() {
                        copy_here.insert(portal, copy_in);
                    }
                    match statement.map(|p| &p.class.deallocates) {
                        // Known at once: an extra forgetting only costs a refusal.
                        Some(d) if *d != sql::Deallocates::None => {
                            let d = d.clone();
                            self.dealloc_portals.insert(portal.to_string(), (self.syncs + 1, d.clone()));
                            self.unbinding.retain(|(u, r)| !(u == portal && *r == Registry::Dealloc));
                            bound_here.insert(portal, d.clone());
                            d
                        }
                        _ => {
                            // Unknown until the server confirms it: the Bind may fail and leave
                            // the old portal (a named one, or one a savepoint brings back).
                            if self.dealloc_portals.contains_key(portal) {
                                self.unbinding.push((portal.to_string(), Registry::Dealloc));
                            }
                            if !self.dealloc_portals.is_empty() {
                                bound_here.insert(portal, sql::Deallocates::None);
                            }
                            continue;
                        }
                    }
                }
                b'E' if !self.copy_portals.is_empty() || !self.dealloc_portals.is_empty() => {
                    let portal = wire::execute_portal(&f.body)?;
                    // A portal bound in an earlier batch counts by its registration, which an
                    // unconfirmed re-Bind or Close leaves: at worst the next message waits for
                    // this batch's answer.
                    if copy_here.get(portal).copied().unwrap_or_else(|| self.copy_portals.contains_key(portal)) {
                        self.copy_from = Some(self.syncs + 1);
                        self.copy_ins_left += 1;
                    }
                    match bound_here.get(portal).or_else(|| self.dealloc_portals.get(portal).map(|(_, d)| d)) {
                        Some(d) if *d != sql::Deallocates::None => d.clone(),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let later = batch[i + 1..]
                .iter()
                .filter(|f| f.tag == b'P')
                .filter_map(|f| Some(wire::parse_name(&f.body).ok()?.to_string()))
                .collect();
            deallocs.push((d, later));
        }
        if masking {
            self.announce_batch(batch, binds, forward)?;
        } else {
            forward.append(batch);
        }
        for (d, later) in deallocs {
            self.deallocate(&d, &later);
        }
        Ok(())
    }

    /// Moves a batch to `forward`, announcing to the masking tracker what the server will
    /// answer. Each Execute is preceded by a Describe of its portal unless the client just sent
    /// one (a statement's own Describe is no substitute: the server analyses a statement again
    /// when `search_path` or a table it reads changes, and may then read other tables' columns
    /// under the same names and types). A portal of a FETCH or an SQL EXECUTE is different: it
    /// makes all its rows at its first Execute, from what that cursor or statement name is
    /// then, while a Describe of it looks the name up again, and describing one whose cursor
    /// was closed crashes the server (PostgreSQL 15.18). Such a portal is described right
    /// after its Bind, when its cursor is still there, and never again; only an Execute right
    /// after that (the client's own Describe may come between) has its rows masked by that
    /// plan, any later one (a resumed portal, one executed in a later batch) has every value
    /// masked whole.
    fn announce_batch(
        &mut self,
        batch: &mut Vec<Frame>,
        binds: Vec<Bound>,
        forward: &mut Vec<Frame>,
    ) -> Result<(), Stop> {
        let mut binds = binds.into_iter();
        let mut described: Option<String> = None;
        // Portals bound earlier in the batch: an Execute of one runs only if its Bind did, so it
        // is what that Bind made. Kept only while some portal bound to a FETCH may be open.
        let mut bound: Vec<String> = Vec::new();
        let idle = self.both.progress.idle.load(Ordering::SeqCst);
        // A FETCH or EXECUTE portal bound and described by the last messages, nothing run since.
        let mut fresh: Option<String> = None;
        for f in batch.drain(..) {
            let mut after: Option<Frame> = None;
            let mut keep_fresh = false;
            match f.tag {
                b'B' => {
                    let portal = wire::bind_names(&f.body)?.0.to_string();
                    let Bound { copy_out: copy, computed, cursors, hold, indirect } = binds.next().unwrap_or(Bound {
                        copy_out: None,
                        computed: false,
                        cursors: sql::Deallocates::None,
                        hold: false,
                        indirect: true,
                    });
                    if self.fetches.any() {
                        bound.push(portal.clone());
                    }
                    self.op(Op::Bind { portal: portal.clone(), copy, computed, cursors, hold });
                    if indirect {
                        if self.indirect_portals.len() >= MAX_INDIRECT_PORTALS
                            && !self.indirect_portals.contains(&portal)
                        {
                            let msg = format!(
                                "tollgate: more than {MAX_INDIRECT_PORTALS} portals of FETCH or EXECUTE statements \
                                 bound in a masking session (close them)"
                            );
                            return Err(self.fail(&msg));
                        }
                        self.indirect_portals.insert(portal.clone());
                        after = Some(wire::describe_portal(&portal));
                        self.op(Op::DescribePortal { portal: portal.clone(), hidden: true });
                        fresh = Some(portal);
                        keep_fresh = true;
                    } else {
                        self.indirect_portals.remove(&portal);
                    }
                }
                b'D' => match wire::describe_target(&f.body)? {
                    (b'P', portal) => {
                        keep_fresh = fresh.as_deref() == Some(portal);
                        described = Some(portal.to_string());
                        self.op(Op::DescribePortal { portal: portal.to_string(), hidden: false });
                    }
                    (_, _) => self.op(Op::DescribeStatement),
                },
                b'E' => {
                    let portal = wire::execute_portal(&f.body)?.to_string();
                    // A portal an earlier batch bound to a FETCH or an EXECUTE may still be there
                    // under this name (see `fetches`): never described again, lest its cursor
                    // be gone.
                    let fetch = !bound.contains(&portal) && self.fetches.holds(&portal, idle);
                    let constant = if fetch || self.indirect_portals.contains(&portal) {
                        fresh.as_deref() != Some(portal.as_str())
                    } else {
                        if described.as_deref() != Some(portal.as_str()) {
                            forward.push(wire::describe_portal(&portal));
                            self.op(Op::DescribePortal { portal: portal.clone(), hidden: true });
                        }
                        false
                    };
                    self.op(Op::Execute { portal, constant });
                }
                b'C' => {
                    let (target, name) = wire::describe_target(&f.body)?;
                    if target == b'P' {
                        self.indirect_portals.remove(name);
                    }
                    self.op(Op::Close { target, name: name.to_string() });
                }
                _ => {}
            }
            if f.tag != b'D' {
                described = None;
            }
            if !keep_fresh {
                fresh = None;
            }
            forward.push(f);
            forward.extend(after);
        }
        Ok(())
    }
}

/// Most portals of FETCH or EXECUTE statements a masking session may have bound and not
/// closed (`ClientSide::indirect_portals`): forgetting one would let a Describe of it through.
const MAX_INDIRECT_PORTALS: usize = 4097;

/// Forgotten statements kept for SQL EXECUTE's holds (see `ClientSide::forgotten`), and
/// statements made by SQL PREPARE the proxy keeps; a name that does not fit is unknown to SQL
/// EXECUTE, which refuses it.
const MAX_FORGOTTEN: usize = 256;
const MAX_SQL_PREPARED: usize = 1024;

/// Notes the statements an SQL PREPARE in `p` makes, with `p`'s judgement. A PREPARE the
/// server rejects (the name is taken) must not replace the judgement of the statement it kept:
/// a held one stays held. `false` when a held one did not fit: the server may then have it
/// under a name the proxy does not know it by (`ClientSide::holds_lost`).
fn remember_prepared(sql_prepared: &mut HashMap<String, Prepared>, p: &Prepared) -> bool {
    let mut kept = true;
    for name in &p.class.prepares {
        if sql_prepared.get(name).is_some_and(|old| old.hold.is_some() && p.hold.is_none()) {
            continue;
        }
        if sql_prepared.len() >= MAX_SQL_PREPARED && !sql_prepared.contains_key(name) {
            kept &= p.hold.is_none();
            continue;
        }
        sql_prepared.insert(name.clone(), p.clone().keep());
    }
    kept
}

/// A statement `class` runs with SQL EXECUTE that the proxy does not know (`known` says which
/// it does): after a miscount, or made where the proxy does not see (a function). Refused.
fn unknown_executed(class: &sql::Classification, holds_lost: bool, known: impl Fn(&str) -> bool) -> Option<Refusal> {
    if holds_lost && let Some(name) = class.executes.iter().next() {
        return Some(Refusal {
            rule: "unknown-prepared-statement".into(),
            message: Some(format!(
                "this session let go of more statements waiting for approval than the proxy keeps ({MAX_FORGOTTEN}), \
                 and the server may still run one under any name: EXECUTE \"{name}\" is refused, as every SQL \
                 EXECUTE in this session now"
            )),
        });
    }
    let name = class.executes.iter().find(|n| !known(n))?;
    Some(Refusal {
        rule: "unknown-prepared-statement".into(),
        message: Some(format!(
            "prepared statement \"{name}\" was not made in this session as the proxy saw it; EXECUTE runs only \
             statements it has seen made"
        )),
    })
}

/// The statements `class` runs with SQL EXECUTE that wait for approval: what `lookup` says
/// their names stand for (statements sent with Parse), the SQL PREPAREs that made them, and
/// what they stood for before the proxy forgot them.
fn executed_holds<'p>(
    class: &sql::Classification,
    lookup: impl Fn(&str) -> Option<&'p Prepared>,
    [sql_prepared, forgotten]: [&'p HashMap<String, Prepared>; 2],
) -> Vec<Prepared> {
    let mut held: Vec<Prepared> = Vec::new();
    for name in &class.executes {
        for p in [lookup(name), sql_prepared.get(name), forgotten.get(name)].into_iter().flatten() {
            if p.hold.is_some() && !held.iter().any(|h| h.seq == p.seq) {
                held.push(p.clone());
            }
        }
    }
    held
}

/// PostgreSQL keys prepared statements and portals by their first 63 bytes (NAMEDATALEN - 1):
/// two longer names that begin alike would be one name to the server and two to the proxy.
const MAX_NAME: usize = sql::MAX_NAME;

/// The rule refusing names past ASCII unless the client and server encodings are UTF-8.
const NAME_ENCODING: &str = "name-encoding";
/// A Describe of a FETCH statement or portal that could crash the server (`fetches`).
const FETCH_DESCRIBE: &str = "fetch-describe";

fn name_encoding_message(name: &str) -> String {
    format!(
        "statement, portal and cursor names must be ASCII unless the client and server encodings are UTF8: \
         the server converts \"{}\" from the client's encoding to its own, which may make one name of two",
        truncate(name, 20)
    )
}

/// The first statement or portal name in `batch` past ASCII.
fn non_ascii_name(batch: &[Frame]) -> Result<Option<&str>, wire::WireError> {
    first_name(batch, |n| !n.is_ascii())
}

/// The first statement or portal name in `batch` the server may keep shorter than sent
/// (`sql::name_may_be_cut`).
fn overlong_name(batch: &[Frame]) -> Result<Option<&str>, wire::WireError> {
    first_name(batch, sql::name_may_be_cut)
}

/// The first statement or portal name in `batch` (Parse, Bind, Describe, Close, Execute) that
/// `pick` picks.
fn first_name(batch: &[Frame], pick: impl Fn(&str) -> bool) -> Result<Option<&str>, wire::WireError> {
    for f in batch {
        let names = match f.tag {
            b'P' => [Some(wire::parse_name(&f.body)?), None],
            b'B' => {
                let (portal, stmt) = wire::bind_names(&f.body)?;
                [Some(portal), Some(stmt)]
            }
            b'D' | b'C' => [Some(wire::describe_target(&f.body)?.1), None],
            b'E' => [Some(wire::execute_portal(&f.body)?), None],
            _ => [None, None],
        };
        if let Some(n) = names.into_iter().flatten().find(|n| pick(n)) {
            return Ok(Some(n));
        }
    }
    Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_statements_that_do_not_fit_refuse_every_sql_execute() {
        let prepared = |sql: &str, held: bool| Prepared {
            seq: 1,
            class: Arc::new(sql::classify(sql)),
            text: sql.into(),
            hold: held.then(|| ("approve".to_string(), Duration::from_secs(1))),
            computed: false,
            cut: false,
        };
        let mut kept = HashMap::new();
        for i in 0..MAX_SQL_PREPARED {
            assert!(remember_prepared(&mut kept, &prepared(&format!("PREPARE s{i} AS SELECT 1"), false)));
        }
        // An unheld one that does not fit is unknown to EXECUTE, which refuses it; a held one
        // that does not fit leaves the session unsure what any name runs.
        assert!(remember_prepared(&mut kept, &prepared("PREPARE x AS SELECT 1", false)));
        assert!(!remember_prepared(&mut kept, &prepared("PREPARE d AS DELETE FROM orders", true)));
        let execute = sql::classify("EXECUTE s1");
        assert!(unknown_executed(&execute, false, |n| kept.contains_key(n)).is_none());
        let refused = unknown_executed(&execute, true, |n| kept.contains_key(n)).unwrap();
        assert!(refused.message.unwrap().contains("every SQL EXECUTE"));
        // A text kept cut is marked so: never shown to an approver as what runs.
        let long = format!("PREPARE d AS DELETE FROM orders WHERE id = 1 /* {} */", "🦀".repeat(5000));
        let kept = prepared(&long, true).keep();
        assert!(kept.cut && kept.text.len() <= MAX_AUDITED_SQL + "…".len());
        assert!(!prepared("PREPARE d AS SELECT 1", true).keep().cut);
    }

    #[test]
    fn a_drained_buffer_lets_go_of_a_big_messages_memory() {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        trim(&mut buf);
        assert_eq!(buf.capacity(), READ_CHUNK, "a usual buffer is kept");
        buf.extend_from_slice(&vec![0u8; 8 << 20]);
        let message = buf.split();
        trim(&mut buf);
        assert_eq!(buf.capacity(), 0, "the rest of the big allocation is let go");
        drop(message);
        let mut full = BytesMut::from(&[1u8; 100_000][..]);
        trim(&mut full);
        assert_eq!(full.len(), 100_000, "nothing unread is dropped");
    }

    #[test]
    fn cancel_keys_carry_the_real_pid_a_key_of_the_agents_and_go_with_their_session() {
        let keys = CancelKeys::default();
        let target = |pid| CancelTarget {
            upstream: "127.0.0.1:5432".parse().unwrap(),
            encryption: None,
            real: BackendKey { pid, key: 7 },
            held: Default::default(),
            identity: Some("bot".into()),
        };
        // Two servers' backends of one pid: two keys, neither replacing the other.
        let (a, b) = (keys.issue(target(4242)), keys.issue(target(4242)));
        assert_eq!((a.key.pid, b.key.pid), (4242, 4242), "what pg_backend_pid() and notifications show");
        assert_ne!(a.key.key, b.key.key);
        assert_eq!(keys.get(a.key).map(|t| t.real), Some(BackendKey { pid: 4242, key: 7 }));
        let gone = a.key;
        drop(a);
        assert!(keys.get(gone).is_none(), "the mapping goes with the session");
        assert!(keys.get(b.key).is_some());
        let t = target(1);
        assert!(t.may_cancel(&Some("bot".into())).is_ok());
        let e = t.may_cancel(&Some("other".into())).unwrap_err();
        assert!(e.contains("belongs to identity bot, the request came from other"), "{e}");
        assert!(t.may_cancel(&None).is_err());
        let anonymous = CancelTarget { identity: None, ..target(1) };
        assert!(anonymous.may_cancel(&None).is_err(), "two unnamed sessions are not the same identity");
    }

    /// Runs `downstream` with the client side having forwarded what `ops` say (announced when
    /// masking); in each stage it queues that stage's notes, then the server sends that
    /// stage's bytes. After the last stage the server stays connected unless `close`. Returns
    /// the messages the client got, each stage read until half a second of quiet.
    async fn relay_stages(masked: bool, ops: Vec<Op>, stages: Vec<(Vec<Note>, Vec<u8>)>, close: bool) -> Vec<Frame> {
        let dir = tempfile::tempdir().unwrap();
        let (audit, writer) = crate::audit::AuditLog::open(dir.path()).unwrap();
        let (_expect_tx, expect) = mpsc::unbounded_channel();
        let results = Results::new(audit, ResultBase::new(None, None, None), expect, Default::default());
        let (inject_tx, inject_rx) = mpsc::unbounded_channel();
        let masking = masked.then(|| {
            let rules = [crate::mask::Rule {
                name: "m".into(),
                target: crate::mask::Target::Columns(vec![crate::mask::Glob::new("email")]),
                style: crate::mask::Style::Redact,
            }];
            let (ops_tx, ops_rx) = mpsc::unbounded_channel();
            for op in ops.clone() {
                ops_tx.send(op).unwrap();
            }
            (Tracker::new(Arc::new(Masker::new(&rules, [0; 32]))), ops_rx)
        });
        let (up, up_proxy) = tokio::io::duplex(4096);
        let (client_proxy, mut client) = tokio::io::duplex(4096);
        let stand_in = StandIn(STAND_IN.into());
        let both = Arc::new(Both { stand_in, progress: Progress::default() });
        let budget = crate::proxy::memory::MIN_BUDGET;
        let draw = Draw::new(MessageMemory::new(budget, budget, crate::proxy::memory::DEFAULT_WAIT), "bot");
        let server = FromServer { up: up_proxy, buf: BytesMut::new(), draw };
        let down = tokio::spawn(downstream(server, client_proxy, inject_rx, results, masking, both));
        let mut got = BytesMut::new();
        let (mut up, mut inject_tx) = (Some(up), Some(inject_tx));
        let last = stages.len() - 1;
        for (i, (notes, server)) in stages.into_iter().enumerate() {
            for n in notes {
                inject_tx.as_ref().unwrap().send(n).unwrap();
            }
            up.as_mut().unwrap().write_all(&server).await.unwrap();
            if i == last && close {
                up = None;
                inject_tx = None;
            }
            while let Ok(Ok(n)) = crate::timer::timeout(Duration::from_millis(500), client.read_buf(&mut got)).await {
                if n == 0 {
                    break;
                }
            }
        }
        drop((up, inject_tx));
        down.abort();
        let _ = down.await;
        writer.join();
        let mut frames = Vec::new();
        while let Some(f) = wire::decode(&mut got).unwrap() {
            frames.push(f);
        }
        frames
    }

    async fn relay_frames(masked: bool, ops: Vec<Op>, notes: Vec<Note>, server: &[u8], close: bool) -> Vec<Frame> {
        relay_stages(masked, ops, vec![(notes, server.to_vec())], close).await
    }

    async fn relay(masked: bool, ops: Vec<Op>, notes: Vec<Note>, server: &[u8], close: bool) -> Vec<u8> {
        relay_frames(masked, ops, notes, server, close).await.iter().map(|f| f.tag).collect()
    }

    const STAND_IN: &str = "tollgate_denied_00000000000000ff";

    fn denial(point: u64) -> Note {
        Note::Inject(Inject::Denial { point, frame: wire::error_response("42501", "denied", None, None) })
    }

    fn fatal(after: u64) -> Note {
        Note::Inject(Inject::Fatal { after, frame: wire::error_response("08P01", "bad", None, None) })
    }

    fn queries(n: usize) -> Vec<Op> {
        (0..n)
            .map(|_| Op::Query {
                copies: VecDeque::new(),
                computed: false,
                cursors: sql::Deallocates::None,
                hold: false,
            })
            .collect()
    }

    fn answer(out: &mut BytesMut, tag: &[u8]) {
        Frame { tag: b'C', body: bytes::Bytes::copy_from_slice(tag) }.encode(out);
        wire::ready_for_query(b'I').encode(out);
    }

    fn error(out: &mut BytesMut, message: &str) {
        wire::error_response("42601", message, None, None).encode(out);
        wire::ready_for_query(b'E').encode(out);
    }

    fn message(f: &Frame) -> String {
        wire::error_message(&f.body).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_copy_started_past_the_point_waited_on_still_runs() {
        let p = Progress::default();
        // Syncs ignored during the first COPY of a query were counted answered: the second
        // COPY of the same query seems to start in a later answer.
        p.publish(5, 0, Some(6));
        assert!(p.copying(5).await);
        p.publish(5, 0, Some(5));
        assert!(p.copying(5).await);
        p.publish(5, 0, None);
        assert!(!p.copying(5).await);
        p.publish(7, 0, Some(4));
        assert!(!p.copying(5).await, "a COPY of an earlier point");
    }
    #[tokio::test]
    async fn a_denial_takes_the_place_of_the_error_its_stand_in_drew() {
        // Query 1, the stand-in of a refused statement, query 2: three answers in one read.
        let mut server = BytesMut::new();
        answer(&mut server, b"SELECT 1\0");
        error(&mut server, &format!("syntax error at or near \"{STAND_IN}\""));
        answer(&mut server, b"SELECT 2\0");
        let mut ops = queries(1);
        ops.push(Op::Sync);
        ops.extend(queries(1));
        for masked in [false, true] {
            let got = relay_frames(masked, ops.clone(), vec![denial(2)], &server, true).await;
            let tags: Vec<u8> = got.iter().map(|f| f.tag).collect();
            assert_eq!(tags, b"CZEZCZ", "masking {masked}");
            assert_eq!(message(&got[2]), "denied", "masking {masked}");
            assert_eq!(got[3].body.as_ref(), b"E", "the server's status: its transaction is aborted");
        }
    }

    #[tokio::test]
    async fn a_stand_in_the_server_skipped_leaves_the_error_that_made_it_skip() {
        // Work sent at a Flush failed; the stand-in after it, in the same batch, was skipped.
        let mut server = BytesMut::new();
        error(&mut server, "division by zero");
        let ops = vec![Op::bind(), Op::Execute { portal: String::new(), constant: false }, Op::Sync];
        for masked in [false, true] {
            let got = relay_frames(masked, ops.clone(), vec![denial(1)], &server, true).await;
            let tags: Vec<u8> = got.iter().map(|f| f.tag).collect();
            assert_eq!(tags, b"EZ", "masking {masked}: one error per batch, as from the server alone");
            assert_eq!(message(&got[0]), "division by zero", "masking {masked}");
        }
    }

    #[tokio::test]
    async fn a_denial_queued_after_the_error_that_made_the_server_skip_its_stand_in_is_dropped() {
        // Work sent at a Flush fails, and its error goes out, while the client side still judges
        // the batch after it; then the refusal is queued, and the server's ReadyForQuery comes.
        let ops = vec![Op::bind(), Op::Execute { portal: String::new(), constant: false }, Op::Sync];
        let mut failed = BytesMut::new();
        wire::error_response("22012", "division by zero", None, None).encode(&mut failed);
        let mut ready = BytesMut::new();
        wire::ready_for_query(b'I').encode(&mut ready);
        for masked in [false, true] {
            let stages = vec![(vec![], failed.to_vec()), (vec![denial(1)], ready.to_vec())];
            let got = relay_stages(masked, ops.clone(), stages, true).await;
            let tags: Vec<u8> = got.iter().map(|f| f.tag).collect();
            assert_eq!(tags, b"EZ", "masking {masked}: one error per batch");
            assert_eq!(message(&got[0]), "division by zero", "masking {masked}");
        }
    }

    #[tokio::test]
    async fn a_fatal_error_with_no_answer_before_it_goes_out_at_once() {
        // Only a notification comes from the server, which stays connected: no ReadyForQuery
        // will ever carry the error out.
        let mut server = BytesMut::new();
        Frame { tag: b'A', body: bytes::Bytes::from_static(b"\0\0\0\x01ch\0\0") }.encode(&mut server);
        for masked in [false, true] {
            let mut tags = relay(masked, queries(0), vec![fatal(0)], &server, false).await;
            tags.sort_unstable();
            assert_eq!(tags, b"AE", "masking {masked}");
        }
    }

    #[tokio::test]
    async fn syncs_sent_during_a_copy_from_stdin_are_not_waited_for() {
        // Bind/Execute/Sync of a COPY FROM STDIN (point 1), CopyData, CopyDone, Sync (point 2);
        // then a statement refused. The server ignores the first Sync: one ReadyForQuery.
        let ops = vec![Op::bind(), Op::Execute { portal: String::new(), constant: false }, Op::Sync, Op::Sync];
        let mut server = BytesMut::new();
        Frame { tag: b'2', body: bytes::Bytes::new() }.encode(&mut server);
        Frame { tag: b'G', body: bytes::Bytes::from_static(&[0, 0, 1, 0, 0]) }.encode(&mut server);
        answer(&mut server, b"COPY 1\0");
        for masked in [false, true] {
            let notes = vec![Note::VoidSyncs { first: 1, n: 1 }, fatal(2)];
            let tags = relay(masked, ops.clone(), notes, &server, false).await;
            assert_eq!(tags, b"2GCZE", "masking {masked}");
        }
        // With masking, the next execution (whose row shape the proxy asks for with a Describe
        // the client never sees) is still matched to its own answers.
        let mut more = ops.clone();
        more.extend([
            Op::bind(),
            Op::DescribePortal { portal: String::new(), hidden: true },
            Op::Execute { portal: String::new(), constant: false },
            Op::Sync,
        ]);
        let mut then = server.clone();
        Frame { tag: b'2', body: bytes::Bytes::new() }.encode(&mut then);
        let mut t = BytesMut::from(&[0u8, 1][..]);
        t.extend_from_slice(b"email\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0");
        Frame { tag: b'T', body: t.freeze() }.encode(&mut then);
        Frame { tag: b'D', body: bytes::Bytes::from_static(b"\0\x01\0\0\0\x05a@b.c") }.encode(&mut then);
        answer(&mut then, b"SELECT 1\0");
        let notes = vec![Note::VoidSyncs { first: 1, n: 1 }, fatal(2)];
        assert_eq!(relay(true, more, notes, &then, false).await, b"2GCZE2DCZ");
        // A COPY that never started (an error instead of CopyInResponse): both Syncs count.
        let mut server = BytesMut::new();
        Frame { tag: b'E', body: bytes::Bytes::from_static(b"SERROR\0Mno\0\0") }.encode(&mut server);
        wire::ready_for_query(b'I').encode(&mut server);
        for masked in [false, true] {
            let notes = vec![Note::VoidSyncs { first: 1, n: 1 }, fatal(2)];
            let tags = relay(masked, ops.clone(), notes, &server, false).await;
            assert_eq!(tags, b"EZ", "masking {masked}: the error waits for the second Sync's answer");
        }
    }

    #[test]
    fn row_counts_come_from_command_tags() {
        let mut t = Tally::default();
        for tag in ["SELECT 5", "INSERT 0 1", "UPDATE 3", "BEGIN", "COPY 12", "SELECT 99999999999999999999", "FETCH x"]
        {
            t.see(b'C', format!("{tag}\0").as_bytes());
        }
        assert_eq!((t.rows, t.commands), (21, 7));
        // A portal's parts: each suspended part counts its DataRows; the part that completes
        // it counts by its tag, as always.
        let mut t = Tally::default();
        for (tag, body) in
            [(b'D', ""), (b'D', ""), (b's', ""), (b'D', ""), (b's', ""), (b'D', ""), (b'C', "SELECT 1\0")]
        {
            t.see(tag, body.as_bytes());
        }
        assert_eq!((t.rows, t.commands), (4, 1));
    }

    #[test]
    fn settings_the_server_reports_that_change_how_it_reads_sql() {
        assert!(lexing_setting(b"standard_conforming_strings\0on\0").is_none());
        assert!(lexing_setting(b"standard_conforming_strings\0off\0").is_some());
        assert!(lexing_setting(b"client_encoding\0UTF8\0").is_none());
        assert!(lexing_setting(b"client_encoding\0SJIS\0").is_some());
        assert!(lexing_setting(b"TimeZone\0UTC\0").is_none());
        assert!(lexing_setting(b"").is_none(), "not even a name");
        // During a session any new client encoding ends it: only a function can have set it.
        assert!(session_setting(b"client_encoding\0LATIN1\0").is_some());
        assert!(session_setting(b"standard_conforming_strings\0off\0").is_some());
        assert!(session_setting(b"DateStyle\0ISO, MDY\0").is_none());
        assert!(unconverted_server(b"server_encoding\0UTF8\0") && unconverted_server(b"server_encoding\0SQL_ASCII\0"));
        assert!(!unconverted_server(b"server_encoding\0EUC_JP\0") && !unconverted_server(b"client_encoding\0UTF8\0"));
    }

    #[test]
    fn startup_parameters_are_allowlisted() {
        let p = |k: &str, v: &str| vec![("user".to_string(), "x".to_string()), (k.to_string(), v.to_string())];
        assert!(check_startup_params(&p("application_name", "psql")).is_ok());
        assert!(check_startup_params(&p("client_encoding", "UTF8")).is_ok());
        for safe in ["UTF8", "utf-8", "Unicode", "SQL_ASCII", "LATIN1", "ISO_8859_5", "WIN1252", "KOI8-R", "EUC_JP"] {
            assert!(check_startup_params(&p("client_encoding", safe)).is_ok(), "{safe}");
        }
        // Every alias the server knows for an encoding whose characters can hold a backslash or
        // quote byte (src/common/encnames.c), and names the server does not know.
        for unsafe_ in [
            "SJIS",
            "Shift_JIS",
            "mskanji",
            "WIN932",
            "Windows-932",
            "SHIFT_JIS_2004",
            "BIG5",
            "win950",
            "windows950",
            "GBK",
            "WIN936",
            "windows936",
            "GB18030",
            "UHC",
            "WIN949",
            "windows949",
            "JOHAB",
            "auto",
            "",
        ] {
            assert!(check_startup_params(&p("client_encoding", unsafe_)).is_err(), "{unsafe_}");
        }
        let twice = |k: &str| vec![(k.to_string(), "a".to_string()), (k.to_ascii_uppercase(), "b".to_string())];
        assert!(check_startup_params(&twice("database")).is_err());
        assert!(check_startup_params(&twice("application_name")).is_err());
        assert!(check_startup_params(&p("options", "-c standard_conforming_strings=off")).is_err());
        assert!(check_startup_params(&p("replication", "database")).is_err());
        assert!(check_startup_params(&p("standard_conforming_strings", "off")).is_err());
    }
}
