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
    if literals_matter(sql) {
        return scanned(sql, true);
    }
    lexed(sql.as_bytes()).or_else(|| scanned(sql, false))
}

/// The shape as pg_query's scanner gives it, never the fast lexer's (for tests and fuzzing:
/// `shape` must always equal it).
pub fn scanned_shape(sql: &str) -> Option<String> {
    scanned(sql, literals_matter(sql))
}

fn literals_matter(sql: &str) -> bool {
    let b = sql.as_bytes();
    let at = |i: usize, w: &[u8]| b.get(i..i + w.len()).is_some_and(|x| x.eq_ignore_ascii_case(w));
    // One pass on the first letters: this runs on every simple-protocol query.
    (0..b.len()).any(|i| match b[i] | 0x20 {
        b'c' => at(i, COPY) || at(i, CROSSTAB),
        b's' => at(i, SET_CONFIG),
        b'q' => at(i, QUERY_TO),
        b't' => at(i, TS_STAT) || at(i, TS_REWRITE),
        _ => false,
    })
}

fn scanned(sql: &str, keep_literals: bool) -> Option<String> {
    let scan = pg_query::scan(sql).ok()?;
    // Unicode escapes: a UESCAPE literal changes what U&"..." names decode to. No cache.
    let unicode = [Token::Uident, Token::Usconst, Token::Uescape].map(|t| t as i32);
    if scan.tokens.iter().any(|t| unicode.contains(&t.token)) {
        return None;
    }
    let keep_literals = keep_literals || runs_do(&scan.tokens);
    let literals = [Token::Iconst, Token::Fconst, Token::Sconst].map(|t| t as i32);
    let mut key = String::with_capacity(sql.len() + scan.tokens.len());
    for t in &scan.tokens {
        if !keep_literals && literals.contains(&t.token) {
            key.push(LITERAL);
        } else {
            key.push_str(sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?);
        }
        key.push('\0');
    }
    Some(key)
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

fn is_space(b: u8) -> bool {
    // Form feed and vertical tab are spaces to some server versions only: not handled here.
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Continues an identifier in PostgreSQL (and bytes >= 0x80, which this lexer refuses).
fn is_ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn is_op_char(b: u8) -> bool {
    b"~!@#^&|`?+-*/%<>=".contains(&b)
}

/// Operator characters that let a multi-character operator end in `+` or `-`.
fn is_unusual_op_char(b: u8) -> bool {
    b"~!@#^&|`?%".contains(&b)
}

/// The key of `sql` by the safe subset of the lexer, or `None` where it gives up.
fn lexed(b: &[u8]) -> Option<String> {
    // Bytes, checked as UTF-8 once at the end: every token taken is ASCII, but not by
    // construction of the types.
    let mut key = Vec::with_capacity(b.len() + 16);
    const LITERAL_KEY: [u8; 2] = [LITERAL as u8, 0];
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut i = 0;
    // At the first token of a statement.
    let mut starts = true;
    while i < b.len() {
        let start = i;
        let c = b[i];
        if is_space(c) {
            i += 1;
            continue;
        }
        let starting = std::mem::replace(&mut starts, c == b';');
        match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < b.len() && is_ident_cont(b[i]) {
                    i += 1;
                }
                // Non-ASCII names; E'', B'', X'', N'' literals; U&"" and U&'' escapes.
                if b[start..i].iter().any(|&x| x >= 0x80) || matches!(at(i), b'\'' | b'"' | b'&') {
                    return None;
                }
                // A DO block: its body literal matters (`runs_do`).
                if starting && b[start..i].eq_ignore_ascii_case(b"do") {
                    return None;
                }
            }
            b'0'..=b'9' => {
                i = number_end(b, i)?;
                key.extend_from_slice(&LITERAL_KEY);
                continue;
            }
            b'\'' => {
                // A backslash's meaning depends on standard_conforming_strings; NUL ends a C string.
                i = quoted_end(b, i, |x| x == b'\\' || x == 0)?;
                // Another quote after a newline continues the literal; on one line, an error.
                let mut j = i;
                while j < b.len() && is_space(b[j]) {
                    j += 1;
                }
                if at(j) == b'\'' {
                    return None;
                }
                key.extend_from_slice(&LITERAL_KEY);
                continue;
            }
            b'"' => {
                i = quoted_end(b, i, |x| x >= 0x80 || x == 0)?;
                if i - start == 2 {
                    return None;
                }
            }
            b'$' => {
                // $1 is a parameter; any other $ starts a dollar quote.
                i += 1;
                if !at(i).is_ascii_digit() {
                    return None;
                }
                while at(i).is_ascii_digit() {
                    i += 1;
                }
                // The server refuses parameter numbers beyond 32 bits.
                if i - start > 10 || is_ident_cont(at(i)) || at(i) == b'.' {
                    return None;
                }
            }
            b'(' | b')' | b',' | b';' | b'[' | b']' => i += 1,
            b'.' => {
                // `..` and `.5` are tokens of their own.
                if at(i + 1) == b'.' || at(i + 1).is_ascii_digit() {
                    return None;
                }
                i += 1;
            }
            b':' => {
                i += 1;
                if matches!(at(i), b':' | b'=') {
                    i += 1;
                }
            }
            _ if is_op_char(c) => i = operator_end(b, i)?,
            _ => return None,
        }
        key.extend_from_slice(&b[start..i]);
        key.push(0);
    }
    String::from_utf8(key).ok()
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
    while end < b.len() && is_op_char(b[end]) {
        end += 1;
    }
    let run = &b[start..end];
    if run.windows(2).any(|w| w == b"--" || w == b"/*") {
        return None;
    }
    let mut n = run.len();
    if n > 1 && matches!(run[n - 1], b'+' | b'-') && !run[..n - 1].iter().any(|&x| is_unusual_op_char(x)) {
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
            let fast = lexed(sql.as_bytes());
            assert!(fast.is_some(), "{sql:?} should be handled");
            assert_eq!(fast, scanned(sql, false), "{sql:?}");
        }
    }

    #[test]
    fn the_fast_lexer_gives_up_on_the_rest() {
        for sql in REFUSED {
            assert_eq!(lexed(sql.as_bytes()), None, "{sql:?}");
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
}
