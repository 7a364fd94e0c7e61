//! Masking of result messages: RowDescription -> per-column plan, DataRow, COPY rows, and the
//! text fields of ErrorResponse/NoticeResponse. Pure: bytes in, bytes out.
use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{MAX_MESSAGE, WireError};
use crate::{
    mask::{ColumnMask, Counts, Masker, REDACTED},
    sql::{CopyFormat, CopyOut},
};

/// How a column's type lets it be masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeClass {
    /// Strings: any masked text is a valid value, in text and binary format alike.
    Str,
    /// json and jsonb: a masked whole value must become a JSON string.
    Json,
    /// Arrays of strings: in the text format each element is masked as a string.
    StrArray,
    /// Types defined in the database (enums, domains, citext): text format is a string,
    /// binary format is unknown.
    UserDefined,
    /// Numbers, dates, uuids, bytea...: no masked form is valid, so masking means NULL.
    Other,
}

fn type_class(oid: u32) -> TypeClass {
    match oid {
        25 | 1043 | 1042 | 19 | 705 => TypeClass::Str,
        JSON | JSONB => TypeClass::Json,
        1009 | 1015 | 1014 | 1003 => TypeClass::StrArray,
        o if o >= 16384 => TypeClass::UserDefined,
        _ => TypeClass::Other,
    }
}

const JSON: u32 = 114;
const JSONB: u32 = 3802;
const JSON_ARRAY: u32 = 199;
const JSONB_ARRAY: u32 = 3807;

/// What to do with each column of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    cols: Vec<Col>,
    /// Some column needs looking at; otherwise rows are relayed untouched.
    active: bool,
    /// How detectors treat values past the known columns (`Detect` or `DetectStrict`).
    rest: ColumnMask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Col {
    mask: ColumnMask,
    binary: bool,
    type_oid: u32,
    /// Masked whole, and not a stored value: the client wrote what computes it, so every
    /// value, NULL too, is sent alike (`constant_value`). A NULL left as it is would answer
    /// a question per value (`CASE WHEN <test on a masked value> THEN 'x' END`).
    constant: bool,
}

fn malformed(what: &'static str, detail: &'static str) -> WireError {
    WireError::Malformed { what, detail }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn cstr(&mut self) -> Result<&'a [u8], WireError> {
        let end = self.b.iter().position(|&c| c == 0).ok_or(malformed(self.what, "unterminated string"))?;
        let s = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(s)
    }
}

impl Plan {
    /// Builds the plan from a RowDescription ('T') body; `computed`: whether the statement's
    /// computed columns are redacted (`Masker::computed`).
    pub fn from_row_description(body: &[u8], masker: &Masker, computed: bool) -> Result<Plan, WireError> {
        let mut r = Reader { b: body, what: "RowDescription" };
        let n = r.i16()?;
        if n < 0 {
            return Err(malformed("RowDescription", "negative column count"));
        }
        let mut cols = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let name = String::from_utf8_lossy(r.cstr()?);
            let origin = (r.i32()? as u32, r.i16()?);
            let type_oid = r.i32()? as u32;
            r.take(6)?; // type size, type modifier
            let format = r.i16()?;
            let mask = masker.column_from(&name, origin, computed);
            let constant = matches!(mask, ColumnMask::Whole(_)) && !crate::mask::stored(origin);
            cols.push(Col { mask, binary: format == 1, type_oid, constant });
        }
        if !r.b.is_empty() {
            return Err(malformed("RowDescription", "trailing bytes"));
        }
        let active = cols.iter().any(|c| c.mask != ColumnMask::Keep);
        Ok(Plan { cols, active, rest: ColumnMask::DetectStrict })
    }

    /// A plan for COPY rows: by position when the column names are known, else detectors only.
    /// The rows of `COPY (query)` are not traced to stored values: masked strictly.
    pub fn for_copy(copy: &CopyOut, masker: &Masker) -> Plan {
        let by_query = |m: ColumnMask| if copy.query { m.strict() } else { m };
        let cols: Vec<Col> = match &copy.columns {
            Some(names) => names
                .iter()
                .map(|n| {
                    let mask = if masker.holds(&copy.tables, n) {
                        ColumnMask::Whole(crate::mask::Style::Redact)
                    } else {
                        masker.column(n)
                    };
                    Col { mask: by_query(mask), binary: false, type_oid: 25, constant: false }
                })
                .collect(),
            None => Vec::new(),
        };
        let active = masker.has_detectors() || cols.iter().any(|c| c.mask != ColumnMask::Keep);
        let rest = by_query(ColumnMask::Detect);
        Plan { cols, active, rest }
    }

    fn col(&self, i: usize, masker: &Masker) -> ColumnMask {
        match self.cols.get(i) {
            Some(c) => c.mask,
            None if masker.has_detectors() => self.rest,
            None => ColumnMask::Keep,
        }
    }
}

/// Writes the DataRow ('D') frame whose body is `body` to `out`, its values masked by `plan`.
/// Masked rows go straight into the output: no row is copied twice or allocated on its own.
/// On error `out` is left as it was, so nothing of a row that could not be masked is sent.
/// `constant`: every column is masked as a `constant` one, whatever the plan says of it (the
/// rows may come from another query than the one the plan was learned from; only the number
/// of columns and their types are the portal's own).
pub fn write_data_row(
    body: &[u8],
    plan: &Plan,
    constant: bool,
    masker: &Masker,
    counts: &mut Counts,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let mark = out.len();
    let written = write_row(body, plan, constant, masker, counts, out);
    if written.is_err() {
        out.truncate(mark);
    }
    written
}

fn write_row(
    body: &[u8],
    plan: &Plan,
    all_constant: bool,
    masker: &Masker,
    counts: &mut Counts,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let mut r = Reader { b: body, what: "DataRow" };
    let n = r.i16()?;
    // Checked even when nothing is masked: a row of another shape means the plan is not its own.
    if n < 0 || n as usize != plan.cols.len() {
        return Err(malformed("DataRow", "column count differs from its RowDescription"));
    }
    let frame = out.len();
    out.reserve(body.len() + 5);
    out.put_u8(b'D');
    if !plan.active && !all_constant {
        out.put_i32(body.len() as i32 + 4);
        out.extend_from_slice(body);
        return Ok(());
    }
    out.put_i32(0); // the length, known at the end
    out.put_i16(n);
    // Unmasked values are copied in runs, not one by one.
    let mut run = 2;
    for col in &plan.cols {
        let start = body.len() - r.b.len();
        let len = r.i32()?;
        if len < -1 {
            return Err(malformed("DataRow", "negative value length"));
        }
        let constant = col.constant || all_constant;
        let new = match len {
            -1 => constant.then(|| constant_value(*col)),
            len => {
                let v = r.take(len as usize)?;
                if constant {
                    counts.add(crate::mask::Kind::Column);
                    Some(constant_value(*col))
                } else {
                    mask_value(*col, v, masker, counts)
                }
            }
        };
        let Some(new) = new else { continue };
        out.extend_from_slice(&body[run..start]);
        run = body.len() - r.b.len();
        match new {
            Some(bytes) => {
                out.put_i32(bytes.len() as i32);
                out.extend_from_slice(&bytes);
            }
            None => out.put_i32(-1),
        }
    }
    if !r.b.is_empty() {
        return Err(malformed("DataRow", "trailing bytes"));
    }
    out.extend_from_slice(&body[run..]);
    let len = i32::try_from(out.len() - frame - 1).map_err(|_| malformed("DataRow", "masked row too large"))?;
    out[frame + 1..frame + 5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// `None`: keep the value; `Some(None)`: send NULL; `Some(Some(v))`: send `v`. What is sent is
/// always a valid value of the column's type in the column's format, never corrupt bytes: where
/// a finding cannot be rewritten in place (numbers, records, xml, binary arrays...), the value
/// becomes NULL.
fn mask_value(col: Col, v: &[u8], masker: &Masker, counts: &mut Counts) -> Option<Option<Vec<u8>>> {
    if col.mask == ColumnMask::Keep {
        return None;
    }
    let whole = matches!(col.mask, ColumnMask::Whole(_));
    let class = type_class(col.type_oid);
    match (class, col.binary) {
        (TypeClass::Str, _) | (TypeClass::UserDefined, false) => masker.apply(col.mask, v, counts).map(Some),
        (TypeClass::StrArray, false) => match mask_text_array(v, |e| masker.apply(col.mask, e, counts)) {
            Ok(masked) => masked.map(Some),
            // The server's own output, so not expected: never relay what was not looked at.
            Err(()) => {
                counts.add(crate::mask::Kind::Column);
                Some(None)
            }
        },
        (TypeClass::Json, binary) => {
            // jsonb's binary format is a version byte, then the JSON text.
            let (prefix, text) = if binary && col.type_oid == JSONB { v.split_at_checked(1)? } else { (&v[..0], v) };
            let mut out = prefix.to_vec();
            if whole {
                let masked = masker.apply(col.mask, text, counts)?;
                out.extend_from_slice(serde_json::to_string(&String::from_utf8_lossy(&masked)).ok()?.as_bytes());
            } else {
                let masked = detect_json(text, masker, col.mask == ColumnMask::DetectStrict, counts)?;
                if serde_json::from_slice::<serde::de::IgnoredAny>(&masked).is_err() {
                    // A finding inside a JSON number made it invalid.
                    return Some(None);
                }
                out.extend_from_slice(&masked);
            }
            Some(Some(out))
        }
        _ if whole => {
            counts.add(crate::mask::Kind::Column);
            Some(None)
        }
        _ => {
            let mut found = Counts::default();
            let json_array = matches!(col.type_oid, JSON_ARRAY | JSONB_ARRAY);
            let readable = match col.binary {
                true if json_array => Some(json_array_text(col.type_oid, true, v)),
                true => binary_number_text(col.type_oid, v).map(|t| t.map(String::into_bytes)),
                false => text_readable(col.type_oid, v),
            };
            match readable {
                // A card number in a bigint or numeric column is as much one in binary format,
                // or in a float's exponent form.
                Some(Ok(bytes)) if col.type_oid == BYTEA || (col.binary && json_array) => {
                    detect_binary(&bytes, masker, &mut found)?
                }
                Some(Ok(text)) => _ = masker.detect(&text, &mut found)?,
                // Not what the server sends for its type: never relay what was not looked at.
                Some(Err(())) => found.add(crate::mask::Kind::Column),
                None if col.binary => detect_binary(v, masker, &mut found)?,
                None => _ = masker.detect(v, &mut found)?,
            }
            counts.merge(&found);
            Some(None)
        }
    }
}

/// What every value of a `constant` column becomes: `[REDACTED]` for strings (text and binary
/// format) and user-defined types in text format, the JSON string `"[REDACTED]"` for json and
/// jsonb, NULL for any other type (arrays included: their shape would show which elements
/// were NULL).
fn constant_value(col: Col) -> Option<Vec<u8>> {
    match (type_class(col.type_oid), col.binary) {
        (TypeClass::Str, _) | (TypeClass::UserDefined, false) => Some(crate::mask::REDACTED.as_bytes().to_vec()),
        (TypeClass::Json, binary) => {
            let mut out = if binary && col.type_oid == JSONB { vec![1] } else { Vec::new() };
            out.extend_from_slice(format!("\"{}\"", crate::mask::REDACTED).as_bytes());
            Some(out)
        }
        _ => None,
    }
}

/// Runs the detectors over a JSON text: over each string decoded (an escape such as `\n` or
/// `\u0040` would hide what follows it from the patterns), written back encoded if anything was
/// found, and over what lies between strings (numbers). `None`: nothing found.
fn detect_json(text: &[u8], masker: &Masker, strict: bool, counts: &mut Counts) -> Option<Vec<u8>> {
    let detect = |part: &'_ [u8], counts: &mut Counts| masker.detect_as(part, counts, strict).map(|m| m.into_owned());
    let mut out = Vec::with_capacity(text.len());
    let mut changed = false;
    let between = |part: &[u8], out: &mut Vec<u8>, counts: &mut Counts| match detect(part, counts) {
        Some(masked) => {
            out.extend_from_slice(&masked);
            true
        }
        None => {
            out.extend_from_slice(part);
            false
        }
    };
    let mut at = 0;
    for string in json_strings(text) {
        changed |= between(&text[at..string.start], &mut out, counts);
        at = string.end;
        let token = &text[string];
        match serde_json::from_slice::<String>(token) {
            Ok(decoded) => match detect(decoded.as_bytes(), counts) {
                Some(masked) => {
                    let encoded = serde_json::to_string(&String::from_utf8_lossy(&masked)).unwrap_or_default();
                    out.extend_from_slice(encoded.as_bytes());
                    changed = true;
                }
                None => out.extend_from_slice(token),
            },
            // Not a whole string (the server's own text, so not expected): looked at as it is.
            Err(_) => changed |= between(token, &mut out, counts),
        }
    }
    changed |= between(&text[at..], &mut out, counts);
    changed.then_some(out)
}

/// Detection over a binary value the proxy does not take apart (arrays, records, hstore,
/// tsvector...), or bytes decoded from text. Such formats put a length word before each string,
/// and its last byte may be a letter or digit glued to the string (`00 00 00 33` before
/// `sk-...`), so a detector's word boundary would miss it: each run of bytes between control
/// bytes is also read without its first one or two. `None`: nothing found.
fn detect_binary(v: &[u8], masker: &Masker, found: &mut Counts) -> Option<()> {
    if masker.detect(v, found).is_some() {
        return Some(());
    }
    for run in v.split(u8::is_ascii_control).filter(|r| r.len() > 2) {
        for skip in 1..=2 {
            if masker.detect(&run[skip..], found).is_some() {
                return Some(());
            }
        }
    }
    None
}

/// Text-format values the detectors read better otherwise: floats, which the server writes in
/// exponent form from 16 digits on (`4.532015112830366e+15`, a card number in a float8), as plain
/// decimals; bytea, which it writes in hex, as its bytes; json[] and jsonb[] with their strings
/// decoded. `None`: read the value as it is.
fn text_readable(oid: u32, v: &[u8]) -> Option<Result<Vec<u8>, ()>> {
    let plain = |s: &str| -> Result<String, ()> {
        match s.trim() {
            "NULL" | "NaN" | "Infinity" | "-Infinity" => Ok(String::new()),
            s => s.parse::<f64>().map(|f| format!("{f}")).map_err(|_| ()),
        }
    };
    let text = std::str::from_utf8(v).ok();
    match oid {
        // Only the exponent form is read otherwise: a float written plainly is read as it is,
        // without a parse and a copy per value.
        700 | 701 | 1021 | 1022 if !v.contains(&b'e') => None,
        700 | 701 => Some(text.ok_or(()).and_then(plain).map(String::into_bytes)),
        1021 | 1022 => Some(text.ok_or(()).and_then(|t| {
            let inner = t.trim_start_matches('{').trim_end_matches('}');
            let parts: Result<Vec<String>, ()> =
                inner.split(',').map(|e| plain(e.trim_matches(|c| c == '{' || c == '}'))).collect();
            parts.map(|p| p.join(",").into_bytes())
        })),
        // In hex, as bytea_output has it by default; the escape format is read as it is.
        BYTEA => v.strip_prefix(b"\\x").map(|hex| hex::decode(hex).map_err(|_| ())),
        JSON_ARRAY | JSONB_ARRAY => Some(json_array_text(oid, false, v)),
        _ => None,
    }
}

/// A json[] or jsonb[] value as the detectors read it: its bytes as they are (numbers are read
/// there), then, one a line, each string of its elements that holds an escape, decoded. Inside
/// an array a JSON escape (`\\u0040` for `@`) would otherwise hide what follows it, as
/// `detect_json` prevents for a json value of its own. `Err`: not such an array as the server
/// writes it.
fn json_array_text(oid: u32, binary: bool, v: &[u8]) -> Result<Vec<u8>, ()> {
    let mut text = v.to_vec();
    if !binary {
        mask_text_array(v, |element| {
            escaped_strings(element, &mut text);
            None
        })?;
        return Ok(text);
    }
    let element = if oid == JSONB_ARRAY { JSONB } else { JSON };
    for e in binary_array_elements(element, v)?.into_iter().flatten() {
        // jsonb's binary format is a version byte, then the JSON text.
        let json = match (element, e.split_first()) {
            (JSONB, Some((1, json))) => json,
            (JSONB, _) => return Err(()),
            _ => e,
        };
        escaped_strings(json, &mut text);
    }
    Ok(text)
}

/// Appends each JSON string of `json` that holds an escape, decoded, on a line of its own. Read
/// token by token, not parsed: a json value may repeat a key, and bytes that are not UTF-8 (a
/// LATIN1 client) are no reason to skip it.
fn escaped_strings(json: &[u8], out: &mut Vec<u8>) {
    for string in json_strings(json) {
        let token = &json[string];
        if token.contains(&b'\\')
            && let Ok(decoded) = serde_json::from_str::<String>(&String::from_utf8_lossy(token))
        {
            out.push(b'\n');
            out.extend_from_slice(decoded.as_bytes());
        }
    }
}

/// The spans of the JSON strings in `text`, quotes included; one with no closing quote runs to
/// the end of the text.
fn json_strings(text: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let start = at + text[at..].iter().position(|&b| b == b'"')?;
        let mut i = start + 1;
        while i < text.len() && text[i] != b'"' {
            i += if text[i] == b'\\' { 2 } else { 1 };
        }
        at = (i + 1).min(text.len());
        Some(start..at)
    })
}

/// The text the server would send in text format for a number sent in binary (`None`: not a
/// number type), for the detectors to read; floats as plain decimals, which they read better than
/// the server's exponent form. `Err` for bytes that are not a value of the type.
fn binary_number_text(oid: u32, v: &[u8]) -> Option<Result<String, ()>> {
    let text = match oid {
        21 => v.try_into().map(|b| i16::from_be_bytes(b).to_string()),
        23 => v.try_into().map(|b| i32::from_be_bytes(b).to_string()),
        20 => v.try_into().map(|b| i64::from_be_bytes(b).to_string()),
        26 => v.try_into().map(|b| u32::from_be_bytes(b).to_string()),
        700 => v.try_into().map(|b| f32::from_be_bytes(b).to_string()),
        701 => v.try_into().map(|b| f64::from_be_bytes(b).to_string()),
        NUMERIC => return Some(numeric_text(v)),
        array => return number_array_element(array).map(|element| number_array_text(element, v)),
    };
    Some(text.map_err(|_| ()))
}

/// The element type of an array of numbers that `binary_number_text` reads.
fn number_array_element(array: u32) -> Option<u32> {
    Some(match array {
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1028 => 26,
        1021 => 700,
        1022 => 701,
        1231 => NUMERIC,
        _ => return None,
    })
}

/// An array of numbers in binary format as `{1,2,NULL}`, flat whatever its dimensions: the
/// detectors need only the numbers, each on its own.
fn number_array_text(element: u32, v: &[u8]) -> Result<String, ()> {
    let mut out = String::from("{");
    for (i, e) in binary_array_elements(element, v)?.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match e {
            None => out.push_str("NULL"),
            Some(bytes) => out.push_str(&binary_number_text(element, bytes).ok_or(())??),
        }
    }
    out.push('}');
    Ok(out)
}

/// The elements of an array of `element` in binary format (dimensions, flags, element type,
/// each dimension's size and lower bound, then each element with its length or -1 for NULL),
/// flat whatever its dimensions. `Err`: not such an array as the server writes it.
fn binary_array_elements(element: u32, v: &[u8]) -> Result<Vec<Option<&[u8]>>, ()> {
    let mut r = Reader { b: v, what: "array" };
    let (ndim, _flags, oid) = (r.i32().map_err(drop)?, r.i32().map_err(drop)?, r.i32().map_err(drop)?);
    // MAXDIM is 6; an empty array has no dimensions.
    if !(0..=6).contains(&ndim) || oid as u32 != element {
        return Err(());
    }
    let mut count: usize = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let (size, _lower) = (r.i32().map_err(drop)?, r.i32().map_err(drop)?);
        count = count.checked_mul(usize::try_from(size).map_err(drop)?).ok_or(())?;
    }
    // Each element takes at least its four-byte length: more than fit is not the server's.
    if count > r.b.len() / 4 {
        return Err(());
    }
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        elements.push(match r.i32().map_err(drop)? {
            -1 => None,
            len => Some(r.take(usize::try_from(len).map_err(drop)?).map_err(drop)?),
        });
    }
    if !r.b.is_empty() {
        return Err(());
    }
    Ok(elements)
}

const NUMERIC: u32 = 1700;
const BYTEA: u32 = 17;

/// Most decimal digits a binary numeric may have before or after its point for `numeric_text`.
const MAX_NUMERIC_DIGITS: i32 = 1000;

/// A numeric's binary format (digit count, weight, sign, display scale, then base-10000 digits,
/// the first one's place being 10000^weight) as the server writes it in text.
fn numeric_text(v: &[u8]) -> Result<String, ()> {
    let mut r = Reader { b: v, what: "numeric" };
    let mut word = || r.take(2).map(|w| u16::from_be_bytes([w[0], w[1]])).map_err(drop);
    let (ndigits, weight, sign, dscale) = (word()?, word()? as i16 as i32, word()?, word()? as i32);
    let digits: Vec<u16> = (0..ndigits).map(|_| word()).collect::<Result<_, _>>()?;
    if !r.b.is_empty() || digits.iter().any(|&d| d > 9999) {
        return Err(());
    }
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => return Err(()),
    };
    if dscale > MAX_NUMERIC_DIGITS || weight.abs() * 4 > MAX_NUMERIC_DIGITS {
        return Err(());
    }
    let digit = |i: i32| usize::try_from(i).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0);
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    }
    for i in 0..=weight {
        let d = digit(i);
        out.push_str(&if i == 0 { d.to_string() } else { format!("{d:04}") });
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut i = weight + 1;
        while (fraction.len() as i32) < dscale {
            fraction.push_str(&format!("{:04}", digit(i)));
            i += 1;
        }
        fraction.truncate(dscale as usize);
        out.push('.');
        out.push_str(&fraction);
    }
    Ok(out)
}

/// Masks each element of an array in PostgreSQL's text format (`{a,"b c",NULL}`, nested, maybe
/// after bounds like `[0:1]=`) with `mask` (`None`: keep it), and writes every element it
/// changed back quoted, so the result is an array of the same shape: masking the literal as one
/// text would leave braces and quotes broken. `Ok(None)` when nothing changed.
fn mask_text_array(v: &[u8], mut mask: impl FnMut(&[u8]) -> Option<Vec<u8>>) -> Result<Option<Vec<u8>>, ()> {
    let mut out = Vec::with_capacity(v.len() + 16);
    let mut changed = false;
    let mut i = 0;
    if v.first() == Some(&b'[') {
        let eq = v.iter().position(|&c| c == b'=').ok_or(())?;
        out.extend_from_slice(&v[..=eq]);
        i = eq + 1;
    }
    let mut depth = 0usize;
    let mut element = Vec::new();
    while i < v.len() {
        match v[i] {
            b'{' => {
                depth += 1;
                out.push(b'{');
                i += 1;
            }
            b'}' => {
                depth = depth.checked_sub(1).ok_or(())?;
                out.push(b'}');
                i += 1;
            }
            b',' if depth > 0 => {
                out.push(b',');
                i += 1;
            }
            _ if depth == 0 => return Err(()),
            c => {
                element.clear();
                let start = i;
                if c == b'"' {
                    i += 1;
                    loop {
                        match *v.get(i).ok_or(())? {
                            b'"' => break,
                            b'\\' => {
                                element.push(*v.get(i + 1).ok_or(())?);
                                i += 2;
                            }
                            b => {
                                element.push(b);
                                i += 1;
                            }
                        }
                    }
                    i += 1;
                } else {
                    while i < v.len() && !matches!(v[i], b',' | b'}') {
                        i += 1;
                    }
                    element.extend_from_slice(&v[start..i]);
                    if element == b"NULL" {
                        out.extend_from_slice(b"NULL");
                        continue;
                    }
                }
                match mask(&element) {
                    Some(masked) => {
                        changed = true;
                        out.push(b'"');
                        for &b in &masked {
                            if matches!(b, b'"' | b'\\') {
                                out.push(b'\\');
                            }
                            out.push(b);
                        }
                        out.push(b'"');
                    }
                    None => out.extend_from_slice(&v[start..i]),
                }
                // Masked elements can be many times longer than short ones (`hash:` and 16 hex
                // digits for `a`): a huge array would take that many times its memory.
                if out.len() > MAX_MESSAGE {
                    return Err(());
                }
            }
        }
    }
    if depth != 0 {
        return Err(());
    }
    Ok(changed.then_some(out))
}

/// Why a `COPY ... TO STDOUT` cannot run under masking, if it cannot.
/// Catalog views of sampled column values (most common values, histograms).
const STATISTICS: [&str; 5] =
    ["pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data"];

/// Functions that keep a value where a later statement reads it back (a setting, a
/// notification, a large object, a sequence).
const STASHES: [&str; 21] = [
    "set_config",
    "pg_notify",
    "lo_from_bytea",
    "lo_put",
    "lowrite",
    "lo_create",
    "lo_import",
    "setval",
    "pg_logical_emit_message",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "lo_lseek",
    "lo_lseek64",
    "lo_truncate",
    "lo_truncate64",
];

/// Why a statement is refused because its results could not be masked, if it is.
pub fn statement_refusal(class: &crate::sql::Classification, masker: &Masker) -> Option<String> {
    if let Some(why) = class.copy_out.iter().find_map(|c| copy_refusal(c, masker)) {
        return Some(why);
    }
    if !masker.has_column_rules() {
        return None;
    }
    // What the proxy cannot parse (or parses unlike the server) it cannot tell the reads of.
    if class.kinds.contains(&crate::sql::Kind::Unparseable) {
        return Some("a statement the proxy cannot parse cannot be masked".into());
    }
    let last = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
    // Case-blind: a quoted "PG_STATS" is another relation, but one worth refusing too.
    if let Some(t) = class.tables.iter().map(|t| last(t).to_lowercase()).find(|t| STATISTICS.contains(&t.as_str())) {
        return Some(format!("{t} holds sampled column values, which cannot be masked"));
    }
    if masker.computed(&class.tables, &class.reads, class.indirect)
        && let Some(f) = class.functions.iter().map(|f| last(f)).find(|f| STASHES.contains(&f.as_str()))
    {
        return Some(format!("{f} could keep values of masked columns where a later statement reads them unmasked"));
    }
    None
}

fn copy_refusal(copy: &CopyOut, masker: &Masker) -> Option<String> {
    if copy.format == CopyFormat::Binary {
        return Some("COPY in binary format cannot be masked; use FORMAT text or csv".into());
    }
    if let Some(opt) = &copy.unusual {
        return Some(format!("COPY option {} is not supported while results are masked", opt.to_uppercase()));
    }
    if copy.query && masker.computed(&copy.tables, &copy.reads, false) {
        return Some(
            "COPY (query) TO STDOUT that reads masked columns or whole rows cannot be masked column by column; use COPY table (a, b) TO STDOUT, or the query itself".into(),
        );
    }
    if copy.columns.is_none() && masker.has_column_rules() {
        return Some(
            "column masking needs the column names: list them, as in COPY t (a, b) TO STDOUT or COPY (SELECT a, b FROM t) TO STDOUT".into(),
        );
    }
    None
}

/// Masks one COPY OUT row (a CopyData body). Binary COPY is refused before it starts; a row
/// that does not parse, or has another number of fields than the statement's column list, is an
/// error rather than something relayed unmasked.
pub fn mask_copy_row(
    row: &Bytes,
    copy: &CopyOut,
    plan: &Plan,
    masker: &Masker,
    counts: &mut Counts,
) -> Result<Option<Bytes>, WireError> {
    if !plan.active {
        return Ok(None);
    }
    let (line, newline) = match row.strip_suffix(b"\n") {
        Some(l) => (l, true),
        None => (&row[..], false),
    };
    let fields = match copy.format {
        CopyFormat::Text => split_text(line, copy.delimiter),
        CopyFormat::Csv => split_csv(line, copy.delimiter).ok_or(malformed("CopyData", "unreadable CSV row"))?,
        CopyFormat::Binary => return Err(malformed("CopyData", "binary COPY cannot be masked")),
    };
    if !plan.cols.is_empty() && fields.len() != plan.cols.len() {
        return Err(malformed("CopyData", "field count differs from the COPY column list"));
    }
    let mut changed = false;
    let mut masked: Vec<Option<Vec<u8>>> = Vec::with_capacity(fields.len());
    for (i, f) in fields.into_iter().enumerate() {
        let m = match &f {
            Some(v) => masker.apply(plan.col(i, masker), v, counts),
            None => None,
        };
        changed |= m.is_some();
        masked.push(m.or(f));
    }
    if !changed {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(row.len() + 16);
    for (i, f) in masked.iter().enumerate() {
        if i > 0 {
            out.push(copy.delimiter);
        }
        match (copy.format, f) {
            (CopyFormat::Text, None) => out.extend_from_slice(b"\\N"),
            (CopyFormat::Text, Some(v)) => escape_text(v, copy.delimiter, &mut out),
            (_, None) => {}
            (_, Some(v)) => quote_csv(v, copy.delimiter, &mut out),
        }
    }
    if newline {
        out.push(b'\n');
    }
    Ok(Some(Bytes::from(out)))
}

/// Text-format COPY fields: delimiter-separated, backslash escapes (a delimiter inside a value
/// comes escaped), `\N` for NULL.
fn split_text(line: &[u8], delimiter: u8) -> Vec<Option<Vec<u8>>> {
    let mut fields = Vec::new();
    let mut v = Vec::new();
    let mut raw_start = 0;
    let mut it = line.iter().copied().enumerate();
    let finish = |v: &mut Vec<u8>, raw: &[u8], fields: &mut Vec<Option<Vec<u8>>>| {
        fields.push(if raw == b"\\N" { None } else { Some(std::mem::take(v)) });
        v.clear();
    };
    while let Some((i, b)) = it.next() {
        if b == delimiter {
            finish(&mut v, &line[raw_start..i], &mut fields);
            raw_start = i + 1;
            continue;
        }
        if b != b'\\' {
            v.push(b);
            continue;
        }
        match it.next().map(|(_, c)| c) {
            Some(b'n') => v.push(b'\n'),
            Some(b'r') => v.push(b'\r'),
            Some(b't') => v.push(b'\t'),
            Some(b'b') => v.push(8),
            Some(b'f') => v.push(12),
            Some(b'v') => v.push(11),
            Some(other) => v.push(other),
            None => v.push(b'\\'),
        }
    }
    finish(&mut v, &line[raw_start..], &mut fields);
    fields
}

fn escape_text(v: &[u8], delimiter: u8, out: &mut Vec<u8>) {
    for &b in v {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            d if d == delimiter => out.extend_from_slice(&[b'\\', d]),
            b => out.push(b),
        }
    }
}

/// CSV fields with `"` quoting; an unquoted empty field is NULL. `None` if the row is malformed.
fn split_csv(line: &[u8], delimiter: u8) -> Option<Vec<Option<Vec<u8>>>> {
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        if line.get(i) == Some(&b'"') {
            let mut v = Vec::new();
            i += 1;
            loop {
                match line.get(i) {
                    Some(b'"') if line.get(i + 1) == Some(&b'"') => {
                        v.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        v.push(b);
                        i += 1;
                    }
                    None => return None,
                }
            }
            fields.push(Some(v));
        } else {
            let end = line[i..].iter().position(|&b| b == delimiter).map_or(line.len(), |p| i + p);
            let raw = &line[i..end];
            fields.push(if raw.is_empty() { None } else { Some(raw.to_vec()) });
            i = end;
        }
        match line.get(i) {
            None => return Some(fields),
            Some(&b) if b == delimiter => i += 1,
            Some(_) => return None,
        }
    }
}

fn quote_csv(v: &[u8], delimiter: u8, out: &mut Vec<u8>) {
    let needs = v.is_empty() || v.iter().any(|&b| b == delimiter || matches!(b, b'"' | b'\n' | b'\r'));
    if !needs {
        out.extend_from_slice(v);
        return;
    }
    out.push(b'"');
    for &b in v {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Masks the payload of a NotificationResponse ('A') with the detectors.
pub fn mask_notification(body: &Bytes, masker: &Masker, counts: &mut Counts) -> Result<Option<Bytes>, WireError> {
    let mut r = Reader { b: body, what: "NotificationResponse" };
    let pid = r.take(4)?;
    let channel = r.cstr()?;
    let payload = r.cstr()?;
    // The payload is whatever a session chose to send (`pg_notify('c', 'guess')`).
    let Some(masked) = masker.detect_strict(payload, counts) else { return Ok(None) };
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.extend_from_slice(pid);
    out.extend_from_slice(channel);
    out.put_u8(0);
    out.extend_from_slice(&masked);
    out.put_u8(0);
    Ok(Some(out.freeze()))
}

/// The message that replaces a withheld one (see `mask_notice`).
pub const WITHHELD: &str =
    "tollgate: the server's message is withheld: the statement reads masked columns, whose values it may quote";

/// Masks an ErrorResponse or NoticeResponse body: detectors over its texts (message, detail,
/// hint, context, internal query, object names) and, when column rules exist, the values a
/// DETAIL quotes (`Key (email)=(..)`, `Failing row contains (..)`). `withheld`: the statement
/// may compute from masked values, which the server may quote (or not) in any text: the
/// message is replaced and the detail, hint, context and internal query are dropped;
/// severity, SQLSTATE, position and object names stay.
pub fn mask_notice(
    body: &Bytes,
    masker: &Masker,
    withheld: bool,
    counts: &mut Counts,
) -> Result<Option<Bytes>, WireError> {
    let mut r = Reader { b: body, what: "ErrorResponse" };
    let mut out = BytesMut::with_capacity(body.len());
    let mut changed = false;
    loop {
        let code = r.take(1)?[0];
        if code == 0 {
            out.put_u8(0);
            break;
        }
        let text = r.cstr()?;
        if withheld && matches!(code, b'D' | b'H' | b'W' | b'q') {
            changed = true;
            continue;
        }
        out.put_u8(code);
        let mut value: Option<Vec<u8>> = None;
        if withheld && code == b'M' {
            value = Some(WITHHELD.as_bytes().to_vec());
            counts.add(crate::mask::Kind::Column);
        }
        if code == b'D' && masker.has_column_rules() {
            value = mask_detail_values(text, masker, counts);
        }
        // Message, detail, hint, context, internal query; also the table/column/constraint names.
        if matches!(code, b'M' | b'D' | b'H' | b'W' | b'q' | b'd')
            // Messages quote what the client sent (`'guess'::int`): findings are redacted.
            && let Some(v) = masker.detect_strict(value.as_deref().unwrap_or(text), counts)
        {
            value = Some(v.into_owned());
        }
        match value {
            Some(v) => {
                changed = true;
                out.extend_from_slice(&v);
            }
            None => out.extend_from_slice(text),
        }
        out.put_u8(0);
    }
    Ok(changed.then(|| out.freeze()))
}

/// The names in a DETAIL's column list (`id, "who x", lower(email::text)`): quoted ones whole
/// (a space or comma inside them does not split them), with `""` read as `"`, and the runs of
/// identifier characters outside quotes.
fn detail_names(list: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut name = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    '"' => break,
                    c => name.push(c),
                }
            }
            names.push(name);
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let mut name = String::from(c);
            while let Some(&c) = chars.peek().filter(|c| c.is_alphanumeric() || **c == '_' || **c == '$') {
                name.push(c);
                chars.next();
            }
            names.push(name);
        }
    }
    names
}

/// The values a DETAIL quotes, redacted where they may be a masked column's. Read as bytes: in
/// a client encoding other than UTF-8 they need not be UTF-8.
fn mask_detail_values(text: &[u8], masker: &Masker, counts: &mut Counts) -> Option<Vec<u8>> {
    // A NOT NULL or CHECK failure lists the whole row, without column names.
    if text.starts_with(b"Failing row contains (") {
        counts.add(crate::mask::Kind::Column);
        return Some(format!("Failing row contains ({REDACTED}).").into_bytes());
    }
    // "Key (a, b)=(1, x@y.z) already exists.", "Key (lower(email::text))=(...)", "Partition
    // key of the failing row contains (a, b) = (1, x)."
    let (sep, width) = [&b")=("[..], b") = ("]
        .iter()
        .find_map(|sep| text.windows(sep.len()).position(|w| w == *sep).map(|at| (at, sep.len())))?;
    let open = text[..sep].iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')').filter(|&c| c >= sep + width)?;
    let cols = String::from_utf8_lossy(&text[open + 1..sep]);
    // Every name in the list, also inside an expression (`lower(email::text)`).
    let masked = detail_names(&cols).iter().any(|name| {
        !matches!(masker.column(name), ColumnMask::Detect | ColumnMask::Keep) || masker.holds_anywhere(name)
    });
    if !masked {
        return None;
    }
    counts.add(crate::mask::Kind::Column);
    let mut out = text[..sep + width].to_vec();
    out.extend_from_slice(REDACTED.as_bytes());
    out.extend_from_slice(&text[close..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{Glob, Rule, Style, Target};

    /// A numeric in binary format: weight, sign, display scale, base-10000 digits.
    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale].iter().chain(digits) {
            v.extend(w.to_be_bytes());
        }
        v
    }

    #[test]
    fn binary_numbers_read_as_the_server_writes_them() {
        let text = |oid, v: &[u8]| binary_number_text(oid, v).expect("a number type");
        assert_eq!(text(20, &4111111111111111i64.to_be_bytes()), Ok("4111111111111111".into()));
        assert_eq!(text(23, &(-7i32).to_be_bytes()), Ok("-7".into()));
        assert_eq!(text(21, &[0, 1, 2]), Err(()), "wrong size");
        assert_eq!(text(701, &4111111111111111f64.to_be_bytes()), Ok("4111111111111111".into()));
        assert_eq!(binary_number_text(25, b"x"), None);
        // Arrays of numbers: ndim, flags, element type, (size, lower bound) per dimension, elements.
        let array = |element: u32, dims: &[i32], items: &[Option<&[u8]>]| {
            let mut v = Vec::new();
            for w in [dims.len() as i32, 1, element as i32] {
                v.extend(w.to_be_bytes());
            }
            for d in dims {
                v.extend(d.to_be_bytes());
                v.extend(1i32.to_be_bytes());
            }
            for item in items {
                match item {
                    Some(b) => {
                        v.extend((b.len() as i32).to_be_bytes());
                        v.extend(*b);
                    }
                    None => v.extend((-1i32).to_be_bytes()),
                }
            }
            v
        };
        let card = 4111111111111111i64.to_be_bytes();
        let seven = 7i64.to_be_bytes();
        let v = array(20, &[3], &[Some(&seven), None, Some(&card)]);
        assert_eq!(text(1016, &v), Ok("{7,NULL,4111111111111111}".into()));
        let v = array(
            NUMERIC,
            &[2, 1],
            &[Some(&numeric(0, 0, 1, &[1, 5000])), Some(&numeric(3, 0, 0, &[4111, 1111, 1111, 1111]))],
        );
        assert_eq!(text(1231, &v), Ok("{1.5,4111111111111111}".into()), "two dimensions, flat");
        assert_eq!(text(1016, &array(20, &[], &[])), Ok("{}".into()));
        for bad in [
            array(23, &[1], &[Some(&seven)]),                   // says int4, holds int8
            array(20, &[2], &[Some(&seven)]),                   // fewer elements than said
            array(20, &[1], &[Some(&seven), Some(&seven)]),     // more
            array(20, &[0x4000_0000, 4], &[Some(&seven)]),      // sizes past anything sent
            array(20, &[1, 1, 1, 1, 1, 1, 1], &[Some(&seven)]), // past MAXDIM
            array(20, &[1], &[Some(&seven[..4])]),              // a short int8
        ] {
            assert_eq!(text(1016, &bad), Err(()), "{bad:?}");
        }
        let cases: [(Vec<u8>, &str); 8] = [
            (numeric(3, 0, 0, &[4111, 1111, 1111, 1111]), "4111111111111111"),
            (numeric(0, 0, 1, &[12, 5000]), "12.5"),
            (numeric(0, 0x4000, 2, &[12, 5000]), "-12.50"),
            (numeric(-1, 0, 7, &[1, 2340]), "0.0001234"),
            (numeric(-2, 0, 8, &[1]), "0.00000001"),
            (numeric(1, 0, 0, &[1]), "10000"),
            (numeric(0, 0, 0, &[]), "0"),
            (numeric(0, 0xC000, 0, &[]), "NaN"),
        ];
        for (v, want) in cases {
            assert_eq!(numeric_text(&v), Ok(want.to_string()));
        }
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[10000])), Err(()), "a digit out of range");
        assert_eq!(numeric_text(&numeric(0, 0x1234, 0, &[1])), Err(()), "an unknown sign");
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[1])[..9]), Err(()), "truncated");
        assert_eq!(numeric_text(&numeric(i16::MAX, 0, 0, &[1])), Err(()), "too long to look at");
    }

    fn masker() -> Masker {
        Masker::new(
            &[
                Rule { name: "cols".into(), target: Target::Columns(vec![Glob::new("*ssn*")]), style: Style::Redact },
                Rule {
                    name: "mail".into(),
                    target: Target::Detect(vec![crate::mask::Kind::Email]),
                    style: Style::Partial,
                },
            ],
            [1; 32],
        )
    }

    #[test]
    fn json_strings_are_searched_decoded_and_written_back_encoded() {
        let m = Masker::new(
            &[Rule {
                name: "d".into(),
                target: Target::Detect(vec![
                    crate::mask::Kind::Email,
                    crate::mask::Kind::Phone,
                    crate::mask::Kind::Ssn,
                ]),
                style: Style::Redact,
            }],
            [1; 32],
        );
        let run = |v: &[u8]| {
            let mut counts = Counts::default();
            let out = detect_json(v, &m, false, &mut counts).map(|o| String::from_utf8(o).unwrap());
            (out, counts.total())
        };
        // An escaped newline right before a number, an escaped `@`: a pattern on the raw text
        // finds neither.
        let (out, n) = run(br#"{"note": "call me\n415-555-0123\nssn\n123-45-6789", "m": "a\u0040b.com", "k": 1}"#);
        assert_eq!(
            out.as_deref(),
            Some(r#"{"note": "call me\n[REDACTED]\nssn\n[REDACTED]", "m": "[REDACTED]", "k": 1}"#)
        );
        assert_eq!(n, 3);
        assert_eq!(run(br#"{"a": "plain \"quoted\" text", "b": [1, 2]}"#), (None, 0));
        // Numbers between strings are searched too; a finding there leaves the JSON invalid, so
        // the value becomes NULL.
        assert!(run(br#"{"p": 4155550123, "q": "x"}"#).0.is_none(), "no separators: not a phone");
        let plan = Plan::from_row_description(&row_description(&[("doc", JSONB, 1)]), &m, false).unwrap();
        let row = data_row(&[Some(b"\x01[\"x\\n415-555-0123\"]")]);
        let out = mask_data_row(&row, &plan, &m, &mut Counts::default()).unwrap().unwrap();
        assert_eq!(out, data_row(&[Some(b"\x01[\"x\\n[REDACTED]\"]")]));
        // A string cut short (not the server's output) is searched as it is.
        assert_eq!(run(br#"["a@b.com"#).0.as_deref(), Some(r#"["[REDACTED]"#));
        // In a json[] or jsonb[] the array's quoting wraps each element's escapes: the strings
        // are read decoded too, and a finding makes the whole array NULL.
        for oid in [JSON_ARRAY, JSONB_ARRAY] {
            let plan = Plan::from_row_description(&row_description(&[("docs", oid, 0)]), &m, false).unwrap();
            for hidden in [
                br#"{"{\"m\": \"a\\u0040b.com\"}","{\"k\\u0040x\": 1}"}"#.as_slice(),
                // json keeps a repeated key, which a parsed object would have dropped.
                br#"{"{\"m\": \"a\\u0040b.com\", \"m\": 0}"}"#,
                // Not UTF-8 (LATIN1 `\xe9`), nested, deeper than a parser goes.
                &[
                    b"{\"".as_slice(),
                    &b"[".repeat(200),
                    b"{\\\"m\\\": \\\"\xe9 a\\\\u0040b.com\\\"}",
                    &b"]".repeat(200),
                    b"\"}",
                ]
                .concat(),
                // Found as it stands, counted once.
                br#"{"{\"m\": \"a@b.com\"}"}"#,
            ] {
                let mut counts = Counts::default();
                let out = mask_data_row(&data_row(&[Some(hidden)]), &plan, &m, &mut counts).unwrap();
                assert_eq!(out, Some(data_row(&[None])), "{oid}: {}", String::from_utf8_lossy(hidden));
                assert_eq!(counts.total(), 1, "{oid}: {}", String::from_utf8_lossy(hidden));
            }
            let clean = data_row(&[Some(br#"{"{\"a\": \"x\\n\"}",NULL,"[1e400, 2]"}"#)]);
            assert_eq!(mask_data_row(&clean, &plan, &m, &mut Counts::default()).unwrap(), None, "{oid}");
            // Not an array literal: not the server's output.
            let out = mask_data_row(&data_row(&[Some(b"not an array")]), &plan, &m, &mut Counts::default()).unwrap();
            assert_eq!(out, Some(data_row(&[None])), "{oid}");
        }
        // In binary format too: each element's escaped strings are read decoded.
        let binary = |element: u32, items: &[Option<&[u8]>]| {
            let mut v = Vec::new();
            for word in [1, 1, element as i32, items.len() as i32, 1] {
                v.extend_from_slice(&word.to_be_bytes());
            }
            for item in items {
                match item {
                    None => v.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(json) => {
                        let version: &[u8] = if element == JSONB { &[1] } else { &[] };
                        v.extend_from_slice(&((version.len() + json.len()) as i32).to_be_bytes());
                        v.extend_from_slice(version);
                        v.extend_from_slice(json);
                    }
                }
            }
            v
        };
        for (oid, element) in [(JSON_ARRAY, JSON), (JSONB_ARRAY, JSONB)] {
            let plan = Plan::from_row_description(&row_description(&[("docs", oid, 1)]), &m, false).unwrap();
            let run = |v: &[u8]| {
                let mut counts = Counts::default();
                let out = mask_data_row(&data_row(&[Some(v)]), &plan, &m, &mut counts).unwrap();
                (out, counts.to_map())
            };
            let hidden = binary(element, &[Some(br#"{"m": "a\u0040b.com"}"#), None]);
            assert_eq!(run(&hidden), (Some(data_row(&[None])), [("email".to_string(), 1)].into()), "{oid}");
            assert_eq!(run(&binary(element, &[Some(br#"{"a": "x\n"}"#), None])), (None, [].into()), "{oid}");
            // Another element type than the column's: not the server's output.
            let other = binary(25, &[Some(b"x")]);
            assert_eq!(run(&other), (Some(data_row(&[None])), [("column".to_string(), 1)].into()), "{oid}");
        }
    }

    #[test]
    fn detectors_read_binary_arrays_float_exponents_and_hex_bytea() {
        let m = Masker::new(
            &[Rule {
                name: "d".into(),
                target: Target::Detect(vec![crate::mask::Kind::CreditCard, crate::mask::Kind::Secret]),
                style: Style::Redact,
            }],
            [1; 32],
        );
        let masked = |oid: u32, format: i16, v: &[u8]| {
            let plan = Plan::from_row_description(&row_description(&[("x", oid, format)]), &m, false).unwrap();
            mask_data_row(&data_row(&[Some(v)]), &plan, &m, &mut Counts::default()).unwrap()
        };
        // A text[] in binary: header, then each element behind its length. The length of a
        // 51-byte key ends in 0x33 ('3'), glued to it.
        let key = format!("sk-{}", "A".repeat(48));
        let mut array = BytesMut::new();
        for word in [1, 0, 25, 1, 1] {
            array.put_i32(word);
        }
        array.put_i32(key.len() as i32);
        array.extend_from_slice(key.as_bytes());
        assert_eq!(masked(1009, 1, &array), Some(data_row(&[None])), "the key's array goes as NULL");
        // A card number in a float8 column: the server's text is in exponent form.
        assert_eq!(masked(701, 0, b"4.532015112830366e+15"), Some(data_row(&[None])));
        assert_eq!(masked(1022, 0, b"{1.5,4.532015112830366e+15}"), Some(data_row(&[None])));
        assert_eq!(masked(701, 0, b"1.5e+15"), None, "not a card");
        // bytea in hex (the server's default output) holding a card number's text.
        let hex = format!("\\x{}", hex::encode("card 4532015112830366"));
        assert_eq!(masked(BYTEA, 0, hex.as_bytes()), Some(data_row(&[None])));
        assert_eq!(masked(BYTEA, 0, b"\\x00ff"), None);
    }

    /// Columns stored in a user table (OID 16400, attributes 1, 2...), whose values keep their
    /// rule's style.
    fn row_description(cols: &[(&str, u32, i16)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for (i, (name, oid, format)) in cols.iter().enumerate() {
            b.extend_from_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(16400);
            b.put_i16(i as i16 + 1);
            b.put_u32(*oid);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(*format);
        }
        b.to_vec()
    }

    /// The masked body of `row`, or `None` when it went out unchanged.
    fn mask_data_row(row: &Bytes, plan: &Plan, m: &Masker, counts: &mut Counts) -> Result<Option<Bytes>, WireError> {
        let mut out = BytesMut::from(&b"before"[..]);
        let written = write_data_row(row, plan, false, m, counts, &mut out);
        if written.is_err() {
            assert_eq!(&out[..], b"before", "nothing of a failed row is left in the output");
        }
        written?;
        assert_eq!((out[6], i32::from_be_bytes(out[7..11].try_into().unwrap()) as usize), (b'D', out.len() - 7));
        let body = out.split_off(11).freeze();
        Ok((body != *row).then_some(body))
    }

    fn data_row(values: &[Option<&[u8]>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.freeze()
    }

    #[test]
    fn data_rows_text_and_binary() {
        let m = masker();
        let plan = Plan::from_row_description(
            &row_description(&[
                ("id", 23, 1),
                ("customer_ssn", 25, 0),
                ("note", 25, 1),
                ("ssn_num", 23, 1),
                ("n", 25, 0),
            ]),
            &m,
            false,
        )
        .unwrap();
        let mut counts = Counts::default();
        let row = data_row(&[
            Some(&7i32.to_be_bytes()),
            Some(b"123-45-6789"),
            Some(b"mail bob@example.com"),
            Some(&42i32.to_be_bytes()),
            None,
        ]);
        let out = mask_data_row(&row, &plan, &m, &mut counts).unwrap().unwrap();
        let expected = data_row(&[
            Some(&7i32.to_be_bytes()),
            Some(REDACTED.as_bytes()),
            Some(b"mail ***********.com"),
            None,
            None,
        ]);
        // jsonb in binary: a wholly masked value becomes a JSON string after the version byte.
        let json = Plan::from_row_description(&row_description(&[("ssn", JSONB, 1)]), &m, false).unwrap();
        let j = mask_data_row(&data_row(&[Some(b"\x01{\"a\": 1}")]), &json, &m, &mut Counts::default());
        assert_eq!(j.unwrap().unwrap(), data_row(&[Some(b"\x01\"[REDACTED]\"")]));
        assert_eq!(out, expected);
        assert_eq!(counts.to_map(), [("column".into(), 2), ("email".into(), 1)].into());
        // A row of another shape is refused even under a plan that masks nothing.
        let columns_only = Masker::new(
            &[Rule { name: "c".into(), target: Target::Columns(vec![Glob::new("ssn")]), style: Style::Redact }],
            [1; 32],
        );
        let quiet = Plan::from_row_description(&row_description(&[("id", 23, 1)]), &columns_only, false).unwrap();
        assert!(!quiet.active);
        assert!(mask_data_row(&data_row(&[Some(b"1"), Some(b"2")]), &quiet, &columns_only, &mut counts).is_err());
        // Nothing sensitive: the original is relayed as is.
        let clean = data_row(&[Some(&1i32.to_be_bytes()), None, Some(b"hello"), None, Some(b"x")]);
        assert_eq!(mask_data_row(&clean, &plan, &m, &mut counts).unwrap(), None);
        // A row that does not match its description is an error, not a guess.
        assert!(mask_data_row(&data_row(&[Some(b"1")]), &plan, &m, &mut counts).is_err());
        let mut bad = row.to_vec();
        bad.truncate(bad.len() - 3);
        assert!(mask_data_row(&Bytes::from(bad), &plan, &m, &mut counts).is_err());
    }

    #[test]
    fn computed_values_masked_whole_are_all_sent_alike_null_too() {
        // `SELECT CASE WHEN get_bit(...) = 1 THEN 'x' END ... FROM people`: whether a value is
        // NULL would be one bit of a masked value per cell.
        let m = masker();
        let mut b = BytesMut::new();
        b.put_i16(4);
        for (name, oid, format) in [("x", 25, 0), ("j", JSONB, 1), ("n", 23, 1), ("a", 1009, 0)] {
            b.extend_from_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(0);
            b.put_i16(0);
            b.put_u32(oid);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(format);
        }
        let plan = Plan::from_row_description(&b, &m, true).unwrap();
        let alike = data_row(&[Some(REDACTED.as_bytes()), Some(b"\x01\"[REDACTED]\""), None, None]);
        let mut counts = Counts::default();
        for row in [
            data_row(&[Some(b"x"), Some(b"\x01{}"), Some(&1i32.to_be_bytes()), Some(b"{x,NULL}")]),
            data_row(&[None, None, None, None]),
        ] {
            assert_eq!(mask_data_row(&row, &plan, &m, &mut counts).unwrap().unwrap(), alike);
        }
        assert_eq!(counts.to_map(), [("column".into(), 4)].into(), "the values, not the NULLs");
        // A stored column masked whole keeps its NULLs: they are the data's, not the client's.
        let stored = Plan::from_row_description(&row_description(&[("customer_ssn", 25, 0)]), &m, true).unwrap();
        assert_eq!(mask_data_row(&data_row(&[None]), &stored, &m, &mut counts).unwrap(), None);
    }

    #[test]
    fn text_arrays_are_masked_element_by_element() {
        let m = masker();
        let redact = |e: &[u8]| (e != b"keep").then(|| m.whole(Style::Redact, e));
        let arrays: [(&[u8], &[u8]); 5] = [
            (b"{a,b}", br#"{"[REDACTED]","[REDACTED]"}"#),
            (br#"{"x, \"y\" \\ z",NULL,keep}"#, br#"{"[REDACTED]",NULL,keep}"#),
            (b"[0:1]={{a,keep},{NULL,b}}", br#"[0:1]={{"[REDACTED]",keep},{NULL,"[REDACTED]"}}"#),
            (br#"{"NULL"}"#, br#"{"[REDACTED]"}"#),
            (b"{}", b"{}"),
        ];
        for (input, expected) in arrays {
            let got = mask_text_array(input, redact).unwrap().unwrap_or(input.to_vec());
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
        }
        // Detection rewrites within an element, and the quoting stays right.
        let mut counts = Counts::default();
        let got =
            mask_text_array(br#"{"say \"bob@example.com\"",plain}"#, |e| m.apply(ColumnMask::Detect, e, &mut counts));
        assert_eq!(String::from_utf8_lossy(&got.unwrap().unwrap()), r#"{"say \"***********.com\"",plain}"#);
        assert_eq!(counts.to_map(), [("email".into(), 1)].into());
        assert_eq!(mask_text_array(b"{a,b}", |_| None), Ok(None));
        // An array whose masked form would pass the largest message is refused (it becomes NULL).
        let huge = [b"{".as_slice(), &b"a,".repeat(MAX_MESSAGE / 16), b"a}"].concat();
        assert_eq!(mask_text_array(&huge, |_| Some(b"hash:0123456789abcdef".to_vec())), Err(()));
        for bad in [&b"{a"[..], b"a}", b"{\"a}", b"[1:2]", b"{a}}", b"{a}x"] {
            assert_eq!(mask_text_array(bad, redact), Err(()), "{}", String::from_utf8_lossy(bad));
        }
        // In a DataRow: a text[] column named like a masked one keeps its shape.
        let plan = Plan::from_row_description(&row_description(&[("ssns", 1009, 0)]), &m, false).unwrap();
        let out = mask_data_row(&data_row(&[Some(b"{1,NULL}")]), &plan, &m, &mut Counts::default());
        assert_eq!(out.unwrap().unwrap(), data_row(&[Some(br#"{"[REDACTED]",NULL}"#)]));
    }

    #[test]
    fn copy_rows_text_and_csv() {
        let m = masker();
        let copy = |format, delimiter, columns: Option<Vec<&str>>| CopyOut {
            format,
            delimiter,
            header: false,
            unusual: None,
            columns: columns.map(|c| c.into_iter().map(String::from).collect()),
            query: false,
            tables: Default::default(),
            reads: Default::default(),
        };
        let text = copy(CopyFormat::Text, b'\t', Some(vec!["id", "ssn", "note"]));
        let plan = Plan::for_copy(&text, &m);
        let mut counts = Counts::default();
        let row = Bytes::from_static(b"1\t123-45-6789\tsee a@b.io\\ttab\n");
        let out = mask_copy_row(&row, &text, &plan, &m, &mut counts).unwrap().unwrap();
        assert_eq!(&out[..], b"1\t[REDACTED]\tsee **b.io\\ttab\n");
        let row = Bytes::from_static(b"2\t\\N\tnothing\n");
        assert_eq!(mask_copy_row(&row, &text, &plan, &m, &mut counts), Ok(None));
        // A delimiter inside a value arrives escaped and does not shift the columns.
        let piped = copy(CopyFormat::Text, b'|', Some(vec!["note", "ssn"]));
        let plan_p = Plan::for_copy(&piped, &m);
        let row = Bytes::from_static(b"x\\|y|123-45-6789\n");
        let out = mask_copy_row(&row, &piped, &plan_p, &m, &mut counts).unwrap().unwrap();
        assert_eq!(&out[..], b"x\\|y|[REDACTED]\n");
        // Rows of another shape are refused, not relayed.
        assert!(mask_copy_row(&Bytes::from_static(b"1\t2\n"), &text, &plan, &m, &mut counts).is_err());
        let csv = copy(CopyFormat::Csv, b',', None);
        let plan = Plan::for_copy(&csv, &m);
        let row = Bytes::from_static(b"3,\"x@y.com, \"\"q\"\"\",,\"\"\n");
        let out = mask_copy_row(&row, &csv, &plan, &m, &mut counts).unwrap().unwrap();
        assert_eq!(&out[..], b"3,\"***.com, \"\"q\"\"\",,\"\"\n");
        assert!(mask_copy_row(&Bytes::from_static(b"\"open\n"), &csv, &plan, &m, &mut counts).is_err());
        // A column whose type holds a masked field is masked whole, though its name says nothing.
        let h = holding(&m, "folks", "who");
        let folks = CopyOut {
            tables: ["public.folks".to_string()].into(),
            ..copy(CopyFormat::Text, b'\t', Some(vec!["id", "who"]))
        };
        let plan = Plan::for_copy(&folks, &h);
        let row = Bytes::from_static(b"1\t(ann,topsecret)\n");
        let out = mask_copy_row(&row, &folks, &plan, &h, &mut counts).unwrap().unwrap();
        assert_eq!(&out[..], b"1\t[REDACTED]\n");
        let other = CopyOut { tables: ["t".to_string()].into(), ..folks.clone() };
        let plan = Plan::for_copy(&other, &h);
        assert_eq!(mask_copy_row(&row, &other, &plan, &h, &mut counts), Ok(None), "another table's who");
    }

    /// `m` after a login lookup that found `table.column` holding a masked field.
    fn holding(m: &Masker, table: &str, column: &str) -> Masker {
        let t = crate::mask::MaskedTable {
            style: Style::Redact,
            columns: [column.to_string()].into(),
            holding: [column.to_string()].into(),
        };
        m.with_origins("db", Default::default(), [(table.to_string(), t)].into())
    }

    #[test]
    fn notices_mask_detail() {
        let m = masker();
        let mut b = BytesMut::new();
        for (code, text) in [
            (b'S', "ERROR"),
            (b'C', "23505"),
            (b'M', "duplicate key"),
            (b'D', "Key (customer_ssn)=(123-45-6789) already exists."),
        ] {
            b.put_u8(code);
            b.extend_from_slice(text.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let mut counts = Counts::default();
        let out = mask_notice(&b.freeze(), &m, false, &mut counts).unwrap().unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("Key (customer_ssn)=([REDACTED]) already exists."), "{text}");
        let mut b = BytesMut::new();
        b.extend_from_slice(b"Minvalid input: \"joe@example.org\"\0\0");
        let out = mask_notice(&b.freeze(), &m, false, &mut counts).unwrap().unwrap();
        // Redacted, not in the detector's style: messages quote what the client sent.
        assert_eq!(&out[..], b"Minvalid input: \"[REDACTED]\"\0\0");
        assert!(mask_notice(&Bytes::from_static(b"Mno terminator"), &m, false, &mut counts).is_err());
        // A statement computing from masked values: its texts may quote them, or not.
        let body = Bytes::from_static(b"SERROR\0C22P02\0Mbad \"\"topsecret\"\0Dd\0Hh\0WPL/pgSQL\0P7\0\0");
        let out = mask_notice(&body, &m, true, &mut counts).unwrap().unwrap();
        let expected = format!("SERROR\0C22P02\0M{WITHHELD}\0P7\0\0");
        assert_eq!(&out[..], expected.as_bytes());
    }

    #[test]
    fn detail_values_of_masked_columns_are_redacted_in_every_shape_and_encoding() {
        let m = masker();
        let mut counts = Counts::default();
        let mut detail =
            |t: &[u8]| mask_detail_values(t, &m, &mut counts).map(|o| String::from_utf8_lossy(&o).into_owned());
        let cases: [(&[u8], Option<&str>); 7] = [
            (
                b"Key (customer_ssn)=(123-45-6789) already exists.",
                Some("Key (customer_ssn)=([REDACTED]) already exists."),
            ),
            (
                b"Key (lower(customer_ssn::text))=(123-45-6789) already exists.",
                Some("Key (lower(customer_ssn::text))=([REDACTED]) already exists."),
            ),
            (
                b"Partition key of the failing row contains (region, customer_ssn) = (zz, 123-45-6789).",
                Some("Partition key of the failing row contains (region, customer_ssn) = ([REDACTED])."),
            ),
            (
                b"Key (\"ssn\", id)=(1, 2) is still referenced from table \"t\".",
                Some("Key (\"ssn\", id)=([REDACTED]) is still referenced from table \"t\"."),
            ),
            // LATIN1 text (a client encoding that is not UTF-8).
            (b"Failing row contains (1, null, Z\xfcrich).", Some("Failing row contains ([REDACTED]).")),
            (
                b"Key (customer_ssn)=(Z\xfcrich) already exists.",
                Some("Key (customer_ssn)=([REDACTED]) already exists."),
            ),
            (b"Key (id)=(7) already exists.", None),
        ];
        for (text, want) in cases {
            assert_eq!(detail(text).as_deref(), want, "{}", String::from_utf8_lossy(text));
        }
        assert_eq!(
            detail_names(r#"id, "who x", lower("a""b"::text), z9$"#),
            ["id", "who x", "lower", "a\"b", "text", "z9$"]
        );
        let spaced = detail(b"Key (\"customer ssn\")=(123-45-6789) already exists.");
        assert_eq!(spaced.as_deref(), Some("Key (\"customer ssn\")=([REDACTED]) already exists."), "a quoted name");
        // A column whose type holds a masked field: a DETAIL names no table, so any table's.
        let h = holding(&m, "folks", "who");
        let out = mask_detail_values(b"Key (id, who)=(1, (a,topsecret)) already exists.", &h, &mut counts);
        assert_eq!(out.as_deref(), Some(&b"Key (id, who)=([REDACTED]) already exists."[..]));
        assert_eq!(mask_detail_values(b"Key (id)=(1) already exists.", &h, &mut counts), None);
        let h = holding(&m, "folks", "who x");
        let out = mask_detail_values(b"Key (id, \"who x\")=(1, (a,topsecret)) already exists.", &h, &mut counts);
        assert_eq!(out.as_deref(), Some(&b"Key (id, \"who x\")=([REDACTED]) already exists."[..]));
    }

    #[test]
    fn notification_payloads_are_masked_by_the_detectors() {
        let m = masker();
        let mut counts = Counts::default();
        let body = Bytes::from_static(b"\0\0\x30\x39orders\0mail joe@example.org now\0");
        let out = mask_notification(&body, &m, &mut counts).unwrap().unwrap();
        // Redacted, not in the detector's style: a session chose the payload.
        assert_eq!(&out[..], b"\0\0\x30\x39orders\0mail [REDACTED] now\0");
        assert_eq!(counts.to_map(), [("email".into(), 1)].into());
        assert_eq!(mask_notification(&Bytes::from_static(b"\0\0\0\x01c\0nothing\0"), &m, &mut counts), Ok(None));
        assert!(mask_notification(&Bytes::from_static(b"\0\0\0\x01c\0no end"), &m, &mut counts).is_err());
    }
}
