//! `cargo xtask demo`: the agent on policies/demo.yaml against throwaway loopback servers.
use std::{
    io::{Read, Write},
    net::TcpListener,
    process::{Child, Command},
    thread,
    time::Duration,
};

use anyhow::Context;

use crate::{
    pg::TempPostgres,
    setup,
    util::{self, cgroup2_mount, remove_cgroup_tree, root},
};

const CGROUP: &str = "/tollgate-demo/planner";
const GRANTED: &str = "127.0.0.1:18080";
const PROTECTED: &str = "127.0.0.1:18081";
const UNLISTED: &str = "127.0.0.1:18082";
const PG_PORT: u16 = 15432;
/// `credentials.password_file` of orders-db in policies/demo.yaml.
const SECRET: &str = "/run/tollgate-demo/orders-db.secret";

/// A loopback HTTP server that answers with its name and the peer it saw.
fn server(addr: &str, name: &'static str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("demo server cannot bind {addr} (is it in use?)"))?;
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let body = format!("{name}: hello; I saw the connection come from {peer}\n");
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok(())
}

fn section(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// What a step must show. A demo that went on past a step that did not do what it says would
/// demonstrate nothing, so it stops there with an error.
struct Shows {
    ok: bool,
    has: &'static [&'static str],
    lacks: &'static [&'static str],
}

/// Exits 0 and prints all of `has`.
fn succeeds(has: &'static [&'static str]) -> Shows {
    Shows { ok: true, has, lacks: &[] }
}

/// Exits non-zero and prints all of `has`.
fn fails(has: &'static [&'static str]) -> Shows {
    Shows { ok: false, has, lacks: &[] }
}

fn show(cmd: &mut Command, shows: Shows) -> anyhow::Result<()> {
    let line = util::show(cmd).replace(&root().display().to_string(), ".");
    println!("$ {line}");
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    print!("{text}");
    println!("(exit {})", out.status.code().unwrap_or(-1));
    let want = if shows.ok { "succeed" } else { "fail" };
    anyhow::ensure!(out.status.success() == shows.ok, "demo step `{line}` was meant to {want}");
    if let Some(h) = shows.has.iter().find(|h| !text.contains(*h)) {
        anyhow::bail!("demo step `{line}` was meant to print {h:?}");
    }
    if let Some(l) = shows.lacks.iter().find(|l| text.contains(*l)) {
        anyhow::bail!("demo step `{line}` printed {l:?}, which it must not");
    }
    Ok(())
}

struct Cleanup {
    agent: Option<Child>,
    state: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        util::stop_and_uninstall(self.agent.take(), &self.bin, &self.state);
        if let Ok(m) = cgroup2_mount() {
            remove_cgroup_tree(&m.join("tollgate-demo"));
        }
        let _ = std::fs::remove_file(SECRET);
    }
}

/// Waits for the one pending approval request and returns its id.
fn wait_pending(bin: &std::path::Path, state: &str) -> anyhow::Result<String> {
    for _ in 0..200 {
        let out = Command::new(bin).args(["approvals", "list", "--json", "--state-dir", state]).output()?;
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = list.first().and_then(|r| r["id"].as_u64()) {
            return Ok(id.to_string());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("the DELETE never showed up as a pending approval request")
}

pub fn demo() -> anyhow::Result<()> {
    setup::ensure()?;
    util::cargo_build(false)?;
    let bin = util::tollgate_bin(false);
    let policy = root().join("policies/demo.yaml");
    let state = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    server(GRANTED, "orders-api")?;
    server(PROTECTED, "payroll-db")?;
    server(UNLISTED, "somewhere-else")?;

    // The PostgreSQL resource of policies/demo.yaml; its secret lives where the policy says.
    let pg = TempPostgres::start(PG_PORT).context("starting the demo PostgreSQL on 127.0.0.1:15432")?;
    pg.sql("CREATE TABLE orders (id int PRIMARY KEY, email text, total numeric); INSERT INTO orders VALUES (1, 'ada@example.com', 42.00), (2, 'bob@example.com', 17.50)")?;
    pg.write_secret(std::path::Path::new(SECRET))?;

    section("starting the agent on policies/demo.yaml");
    let child = util::start_agent(&bin, &policy, &state, "info", Some("  [agent] "))?;
    let mut cleanup = Cleanup { agent: Some(child), state: state.clone(), bin: bin.clone() };

    let curl = |url: &str| {
        let mut c = Command::new(&bin);
        c.args(["exec", "--cgroup", CGROUP, "--", "curl", "-sS", "-m", "5", url]);
        c
    };
    section(&format!("planner-bot (cgroup {CGROUP}) -> orders-api {GRANTED}: granted, redirected through the proxy"));
    show(&mut curl(&format!("http://{GRANTED}/orders")), succeeds(&["orders-api: hello"]))?;
    println!("(the server saw the proxy's address, while curl still believes it talks to {GRANTED})");

    section(&format!("planner-bot -> payroll-db {PROTECTED}: protected, not granted -> refused in the kernel"));
    // Its server listens: a failed connect is the kernel's refusal.
    show(&mut curl(&format!("http://{PROTECTED}/")), fails(&["Failed to connect"]))?;

    section(&format!("planner-bot -> {UNLISTED}: no resource names it, `unlisted: deny` -> refused"));
    show(&mut curl(&format!("http://{UNLISTED}/")), fails(&["Failed to connect"]))?;

    section("a process outside the enrolled cgroup is untouched");
    show(
        Command::new("curl").args(["-sS", "-m", "5", &format!("http://{GRANTED}/")]),
        succeeds(&["orders-api: hello"]),
    )?;

    let psql = |sql: &str| {
        let mut c = Command::new(&bin);
        c.args([
            "exec",
            "--cgroup",
            CGROUP,
            "--",
            "psql",
            "-X",
            "postgresql://planner@127.0.0.1:15432/postgres",
            "-c",
            sql,
        ]);
        c
    };
    section("planner-bot -> orders-db (PostgreSQL 127.0.0.1:15432), no password: the proxy logs in with the real one");
    let masked = Shows { ok: true, has: &["*.com"], lacks: &["ada@", "bob@"] };
    show(&mut psql("SELECT id, email, total FROM orders"), masked)?;
    section("planner-bot: DROP TABLE -> denied by rule no-ddl (SQLSTATE 42501), never reaches the server");
    show(&mut psql("DROP TABLE orders"), fails(&["no-ddl"]))?;
    section("planner-bot: a DELETE hidden in a CTE, without WHERE -> denied by rule writes-need-where");
    show(
        &mut psql("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone"),
        fails(&["writes-need-where"]),
    )?;
    section("planner-bot: UPDATE with WHERE on orders -> allowed by rule order-writes");
    show(&mut psql("UPDATE orders SET total = 43.00 WHERE id = 1"), succeeds(&["UPDATE 1"]))?;
    section(
        "masking: the email column keeps its last 4 characters under any name; values computed from it are masked whole",
    );
    let masked = Shows { ok: true, has: &["*.com"], lacks: &["ada@", "bob@"] };
    show(&mut psql("SELECT id, email, email AS contact, lower(email) AS lowered FROM orders ORDER BY id"), masked)?;
    section("masking: content detectors catch values in free text");
    let detected = Shows { ok: true, has: &["[REDACTED]"], lacks: &["ann@", "555-0100"] };
    show(&mut psql("SELECT 'call 415-555-0100 or mail ann@example.com' AS note"), detected)?;

    section("planner-bot: DELETE on orders -> held by rule deletes-need-approval until a human decides");
    let st = state.display().to_string();
    println!("$ tollgate exec --cgroup {CGROUP} -- psql ... -c 'DELETE FROM orders WHERE id = 2' &   (waits)");
    let held = psql("DELETE FROM orders WHERE id = 2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let id = wait_pending(&bin, &st)?;
    println!("(from another terminal, as root:)");
    show(Command::new(&bin).args(["approvals", "list", "--state-dir", &st]), succeeds(&["DELETE FROM orders"]))?;
    show(
        Command::new(&bin).args([
            "approvals",
            "approve",
            &id,
            "--reason",
            "customer asked, ticket OPS-42",
            "--state-dir",
            &st,
        ]),
        succeeds(&[]),
    )?;
    let out = held.wait_with_output()?;
    println!("(the held psql now finishes:)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    print!("{text}");
    anyhow::ensure!(out.status.success() && text.contains("DELETE 1"), "the approved DELETE did not run");

    thread::sleep(Duration::from_millis(300));
    section("status");
    show(Command::new(&bin).args(["status", "--state-dir", &st]), succeeds(&[]))?;
    section("the audit trail (kernel-level connection records and proxied sessions)");
    show(Command::new(&bin).args(["audit", "tail", "--state-dir", &st, "-n", "30"]), succeeds(&["approval"]))?;
    section("tamper evidence");
    show(Command::new(&bin).args(["audit", "verify", "--state-dir", &st]), succeeds(&[]))?;

    section("stopping the agent and removing enforcement");
    if let Some(a) = cleanup.agent.take() {
        util::stop(a);
    }
    show(Command::new(&bin).args(["uninstall", "--state-dir", &st]), succeeds(&[]))?;
    drop(cleanup);
    println!("\nThe audit trail stays in {st}/audit.");
    Ok(())
}
