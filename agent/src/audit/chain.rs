//! The hash chain: sealing a record into a line and checking a sequence of lines. Pure.
//!
//! A line is `{"hash":"<sha256 of BODY>",` followed by BODY without its opening brace, where
//! BODY is the entry's JSON (`seq`, `time`, `prev` = previous line's hash, then the record).
//! Hashing the exact bytes written avoids any dependence on re-serialisation.
use sha2::{Digest, Sha256};

use super::record::{Entry, Record};

const PREFIX: &str = "{\"hash\":\"";
const HASH_LEN: usize = 64;

/// A record's hash as lines carry it: 64 lowercase hex digits, kept inline (a head is replaced
/// for every record sealed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hash([u8; HASH_LEN]);

impl Hash {
    /// `s` if it is 64 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Hash> {
        let b: [u8; HASH_LEN] = s.as_bytes().try_into().ok()?;
        b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')).then_some(Hash(b))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the chain stands: the last sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

impl Head {
    pub fn genesis() -> Self {
        Self { seq: 0, hash: Hash([b'0'; HASH_LEN]) }
    }
}

fn digest(body: &[u8]) -> Hash {
    Hash::of(&Sha256::digest(body).into())
}

/// Each byte's two lowercase hex digits: every record's hash is written in hex.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    t
};

impl Hash {
    fn of(digest: &[u8; 32]) -> Hash {
        let mut hex = [0u8; HASH_LEN];
        for (pair, &byte) in hex.chunks_exact_mut(2).zip(digest) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
        }
        Hash(hex)
    }
}

/// Seals `record` as the entry after `head`: appends its line (with '\n') to `out` and returns
/// the new head.
pub fn seal(head: &Head, time: &str, record: &Record, out: &mut Vec<u8>) -> Head {
    seal_with(head, time, out, |body| serde_json::to_writer(body, record).expect("audit records always serialise"))
}

/// `seal` for a record that writes its own JSON object into the buffer it is given.
///
/// The body is the JSON of an `Entry`, written field by field (the same bytes serde's
/// flattening would give, without its map detour) straight into `out` behind a placeholder
/// for its hash: this runs once per audited message.
pub fn seal_with(head: &Head, time: &str, out: &mut Vec<u8>, record: impl FnOnce(&mut Vec<u8>)) -> Head {
    let seq = head.seq + 1;
    out.extend_from_slice(PREFIX.as_bytes());
    let hash_at = out.len();
    out.extend_from_slice(&[b'0'; HASH_LEN]);
    out.extend_from_slice(b"\",");
    // The body's opening brace is the line's, before `hash`; it is hashed, not stored here.
    let body_at = out.len();
    // Written by hand, not with `write!`: this runs for every audited message.
    out.extend_from_slice(b"\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b",\"time\":");
    super::record::json_string(out, time);
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(&head.hash.0);
    out.push(b'"');
    let record_at = out.len();
    record(out);
    // The record's own opening brace becomes the separator after `prev`.
    out[record_at] = b',';
    let hash = Hash::of(&Sha256::new().chain_update(b"{").chain_update(&out[body_at..]).finalize().into());
    out[hash_at..hash_at + HASH_LEN].copy_from_slice(&hash.0);
    out.push(b'\n');
    Head { seq, hash }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("line {line}: malformed record ({detail})")]
    Malformed { line: usize, detail: String },
    #[error("line {line}: record seq {seq} was altered (its hash does not match its content)")]
    Altered { line: usize, seq: u64 },
    #[error("line {line}: record seq {seq} does not follow the record before it (a record was altered or replaced)")]
    BrokenLink { line: usize, seq: u64 },
    #[error("line {line}: records seq {first}..={last} are missing (deleted)")]
    Missing { line: usize, first: u64, last: u64 },
    #[error("line {line}: record seq {seq} is out of order (expected seq {expected})")]
    OutOfOrder { line: usize, seq: u64, expected: u64 },
    #[error("truncated tail: the last line (line {line}) is incomplete after record seq {after_seq}")]
    Truncated { line: usize, after_seq: u64 },
    #[error(
        "the trail starts at record seq {first}: records 1..={} are gone, and no audit_rotated record says \
         they were removed",
        first - 1
    )]
    Unexplained { first: u64 },
}

/// Splits a sealed line into its claimed hash and its body (with the opening brace restored).
fn split(line: &str) -> Option<(&str, String)> {
    let rest = line.strip_prefix(PREFIX)?;
    if rest.len() < HASH_LEN + 2 || !rest.is_char_boundary(HASH_LEN) {
        return None;
    }
    let (hash, rest) = rest.split_at(HASH_LEN);
    let rest = rest.strip_prefix("\",")?;
    Some((hash, format!("{{{rest}")))
}

/// Checks one line against the head before it; returns the entry and the new head.
pub fn check_line(head: &Head, line_no: usize, line: &str) -> Result<(Entry, Head), ChainError> {
    let malformed = |detail: &str| ChainError::Malformed { line: line_no, detail: detail.to_string() };
    let (hash, body) = split(line).ok_or_else(|| malformed("no leading hash"))?;
    let entry: Entry = serde_json::from_str(&body).map_err(|e| malformed(&e.to_string()))?;
    // Content first: an edited seq is an alteration, not a gap.
    let digest = digest(body.as_bytes());
    if digest.as_str() != hash {
        return Err(ChainError::Altered { line: line_no, seq: entry.seq });
    }
    let expected = head.seq + 1;
    if entry.seq > expected {
        return Err(ChainError::Missing { line: line_no, first: expected, last: entry.seq - 1 });
    }
    if entry.seq < expected {
        return Err(ChainError::OutOfOrder { line: line_no, seq: entry.seq, expected });
    }
    if entry.prev != head.hash.as_str() {
        return Err(ChainError::BrokenLink { line: line_no, seq: entry.seq });
    }
    let head = Head { seq: entry.seq, hash: digest };
    Ok((entry, head))
}

/// Checks a trail line by line, from its first.
pub struct Verifier {
    head: Head,
    lines: usize,
    /// The line before could not be read: this one cannot link to anything known.
    resync: bool,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier { head: Head::genesis(), lines: 0, resync: false }
    }
}

impl Verifier {
    /// A verifier for a trail whose first line is `first`: one that starts after seq 1 (its
    /// oldest segments were removed) is taken to link to what its first record names; whether
    /// that removal was recorded is for the caller to check.
    pub fn starting_at(first: &str) -> Self {
        let start = split(first)
            .and_then(|(_, body)| serde_json::from_str::<Entry>(&body).ok())
            .filter(|e| e.seq > 1)
            .and_then(|e| Some(Head { seq: e.seq - 1, hash: Hash::parse(&e.prev)? }));
        Verifier { head: start.unwrap_or_else(Head::genesis), ..Verifier::default() }
    }

    /// The lines that follow come from another file: line numbers count from 1 again.
    pub fn next_file(&mut self) {
        self.lines = 0;
    }

    /// `line`, for a line read as bytes. The agent writes UTF-8 only, and a record's hash is
    /// of its bytes: a line that is not UTF-8 was changed, even where replacing what is not
    /// (with U+FFFD) gives back the text that was hashed.
    pub fn line_bytes(&mut self, raw: &[u8], complete: bool) -> Result<Entry, ChainError> {
        match std::str::from_utf8(raw) {
            Ok(text) => self.line(text, complete),
            Err(_) => {
                let entry = self.line(&String::from_utf8_lossy(raw), complete)?;
                Err(ChainError::Altered { line: self.lines, seq: entry.seq })
            }
        }
    }

    /// Checks the next line (without its newline); `complete`: it ended with one. After a
    /// break the lines that follow are checked against the broken one where it can be read,
    /// so every break is found and each is reported once.
    pub fn line(&mut self, line: &str, complete: bool) -> Result<Entry, ChainError> {
        self.lines += 1;
        if !complete {
            return Err(ChainError::Truncated { line: self.lines, after_seq: self.head.seq });
        }
        let resync = std::mem::take(&mut self.resync);
        let e = match check_line(&self.head, self.lines, line) {
            Ok((entry, head)) => {
                self.head = head;
                return Ok(entry);
            }
            Err(e) => e,
        };
        let Some((hash, body)) = split(line) else {
            self.resync = true;
            return Err(e);
        };
        let (Ok(entry), Some(claimed)) = (serde_json::from_str::<Entry>(&body), Hash::parse(hash)) else {
            self.resync = true;
            return Err(e);
        };
        // An edited record still carries the hash its successor links to.
        let hash = if matches!(e, ChainError::Altered { .. }) { claimed } else { digest(body.as_bytes()) };
        self.head = Head { seq: entry.seq, hash };
        if resync
            && matches!(e, ChainError::BrokenLink { .. } | ChainError::Missing { .. } | ChainError::OutOfOrder { .. })
        {
            return Ok(entry);
        }
        Err(e)
    }

    /// The last record checked.
    pub fn head(&self) -> &Head {
        &self.head
    }
}

/// Verifies a whole trail held in memory; returns the final head, or the first break.
pub fn verify(text: &str) -> Result<Head, ChainError> {
    let mut v = Verifier::default();
    let mut rest = text;
    while !rest.is_empty() {
        let (line, complete, next) = match rest.split_once('\n') {
            Some((line, next)) => (line, true, next),
            None => (rest, false, ""),
        };
        v.line(line, complete)?;
        rest = next;
    }
    Ok(v.head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Kind;

    fn trail(n: u64) -> (Vec<String>, Head) {
        let mut head = Head::genesis();
        let mut lines = Vec::new();
        for i in 0..n {
            let mut r = Record::new(Kind::Connect);
            r.pid = Some(100 + i as u32);
            r.destination = Some("127.0.0.1:5432".into());
            let mut line = Vec::new();
            head = seal(&head, &format!("2026-11-25T00:00:0{i}Z"), &r, &mut line);
            lines.push(String::from_utf8(line).unwrap());
        }
        (lines, head)
    }

    #[test]
    fn sealed_body_is_the_entry_as_serde_writes_it() {
        let mut r = Record::new(Kind::Statement);
        r.statement = Some("SELECT '\"quoted\"\\n'".into());
        r.refs = Some(vec![1, 2]);
        let head = Head { seq: 41, hash: Hash::parse(&"ab".repeat(32)).unwrap() };
        let mut line = Vec::new();
        let h = seal(&head, "2026-11-26T00:00:00Z", &r, &mut line);
        let line = String::from_utf8(line).unwrap();
        let entry = Entry { seq: 42, time: "2026-11-26T00:00:00Z".into(), prev: head.hash.as_str().into(), record: r };
        let expected = serde_json::to_string(&entry).unwrap();
        assert_eq!(line, format!("{PREFIX}{}\",{}\n", digest(expected.as_bytes()).as_str(), &expected[1..]));
        assert_eq!(h.seq, 42);
        assert_eq!(h.hash, digest(expected.as_bytes()));
    }

    #[test]
    fn a_hash_is_its_digest_in_lowercase_hex() {
        for body in [&b""[..], b"{}", b"\x00\xff\x10 any bytes"] {
            let d: [u8; 32] = Sha256::digest(body).into();
            assert_eq!(Hash::of(&d).as_str(), hex::encode(d));
        }
        let all: [u8; 32] = std::array::from_fn(|i| (i * 8 + 7) as u8);
        assert_eq!(Hash::of(&all).as_str(), hex::encode(all));
    }

    #[test]
    fn hashes_are_64_lowercase_hex_digits() {
        let h = "0123456789abcdef".repeat(4);
        assert_eq!(Hash::parse(&h).map(|h| h.as_str().to_string()), Some(h.clone()));
        for bad in [&h[1..], &h.to_uppercase(), &format!("{}g", &h[1..]), &format!("{h}0"), ""] {
            assert_eq!(Hash::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn intact_trail_verifies() {
        let (lines, head) = trail(5);
        assert_eq!(verify(&lines.concat()), Ok(head));
        assert_eq!(verify(""), Ok(Head::genesis()));
    }

    #[test]
    fn edited_record_is_named() {
        let (mut lines, _) = trail(5);
        lines[2] = lines[2].replace("\"pid\":102", "\"pid\":999");
        assert_eq!(verify(&lines.concat()), Err(ChainError::Altered { line: 3, seq: 3 }));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_an_alteration() {
        let mut head = Head::genesis();
        let mut raw = Vec::new();
        for statement in ["SELECT 1", "SELECT '\u{FFFD}'", "SELECT 2"] {
            let mut r = Record::new(Kind::Statement);
            r.statement = Some(statement.into());
            head = seal(&head, "2026-11-25T00:00:00Z", &r, &mut raw);
        }
        let check = |raw: &[u8]| {
            let mut v = Verifier::default();
            raw.split_inclusive(|&b| b == b'\n').map(|l| v.line_bytes(&l[..l.len() - 1], true)).collect::<Vec<_>>()
        };
        assert!(check(&raw).iter().all(Result::is_ok));
        // The replacement character's bytes, changed to one that is not UTF-8.
        let at = raw.windows(3).position(|w| w == "\u{FFFD}".as_bytes()).unwrap();
        raw.splice(at..at + 3, [0xff]);
        let results = check(&raw);
        assert_eq!(results[1].as_ref().unwrap_err(), &ChainError::Altered { line: 2, seq: 2 });
        assert!(results[0].is_ok() && results[2].is_ok(), "the chain goes on past it");
    }

    #[test]
    fn rehashed_edit_breaks_the_next_link() {
        let (mut lines, _) = trail(5);
        // An attacker who recomputes the edited record's own hash still breaks the chain.
        let (_, body) = split(lines[2].trim_end()).unwrap();
        let body = body.replace("\"pid\":102", "\"pid\":999");
        lines[2] = format!("{PREFIX}{}\",{}\n", digest(body.as_bytes()).as_str(), &body[1..]);
        assert_eq!(verify(&lines.concat()), Err(ChainError::BrokenLink { line: 4, seq: 4 }));
    }

    #[test]
    fn edited_seq_is_an_alteration() {
        let (mut lines, _) = trail(5);
        lines[2] = lines[2].replace("\"seq\":3", "\"seq\":7");
        assert_eq!(verify(&lines.concat()), Err(ChainError::Altered { line: 3, seq: 7 }));
    }

    #[test]
    fn deleted_record_is_reported() {
        let (mut lines, _) = trail(5);
        lines.remove(1);
        assert_eq!(verify(&lines.concat()), Err(ChainError::Missing { line: 2, first: 2, last: 2 }));
    }

    #[test]
    fn reordered_records_are_reported() {
        let (mut lines, _) = trail(5);
        lines.swap(1, 2);
        assert_eq!(verify(&lines.concat()), Err(ChainError::Missing { line: 2, first: 2, last: 2 }));
        let (mut lines, _) = trail(5);
        lines.swap(3, 1);
        assert!(matches!(verify(&lines.concat()), Err(ChainError::Missing { line: 2, .. })));
    }

    #[test]
    fn truncated_tail_is_reported_as_such() {
        let (lines, _) = trail(3);
        let all = lines.concat();
        let cut = &all[..all.len() - 10];
        assert_eq!(verify(cut), Err(ChainError::Truncated { line: 3, after_seq: 2 }));
    }

    /// Every break of a trail, as `audit verify` lists them.
    fn breaks(lines: &[String]) -> Vec<ChainError> {
        let mut v = Verifier::default();
        lines.iter().filter_map(|l| v.line(l.trim_end_matches('\n'), l.ends_with('\n')).err()).collect()
    }

    #[test]
    fn every_break_is_found_and_each_reported_once() {
        let (mut lines, _) = trail(12);
        lines[2] = lines[2].replace("\"pid\":102", "\"pid\":999");
        lines.remove(5);
        lines.insert(7, "not a record\n".into());
        assert_eq!(
            breaks(&lines),
            [
                ChainError::Altered { line: 3, seq: 3 },
                ChainError::Missing { line: 6, first: 6, last: 6 },
                ChainError::Malformed { line: 8, detail: "no leading hash".into() },
            ]
        );
        // A garbage line in place of a record: one break, not one more for its successor.
        let (mut lines, _) = trail(5);
        lines[2] = "{}\n".into();
        assert_eq!(breaks(&lines).len(), 1, "{:?}", breaks(&lines));
        assert!(breaks(&trail(5).0).is_empty());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for text in ["x\n", "{\"hash\":\"\n", "{\"hash\":\"é\",}\n", "{}\n"] {
            assert!(matches!(verify(text), Err(ChainError::Malformed { line: 1, .. })), "{text}");
        }
    }
}
