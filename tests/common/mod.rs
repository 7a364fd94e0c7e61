//! Test harness: a real agent on a test-owned cgroup, state dir and pin path; real loopback
//! servers; clients started inside the cgroup with `tollgate exec`.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// True when privileged tests can run. Under CI=true a missing privilege is a failure, never a
/// silent pass; elsewhere the test says loudly that it skipped.
pub fn privileged(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let cgroup2 = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.contains(" - cgroup2 ")))
        .unwrap_or(false);
    let why = if !root {
        Some("not running as root")
    } else if !cgroup2 {
        Some("no cgroup2 mount")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: privileged test cannot run under CI: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why} (this would fail under CI=true)");
            false
        }
    }
}

pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("cgroup2 mount")
}

/// One agent with its own state dir, cgroup tree and pins. Dropping it stops the agent,
/// uninstalls its pins and removes its cgroups.
pub struct Env {
    pub name: String,
    pub dir: tempfile::TempDir,
    /// cgroup tree root for this test, relative to the mount (e.g. /tollgate-test-123-redirect).
    pub cgroup_root: String,
    agent: Option<Child>,
    log: Arc<Mutex<String>>,
    ready_rx: Option<mpsc::Receiver<()>>,
}

impl Env {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(&format!("tollgate-{name}-")).tempdir().unwrap();
        Self {
            name: name.to_string(),
            dir,
            cgroup_root: format!("/tollgate-test-{}-{name}", std::process::id()),
            agent: None,
            log: Arc::default(),
            ready_rx: None,
        }
    }

    /// A cgroup path for this test (relative to the cgroup2 mount).
    pub fn cgroup(&self, sub: &str) -> String {
        format!("{}/{sub}", self.cgroup_root)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    pub fn write_policy(&self, yaml: &str) {
        std::fs::write(self.policy_path(), yaml).unwrap();
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Starts the agent with these further `run` options.
    pub fn start_agent_with(&mut self, options: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let mut child = Command::new(BIN)
            .args(["run", "--policy"])
            .arg(self.policy_path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(options)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate run");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        let (tx, rx) = mpsc::channel();
        let name = self.name.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent {name}] {line}");
                // Into the log first, so a test woken by "ready" finds the line there.
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
                if line.contains("ready") {
                    let _ = tx.send(());
                }
            }
        });
        self.agent = Some(child);
        self.ready_rx = Some(rx);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let rx = self.ready_rx.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return;
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited before ready ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "agent not ready after 30s:\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the agent log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "agent log never showed {needle:?}:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes a new policy, sends SIGHUP and waits until the agent reports this reload.
    pub fn reload(&self, yaml: &str) {
        let before = self.log().matches("policy reloaded").count();
        self.write_policy(yaml);
        self.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("policy reloaded").count() == before {
            assert!(Instant::now() < deadline, "reload not reported:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_pid(&self) -> i32 {
        self.agent.as_ref().expect("agent running").id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.agent_pid()), sig).unwrap();
    }

    /// Sends a signal and waits for the agent to exit.
    pub fn stop_agent(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        self.signal(sig);
        let mut child = self.agent.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not exit after {sig}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn tollgate(&self, args: &[&str]) -> Output {
        Command::new(BIN).args(args).output().unwrap()
    }

    pub fn state_arg(&self) -> String {
        self.state_dir().display().to_string()
    }

    /// Runs a command inside one of this test's cgroups.
    pub fn run_in(&self, sub: &str, cmd: &[&str]) -> Output {
        let cg = self.cgroup(sub);
        let mut args = vec!["exec", "--cgroup", &cg, "--"];
        args.extend_from_slice(cmd);
        Command::new(BIN).args(&args).stdin(Stdio::null()).output().unwrap()
    }

    /// Starts a command inside one of this test's cgroups without waiting for it.
    pub fn spawn_in(&self, sub: &str, cmd: &[&str]) -> Child {
        let cg = self.cgroup(sub);
        let mut args = vec!["exec", "--cgroup", &cg, "--"];
        args.extend_from_slice(cmd);
        Command::new(BIN).args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap()
    }

    /// Runs a Python snippet inside a cgroup; returns (stdout, stderr, success).
    pub fn python_in(&self, sub: &str, code: &str) -> (String, String, bool) {
        let out = self.run_in(sub, &["python3", "-c", code]);
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            out.status.success(),
        )
    }

    /// Every audit record so far, as JSON values. A last line without its newline is one the
    /// agent is still writing: left for the next read.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let path = self.state_dir().join("audit/trail.jsonl");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Waits for an audit record matching `pred` (kernel events are written asynchronously).
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.audit().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {what}; trail:\n{}",
                std::fs::read_to_string(self.state_dir().join("audit/trail.jsonl")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = Command::new(BIN).args(["uninstall", "--state-dir"]).arg(self.state_dir()).output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!("uninstall failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        remove_cgroup_tree(&cgroup2_mount().join(self.cgroup_root.trim_start_matches('/')));
    }
}

/// Removes a cgroup tree bottom-up (its processes have exited by now).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while the last process in it is still being reaped.
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("could not remove cgroup {}", dir.display());
}

/// A loopback TCP server that answers every connection with the peer address it saw, after
/// reading the request (to "\r\n\r\n" or EOF: a half-closed client still gets its answer).
pub struct Server {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

/// Runs when a request arrives; its answer goes into the response body as `check=...`.
pub type Check = Arc<dyn Fn() -> String + Send + Sync>;

impl Server {
    pub fn start(bind: &str) -> Self {
        Self::start_with(bind, Arc::new(String::new))
    }

    pub fn start_with(bind: &str, check: Check) -> Self {
        let listener = TcpListener::bind(bind).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        p.lock().unwrap().push(peer);
                        let check = check.clone();
                        thread::spawn(move || serve(stream, peer, check));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, peers, stop }
    }

    pub fn connections(&self) -> usize {
        self.peers.lock().unwrap().len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut s: TcpStream, peer: SocketAddr, check: Check) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                req.extend_from_slice(&buf[..n]);
                if req.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let body = format!("peer={peer} got={} check={}\n", req.len(), check());
    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = s.write_all(resp.as_bytes());
}

pub const PY_ERRNO: &str = r#"
import socket, sys, errno
def attempt(family, addr, kind=socket.SOCK_STREAM, op="connect"):
    s = socket.socket(family, kind)
    s.settimeout(5)
    try:
        if op == "connect":
            s.connect(addr)
            peer, local = s.getpeername(), s.getsockname()[1]
            if kind == socket.SOCK_STREAM:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                print("OK", peer, local, data.decode().split("\r\n\r\n")[-1].strip())
            else:
                print("OK", peer)
        elif op == "fastopen":
            # TCP Fast Open: sendto connects, with the data in the SYN.
            s.sendto(b"x", socket.MSG_FASTOPEN, addr)
            print("OK sent")
        else:
            s.sendto(b"x", addr)
            print("OK sent")
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, e.errno))
"#;

/// A throwaway CA (`ca.crt`, `ca.key`) and a certificate for 127.0.0.1 it signed
/// (`server.crt`, `server.key`), written in `dir`.
pub fn test_certificates(dir: &Path) {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &p("ca.key"), "-out", &p("ca.crt"), "-subj", "/CN=tollgate test CA", "-days", "2"],
        ]
        .concat(),
    );
    openssl(
        &[&["req"][..], &ec, &["-keyout", &p("server.key"), "-out", &p("server.csr"), "-subj", "/CN=127.0.0.1"]]
            .concat(),
    );
    std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("server.crt"),
        "-days",
        "2",
        "-extfile",
        &p("san.ext"),
    ]);
}

/// A throwaway PostgreSQL 15 server (initdb + pg_ctl as the `postgres` user) on a free loopback
/// port, with SCRAM-SHA-256 authentication and one login `app` whose password only the agent's
/// secret file holds.
pub struct Postgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub password: String,
    /// The secret file for the policy (mode 0600, root-owned).
    pub secret_file: PathBuf,
    /// With TLS: the CA that signed the server's certificate (for 127.0.0.1).
    pub tls_ca: Option<PathBuf>,
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// A server that accepts only TLS connections on TCP (`hostssl`; `hostnossl ... reject`).
    pub fn start_with_tls() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(tls: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("tollgate-pg-").tempdir().unwrap();
        let pg = nix::unistd::User::from_name("postgres").unwrap().expect("user postgres (package postgresql-15)");
        nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
        let password = format!("s3cret-{}", std::process::id());
        let pwfile = dir.path().join("initdb-pw");
        std::fs::write(&pwfile, &password).unwrap();
        nix::unistd::chown(&pwfile, Some(pg.uid), Some(pg.gid)).unwrap();
        let data = dir.path().join("data");
        let run = |args: &[&str]| {
            let out = Command::new("runuser").args(["-u", "postgres", "--"]).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "scram-sha-256",
            "-U",
            "app",
            "--pwfile",
            pwfile.to_str().unwrap(),
        ]);
        std::fs::remove_file(&pwfile).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display());
        let mut tls_ca = None;
        if tls {
            let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
            test_certificates(dir.path());
            for f in ["server.key", "server.crt"] {
                nix::unistd::chown(Path::new(&p(f)), Some(pg.uid), Some(pg.gid)).unwrap();
            }
            std::fs::set_permissions(p("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
            opts += &format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", p("server.crt"), p("server.key"));
            tls_ca = Some(dir.path().join("ca.crt"));
        }
        run(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            dir.path().join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&secret_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        Self { port, dir, password, secret_file, tls_ca }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs SQL directly (not through the agent) as `app`.
    pub fn direct(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-At",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "app",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &format!("{PG_BIN}/pg_ctl"),
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
