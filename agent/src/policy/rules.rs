//! Statement rules: which query strings a grant allows. Pure; evaluated on a `Classification`.
use crate::sql::{Classification, Kind, last_part};

use std::{fmt, ops::Deref, sync::Arc, time::Duration};

/// How long an `approve` rule waits for a human when it names no timeout.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Hold the statement until an approver decides, or deny it after the timeout.
    Approve {
        timeout: Duration,
    },
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Approve { .. } => "approve",
        }
    }
}

/// A rule's name, as decisions and records carry it: shared, so that judging a statement does
/// not copy it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RuleName(Arc<str>);

/// As its text: error messages quote rule names with `{:?}`.
impl fmt::Debug for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Deref for RuleName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl RuleName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RuleName {
    fn from(s: &str) -> Self {
        RuleName(s.into())
    }
}

impl From<String> for RuleName {
    fn from(s: String) -> Self {
        RuleName(s.into())
    }
}

impl PartialEq<str> for RuleName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for RuleName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// One named rule; the first that matches decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: RuleName,
    /// Empty: any statement that parsed.
    pub statements: Vec<Kind>,
    /// Empty: any table. Matched against the name as written or its last component, as the
    /// server reads names: `orders` and `Orders` are one table, `"Orders"` another.
    pub tables: Vec<String>,
    /// Empty: any functions. Matched against the name as written or its last component.
    pub functions: Vec<String>,
    /// Only query strings with an UPDATE or DELETE lacking WHERE.
    pub where_missing: bool,
    pub action: Action,
    pub message: Option<String>,
}

/// The verdict on one query string, with the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: RuleName,
    pub message: Option<String>,
}

/// A relation or function name matches a listed one as written or by its last component
/// (`orders` lists `public.orders`; `public.orders` lists only itself).
fn table_listed(listed: &[String], name: &str) -> bool {
    let last = last_part(name);
    listed.iter().any(|l| l == name || l == last)
}

/// For deny and approve rules, a name that may be one listed: also the other way round
/// (`public.orders` listed matches a plain `orders`, which the search path may well resolve to
/// it), and regardless of case (`"ORDERS"` is another table than `orders`, but one a rule
/// about `orders` most likely means too).
fn may_be_listed(listed: &[String], name: &str) -> bool {
    let name = name.to_lowercase();
    let last = |n: &str| last_part(n).to_lowercase();
    listed.iter().any(|l| {
        let l = l.to_lowercase();
        l == name || l == last(&name) || (last_part(&name) == name && last(&l) == name)
    })
}

impl Rule {
    /// Deny and approve rules match if any part of the query matches; allow rules only if every
    /// part does, so an allowed kind never carries a forbidden one along
    /// (`WITH d AS (DELETE ..) SELECT`).
    fn matches(&self, c: &Classification) -> bool {
        let all = self.action == Action::Allow;
        let kinds_ok = if self.statements.is_empty() {
            !c.kinds.contains(&Kind::Unparseable)
        } else if all {
            c.kinds.iter().all(|k| self.statements.contains(k))
        } else {
            c.kinds.iter().any(|k| self.statements.contains(k))
        };
        // A function that runs SQL given as text (`query_to_xml('SELECT * FROM t', ...)`)
        // reads tables the text does not name: any table, for every rule that lists some.
        let any_table = c.reads.runs_sql;
        let tables_ok = self.tables.is_empty()
            || if all {
                !any_table && !c.beyond_tables && c.tables.iter().all(|t| table_listed(&self.tables, t))
            } else {
                any_table || c.tables.iter().any(|t| may_be_listed(&self.tables, t))
            };
        let functions_ok = self.functions.is_empty()
            || if all {
                c.functions.iter().all(|f| table_listed(&self.functions, f))
            } else {
                c.functions.iter().chain(&c.maybe_functions).any(|f| may_be_listed(&self.functions, f))
            };
        kinds_ok && tables_ok && functions_ok && (!self.where_missing || c.where_missing)
    }
}

/// What of a query string an approve rule that matched it does not speak for: the kinds,
/// tables and functions it does not list (`None`: nothing).
fn beyond(r: &Rule, c: &Classification) -> Option<Classification> {
    let kinds: std::collections::BTreeSet<Kind> = match r.statements.is_empty() {
        true => Default::default(),
        false => c.kinds.iter().filter(|k| !r.statements.contains(k)).copied().collect(),
    };
    if kinds.is_empty() {
        return None;
    }
    let unlisted = |names: &std::collections::BTreeSet<String>, listed: &[String]| match listed.is_empty() {
        true => Default::default(),
        false => names.iter().filter(|n| !may_be_listed(listed, n)).cloned().collect(),
    };
    let where_missing = c.where_missing && kinds.iter().any(|k| matches!(k, Kind::Update | Kind::Delete));
    Some(Classification {
        tables: unlisted(&c.tables, &r.tables),
        functions: unlisted(&c.functions, &r.functions),
        kinds,
        where_missing,
        ..c.clone()
    })
}

/// The rule name on refusals of text that could make a read-only grant's session read-write.
pub const READ_ONLY_RULE: &str = "read-only";

/// Judges one query string for a grant: its rules (`decide`), then, for a read-only grant, the
/// refusal of text that could turn its sessions read-write, which no rule can allow.
pub fn judge(grant: &super::Grant, c: &Classification) -> Decision {
    let d = decide(&grant.name, &grant.rules, grant.default, c);
    if grant.read_only && c.read_write && d.action != Action::Deny {
        return Decision {
            action: Action::Deny,
            rule: READ_ONLY_RULE.into(),
            message: Some(
                "the grant is read-only: its sessions may not change default_transaction_read_only or \
                 transaction_read_only, or start a READ WRITE transaction"
                    .into(),
            ),
        };
    }
    d
}

/// Judges one query string: first matching rule, else `default` (named `<grant>.default`).
/// Text the grammar rejects is denied unless a rule names `unparseable`.
///
/// An approval speaks only for what its rule is about: a text that an approve rule matches
/// for one part (a DELETE) is held only if every other part (the SELECT of its subquery, or a
/// second statement) is allowed on its own; otherwise that part's verdict (a deny) stands.
/// Text that does not parse is never held unless the rule names `unparseable`.
pub fn decide(grant: &str, rules: &[Rule], default: Action, c: &Classification) -> Decision {
    if let Some(r) = rules.iter().find(|r| r.matches(c)) {
        if let Action::Approve { .. } = r.action {
            if c.kinds.contains(&Kind::Unparseable) && !r.statements.contains(&Kind::Unparseable) {
                return Decision { action: Action::Deny, rule: "unparseable".into(), message: c.parse_error.clone() };
            }
            if let Some(rest) = beyond(r, c) {
                let d = decide(grant, rules, default, &rest);
                if d.action == Action::Deny {
                    return d;
                }
            }
        }
        return Decision { action: r.action, rule: r.name.clone(), message: r.message.clone() };
    }
    if c.kinds.contains(&Kind::Unparseable) {
        return Decision { action: Action::Deny, rule: "unparseable".into(), message: c.parse_error.clone() };
    }
    Decision { action: default, rule: format!("{grant}.default").into(), message: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify;

    fn rule(name: &str, statements: &[Kind], tables: &[&str], where_missing: bool, action: Action) -> Rule {
        Rule {
            name: name.into(),
            statements: statements.to_vec(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            functions: Vec::new(),
            where_missing,
            action,
            message: None,
        }
    }

    /// The rule set from the PostgreSQL issue's example.
    fn example() -> Vec<Rule> {
        vec![
            rule("no-ddl", &[Kind::Ddl], &[], false, Action::Deny),
            rule("delete-needs-where", &[Kind::Update, Kind::Delete], &[], true, Action::Deny),
            rule("reads", &[Kind::Select], &[], false, Action::Allow),
        ]
    }

    fn verdict(sql: &str) -> (Action, String) {
        let d = decide("bot-orders", &example(), Action::Deny, &classify(sql));
        (d.action, d.rule.to_string())
    }

    #[test]
    fn first_match_wins_and_default_applies() {
        assert_eq!(verdict("SELECT * FROM orders"), (Action::Allow, "reads".into()));
        assert_eq!(verdict("DROP TABLE orders"), (Action::Deny, "no-ddl".into()));
        assert_eq!(verdict("DELETE FROM orders"), (Action::Deny, "delete-needs-where".into()));
        assert_eq!(verdict("DELETE FROM orders WHERE id = 1"), (Action::Deny, "bot-orders.default".into()));
        assert_eq!(verdict("INSERT INTO orders VALUES (1)"), (Action::Deny, "bot-orders.default".into()));
    }

    #[test]
    fn allow_rules_cover_every_part_deny_rules_any_part() {
        // A read that hides a delete is not a read.
        assert_eq!(
            verdict("WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d"),
            (Action::Deny, "bot-orders.default".into())
        );
        assert_eq!(verdict("SELECT 1; DROP TABLE t"), (Action::Deny, "no-ddl".into()));
        assert_eq!(verdict("EXPLAIN ANALYZE DELETE FROM orders"), (Action::Deny, "delete-needs-where".into()));
        let held = [rule(
            "hold-deletes",
            &[Kind::Delete],
            &["orders"],
            false,
            Action::Approve { timeout: DEFAULT_APPROVAL_TIMEOUT },
        )];
        let c = classify("SELECT 1; DELETE FROM orders WHERE id = 1");
        assert_eq!(decide("g", &held, Action::Allow, &c).rule, "hold-deletes", "approve matches any part");
        let c = classify("DELETE FROM other WHERE id = 1");
        assert_eq!(decide("g", &held, Action::Allow, &c).rule, "g.default");
        let tables = [rule("orders-only", &[Kind::Select], &["orders"], false, Action::Allow)];
        let c = classify("SELECT * FROM public.orders JOIN secrets ON true");
        assert_eq!(decide("g", &tables, Action::Deny, &c).rule, "g.default");
        let c = classify("SELECT * FROM public.orders");
        assert_eq!(decide("g", &tables, Action::Deny, &c).action, Action::Allow);
    }

    #[test]
    fn table_lists_do_not_speak_for_what_names_no_table() {
        let rules = [
            rule("protect-orders", &[Kind::Ddl], &["orders"], false, Action::Deny),
            rule("scratch-ddl", &[Kind::Ddl, Kind::Other], &["scratch"], false, Action::Allow),
        ];
        let judge = |sql: &str| decide("g", &rules, Action::Deny, &classify(sql)).rule.to_string();
        let cases: [(&str, &[&str]); 3] = [
            (
                "protect-orders",
                &[
                    "DROP TABLE orders",
                    "DROP TABLE public.orders CASCADE",
                    "DROP POLICY p ON orders",
                    "DROP TRIGGER a ON orders",
                ],
            ),
            (
                "scratch-ddl",
                &[
                    "DROP TABLE scratch",
                    "CREATE INDEX ON scratch (a)",
                    "VACUUM scratch",
                    "COMMENT ON COLUMN scratch.a IS 'x'",
                ],
            ),
            // Objects that are not tables, or every table, are not scratch's.
            (
                "g.default",
                &[
                    "DROP FUNCTION f()",
                    "CREATE EXTENSION dblink",
                    "VACUUM",
                    "DROP TABLE scratch; DROP SCHEMA s CASCADE",
                ],
            ),
        ];
        for (rule, texts) in cases {
            for sql in texts {
                assert_eq!(judge(sql), rule, "{sql}");
            }
        }
    }

    #[test]
    fn do_blocks_are_judged_by_what_they_run() {
        assert_eq!(
            verdict("DO $$ BEGIN DELETE FROM orders; END $$"),
            (Action::Deny, "delete-needs-where".into()),
            "a deny rule sees into the block"
        );
        let mut rules = example();
        rules.push(rule("scripts", &[Kind::Do, Kind::Select, Kind::Insert], &[], false, Action::Allow));
        let d = |sql: &str| decide("g", &rules, Action::Deny, &classify(sql)).rule;
        assert_eq!(
            d("DO $$ BEGIN IF (SELECT count(*) FROM t) = 0 THEN INSERT INTO t VALUES (1); END IF; END $$"),
            "scripts"
        );
        assert_eq!(
            d("DO $$ BEGIN UPDATE t SET a = 1 WHERE id = 2; END $$"),
            "g.default",
            "allow needs every kind inside"
        );
        assert_eq!(d("DO $$ BEGIN EXECUTE 'INSERT INTO t VALUES (1)'; END $$"), "unparseable", "dynamic SQL");
    }

    #[test]
    fn function_rules() {
        let mut deny = rule("no-sleep", &[], &[], false, Action::Deny);
        deny.functions = vec!["pg_sleep".into(), "dblink_exec".into()];
        let mut allow = rule("plain-reads", &[Kind::Select], &[], false, Action::Allow);
        allow.functions = vec!["lower".into(), "now".into()];
        let rules = [deny, allow];
        let d = |sql: &str| decide("g", &rules, Action::Deny, &classify(sql)).rule;
        assert_eq!(d("SELECT * FROM t WHERE x = (SELECT pg_catalog.pg_sleep(5))"), "no-sleep", "found in a subquery");
        assert_eq!(d("SELECT lower(name), now() FROM t"), "plain-reads");
        assert_eq!(d("SELECT name FROM t"), "plain-reads", "no function calls at all");
        assert_eq!(
            d("SELECT lower(name), lo_import('/etc/passwd') FROM t"),
            "g.default",
            "allow needs every call listed"
        );
        // `x.f` may be `f(x)`: a deny rule sees it, an allow rule does not ask for it.
        assert_eq!(d("SELECT x.pg_sleep FROM unnest(ARRAY[5]) x"), "no-sleep");
        assert_eq!(d("SELECT t.name FROM t"), "plain-reads");
    }

    #[test]
    fn a_deny_rule_naming_a_schema_also_catches_the_plain_name() {
        let rules = vec![
            rule("no-public-orders", &[Kind::Delete], &["public.orders"], false, Action::Deny),
            rule("writes", &[Kind::Delete], &["public.orders"], false, Action::Allow),
        ];
        let judge = |sql: &str| decide("g", &rules, Action::Allow, &classify(sql)).rule;
        assert_eq!(judge("DELETE FROM orders WHERE id = 1"), "no-public-orders");
        assert_eq!(judge("DELETE FROM public.orders WHERE id = 1"), "no-public-orders");
        assert_eq!(judge("DELETE FROM archive.orders WHERE id = 1"), "g.default", "another schema's");
        // An allow rule naming a schema does not allow the plain name: the search path decides.
        let allow = decide("g", &rules[1..], Action::Deny, &classify("DELETE FROM orders WHERE id = 1"));
        assert_eq!(allow.rule, "g.default");
    }

    #[test]
    fn quoted_names_are_other_tables_to_allow_rules_but_not_to_deny_rules() {
        let rules = vec![
            rule("no-secrets", &[], &["secrets"], false, Action::Deny),
            rule("orders", &[Kind::Select], &["orders", "Mixed"], false, Action::Allow),
        ];
        let judge = |sql: &str| decide("g", &rules, Action::Deny, &classify(sql)).rule;
        assert_eq!(judge("SELECT * FROM orders, Orders, ORDERS"), "orders");
        assert_eq!(judge(r#"SELECT * FROM "ORDERS""#), "g.default", "another table than orders");
        assert_eq!(judge(r#"SELECT * FROM "Mixed""#), "orders");
        assert_eq!(judge(r#"SELECT * FROM "SECRETS""#), "no-secrets", "a deny rule errs wide");
        assert_eq!(judge(r#"SELECT * FROM "Public"."Secrets""#), "no-secrets");
        // A dot inside quotes is part of the name: "a.orders" is not orders.
        assert_eq!(judge(r#"SELECT * FROM "a.orders""#), "g.default");
        let dotted = [rule("no-dotted", &[], &["\"a.b\""], false, Action::Deny)];
        let c = classify(r#"SELECT * FROM public."a.b""#);
        assert_eq!(decide("g", &dotted, Action::Allow, &c).rule, "no-dotted");
    }

    #[test]
    fn reads_do_not_cover_side_effects_or_hidden_writes() {
        let judge = |sql: &str| verdict(sql).1;
        assert_eq!(judge("SELECT setval('orders_id_seq', 1)"), "bot-orders.default");
        assert_eq!(judge("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"), "bot-orders.default");
        assert_eq!(judge("SELECT nextval('orders_id_seq')"), "reads");
        assert_eq!(judge("DELETE FROM orders WHERE true"), "delete-needs-where");
        assert_eq!(judge("MERGE INTO orders o USING fresh f ON true WHEN MATCHED THEN DELETE"), "delete-needs-where");
        let inserts = [rule("inserts", &[Kind::Insert], &[], false, Action::Allow)];
        let upsert = classify("INSERT INTO orders VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET total = 0");
        assert_eq!(decide("g", &inserts, Action::Deny, &upsert).rule, "g.default", "an upsert also updates");
        let merges = [rule("merges", &[Kind::Merge, Kind::Insert], &[], false, Action::Allow)];
        let merge = |then: &str| classify(&format!("MERGE INTO t USING s ON t.id = s.id WHEN {then}"));
        assert_eq!(decide("g", &merges, Action::Deny, &merge("NOT MATCHED THEN INSERT VALUES (1)")).rule, "merges");
        assert_eq!(decide("g", &merges, Action::Deny, &merge("MATCHED THEN DELETE")).rule, "g.default");
    }

    #[test]
    fn sql_run_from_text_may_read_any_table() {
        let rules = vec![
            rule("no-secrets", &[], &["secrets"], false, Action::Deny),
            rule("orders", &[Kind::Select], &["orders"], false, Action::Allow),
        ];
        let c = classify("SELECT query_to_xml('SELECT * FROM vault', true, false, '')");
        assert_eq!(decide("g", &rules, Action::Allow, &c).rule, "no-secrets", "a deny rule listing tables");
        let d = decide("g", &rules[1..], Action::Deny, &c);
        assert_eq!((d.action, d.rule.as_str()), (Action::Deny, "g.default"), "an allow rule listing tables");
        assert_eq!(decide("g", &rules[1..], Action::Deny, &classify("SELECT * FROM orders")).rule, "orders");
    }

    #[test]
    fn an_approval_speaks_only_for_what_its_rule_is_about() {
        let hold = Action::Approve { timeout: DEFAULT_APPROVAL_TIMEOUT };
        let rules = vec![
            rule("no-ddl", &[Kind::Ddl], &[], false, Action::Deny),
            rule("deletes-need-approval", &[Kind::Delete], &["orders"], false, hold),
            rule("reads", &[Kind::Select], &[], false, Action::Allow),
        ];
        let judge = |sql: &str| {
            let d = decide("g", &rules, Action::Deny, &classify(sql));
            (d.action, d.rule.to_string())
        };
        let held = (hold, "deletes-need-approval".to_string());
        assert_eq!(judge("DELETE FROM orders WHERE id = 1"), held);
        // Its subquery's SELECT is allowed on its own, so the whole is held.
        assert_eq!(judge("DELETE FROM orders WHERE id IN (SELECT id FROM orders WHERE total > 1)"), held);
        assert_eq!(judge("DELETE FROM orders WHERE id = 1; SELECT 1"), held);
        // A part nothing allows is denied, not held: an approver would be asked about it.
        let (action, rule) = judge("DELETE FROM orders WHERE id = 1; COPY (SELECT 1) TO PROGRAM 'true'");
        assert_eq!((action, rule.as_str()), (Action::Deny, "g.default"));
        let (action, rule) = judge("DELETE FROM orders WHERE id = 1; UPDATE orders SET total = 0 WHERE id = 2");
        assert_eq!((action, rule.as_str()), (Action::Deny, "g.default"));
        // Kinds are not tied to tables: a DELETE of another table in the same text is held with
        // it (the approver is shown the whole text).
        assert_eq!(judge("DELETE FROM orders WHERE id = 1; DELETE FROM customers WHERE id = 2"), held);
        // Nor is what cannot be parsed ever held along.
        let (action, rule) = judge("DELETE FROM orders WHERE id = 1; DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$");
        assert_eq!((action, rule.as_str()), (Action::Deny, "unparseable"));
    }

    #[test]
    fn unparseable_is_denied_unless_named() {
        assert_eq!(verdict("SELEC 1"), (Action::Deny, "unparseable".into()));
        let open = [rule("anything", &[], &[], false, Action::Allow)];
        assert_eq!(decide("g", &open, Action::Allow, &classify("SELEC 1")).rule, "unparseable");
        let named = [rule("yolo", &[Kind::Unparseable], &[], false, Action::Allow)];
        assert_eq!(decide("g", &named, Action::Deny, &classify("SELEC 1")).action, Action::Allow);
    }
}
