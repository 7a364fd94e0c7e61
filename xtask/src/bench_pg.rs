//! `cargo xtask bench postgres`: pgbench through tollgate, side by side with direct,
//! pgbouncer (session mode) and haproxy (tcp), in one run.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    callgrind::Callgrind,
    pg::{PG_BIN, TempPostgres, as_postgres, free_port},
    setup,
    util::{self, cgroup2_mount, remove_cgroup_tree},
};

/// Everything the benchmark started; stopped and removed on drop (the server, a field, last).
struct Rig {
    children: Vec<Child>,
    bin: PathBuf,
    state: PathBuf,
    /// The `--baseline` agent's binary and state directory.
    baseline: Option<(PathBuf, PathBuf)>,
    cgroup_dir: PathBuf,
    /// The agents' state dirs live here: the server's directory belongs to `postgres`, and an
    /// agent refuses a state dir another user could tamper with.
    _states: tempfile::TempDir,
    pg: TempPostgres,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in self.children.drain(..) {
            util::stop(c);
        }
        util::stop_and_uninstall(None, &self.bin, &self.state);
        if let Some((bin, state)) = &self.baseline {
            util::stop_and_uninstall(None, bin, state);
        }
        remove_cgroup_tree(&self.cgroup_dir);
    }
}

/// Waits up to 30 s: under valgrind on a busy machine a proxy takes seconds to start.
fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not start listening on port {port} within 30 s")
}

/// Opens N logged-in PostgreSQL sessions (startup, then wait for ReadyForQuery) and idles.
const IDLE_CLIENTS: &str = r#"
import socket, struct, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    body = struct.pack("!i", 196608) + b"user\0app\0database\0postgres\0\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    buf = b""
    while b"Z\0\0\0\x05" not in buf:
        d = s.recv(65536)
        if not d:
            sys.exit("closed during login")
        buf += d
    socks.append(s)
print("READY", flush=True)
time.sleep(60)
"#;

/// Logs `n` idle sessions in through the enrolled cgroup; returns them once all are in.
fn idle_sessions(bin: &Path, cgroup: &str, port: &str, n: usize) -> anyhow::Result<Child> {
    let mut idle = Command::new(bin)
        .args(["exec", "--cgroup", cgroup, "--", "/usr/bin/python3", "-c", IDLE_CLIENTS, &n.to_string(), port])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(idle.stdout.take().context("stdout")?), &mut line)?;
    if !line.starts_with("READY") {
        let _ = idle.kill();
        let _ = idle.wait();
        bail!("idle clients did not log in: {line}");
    }
    Ok(idle)
}

/// The agent's resident memory per idle logged-in session, as a printable line: the average
/// over 128 sessions, and what the second 64 added. The first sessions on each event loop also
/// set up what the loop keeps (its allocator arena, buffers it reuses); the average includes
/// that, the second figure does not, but it moves with the heap's growth in steps.
fn idle_memory(bin: &Path, cgroup: &str, port: &str, agent_pid: u32, label: &str) -> anyhow::Result<String> {
    let stop = |mut c: Child| {
        let _ = c.kill();
        let _ = c.wait();
    };
    let n = 64;
    let before = rss_kib(agent_pid)?;
    let first = idle_sessions(bin, cgroup, port, n)?;
    thread::sleep(Duration::from_millis(500));
    let measured = (|| {
        let with_first = rss_kib(agent_pid)?;
        let second = idle_sessions(bin, cgroup, port, n)?;
        thread::sleep(Duration::from_millis(500));
        let with_both = rss_kib(agent_pid);
        stop(second);
        anyhow::Ok((with_first, with_both?))
    })();
    stop(first);
    let (with_first, with_both) = measured?;
    Ok(format!(
        "\n{label}: {before} KiB resident, {with_first} KiB with {n} idle logged-in sessions, \
         {with_both} KiB with {}: {:.1} KiB per idle connection (the second {n} added {:.1} each)",
        2 * n,
        (with_both as f64 - before as f64) / (2 * n) as f64,
        (with_both as f64 - with_first as f64) / n as f64
    ))
}

/// A schema whose every table has a column the masked grant's rules name (`email`): each
/// masked session's catalog lookup returns WIDE_TABLES × WIDE_COLUMNS column names.
const WIDE_TABLES: usize = 500;
const WIDE_COLUMNS: usize = 20;
fn wide_schema() -> String {
    format!(
        "CREATE SCHEMA wide; DO $$ BEGIN FOR t IN 1..{WIDE_TABLES} LOOP \
         EXECUTE format('CREATE TABLE wide.t%s (email text, %s)', t, \
         (SELECT string_agg(format('column_number_%s int', c), ', ') FROM generate_series(2, {WIDE_COLUMNS}) c)); \
         END LOOP; END $$"
    )
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).context("no VmRSS")
}

/// CPU time (ns) a process's live threads have run, from the scheduler's accounting (a thread
/// that exits takes its share with it, so a difference can come out short, never negative).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// User and kernel CPU time (µs) of a process's children that have ended and been waited for
/// (a server's backends, once they exit), from /proc: clock ticks, so long runs only.
fn children_cpu_us(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0.0) };
    // Fields after the command name, which may hold spaces: cutime and cstime are 16th and 17th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |n: usize| rest.split_whitespace().nth(n - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let tick_us = 1e6 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    (field(16) * tick_us, field(17) * tick_us)
}

/// How many child processes `pid` has.
fn children(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).map_or(0, |c| c.split_whitespace().count())
}

/// User and kernel CPU time (µs) of this process's children that have ended (pgbench).
fn own_children_cpu_us() -> (f64, f64) {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let us = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
            (us(u.user_time()), us(u.system_time()))
        }
        Err(_) => (f64::NAN, f64::NAN),
    }
}

/// The process `runuser` started, or `pid` itself when it has no child.
fn exec_child(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(pid)
}

/// Targets of one pgbench cell.
const TARGET_NAMES: [&str; TARGETS] = ["direct", "tg", "tg-w", "tg+m", "pgbouncer", "haproxy", "base"];
const TARGETS: usize = 7;
/// Index of the `--baseline` agent's target.
const BASE: usize = 6;

/// The proxied targets, in table order: tg, tg-w, tg+m, pgbouncer, haproxy, then base if run.
fn proxied(with_base: bool) -> impl Iterator<Item = usize> {
    (1..=5).chain(with_base.then_some(BASE))
}

/// One row of a table with a column per proxied target.
fn proxy_row(mode: &str, clients: u32, value: impl Fn(usize) -> f64, with_base: bool, precision: usize) -> String {
    let mut row = format!("{mode:<9} {clients:>7}");
    for t in proxied(with_base) {
        let width = TARGET_NAMES[t].len().max(8);
        row += &format!(" {:>width$.precision$}", value(t));
    }
    row
}

fn print_proxy_table(title: &str, rows: &[String], with_base: bool) {
    let mut head = format!("{:<9} {:>7}", "mode", "clients");
    for t in proxied(with_base) {
        let width = TARGET_NAMES[t].len().max(8);
        head += &format!(" {:>width$}", TARGET_NAMES[t]);
    }
    println!("\n{title}\n{head}");
    for row in rows {
        println!("{row}");
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn tps(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{out}"))
}

/// What `bench postgres` runs.
#[derive(clap::Args)]
pub struct Options {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Rounds per cell: each target runs once per round, in a rotating order; medians are
    /// reported, so drift on a shared machine does not favour whoever ran first.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// pgbench scale factor.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Query modes to run (comma-separated: simple, prepared).
    #[arg(long, value_delimiter = ',', default_value = "simple,prepared")]
    pub modes: Vec<String>,
    /// Client counts to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub clients: Vec<u32>,
    /// Targets to run (comma-separated: direct, tg, tg-w, tg+m, pgbouncer, haproxy); ratios
    /// need both of their targets.
    #[arg(long, value_delimiter = ',', default_value = "direct,tg,tg-w,tg+m,pgbouncer,haproxy")]
    pub targets: Vec<String>,
    /// Only the pgbench table: skip the 1,000,000-row result and the memory measurement.
    #[arg(long)]
    pub pgbench_only: bool,
    /// Another `tollgate` binary (say, built from the commit before a change), run as the
    /// target `base` next to `tg` with its own state and cgroup: on a machine whose speed drifts
    /// between runs, a change is judged by `tg/base` within one run. Adds the `base` target.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// How the `--baseline` agent records statements: `durable` (like `tg`) or `written` (like
    /// `tg-w`), for judging a change to the written path against `tg-w`.
    #[arg(long, value_name = "MODE", default_value = "durable", value_parser = ["durable", "written"])]
    pub baseline_statements: String,
    /// Runs everything (server, proxies, pgbench) on this one CPU: throughput then follows the
    /// CPU each transaction costs, not where the scheduler places three processes on two cores,
    /// and moves less between runs: steadier for comparing builds (BENCHMARKS.md shows such a
    /// table next to the one on all cores, which is the headline).
    #[arg(long, value_name = "CPU")]
    pub pin_cpu: Option<usize>,
    /// Instead of timing, counts the user-space instructions each proxy executes per
    /// transaction (valgrind's callgrind; the proxies run under it): repeatable to a few
    /// percent where timings move by ±15 %. The kernel's share of a proxy's CPU is not counted.
    /// Implies --pgbench-only; --rounds and --seconds do not apply.
    #[arg(long)]
    pub instructions: bool,
}

/// Transactions per client of the shorter of the two runs `--instructions` subtracts.
const COUNTED_TRANSACTIONS: u64 = 3000;

pub fn postgres(o: Options) -> anyhow::Result<()> {
    let Options {
        seconds,
        rounds,
        scale,
        modes,
        clients,
        targets,
        pgbench_only,
        baseline,
        baseline_statements,
        pin_cpu,
        instructions,
    } = o;
    let pgbench_only = pgbench_only || instructions;
    let mut run_target = [false; TARGETS];
    for t in &targets {
        match TARGET_NAMES.iter().position(|n| n == t) {
            Some(BASE) if baseline.is_none() => bail!("target base needs --baseline PATH"),
            Some(i) => run_target[i] = true,
            None => bail!("unknown target {t:?}: one of {}", TARGET_NAMES.join(", ")),
        }
    }
    if let Some(b) = &baseline {
        if !b.is_file() {
            bail!("--baseline {}: no such file", b.display());
        }
        run_target[BASE] = true;
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if let Some(m) = modes.iter().find(|m| !matches!(m.as_str(), "simple" | "prepared")) {
        bail!("unknown mode {m:?}: simple or prepared");
    }
    if clients.contains(&0) {
        bail!("client counts must be at least 1");
    }
    setup::ensure()?;
    util::cargo_build(true)?;
    let bin = util::tollgate_bin(true);
    if let Some(cpu) = pin_cpu {
        // Everything this process starts from here on inherits the affinity.
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).with_context(|| format!("--pin-cpu {cpu}"))?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("--pin-cpu {cpu}: cannot run on that CPU"))?;
        println!("everything runs on CPU {cpu} (--pin-cpu)");
    }
    let root_name = format!("tollgate-bench-pg-{}", std::process::id());
    let pg = TempPostgres::start(0)?;
    let (pg_port, password, d) = (pg.port, pg.password.clone(), pg.dir.path().to_path_buf());
    let pg_user = nix::unistd::User::from_name("postgres")?.context("user postgres")?;
    let states = tempfile::Builder::new().prefix("tollgate-bench-pg-").tempdir()?;
    let mut rig = Rig {
        children: Vec::new(),
        bin: bin.clone(),
        state: states.path().join("state"),
        baseline: baseline.clone().map(|b| (b, states.path().join("state-base"))),
        cgroup_dir: cgroup2_mount()?.join(&root_name),
        _states: states,
        pg,
    };
    let port_s = pg_port.to_string();
    let callgrind = if instructions { Some(Callgrind::new(&d.join("callgrind"))?) } else { None };
    // A proxy's command, under callgrind with --instructions.
    let wrapped = |args: &[&str]| -> Vec<String> {
        let mut v = callgrind.as_ref().map(Callgrind::prefix).unwrap_or_default();
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let command = |args: Vec<String>| {
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c
    };
    util::run(
        Command::new(format!("{PG_BIN}/pgbench"))
            .args(["-q", "-i", "-s", &scale.to_string(), "-h", "127.0.0.1", "-p", &port_s, "-U", "app", "postgres"])
            .env("PGPASSWORD", &password),
    )?;

    // pgbouncer, session pooling; it will not run as root.
    let bouncer_port = free_port()?;
    let userlist = d.join("userlist.txt");
    std::fs::write(&userlist, format!("\"app\" \"{password}\"\n"))?;
    let ini = d.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {bouncer_port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 20\nlogfile = {}\n",
            userlist.display(),
            d.join("pgbouncer.log").display()
        ),
    )?;
    for f in [&userlist, &ini] {
        nix::unistd::chown(f, Some(pg_user.uid), Some(pg_user.gid))?;
    }
    let bouncer = wrapped(&["pgbouncer", ini.to_str().unwrap()]);
    rig.children.push(
        as_postgres(&bouncer.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(bouncer_port, "pgbouncer")?;
    let bouncer_pid = exec_child(rig.children.last().map(|c| c.id()).context("pgbouncer")?);

    // haproxy in tcp mode: a proxy that inspects nothing.
    let haproxy_port = free_port()?;
    let cfg = d.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nfrontend fe\n  bind 127.0.0.1:{haproxy_port}\n  default_backend be\nbackend be\n  server pg 127.0.0.1:{pg_port}\n"
        ),
    )?;
    rig.children
        .push(command(wrapped(&["haproxy", "-f", cfg.to_str().unwrap(), "-db"])).stdout(Stdio::null()).spawn()?);
    wait_port(haproxy_port, "haproxy")?;
    let haproxy_pid = rig.children.last().map(|c| c.id()).context("haproxy")?;

    // tollgate, guardrails on: every statement classified, judged and audited durably.
    let secret = d.join("secret");
    rig.pg.write_secret(&secret)?;
    let cgroup = format!("/{root_name}/bench");
    let masked_cgroup = format!("/{root_name}/masked");
    let base_cgroup = format!("/{root_name}/base");
    let policy = d.join("policy.yaml");
    let policy_text = |statements: &str, cgroup: &str| {
        format!(
            r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: bench-postgres }}
spec:
  audit: {{ statements: {statements} }}
  unlisted: allow
  proxy: {{ listen: ["127.0.0.1:0"] }}
  identities:
    - {{ name: bench, cgroup: {cgroup} }}
    - {{ name: masked, cgroup: {masked_cgroup} }}
  resources:
    - name: db
      protocol: postgres
      address: "127.0.0.1:{pg_port}"
      credentials: {{ user: app, password_file: {secret} }}
  grants:
    - name: bench-db
      to: [identity:bench]
      resources: [db]
      rules:
        - {{ name: no-ddl, match: {{ statements: [ddl] }}, action: deny }}
        - {{ name: reads, match: {{ statements: [select, transaction, set, show] }}, action: allow }}
      default: deny
    - name: masked-db
      to: [identity:masked]
      resources: [db]
      rules:
        - {{ name: no-ddl, match: {{ statements: [ddl] }}, action: deny }}
        - {{ name: reads, match: {{ statements: [select, transaction, set, show] }}, action: allow }}
      default: deny
      masking:
        - {{ name: email-column, columns: [email], style: partial }}
        - {{ name: content, detect: [email, credit_card, ssn], style: hash }}
"#,
            secret = secret.display()
        )
    };
    std::fs::write(&policy, policy_text("durable", &cgroup))?;
    let agent = |bin: &Path| command(wrapped(&[bin.to_str().expect("a UTF-8 path")]));
    rig.children.push(util::start_agent_cmd(agent(&bin), &policy, &rig.state, "warn,tollgate::agent=info", None)?);
    let agent_pid = rig.children.last().map(|c| c.id()).context("agent")?;
    let base_pid = match &rig.baseline {
        Some((base_bin, base_state)) => {
            // The same policy with cgroups of its own (its masked identity is never used).
            let base_policy = d.join("policy-base.yaml");
            let text = policy_text(&baseline_statements, &base_cgroup)
                .replace(&masked_cgroup, &format!("{masked_cgroup}-base"));
            std::fs::write(&base_policy, text)?;
            rig.children.push(util::start_agent_cmd(
                agent(base_bin),
                &base_policy,
                base_state,
                "warn,tollgate::agent=info",
                None,
            )?);
            rig.children.last().map(|c| c.id())
        }
        None => None,
    };
    let with_base = base_pid.is_some();
    // The target the baseline agent is compared with: the one recording statements as it does.
    let like_base = if baseline_statements == "written" { 2 } else { 1 };
    // Agent memory per idle connection, measured on the fresh agent: after the cells its heap
    // has room freed by their sessions, which idle sessions would reuse without growing.
    let memory = if pgbench_only {
        None
    } else {
        let plain = idle_memory(&bin, &cgroup, &port_s, agent_pid, "agent memory (fresh agent)")?;
        // Masked sessions each look up the columns of every table with a masked column at
        // login: with a wide schema that answer is large, and sessions share one copy of it.
        rig.pg.sql(&wide_schema())?;
        let label = format!(
            "agent memory, masked sessions ({WIDE_TABLES} tables of {WIDE_COLUMNS} columns, each with an email column)"
        );
        let masked = idle_memory(&bin, &masked_cgroup, &port_s, agent_pid, &label);
        rig.pg.sql("DROP SCHEMA wide CASCADE")?;
        Some(plain + &masked?)
    };
    // Switches the agent between durable and written statement records (SIGHUP reload; new
    // sessions take the policy in force when they start).
    let statements = |mode: &str| -> anyhow::Result<()> {
        std::fs::write(&policy, policy_text(mode, &cgroup))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid as i32), nix::sys::signal::Signal::SIGHUP)?;
        // Under valgrind the reload takes many times longer.
        thread::sleep(Duration::from_millis(if callgrind.is_some() { 3000 } else { 500 }));
        Ok(())
    };

    // `through`: None direct (or via a peer's port), Some(cgroup) enrolled, through tollgate.
    let pgbench = |port: u16, through: Option<&str>, extra: &[&str]| -> anyhow::Result<f64> {
        let args = ["-n", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"];
        let mut c = match through {
            Some(cg) => {
                let mut c = Command::new(&bin);
                c.args(["exec", "--cgroup", cg, "--", &format!("{PG_BIN}/pgbench")]);
                c
            }
            None => Command::new(format!("{PG_BIN}/pgbench")),
        };
        // The enrolled client gets a wrong password on purpose: tollgate ignores it.
        c.args(args).args(extra).arg("postgres");
        c.env("PGPASSWORD", if through.is_some() { "not-the-password" } else { password.as_str() });
        tps(&util::output(&mut c)?)
    };

    let mut written_mode = false;
    if let Some(cg) = &callgrind {
        println!(
            "\npgbench -S (select-only), scale {scale}: user-space instructions per transaction of each\n\
             proxy process (all its threads), counted by callgrind over two runs of {COUNTED_TRANSACTIONS} and {} transactions\n\
             per client, the difference divided by the difference in transactions (so logins and\n\
             connection set-up cancel out)",
            2 * COUNTED_TRANSACTIONS
        );
        let (mut rows, mut sha_rows) = (Vec::new(), Vec::new());
        let profiles = util::root().join("target/callgrind");
        std::fs::create_dir_all(&profiles)?;
        for mode in &modes {
            for &clients in &clients {
                let (mut per_tx, mut sha) = ([f64::NAN; TARGETS], [f64::NAN; TARGETS]);
                for t in proxied(with_base).filter(|&t| run_target[t]) {
                    if (t == 2) != written_mode {
                        written_mode = t == 2;
                        statements(if written_mode { "written" } else { "durable" })?;
                    }
                    let (pid, port, through) = match t {
                        1 | 2 => (agent_pid, pg_port, Some(cgroup.as_str())),
                        3 => (agent_pid, pg_port, Some(masked_cgroup.as_str())),
                        4 => (bouncer_pid, bouncer_port, None),
                        5 => (haproxy_pid, haproxy_port, None),
                        _ => (base_pid.context("base")?, pg_port, Some(base_cgroup.as_str())),
                    };
                    let (c, j) = (clients.to_string(), clients.min(2).to_string());
                    let run = |n: u64| {
                        let n = n.to_string();
                        let args = ["-S", "-M", mode, "-c", &c, "-j", &j, "-t", &n];
                        cg.count(pid, || pgbench(port, through, &args).map(drop))
                    };
                    // Uncounted: pgbouncer logs in to the server for its pool on a first client
                    // only, which would fall in the shorter run.
                    pgbench(port, through, &["-S", "-M", mode, "-c", &c, "-j", &j, "-t", "100"])?;
                    let (short, _) = run(COUNTED_TRANSACTIONS)?;
                    let (long, dump) = run(2 * COUNTED_TRANSACTIONS)?;
                    std::fs::copy(&dump, profiles.join(format!("{}-{mode}-{clients}.out", TARGET_NAMES[t])))?;
                    let diff = long - short;
                    let n = (COUNTED_TRANSACTIONS * u64::from(clients)) as f64;
                    (per_tx[t], sha[t]) = ((diff.total - diff.sha256) as f64 / n, diff.sha256 as f64 / n);
                }
                rows.push(proxy_row(mode, clients, |t| per_tx[t], with_base, 0));
                sha_rows.push(proxy_row(mode, clients, |t| sha[t], with_base, 0));
            }
        }
        print_proxy_table("instructions per transaction, SHA-256 compression left out", &rows, with_base);
        print_proxy_table(
            "instructions per transaction in SHA-256 compression (sealing audit records; valgrind runs the\n\
             portable code, while natively the CPU's SHA extensions take a small fraction of these)",
            &sha_rows,
            with_base,
        );
        println!(
            "\nprofiles of the longer runs: {}/TARGET-MODE-CLIENTS.out (callgrind_annotate FILE)",
            profiles.display()
        );
        if written_mode {
            statements("durable")?;
        }
        return Ok(());
    }
    println!(
        "\npgbench -S (select-only), scale {scale}, {rounds} rounds of {seconds} s per cell, all on {}.\n\
         Within a round every target runs once, in a rotating order; TPS columns are\n\
         the median over rounds, ratio columns the median of the per-round ratios.\n\
         tg: tollgate, statement records durable before forwarding (the default); tg-w: written\n\
         before forwarding (audit.statements: written); tg+m: durable, with masking on\n\
         {:<9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}{}",
        match pin_cpu {
            Some(cpu) => format!("CPU {cpu} (--pin-cpu)"),
            None => format!("this machine's {} cores", thread::available_parallelism().map_or(0, |n| n.get())),
        },
        "mode",
        "clients",
        "direct",
        "tg",
        "tg-w",
        "tg+m",
        "pgbouncer",
        "haproxy",
        "tg/hap",
        "tg/pgb",
        "tgw/hap",
        "tgw/pgb",
        "tgm/hap",
        if with_base {
            format!(" {:>8} {:>8}", "base", format!("{}/base", TARGET_NAMES[like_base]))
        } else {
            String::new()
        }
    );
    let secs = seconds.to_string();
    let mut cpu_rows = Vec::new();
    let mut others_rows = Vec::new();
    let postmaster = rig.pg.postmaster_pid()?;
    let all_row = |mode: &str, clients: u32, value: &dyn Fn(usize) -> String| {
        let mut row = format!("{mode:<9} {clients:>7}");
        for t in (0..TARGETS).filter(|&t| run_target[t]) {
            row += &format!(" {:>9}", value(t));
        }
        row
    };
    let mut direct_rows = Vec::new();
    for mode in &modes {
        for &clients in &clients {
            let (c, j) = (clients.to_string(), clients.min(2).to_string());
            let args = ["-S", "-M", mode, "-c", &c, "-j", &j, "-T", &secs];
            // direct, tg, tg-w, tg+m, pgbouncer, haproxy
            let mut tps_of: [Vec<f64>; TARGETS] = Default::default();
            // The proxy's CPU time per transaction, µs (none for direct).
            let mut cpu_of: [Vec<f64>; TARGETS] = Default::default();
            // The server's backends' and pgbench's CPU per transaction, µs (user, kernel).
            let mut server_of: [Vec<(f64, f64)>; TARGETS] = Default::default();
            let mut client_of: [Vec<(f64, f64)>; TARGETS] = Default::default();
            for round in 0..rounds {
                for k in 0..TARGETS {
                    let t = (k + round) % TARGETS;
                    if !run_target[t] {
                        continue;
                    }
                    if (t == 2) != written_mode {
                        written_mode = t == 2;
                        statements(if written_mode { "written" } else { "durable" })?;
                    }
                    let proxy = match t {
                        0 => None,
                        1..=3 => Some(agent_pid),
                        4 => Some(bouncer_pid),
                        5 => Some(haproxy_pid),
                        _ => base_pid,
                    };
                    let cpu_before = proxy.map(cpu_ns);
                    let (server_before, client_before) = (children_cpu_us(postmaster), own_children_cpu_us());
                    let server_procs = children(postmaster);
                    let v = match t {
                        0 => pgbench(pg_port, None, &args)?,
                        1 | 2 => pgbench(pg_port, Some(&cgroup), &args)?,
                        3 => pgbench(pg_port, Some(&masked_cgroup), &args)?,
                        4 => pgbench(bouncer_port, None, &args)?,
                        5 => pgbench(haproxy_port, None, &args)?,
                        _ => pgbench(pg_port, Some(&base_cgroup), &args)?,
                    };
                    tps_of[t].push(v);
                    let tx = v * seconds as f64;
                    // The backends end after their clients; their time is counted once reaped.
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    while children(postmaster) > server_procs && std::time::Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(20));
                    }
                    let (server, client) = (children_cpu_us(postmaster), own_children_cpu_us());
                    server_of[t].push(((server.0 - server_before.0) / tx, (server.1 - server_before.1) / tx));
                    client_of[t].push(((client.0 - client_before.0) / tx, (client.1 - client_before.1) / tx));
                    if let (Some(pid), Some(before)) = (proxy, cpu_before) {
                        cpu_of[t].push(cpu_ns(pid).saturating_sub(before) as f64 / 1e3 / (v * seconds as f64));
                    }
                }
            }
            let m = |t: usize| median(&tps_of[t]);
            let r =
                |a: usize, b: usize| median(&tps_of[a].iter().zip(&tps_of[b]).map(|(x, y)| x / y).collect::<Vec<_>>());
            let base = |cell: String| if with_base { cell } else { String::new() };
            println!(
                "{mode:<9} {clients:>7} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3}{}",
                m(0),
                m(1),
                m(2),
                m(3),
                m(4),
                m(5),
                r(1, 5),
                r(1, 4),
                r(2, 5),
                r(2, 4),
                r(3, 5),
                base(format!(" {:>8.0} {:>8.3}", m(BASE), r(like_base, BASE))),
            );
            direct_rows.push(proxy_row(mode, clients, |t| r(t, 0), with_base, 3));
            cpu_rows.push(proxy_row(mode, clients, |t| median(&cpu_of[t]), with_base, 1));
            let split = |v: &[(f64, f64)]| {
                let (user, kernel): (Vec<f64>, Vec<f64>) = v.iter().copied().unzip();
                format!("{:.0}+{:.0}", median(&user), median(&kernel))
            };
            others_rows.push(all_row(mode, clients, &|t| split(&server_of[t])));
            others_rows.push(all_row("  pgbench", clients, &|t| split(&client_of[t])));
        }
    }
    print_proxy_table(
        "proxy CPU time per transaction, µs (all threads, user and kernel, including the loopback\n\
         delivery a send does; median over rounds)",
        &cpu_rows,
        with_base,
    );
    print_proxy_table("ratios to direct (median of per-round ratios)", &direct_rows, with_base);
    let mut head = format!("{:<9} {:>7}", "mode", "clients");
    for t in (0..TARGETS).filter(|&t| run_target[t]) {
        head += &format!(" {:>9}", TARGET_NAMES[t]);
    }
    println!(
        "\nPostgreSQL's backends (each mode's first row) and pgbench (the row below it): CPU time\n\
         per transaction, µs, user+kernel, from the kernel's accounting of ended processes\n\
         (clock ticks; median over rounds)\n{head}"
    );
    for row in &others_rows {
        println!("{row}");
    }
    if written_mode {
        statements("durable")?;
    }

    if pgbench_only {
        return Ok(());
    }
    // One large result with an e-mail column the masked grant masks by name.
    rig.pg.sql(
        "CREATE TABLE mask_bench AS SELECT g AS id, 'user' || g || '@example.com' AS email FROM generate_series(1, 1000000) g",
    )?;
    let script = d.join("mask_bench.sql");
    std::fs::write(&script, "SELECT id, email FROM mask_bench;\n")?;
    let script = script.to_str().unwrap().to_string();
    let big = ["-M", "simple", "-t", "5", "-f", script.as_str()];
    // direct, tg+mask, tollgate, pgbouncer, haproxy; rounds rotate like the pgbench cells.
    let mut big_of: [Vec<f64>; 5] = Default::default();
    for round in 0..rounds {
        for k in 0..5 {
            let t = (k + round) % 5;
            big_of[t].push(match t {
                0 => pgbench(pg_port, None, &big)?,
                1 => pgbench(pg_port, Some(&masked_cgroup), &big)?,
                2 => pgbench(pg_port, Some(&cgroup), &big)?,
                3 => pgbench(bouncer_port, None, &big)?,
                _ => pgbench(haproxy_port, None, &big)?,
            });
        }
    }
    let rows = |t: usize| median(&big_of[t]) * 1e6;
    let r = |a: usize, b: usize| median(&big_of[a].iter().zip(&big_of[b]).map(|(x, y)| x / y).collect::<Vec<_>>());
    println!(
        "\nSELECT id, email FROM mask_bench (1,000,000 rows), 5 runs per round, {rounds} rounds, rows/s (medians),\nthen ratios to direct (medians of per-round ratios):\n{:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}\n{:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>9.3} {:>9.3}\n{:>12} {:>12.3} {:>12.3} {:>12.3} {:>12.3}",
        "direct",
        "tg+mask",
        "tollgate",
        "pgbouncer",
        "haproxy",
        "tgm/hap",
        "tgm/dir",
        rows(0),
        rows(1),
        rows(2),
        rows(3),
        rows(4),
        r(1, 4),
        r(1, 0),
        "1",
        r(1, 0),
        r(2, 0),
        r(3, 0),
        r(4, 0),
    );

    if let Some(m) = memory {
        println!("{m}");
    }
    let trail = std::fs::read_to_string(rig.state.join("audit/trail.jsonl")).unwrap_or_default();
    println!(
        "\naudit: {} statement records written through tollgate",
        trail.lines().filter(|l| l.contains("\"kind\":\"statement\"")).count()
    );
    Ok(())
}
