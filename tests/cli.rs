//! Command-line tests that need no privileges: policy checking and help.
use std::{path::Path, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn tollgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn every_policy_in_the_repo_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let (ok, out, err) = tollgate(&["policy", "check", path.to_str().unwrap()]);
            assert!(ok, "{}: {err}", path.display());
            assert!(out.contains(": ok"), "{out}");
            n += 1;
        }
    }
    assert!(n >= 2, "policies/ should hold the demo and example policies");
}

#[test]
fn bad_policies_name_file_location_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.yaml",
            "apiVersion: tollgate/v1alpha1\nkind: Policy\nmetadata: { name: x }\nspec:\n  modes: enforce\n",
            "5:3: spec: unknown field `modes`",
        ),
        ("syntax.yaml", "apiVersion: [\n", "1:13:"),
        (
            "root.yaml",
            "apiVersion: tollgate/v1alpha1\nkind: Policy\nmetadata: { name: x }\nspec:\n  identities:\n    - { name: a, cgroup: / }\n",
            "spec.identities[0].cgroup: the root cgroup cannot be enrolled",
        ),
        (
            "grant.yaml",
            "apiVersion: tollgate/v1alpha1\nkind: Policy\nmetadata: { name: x }\nspec:\n  grants:\n    - { name: g, to: [identity:nobody], resources: [r] }\n",
            "spec.grants[0].to[0]: \"identity:nobody\" matches no identity",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = tollgate(&["policy", "check", path.to_str().unwrap()]);
        assert!(!ok, "{name} should be rejected");
        assert!(err.contains(path.to_str().unwrap()), "error must name the file: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err:?}");
    }
    let (ok, _, err) = tollgate(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/policy.yaml: cannot read policy"), "{err}");
}

#[test]
fn help_explains_the_commands() {
    let (ok, out, _) = tollgate(&["--help"]);
    assert!(ok);
    for cmd in ["run", "exec", "status", "uninstall", "policy", "audit"] {
        assert!(out.contains(cmd), "--help lacks {cmd}: {out}");
    }
    let (ok, out, _) = tollgate(&["run", "--help"]);
    assert!(ok);
    assert!(out.contains("--state-dir") && out.contains("/var/lib/tollgate") && out.contains("SIGHUP"), "{out}");
    assert!(out.contains("--message-memory <MIB>") && out.contains("[default: 512]"), "{out}");
    // A budget below one message of the protocol's largest size could never pass one.
    let (ok, _, err) = tollgate(&["run", "--policy", "/nonexistent", "--message-memory", "63"]);
    assert!(!ok && err.contains("invalid value '63' for '--message-memory <MIB>': 63 is not in 64..=1048576"), "{err}");
    assert!(
        out.contains("--message-memory-per-identity <MIB>") && out.contains("a quarter of --message-memory"),
        "{out}"
    );
    let (ok, _, err) = tollgate(&[
        "run",
        "--policy",
        "/nonexistent",
        "--message-memory",
        "100",
        "--message-memory-per-identity",
        "101",
    ]);
    assert!(
        !ok && err.contains("--message-memory-per-identity (101 MiB) is more than --message-memory (100 MiB)"),
        "{err}"
    );
    assert!(out.contains("--message-timeout <SECS>") && out.contains("[default: 30]"), "{out}");
    let (ok, _, err) = tollgate(&["run", "--policy", "/nonexistent", "--message-timeout", "0"]);
    assert!(!ok && err.contains("invalid value '0' for '--message-timeout <SECS>'"), "{err}");
}

#[test]
fn verify_reports_a_missing_trail() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = tollgate(&["audit", "verify", "--state-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("trail.jsonl"), "{err}");
}

/// A trail rotated by the agent, its oldest segments removed as `keep` asks, verifies as one
/// chain from where it now starts; one whose oldest remaining segment is removed by hand does not.
#[test]
fn verify_checks_a_rotated_trail_as_one_chain() {
    use tollgate::audit::{AuditLog, Kind, Record, Rotation};

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let audit_dir = tollgate::audit::dir(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (log, writer) = AuditLog::open(&audit_dir).unwrap();
    log.set_rotation(Rotation { size: 2000, keep: 2 });
    // The writer looks at the size at most once a second: records until the third rotation.
    let segments = || {
        let mut names: Vec<String> = std::fs::read_dir(&audit_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("trail-"))
            .collect();
        names.sort_by_key(|n| n.trim_start_matches("trail-").trim_end_matches(".jsonl").parse::<u64>().unwrap());
        names
    };
    let started = std::time::Instant::now();
    let removed = loop {
        let mut r = Record::new(Kind::Connect);
        r.detail = Some("x".repeat(500));
        rt.block_on(log.append_durable(r)).unwrap();
        let trail = std::fs::read_to_string(tollgate::audit::trail_path(&audit_dir)).unwrap();
        if let Some(line) = trail.lines().find(|l| l.contains("\"removed_through\"")) {
            break line.to_string();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "no segment was removed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(log);
    writer.join();
    assert!(removed.contains("spec.audit.rotate.keep is 2"), "{removed}");
    let kept = segments();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let (ok, out, err) = tollgate(&["audit", "verify", "--state-dir", state]);
    assert!(ok && out.contains("(3 files; records before") && out.contains("were removed by rotation"), "{out}{err}");

    std::fs::remove_file(audit_dir.join(&kept[0])).unwrap();
    let (ok, _, err) = tollgate(&["audit", "verify", "--state-dir", state]);
    assert!(!ok && err.contains(&format!("{}: the trail starts at record seq", kept[1])), "{err}");
    assert!(err.contains("no audit_rotated record says they were removed"), "{err}");
}

#[test]
fn audit_tail_prints_readably_as_json_and_follows() {
    use std::io::{BufRead, BufReader};
    use tollgate::audit::{AuditLog, Kind, Record};

    let dir = tempfile::tempdir().unwrap();
    let audit_dir = tollgate::audit::dir(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (log, writer) = AuditLog::open(&audit_dir).unwrap();
    for pid in [11, 22, 33] {
        let mut r = Record::new(Kind::Connect);
        r.pid = Some(pid);
        r.verdict = Some("deny".into());
        rt.block_on(log.append_durable(r)).unwrap();
    }
    let state = dir.path().to_str().unwrap();
    let (ok, out, _) = tollgate(&["audit", "tail", "--state-dir", state, "-n", "2"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("connect") && lines[0].contains("pid=22") && lines[0].contains("verdict=deny"), "{out}");
    let (ok, out, _) = tollgate(&["audit", "tail", "--state-dir", state, "--json", "-n", "1"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["seq"].as_u64(), v["pid"].as_u64()), (Some(3), Some(33)));

    let mut follow = Command::new(BIN)
        .args(["audit", "tail", "--state-dir", state, "-n", "1", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Lines arrive through a channel so a silent follower fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || rx.recv_timeout(std::time::Duration::from_secs(10)).expect("audit tail --follow printed nothing");
    // The last existing record first: the follower has read the trail up to here.
    let line = next();
    assert!(line.contains("pid=33"), "{line}");
    let mut r = Record::new(Kind::AgentStop);
    r.detail = Some("followed".into());
    rt.block_on(log.append_durable(r)).unwrap();
    let line = next();
    assert!(line.contains("agent_stop") && line.contains("followed"), "{line}");
    // A torn write the follower has read part of, then cut back (as the agent does at a
    // restart): the next record is printed whole, not glued to the remains.
    let trail = tollgate::audit::trail_path(&audit_dir);
    let len = std::fs::metadata(&trail).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&trail).unwrap();
    std::io::Write::write_all(&mut f, b"{\"torn\":").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    f.set_len(len).unwrap();
    drop(f);
    // Values a client controls cannot fake a record, or a field, on the terminal.
    let mut r = Record::new(Kind::Connect);
    r.comm = Some("x\n     9 2026-01-01T00:00:00Z connect verdict=allow".into());
    r.error = Some("\x1b[2Kgone \u{202e}txet".into());
    rt.block_on(log.append_durable(r)).unwrap();
    let line = next();
    follow.kill().unwrap();
    let _ = follow.wait();
    assert!(line.contains("connect") && !line.contains("unreadable"), "{line}");
    assert!(line.contains(r#"comm="x\n     9 2026"#) && line.contains(r#"error="\u{1b}[2Kgone"#), "{line}");
    assert!(line.contains(r"\u{202e}txet") && !line.contains('\u{1b}'), "{line}");
    drop(log);
    writer.join();
    let (ok, out, _) = tollgate(&["audit", "verify", "--state-dir", state]);
    assert!(ok && out.contains("5 records (1 file)"), "{out}");
}

#[test]
fn approvals_without_a_running_agent_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let (ok, _, err) = tollgate(&["approvals", "list", "--state-dir", state]);
    assert!(!ok);
    assert!(err.contains("control.sock") && err.contains("is the agent running"), "{err}");
    let (ok, _, err) = tollgate(&["approvals", "approve", "not-a-number", "--state-dir", state]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    let (ok, out, _) = tollgate(&["approvals", "--help"]);
    assert!(ok && out.contains("list") && out.contains("approve") && out.contains("deny"), "{out}");
}

#[test]
fn explain_shows_what_the_rules_see_and_which_decides() {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/postgres.yaml");
    let policy = policy.to_str().unwrap();
    let explain = |sql: &[&str]| tollgate(&[&["policy", "explain", policy, "--grant", "bot-orders"], sql].concat());
    let (ok, out, err) = explain(&["SELECT pg_terminate_backend(1)", "DELETE FROM orders WHERE id = 3"]);
    assert!(ok, "{err}");
    assert!(out.contains("kinds:         select, side_effect"), "{out}");
    assert!(out.contains("decision:      deny by rule \"bot-orders.default\""), "{out}");
    assert!(out.contains("decision:      approve by rule \"deletes-need-approval\", held up to 600 s"), "{out}");
    let (ok, out, _) = explain(&["--json", "DELETE FROM orders WHERE true"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && v["rule"] == "writes-need-where" && v["where_missing"] == true, "{out}");
    // With no SQL argument, one query string comes from standard input.
    let mut child = Command::new(BIN)
        .args(["policy", "explain", policy, "--grant", "bot-orders", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"SELECT 1; SELEC").unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["decision"].as_str(), v["rule"].as_str()), (Some("deny"), Some("unparseable")), "{v}");
    let (ok, _, err) = tollgate(&["policy", "explain", policy, "--grant", "nope", "SELECT 1"]);
    assert!(!ok && err.contains("no grant \"nope\"; its grants are: bot-orders"), "{err}");
}
