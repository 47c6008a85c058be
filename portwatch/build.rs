//! Builds the eBPF programs and hands the object to `include_bytes!`, so the agent binary
//! is self-contained and can never carry a stale object.
//!
//! The programs are built by a nested cargo with Debian's rustc, which ships a prebuilt
//! `core` for `bpfel-unknown-none` (see docs/PLATFORM.md: no `-Z build-std` here). They go to
//! their own target dir so the nested cargo never waits on the outer build's lock.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for dir in ["portwatch-ebpf/src", "portwatch-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for file in [
        "portwatch-ebpf/Cargo.toml",
        "portwatch-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=PORTWATCH_BPF_RUSTC");

    let bpf_rustc = env::var("PORTWATCH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    if !PathBuf::from(&bpf_rustc).exists() {
        bail!(
            "{bpf_rustc} not found: the eBPF programs need Debian's rustc-web and \
             libstd-rust-web-dev-bpf; run `cargo xtask setup` first"
        );
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--package", "portwatch-ebpf"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", &bpf_rustc)
        // aya-ebpf uses #![feature]; Debian's stable rustc needs this to accept it.
        .env("RUSTC_BOOTSTRAP", "1");
    // Whatever the outer build injects (clippy's wrapper, host RUSTFLAGS, coverage
    // instrumentation) must not reach the BPF build.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .context("running cargo for the eBPF programs")?;
    if !status.success() {
        bail!("building portwatch-ebpf failed ({status}); see the errors above");
    }
    let object = target_dir.join("bpfel-unknown-none/release/portwatch");
    std::fs::copy(&object, out_dir.join("portwatch.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
