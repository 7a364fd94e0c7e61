//! Which Describes of FETCH statements and portals may reach the server: PostgreSQL 15.18
//! crashes (every backend restarts) describing one whose cursor is gone.
//!
//! The server answers a Describe of a FETCH statement, or of a portal bound from one, by
//! looking its cursor up again, and dereferences what it finds. A Describe that follows the
//! Parse or Bind with nothing between that could close a cursor finds the cursor the Parse or
//! Bind found (if there was none, the server answers NoData, harmlessly). Any other Describe
//! of them is refused.
//!
//! Which portals are bound to a FETCH is known for sure only within a batch: after an error
//! the server skips the rest of it, so a message after a Bind runs only if the Bind did. A
//! Bind in an earlier batch may have failed (a named portal cannot be bound again before it
//! is closed) and left the old portal in place, which `ROLLBACK TO SAVEPOINT` brings back into
//! use: a name once bound to a FETCH counts as one until the server has ended the
//! transaction.
use foldhash::HashMap;

/// Most portals bound to FETCH statements that the server may still hold in a session.
pub const MAX_FETCH_PORTALS: usize = 4096;

/// What a Describe targets, as in the protocol.
const STATEMENT: u8 = b'S';
const PORTAL: u8 = b'P';

#[derive(Default)]
pub struct Fetches {
    /// Portals the client bound to a FETCH statement, with the sync point of the Bind. The
    /// server drops every portal the client binds when its transaction ends, so one bound at
    /// or before a point answered outside a transaction is gone.
    portals: HashMap<String, u64>,
    /// FETCH statements parsed and portals bound to one by the latest messages, with nothing
    /// sent since that could have closed a cursor: a Describe of these is safe.
    fresh: Vec<(u8, String)>,
}

/// The session's `Fetches` as a batch being judged changes them; `Fetches::commit` once the
/// batch goes to the server.
pub struct Batch<'a> {
    session: &'a Fetches,
    /// The last sync point the server answered outside a transaction.
    idle: u64,
    fresh: Vec<(u8, String)>,
    /// Portals the batch binds, and whether to a FETCH statement: the last Bind of each. Other
    /// statements' portals only if the session may hold a FETCH portal of that name (the
    /// unnamed portal, which most clients bind for every statement, takes no allocation).
    binds: Vec<(String, bool)>,
}

impl Fetches {
    /// A batch to judge; `idle` is the last sync point answered outside a transaction.
    pub fn batch(&self, idle: u64) -> Batch<'_> {
        Batch { session: self, idle, fresh: self.fresh.clone(), binds: Vec::new() }
    }

    /// Whether the server may hold a portal of this name that the client bound to a FETCH
    /// statement (`idle` as for `batch`).
    pub fn holds(&self, portal: &str, idle: u64) -> bool {
        !self.portals.is_empty() && self.portals.get(portal).is_some_and(|p| *p > idle)
    }

    /// Whether any portal bound to a FETCH is remembered.
    pub fn any(&self) -> bool {
        !self.portals.is_empty()
    }

    /// The batch went to the server; `point` is its sync point (that of the next Sync, for a
    /// batch sent at a Flush).
    pub fn commit(&mut self, changes: Changes, point: u64) {
        self.fresh = changes.fresh;
        for (portal, fetch) in changes.binds {
            if fetch {
                self.portals.insert(portal, point);
            }
        }
    }

    /// A Sync or a simple Query went to the server, or a batch was refused: any of them may
    /// close cursors (the transaction's end, an error in it, the query).
    pub fn reset(&mut self) {
        self.fresh.clear();
    }

    /// Forgets the portals the server has dropped (`idle` as for `batch`), once they could
    /// take room, so that their room counts again.
    pub fn prune(&mut self, idle: u64) {
        if self.portals.len() >= MAX_FETCH_PORTALS / 2 {
            self.portals.retain(|_, p| *p > idle);
        }
    }
}

/// What a judged batch changes (`Fetches::commit`).
#[derive(Default)]
pub struct Changes {
    fresh: Vec<(u8, String)>,
    binds: Vec<(String, bool)>,
}

impl Batch<'_> {
    /// A Parse: it runs nothing of the client's, so what was fresh stays fresh.
    pub fn parse(&mut self, name: &str, fetch: bool) {
        if fetch {
            self.fresh.retain(|(t, n)| !(*t == STATEMENT && n == name));
            self.fresh.push((STATEMENT, name.to_string()));
        }
    }

    /// A Bind of a statement that is a FETCH or not; `Err` says why it is refused.
    pub fn bind(&mut self, portal: &str, fetch: bool) -> Result<(), String> {
        let at = self.binds.iter().position(|(n, _)| n == portal);
        if !fetch {
            // Planning the statement may call functions, which may close cursors.
            self.fresh.clear();
            match at {
                Some(i) => self.binds[i].1 = false,
                None if self.session.portals.contains_key(portal) => self.binds.push((portal.to_string(), false)),
                None => {}
            }
            return Ok(());
        }
        // `Fetches::prune` ran before the batch: at most the live portals, or fewer than half.
        let held = self.session.portals.len() - usize::from(self.session.portals.contains_key(portal));
        let new = self.binds.iter().filter(|(n, f)| *f && !self.session.portals.contains_key(n)).count();
        if at.is_none() && held + new >= MAX_FETCH_PORTALS {
            return Err(format!(
                "a session may hold at most {MAX_FETCH_PORTALS} portals bound to FETCH statements; end the \
                 transaction first"
            ));
        }
        self.fresh.retain(|(t, n)| !(*t == PORTAL && n == portal));
        self.fresh.push((PORTAL, portal.to_string()));
        match at {
            Some(i) => self.binds[i].1 = true,
            None => self.binds.push((portal.to_string(), true)),
        }
        Ok(())
    }

    /// An Execute or a Close: either may run code that closes a cursor.
    pub fn run(&mut self) {
        self.fresh.clear();
    }

    /// A Describe of statement or portal `name` (`target` b'S' or b'P'); `statement_fetch`
    /// says whether the statement of that name is a FETCH. `Err` says why it is refused.
    pub fn describe(&self, target: u8, name: &str, statement_fetch: impl FnOnce() -> bool) -> Result<(), String> {
        if self.fresh.iter().any(|(t, n)| *t == target && n == name) {
            return Ok(());
        }
        let fetch = match target {
            PORTAL => match self.binds.iter().find(|(n, _)| n == name) {
                Some((_, fetch)) => *fetch,
                None => self.session.holds(name, self.idle),
            },
            _ => statement_fetch(),
        };
        if !fetch {
            return Ok(());
        }
        let what = if target == PORTAL { "a portal bound to a FETCH statement" } else { "a FETCH statement" };
        Err(format!(
            "{what} may be described only right after its Parse or Bind, with nothing run in between \
             (PostgreSQL 15 crashes describing one whose cursor has been closed); describe it with the Bind \
             that makes the portal"
        ))
    }

    pub fn changes(self) -> Changes {
        Changes { fresh: self.fresh, binds: self.binds }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_fetch() -> bool {
        false
    }

    #[test]
    fn a_fetch_portal_is_described_only_right_after_its_bind() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.parse("f", true);
        assert!(b.describe(STATEMENT, "f", || true).is_ok(), "right after its Parse");
        b.bind("p", true).unwrap();
        assert!(b.describe(STATEMENT, "f", || true).is_ok(), "a FETCH's Bind runs nothing");
        assert!(b.describe(PORTAL, "p", not_fetch).is_ok());
        b.run();
        assert!(b.describe(PORTAL, "p", not_fetch).is_err(), "an Execute may have closed the cursor");
        assert!(b.describe(STATEMENT, "f", || true).is_err());
        assert!(b.describe(STATEMENT, "g", not_fetch).is_ok(), "other statements are not looked at");
        assert!(b.describe(PORTAL, "q", not_fetch).is_ok(), "nor other portals");
        b.bind("p", false).unwrap();
        assert!(b.describe(PORTAL, "p", not_fetch).is_ok(), "bound again: it runs only if that Bind did");
        b.bind("p", true).unwrap();
        b.run();
        let changes = b.changes();
        f.commit(changes, 1);
        // A later batch, before the server was idle: the portal may still be there.
        let mut b = f.batch(0);
        assert!(b.describe(PORTAL, "p", not_fetch).is_err());
        assert!(f.holds("p", 0) && !f.holds("q", 0));
        b.bind("p", false).unwrap();
        assert!(b.describe(PORTAL, "p", not_fetch).is_ok());
        f.commit(b.changes(), 2);
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "p", not_fetch).is_err(), "that Bind may have failed, leaving the old portal");
        // Once the server answered point 1 outside a transaction, the portal is gone.
        let b = f.batch(1);
        assert!(b.describe(PORTAL, "p", not_fetch).is_ok() && !f.holds("p", 1));
    }

    #[test]
    fn freshness_lasts_across_a_flush_but_not_a_sync() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.bind("", true).unwrap();
        f.commit(b.changes(), 1);
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "", not_fetch).is_ok(), "Bind, Flush, Describe");
        f.reset();
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "", not_fetch).is_err(), "Bind, Sync, Describe");
    }

    #[test]
    fn other_binds_end_freshness_and_parses_do_not() {
        let f = Fetches::default();
        let mut b = f.batch(0);
        b.parse("f", true);
        b.parse("g", false);
        assert!(b.describe(STATEMENT, "f", || true).is_ok());
        b.bind("", false).unwrap();
        assert!(b.describe(STATEMENT, "f", || true).is_err(), "planning may call functions");
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_fetch_portals() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        for i in 0..MAX_FETCH_PORTALS {
            b.bind(&format!("p{i}"), true).unwrap();
        }
        assert!(b.bind("one-more", true).unwrap_err().contains("at most 4096"));
        b.bind("p7", true).expect("binding a name again takes no more room");
        f.commit(b.changes(), 3);
        assert!(f.batch(2).bind("one-more", true).is_err());
        f.prune(3);
        assert!(f.batch(3).bind("one-more", true).is_ok(), "the server dropped them when idle");
    }
}
