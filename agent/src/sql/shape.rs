//! Statement shapes: a cache key that is equal for texts differing only in literal values.
//!
//! A key lists a text's tokens, each followed by NUL, with every numeric and string literal
//! replaced by U+0001. Texts with equal keys have parse trees that differ only in constant
//! leaves, which no rule looks at, so they classify identically and one classification serves
//! them all (pgbench's `... WHERE aid = 42` and `... = 43`).
//!
//! pg_query's scanner finds the tokens, but a scan costs about 5 µs, as much as the rest of a
//! statement's trip through the proxy. The common texts are therefore tokenized here first, by a
//! lexer that knows only a safe subset of PostgreSQL's lexical rules and gives up on anything
//! else (comments, dollar quotes, escape strings, backslashes, non-ASCII names...), which then
//! goes to the scanner. Where it does not give up it must produce the scanner's key exactly; a
//! unit test and the `sql` fuzz target check that.

use pg_query::protobuf::Token;

/// Words whose literal arguments the classifier reads: COPY's options (FORMAT, DELIMITER,
/// HEADER), `set_config`'s setting name, and the queries `query_to_xml...`, `ts_stat`,
/// `ts_rewrite` and `crosstab` run. A text that has any, in any case and anywhere (inside other words,
/// strings and comments too), keeps all its literals.
const COPY: &[u8] = b"copy";
const SET_CONFIG: &[u8] = b"set_config";
const QUERY_TO: &[u8] = b"query_to";
const TS_STAT: &[u8] = b"ts_stat";
const TS_REWRITE: &[u8] = b"ts_rewrite";
const CROSSTAB: &[u8] = b"crosstab";

/// Stands for a literal in a key.
const LITERAL: char = '\u{1}';

/// The shape of `sql`, or `None` when it does not even scan (classify it directly).
pub fn shape(sql: &str) -> Option<String> {
    let mut key = Vec::new();
    shape_into(sql, &mut key).then(|| String::from_utf8(key).expect("keys are cut from the text at char boundaries"))
}

/// `shape`, written into `key` (cleared first) so a session can reuse one buffer; false when
/// the text does not even scan.
pub fn shape_into(sql: &str, key: &mut Vec<u8>) -> bool {
    key.clear();
    lexed(sql.as_bytes(), key) || scanned(sql, literals_matter(sql), key)
}

/// The shape as pg_query's scanner gives it, never the fast lexer's (for tests and fuzzing:
/// `shape` must always equal it).
pub fn scanned_shape(sql: &str) -> Option<String> {
    let mut key = Vec::new();
    scanned(sql, literals_matter(sql), &mut key)
        .then(|| String::from_utf8(key).expect("keys are cut from the text at char boundaries"))
}

/// Whether `b` holds one of the words whose literals the classifier reads, in any case.
fn literals_matter(sql: &str) -> bool {
    has_word(sql.as_bytes())
}

fn has_word(b: &[u8]) -> bool {
    let at = |i: usize, w: &[u8]| b.get(i..i + w.len()).is_some_and(|x| x.eq_ignore_ascii_case(w));
    // A table lookup per byte, then the second letter before a whole word: this runs on the
    // tokens of every simple-protocol query.
    (0..b.len()).any(|i| {
        CLASS[usize::from(b[i])] & WORD_START != 0
            && match (b[i] | 0x20, b.get(i + 1).map_or(0, |x| x | 0x20)) {
                (b'c', b'o') => at(i, COPY),
                (b'c', b'r') => at(i, CROSSTAB),
                (b's', b'e') => at(i, SET_CONFIG),
                (b'q', b'u') => at(i, QUERY_TO),
                (b't', b's') => at(i, TS_STAT) || at(i, TS_REWRITE),
                _ => false,
            }
    })
}

fn scanned(sql: &str, keep_literals: bool, key: &mut Vec<u8>) -> bool {
    key.clear();
    let Ok(scan) = pg_query::scan(sql) else { return false };
    // Unicode escapes: a UESCAPE literal changes what U&"..." names decode to. No cache.
    let unicode = [Token::Uident, Token::Usconst, Token::Uescape].map(|t| t as i32);
    if scan.tokens.iter().any(|t| unicode.contains(&t.token)) {
        return false;
    }
    let keep_literals = keep_literals || runs_do(&scan.tokens);
    let literals = [Token::Iconst, Token::Fconst, Token::Sconst].map(|t| t as i32);
    key.reserve(sql.len() + scan.tokens.len());
    for t in &scan.tokens {
        if !keep_literals && literals.contains(&t.token) {
            key.push(LITERAL as u8);
        } else {
            let token = usize::try_from(t.start).ok().zip(usize::try_from(t.end).ok()).and_then(|(a, z)| sql.get(a..z));
            let Some(token) = token else {
                key.clear();
                return false;
            };
            key.extend_from_slice(token.as_bytes());
        }
        key.push(0);
    }
    true
}

/// A DO statement's body is a string literal the classifier reads: a text with one keeps all
/// its literals.
fn runs_do(tokens: &[pg_query::protobuf::ScanToken]) -> bool {
    let comments = [Token::SqlComment, Token::CComment].map(|t| t as i32);
    let mut starts = true;
    for t in tokens.iter().filter(|t| !comments.contains(&t.token)) {
        if starts && t.token == Token::Do as i32 {
            return true;
        }
        starts = t.token == Token::Ascii59 as i32;
    }
    false
}

/// Byte classes, one bit each, looked up in `CLASS`.
const SPACE: u8 = 1;
/// Continues an identifier in PostgreSQL (bytes >= 0x80 too, which this lexer refuses).
const IDENT: u8 = 2;
const DIGIT: u8 = 4;
const OP: u8 = 8;
/// Operator characters that let a multi-character operator end in `+` or `-`.
const UNUSUAL_OP: u8 = 16;
/// The first letter of a word `has_word` looks for, in either case.
const WORD_START: u8 = 32;
const NON_ASCII: u8 = 64;

/// Every byte's classes: the lexer looks a byte up once instead of comparing it with ranges.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        // Form feed and vertical tab are spaces to some server versions only: not handled here.
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            c |= SPACE;
        }
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80 {
            c |= IDENT;
        }
        if b.is_ascii_digit() {
            c |= DIGIT;
        }
        if matches!(b, b'~' | b'!' | b'@' | b'#' | b'^' | b'&' | b'|' | b'`' | b'?' | b'+' | b'-' | b'*' | b'/' | b'%')
            || matches!(b, b'<' | b'>' | b'=')
        {
            c |= OP;
        }
        if matches!(b, b'~' | b'!' | b'@' | b'#' | b'^' | b'&' | b'|' | b'`' | b'?' | b'%') {
            c |= UNUSUAL_OP;
        }
        if matches!(b | 0x20, b'c' | b's' | b'q' | b't') && b.is_ascii_alphabetic() {
            c |= WORD_START;
        }
        if b >= 0x80 {
            c |= NON_ASCII;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn class(b: u8) -> u8 {
    CLASS[usize::from(b)]
}

fn is_ident_cont(b: u8) -> bool {
    class(b) & IDENT != 0
}

/// Writes the key of `b` into `key` by the safe subset of the lexer; false (and `key` left
/// to be overwritten) where it gives up, which it also does on a text `has_word` would hold
/// (the caller then scans it keeping its literals).
fn lexed(b: &[u8], key: &mut Vec<u8>) -> bool {
    // Every byte taken into the key is ASCII: identifiers, quoted names and operators with a
    // byte past ASCII are refused, and literals are replaced.
    key.reserve(b.len() + 16);
    const LITERAL_KEY: [u8; 2] = [LITERAL as u8, 0];
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut i = 0;
    // At the first token of a statement.
    let mut starts = true;
    while i < b.len() {
        let start = i;
        let c = b[i];
        let cls = class(c);
        if cls & SPACE != 0 {
            i += 1;
            continue;
        }
        let starting = std::mem::replace(&mut starts, c == b';');
        if cls & IDENT != 0 && cls & DIGIT == 0 && c != b'$' {
            // The classes of the identifier's bytes, together.
            let mut seen = 0;
            while i < b.len() && class(b[i]) & IDENT != 0 {
                seen |= class(b[i]);
                i += 1;
            }
            // Non-ASCII names; E'', B'', X'', N'' literals; U&"" and U&'' escapes.
            if seen & NON_ASCII != 0 || matches!(at(i), b'\'' | b'"' | b'&') {
                return false;
            }
            // A DO block: its body literal matters (`runs_do`).
            if starting && b[start..i].eq_ignore_ascii_case(b"do") {
                return false;
            }
            if seen & WORD_START != 0 && has_word(&b[start..i]) {
                return false;
            }
            key.extend_from_slice(&b[start..i]);
            key.push(0);
            continue;
        }
        match c {
            b'0'..=b'9' => {
                let Some(end) = number_end(b, i) else { return false };
                i = end;
                key.extend_from_slice(&LITERAL_KEY);
                continue;
            }
            b'\'' => {
                // A backslash's meaning depends on standard_conforming_strings; NUL ends a C string.
                let Some(end) = quoted_end(b, i, |x| x == b'\\' || x == 0) else { return false };
                i = end;
                // Another quote after a newline continues the literal; on one line, an error.
                let mut j = i;
                while j < b.len() && class(b[j]) & SPACE != 0 {
                    j += 1;
                }
                if at(j) == b'\'' || has_word(&b[start..i]) {
                    return false;
                }
                key.extend_from_slice(&LITERAL_KEY);
                continue;
            }
            b'"' => {
                let Some(end) = quoted_end(b, i, |x| x >= 0x80 || x == 0) else { return false };
                i = end;
                if i - start == 2 || has_word(&b[start..i]) {
                    return false;
                }
            }
            b'$' => {
                // $1 is a parameter; any other $ starts a dollar quote.
                i += 1;
                if !at(i).is_ascii_digit() {
                    return false;
                }
                while at(i).is_ascii_digit() {
                    i += 1;
                }
                // The server refuses parameter numbers beyond 32 bits.
                if i - start > 10 || is_ident_cont(at(i)) || at(i) == b'.' {
                    return false;
                }
            }
            b'(' | b')' | b',' | b';' | b'[' | b']' => i += 1,
            b'.' => {
                // `..` and `.5` are tokens of their own.
                if at(i + 1) == b'.' || at(i + 1).is_ascii_digit() {
                    return false;
                }
                i += 1;
            }
            b':' => {
                i += 1;
                if matches!(at(i), b':' | b'=') {
                    i += 1;
                }
            }
            _ if cls & OP != 0 => {
                let Some(end) = operator_end(b, i) else { return false };
                i = end;
            }
            _ => return false,
        }
        key.extend_from_slice(&b[start..i]);
        key.push(0);
    }
    true
}

/// The end (past the closing quote) of the quoted text opening at `i`, where a doubled quote
/// stands for one. `None` when it is not closed or holds a byte `refused` rejects.
fn quoted_end(b: &[u8], start: usize, refused: impl Fn(u8) -> bool) -> Option<usize> {
    let quote = b[start];
    let mut i = start + 1;
    loop {
        match *b.get(i)? {
            x if x == quote && b.get(i + 1) == Some(&quote) => i += 2,
            x if x == quote => return Some(i + 1),
            x if refused(x) => return None,
            _ => i += 1,
        }
    }
}

/// The end of the numeric literal at `i`: digits, an optional fraction and exponent. `None`
/// for anything PostgreSQL reads otherwise (`0x1F`, `1_000`, `1e`, `1..2`, `12abc`).
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    while at(i).is_ascii_digit() {
        i += 1;
    }
    if at(i) == b'.' {
        i += 1;
        while at(i).is_ascii_digit() {
            i += 1;
        }
    }
    if matches!(at(i), b'e' | b'E') {
        let mut j = i + 1;
        if matches!(at(j), b'+' | b'-') {
            j += 1;
        }
        if at(j).is_ascii_digit() {
            while at(j).is_ascii_digit() {
                j += 1;
            }
            i = j;
        }
    }
    (!is_ident_cont(at(i)) && at(i) != b'.').then_some(i)
}

/// The end of the operator token at `i`, by PostgreSQL's rule: the longest run of operator
/// characters, less any trailing `+`/`-` unless the run has a character SQL's own operators
/// lack. `None` when the run holds a comment start or is too long.
fn operator_end(b: &[u8], start: usize) -> Option<usize> {
    let mut end = start;
    while end < b.len() && class(b[end]) & OP != 0 {
        end += 1;
    }
    let run = &b[start..end];
    if run.windows(2).any(|w| w == b"--" || w == b"/*") {
        return None;
    }
    let mut n = run.len();
    if n > 1 && matches!(run[n - 1], b'+' | b'-') && !run[..n - 1].iter().any(|&x| class(x) & UNUSUAL_OP != 0) {
        while n > 1 && matches!(run[n - 1], b'+' | b'-') {
            n -= 1;
        }
    }
    // The server refuses operators of NAMEDATALEN (64) characters or more.
    (n < 64).then_some(start + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(sql: &str) -> Option<String> {
        let mut key = Vec::new();
        lexed(sql.as_bytes(), &mut key).then(|| String::from_utf8(key).unwrap())
    }

    fn scan(sql: &str, keep_literals: bool) -> Option<String> {
        let mut key = Vec::new();
        scanned(sql, keep_literals, &mut key).then(|| String::from_utf8(key).unwrap())
    }

    /// Texts the fast lexer handles: its key must be the scanner's, byte for byte.
    const HANDLED: &[&str] = &[
        "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
        "select a.b, \"Quoted \"\" id\", t.* from s.t where x >= 1.5e3 and y <> 'it''s' limit $1",
        "UPDATE t SET a = a + -1, b = b||'x' WHERE id IN (1, 2, 0.0e1) RETURNING *",
        "SELECT 1::int, a[1:2], x := 3, 2 =- 1, 3 *- 4, 5 @- 6, 7 <=-+ 8, 9 !=- 10",
        "SELECT 1.", // a trailing dot belongs to the number
        "SELECT 1.e5, 2E+3, 4e-1",
        "INSERT INTO t(a, b) VALUES ($1, $2), ('x', 'y') ON CONFLICT DO NOTHING",
        "SELECT 'é ü 中' FROM t",
        "SELECT a$b FROM t WHERE c ~* 'x' AND d !~~ 'y' AND e ?| f AND g # h AND `i`",
    ];

    /// Texts it must give up on (the scanner reads them, or refuses them).
    const REFUSED: &[&str] = &[
        "SELECT 1 -- comment",
        "SELECT /* c */ 1",
        "SELECT 1 --",
        "SELECT $$x$$",
        "SELECT $tag$x$tag$",
        "SELECT E'\\n'",
        "SELECT 'a\\'",
        "SELECT B'101', X'1F', N'x'",
        "SELECT U&'\\0041'",
        "SELECT * FROM U&\"a\"",
        "SELECT 0x1F",
        "SELECT 1_000",
        "SELECT 1e",
        "SELECT 12abc",
        "SELECT 1..2",
        "SELECT .5",
        "SELECT $1a",
        "SELECT 'a'\n'b'",
        "SELECT 'a' 'b'",
        "SELECT 'a'\t'b'",
        "SELECT \"\"",
        "SELECT 'unterminated",
        "SELECT \"unterminated",
        "SELECT café FROM t",
        "SELECT {1}",
        "SELECT 1\x0c",
        "SELECT 'a\0b'",
        "SELECT \"a\0b\"",
        "SELECT $12345678901",
        "SELECT 1 ||||||||||||||||||||||||||||||||||||||||||||||||||||||||||||||||| 2",
    ];

    #[test]
    fn the_fast_lexer_gives_the_scanners_key() {
        for sql in HANDLED {
            let fast = lex(sql);
            assert!(fast.is_some(), "{sql:?} should be handled");
            assert_eq!(fast, scan(sql, false), "{sql:?}");
        }
    }

    #[test]
    fn the_fast_lexer_gives_up_on_the_rest() {
        for sql in REFUSED {
            assert_eq!(lex(sql), None, "{sql:?}");
            assert_eq!(shape(sql), scanned_shape(sql), "{sql:?}");
        }
    }

    #[test]
    fn literals_read_by_the_classifier_are_kept() {
        // set_config's setting name decides whether the statement changes how text is lexed.
        assert_ne!(
            shape("SELECT set_config('application_name', 'off', false)"),
            shape("SELECT set_config('standard_conforming_strings', 'off', false)")
        );
        assert_ne!(shape("SELECT \"SET_CONFIG\"('a', 'b', false)"), shape("SELECT \"SET_CONFIG\"('c', 'b', false)"));
        assert_ne!(shape("copy t to stdout (format 'csv')"), shape("copy t to stdout (format 'text')"));
        assert_eq!(shape("SELECT set_config('a', 'b', false)"), scanned_shape("SELECT set_config('a', 'b', false)"));
        for (sql, matters) in [
            ("COPY t TO STDOUT", true),
            ("select 1 from cOpY_log", true),
            ("select pg_catalog.Set_Config('a', 'b', false)", true),
            ("select 'x' -- copy", true),
            ("select cop, set_confi from s", false),
            ("cop", false),
            ("", false),
        ] {
            assert_eq!(literals_matter(sql), matters, "{sql:?}");
        }
    }

    #[test]
    fn the_fast_lexer_leaves_texts_with_read_literals_to_the_scanner() {
        // Wherever the word is (a name, a string, a quoted name), the key keeps the literals.
        for sql in [
            "select a from cOpY_log where b = 2",
            "select 'my ts_stat' , 2",
            "select \"CrossTab\"(2)",
            "select x.query_to_y(2)",
            "SELECT 2 FROM t WHERE a = 'set_config'",
        ] {
            assert_eq!(lex(sql), None, "{sql:?}");
            assert!(literals_matter(sql));
            let other = sql.replace('2', "3");
            assert_ne!(shape(sql), shape(&other), "{sql:?}");
            assert_eq!(shape(sql), scanned_shape(sql), "{sql:?}");
        }
        // Parts of the words, or words split by what the server reads as a separator, do not count.
        for sql in ["select cop, set_confi from s", "select co, py from t where a = 'ts_sta' || 't'"] {
            assert!(lex(sql).is_some(), "{sql:?}");
            assert!(!literals_matter(sql));
        }
    }
}
