//! SQL classification with the real PostgreSQL grammar (pg_query). Pure.
//!
//! The whole parse tree is walked, so statements hidden in CTEs, EXPLAIN ANALYZE, PREPARE,
//! DECLARE CURSOR, CREATE TABLE AS, rules and multi-statement strings are all seen.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use serde_json::Value;

mod shape;
pub use shape::{scanned_shape, shape, shape_into};

/// What a statement does, as policy rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    Ddl,
    Copy,
    /// COPY ... TO/FROM PROGRAM: runs a shell command on the database server.
    CopyProgram,
    /// COPY ... TO/FROM 'file': writes or reads a file on the database server.
    CopyFile,
    Call,
    Do,
    Prepare,
    Execute,
    Transaction,
    /// PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED: a transaction kept past the
    /// session (with its locks), or one prepared by another session made permanent or undone.
    TwoPhase,
    Set,
    Show,
    /// LOCK, and a SELECT that locks the rows it reads (`FOR UPDATE`, `FOR SHARE`...): both
    /// hold others off until the transaction ends.
    Lock,
    Grant,
    /// A call of a built-in function that changes something a read does not: a sequence
    /// (`setval`), large objects, files on the server, other sessions (`pg_terminate_backend`),
    /// the server's state, another database (`dblink_exec`). See [`SIDE_EFFECTS`].
    SideEffect,
    /// Statements no other kind covers (VACUUM, LISTEN, ...).
    Other,
    /// Text the grammar rejects; denied unless a rule names this kind.
    Unparseable,
}

pub const ALL_KINDS: [Kind; 23] = [
    Kind::Select,
    Kind::Insert,
    Kind::Update,
    Kind::Delete,
    Kind::Merge,
    Kind::Truncate,
    Kind::Ddl,
    Kind::Copy,
    Kind::CopyProgram,
    Kind::CopyFile,
    Kind::Call,
    Kind::Do,
    Kind::Prepare,
    Kind::Execute,
    Kind::Transaction,
    Kind::TwoPhase,
    Kind::Set,
    Kind::Show,
    Kind::Lock,
    Kind::Grant,
    Kind::SideEffect,
    Kind::Other,
    Kind::Unparseable,
];

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Select => "select",
            Kind::Insert => "insert",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Merge => "merge",
            Kind::Truncate => "truncate",
            Kind::Ddl => "ddl",
            Kind::Copy => "copy",
            Kind::CopyProgram => "copy_program",
            Kind::CopyFile => "copy_file",
            Kind::Call => "call",
            Kind::Do => "do",
            Kind::Prepare => "prepare",
            Kind::Execute => "execute",
            Kind::Transaction => "transaction",
            Kind::TwoPhase => "two_phase",
            Kind::Set => "set",
            Kind::Show => "show",
            Kind::Lock => "lock",
            Kind::Grant => "grant",
            Kind::SideEffect => "side_effect",
            Kind::Other => "other",
            Kind::Unparseable => "unparseable",
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
        ALL_KINDS.iter().copied().find(|k| k.as_str() == s).ok_or_else(|| {
            format!(
                "unknown statement kind {s:?}; expected one of {}",
                ALL_KINDS.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Everything the rules look at, for one query string (which may hold several statements).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classification {
    pub kinds: BTreeSet<Kind>,
    /// Relation names as the server reads them: unquoted names folded to lower case, quoted
    /// ones as written (`orders`, `public.orders`, `Orders` for `"Orders"`).
    pub tables: BTreeSet<String>,
    /// Functions called anywhere in it, as written, lower-cased (`pg_sleep`, `pg_catalog.lo_import`).
    pub functions: BTreeSet<String>,
    /// The last part of each two-part column reference (`x.f`), lower-cased: PostgreSQL reads
    /// `x.f` as the call `f(x)` when `x` has no column `f`, as when `x` is a function's value
    /// in FROM (`SELECT x.pg_read_file FROM unnest(...) x`). Deny and approve rules that list
    /// functions match these too; allow rules do not need them listed.
    pub maybe_functions: BTreeSet<String>,
    /// Some statement in it acts on objects that `tables` does not name: DDL on anything but a
    /// relation (functions, types, roles, extensions...), grants on them or on all tables of a
    /// schema, VACUUM or CLUSTER of every table. An allow rule that lists tables does not
    /// cover it.
    pub beyond_tables: bool,
    /// Some UPDATE or DELETE in it (also a MERGE's) has no WHERE clause, or one that names no
    /// column (`WHERE true`, `WHERE 1 = 1`): it changes every row.
    pub where_missing: bool,
    /// Number of top-level statements.
    pub statements: usize,
    /// The parser's message when the text did not parse.
    pub parse_error: Option<String>,
    /// Each `COPY ... TO STDOUT`, in statement order: the proxy sees its rows to mask them.
    pub copy_out: Vec<CopyOut>,
    /// Named prepared statements it removes from the session.
    pub deallocates: Deallocates,
    /// Prepared statements it runs with SQL EXECUTE (also inside EXPLAIN or CREATE TABLE AS).
    pub executes: BTreeSet<String>,
    /// Prepared statements it makes with SQL PREPARE.
    pub prepares: BTreeSet<String>,
    /// How many `COPY ... FROM STDIN` it has: the server takes only COPY data during each.
    pub copy_in: usize,
    /// It returns rows of a query written elsewhere: a FETCH from a cursor, an EXECUTE.
    pub indirect: bool,
    /// It is a FETCH (not a MOVE). The server answers a Describe of it, or of a portal bound
    /// from it, from its cursor, and PostgreSQL 15.18 crashes when that cursor is gone.
    pub fetch: bool,
    /// The cursors (or portals) its FETCHes read, as the server names them.
    pub fetches_from: BTreeSet<String>,
    /// Cursors it declares or closes (`All`: CLOSE ALL). Cursors are portals too: what the
    /// proxy knew of portals of those names is stale once it ran.
    pub cursors: Deallocates,
    /// It declares a `WITH HOLD` cursor, whose rows the server computes at COMMIT.
    pub hold_cursor: bool,
    /// It commits or rolls back, also to a savepoint: the server drops the portals of what it
    /// ends. BEGIN, SAVEPOINT and RELEASE keep them.
    pub ends_transaction: bool,
    /// The columns it names anywhere, and whether it reads whole rows.
    pub reads: Reads,
    /// It may make the session or a transaction read-write: it sets `default_transaction_read_only`
    /// or `transaction_read_only` (SET, `set_config`), or asks for `READ WRITE` (`BEGIN`, `SET
    /// TRANSACTION`, `SET SESSION CHARACTERISTICS`).
    pub read_write: bool,
}

impl Classification {
    /// A text that was not looked into, and why.
    pub fn unparseable(why: String) -> Classification {
        Classification { kinds: [Kind::Unparseable].into(), parse_error: Some(why), ..Default::default() }
    }

    /// The prepared statement and cursor names it uses (PREPARE, EXECUTE, DEALLOCATE, DECLARE,
    /// CLOSE, FETCH).
    pub fn names(&self) -> Vec<&str> {
        fn listed(d: &Deallocates) -> Vec<&str> {
            match d {
                Deallocates::Names(n) => n.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            }
        }
        let mut all = listed(&self.deallocates);
        all.extend(listed(&self.cursors));
        all.extend(self.prepares.iter().chain(&self.executes).chain(&self.fetches_from).map(String::as_str));
        all
    }
}

/// Built-in functions that run a query given as text, or dump whole tables: what they read is
/// not in the statement's tree.
const RUNS_SQL_TEXT: [&str; 22] = [
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
    "xpath_table",
];

/// Functions that run queries given as text arguments, and which arguments those are (as far
/// as a call has them): each query is classified as part of the statement.
const RUNS_QUERY_TEXT: [(&str, &[usize]); 9] = [
    ("query_to_xml", &[0]),
    ("query_to_xmlschema", &[0]),
    ("query_to_xml_and_xmlschema", &[0]),
    ("ts_stat", &[0]),
    ("ts_rewrite", &[1]),
    // tablefunc's: the source query, and the category query of the two-argument form.
    ("crosstab", &[0, 1]),
    ("crosstab2", &[0]),
    ("crosstab3", &[0]),
    ("crosstab4", &[0]),
];

/// Built-in functions (and those of common extensions) that change state: a rule about reads
/// must not let them through as `select`. Matched on the last component of the name, in lower
/// case, so a schema or quotes do not hide them. `nextval` is left out: applications call it
/// to number rows, and it changes nothing a read-only user could not undo by ignoring it.
pub const SIDE_EFFECTS: [&str; 95] = [
    // Sequences.
    "setval",
    // Large objects (the `lo_import`/`lo_export` pair also touches the server's files).
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_create",
    "lo_creat",
    "lo_from_bytea",
    "lo_put",
    "lo_truncate",
    "lo_truncate64",
    "lowrite",
    // Files on the server (adminpack).
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    // Other sessions.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_log_backend_memory_contexts",
    // The server.
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_import_system_collations",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "pg_stat_statements_reset",
    "pg_buffercache_evict",
    "pg_buffercache_evict_relation",
    "pg_buffercache_evict_all",
    "pg_stat_reset_backend_stats",
    "pg_log_standby_snapshot",
    // pg_prewarm's background worker and its dump of what is cached.
    "autoprewarm_start_worker",
    "autoprewarm_dump_now",
    // Planner statistics (PostgreSQL 18).
    "pg_restore_relation_stats",
    "pg_restore_attribute_stats",
    "pg_clear_relation_stats",
    "pg_clear_attribute_stats",
    // Replication slots and origins.
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_emit_message",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_advance",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_setup",
    "pg_sync_replication_slots",
    // Other databases: dblink runs any SQL there, the same database included.
    "dblink",
    "dblink_exec",
    "dblink_send_query",
    "dblink_open",
    "dblink_fetch",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_cancel_query",
    // SQL run later or elsewhere: pg_cron's jobs (by their last name, so `SET search_path`
    // does not hide them; a function of your own of one of these names counts too), and
    // pg_background's workers.
    "schedule",
    "schedule_in_database",
    "unschedule",
    "alter_job",
    "pg_background_launch",
    // Notifications reach other sessions' clients.
    "pg_notify",
    // Advisory locks stall other sessions: session locks past the statement, transaction
    // locks to its end.
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    // Index maintenance (BRIN summaries, a GIN index's pending list).
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    // Table surgery (pg_surgery, pg_visibility): rows removed or frozen by hand, a visibility map
    // cleared.
    "heap_force_kill",
    "heap_force_freeze",
    "pg_truncate_visibility_map",
    // adminpack's old names of server controls.
    "pg_rotate_logfile_old",
    "pg_logfile_rotate",
];

/// What a statement reads, as far as its text says: every column it names (the last part of
/// each column reference), and whether it reads whole rows (`t.*`, `*`, a table's name standing
/// for its row), which may carry any column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    pub columns: BTreeSet<String>,
    pub whole_rows: bool,
    /// Qualified column references (qualifier, column): `v.f` is a function call on the row
    /// (attribute notation) when `v`'s table has no column `f`.
    pub qualified: BTreeSet<(String, String)>,
    /// Table aliases: alias -> the tables it names (one alias may be reused in subqueries),
    /// lower-cased.
    pub aliases: BTreeMap<String, BTreeSet<String>>,
    /// It calls a function that runs SQL text (`RUNS_SQL_TEXT`): what that reads is unknown.
    pub runs_sql: bool,
}

impl Reads {
    fn of(tree: &Value) -> Reads {
        let mut reads = Reads::default();
        // Names a whole-row reference could use, and the one-part column references.
        let mut ranges: BTreeSet<&str> = BTreeSet::new();
        let mut singles: BTreeSet<&str> = BTreeSet::new();
        visit(tree, |_, key, child| {
            match key {
                "ColumnRef" => {
                    let fields = child.get("fields").and_then(Value::as_array).map(Vec::as_slice);
                    let fields = fields.unwrap_or_default();
                    match fields.last().and_then(sval) {
                        Some(name) => {
                            reads.columns.insert(name.to_string());
                            match fields {
                                [_] => {
                                    singles.insert(name);
                                }
                                [.., q, _] => {
                                    if let Some(q) = sval(q) {
                                        reads.qualified.insert((q.to_lowercase(), name.to_lowercase()));
                                    }
                                }
                                [] => {}
                            }
                        }
                        None => reads.whole_rows = true,
                    }
                }
                "RangeVar" | "relation" => {
                    let relname = child.get("relname").and_then(Value::as_str);
                    ranges.extend(relname);
                    if let (Some(rel), Some(alias)) =
                        (relname, child.pointer("/alias/aliasname").and_then(Value::as_str))
                    {
                        reads.aliases.entry(alias.to_lowercase()).or_default().insert(rel.to_lowercase());
                    }
                }
                // `JOIN ... USING (a) AS j`: `j` is a row of the join columns.
                "alias" | "join_using_alias" => ranges.extend(child.get("aliasname").and_then(Value::as_str)),
                // `(a JOIN b) AS j`: `j.f` may be attribute notation on a row of
                // any table inside.
                "JoinExpr" => {
                    if let Some(alias) = child.pointer("/alias/aliasname").and_then(Value::as_str) {
                        let tables = reads.aliases.entry(alias.to_lowercase()).or_default();
                        visit(child, |_, k, c| {
                            if k == "RangeVar"
                                && let Some(rel) = c.get("relname").and_then(Value::as_str)
                            {
                                tables.insert(rel.to_lowercase());
                            }
                        });
                    }
                }
                // `COPY t (a, b)`: the columns it reads.
                "attlist" => {
                    let names = child.as_array().map(Vec::as_slice).unwrap_or_default();
                    reads.columns.extend(names.iter().filter_map(sval).map(str::to_string));
                }
                "using_clause" => {
                    let names = child.as_array().map(Vec::as_slice).unwrap_or_default();
                    reads.columns.extend(names.iter().filter_map(sval).map(str::to_string));
                }
                "FuncCall" => {
                    let names = child.get("funcname").and_then(Value::as_array);
                    let last = names.and_then(|n| n.last()).and_then(sval).map(str::to_lowercase);
                    if last.is_some_and(|f| RUNS_SQL_TEXT.contains(&f.as_str())) {
                        reads.runs_sql = true;
                    }
                }
                "CommonTableExpr" => ranges.extend(child.get("ctename").and_then(Value::as_str)),
                _ => {}
            }
            // Renaming columns by position (`AS v(a, b)`, `WITH c(a) AS`) hides which
            // column a name stands for: as good as reading whole rows.
            if matches!(key, "colnames" | "aliascolnames") && child.as_array().is_some_and(|a| !a.is_empty()) {
                reads.whole_rows = true;
            }
        });
        reads.whole_rows |= !singles.is_disjoint(&ranges);
        reads
    }
}

/// Named prepared statements a text removes: `DEALLOCATE name`, `DEALLOCATE ALL` and `DISCARD
/// ALL` drop statements made with the protocol's Parse too (not the unnamed one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Deallocates {
    #[default]
    None,
    Names(BTreeSet<String>),
    All,
}

impl Deallocates {
    fn add(&mut self, name: Option<&str>) {
        match (name, &mut *self) {
            (_, Deallocates::All) => {}
            (None, _) => *self = Deallocates::All,
            (Some(n), Deallocates::Names(names)) => {
                names.insert(n.to_string());
            }
            (Some(n), Deallocates::None) => *self = Deallocates::Names([n.to_string()].into()),
        }
    }
}

/// The shape of the rows a `COPY ... TO STDOUT` will send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    pub format: CopyFormat,
    pub delimiter: u8,
    /// CSV with a first line of column names.
    pub header: bool,
    /// Non-default QUOTE, ESCAPE, NULL or ENCODING options the masker does not follow.
    pub unusual: Option<String>,
    /// Column names, when the statement says them (a column list, or plain named select items).
    pub columns: Option<Vec<String>>,
    /// `COPY (query) TO STDOUT`, whose columns the proxy cannot trace to table columns.
    pub query: bool,
    /// The relations it reads, lower-cased, without schema.
    pub tables: BTreeSet<String>,
    pub reads: Reads,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// Statement node types and the kind each stands for. Anything ending in `Stmt` that is not
/// listed is DDL if its name says it creates, alters, drops or renames, and `other` otherwise.
fn stmt_kind(node_type: &str, body: &Value) -> Option<Kind> {
    Some(match node_type {
        // A VALUES list (as in INSERT ... VALUES) is a SelectStmt in the tree but reads nothing.
        "SelectStmt" if body.get("values_lists").and_then(Value::as_array).is_some_and(|v| !v.is_empty()) => {
            return None;
        }
        "SelectStmt" => Kind::Select,
        "InsertStmt" => Kind::Insert,
        "UpdateStmt" => Kind::Update,
        "DeleteStmt" => Kind::Delete,
        "MergeStmt" => Kind::Merge,
        "TruncateStmt" => Kind::Truncate,
        "CopyStmt" => {
            if body.get("is_program").and_then(Value::as_bool) == Some(true) {
                Kind::CopyProgram
            } else if body.get("filename").and_then(Value::as_str).is_some_and(|f| !f.is_empty()) {
                Kind::CopyFile
            } else {
                Kind::Copy
            }
        }
        "CallStmt" => Kind::Call,
        "DoStmt" => Kind::Do,
        "PrepareStmt" => Kind::Prepare,
        "ExecuteStmt" | "DeallocateStmt" => Kind::Execute,
        // TRANS_STMT_PREPARE, _COMMIT_PREPARED and _ROLLBACK_PREPARED in the parse tree's enum.
        "TransactionStmt" if matches!(body.get("kind").and_then(Value::as_i64), Some(8..=10)) => Kind::TwoPhase,
        "TransactionStmt" => Kind::Transaction,
        "VariableSetStmt" | "DiscardStmt" => Kind::Set,
        "VariableShowStmt" => Kind::Show,
        "LockStmt" => Kind::Lock,
        "GrantStmt" | "GrantRoleStmt" | "AlterDefaultPrivilegesStmt" => Kind::Grant,
        // They make tables (foreign ones) and hand every object of a role to another.
        "ImportForeignSchemaStmt" | "ReassignOwnedStmt" => Kind::Ddl,
        "ExplainStmt" | "DeclareCursorStmt" | "FetchStmt" | "ClosePortalStmt" => return None,
        t if t.ends_with("Stmt") => {
            let ddl = [
                "Create",
                "Alter",
                "Drop",
                "Rename",
                "Comment",
                "Define",
                "Index",
                "View",
                "Rule",
                "Reindex",
                "Cluster",
                "Refresh",
                "SecLabel",
                "CompositeType",
            ];
            if ddl.iter().any(|p| t.starts_with(p)) || t == "IndexStmt" || t == "ViewStmt" || t == "RuleStmt" {
                Kind::Ddl
            } else {
                Kind::Other
            }
        }
        _ => return None,
    })
}

pub fn classify(sql: &str) -> Classification {
    if sql.len() > MAX_TEXT_BYTES {
        return Classification::unparseable(format!(
            "the text is longer than {} MiB; it is not looked into (send large values as parameters)",
            MAX_TEXT_BYTES >> 20
        ));
    }
    TOKENS_LEFT.set(MAX_TOKENS);
    classify_nested(sql, 0)
}

/// Most bytes of text classified. Even scanning a text costs memory in proportion to its
/// tokens, before `MAX_TOKENS` can be checked; large values belong in Bind parameters, which
/// are not parsed.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

thread_local! {
    /// Tokens one classification may still parse, across the text and every query it runs from
    /// text or holds in DO blocks: each is bounded by `MAX_TOKENS`, and so are all together.
    static TOKENS_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_TOKENS) };
}

/// How deep DO blocks may run DO blocks before the classifier stops looking (and refuses): the
/// nesting is the input's, and each level parses again.
const MAX_DO_DEPTH: usize = 3;

/// Most a text may nest (`nesting`) to be parsed. libpg_query writes its parse tree out
/// recursively, with no limit of its own: `SELECT 1+1+...` with some thousands of terms
/// overflows a thread's stack and aborts the agent. A tree nested this deep could not be read
/// anyway (the decoder stops at 100 levels), so refusing it early loses nothing.
const MAX_NESTING: usize = 1000;

/// Most tokens a text may have to be parsed. The parse tree takes about 3.5 KiB of the agent's
/// memory and 25 µs per token of a dense text (`SELECT 1,1,1,...`): this bounds one
/// classification at about 100-200 MB and a second or so. A bulk INSERT of 4,000 rows of four
/// values fits (10 tokens a row); larger loads belong in COPY.
pub const MAX_TOKENS: usize = 50_000;

/// An upper bound of how deep a text's parse tree nests, from its tokens: brackets (`(`, `[`,
/// CASE and PL/pgSQL's blocks, IF and LOOP, up to their END) each open a level, and within a
/// level every token but names and constants may nest once more (`1+1+1` is a chain of
/// operators), until a comma, semicolon, AND, OR, WHEN, THEN or ELSE starts a sibling. Set
/// operations and joins chain across those (`SELECT 1, 2 UNION SELECT 1, 2 UNION ...` nests
/// one level per UNION): they count until the level closes or a semicolon. `None` when the
/// text does not scan (then it does not parse either). With it, the number of tokens.
fn nesting(sql: &str) -> Option<(usize, usize)> {
    use pg_query::protobuf::Token as T;
    let scan = pg_query::scan(sql).ok()?;
    /// What may nest in one open level: in its current element, and across its elements.
    #[derive(Default)]
    struct Level {
        element: usize,
        chain: usize,
    }
    let mut levels: Vec<Level> = vec![Level::default()];
    // The total of every level's counts.
    let (mut sum, mut deepest, mut after_end) = (0usize, 0usize, false);
    for t in &scan.tokens {
        let token = T::try_from(t.token).ok()?;
        let text = || sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?);
        let opens_block = |t: T| {
            matches!(t, T::IfP | T::Case) || (t == T::Ident && text().is_some_and(|w| w.eq_ignore_ascii_case("loop")))
        };
        let level = levels.last_mut()?;
        match token {
            // `END IF`, `END LOOP`, `END CASE` close one level, not two.
            _ if after_end && opens_block(token) => {}
            T::Ascii40 | T::Ascii91 | T::BeginP => levels.push(Level::default()),
            _ if opens_block(token) => levels.push(Level::default()),
            T::Ascii41 | T::Ascii93 | T::EndP => {
                if levels.len() > 1 {
                    let closed = levels.pop()?;
                    sum -= closed.element + closed.chain;
                }
            }
            T::Ascii59 => {
                sum -= std::mem::take(&mut level.element) + std::mem::take(&mut level.chain);
            }
            T::Ascii44 | T::And | T::Or | T::When | T::Then | T::Else => sum -= std::mem::take(&mut level.element),
            T::Union | T::Intersect | T::Except | T::Join => {
                level.chain += 1;
                sum += 1;
            }
            T::Ident | T::Uident | T::Sconst | T::Iconst | T::Fconst | T::Bconst | T::Xconst | T::Param => {}
            T::SqlComment | T::CComment => {}
            _ => {
                level.element += 1;
                sum += 1;
            }
        }
        after_end = token == T::EndP;
        deepest = deepest.max(levels.len() + sum);
    }
    Some((deepest, scan.tokens.len()))
}

/// Why a text is too big to parse (`nesting`), if it is; `what` names it.
fn too_big(sql: &str, what: &str) -> Option<String> {
    match nesting(sql)? {
        (n, _) if n > MAX_NESTING => {
            Some(format!("{what} nests more than {MAX_NESTING} levels deep; it is not looked into"))
        }
        (_, t) if t > MAX_TOKENS => Some(format!("{what} has more than {MAX_TOKENS} tokens; it is not looked into")),
        (_, t) if t > TOKENS_LEFT.get() => Some(format!(
            "{what}, with the text around it and the queries it runs, has more than {MAX_TOKENS} tokens; it is \
             not looked into"
        )),
        (_, t) => {
            TOKENS_LEFT.set(TOKENS_LEFT.get() - t);
            None
        }
    }
}

fn classify_nested(sql: &str, depth: usize) -> Classification {
    if let Some(why) = too_big(sql, "the text") {
        return Classification::unparseable(why);
    }
    let parsed = match pg_query::parse(sql) {
        Ok(p) => p,
        Err(e) => return Classification::unparseable(e.to_string()),
    };
    let mut c = Classification { statements: parsed.protobuf.stmts.len(), ..Default::default() };
    match serde_json::to_value(&parsed.protobuf) {
        Ok(tree) => {
            walk(&tree, &mut c);
            let stmts = tree.get("stmts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            c.copy_out = stmts.iter().filter_map(|s| copy_out(s.pointer("/stmt/node/CopyStmt")?)).collect();
            c.copy_in = stmts
                .iter()
                .filter_map(|s| s.pointer("/stmt/node/CopyStmt"))
                .filter(|copy| {
                    copy.get("is_from").and_then(Value::as_bool) == Some(true)
                        && copy.get("is_program").and_then(Value::as_bool) != Some(true)
                        && copy.get("filename").and_then(Value::as_str).is_none_or(str::is_empty)
                })
                .count();
            c.reads = Reads::of(&tree);
            if qualified_calls(&tree, &c) {
                c.kinds.insert(Kind::SideEffect);
            }
            for query in queries_run(&tree) {
                look_into_query(query, depth, &mut c);
            }
            // pg_query cuts long names as a UTF-8 server would; one converting from the client's
            // encoding may cut them elsewhere. pg_query has cut names already: one of 60 bytes or
            // more in a text that is not all ASCII may have lost what would have been cut
            // elsewhere.
            let cut = |n: &&str| name_may_be_cut(n) || (!sql.is_ascii() && n.len() >= MAX_NAME - 3);
            if let Some(n) = c.names().into_iter().find(cut) {
                let n = n.to_string();
                refuse(&mut c, || {
                    format!("the name {n:?} may be cut short by the server (a non-ASCII byte counts three of its 63)")
                });
            }
            for s in stmts {
                if let Some(block) = s.pointer("/stmt/node/DoStmt") {
                    look_into_do(sql, s, block, depth, &mut c);
                }
            }
            let fetches = || stmts.iter().filter_map(|s| s.pointer("/stmt/node/FetchStmt"));
            c.indirect = !c.executes.is_empty() || fetches().next().is_some();
            for f in fetches().filter(|f| f.get("ismove").and_then(Value::as_bool) != Some(true)) {
                c.fetch = true;
                c.fetches_from.extend(f.get("portalname").and_then(Value::as_str).map(str::to_string));
            }
        }
        Err(e) => {
            c.kinds.insert(Kind::Unparseable);
            c.parse_error = Some(format!("parse tree not walkable: {e}"));
        }
    }
    // Cursor and EXPLAIN wrappers only add kinds through what they contain; an empty
    // DECLARE/FETCH/CLOSE still needs a kind so no statement slips through without one.
    if c.kinds.is_empty() && c.statements > 0 {
        c.kinds.insert(Kind::Select);
    }
    c
}

/// Classifies a query a function runs from text as part of the statement: its kinds, tables
/// and functions count as the statement's own.
fn look_into_query(query: Result<String, String>, depth: usize, c: &mut Classification) {
    let query = match query {
        Ok(q) if depth < MAX_DO_DEPTH => q,
        Ok(_) => {
            return refuse(c, || {
                format!("queries run from text nested more than {MAX_DO_DEPTH} deep are not looked into")
            });
        }
        Err(why) => return refuse(c, || why),
    };
    merge(c, classify_nested(&query, depth + 1), "in a query run from text");
}

/// Counts what a text run inside the statement (a DO block's statement, a query run from text)
/// does as the statement's own.
fn merge(c: &mut Classification, inner: Classification, place: &str) {
    if let Some(e) = inner.parse_error {
        c.parse_error.get_or_insert_with(|| format!("{place}: {e}"));
    }
    c.kinds.extend(inner.kinds);
    c.tables.extend(inner.tables);
    c.functions.extend(inner.functions);
    c.maybe_functions.extend(inner.maybe_functions);
    c.where_missing |= inner.where_missing;
    c.beyond_tables |= inner.beyond_tables;
    c.ends_transaction |= inner.ends_transaction;
    c.reads.runs_sql |= inner.reads.runs_sql;
    c.read_write |= inner.read_write;
}

/// Gives up on classifying: the text is treated as unparseable (denied unless a rule names it).
fn refuse(c: &mut Classification, why: impl FnOnce() -> String) {
    c.kinds.insert(Kind::Unparseable);
    c.parse_error.get_or_insert_with(why);
}

/// Most statements and expressions a DO block may hold: each is parsed on the session's thread,
/// and a client can make a body as long as it likes.
const MAX_DO_STATEMENTS: usize = 1000;

/// A DO block runs the statements in its body: the block takes on their kinds, tables and
/// functions, so a rule about DELETE sees a DELETE inside DO. Each SQL statement and expression
/// in a PL/pgSQL body is classified as PL/pgSQL runs it (an expression as a SELECT). What cannot
/// be known from the text (dynamic `EXECUTE`, bodies in other languages) makes the block
/// unparseable: denied unless a rule names `unparseable`.
fn look_into_do(sql: &str, raw: &Value, block: &Value, depth: usize, c: &mut Classification) {
    let args = block.get("args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let items = |name: &str| -> Vec<Option<&str>> {
        args.iter()
            .filter_map(|a| a.pointer("/node/DefElem"))
            .filter(|d| d.get("defname").and_then(Value::as_str) == Some(name))
            .map(|d| d.get("arg").and_then(sval))
            .collect()
    };
    // The server refuses a DO without exactly one body (libpg_query aborts the process on one).
    let (bodies, languages) = (items("as"), items("language"));
    let ([Some(body)], [] | [Some(_)]) = (&bodies[..], &languages[..]) else {
        return refuse(c, || "a DO block needs exactly one body and at most one language".into());
    };
    // Names as the server (and libpg_query) compare them: exactly.
    let language = languages.first().copied().flatten().unwrap_or("plpgsql");
    if language != "plpgsql" {
        return refuse(c, || format!("a DO block in language {language} cannot be looked into"));
    }
    if depth >= MAX_DO_DEPTH {
        return refuse(c, || format!("DO blocks nested more than {MAX_DO_DEPTH} deep are not looked into"));
    }
    // The DO statement's own text: PL/pgSQL is parsed from it, not from the body alone.
    let at = |k: &str| raw.get(k).and_then(Value::as_u64).and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    let (start, len) = (at("stmt_location"), at("stmt_len"));
    let end = if len == 0 { sql.len() } else { start.saturating_add(len) };
    let Some(text) = sql.get(start..end) else {
        return refuse(c, || "a DO block's text could not be found".into());
    };
    if let Some(why) = too_big(body, "a DO block") {
        return refuse(c, || why);
    }
    // libpg_query leaks one byte (a strdup) per body that fails to compile: less than the
    // audit record of the refusal that follows.
    let function = match pg_query::parse_plpgsql(text) {
        Ok(f) => f,
        Err(e) => return refuse(c, || format!("DO block: {e}")),
    };
    if function.pointer("/0/PLpgSQL_function/action").is_none() {
        return refuse(c, || "a DO block's body could not be read".into());
    }
    let mut embedded = Vec::new();
    let mut unknown = None;
    let mut records = BTreeSet::new();
    let dynamic = || "a DO block that runs dynamic SQL (EXECUTE) cannot be looked into".to_string();
    visit(&function, |_, key, child| match key {
        "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors" => {
            unknown.get_or_insert_with(dynamic);
        }
        // OPEN ... FOR EXECUTE, RETURN QUERY EXECUTE.
        "dynquery" if !child.is_null() => {
            unknown.get_or_insert_with(dynamic);
        }
        "PLpgSQL_stmt_commit" | "PLpgSQL_stmt_rollback" => {
            c.kinds.insert(Kind::Transaction);
            c.ends_transaction = true;
        }
        // Cursors are portals of the session, named as the block likes: whatever the proxy knew
        // of any portal is stale once the block ran.
        "PLpgSQL_stmt_open" | "PLpgSQL_stmt_close" | "PLpgSQL_stmt_fetch" | "PLpgSQL_stmt_forc" => {
            c.cursors = Deallocates::All;
        }
        "PLpgSQL_rec" => records.extend(child.get("refname").and_then(Value::as_str).map(str::to_lowercase)),
        "PLpgSQL_expr" => match embedded_sql(child) {
            Ok(texts) => embedded.extend(texts),
            Err(e) => {
                unknown.get_or_insert(e);
            }
        },
        _ => {}
    });
    // libpg_query shows the default values of scalar variables only: a record or composite
    // variable's (`r record := ROW(set_config(...))`) would run unseen.
    if defaulted_names(body).is_none_or(|names| !names.is_disjoint(&records)) {
        unknown.get_or_insert_with(|| {
            "a DO block that gives a record or composite variable a default value cannot be looked into".into()
        });
    }
    if embedded.len() > MAX_DO_STATEMENTS {
        return refuse(c, || {
            format!("a DO block with more than {MAX_DO_STATEMENTS} statements and expressions is not looked into")
        });
    }
    // What is known goes in even when the block is refused: a deny rule may name it.
    for text in embedded {
        let inner = classify_nested(&text, depth + 1);
        // Session state the proxy tracks (prepared statements, COPY data) changed from inside a
        // block would go unseen.
        if !inner.prepares.is_empty()
            || !inner.executes.is_empty()
            || inner.deallocates != Deallocates::None
            || inner.cursors != Deallocates::None
            || inner.copy_in > 0
            || !inner.copy_out.is_empty()
        {
            unknown.get_or_insert_with(|| {
                "a DO block that prepares, executes or deallocates statements, declares cursors in SQL or \
                 copies to or from the client cannot be looked into"
                    .into()
            });
        }
        merge(c, inner, "in a DO block");
    }
    if let Some(why) = unknown {
        refuse(c, || why);
    }
}

/// The names (lower-cased, unquoted) that declarations in a PL/pgSQL body's DECLARE sections
/// give a default value (`:=`, `=` or DEFAULT), and cursors whose queries have an `=`; `None`
/// when the body does not scan.
fn defaulted_names(body: &str) -> Option<BTreeSet<String>> {
    use pg_query::protobuf::Token;
    let scan = pg_query::scan(body).ok()?;
    let mut names = BTreeSet::new();
    let (mut declaring, mut depth) = (false, 0i32);
    // The current declaration's name, once its first token is seen.
    let mut name: Option<String> = None;
    for t in &scan.tokens {
        let token = Token::try_from(t.token).ok()?;
        let text = body.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?;
        match token {
            Token::Declare => (declaring, depth, name) = (true, 0, None),
            // The block's BEGIN stands where a declaration would start; `begin` elsewhere is a
            // word of an expression (`n int := 1 begin;`, `(SELECT 1 AS begin)`).
            Token::BeginP if declaring && depth == 0 && name.is_none() => declaring = false,
            _ if !declaring => {}
            Token::SqlComment | Token::CComment => {}
            Token::Ascii59 if depth == 0 => name = None,
            // A name in Unicode escapes would need decoding to compare: not looked into.
            Token::Uident => return None,
            _ if name.is_none() => {
                let unquoted = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                    Some(quoted) => quoted.replace("\"\"", "\""),
                    None => text.to_string(),
                };
                name = Some(unquoted.to_lowercase());
            }
            Token::Ascii40 | Token::Ascii91 => depth += 1,
            Token::Ascii41 | Token::Ascii93 => depth -= 1,
            Token::ColonEquals | Token::Ascii61 | Token::Default if depth == 0 => names.extend(name.clone()),
            _ => {}
        }
    }
    Some(names)
}

/// The SQL a PL/pgSQL expression runs (`parseMode` is PostgreSQL's `RawParseMode`).
fn embedded_sql(expr: &Value) -> Result<Vec<String>, String> {
    let query = expr.get("query").and_then(Value::as_str).unwrap_or_default();
    match expr.get("parseMode").and_then(Value::as_i64).unwrap_or(0) {
        // RAW_PARSE_DEFAULT: a whole statement.
        0 => Ok(vec![query.to_string()]),
        // RAW_PARSE_TYPE_NAME: runs nothing.
        1 => Ok(Vec::new()),
        // RAW_PARSE_PLPGSQL_EXPR: PostgreSQL parses it as the rest of a SELECT.
        2 => Ok(vec![format!("SELECT {query}")]),
        // RAW_PARSE_PLPGSQL_ASSIGN1..3: `target := expression`.
        3..=5 => {
            let (target, value) =
                split_assignment(query).ok_or_else(|| format!("a DO block's assignment could not be read: {query}"))?;
            let mut texts = vec![format!("SELECT {value}")];
            // Subscripts are expressions too (`a[(SELECT ...)] := 1`).
            if target.contains('[') {
                texts.push(format!("SELECT {target}"));
            }
            Ok(texts)
        }
        m => Err(format!("a DO block holds an expression of an unknown kind ({m})")),
    }
}

/// `target := value` (or `=`) at the first assignment operator outside brackets and parentheses.
fn split_assignment(query: &str) -> Option<(&str, &str)> {
    use pg_query::protobuf::Token;
    let scan = pg_query::scan(query).ok()?;
    let mut depth = 0i32;
    for t in &scan.tokens {
        match Token::try_from(t.token).ok()? {
            Token::Ascii40 | Token::Ascii91 => depth += 1,
            Token::Ascii41 | Token::Ascii93 => depth -= 1,
            Token::ColonEquals | Token::Ascii61 if depth == 0 => {
                let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
                return Some((query.get(..start)?, query.get(end..)?));
            }
            _ => {}
        }
    }
    None
}

fn sval(v: &Value) -> Option<&str> {
    v.pointer("/node/String/sval").and_then(Value::as_str)
}

/// `COPY ... TO STDOUT` (not FROM, not to a file or program): how its rows will look.
fn copy_out(copy: &Value) -> Option<CopyOut> {
    if copy.get("is_from").and_then(Value::as_bool) == Some(true)
        || copy.get("is_program").and_then(Value::as_bool) == Some(true)
        || copy.get("filename").and_then(Value::as_str).is_some_and(|f| !f.is_empty())
    {
        return None;
    }
    let mut out = CopyOut {
        format: CopyFormat::Text,
        delimiter: b'\t',
        header: false,
        unusual: None,
        columns: None,
        query: copy.get("query").is_some_and(|q| !q.is_null()),
        tables: BTreeSet::new(),
        reads: Reads::of(copy),
    };
    visit(copy, |_, key, child| {
        if matches!(key, "RangeVar" | "relation")
            && let Some(name) = child.get("relname").and_then(Value::as_str)
        {
            out.tables.insert(name.to_lowercase());
        }
    });
    let mut delimiter = None;
    for opt in copy.get("options").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        let Some(def) = opt.pointer("/node/DefElem") else { continue };
        let name = def.get("defname").and_then(Value::as_str).unwrap_or_default();
        let arg = def.get("arg").and_then(sval);
        match name {
            "format" => {
                out.format = match arg {
                    Some("csv") => CopyFormat::Csv,
                    Some("binary") => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                }
            }
            "delimiter" => delimiter = arg.and_then(|a| a.bytes().next()),
            // HEADER takes a boolean (`true`, `on`, `1`, any case; or an integer) or nothing;
            // `match` (COPY FROM only) counts as a header too.
            "header" => {
                let ival = def.pointer("/arg/node/Integer/ival").and_then(Value::as_i64);
                let word = arg.map(str::to_ascii_lowercase);
                out.header = match (ival, word.as_deref()) {
                    (Some(n), _) => n != 0,
                    (None, Some("false" | "off" | "0" | "no")) => false,
                    _ => true,
                };
            }
            "quote" | "escape" | "null" | "encoding" | "force_quote" | "force_not_null" | "force_null" => {
                out.unusual = Some(name.to_string())
            }
            _ => {}
        }
    }
    out.delimiter = delimiter.unwrap_or(if out.format == CopyFormat::Csv { b',' } else { b'\t' });
    let attlist: Vec<String> = copy
        .get("attlist")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(sval).map(str::to_string).collect())
        .unwrap_or_default();
    if !attlist.is_empty() {
        out.columns = Some(attlist);
    } else if let Some(targets) =
        copy.pointer("/query/node/SelectStmt/target_list").and_then(Value::as_array).filter(|t| !t.is_empty())
    {
        // An empty list is a UNION or the like: names unknown.
        // `COPY (SELECT a, b AS c FROM t) TO STDOUT`: names as the select list gives them.
        out.columns = targets
            .iter()
            .map(|t| {
                let rt = t.pointer("/node/ResTarget")?;
                match rt.get("name").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() => Some(n.to_string()),
                    _ => {
                        let fields = rt.pointer("/val/node/ColumnRef/fields")?.as_array()?;
                        fields.last().and_then(sval).map(str::to_string)
                    }
                }
            })
            .collect();
    }
    Some(out)
}

/// Settings that change how SQL text is lexed: if the server read text differently from the
/// classifier, a statement could be judged as one thing and run as another.
const LEXER_SETTINGS: [&str; 4] =
    ["standard_conforming_strings", "backslash_quote", "client_encoding", "escape_string_warning"];

/// `SET standard_conforming_strings ...`, `set_config('client_encoding', ...)` (or a
/// `set_config` whose setting name is not a plain string), or an UPDATE of `pg_settings`: the
/// reason it is refused.
fn changes_lexing(key: &str, node: &Value) -> Option<String> {
    match key {
        "VariableSetStmt" => {
            let name = node.get("name").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
            LEXER_SETTINGS.contains(&name.as_str()).then(|| format!("changing {name} is not allowed through the proxy"))
        }
        "FuncCall" => {
            let names = node.get("funcname").and_then(Value::as_array)?;
            if names.last().and_then(sval).map(str::to_ascii_lowercase).as_deref() != Some("set_config") {
                return None;
            }
            let first = node.get("args").and_then(Value::as_array).and_then(|a| a.first());
            match first.and_then(|a| a.pointer("/node/AConst/val/Sval/sval")).and_then(Value::as_str) {
                Some(n) if !LEXER_SETTINGS.contains(&n.to_ascii_lowercase().as_str()) => None,
                Some(n) => Some(format!("changing {n} is not allowed through the proxy")),
                None => Some("set_config with a computed setting name is not allowed through the proxy".into()),
            }
        }
        // pg_settings is a view whose UPDATE rule calls set_config, with the name in a WHERE.
        "UpdateStmt" => {
            let rel = node.pointer("/relation/relname").and_then(Value::as_str)?;
            rel.eq_ignore_ascii_case("pg_settings")
                .then(|| "updating pg_settings is not allowed through the proxy".into())
        }
        _ => None,
    }
}

/// The settings that make sessions and transactions read-only.
const READ_ONLY_SETTINGS: [&str; 2] = ["default_transaction_read_only", "transaction_read_only"];

/// Whether a node may make the session or a transaction read-write: a SET (or RESET) of a
/// read-only setting, whatever the value (`'on'` and `'off'` are literals a shape does not
/// keep); a `set_config` of one; or a transaction mode that is not `READ ONLY` (`BEGIN READ
/// WRITE`, `SET TRANSACTION READ WRITE`, `SET SESSION CHARACTERISTICS AS TRANSACTION READ
/// WRITE`, which the tree holds as a `transaction_read_only` option of 0).
fn makes_read_write(key: &str, node: &Value) -> bool {
    let read_only_setting = |name: &str| READ_ONLY_SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(name));
    match key {
        "VariableSetStmt" => node.get("name").and_then(Value::as_str).is_some_and(read_only_setting),
        "FuncCall" => {
            let names = node.get("funcname").and_then(Value::as_array);
            let is_set_config =
                names.and_then(|n| n.last()).and_then(sval).is_some_and(|f| f.eq_ignore_ascii_case("set_config"));
            let first = node.get("args").and_then(Value::as_array).and_then(|a| a.first());
            let setting = first.and_then(|a| a.pointer("/node/AConst/val/Sval/sval")).and_then(Value::as_str);
            // A computed setting name is refused anyway (`changes_lexing`).
            is_set_config && setting.is_some_and(read_only_setting)
        }
        "DefElem" => {
            node.get("defname").and_then(Value::as_str) == Some("transaction_read_only")
                && node.pointer("/arg/node/AConst/val/Ival/ival").and_then(Value::as_i64) != Some(1)
        }
        _ => false,
    }
}

/// Calls `f` with every entry (object, key, value) of a JSON tree, parents before children.
/// An explicit stack: the tree can be deep, and recursion depth must not depend on input.
fn visit<'a>(root: &'a Value, mut f: impl FnMut(&'a serde_json::Map<String, Value>, &'a str, &'a Value)) {
    let mut stack = vec![root];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (key, child) in map {
                    f(map, key, child);
                    stack.push(child);
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
}

fn walk(v: &Value, c: &mut Classification) {
    visit(v, |map, key, child| {
        // CALL's procedure is a FuncCall its statement holds directly, not wrapped as a node.
        let call = match key {
            "FuncCall" => Some(child),
            "CallStmt" => child.get("funccall"),
            _ => None,
        };
        if let Some(names) = call.and_then(|c| c.get("funcname")).and_then(Value::as_array) {
            let name: Vec<&str> = names.iter().filter_map(sval).collect();
            if !name.is_empty() {
                let name = name.join(".").to_lowercase();
                // `SELECT set_config('role', 'admin', false)` is `SET ROLE admin`: a rule about
                // SET must see it.
                if is_set_config(&name) {
                    c.kinds.insert(Kind::Set);
                }
                note_function(c, name);
            }
        }
        // A call written as a field (PostgreSQL reads `x.f` as `f(x)` when `x` has no field
        // `f`): `('/etc/passwd'::text).pg_read_file`, `(pid).pg_terminate_backend`,
        // `s.path.lo_import`. Named as a function, whatever it turns out to be; a plain
        // `table.column` is left alone (no function that takes a whole row does harm by name).
        let field_names = match key {
            "AIndirection" => child.get("indirection").and_then(Value::as_array).map(|i| &i[..]),
            "ColumnRef" => {
                child.get("fields").and_then(Value::as_array).filter(|f| f.len() >= 3).map(|f| &f[f.len() - 1..])
            }
            _ => None,
        };
        for name in field_names.unwrap_or_default().iter().filter_map(sval) {
            // `s.x.f` may be schema s, table x, column f: whether f is a call that changes state
            // is settled with the two-part names, once the statement's tables are known.
            match key {
                "AIndirection" => note_function(c, name.to_lowercase()),
                _ => insert_function(&mut c.functions, name.to_lowercase()),
            }
        }
        // `x.f` is `f(x)` when `x` has no column `f`, which the text does not say: a function
        // that runs a query is not looked into (one that changes state: `qualified_calls`).
        let pair = (key == "ColumnRef").then(|| child.get("fields").and_then(Value::as_array)).flatten();
        if let Some([_, name]) = pair.map(Vec::as_slice)
            && let Some(name) = sval(name).map(str::to_lowercase)
        {
            insert_function(&mut c.maybe_functions, name);
        }
        let called_as_field = field_names.into_iter().flatten().chain(pair.into_iter().flatten().skip(1));
        if let Some(f) = called_as_field.filter_map(sval).find(|f| runs_query(f).is_some()) {
            let f = f.to_lowercase();
            c.kinds.insert(Kind::Unparseable);
            c.parse_error.get_or_insert_with(|| {
                format!("{f} written as a field runs a query not looked into; call it as {f}(...)")
            });
        }
        if let Some(why) = changes_lexing(key, child) {
            c.kinds.insert(Kind::Unparseable);
            c.parse_error.get_or_insert(why);
        }
        match key {
            "DeallocateStmt" => {
                let all = child.get("isall").and_then(Value::as_bool) == Some(true);
                // No name means ALL too (grammars before `isall`).
                let name = child.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
                c.deallocates.add(if all { None } else { name });
            }
            "ExecuteStmt" => {
                if let Some(name) = child.get("name").and_then(Value::as_str) {
                    c.executes.insert(name.to_string());
                }
            }
            "PrepareStmt" => {
                if let Some(name) = child.get("name").and_then(Value::as_str) {
                    c.prepares.insert(name.to_string());
                }
            }
            "DeclareCursorStmt" | "ClosePortalStmt" => {
                c.cursors.add(child.get("portalname").and_then(Value::as_str).filter(|n| !n.is_empty()));
                // CURSOR_OPT_HOLD in the parse tree's option bits.
                let options = child.get("options").and_then(Value::as_i64).unwrap_or(0);
                c.hold_cursor |= key == "DeclareCursorStmt" && options & 0x20 != 0;
            }
            // TRANS_STMT_BEGIN, _START, _SAVEPOINT and _RELEASE in the parse tree's enum; any other
            // (COMMIT, ROLLBACK, ROLLBACK TO, PREPARE TRANSACTION...) ends what made portals.
            "TransactionStmt" => {
                c.ends_transaction |= !matches!(child.get("kind").and_then(Value::as_i64), Some(1 | 2 | 5 | 6));
            }
            // DISCARD_ALL in the parse tree's enum.
            "DiscardStmt" if child.get("target").and_then(Value::as_i64) == Some(1) => c.deallocates.add(None),
            _ => {}
        }
        // SELECT ... INTO makes a table, as CREATE TABLE AS does (and reads, too); also from
        // the first arm of a UNION, which the tree holds under `larg`, not as a SelectStmt.
        if key == "into_clause" && !child.is_null() {
            c.kinds.insert(Kind::Ddl);
        }
        c.read_write |= makes_read_write(key, child);
        // SELECT ... FOR UPDATE / FOR SHARE: row locks, held to the end of the transaction.
        if key == "locking_clause" && child.as_array().is_some_and(|l| !l.is_empty()) {
            c.kinds.insert(Kind::Lock);
        }
        if let Some(kind) = stmt_kind(key, child) {
            c.kinds.insert(kind);
            if matches!(kind, Kind::Update | Kind::Delete) && !restricts(child.get("where_clause")) {
                c.where_missing = true;
            }
            // `DROP FUNCTION f`, `CREATE EXTENSION`, `VACUUM` (every table), `GRANT ... ON ALL
            // TABLES IN SCHEMA`: what these act on is not in `tables`, so a rule's table list
            // cannot speak for them.
            if matches!(kind, Kind::Ddl | Kind::Grant | Kind::Other | Kind::Lock | Kind::Truncate)
                && !names_relation(key, child)
            {
                c.beyond_tables = true;
            }
        }
        // `ALTER GROUP g ADD USER u` and `CREATE ROLE r IN ROLE g` grant membership, as
        // `GRANT g TO u` does (and `ALTER GROUP g DROP USER u` revokes it).
        if matches!(key, "AlterRoleStmt" | "CreateRoleStmt") && grants_membership(child) {
            c.kinds.insert(Kind::Grant);
        }
        // DROP, COMMENT and SECURITY LABEL name relations as lists of names, not as RangeVars.
        c.tables.extend(listed_relations(key, child));
        // COPY ... FROM (STDIN, a file, a program) inserts rows: a rule for `copy` alone, meant
        // for exports, does not let it load a table.
        if key == "CopyStmt" && child.get("is_from").and_then(Value::as_bool) == Some(true) {
            c.kinds.insert(Kind::Insert);
        }
        // INSERT ... ON CONFLICT DO UPDATE updates the rows it collides with.
        if key == "on_conflict_clause" && child.get("action").and_then(Value::as_i64) == Some(ONCONFLICT_UPDATE) {
            c.kinds.insert(Kind::Update);
        }
        if key == "MergeStmt" {
            merge_actions(child, c);
        }
        if key == "relname"
            && let Some(name) = child.as_str()
        {
            let table = match map.get("schemaname").and_then(Value::as_str) {
                Some(s) if !s.is_empty() => format!("{}.{}", relation_part(s), relation_part(name)),
                _ => relation_part(name).into_owned(),
            };
            c.tables.insert(table);
        }
    });
}

/// Whether a called function's name (parts joined with dots, lower-cased) is the built-in
/// `set_config`: plain, in `pg_catalog`, or with the database's name before that, which the
/// server accepts too.
fn is_set_config(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    parts.next() == Some("set_config") && parts.next().is_none_or(|schema| schema == "pg_catalog")
}

/// Whether a CREATE ROLE or ALTER ROLE (`ALTER GROUP`) statement changes who is a member of
/// whom, as GRANT and REVOKE of a role do.
fn grants_membership(role: &Value) -> bool {
    let options = role.get("options").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    options.iter().any(|o| {
        matches!(
            o.pointer("/node/DefElem/defname").and_then(Value::as_str),
            Some("rolemembers" | "addroleto" | "adminmembers")
        )
    })
}

/// Relations that a DROP, COMMENT or SECURITY LABEL statement names (`key`, `node`), as
/// `Classification::tables` holds them: the relations themselves, and the tables of the
/// policies, triggers, rules, columns and constraints it names.
fn listed_relations(key: &str, node: &Value) -> Vec<String> {
    use pg_query::protobuf::ObjectType as O;
    let (objtype, objects) = match key {
        "DropStmt" => (
            node.get("remove_type"),
            node.get("objects").and_then(Value::as_array).map(|o| o.iter().collect::<Vec<_>>()),
        ),
        "CommentStmt" | "SecLabelStmt" => (node.get("objtype"), node.get("object").map(|o| vec![o])),
        _ => return Vec::new(),
    };
    let (Some(objtype), Some(objects)) = (objtype.and_then(Value::as_i64), objects) else { return Vec::new() };
    let is = |types: &[O]| types.iter().any(|t| *t as i64 == objtype);
    let within = if is(&[
        O::ObjectTable,
        O::ObjectView,
        O::ObjectMatview,
        O::ObjectForeignTable,
        O::ObjectSequence,
        O::ObjectIndex,
    ]) {
        false
    } else if is(&[O::ObjectPolicy, O::ObjectTrigger, O::ObjectRule, O::ObjectColumn, O::ObjectTabconstraint]) {
        true
    } else {
        return Vec::new();
    };
    objects
        .into_iter()
        .filter_map(|o| o.pointer("/node/List/items").and_then(Value::as_array))
        .filter_map(|items| {
            let mut names: Vec<&str> = items.iter().filter_map(|i| i.pointer("/node/String/sval")?.as_str()).collect();
            if within {
                names.pop();
            }
            // A catalog (database) name before the schema is not part of a table's name here,
            // as with RangeVars.
            let start = names.len().saturating_sub(2);
            let parts: Vec<_> = names[start..].iter().map(|n| relation_part(n)).collect();
            (!parts.is_empty()).then(|| parts.join("."))
        })
        .collect()
}

/// Whether a statement names a relation it acts on: a RangeVar anywhere in it, or a name list
/// of a DROP, COMMENT or SECURITY LABEL.
fn names_relation(key: &str, node: &Value) -> bool {
    if !listed_relations(key, node).is_empty() {
        return true;
    }
    let mut found = false;
    visit(node, |_, k, _| found |= k == "relname");
    found
}

/// Whether a qualified name `x.f` (or `s.x.f`) may be a call of a function `f` that changes
/// state: PostgreSQL reads it as `f(x)` when `x` has no column `f`. That cannot be when `x` is
/// only a table of the statement (`j.schedule` of `cron.job j`), so those are left alone; a
/// function's value in FROM (`unnest(...) x`, or `unnest` itself unaliased) may be anything.
/// An unaliased FROM item that is not one plain function call (`COALESCE(...)`, `CAST(...)`,
/// `ROWS FROM (a(), b())`) gets a name the server derives (`coalesce`, a type's name...), which
/// may also be a table's alias elsewhere in the statement: then no `x` is left alone.
fn qualified_calls(tree: &Value, c: &Classification) -> bool {
    let mut functions_in_from: BTreeSet<String> = BTreeSet::new();
    let mut unnamed = false;
    visit(tree, |_, key, child| {
        if key != "RangeFunction" {
            return;
        }
        match child.pointer("/alias/aliasname").and_then(Value::as_str) {
            Some(alias) => _ = functions_in_from.insert(alias.to_lowercase()),
            None => {
                let one = child.get("functions").and_then(Value::as_array).is_some_and(|f| f.len() == 1);
                let name = child.pointer("/functions/0/node/List/items/0/node/FuncCall/funcname");
                let last = name.and_then(Value::as_array).and_then(|n| n.last()).and_then(sval);
                match last {
                    Some(last) if one => _ = functions_in_from.insert(last.to_lowercase()),
                    _ => unnamed = true,
                }
            }
        }
    });
    let tables: BTreeSet<String> =
        c.tables.iter().map(|t| unquoted(last_part(t)).to_lowercase()).chain(c.reads.aliases.keys().cloned()).collect();
    c.reads.qualified.iter().any(|(x, f)| {
        SIDE_EFFECTS.contains(&f.as_str()) && (unnamed || functions_in_from.contains(x) || !tables.contains(x))
    })
}

/// A part of a relation name as `Classification::tables` holds it, as the server has it (the
/// quotes `relation_part` added taken off).
pub fn unquoted(part: &str) -> std::borrow::Cow<'_, str> {
    match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
        Some(inner) if part.len() >= 2 => inner.replace("\"\"", "\"").into(),
        _ => part.into(),
    }
}

/// Which arguments of function `name` (any case, any schema) are queries it runs, if it runs
/// any; `Some(&[])` for one that builds its query from its arguments (tablefunc's `connectby`
/// and xml2's `xpath_table` splice them in unquoted), which is never looked into.
fn runs_query(name: &str) -> Option<&'static [usize]> {
    let last = name.rsplit('.').next().unwrap_or(name).to_lowercase();
    // xml2's xpath_table splices its arguments into a query it runs, several statements at once.
    if matches!(last.as_str(), "connectby" | "xpath_table") {
        return Some(&[]);
    }
    RUNS_QUERY_TEXT.iter().find(|(f, _)| *f == last).map(|&(_, args)| args)
}

/// The queries that functions in the tree run from text (`query_to_xml('SELECT ...', ...)`):
/// each a string literal, or `Err` naming the function whose query is not one.
fn queries_run(tree: &Value) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    visit(tree, |_, key, child| {
        let names = (key == "FuncCall").then(|| child.get("funcname").and_then(Value::as_array)).flatten();
        let Some(name) = names.and_then(|n| n.last()).and_then(sval) else { return };
        let Some(queries) = runs_query(name) else { return };
        let name = name.to_lowercase();
        if queries.is_empty() {
            out.push(Err(format!("{name} builds a query from its arguments; it is not looked into")));
            return;
        }
        let args = child.get("args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        // ts_rewrite(query, target, substitute) takes no query text; ts_rewrite(query, select) does.
        if name == "ts_rewrite" && args.len() != 2 {
            return;
        }
        for arg in queries.iter().filter_map(|&i| args.get(i)) {
            let arg = arg.pointer("/node/TypeCast/arg").unwrap_or(arg);
            out.push(match arg.pointer("/node/AConst/val/Sval/sval").and_then(Value::as_str) {
                Some(q) => Ok(q.to_string()),
                None => Err(format!("{name} runs a query that is not a string literal; it is not looked into")),
            });
        }
    });
    out
}

/// One part of a relation name as `Classification::tables` holds it: as the server has it, but
/// double-quoted when it holds a dot or a quote, so that `"a.b"` is not schema `a`, table `b`.
pub fn relation_part(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains(['.', '"']) { format!("\"{}\"", part.replace('"', "\"\"")).into() } else { part.into() }
}

/// The last part of a name as `Classification::tables` holds it (`orders` of `public.orders`,
/// `"a.b"` of `s."a.b"`).
pub fn last_part(name: &str) -> &str {
    if name.ends_with('"') {
        // Back to the opening quote: an odd run of quotes before a dot or the start.
        let b = name.as_bytes();
        let mut i = b.len() - 1;
        while i > 0 {
            i -= 1;
            if b[i] == b'"' {
                let run = b[..=i].iter().rev().take_while(|&&c| c == b'"').count();
                let start = i + 1 - run;
                if run % 2 == 1 && (start == 0 || b[start - 1] == b'.') {
                    return &name[start..];
                }
                i = start;
            }
        }
        return name;
    }
    name.rsplit('.').next().unwrap_or(name)
}

/// The server keeps the first 63 bytes of a name (NAMEDATALEN - 1).
pub const MAX_NAME: usize = 63;

/// Whether the server may keep `name` (a prepared statement's, a portal's, a cursor's) shorter
/// than written, so that two names the proxy tells apart are one to the server. It cuts a name
/// at 63 bytes after converting it to its own encoding, where a byte of a single-byte client
/// encoding's may become up to three (`€` in WIN1252): a byte past ASCII counts three.
pub fn name_may_be_cut(name: &str) -> bool {
    name.bytes().map(|b| if b < 0x80 { 1 } else { 3 }).sum::<usize>() > MAX_NAME
}

/// ON CONFLICT DO UPDATE in the parse tree's OnConflictAction enum.
const ONCONFLICT_UPDATE: i64 = 3;

fn note_function(c: &mut Classification, name: String) {
    if SIDE_EFFECTS.contains(&name.rsplit('.').next().unwrap_or(&name)) {
        c.kinds.insert(Kind::SideEffect);
    }
    insert_function(&mut c.functions, name);
}

/// Built-in functions that do what another does under its name, and that name: a rule listing
/// `pg_read_file` means its old twin too, and `pg_ls_dir` the functions that list one directory.
const FUNCTION_TWINS: [(&str, &str); 14] = [
    ("pg_read_file_old", "pg_read_file"),
    ("pg_file_read", "pg_read_file"),
    ("pg_read_binary_file", "pg_read_file"),
    ("pg_sleep_for", "pg_sleep"),
    ("pg_sleep_until", "pg_sleep"),
    ("pg_ls_summariesdir", "pg_ls_dir"),
    ("pg_logdir_ls", "pg_ls_dir"),
    ("pg_ls_logdir", "pg_ls_dir"),
    ("pg_ls_waldir", "pg_ls_dir"),
    ("pg_ls_tmpdir", "pg_ls_dir"),
    ("pg_ls_archive_statusdir", "pg_ls_dir"),
    ("pg_ls_replslotdir", "pg_ls_dir"),
    ("pg_ls_logicalsnapdir", "pg_ls_dir"),
    ("pg_ls_logicalmapdir", "pg_ls_dir"),
];

/// Adds a called function's name (lower-cased, as written) and, for a twin, the name it stands
/// for, with the same schema.
fn insert_function(set: &mut BTreeSet<String>, name: String) {
    let (schema, last) = name.rsplit_once('.').map_or(("", name.as_str()), |(s, l)| (s, l));
    if let Some((_, canonical)) = FUNCTION_TWINS.iter().find(|(twin, _)| *twin == last) {
        set.insert(if schema.is_empty() { canonical.to_string() } else { format!("{schema}.{canonical}") });
    }
    set.insert(name);
}

/// Whether a WHERE clause (or a join condition) can pick rows: it names a column somewhere, or
/// is `CURRENT OF` a cursor. `WHERE true`, `WHERE 1 = 1` and `WHERE $1` do not, nor a `*`
/// (`WHERE EXISTS (SELECT * FROM t)`, `WHERE t.* IS NOT NULL`), which names no column.
fn restricts(clause: Option<&Value>) -> bool {
    let Some(clause) = clause.filter(|c| !c.is_null()) else { return false };
    let mut found = false;
    visit(clause, |_, key, child| {
        found |= match key {
            "ColumnRef" => child
                .get("fields")
                .and_then(Value::as_array)
                .and_then(|f| f.last())
                .is_some_and(|last| last.pointer("/node/String").is_some()),
            "CurrentOfExpr" => true,
            _ => false,
        }
    });
    found
}

/// A MERGE is also of the kinds of what its WHEN clauses do. An UPDATE or DELETE clause
/// changes every row it reaches when neither its own condition nor (for rows matched with the
/// source) the join condition names a column; one for rows `NOT MATCHED BY SOURCE` reaches
/// every target row the source lacks, whatever the join condition.
fn merge_actions(merge: &Value, c: &mut Classification) {
    // CmdType and MergeMatchKind in the parse tree's enums.
    const CMD_UPDATE: i64 = 3;
    const CMD_INSERT: i64 = 4;
    const CMD_DELETE: i64 = 5;
    const MATCHED: i64 = 1;
    let join = restricts(merge.get("join_condition"));
    let clauses = merge.get("merge_when_clauses").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for clause in clauses.iter().filter_map(|w| w.pointer("/node/MergeWhenClause")) {
        let kind = match clause.get("command_type").and_then(Value::as_i64) {
            Some(CMD_UPDATE) => Kind::Update,
            Some(CMD_INSERT) => Kind::Insert,
            Some(CMD_DELETE) => Kind::Delete,
            _ => continue,
        };
        c.kinds.insert(kind);
        let by_join = join && clause.get("match_kind").and_then(Value::as_i64) == Some(MATCHED);
        if kind != Kind::Insert && !by_join && !restricts(clause.get("condition")) {
            c.where_missing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<&'static str> {
        classify(sql).kinds.iter().map(|k| k.as_str()).collect()
    }

    #[test]
    fn copy_from_stdin_is_counted() {
        assert_eq!(classify("COPY orders FROM STDIN").copy_in, 1);
        assert_eq!(classify("SELECT 1; copy orders (id) from stdin with (format csv); COPY t FROM STDIN").copy_in, 2);
        assert_eq!(classify("COPY orders FROM '/tmp/x'").copy_in, 0);
        assert_eq!(classify("COPY orders FROM PROGRAM 'cat'").copy_in, 0);
        assert_eq!(classify("COPY orders TO STDOUT").copy_in, 0);
    }

    #[test]
    fn fetch_and_execute_return_rows_written_elsewhere() {
        assert!(classify("FETCH ALL FROM c").indirect && classify("EXPLAIN ANALYZE EXECUTE s").indirect);
        assert!(!classify("SELECT 1").indirect);
        assert!(classify("FETCH 2 FROM c").fetch && classify("fetch all in c").fetch);
        assert_eq!(
            classify("FETCH 2 FROM \"P1\"; FETCH ALL IN Cur").fetches_from,
            ["P1".to_string(), "cur".into()].into()
        );
        assert!(!classify("MOVE 2 IN c").fetch && classify("MOVE 2 IN c").indirect);
        assert!(!classify("SELECT 1").fetch && !classify("EXECUTE s").fetch);
    }

    #[test]
    fn executed_statements_are_named() {
        let e = |sql: &str| classify(sql).executes.into_iter().collect::<Vec<_>>();
        assert_eq!(e("EXECUTE s1"), ["s1"]);
        assert_eq!(e("EXECUTE \"S_1\"(1, 'x'); EXPLAIN ANALYZE EXECUTE s2"), ["S_1", "s2"]);
        assert_eq!(e("CREATE TABLE t AS EXECUTE s3"), ["s3"]);
        assert_eq!(classify("PREPARE p1 AS SELECT 1; PREPARE \"P2\"(int) AS SELECT $1").prepares.len(), 2);
        assert!(e("SELECT 1").is_empty());
    }

    #[test]
    fn deallocations_are_named() {
        let d = |sql: &str| classify(sql).deallocates;
        let names = |n: &[&str]| Deallocates::Names(n.iter().map(|s| s.to_string()).collect());
        assert_eq!(d("SELECT 1"), Deallocates::None);
        assert_eq!(d("DEALLOCATE s1"), names(&["s1"]));
        assert_eq!(d("DEALLOCATE PREPARE \"S_1\"; deallocate s2"), names(&["S_1", "s2"]));
        assert_eq!(d("DEALLOCATE ALL"), Deallocates::All);
        assert_eq!(d("deallocate prepare all; DEALLOCATE s1"), Deallocates::All);
        assert_eq!(d("DISCARD ALL"), Deallocates::All);
        assert_eq!(d("DISCARD PLANS"), Deallocates::None);
        assert_eq!(d("DISCARD TEMP"), Deallocates::None);
    }

    #[test]
    fn plain_statements() {
        assert_eq!(kinds("SELECT 1"), ["select"]);
        assert_eq!(kinds("select * from orders where id = 1"), ["select"]);
        assert_eq!(kinds("INSERT INTO t VALUES (1)"), ["insert"]);
        assert_eq!(kinds("INSERT INTO t SELECT * FROM secret"), ["select", "insert"]);
        assert_eq!(kinds("DROP TABLE orders"), ["ddl"]);
        assert_eq!(kinds("SELECT * INTO orders_copy FROM orders"), ["select", "ddl"]);
        assert_eq!(kinds("SELECT 1 INTO TEMP t"), ["select", "ddl"]);
        assert_eq!(kinds("SELECT * INTO loot FROM orders UNION SELECT * FROM orders"), ["select", "ddl"]);
        assert_eq!(kinds("CREATE INDEX i ON t (a)"), ["ddl"]);
        assert_eq!(kinds("ALTER TABLE t ADD COLUMN b int"), ["ddl"]);
        assert_eq!(kinds("TRUNCATE t"), ["truncate"]);
        assert_eq!(kinds("BEGIN"), ["transaction"]);
        assert_eq!(kinds("SET search_path = x"), ["set"]);
        assert_eq!(kinds("SHOW work_mem"), ["show"]);
        assert_eq!(kinds("GRANT SELECT ON t TO bob"), ["grant"]);
        assert_eq!(kinds("VACUUM t"), ["other"]);
        assert_eq!(kinds("DO $$ BEGIN DELETE FROM t WHERE id = 1; END $$"), ["delete", "do"]);
        assert_eq!(kinds("CALL p()"), ["call"]);
    }

    #[test]
    fn hidden_statements_are_found() {
        assert_eq!(kinds("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d"), ["select", "delete"]);
        assert_eq!(kinds("EXPLAIN ANALYZE DELETE FROM orders"), ["delete"]);
        assert_eq!(kinds("PREPARE p AS UPDATE t SET a = 1"), ["update", "prepare"]);
        assert_eq!(kinds("EXECUTE p"), ["execute"]);
        assert_eq!(kinds("COPY (SELECT * FROM t) TO STDOUT"), ["select", "copy"]);
        assert_eq!(kinds("COPY t FROM PROGRAM 'curl x'"), ["insert", "copy_program"]);
        assert_eq!(kinds("DECLARE c CURSOR FOR SELECT * FROM t"), ["select"]);
        assert_eq!(kinds("CREATE TABLE x AS SELECT * FROM t"), ["select", "ddl"]);
        assert_eq!(kinds("SELECT 1; DROP TABLE t"), ["select", "ddl"]);
        assert_eq!(kinds("/* DROP TABLE t */ SELECT 1 -- ; DELETE FROM t"), ["select"]);
        assert_eq!(kinds("SELECT $x$; DROP TABLE t; $x$"), ["select"]);
    }

    #[test]
    fn do_blocks_are_looked_into() {
        let c = classify(
            "DO $body$ DECLARE r record; a int[]; n int := (SELECT max(id) FROM orders); c CURSOR FOR SELECT * FROM people; \
             BEGIN IF n > (SELECT count(*) FROM t2) THEN DELETE FROM t3; END IF; \
             SELECT count(*) INTO n FROM t4; n := n + (SELECT 1 FROM t5); a[(SELECT 2 FROM t6)] := 1; \
             PERFORM pg_sleep(1); FOR r IN SELECT * FROM t7 LOOP CALL p(r.id); END LOOP; \
             RAISE NOTICE '%', (SELECT 1 FROM t8); \
             EXCEPTION WHEN others THEN UPDATE t9 SET a = 1 WHERE b; END $body$",
        );
        fn names(s: &BTreeSet<String>) -> Vec<&str> {
            s.iter().map(String::as_str).collect()
        }
        assert_eq!(names(&c.tables), ["orders", "people", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"]);
        assert_eq!(
            c.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["select", "update", "delete", "call", "do"]
        );
        assert_eq!(names(&c.functions), ["count", "max", "p", "pg_sleep"]);
        assert!(c.where_missing, "the DELETE has no WHERE");
        assert!(c.parse_error.is_none(), "{c:?}");
        // In a string with other statements, and in a body of plain quotes.
        assert_eq!(kinds("SELECT 1; do 'begin insert into t values (1); end'"), ["select", "insert", "do"]);
        assert_eq!(kinds("DO LANGUAGE plpgsql $$ BEGIN DROP TABLE t; END $$"), ["ddl", "do"]);
        assert_eq!(kinds("DO $$ BEGIN END $$"), ["do"]);
        // A block inside a block.
        assert_eq!(kinds("DO $a$ BEGIN DO $b$ BEGIN TRUNCATE t; END $b$; END $a$"), ["truncate", "do"]);
        assert_eq!(kinds("DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$"), ["insert", "do", "transaction"]);
        // Cursors are portals: all the proxy knew of portals is stale after the block.
        let c = classify("DO $$ DECLARE c refcursor := 'p1'; BEGIN OPEN c FOR SELECT 1; END $$");
        assert_eq!((c.cursors, c.parse_error), (Deallocates::All, None));
        assert!(classify("DO $$ BEGIN PERFORM query_to_xml('SELECT 1', true, true, ''); END $$").reads.runs_sql);
        // Default values of other row types are seen, one way or the other.
        for ty in ["orders", "orders%ROWTYPE", "public.orders%rowtype"] {
            let c = classify(&format!("DO $$ DECLARE r {ty} := (SELECT o FROM secret o); BEGIN END $$"));
            assert!(c.tables.contains("secret") || c.kinds.contains(&Kind::Unparseable), "{ty}: {c:?}");
        }
        // What is known stays known when the block is refused: a deny rule may still name it.
        assert_eq!(kinds("DO $$ BEGIN DELETE FROM t; EXECUTE 'x'; END $$"), ["select", "delete", "do", "unparseable"]);
    }

    #[test]
    fn do_blocks_that_cannot_be_looked_into_are_unparseable() {
        for (sql, why) in [
            ("DO $$ BEGIN EXECUTE 'DROP TABLE ' || 't'; END $$", "dynamic SQL"),
            ("DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP END LOOP; END $$", "dynamic SQL"),
            ("DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT 1'; END $$", "dynamic SQL"),
            ("DO LANGUAGE plpython3u $$ plpy.execute('DROP TABLE t') $$", "language plpython3u"),
            ("DO $$ BEGIN SELEC 1; END $$", "DO block"),
            ("DO $$ BEGIN PREPARE p AS SELECT 1; END $$", "prepares"),
            ("DO $$ BEGIN SET standard_conforming_strings = off; END $$", "standard_conforming_strings"),
            ("DO $a$ BEGIN DO $b$ BEGIN DO $c$ BEGIN DO $d$ BEGIN END $d$; END $c$; END $b$; END $a$", "nested"),
            // No body at all: libpg_query would abort the process.
            ("DO LANGUAGE plpgsql", "exactly one body"),
            ("DO 'BEGIN END' 'BEGIN END'", "exactly one body"),
            ("DO LANGUAGE \"PLPGSQL\" 'BEGIN END'", "language PLPGSQL"),
            // libpg_query leaves a record variable's default value out of what it shows.
            (
                "DO $$ DECLARE r record := ROW(set_config('standard_conforming_strings', 'off', false)); BEGIN END $$",
                "record or composite",
            ),
            ("DO $$ DECLARE n int; \"R\"\"x\" record = (SELECT o FROM orders o); BEGIN END $$", "record or composite"),
            ("DO $$ BEGIN DECLARE r record DEFAULT NULL; BEGIN END; END $$", "record or composite"),
            // A word `begin` inside an earlier declaration is not the block's BEGIN.
            (
                "DO $$ DECLARE n int := (SELECT 1 AS begin); r record := ROW(set_config('a.b', 'c', false)); BEGIN END $$",
                "record or composite",
            ),
            ("DO $$ DECLARE n int := 1 begin; r record := ROW(1); BEGIN END $$", "record or composite"),
            (&format!("DO $$ BEGIN {} END $$", "PERFORM 1; ".repeat(MAX_DO_STATEMENTS + 1)), "more than"),
        ] {
            let c = classify(sql);
            assert!(c.kinds.contains(&Kind::Unparseable), "{sql}: {c:?}");
            let e = c.parse_error.unwrap_or_default();
            assert!(e.contains(why), "{sql}: {e}");
        }
    }

    #[test]
    fn where_and_tables() {
        let c = classify("DELETE FROM public.Orders");
        assert!(c.where_missing);
        assert!(c.tables.contains("public.orders"), "{c:?}");
        assert!(!classify("DELETE FROM orders WHERE id = 1").where_missing);
        assert!(classify("UPDATE t SET a = 1").where_missing);
        assert!(classify("WITH x AS (UPDATE t SET a = 1 RETURNING 1) SELECT 1").where_missing);
        // A WHERE that names no column picks every row.
        for sql in [
            "DELETE FROM t WHERE true",
            "UPDATE t SET a = 1 WHERE 1 = 1",
            "DELETE FROM t WHERE $1",
            "DELETE FROM t WHERE now() > '2000-01-01'",
            // A `*` names no column.
            "DELETE FROM orders WHERE EXISTS (SELECT * FROM orders)",
            "DELETE FROM orders WHERE orders.* IS NOT NULL",
            "UPDATE t SET a = 1 WHERE (SELECT count(*) FROM t) > 0",
        ] {
            assert!(classify(sql).where_missing, "{sql}");
        }
        for sql in [
            "UPDATE t SET a = 1 WHERE CURRENT OF c",
            "DELETE FROM t WHERE id = $1",
            "DELETE FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id)",
        ] {
            assert!(!classify(sql).where_missing, "{sql}");
        }
        // Quoted names keep their case: "ORDERS" is not orders; a dot or quote in a part keeps
        // it quoted, so "a.b" is not table b of schema a.
        let c = classify(r#"SELECT * FROM "ORDERS", Foo, "Public"."X", "a.b", s."x""y""#);
        assert_eq!(
            c.tables.iter().map(String::as_str).collect::<Vec<_>>(),
            ["\"a.b\"", "ORDERS", "Public.X", "foo", "s.\"x\"\"y\""]
        );
        for (name, last) in [
            ("public.orders", "orders"),
            ("orders", "orders"),
            ("s.\"a.b\"", "\"a.b\""),
            ("\"x\"\"y\"", "\"x\"\"y\""),
            ("\"a.\"\"b\".c", "c"),
            ("s.\"a\"\".b\"", "\"a\"\".b\""),
        ] {
            assert_eq!(last_part(name), last, "{name}");
        }
        let c = classify("SELECT * FROM a JOIN b ON true WHERE a.id IN (SELECT id FROM c)");
        assert_eq!(c.tables.iter().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(classify("SELECT 1; SELECT 2").statements, 2);
    }

    #[test]
    fn upserts_and_merges_are_of_the_kinds_of_what_they_do() {
        assert_eq!(kinds("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 1"), ["insert", "update"]);
        assert_eq!(kinds("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING"), ["insert"]);
        // Its conflict target restricts it, as a join condition does a MERGE's (README).
        assert!(!classify("INSERT INTO t SELECT * FROM t ON CONFLICT (id) DO UPDATE SET a = 1").where_missing);
        let merge = "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE \
                     WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id) \
                     WHEN MATCHED THEN DO NOTHING";
        let c = classify(merge);
        assert_eq!(c.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(), ["insert", "update", "delete", "merge"]);
        assert!(!c.where_missing, "the join condition picks the rows");
        assert_eq!(
            kinds("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (1)"),
            ["insert", "merge"]
        );
        // Every row: a join condition that names no column, or rows the source lacks.
        for sql in [
            "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
            "MERGE INTO t USING s ON 1 = 1 WHEN MATCHED AND true THEN UPDATE SET a = 1",
            "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
        ] {
            assert!(classify(sql).where_missing, "{sql}");
        }
        assert!(!classify("MERGE INTO t USING s ON true WHEN MATCHED AND t.old THEN DELETE").where_missing);
        assert!(
            !classify("MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE AND t.old THEN DELETE")
                .where_missing
        );
    }

    #[test]
    fn built_ins_that_change_state_are_side_effects() {
        for sql in [
            "SELECT setval('orders_id_seq', 1)",
            "SELECT lo_unlink(16400)",
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_stat_activity",
            "SELECT \"PG_CANCEL_BACKEND\"(1)",
            "SELECT (pid).pg_terminate_backend FROM pg_stat_activity",
            "SELECT * FROM dblink('dbname=orders', 'DELETE FROM orders RETURNING id') AS d(id int)",
            "SELECT dblink_exec('dbname=orders', 'DROP TABLE orders')",
            "SELECT pg_reload_conf()",
            "WITH x AS (SELECT 1) SELECT pg_notify('jobs', 'run')",
            "BEGIN; SELECT pg_advisory_xact_lock(1)",
            "SELECT brin_summarize_new_values('acc_brin')",
            "SELECT brin_desummarize_range('acc_brin', 0)",
            "SELECT gin_clean_pending_list('idx')",
            "SELECT heap_force_kill('accounts'::regclass, ARRAY['(0,4)']::tid[])",
            "SELECT public.heap_force_freeze('accounts'::regclass, ARRAY['(0,4)']::tid[])",
            "SELECT pg_truncate_visibility_map('accounts')",
            "SELECT pg_rotate_logfile_old()",
        ] {
            assert!(classify(sql).kinds.contains(&Kind::SideEffect), "{sql}");
        }
        // A FROM item's derived name (`coalesce`) that is also a table's alias elsewhere.
        let w = "LEFT JOIN (SELECT FROM orders AS \"coalesce\" LIMIT 0) s ON true";
        for sql in [
            format!("SELECT \"coalesce\".lo_create FROM COALESCE(777001::oid) {w}"),
            format!("SELECT \"coalesce\".lo_unlink FROM COALESCE(16402::oid) {w}"),
            "SELECT \"nullif\".lo_unlink FROM NULLIF(16402::oid, 0) LEFT JOIN orders \"nullif\" ON true".to_string(),
            "SELECT o.lo_unlink FROM CAST(16402 AS oid) LEFT JOIN orders o ON true".to_string(),
        ] {
            assert!(classify(&sql).kinds.contains(&Kind::SideEffect), "{sql}");
        }
        assert!(!classify("SELECT j.schedule FROM cron.job j, unnest(ARRAY[1]) u").kinds.contains(&Kind::SideEffect));
        // Built-ins under another name count as the function a rule would list.
        let c = classify("SELECT pg_read_file_old('/etc/hostname', 0, 100)");
        assert!(c.functions.contains("pg_read_file") && c.functions.contains("pg_read_file_old"), "{c:?}");
        let c = classify("SELECT * FROM pg_catalog.pg_ls_waldir()");
        assert!(c.functions.contains("pg_catalog.pg_ls_dir"), "{c:?}");
        let c = classify("SELECT x.pg_read_file_old FROM unnest(ARRAY['/etc/hostname']) x");
        assert!(c.maybe_functions.contains("pg_read_file"), "{c:?}");
        for sql in ["SELECT nextval('orders_id_seq')", "SELECT lower(name), pg_sleep(0) FROM t", "SELECT lo_get(16400)"]
        {
            assert!(!classify(sql).kinds.contains(&Kind::SideEffect), "{sql}");
        }
        assert_eq!("side_effect".parse::<Kind>(), Ok(Kind::SideEffect));
    }

    #[test]
    fn shapes_ignore_literals_but_not_structure() {
        let a = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 42;").unwrap();
        assert_eq!(Some(a.clone()), shape("SELECT abalance\n  FROM pgbench_accounts WHERE aid = 77;"));
        assert_eq!(shape("SELECT * FROM t WHERE e = 'a@b'"), shape("SELECT * FROM t WHERE e = 'x'"));
        assert_ne!(Some(a), shape("SELECT abalance FROM pgbench_accounts WHERE aid = $1;"));
        assert_ne!(shape("SELECT * FROM t1"), shape("SELECT * FROM t2"), "identifiers are kept");
        assert_ne!(shape("DELETE FROM t WHERE id = 1"), shape("DELETE FROM t"));
        assert_ne!(
            shape("DO $$ BEGIN DELETE FROM t WHERE a = 1; END $$"),
            shape("DO $$ BEGIN DELETE FROM t; END $$"),
            "a DO block's body is a string that matters"
        );
        assert_ne!(shape("SELECT 1; DO 'BEGIN END'"), shape("SELECT 1; DO 'BEGIN DROP TABLE t; END'"));
        assert_ne!(shape("/* x */ DO 'BEGIN END'"), shape("/* x */ DO 'BEGIN DROP TABLE t; END'"));
        assert_eq!(
            shape("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING"),
            shape("INSERT INTO t VALUES (2) ON CONFLICT DO NOTHING"),
            "DO elsewhere than a statement's start is no block"
        );
        assert_ne!(
            shape("COPY t TO STDOUT (FORMAT 'csv')"),
            shape("COPY t TO STDOUT (FORMAT 'binary')"),
            "COPY options are strings that matter"
        );
        assert_ne!(shape("SELECT 1; DROP TABLE t"), shape("SELECT 1"));
        for (x, y) in
            [("SELECT 1 -- c", "SELECT 2 -- c"), ("SELECT $$a$$", "SELECT $$b$$"), ("SELECT 1.5e3", "SELECT 2.5e3")]
        {
            assert_eq!(shape(x), shape(y), "{x} / {y}");
            assert_eq!(classify(x), classify(y));
        }
    }

    #[test]
    fn functions_are_found_anywhere() {
        let c = classify(
            "WITH x AS (SELECT pg_catalog.pg_sleep(1)) SELECT lower(name), (SELECT now()) FROM t WHERE f(1) > 0",
        );
        let f: Vec<&str> = c.functions.iter().map(String::as_str).collect();
        assert_eq!(f, ["f", "lower", "now", "pg_catalog.pg_sleep"]);
        // CALL names its procedure in a FuncCall the grammar does not wrap as a node.
        let c = classify("CALL ops.purge(lower('x'))");
        let f: Vec<&str> = c.functions.iter().map(String::as_str).collect();
        assert_eq!(f, ["lower", "ops.purge"]);
        // set_config is SET, wherever it is called.
        for sql in [
            "SELECT set_config('role', 'admin', false)",
            "SELECT 1 WHERE pg_catalog.set_config('a.b', 'c', true) > ''",
            // The server takes the database's name before the schema too.
            "SELECT orders.pg_catalog.set_config('role', 'postgres', false)",
            "SELECT \"PG_CATALOG\".set_config('role', 'postgres', false)",
        ] {
            assert!(classify(sql).kinds.contains(&Kind::Set), "{sql}");
        }
        // A function of another schema by that name is not the built-in.
        assert!(!classify("SELECT app.set_config('a', 'b', false)").kinds.contains(&Kind::Set));
    }

    #[test]
    fn drop_and_comment_name_their_relations() {
        let tables = |sql: &str| classify(sql).tables.into_iter().collect::<Vec<_>>();
        assert_eq!(tables("DROP TABLE orders"), ["orders"]);
        assert_eq!(tables("DROP TABLE IF EXISTS db.public.orders, \"A.b\" CASCADE"), ["\"A.b\"", "public.orders"]);
        assert_eq!(tables("DROP VIEW v; DROP MATERIALIZED VIEW m; DROP SEQUENCE s"), ["m", "s", "v"]);
        assert_eq!(tables("DROP INDEX CONCURRENTLY orders_pkey"), ["orders_pkey"]);
        assert_eq!(tables("DROP FOREIGN TABLE f"), ["f"]);
        // Policies, triggers and rules: the table they are on.
        assert_eq!(tables("DROP POLICY p ON public.orders"), ["public.orders"]);
        assert_eq!(tables("DROP TRIGGER audit ON orders"), ["orders"]);
        assert_eq!(tables("DROP RULE r ON orders"), ["orders"]);
        assert_eq!(tables("COMMENT ON TABLE orders IS 'x'"), ["orders"]);
        assert_eq!(tables("COMMENT ON COLUMN public.orders.note IS 'x'"), ["public.orders"]);
        assert_eq!(tables("COMMENT ON CONSTRAINT c ON orders IS 'x'"), ["orders"]);
        assert_eq!(tables("SECURITY LABEL ON TABLE orders IS 'x'"), ["orders"]);
        // Objects that are not relations name none.
        assert!(tables("DROP FUNCTION f(int); DROP TYPE t; COMMENT ON SCHEMA s IS 'x'").is_empty());
    }

    #[test]
    fn statements_on_objects_beyond_tables_are_marked() {
        for sql in [
            "DROP FUNCTION f(int)",
            "CREATE EXTENSION dblink",
            "ALTER ROLE app SUPERUSER",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO x",
            "GRANT EXECUTE ON FUNCTION f() TO x",
            "VACUUM",
            "CLUSTER",
            "LOAD 'auto_explain'",
            "SELECT 1; DROP SCHEMA s CASCADE",
            "DO $$ BEGIN DROP FUNCTION f(); END $$",
        ] {
            assert!(classify(sql).beyond_tables, "{sql}");
        }
        for sql in [
            "SELECT * FROM orders",
            "SELECT now()",
            "DELETE FROM orders WHERE id = 1",
            "DROP TABLE orders",
            "DROP TRIGGER t ON orders",
            "CREATE TABLE scratch (a int)",
            "ALTER TABLE scratch ADD COLUMN b int",
            "CREATE INDEX ON scratch (a)",
            "GRANT SELECT ON scratch TO x",
            "VACUUM scratch",
            "TRUNCATE scratch",
            "LOCK TABLE scratch",
            "SET search_path = public",
        ] {
            assert!(!classify(sql).beyond_tables, "{sql}");
        }
    }

    #[test]
    fn copies_to_server_files_and_function_twins() {
        assert_eq!(
            kinds("COPY (SELECT 'x') TO '/var/lib/postgresql/15/main/postgresql.auto.conf'"),
            ["select", "copy_file"]
        );
        assert_eq!(kinds("COPY orders FROM '/etc/passwd'"), ["insert", "copy_file"]);
        assert_eq!(kinds("COPY orders TO PROGRAM 'sh'"), ["copy_program"]);
        assert_eq!(kinds("COPY orders TO STDOUT"), ["copy"]);
        assert_eq!(kinds("COPY orders FROM STDIN"), ["insert", "copy"]);
        for (sql, canonical) in [
            ("SELECT convert_from(pg_read_binary_file('/etc/passwd'), 'UTF8')", "pg_read_file"),
            ("SELECT pg_catalog.pg_sleep_for('1 hour')", "pg_catalog.pg_sleep"),
            ("SELECT pg_sleep_until(now() + '1 hour')", "pg_sleep"),
        ] {
            assert!(classify(sql).functions.contains(canonical), "{sql}");
        }
    }

    #[test]
    fn role_membership_and_foreign_imports_are_not_other() {
        assert_eq!(kinds("IMPORT FOREIGN SCHEMA remote FROM SERVER s INTO public"), ["ddl"]);
        assert_eq!(kinds("REASSIGN OWNED BY app TO evil"), ["ddl"]);
        for sql in [
            "ALTER GROUP g ADD USER u",
            "ALTER GROUP g DROP USER u",
            "CREATE ROLE r IN ROLE g",
            "CREATE ROLE r ADMIN a",
        ] {
            assert_eq!(kinds(sql), ["ddl", "grant"], "{sql}");
        }
        assert_eq!(kinds("CREATE ROLE r LOGIN"), ["ddl"]);
    }

    #[test]
    fn shapes_keep_what_changes_meaning() {
        assert_eq!(shape("SELECT * FROM U&\"!0073ecrets\" UESCAPE '#'"), None, "unicode escapes are not cached");
        assert_ne!(shape("COPY t (a) TO STDOUT (HEADER 0)"), shape("COPY t (a) TO STDOUT (HEADER 1)"));
        assert!(!classify("COPY t (a) TO STDOUT (FORMAT csv, HEADER 0)").copy_out[0].header);
        assert!(!classify("COPY t (a) TO STDOUT (FORMAT csv, HEADER 'Off')").copy_out[0].header);
        assert!(classify("COPY t (a) TO STDOUT (FORMAT csv, HEADER)").copy_out[0].header);
        let c = classify("COPY (SELECT ssn FROM t UNION SELECT ssn FROM u) TO STDOUT");
        assert_eq!(c.copy_out[0].columns, None, "a UNION's names are unknown");
        for sql in [
            "SET standard_conforming_strings = off",
            "SET SESSION client_encoding TO 'SJIS'",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SELECT set_config(current_user, 'off', false)",
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "WITH x AS (UPDATE pg_catalog.pg_settings SET setting = 'off' WHERE name = 'x' RETURNING 1) SELECT 1",
        ] {
            assert!(classify(sql).kinds.contains(&Kind::Unparseable), "{sql}");
        }
        assert!(!classify("SELECT set_config('application_name', 'x', false)").kinds.contains(&Kind::Unparseable));
        assert!(!classify("SET search_path = public").kinds.contains(&Kind::Unparseable));
        assert!(!classify("UPDATE settings SET v = 1 WHERE k = 'x'").kinds.contains(&Kind::Unparseable));
    }

    #[test]
    fn queries_run_from_text_are_looked_into() {
        let c =
            classify("SELECT query_to_xml('SELECT pg_terminate_backend(pid) FROM pg_stat_activity', true, true, '')");
        assert!(c.kinds.contains(&Kind::SideEffect) && c.functions.contains("pg_terminate_backend"), "{c:?}");
        assert!(c.tables.contains("pg_stat_activity"));
        let c = classify("SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery FROM vault')::text");
        assert!(c.tables.contains("vault") && !c.kinds.contains(&Kind::Unparseable), "{c:?}");
        assert!(classify("SELECT ts_stat('DELETE FROM t RETURNING v')").kinds.contains(&Kind::Delete));
        assert!(
            !classify("SELECT ts_rewrite('a'::tsquery, 'b'::tsquery, 'c'::tsquery)").kinds.contains(&Kind::Unparseable)
        );
        for sql in [
            "SELECT query_to_xml($1, true, true, '')",
            "SELECT query_to_xml('SELECT ' || 'pg_reload_conf()', true, true, '')",
            "SELECT query_to_xml('SELEC 1', true, true, '')",
            "SELECT ('SELECT pg_reload_conf()'::text).ts_stat",
            "SELECT x.ts_stat FROM unnest(ARRAY['SELECT pg_reload_conf()']) x",
        ] {
            assert!(classify(sql).kinds.contains(&Kind::Unparseable), "{sql}");
        }
        // The query is a literal the classifier reads: texts differing in it are not one shape.
        assert_ne!(
            shape("SELECT query_to_xml('SELECT 1', true, true, '')"),
            shape("SELECT query_to_xml('SELECT pg_reload_conf()', true, true, '')")
        );
        assert_ne!(shape("SELECT TS_STAT('SELECT 1')"), shape("SELECT TS_STAT('SELECT 2')"));
        // tablefunc: crosstab's queries are looked into; connectby's is built from its arguments.
        let c = classify(
            "SELECT * FROM crosstab('SELECT pg_terminate_backend(pid), 1, 1 FROM pg_stat_activity') t(a bool, b int, c int)",
        );
        assert!(c.kinds.contains(&Kind::SideEffect) && c.reads.runs_sql, "{c:?}");
        assert!(
            classify("SELECT * FROM crosstab('SELECT 1, 2, 3', 'DELETE FROM t RETURNING 1') t(a int, b int)")
                .kinds
                .contains(&Kind::Delete)
        );
        assert!(
            classify("SELECT * FROM connectby('t', 'id', 'parent', '1', 0) AS c(id int, p int, l int)")
                .kinds
                .contains(&Kind::Unparseable)
        );
        assert_ne!(shape("SELECT * FROM crosstab('SELECT 1')"), shape("SELECT * FROM crosstab('SELECT 2')"));
        // xml2's xpath_table pastes its arguments into the query it runs (several statements).
        for sql in [
            "SELECT * FROM xpath_table('id', 'customer', 'orders', '/a', 'true; DELETE FROM accounts; SELECT 1, ''<a/>''') \
             AS t(id int, a text)",
            "SELECT * FROM public.XPATH_TABLE('id', 'doc', 'docs', '/a', 'true') AS t(id int, a text)",
        ] {
            let c = classify(sql);
            assert!(c.kinds.contains(&Kind::Unparseable) && c.reads.runs_sql, "{sql}: {c:?}");
        }
    }

    #[test]
    fn what_may_make_a_session_read_write_is_flagged() {
        for sql in [
            "SET default_transaction_read_only = off",
            "SET SESSION default_transaction_read_only TO 'on'",
            "SET LOCAL transaction_read_only = false",
            "RESET default_transaction_read_only",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SELECT 1 WHERE pg_catalog.SET_CONFIG('Transaction_Read_Only', 'off', true) IS NULL",
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "DO $$ BEGIN PERFORM set_config('default_transaction_read_only', 'off', false); END $$",
        ] {
            assert!(classify(sql).read_write, "{sql}");
        }
        for sql in [
            "BEGIN",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION READ ONLY",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET statement_timeout = 0",
            "SELECT set_config('application_name', 'x', false)",
            "RESET ALL",
            "DISCARD ALL",
            "SELECT 'default_transaction_read_only'",
        ] {
            assert!(!classify(sql).read_write, "{sql}");
        }
    }

    #[test]
    fn copy_from_is_also_an_insert() {
        for sql in
            ["COPY orders FROM STDIN", "COPY orders (id) FROM '/tmp/x' WITH (FORMAT csv)", "COPY t FROM PROGRAM 'x'"]
        {
            assert!(classify(sql).kinds.contains(&Kind::Insert), "{sql}");
        }
        for sql in ["COPY orders TO STDOUT", "COPY (SELECT 1) TO STDOUT"] {
            assert!(!classify(sql).kinds.contains(&Kind::Insert), "{sql}");
        }
    }

    #[test]
    fn two_phase_commit_and_row_locks_are_kinds_of_their_own() {
        for sql in ["PREPARE TRANSACTION 'x'", "COMMIT PREPARED 'x'", "ROLLBACK PREPARED 'x'"] {
            let c = classify(sql);
            assert_eq!(c.kinds, BTreeSet::from([Kind::TwoPhase]), "{sql}");
        }
        assert_eq!("two_phase".parse::<Kind>(), Ok(Kind::TwoPhase));
        for sql in [
            "SELECT id FROM accounts FOR UPDATE",
            "SELECT id FROM accounts WHERE id = 1 FOR NO KEY UPDATE NOWAIT",
            "SELECT id FROM accounts FOR SHARE SKIP LOCKED",
            "SELECT id FROM accounts FOR KEY SHARE OF accounts",
            "SELECT * FROM (SELECT id FROM accounts FOR UPDATE) s",
            "WITH l AS (SELECT id FROM accounts FOR UPDATE) SELECT count(*) FROM l",
        ] {
            let c = classify(sql);
            assert!(c.kinds.contains(&Kind::Lock) && c.kinds.contains(&Kind::Select), "{sql}: {c:?}");
        }
        for sql in ["SELECT id FROM accounts", "COMMIT", "BEGIN", "SELECT 'FOR UPDATE'"] {
            assert!(!classify(sql).kinds.contains(&Kind::Lock), "{sql}");
        }
    }

    #[test]
    fn names_the_server_may_cut_elsewhere_are_refused() {
        assert!(!name_may_be_cut(&"a".repeat(63)) && name_may_be_cut(&"a".repeat(64)));
        assert!(!name_may_be_cut(&"é".repeat(10)) && name_may_be_cut(&"é".repeat(11)), "three per byte past ASCII");
        for sql in [
            format!("PREPARE \"{}\" AS SELECT 1", "é".repeat(11)),
            format!("EXECUTE \"{}\"", "é".repeat(11)),
            format!("DEALLOCATE \"{}\"", "é".repeat(11)),
            format!("DECLARE \"{}\" CURSOR FOR SELECT 1", "é".repeat(11)),
        ] {
            let c = classify(&sql);
            assert!(c.parse_error.is_some_and(|e| e.contains("cut short")), "{sql}");
        }
        assert!(!classify(&format!("PREPARE {} AS SELECT 1", "a".repeat(80))).kinds.contains(&Kind::Unparseable));
        // pg_query cut this one to its 61 ASCII bytes; a server converting from WIN1252 keeps more.
        let c = classify(&format!("PREPARE \"{}€\" AS SELECT 1", "a".repeat(61)));
        assert!(c.parse_error.is_some_and(|e| e.contains("cut short")));
    }

    #[test]
    fn two_part_names_may_be_calls() {
        let c = classify("SELECT x.pg_cancel_backend FROM unnest(ARRAY(SELECT pid FROM pg_stat_activity)) x");
        assert!(c.kinds.contains(&Kind::SideEffect) && c.maybe_functions.contains("pg_cancel_backend"), "{c:?}");
        for sql in [
            "SELECT unnest.pg_terminate_backend FROM unnest(ARRAY[1])",
            "SELECT x.pg_terminate_backend FROM unnest(ARRAY[1]) x, (SELECT 1 FROM x) s",
            "SELECT y.setval FROM t",
        ] {
            assert!(classify(sql).kinds.contains(&Kind::SideEffect), "{sql}");
        }
        // A column of a table of the statement, named like such a function, is a column.
        for sql in [
            "SELECT j.schedule FROM cron.job j",
            "SELECT cron.job.schedule FROM cron.job",
            "SELECT job.schedule FROM cron.job",
        ] {
            assert!(!classify(sql).kinds.contains(&Kind::SideEffect), "{sql}");
        }
        let c = classify("SELECT o.id, o.Total FROM orders o");
        assert_eq!(c.kinds.iter().collect::<Vec<_>>(), [&Kind::Select]);
        assert_eq!(c.maybe_functions.iter().map(String::as_str).collect::<Vec<_>>(), ["id", "total"]);
        assert!(c.functions.is_empty());
    }

    #[test]
    fn copy_out_shapes() {
        let c = classify("COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER); COPY t FROM STDIN; COPY u TO '/tmp/x'");
        assert_eq!(
            c.copy_out,
            vec![CopyOut {
                format: CopyFormat::Csv,
                delimiter: b',',
                header: true,
                unusual: None,
                columns: Some(vec!["a".into(), "b".into()]),
                query: false,
                tables: ["t".to_string()].into(),
                reads: Reads { columns: ["a".to_string(), "b".to_string()].into(), ..Reads::default() },
            }]
        );
        let c = classify("COPY (SELECT id, t.email, lower(name) AS n FROM t) TO STDOUT");
        assert_eq!(c.copy_out[0].columns, Some(vec!["id".into(), "email".into(), "n".into()]));
        assert!(c.copy_out[0].query);
        assert_eq!(c.copy_out[0].tables, ["t".to_string()].into());
        let c = classify("COPY (SELECT x FROM (SELECT a AS x FROM S1.Vault UNION SELECT b FROM u) s) TO STDOUT");
        assert_eq!(c.copy_out[0].tables, ["u".to_string(), "vault".to_string()].into());
        let c = classify("COPY people TO STDOUT");
        assert_eq!((c.copy_out[0].query, &c.copy_out[0].tables), (false, &["people".to_string()].into()));
        assert_eq!((c.copy_out[0].format, c.copy_out[0].delimiter), (CopyFormat::Text, b'\t'));
        let c = classify("COPY (SELECT *, 1 FROM t) TO STDOUT (FORMAT binary)");
        assert_eq!((c.copy_out[0].format, &c.copy_out[0].columns), (CopyFormat::Binary, &None));
        let c = classify("COPY t TO STDOUT (FORMAT csv, DELIMITER '|', QUOTE '\"')");
        assert_eq!((c.copy_out[0].delimiter, c.copy_out[0].unusual.as_deref()), (b'|', Some("quote")));
    }

    #[test]
    fn reads_name_columns_and_whole_rows() {
        let r = classify("SELECT x FROM (SELECT '' AS x UNION ALL SELECT lower(v.secret_num) FROM vault v) s").reads;
        let columns: Vec<&str> = r.columns.iter().map(String::as_str).collect();
        assert_eq!((columns, r.whole_rows), (vec!["secret_num", "x"], false));
        for sql in [
            "SELECT s.vault FROM (SELECT vault FROM vault) s",
            "SELECT row_to_json(v) FROM vault v",
            "SELECT * FROM vault UNION ALL SELECT * FROM vault",
            "SELECT (v).secret_num FROM vault v",
            "WITH c AS (SELECT 1 AS a) SELECT c FROM c",
            "SELECT b FROM vault AS v(a, b)",
            "WITH c(x) AS (SELECT secret_num FROM vault) SELECT x FROM c",
        ] {
            assert!(classify(sql).reads.whole_rows, "{sql}");
        }
        assert!(!classify("SELECT id, count(*) FROM vault GROUP BY id").reads.whole_rows);
        let r = classify("SELECT v.row_to_json, public.vault.id FROM public.vault AS V").reads;
        let q: Vec<(&str, &str)> = r.qualified.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(q, [("v", "row_to_json"), ("vault", "id")]);
        assert_eq!(r.aliases, [("v".to_string(), ["vault".to_string()].into())].into());
        let r = classify("SELECT v.f FROM (SELECT 1 FROM pg_class v) s, vault v").reads;
        assert_eq!(r.aliases["v"], ["pg_class".to_string(), "vault".to_string()].into());
        assert!(classify("SELECT pg_catalog.query_to_xml('select 1', true, false, '')").reads.runs_sql);
        assert!(classify("COPY (SELECT ts_rewrite('a'::tsquery, 'select 1')) TO STDOUT").copy_out[0].reads.runs_sql);
        let r = classify("SELECT j.row_to_json FROM (vault CROSS JOIN (SELECT 1) s) AS j").reads;
        assert_eq!(r.aliases["j"], ["vault".to_string()].into());
        assert!(classify("COPY vault (secret_num) TO STDOUT").copy_out[0].reads.columns.contains("secret_num"));
        let r = classify("SELECT x FROM vault a JOIN vault b USING (secret_num) AS x").reads;
        assert!(r.whole_rows && r.columns.contains("secret_num"));
        assert_eq!(classify("CLOSE ALL").cursors, Deallocates::All);
        let c = classify("CLOSE c; DECLARE d CURSOR FOR SELECT 1").cursors;
        assert_eq!(c, Deallocates::Names(["c".to_string(), "d".to_string()].into()));
        assert_eq!(classify("FETCH c").cursors, Deallocates::None);
        assert!(classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1").hold_cursor);
        assert!(!classify("DECLARE c CURSOR FOR SELECT 1").hold_cursor);
    }

    /// Classifies on a thread with the default 2 MiB stack, as a session's loop has.
    fn classify_on_small_stack(sql: String) -> Classification {
        std::thread::Builder::new().stack_size(2 << 20).spawn(move || classify(&sql)).unwrap().join().unwrap()
    }

    #[test]
    fn texts_nested_too_deep_to_parse_safely_are_refused_before_parsing() {
        // The first overflowed a 2 MiB stack in libpg_query before this check (the process
        // aborted); the others nest the same way through other constructs.
        for sql in [
            format!("SELECT {}1", "1+".repeat(50_000)),
            format!("SELECT {}1{}", "(SELECT ".repeat(3_000), ")".repeat(3_000)),
            format!("SELECT 1 {}", "UNION SELECT 1 ".repeat(20_000)),
            format!("{}SELECT 1, 1", "SELECT 1, 1 UNION ".repeat(20_000)),
            format!("{}SELECT 1 WHERE true", "SELECT 1 WHERE true AND true UNION ".repeat(20_000)),
            format!("SELECT 1 FROM t {}", "JOIN t t1 ON true AND true ".repeat(20_000)),
            format!("SELECT {}1{}", "CASE WHEN true THEN ".repeat(20_000), " END".repeat(20_000)),
            format!("DO $$ BEGIN {} NULL; {} END $$", "IF true THEN ".repeat(20_000), "END IF; ".repeat(20_000)),
            format!("DO $$ BEGIN {} NULL; {} END $$", "LOOP ".repeat(20_000), "END LOOP; ".repeat(20_000)),
        ] {
            let c = classify_on_small_stack(sql);
            assert!(c.kinds.contains(&Kind::Unparseable), "{c:?}");
        }
        // Long but flat texts are still looked into.
        let flat = [
            format!(
                "SELECT * FROM orders WHERE {}",
                (0..5_000).map(|i| format!("id = {i}")).collect::<Vec<_>>().join(" OR ")
            ),
            format!(
                "INSERT INTO orders VALUES {}",
                (0..5_000).map(|i| format!("({i}, 'x', {i}.5)")).collect::<Vec<_>>().join(", ")
            ),
            format!(
                "SELECT CASE {} END",
                (0..3_000).map(|i| format!("WHEN id = {i} THEN {i}")).collect::<Vec<_>>().join(" ")
            ),
            format!("DO $$ BEGIN {} END $$", "IF true THEN NULL; END IF; ".repeat(300)),
        ];
        for sql in flat {
            let c = classify_on_small_stack(sql.clone());
            assert!(!c.kinds.contains(&Kind::Unparseable), "{}: {:?}", &sql[..60], c.parse_error);
        }
    }

    #[test]
    fn texts_too_long_to_parse_cheaply_are_refused_before_parsing() {
        let elements = MAX_TOKENS / 2 + 1;
        for sql in [
            format!("SELECT {}", vec!["1"; elements].join(",")),
            format!("DO $$ BEGIN PERFORM {}; END $$", vec!["1"; elements].join(",")),
        ] {
            let c = classify(&sql);
            assert!(c.kinds.contains(&Kind::Unparseable), "{c:?}");
            assert!(c.parse_error.as_deref().is_some_and(|e| e.contains("50000 tokens")), "{:?}", c.parse_error);
        }
        assert!(!classify(&format!("SELECT {}", vec!["1"; elements - 3].join(","))).kinds.contains(&Kind::Unparseable));
        // Queries run from text count together with the text around them.
        let inner = vec!["1"; elements / 2].join(",");
        let c = classify(&format!(
            "SELECT query_to_xml('SELECT {inner}', true, false, ''), query_to_xml('SELECT {inner}', true, false, '')"
        ));
        assert!(c.parse_error.as_deref().is_some_and(|e| e.contains("queries it runs")), "{c:?}");
        let c = classify(&format!("SELECT query_to_xml('SELECT {inner}', true, false, '')"));
        assert!(!c.kinds.contains(&Kind::Unparseable), "{:?}", c.parse_error);
        // And a text too long even to scan cheaply is not scanned.
        let c = classify(&format!("SELECT '{}'", "x".repeat(MAX_TEXT_BYTES)));
        assert!(c.parse_error.as_deref().is_some_and(|e| e.contains("longer than 1 MiB")), "{:?}", c.parse_error);
    }

    #[test]
    fn calls_written_as_fields_are_named_as_functions() {
        for (sql, f) in [
            ("SELECT ('/etc/passwd'::text).pg_read_file", "pg_read_file"),
            ("SELECT (pid).pg_terminate_backend FROM pg_stat_activity", "pg_terminate_backend"),
            ("SELECT s.f.lo_import FROM (SELECT '/etc/x'::text f) s", "lo_import"),
        ] {
            assert!(classify(sql).functions.contains(f), "{sql}");
        }
        assert!(classify("SELECT o.id, o.total FROM orders o").functions.is_empty());
    }

    #[test]
    fn commits_and_rollbacks_end_the_transaction_begin_savepoint_and_release_do_not() {
        for keeps in ["BEGIN", "START TRANSACTION", "SAVEPOINT a", "RELEASE a", "RELEASE SAVEPOINT a"] {
            let c = classify(keeps);
            assert!(c.kinds.contains(&Kind::Transaction) && !c.ends_transaction, "{keeps}");
        }
        for ends in [
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "ROLLBACK TO a",
            "ROLLBACK TO SAVEPOINT a",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "COMMIT AND CHAIN",
            "SAVEPOINT a; COMMIT",
            "DO $$ BEGIN COMMIT; END $$",
        ] {
            assert!(classify(ends).ends_transaction, "{ends}");
        }
        assert!(classify("COPY (SELECT v.* FROM vault v) TO STDOUT").copy_out[0].reads.whole_rows);
    }

    #[test]
    fn unparseable_fails_closed() {
        let c = classify("SELEC 1");
        assert_eq!(c.kinds.iter().copied().collect::<Vec<_>>(), [Kind::Unparseable]);
        assert!(c.parse_error.is_some());
        assert_eq!(classify("").statements, 0);
        assert!(classify("").kinds.is_empty());
    }

    #[test]
    fn kinds_parse_from_policy_names() {
        for k in ALL_KINDS {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        }
        assert!("drop".parse::<Kind>().unwrap_err().contains("expected one of"));
    }
}
