//! Which Describes of FETCH statements and portals may reach the server: PostgreSQL 15.18
//! crashes (every backend restarts) describing one whose cursor is gone.
//!
//! The server answers a Describe of a FETCH statement, or of a portal bound from one, by
//! looking its cursor up again, and dereferences what it finds. A Describe that follows the
//! Parse or Bind with nothing between that could close a cursor finds the cursor the Parse or
//! Bind found (if there was none, the server answers NoData, harmlessly). Any other Describe
//! of them is refused.
//!
//! A FETCH from a portal that is itself bound to a FETCH is described through that portal's
//! cursor too, which may be gone whatever this FETCH's freshness: never described.
//!
//! An SQL `EXECUTE f` of a named FETCH statement is worse: its Parse and Bind take the
//! description `f` had when it was parsed, without looking at the cursor, so describing it
//! crashes the server as soon as the cursor is gone, however soon. While the session may have
//! a named FETCH statement, nothing that runs SQL EXECUTE is described.
//!
//! Which portals are bound to what is known for sure only within a batch: after an error the
//! server skips the rest of it, so a message after a Bind runs only if the Bind did. A Bind in
//! an earlier batch may have failed (a named portal cannot be bound again before it is
//! closed) and left the old portal in place, which `ROLLBACK TO SAVEPOINT` brings back into
//! use: a name once bound to a FETCH or an EXECUTE counts as one until the server has ended
//! the transaction, or has carried out a Close of it in a batch without an error (`unbound`).
//! Likewise a named FETCH statement counts as there until a Close of it is known to have been
//! carried out (an SQL `DEALLOCATE` or `DISCARD ALL` may fail).
use foldhash::{HashMap, HashSet};

use crate::sql::Classification;

/// Most portals bound to FETCH or EXECUTE statements that the server may still hold in a
/// session, and most named FETCH statements.
pub const MAX_FETCH_PORTALS: usize = 4096;
pub const MAX_FETCH_STATEMENTS: usize = 4096;

/// What a Describe targets, as in the protocol.
const STATEMENT: u8 = b'S';
const PORTAL: u8 = b'P';

/// What a statement or a portal runs, as far as describing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    Fetch,
    /// A FETCH from a portal bound to a FETCH or an EXECUTE (`Batch::runs`).
    Nested,
    /// An SQL EXECUTE (of any statement: the name may be parsed as a FETCH later).
    Execute,
    Other,
}

#[derive(Default)]
pub struct Fetches {
    /// Portals the client bound to a FETCH or an EXECUTE, with the sync point of the Bind.
    /// The server drops every portal the client binds when its transaction ends, so one bound
    /// at or before a point answered outside a transaction is gone.
    portals: HashMap<String, (u64, Runs)>,
    /// Named FETCH statements the client parsed, with the sync point of the Parse.
    statements: HashMap<String, u64>,
    /// FETCH statements parsed and portals bound to one by the latest messages, with nothing
    /// sent since that could have closed a cursor: a Describe of these is safe.
    fresh: Fresh,
}

/// Names of FETCH statements and portals that are fresh (`Fetches::fresh`), in sets: a batch
/// may have thousands.
#[derive(Default, Clone)]
struct Fresh {
    statements: HashSet<String>,
    portals: HashSet<String>,
}

impl Fresh {
    fn set(&mut self, target: u8) -> &mut HashSet<String> {
        if target == PORTAL { &mut self.portals } else { &mut self.statements }
    }

    fn contains(&self, target: u8, name: &str) -> bool {
        if target == PORTAL { self.portals.contains(name) } else { self.statements.contains(name) }
    }

    fn mark(&mut self, target: u8, name: &str) {
        let set = self.set(target);
        if !set.contains(name) {
            set.insert(name.to_string());
        }
    }

    fn clear(&mut self) {
        self.statements.clear();
        self.portals.clear();
    }
}

/// The session's `Fetches` as a batch being judged changes them; `Fetches::commit` once the
/// batch goes to the server.
pub struct Batch<'a> {
    session: &'a Fetches,
    /// The last sync point the server answered outside a transaction.
    idle: u64,
    fresh: Fresh,
    /// Portals the batch binds, and to what: the last Bind of each. Those of other statements
    /// only if the session may hold a portal of that name (the unnamed portal, which most
    /// clients bind for every statement, takes no allocation).
    binds: HashMap<String, Runs>,
    /// Of `binds`, those to a FETCH or EXECUTE of a portal the session does not hold already:
    /// counted as they change, so a Bind does not go through all the others.
    new_portals: usize,
    /// Named FETCH statements the batch parses.
    parsed: HashSet<String>,
}

/// What a judged batch changes (`Fetches::commit`).
#[derive(Default)]
pub struct Changes {
    fresh: Fresh,
    binds: HashMap<String, Runs>,
    parsed: HashSet<String>,
}

impl Fetches {
    /// A batch to judge; `idle` is the last sync point answered outside a transaction.
    pub fn batch(&self, idle: u64) -> Batch<'_> {
        Batch {
            session: self,
            idle,
            fresh: self.fresh.clone(),
            binds: HashMap::default(),
            new_portals: 0,
            parsed: HashSet::default(),
        }
    }

    /// Whether the server may hold a portal of this name that the client bound to a FETCH or
    /// an EXECUTE (`idle` as for `batch`).
    pub fn holds(&self, portal: &str, idle: u64) -> bool {
        !self.portals.is_empty() && self.portals.get(portal).is_some_and(|(p, _)| *p > idle)
    }

    /// Why a simple query may not run, if it may not: the server sends its RowDescription
    /// by describing what it fetched from, and a FETCH from a portal bound to a FETCH (read
    /// from the rows that portal stored, so no error comes first) follows that portal's
    /// cursor, which may be gone. Also through an SQL EXECUTE of such a FETCH (`executed`:
    /// the session's statements).
    pub fn chained<'c>(
        &self,
        c: &Classification,
        idle: u64,
        executed: impl Fn(&str) -> Option<&'c Classification>,
    ) -> Option<String> {
        if self.portals.is_empty() {
            return None;
        }
        let b = self.batch(idle);
        let nested = b.runs(c) == Runs::Nested
            || c.executes.iter().any(|n| executed(n).is_some_and(|e| b.runs(e) == Runs::Nested));
        nested.then(|| {
            format!("a FETCH from a portal bound to a FETCH or EXECUTE may not run as a simple query ({CRASH})")
        })
    }

    /// Whether any such portal is remembered.
    pub fn any(&self) -> bool {
        !self.portals.is_empty()
    }

    /// Whether a portal of this name is remembered as bound to a FETCH or an EXECUTE.
    pub fn bound(&self, portal: &str) -> bool {
        !self.portals.is_empty() && self.portals.contains_key(portal)
    }

    /// The server carried out a Close of `portal` in a batch with sync point `point` and no
    /// error: a portal of that name bound at or before it is gone. (A dropped portal does not
    /// come back with a savepoint; a Bind after the Close in its batch keeps the name bound,
    /// and the client side does not report the Close then.)
    pub fn unbound(&mut self, portal: &str, point: u64) {
        if self.portals.get(portal).is_some_and(|(p, _)| *p <= point) {
            self.portals.remove(portal);
        }
    }

    /// The batch went to the server; `point` is its sync point (that of the next Sync, for a
    /// batch sent at a Flush).
    pub fn commit(&mut self, changes: Changes, point: u64) {
        self.fresh = changes.fresh;
        for (portal, runs) in changes.binds {
            if runs != Runs::Other {
                self.portals.insert(portal, (point, runs));
            }
        }
        for name in changes.parsed {
            self.statements.insert(name, point);
        }
    }

    /// The server carried out a Close of statement `name` sent with sync point `point`: a
    /// FETCH parsed under that name in an earlier batch is gone.
    pub fn closed(&mut self, name: &str, point: u64) {
        if self.statements.get(name).is_some_and(|p| *p < point) {
            self.statements.remove(name);
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
            self.portals.retain(|_, (p, _)| *p > idle);
        }
    }
}

impl Batch<'_> {
    /// What a statement of this classification runs, with the portals as they may be now.
    pub fn runs(&self, c: &Classification) -> Runs {
        if c.fetch {
            if c.fetches_from.iter().any(|n| self.portal(n) != Runs::Other) { Runs::Nested } else { Runs::Fetch }
        } else if !c.executes.is_empty() {
            Runs::Execute
        } else {
            Runs::Other
        }
    }

    /// What the portal of this name may run at this point of the batch.
    fn portal(&self, name: &str) -> Runs {
        match self.binds.get(name) {
            Some(runs) => *runs,
            None if self.session.holds(name, self.idle) => self.session.portals[name].1,
            None => Runs::Other,
        }
    }

    /// Whether the session may have a named FETCH statement at this point of the batch.
    fn named_fetch(&self) -> bool {
        !self.session.statements.is_empty() || !self.parsed.is_empty()
    }

    /// A Parse: it runs nothing of the client's, so what was fresh stays fresh. `Err` says why
    /// it is refused.
    pub fn parse(&mut self, name: &str, runs: Runs) -> Result<(), String> {
        if runs != Runs::Fetch {
            return Ok(());
        }
        if !name.is_empty() && !self.parsed.contains(name) {
            if self.session.statements.len() + self.parsed.len() >= MAX_FETCH_STATEMENTS {
                return Err(format!(
                    "a session may have at most {MAX_FETCH_STATEMENTS} named FETCH statements; Close some first"
                ));
            }
            self.parsed.insert(name.to_string());
        }
        self.fresh.mark(STATEMENT, name);
        Ok(())
    }

    /// A Bind of a statement that runs `runs`; `describes`: the proxy describes the portal
    /// itself (masking). `Err` says why it is refused.
    pub fn bind(&mut self, portal: &str, runs: Runs, describes: bool) -> Result<(), String> {
        if runs == Runs::Execute && describes && self.named_fetch() {
            return Err(format!(
                "while the session has a named FETCH statement, a portal of an SQL EXECUTE cannot be described \
                 for masking ({CRASH}); Close the FETCH statement or parse it unnamed"
            ));
        }
        if runs == Runs::Nested && describes {
            return Err(format!(
                "a FETCH from a portal bound to a FETCH or EXECUTE cannot be described for masking ({CRASH})"
            ));
        }
        let at = self.binds.get(portal).copied();
        if runs != Runs::Fetch {
            // Planning the statement may call functions, which may close cursors.
            self.fresh.clear();
        }
        let held = self.session.portals.contains_key(portal);
        if runs != Runs::Other && at.is_none() {
            // `Fetches::prune` ran before the batch: at most the live portals, or fewer than half.
            if self.session.portals.len() - usize::from(held) + self.new_portals >= MAX_FETCH_PORTALS {
                return Err(format!(
                    "a session may hold at most {MAX_FETCH_PORTALS} portals bound to FETCH or EXECUTE statements; \
                     end the transaction first"
                ));
            }
        }
        let new = |r: Runs| usize::from(r != Runs::Other && !held);
        match at {
            Some(old) => {
                self.new_portals = self.new_portals - new(old) + new(runs);
                if let Some(r) = self.binds.get_mut(portal) {
                    *r = runs;
                }
            }
            None if runs != Runs::Other || held => {
                self.new_portals += new(runs);
                self.binds.insert(portal.to_string(), runs);
            }
            None => {}
        }
        if runs == Runs::Fetch {
            self.fresh.mark(PORTAL, portal);
        }
        Ok(())
    }

    /// An Execute or a Close: either may run code that closes a cursor.
    pub fn run(&mut self) {
        self.fresh.clear();
    }

    /// A Describe of statement or portal `name` (`target` b'S' or b'P'); `statement`: what the
    /// statement of that name runs, if the session knows it. `Err` says why it is refused.
    pub fn describe(&self, target: u8, name: &str, statement: impl FnOnce() -> Option<Runs>) -> Result<(), String> {
        let runs = match target {
            PORTAL => self.portal(name),
            _ => match statement() {
                // Parsed as a FETCH before, and perhaps not gone (a DEALLOCATE may have failed).
                _ if self.session.statements.contains_key(name) => Runs::Fetch,
                Some(runs) => runs,
                None => Runs::Other,
            },
        };
        let fresh = || self.fresh.contains(target, name);
        let what = if target == PORTAL { "a portal bound to" } else { "a statement that is" };
        match runs {
            Runs::Fetch if !fresh() => Err(format!(
                "{what} a FETCH may be described only right after its Parse or Bind, with nothing run in between \
                 ({CRASH}); describe it with the Bind that makes the portal"
            )),
            Runs::Execute if self.named_fetch() => Err(format!(
                "{what} an SQL EXECUTE may not be described while the session has a named FETCH statement \
                 ({CRASH}); Close the FETCH statement or parse it unnamed"
            )),
            Runs::Nested => {
                Err(format!("{what} a FETCH from a portal bound to a FETCH or EXECUTE may not be described ({CRASH})"))
            }
            _ => Ok(()),
        }
    }

    pub fn changes(self) -> Changes {
        Changes { fresh: self.fresh, binds: self.binds, parsed: self.parsed }
    }
}

/// Why, in refusals.
const CRASH: &str = "PostgreSQL 15 crashes describing one whose cursor has been closed";

#[cfg(test)]
mod tests {
    use super::*;

    const FETCH: Option<Runs> = Some(Runs::Fetch);

    fn unknown() -> Option<Runs> {
        None
    }

    #[test]
    fn a_fetch_portal_is_described_only_right_after_its_bind() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.parse("", Runs::Fetch).unwrap();
        assert!(b.describe(STATEMENT, "", || FETCH).is_ok(), "right after its Parse");
        b.bind("p", Runs::Fetch, false).unwrap();
        assert!(b.describe(STATEMENT, "", || FETCH).is_ok(), "a FETCH's Bind runs nothing");
        assert!(b.describe(PORTAL, "p", unknown).is_ok());
        b.run();
        assert!(b.describe(PORTAL, "p", unknown).is_err(), "an Execute may have closed the cursor");
        assert!(b.describe(STATEMENT, "", || FETCH).is_err());
        assert!(b.describe(STATEMENT, "g", unknown).is_ok(), "other statements are not looked at");
        assert!(b.describe(PORTAL, "q", unknown).is_ok(), "nor other portals");
        b.bind("p", Runs::Other, false).unwrap();
        assert!(b.describe(PORTAL, "p", unknown).is_ok(), "bound again: it runs only if that Bind did");
        b.bind("p", Runs::Fetch, false).unwrap();
        b.run();
        f.commit(b.changes(), 1);
        // A later batch, before the server was idle: the portal may still be there.
        let mut b = f.batch(0);
        assert!(b.describe(PORTAL, "p", unknown).is_err());
        assert!(f.holds("p", 0) && !f.holds("q", 0));
        b.bind("p", Runs::Other, false).unwrap();
        assert!(b.describe(PORTAL, "p", unknown).is_ok());
        f.commit(b.changes(), 2);
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "p", unknown).is_err(), "that Bind may have failed, leaving the old portal");
        // Once the server answered point 1 outside a transaction, the portal is gone.
        let b = f.batch(1);
        assert!(b.describe(PORTAL, "p", unknown).is_ok() && !f.holds("p", 1));
    }

    #[test]
    fn a_named_fetch_statement_counts_until_a_close_of_it_is_carried_out() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.parse("f", Runs::Fetch).unwrap();
        f.commit(b.changes(), 1);
        f.reset();
        // Forgotten by the proxy (a DEALLOCATE it forwarded), perhaps not by the server.
        assert!(f.batch(0).describe(STATEMENT, "f", unknown).is_err());
        f.closed("f", 1);
        assert!(f.batch(0).describe(STATEMENT, "f", unknown).is_err(), "closed before it was parsed");
        f.closed("f", 2);
        assert!(f.batch(0).describe(STATEMENT, "f", unknown).is_ok());
    }

    #[test]
    fn a_fetch_portal_counts_until_a_close_of_it_is_carried_out() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.bind("p", Runs::Fetch, false).unwrap();
        f.commit(b.changes(), 3);
        assert!(f.bound("p") && f.holds("p", 0) && !f.bound("q"));
        f.unbound("p", 2);
        assert!(f.bound("p"), "a Close answered before the Bind leaves it");
        f.unbound("p", 3);
        assert!(!f.bound("p") && !f.any(), "a Close in the Bind's batch, after it, ends it");
    }

    #[test]
    fn nothing_that_runs_sql_execute_is_described_while_a_named_fetch_may_exist() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.bind("e", Runs::Execute, true).unwrap();
        assert!(b.describe(PORTAL, "e", unknown).is_ok(), "no named FETCH yet");
        assert!(b.describe(STATEMENT, "x", || Some(Runs::Execute)).is_ok());
        b.parse("f", Runs::Fetch).unwrap();
        assert!(b.describe(PORTAL, "e", unknown).is_err(), "even right after its Bind");
        assert!(b.describe(STATEMENT, "x", || Some(Runs::Execute)).is_err());
        assert!(b.bind("e2", Runs::Execute, true).is_err(), "the proxy would describe it itself");
        b.bind("e2", Runs::Execute, false).expect("the client may not describe it");
        f.commit(b.changes(), 1);
        assert!(f.batch(0).describe(PORTAL, "e2", unknown).is_err());
    }

    #[test]
    fn a_fetch_from_a_fetch_portal_is_never_described() {
        let fetch_from =
            |name: &str| Classification { fetch: true, fetches_from: [name.to_string()].into(), ..Default::default() };
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        assert_eq!(b.runs(&fetch_from("p1")), Runs::Fetch, "p1 is a cursor of the client's");
        b.bind("p1", Runs::Fetch, false).unwrap();
        let runs = b.runs(&fetch_from("p1"));
        assert_eq!(runs, Runs::Nested);
        b.parse("", runs).unwrap();
        assert!(b.describe(STATEMENT, "", || Some(runs)).is_err(), "even right after its Parse");
        assert!(b.bind("p2", runs, true).is_err(), "masking would describe it");
        b.bind("p2", runs, false).unwrap();
        assert!(b.describe(PORTAL, "p2", unknown).is_err(), "even right after its Bind");
        assert_eq!(b.runs(&fetch_from("p2")), Runs::Nested, "and so on down the chain");
        f.commit(b.changes(), 1);
        assert_eq!(f.batch(0).runs(&fetch_from("p1")), Runs::Nested);
        assert_eq!(f.batch(1).runs(&fetch_from("p1")), Runs::Fetch, "gone with its transaction");
    }

    #[test]
    fn a_simple_query_fetching_from_a_fetch_portal_is_refused() {
        let fetch_from =
            |name: &str| Classification { fetch: true, fetches_from: [name.to_string()].into(), ..Default::default() };
        let execute = |name: &str| Classification { executes: [name.to_string()].into(), ..Default::default() };
        let mut f = Fetches::default();
        let none = |_: &str| None;
        assert!(f.chained(&fetch_from("p1"), 0, none).is_none());
        let mut b = f.batch(0);
        b.bind("p1", Runs::Fetch, false).unwrap();
        f.commit(b.changes(), 1);
        assert!(f.chained(&fetch_from("p1"), 0, none).is_some());
        assert!(f.chained(&fetch_from("c"), 0, none).is_none(), "a cursor of the client's");
        let fetch_p1 = fetch_from("p1");
        assert!(f.chained(&execute("f"), 0, |_| Some(&fetch_p1)).is_some(), "EXECUTE of such a FETCH");
        assert!(f.chained(&fetch_from("p1"), 1, none).is_none(), "gone with its transaction");
    }

    #[test]
    fn freshness_lasts_across_a_flush_but_not_a_sync() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        b.bind("", Runs::Fetch, false).unwrap();
        f.commit(b.changes(), 1);
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "", unknown).is_ok(), "Bind, Flush, Describe");
        f.reset();
        let b = f.batch(0);
        assert!(b.describe(PORTAL, "", unknown).is_err(), "Bind, Sync, Describe");
    }

    #[test]
    fn other_binds_end_freshness_and_parses_do_not() {
        let f = Fetches::default();
        let mut b = f.batch(0);
        b.parse("", Runs::Fetch).unwrap();
        b.parse("g", Runs::Other).unwrap();
        assert!(b.describe(STATEMENT, "", || FETCH).is_ok());
        b.bind("", Runs::Other, false).unwrap();
        assert!(b.describe(STATEMENT, "", || FETCH).is_err(), "planning may call functions");
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_fetch_portals_and_statements() {
        let mut f = Fetches::default();
        let mut b = f.batch(0);
        for i in 0..MAX_FETCH_PORTALS {
            b.bind(&format!("p{i}"), Runs::Fetch, false).unwrap();
        }
        assert!(b.bind("one-more", Runs::Fetch, false).unwrap_err().contains("at most 4096"));
        b.bind("p7", Runs::Fetch, false).expect("binding a name again takes no more room");
        for i in 0..MAX_FETCH_STATEMENTS {
            b.parse(&format!("s{i}"), Runs::Fetch).unwrap();
        }
        assert!(b.parse("one-more", Runs::Fetch).unwrap_err().contains("at most 4096"));
        b.parse("", Runs::Fetch).expect("the unnamed statement is not counted");
        f.commit(b.changes(), 3);
        assert!(f.batch(2).bind("one-more", Runs::Fetch, false).is_err());
        f.prune(3);
        assert!(f.batch(3).bind("one-more", Runs::Fetch, false).is_ok(), "the server dropped them when idle");
    }
}
