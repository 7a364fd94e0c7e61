//! Logging in to the real server with the resource's credential (SCRAM-SHA-256, md5 or
//! cleartext, whichever the server asks for). The client never sees this secret.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use bytes::{Buf, BytesMut};
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::frontend,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{self, Frame};
use crate::{
    mask::{ColumnMask, MaskedTable, MaskedTables, Masker, Origins, Style},
    policy::{AuthMethod, AuthMethods},
    proxy::conn::Conn,
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("upstream protocol: {0}")]
    Wire(#[from] wire::WireError),
    #[error("upstream refused the login: {0}")]
    Refused(String),
    #[error("upstream asked for unsupported authentication (code {0})")]
    UnsupportedAuth(i32),
    #[error("upstream asked for {asked}, which the resource's credentials.auth does not allow (it allows {allowed})")]
    MethodRefused { asked: &'static str, allowed: String },
    #[error("upstream SCRAM exchange failed: {0}")]
    Scram(String),
    #[error("upstream closed the connection during login")]
    Closed,
    #[error("upstream {addr} does not accept TLS, which the resource's tls mode requires")]
    NoTls { addr: SocketAddr },
    #[error("upstream TLS: {0}")]
    Tls(String),
    #[error("looking up the table columns that column rules mask: {0}")]
    Lookup(String),
}

/// Where the SCRAM exchange with the server stands.
enum Sasl {
    NotStarted,
    Running(sasl::ScramSha256),
    /// The server's final message proved it knows the password.
    Verified,
}

/// Asks the server for TLS (SSLRequest) and runs the handshake, checking the certificate as the
/// configuration says.
pub async fn start_tls(
    mut tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
) -> Result<Conn, UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    if answer[0] != b'S' {
        return Err(UpstreamError::NoTls { addr });
    }
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(Conn::Client(Box::new(tls)))
}

/// How a server connection is encrypted: the client configuration and the name its certificate
/// must carry. `None` where the resource's `tls` mode is `disable`.
pub type Encryption = Option<(std::sync::Arc<rustls::ClientConfig>, rustls_pki_types::ServerName<'static>)>;

/// Sends a CancelRequest for a backend on a fresh connection, encrypted as the session's own
/// was: a key sent in clear would let anyone who reads it cancel that backend's queries.
pub async fn cancel(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    encryption: Encryption,
    pid: i32,
    key: i32,
) -> Result<(), UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let mut stream = match encryption {
        None => Conn::Plain(tcp),
        Some((config, name)) => start_tls(tcp, addr, config, name).await?,
    };
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, key, &mut out);
    stream.write_all(&out).await.map_err(io)?;
    // Sends TLS's close_notify after the request. The server closes without an answer, maybe
    // first: the request is delivered whatever this says.
    let _ = stream.shutdown().await;
    Ok(())
}

/// A logged-in server connection, with what the server said during login.
pub struct Upstream {
    pub stream: Conn,
    /// ParameterStatus frames to pass on to the client.
    pub parameters: Vec<Frame>,
    pub backend_pid: i32,
    pub backend_key: i32,
    /// Bytes read past the login's ReadyForQuery (normally none).
    pub leftover: BytesMut,
    /// How the server checked the credential, and whether SCRAM was bound to the TLS channel.
    pub auth: AuthMethod,
    pub channel_binding: bool,
}

async fn next_frame(s: &mut Conn, buf: &mut BytesMut, addr: SocketAddr) -> Result<Frame, UpstreamError> {
    loop {
        if let Some(f) = wire::decode(buf)? {
            return Ok(f);
        }
        if s.read_buf(buf).await.map_err(|source| UpstreamError::Io { addr, source })? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

pub async fn login(
    mut stream: Conn,
    addr: SocketAddr,
    user: &str,
    password: &str,
    params: &[(String, String)],
    allowed: AuthMethods,
    unverified: bool,
) -> Result<Upstream, UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let allow = |m: AuthMethod, asked: &'static str| {
        if allowed.allows(m) { Ok(()) } else { Err(UpstreamError::MethodRefused { asked, allowed: allowed.names() }) }
    };
    // SCRAM over TLS binds itself to the server's certificate: someone who terminates TLS in
    // between and relays the exchange to the real server fails it. `unverified`: the
    // certificate is not checked (`tls: require`), so binding is all that shows a relay.
    let tls = matches!(stream, Conn::Client(_));
    let binding = match &stream {
        Conn::Client(tls) => {
            tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::tls::end_point_binding(c))
        }
        _ => None,
    };
    let mut out = BytesMut::new();
    let mut startup: Vec<(&str, &str)> = vec![("user", user)];
    for (k, v) in params {
        // The client's own user is replaced; what it asks for otherwise (database, options,
        // application_name, client_encoding, ...) is passed on.
        if k != "user" {
            startup.push((k, v));
        }
    }
    frontend::startup_message(startup.iter().copied(), &mut out).map_err(io)?;
    stream.write_all(&out).await.map_err(io)?;

    let mut buf = BytesMut::new();
    let mut sasl = Sasl::NotStarted;
    let mut method = None;
    // AuthenticationOk came: the server says the login is done.
    let mut authenticated = false;
    let mut channel_binding = false;
    let mut parameters = Vec::new();
    let (mut backend_pid, mut backend_key) = (0, 0);
    loop {
        let f = next_frame(&mut stream, &mut buf, addr).await?;
        match f.tag {
            b'R' => {
                let mut body = f.body.clone();
                if body.len() < 4 {
                    return Err(wire::WireError::Malformed { what: "Authentication", detail: "short" }.into());
                }
                let code = body.get_i32();
                out.clear();
                match code {
                    // A server that started SCRAM must prove it knows the password before it
                    // lets the proxy in, or someone between them could pose as it.
                    0 if matches!(sasl, Sasl::Running(_)) => {
                        return Err(UpstreamError::Scram(
                            "the server accepted the login without proving it knows the password".into(),
                        ));
                    }
                    0 => {
                        if method.is_none() {
                            allow(AuthMethod::None, "no authentication (the server did not check the password)")?;
                            method = Some(AuthMethod::None);
                        }
                        authenticated = true;
                        continue;
                    }
                    // Nor may it fall back to a weaker method once SCRAM started.
                    3 | 5 | 10 if !matches!(sasl, Sasl::NotStarted) => {
                        return Err(UpstreamError::Scram(format!(
                            "the server asked for another method (code {code}) during SCRAM"
                        )));
                    }
                    3 => {
                        allow(AuthMethod::Password, "the password in the clear (password)")?;
                        method = Some(AuthMethod::Password);
                        frontend::password_message(password.as_bytes(), &mut out).map_err(io)?
                    }
                    5 => {
                        allow(AuthMethod::Md5, "md5")?;
                        if body.len() < 4 {
                            return Err(wire::WireError::Malformed { what: "AuthenticationMD5", detail: "salt" }.into());
                        }
                        method = Some(AuthMethod::Md5);
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hash = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
                    }
                    10 => {
                        let mechanisms: Vec<&[u8]> = body.split(|&b| b == 0).collect();
                        let plus = mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
                        if !plus && !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                            return Err(UpstreamError::UnsupportedAuth(code));
                        }
                        allow(AuthMethod::ScramSha256, "SCRAM-SHA-256")?;
                        // Without a hash to bind with, a relay presenting such a certificate
                        // could not be told from the server.
                        // Nor a server that offers no binding: over TLS every PostgreSQL since 11
                        // does, and a relay that reaches the server in clear takes the offer away.
                        if tls && unverified && !plus {
                            return Err(UpstreamError::Scram(
                                "the server offers SCRAM without channel binding (SCRAM-SHA-256-PLUS) over TLS, \
                                 and with tls: require nothing else shows that no one relays the login; use tls: \
                                 verify-full"
                                    .into(),
                            ));
                        }
                        if tls && unverified && binding.is_none() {
                            return Err(UpstreamError::Scram(
                                "the server's certificate names no hash to bind SCRAM to its TLS channel (an \
                                 Ed25519 or RSA-PSS signature), and with tls: require nothing else shows that no \
                                 one relays the login; use tls: verify-full"
                                    .into(),
                            ));
                        }
                        // Over TLS without the server offering binding: say the proxy could
                        // bind ("y"), so a server that does offer it sees its offer was removed.
                        let (mechanism, binding) = match binding.clone() {
                            Some(hash) if plus => {
                                (sasl::SCRAM_SHA_256_PLUS, sasl::ChannelBinding::tls_server_end_point(hash))
                            }
                            Some(_) => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                            None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                        };
                        if mechanism == sasl::SCRAM_SHA_256_PLUS {
                            channel_binding = true;
                        } else if !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                            return Err(UpstreamError::Scram(
                                "the server offers only SCRAM with channel binding, which this connection cannot do"
                                    .into(),
                            ));
                        }
                        method = Some(AuthMethod::ScramSha256);
                        let s = sasl::ScramSha256::new(password.as_bytes(), binding);
                        frontend::sasl_initial_response(mechanism, s.message(), &mut out).map_err(io)?;
                        sasl = Sasl::Running(s);
                    }
                    11 => {
                        let Sasl::Running(mut s) = std::mem::replace(&mut sasl, Sasl::NotStarted) else {
                            return Err(UpstreamError::Scram("SASLContinue out of turn".into()));
                        };
                        // Salting the password takes the server's iteration count of hashes
                        // (milliseconds): not on the loop that relays other sessions.
                        let (s, r) = tokio::task::spawn_blocking(move || {
                            let r = s.update(&body);
                            (s, r)
                        })
                        .await
                        .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                        r.map_err(|e| UpstreamError::Scram(e.to_string()))?;
                        frontend::sasl_response(s.message(), &mut out).map_err(io)?;
                        sasl = Sasl::Running(s);
                    }
                    12 => {
                        let Sasl::Running(s) = &mut sasl else {
                            return Err(UpstreamError::Scram("SASLFinal out of turn".into()));
                        };
                        s.finish(&body).map_err(|e| UpstreamError::Scram(e.to_string()))?;
                        sasl = Sasl::Verified;
                        continue;
                    }
                    other => return Err(UpstreamError::UnsupportedAuth(other)),
                }
                stream.write_all(&out).await.map_err(io)?;
            }
            b'E' => {
                return Err(UpstreamError::Refused(
                    wire::error_message(&f.body).unwrap_or_else(|| "unknown error".into()),
                ));
            }
            b'S' => parameters.push(f),
            b'K' => (backend_pid, backend_key) = wire::backend_key(&f.body)?,
            b'Z' => {
                // Ready without AuthenticationOk (or with SCRAM begun and never proven) would let
                // anyone between the proxy and the server skip the login it started.
                if matches!(sasl, Sasl::Running(_)) {
                    return Err(UpstreamError::Scram(
                        "the server declared the login done without proving it knows the password".into(),
                    ));
                }
                let Some(auth) = method.filter(|_| authenticated) else {
                    return Err(
                        wire::WireError::Malformed { what: "login", detail: "ready before authentication" }.into()
                    );
                };
                return Ok(Upstream {
                    stream,
                    parameters,
                    backend_pid,
                    backend_key,
                    leftover: buf,
                    auth,
                    channel_binding,
                });
            }
            // NoticeResponse and anything else during login is informational.
            _ => {}
        }
    }
}

/// At most this many columns may the tables with masked columns have: sessions keep them (one
/// copy for those that find the same, `Masker::with_origins`).
const MAX_ORIGINS: usize = 100_000;
/// At most this many rows may the lookup return: a column comes once for each masked field its
/// type holds.
const MAX_ORIGIN_ROWS: usize = 4 * MAX_ORIGINS;

/// The catalog query behind `column_origins`: every live column of the user tables, views,
/// materialized views and foreign tables that have a column the rules may name, or a column of
/// a type that holds a field they may name; with that field's name, once per such field.
///
/// A name the rules may name is one that is not ASCII (`$1`, a regex) or, lowered in the "C"
/// collation, is `LIKE` a pattern (`$2`...); `Masker::column` decides which are masked. A type
/// holds a field when it is the row type of a relation with a column of that name (a table's,
/// a system catalog's, or a composite type's made with `CREATE TYPE ... AS`), or an array of,
/// a domain over, a range or multirange of (`multiranges`: PostgreSQL 14 and later have them),
/// or a composite with a field of such a type, at any depth: `SELECT (c).ssn AS x` reads a
/// masked value through column `c` (a column of a scalar base type holds nothing, so only
/// the others are followed). Everything is schema-qualified so the login role's search_path
/// cannot redirect it.
fn origins_query(patterns: usize, multiranges: bool) -> String {
    let mut named = String::from("m.attname OPERATOR(pg_catalog.~) $1");
    if patterns > 0 {
        let params: Vec<String> = (0..patterns).map(|i| format!("${}", i + 2)).collect();
        named.push_str(&format!(
            " OR pg_catalog.lower(m.attname::pg_catalog.text COLLATE pg_catalog.\"C\") OPERATOR(pg_catalog.~~) \
             ANY (ARRAY[{}]::pg_catalog.text[])",
            params.join(", ")
        ));
    }
    let live = |a: &str| format!("{a}.attnum OPERATOR(pg_catalog.>) 0 AND NOT {a}.attisdropped");
    let multiranges = match multiranges {
        true => "UNION ALL SELECT r.rngmultitypid, r.rngtypid FROM pg_catalog.pg_range r ",
        false => "",
    };
    format!(
        "WITH RECURSIVE hits AS (\
           SELECT m.attrelid, m.attname::pg_catalog.text AS field, c.reltype \
           FROM pg_catalog.pg_attribute m \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) m.attrelid \
           WHERE {live_m} AND ({named})), \
         holders(holder, held) AS MATERIALIZED (\
           SELECT t.oid, t.typelem FROM pg_catalog.pg_type t \
           WHERE t.typelem OPERATOR(pg_catalog.<>) 0 AND t.typcategory OPERATOR(pg_catalog.=) 'A' \
           UNION ALL SELECT t.oid, t.typbasetype FROM pg_catalog.pg_type t WHERE t.typtype OPERATOR(pg_catalog.=) 'd' \
           UNION ALL SELECT r.rngtypid, r.rngsubtype FROM pg_catalog.pg_range r \
           {multiranges}\
           UNION ALL SELECT c.reltype, m.atttypid FROM pg_catalog.pg_attribute m \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) m.attrelid \
           JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) m.atttypid \
           WHERE {live_m} AND c.reltype OPERATOR(pg_catalog.<>) 0 \
             AND (t.typtype OPERATOR(pg_catalog.<>) 'b' OR t.typelem OPERATOR(pg_catalog.<>) 0)), \
         fields(typ, field) AS (\
           SELECT h.reltype, h.field FROM hits h WHERE h.reltype OPERATOR(pg_catalog.<>) 0 \
           UNION SELECT k.holder, f.field FROM fields f JOIN holders k ON k.held OPERATOR(pg_catalog.=) f.typ) \
         SELECT a.attrelid::pg_catalog.int8, a.attnum, a.attname, c.relname, f.field \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
         LEFT JOIN fields f ON f.typ OPERATOR(pg_catalog.=) a.atttypid \
         WHERE {live_a} \
         AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'pg_toast']) \
         AND c.relkind::pg_catalog.text OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'v', 'm', 'f', 'p']) \
         AND a.attrelid OPERATOR(pg_catalog.=) ANY (SELECT h.attrelid FROM hits h \
           UNION ALL SELECT m.attrelid FROM pg_catalog.pg_attribute m \
           JOIN fields f ON f.typ OPERATOR(pg_catalog.=) m.atttypid WHERE {live_m})",
        live_m = live("m"),
        live_a = live("a"),
    )
}

/// One catalog row: (table OID, attribute number, column name, table name, a field its type
/// holds that the rules may name).
type OriginRow = (u32, i16, String, String, Option<String>);

fn origin_row(body: &[u8]) -> Result<OriginRow, UpstreamError> {
    let bad = |detail| UpstreamError::Wire(wire::WireError::Malformed { what: "DataRow", detail });
    let mut b = body;
    if b.len() < 2 || b.get_i16() != 5 {
        return Err(bad("expected 5 columns"));
    }
    let mut field = || -> Result<Option<String>, UpstreamError> {
        if b.len() < 4 {
            return Err(bad("short"));
        }
        let Ok(len) = usize::try_from(b.get_i32()) else { return Ok(None) };
        if b.len() < len {
            return Err(bad("short"));
        }
        let v = String::from_utf8_lossy(&b[..len]).into_owned();
        b.advance(len);
        Ok(Some(v))
    };
    let mut text = || field()?.ok_or_else(|| bad("NULL"));
    let oid = text()?.parse::<u32>().map_err(|_| bad("table oid"))?;
    let attnum = text()?.parse::<i16>().map_err(|_| bad("attribute number"))?;
    let (name, table) = (text()?, text()?);
    Ok((oid, attnum, name, table, field()?))
}

/// What the lookup found of the tables of one name: statements name tables without their
/// schema as often as with it, so `Masker::computed` knows them by name.
#[derive(Debug, Default)]
struct Read {
    /// The strictest style of their masked columns, if they have any.
    strictest: Option<Style>,
    /// Their columns masked for a field their type holds.
    holding: HashSet<String>,
    /// Each table's column names, lower-cased, by table OID.
    columns: HashMap<u32, HashSet<String>>,
}

impl Read {
    /// The tables of this name as `Masker` knows them, if one has a masked column. Their
    /// columns are the names every one of them has: `v.f` is a function of the row `v` unless
    /// every table `v` may be has a column `f` (tables of one name in two schemas).
    fn into_table(self) -> Option<MaskedTable> {
        let mut sets = self.columns.into_values();
        let mut columns = sets.next().unwrap_or_default();
        for set in sets {
            columns.retain(|c| set.contains(c));
        }
        Some(MaskedTable { style: self.strictest?, columns, holding: self.holding })
    }
}

/// The server's major version, as its `server_version` at login says (`15.18 (Debian ...)`).
fn server_major(parameters: &[Frame]) -> Option<u32> {
    parameters.iter().find_map(|f| {
        let (name, value) = super::parameter(&f.body)?;
        let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
        (name == b"server_version").then(|| std::str::from_utf8(&value[..digits]).ok()?.parse().ok()).flatten()
    })
}

impl Upstream {
    /// Asks the server which table columns the grant's column rules name, so a result column
    /// taken from one is masked whatever it is called in the query, and which tables have
    /// them. Runs once per session, right after login and before the client's first message.
    pub async fn column_origins(
        &mut self,
        addr: SocketAddr,
        masker: &Masker,
    ) -> Result<(Origins, MaskedTables), UpstreamError> {
        let io = |source| UpstreamError::Io { addr, source };
        let likes = masker.column_likes();
        let mut params: Vec<&str> = vec![r"[^\x01-\x7f]"];
        params.extend(likes.iter().map(String::as_str));
        let mut out = BytesMut::new();
        let major = server_major(&self.parameters);
        // The recursive part makes the planner guess millions of rows, and past its cost
        // threshold it compiles the plan (JIT): about a second per login instead of tens of
        // milliseconds. Off until the Sync ends the lookup's transaction, so the client's
        // session keeps its own setting (PostgreSQL 11 and later have it).
        let jit_off = major.is_none_or(|v| v >= 11);
        if jit_off {
            frontend::parse("", "SELECT pg_catalog.set_config('jit', 'off', true)", std::iter::empty(), &mut out)
                .map_err(io)?;
            let no_value = |_: &str, _: &mut BytesMut| Ok(postgres_protocol::IsNull::Yes);
            let none = std::iter::empty::<i16>;
            frontend::bind("", "", none(), std::iter::empty::<&str>(), no_value, none(), &mut out).map_err(
                |e| match e {
                    frontend::BindError::Conversion(e) => UpstreamError::Refused(e.to_string()),
                    frontend::BindError::Serialization(e) => io(e),
                },
            )?;
            frontend::execute("", 0, &mut out).map_err(io)?;
        }
        frontend::parse("", &origins_query(likes.len(), major.is_none_or(|v| v >= 14)), std::iter::empty(), &mut out)
            .map_err(io)?;
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut out,
        )
        .map_err(|e| match e {
            frontend::BindError::Conversion(e) => UpstreamError::Refused(e.to_string()),
            frontend::BindError::Serialization(e) => io(e),
        })?;
        frontend::execute("", 0, &mut out).map_err(io)?;
        // The unnamed statement goes, so a client's Bind of it fails as it would have.
        frontend::close(b'S', "", &mut out).map_err(io)?;
        frontend::sync(&mut out);
        self.stream.write_all(&out).await.map_err(io)?;

        let mut origins = Origins::new();
        // Every table read, masked or not (the pre-filter is wider than the rules).
        let mut read: HashMap<String, Read> = HashMap::new();
        let (mut rows, mut columns) = (0usize, 0usize);
        // The row `set_config` answers, before its CommandComplete.
        let mut preamble = jit_off;
        let mut failed = None;
        loop {
            let f = next_frame(&mut self.stream, &mut self.leftover, addr).await?;
            match f.tag {
                b'D' if preamble => {}
                b'C' if preamble => preamble = false,
                b'D' if failed.is_none() => {
                    // A column comes once per field its type holds.
                    rows += 1;
                    if rows > MAX_ORIGIN_ROWS {
                        failed = Some(format!("the masked columns lookup returned more than {MAX_ORIGIN_ROWS} rows"));
                        continue;
                    }
                    let (oid, attnum, name, table, held) = origin_row(&f.body)?;
                    let table = read.entry(table.to_lowercase()).or_default();
                    // A value holding a masked field is masked whole, as `[REDACTED]`, whatever
                    // its own name's rule says: the other styles would show part of the field
                    // (`partial` the last four characters of the literal) or hash text that is
                    // not the field's. The strictest style wins, whatever order rows come in.
                    let mask = match (held, masker.column(&name)) {
                        (Some(field), _) if matches!(masker.column(&field), ColumnMask::Whole(_)) => {
                            table.holding.insert(name.to_lowercase());
                            Some(Style::Redact)
                        }
                        (_, ColumnMask::Whole(style)) => Some(style),
                        _ => None,
                    };
                    if let Some(style) = mask {
                        if table.strictest.is_none_or(|s| style.strictness() > s.strictness()) {
                            table.strictest = Some(style);
                        }
                        let kept = origins.entry((oid, attnum)).or_insert(style);
                        if style.strictness() > kept.strictness() {
                            *kept = style;
                        }
                    }
                    if table.columns.entry(oid).or_default().insert(name.to_lowercase()) {
                        columns += 1;
                        if columns > MAX_ORIGINS {
                            failed =
                                Some(format!("the tables with masked columns have more than {MAX_ORIGINS} columns"));
                        }
                    }
                }
                b'E' => failed = Some(wire::error_message(&f.body).unwrap_or_else(|| "unknown error".into())),
                b'S' => self.parameters.push(f),
                b'Z' => break,
                // ParseComplete, BindComplete, CommandComplete, CloseComplete, notices.
                _ => {}
            }
        }
        let tables: MaskedTables =
            read.into_iter().filter_map(|(name, read)| Some((name, read.into_table()?))).collect();
        match failed {
            Some(e) => Err(UpstreamError::Lookup(e)),
            None => Ok((origins, tables)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_of_one_name_in_two_schemas_have_the_columns_both_have() {
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<HashSet<String>>();
        let read = Read {
            strictest: Some(Style::Partial),
            holding: set(&["who"]),
            columns: [(16384, set(&["id", "who", "to_json"])), (16390, set(&["id", "email"]))].into(),
        };
        let table = read.into_table().expect("a masked column");
        // `f.to_json` may be `to_json(f)` of the table that has no such column.
        assert_eq!((table.style, table.columns, table.holding), (Style::Partial, set(&["id"]), set(&["who"])));
        assert!(Read { columns: [(16384, set(&["id"]))].into(), ..Default::default() }.into_table().is_none());
    }

    #[test]
    fn the_server_version_decides_whether_the_lookup_follows_multiranges() {
        let status = |name: &str, value: &str| Frame { tag: b'S', body: format!("{name}\0{value}\0").into() };
        let major = |ps: &[Frame]| server_major(ps);
        assert_eq!(
            major(&[status("TimeZone", "UTC"), status("server_version", "15.18 (Debian 15.18-0+deb12u1)")]),
            Some(15)
        );
        assert_eq!(major(&[status("server_version", "9.6.24")]), Some(9));
        assert_eq!(major(&[status("server_version", "devel")]), None);
        assert_eq!(major(&[]), None);
        assert!(origins_query(1, true).contains("rngmultitypid") && !origins_query(1, false).contains("rngmultitypid"));
        assert!(origins_query(2, false).contains("ARRAY[$2, $3]"));
    }
    use tokio::net::{TcpListener, TcpStream};

    /// An `R` (authentication) message with `code` and `rest`.
    fn auth(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(((8 + rest.len()) as i32).to_be_bytes());
        m.extend(code.to_be_bytes());
        m.extend(rest);
        m
    }

    /// Reads one frontend message (the startup message has no tag) and returns its body.
    async fn read_message(s: &mut TcpStream, tagged: bool) -> Vec<u8> {
        if tagged {
            s.read_u8().await.expect("tag");
        }
        let len = s.read_i32().await.expect("length") as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.expect("body");
        body
    }

    /// A server that no real PostgreSQL is (none can be made to do this): it answers the
    /// startup with `first`, reads the client's reply, then sends `then`. The login's result,
    /// and everything the proxy sent after its first reply.
    async fn against(first: Vec<u8>, then: Vec<u8>) -> (Result<(), String>, Vec<u8>) {
        against_with(first, Some(then), every_method()).await
    }

    /// `against`, with the methods the resource allows; without `then`, the server reads
    /// nothing in between and the result is everything the proxy sent after the startup.
    async fn against_with(
        first: Vec<u8>,
        then: Option<Vec<u8>>,
        allowed: AuthMethods,
    ) -> (Result<(), String>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_message(&mut s, false).await;
            s.write_all(&first).await.unwrap();
            if let Some(then) = then {
                read_message(&mut s, true).await;
                s.write_all(&then).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            rest
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        // Dropping the connection (with the result) lets the server read to its end. A proxy
        // that answered (and now waits for more) is cut off after a second.
        let login = login(Conn::Plain(tcp), addr, "app", "s3cret-pw", &[], allowed, false);
        let result = match crate::timer::timeout(std::time::Duration::from_secs(1), login).await {
            Ok(r) => r.map(drop).map_err(|e| e.to_string()),
            Err(_) => Err("no verdict within a second".to_string()),
        };
        (result, server.await.unwrap())
    }

    const READY: &[u8] = b"Z\0\0\0\x05I";

    #[tokio::test]
    async fn a_server_that_starts_scram_must_prove_it_knows_the_password() {
        let sasl = auth(10, b"SCRAM-SHA-256\0\0");
        let (result, _) = against(sasl.clone(), [auth(0, b""), READY.to_vec()].concat()).await;
        assert!(result.as_ref().is_err_and(|e| e.contains("without proving")), "{result:?}");
        // Nor skip it: ReadyForQuery (after a BackendKeyData) with no AuthenticationOk at all.
        let key = [b'K'.to_be_bytes().to_vec(), 12i32.to_be_bytes().to_vec(), vec![0; 8]].concat();
        let plus = auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        for offer in [sasl.clone(), plus] {
            let (result, _) = against(offer, [key.clone(), READY.to_vec()].concat()).await;
            assert!(result.as_ref().is_err_and(|e| e.contains("declared the login done")), "{result:?}");
        }
        // Nor may it switch to a method that gives it the password or a replayable hash.
        for code in [3, 5] {
            let (result, sent) = against(sasl.clone(), auth(code, b"salt")).await;
            assert!(result.as_ref().is_err_and(|e| e.contains("another method")), "{code}: {result:?}");
            assert!(sent.is_empty(), "{code}: nothing more was sent: {sent:?}");
        }
    }

    #[tokio::test]
    async fn cleartext_is_answered_when_the_server_asks_for_it_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_message(&mut s, false).await;
            s.write_all(&auth(3, b"")).await.unwrap();
            let password = read_message(&mut s, true).await;
            s.write_all(&[auth(0, b""), READY.to_vec()].concat()).await.unwrap();
            password
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let up = login(Conn::Plain(tcp), addr, "app", "s3cret-pw", &[], every_method(), false).await;
        assert!(up.is_ok_and(|up| up.auth == AuthMethod::Password), "logged in with the password");
        assert_eq!(server.await.unwrap(), b"s3cret-pw\0");
    }

    fn every_method() -> AuthMethods {
        AuthMethods::of(&AuthMethod::ALL)
    }

    /// A server that asks for a method `credentials.auth` leaves out gets nothing: not the
    /// password, not a hash of it, not a statement after a login it did not check.
    #[tokio::test]
    async fn a_method_the_resource_does_not_allow_ends_the_login_before_anything_is_sent() {
        let scram_only = AuthMethods::of(&[AuthMethod::ScramSha256]);
        for (first, want) in [
            (auth(3, b""), "the password in the clear"),
            (auth(5, b"salt"), "md5"),
            ([auth(0, b""), READY.to_vec()].concat(), "no authentication"),
        ] {
            let (result, sent) = against_with(first, None, scram_only).await;
            let e = result.unwrap_err();
            assert!(e.contains(want) && e.contains("it allows scram-sha-256"), "{e}");
            assert!(sent.is_empty(), "{want}: nothing was sent");
        }
    }

    /// Over TLS, SCRAM is bound to the server's certificate (`p=tls-server-end-point`) when
    /// the server offers SCRAM-SHA-256-PLUS, and says it could have been (`y`) when not: under
    /// `verify-full`, where the certificate shows who the server is; under `require`, a server
    /// that offers no binding is refused.
    #[tokio::test]
    async fn scram_over_tls_binds_itself_to_the_servers_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let authority = crate::tls::Authority::load_or_create(dir.path()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(authority.server_config(&resource()).unwrap());
        for (offer, want, unverified) in [
            (&b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"[..], &b"SCRAM-SHA-256-PLUS\0"[..], true),
            (b"SCRAM-SHA-256\0\0", b"SCRAM-SHA-256\0", false),
        ] {
            let (result, initial) = scram_over_tls(acceptor.clone(), offer, unverified).await;
            assert!(result.is_err(), "the test server stops after the first message");
            assert!(initial.starts_with(want), "{:?}", String::from_utf8_lossy(&initial));
            // After the mechanism: the length of the client-first message, then its GS2 header.
            let first = &initial[want.len() + 4..];
            if want.starts_with(b"SCRAM-SHA-256-PLUS") {
                assert!(first.starts_with(b"p=tls-server-end-point,,"), "{:?}", String::from_utf8_lossy(first));
            } else {
                assert!(first.starts_with(b"y,,"), "{:?}", String::from_utf8_lossy(first));
            }
        }
        // A certificate signed with Ed25519 names no hash to bind with: under `tls: require`
        // (no certificate check), such a relay could not be told from the server.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let (result, initial) =
            scram_over_tls(std::sync::Arc::new(config).into(), b"SCRAM-SHA-256-PLUS\0\0", true).await;
        assert!(result.is_err_and(|e| e.contains("names no hash to bind")), "refused");
        assert!(initial.is_empty(), "nothing of the password was sent");
        // Under `require`, a server that offers no binding may be a relay that reaches the
        // server in clear, where it is not offered.
        let (result, initial) = scram_over_tls(acceptor, b"SCRAM-SHA-256\0\0", true).await;
        assert!(result.is_err_and(|e| e.contains("without channel binding")), "refused");
        assert!(initial.is_empty(), "nothing of the password was sent");
    }

    fn resource() -> crate::policy::Resource {
        crate::policy::Resource {
            name: "db".into(),
            protocol: crate::policy::Protocol::Postgres,
            address: crate::policy::ResourceAddress::parse("127.0.0.1:5432").unwrap(),
            credentials: None,
            tls: Default::default(),
            databases: None,
        }
    }

    /// A TLS server that offers `mechanisms` for SASL (`unverified`: as under `tls: require`,
    /// else as under `verify-full`): the
    /// login's result and the proxy's SASLInitialResponse body (empty if it sent none).
    async fn scram_over_tls(
        acceptor: tokio_rustls::TlsAcceptor,
        mechanisms: &'static [u8],
        unverified: bool,
    ) -> (Result<(), String>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let authority = crate::tls::Authority::load_or_create(dir.path()).unwrap();
        let config = authority.client_config(&crate::policy::UpstreamTls::Require).unwrap().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.read_exact(&mut [0u8; 8]).await.unwrap();
            s.write_all(b"S").await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            let len = tls.read_u32().await.unwrap() as usize;
            tls.read_exact(&mut vec![0; len - 4]).await.unwrap();
            tls.write_all(&auth(10, mechanisms)).await.unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            rest.get(5..).map(<[u8]>::to_vec).unwrap_or_default()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = crate::tls::server_name(&resource().address).unwrap();
        let stream = start_tls(tcp, addr, config, name).await.unwrap();
        let login = login(stream, addr, "app", "s3cret-pw", &[], every_method(), unverified);
        let result = match crate::timer::timeout(std::time::Duration::from_secs(1), login).await {
            Ok(r) => r.map(drop).map_err(|e| e.to_string()),
            Err(_) => Err("no verdict within a second".to_string()),
        };
        (result, server.await.unwrap())
    }

    /// A cancel is sent as the session's connection was: after SSLRequest and a TLS handshake
    /// (checked against the agent's own CA here) when encrypted, in clear otherwise.
    #[tokio::test]
    async fn a_cancel_is_encrypted_when_the_session_was() {
        let dir = tempfile::tempdir().unwrap();
        let authority = crate::tls::Authority::load_or_create(dir.path()).unwrap();
        let resource = resource();
        let acceptor = tokio_rustls::TlsAcceptor::from(authority.server_config(&resource).unwrap());
        let verify = crate::policy::UpstreamTls::VerifyFull { ca_file: authority.ca_file.clone() };
        let config = authority.client_config(&verify).unwrap().unwrap();
        let name = crate::tls::server_name(&resource.address).unwrap();
        let mut want = BytesMut::new();
        frontend::cancel_request(42, 7, &mut want);
        for encrypted in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = acceptor.clone();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut first = [0u8; 8];
                s.read_exact(&mut first).await.unwrap();
                let mut rest = Vec::new();
                if first[4..] == 80877103i32.to_be_bytes() {
                    s.write_all(b"S").await.unwrap();
                    let mut tls = acceptor.accept(s).await.unwrap();
                    tls.read_to_end(&mut rest).await.unwrap();
                    (true, rest)
                } else {
                    s.read_to_end(&mut rest).await.unwrap();
                    (false, [&first[..], &rest].concat())
                }
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let encryption = encrypted.then(|| (config.clone(), name.clone()));
            cancel(tcp, addr, encryption, 42, 7).await.unwrap();
            assert_eq!(server.await.unwrap(), (encrypted, want.to_vec()));
        }
    }
}
