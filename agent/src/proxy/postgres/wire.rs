//! PostgreSQL v3 wire framing: startup packets, typed frames, and the few messages the proxy
//! builds itself. Pure: parsing works on byte slices, so it is fuzzed directly.
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest message accepted from a client or server (COPY rows, big queries). PostgreSQL's own
/// limit is 1 GiB; a proxy that buffers must bound it lower.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Largest startup packet (PostgreSQL uses 10,000 bytes).
pub const MAX_STARTUP: usize = 10_000;

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
pub const PROTOCOL_3: i32 = 196_608;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message length {0} is invalid")]
    BadLength(i64),
    #[error("message of {0} bytes is larger than the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("malformed {what} message: {detail}")]
    Malformed { what: &'static str, detail: &'static str },
    #[error("unsupported protocol version {0}.{1}")]
    Version(i32, i32),
}

/// The first packet of a client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol 3.`minor`; `params` without the `_pq_.` protocol options, which are in `options`.
    Startup {
        params: Vec<(String, String)>,
        minor: u16,
        options: Vec<String>,
    },
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Length prefix of a startup packet (first 4 bytes), validated.
pub fn startup_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = i32::from_be_bytes(header) as i64;
    if !(8..=MAX_STARTUP as i64).contains(&len) {
        return Err(if len > MAX_STARTUP as i64 {
            WireError::TooLarge(len as usize, MAX_STARTUP)
        } else {
            WireError::BadLength(len)
        });
    }
    Ok(len as usize)
}

/// Parses a startup packet body (after the length).
pub fn parse_startup(body: &[u8]) -> Result<Startup, WireError> {
    let bad = |detail| WireError::Malformed { what: "startup", detail };
    if body.len() < 4 {
        return Err(bad("too short"));
    }
    let code = i32::from_be_bytes(body[..4].try_into().unwrap());
    let rest = &body[4..];
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST => {
            if rest.len() != 8 {
                return Err(bad("cancel request must carry pid and key"));
            }
            Ok(Startup::Cancel {
                pid: i32::from_be_bytes(rest[..4].try_into().unwrap()),
                key: i32::from_be_bytes(rest[4..8].try_into().unwrap()),
            })
        }
        // Any 3.x: the proxy answers a newer minor version with NegotiateProtocolVersion, as a
        // server does, and speaks 3.0.
        v if v >> 16 == 3 => {
            if rest.last() != Some(&0) {
                return Err(bad("unterminated parameter list"));
            }
            let mut params = Vec::new();
            let mut fields = rest.split(|&b| b == 0);
            loop {
                let key = fields.next().ok_or(bad("unterminated parameter list"))?;
                if key.is_empty() {
                    break;
                }
                let value = fields.next().ok_or(bad("parameter without value"))?;
                let s = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad("parameter is not UTF-8"));
                params.push((s(key)?, s(value)?));
            }
            let (options, params): (Vec<_>, Vec<_>) = params.into_iter().partition(|(k, _)| k.starts_with("_pq_."));
            let options = options.into_iter().map(|(k, _)| k).collect();
            Ok(Startup::Startup { params, minor: (v & 0xffff) as u16, options })
        }
        v => Err(WireError::Version(v >> 16, v & 0xffff)),
    }
}

/// One tagged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The body, without tag and length.
    pub body: Bytes,
}

impl Frame {
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_header(out);
        out.extend_from_slice(&self.body);
    }

    /// The tag and length alone, for a body written from where it is.
    pub fn encode_header(&self, out: &mut BytesMut) {
        out.put_u8(self.tag);
        out.put_i32(self.body.len() as i32 + 4);
    }
}

/// The tag and whole length (tag and length field included) of the frame at the front of
/// `buf`, if a whole one is there.
pub fn peek(buf: &[u8]) -> Result<Option<(u8, usize)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as i64;
    if len < 4 {
        return Err(WireError::BadLength(len));
    }
    let len = len as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len, MAX_MESSAGE));
    }
    if buf.len() < 1 + len {
        return Ok(None);
    }
    Ok(Some((buf[0], 1 + len)))
}

/// The bytes the frame at the front of `buf` takes whole, by its declared length: what a
/// reader holds once it is in (`buf.len()` while the length itself is not; `peek` judges it).
pub fn declared(buf: &[u8]) -> usize {
    let declared = buf.get(1..5).map_or(0, |len| i32::from_be_bytes(len.try_into().unwrap()).max(0) as usize + 1);
    declared.max(buf.len())
}

/// Splits one frame off the front of `buf` if a whole one is there.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    let Some((tag, len)) = peek(buf)? else { return Ok(None) };
    // One split, not two: each costs a reference count on the shared buffer.
    buf.advance(5);
    let body = buf.split_to(len - 5).freeze();
    Ok(Some(Frame { tag, body }))
}

fn cstr<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), WireError> {
    let end = b.iter().position(|&c| c == 0).ok_or(WireError::Malformed { what, detail: "unterminated string" })?;
    utf8(b, end, what)
}

/// `cstr` for SQL texts: a text may be 64 MiB, which a byte-at-a-time search takes 45 ms for,
/// while for the short strings of names memchr's set-up costs more than it saves.
fn text_cstr<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), WireError> {
    let end = memchr::memchr(0, b).ok_or(WireError::Malformed { what, detail: "unterminated string" })?;
    utf8(b, end, what)
}

fn utf8<'a>(b: &'a [u8], end: usize, what: &'static str) -> Result<(&'a str, &'a [u8]), WireError> {
    let s = std::str::from_utf8(&b[..end]).map_err(|_| WireError::Malformed { what, detail: "string is not UTF-8" })?;
    Ok((s, &b[end + 1..]))
}

/// The SQL text of a simple Query ('Q').
pub fn query_text(body: &[u8]) -> Result<&str, WireError> {
    Ok(text_cstr(body, "Query")?.0)
}

/// Statement name and SQL text of a Parse ('P').
pub fn parse_message(body: &[u8]) -> Result<(&str, &str), WireError> {
    let (name, rest) = cstr(body, "Parse")?;
    let (sql, _) = text_cstr(rest, "Parse")?;
    Ok((name, sql))
}

/// Statement name of a Parse ('P'), its SQL text (up to 64 MiB) left unread.
pub fn parse_name(body: &[u8]) -> Result<&str, WireError> {
    Ok(cstr(body, "Parse")?.0)
}

/// SQL text of a Parse ('P').
pub fn parse_text(body: &[u8]) -> Result<&str, WireError> {
    Ok(parse_message(body)?.1)
}

/// Portal and statement names of a Bind ('B').
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), WireError> {
    let (portal, rest) = cstr(body, "Bind")?;
    Ok((portal, cstr(rest, "Bind")?.0))
}

/// A Bind ('B') read as the server reads it (`exec_bind_message`): every count is an unsigned
/// 16-bit number, a parameter length is -1 (NULL) or at least 0, format codes are 0 or 1, and
/// nothing follows the result formats. Reading a count the server reads otherwise, or
/// stopping short of the end, would give the proxy other parameters and formats than the
/// server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Parameter format codes, two bytes each (none: all text; one: all the same).
    formats: &'a [u8],
    /// The parameters: `nparams` length-prefixed values.
    params: &'a [u8],
    nparams: usize,
    /// Result-column format codes, two bytes each.
    results: &'a [u8],
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, WireError> {
    let bad = |detail| WireError::Malformed { what: "Bind", detail };
    let (portal, rest) = cstr(body, "Bind")?;
    let (statement, mut rest) = cstr(rest, "Bind")?;
    let skip = |r: &mut &'_ [u8], n: usize| -> Result<(), WireError> {
        *r = r.get(n..).ok_or(bad("truncated"))?;
        Ok(())
    };
    let count = |r: &mut &[u8]| -> Result<usize, WireError> {
        let b = r.get(..2).ok_or(bad("truncated"))?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        *r = &r[2..];
        Ok(n)
    };
    let codes = |r: &mut &'_ [u8]| -> Result<(), WireError> {
        let n = count(r)?;
        let c = r.get(..2 * n).ok_or(bad("truncated"))?;
        if c.chunks_exact(2).any(|f| f != [0, 0] && f != [0, 1]) {
            return Err(bad("a format code other than 0 (text) or 1 (binary)"));
        }
        *r = &r[2 * n..];
        Ok(())
    };
    let formats_at = rest;
    codes(&mut rest)?;
    let formats = &formats_at[2..formats_at.len() - rest.len()];
    let nparams = count(&mut rest)?;
    if formats.len() > 2 && formats.len() != 2 * nparams {
        return Err(bad("parameter format codes do not match the parameters"));
    }
    let params_at = rest;
    for _ in 0..nparams {
        let h = rest.get(..4).ok_or(bad("truncated"))?;
        let len = i32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        rest = &rest[4..];
        match len {
            -1 => {}
            len if len < 0 => return Err(bad("a negative parameter length")),
            len => skip(&mut rest, len as usize)?,
        }
    }
    let params = &params_at[..params_at.len() - rest.len()];
    let results_at = rest;
    codes(&mut rest)?;
    if !rest.is_empty() {
        return Err(bad("bytes after the result formats"));
    }
    let results = &results_at[2..];
    Ok(Bind { portal, statement, formats, params, nparams, results })
}

impl<'a> Bind<'a> {
    /// The parameter values, `None` for NULL, with whether each is in binary format.
    pub fn params(&self) -> impl Iterator<Item = (Option<&'a [u8]>, bool)> + '_ {
        let mut rest = self.params;
        (0..self.nparams).map(move |i| {
            // Lengths were checked by `bind`.
            let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            rest = &rest[4..];
            let value = (len >= 0).then(|| {
                let (v, t) = rest.split_at(len as usize);
                rest = t;
                v
            });
            let code = match self.formats.len() / 2 {
                0 => 0,
                1 => self.formats[1],
                _ => self.formats[2 * i + 1],
            };
            (value, code == 1)
        })
    }

    /// The result-column format codes (none: all text; one: all the same).
    pub fn result_formats(&self) -> Vec<i16> {
        self.results.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }
}

/// A Bind's parameter values as an approver reads them: text as is, binary as `\x` hex.
pub fn bind_parameters(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    Ok(bind(body)?
        .params()
        .map(|(value, binary)| {
            value.map(|v| match (binary, std::str::from_utf8(v)) {
                (false, Ok(s)) => s.to_string(),
                _ => format!("\\x{}", hex::encode(v)),
            })
        })
        .collect())
}

/// What a Describe ('D') asks about: `b'S'` statement or `b'P'` portal, and its name.
pub fn describe_target(body: &[u8]) -> Result<(u8, &str), WireError> {
    let (&kind, rest) = body.split_first().ok_or(WireError::Malformed { what: "Describe", detail: "empty" })?;
    Ok((kind, cstr(rest, "Describe")?.0))
}

/// The portal an Execute ('E') runs.
pub fn execute_portal(body: &[u8]) -> Result<&str, WireError> {
    Ok(cstr(body, "Execute")?.0)
}

/// A Describe of a portal, as the proxy sends it to learn a result's columns.
pub fn describe_portal(portal: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(b'P');
    b.extend_from_slice(portal.as_bytes());
    b.put_u8(0);
    frame(b'D', b)
}

/// A Parse of `text` as statement `name`, with no parameter types.
pub fn parse(name: &str, text: &str) -> Frame {
    let mut b = BytesMut::new();
    b.extend_from_slice(name.as_bytes());
    b.put_u8(0);
    b.extend_from_slice(text.as_bytes());
    b.put_u8(0);
    b.put_i16(0);
    frame(b'P', b)
}

pub fn flush() -> Frame {
    frame(b'H', BytesMut::new())
}

pub fn sync() -> Frame {
    frame(b'S', BytesMut::new())
}

/// ReadyForQuery's transaction status byte.
pub fn ready_status(body: &[u8]) -> Result<u8, WireError> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(WireError::Malformed { what: "ReadyForQuery", detail: "bad status" }),
    }
}

/// Process id and secret key of BackendKeyData ('K').
pub fn backend_key(body: &[u8]) -> Result<(i32, i32), WireError> {
    if body.len() != 8 {
        return Err(WireError::Malformed { what: "BackendKeyData", detail: "length" });
    }
    Ok((i32::from_be_bytes(body[..4].try_into().unwrap()), i32::from_be_bytes(body[4..].try_into().unwrap())))
}

fn frame(tag: u8, body: BytesMut) -> Frame {
    Frame { tag, body: body.freeze() }
}

pub fn auth_ok() -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(0);
    frame(b'R', b)
}

/// NegotiateProtocolVersion: the newest version the proxy speaks (3.0, as the whole protocol
/// number, as the server sends it), and the protocol options it does not know (all of them).
pub fn negotiate_protocol_version(options: &[String]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(PROTOCOL_3);
    b.put_i32(options.len() as i32);
    for o in options {
        b.extend_from_slice(o.as_bytes());
        b.put_u8(0);
    }
    frame(b'v', b)
}

pub fn backend_key_data(pid: i32, key: i32) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    b.put_i32(key);
    frame(b'K', b)
}

pub fn ready_for_query(status: u8) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(status);
    frame(b'Z', b)
}

/// ErrorResponse with severity, SQLSTATE, message and optional detail/hint.
pub fn error_response(code: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> Frame {
    response("ERROR", code, message, detail, hint)
}

/// An ErrorResponse after which the session ends, with severity FATAL as PostgreSQL sends it
/// for such errors (clients then know not to retry on the same connection).
pub fn fatal_response(code: &str, message: &str) -> Frame {
    response("FATAL", code, message, None, None)
}

fn response(severity: &str, code: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> Frame {
    let mut b = BytesMut::new();
    let mut field = |t: u8, v: &str| {
        b.put_u8(t);
        // NUL ends a field; one inside a value would cut it short.
        b.extend_from_slice(v.replace('\0', " ").as_bytes());
        b.put_u8(0);
    };
    field(b'S', severity);
    field(b'V', severity);
    field(b'C', code);
    field(b'M', message);
    if let Some(d) = detail {
        field(b'D', d);
    }
    if let Some(h) = hint {
        field(b'H', h);
    }
    b.put_u8(0);
    frame(b'E', b)
}

/// The 'M' (message) field of an ErrorResponse, for logs and audit.
pub fn error_message(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let [t, tail @ ..] = rest {
        if *t == 0 {
            break;
        }
        let (v, next) = cstr(tail, "ErrorResponse").ok()?;
        if *t == b'M' {
            return Some(v.to_string());
        }
        rest = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_packets() {
        let mut body = PROTOCOL_3.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bot\0database\0orders\0\0");
        let s = parse_startup(&body).unwrap();
        assert_eq!(s.param("database"), Some("orders"));
        assert_eq!(parse_startup(&SSL_REQUEST.to_be_bytes()).unwrap(), Startup::Ssl);
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(parse_startup(&c).unwrap(), Startup::Cancel { pid: 7, key: 9 });
        assert!(parse_startup(&PROTOCOL_3.to_be_bytes()).is_err(), "missing terminator");
        assert!(matches!(parse_startup(&131072i32.to_be_bytes()), Err(WireError::Version(2, 0))));
        assert!(matches!(parse_startup(&(4i32 << 16).to_be_bytes()), Err(WireError::Version(4, 0))));
        // A newer 3.x, with protocol options: read, to be answered with 3.0.
        let mut body = (PROTOCOL_3 + 2).to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bot\0_pq_.x\0on\0\0");
        let want =
            Startup::Startup { params: vec![("user".into(), "bot".into())], minor: 2, options: vec!["_pq_.x".into()] };
        assert_eq!(parse_startup(&body).unwrap(), want);
        assert_eq!(&negotiate_protocol_version(&["_pq_.x".into()]).body[..], b"\0\x03\0\0\0\0\0\x01_pq_.x\0");
        assert!(startup_len(100_000i32.to_be_bytes()).is_err());
        assert!(startup_len(3i32.to_be_bytes()).is_err());
    }

    #[test]
    fn session_ending_errors_are_fatal() {
        let f = fatal_response("08P01", "bad");
        assert_eq!(&f.body[..], b"SFATAL\0VFATAL\0C08P01\0Mbad\0\0");
        assert_eq!(&error_response("42501", "no", None, None).body[..2], b"SE");
    }

    #[test]
    fn a_frame_in_progress_counts_by_its_declared_length() {
        assert_eq!(declared(b""), 0);
        assert_eq!(declared(b"Q\0\0"), 3, "length not in yet: what is there");
        assert_eq!(declared(b"Q\x00\x28\x00\x04abc"), (40 << 16) + 5);
        assert_eq!(declared(b"Q\xff\xff\xff\xff"), 5, "an invalid length is peek's to refuse");
        assert_eq!(declared(b"Q\x00\x00\x00\x04Z\x00"), 7, "never less than what is held");
    }

    #[test]
    fn frames_split_and_bound() {
        let mut buf = BytesMut::new();
        error_response("42501", "denied", Some("d"), None).encode(&mut buf);
        ready_for_query(b'I').encode(&mut buf);
        buf.extend_from_slice(&[b'Q', 0, 0]);
        let e = decode(&mut buf).unwrap().unwrap();
        assert_eq!(e.tag, b'E');
        assert_eq!(error_message(&e.body).as_deref(), Some("denied"));
        let z = decode(&mut buf).unwrap().unwrap();
        assert_eq!(ready_status(&z.body), Ok(b'I'));
        assert_eq!(decode(&mut buf), Ok(None), "partial header waits");
        let mut bad = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert_eq!(decode(&mut bad), Err(WireError::BadLength(2)));
        let mut huge = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut huge), Err(WireError::TooLarge(..))));
    }

    #[test]
    fn query_and_parse_bodies() {
        assert_eq!(query_text(b"SELECT 1\0"), Ok("SELECT 1"));
        assert!(query_text(b"SELECT 1").is_err());
        // Texts end where their NUL is, at any length.
        for len in [0, 1, 31, 32, 33, 100] {
            let text = "x".repeat(len);
            assert_eq!(query_text(format!("{text}\0tail").as_bytes()), Ok(text.as_str()));
            assert!(query_text(text.as_bytes()).is_err(), "{len}");
        }
        assert_eq!(parse_message(b"s1\0SELECT $1\0\0\0"), Ok(("s1", "SELECT $1")));
        assert!(parse_message(b"s1\0").is_err());
        assert_eq!(
            (parse_name(b"s1\0SELECT $1\0\0\0"), parse_text(b"s1\0SELECT $1\0\0\0")),
            (Ok("s1"), Ok("SELECT $1"))
        );
        assert!(parse_name(b"s1").is_err() && parse_text(b"s1\0").is_err());
        assert_eq!(backend_key(&[0, 0, 0, 1, 0, 0, 0, 2]), Ok((1, 2)));
        assert_eq!(bind_names(b"\0s1\0\0\0"), Ok(("", "s1")));
        assert_eq!(bind_names(b"p\0s1\0\0\0"), Ok(("p", "s1")));
        let two = b"\0s\0\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\0";
        assert_eq!(bind_parameters(two), Ok(vec![Some("42".into()), None]));
        assert!(bind_parameters(b"\0s\0\0\0\0\x01\0\0\0\x09ab").is_err());
        assert_eq!(bind(two).map(|b| b.result_formats()), Ok(vec![]));
        assert_eq!(bind(b"\0s\0\0\0\0\0\0\x02\0\x01\0\0").map(|b| b.result_formats()), Ok(vec![1, 0]));
        assert!(bind(b"\0s\0\0\0\0\0\0\x02\0\x01").is_err());
        // Binary parameters, one format for all.
        assert_eq!(bind_parameters(b"\0s\0\0\x01\0\x01\0\x01\0\0\0\x02\x01\x02\0\0"), Ok(vec![Some("\\x0102".into())]));
    }

    /// Counts are unsigned, as the server reads them: 32,768 parameters are not 0 (which would
    /// let the rest of the message pass for other parameters and formats).
    #[test]
    fn bind_counts_and_ends_as_the_server_reads_them() {
        let mut b = b"\0s\0".to_vec();
        b.extend([0, 0, 0x80, 0]);
        for i in 0..0x8000 {
            if i == 0 {
                b.extend([0, 0, 0, 2, b'4', b'8']);
            } else {
                b.extend((-1i32).to_be_bytes());
            }
        }
        b.extend([0, 1, 0, 1]);
        let params = bind_parameters(&b).unwrap();
        assert_eq!(params.len(), 0x8000);
        assert_eq!(params[0].as_deref(), Some("48"));
        assert_eq!(bind(&b).map(|b| b.result_formats()), Ok(vec![1]));
        // Whatever follows the result formats, the server refuses the message; so does the proxy.
        let mut trailing = b.clone();
        trailing.extend([0, 0]);
        assert!(bind(&trailing).is_err());
        for (body, why) in [
            (&b"\0s\0\0\0\0\x01\xff\xff\xff\xfe\0\0"[..], "a length below -1"),
            (b"\0s\0\0\x02\0\0\0\0\0\x01\xff\xff\xff\xff\0\0", "two format codes for one parameter"),
            (b"\0s\0\0\x01\0\x02\0\x01\xff\xff\xff\xff\0\0", "format code 2"),
            (b"\0s\0\0\0\0\0\0\x01\0\x03", "result format code 3"),
            (b"\0s\0\x80\0", "32,768 format codes that are not there"),
        ] {
            assert!(bind(body).is_err(), "{why}");
        }
        let ok = bind(b"p\0s\0\0\0\0\x01\xff\xff\xff\xff\0\0").unwrap();
        assert_eq!((ok.portal, ok.statement), ("p", "s"));
        assert_eq!(ok.params().collect::<Vec<_>>(), [(None, false)]);
        assert_eq!(describe_target(b"Pcur\0"), Ok((b'P', "cur")));
        assert_eq!(execute_portal(b"cur\0\0\0\0\0"), Ok("cur"));
        assert!(bind_names(b"p").is_err());
    }
}
