//! The audit record schema: one JSON object per line.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A connection attempt seen by the kernel hooks (allowed, redirected or denied).
    Connect,
    /// The proxy accepted a redirected connection and is about to dial upstream.
    SessionStart,
    /// A proxied session ended.
    SessionEnd,
    /// The proxy refused a connection (no kernel record, grant revoked, upstream down).
    SessionRejected,
    PolicyLoad,
    PolicyRejected,
    AgentStart,
    AgentStop,
    /// The kernel could not deliver some events (ring buffer full); `count` says how many.
    EventsDropped,
    /// The trail's tail was incomplete at start-up (crash mid-write) and was cut back.
    AuditRecovered,
    /// The live trail file reached its size and was moved aside as a segment; older segments
    /// may have been removed (`removed_through`).
    AuditRotated,
    /// A SQL statement (or extended-protocol batch member), judged before it is forwarded.
    Statement,
    /// What the server answered for forwarded statements (`refs` names their records).
    StatementResult,
    /// A held statement was decided: approved, denied, timed out or cancelled.
    Approval,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::SessionStart => "session_start",
            Kind::SessionEnd => "session_end",
            Kind::SessionRejected => "session_rejected",
            Kind::PolicyLoad => "policy_load",
            Kind::PolicyRejected => "policy_rejected",
            Kind::AgentStart => "agent_start",
            Kind::AgentStop => "agent_stop",
            Kind::EventsDropped => "events_dropped",
            Kind::AuditRecovered => "audit_recovered",
            Kind::AuditRotated => "audit_rotated",
            Kind::Statement => "statement",
            Kind::StatementResult => "statement_result",
            Kind::Approval => "approval",
        }
    }
}

/// What happened, without the chain fields (`seq`, `time`, `prev`, `hash`), which the writer adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    /// When the kernel saw it (connect records); `time` is when the record was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tgid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// What the enrolled process holds that lets it undo its own enforcement (`uid 0`: it may
    /// leave its cgroup; `CAP_NET_ADMIN`: it may set the proxy's socket mark; `CAP_SYS_ADMIN`,
    /// `CAP_BPF`: it may change the programs and their maps). Absent when it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileges: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The user the proxy logged in upstream as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// The statement's whole length in bytes, when `statement` is only its beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_bytes: Option<u64>,
    /// SHA-256 of the whole statement, when `statement` is only its beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_sha256: Option<String>,
    /// The tables and the functions the whole statement names, when `statement` is only its
    /// beginning (what it does may lie past the cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_tables: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_functions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_kinds: Option<Vec<String>>,
    /// Sequence numbers of the records this one completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refs: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_deny: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The just-in-time approval request a statement waited on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<u64>,
    /// The uid that decided an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<u32>,
    /// The approvals the statements of a result went through (`statement_result` records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Vec<Approved>>,
    /// Values masked in a result, by kind (never the values themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<std::collections::BTreeMap<String, u64>>,
    /// `audit_rotated`: the records up to this seq were removed from the host (the oldest
    /// segments, as `spec.audit.rotate.keep` asks). `audit verify` accepts a trail that starts
    /// after seq 1 only where such a record says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_through: Option<u64>,
}

impl Record {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            kernel_time: None,
            identity: None,
            pid: None,
            tgid: None,
            uid: None,
            gid: None,
            comm: None,
            exe: None,
            cgroup: None,
            privileges: None,
            destination: None,
            resource: None,
            l4: None,
            database: None,
            db_user: None,
            statement: None,
            statement_bytes: None,
            statement_sha256: None,
            statement_tables: None,
            statement_functions: None,
            statement_kinds: None,
            refs: None,
            hook: None,
            verdict: None,
            would_deny: None,
            rule: None,
            reason: None,
            cookie: None,
            session: None,
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            count: None,
            policy: None,
            detail: None,
            error: None,
            approval_id: None,
            approver: None,
            approvals: None,
            masked: None,
            removed_through: None,
        }
    }
}

/// An approval a forwarded statement went through: the request and the uid that approved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    pub approval_id: u64,
    pub approver: u32,
}

/// What a session's `statement_result` records share, serialised once per session.
#[derive(Debug)]
pub struct ResultBase {
    session: Option<u64>,
    /// `{"kind":"statement_result"` with `identity` and `resource`, as serde writes them.
    head: Vec<u8>,
}

impl ResultBase {
    pub fn new(identity: Option<String>, resource: Option<String>, session: Option<u64>) -> Self {
        let mut r = Record::new(Kind::StatementResult);
        r.identity = identity;
        r.resource = resource;
        let mut head = serde_json::to_vec(&r).expect("audit records always serialise");
        head.pop(); // the closing brace
        Self { session, head }
    }
}

/// A `statement_result` record: what the server answered for one sync point. The proxy writes
/// one per execution, so it is built without a `Record`'s allocations and serialised by hand,
/// to the same bytes serde gives for the equivalent `Record` (a unit test holds the two together).
#[derive(Debug)]
pub struct ResultRecord {
    pub base: std::sync::Arc<ResultBase>,
    pub refs: Refs,
    pub count: u64,
    pub duration_ms: u64,
    /// Commands the server completed (`detail`: "N commands").
    pub commands: u64,
    pub error: Option<String>,
    /// Approvals its statements went through; almost always none.
    pub approvals: Vec<Approved>,
    pub masked: Option<std::collections::BTreeMap<String, u64>>,
}

/// The `seq`s of the statement records a result refers to: almost always one or two, kept inline
/// (a result record follows every execution).
pub type Refs = smallvec::SmallVec<[u64; 2]>;

impl ResultRecord {
    /// Writes the record's JSON object, fields in `Record`'s order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // By hand, not with `write!`: one of these follows every executed statement.
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(&self.base.head);
        out.extend_from_slice(b",\"refs\":[");
        for (i, r) in self.refs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(n.format(*r).as_bytes());
        }
        out.push(b']');
        if let Some(s) = self.base.session {
            out.extend_from_slice(b",\"session\":");
            out.extend_from_slice(n.format(s).as_bytes());
        }
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(n.format(self.duration_ms).as_bytes());
        out.extend_from_slice(b",\"count\":");
        out.extend_from_slice(n.format(self.count).as_bytes());
        out.extend_from_slice(b",\"detail\":\"");
        out.extend_from_slice(n.format(self.commands).as_bytes());
        out.extend_from_slice(b" commands\"");
        if let Some(e) = &self.error {
            out.extend_from_slice(b",\"error\":");
            json_string(out, e);
        }
        if !self.approvals.is_empty() {
            out.extend_from_slice(b",\"approvals\":");
            let _ = serde_json::to_writer(&mut *out, &self.approvals);
        }
        if let Some(m) = &self.masked {
            out.extend_from_slice(b",\"masked\":");
            let _ = serde_json::to_writer(&mut *out, m);
        }
        out.push(b'}');
    }
}

/// Writes `s` as a JSON string, the bytes serde_json writes: most texts need no escape, and
/// are copied whole after a pass that checks so, eight bytes at a time.
pub fn json_string(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("a string always serialises");
    }
}

/// Whether `b` has a byte JSON escapes: a control character, `"` or `\`.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `v` is below `n` (n <= 128): its high bit survives (v - n) & !v.
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH != 0;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        if below(v, 0x20) || below(v ^ (ONES * u64::from(b'"')), 1) || below(v ^ (ONES * u64::from(b'\\')), 1) {
            return true;
        }
    }
    words.remainder().iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\')
}

/// What a session's `statement` records share, serialised once per session: the fields that
/// come before the statement's own in `Record`'s order, and those that come after them.
#[derive(Debug)]
pub struct StatementBase {
    /// `{"kind":"statement"` and the session's fields up to `db_user`.
    head: Vec<u8>,
    /// The session's fields from `reason` to `policy`, each with its leading comma.
    tail: Vec<u8>,
    /// The session would have been refused (monitor mode): so would each of its statements.
    would_deny: bool,
}

impl StatementBase {
    /// From the session's record: who, where, which session. Its verdict, rule and detail are
    /// the session's, not a statement's, and are left out.
    pub fn new(session: &Record) -> Self {
        let mut head = Record::new(Kind::Statement);
        head.kernel_time = session.kernel_time.clone();
        head.identity = session.identity.clone();
        head.pid = session.pid;
        head.tgid = session.tgid;
        head.uid = session.uid;
        head.gid = session.gid;
        head.comm = session.comm.clone();
        head.exe = session.exe.clone();
        head.cgroup = session.cgroup.clone();
        head.destination = session.destination.clone();
        head.resource = session.resource.clone();
        head.l4 = session.l4.clone();
        head.database = session.database.clone();
        head.db_user = session.db_user.clone();
        let mut tail = Record::new(Kind::Statement);
        tail.reason = session.reason.clone();
        tail.cookie = session.cookie;
        tail.session = session.session;
        tail.bytes_up = session.bytes_up;
        tail.bytes_down = session.bytes_down;
        tail.duration_ms = session.duration_ms;
        tail.count = session.count;
        tail.policy = session.policy.clone();
        let mut head = serde_json::to_vec(&head).expect("audit records always serialise");
        head.pop(); // the closing brace
        let tail = serde_json::to_vec(&tail).expect("audit records always serialise");
        let tail = tail[br#"{"kind":"statement""#.len()..tail.len() - 1].to_vec();
        Self { head, tail, would_deny: session.would_deny == Some(true) }
    }
}

/// A `statement` record: one per statement the proxy judges (each simple query, each Parse).
/// Built without a `Record`'s allocations and serialised by hand, to the same bytes serde gives
/// for the equivalent `Record` (a unit test holds the two together).
#[derive(Debug)]
pub struct StatementRecord {
    pub base: std::sync::Arc<StatementBase>,
    /// The statement text as audited (already cut to the audited length).
    pub statement: std::sync::Arc<str>,
    /// What the record says of a text too long to be audited whole.
    pub cut: Option<Box<Cut>>,
    pub kinds: smallvec::SmallVec<[&'static str; 2]>,
    pub verdict: &'static str,
    /// Monitor mode let through what the rules would refuse.
    pub would_deny: bool,
    pub rule: crate::policy::rules::RuleName,
    pub detail: Option<String>,
}

/// A statement text cut for the trail: its length and digest, and the names in all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub bytes: u64,
    pub sha256: String,
    pub tables: Vec<String>,
    pub functions: Vec<String>,
}

impl Cut {
    pub fn of<'a>(
        text: &str,
        tables: impl IntoIterator<Item = &'a String>,
        functions: impl IntoIterator<Item = &'a String>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        Cut {
            bytes: text.len() as u64,
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            tables: tables.into_iter().cloned().collect(),
            functions: functions.into_iter().cloned().collect(),
        }
    }
}

fn json_strings(out: &mut Vec<u8>, items: &[impl AsRef<str>]) {
    out.push(b'[');
    for (i, k) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(out, k.as_ref());
    }
    out.push(b']');
}

impl StatementRecord {
    /// Writes the record's JSON object, fields in `Record`'s order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.base.head);
        out.extend_from_slice(b",\"statement\":");
        json_string(out, &self.statement);
        if let Some(cut) = &self.cut {
            out.extend_from_slice(format!(",\"statement_bytes\":{},\"statement_sha256\":", cut.bytes).as_bytes());
            json_string(out, &cut.sha256);
            out.extend_from_slice(b",\"statement_tables\":");
            json_strings(out, &cut.tables);
            out.extend_from_slice(b",\"statement_functions\":");
            json_strings(out, &cut.functions);
        }
        out.extend_from_slice(b",\"statement_kinds\":");
        json_strings(out, &self.kinds);
        out.extend_from_slice(b",\"verdict\":");
        json_string(out, self.verdict);
        if self.would_deny || self.base.would_deny {
            out.extend_from_slice(b",\"would_deny\":true");
        }
        out.extend_from_slice(b",\"rule\":");
        json_string(out, &self.rule);
        out.extend_from_slice(&self.base.tail);
        if let Some(d) = &self.detail {
            out.extend_from_slice(b",\"detail\":");
            json_string(out, d);
        }
        out.push(b'}');
    }
}

/// A record as stored: chain fields plus the record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    pub prev: String,
    #[serde(flatten)]
    pub record: Record,
}

impl Entry {
    /// One human-readable line.
    pub fn display(&self) -> String {
        let r = &self.record;
        let mut s = format!("{:>6} {} {:<16}", self.seq, self.time, r.kind.as_str());
        // Values come from clients (a process's name, a server's error quoting what a client
        // wrote): escaped, and quoted where a space or `=` could fake another field.
        let mut field = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                let quote = v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '=' || c == '"');
                let v = if quote { format!("\"{}\"", printable(&v).replace('"', "\\\"")) } else { printable(&v) };
                s.push_str(&format!(" {name}={v}"));
            }
        };
        field("identity", r.identity.clone());
        field("pid", r.pid.map(|v| v.to_string()));
        field("uid", r.uid.map(|v| v.to_string()));
        field("comm", r.comm.clone());
        field("exe", r.exe.clone());
        field("privileges", r.privileges.as_ref().map(|p| p.join(",")));
        field("dst", r.destination.clone());
        field("resource", r.resource.clone());
        field("l4", r.l4.clone());
        field("db", r.database.clone());
        field("db_user", r.db_user.clone());
        field("kinds", r.statement_kinds.as_ref().map(|k| k.join(",")));
        field("sql", r.statement.clone());
        field("sql_bytes", r.statement_bytes.map(|n| n.to_string()));
        field("sql_sha256", r.statement_sha256.clone());
        field("sql_tables", r.statement_tables.as_ref().map(|t| t.join(",")));
        field("sql_functions", r.statement_functions.as_ref().map(|f| f.join(",")));
        field("refs", r.refs.as_ref().map(|v| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")));
        field("verdict", r.verdict.clone());
        field("would_deny", r.would_deny.map(|v| v.to_string()));
        field("rule", r.rule.clone());
        field("reason", r.reason.clone());
        field("session", r.session.map(|v| v.to_string()));
        field("up", r.bytes_up.map(|v| v.to_string()));
        field("down", r.bytes_down.map(|v| v.to_string()));
        field("ms", r.duration_ms.map(|v| v.to_string()));
        field("count", r.count.map(|v| v.to_string()));
        field("policy", r.policy.clone());
        field("detail", r.detail.clone());
        field("error", r.error.clone());
        field("approval", r.approval_id.map(|v| v.to_string()));
        field("approver", r.approver.map(|v| v.to_string()));
        field(
            "approved",
            r.approvals.as_ref().map(|a| {
                a.iter().map(|a| format!("{}:by-uid-{}", a.approval_id, a.approver)).collect::<Vec<_>>().join(",")
            }),
        );
        field(
            "masked",
            r.masked.as_ref().map(|m| m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",")),
        );
        field("removed_through", r.removed_through.map(|v| v.to_string()));
        s
    }
}

/// Text someone reads in a terminal (an approver, `audit tail`): control characters, and the invisible ones that
/// reorder or hide what follows them (bidirectional overrides, zero-width characters), escaped, and so the
/// backslash itself (a newline and the two characters `\n` must not look alike).
pub fn printable(s: &str) -> String {
    let invisible = |c: char| {
        matches!(c, '\u{AD}' | '\u{61C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}')
            || matches!(c, '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
            // Line and paragraph separators, variation selectors, tag characters.
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0000}'..='\u{E007F}')
            || matches!(c, '\u{E0100}'..='\u{E01EF}')
    };
    s.chars()
        .map(
            |c| {
                if c.is_control() || invisible(c) || c == '\\' { c.escape_default().to_string() } else { c.to_string() }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_found_at_every_position() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for len in 0..20 {
            for at in 0..len {
                for c in 0..=255u8 {
                    let mut b = vec![b'a'; len];
                    b[at] = c;
                    assert_eq!(needs_escape(&b), naive(&b), "{b:?}");
                    // Neighbours that borrow in the subtraction must not hide or fake one.
                    b.iter_mut().filter(|x| **x == b'a').for_each(|x| *x = 0xff);
                    assert_eq!(needs_escape(&b), naive(&b), "{b:?}");
                }
            }
        }
    }

    #[test]
    fn json_strings_are_what_serde_json_writes() {
        for s in ["", "plain text", "a \"quote\"", "back\\slash", "tab\tnew\nline", "\u{1}\u{1f}\u{7f}", "é ü 漢字 🦀"]
        {
            let mut ours = Vec::new();
            json_string(&mut ours, s);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    /// The `Record` serde would write for `o`, whose base was built from `identity` and
    /// "orders-db".
    fn as_record(o: &ResultRecord, identity: Option<&str>) -> Record {
        let mut r = Record::new(Kind::StatementResult);
        r.identity = identity.map(Into::into);
        r.resource = Some("orders-db".into());
        r.session = o.base.session;
        r.refs = Some(o.refs.to_vec());
        r.duration_ms = Some(o.duration_ms);
        r.count = Some(o.count);
        r.detail = Some(format!("{} commands", o.commands));
        r.error = o.error.clone();
        r.approvals = (!o.approvals.is_empty()).then(|| o.approvals.clone());
        r.masked = o.masked.clone();
        r
    }

    #[test]
    fn a_result_record_serialises_as_its_record_does() {
        let result = |identity: Option<&'static str>,
                      session,
                      refs: &[u64],
                      count,
                      commands,
                      error: Option<&str>,
                      masked,
                      approvals: &[Approved]| {
            let base = ResultBase::new(identity.map(Into::into), Some("orders-db".into()), session);
            let o = ResultRecord {
                base: std::sync::Arc::new(base),
                refs: refs.into(),
                count,
                duration_ms: count * 3,
                commands,
                error: error.map(Into::into),
                approvals: approvals.to_vec(),
                masked,
            };
            (o, identity)
        };
        let masked = Some([("email".to_string(), 2), ("column".to_string(), 1)].into());
        for (o, identity) in [
            result(Some("bot"), Some(7), &[3], 1, 1, None, None, &[]),
            result(None, None, &[], 0, 0, Some("relation \"x\" does not exist\n\u{1}é"), masked.clone(), &[]),
            result(Some("a\"b"), Some(1), &[1, 2, 30], 5, 2, None, None, &[]),
            result(
                Some("bot"),
                Some(2),
                &[4, 6],
                1,
                2,
                None,
                masked,
                &[Approved { approval_id: 3, approver: 0 }, Approved { approval_id: 5, approver: 1001 }],
            ),
        ] {
            let mut json = Vec::new();
            o.write_json(&mut json);
            assert_eq!(String::from_utf8(json).unwrap(), serde_json::to_string(&as_record(&o, identity)).unwrap());
        }
    }

    #[test]
    fn a_result_line_shows_its_approvals() {
        let mut record = Record::new(Kind::StatementResult);
        record.approvals =
            Some(vec![Approved { approval_id: 3, approver: 0 }, Approved { approval_id: 4, approver: 1001 }]);
        let e = Entry { seq: 9, time: "2026-11-27T00:00:00Z".into(), prev: String::new(), record };
        assert!(e.display().ends_with(" approved=3:by-uid-0,4:by-uid-1001"), "{}", e.display());
    }

    #[test]
    fn a_line_shows_privileges_and_what_a_cut_statement_names() {
        let mut record = Record::new(Kind::Statement);
        record.exe = Some("/usr/bin/psql".into());
        record.privileges = Some(vec!["uid 0".into(), "CAP_NET_ADMIN".into()]);
        record.statement_sha256 = Some("ab".repeat(32));
        record.statement_functions = Some(vec!["purge".into(), "count".into()]);
        let e = Entry { seq: 9, time: "2026-11-27T00:00:00Z".into(), prev: String::new(), record };
        let line = e.display();
        assert!(line.contains(r#" exe=/usr/bin/psql privileges="uid 0,CAP_NET_ADMIN""#), "{line}");
        assert!(line.contains(&format!(" sql_sha256={} sql_functions=purge,count", "ab".repeat(32))), "{line}");
    }

    #[test]
    fn a_statement_record_serialises_as_its_record_does() {
        let mut full = Record::new(Kind::SessionStart);
        full.identity = Some("planner-\"bot\"".into());
        full.pid = Some(42);
        full.tgid = Some(41);
        full.uid = Some(1000);
        full.gid = Some(1000);
        full.comm = Some("psql".into());
        full.exe = Some("/usr/bin/psql".into());
        full.cgroup = Some("/tollgate/planner".into());
        full.destination = Some("127.0.0.1:5432".into());
        full.resource = Some("orders-db".into());
        full.l4 = Some("tcp".into());
        full.database = Some("orders".into());
        full.db_user = Some("app".into());
        full.rule = Some("bot-orders".into());
        full.verdict = Some("allow".into());
        full.cookie = Some(7);
        full.session = Some(3);
        full.kernel_time = Some("2026-11-26T00:00:00Z".into());
        full.reason = Some("a reason".into());
        full.bytes_up = Some(1);
        full.bytes_down = Some(2);
        full.duration_ms = Some(3);
        full.count = Some(4);
        full.policy = Some("p".into());
        let mut monitored = Record::new(Kind::SessionStart);
        monitored.would_deny = Some(true);
        monitored.detail = Some("the session's own detail".into());
        for session in [full, monitored, Record::new(Kind::SessionStart)] {
            let base = std::sync::Arc::new(StatementBase::new(&session));
            let long = format!("SELECT 1 /* {} */, purge()", "a".repeat(100));
            let cut = Cut::of(&long, &["\"T\"".to_string()], &["purge".to_string(), "s.\"f\"".to_string()]);
            for (text, cut, kinds, verdict, would_deny, detail) in [
                ("SELECT 1", None, vec!["select"], "allow", false, None),
                (
                    "DELETE FROM t; DROP TABLE \"x\"\n\u{1}é…",
                    Some(cut),
                    vec!["delete", "ddl"],
                    "deny",
                    true,
                    Some("no \"ddl\""),
                ),
                ("", None, vec![], "approve", false, Some("")),
            ] {
                let o = StatementRecord {
                    base: base.clone(),
                    statement: text.into(),
                    cut: cut.clone().map(Box::new),
                    kinds: kinds.iter().copied().collect(),
                    verdict,
                    would_deny,
                    rule: "no-ddl".into(),
                    detail: detail.map(Into::into),
                };
                // The `Record` the proxy built before statement records had their own type.
                let mut r = session.clone();
                r.kind = Kind::Statement;
                r.statement = Some(text.into());
                if let Some(c) = &cut {
                    r.statement_bytes = Some(c.bytes);
                    r.statement_sha256 = Some(c.sha256.clone());
                    r.statement_tables = Some(c.tables.clone());
                    r.statement_functions = Some(c.functions.clone());
                }
                r.statement_kinds = Some(kinds.iter().map(|k| k.to_string()).collect());
                r.verdict = Some(verdict.into());
                r.rule = Some("no-ddl".into());
                r.detail = detail.map(Into::into);
                if would_deny {
                    r.would_deny = Some(true);
                }
                let mut json = Vec::new();
                o.write_json(&mut json);
                assert_eq!(String::from_utf8(json).unwrap(), serde_json::to_string(&r).unwrap());
            }
        }
    }
}
