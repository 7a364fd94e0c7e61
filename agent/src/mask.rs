//! Response masking: column-name rules and content detectors applied to single values. Pure.
use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use hmac::{Hmac, Mac};
use regex::bytes::{Regex, RegexBuilder};
use sha2::Sha256;

/// What kind of sensitive value a masked value was; audit records count masked values per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Masked because of its column (or field) name.
    Column,
    Email,
    CreditCard,
    Ssn,
    Phone,
    Secret,
}

pub const DETECTORS: [Kind; 5] = [Kind::Email, Kind::CreditCard, Kind::Ssn, Kind::Phone, Kind::Secret];

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Column => "column",
            Kind::Email => "email",
            Kind::CreditCard => "credit_card",
            Kind::Ssn => "ssn",
            Kind::Phone => "phone",
            Kind::Secret => "secret",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DETECTORS.iter().copied().find(|k| k.as_str() == s).ok_or_else(|| {
            format!(
                "unknown detector {s:?}; expected one of {}",
                DETECTORS.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The whole value becomes `[REDACTED]`.
    Redact,
    /// All but the last four characters become `*`.
    Partial,
    /// A keyed hash: equal inputs give equal outputs, so joins and group-bys still work.
    Hash,
}

impl Style {
    /// How little of a value it lets through: partial keeps 4 characters, a hash links equal
    /// values, redact keeps nothing.
    pub fn strictness(self) -> u8 {
        match self {
            Style::Partial => 0,
            Style::Hash => 1,
            Style::Redact => 2,
        }
    }
}

impl FromStr for Style {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redact" => Ok(Style::Redact),
            "partial" => Ok(Style::Partial),
            "hash" => Ok(Style::Hash),
            _ => Err(format!("unknown masking style {s:?}; expected redact, partial or hash")),
        }
    }
}

pub const REDACTED: &str = "[REDACTED]";

/// A column-name pattern: case-insensitive, `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_lowercase())
    }

    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.to_lowercase().as_bytes())
    }

    /// The pattern as SQL `LIKE` text (`\` escapes) for names lowered in the "C" collation, or
    /// `None` when it is not ASCII: such a pattern can only match names that are not ASCII.
    pub fn like(&self) -> Option<String> {
        if !self.0.is_ascii() {
            return None;
        }
        let mut out = String::with_capacity(self.0.len() + 2);
        for c in self.0.chars() {
            match c {
                '*' => out.push('%'),
                '%' | '_' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
        Some(out)
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// One masking rule of a grant, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub target: Target,
    pub style: Style,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Columns(Vec<Glob>),
    Detect(Vec<Kind>),
}

/// What happens to one column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMask {
    /// The column's name matched a rule: every non-NULL value is masked whole.
    Whole(Style),
    /// Content detectors look inside each value.
    Detect,
    /// Content detectors look inside each value and redact what they find, whatever their
    /// rule's style: the value may be text the client chose (see `Masker::column_from`).
    DetectStrict,
    /// Nothing to do.
    Keep,
}

impl ColumnMask {
    /// The mask for a value that is not one stored in a user table's column: a hash of it, or
    /// its last characters, would answer a client's guesses (`SELECT 'guess'` hashed as the
    /// stored value is) or show any part it likes (`substr(email, 5, 4)` under `partial`).
    pub fn strict(self) -> ColumnMask {
        match self {
            ColumnMask::Whole(_) => ColumnMask::Whole(Style::Redact),
            ColumnMask::Detect | ColumnMask::DetectStrict => ColumnMask::DetectStrict,
            ColumnMask::Keep => ColumnMask::Keep,
        }
    }
}

/// FirstNormalObjectId: objects with smaller OIDs are the system's catalogs and views, whose
/// columns hold text any client can put there (`pg_stat_activity.query`, `pg_settings`).
const FIRST_USER_OID: u32 = 16384;

/// Whether a result column the server traces to `origin` (table OID, attribute number) holds
/// values stored in a user table's column, rather than values a query computed.
pub fn stored(origin: (u32, i16)) -> bool {
    origin.0 >= FIRST_USER_OID && origin.1 > 0
}

/// Masked-value counts by kind, for audit records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts([u64; 6]);

impl Counts {
    pub fn add(&mut self, kind: Kind) {
        self.0[kind as usize] += 1;
    }

    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counts by kind name.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, u64> {
        [Kind::Column, Kind::Email, Kind::CreditCard, Kind::Ssn, Kind::Phone, Kind::Secret]
            .into_iter()
            .filter(|k| self.0[*k as usize] > 0)
            .map(|k| (k.as_str().to_string(), self.0[k as usize]))
            .collect()
    }
}

/// Table columns (table OID, attribute number) that a column rule masks, wherever a result
/// column comes straight from one: the server names a result column's source in its
/// RowDescription, so `SELECT ssn AS x` is still `ssn`.
pub type Origins = HashMap<(u32, i16), Style>;

/// The tables and views that have a masked column, by name (lower-cased, without schema).
pub type MaskedTables = HashMap<String, MaskedTable>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedTable {
    /// The strictest style of its masked columns' rules.
    pub style: Style,
    /// Its column names, lower-cased: `v.f` with no column `f` is a function of the row. For
    /// tables of one name in several schemas, the names every one of them has.
    pub columns: std::collections::HashSet<String>,
    /// Its columns masked for a field their type holds (`who person`, where `person` has a
    /// masked field), lower-cased: their names match no rule, so `many[1]` or
    /// `(who).ssn` is computed from a masked value only by what `who` is.
    pub holding: std::collections::HashSet<String>,
}

/// Masks values for one grant: its rules plus the agent's hashing key.
/// How the client's text is made of characters, for `partial`, which keeps the last four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Charset {
    /// UTF-8: bytes that are not valid UTF-8 count one character each.
    #[default]
    Utf8,
    /// LATIN1, WIN1252, KOI8-R... (and SQL_ASCII, bytes of whatever the server holds): every
    /// byte is a character.
    SingleByte,
    /// EUC: a byte under 0x80 is a character; a character starting with 0x8E (SS2) or 0x8F
    /// (SS3) takes `ss2` or `ss3` bytes, any other starting at 0x80 or above two.
    Euc { ss2: usize, ss3: usize },
}

#[derive(Clone)]
pub struct Masker {
    rules: Vec<Rule>,
    /// Detectors in use and the style each applies, in rule order (first rule naming one wins).
    detectors: Vec<(Kind, Style)>,
    key: [u8; 32],
    origins: Arc<Origins>,
    tables: Arc<MaskedTables>,
    charset: Charset,
    /// Shared by every masker made from this one (`with_origins`, `with_charset`).
    catalogs: Arc<Catalogs>,
}

/// What the server's catalog said (`with_origins`), by database, for the sessions of one grant:
/// a session that reads the same as one still running shares its copy, since a catalog can name
/// 100,000 columns and every masking session keeps one. Held weakly: a catalog goes with its
/// last session.
#[derive(Default)]
struct Catalogs(Mutex<HashMap<String, Catalog>>);

impl Catalogs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Catalog>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One database's masked columns and the tables that have them, as sessions share them.
type Catalog = (Weak<Origins>, Weak<MaskedTables>);

/// Databases whose catalog `Catalogs` keeps; past that it starts over (the names come from
/// clients).
const MAX_CATALOGS: usize = 16;

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker").field("rules", &self.rules).finish_non_exhaustive()
    }
}

impl Masker {
    /// `key` keys the `hash` style; keep it secret and stable, or hashed values change.
    pub fn new(rules: &[Rule], key: [u8; 32]) -> Masker {
        let mut detectors: Vec<(Kind, Style)> = Vec::new();
        for r in rules {
            if let Target::Detect(kinds) = &r.target {
                for k in kinds {
                    if !detectors.iter().any(|(d, _)| d == k) {
                        detectors.push((*k, r.style));
                    }
                }
            }
        }
        Masker {
            rules: rules.to_vec(),
            detectors,
            key,
            origins: Default::default(),
            tables: Default::default(),
            charset: Charset::Utf8,
            catalogs: Default::default(),
        }
    }

    /// This masker, also masking results taken from the table columns in `origins`, and
    /// computed results of statements that read `tables`, as `database`'s catalog says: the
    /// same copy as a running session's that found the same there.
    pub fn with_origins(&self, database: &str, origins: Origins, tables: MaskedTables) -> Masker {
        let cached = self.catalogs.lock().get(database).and_then(|(o, t)| Some((o.upgrade()?, t.upgrade()?)));
        // Compared outside the lock: other logins of the grant need not wait for it.
        let (origins, tables) = match cached {
            Some((o, t)) if *o == origins && *t == tables => (o, t),
            _ => {
                let new = (Arc::new(origins), Arc::new(tables));
                let mut known = self.catalogs.lock();
                known.retain(|_, (o, _)| o.strong_count() > 0);
                if known.len() >= MAX_CATALOGS && !known.contains_key(database) {
                    known.clear();
                }
                known.insert(database.to_owned(), (Arc::downgrade(&new.0), Arc::downgrade(&new.1)));
                new
            }
        };
        Masker { origins, tables, ..self.clone() }
    }

    /// The rules it was made from.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn charset(&self) -> Charset {
        self.charset
    }

    /// The same masker for a client whose text is made of characters as `charset` says.
    pub fn with_charset(&self, charset: Charset) -> Masker {
        Masker { charset, ..self.clone() }
    }

    /// Whether the computed result columns (those the server does not trace to one table
    /// column) of a statement may be made of masked values, and so are redacted whole: it names
    /// a masked column, or reads whole rows (`t.*`, `row_to_json(t)`, `t.f` for a function `f`)
    /// of a table with masked columns. `indirect`: it returns rows of a query written elsewhere
    /// (FETCH, EXECUTE, `query_to_xml`), which may read anything, masked wherever a column rule
    /// exists.
    pub fn computed<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a String> + Clone,
        reads: &crate::sql::Reads,
        indirect: bool,
    ) -> bool {
        if (indirect || reads.runs_sql) && self.has_column_rules() {
            return true;
        }
        if reads.columns.iter().any(|c| matches!(self.column(c), ColumnMask::Whole(_))) {
            return true;
        }
        if reads.columns.iter().any(|c| self.holds(tables.clone(), c)) {
            return true;
        }
        let by_name = |t: &str| self.table(t);
        let attribute_notation = reads.qualified.iter().any(|(q, f)| {
            let aliased = reads.aliases.get(q).into_iter().flatten();
            std::iter::once(q).chain(aliased).any(|t| by_name(t).is_some_and(|t| !t.columns.contains(f)))
        });
        (reads.whole_rows || attribute_notation) && tables.into_iter().any(|t| by_name(t).is_some())
    }

    /// A table with masked columns, by a name as `Classification::tables` holds it (`s."x.y"`).
    fn table(&self, name: &str) -> Option<&MaskedTable> {
        self.tables.get(crate::sql::unquoted(crate::sql::last_part(name)).to_lowercase().as_str())
    }

    /// Whether `column` of one of `tables` is masked for a masked field its type holds: its
    /// name matches no rule, so what is computed from it (`many[1]`, `(who).ssn`) and a COPY
    /// of it are masked by what it is.
    pub fn holds<'a>(&self, tables: impl IntoIterator<Item = &'a String>, column: &str) -> bool {
        holding_among(tables.into_iter().filter_map(|t| self.table(t)), column)
    }

    /// `holds` for a text that names a column and no table (an error's DETAIL): any table's.
    pub fn holds_anywhere(&self, column: &str) -> bool {
        holding_among(self.tables.values(), column)
    }

    /// The `LIKE` patterns (see `Glob::like`) of every column rule's ASCII globs.
    pub fn column_likes(&self) -> Vec<String> {
        let globs = self.rules.iter().flat_map(|r| match &r.target {
            Target::Columns(globs) => globs.as_slice(),
            Target::Detect(_) => &[],
        });
        let mut out: Vec<String> = Vec::new();
        for like in globs.filter_map(Glob::like) {
            if !out.contains(&like) {
                out.push(like);
            }
        }
        out
    }

    pub fn has_column_rules(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.target, Target::Columns(_)))
    }

    pub fn has_detectors(&self) -> bool {
        !self.detectors.is_empty()
    }

    /// What to do with a column of this name: the first column rule that names it, else detectors.
    pub fn column(&self, name: &str) -> ColumnMask {
        for r in &self.rules {
            if let Target::Columns(globs) = &r.target
                && globs.iter().any(|g| g.matches(name))
            {
                return ColumnMask::Whole(r.style);
            }
        }
        if self.detectors.is_empty() { ColumnMask::Keep } else { ColumnMask::Detect }
    }

    /// `column` for a result column the server says comes from table `origin.0`'s attribute
    /// `origin.1` (0, 0 for a computed value; attribute 0 for a whole row): masked if its name
    /// or its source's is, in the stricter of the two styles (`SELECT ssn AS email` is not
    /// shown in part), or, computed, if `computed` (see `Masker::computed`). Only values
    /// stored in a user table's column keep their rule's style; any other is redacted
    /// (`ColumnMask::strict`).
    pub fn column_from(&self, name: &str, origin: (u32, i16), computed: bool) -> ColumnMask {
        let mask = match (self.column(name), self.origins.get(&origin)) {
            (ColumnMask::Whole(a), Some(&b)) if b.strictness() > a.strictness() => ColumnMask::Whole(b),
            (ColumnMask::Whole(a), _) => ColumnMask::Whole(a),
            (_, Some(&b)) => ColumnMask::Whole(b),
            (_, None) if computed && origin.1 <= 0 => ColumnMask::Whole(Style::Redact),
            (other, None) => other,
        };
        if stored(origin) { mask } else { mask.strict() }
    }

    /// The masked form of a whole value.
    pub fn whole(&self, style: Style, value: &[u8]) -> Vec<u8> {
        match style {
            Style::Redact => REDACTED.as_bytes().to_vec(),
            Style::Partial => partial(value, self.charset),
            Style::Hash => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("hmac takes any key length");
                mac.update(value);
                let digest = mac.finalize().into_bytes();
                format!("hash:{}", hex::encode(&digest[..8])).into_bytes()
            }
        }
    }

    /// Applies the mask for `col` to one text value; `None` when it stays as it is.
    pub fn apply(&self, col: ColumnMask, value: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
        match col {
            ColumnMask::Keep => None,
            ColumnMask::Whole(style) => {
                counts.add(Kind::Column);
                Some(self.whole(style, value))
            }
            ColumnMask::Detect => self.detect(value, counts).map(Cow::into_owned),
            ColumnMask::DetectStrict => self.detect_strict(value, counts).map(Cow::into_owned),
        }
    }

    /// Runs the content detectors over free text, masking each finding in place in its rule's
    /// style.
    pub fn detect<'a>(&self, text: &'a [u8], counts: &mut Counts) -> Option<Cow<'a, [u8]>> {
        self.detect_as(text, counts, false)
    }

    /// `detect`, with every finding redacted: for text the client may have chosen (a computed
    /// value, an error message, a notification), where a hash would answer its guesses.
    pub fn detect_strict<'a>(&self, text: &'a [u8], counts: &mut Counts) -> Option<Cow<'a, [u8]>> {
        self.detect_as(text, counts, true)
    }

    /// `detect_strict` if `strict`, else `detect`.
    pub fn detect_as<'a>(&self, text: &'a [u8], counts: &mut Counts, strict: bool) -> Option<Cow<'a, [u8]>> {
        if self.detectors.is_empty() || !maybe_sensitive(text) {
            return None;
        }
        // Disjoint findings in order. Earlier detectors win where findings overlap (a card
        // number is not a phone), but what a later finding reaches past the earlier one is
        // masked with it, and a merged span shows no more than the strictest of its findings'
        // styles allows. Each detector's findings are merged in by one sweep: a value with
        // hundreds of thousands of findings costs time in proportion to them.
        let mut found: Vec<Finding> = Vec::new();
        for (rank, &(kind, style)) in self.detectors.iter().enumerate() {
            let mut new: Vec<Finding> =
                find(kind, text).into_iter().map(|(start, end)| Finding { start, end, kind, style, rank }).collect();
            if new.is_empty() {
                continue;
            }
            new.sort_by_key(|f| f.start);
            found = merge_findings(std::mem::take(&mut found), new);
        }
        if found.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0;
        for Finding { start, end, kind, style, .. } in found {
            out.extend_from_slice(&text[at..start]);
            out.extend_from_slice(&self.whole(if strict { Style::Redact } else { style }, &text[start..end]));
            counts.add(kind);
            at = end;
        }
        out.extend_from_slice(&text[at..]);
        Some(Cow::Owned(out))
    }
}

/// A span of a value a detector found, and which detector's kind and style it is masked as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Finding {
    start: usize,
    end: usize,
    kind: Kind,
    style: Style,
    /// The place of the detector that gives `kind` in the rules: the first wins.
    rank: usize,
}

/// Two lists of findings sorted by start, merged into one of disjoint findings: overlapping
/// ones become one span, with the kind of the earliest detector among them and the strictest
/// style.
fn merge_findings(a: Vec<Finding>, b: Vec<Finding>) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.start <= y.start => a.next(),
            (_, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => break,
        };
        let Some(f) = next else { break };
        match out.last_mut() {
            Some(last) if f.start < last.end => {
                last.end = last.end.max(f.end);
                if f.rank < last.rank {
                    (last.kind, last.rank) = (f.kind, f.rank);
                }
                if f.style.strictness() > last.style.strictness() {
                    last.style = f.style;
                }
            }
            _ => out.push(f),
        }
    }
    out
}

/// Whether one of `tables` has `column` among its holding columns; the name is lower-cased
/// only when one has any (most grants' tables have none).
fn holding_among<'t>(tables: impl Iterator<Item = &'t MaskedTable>, column: &str) -> bool {
    let mut holding = tables.filter(|t| !t.holding.is_empty()).peekable();
    holding.peek().is_some() && {
        let column = column.to_lowercase();
        holding.any(|t| t.holding.contains(&column))
    }
}

/// Keeps the last four characters, as the client's encoding makes them; everything before
/// becomes `*`, one per character.
fn partial(value: &[u8], charset: Charset) -> Vec<u8> {
    // The start of each of the last four characters, in a ring, and how many there are.
    let mut last = [0usize; 4];
    let mut n = 0;
    let mut at = 0;
    let mut start = |i: usize| {
        last[n % 4] = i;
        n += 1;
    };
    match charset {
        Charset::Utf8 => {
            for chunk in value.utf8_chunks() {
                chunk.valid().char_indices().for_each(|(i, _)| start(at + i));
                at += chunk.valid().len();
                (at..at + chunk.invalid().len()).for_each(&mut start);
                at += chunk.invalid().len();
            }
        }
        Charset::SingleByte => (0..value.len()).for_each(start),
        Charset::Euc { ss2, ss3 } => {
            while at < value.len() {
                start(at);
                at += match value[at] {
                    0..0x80 => 1,
                    0x8E => ss2,
                    0x8F => ss3,
                    _ => 2,
                };
            }
        }
    }
    if n <= 4 {
        return vec![b'*'; n];
    }
    let tail = last[n % 4];
    let mut out = Vec::with_capacity(n - 4 + value.len() - tail);
    out.resize(n - 4, b'*');
    out.extend_from_slice(&value[tail..]);
    out
}

/// Cheap pre-check: every detector needs an `@`, a separator, seven digits, or a secret's prefix
/// (those of the secrets that need no `_` or `-`).
fn maybe_sensitive(text: &[u8]) -> bool {
    if text.windows(3).any(|w| matches!(w, b"eyJ" | b"AKI" | b"ASI" | b"AIz" | b"SG.")) {
        return true;
    }
    let mut digits = 0;
    for &b in text {
        match b {
            b'@' | b'-' | b'_' => return true,
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 7 {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| RegexBuilder::new(pattern).unicode(false).build().expect("detector patterns are valid"))
}

// Detector patterns say where a value may start and end with the bytes around it, not `\b`:
// the regex crate counts `_` as a word character, so `\b` would hide `acct_4111111111111111`
// and `key_AKIA...`. Numbers must not touch other digits; tokens must not follow a letter or
// digit (AWS key ids, of fixed length, must not be followed by one either). The guard before a
// value is matched (and not kept) inside the pattern.
fn find(kind: Kind, text: &[u8]) -> Vec<(usize, usize)> {
    static EMAIL: OnceLock<Regex> = OnceLock::new();
    static CARD: OnceLock<Regex> = OnceLock::new();
    static SSN: OnceLock<Regex> = OnceLock::new();
    static PHONE: OnceLock<Regex> = OnceLock::new();
    static SECRET: OnceLock<Regex> = OnceLock::new();
    match kind {
        Kind::Column => Vec::new(),
        Kind::Email => {
            if !text.contains(&b'@') {
                return Vec::new();
            }
            regex(
                &EMAIL,
                r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}",
            )
            .find_iter(text)
            .map(|m| (m.start(), m.end()))
            .collect()
        }
        // A greedy run starts at a digit no digit precedes and ends at one no digit follows.
        Kind::CreditCard => regex(&CARD, r"\d+(?:[ -]\d+)*")
            .find_iter(text)
            .flat_map(|m| cards(m.as_bytes()).into_iter().map(move |(s, e)| (m.start() + s, m.start() + e)))
            .collect(),
        Kind::Ssn => values(regex(&SSN, r"(?:^|[^0-9])(\d{3}-\d{2}-\d{4})(?:[^0-9]|$)"), text, |v| {
            let (area, group, serial) = (&v[..3], &v[4..6], &v[7..]);
            area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
        }),
        Kind::Phone => values(
            regex(
                &PHONE,
                r"(\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4})(?:[^0-9]|$)|(?:^|[^0-9])(\d{3}[.-]\d{3}[.-]\d{4})(?:[^0-9]|$)",
            ),
            text,
            |_| true,
        ),
        Kind::Secret => {
            let mut found = values(
                regex(
                    &SECRET,
                    r"(?:^|[^A-Za-z0-9])((?:AKIA|ASIA)[0-9A-Z]{16})(?:[^A-Za-z0-9]|$)|(?:^|[^A-Za-z0-9])(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|sk_(?:live|test)_[0-9A-Za-z]{16,}|sk-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35,}|npm_[A-Za-z0-9]{36,}|hf_[A-Za-z0-9]{30,}|SG\.[A-Za-z0-9_-]{22,}\.[A-Za-z0-9_-]{43,}|pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}|shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32,}|dop_v1_[a-f0-9]{64,}|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})",
                ),
                text,
                |_| true,
            );
            found.extend(private_keys(text));
            found
        }
    }
}

/// PEM private keys, from `BEGIN` to `END` or, with no `END` after it, to the end of the text.
/// Searched apart from the tokens: in one pattern, a `BEGIN` with no `END` made every later
/// search read to the end of the text, in case that key still ended.
fn private_keys(text: &[u8]) -> Vec<(usize, usize)> {
    static BEGIN: OnceLock<Regex> = OnceLock::new();
    static END: OnceLock<Regex> = OnceLock::new();
    let (begin, end) =
        (regex(&BEGIN, r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), regex(&END, r"-----END [A-Z ]*PRIVATE KEY-----"));
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(b) = begin.find_at(text, at) {
        match end.find_at(text, b.end()) {
            Some(e) => {
                found.push((b.start(), e.end()));
                at = e.end();
            }
            None => {
                found.push((b.start(), text.len()));
                break;
            }
        }
    }
    found
}

/// The values a guarded pattern finds (its first capture group that took part in a match)
/// that `keep` accepts. Each search starts at the last byte of the value before, so that byte
/// or the one after it (a trailing guard) can be the next value's leading guard; after a
/// refused value it starts one byte into it, as the values of a fixed-length pattern may
/// overlap.
fn values(re: &Regex, text: &[u8], keep: impl Fn(&[u8]) -> bool) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut locations = re.capture_locations();
    let mut at = 0;
    while at < text.len() && re.captures_read_at(&mut locations, text, at).is_some() {
        let Some((start, end)) = (1..locations.len()).find_map(|i| locations.get(i)) else { break };
        if keep(&text[start..end]) {
            found.push((start, end));
            at = (end - 1).max(start + 1);
        } else {
            at = start + 1;
        }
    }
    found
}

/// Card numbers in a run of digit groups (`4111 1111 1111 1111 123`): the whole run, or else
/// any stretch of whole groups, if it has 13-19 digits and passes the Luhn check; a run written
/// without separators is one group. So a card written next to other numbers (a CVV, an amount)
/// is still found, and a long number is not cut anywhere to make one.
fn cards(run: &[u8]) -> Vec<(usize, usize)> {
    // Every stretch that passes, merged where they overlap: a shorter stretch passing by chance
    // (one in ten does) must not leave the rest of a card beside it in clear. Each stretch is
    // read once, its Luhn sum kept as it grows (no allocation, at most 19 digits from each
    // group): a value of millions of one-digit groups costs time in proportion to its length.
    let mut found: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < run.len() {
        // The Luhn sums of the stretch so far, as it is (its last digit not doubled) and as it
        // would be with one more digit after it (every parity flipped).
        let (mut sum, mut flipped) = (0u32, 0u32);
        let mut digits = 0;
        for (i, &b) in run.iter().enumerate().skip(start) {
            if !b.is_ascii_digit() {
                continue;
            }
            digits += 1;
            if digits > 19 {
                break;
            }
            let d = u32::from(b - b'0');
            let doubled = if d > 4 { 2 * d - 9 } else { 2 * d };
            (sum, flipped) = (d + flipped, doubled + sum);
            let group_ends = run.get(i + 1).is_none_or(|n| !n.is_ascii_digit());
            if group_ends && digits >= 13 && sum.is_multiple_of(10) {
                match found.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(i + 1),
                    _ => found.push((start, i + 1)),
                }
            }
        }
        match run[start..].iter().position(|b| !b.is_ascii_digit()) {
            Some(sep) => start += sep + 1,
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(rules: Vec<Rule>) -> Masker {
        Masker::new(&rules, [7; 32])
    }

    fn detect_all(style: Style) -> Masker {
        masker(vec![Rule { name: "d".into(), target: Target::Detect(DETECTORS.to_vec()), style }])
    }

    fn masked(m: &Masker, text: &str) -> (String, Counts) {
        let mut c = Counts::default();
        let out = m.detect(text.as_bytes(), &mut c).map(|v| String::from_utf8(v.into_owned()).unwrap());
        (out.unwrap_or_else(|| text.to_string()), c)
    }

    #[test]
    fn globs_are_case_insensitive_with_stars() {
        assert!(Glob::new("*ssn*").matches("customer_SSN_hash"));
        assert!(Glob::new("email").matches("EMAIL"));
        assert!(!Glob::new("email").matches("emails"));
        assert!(Glob::new("e*l").matches("email"));
        assert!(Glob::new("*").matches(""));
        assert!(!Glob::new("a*b").matches("acbc"));
    }

    #[test]
    fn globs_become_like_patterns_for_the_servers_catalog() {
        assert_eq!(Glob::new("*SSN*").like().as_deref(), Some("%ssn%"));
        assert_eq!(Glob::new("a_b%c\\d").like().as_deref(), Some("a\\_b\\%c\\\\d"));
        assert_eq!(Glob::new("émail").like(), None, "non-ASCII names are all fetched instead");
        let m = masker(vec![
            Rule {
                name: "a".into(),
                target: Target::Columns(vec![Glob::new("email"), Glob::new("*ssn*")]),
                style: Style::Redact,
            },
            Rule { name: "d".into(), target: Target::Detect(vec![Kind::Email]), style: Style::Hash },
            Rule { name: "b".into(), target: Target::Columns(vec![Glob::new("email")]), style: Style::Hash },
        ]);
        assert_eq!(m.column_likes(), vec!["email", "%ssn%"]);
    }

    #[test]
    fn sessions_that_read_the_same_catalog_share_one_copy() {
        let m = masker(vec![Rule {
            name: "a".into(),
            target: Target::Columns(vec![Glob::new("ssn")]),
            style: Style::Redact,
        }]);
        let catalog = |attnum: i16| {
            let columns = ["id", "ssn"].iter().map(|c| c.to_string()).collect();
            let table = MaskedTable { style: Style::Redact, columns, holding: Default::default() };
            let tables = MaskedTables::from([("vault".into(), table)]);
            (Origins::from([((16384, attnum), Style::Redact)]), tables)
        };
        let session = |db: &str, attnum| {
            let (o, t) = catalog(attnum);
            m.with_origins(db, o, t)
        };
        let shared = |a: &Masker, b: &Masker| Arc::ptr_eq(&a.origins, &b.origins) && Arc::ptr_eq(&a.tables, &b.tables);
        let (a, b) = (session("orders", 2), session("orders", 2));
        assert!(shared(&a, &b));
        assert!(shared(&a, &b.with_charset(Charset::SingleByte)), "whatever the client's charset");
        assert!(!shared(&a, &session("archive", 2)), "another database has its own");
        let changed = session("orders", 3);
        assert!(!shared(&a, &changed) && changed.origins.contains_key(&(16384, 3)), "the schema changed");
        assert!(shared(&changed, &session("orders", 3)), "and later sessions share the new one");
        // A catalog goes with the last session that holds it.
        let held = |db: &str| m.catalogs.lock().get(db).is_some_and(|(o, _)| o.strong_count() > 0);
        drop((a, b));
        assert!(!held("archive") && held("orders"), "`changed` still holds orders");
        drop(changed);
        assert!(!held("orders"));
        // Client-chosen database names cannot make it keep catalogs without end.
        let sessions: Vec<Masker> = (0..100).map(|i| session(&format!("db{i}"), 2)).collect();
        assert!(m.catalogs.lock().len() <= MAX_CATALOGS);
        drop(sessions);
    }

    #[test]
    fn a_result_column_is_masked_by_its_name_or_its_source() {
        let m = masker(vec![
            Rule { name: "a".into(), target: Target::Columns(vec![Glob::new("ssn")]), style: Style::Redact },
            Rule { name: "d".into(), target: Target::Detect(vec![Kind::Email]), style: Style::Hash },
        ]);
        let table = |style, columns: &[&str]| MaskedTable {
            style,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            holding: Default::default(),
        };
        let tables = MaskedTables::from([
            ("vault".into(), table(Style::Partial, &["id", "ssn"])),
            ("people".into(), table(Style::Hash, &["email"])),
        ]);
        let m = m.with_origins("db", Origins::from([((16384, 3), Style::Partial)]), tables);
        assert_eq!(m.column_from("x", (16384, 3), false), ColumnMask::Whole(Style::Partial), "an alias of ssn");
        assert_eq!(
            m.column_from("ssn", (16384, 3), false),
            ColumnMask::Whole(Style::Redact),
            "the stricter: the name's"
        );
        let partial_names = masker(vec![Rule {
            name: "p".into(),
            target: Target::Columns(vec![Glob::new("email")]),
            style: Style::Partial,
        }]);
        let renamed =
            partial_names.with_origins("db", Origins::from([((16384, 3), Style::Redact)]), Default::default());
        let mask = renamed.column_from("email", (16384, 3), false);
        assert_eq!(mask, ColumnMask::Whole(Style::Redact), "the stricter: the source's (`SELECT ssn AS email`)");
        assert_eq!(m.column_from("x", (16384, 2), false), ColumnMask::Detect);
        // Values not stored in a user table's column may be text the client chose: redacted.
        assert_eq!(m.column_from("x", (0, 0), false), ColumnMask::DetectStrict, "an expression of unmasked tables");
        assert_eq!(m.column_from("query", (12000, 20), false), ColumnMask::DetectStrict, "a system view's column");
        assert_eq!(m.column_from("ssn", (0, 0), false), ColumnMask::Whole(Style::Redact), "a computed value named ssn");
        // Computed values of a statement naming a masked column or reading whole rows of a
        // table with masked columns may be made of them.
        let reads = |cols: &[&str], whole_rows, qualified: &[(&str, &str)]| crate::sql::Reads {
            columns: cols.iter().map(|c| c.to_string()).collect(),
            whole_rows,
            qualified: qualified.iter().map(|(q, c)| (q.to_string(), c.to_string())).collect(),
            aliases: [("v".to_string(), ["vault".to_string()].into())].into(),
            runs_sql: false,
        };
        let tables = ["public.Vault".to_string(), "t".to_string()];
        assert!(m.computed(&tables, &reads(&["id", "SSN"], false, &[]), false), "ssn's rule");
        assert!(m.computed(&["t".to_string()], &reads(&["ssn"], false, &[]), false), "any table");
        let computed = m.computed(&tables, &reads(&["id"], true, &[]), false);
        assert!(computed, "a whole row of vault");
        assert!(!m.computed(&tables, &reads(&["id"], false, &[]), false), "count(*), id + 1: nothing masked read");
        assert!(!m.computed(&tables, &reads(&["id"], false, &[("v", "id")]), false), "v.id is a column");
        assert!(
            m.computed(&tables, &reads(&["row_to_json"], false, &[("v", "row_to_json")]), false),
            "v.row_to_json is a function of the row"
        );
        assert!(!m.computed(&tables, &reads(&["x"], false, &[("t", "x")]), false), "t is not masked");
        // Names as the classifier holds them: a quote or dot in a name keeps it quoted.
        let quoted = MaskedTables::from([("x\"y".into(), table(Style::Hash, &["ssn"]))]);
        let q = m.with_origins("db", Origins::new(), quoted);
        let whole = reads(&["t"], true, &[]);
        assert!(q.computed(&["s.\"x\"\"y\"".to_string()], &whole, false));
        assert!(m.computed(&[], &reads(&[], false, &[]), true), "a FETCH: may read any masked column");
        // A column whose type holds a masked field is masked by what it holds, not its name.
        let mut folks = table(Style::Redact, &["id", "who"]);
        folks.holding.insert("who".into());
        let h = m.with_origins("db", Origins::new(), MaskedTables::from([("folks".into(), folks)]));
        assert!(h.computed(&["folks".to_string()], &reads(&["WHO"], false, &[]), false), "who[1], (who).ssn");
        assert!(!h.computed(&["folks".to_string()], &reads(&["id"], false, &[]), false));
        assert!(!h.computed(&["t".to_string()], &reads(&["who"], false, &[]), false), "another table's who");
        // Computed and whole-row values are redacted, not shown in part or hashed: `substr(ssn,
        // 5, 4)` under `partial` would show any four characters the client picks.
        assert_eq!(m.column_from("x", (0, 0), computed), ColumnMask::Whole(Style::Redact));
        assert_eq!(m.column_from("x", (16384, 0), computed), ColumnMask::Whole(Style::Redact), "a whole row");
        assert_eq!(m.column_from("x", (16384, 2), computed), ColumnMask::Detect, "a column not masked");
    }

    #[test]
    fn first_column_rule_wins_else_detectors() {
        let m = masker(vec![
            Rule { name: "a".into(), target: Target::Columns(vec![Glob::new("email")]), style: Style::Redact },
            Rule { name: "b".into(), target: Target::Columns(vec![Glob::new("e*")]), style: Style::Hash },
            Rule { name: "c".into(), target: Target::Detect(vec![Kind::Email]), style: Style::Partial },
        ]);
        assert_eq!(m.column("Email"), ColumnMask::Whole(Style::Redact));
        assert_eq!(m.column("extra"), ColumnMask::Whole(Style::Hash));
        assert_eq!(m.column("note"), ColumnMask::Detect);
        let m = masker(vec![Rule {
            name: "a".into(),
            target: Target::Columns(vec![Glob::new("x")]),
            style: Style::Redact,
        }]);
        assert_eq!(m.column("y"), ColumnMask::Keep);
    }

    #[test]
    fn a_later_finding_that_overlaps_an_earlier_one_is_masked_with_it() {
        let m = Masker::new(
            &[Rule { name: "d".into(), target: Target::Detect(vec![Kind::Phone, Kind::Email]), style: Style::Redact }],
            [1; 32],
        );
        // The phone ends inside the e-mail's local part: none of the address stays in clear.
        let (out, c) = masked(&m, "call 415-555-0123.x@example.com now");
        assert_eq!(out, "call [REDACTED] now");
        assert_eq!(c.to_map(), [("phone".to_string(), 1)].into());
        // Merged, a finding keeps the stricter style: a partial phone does not show the last
        // characters of a redacted e-mail.
        let m = Masker::new(
            &[
                Rule { name: "p".into(), target: Target::Detect(vec![Kind::Phone]), style: Style::Partial },
                Rule { name: "e".into(), target: Target::Detect(vec![Kind::Email]), style: Style::Redact },
            ],
            [1; 32],
        );
        assert_eq!(masked(&m, "call 415-555-0123.x@example.com now").0, "call [REDACTED] now");
    }

    #[test]
    fn detectors_find_values_inside_text() {
        let m = detect_all(Style::Redact);
        let (out, c) = masked(&m, "mail alice@example.com or bob.smith+x@mail.example.org now");
        assert_eq!(out, "mail [REDACTED] or [REDACTED] now");
        assert_eq!(c.to_map(), [("email".to_string(), 2)].into());
        // Luhn-valid card numbers, with or without separators; an invalid one stays.
        let (out, c) = masked(&m, "card 4111 1111 1111 1111, 4111-1111-1111-1112, 5500005555555559");
        assert_eq!(out, "card [REDACTED], 4111-1111-1111-1112, [REDACTED]");
        assert_eq!(c.to_map(), [("credit_card".to_string(), 2)].into());
        // Next to other numbers: a CVV, an amount before it. A long number is not cut to make one.
        let (out, c) = masked(&m, "card 4111 1111 1111 1111 123, paid 2 4111111111111111; id 14111111111111111");
        assert_eq!(out, "card [REDACTED] 123, paid 2 [REDACTED]; id 14111111111111111");
        assert_eq!(c.to_map(), [("credit_card".to_string(), 2)].into());
        // A shorter stretch that passes by chance does not leave the rest of the card in clear.
        assert_eq!(cards(b"6 4111 1111 1111 1111"), [(0, 21)], "6 4111 1111 1111 passes too");
        let (out, _) = masked(&m, "ssn 123-45-6789 but not 000-12-3456 or 666-12-3456");
        assert_eq!(out, "ssn [REDACTED] but not 000-12-3456 or 666-12-3456");
        let (out, c) = masked(&m, "call +1 415 555 0100 or (415) 555-0199 or 415-555-0123");
        assert_eq!(out, "call [REDACTED] or [REDACTED] or [REDACTED]");
        assert_eq!(c.to_map(), [("phone".to_string(), 3)].into());
        let (out, c) = masked(&m, "key AKIAIOSFODNN7EXAMPLE token ghp_abcdefghijklmnopqrstuvwxyz0123456789");
        assert_eq!(out, "key [REDACTED] token [REDACTED]");
        assert_eq!(c.to_map(), [("secret".to_string(), 2)].into());
        // Well-known token formats, some with neither `_` nor `-` nor seven digits.
        for token in [
            "AIzaSyDaGmWKa4JsXZHjGw7ISLnAbCdEfGhIjKl",
            "npm_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
            "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
            "SG.abcdefghijklmnopqrstuv.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ",
            "pypi-AgEIcHlwaS5vcmcCJDAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMAACKlsz",
            "shpat_0123456789abcdef0123456789abcdef",
            "dop_v1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let (out, c) = masked(&m, &format!("key={token};"));
            assert_eq!((out.as_str(), c.total()), ("key=[REDACTED];", 1), "{token}");
        }
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(masked(&m, jwt).0, "[REDACTED]");
        // `_` and letters next to a value do not hide it; digits next to a number do.
        let (out, c) = masked(
            &m,
            "acct_4111111111111111 ssn_123-45-6789x id9-123-45-6789,987-65-4321 tel_415-555-0123 \
             key_AKIAIOSFODNN7EXAMPLE my_ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        );
        assert_eq!(
            out,
            "acct_[REDACTED] ssn_[REDACTED]x id9-[REDACTED],987-65-4321 tel_[REDACTED] \
             key_[REDACTED] my_[REDACTED]"
        );
        assert_eq!(
            c.to_map(),
            [
                ("credit_card".to_string(), 1),
                ("ssn".to_string(), 2),
                ("phone".to_string(), 1),
                ("secret".to_string(), 2)
            ]
            .into()
        );
        assert_eq!(masked(&m, "ssn 123-45-6789 123-45-6788").0, "ssn [REDACTED] [REDACTED]", "one space between");
        assert_eq!(masked(&m, "call +1 415 555 0100_home").0, "call [REDACTED]_home");
        // A value's last byte, or the guard after it, can stand before the next value.
        for (text, want) in [
            ("1(800)555-0199", "1[REDACTED]"),
            ("+14155550100+14155550101", "[REDACTED][REDACTED]"),
            ("(415) 555-0123(415) 555-0124", "[REDACTED][REDACTED]"),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMII\n-----END RSA PRIVATE KEY-----AKIAIOSFODNN7EXAMPLE",
                "[REDACTED][REDACTED]",
            ),
            // A key with no END is masked to the end of the text.
            ("x -----BEGIN PRIVATE KEY-----\nMIIE", "x [REDACTED]"),
            // A token longer than its format is masked whole.
            ("npm_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN;", "[REDACTED];"),
        ] {
            assert_eq!(masked(&m, text).0, want, "{text}");
        }
        for plain in [
            "1123-45-6789",
            "123-45-67890",
            "AKIAIOSFODNN7EXAMPLEX",
            "xAKIAIOSFODNN7EXAMPLE",
            "task-force-assignment-list-is-long",
            "0415-555-01234",
        ] {
            assert_eq!(masked(&m, plain), (plain.to_string(), Counts::default()), "{plain}");
        }
        // Ordinary values are left alone.
        for plain in ["order 42 shipped", "2026-11-25", "12345", "a-b_c", "3.14159"] {
            assert_eq!(masked(&m, plain), (plain.to_string(), Counts::default()), "{plain}");
        }
    }

    #[test]
    fn styles() {
        let m = detect_all(Style::Partial);
        assert_eq!(masked(&m, "4111111111111111").0, "************1111");
        assert_eq!(partial("abc".as_bytes(), Charset::Utf8), b"***");
        assert_eq!(partial("ñandú-1234".as_bytes(), Charset::Utf8), "******1234".as_bytes());
        // LATIN1 bytes: 0xA1-0xBF are characters, not UTF-8 continuations.
        assert_eq!(partial(b"\xa1\xa2\xa3\xa4\xa5\xa6", Charset::Utf8), b"**\xa3\xa4\xa5\xa6");
        assert_eq!(partial(b"secret\xe9t\xe9", Charset::Utf8), b"*****t\xe9t\xe9");
        assert_eq!(partial(b"abcdefgh\xa1\xa2\xa3", Charset::Utf8), b"*******h\xa1\xa2\xa3", "not efgh and three more");
        // In LATIN1 `Ã©` is two characters, though its bytes are UTF-8 for `é`.
        assert_eq!(partial(b"\xc3\xa9\xc3\xa9\xc3\xa9", Charset::SingleByte), b"**\xc3\xa9\xc3\xa9");
        assert_eq!(partial(b"\xc3\xa9\xc3\xa9\xc3\xa9", Charset::Utf8), b"***", "three UTF-8 characters");
        // EUC-JP: two-byte kanji, SS2 kana (two bytes), SS3 (three).
        let euc = Charset::Euc { ss2: 2, ss3: 3 };
        assert_eq!(partial(b"ab\xb0\xa1\x8e\xb1\x8f\xb0\xa1c", euc), b"**\xb0\xa1\x8e\xb1\x8f\xb0\xa1c");
        assert_eq!(partial(b"abcdef\x8f\xb0", euc), b"***def\x8f\xb0", "a character cut short counts");
        // A masker told its client's charset applies it.
        let m = Masker::new(&[], [0; 32]).with_charset(Charset::SingleByte);
        assert_eq!(m.whole(Style::Partial, b"\xc3\xa9\xc3\xa9\xc3\xa9"), b"**\xc3\xa9\xc3\xa9");
        let h = detect_all(Style::Hash);
        let a = masked(&h, "alice@example.com").0;
        assert!(a.starts_with("hash:") && a.len() == 21, "{a}");
        assert_eq!(a, masked(&h, "alice@example.com").0, "deterministic");
        assert_ne!(a, masked(&h, "bob@example.com").0);
        let other_key = Masker::new(&h.rules, [8; 32]);
        assert_ne!(a, masked(&other_key, "alice@example.com").0, "keyed");
    }

    #[test]
    fn luhn_checks() {
        // One group, found whole or not at all.
        assert_eq!(cards(b"4111111111111111"), [(0, 16)]);
        assert_eq!(cards(b"378282246310005"), [(0, 15)]);
        assert!(cards(b"4111111111111112").is_empty());
        assert!(cards(b"123").is_empty());
    }

    #[test]
    fn overlapping_findings_merge_into_the_earliest_kind_and_strictest_style() {
        let f = |start, end, kind, style, rank| Finding { start, end, kind, style, rank };
        let old = vec![f(0, 16, Kind::CreditCard, Style::Hash, 0), f(30, 40, Kind::Ssn, Style::Partial, 1)];
        // A phone number reaching from the card into the ssn, and one on its own.
        let new = vec![f(10, 32, Kind::Phone, Style::Redact, 2), f(50, 60, Kind::Phone, Style::Redact, 2)];
        assert_eq!(
            merge_findings(old, new),
            [f(0, 40, Kind::CreditCard, Style::Redact, 0), f(50, 60, Kind::Phone, Style::Redact, 2)]
        );
        // Touching is not overlapping.
        let touching =
            merge_findings(vec![f(0, 5, Kind::Email, Style::Hash, 0)], vec![f(5, 9, Kind::Phone, Style::Hash, 1)]);
        assert_eq!(touching.len(), 2);
        // Hundreds of thousands of findings in one value: one sweep per detector.
        let m = detect_all(Style::Hash);
        let (out, c) = masked(&m, &"a@b.co 4111111111111111 ".repeat(100_000));
        assert_eq!(c.to_map(), [("email".to_string(), 100_000), ("credit_card".to_string(), 100_000)].into());
        assert!(!out.contains("a@b.co") && !out.contains("4111"));
        // Refused candidates and guarded patterns: still one pass.
        let (out, c) = masked(&m, &"000-12-3456 123-45-6789 key_AKIAIOSFODNN7EXAMPLE xsk-".repeat(50_000));
        assert_eq!(c.to_map(), [("ssn".to_string(), 50_000), ("secret".to_string(), 50_000)].into());
        assert!(out.contains("000-12-3456") && !out.contains("6789") && !out.contains("AKIA"));
        // Keys that never end: each is masked to the end, and each search goes on from there.
        let (out, c) = masked(&m, &"-----BEGIN RSA PRIVATE KEY----- AKIAIOSFODNN7EXAMPLE ".repeat(50_000));
        assert_eq!((out.len(), c.total()), ("hash:".len() + 16, 1), "one finding: {}", &out[..40.min(out.len())]);
        let (_, c) = masked(&m, &"-----END PRIVATE KEY----- AKIAIOSFODNN7EXAMPLE ".repeat(50_000));
        assert_eq!(c.total(), 50_000);
    }

    /// The card search as first written: every stretch of whole groups, each checked anew.
    fn cards_by_stretch(run: &[u8]) -> Vec<(usize, usize)> {
        let luhn = |c: &[u8]| {
            let d: Vec<u32> = c.iter().filter(|b| b.is_ascii_digit()).map(|b| u32::from(b - b'0')).collect();
            let sum: u32 = d
                .iter()
                .rev()
                .enumerate()
                .map(|(i, &x)| if i % 2 == 1 { if x > 4 { 2 * x - 9 } else { 2 * x } } else { x })
                .sum();
            (13..=19).contains(&d.len()) && sum.is_multiple_of(10)
        };
        let mut groups = Vec::new();
        let mut start = 0;
        for (i, &b) in run.iter().enumerate() {
            if !b.is_ascii_digit() {
                groups.push((start, i));
                start = i + 1;
            }
        }
        groups.push((start, run.len()));
        let mut found: Vec<(usize, usize)> = Vec::new();
        for i in 0..groups.len() {
            let mut digits = 0;
            for &(s, e) in &groups[i..] {
                digits += e - s;
                if digits > 19 {
                    break;
                }
                if digits >= 13 && luhn(&run[groups[i].0..e]) {
                    match found.last_mut() {
                        Some(last) if groups[i].0 <= last.1 => last.1 = last.1.max(e),
                        _ => found.push((groups[i].0, e)),
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_card_search_finds_what_checking_every_stretch_finds() {
        // Runs as the detector's pattern makes them: digit groups, one space or dash between.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut with_cards = 0;
        for _ in 0..20_000 {
            let mut run = Vec::new();
            for g in 0..1 + next(8) {
                if g > 0 {
                    run.push(if next(2) == 0 { b' ' } else { b'-' });
                }
                let most = if next(3) == 0 { 19 } else { 5 };
                for _ in 0..1 + next(most) {
                    run.push(b'0' + next(10) as u8);
                }
            }
            let found = cards(&run);
            assert_eq!(found, cards_by_stretch(&run), "{}", String::from_utf8_lossy(&run));
            with_cards += usize::from(!found.is_empty());
        }
        assert!(with_cards > 500, "the runs hold cards too: {with_cards}");
    }
}
