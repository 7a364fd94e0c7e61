//! `cargo xtask bench postgres`: pgbench through tollgate, side by side with direct,
//! pgbouncer (session mode) and haproxy (tcp), in one run.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    pg::{PG_BIN, TempPostgres, as_postgres, free_port},
    setup,
    util::{self, cgroup2_mount, remove_cgroup_tree},
};

/// Everything the benchmark started; stopped and removed on drop (the server, a field, last).
struct Rig {
    children: Vec<Child>,
    bin: PathBuf,
    state: PathBuf,
    cgroup_dir: PathBuf,
    pg: TempPostgres,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in self.children.drain(..) {
            util::stop(c);
        }
        util::stop_and_uninstall(None, &self.bin, &self.state);
        remove_cgroup_tree(&self.cgroup_dir);
    }
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not start listening on port {port}")
}

fn tps(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{out}"))
}

pub fn postgres(seconds: u64, scale: u32) -> anyhow::Result<()> {
    setup::ensure()?;
    util::cargo_build(true)?;
    let bin = util::tollgate_bin(true);
    let root_name = format!("tollgate-bench-pg-{}", std::process::id());
    let pg = TempPostgres::start(0)?;
    let (pg_port, password, d) = (pg.port, pg.password.clone(), pg.dir.path().to_path_buf());
    let pg_user = nix::unistd::User::from_name("postgres")?.context("user postgres")?;
    let mut rig = Rig {
        children: Vec::new(),
        bin: bin.clone(),
        state: d.join("state"),
        cgroup_dir: cgroup2_mount()?.join(&root_name),
        pg,
    };
    let port_s = pg_port.to_string();
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
    rig.children
        .push(as_postgres(&["pgbouncer", ini.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    wait_port(bouncer_port, "pgbouncer")?;

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
        .push(Command::new("haproxy").args(["-f", cfg.to_str().unwrap(), "-db"]).stdout(Stdio::null()).spawn()?);
    wait_port(haproxy_port, "haproxy")?;

    // tollgate, guardrails on: every statement classified, judged and audited durably.
    let secret = d.join("secret");
    rig.pg.write_secret(&secret)?;
    let cgroup = format!("/{root_name}/bench");
    let policy = d.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"apiVersion: tollgate/v1alpha1
kind: Policy
metadata: {{ name: bench-postgres }}
spec:
  unlisted: allow
  proxy: {{ listen: ["127.0.0.1:0"] }}
  identities:
    - {{ name: bench, cgroup: {cgroup} }}
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
"#,
            secret = secret.display()
        ),
    )?;
    rig.children.push(util::start_agent(&bin, &policy, &rig.state, "warn,tollgate::agent=info", None)?);

    let pgbench = |port: u16, mode: &str, clients: u32, enrolled: bool| -> anyhow::Result<f64> {
        let jobs = clients.min(2).to_string();
        let args = [
            "-n",
            "-S",
            "-M",
            mode,
            "-c",
            &clients.to_string(),
            "-j",
            &jobs,
            "-T",
            &seconds.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
            "postgres",
        ];
        let mut c = if enrolled {
            let mut c = Command::new(&bin);
            c.args(["exec", "--cgroup", &cgroup, "--", &format!("{PG_BIN}/pgbench")]);
            c
        } else {
            Command::new(format!("{PG_BIN}/pgbench"))
        };
        // The enrolled client gets a wrong password on purpose: tollgate ignores it.
        c.args(args).env("PGPASSWORD", if enrolled { "not-the-password" } else { password.as_str() });
        tps(&util::output(&mut c)?)
    };

    println!(
        "\npgbench -S (select-only), scale {scale}, {seconds} s per run, all on this 2-core machine\n{:<10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "mode", "clients", "direct", "tollgate", "pgbouncer", "haproxy", "tg/dir", "tg/hap", "tg/pgb"
    );
    for mode in ["simple", "prepared"] {
        for clients in [1u32, 8] {
            let direct = pgbench(pg_port, mode, clients, false)?;
            let tollgate = pgbench(pg_port, mode, clients, true)?;
            let bouncer = pgbench(bouncer_port, mode, clients, false)?;
            let haproxy = pgbench(haproxy_port, mode, clients, false)?;
            println!(
                "{mode:<10} {clients:>7} {direct:>10.0} {tollgate:>10.0} {bouncer:>10.0} {haproxy:>10.0} {:>9.3} {:>9.3} {:>9.3}",
                tollgate / direct,
                tollgate / haproxy,
                tollgate / bouncer
            );
        }
    }
    let trail = std::fs::read_to_string(rig.state.join("audit/trail.jsonl")).unwrap_or_default();
    println!(
        "\naudit: {} statement records written durably through tollgate",
        trail.lines().filter(|l| l.contains("\"kind\":\"statement\"")).count()
    );
    Ok(())
}
