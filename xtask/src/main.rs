//! Developer tasks: `cargo xtask setup | build | test | demo | bench | fuzz`.
mod bench;
mod bench_pg;
mod callgrind;
mod demo;
mod pg;
mod setup;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tollgate's set-up, build, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): Debian packages, the nightly
    /// rust-src, bpf-linker built against the nightly toolchain's LLVM, cargo-fuzz; mount bpffs.
    Setup,
    /// Build the agent (and with it the eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every check and test: fmt, clippy (workspace and eBPF crate), unit, CLI and
    /// privileged integration tests, the demo (each step checked), and a short run of each
    /// fuzz target.
    Test {
        /// Seconds per fuzz target (0 skips fuzzing).
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
    },
    /// Run the agent on policies/demo.yaml against throwaway local servers and show a
    /// redirected connection, denied ones and the audit trail.
    Demo,
    /// Benchmarks, printed side by side with ratios (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Run each fuzz target for a while.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// (internal) connect()+close() loop used by `bench connect`.
    #[command(hide = true)]
    ConnectLoop {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { release } => {
            setup::ensure()?;
            util::cargo_build(release)
        }
        Cmd::Test { fuzz_seconds } => setup::test(fuzz_seconds),
        Cmd::Demo => {
            util::stop_on_interrupt()?;
            demo::demo()
        }
        Cmd::Bench { which } => {
            util::stop_on_interrupt()?;
            bench::run(which)
        }
        Cmd::Fuzz { seconds } => setup::fuzz(seconds),
        Cmd::ConnectLoop { addr, count } => bench::connect_loop(addr, count),
    }
}
