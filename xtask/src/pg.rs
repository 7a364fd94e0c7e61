//! A throwaway PostgreSQL 15 for the demo and benchmarks: initdb and pg_ctl as the `postgres`
//! user in a temp dir, SCRAM authentication, one login `app`.
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use crate::util;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn as_postgres(args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).args(args);
    c
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct TempPostgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub password: String,
    data: PathBuf,
}

impl TempPostgres {
    /// Starts a server on `port` (0: a free one).
    pub fn start(port: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tollgate-pg-").tempdir()?;
        let pg_user = nix::unistd::User::from_name("postgres")?.context("user postgres (package postgresql-15)")?;
        nix::unistd::chown(dir.path(), Some(pg_user.uid), Some(pg_user.gid))?;
        let password = format!("pw-{}-{}", std::process::id(), port);
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password)?;
        nix::unistd::chown(&pwfile, Some(pg_user.uid), Some(pg_user.gid))?;
        let data = dir.path().join("data");
        util::output(&mut as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "scram-sha-256",
            "-U",
            "app",
            "--pwfile",
            pwfile.to_str().unwrap(),
        ]))?;
        std::fs::remove_file(&pwfile)?;
        let port = if port == 0 { free_port()? } else { port };
        let opts =
            format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200", dir.path().display());
        util::output(&mut as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            dir.path().join("pg.log").to_str().unwrap(),
            "-w",
            "start",
        ]))?;
        Ok(Self { dir, port, password, data })
    }

    /// The postmaster's process id, from its pid file.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let file = std::fs::read_to_string(self.data.join("postmaster.pid"))?;
        file.lines().next().and_then(|l| l.trim().parse().ok()).context("postmaster.pid has no pid")
    }

    /// Runs SQL directly as `app` (not through any proxy).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        util::output(
            Command::new("psql")
                .args([
                    "-X",
                    "-q",
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
                .env("PGPASSWORD", &self.password),
        )
    }

    /// Writes the password where a policy's `password_file` points (mode 0600).
    pub fn write_secret(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, &self.password)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(())
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            self.data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
        .output();
    }
}
