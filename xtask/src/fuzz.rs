//! `cargo xtask fuzz`: build the libFuzzer targets in `fuzz/` with cargo-fuzz and run
//! each for a bounded time, starting from its committed seeds.
//!
//! Each target grows a scratch corpus under `fuzz/target/corpus/<target>/` (kept between
//! runs, never committed); the seeds in `fuzz/corpus/<target>/` are read only. An input
//! that crashes a target is copied to `fuzz/regressions/<target>/`, which `cargo test`
//! replays (`portwatch/tests/fuzz_regressions.rs`): commit it with the fix.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{status, step, workspace_root};

/// The targets, as `fuzz/Cargo.toml` names their binaries.
pub const TARGETS: &[&str] = &[
    "proc_net",
    "procfs",
    "rules",
    "ruleset",
    "record",
    "emit",
    "remediation",
    "relp",
];

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub secs: u64,
    /// Run only this target (repeatable) [default: all].
    #[arg(long = "target", value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
    /// Sanitizer the targets are built with (`none` builds faster; the code under test
    /// is safe Rust apart from the record decoder's one unaligned read).
    #[arg(long, default_value = "address", value_parser = ["address", "none"])]
    pub sanitizer: String,
}

struct Outcome {
    target: String,
    runs: u64,
    execs_per_sec: u64,
    corpus: usize,
    crash: Option<PathBuf>,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let fuzz_dir = workspace_root().join("fuzz");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };

    let t = Instant::now();
    step(&format!(
        "building {} fuzz target(s) (cargo fuzz, sanitizer {}, debug assertions)",
        targets.len(),
        args.sanitizer
    ));
    // cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation); RUSTC_BOOTSTRAP
    // lets the stable toolchain accept them, as there is no nightly with rust-src here.
    status(
        Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["fuzz", "build", "--release", "--debug-assertions"])
            .args(["--sanitizer", &args.sanitizer])
            .env("RUSTC_BOOTSTRAP", "1"),
    )
    .context("building the fuzz targets (is cargo-fuzz installed? `cargo xtask setup`)")?;
    step(&format!(
        "fuzz build done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    let bin_dir = fuzz_dir.join("target/x86_64-unknown-linux-gnu/release");
    let mut outcomes = Vec::new();
    for target in targets {
        step(&format!("fuzzing {target} for {} s", args.secs));
        outcomes.push(fuzz_one(&fuzz_dir, &bin_dir, target, args.secs)?);
    }

    eprintln!(
        "{:<10} {:>12} {:>10} {:>8}  result",
        "target", "runs", "exec/s", "corpus"
    );
    for o in &outcomes {
        let result = match &o.crash {
            None => "ok".to_owned(),
            Some(p) => format!("CRASH, input saved to {}", p.display()),
        };
        eprintln!(
            "{:<10} {:>12} {:>10} {:>8}  {result}",
            o.target, o.runs, o.execs_per_sec, o.corpus
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz target(s) {} crashed: the inputs are in fuzz/regressions/ (cargo test replays \
             them); fix the code and commit them",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn fuzz_one(fuzz_dir: &Path, bin_dir: &Path, target: &str, secs: u64) -> anyhow::Result<Outcome> {
    let scratch = fuzz_dir.join("target/corpus").join(target);
    let seeds = fuzz_dir.join("corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    // Artifacts are scratch: whatever a run finds is copied to fuzz/regressions/.
    if artifacts.exists() {
        fs::remove_dir_all(&artifacts)
            .with_context(|| format!("clearing {}", artifacts.display()))?;
    }
    for dir in [&scratch, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = Command::new(bin_dir.join(target))
        .arg(format!("-max_total_time={secs}"))
        // A single input running this long is a hang: report it like a crash.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // The first directory receives new inputs; the seeds stay as committed.
        .arg(&scratch)
        .arg(&seeds)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let runs = stat("number_of_executed_units");
    let execs_per_sec = stat("average_exec_per_sec");
    let corpus = fs::read_dir(&scratch).map_or(0, Iterator::count);

    let mut crash = None;
    if !out.status.success() {
        // Show libFuzzer's report of what failed: the panic message and where.
        let report: Vec<&str> = log
            .lines()
            .skip_while(|l| !(l.contains("panicked at") || l.starts_with("==")))
            .take(12)
            .collect();
        eprintln!("{}", report.join("\n"));
        let found = crash_files(&artifacts)?;
        let Some(input) = found.first() else {
            bail!(
                "fuzz target {target} failed ({}) without saving an input; its log:\n{log}",
                out.status
            );
        };
        let keep_dir = fuzz_dir.join("regressions").join(target);
        fs::create_dir_all(&keep_dir)?;
        let keep = keep_dir.join(input.file_name().context("artifact name")?);
        fs::copy(input, &keep).with_context(|| format!("saving {}", keep.display()))?;
        crash = Some(keep);
    }
    Ok(Outcome {
        target: target.to_owned(),
        runs,
        execs_per_sec,
        corpus,
        crash,
    })
}

/// libFuzzer's saved failures: crash-, timeout-, oom- and leak- files.
fn crash_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if ["crash-", "timeout-", "oom-", "leak-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_the_fuzz_crate() {
        let manifest = fs::read_to_string(workspace_root().join("fuzz/Cargo.toml"))
            .expect("reading fuzz/Cargo.toml");
        let bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|section| {
                let line = section.lines().find(|l| l.starts_with("name = "))?;
                Some(line.trim_start_matches("name = ").trim_matches('"'))
            })
            .collect();
        assert_eq!(
            bins, TARGETS,
            "fuzz/Cargo.toml [[bin]] names vs fuzz::TARGETS"
        );
    }
}
