//! Small helpers: the workspace root and running commands loudly.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted_by_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// A first Ctrl-C (or SIGTERM) makes the next command this process would start fail instead
/// of killing it on the spot, so the error path stops what it started (agents, servers) and
/// removes its cgroups and bpffs pins. A second one kills as usual.
pub fn stop_on_interrupt() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(interrupted_by_signal), SaFlags::SA_RESETHAND, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("cannot install a signal handler")?;
    }
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: stopping what was started and cleaning up");
    }
    Ok(())
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs a command, echoing it first; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    check_interrupted()?;
    eprintln!("+ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    check_interrupted()?;
    let out = cmd.output().with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}\n{}", show(cmd), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn cargo_build(release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["build", "-p", "tollgate"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

pub fn tollgate_bin(release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" }).join("tollgate")
}

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mountpoint = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Removes a cgroup tree bottom-up (after its processes have exited).
pub fn remove_cgroup_tree(dir: &Path) {
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
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

/// Starts `tollgate run` and returns once it logs "ready". Its log lines are printed with
/// `echo` in front, or dropped.
pub fn start_agent(
    bin: &Path,
    policy: &Path,
    state: &Path,
    log_filter: &str,
    echo: Option<&'static str>,
) -> anyhow::Result<std::process::Child> {
    start_agent_cmd(Command::new(bin), policy, state, log_filter, echo)
}

/// [`start_agent`] with the agent's command given: `cmd` is the binary, or a wrapper (valgrind,
/// say) with the binary as its last argument; `run` and its options are appended.
pub fn start_agent_cmd(
    mut cmd: Command,
    policy: &Path,
    state: &Path,
    log_filter: &str,
    echo: Option<&'static str>,
) -> anyhow::Result<std::process::Child> {
    use std::io::BufRead;
    let mut child = cmd
        .args(["run", "--policy"])
        .arg(policy)
        .arg("--state-dir")
        .arg(state)
        .env("TOLLGATE_LOG", log_filter)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(prefix) = echo {
                println!("{prefix}{line}");
            }
            if line.contains("ready") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rx.recv_timeout(std::time::Duration::from_millis(100)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited before it was ready ({status})");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("the agent was not ready after 30 s");
        }
    }
    Ok(child)
}

/// Stops a process this task started: SIGTERM, then waits for it.
pub fn stop(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// Stops the agent (if still running) and removes what it pinned and attached.
pub fn stop_and_uninstall(agent: Option<std::process::Child>, bin: &Path, state: &Path) {
    if let Some(a) = agent {
        stop(a);
    }
    // Clean-up runs from Drop: say what is left behind rather than fail.
    match Command::new(bin).args(["uninstall", "--state-dir"]).arg(state).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "warning: `{} uninstall --state-dir {}` failed; its pins under /sys/fs/bpf/tollgate stay: {}",
            bin.display(),
            state.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("warning: cannot run {} uninstall: {e}; its pins stay", bin.display()),
    }
}
