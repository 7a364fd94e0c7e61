//! `setup` (install what the project needs), `test` (every check) and `fuzz`.
use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::util::{cargo, output, root, run};

/// Debian packages the tests, demo and benchmarks use.
/// `valgrind` counts instructions for `bench postgres --instructions`. `openssl` makes the TLS test's server certificates; `util-linux` has `setpriv`, with which a
/// test runs the approvals CLI as an unprivileged user.
const PACKAGES: &[&str] = &[
    "curl",
    "python3",
    "iproute2",
    "bpftool",
    "clang",
    "libclang-dev",
    "postgresql-15",
    "pgbouncer",
    "haproxy",
    "openssl",
    "util-linux",
    "valgrind",
    // The default CA bundle of https approval webhooks.
    "ca-certificates",
];

pub const FUZZ_TARGETS: &[&str] = &["policy", "audit_line", "kernel_event", "sql", "postgres_wire", "postgres_results"];

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// A nested cargo/rustup must pick its toolchain from the directory it runs in, not from the
/// environment `cargo xtask` was started with.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn nightly_llvm() -> anyhow::Result<(String, String)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("the preinstalled nightly toolchain is required (rustc +nightly)")?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim().to_string();
    let lib = std::fs::read_dir(Path::new(&sysroot).join("lib"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with(&format!("libLLVM-{major}")) && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM-{major}*.so in {sysroot}/lib"))?;
    let lib = lib.trim_start_matches("lib").trim_end_matches(".so").to_string();
    Ok((major, lib))
}

fn cargo_home() -> std::path::PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"))
}

fn bpf_linker_stamp() -> std::path::PathBuf {
    cargo_home().join("tollgate-bpf-linker.llvm")
}

fn bpf_linker_ok() -> bool {
    let works = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    let stamp = std::fs::read_to_string(bpf_linker_stamp()).unwrap_or_default();
    works && nightly_llvm().is_ok_and(|(_, lib)| stamp.trim() == lib)
}

fn rust_src_ok() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")))
}

fn cargo_fuzz_ok() -> bool {
    Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf ")))
}

pub fn setup() -> anyhow::Result<()> {
    base_setup()?;
    if !cargo_fuzz_ok() {
        let mut c = Command::new("cargo");
        run(clean_env(&mut c).args(["install", "--locked", "cargo-fuzz"]))?;
    }
    eprintln!("setup: everything is in place");
    Ok(())
}

/// Everything but the fuzzing tools: what building, running and benchmarking need.
fn base_setup() -> anyhow::Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !rust_src_ok() {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !bpf_linker_ok() {
        // bpf-linker must link the same LLVM as the nightly rustc that emits the bitcode; the
        // nightly toolchain ships that library, so link against it instead of a system LLVM.
        let (major, lib) = nightly_llvm()?;
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim().to_string();
        let flags = format!("-L {sysroot}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sysroot}/lib");
        let mut c = Command::new("cargo");
        clean_env(&mut c)
            .args(["+nightly", "install", "--locked", "--force", "bpf-linker", "--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", flags);
        run(&mut c)?;
        std::fs::write(bpf_linker_stamp(), &lib)?;
    }
    if !bpffs_mounted() {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Runs the set-up steps for building, running and benchmarking if anything is missing.
pub fn ensure() -> anyhow::Result<()> {
    if missing_packages().is_empty() && rust_src_ok() && bpf_linker_ok() && bpffs_mounted() {
        return Ok(());
    }
    base_setup()
}

/// As `ensure`, plus the fuzzing tools.
fn ensure_all() -> anyhow::Result<()> {
    ensure()?;
    if !cargo_fuzz_ok() {
        setup()?;
    }
    Ok(())
}

fn ebpf_cargo() -> Command {
    let mut c = Command::new("cargo");
    clean_env(&mut c).current_dir(root().join("agent-ebpf"));
    c
}

pub fn test(fuzz_seconds: u64) -> anyhow::Result<()> {
    if fuzz_seconds > 0 {
        ensure_all()?
    } else {
        ensure()?
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(ebpf_cargo().args(["fmt", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(ebpf_cargo().args(["clippy", "--release", "--", "-D", "warnings"]))?;
    let (passed, failed, ignored) = cargo_test()?;
    // The README's other command: it checks what each step shows, so a regression fails here.
    // Like the privileged tests, it needs root, and fails rather than skips under CI=true.
    if nix::unistd::geteuid().is_root() || std::env::var("CI").as_deref() == Ok("true") {
        crate::demo::demo().map_err(|e| anyhow::anyhow!("cargo xtask demo failed: {e:#}"))?;
    } else {
        eprintln!("xtask test: the demo needs root: skipped");
    }
    if fuzz_seconds > 0 {
        fuzz(fuzz_seconds)?;
    }
    eprintln!("xtask test: all checks passed");
    // The summary CI reads: every test binary's counts added up.
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    Ok(())
}

/// Runs the workspace's tests, echoing their output, and adds up the "test result" lines.
fn cargo_test() -> anyhow::Result<(u64, u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut c = cargo();
    c.args(["test", "--workspace", "--no-fail-fast"]).stdout(std::process::Stdio::piped());
    eprintln!("+ {}", crate::util::show(&c));
    let mut child = c.spawn()?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_suffix(what)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
            };
            passed += count("passed").unwrap_or(0);
            failed += count("failed").unwrap_or(0);
            ignored += count("ignored").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    if !status.success() || failed > 0 {
        bail!("tests failed: {passed} passed, {failed} failed ({status})");
    }
    Ok((passed, failed, ignored))
}

pub fn fuzz(seconds: u64) -> anyhow::Result<()> {
    ensure_all()?;
    for t in FUZZ_TARGETS {
        let mut c = Command::new("cargo");
        clean_env(&mut c).current_dir(root()).args(["+nightly", "fuzz", "run", t]);
        // Committed seeds (fuzz/seeds/TARGET) start the search from realistic inputs; new
        // findings go to the first directory, the local corpus, as without seeds.
        let seeds = root().join("fuzz/seeds").join(t);
        if seeds.is_dir() {
            let corpus = root().join("fuzz/corpus").join(t);
            std::fs::create_dir_all(&corpus)?;
            c.arg(corpus).arg(seeds);
        }
        c.args(["--", &format!("-max_total_time={seconds}")]);
        // Known leaks in C dependencies, each named in the file; any other leak fails.
        c.env("LSAN_OPTIONS", format!("suppressions={}", root().join("fuzz/lsan.supp").display()));
        if run(&mut c).is_err() {
            bail!("fuzz target {t} found a failure; see fuzz/artifacts/{t}");
        }
    }
    Ok(())
}
