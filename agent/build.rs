//! Builds the eBPF object (agent-ebpf) with the nightly toolchain and hands its path to the agent.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../agent-ebpf").canonicalize()?;
    let common_dir = manifest.join("../agent-common").canonicalize()?;
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!("cargo:rerun-if-changed={}", dir.join("Cargo.toml").display());
    }
    println!("cargo:rerun-if-changed={}", ebpf_dir.join(".cargo/config.toml").display());
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_OBJECT");

    // A prebuilt object may be supplied (e.g. by packaging); otherwise build it.
    if let Ok(obj) = env::var("TOLLGATE_EBPF_OBJECT") {
        println!("cargo:rustc-env=TOLLGATE_EBPF_OBJECT={obj}");
        return Ok(());
    }

    // A fixed target dir shared by every profile, so check/clippy/test reuse one build.
    let target_dir = manifest.join("../target/ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf_dir).args(["build", "--release", "--target-dir"]).arg(&target_dir);
    // The outer cargo's environment would force the stable toolchain and host flags on the
    // nested build; agent-ebpf's rust-toolchain.toml and .cargo/config.toml must decide instead.
    for (key, _) in env::vars() {
        let inherited = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS";
        if inherited {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().context("running cargo for agent-ebpf (is rustup on PATH?)")?;
    if !status.success() {
        bail!("building agent-ebpf failed; run `cargo xtask setup` to install rust-src and bpf-linker");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/tollgate");
    if !obj.exists() {
        bail!("agent-ebpf built but {} is missing", obj.display());
    }
    println!("cargo:rustc-env=TOLLGATE_EBPF_OBJECT={}", obj.canonicalize()?.display());
    Ok(())
}
