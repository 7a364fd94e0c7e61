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
}

#[test]
fn verify_reports_a_missing_trail() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = tollgate(&["audit", "verify", "--state-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("trail.jsonl"), "{err}");
}
