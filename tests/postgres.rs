//! PostgreSQL enforcement end to end: a real PostgreSQL 15, the agent enforcing a test cgroup,
//! and real clients (psql, pgbench) that connect to the server's own address, unchanged.
mod common;

use common::{Env, PG_BIN, Postgres, privileged};

fn policy(env: &Env, pg: &Postgres) -> String {
    format!(
        r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: {name} }}
spec:
  unlisted: deny
  proxy: {{ listen: ["127.0.0.1:0", "[::1]:0"] }}
  identities:
    - {{ name: bot, cgroup: {cg}, groups: [agents] }}
  resources:
    - name: orders-db
      protocol: postgres
      address: "{addr}"
      credentials: {{ user: app, password_file: {secret} }}
  grants:
    - name: bot-orders
      to: [group:agents]
      resources: [orders-db]
      rules:
        - {{ name: no-ddl, match: {{ statements: [ddl] }}, action: deny, message: "schema changes go through review" }}
        - {{ name: delete-needs-where, match: {{ statements: [update, delete], where: missing }}, action: deny }}
        - {{ name: reads, match: {{ statements: [select, transaction, set, show] }}, action: allow }}
        - name: writes
          match: {{ statements: [insert, update, delete], tables: [orders, pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history] }}
          action: allow
      default: deny
"#,
        name = env.name,
        cg = env.cgroup("bot"),
        addr = pg.addr(),
        secret = pg.secret_file.display(),
    )
}

/// psql inside the bot cgroup, with the given URL user:password; SQL on stdin.
fn psql(env: &Env, pg: &Postgres, userinfo: &str, script: &str) -> (String, String, bool) {
    use std::io::Write;
    let url = format!("postgresql://{userinfo}@127.0.0.1:{}/postgres", pg.port);
    let cg = env.cgroup("bot");
    let mut child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &cg, "--", "psql", "-X", "-At", &url])
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.success(),
    )
}

/// pgbench (in the bot cgroup) against the server's own address; returns stdout and stderr.
fn pgbench(env: &Env, pg: &Postgres, args: &[&str]) -> (bool, String) {
    let port = pg.port.to_string();
    let bin = format!("{PG_BIN}/pgbench");
    let mut cmd = vec![bin.as_str()];
    cmd.extend_from_slice(args);
    cmd.extend_from_slice(&["-h", "127.0.0.1", "-p", &port, "-U", "bot", "postgres"]);
    let out = env.run_in("bot", &cmd);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

fn setup(name: &str) -> (Env, Postgres) {
    let pg = Postgres::start();
    pg.direct("CREATE TABLE orders (id int primary key, email text); INSERT INTO orders VALUES (1, 'a@example.com'), (2, 'b@example.com')");
    let mut env = Env::new(name);
    env.write_policy(&policy(&env, &pg));
    env.start_agent();
    (env, pg)
}

#[test]
fn psql_works_unchanged_with_any_password_and_guardrails_hold() {
    if !privileged("psql_works_unchanged_with_any_password_and_guardrails_hold") {
        return;
    }
    let (env, pg) = setup("pg-psql");

    // Wrong and missing passwords both work: the client is authenticated by its kernel identity.
    let (out, err, ok) = psql(&env, &pg, "bot:wrong", "SELECT count(*) FROM orders;");
    assert!(ok, "{err}");
    assert_eq!(out, "2");
    let (out, err, ok) = psql(&env, &pg, "whoever", "SELECT current_user;");
    assert!(ok, "{err}");
    assert_eq!(out, "app", "the proxy logs in upstream as the resource's user");

    // A denied statement gets 42501 naming the rule; the session stays usable.
    let (out, err, _) =
        psql(&env, &pg, "bot", "\\set VERBOSITY verbose\nDROP TABLE orders;\nSELECT count(*) FROM orders;");
    assert!(err.contains("42501") && err.contains("denied by rule \"no-ddl\""), "{err}");
    assert!(err.contains("schema changes go through review"), "{err}");
    assert_eq!(out, "2", "session still usable after a denial");

    // One query string with an allowed and a denied statement (psql -c sends it as one Query):
    // nothing of it runs.
    let url = format!("postgresql://bot@127.0.0.1:{}/postgres", pg.port);
    let out = env.run_in(
        "bot",
        &["psql", "-X", &url, "-c", "INSERT INTO orders VALUES (3, 'c@example.com'); DROP TABLE orders"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-ddl"), "{out:?}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2");

    // Hidden writes are found.
    let (_, err, _) = psql(&env, &pg, "bot", "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d;");
    assert!(err.contains("delete-needs-where"), "{err}");
    let (_, err, _) = psql(&env, &pg, "bot", "SELEC 1;");
    assert!(err.contains("\"unparseable\""), "{err}");
    // Allowed writes go through; inside a transaction the status is kept.
    let (out, err, ok) = psql(&env, &pg, "bot", "BEGIN;\nDROP TABLE orders;\nSELECT 1;\nROLLBACK;");
    assert!(!err.contains("current transaction is aborted"), "a denial must not abort the server's transaction: {err}");
    assert!(ok || out.contains('1'), "{out} {err}");
    let (_, err, ok) = psql(&env, &pg, "bot", "UPDATE orders SET email = 'z@example.com' WHERE id = 1;");
    assert!(ok, "{err}");
    assert_eq!(pg.direct("SELECT email FROM orders WHERE id = 1"), "z@example.com");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "the DROP never reached the server");

    let (_, err, _) = psql(&env, &pg, "bot", "SELECT * FROM nope;");
    assert!(err.contains("does not exist"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Every statement is on the trail, with its verdict and rule; the secret never is.
    let trail = std::fs::read_to_string(env.state_dir().join("audit/trail.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = trail.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let drop = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["statement"] == "DROP TABLE orders;")
        .expect("statement record for the DROP");
    assert_eq!((drop["verdict"].as_str(), drop["rule"].as_str()), (Some("deny"), Some("no-ddl")));
    assert_eq!((drop["identity"].as_str(), drop["resource"].as_str()), (Some("bot"), Some("orders-db")));
    assert_eq!((drop["database"].as_str(), drop["db_user"].as_str()), (Some("postgres"), Some("app")));
    assert_eq!(drop["statement_kinds"], serde_json::json!(["ddl"]));
    let read = records.iter().find(|r| r["kind"] == "statement" && r["verdict"] == "allow").unwrap();
    assert_eq!(read["rule"], "reads");
    // Each forwarded statement's outcome follows in a statement_result record.
    let result_of = |stmt: &str| {
        let s = records
            .iter()
            .find(|r| r["kind"] == "statement" && r["statement"].as_str().is_some_and(|t| t.starts_with(stmt)))
            .unwrap_or_else(|| panic!("no statement record for {stmt}"));
        records
            .iter()
            .find(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([s["seq"]]))
            .unwrap_or_else(|| panic!("no statement_result for {stmt}"))
            .clone()
    };
    assert_eq!(result_of("UPDATE orders")["count"], 1);
    assert!(result_of("SELECT * FROM nope")["error"].as_str().unwrap().contains("does not exist"));
    assert!(
        !records.iter().any(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([drop["seq"]])),
        "a denied statement has no server result"
    );
    assert!(!trail.contains(&pg.password), "the upstream password is in the audit trail");
    assert!(!env.log().contains(&pg.password), "the upstream password is in the agent's log");
    let verify = env.tollgate(&["audit", "verify", "--state-dir", &env.state_arg()]);
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn pgbench_simple_extended_and_prepared_through_the_proxy() {
    if !privileged("pgbench_simple_extended_and_prepared_through_the_proxy") {
        return;
    }
    let (env, pg) = setup("pg-bench");
    let init = std::process::Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-i", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "app", "postgres"])
        .env("PGPASSWORD", &pg.password)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    for mode in ["simple", "extended", "prepared"] {
        let (ok, text) = pgbench(&env, &pg, &["-n", "-M", mode, "-c", "2", "-t", "30"]);
        assert!(ok, "pgbench -M {mode}: {text}");
        assert!(text.contains("number of transactions actually processed: 60/60"), "pgbench -M {mode}: {text}");
        assert!(text.contains("number of failed transactions: 0"), "pgbench -M {mode}: {text}");
    }
    // The extended protocol is judged too: a denied Parse fails the batch and nothing runs.
    let script = env.dir.path().join("drop.sql");
    std::fs::write(&script, "DROP TABLE pgbench_history;\n").unwrap();
    let (_, text) = pgbench(&env, &pg, &["-n", "-M", "extended", "-t", "1", "-f", script.to_str().unwrap()]);
    assert!(text.contains("no-ddl"), "{text}");
    assert_eq!(pg.direct("SELECT count(*) FROM pg_tables WHERE tablename = 'pgbench_history'"), "1");
}

#[test]
fn cancel_request_reaches_the_right_backend() {
    if !privileged("cancel_request_reaches_the_right_backend") {
        return;
    }
    let (env, pg) = setup("pg-cancel");
    let url = format!("postgresql://bot@127.0.0.1:{}/postgres", pg.port);
    let child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "psql", "-X", &url, "-c", "SELECT pg_sleep(20)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // Wait until the statement is running on the server, then interrupt psql (exec made the
    // child psql itself), which sends a CancelRequest on a new, also redirected, connection.
    while pg.direct("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'") != "1" {
        assert!(started.elapsed().as_secs() < 10, "statement never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("canceling statement due to user request"), "{err}");
    assert!(started.elapsed().as_secs() < 15, "cancel did not take effect");
}

/// The second client library: tokio-postgres speaks only the extended protocol, prepares named
/// statements and pipelines queries. It runs in a child copy of this test binary, started in
/// the enrolled cgroup (the test process itself must not be enrolled).
#[test]
fn tokio_postgres_extended_protocol_through_the_proxy() {
    if !privileged("tokio_postgres_extended_protocol_through_the_proxy") {
        return;
    }
    let (env, pg) = setup("pg-tokio");
    let me = std::env::current_exe().unwrap();
    let url = format!("host=127.0.0.1 port={} user=bot password=wrong dbname=postgres", pg.port);
    let cg = env.cgroup("bot");
    let out = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &cg, "--"])
        .arg(&me)
        .args(["--exact", "tokio_postgres_client", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TOLLGATE_TEST_PG", &url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("CLIENT-OK"), "{text}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "3", "one allowed insert, nothing of the denied batch");
}

/// Run only by `tokio_postgres_extended_protocol_through_the_proxy`, inside the cgroup.
#[test]
#[ignore = "client half of tokio_postgres_extended_protocol_through_the_proxy"]
fn tokio_postgres_client() {
    let url = std::env::var("TOLLGATE_TEST_PG").expect("started by the parent test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("login through the proxy");
        tokio::spawn(conn);
        let by_id = client.prepare("SELECT email FROM orders WHERE id = $1").await.unwrap();
        // Pipelined: both queries are in flight at once.
        let (a, b) = tokio::join!(client.query_one(&by_id, &[&1i32]), client.query_one(&by_id, &[&2i32]));
        assert_eq!(a.unwrap().get::<_, String>(0), "a@example.com");
        assert_eq!(b.unwrap().get::<_, String>(0), "b@example.com");
        let n = client.execute("INSERT INTO orders VALUES ($1, $2)", &[&3i32, &"c@example.com"]).await.unwrap();
        assert_eq!(n, 1);
        let err = client.execute("DROP TABLE orders", &[]).await.expect_err("DDL must be denied");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
        assert!(err.to_string().contains("no-ddl") || format!("{err:?}").contains("no-ddl"), "{err:?}");
        // The session is still usable, statements prepared before the denial too.
        let row = client.query_one(&by_id, &[&3i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "c@example.com");
        let tx = client.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
        assert!(!tx.is_empty());
    });
    println!("CLIENT-OK");
}
