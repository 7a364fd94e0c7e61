//! Privileged end-to-end tests: real eBPF programs in this kernel, a real agent, real loopback
//! servers and real clients (curl, python sockets) in test-owned cgroups.
mod common;

use std::net::SocketAddr;

use common::{Env, PY_ERRNO, Server, privileged};
use nix::sys::signal::Signal;

/// A policy with one identity `bot` in cgroup `<root>/bot`; `resources` are (name, address);
/// `bot` is granted the resources named in `granted`.
fn policy(env: &Env, unlisted: &str, resources: &[(&str, SocketAddr)], granted: &[&str], mode: &str) -> String {
    let res: String =
        resources.iter().map(|(n, a)| format!("    - {{ name: {n}, protocol: tcp, address: \"{a}\" }}\n")).collect();
    let grants = if granted.is_empty() {
        String::new()
    } else {
        format!("    - {{ name: bot-grant, to: [group:agents], resources: [{}] }}\n", granted.join(", "))
    };
    format!(
        r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: {name} }}
spec:
  mode: {mode}
  unlisted: {unlisted}
  proxy: {{ listen: ["127.0.0.1:0", "[::1]:0"] }}
  identities:
    - {{ name: bot, cgroup: {cg}, groups: [agents] }}
  resources:
{res}  grants:
{grants}"#,
        name = env.name,
        cg = env.cgroup("bot"),
    )
}

fn py(call: &str) -> String {
    format!("{PY_ERRNO}\n{call}\n")
}

fn curl_args(url: &str) -> Vec<String> {
    ["curl", "-sS", "-m", "5", "-w", "\nlocal_port=%{local_port}\n", url].iter().map(|s| s.to_string()).collect()
}

#[test]
fn curl_is_redirected_through_the_proxy_and_audited() {
    if !privileged("curl_is_redirected_through_the_proxy_and_audited") {
        return;
    }
    let mut env = Env::new("redirect");
    // When the request reaches the server, the session record must already be on disk.
    let trail = env.state_dir().join("audit/trail.jsonl");
    let server = Server::start_with(
        "127.0.0.1:0",
        std::sync::Arc::new(move || {
            let text = std::fs::read_to_string(&trail).unwrap_or_default();
            if text.contains("\"kind\":\"session_start\"") { "durable" } else { "missing" }.to_string()
        }),
    );
    env.write_policy(&policy(&env, "deny", &[("web", server.addr)], &["web"], "enforce"));
    env.start_agent();

    let url = format!("http://{}/hello", server.addr);
    let args = curl_args(&url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.run_in("bot", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "curl failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("check=durable"), "session record not on disk before forwarding: {stdout}");
    // The server saw a connection from the proxy, not from curl's own socket.
    let local_port: u16 = stdout.lines().find_map(|l| l.strip_prefix("local_port=")).unwrap().parse().unwrap();
    let seen = server.peers.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{stdout}");
    assert_ne!(seen[0].port(), local_port, "connection went around the proxy: {stdout}");

    let connect = env.wait_audit("kernel connect record", |r| r["kind"] == "connect" && r["comm"] == "curl");
    assert_eq!(connect["verdict"], "redirect");
    assert_eq!(connect["resource"], "web");
    assert_eq!(connect["identity"], "bot");
    assert_eq!(connect["rule"], "bot-grant");
    assert_eq!(connect["destination"], server.addr.to_string());
    // exe comes from /proc and is absent if curl exited before the event was read.
    assert!(connect["exe"].is_null() || connect["exe"] == "/usr/bin/curl", "{connect}");
    assert!(connect["cgroup"].as_str().unwrap().ends_with("/bot"), "{connect}");
    let start = env.wait_audit("session start", |r| r["kind"] == "session_start");
    assert_eq!(start["pid"], connect["pid"]);
    assert_eq!(start["exe"], "/usr/bin/curl");
    let end = env.wait_audit("session end", |r| r["kind"] == "session_end");
    assert!(end["bytes_up"].as_u64().unwrap() > 50, "{end}");
    assert!(end["bytes_down"].as_u64().unwrap() > 50, "{end}");

    // A process outside the cgroup is untouched: the server sees its own port, no record.
    let direct = std::net::TcpStream::connect(server.addr).unwrap();
    let my_port = direct.local_addr().unwrap().port();
    drop(direct);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(server.peers.lock().unwrap().iter().any(|p| p.port() == my_port));
    assert_eq!(env.audit().iter().filter(|r| r["kind"] == "connect").count(), 1);

    // curl ran as root: its records say it could undo its own enforcement, and the log says so.
    let held = start["privileges"].as_array().cloned().unwrap_or_default();
    assert!(held.contains(&"uid 0".into()) && held.contains(&"CAP_NET_ADMIN".into()), "{start}");
    env.wait_log("holds privileges that let it undo its own enforcement");
    // Under another uid, without those capabilities, nothing is said.
    let call = py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", server.addr.port()));
    let out = env.run_in(
        "bot",
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &call],
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"), "{out:?}");
    let nobody = env.wait_audit("nobody's session", |r| r["kind"] == "session_start" && r["uid"] == 65534);
    assert!(nobody["privileges"].is_null(), "{nobody}");

    let status = env.tollgate(&["status", "--state-dir", &env.state_arg()]);
    assert!(status.status.success(), "{status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("enforcing"));
}

#[test]
fn getpeername_half_close_ipv6_and_v4_mapped() {
    if !privileged("getpeername_half_close_ipv6_and_v4_mapped") {
        return;
    }
    let v4 = Server::start("127.0.0.1:0");
    let v6 = Server::start("[::1]:0");
    let mut env = Env::new("ipv6");
    env.write_policy(&policy(&env, "deny", &[("v4", v4.addr), ("v6", v6.addr)], &["v4", "v6"], "enforce"));
    env.start_agent();

    // IPv4: getpeername shows the original destination; the half-closed request still gets
    // its answer, and the server saw the proxy's port rather than the client's.
    let (out, err, ok) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", v4.addr.port())));
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("OK ('127.0.0.1', {})", v4.addr.port())), "{out}");
    assert!(out.contains("got=4"), "half-closed request must reach the server: {out}");
    let client_port: u16 = out.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(out.contains("peer=127.0.0.1:"), "{out}");
    assert!(!out.contains(&format!("peer=127.0.0.1:{client_port} ")), "went around the proxy: {out}");

    // IPv6 ::1.
    let (out, err, _) = env.python_in("bot", &py(&format!("attempt(socket.AF_INET6, ('::1', {}))", v6.addr.port())));
    assert!(out.starts_with(&format!("OK ('::1', {}", v6.addr.port())), "{out} {err}");
    assert!(out.contains("got=4"), "{out}");
    assert_eq!(v6.connections(), 1);

    // IPv4-mapped IPv6 takes connect6 and must be treated like IPv4.
    let (out, err, _) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET6, ('::ffff:127.0.0.1', {}))", v4.addr.port())));
    assert!(out.starts_with(&format!("OK ('::ffff:127.0.0.1', {}", v4.addr.port())), "{out} {err}");
    assert!(out.contains("got=4"), "{out}");
    assert_eq!(v4.connections(), 2);

    env.wait_audit("v6 redirect", |r| r["kind"] == "connect" && r["hook"] == "connect6" && r["resource"] == "v6");
    env.wait_audit("mapped redirect", |r| {
        r["kind"] == "connect" && r["hook"] == "connect6" && r["resource"] == "v4" && r["verdict"] == "redirect"
    });
    let sessions = |env: &Env| env.audit().iter().filter(|r| r["kind"] == "session_end").count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sessions(&env) < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(sessions(&env), 3);
}

#[test]
fn udp_to_resources_unlisted_and_ungranted_are_denied() {
    if !privileged("udp_to_resources_unlisted_and_ungranted_are_denied") {
        return;
    }
    let web = Server::start("127.0.0.1:0");
    let secret = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.1:0");
    let mut env = Env::new("deny");
    env.write_policy(&policy(&env, "deny", &[("web", web.addr), ("secret", secret.addr)], &["web"], "enforce"));
    env.start_agent();

    let port = web.addr.port();
    // UDP towards a protected resource: sendto and connect are refused.
    let (out, err, _) = env
        .python_in("bot", &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}), socket.SOCK_DGRAM, 'sendto')")));
    assert_eq!(out, "ERR EPERM", "{err}");
    let (out, _, _) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}), socket.SOCK_DGRAM)")));
    assert_eq!(out, "ERR EPERM");
    let (out, _, _) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET6, ('::1', {port}), socket.SOCK_DGRAM, 'sendto')")));
    assert_eq!(out, "ERR EPERM", "unlisted UDP over IPv6 with unlisted: deny");

    // A resource that is not granted to this identity.
    let (out, _, _) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", secret.addr.port())));
    assert_eq!(out, "ERR EPERM");
    // An unlisted destination under `unlisted: deny`.
    let (out, _, _) =
        env.python_in("bot", &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", other.addr.port())));
    assert_eq!(out, "ERR EPERM");
    // TCP Fast Open connects from sendto; the kernel runs the same connect hook.
    for (what, port) in [("ungranted", secret.addr.port()), ("unlisted", other.addr.port())] {
        let (out, err, _) = env.python_in(
            "bot",
            &py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}), socket.SOCK_STREAM, 'fastopen')")),
        );
        assert_eq!(out, "ERR EPERM", "fast open to the {what} destination: {err}");
    }
    assert_eq!(secret.connections() + other.connections() + web.connections(), 0);

    let udp = env.wait_audit("udp deny", |r| r["l4"] == "udp" && r["hook"] == "sendmsg4");
    assert_eq!(udp["verdict"], "deny");
    assert_eq!(udp["reason"], "udp_to_resource");
    assert_eq!(udp["resource"], "web");
    let ng = env.wait_audit("not granted", |r| r["resource"] == "secret");
    assert_eq!((ng["verdict"].as_str(), ng["rule"].as_str()), (Some("deny"), Some("no-grant")));
    let ul = env.wait_audit("unlisted", |r| r["destination"] == other.addr.to_string());
    assert_eq!((ul["verdict"].as_str(), ul["rule"].as_str()), (Some("deny"), Some("spec.unlisted")));
}

#[test]
fn sigkill_fails_closed_and_restart_restores_service() {
    if !privileged("sigkill_fails_closed_and_restart_restores_service") {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let mut env = Env::new("failclosed");
    env.write_policy(&policy(&env, "allow", &[("web", server.addr)], &["web"], "enforce"));
    env.start_agent();
    let call = py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", server.addr.port()));
    let (out, _, _) = env.python_in("bot", &call);
    assert!(out.starts_with("OK"), "{out}");
    assert_eq!(server.connections(), 1);

    env.stop_agent(Signal::SIGKILL);
    // Enforcement survives the agent: the connection is refused, never sent around the proxy.
    let (out, _, _) = env.python_in("bot", &call);
    assert_eq!(out, "ERR ECONNREFUSED");
    assert_eq!(server.connections(), 1, "a connection went around the dead proxy");
    let status = env.tollgate(&["status", "--state-dir", &env.state_arg()]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("still pinned"), "{status:?}");

    env.start_agent();
    assert!(env.log().contains("adopted=true"), "restart must adopt the pinned state");
    let (out, _, _) = env.python_in("bot", &call);
    assert!(out.starts_with("OK"), "{out}");
    assert_eq!(server.connections(), 2);
    let verify = env.tollgate(&["audit", "verify", "--state-dir", &env.state_arg()]);
    assert!(verify.status.success(), "{verify:?}");

    // A clean stop keeps enforcement pinned; uninstall removes it and the cgroup is free again.
    let st = env.stop_agent(Signal::SIGTERM);
    assert!(st.success());
    let (out, _, _) = env.python_in("bot", &call);
    assert_eq!(out, "ERR ECONNREFUSED");
    let un = env.tollgate(&["uninstall", "--state-dir", &env.state_arg()]);
    assert!(un.status.success(), "{un:?}");
    let (out, _, _) = env.python_in("bot", &call);
    assert!(out.starts_with("OK"), "after uninstall the process is not enforced: {out}");
    assert_eq!(server.connections(), 3);
}

#[test]
fn sighup_reloads_and_rejects_a_bad_policy() {
    if !privileged("sighup_reloads_and_rejects_a_bad_policy") {
        return;
    }
    let a = Server::start("127.0.0.1:0");
    let b = Server::start("127.0.0.1:0");
    let mut env = Env::new("reload");
    env.write_policy(&policy(&env, "deny", &[("a", a.addr), ("b", b.addr)], &["a"], "enforce"));
    env.start_agent();
    let call = |port: u16| py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}))"));
    assert!(env.python_in("bot", &call(a.addr.port())).0.starts_with("OK"));
    assert_eq!(env.python_in("bot", &call(b.addr.port())).0, "ERR EPERM");

    // A connection established before the reload lives on after it, although the new policy
    // no longer grants its resource.
    let go = env.dir.path().join("go");
    let held = env.spawn_in(
        "bot",
        &["python3", "-c", &format!(
            "import socket,time,os\ns=socket.create_connection(('127.0.0.1',{}),timeout=10)\nprint('connected',flush=True)\nt=time.time()\nwhile not os.path.exists('{go}') and time.time()-t<20: time.sleep(0.05)\ns.sendall(b'ping');s.shutdown(socket.SHUT_WR)\nprint(s.recv(4096).decode().split('\\r\\n\\r\\n')[-1].strip())",
            a.addr.port(),
            go = go.display()
        )],
    );
    env.wait_audit("held session", |r| {
        r["kind"] == "session_start" && r["resource"] == "a" && r["comm"] == "python3" && r["session"] == 2
    });

    env.write_policy(&policy(&env, "deny", &[("a", a.addr), ("b", b.addr)], &["b"], "enforce"));
    env.signal(Signal::SIGHUP);
    env.wait_log("policy reloaded");
    // Only now may the held client send its request.
    std::fs::write(&go, "").unwrap();
    let out = held.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("connected") && out.contains("got=4"), "established session broken by reload: {out}");
    assert_eq!(env.python_in("bot", &call(a.addr.port())).0, "ERR EPERM");
    assert!(env.python_in("bot", &call(b.addr.port())).0.starts_with("OK"));

    std::fs::write(env.policy_path(), "apiVersion: tollgate/v1alpha1\nkind: Policy\nbogus: 1\n").unwrap();
    env.signal(Signal::SIGHUP);
    env.wait_log("policy reload rejected");
    assert!(env.log().contains("unknown field `bogus`"), "{}", env.log());
    // The previous policy is still in force.
    assert!(env.python_in("bot", &call(b.addr.port())).0.starts_with("OK"));
    assert_eq!(env.python_in("bot", &call(a.addr.port())).0, "ERR EPERM");
    env.wait_audit("rejection record", |r| r["kind"] == "policy_rejected");
}

#[test]
fn monitor_mode_audits_without_blocking() {
    if !privileged("monitor_mode_audits_without_blocking") {
        return;
    }
    let secret = Server::start("127.0.0.1:0");
    let other = Server::start("127.0.0.1:0");
    let mut env = Env::new("monitor");
    env.write_policy(&policy(&env, "deny", &[("secret", secret.addr)], &[], "monitor"));
    env.start_agent();
    let call = |port: u16| py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}))"));
    assert!(env.python_in("bot", &call(secret.addr.port())).0.starts_with("OK"));
    assert!(env.python_in("bot", &call(other.addr.port())).0.starts_with("OK"));
    let r = env.wait_audit("monitored resource", |r| r["kind"] == "connect" && r["resource"] == "secret");
    assert_eq!((r["verdict"].as_str(), r["would_deny"].as_bool()), (Some("redirect"), Some(true)));
    let s = env.wait_audit("monitored session", |r| r["kind"] == "session_start");
    assert_eq!(s["would_deny"], true);
    let u = env.wait_audit("monitored unlisted", |r| r["destination"] == other.addr.to_string());
    assert_eq!((u["verdict"].as_str(), u["would_deny"].as_bool()), (Some("allow"), Some(true)));
}

#[test]
fn two_agents_side_by_side_and_audit_verify_catches_an_edit() {
    if !privileged("two_agents_side_by_side_and_audit_verify_catches_an_edit") {
        return;
    }
    let s1 = Server::start("127.0.0.1:0");
    let s2 = Server::start("127.0.0.1:0");
    let mut e1 = Env::new("side1");
    let mut e2 = Env::new("side2");
    e1.write_policy(&policy(&e1, "deny", &[("one", s1.addr)], &["one"], "enforce"));
    e2.write_policy(&policy(&e2, "deny", &[("two", s2.addr)], &["two"], "enforce"));
    e1.start_agent();
    e2.start_agent();
    let call = |port: u16| py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}))"));
    assert!(e1.python_in("bot", &call(s1.addr.port())).0.starts_with("OK"));
    assert!(e2.python_in("bot", &call(s2.addr.port())).0.starts_with("OK"));
    // Each agent enforces only its own cgroup and policy.
    assert_eq!(e1.python_in("bot", &call(s2.addr.port())).0, "ERR EPERM");
    assert_eq!(e2.python_in("bot", &call(s1.addr.port())).0, "ERR EPERM");

    e1.wait_audit("session", |r| r["kind"] == "session_end");
    e1.stop_agent(Signal::SIGTERM);
    let ok = e1.tollgate(&["audit", "verify", "--state-dir", &e1.state_arg()]);
    assert!(ok.status.success(), "{ok:?}");
    let trail = e1.state_dir().join("audit/trail.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let edited = text.replacen("\"verdict\":\"redirect\"", "\"verdict\":\"allow\"", 1);
    assert_ne!(edited, text);
    std::fs::write(&trail, edited).unwrap();
    let bad = e1.tollgate(&["audit", "verify", "--state-dir", &e1.state_arg()]);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("was altered") && msg.contains("1 break; checked to the end"), "{msg}");
}

#[test]
fn grant_expiry_is_enforced_by_the_kernel() {
    if !privileged("grant_expiry_is_enforced_by_the_kernel") {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let mut env = Env::new("expiry");
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(8);
    let text = policy(&env, "deny", &[("web", server.addr)], &["web"], "enforce").replace(
        "resources: [web] }",
        &format!(
            "resources: [web], expires: \"{}\" }}",
            expires.format(&time::format_description::well_known::Rfc3339).unwrap()
        ),
    );
    assert!(text.contains("expires"), "{text}");
    env.write_policy(&text);
    env.start_agent();
    let call = py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", server.addr.port()));
    assert!(time::OffsetDateTime::now_utc() < expires - time::Duration::seconds(2), "agent start took too long");
    assert!(env.python_in("bot", &call).0.starts_with("OK"));
    let wait = expires - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
    std::thread::sleep(std::time::Duration::from_millis(wait.whole_milliseconds().max(0) as u64));
    assert_eq!(env.python_in("bot", &call).0, "ERR EPERM");
    let r = env.wait_audit("expired grant", |r| r["reason"] == "grant_expired");
    assert_eq!((r["verdict"].as_str(), r["rule"].as_str()), (Some("deny"), Some("bot-grant")));
    assert_eq!(server.connections(), 1);
}

#[test]
fn uids_narrow_an_identity_and_other_users_are_untouched() {
    if !privileged("uids_narrow_an_identity_and_other_users_are_untouched") {
        return;
    }
    let server = Server::start("127.0.0.1:0");
    let mut env = Env::new("uids");
    // bot is root (uid 0) in its cgroup; `unlisted: deny` refuses root's unlisted connections.
    env.write_policy(
        &policy(&env, "deny", &[], &[], "enforce").replace("groups: [agents] }", "uids: [0], groups: [agents] }"),
    );
    env.start_agent();
    let call = py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {}))", server.addr.port()));
    assert_eq!(env.python_in("bot", &call).0, "ERR EPERM");
    // nobody in the same cgroup is not the identity: not enrolled, untouched, not recorded.
    let out = env.run_in(
        "bot",
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &call],
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("OK"), "{out}");
    assert_eq!(server.connections(), 1);
    env.wait_audit("root's denial", |r| r["kind"] == "connect" && r["uid"] == 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!env.audit().iter().any(|r| r["uid"] == 65534), "an unenrolled user was recorded");
}

#[test]
fn reload_that_reorders_and_removes_identities_keeps_attribution_right() {
    if !privileged("reload_that_reorders_and_removes_identities_keeps_attribution_right") {
        return;
    }
    let a = Server::start("127.0.0.1:0");
    let b = Server::start("127.0.0.1:0");
    let mut env = Env::new("reorder");
    let two = |first: &str, second: &str, grants: &str| {
        format!(
            r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: reorder }}
spec:
  unlisted: deny
  proxy: {{ listen: ["127.0.0.1:0"] }}
  identities:
{first}{second}  resources:
    - {{ name: a, protocol: tcp, address: "{a}" }}
    - {{ name: b, protocol: tcp, address: "{b}" }}
  grants:
{grants}"#,
            a = a.addr,
            b = b.addr
        )
    };
    let one = format!("    - {{ name: one, cgroup: {} }}\n", env.cgroup("one"));
    let other = format!("    - {{ name: other, cgroup: {} }}\n", env.cgroup("other"));
    env.write_policy(&two(
        &one,
        &other,
        "    - { name: one-a, to: [identity:one], resources: [a] }\n    - { name: other-b, to: [identity:other], resources: [b] }\n",
    ));
    env.start_agent();
    let call = |port: u16| py(&format!("attempt(socket.AF_INET, ('127.0.0.1', {port}))"));
    assert!(env.python_in("one", &call(a.addr.port())).0.starts_with("OK"));
    assert!(env.python_in("other", &call(b.addr.port())).0.starts_with("OK"));

    // Swap the identities' order and drop "one": "other" keeps exactly its own grant.
    env.write_policy(&two(&other, "", "    - { name: other-b, to: [identity:other], resources: [b] }\n"));
    env.signal(Signal::SIGHUP);
    env.wait_log("policy reloaded");
    assert!(env.python_in("other", &call(b.addr.port())).0.starts_with("OK"));
    assert_eq!(env.python_in("other", &call(a.addr.port())).0, "ERR EPERM");
    // "one" is no longer enrolled: its cgroup was detached, it is untouched.
    assert!(env.python_in("one", &call(a.addr.port())).0.starts_with("OK"));
    let sessions: Vec<_> = env.audit().into_iter().filter(|r| r["kind"] == "session_start").collect();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert_eq!((sessions[2]["identity"].as_str(), sessions[2]["resource"].as_str()), (Some("other"), Some("b")));
    let denied = env.wait_audit("other denied a", |r| r["verdict"] == "deny" && r["resource"] == "a");
    assert_eq!(denied["identity"], "other");
}
