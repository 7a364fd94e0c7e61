//! The statements a session parsed, by name, bounded in number and in bytes of text.
use foldhash::{HashMap, HashMapExt};

use super::Prepared;

/// Most named statements a session may have (the masking tracker keeps the row shapes of as
/// many, and of the unnamed one, so it need not forget one the client still uses); and most
/// bytes of their texts. The server keeps them too, but the agent's memory serves every session.
pub const MAX_STATEMENTS: usize = 4096;
pub const MAX_STATEMENT_BYTES: usize = 64 << 20;

pub struct Statements {
    map: HashMap<String, Prepared>,
    /// Bytes of the named statements' texts (the unnamed one is replaced, never added).
    bytes: usize,
}

impl Default for Statements {
    fn default() -> Self {
        Statements { map: HashMap::new(), bytes: 0 }
    }
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Prepared> {
        self.map.get(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn insert(&mut self, name: String, p: Prepared) -> Option<Prepared> {
        let named = !name.is_empty();
        if named {
            self.bytes += p.text.len();
        }
        let old = self.map.insert(name, p);
        if let Some(old) = old.as_ref().filter(|_| named) {
            self.bytes -= old.text.len();
        }
        old
    }

    pub fn remove(&mut self, name: &str) -> Option<Prepared> {
        let old = self.map.remove(name);
        if let Some(old) = old.as_ref().filter(|_| !name.is_empty()) {
            self.bytes -= old.text.len();
        }
        old
    }

    /// Why these statements, with `more` named ones parsed and those named in `closed` closed
    /// earlier in the batch at hand, leave no room for another named one of `len` bytes of
    /// text, if they do not.
    pub fn full<'a>(&self, more: impl Iterator<Item = &'a Prepared>, closed: &[&str], len: usize) -> Option<String> {
        let named = self.map.len() - usize::from(self.map.contains_key(""));
        let (count, bytes) = more.fold((named, self.bytes), |(c, b), p| (c + 1, b + p.text.len()));
        // Each statement closed counts once, however often the batch names it.
        let mut once: Vec<&str> = Vec::new();
        for &n in closed {
            if !n.is_empty() && !once.contains(&n) {
                once.push(n);
            }
        }
        let gone = once.iter().filter_map(|n| self.map.get(*n));
        let (count, bytes) =
            gone.fold((count, bytes), |(c, b), p| (c.saturating_sub(1), b.saturating_sub(p.text.len())));
        if count >= MAX_STATEMENTS {
            Some(format!("a session may keep at most {MAX_STATEMENTS} named prepared statements; Close some first"))
        } else if bytes + len > MAX_STATEMENT_BYTES {
            Some(format!(
                "a session's prepared statements may hold at most {} MiB of text; Close some first",
                MAX_STATEMENT_BYTES >> 20
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Prepared {
        Prepared { seq: 1, class: Default::default(), text: text.into(), hold: None, computed: false, cut: false }
    }

    #[test]
    fn texts_are_counted_as_statements_come_and_go() {
        let mut s = Statements::default();
        s.insert("a".into(), p("SELECT 1"));
        s.insert("a".into(), p("SELECT 22"));
        s.insert("".into(), p("SELECT 333"));
        assert_eq!(s.bytes, 9, "the unnamed statement's text does not count");
        s.remove("a");
        s.remove("");
        assert_eq!(s.bytes, 0);
        // The unnamed statement is replaced, never added: it does not count.
        for i in 0..MAX_STATEMENTS - 1 {
            s.insert(format!("s{i}"), p("x"));
        }
        let more = [p("y")];
        assert_eq!(s.full([].iter(), &[], 1), None);
        assert!(s.full(more.iter(), &[], 1).is_some_and(|why| why.contains("4096 named")));
        assert_eq!(s.full(more.iter(), &["s0"], 1), None, "closed earlier in the batch");
        assert!(s.full(more.iter(), &["nope"], 1).is_some(), "closing what is not there frees nothing");
        let two = [p("y"), p("z")];
        assert!(s.full(two.iter(), &["s0", "s0"], 1).is_some(), "a name closed twice frees its room once");
        assert_eq!(s.full(two.iter(), &["s0", "s1"], 1), None);
        let big = MAX_STATEMENT_BYTES - s.bytes;
        assert_eq!(s.full([].iter(), &[], big), None);
        assert!(s.full([].iter(), &[], big + 1).is_some_and(|why| why.contains("64 MiB")));
    }
}
