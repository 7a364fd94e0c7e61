//! The `tollgate` command line.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tollgate::{
    agent, audit, cgroup,
    kernel::{Counters, Pins},
    policy::{self, CgroupPath},
    proxy,
    state::{DEFAULT_STATE_DIR, StateDir},
};

/// tollgate: transparent, kernel-attested enforcement and audit for the outbound connections of
/// AI agents. eBPF programs on the agents' cgroups redirect their connections to protected
/// resources through a local proxy, deny the rest as the policy says, and record every attempt.
#[derive(Parser)]
#[command(name = "tollgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce a policy: load and attach the eBPF programs, run the proxy, write the audit trail.
    ///
    /// Logs a line containing "ready" once enforcement is active. SIGHUP reloads the policy
    /// (an invalid policy is rejected and the old one stays); SIGTERM/SIGINT stop the agent.
    /// Enforcement stays pinned in bpffs after the agent stops (fail closed): connections to
    /// protected resources are refused until the agent runs again or `tollgate uninstall`.
    Run {
        /// Policy file (YAML, apiVersion tollgate/v1alpha1).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// State directory: audit trail, status; the bpffs pin directory is derived from it.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Event loops that relay proxied sessions, each a single-threaded runtime on a thread
        /// of its own [default: one per CPU the agent may run on, at most 8]. A session stays
        /// on one loop; new sessions take the loops in turn. With 1, sessions share the main
        /// thread with the control plane (accepting, approvals, kernel events). The audit
        /// writer and the timers always have threads of their own.
        #[arg(long, value_name = "N", env = "TOLLGATE_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
        /// MiB of large protocol messages the sessions may hold together. Each session reads a
        /// message whole (up to the protocol's 64 MiB) before it judges or masks it; past
        /// 256 KiB per direction it draws on this budget, and a session whose message the
        /// budget cannot cover ends with SQLSTATE 53200, while every other session goes on.
        #[arg(long, value_name = "MIB", env = "TOLLGATE_MESSAGE_MEMORY", default_value_t = (proxy::memory::DEFAULT_BUDGET >> 20) as u32,
              value_parser = clap::value_parser!(u32).range((proxy::memory::MIN_BUDGET >> 20) as i64..=1 << 20))]
        message_memory: u32,
        /// MiB of that budget that the sessions of one identity may hold together (default: a
        /// quarter of --message-memory, at least 64), so that one agent sending or asking for
        /// large messages from many sessions leaves the rest to the others. At most
        /// --message-memory.
        #[arg(long, value_name = "MIB", env = "TOLLGATE_MESSAGE_MEMORY_PER_IDENTITY",
              value_parser = clap::value_parser!(u32).range((proxy::memory::MIN_BUDGET >> 20) as i64..=1 << 20))]
        message_memory_per_identity: Option<u32>,
        /// Seconds a message holding memory of that budget (or an extended-protocol batch
        /// waiting for its Sync) may spend in all waiting on its peers: for the client to send
        /// the rest of it or to read it, for the server to take it. Past that the session ends
        /// with SQLSTATE 53200, and what it held goes back to the other sessions. Clients are
        /// processes on this host, whose largest messages take well under a second to pass;
        /// a client that sends part of one and waits would otherwise hold its share for good.
        #[arg(long, value_name = "SECS", env = "TOLLGATE_MESSAGE_TIMEOUT", default_value_t = proxy::memory::DEFAULT_WAIT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        message_timeout: u64,
    },
    /// Run a command inside a cgroup (created if needed), so it is enforced as that identity.
    ///
    /// Example: tollgate exec --cgroup /tollgate/planner -- python3 agent.py
    Exec {
        /// cgroup path relative to the cgroup2 mount, e.g. /tollgate/planner.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show whether an agent is enforcing (exit 0) or not (exit 1).
    Status {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Remove everything an agent pinned or attached for this state dir (the agent must be stopped).
    /// The audit trail is kept.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Decide statements held for just-in-time approval (rules with `action: approve`).
    ///
    /// Talks to the running agent over its control socket. Only root and the uids/gids named in
    /// the policy's spec.approvers may list or decide, and never from inside an enrolled cgroup.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, global = true)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Show pending requests: id, who, where, the statement and when it times out.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Let a held statement go to the database.
    Approve {
        id: u64,
        /// Why; recorded in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse a held statement; the client gets an error naming the rule and the reason.
    Deny {
        id: u64,
        /// Why; recorded in the audit trail and shown to the client.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and validate policy files; exit non-zero naming the file, location and problem.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show how a grant's statement rules judge SQL: the kinds, tables and functions the
    /// classifier finds, and the rule that decides (first match wins).
    ///
    /// Each argument is one query string, as a client would send it (it may hold several
    /// statements); with none, one query string is read from standard input. Only the rules
    /// are applied: refusals that depend on the server (masking of columns its catalog names,
    /// statements it no longer has) show only in a running session.
    Explain {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The grant whose rules apply.
        #[arg(long, value_name = "NAME")]
        grant: String,
        /// Print one JSON object per query string.
        #[arg(long)]
        json: bool,
        #[arg(value_name = "SQL")]
        sql: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain across the rotated segments and the live file; exit non-zero
    /// naming every bad record.
    Verify {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print the last records, readably or as JSON lines.
    Tail {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Keep printing new records as they are written.
        #[arg(long, short)]
        follow: bool,
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
        /// How many records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Every proxied session takes two descriptors: the usual soft limit of 1024 would stop the
/// agent at about 500 sessions (and a local user could use up the rest), long before the hard
/// limit the system allows.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            policy,
            state_dir,
            log_format,
            threads,
            message_memory,
            message_memory_per_identity,
            message_timeout,
        } => {
            init_logging(log_format);
            raise_open_files();
            // Single-threaded runtimes only: a work-stealing scheduler costs CPU per wake-up
            // that a single thread does not pay; more cores are used by more loops
            // (`proxy::loops`). No time driver: its clock reads and wheel walk on every park
            // cost the proxy CPU per round trip; the agent's timers run on `timer`'s thread.
            tollgate::timer::start()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
            let threads =
                threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)), usize::from);
            let mib = |m: u32, option: &str| {
                usize::try_from(u64::from(m) << 20)
                    .with_context(|| format!("{option} is more than this platform can address"))
            };
            let message_memory_per_identity = match message_memory_per_identity {
                Some(share) if share > message_memory => anyhow::bail!(
                    "--message-memory-per-identity ({share} MiB) is more than --message-memory ({message_memory} MiB), \
                     which all sessions share"
                ),
                Some(share) => mib(share, "--message-memory-per-identity")?,
                None => proxy::memory::default_share(mib(message_memory, "--message-memory")?),
            };
            let message_memory = mib(message_memory, "--message-memory")?;
            let message_timeout = std::time::Duration::from_secs(message_timeout);
            let options = agent::RunOptions {
                policy_file: policy,
                state_dir,
                threads,
                message_memory,
                message_memory_per_identity,
                message_timeout,
            };
            rt.block_on(agent::run(options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec { cgroup, command } => exec(&cgroup, &command),
        Command::Status { state_dir } => status(&state_dir),
        Command::Uninstall { state_dir } => uninstall(&state_dir),
        Command::Policy { command: PolicyCommand::Check { files } } => {
            let mut ok = true;
            for f in files {
                match policy::load(&f) {
                    Ok(p) => println!(
                        "{}: ok (policy {:?}: {} identities, {} resources, {} grants)",
                        f.display(),
                        p.name,
                        p.identities.len(),
                        p.resources.len(),
                        p.grants.len()
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Policy { command: PolicyCommand::Explain { file, grant, json, sql } } => {
            explain(&file, &grant, json, sql)
        }
        Command::Audit { command: AuditCommand::Verify { state_dir } } => {
            match audit::verify(&StateDir::new(&state_dir).root) {
                Ok(r) if r.breaks.is_empty() => {
                    let files = if r.files == 1 { "1 file".to_string() } else { format!("{} files", r.files) };
                    match r.first_seq {
                        0 | 1 => println!("audit trail intact: {} records ({files})", r.last_seq),
                        // Older segments were removed, as the trail itself records.
                        first => println!(
                            "audit trail intact: records {first}..={} ({files}; records before {first} were removed \
                             by rotation)",
                            r.last_seq
                        ),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Ok(r) => {
                    for b in &r.breaks {
                        eprintln!("audit trail NOT intact: {b}");
                    }
                    let n = r.breaks.len() as u64 + r.more_breaks;
                    let more =
                        if r.more_breaks > 0 { format!(" ({} not listed)", r.more_breaks) } else { String::new() };
                    let breaks = if n == 1 { "break" } else { "breaks" };
                    eprintln!("{n} {breaks}{more}; checked to the end, last record seq {}", r.last_seq);
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("audit trail cannot be checked: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Audit { command: AuditCommand::Tail { state_dir, follow, json, lines } } => {
            let mut out = std::io::stdout().lock();
            audit::tail(&StateDir::new(&state_dir).root, lines, follow, json, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Approvals { command, state_dir } => approvals(command, &StateDir::new(&state_dir).root),
    }
}

/// Client-controlled text shown to an approver: control characters (escape sequences, newlines)
/// are printed escaped, so a statement cannot disguise itself on the terminal.
fn approvals(command: ApprovalsCommand, state_dir: &Path) -> anyhow::Result<ExitCode> {
    use tollgate::approval::{
        ApprovalId,
        control::{Command as Ctl, call},
    };
    let (cmd, json) = match command {
        ApprovalsCommand::List { json } => (Ctl::List, json),
        ApprovalsCommand::Approve { id, reason } => (Ctl::Approve { id: ApprovalId(id), reason }, false),
        ApprovalsCommand::Deny { id, reason } => (Ctl::Deny { id: ApprovalId(id), reason }, false),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = rt.block_on(call(state_dir, &cmd))?;
    if reply.pending.is_none() && reply.decided.is_none() {
        anyhow::bail!("the agent's answer says neither what is pending nor what was decided");
    }
    if let Some(pending) = reply.pending {
        if json {
            // JSON escapes control characters itself; bidi and zero-width ones are valid JSON
            // text, so they are escaped here, as `\uXXXX`, to reach a terminal visibly.
            println!("{}", ascii_json(&serde_json::to_string_pretty(&pending)?));
        } else if pending.is_empty() {
            println!("no pending approval requests");
        } else {
            for r in pending {
                print!("{}", r.display());
            }
        }
    }
    if let Some(r) = reply.decided {
        let what = if matches!(cmd, Ctl::Approve { .. }) { "approved" } else { "denied" };
        println!(
            "{what} request {} ({} on {})",
            r.id,
            r.identity.as_deref().unwrap_or("-"),
            r.resource.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// JSON text with every character `printable` would escape written as a `\u` escape (two,
/// as a surrogate pair, past U+FFFF): the same value to a JSON reader, visible on a terminal.
fn ascii_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let mut one = [0u8; 4];
        if tollgate::approval::printable(c.encode_utf8(&mut one)).len() == c.len_utf8() || c == '\n' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn exec(path: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let path = CgroupPath::parse(path).map_err(anyhow::Error::msg)?;
    let mount = cgroup::cgroup2_mount()?;
    let cg = cgroup::Cgroup::new(&mount, &path);
    cg.create()?;
    cg.add_process(std::process::id()).with_context(|| format!("moving into cgroup {path}"))?;
    let args: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("argument contains NUL")?;
    let err = nix::unistd::execvp(&args[0], &args).unwrap_err();
    bail!("cannot run {:?}: {err}", command[0])
}

fn explain(file: &Path, grant: &str, json: bool, mut texts: Vec<String>) -> anyhow::Result<ExitCode> {
    let policy = policy::load(file)?;
    let Some(g) = policy.grants.iter().find(|g| g.name == grant) else {
        let names: Vec<&str> = policy.grants.iter().map(|g| g.name.as_str()).collect();
        bail!("{}: no grant {grant:?}; its grants are: {}", file.display(), names.join(", "));
    };
    if texts.is_empty() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading SQL from standard input")?;
        texts.push(text);
    }
    for text in texts {
        let c = tollgate::sql::classify(&text);
        let d = policy::rules::judge(g, &c);
        let kinds: Vec<&str> = c.kinds.iter().map(|k| k.as_str()).collect();
        if json {
            let out = serde_json::json!({
                "sql": text,
                "kinds": kinds,
                "tables": c.tables,
                "functions": c.functions,
                "where_missing": c.where_missing,
                "parse_error": c.parse_error,
                "decision": d.action.as_str(),
                "rule": &*d.rule,
                "message": d.message,
            });
            println!("{out}");
            continue;
        }
        let list = |items: Vec<&str>| if items.is_empty() { "-".to_string() } else { items.join(", ") };
        println!("{}", text.trim());
        println!("  kinds:         {}", kinds.join(", "));
        println!("  tables:        {}", list(c.tables.iter().map(String::as_str).collect()));
        println!("  functions:     {}", list(c.functions.iter().map(String::as_str).collect()));
        println!("  where missing: {}", if c.where_missing { "yes" } else { "no" });
        if let Some(e) = &c.parse_error {
            println!("  not parsed:    {e}");
        }
        let held = match d.action {
            policy::rules::Action::Approve { timeout } => format!(", held up to {} s", timeout.as_secs()),
            _ => String::new(),
        };
        let message = d.message.filter(|m| Some(m) != c.parse_error.as_ref()).map(|m| format!(": {m}"));
        println!("  decision:      {} by rule \"{}\"{held}{}", d.action.as_str(), d.rule, message.unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn status(state_dir: &Path) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(state_dir);
    let pins = Pins { root: state.pin_dir() };
    if !state.is_locked() {
        println!("tollgate: no agent running for state dir {}", state.root.display());
        if pins.exists() && pins.link_count() > 0 {
            println!(
                "enforcement is still pinned ({} links under {}): connections to protected resources are refused",
                pins.link_count(),
                pins.root.display()
            );
            println!("start `tollgate run` again to restore service, or `tollgate uninstall` to remove enforcement");
        }
        return Ok(ExitCode::FAILURE);
    }
    let Some(s) = state.read_status()? else {
        println!("tollgate: an agent holds the lock on {} but has not reported ready yet", state.root.display());
        return Ok(ExitCode::FAILURE);
    };
    println!("tollgate: enforcing (pid {}, since {})", s.pid, s.started);
    println!("  policy     {} ({}), mode {}", s.policy_name, s.policy_file.display(), s.mode);
    println!("  proxy      {}", s.listen.join(", "));
    println!("  cgroups    {}", s.cgroups.join(", "));
    println!("  policy has {} identities, {} resources, {} grants", s.identities, s.resources, s.grants);
    println!("  pins       {} ({} links)", s.pin_dir.display(), pins.link_count());
    if let Ok(c) = Counters::open(&pins) {
        let c = c.read();
        println!("  events     {} sent, {} dropped", c.events_sent, c.events_dropped);
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(state_dir: &Path) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(state_dir);
    // Hold the run lock while removing, so no agent starts on these pins meanwhile.
    let _lock = match state.root.exists().then(|| state.lock()) {
        Some(Err(tollgate::state::StateError::Locked(_))) => {
            let pid = state.read_status().ok().flatten().map(|s| s.pid.to_string()).unwrap_or_else(|| "?".into());
            bail!("an agent (pid {pid}) is running with state dir {}; stop it first", state.root.display());
        }
        Some(r) => Some(r?),
        None => None,
    };
    let pins = Pins { root: state.pin_dir() };
    if !pins.exists() {
        println!("nothing pinned for {}", state.root.display());
        return Ok(ExitCode::SUCCESS);
    }
    let links = pins.link_count();
    pins.remove_all()?;
    let _ = std::fs::remove_file(state.status_path());
    println!(
        "removed {links} links and the maps under {}; the audit trail stays in {}",
        pins.root.display(),
        state.audit_dir().display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn listed_json_shows_invisible_characters_as_escapes_of_the_same_value() {
        let text = serde_json::to_string_pretty(&["a\u{202E}b", "tag\u{E0041}", "é"]).unwrap();
        let shown = super::ascii_json(&text);
        assert!(shown.contains("a\\u202eb") && shown.contains("tag\\udb40\\udc41") && shown.contains('é'), "{shown}");
        let back: Vec<String> = serde_json::from_str(&shown).unwrap();
        assert_eq!(back, ["a\u{202E}b", "tag\u{E0041}", "é"]);
    }
}
