//! Follows the server's answers to what was forwarded, so every DataRow, CopyData and notice is
//! masked with the plan of the result it belongs to. Pure: a state machine over frames.
use std::{collections::VecDeque, sync::Arc};

use bytes::BytesMut;
// See the `postgres` module: per-session maps keyed by the client's own names.
use foldhash::{HashMap, HashMapExt};

use super::{
    rows::{self, Plan},
    wire::{Frame, WireError},
};
use crate::{
    mask::{Counts, Masker},
    sql::{CopyFormat, CopyOut, Deallocates},
};

/// A forwarded client message that the server will answer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A Bind: once it completes, the portal's old plan is stale; a Describe of the portal
    /// (the client's, or one the proxy adds, see `ClientSide::announce_batch`) gives the new one.
    Bind {
        portal: String,
        /// The `COPY ... TO STDOUT` the statement is, as it stood at this Bind.
        copy: Option<CopyOut>,
        /// Whether the statement's computed result columns are redacted (`Masker::computed`).
        computed: bool,
        /// Cursors the statement declares or closes (`Classification::cursors`).
        cursors: Deallocates,
        /// It declares a WITH HOLD cursor (`Classification::hold_cursor`).
        hold: bool,
    },
    /// A Close of a statement (`b'S'`) or a portal (`b'P'`).
    Close {
        target: u8,
        name: String,
    },
    /// Its RowDescription is relayed, not kept: the server may analyse the statement again
    /// before a portal of it runs (README, "Masking").
    DescribeStatement,
    /// `hidden`: the proxy added it to learn the portal's row shape; its answer is dropped.
    DescribePortal {
        portal: String,
        hidden: bool,
    },
    Execute {
        portal: String,
        /// Every value is masked whole (`rows::write_data_row`): the portal's rows may not be
        /// what its plan was learned from (a FETCH or SQL EXECUTE portal resumed, or run in a
        /// later batch than its Bind).
        constant: bool,
    },
    Sync,
    /// A simple query; its `COPY ... TO STDOUT` statements in order.
    Query {
        copies: VecDeque<CopyOut>,
        computed: bool,
        cursors: Deallocates,
        hold: bool,
    },
}

#[cfg(test)]
impl Op {
    /// A Bind to the unnamed portal, with nothing else to tell.
    pub fn bind() -> Op {
        Op::Bind { portal: String::new(), copy: None, computed: false, cursors: Deallocates::None, hold: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("server sent {0} that the proxy cannot match to a request; refusing to relay unmasked data")]
    Unexpected(&'static str),
}

struct Copying {
    spec: CopyOut,
    plan: Plan,
    rows: u64,
}

/// Most portals a session's tracker keeps. A server drops portals at the end of their
/// transaction, and cursors (which are portals too) at a CLOSE in SQL the tracker may not
/// follow, so a client could otherwise make a session keep every one it ever had. Past this,
/// an old one (any) is forgotten: its computed columns are then masked as an unknown
/// statement's, and a FETCH or EXECUTE portal's rows have no plan until it is bound again
/// (the client side describes such a portal only after its Bind), which ends the session as
/// any result the proxy cannot mask does.
const MAX_TRACKED: usize = super::statements::MAX_STATEMENTS + 1;

pub struct Tracker {
    masker: Arc<Masker>,
    ops: VecDeque<Op>,
    portals: HashMap<String, Arc<Plan>>,
    /// Portals bound to a `COPY ... TO STDOUT`.
    copies: HashMap<String, CopyOut>,
    /// Whether the computed result columns of each portal bound are redacted: its statement's text
    /// says what it reads.
    portal_computed: HashMap<String, bool>,
    /// ... and of a portal it did not see bound (a cursor the client declared in SQL).
    unknown: bool,
    /// Portals whose Execute declares or closes cursors, and which.
    cursor_portals: HashMap<String, Deallocates>,
    /// A WITH HOLD cursor that may compute from masked values was declared in this
    /// transaction: its rows are computed at COMMIT, whose errors may quote them.
    tainted: bool,
    /// The row shape of the simple query result being sent.
    current: Option<Arc<Plan>>,
    copy: Option<Copying>,
    counts: Counts,
}

impl Tracker {
    pub fn new(masker: Arc<Masker>) -> Tracker {
        let unknown = masker.computed([], &crate::sql::Reads::default(), true);
        Tracker {
            unknown,
            cursor_portals: HashMap::new(),
            tainted: false,
            masker,
            ops: VecDeque::new(),
            portals: HashMap::new(),
            copies: HashMap::new(),
            portal_computed: HashMap::new(),
            current: None,
            copy: None,
            counts: Counts::default(),
        }
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push_back(op);
    }

    /// The server ignored the oldest `n` Syncs still awaiting an answer (sent during a COPY).
    pub fn void_syncs(&mut self, n: u64) {
        for _ in 0..n {
            if let Some(i) = self.ops.iter().position(|o| *o == Op::Sync) {
                self.ops.remove(i);
            }
        }
    }

    /// Values masked since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    fn pop_if(&mut self, f: impl Fn(&Op) -> bool) -> Option<Op> {
        if self.ops.front().is_some_and(f) { self.ops.pop_front() } else { None }
    }

    /// The frame to relay (possibly rewritten), or `None` to drop it.
    /// Writes the DataRow frame with body `body` to `out`, masked by the plan of the result it
    /// belongs to; `out` is untouched on error. The relay's path for rows: `on_frame` would
    /// split each row into a frame of its own.
    pub fn write_data_row(&mut self, body: &[u8], out: &mut BytesMut) -> Result<(), TrackError> {
        let (plan, constant) = match self.ops.front() {
            Some(Op::Execute { portal, constant }) => (self.portals.get(portal), *constant),
            Some(Op::Query { .. }) => (self.current.as_ref(), false),
            _ => (None, false),
        };
        let plan = plan.ok_or(TrackError::Unexpected("a data row"))?;
        Ok(rows::write_data_row(body, plan, constant, &self.masker, &mut self.counts, out)?)
    }

    pub fn masker(&self) -> Arc<Masker> {
        self.masker.clone()
    }

    /// The Execute of `portal` ended: the cursors it declared or closed are other portals now.
    fn executed(&mut self, portal: &str) {
        if let Some(names) = self.cursor_portals.get(portal).cloned() {
            self.forget_cursors(&names);
        }
    }

    /// Forgets other portals while `portal` would be one too many.
    fn make_room(&mut self, portal: &str) {
        while self.portal_computed.len() >= MAX_TRACKED && !self.portal_computed.contains_key(portal) {
            let Some(old) = self.portal_computed.keys().next().cloned() else { break };
            self.evict(&old);
        }
        while self.portals.len() >= MAX_TRACKED && !self.portals.contains_key(portal) {
            let Some(old) = self.portals.keys().next().cloned() else { break };
            self.evict(&old);
        }
    }

    /// Forgets `portal` to make room. The cursors its Execute would declare or close are
    /// forgotten now, as that Execute could no longer tell: what the tracker knew of portals of
    /// those names (a portal the server dropped at `ROLLBACK TO SAVEPOINT`, not computed) must
    /// not describe the cursor.
    fn evict(&mut self, portal: &str) {
        if let Some(names) = self.cursor_portals.remove(portal) {
            self.forget_cursors(&names);
        }
        self.forget_portal(portal);
    }

    fn forget_portal(&mut self, name: &str) {
        self.portals.remove(name);
        self.copies.remove(name);
        self.portal_computed.remove(name);
        self.cursor_portals.remove(name);
    }

    fn forget_cursors(&mut self, names: &Deallocates) {
        match names {
            Deallocates::None => {}
            Deallocates::Names(names) => {
                for n in names {
                    self.portals.remove(n);
                    self.copies.remove(n);
                    self.portal_computed.remove(n);
                }
            }
            Deallocates::All => {
                self.portals.clear();
                self.copies.clear();
                self.portal_computed.clear();
            }
        }
    }

    pub fn on_frame(&mut self, mut f: Frame) -> Result<Option<Frame>, TrackError> {
        if let Some(Op::Query { computed: true, hold: true, .. }) = self.ops.front() {
            self.tainted = true;
        }
        match f.tag {
            // ParseComplete; ParameterDescription, first in the answer to a statement Describe.
            b'1' | b't' => {}
            b'2' => {
                if let Some(Op::Bind { portal, copy, computed, cursors, hold }) =
                    self.pop_if(|o| matches!(o, Op::Bind { .. }))
                {
                    // Only a Bind the server carried out changes what the portal is.
                    match copy {
                        Some(c) => self.copies.insert(portal.clone(), c),
                        None => self.copies.remove(&portal),
                    };
                    match cursors {
                        Deallocates::None => self.cursor_portals.remove(&portal),
                        names => self.cursor_portals.insert(portal.clone(), names),
                    };
                    self.tainted |= hold && computed;
                    self.make_room(&portal);
                    self.portal_computed.insert(portal.clone(), computed);
                    self.portals.remove(&portal);
                }
            }
            b'3' => {
                if let Some(Op::Close { target: b'P', name }) = self.pop_if(|o| matches!(o, Op::Close { .. })) {
                    self.forget_portal(&name);
                }
            }
            // A statement's row shape: relayed as it is, not kept (see `Op::DescribeStatement`).
            b'T' | b'n' if self.ops.front() == Some(&Op::DescribeStatement) => {
                self.ops.pop_front();
            }
            b'T' => {
                let computed = match self.ops.front() {
                    Some(Op::DescribePortal { portal, .. }) => {
                        self.portal_computed.get(portal).copied().unwrap_or(self.unknown)
                    }
                    Some(Op::Query { computed, .. }) => *computed,
                    _ => false,
                };
                let plan = Arc::new(Plan::from_row_description(&f.body, &self.masker, computed)?);
                match self.ops.front() {
                    Some(Op::DescribePortal { .. }) => {
                        let Some(Op::DescribePortal { portal, hidden }) = self.ops.pop_front() else { unreachable!() };
                        self.make_room(&portal);
                        self.portals.insert(portal, plan);
                        if hidden {
                            return Ok(None);
                        }
                    }
                    _ => self.current = Some(plan),
                }
            }
            b'n' => {
                if let Some(Op::DescribePortal { portal, hidden }) =
                    self.pop_if(|o| matches!(o, Op::DescribePortal { .. }))
                {
                    self.portals.remove(&portal);
                    if hidden {
                        return Ok(None);
                    }
                }
            }
            b'D' => {
                let mut out = BytesMut::with_capacity(f.body.len() + 5);
                self.write_data_row(&f.body, &mut out)?;
                f.body = out.split_off(5).freeze();
            }
            b'C' | b's' | b'I' => {
                match self.pop_if(|o| matches!(o, Op::Execute { .. })) {
                    Some(Op::Execute { portal, .. }) => self.executed(&portal),
                    _ => self.current = None,
                }
                self.copy = None;
            }
            b'H' => {
                let spec = match self.ops.front_mut() {
                    Some(Op::Query { copies, .. }) => copies.pop_front(),
                    Some(Op::Execute { portal, .. }) => self.copies.get(portal).cloned(),
                    _ => None,
                };
                let spec = spec.ok_or(TrackError::Unexpected("a COPY it did not see coming"))?;
                if spec.format == CopyFormat::Binary || f.body.first() == Some(&1) {
                    return Err(TrackError::Unexpected("a binary COPY"));
                }
                // The plan follows the statement's column list: a COPY of other columns is not
                // the one the proxy looked at.
                let columns = f.body.get(1..3).map(|n| i16::from_be_bytes([n[0], n[1]]));
                if let Some(names) = &spec.columns
                    && columns != Some(names.len() as i16)
                {
                    return Err(TrackError::Unexpected("a COPY with other columns than its statement names"));
                }
                let plan = Plan::for_copy(&spec, &self.masker);
                self.copy = Some(Copying { spec, plan, rows: 0 });
            }
            b'd' => {
                if let Some(c) = &mut self.copy {
                    c.rows += 1;
                    let header = c.rows == 1 && c.spec.header;
                    if !header
                        && let Some(body) =
                            rows::mask_copy_row(&f.body, &c.spec, &c.plan, &self.masker, &mut self.counts)?
                    {
                        f.body = body;
                    }
                }
            }
            b'c' => self.copy = None,
            // `SET client_encoding`: `partial` counts characters as the new encoding makes them.
            b'S' => {
                if let Some(charset) = super::reported_charset(&f.body)
                    && charset != self.masker.charset()
                {
                    self.masker = Arc::new(self.masker.with_charset(charset));
                }
            }
            // NotificationResponse: pid, channel, payload; the payload may carry anything.
            b'A' => {
                if let Some(body) = rows::mask_notification(&f.body, &self.masker, &mut self.counts)? {
                    f.body = body;
                }
            }
            b'E' | b'N' => {
                // A statement that may compute from masked values may quote them in errors
                // (`invalid input syntax for type integer: "..."`).
                let computed = match self.ops.front() {
                    Some(Op::Query { computed, .. } | Op::Bind { computed, .. }) => *computed,
                    Some(Op::Execute { portal, .. }) => {
                        self.portal_computed.get(portal).copied().unwrap_or(self.unknown)
                    }
                    _ => false,
                };
                if let Some(Op::Execute { portal, .. }) = self.ops.front() {
                    let portal = portal.clone();
                    self.executed(&portal);
                }
                let withheld = computed || self.tainted;
                if let Some(body) = rows::mask_notice(&f.body, &self.masker, withheld, &mut self.counts)? {
                    f.body = body;
                }
                if f.tag == b'E' {
                    self.copy = None;
                    // After an error in a simple query, the query ends at its ReadyForQuery; in the
                    // extended protocol the server skips everything up to the next Sync.
                    if !matches!(self.ops.front(), Some(Op::Query { .. })) {
                        while self.ops.front().is_some_and(|o| *o != Op::Sync) {
                            self.ops.pop_front();
                        }
                    }
                }
            }
            b'Z' => {
                // Outside a transaction block no portal is left (but WITH HOLD cursors, whose
                // rows an Execute gets with a Describe first): their plans would only pile up.
                if f.body.first() == Some(&b'I') {
                    self.portals.clear();
                    self.copies.clear();
                    self.portal_computed.clear();
                    self.cursor_portals.clear();
                    self.tainted = false;
                }
                while let Some(op) = self.ops.pop_front() {
                    if let Op::Query { cursors, .. } = &op {
                        self.forget_cursors(cursors);
                    }
                    if matches!(op, Op::Sync | Op::Query { .. }) {
                        break;
                    }
                }
                self.current = None;
                self.copy = None;
            }
            _ => {}
        }
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::*;
    use crate::mask::{Glob, Rule, Style, Target};

    fn frame(tag: u8, body: &[u8]) -> Frame {
        Frame { tag, body: Bytes::copy_from_slice(body) }
    }

    /// One text column stored in a user table.
    fn row_description(name: &str) -> Frame {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.extend_from_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u32(16400);
        b.put_i16(1);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
        frame(b'T', &b)
    }

    fn data_row(v: &str) -> Frame {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_i32(v.len() as i32);
        b.extend_from_slice(v.as_bytes());
        frame(b'D', &b)
    }

    fn tracker() -> Tracker {
        let rules =
            [Rule { name: "m".into(), target: Target::Columns(vec![Glob::new("email")]), style: Style::Redact }];
        Tracker::new(Arc::new(Masker::new(&rules, [0; 32])))
    }

    fn relay(t: &mut Tracker, f: Frame) -> Option<Frame> {
        t.on_frame(f).unwrap()
    }

    #[test]
    fn partial_counts_characters_as_the_client_encoding_makes_them() {
        let rules =
            [Rule { name: "m".into(), target: Target::Columns(vec![Glob::new("email")]), style: Style::Partial }];
        let mut t = Tracker::new(Arc::new(Masker::new(&rules, [0; 32])));
        let row = |v: &[u8]| {
            let mut b = BytesMut::new();
            b.put_i16(1);
            b.put_i32(v.len() as i32);
            b.extend_from_slice(v);
            frame(b'D', &b)
        };
        // `Ã©` five times in LATIN1: ten characters, whose bytes are also five UTF-8 `é`.
        let value = b"\xc3\xa9".repeat(5);
        for (encoding, want) in
            [("LATIN1", &b"******\xc3\xa9\xc3\xa9"[..]), ("UTF8", &b"*\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"[..])]
        {
            assert!(relay(&mut t, frame(b'S', format!("client_encoding\0{encoding}\0").as_bytes())).is_some());
            t.push(Op::Query { copies: Default::default(), computed: false, cursors: Deallocates::None, hold: false });
            relay(&mut t, row_description("email"));
            assert_eq!(relay(&mut t, row(&value)).unwrap(), row(want), "{encoding}");
            relay(&mut t, frame(b'C', b"SELECT 1\0"));
            relay(&mut t, frame(b'Z', b"I"));
        }
    }

    #[test]
    fn extended_protocol_uses_the_portal_plan_and_hides_added_describes() {
        let mut t = tracker();
        for op in [
            Op::bind(),
            Op::DescribePortal { portal: String::new(), hidden: true },
            Op::Execute { portal: String::new(), constant: false },
            Op::Sync,
        ] {
            t.push(op);
        }
        assert!(relay(&mut t, frame(b'1', b"")).is_some());
        assert!(relay(&mut t, frame(b'2', b"")).is_some());
        assert_eq!(relay(&mut t, row_description("email")), None, "the proxy's own Describe is not relayed");
        assert_eq!(relay(&mut t, data_row("a@b.c")).unwrap(), data_row("[REDACTED]"));
        assert!(relay(&mut t, frame(b'C', b"SELECT 1\0")).is_some());
        assert!(relay(&mut t, frame(b'Z', b"I")).is_some());
        assert_eq!(t.take_counts().total(), 1);
        assert!(t.ops.is_empty());
        // A data row nobody described is refused, not relayed unmasked.
        assert!(t.on_frame(data_row("x")).is_err());
    }

    #[test]
    fn a_session_keeps_a_bounded_number_of_portals() {
        let mut t = tracker();
        for i in 0..MAX_TRACKED + 10 {
            let portal = format!("p{i}");
            for op in [
                Op::Bind {
                    portal: portal.clone(),
                    copy: None,
                    computed: false,
                    cursors: Deallocates::None,
                    hold: false,
                },
                Op::DescribePortal { portal, hidden: true },
                Op::Sync,
            ] {
                t.push(op);
            }
            for f in [frame(b'2', b""), row_description("email"), frame(b'Z', b"T")] {
                relay(&mut t, f);
            }
        }
        assert!(t.portals.len() <= MAX_TRACKED && t.portal_computed.len() <= MAX_TRACKED);
        assert!(t.portals.contains_key(&format!("p{}", MAX_TRACKED + 9)), "the newest is kept");
    }

    #[test]
    fn a_portal_forgotten_for_room_forgets_the_cursors_it_would_declare() {
        let bind = |portal: &str, computed: bool, cursors: Deallocates| Op::Bind {
            portal: portal.into(),
            copy: None,
            computed,
            cursors,
            hold: false,
        };
        let mut t = tracker();
        // `c`, not computed (the server dropped it at a ROLLBACK TO, which the tracker does not
        // follow), and `d`, a DECLARE of a cursor `c` not yet executed.
        for op in [bind("c", false, Deallocates::None), bind("d", true, Deallocates::Names(["c".into()].into()))] {
            t.push(op);
            relay(&mut t, frame(b'2', b""));
        }
        // Which portal goes when the session has too many is the map's choice; here `d`.
        t.evict("d");
        // The cursor is then described as an unknown statement's: its computed columns masked.
        assert_eq!(t.portal_computed.get("c"), None, "the cursor `c` would be described as the portal `c` was");
        assert!(t.unknown);
    }

    #[test]
    fn a_constant_execute_masks_every_value_whole() {
        // A FETCH portal resumed: its plan may belong to other rows; the types are its own.
        let mut t = tracker();
        for op in [
            Op::bind(),
            Op::DescribePortal { portal: String::new(), hidden: true },
            Op::Execute { portal: String::new(), constant: true },
            Op::Sync,
        ] {
            t.push(op);
        }
        for f in [frame(b'2', b""), row_description("note")] {
            relay(&mut t, f);
        }
        assert_eq!(relay(&mut t, data_row("plain")).unwrap(), data_row("[REDACTED]"));
        let mut null = BytesMut::new();
        null.put_i16(1);
        null.put_i32(-1);
        let null = frame(b'D', &null);
        assert_eq!(relay(&mut t, null).unwrap(), data_row("[REDACTED]"), "NULL too");
        assert_eq!(t.take_counts().total(), 1);
    }

    #[test]
    fn a_statement_description_gives_its_portals_no_plan() {
        // The server may analyse the statement again before the portal runs (another
        // search_path): only a Describe of the portal says what its rows are.
        let mut t = tracker();
        for op in [
            Op::DescribeStatement,
            Op::Sync,
            Op::bind(),
            Op::Execute { portal: String::new(), constant: false },
            Op::Sync,
        ] {
            t.push(op);
        }
        for f in [frame(b't', b"\0\0"), row_description("email"), frame(b'Z', b"I"), frame(b'2', b"")] {
            assert!(relay(&mut t, f).is_some(), "the client's own Describe is answered");
        }
        assert!(t.on_frame(data_row("a@b.c")).is_err(), "no plan, no relay");
    }

    #[test]
    fn errors_skip_to_sync_and_simple_queries_use_their_row_description() {
        let mut t = tracker();
        for op in [
            Op::bind(),
            Op::DescribePortal { portal: String::new(), hidden: true },
            Op::Execute { portal: String::new(), constant: false },
            Op::Sync,
            Op::Query { copies: VecDeque::new(), computed: false, cursors: Deallocates::None, hold: false },
        ] {
            t.push(op);
        }
        assert!(relay(&mut t, frame(b'E', b"SERROR\0Mbad\0\0")).is_some());
        assert!(relay(&mut t, frame(b'Z', b"I")).is_some());
        assert_eq!(
            t.ops.front(),
            Some(&Op::Query { copies: VecDeque::new(), computed: false, cursors: Deallocates::None, hold: false })
        );
        assert!(relay(&mut t, row_description("note")).is_some());
        assert_eq!(relay(&mut t, data_row("a@b.c")).unwrap(), data_row("a@b.c"));
        assert!(relay(&mut t, frame(b'C', b"SELECT 1\0")).is_some());
        assert!(relay(&mut t, row_description("email")).is_some());
        assert_eq!(relay(&mut t, data_row("a@b.c")).unwrap(), data_row("[REDACTED]"));
        assert!(relay(&mut t, frame(b'Z', b"I")).is_some());
        assert!(t.ops.is_empty());
    }

    #[test]
    fn copy_out_rows_are_masked_and_unexpected_copies_refused() {
        let mut t = tracker();
        let spec = crate::sql::classify("COPY t (id, email) TO STDOUT").copy_out.remove(0);
        t.push(Op::Query { copies: [spec].into(), computed: false, cursors: Deallocates::None, hold: false });
        assert!(relay(&mut t, frame(b'H', &[0, 0, 2, 0, 0, 0, 0])).is_some());
        assert_eq!(relay(&mut t, frame(b'd', b"1\tx@y.z\n")).unwrap(), frame(b'd', b"1\t[REDACTED]\n"));
        assert!(relay(&mut t, frame(b'c', b"")).is_some());
        assert!(relay(&mut t, frame(b'C', b"COPY 1\0")).is_some());
        assert!(relay(&mut t, frame(b'Z', b"I")).is_some());
        t.push(Op::Query { copies: VecDeque::new(), computed: false, cursors: Deallocates::None, hold: false });
        assert!(t.on_frame(frame(b'H', &[0, 0, 0])).is_err());
    }
}
