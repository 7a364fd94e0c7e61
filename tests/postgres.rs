//! PostgreSQL enforcement end to end: a real PostgreSQL 15, the agent enforcing a test cgroup,
//! and real clients (psql, pgbench) that connect to the server's own address, unchanged.
mod common;

use common::{Env, PG_BIN, Postgres, privileged};

fn policy(env: &Env, pg: &Postgres, webhook: Option<&str>) -> String {
    format!(
        r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: {name} }}
spec:
  unlisted: deny
  proxy: {{ listen: ["127.0.0.1:0", "[::1]:0"] }}
  approvers: {{ uids: [0, 65533] }}
{notify}
  identities:
    - {{ name: bot, cgroup: {cg}, groups: [agents] }}
    - {{ name: masked, cgroup: {masked_cg} }}
    - {{ name: admin, cgroup: {admin_cg} }}
    - {{ name: reader, cgroup: {reader_cg} }}
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
        - {{ name: no-file-access, match: {{ functions: [pg_read_file, lo_import, lo_export, dblink_exec] }}, action: deny }}
        - {{ name: delete-needs-where, match: {{ statements: [update, delete], where: missing }}, action: deny }}
        - {{ name: reads, match: {{ statements: [select, transaction, set, show, execute, prepare] }}, action: allow }}
        - {{ name: deletes-need-approval, match: {{ statements: [delete], tables: [orders] }}, action: approve, timeout: 60s }}
        - {{ name: archive-approval, match: {{ statements: [delete], tables: [archive] }}, action: approve, timeout: 2s }}
        - {{ name: loads, match: {{ statements: [copy, insert], tables: [orders] }}, action: allow }}
        - name: writes
          match: {{ statements: [insert, update, delete], tables: [orders, pgbench_accounts, pgbench_tellers, pgbench_branches, pgbench_history] }}
          action: allow
        - {{ name: scripts, match: {{ statements: [do, select, update], tables: [orders] }}, action: allow }}
      default: deny
    - {{ name: admin-all, to: [identity:admin], resources: [orders-db] }}
    - name: reader-reads
      to: [identity:reader]
      resources: [orders-db]
      read_only: true
      rules:
        - {{ name: reads, match: {{ statements: [select, transaction, set, show] }}, action: allow }}
    - name: masked-reads
      to: [identity:masked]
      resources: [orders-db]
      rules:
        - {{ name: reads, match: {{ statements: [select, copy, transaction] }}, action: allow }}
        - {{ name: people-writes, match: {{ statements: [insert], tables: [people, parts] }}, action: allow }}
      masking:
        - {{ name: mail-column, columns: [email], style: partial }}
        - {{ columns: ["*ssn*", secret_num], style: redact }}
        - {{ name: content, detect: [email, credit_card, ssn], style: hash }}
"#,
        name = env.name,
        cg = env.cgroup("bot"),
        masked_cg = env.cgroup("masked"),
        admin_cg = env.cgroup("admin"),
        reader_cg = env.cgroup("reader"),
        notify = webhook.map(|u| format!("  notify: {{ webhook: \"{u}\" }}")).unwrap_or_default(),
        addr = pg.addr(),
        secret = pg.secret_file.display(),
    )
}

/// psql inside the bot cgroup, with the given URL user:password; SQL on stdin.
fn psql(env: &Env, pg: &Postgres, userinfo: &str, script: &str) -> (String, String, bool) {
    psql_as(env, pg, "bot", userinfo, script)
}

/// psql inside one of the test's cgroups.
fn psql_as(env: &Env, pg: &Postgres, sub: &str, userinfo: &str, script: &str) -> (String, String, bool) {
    psql_in(&env.cgroup(sub), pg.port, userinfo, script)
}

/// psql inside the cgroup `cg` (for threads: `Env` stays on the test's own).
fn psql_in(cg: &str, port: u16, userinfo: &str, script: &str) -> (String, String, bool) {
    use std::io::Write;
    let url = format!("postgresql://{userinfo}@127.0.0.1:{port}/postgres");
    let mut child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", cg, "--", "psql", "-X", "-At", &url])
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
    setup_with(name, None)
}

fn setup_with(name: &str, webhook: Option<&str>) -> (Env, Postgres) {
    let pg = Postgres::start();
    pg.direct(
        "CREATE TABLE orders (id int primary key, email text); \
         INSERT INTO orders VALUES (1, 'a@example.com'), (2, 'b@example.com'); \
         CREATE TABLE archive (id int); INSERT INTO archive VALUES (1)",
    );
    let mut env = Env::new(name);
    env.write_policy(&policy(&env, &pg, webhook));
    env.start_agent();
    (env, pg)
}

#[test]
fn psql_works_unchanged_with_any_password_and_guardrails_hold() {
    if !privileged("psql_works_unchanged_with_any_password_and_guardrails_hold") {
        return;
    }
    let (env, pg) = setup("pg-psql");
    // The trail's head goes to the log, where a rewritten trail cannot reach it.
    env.wait_log("audit trail continues from this record");
    assert!(env.log().contains(&format!("seq=0 hash={}", "0".repeat(64))), "{}", env.log());

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
    let (_, err, _) = psql(&env, &pg, "bot", "SELECT length(pg_catalog.pg_read_file('/etc/hostname'));");
    assert!(err.contains("\"no-file-access\""), "function rules see calls anywhere: {err}");
    // A WHERE that names no column is no WHERE; a built-in that changes state is no read.
    let (_, err, _) = psql(&env, &pg, "bot", "DELETE FROM orders WHERE 1 = 1;");
    assert!(err.contains("delete-needs-where"), "{err}");
    let (_, err, _) = psql(&env, &pg, "bot", "SELECT pg_terminate_backend(pg_backend_pid());");
    assert!(err.contains("\"bot-orders.default\"") && !err.contains("terminating"), "{err}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2");
    let (_, err, _) = psql(&env, &pg, "bot", "SELEC 1;");
    assert!(err.contains("\"unparseable\""), "{err}");
    // A denial is an error like the server's own: inside a transaction block it aborts the
    // transaction, so the COMMIT rolls back what the transaction did before it.
    let script =
        "BEGIN;\nUPDATE orders SET email = 'tx@example.com' WHERE id = 2;\nDROP TABLE orders;\nSELECT 1;\nCOMMIT;";
    let (out, err, _) = psql(&env, &pg, "bot", script);
    assert!(err.contains("no-ddl") && err.contains("current transaction is aborted"), "{out} {err}");
    assert!(out.ends_with("\nROLLBACK"), "COMMIT of an aborted transaction: {out} {err}");
    assert_eq!(pg.direct("SELECT email FROM orders WHERE id = 2"), "b@example.com");
    // Allowed writes go through.
    let (_, err, ok) = psql(&env, &pg, "bot", "UPDATE orders SET email = 'z@example.com' WHERE id = 1;");
    assert!(ok, "{err}");
    assert_eq!(pg.direct("SELECT email FROM orders WHERE id = 1"), "z@example.com");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "the DROP never reached the server");
    // A DO block is judged by the statements in its body, which the server then runs.
    let (_, err, _) = psql(&env, &pg, "bot", "DO $$ BEGIN DELETE FROM orders; END $$;");
    assert!(err.contains("delete-needs-where"), "{err}");
    let script = "DO $$ BEGIN IF (SELECT count(*) FROM orders) = 2 THEN \
                  UPDATE orders SET email = 'do@example.com' WHERE id = 2; END IF; END $$;";
    let (_, err, ok) = psql(&env, &pg, "bot", script);
    assert!(ok, "{err}");
    assert_eq!(pg.direct("SELECT email FROM orders WHERE id = 2"), "do@example.com");
    let script = "DO $$ BEGIN EXECUTE 'UPDATE orders SET email = ''x'' WHERE id = 1'; END $$;";
    let (_, err, _) = psql(&env, &pg, "bot", script);
    assert!(err.contains("\"unparseable\"") && err.contains("dynamic SQL"), "{err}");
    assert_eq!(pg.direct("SELECT email FROM orders WHERE id = 1"), "z@example.com");

    let (_, err, _) = psql(&env, &pg, "bot", "SELECT * FROM nope;");
    assert!(err.contains("does not exist"), "{err}");
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT pg_sleep(0.2), id FROM orders ORDER BY id;");
    assert!(ok && out.lines().count() == 2, "{out} {err}");
    let long = format!("SELECT 'long' /* {} */, count(*) FROM orders;", "x".repeat(20_000));
    let (_, err, ok) = psql(&env, &pg, "bot", &long);
    assert!(ok, "{err}");
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
    // Who sent it, from the kernel: psql's pid and executable.
    assert!(drop["pid"].as_u64().is_some_and(|p| p > 1), "{drop}");
    assert!(drop["exe"].as_str().is_some_and(|e| e.ends_with("/psql")), "{drop}");
    // A statement longer than 16 KiB is recorded by its beginning, with its whole length and
    // digest, and the tables and functions all of it names (here only past the cut).
    let cut = records
        .iter()
        .find(|r| r["statement"].as_str().is_some_and(|t| t.starts_with("SELECT 'long'")))
        .expect("statement record for the long SELECT");
    assert_eq!(cut["statement_bytes"].as_u64(), Some(long.len() as u64));
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(long.as_bytes()));
    assert_eq!(cut["statement_sha256"].as_str(), Some(digest.as_str()), "{cut}");
    assert_eq!(cut["statement_tables"], serde_json::json!(["orders"]));
    assert_eq!(cut["statement_functions"], serde_json::json!(["count"]));
    assert!(cut["statement"].as_str().is_some_and(|t| t.len() <= 16 * 1024 + 3 && t.ends_with('…')));
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
    // Rows returned, and how long the server took.
    let slow = result_of("SELECT pg_sleep(0.2)");
    assert_eq!(slow["count"], 2);
    assert!(slow["duration_ms"].as_u64().is_some_and(|d| (400..5000).contains(&d)), "{slow}");
    assert!(slow["error"].is_null(), "{slow}");
    assert!(slow.get("approvals").is_none(), "a statement that was not held names no approval: {slow}");
    assert!(result_of("SELECT * FROM nope")["error"].as_str().unwrap().contains("does not exist"));
    assert!(
        !records.iter().any(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([drop["seq"]])),
        "a denied statement has no server result"
    );
    assert!(!trail.contains(&pg.password), "the upstream password is in the audit trail");
    assert!(!env.log().contains(&pg.password), "the upstream password is in the agent's log");
    let client_env = env.run_in("bot", &["/usr/bin/env"]);
    assert!(client_env.status.success() && !String::from_utf8_lossy(&client_env.stdout).contains(&pg.password));
    let verify = env.tollgate(&["audit", "verify", "--state-dir", &env.state_arg()]);
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn a_read_only_grant_has_the_server_refuse_writes_hidden_in_functions() {
    if !privileged("a_read_only_grant_has_the_server_refuse_writes_hidden_in_functions") {
        return;
    }
    let (env, pg) = setup("pg-read-only");
    // A function whose body writes: the rules see only a SELECT calling it.
    pg.direct("CREATE FUNCTION purge() RETURNS int LANGUAGE plpgsql AS $$ BEGIN DELETE FROM archive; RETURN 1; END $$");
    // What the role's own settings say gives way to the login's.
    pg.direct("ALTER ROLE app SET default_transaction_read_only = off");
    let reader = |sql: &str| psql_as(&env, &pg, "reader", "app:wrong", sql);
    let (out, err, _) = reader("SHOW default_transaction_read_only;\nSELECT purge();\nSELECT count(*) FROM archive;");
    assert_eq!(out, "on\n1", "{err}");
    assert!(err.contains("cannot execute DELETE in a read-only transaction"), "{err}");
    for sql in [
        "SET default_transaction_read_only = off;",
        "BEGIN READ WRITE;",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE;",
        "SELECT set_config('default_transaction_read_only', 'off', false);",
    ] {
        let (out, err, _) = reader(sql);
        assert!(out.is_empty() && err.contains("denied by rule \"read-only\""), "{sql}: {out} {err}");
    }
    let (out, err, _) = reader("BEGIN READ ONLY;\nSELECT count(*) FROM orders;\nCOMMIT;");
    assert_eq!(out, "BEGIN\n2\nCOMMIT", "{err}");
    let refused = env.wait_audit("read-only refusal", |r| r["kind"] == "statement" && r["rule"] == "read-only");
    assert_eq!(refused["verdict"], "deny");
    // The same call from a grant that is not read-only deletes.
    let (out, err, _) = psql(&env, &pg, "app:wrong", "SELECT purge();");
    assert_eq!(out, "1", "{err}");
    assert_eq!(pg.direct("SELECT count(*) FROM archive").trim(), "0");
}

#[test]
fn a_socket_file_of_a_local_server_is_named_in_the_log() {
    if !privileged("a_socket_file_of_a_local_server_is_named_in_the_log") {
        return;
    }
    let (env, pg) = setup("pg-unix-socket");
    assert!(!env.log().contains("also accepts connections on this Unix socket"), "{}", env.log());
    // Where a Debian or upstream build would put the server's socket (the harness's server
    // keeps its own in a temporary directory).
    let path = std::path::PathBuf::from(format!("/tmp/.s.PGSQL.{}", pg.addr().port()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    env.reload(&policy(&env, &pg, None));
    let log = env.log();
    let _ = std::fs::remove_file(&path);
    drop(listener);
    assert!(
        log.lines().any(|l| l.contains("also accepts connections on this Unix socket") && l.contains(&*path.to_string_lossy())),
        "{log}"
    );
}

#[test]
fn shutdown_does_not_wait_for_sessions_still_logging_in() {
    if !privileged("shutdown_does_not_wait_for_sessions_still_logging_in") {
        return;
    }
    let (env, pg) = setup("pg-stop");
    stops_at_once_with_idle_logins(env, &pg, "loops=");
    // With one session loop the stuck sessions share a thread with everything else there is to
    // do at shutdown, the wait for the audit writer among them.
    let mut env = Env::new("pg-stop1");
    env.write_policy(&policy(&env, &pg, None));
    env.start_agent_with(&["--threads", "1"]);
    stops_at_once_with_idle_logins(env, &pg, "loops=1");
}

/// Keeps four redirected connections from ever sending a startup packet (the agent would give
/// them 15 s each) and checks that SIGTERM stops the agent at once, with its trail whole.
fn stops_at_once_with_idle_logins(mut env: Env, pg: &Postgres, loops: &str) {
    assert!(env.log().contains(loops), "{}", env.log());
    let code = format!(
        "import socket, time\nsocks = [socket.create_connection(('127.0.0.1', {}), timeout=5) for _ in range(4)]\n\
         print('open', flush=True)\ntime.sleep(60)",
        pg.port
    );
    let mut idle = env.spawn_in("bot", &["python3", "-c", &code]);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(idle.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "open");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env.audit().iter().filter(|r| r["kind"] == "session_start").count() < 4 {
        assert!(std::time::Instant::now() < deadline, "the idle sessions never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    let status = env.stop_agent(nix::sys::signal::Signal::SIGTERM);
    let took = started.elapsed();
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(status.success(), "{status}");
    assert!(took < std::time::Duration::from_secs(4), "the agent ({loops}) took {took:?} to stop");
    let trail = std::fs::read_to_string(env.state_dir().join("audit/trail.jsonl")).unwrap();
    assert!(trail.lines().last().is_some_and(|l| l.contains("\"agent_stop\"")), "{trail}");
    let verify = env.tollgate(&["audit", "verify", "--state-dir", &env.state_arg()]);
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn upstream_logins_by_md5_and_cleartext_and_gss_encryption_declined() {
    if !privileged("upstream_logins_by_md5_and_cleartext_and_gss_encryption_declined") {
        return;
    }
    let (env, pg) = setup("pg-auth");
    // Two more logins, whose passwords the server keeps and asks for in other ways.
    pg.direct(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'; \
         CREATE ROLE pwuser LOGIN PASSWORD 'clear-pw'; GRANT SELECT ON orders TO md5user, pwuser",
    );
    let hba = pg.dir.path().join("data/pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    let lines = "host all md5user 127.0.0.1/32 md5\nhost all pwuser 127.0.0.1/32 password\n";
    std::fs::write(&hba, format!("{lines}{rest}")).unwrap();
    assert_eq!(pg.direct("SELECT pg_reload_conf()"), "t");
    // Kept as md5, so the md5 line makes the server ask for md5 (not SCRAM).
    assert_eq!(pg.direct("SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = 'md5user'"), "t");
    let app = format!("user: app, password_file: {}", pg.secret_file.display());
    // The password in the clear goes only where `credentials.auth` allows it (by default only
    // to a server whose certificate is checked).
    for (user, password, mode, auth, refusal) in [
        ("md5user", "md5-pw", 0o600, "", None),
        ("pwuser", "clear-pw", 0o600, "", Some("credentials.auth does not allow")),
        ("pwuser", "clear-pw", 0o600, ", auth: [scram-sha-256, password]", None),
        ("md5user", "md5-pw", 0o640, "", Some("must not be readable by group or others")),
        ("md5user", "md5-pw", 0o600, "symlink", Some("is a symbolic link")),
    ] {
        let mut secret = env.dir.path().join(format!("{user}.secret"));
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        let auth = if auth == "symlink" {
            let link = env.dir.path().join(format!("{user}.link"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&secret, &link).unwrap();
            secret = link;
            ""
        } else {
            auth
        };
        let creds = format!("user: {user}, password_file: {}{auth}", secret.display());
        env.reload(&policy(&env, &pg, None).replace(&app, &creds));
        let (out, err, ok) = psql(&env, &pg, "bot:whatever", "SELECT current_user, count(*) FROM orders");
        match refusal {
            None => assert!(ok && out == format!("{user}|2"), "{user}: {out} {err}"),
            Some(why) => {
                // Not logged in; the client is not told where the secret is, nor why.
                assert!(!ok && err.contains("the agent's log says why") && !err.contains(".secret"), "{err}");
                env.wait_log(why);
            }
        }
    }
    // GSSENCRequest: declined with N, and the client logs in on the same connection.
    env.reload(&policy(&env, &pg, None));
    let script = serde_json::json!([["Q", "SELECT 'after gssenc'"], ["X"]]).to_string();
    let out = env.run_in("bot", &["/usr/bin/python3", "-c", RAW_CLIENT, &pg.port.to_string(), "{}", &script, "gssenc"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.starts_with("G N\n") && text.contains("after gssenc'"), "{text}");
    assert!(text.ends_with("C SELECT 1\nZ I\nCLOSED\n"), "{text}");
    // A resource that names its databases serves those only.
    let only = |dbs: &str| {
        policy(&env, &pg, None)
            .replace("      credentials: {", &format!("      databases: {dbs}\n      credentials: {{"))
    };
    env.reload(&only("[orders, other]"));
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT 1");
    assert!(!ok && out.is_empty(), "{out} {err}");
    assert!(err.contains("resource orders-db serves the databases \"orders\", \"other\", not \"postgres\""), "{err}");
    env.reload(&only("[postgres]"));
    assert_eq!(psql(&env, &pg, "bot", "SELECT 1").0, "1");
    // A client asking for protocol 3.2 with an option it would like (libpq 18's
    // `max_protocol_version=latest`) hears that this is 3.0 without it, as from a server that
    // knows no better, and goes on. Its BackendKeyData names its real backend.
    let script = serde_json::json!([["Q", "SELECT pg_backend_pid()"], ["X"]]).to_string();
    let out =
        env.run_in("bot", &["/usr/bin/python3", "-c", RAW_CLIENT, &pg.port.to_string(), "{}", &script, "proto32"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.starts_with("v (196608, 1) b'_pq_.test_option\\x00'\nR \n"), "3.0, as a server says it: {text}");
    let key = text.lines().find_map(|l| l.strip_prefix("K ")).expect("BackendKeyData");
    let key_pid = key.split(' ').next().unwrap();
    let row = format!("D b'\\x00\\x01\\x00\\x00\\x00\\x{:02x}{key_pid}'", key_pid.len());
    assert!(text.lines().any(|l| l == row), "the backend the key names ({row}): {text}");
}

#[test]
fn pgbench_simple_extended_and_prepared_through_the_proxy() {
    if !privileged("pgbench_simple_extended_and_prepared_through_the_proxy") {
        return;
    }
    let (env, pg) = setup("pg-bench");
    // pgbench -i through the proxy too (DDL, COPY FROM STDIN, VACUUM), by an identity whose grant
    // has no statement rules.
    let port = pg.port.to_string();
    let bench = format!("{PG_BIN}/pgbench");
    let init =
        env.run_in("admin", &[&bench, "-i", "-s", "1", "-h", "127.0.0.1", "-p", &port, "-U", "admin", "postgres"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    assert_eq!(pg.direct("SELECT count(*) FROM pgbench_accounts"), "100000", "COPY FROM STDIN went through");
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
    let err = interrupted_sleep(&env, &pg, &url);
    assert!(err.contains("canceling statement due to user request"), "{err}");
}

/// Waits (up to 10 s) until one statement `LIKE` the pattern runs on the server.
fn wait_running(pg: &Postgres, like: &str) {
    let started = std::time::Instant::now();
    while pg.direct(&format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '{like}'")) != "1" {
        assert!(started.elapsed().as_secs() < 10, "{like} never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `SELECT pg_sleep(20)` with psql as `bot`, interrupts psql once the server runs it, and
/// returns psql's stderr (within 15 s, or the cancel did not take effect).
fn interrupted_sleep(env: &Env, pg: &Postgres, url: &str) -> String {
    let child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "psql", "-X", url, "-c", "SELECT pg_sleep(20)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // Wait until the statement is running on the server, then interrupt psql (exec made the
    // child psql itself), which sends a CancelRequest on a new, also redirected, connection.
    wait_running(pg, "SELECT pg_sleep%");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed().as_secs() < 15, "cancel did not take effect");
    String::from_utf8_lossy(&out.stderr).to_string()
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
    let (ok, text) = client_half(&env, &pg, "bot", "tokio_postgres_client");
    assert!(ok, "{text}");
    assert_eq!(
        pg.direct("SELECT count(*) FROM orders"),
        "4",
        "one insert, one row copied, nothing of the denied batch"
    );
}

/// Runs an ignored client-half test of this binary inside one of the test's cgroups.
fn client_half(env: &Env, pg: &Postgres, sub: &str, test: &str) -> (bool, String) {
    let me = std::env::current_exe().unwrap();
    let url = format!("host=127.0.0.1 port={} user=bot password=wrong dbname=postgres", pg.port);
    let out = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup(sub), "--"])
        .arg(&me)
        .args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
        .env("TOLLGATE_TEST_PG", &url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("CLIENT-OK"), text)
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
        // COPY FROM STDIN in the extended protocol: the server ignores the Sync sent with the
        // COPY, so the proxy must not wait for its answer; a denial and a query after it are
        // answered in order. (Bounded: a proxy that lost count would leave them waiting.)
        #[allow(clippy::disallowed_methods)] // this client's own runtime has a time driver
        let after_copy = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            use futures_util::SinkExt;
            let sink = client.copy_in("COPY orders FROM STDIN").await.unwrap();
            let mut sink = std::pin::pin!(sink);
            sink.send(bytes::Bytes::from_static(b"4\td@example.com\n")).await.unwrap();
            assert_eq!(sink.as_mut().finish().await.unwrap(), 1);
            let err = client.execute("DROP TABLE orders", &[]).await.expect_err("DDL must be denied");
            assert!(format!("{err:?}").contains("no-ddl"), "{err:?}");
            client.query_one(&by_id, &[&4i32]).await.unwrap().get::<_, String>(0)
        })
        .await
        .expect("answered after a COPY");
        assert_eq!(after_copy, "d@example.com");
    });
    println!("CLIENT-OK");
}

fn masked_setup(name: &str) -> (Env, Postgres) {
    let (env, pg) = setup(name);
    pg.direct(
        "CREATE TABLE people (id int, email text, customer_ssn text, note text, card text); \
         INSERT INTO people VALUES (1, 'alice@example.com', '123-45-6789', 'mail bob@example.org', '4111 1111 1111 1111'), \
                                   (2, NULL, NULL, 'nothing here', NULL); \
         CREATE UNIQUE INDEX people_email ON people (email)",
    );
    (env, pg)
}

#[test]
fn masking_in_simple_queries_copy_and_error_texts() {
    if !privileged("masking_in_simple_queries_copy_and_error_texts") {
        return;
    }
    let (env, pg) = masked_setup("pg-mask");
    let q = |sql: &str| psql_as(&env, &pg, "masked", "masked", sql);

    // Column rules mask whole values; detectors find values inside other columns; NULL stays NULL.
    let (out, err, ok) = q("SELECT id, email, customer_ssn, note, card FROM people ORDER BY id;");
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows[0][..3], ["1", "*************.com", "[REDACTED]"], "{out}");
    assert!(rows[0][3].starts_with("mail hash:") && rows[0][3].len() == "mail hash:".len() + 16, "{out}");
    // `partial` keeps four characters of the client's encoding: `Ã©` five times is ten in
    // LATIN1, though its bytes would be five UTF-8 characters.
    pg.direct("CREATE TABLE latin (email text); INSERT INTO latin VALUES ('Ã©Ã©Ã©Ã©Ã©')");
    let script = serde_json::json!([["Q", "SELECT email FROM latin"], ["X"]]);
    let out = raw_as(&env, &pg, "masked", serde_json::json!({"client_encoding": "LATIN1"}), script);
    assert!(out.contains(r"******\xc3\xa9\xc3\xa9'"), "{out}");
    assert!(rows[0][4].starts_with("hash:"), "card number: {out}");
    assert_eq!(rows[1], ["2", "", "", "nothing here", ""], "{out}");
    assert!(!out.contains("alice") && !out.contains("bob@") && !out.contains("6789") && !out.contains("4111"));
    // Messages over 256 KiB are masked on a thread of their own: rows and COPY data come back
    // masked and in order, and the results after them are masked as their own.
    let (out, err, ok) = q("SELECT repeat('a@b.co ', 40000) AS x, 1 AS n; SELECT email FROM people WHERE id = 1;");
    assert!(ok && !out.contains("a@b.co") && out.contains("[REDACTED]"), "{err}");
    assert!(out.ends_with("|1\n*************.com"), "{}", &out[out.len().saturating_sub(200)..]);
    let (out, err, ok) =
        q("COPY (SELECT repeat('a@b.co ', 40000) AS x, 2 AS n) TO STDOUT; SELECT email FROM people WHERE id = 1;");
    assert!(ok && !out.contains("a@b.co") && out.ends_with("\t2\n*************.com"), "{err}");
    // A value computed from a masked column is redacted whole: in `partial` style a sliding
    // `substr` would show all of it, four characters at a time.
    let (out, _, _) = q("SELECT email || '' AS x, substr(email, 1, 8) AS email FROM people WHERE id = 1;");
    assert_eq!(out, "[REDACTED]|[REDACTED]");
    // An array the query computed becomes NULL: its length and which elements are NULL could
    // be made to tell anything (`array_fill('x', ARRAY[ascii(email)])`). So do values that are
    // NULL, which would otherwise answer a question each.
    for sql in [
        "SELECT array_agg(customer_ssn ORDER BY id) AS x FROM people;",
        "SELECT array_fill('x'::text, ARRAY[ascii(email)]) AS x FROM people WHERE id = 1;",
    ] {
        let (out, err, ok) = q(sql);
        assert!(ok && out.is_empty(), "{sql}: {out} {err}");
    }
    let (out, err, ok) = q("SELECT CASE WHEN get_bit(convert_to(email, 'UTF8'), b) = 1 THEN 'x' END AS x \
           FROM people, generate_series(0, 7) b WHERE id = 1 ORDER BY b;");
    assert!(ok && out.lines().all(|l| l == "[REDACTED]") && out.lines().count() == 8, "{out} {err}");
    // A name that says nothing does not help: the content detector still sees the e-mail. It
    // redacts what it finds in a computed value, which the client may have written itself: a
    // hash of a guess, compared with the hashes of stored values, would tell them apart.
    let (out, _, _) = q("SELECT lower('ALICE@example.com') AS x, 'ssn 123-45-6789' AS y;");
    assert_eq!(out, "[REDACTED]|ssn [REDACTED]");
    // A number or token glued to `_` or a letter is found; so is a string of a json[]
    // element whose escape (`\u0040`) hides the `@` in the array's text.
    let (out, _, _) = q(r#"SELECT 'acct_4111111111111111' AS x, ARRAY['{"m": "a\u0040b.com"}'::json] AS docs;"#);
    assert_eq!(out, "acct_[REDACTED]|");
    // Stored values keep their rule's style: deterministic hashes, so equal values still join.
    let (out, _, _) = q("SELECT note FROM people WHERE id = 1;");
    assert_eq!(out, rows[0][3], "the same hash in every statement");
    let (out, _, _) = q("SELECT query FROM pg_stat_activity WHERE query LIKE '%own query@example.com%';");
    assert!(out.contains("[REDACTED]") && !out.contains("hash:"), "a system view holds client text: {out}");

    // COPY TO STDOUT: masked by column name when the statement lists the columns.
    let (out, err, ok) = q("COPY people (id, email, note) TO STDOUT;");
    assert!(ok, "{err}");
    assert!(out.starts_with("1\t*************.com\tmail hash:"), "{out}");
    assert!(out.contains("2\t\\N\tnothing here"), "{out}");
    let (out, err, ok) = q("COPY people (id, customer_ssn) TO STDOUT WITH (FORMAT csv, HEADER);");
    assert!(ok, "{err}");
    assert_eq!(out, "id,customer_ssn\n1,[REDACTED]\n2,", "{out}");
    let (out, err, ok) = q("COPY (SELECT id, note FROM people WHERE id = 2) TO STDOUT;");
    assert!(ok, "{err}");
    assert_eq!(out, "2\tnothing here", "a query that reads no masked column: {out}");
    // What cannot be masked is refused before it runs.
    let (out, err, _) = q("COPY people TO STDOUT;\nSELECT email FROM people WHERE id = 1;");
    assert!(err.contains("\"masking\"") && err.contains("column names"), "{err}");
    assert_eq!(out, "*************.com", "after a refusal the session is usable and still masked: {err}");
    let (_, err, _) = q("COPY (SELECT note FROM people) TO STDOUT WITH (FORMAT binary);");
    assert!(err.contains("binary"), "{err}");

    // Error texts carry values too (psql's own echo of the query, on the LINE after, is not
    // the server's).
    let (_, err, _) = q("SELECT 'carol@example.net'::int;");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains("invalid input syntax") && !first.contains("carol@"), "{err}");
    // ... and DETAIL, by column rule: the key that is already there.
    let (_, err, _) = q("INSERT INTO people (id, email) VALUES (3, 'alice@example.com');");
    // (redacted whole whatever the column's style: DETAIL quotes a key or a row as one text).
    assert!(err.contains("DETAIL:  Key (email)=([REDACTED]) already exists.") && !err.contains("alice"), "{err}");
    // ... and a row's partition key (an UPDATE of another column can make the server quote a
    // stored one; this grant lets the bot insert only).
    pg.direct(
        "CREATE TABLE parts (region text, customer_ssn text) PARTITION BY RANGE (region, customer_ssn); \
         CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM ('a', MINVALUE) TO ('b', MAXVALUE)",
    );
    let (_, err, _) = q("INSERT INTO parts VALUES ('zz', '321-54-9876');");
    assert!(err.contains("(region, customer_ssn) = ([REDACTED])") && !err.contains("9876"), "{err}");

    // The trail counts masked values by kind, never the values.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    let select = records
        .iter()
        .find(|r| {
            r["kind"] == "statement" && r["statement"].as_str().is_some_and(|s| s.starts_with("SELECT id, email"))
        })
        .unwrap();
    let result = records
        .iter()
        .find(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([select["seq"]]))
        .unwrap();
    assert_eq!(result["masked"], serde_json::json!({"column": 2, "email": 1, "credit_card": 1}), "{result}");
    let trail = std::fs::read_to_string(env.state_dir().join("audit/trail.jsonl")).unwrap();
    assert!(!trail.contains("bob@example.org") && !trail.contains("4111 1111"), "values leaked into the trail");

    // In the extended protocol. A value only a column rule catches (no detector sees it):
    pg.direct("CREATE TABLE vault (id int, secret_num text); INSERT INTO vault VALUES (1, 'topsecret-42')");
    let raw_masked = |script| raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    // A described FETCH tells the cursor's columns as they were when it was described; an
    // Execute of it returns the cursor's rows as they are when it runs.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        ["P", "", "DECLARE c CURSOR FOR SELECT id FROM vault"],
        ["B", "", ""],
        ["E", ""],
        ["P", "f", "FETCH ALL FROM c"],
        ["D", "S", "f"],
        ["P", "", "CLOSE c"],
        ["B", "", ""],
        ["E", ""],
        ["P", "", "DECLARE c CURSOR FOR SELECT secret_num FROM vault"],
        ["B", "", ""],
        ["E", ""],
        ["B", "", "f"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw_masked(script);
    assert!(out.contains("[REDACTED]") && !out.contains("topsecret"), "{out}");
    // Two COPY TO STDOUT of the unnamed statement in one batch: each Execute's rows are masked
    // by the columns of the statement its portal was bound from.
    let script = serde_json::json!([
        ["P", "", "COPY vault (secret_num, id) TO STDOUT"],
        ["B", "", ""],
        ["E", ""],
        ["P", "", "COPY vault (id, secret_num) TO STDOUT"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw_masked(script);
    assert_eq!(out.matches("[REDACTED]").count(), 2, "{out}");
    assert!(!out.contains("topsecret"), "{out}");
    // A Bind the server refused leaves the portal what it was: its COPY keeps its own columns.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        ["P", "", "COPY vault (secret_num) TO STDOUT"],
        ["B", "p1", ""],
        ["S"],
        ["Q", "SAVEPOINT a"],
        ["P", "", "COPY vault (id) TO STDOUT"],
        ["B", "p1", ""],
        ["S"],
        ["Q", "ROLLBACK TO a"],
        ["E", "p1"],
        ["S"],
        ["X"]
    ]);
    let out = raw_masked(script);
    assert!(out.contains("[REDACTED]") && !out.contains("topsecret"), "{out}");
}

#[test]
fn masking_follows_a_column_under_another_name() {
    if !privileged("masking_follows_a_column_under_another_name") {
        return;
    }
    let (env, pg) = masked_setup("pg-mask-alias");
    // No detector catches this value: only the `secret_num` column rule can.
    pg.direct("CREATE TABLE vault (id int, secret_num text); INSERT INTO vault VALUES (1, 'topsecret-42')");
    let q = |sql: &str| psql_as(&env, &pg, "masked", "masked", sql);
    // The server names each result column's source table and column: renaming it does not help.
    // What it cannot trace to one column is computed, and masked whole when the statement reads
    // a masked column by name or reads whole rows.
    for sql in [
        "SELECT secret_num AS x FROM vault;",
        "SELECT x FROM (SELECT secret_num AS x FROM vault) s;",
        "WITH c AS (SELECT secret_num AS y FROM vault) SELECT y AS z FROM c;",
        "SELECT v.b FROM vault AS v(a, b);",
        "SELECT upper(secret_num) AS u FROM vault;",
        "SELECT secret_num::varchar AS x FROM vault;",
        "SELECT secret_num AS x FROM vault UNION ALL SELECT NULL WHERE false;",
        "SELECT (SELECT secret_num) AS x FROM vault;",
        "SELECT column1 AS x FROM vault, LATERAL (VALUES (secret_num)) v;",
        "SELECT u AS x FROM vault, unnest(ARRAY[secret_num]) u;",
        "SELECT x FROM (SELECT ''::text AS x UNION ALL SELECT b FROM vault AS v(a, b)) s WHERE x <> '';",
        "SELECT * FROM vault UNION ALL SELECT * FROM vault WHERE false;",
        "SELECT row_to_json(v) AS j FROM vault v;",
    ] {
        let (out, err, ok) = q(sql);
        assert!(ok, "{sql}: {err}");
        assert!(
            out.lines().all(|l| l.split('|').any(|f| f.trim_matches('"') == "[REDACTED]"))
                && !out.contains("topsecret"),
            "{sql}: {out}"
        );
    }
    // A composite type's field holds a value as a column does: a column of a type that holds
    // a masked field (a composite's, a table's row type, an array of or a domain over one, at
    // any depth) is masked whole, and so is what is computed from it.
    pg.direct(
        "CREATE TYPE person AS (name text, secret_num text); CREATE DOMAIN checked AS person; \
         CREATE TYPE household AS (head person, size int); CREATE TYPE spot AS (x int, y int); \
         CREATE TYPE span AS RANGE (subtype = person, multirange_type_name = spans); \
         CREATE TABLE folks (id int, who person, many person[], kept checked, home household, snap vault, \
           at spot, email person, during span, periods spans); \
         INSERT INTO folks SELECT 1, '(ann,topsecret-43)', '{\"(bo,topsecret-44)\"}', '(cy,topsecret-45)', \
           '(\"(di,topsecret-46)\",2)', v, '(3,4)', '(ed,topsecret-47)', \
           '[\"(fa,topsecret-48)\",\"(fb,topsecret-48)\"]', '{[\"(ga,topsecret-49)\",\"(gb,topsecret-49)\"]}' \
           FROM vault v",
    );
    for sql in [
        "SELECT who FROM folks;",
        "SELECT who AS x FROM folks;",
        "SELECT (who).secret_num AS x FROM folks;",
        "SELECT (f.who).secret_num AS x FROM folks f;",
        "SELECT many FROM folks;",
        "SELECT many[1] AS x FROM folks;",
        "SELECT (many[1]).secret_num AS x FROM folks;",
        "SELECT kept FROM folks;",
        "SELECT ((home).head).secret_num AS x FROM folks;",
        "SELECT home FROM folks;",
        "SELECT snap FROM folks;",
        "SELECT (snap).secret_num AS x FROM folks;",
        "SELECT row_to_json(f) AS j FROM folks f;",
        "SELECT x FROM (SELECT who AS x FROM folks) s;",
        // Named like a `partial` column, it holds a field that is `redact`.
        "SELECT email FROM folks;",
        "SELECT during FROM folks;",
        "SELECT periods FROM folks;",
        "SELECT (lower(during)).secret_num AS x FROM folks;",
    ] {
        let (out, err, ok) = q(sql);
        assert!(ok, "{sql}: {err}");
        assert!(out.lines().all(|l| l.trim_matches('"') == "[REDACTED]") && !out.is_empty(), "{sql}: {out}");
    }
    let (out, err, _) = q("SELECT id, at FROM folks;");
    assert_eq!(out, "1|(3,4)", "a type that holds nothing masked stays: {err}");
    // `f.to_json` is `to_json(f)` when `f` has no column `to_json`, though a table of that name
    // in another schema has one.
    pg.direct("CREATE SCHEMA tenant; CREATE TABLE tenant.folks (id int, secret_num text, to_json text)");
    let (out, err, _) = q("SELECT f.to_json AS j FROM public.folks f;");
    assert_eq!(out, "\"[REDACTED]\"", "{err}");
    let (out, err, _) = q("SELECT customer_ssn AS email FROM people WHERE id = 1;");
    assert_eq!(out, "[REDACTED]", "the source's style is stricter than the name's: {err}");
    let (out, err, _) = q("COPY folks (id, who, at) TO STDOUT;");
    assert_eq!(out, "1\t[REDACTED]\t(3,4)", "{err}");
    // Computed values that read nothing masked stay as they are.
    let (out, err, _) = q("SELECT count(*), max(id) + 1 AS next FROM vault;");
    assert_eq!(out, "1|2", "{err}");
    let (out, err, _) = q("SELECT email AS e FROM people WHERE id = 1;");
    assert_eq!(out, "*************.com", "the source's rule and style: {err}");
    // In the extended protocol too.
    let script = serde_json::json!([
        ["P", "s", "SELECT secret_num AS z FROM vault"],
        ["D", "S", "s"],
        ["B", "", "s"],
        ["E", ""],
        ["P", "", "SELECT id AS secret, secret_num AS n FROM vault"],
        ["B", "", ""],
        ["E", ""],
        ["P", "c", "SELECT upper(secret_num) AS u FROM vault"],
        ["B", "", "c"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert_eq!(out.matches("[REDACTED]").count(), 3, "{out}");
    assert!(!out.contains("topsecret"), "{out}");
    // The server analyses a described statement again when search_path changes, and may then
    // read a column of another table under the same name and type: a statement's Describe
    // says nothing about the portals bound from it later.
    pg.direct(
        "CREATE SCHEMA tenant_a; CREATE SCHEMA tenant_b; \
         CREATE TABLE tenant_a.t (id int, note text); INSERT INTO tenant_a.t VALUES (1, 'harmless'); \
         CREATE TABLE tenant_b.t (id int, secret_num text); INSERT INTO tenant_b.t VALUES (1, 'topsecret-b'); \
         CREATE FUNCTION use_schema(s text) RETURNS text LANGUAGE sql AS $$ SELECT set_config('search_path', s, false) $$",
    );
    let script = serde_json::json!([
        ["P", "", "SELECT use_schema('tenant_a')"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["P", "s1", "SELECT x FROM t AS u(i, x)"],
        ["D", "S", "s1"],
        ["S"],
        ["P", "", "SELECT public.use_schema('tenant_b')"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert!(out.contains("[REDACTED]") && !out.contains("topsecret"), "{out}");
    // A portal of a FETCH makes all its rows at its first Execute. Resumed after its cursor's
    // name was declared again, a Describe would tell the columns of the new cursor: a resumed
    // one has every value masked whole. And the proxy describes such a portal only right after
    // its Bind: describing a FETCH portal whose cursor was closed crashes PostgreSQL 15 (every
    // session, not only this one).
    let script = in_transaction(serde_json::json!([
        ["Q", "DECLARE c CURSOR FOR SELECT secret_num || '' AS t FROM vault, generate_series(1, 3)"],
        ["P", "f", "FETCH ALL FROM c"],
        ["B", "p", "f"],
        ["E", "p", 1],
        ["S"],
        ["Q", "CLOSE c; DECLARE c CURSOR FOR SELECT note AS t FROM people"],
        ["E", "p", 0],
        ["S"],
        ["Q", "CLOSE c"],
        ["E", "p", 0],
        ["S"]
    ]));
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert_eq!(out.matches("[REDACTED]").count(), 3, "{out}");
    assert!(!out.contains("topsecret") && out.contains("C COMMIT"), "{out}");
    assert_eq!(pg.direct("SELECT 1"), "1", "the server is up");
    // Other portals are described before every Execute: a WITH HOLD cursor read on after its
    // transaction ended, or a cursor a function opened under the name of a portal that ran.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        ["Q", "DECLARE h CURSOR WITH HOLD FOR SELECT secret_num AS s FROM vault, generate_series(1, 2)"],
        ["E", "h", 1],
        ["S"],
        ["Q", "COMMIT"],
        ["E", "h", 1],
        ["S"],
        ["Q", "CLOSE h"],
        ["X"]
    ]);
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert!(out.matches("[REDACTED]").count() == 2 && out.contains("C CLOSE CURSOR"), "{out}");
    assert!(!out.contains("topsecret") && !out.contains("08P01"), "{out}");
    // Whole rows through attribute notation, SQL run from text: masked as computed (json
    // becomes a JSON string, xml, like any type that is not text or json, NULL).
    for (sql, masked) in [
        ("SELECT v.row_to_json AS j FROM vault v;", "\"[REDACTED]\""),
        ("SELECT query_to_xml('select secret_num from vault', true, false, '') AS x;", ""),
    ] {
        let (out, err, ok) = q(sql);
        assert!(ok && out == masked, "{sql}: {out} {err}");
    }
    // Errors quote values; statistics views sample them; settings and notifications would
    // keep them for a later statement to read.
    let (_, err, _) = q("SELECT secret_num::int FROM vault;");
    assert!(err.contains("withheld") && !err.contains("topsecret"), "{err}");
    pg.direct("ANALYZE vault");
    for sql in [
        "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'vault';",
        "SELECT lo_lseek(0, length(secret_num), 0) FROM vault;",
    ] {
        let (out, err, _) = q(sql);
        assert!(err.contains("\"masking\"") && !out.contains("topsecret"), "{sql}: {out} {err}");
    }
    // (set_config is SET, pg_notify and advisory locks side effects: this grant allows none of
    // them in the first place.)
    for sql in [
        "SELECT set_config('application_name', secret_num, false) FROM vault;",
        "SELECT pg_notify('c', lower(secret_num)) FROM vault;",
        "SELECT pg_try_advisory_xact_lock(hashtext(secret_num)) FROM vault;",
    ] {
        let (out, err, _) = q(sql);
        assert!(err.contains("denied by rule") && !out.contains("topsecret"), "{sql}: {out} {err}");
    }
    // More ways around: quotes inside the value, an alias reused for another table, a join's
    // USING alias (a row of the join columns), SQL text run by a built-in function.
    let (_, err, _) = q("SELECT ('\"' || secret_num)::int FROM vault;");
    assert!(err.contains("withheld") && !err.contains("topsecret"), "{err}");
    for sql in [
        "SELECT v.row_to_json AS j FROM (SELECT 1 FROM pg_class v) s, vault v;",
        "SELECT x::text AS j FROM vault a JOIN vault b USING (secret_num) AS x;",
        "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, quote_literal(secret_num)::tsquery FROM vault')::text AS t;",
    ] {
        let (out, err, ok) = q(sql);
        assert!(
            ok && (out.is_empty() || out.contains("[REDACTED]")) && !out.contains("topsecret"),
            "{sql}: {out} {err}"
        );
    }
    let (out, err, _) =
        q("COPY (SELECT query_to_xml('SELECT secret_num FROM vault', true, false, '') AS x) TO STDOUT;");
    assert!(err.contains("\"masking\"") && !out.contains("topsecret"), "{out} {err}");
    let (out, err, ok) = q("SELECT j.row_to_json AS x FROM (vault CROSS JOIN (SELECT 1) s) AS j;");
    assert!(ok && out.contains("[REDACTED]") && !out.contains("topsecret"), "a join's alias: {out} {err}");
    // A WITH HOLD cursor's rows are computed at COMMIT, whose error may quote them.
    let script =
        in_transaction(serde_json::json!([["Q", "DECLARE h CURSOR WITH HOLD FOR SELECT secret_num::int FROM vault"]]));
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert!(out.contains("withheld") && !out.contains("topsecret"), "{out}");
    // In one batch: a portal bound and described, closed, and declared again as a cursor.
    let script = in_transaction(serde_json::json!([
        ["P", "s", "SELECT 'x'::text AS note"],
        ["D", "S", "s"],
        ["B", "c", "s"],
        ["P", "", "CLOSE c"],
        ["B", "", ""],
        ["E", ""],
        ["P", "", "DECLARE c CURSOR FOR SELECT secret_num FROM vault"],
        ["B", "", ""],
        ["E", ""],
        ["E", "c"],
        ["S"]
    ]));
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert!(out.contains("[REDACTED]") && !out.contains("topsecret"), "{out}");
    // A portal the proxy saw bound, then closed and declared again as a cursor in SQL.
    let script = in_transaction(serde_json::json!([
        ["P", "", "SELECT 1"],
        ["B", "c", ""],
        ["S"],
        ["Q", "CLOSE c; DECLARE c CURSOR FOR SELECT secret_num || '' AS x FROM vault"],
        ["E", "c"],
        ["S"]
    ]));
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert!(out.contains("[REDACTED]") && !out.contains("topsecret"), "{out}");
    // Monitor mode lets denials through, but not what keeps masking whole.
    env.reload(&policy(&env, &pg, None).replace("spec:\n", "spec:\n  mode: monitor\n"));
    for sql in [
        "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'vault';",
        "COPY (SELECT secret_num || '' AS x FROM vault) TO STDOUT; LISTEN z;",
        // It would make the server read later statements unlike the proxy's parser.
        "SET standard_conforming_strings = off;",
    ] {
        let (out, err, _) = q(sql);
        assert!(err.contains("\"masking\"") && !out.contains("topsecret"), "{sql}: {out} {err}");
    }
    env.reload(&policy(&env, &pg, None));
    // A cursor declared in SQL and read with the protocol's Execute (or described): the proxy
    // never saw it bound, so its computed columns are masked as if it read anything.
    let script = in_transaction(serde_json::json!([
        ["Q", "DECLARE c CURSOR FOR SELECT lower(secret_num) AS x FROM vault"],
        ["E", "c"],
        ["S"],
        ["Q", "DECLARE d CURSOR FOR SELECT secret_num || '' AS y FROM vault"],
        ["D", "P", "d"],
        ["E", "d"],
        ["S"]
    ]));
    let out = raw_as(&env, &pg, "masked", serde_json::json!({}), script);
    assert_eq!(out.matches("[REDACTED]").count(), 2, "{out}");
    assert!(!out.contains("topsecret"), "{out}");
    // Rows of a cursor: the FETCH does not say what the cursor reads.
    let (out, err, ok) =
        q("BEGIN; DECLARE c CURSOR FOR SELECT upper(secret_num) FROM vault; FETCH ALL FROM c; COMMIT;");
    assert!(ok && out.contains("[REDACTED]") && !out.contains("TOPSECRET"), "{out} {err}");
    // COPY has no row description: a COPY (query) that reads a masked column or whole rows
    // cannot be masked column by column, and is refused.
    for sql in [
        "COPY (SELECT secret_num AS x FROM vault) TO STDOUT;",
        "COPY (SELECT x FROM (SELECT '' AS x UNION ALL SELECT secret_num FROM vault) s) TO STDOUT;",
        "COPY (SELECT s.vault FROM (SELECT vault FROM vault) s) TO STDOUT;",
        "COPY (SELECT b FROM vault AS v(a, b)) TO STDOUT;",
    ] {
        let (out, err, _) = q(sql);
        assert!(err.contains("\"masking\"") && out.is_empty(), "{sql}: {out} {err}");
    }
}

#[test]
fn masking_binary_results_of_a_second_client_library() {
    if !privileged("masking_binary_results_of_a_second_client_library") {
        return;
    }
    let (env, pg) = masked_setup("pg-mask-bin");
    let (ok, text) = client_half(&env, &pg, "masked", "tokio_postgres_masked_client");
    assert!(ok, "{text}");
    // A portal fetched in parts: its Bind, then each Execute's rows, all refer to its statement.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    let stmt = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["statement"] == "SELECT email FROM people ORDER BY id")
        .expect("the portal's statement");
    let counts: Vec<u64> = records
        .iter()
        .filter(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([stmt["seq"]]))
        .filter_map(|r| r["count"].as_u64())
        .collect();
    assert_eq!(counts, [0, 1, 1], "{records:?}");
}

/// Run only by `masking_binary_results_of_a_second_client_library`, inside the cgroup.
#[test]
#[ignore = "client half of masking_binary_results_of_a_second_client_library"]
fn tokio_postgres_masked_client() {
    let url = std::env::var("TOLLGATE_TEST_PG").expect("started by the parent test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        // tokio-postgres asks for binary results and never describes its portals: the proxy
        // learns each result's columns itself.
        let stmt = client
            .prepare("SELECT id, email, customer_ssn, note, 42 AS secret_num FROM people WHERE id = $1")
            .await
            .unwrap();
        let row = client.query_one(&stmt, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
        assert_eq!(row.get::<_, String>(1), "*************.com");
        assert_eq!(row.get::<_, String>(2), "[REDACTED]");
        assert!(row.get::<_, String>(3).starts_with("mail hash:"));
        assert_eq!(row.get::<_, Option<i32>>(4), None, "a masked int becomes NULL, never corrupt bytes");
        let row = client.query_one(&stmt, &[&2i32]).await.unwrap();
        assert_eq!(row.get::<_, Option<String>>(1), None);
        // Pipelined executions of the same statement.
        let (a, b) = tokio::join!(client.query_one(&stmt, &[&1i32]), client.query_one(&stmt, &[&2i32]));
        assert_eq!(a.unwrap().get::<_, String>(2), "[REDACTED]");
        assert_eq!(b.unwrap().get::<_, String>(3), "nothing here");
        // Numbers in binary format are read as the server would write them in text: a card
        // number is caught in a bigint or a numeric column as in a text one.
        let row = client
            .query_one(
                "SELECT 4111111111111111::int8 AS a, 4111111111111111.00::numeric AS b, 41111111::int8 AS c, \
                 12.5::numeric AS d",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<i64>>(0), None, "{row:?}");
        assert_eq!(row.get::<_, RawValue>(1).0, None);
        assert_eq!(row.get::<_, Option<i64>>(2), Some(41111111), "not a card");
        assert!(row.get::<_, RawValue>(3).0.is_some(), "not a card");
        // ... and in an array of numbers.
        let row = client
            .query_one(
                "SELECT ARRAY[7, 4111111111111111]::int8[] AS a, ARRAY[[1.5], [4111111111111111]]::numeric[] AS b, \
                 ARRAY[7, NULL, 41111111]::int8[] AS c",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<Vec<i64>>>(0), None, "{row:?}");
        assert_eq!(row.get::<_, RawValue>(1).0, None);
        assert_eq!(row.get::<_, Option<Vec<Option<i64>>>>(2), Some(vec![Some(7), None, Some(41111111)]));
        // ... and in the strings of a json[] element, decoded (json keeps the escape as written).
        let row = client
            .query_one(r#"SELECT ARRAY['{"m": "a\u0040b.com"}'::json] AS a, ARRAY['{"m": "x"}'::json] AS b"#, &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, RawValue>(0).0, None, "{row:?}");
        assert!(row.get::<_, RawValue>(1).0.is_some(), "nothing to find");
        // Row-limited portal executions (PortalSuspended) inside a transaction.
        let mut tx_client = client;
        let tx = tx_client.transaction().await.unwrap();
        let portal = tx.bind("SELECT email FROM people ORDER BY id", &[]).await.unwrap();
        let first = tx.query_portal(&portal, 1).await.unwrap();
        assert_eq!(first[0].get::<_, String>(0), "*************.com");
        let rest = tx.query_portal(&portal, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        tx.commit().await.unwrap();
    });
    println!("CLIENT-OK");
}

/// Any value, as the bytes the server sent (None for NULL).
struct RawValue(Option<Vec<u8>>);

impl<'a> tokio_postgres::types::FromSql<'a> for RawValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &tokio_postgres::types::Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(None))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// `tollgate approvals ...` as root from outside any enrolled cgroup.
fn approvals(env: &Env, args: &[&str]) -> std::process::Output {
    let state = env.state_arg();
    let mut all = vec!["approvals"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--state-dir", &state]);
    env.tollgate(&all)
}

/// Waits until exactly one request is pending and returns it.
fn pending_one(env: &Env) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = approvals(env, &["list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if list.len() == 1 {
            return list[0].clone();
        }
        assert!(list.is_empty(), "more than one pending: {list:?}");
        assert!(std::time::Instant::now() < deadline, "no approval request appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn spawn_psql(env: &Env, pg: &Postgres, sql: &str) -> std::process::Child {
    let url = format!("postgresql://bot@127.0.0.1:{}/postgres", pg.port);
    std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "psql", "-X", &url, "-c", sql])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// An HTTPS server (certificate and key in argv) that prints its port, then the request line
/// and body of each POST it gets; a failed handshake prints the error and it goes on.
const HTTPS_SINK: &str = r#"
import ssl, socket, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4)
l.settimeout(60)
print(l.getsockname()[1], flush=True)
while True:
    raw, _ = l.accept()
    try:
        c = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as e:
        print("handshake failed", flush=True)
        continue
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    n = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    print(head.split(b"\r\n")[0].decode(), flush=True)
    print(body.decode(), flush=True)
    c.close()
"#;

#[test]
fn approval_webhook_over_https_checks_the_certificate() {
    if !privileged("approval_webhook_over_https_checks_the_certificate") {
        return;
    }
    use std::io::BufRead;
    let certs = tempfile::tempdir().unwrap();
    common::test_certificates(certs.path());
    let file = |n: &str| certs.path().join(n).to_str().unwrap().to_string();
    let mut sink = std::process::Command::new("python3")
        .args(["-c", HTTPS_SINK, &file("server.crt"), &file("server.key")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(sink.stdout.take().unwrap()).lines().map(Result::unwrap);
    let url = format!("https://127.0.0.1:{}/hooks", lines.next().unwrap());
    // First against the system's CA bundle, which does not know the test CA: refused.
    let (env, pg) = setup_with("pg-hook-tls", Some(&url));
    let held = spawn_psql(&env, &pg, "DELETE FROM orders WHERE id = 2");
    let id = pending_one(&env)["id"].to_string();
    env.wait_log("approval webhook failed");
    assert!(env.log().contains("TLS handshake failed"), "{}", env.log());
    assert_eq!(lines.next().unwrap(), "handshake failed");
    assert!(approvals(&env, &["deny", &id]).status.success());
    assert!(!held.wait_with_output().unwrap().status.success());
    // With the test CA as the policy's ca_file, the request arrives, as JSON.
    let notify = format!("webhook: \"{url}\" }}");
    env.reload(
        &policy(&env, &pg, Some(&url)).replace(&notify, &format!("webhook: \"{url}\", ca_file: {} }}", file("ca.crt"))),
    );
    let held = spawn_psql(&env, &pg, "DELETE FROM orders WHERE id = 1");
    let id = pending_one(&env)["id"].to_string();
    assert_eq!(lines.next().unwrap(), "POST /hooks HTTP/1.1");
    let body: serde_json::Value = serde_json::from_str(&lines.next().unwrap()).unwrap();
    assert_eq!(
        (body["id"].to_string(), body["statement"].as_str()),
        (id.clone(), Some("DELETE FROM orders WHERE id = 1"))
    );
    assert!(approvals(&env, &["deny", &id]).status.success());
    assert!(!held.wait_with_output().unwrap().status.success());
    let _ = sink.kill();
    let _ = sink.wait();
}

/// A reload that removes the webhook stops the POSTs of sessions that started before it: a
/// pooled connection lives for days, and the URL may be why the webhook was removed.
#[test]
fn a_reload_that_removes_the_webhook_reaches_running_sessions() {
    if !privileged("a_reload_that_removes_the_webhook_reaches_running_sessions") {
        return;
    }
    let (url, posted) = webhook_sink();
    let (env, pg) = setup_with("pg-hook-reload", Some(&url));
    // One session: a read that takes a while, then a delete the policy holds.
    let session = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "psql", "-X"])
        .arg(format!("postgresql://bot@127.0.0.1:{}/postgres", pg.port))
        .args(["-c", "SELECT pg_sleep(1.5)", "-c", "DELETE FROM orders WHERE id = 2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_running(&pg, "SELECT pg_sleep%");
    env.reload(&policy(&env, &pg, None));
    let id = pending_one(&env)["id"].to_string();
    assert!(
        posted.recv_timeout(std::time::Duration::from_secs(1)).is_err(),
        "the held statement went to the webhook the policy no longer names"
    );
    assert!(approvals(&env, &["deny", &id]).status.success());
    assert!(!session.wait_with_output().unwrap().status.success());
}

/// A one-shot HTTP server that keeps the body of the first POST it gets.
fn webhook_sink() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/approvals", l.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s);
        let mut len = 0;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        r.get_mut().write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        tx.send(head + &String::from_utf8_lossy(&body)).unwrap();
    });
    (url, rx)
}

#[test]
fn approval_holds_until_an_approver_decides() {
    if !privileged("approval_holds_until_an_approver_decides") {
        return;
    }
    let (url, posted) = webhook_sink();
    let (env, pg) = setup_with("pg-approve", Some(&url));
    // Non-root approvers must reach the control socket inside the state dir.
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();

    // Held, then approved: the statement runs only after the decision.
    let child = spawn_psql(&env, &pg, "DELETE FROM orders WHERE id = 2");
    let req = pending_one(&env);
    let id = req["id"].to_string();
    assert_eq!((req["identity"].as_str(), req["rule"].as_str()), (Some("bot"), Some("deletes-need-approval")));
    assert_eq!(req["statement"], "DELETE FROM orders WHERE id = 2");
    assert!(req["pid"].as_u64().is_some() && req["exe"].as_str().is_some_and(|e| e.ends_with("psql")), "{req}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "nothing ran while held");
    let hook = posted.recv_timeout(std::time::Duration::from_secs(10)).expect("webhook POST");
    assert!(hook.starts_with("POST /hooks/approvals HTTP/1.1"), "{hook}");
    assert!(hook.contains(&format!("\"id\":{id}")) && hook.contains("DELETE FROM orders WHERE id = 2"), "{hook}");

    // Nobody under enforcement may decide, root included; nor may a uid the policy does not name.
    let out = env.run_in("bot", &[common::BIN, "approvals", "approve", &id, "--state-dir", &env.state_arg()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("enrolled"), "{out:?}");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", common::BIN, "approvals", "approve", &id])
        .args(["--state-dir", &env.state_arg()])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not an approver"), "{out:?}");
    // An approver's uid (65533 here) that also runs a process in an enrolled cgroup may not
    // decide from outside it: the caller may be something that process started (systemd-run
    // --user, tmux, at).
    let mut enrolled_sleeper = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "setpriv", "--reuid=65533", "--regid=65533"])
        .args(["--clear-groups", "sleep", "30"])
        .spawn()
        .unwrap();
    let as_approver = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65533", "--regid=65533", "--clear-groups", common::BIN, "approvals"])
            .args(args)
            .args(["--state-dir", &env.state_arg()])
            .output()
            .unwrap()
    };
    // 65533 is an approver: try only once its process is in the cgroup, or it would approve.
    let procs = common::cgroup2_mount().join(env.cgroup("bot").trim_start_matches('/')).join("cgroup.procs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&procs).unwrap_or_default().lines().any(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65533"))
    }) {
        assert!(std::time::Instant::now() < deadline, "the process as uid 65533 did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = as_approver(&["approve", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs processes in an enrolled cgroup"), "{out:?}");
    // Listing is refused as well, and every refused attempt is on the trail.
    let listed = as_approver(&["list"]);
    let _ = enrolled_sleeper.kill();
    let _ = enrolled_sleeper.wait();
    assert!(!listed.status.success(), "{listed:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let refused: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "approval" && r["verdict"] == "refused")
        .map(|r| (r["approver"].clone(), r["detail"].clone()))
        .collect();
    for (uid, what) in [(0, "approve"), (65534, "approve"), (65533, "approve"), (65533, "list")] {
        assert!(refused.contains(&(uid.into(), what.into())), "{uid} {what}: {refused:?}");
    }
    let out = approvals(&env, &["approve", &id, "--reason", "ticket OPS-7"]);
    assert!(out.status.success(), "{out:?}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("DELETE 1"), "{out:?}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "1");

    // A statement longer than an approver is shown in full is refused, not held.
    let padded = format!("DELETE FROM orders WHERE id = 1 /* {} */ OR true", "x".repeat(17 << 10));
    let out = spawn_psql(&env, &pg, &padded).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deletes-need-approval") && err.contains("longer than an approver is shown"), "{err}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "1");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let refusal = env.audit().into_iter().rfind(|r| r["kind"] == "approval").expect("an approval record");
    assert_eq!((refusal["verdict"].as_str(), refusal["approver"].as_u64()), (Some("refused"), None), "{refusal}");

    // Held, then denied: the client gets the rule and the reason; nothing ran.
    let child = spawn_psql(&env, &pg, "DELETE FROM orders WHERE id = 1");
    let id2 = pending_one(&env)["id"].to_string();
    assert!(approvals(&env, &["deny", &id2, "--reason", "not during the freeze"]).status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deletes-need-approval") && err.contains("denied by uid 0: not during the freeze"), "{err}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "1");

    // CancelRequest (Ctrl-C in psql) withdraws a held statement.
    let child = spawn_psql(&env, &pg, "DELETE FROM orders WHERE id = 1");
    let id3 = pending_one(&env)["id"].to_string();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"), "{out:?}");
    let out = approvals(&env, &["approve", &id3]);
    assert!(!out.status.success(), "a cancelled request cannot be approved: {out:?}");

    // Nobody decides: the rule's timeout denies it.
    let started = std::time::Instant::now();
    let out = spawn_psql(&env, &pg, "DELETE FROM archive WHERE id = 1").wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not decided within 2s"), "{out:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(pg.direct("SELECT count(*) FROM archive"), "1");

    // The extended protocol holds the execution and shows its parameters.
    let script = env.dir.path().join("delete.sql");
    std::fs::write(&script, "\\set id 1\nDELETE FROM orders WHERE id = :id;\n").unwrap();
    let script = script.to_str().unwrap().to_string();
    let port = pg.port.to_string();
    let bench = format!("{PG_BIN}/pgbench");
    let cg = env.cgroup("bot");
    let child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &cg, "--", &bench, "-n", "-M", "extended", "-t", "1", "-f", &script])
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "bot", "postgres"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let req = pending_one(&env);
    assert_eq!(req["parameters"], serde_json::json!(["1"]), "{req}");
    assert!(approvals(&env, &["approve", &req["id"].to_string()]).status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "0");

    // Every decision is on the trail with the approver and the statement it decided.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    // (The refused attempts were checked above.)
    let decisions: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["kind"] == "approval" && r["verdict"] != "refused").collect();
    let verdicts: Vec<&str> = decisions.iter().filter_map(|r| r["verdict"].as_str()).collect();
    assert_eq!(verdicts, ["approved", "denied", "cancelled", "timeout", "approved"], "{decisions:?}");
    let approved = decisions[0];
    assert_eq!((approved["approver"].as_u64(), approved["detail"].as_str()), (Some(0), Some("ticket OPS-7")));
    let stmt = records.iter().find(|r| r["seq"] == approved["refs"][0]).unwrap();
    assert_eq!(
        (stmt["verdict"].as_str(), stmt["statement"].as_str()),
        (Some("approve"), Some("DELETE FROM orders WHERE id = 2"))
    );
    // The outcome of an approved statement names the approval and its approver, in the simple
    // protocol and in the extended one (where the held Bind's result comes at the Sync).
    for approval in [decisions[0], decisions[4]] {
        let result = records
            .iter()
            .find(|r| r["kind"] == "statement_result" && r["refs"] == approval["refs"])
            .unwrap_or_else(|| panic!("no result for {approval}"));
        assert_eq!(
            result["approvals"],
            serde_json::json!([{ "approval_id": approval["approval_id"], "approver": 0 }]),
            "{result}"
        );
        assert_eq!(result["count"], 1, "{result}");
    }

    // An SQL PREPARE of a held statement is held, and so is each EXECUTE of it, by the same
    // rule: one approval does not allow any number of runs. A PREPARE of the same name that the
    // server rejects (the name is taken) changes nothing.
    pg.direct("INSERT INTO orders VALUES (5, 'e@example.com')");
    let url = format!("postgresql://bot@127.0.0.1:{}/postgres", pg.port);
    let child = std::process::Command::new(common::BIN)
        .args(["exec", "--cgroup", &env.cgroup("bot"), "--", "psql", "-X", &url])
        .args(["-c", "PREPARE d(int) AS DELETE FROM orders WHERE id = $1"])
        .args(["-c", "PREPARE d(int) AS SELECT $1", "-c", "EXECUTE d(5)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let prepare = pending_one(&env);
    assert!(approvals(&env, &["approve", &prepare["id"].to_string()]).status.success());
    let execute = pending_one(&env);
    assert_ne!(execute["id"], prepare["id"]);
    assert_eq!(execute["rule"], "deletes-need-approval", "{execute}");
    // The approver sees what runs: the EXECUTE with its arguments, and the statement it runs.
    assert_eq!(execute["statement"], "EXECUTE d(5)", "{execute}");
    assert_eq!(execute["runs"], "PREPARE d(int) AS DELETE FROM orders WHERE id = $1", "{execute}");
    assert!(approvals(&env, &["deny", &execute["id"].to_string()]).status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists") && err.contains("deletes-need-approval"), "{out:?}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "1", "the EXECUTE never ran");
}

fn tls_policy(env: &Env, pg: &Postgres, tls: &str) -> String {
    format!(
        r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: {name} }}
spec:
  unlisted: deny
  audit: {{ statements: written }}
  proxy: {{ listen: ["127.0.0.1:0"] }}
  identities:
    - {{ name: bot, cgroup: {cg} }}
  resources:
    - name: orders-db
      protocol: postgres
      address: "{addr}"
      credentials: {{ user: app, password_file: {secret} }}
      tls: {tls}
  grants:
    - {{ name: bot-orders, to: [identity:bot], resources: [orders-db] }}
"#,
        name = env.name,
        cg = env.cgroup("bot"),
        addr = pg.addr(),
        secret = pg.secret_file.display(),
    )
}

/// A client that starts TLS directly (PostgreSQL 17's `sslnegotiation=direct`): port, CA file
/// and ALPN protocol (empty: none) in argv; prints what the server side answers to a query.
const DIRECT_TLS_CLIENT: &str = r#"
import socket, ssl, struct, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
if sys.argv[3]:
    ctx.set_alpn_protocols([sys.argv[3]])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="127.0.0.1")
body = struct.pack("!i", 196608) + b"user\0bot\0database\0postgres\0\0"
s.sendall(struct.pack("!i", len(body) + 4) + body)
buf, sent = b"", False
while True:
    d = s.recv(65536)
    if not d:
        print("CLOSED"); break
    buf += d
    while len(buf) >= 5 and len(buf) >= 1 + struct.unpack("!i", buf[1:5])[0]:
        n = struct.unpack("!i", buf[1:5])[0]
        tag, payload, buf = buf[:1].decode(), buf[5:1 + n], buf[1 + n:]
        if tag in "EDC":
            print(tag, payload.replace(b"\0", b" ").decode(errors="replace"), flush=True)
        if tag == "Z":
            if sent:
                sys.exit(0)
            q = b"SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()\0"
            s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q); sent = True
"#;

#[test]
fn tls_to_the_client_and_to_the_server() {
    if !privileged("tls_to_the_client_and_to_the_server") {
        return;
    }
    let pg = Postgres::start_with_tls();
    let server_ca = pg.tls_ca.clone().unwrap();
    let mut env = Env::new("pg-tls");
    env.write_policy(&tls_policy(
        &env,
        &pg,
        &format!("{{ mode: verify-full, ca_file: {}, client: accept }}", server_ca.display()),
    ));
    env.start_agent();
    let agent_ca = env.state_dir().join("tls/ca.crt");
    let psql = |params: &str| {
        let url = format!("postgresql://bot@127.0.0.1:{}/postgres?{params}", pg.port);
        let sql = "SELECT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), current_user";
        let out = env.run_in("bot", &["psql", "-X", "-At", &url, "-c", sql]);
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    // The server only takes TLS: the proxy's leg is encrypted and the server's certificate checked.
    // The client asked for TLS and got it, from the agent, whatever it checks.
    assert_eq!(psql("sslmode=require"), ("t|app".to_string(), String::new()));
    let verify = format!("sslmode=verify-full&sslrootcert={}", agent_ca.display());
    assert_eq!(psql(&verify), ("t|app".to_string(), String::new()), "the agent's certificate names the resource");
    // SCRAM bound to the server's certificate: the server checked the proxy's hash of it.
    env.wait_log("logged in upstream auth=scram-sha-256 channel_binding=true");
    // TLS started directly (no SSLRequest), with the "postgresql" ALPN protocol: served; without
    // it, told why over the TLS connection.
    let direct = |alpn: &str| {
        let ca = agent_ca.to_str().unwrap();
        let out = env.run_in("bot", &["/usr/bin/python3", "-c", DIRECT_TLS_CLIENT, &pg.port.to_string(), ca, alpn]);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let text = direct("postgresql");
    assert!(text.lines().any(|l| l.starts_with("D ") && l.ends_with('t')), "pg_stat_ssl.ssl upstream: {text}");
    assert!(text.contains("C SELECT 1"), "{text}");
    let text = direct("");
    assert!(text.contains("must ask for the \"postgresql\" protocol (ALPN)") && text.contains("CLOSED"), "{text}");
    assert_eq!(psql("sslmode=disable").0, "t|app", "a plain client still gets an encrypted upstream");
    // Checked against the wrong CA, the server is refused and the client told why.
    let wrong = format!("sslmode=verify-full&sslrootcert={}", server_ca.display());
    let (_, err) = psql(&wrong);
    assert!(err.contains("certificate verify failed"), "{err}");

    // Upstream checked against a CA that did not sign the server's certificate: refused.
    env.reload(&tls_policy(&env, &pg, &format!("{{ mode: verify-full, ca_file: {} }}", agent_ca.display())));
    let (out, err) = psql("sslmode=disable");
    assert!(
        out.is_empty() && err.contains("cannot log in to resource orders-db: the agent's log says why"),
        "{out} {err}"
    );
    env.wait_log("UnknownIssuer");
    // `require` encrypts without checking; `disable` meets the server's `hostnossl ... reject`.
    env.reload(&tls_policy(&env, &pg, "{ mode: require }"));
    assert_eq!(psql("sslmode=disable").0, "t|app");
    // Client TLS declined: a client that starts TLS directly is disconnected, the log says why.
    let text = direct("postgresql");
    assert!(!text.lines().any(|l| l.starts_with("D ")), "{text}");
    env.wait_log("the client started TLS directly, and the resource does not accept client TLS");
    // A CancelRequest goes to the server encrypted too (the backend key is a credential).
    let err = interrupted_sleep(&env, &pg, &format!("postgresql://bot@127.0.0.1:{}/postgres?sslmode=disable", pg.port));
    assert!(err.contains("canceling statement due to user request"), "{err}");
    env.wait_log("forwarded a cancel request backend=");
    assert!(env.log().contains("tls=true"), "{}", env.log());
    let (_, err) = psql("sslmode=require");
    assert!(
        err.contains("server does not support SSL"),
        "client TLS is declined unless the resource accepts it: {err}"
    );
    env.reload(&tls_policy(&env, &pg, "{ mode: disable }"));
    let (_, err) = psql("sslmode=disable");
    assert!(err.contains("no encryption"), "{err}");

    // `audit.statements: written` still records every statement and links its outcome.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    let stmt = records.iter().find(|r| r["kind"] == "statement").expect("statement records");
    assert!(
        records.iter().any(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([stmt["seq"]])),
        "{records:?}"
    );
    assert!(env.tollgate(&["audit", "verify", "--state-dir", &env.state_arg()]).status.success());
}

/// A raw PostgreSQL v3 client in Python: logs in with the given extra startup parameters, sends
/// the given messages, prints the server's message types and texts. A `["wait"]` step holds
/// what follows until the server is next idle (ReadyForQuery `I`). With a fourth argument
/// `gssenc` it first asks for GSS encryption and prints the answer (`G N`).
const RAW_CLIENT: &str = r#"
import socket, struct, sys, json
port, extra, script = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
if sys.argv[4:5] == ["cancel"]:
    s.sendall(struct.pack("!iiii", 16, 80877102, int(sys.argv[5]), int(sys.argv[6])))
    print("CLOSED" if not s.recv(1) else "DATA", flush=True)
    sys.exit(0)
if sys.argv[4:] == ["gssenc"]:
    s.sendall(struct.pack("!ii", 8, 80877104))
    print("G", s.recv(1).decode(), flush=True)
params = b"user\0bot\0database\0postgres\0" + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in extra.items()) + b"\0"
version = 196608
if sys.argv[4:] == ["proto32"]:
    version = 196610
    params = b"_pq_.test_option\0on\0" + params
body = struct.pack("!i", version) + params
s.sendall(struct.pack("!i", len(body) + 4) + body)
def msg(tag, payload):
    return tag.encode() + struct.pack("!i", len(payload) + 4) + payload
def cstr(x):
    return x.encode() + b"\0"
parts = [b""]
for m in script:
    t = m[0]
    out = b""
    if t == "wait": parts.append(b"")
    elif t == "P": out += msg("P", cstr(m[1]) + cstr(m[2]) + b"\0\0")
    elif t == "Plong": out += msg("P", cstr(m[1]) + cstr(m[2] + "x" * m[3]) + b"\0\0")
    elif t == "Ptypes": out += msg("P", cstr(m[1]) + cstr(m[2]) + struct.pack("!H", m[3]) + struct.pack("!I", m[4]) * m[3])
    elif t == "Bnulls": out += msg("B", cstr(m[1]) + cstr(m[2]) + b"\0\0" + struct.pack("!H", m[3]) + b"\xff\xff\xff\xff" * m[3] + struct.pack("!H", len(m[4])) + b"".join(struct.pack("!h", c) for c in m[4]))
    elif t == "Pmany": out += b"".join(msg("P", cstr(m[1] + str(i)) + cstr(m[3]) + b"\0\0") + msg("S", b"") for i in range(m[2]))
    elif t == "B": out += msg("B", cstr(m[1]) + cstr(m[2]) + b"\0\0\0\0\0\0")
    elif t == "E": out += msg("E", cstr(m[1]) + struct.pack("!i", m[2] if len(m) > 2 else 0))
    elif t == "Q": out += msg("Q", cstr(m[1]))
    elif t == "C": out += msg("C", b"S" + cstr(m[1]))
    elif t == "Cportal": out += msg("C", b"P" + cstr(m[1]))
    elif t == "D": out += msg("D", m[1].encode() + cstr(m[2]))
    elif t == "bytes": out += bytes.fromhex(m[1])
    elif t == "dmany": out += msg("d", b"x" * m[1]) * m[2]
    else: out += msg(t, b"")
    parts[-1] += out
buf = b""
s.settimeout(5)
sent = False
while True:
    while len(buf) >= 5:
        tag, n = buf[:1].decode(), struct.unpack("!i", buf[1:5])[0]
        if len(buf) < 1 + n: break
        payload, buf = buf[5:1 + n], buf[1 + n:]
        text = ""
        if tag in "EN":
            fields = dict((f[:1].decode(), f[1:].decode()) for f in payload.split(b"\0") if f)
            text = fields.get("C", "") + " " + fields.get("M", "")
        elif tag in "ZC":
            text = payload.rstrip(b"\0").decode()
        elif tag in "DdS":
            text = repr(payload)
        elif tag == "A":
            text = repr(payload[4:])
        elif tag == "K":
            text = "%d %d" % struct.unpack("!ii", payload[:8])
        elif tag == "v":
            text = str(struct.unpack("!ii", payload[:8])) + " " + repr(payload[8:])
        print(tag, text, flush=True)
        if tag == "Z" and parts and (not sent or payload == b"I"):
            s.sendall(parts.pop(0)); sent = True
    try:
        d = s.recv(65536)
    except socket.timeout:
        print("TIMEOUT", flush=True)
        break
    if not d:
        print("CLOSED", flush=True)
        break
    buf += d
"#;

fn raw(env: &Env, pg: &Postgres, extra: serde_json::Value, script: serde_json::Value) -> String {
    raw_as(env, pg, "bot", extra, script)
}

/// A raw-client script's steps between BEGIN and COMMIT, then Terminate.
fn in_transaction(steps: serde_json::Value) -> serde_json::Value {
    let mut script = vec![serde_json::json!(["Q", "BEGIN"])];
    script.extend(steps.as_array().expect("a list of steps").iter().cloned());
    script.extend([serde_json::json!(["Q", "COMMIT"]), serde_json::json!(["X"])]);
    serde_json::Value::Array(script)
}

/// The raw client in one of the test's cgroups.
fn raw_as(env: &Env, pg: &Postgres, sub: &str, extra: serde_json::Value, script: serde_json::Value) -> String {
    let out = env.run_in(
        sub,
        &["/usr/bin/python3", "-c", RAW_CLIENT, &pg.port.to_string(), &extra.to_string(), &script.to_string()],
    );
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// PostgreSQL 15.18 crashes (every backend restarts) when a FETCH statement, or a portal
/// bound to one, is described after its cursor was closed. The proxy lets such a Describe
/// through only right after the Parse or Bind, when the cursor is the one they found.
#[test]
fn a_fetch_is_described_only_while_its_cursor_is_sure_to_be_there() {
    if !privileged("a_fetch_is_described_only_while_its_cursor_is_sure_to_be_there") {
        return;
    }
    let (env, pg) = setup("pg-fetch-describe");
    let none = serde_json::json!({});
    let declare = serde_json::json!(["Q", "DECLARE c CURSOR FOR SELECT 1 AS a, 'x' AS b"]);
    let refused = |out: &str| out.contains("42501") && out.contains("fetch-describe");
    // Runs a script as `bot`; the server must have survived it (a crash restarts every backend).
    let run = |script: serde_json::Value| {
        let out = raw(&env, &pg, none.clone(), script);
        assert_eq!(pg.direct("SELECT 1"), "1", "the server is up after: {out}");
        out
    };
    // A statement parsed while the cursor was there, described after it was closed.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["S"],
        ["Q", "CLOSE c"],
        ["D", "S", "f"],
        ["S"],
        ["Q", "ROLLBACK"]
    ]));
    let out = run(script);
    assert!(refused(&out), "{out}");
    // A portal bound while the cursor was there, described after it was closed.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["B", "p", "f"],
        ["E", "p"],
        ["S"],
        ["Q", "CLOSE c"],
        ["D", "P", "p"],
        ["S"],
        ["Q", "ROLLBACK"]
    ]));
    let out = run(script);
    assert!(refused(&out), "{out}");
    assert!(out.contains("C ROLLBACK") && !out.contains("57P"), "the session goes on: {out}");
    // Right after the Parse or the Bind (a Flush between, a FETCH's Bind between): answered.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["D", "S", "f"],
        ["B", "", "f"],
        ["H"],
        ["D", "S", "f"],
        ["D", "P", ""],
        ["E", ""],
        ["S"]
    ]));
    let out = run(script);
    assert!(!refused(&out) && out.matches("\nT ").count() == 3 && out.contains("C FETCH 1"), "{out}");
    // A Describe after an Execute, or a portal of another statement: answered as before.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "s", "SELECT 2 AS n"],
        ["B", "q", "s"],
        ["E", "q"],
        ["D", "P", "q"],
        ["D", "S", "s"],
        ["S"]
    ]));
    let out = run(script);
    assert!(!refused(&out) && out.matches("\nT ").count() == 2, "{out}");
    // A portal bound to a FETCH in a transaction that has ended is gone: its name is free.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["B", "p", "f"],
        ["S"],
        ["Q", "COMMIT"],
        ["wait"],
        ["Q", "BEGIN"],
        ["P", "s", "SELECT 2 AS n"],
        ["B", "p", "s"],
        ["E", "p"],
        ["D", "P", "p"],
        ["S"],
        ["Q", "COMMIT"],
        ["X"]
    ]);
    let out = run(script);
    assert!(!refused(&out) && out.contains("C COMMIT"), "{out}");
    // A named FETCH statement the proxy forgot when it forwarded a DISCARD ALL, which the
    // server refused inside a transaction block: it may still be there (red team B).
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "n", "FETCH ALL FROM c"],
        ["S"],
        ["Q", "DISCARD ALL"],
        ["Q", "ROLLBACK"],
        ["D", "S", "n"],
        ["S"]
    ]));
    let out = run(script);
    assert!(out.contains("25001") && refused(&out), "{out}");
    // SQL EXECUTE of a named FETCH statement: described with the description the FETCH had
    // when it was parsed, which crashes the server once the cursor is gone, even right after
    // the Bind. Refused while the session has a named FETCH statement.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["P", "e", "EXECUTE f"],
        ["S"],
        ["Q", "CLOSE c"],
        ["B", "p", "e"],
        ["D", "P", "p"],
        ["S"],
        ["Q", "ROLLBACK"],
        ["D", "S", "e"],
        ["S"]
    ]));
    let out = run(script);
    assert_eq!(out.matches("fetch-describe").count(), 2, "{out}");
    // A FETCH from a portal that is bound to a FETCH: the server describes it through that
    // portal's cursor, gone here, even right after the Parse or Bind (red team C).
    for describe in [serde_json::json!(["D", "S", ""]), serde_json::json!(["D", "P", "p2"])] {
        let script = in_transaction(serde_json::json!([
            declare,
            ["P", "", "FETCH ALL FROM c"],
            ["B", "p1", ""],
            ["S"],
            ["Q", "CLOSE c"],
            ["P", "", "FETCH ALL FROM p1"],
            ["B", "p2", ""],
            describe,
            ["S"]
        ]));
        let out = run(script);
        assert!(refused(&out), "{out}");
    }
    // A simple query needs no Describe: the server describes its result the same way. The
    // portal's rows are stored by its Execute, so no error comes first (red team D).
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "", "FETCH ALL FROM c"],
        ["B", "p1", ""],
        ["E", "p1"],
        ["S"],
        ["Q", "CLOSE c"],
        ["Q", "FETCH ALL FROM p1"]
    ]));
    let out = run(script);
    assert!(refused(&out), "{out}");
    // A portal whose Close the server carried out is no FETCH any more: its name may be a
    // cursor's, fetched from as any other, also by a client that sends on before the Close's
    // answer has come.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["B", "p1", "f"],
        ["E", "p1"],
        ["S"],
        ["Cportal", "p1"],
        ["S"],
        ["Q", "DECLARE p1 CURSOR FOR SELECT 7 AS n"],
        ["Q", "FETCH ALL FROM p1"]
    ]));
    let out = run(script);
    assert!(!refused(&out) && out.contains("D b'\\x00\\x01\\x00\\x00\\x00\\x017'"), "{out}");
    // ... but bound again after its Close, in the same batch, it is a FETCH again.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["B", "p1", "f"],
        ["E", "p1"],
        ["S"],
        ["Cportal", "p1"],
        ["B", "p1", "f"],
        ["E", "p1"],
        ["S"],
        ["Q", "CLOSE c"],
        ["Q", "FETCH ALL FROM p1"]
    ]));
    let out = run(script);
    assert!(refused(&out), "{out}");
    // Under masking the proxy describes portals itself. A Bind of a portal's name again fails
    // while it is open, and a savepoint brings the old portal back into use: it is still a
    // FETCH, so it is not described again, and its rows are masked whole.
    let script = in_transaction(serde_json::json!([
        declare,
        ["P", "f", "FETCH 1 FROM c"],
        ["B", "p", "f"],
        ["S"],
        ["Q", "SAVEPOINT s"],
        ["P", "s", "SELECT 2 AS n"],
        ["B", "p", "s"],
        ["S"],
        ["Q", "ROLLBACK TO s"],
        ["Q", "CLOSE c"],
        ["E", "p"],
        ["S"]
    ]));
    let out = raw_as(&env, &pg, "masked", none.clone(), script);
    assert!(out.contains("42P03") && out.contains("34000") && out.contains("C ROLLBACK"), "{out}");
    assert_eq!(pg.direct("SELECT 1"), "1", "the server is up");
}

/// A CancelRequest with a session's key, from a process of another identity, is refused: the
/// key is a secret, but not the only check. The same identity's cancel goes through.
#[test]
fn a_cancel_from_another_identity_is_refused() {
    if !privileged("a_cancel_from_another_identity_is_refused") {
        return;
    }
    use std::io::{BufRead, BufReader, Read};
    let (env, pg) = setup("pg-cancel-identity");
    let port = pg.port.to_string();
    for (canceller, cancelled) in [("admin", false), ("bot", true)] {
        // Under a second: after Terminate the agent gives the answers a second to arrive.
        let script = serde_json::json!([["Q", "SELECT pg_sleep(0.9)"], ["X"]]).to_string();
        let mut sleeper = env.spawn_in("bot", &["/usr/bin/python3", "-c", RAW_CLIENT, &port, "{}", &script]);
        let mut out = BufReader::new(sleeper.stdout.take().unwrap());
        let key = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "no BackendKeyData");
            if let Some(k) = line.strip_prefix("K ") {
                break k.trim().to_string();
            }
        };
        let (pid, key) = key.split_once(' ').unwrap();
        wait_running(&pg, "SELECT pg_sleep%");
        let sent =
            env.run_in(canceller, &["/usr/bin/python3", "-c", RAW_CLIENT, &port, "{}", "[]", "cancel", pid, key]);
        assert!(String::from_utf8_lossy(&sent.stdout).contains("CLOSED"), "{sent:?}");
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let _ = sleeper.wait();
        if cancelled {
            assert!(rest.contains("57014"), "the same identity cancels: {rest}");
        } else {
            assert!(rest.contains("C SELECT 1") && !rest.contains("57014"), "not cancelled: {rest}");
            env.wait_log("cancel request refused: the session belongs to identity bot, the request came from admin");
        }
    }
}

/// A client that pipelines as much as the proxy buffers (64 MiB) behind a held statement, then
/// leaves: its close waits behind the unread data, yet the request is withdrawn within seconds,
/// not at the rule's timeout (60 s). (Of a client that sent more than the socket buffers also
/// hold, TCP delivers no close at all until the proxy reads on: the timeout ends that one.)
#[test]
fn a_held_session_notices_its_client_leaving_behind_a_full_buffer() {
    if !privileged("a_held_session_notices_its_client_leaving_behind_a_full_buffer") {
        return;
    }
    let (env, pg) = setup("pg-held-flood");
    let started = std::time::Instant::now();
    // 64 CopyData messages of 1 MiB after the held DELETE; the client then waits 5 s for an
    // answer and exits.
    let script = serde_json::json!([["Q", "DELETE FROM orders WHERE id = 1"], ["dmany", 1 << 20, 64]]);
    let out = raw(&env, &pg, serde_json::json!({}), script);
    assert!(!out.contains("C DELETE"), "{out}");
    let cancelled = loop {
        let approval = env.audit().into_iter().find(|r| r["kind"] == "approval");
        if let Some(r) = approval {
            break r;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "no approval record: {out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(cancelled["verdict"], "cancelled", "{cancelled}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(pg.direct("SELECT count(*) FROM orders WHERE id = 1"), "1", "nothing ran");
}

#[test]
fn malformed_messages_are_answered_with_an_error_and_others_go_on() {
    if !privileged("malformed_messages_are_answered_with_an_error_and_others_go_on") {
        return;
    }
    let (env, pg) = setup("pg-malformed");
    // A session in the middle of a query while the others break the protocol.
    let other = spawn_psql(&env, &pg, "SELECT pg_sleep(3), 'still served'");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let none = serde_json::json!({});
    let cases = [
        // Bodies the proxy cannot read: a Bind whose portal name never ends, a Query that is not
        // UTF-8, a Parse cut short.
        (serde_json::json!(["bytes", "42000000067030"]), "malformed Bind message: unterminated string"),
        (serde_json::json!(["bytes", "5100000006ff00"]), "malformed Query message: string is not UTF-8"),
        (serde_json::json!(["bytes", "5000000007733100"]), "malformed Parse message: unterminated string"),
        // Framing: a length below its own four bytes, one past the limit, an unknown type.
        (serde_json::json!(["bytes", "5100000002"]), "message length 2 is invalid"),
        (
            serde_json::json!(["bytes", "517fffffff"]),
            "message of 2147483647 bytes is larger than the 67108864-byte limit",
        ),
        (serde_json::json!(["bytes", "7a00000004"]), "unexpected message type 'z'"),
    ];
    for (bad, error) in cases {
        // A query answered before it, then the bad message (with a Sync, for a batch).
        let out = raw(&env, &pg, none.clone(), serde_json::json!([["Q", "SELECT 1"], bad, ["S"]]));
        let lines: Vec<&str> = out.lines().collect();
        let at = lines.iter().position(|l| l.starts_with("C SELECT 1")).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(lines[at + 1..], ["Z I", &format!("E 08P01 tollgate: {error}"), "CLOSED"], "{out}");
    }
    let out = other.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("still served"), "{out:?}");
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT 'next one'");
    assert!(ok && out == "next one", "{out} {err}");
    let status = env.tollgate(&["status", "--state-dir", &env.state_arg()]);
    assert!(status.status.success(), "{status:?}");
}

/// Sends the start of a simple Query of `size` bytes (its first `head` bytes), then, once
/// the file `gate` exists, the rest; then the first byte of one more query, and the rest of
/// that once `gate` + "2" exists. With `gate` "-" it only reads what comes back. Prints each
/// error, row and ReadyForQuery.
const HALF_CLIENT: &str = r#"
import os, socket, struct, sys, time
port, size, head, gate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(20)
body = struct.pack("!i", 196608) + b"user\0bot\0database\0postgres\0\0"
s.sendall(struct.pack("!i", len(body) + 4) + body)
def msg(tag, payload):
    return tag.encode() + struct.pack("!i", len(payload) + 4) + payload
buf = b""
def answers(until_ready):
    global buf
    while True:
        while len(buf) >= 5:
            tag, n = buf[:1].decode(), struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + n:
                break
            payload, buf = buf[5:1 + n], buf[1 + n:]
            if tag == "E":
                fields = dict((f[:1].decode(), f[1:].decode()) for f in payload.split(b"\0") if f)
                print("E", fields.get("C", ""), fields.get("M", ""), flush=True)
            elif tag in "DZ":
                print(tag, payload[:40], flush=True)
            if tag == "Z" and until_ready:
                return
        try:
            d = s.recv(65536)
        except socket.timeout:
            print("TIMEOUT", flush=True)
            return
        if not d:
            print("CLOSED", flush=True)
            return
        buf += d
answers(True)
big = msg("Q", b"SELECT 1 -- " + b"x" * (size - 18) + b"\0")
s.sendall(big[:head])
print("SENT", flush=True)
if gate == "-":
    answers(False)
    sys.exit(0)
while not os.path.exists(gate):
    time.sleep(0.05)
s.sendall(big[head:])
answers(True)
after = msg("Q", b"SELECT 'after'\0")
s.sendall(after[:1])
print("PARTIAL", flush=True)
while not os.path.exists(gate + "2"):
    time.sleep(0.05)
s.sendall(after[1:])
answers(True)
s.sendall(msg("X", b""))
"#;

/// A client (HALF_CLIENT) in the cgroup `sub` that has sent `head` bytes of a query of `size`
/// and waits (for `gate`, or with "-" for the agent), and the agent has had a second to read
/// them; killed when dropped. Its output is read on from the reader returned.
fn half_client(
    env: &Env,
    sub: &str,
    port: u16,
    size: usize,
    head: usize,
    gate: &str,
) -> (Killed, std::io::BufReader<std::process::ChildStdout>) {
    use std::io::BufRead;
    let (port, size, head) = (port.to_string(), size.to_string(), head.to_string());
    let mut c = Killed(env.spawn_in(sub, &["/usr/bin/python3", "-c", HALF_CLIENT, &port, &size, &head, gate]));
    let mut out = std::io::BufReader::new(c.0.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "SENT" {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "a client ended early");
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    (c, out)
}

/// A child process killed and reaped however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sessions buffer large messages within one budget (`--message-memory`): a session whose
/// message (sent, or asked of the server) the budget cannot cover ends with 53200, the others
/// go on, and what a session held is given back when its message is through.
#[test]
fn large_messages_share_one_memory_budget_and_others_go_on() {
    use std::io::{BufRead, Read};
    if !privileged("large_messages_share_one_memory_budget_and_others_go_on") {
        return;
    }
    let pg = Postgres::start();
    let mut env = Env::new("pg-memory");
    env.write_policy(&policy(&env, &pg, None));
    env.start_agent_with(&["--message-memory", "64"]);
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", env.agent_pid())).unwrap();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        kib.trim().trim_end_matches(" kB").parse::<u64>().unwrap() << 10
    };
    let at_start = rss();
    let port = pg.port.to_string();
    let gate = env.dir.path().join("go");
    let gate_arg = gate.display().to_string();
    let half = |size: usize, head: usize, gate: &str| half_client(&env, "bot", pg.port, size, head, gate);
    // H announces 64 MiB and sends 100 bytes: it holds what came and 1 MiB ahead, less its free
    // 256 KiB, not what its header announced.
    let h = half(64 << 20, 100, "-");
    // A sends 62 MiB of a 64 MiB query and waits: with H, it holds all but 0.5 MiB of the budget.
    let (mut a, mut a_out) = half(64 << 20, 62 << 20, &gate_arg);
    let mut line = String::new();
    // B's 40 MiB query does not fit beside it: refused once its first MiB cannot be covered.
    let b = env.run_in("bot", &["/usr/bin/python3", "-c", HALF_CLIENT, &port, &(40 << 20).to_string(), "100", "-"]);
    let b = String::from_utf8_lossy(&b.stdout).to_string();
    assert!(b.contains("E 53200 tollgate: the agent's memory for large messages is spent (64 of 64 MiB"), "{b}");
    assert!(b.trim_end().ends_with("CLOSED"), "{b}");
    // Nor does a 30 MB row asked of the server; short statements go on meanwhile.
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT repeat('x', 30000000)");
    assert!(
        !ok && err.contains("FATAL:  tollgate: the agent's memory for large messages is spent"),
        "{out:.200} {err}"
    );
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT 'still served', length(repeat('x', 30000000))");
    assert!(ok && out == "still served|30000000", "{out} {err}");
    // With H gone, A's query goes through whole (and is refused for its length, as any text
    // over 1 MiB), and its session goes on. Once through, the message's memory is let go with
    // its share of the budget, though the start of A's next message is in the buffer that held
    // it.
    drop(h);
    std::thread::sleep(std::time::Duration::from_secs(1));
    std::fs::write(&gate, "").unwrap();
    let mut seen = String::new();
    while line.trim() != "PARTIAL" {
        line.clear();
        assert!(a_out.read_line(&mut line).unwrap() > 0, "the first client ended early");
        seen += &line;
    }
    let started = std::time::Instant::now();
    while rss() > at_start + (16 << 20) {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{} MiB held", (rss() - at_start) >> 20);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (out, err, ok) = psql(&env, &pg, "bot", "SELECT repeat('x', 30000000)");
    assert!(ok && out.len() == 30_000_000, "{} {err}", out.len());
    std::fs::write(format!("{gate_arg}2"), "").unwrap();
    let mut rest = seen;
    a_out.read_to_string(&mut rest).unwrap();
    assert!(a.0.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("E 42501") && !rest.contains("53200"), "{rest}");
    assert!(rest.contains("D b'\\x00\\x01\\x00\\x00\\x00\\x05after'"), "{rest}");
}

/// What a session holds of the budget for large messages, it may hold only so long while it
/// waits on its client (`--message-timeout`): a client that sends most of a large message and
/// waits, or asks for a large answer and stops reading, loses its session, and the others get
/// the memory back.
#[test]
fn a_session_holding_the_message_budget_waits_on_its_client_only_so_long() {
    use std::time::{Duration, Instant};
    if !privileged("a_session_holding_the_message_budget_waits_on_its_client_only_so_long") {
        return;
    }
    let pg = Postgres::start();
    let mut env = Env::new("pg-overstay");
    env.write_policy(&policy(&env, &pg, None));
    env.start_agent_with(&["--message-memory", "64", "--message-timeout", "2"]);
    let port = pg.port.to_string();
    // 62 MiB of a 64 MiB query, then a wait (holding what came and 1 MiB ahead, less the free
    // 256 KiB): told why once 2 s have passed, then closed.
    let started = Instant::now();
    let a = env.run_in(
        "bot",
        &["/usr/bin/python3", "-c", HALF_CLIENT, &port, &(64 << 20).to_string(), &(62 << 20).to_string(), "-"],
    );
    let a = String::from_utf8_lossy(&a.stdout).to_string();
    assert!(a.contains("E 53200 tollgate: this session held 63 MiB") && a.contains("waited 2 s"), "{a}");
    assert!(a.trim_end().ends_with("CLOSED") && started.elapsed() < Duration::from_secs(15), "{a}");
    // A 50 MB answer needs most of the budget: it is all free again.
    let row = "SELECT length(x) FROM (SELECT repeat('x', 50000000) AS x) s;\nSELECT repeat('x', 50000000);";
    let (out, err, ok) = psql(&env, &pg, "bot", row);
    assert!(ok && out.len() == 50_000_000 + "50000000\n".len(), "{} {err}", out.len());

    // A client stopped (SIGSTOP) while its 50 MB answer comes: the agent's write to it stalls
    // with the answer held, until the timeout ends that session.
    let url = format!("postgresql://bot@127.0.0.1:{port}/postgres");
    let query = "SELECT pg_sleep(2), repeat('x', 50000000)";
    // Resumed and ended however the test ends, before `env` is dropped: a stopped process
    // would keep the test's cgroup from being removed.
    struct Stopped(std::process::Child);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stalled = Stopped(env.spawn_in("bot", &["psql", "-X", "-At", &url, "-c", query]));
    // Whatever it prints once it goes on is not wanted.
    drop(stalled.0.stdout.take());
    std::thread::sleep(Duration::from_secs(1));
    let pid = nix::unistd::Pid::from_raw(stalled.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.log().matches("waited 2 s").count() < 2 {
        assert!(Instant::now() < deadline, "the stalled session was never ended:\n{}", env.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... while it is still stopped, the memory is back for the others.
    let (out, err, ok) = psql(&env, &pg, "bot", row);
    assert!(ok && out.len() == 50_000_000 + "50000000\n".len(), "{} {err}", out.len());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let status = stalled.0.wait().unwrap();
    assert!(!status.success(), "the stalled client's session was cut short");
}

/// The sessions of one identity hold at most their share of the budget for large messages
/// (`--message-memory-per-identity`): one agent holding large messages in one session cannot
/// take the rest from another identity by opening more.
#[test]
fn one_identity_holds_only_its_share_of_the_message_budget() {
    if !privileged("one_identity_holds_only_its_share_of_the_message_budget") {
        return;
    }
    let pg = Postgres::start();
    let mut env = Env::new("pg-share");
    env.write_policy(&policy(&env, &pg, None));
    env.start_agent_with(&["--message-memory", "128", "--message-memory-per-identity", "64"]);
    // The bot sends 62 MiB of a 64 MiB query and waits: its session holds 63 MiB.
    let held = half_client(&env, "bot", pg.port, 64 << 20, 62 << 20, "-");
    // Another session of the bot may not add a 30 MB answer, though the budget has room for it.
    let answer = |n: usize| format!("SELECT repeat('x', {n})");
    let (out, err, ok) = psql(&env, &pg, "bot", &answer(30_000_000));
    assert!(
        !ok && err.contains("FATAL:  tollgate: identity bot's sessions hold ")
            && err.contains("of the 64 MiB of the agent's memory for large messages that one identity may hold")
            && err.contains("--message-memory-per-identity"),
        "{:.200} {err}",
        out
    );
    // Another identity's 50 MB answer fits beside the bot's share.
    let (out, err, ok) = psql_as(&env, &pg, "admin", "x:y", &answer(50_000_000));
    assert!(ok && out.len() == 50_000_000, "{} {err}", out.len());
    // Once the bot's waiting session is gone, its share is free for its other sessions.
    drop(held);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (out, err, ok) = psql(&env, &pg, "bot", &answer(50_000_000));
    assert!(ok && out.len() == 50_000_000, "{} {err}", out.len());
}

/// Texts too long to classify on an event loop wait for a few classifier threads (one per
/// CPU), in one line per identity taken in turn: one identity's many sessions sending long
/// statements do not keep another identity's long statement waiting behind all of theirs.
#[test]
fn long_texts_of_one_identity_do_not_queue_another_behind_them() {
    if !privileged("long_texts_of_one_identity_do_not_queue_another_behind_them") {
        return;
    }
    let (env, pg) = setup("pg-turns");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // About 20 KB: classified off the event loop, a few tenths of a second each.
    let long = |n: usize| format!("SELECT 1 WHERE 1 IN ({});\n", vec!["1"; n].join(","));
    let flood = long(10_000).repeat(4);
    let trail = env.state_dir().join("audit/trail.jsonl");
    // (seq, identity, whether the text is long) of each statement record so far.
    let statements = || -> Vec<(u64, String, bool)> {
        let text = std::fs::read_to_string(&trail).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == "statement")
            .map(|r| {
                let long = r["statement"].as_str().is_some_and(|s| s.len() > 8192) || r["statement_bytes"].is_u64();
                (r["seq"].as_u64().unwrap(), r["identity"].as_str().unwrap_or_default().to_string(), long)
            })
            .collect()
    };
    let (bot, port) = (env.cgroup("bot"), pg.port);
    std::thread::scope(|scope| {
        let floods: Vec<_> = (0..4 * cpus).map(|_| scope.spawn(|| psql_in(&bot, port, "x:y", &flood))).collect();
        // Once the bot's first long texts are through (its others keep every classifier thread
        // busy and wait), the admin sends a short statement, whose record marks when its long
        // one is sent, and the long one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while statements().iter().filter(|(_, who, long)| who == "bot" && *long).count() < cpus {
            assert!(std::time::Instant::now() < deadline, "the bot's long statements were not classified");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (out, err, ok) = psql_as(&env, &pg, "admin", "x:y", &format!("SELECT 'admin starts';\n{}", long(5_000)));
        assert!(ok && out.ends_with('1'), "{out} {err}");
        let records = statements();
        let seq_of = |pred: &dyn Fn(&(u64, String, bool)) -> bool| records.iter().find(|r| pred(r)).unwrap().0;
        let start = seq_of(&|(_, who, long)| who == "admin" && !long);
        let done = seq_of(&|(_, who, long)| who == "admin" && *long);
        let bots_between = records.iter().filter(|(seq, who, _)| who == "bot" && (start..done).contains(seq)).count();
        let bots_total = records.iter().filter(|(_, who, _)| who == "bot").count();
        // In turn, the admin's text waits for the texts being classified when it came, and at
        // most one more of the bot's (one more still may end between the admin's two records);
        // first come first served, for every text queued before it (8 with 2 threads).
        assert!(
            bots_between <= cpus + 2,
            "{bots_between} of the bot's long statements were classified while the admin's waited \
             ({cpus} classifier threads; {bots_total} of the bot's statements so far)"
        );
        for f in floods {
            let (out, err, ok) = f.join().unwrap();
            assert!(ok && out == "1\n1\n1\n1", "{out} {err}");
        }
    });
}

#[test]
fn notices_notifications_and_parameter_changes_reach_the_client() {
    if !privileged("notices_notifications_and_parameter_changes_reach_the_client") {
        return;
    }
    let (env, pg) = setup("pg-async");
    let script = serde_json::json!([
        ["Q", "SET application_name = 'tg-app'"],
        ["Q", "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$"],
        ["Q", "LISTEN tg_channel"],
        ["Q", "NOTIFY tg_channel, 'ping'"],
        ["X"]
    ]);
    let out = raw_as(&env, &pg, "admin", serde_json::json!({}), script);
    // ParameterStatus for the new name, the notice, and the notification with its payload,
    // each where the server sent it.
    let lines: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("Z")).collect();
    let expected = [
        "Z I",
        "C SET",
        r"S b'application_name\x00tg-app\x00'",
        "Z I",
        "N 00000 hello from plpgsql",
        "C DO",
        "Z I",
        "C LISTEN",
        "Z I",
        "C NOTIFY",
    ];
    assert_eq!(lines[..expected.len()], expected, "{out}");
    assert_eq!(lines[expected.len()..], [r"A b'tg_channel\x00ping\x00'", "Z I", "CLOSED"], "{out}");
}

#[test]
fn protocol_tricks_fail_closed() {
    if !privileged("protocol_tricks_fail_closed") {
        return;
    }
    let (env, pg) = setup("pg-raw");
    let none = serde_json::json!({});
    // The message types the client got after logging in (the first ReadyForQuery).
    let after_first_line = |out: &str| -> String {
        let tags: String = out.lines().filter_map(|l| l.chars().next()).collect();
        tags.split_once('Z').map(|(_, rest)| rest.to_string()).unwrap_or_default()
    };
    // A session keeps at most 4,096 named statements: the next Parse is refused (nothing of
    // its batch reaches the server) until the client closes one.
    let script = serde_json::json!([
        ["Pmany", "s", 4096, "SELECT 1"],
        ["P", "extra", "SELECT 1"],
        ["B", "", "s7"],
        ["E", ""],
        ["S"],
        ["C", "s0"],
        ["S"],
        ["P", "extra", "SELECT 'fits'"],
        ["B", "", "extra"],
        ["E", ""],
        ["S"],
        // A Close earlier in the same batch makes room too.
        ["C", "s1"],
        ["P", "extra2", "SELECT 'fits too'"],
        ["B", "", "extra2"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    let after = after_first_line(&out);
    assert_eq!(after.matches("1Z").count(), 4096, "{}", &out[out.len().saturating_sub(2000)..]);

    // A Bind's counts are unsigned, as the server reads them. Read as signed, 32,768 NULL
    // parameters were none, the proxy took their bytes for the result formats, and a binary
    // number (a card number in an int8) was run past the text detectors and left in clear.
    let script = serde_json::json!([
        ["Ptypes", "", "SELECT 4111111111111111::int8 AS n WHERE $1::int4 IS NULL", 32768, 23],
        ["D", "S", ""],
        ["Bnulls", "", "", 32768, [1]],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let bound = raw_as(&env, &pg, "masked", none.clone(), script);
    let row = bound.lines().find(|l| l.starts_with("D ")).unwrap_or_else(|| panic!("no row: {bound}"));
    assert_eq!(row, r"D b'\x00\x01\xff\xff\xff\xff'", "the card number in binary is masked (NULL): {bound}");
    let tail: Vec<&str> = out.lines().skip_while(|l| !l.contains("too-many-prepared-statements")).collect();
    assert!(tail.first().is_some_and(|l| l.starts_with("E 42501")), "{tail:?}");
    assert_eq!(tail.iter().filter(|l| l.contains("too-many")).count(), 1, "{tail:?}");
    assert_eq!(tail.iter().filter(|l| l.starts_with('D')).count(), 2, "the refused batch ran nothing: {tail:?}");
    assert!(tail.iter().any(|l| l.contains("fits too")), "{tail:?}");
    // Startup parameters that change how the server reads SQL are refused.
    let out =
        raw(&env, &pg, serde_json::json!({"options": "-c standard_conforming_strings=off"}), serde_json::json!([]));
    assert!(out.contains("08004") && out.contains("\"options\" is not allowed"), "{out}");
    // SJIS under the server's Windows alias too: `SELECT E'Ё\'; DROP TABLE orders; --'`
    // is one string literal in UTF-8, but in SJIS the backslash is the second byte of a
    // character, the literal ends early and the DROP runs.
    for encoding in ["SJIS", "WIN932"] {
        let out = raw(&env, &pg, serde_json::json!({"client_encoding": encoding}), serde_json::json!([]));
        assert!(out.contains("08004") && out.contains("use UTF8"), "{encoding}: {out}");
    }
    // The server takes the last of two `database` parameters: the trail must not name the first.
    let out = raw(&env, &pg, serde_json::json!({"database": "template1"}), serde_json::json!([]));
    assert!(out.contains("08004") && out.contains("given twice"), "{out}");
    // ... and so is changing them later.
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["Q", "SET standard_conforming_strings = off"], ["X"]]));
    assert!(out.contains("42501") && out.contains("unparseable"), "{out}");
    // A text nested deeper than the parser can write out safely (it once aborted the agent):
    // refused, and the session goes on.
    let deep = format!("SELECT {}1", "1+".repeat(50_000));
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["Q", deep], ["Q", "SELECT 'still here'"], ["X"]]));
    assert!(out.contains("42501") && out.contains("unparseable") && out.contains("still here"), "{out}");
    // A function the classifier cannot look into may still change them: the server says so,
    // and the session ends before anything else is relayed.
    pg.direct(
        "CREATE FUNCTION flip() RETURNS text LANGUAGE sql \
         AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$",
    );
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["Q", "SELECT flip()"], ["Q", "SELECT 'after'"]]));
    assert!(out.contains("standard_conforming_strings = off") && out.contains("session ends"), "{out}");
    assert!(!out.contains("after"), "{out}");
    // ... or a setting of the role, from the start.
    pg.direct("ALTER ROLE app SET standard_conforming_strings = off");
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["X"]]));
    pg.direct("ALTER ROLE app RESET standard_conforming_strings");
    assert!(out.contains("cannot log in") && out.contains("standard_conforming_strings = off"), "{out}");
    // A harmless set_config first must not let the same shape through for a lexer setting
    // (the classification cache once keyed both alike).
    let script = serde_json::json!([
        ["Q", "SELECT set_config('application_name', 'off', false)"],
        ["Q", "SELECT set_config('standard_conforming_strings', 'off', false)"],
        ["Q", "SHOW standard_conforming_strings"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(out.matches("42501").count(), 1, "only the second is denied: {out}");
    assert!(out.contains("unparseable") && out.matches("\nD").count() == 2, "{out}");
    // A simple Query inside an unfinished extended batch would be answered out of order.
    let script = serde_json::json!([["P", "", "SELECT 1"], ["B", "", ""], ["E", ""], ["H"], ["Q", "SELECT 2"], ["S"]]);
    let out = raw(&env, &pg, none.clone(), script);
    let inside = "08P01 tollgate: a simple Query or FunctionCall inside an extended-protocol batch";
    assert!(out.contains(inside) && out.contains("CLOSED"), "{out}");
    // So would a function call, which is refused anyway; after a lone Flush, nothing is open.
    let script = serde_json::json!([["P", "", "SELECT 1"], ["B", "", ""], ["E", ""], ["F"], ["S"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains(inside) && !out.contains("function-call-protocol"), "{out}");
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["H"], ["Q", "SELECT 2"], ["X"]]));
    assert_eq!(after_first_line(&out), "TDCZC", "{out}");
    // A denial after work sent at a Flush comes after that work's answers, which are still on
    // their way, whether it is refused at the Sync or at a second Flush. As after an error of
    // the server's own, that work is rolled back with the batch, and the next query is answered
    // normally.
    for end in ["S", "H"] {
        let mut script = vec![
            serde_json::json!(["P", "", "SELECT pg_sleep(0.3)"]),
            serde_json::json!(["B", "", ""]),
            serde_json::json!(["E", ""]),
            serde_json::json!(["P", "", "INSERT INTO orders VALUES (9, 'i@example.com')"]),
            serde_json::json!(["B", "", ""]),
            serde_json::json!(["E", ""]),
            serde_json::json!(["H"]),
            serde_json::json!(["P", "", "DROP TABLE orders"]),
            serde_json::json!(["B", "", ""]),
            serde_json::json!(["E", ""]),
            serde_json::json!([end]),
        ];
        if end == "H" {
            script.push(serde_json::json!(["S"]));
        }
        script.extend([serde_json::json!(["Q", "SELECT 2"]), serde_json::json!(["X"])]);
        let out = raw(&env, &pg, none.clone(), serde_json::Value::Array(script));
        assert!(out.contains("42501 tollgate: statement denied by rule \"no-ddl\""), "{out}");
        assert_eq!(after_first_line(&out), "12DC12CEZTDCZC", "ending in {end}: {out}");
        assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "the INSERT was rolled back: {out}");
    }
    // If that work fails, the server skips the rest of the batch: the client gets that error
    // alone, as it would from the server (the refused statement would not have run either).
    let script = serde_json::json!([
        ["P", "", "SELECT 1/0"],
        ["B", "", ""],
        ["E", ""],
        ["H"],
        ["P", "", "DROP TABLE orders"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1EZC", "{out}");
    assert!(out.contains("22012") && !out.contains("42501"), "{out}");
    // Inside a transaction block, a denial in the extended protocol aborts it too: the
    // ReadyForQuery says so, and COMMIT rolls back.
    let script = in_transaction(serde_json::json!([
        ["Q", "INSERT INTO orders VALUES (8, 'h@example.com')"],
        ["P", "", "DROP TABLE orders"],
        ["B", "", ""],
        ["E", ""],
        ["S"]
    ]));
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("42501") && out.contains("\nZ E\n") && out.contains("C ROLLBACK"), "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // A Close the server skipped (an error earlier in its batch) leaves the statement there:
    // parsing the name again is refused as the server would, and a Bind still runs (and is
    // judged as) the old statement, which waits for approval. The client gives up after 5 s.
    let script = serde_json::json!([
        ["P", "s1", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["P", "", "SELECT 1/0"],
        ["B", "", ""],
        ["E", ""],
        ["C", "s1"],
        ["S"],
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("22012") && out.contains("duplicate-prepared-statement"), "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // A Close the server carried out frees the name.
    let script = serde_json::json!([
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["C", "s1"],
        ["S"],
        ["P", "s1", "SELECT 2"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1Z3Z12DCZC", "{out}");
    // A Parse the server rejected leaves the name free (a driver retries under the same name);
    // one it skipped after an error leaves the name what it was: here the unnamed statement
    // stays the DELETE, whose execution waits for approval (pipelined: the Bind waits for the
    // answer that settles it). The client gives up after 5 s.
    let script = serde_json::json!([
        ["P", "s5", "SELECT * FROM no_such_table"],
        ["S"],
        ["P", "s5", "SELECT 1"],
        ["B", "", "s5"],
        ["E", ""],
        ["S"],
        ["P", "", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["P", "s9", "SELECT * FROM no_such_table"],
        ["P", "", "SELECT 1"],
        ["S"],
        ["B", "", ""],
        ["E", ""],
        ["S"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    // (the script ends without Terminate: the session stays open until the client gives up)
    assert_eq!(after_first_line(&out), "EZ12DCZ1ZEZT", "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // COPY FROM STDIN parsed and run in one extended batch: the server ignores that batch's
    // Sync, yet its Parse took effect, so binding the unnamed statement again runs the COPY
    // again (judged as the COPY, not refused as unknown).
    let script = serde_json::json!([
        ["P", "", "COPY orders FROM STDIN"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["d"],
        ["c"],
        ["S"],
        ["B", "", ""],
        ["E", ""],
        ["S"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(after_first_line(&out).starts_with("12GCZ2G"), "{out}");
    assert!(!out.contains("unknown-prepared-statement"), "{out}");
    // A statement the session never parsed (SQL PREPARE makes such) is not the session's to
    // bind: its text was never judged as a statement of its own.
    let script =
        serde_json::json!([["Q", "PREPARE sqlprep AS SELECT 1"], ["B", "", "sqlprep"], ["E", ""], ["S"], ["X"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("42501") && out.contains("unknown-prepared-statement"), "{out}");
    // A batch refused for a later Bind asks nobody to approve an earlier one: no request is
    // made (it would hold the client for the rule's 60 s, past the script's 5 s).
    let script = serde_json::json!([
        ["P", "del", "DELETE FROM orders WHERE id = 1"],
        ["B", "", "del"],
        ["E", ""],
        ["B", "", "never_parsed"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let asked = || env.audit().iter().filter(|r| r["kind"] == "approval").count();
    let before = asked();
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("42501") && out.contains("unknown-prepared-statement"), "{out}");
    assert!(!out.contains("TIMEOUT"), "{out}");
    assert_eq!(asked(), before, "nobody was asked");
    // A portal the server dropped (at the end of its transaction) and an SQL cursor of the same
    // name: what the cursor returns is never recorded as the old portal's statement's result.
    let script = serde_json::json!([
        ["P", "s", "SELECT id FROM orders WHERE id < 100"],
        ["B", "c", "s"],
        ["E", "c"],
        ["S"],
        ["Q", "BEGIN"],
        ["Q", "DECLARE c CURSOR FOR SELECT email FROM orders"],
        ["E", "c"],
        ["S"],
        ["Q", "COMMIT"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("DECLARE CURSOR"), "{out}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    let old = records
        .iter()
        .rfind(|r| r["kind"] == "statement" && r["statement"] == "SELECT id FROM orders WHERE id < 100")
        .expect("the portal's statement");
    let results =
        records.iter().filter(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([old["seq"]]));
    assert_eq!(results.count(), 1, "only the batch that bound and ran it: {records:?}");
    // A portal fetched in parts across SAVEPOINT and RELEASE, which keep it on the server (a
    // JDBC client sends them as extended-protocol statements): each part refers to its
    // statement. ROLLBACK TO may drop it, so what follows is left unattributed.
    let script = in_transaction(serde_json::json!([
        ["P", "s", "SELECT id FROM orders WHERE id < 100 ORDER BY id"],
        ["B", "c", "s"],
        ["E", "c", 1],
        ["S"],
        ["P", "", "SAVEPOINT sp"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["E", "c", 1],
        ["S"],
        ["P", "", "RELEASE sp"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["E", "c", 0],
        ["S"],
        ["P", "", "SAVEPOINT sp2"],
        ["B", "", ""],
        ["E", ""],
        ["P", "", "ROLLBACK TO sp2"],
        ["B", "", ""],
        ["E", ""],
        ["S"],
        ["E", "c", 0],
        ["S"]
    ]));
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(out.matches("\ns ").count(), 2, "two parts suspended: {out}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = env.audit();
    let portal = records
        .iter()
        .rfind(|r| r["kind"] == "statement" && r["statement"] == "SELECT id FROM orders WHERE id < 100 ORDER BY id")
        .expect("the portal's statement");
    let counts: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "statement_result" && r["refs"] == serde_json::json!([portal["seq"]]))
        .map(|r| r["count"].clone())
        .collect();
    assert_eq!(
        counts,
        [1, 1, 0],
        "the parts before and after SAVEPOINT and RELEASE, none after ROLLBACK TO: {records:?}"
    );
    // Redefining a named statement the session did not close: refused before the server sees it.
    let script = serde_json::json!([
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["P", "s1", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("duplicate-prepared-statement"), "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2");
    // DISCARD ALL (or DEALLOCATE) drops the session's named statements on the server: the name
    // may be parsed again (pgx re-prepares its cache this way), and the old one is gone.
    let script = serde_json::json!([
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["Q", "DISCARD ALL"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["P", "s1", "SELECT 2"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1ZCZEZ12DCZC", "{out}");
    assert!(out.contains("unknown-prepared-statement"), "{out}");
    // In one batch: a Bind after the DISCARD ALL's is of a statement that is gone by then.
    let script = serde_json::json!([
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["P", "", "DISCARD ALL"],
        ["B", "", ""],
        ["E", ""],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1ZEZC", "{out}");
    assert!(out.contains("42501") && out.contains("unknown-prepared-statement"), "{out}");
    // A DEALLOCATE runs when its portal is executed, maybe batches after its Bind: here it
    // drops the statement parsed under that name in between.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        ["P", "s1", "SELECT 1"],
        ["S"],
        ["P", "", "DEALLOCATE s1"],
        ["B", "p1", ""],
        ["S"],
        ["C", "s1"],
        ["S"],
        ["P", "s1", "SELECT 2"],
        ["S"],
        ["E", "p1"],
        ["S"],
        ["B", "", "s1"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "CZ1Z12Z3Z1ZCZEZC", "{out}");
    assert!(out.contains("42501") && out.contains("unknown-prepared-statement"), "{out}");
    // A batch that parses the unnamed statement twice: each Bind is judged by the Parse before
    // it, so the DELETE waits for approval (the client gives up after 5 s) and never runs.
    let script = serde_json::json!([
        ["P", "", "SELECT 1"],
        ["B", "", ""],
        ["E", ""],
        ["P", "", "DELETE FROM orders WHERE id = 1"],
        ["B", "", ""],
        ["E", ""],
        ["S"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "T", "nothing of the batch was answered before the client left: {out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // Two Parses of the unnamed statement skipped after an error: the name stays the DELETE
    // from before them (undone last first), whose execution waits for approval.
    let script = serde_json::json!([
        ["P", "", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["P", "s9", "SELECT * FROM no_such_table"],
        ["P", "", "SELECT 1"],
        ["P", "", "SELECT 2"],
        ["S"],
        ["B", "", ""],
        ["E", ""],
        ["S"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1ZEZT", "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // SQL EXECUTE of a statement sent with Parse runs what that statement was judged as: its
    // approval rule holds each EXECUTE too.
    let script = serde_json::json!([["P", "s", "DELETE FROM orders WHERE id = 1"], ["S"], ["Q", "EXECUTE s"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1ZT", "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // ... also one a DEALLOCATE was bound (not yet run) to drop: the proxy forgot it, the
    // server did not.
    let script = serde_json::json!([
        ["P", "s", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["P", "", "DEALLOCATE s"],
        ["B", "p", ""],
        ["S"],
        ["Q", "EXECUTE s"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1Z12ZT", "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // ... and one an SQL PREPARE of its name made the proxy let go of: the server refuses
    // that PREPARE (the name is taken) and keeps the DELETE.
    let script = serde_json::json!([
        ["P", "s", "DELETE FROM orders WHERE id = 1"],
        ["S"],
        ["Q", "PREPARE s AS SELECT 1"],
        ["Q", "EXECUTE s"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "1ZEZT", "{out}");
    assert!(out.contains("already exists"), "{out}");
    assert_eq!(pg.direct("SELECT count(*) FROM orders"), "2", "{out}");
    // An EXECUTE of a statement the proxy did not see made is refused: its judgement is unknown.
    let out = raw(&env, &pg, none.clone(), serde_json::json!([["Q", "EXECUTE nosuch"], ["X"]]));
    assert!(out.contains("42501") && out.contains("unknown-prepared-statement"), "{out}");
    // An SQL PREPARE of a name the proxy believes a Parse made: the server refuses it unless it
    // dropped that statement unseen, so the proxy no longer trusts its text.
    let script = serde_json::json!([
        ["P", "twice", "SELECT 1"],
        ["S"],
        ["Q", "PREPARE twice AS SELECT 2"],
        ["B", "", "twice"],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("already exists") && out.contains("unknown-prepared-statement"), "{out}");
    // The server keeps the first 63 bytes of a name: longer ones are refused, since two of them
    // that begin alike would be one statement to the server and two to the proxy.
    let (long, longest) = ("a".repeat(64), "a".repeat(63));
    let script = serde_json::json!([
        ["P", long, "SELECT 1"],
        ["S"],
        ["P", longest, "SELECT 1"],
        ["B", "", longest],
        ["E", ""],
        ["S"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "EZ12DCZC", "{out}");
    assert!(out.contains("42501") && out.contains("name-too-long"), "{out}");
    // ... counting three bytes for each past ASCII, as some server encodings take them (`é` is
    // three bytes in EUC_JP).
    let parse = |name: &str| serde_json::json!([["P", name, "SELECT 1"], ["S"], ["X"]]);
    assert!(raw(&env, &pg, none.clone(), parse(&"é".repeat(22))).contains("name-too-long"));
    let out = raw(&env, &pg, none.clone(), parse(&"é".repeat(10)));
    assert_eq!(after_first_line(&out), "1ZC", "{out}");
    // A Parse whose text is past what is looked into (1 MiB) is refused as unparseable, and
    // recorded by its length and digest (its text read, copied and hashed off the event loop);
    // the session goes on.
    let huge = format!("SELECT 1 -- {}", "x".repeat(2 << 20));
    let script = serde_json::json!([["Plong", "huge", "SELECT 1 -- ", 2 << 20], ["S"], ["Q", "SELECT 7"], ["X"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("42501") && out.contains("unparseable"), "{out:.500}");
    assert_eq!(after_first_line(&out), "EZTDCZC", "{out:.500}");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(huge.as_bytes()));
    let records = env.audit();
    let cut = records.iter().find(|r| r["statement_sha256"] == digest.as_str()).expect("the huge Parse's record");
    assert_eq!(cut["statement_bytes"].as_u64(), Some(huge.len() as u64), "{cut}");
    let prepare = |n: usize| serde_json::json!([["Q", format!("PREPARE \"{}\" AS SELECT 1", "é".repeat(n))], ["X"]]);
    assert!(raw(&env, &pg, none.clone(), prepare(11)).contains("\"unparseable\""));
    assert!(raw(&env, &pg, none.clone(), prepare(10)).contains("C PREPARE"));
    // Under a client encoding other than UTF8, names must be ASCII: the server converts them,
    // and some conversions make one name of two. In EUC_JIS_2004 these bytes are `æ̀` as one
    // character; written as `æ` and a combining grave, the server's name would be the same.
    let euc = serde_json::json!({"client_encoding": "EUC_JIS_2004"});
    let precomposed = String::from_utf8(vec![0xe1, 0xa1, 0xab, 0xc4, 0xa1, 0xe1, 0xa1, 0xa1]).unwrap();
    for (encoding, name) in
        [(euc.clone(), precomposed.as_str()), (serde_json::json!({"client_encoding": "LATIN1"}), "é")]
    {
        let out = raw(&env, &pg, encoding.clone(), parse(name));
        assert!(out.contains("42501") && out.contains("name-encoding"), "{name}: {out}");
        let declare = serde_json::json!([["Q", format!("BEGIN; DECLARE \"{name}\" CURSOR FOR SELECT 1")], ["X"]]);
        assert!(raw(&env, &pg, encoding, declare).contains("name-encoding"), "{name}");
    }
    let out = raw(&env, &pg, euc, parse("ascii_only"));
    assert_eq!(after_first_line(&out), "1ZC", "{out}");
    // During COPY FROM STDIN the server takes any other message as part of the COPY, which
    // would leave the proxy counting one answer too many: refused, and the session closed.
    let script = serde_json::json!([["Q", "COPY orders FROM STDIN"], ["Q", "SELECT 1"], ["X"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(after_first_line(&out).starts_with("GE"), "{out}");
    assert!(out.contains("08P01 tollgate: only CopyData, CopyDone or CopyFail"), "{out}");
    // ... also after the first of two COPYs in one Query.
    let script = serde_json::json!([["Q", "COPY orders FROM STDIN; COPY orders FROM STDIN"], ["c"], ["Q", "SELECT 1"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("08P01 tollgate: only CopyData, CopyDone or CopyFail"), "{out}");
    // A COPY FROM STDIN must come with its Sync: one sent at a Flush would be taken into it.
    let script =
        serde_json::json!([["P", "", "COPY orders FROM STDIN"], ["B", "", ""], ["E", ""], ["H"], ["S"], ["X"]]);
    let out = raw(&env, &pg, none.clone(), script);
    assert_eq!(after_first_line(&out), "EZC", "{out}");
    assert!(out.contains("42501") && out.contains("copy-at-flush"), "{out}");
    // ... and so must an Execute of a COPY portal an earlier batch bound.
    let script = serde_json::json!([
        ["Q", "BEGIN"],
        ["P", "", "COPY orders FROM STDIN"],
        ["B", "cp", ""],
        ["S"],
        ["E", "cp"],
        ["H"],
        ["S"],
        ["Q", "ROLLBACK"],
        ["X"]
    ]);
    let out = raw(&env, &pg, none.clone(), script);
    assert!(out.contains("copy-at-flush") && out.contains("C ROLLBACK") && !out.contains("TIMEOUT"), "{out}");
    // A COPY that never started (its error instead) leaves the next query alone.
    let script = serde_json::json!([["Q", "COPY orders (nosuchcolumn) FROM STDIN"], ["Q", "SELECT 1"], ["X"]]);
    let out = raw(&env, &pg, none, script);
    assert_eq!(after_first_line(&out), "EZTDCZC", "{out}");
}
