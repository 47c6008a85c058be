//! `cargo xtask test-vm`: the kernel test matrix. Boots Debian's 6.1 and 6.12 cloud
//! kernels under QEMU (TCG) with an initramfs holding the agent and the real-kernel test
//! binaries (`tests/tests/*.rs`, with their shared libraries), and runs those tests once
//! per hook set (`PORTWATCH_HOOKS=stable|direct|direct-kprobe`), then reports pass/fail
//! per kernel and hook set.
//!
//! Why: the host kernel (6.18 microVM) only allows the stable set, so the direct set's
//! fentry/fexit and kprobe programs can only be tested on these kernels; and since Rust
//! eBPF has no CO-RE, every struct offset comes from each kernel's BTF, whose layouts
//! differ. One boot per kernel runs every set (boots are the slow part under TCG).
//!
//! Before the tests of a set run, the guest starts the agent with `--hooks SET` once:
//! a set the kernel cannot run is reported with the agent's own reason, not as failures.

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    coverage::{self, Coverage},
    vm::{self, KernelChoice, KernelSpec, step},
};

/// Hook sets run in each guest, in order. `direct-kprobe` is the direct set forced onto
/// its kprobe fallback (`--hooks direct-kprobe`, hidden): where fentry works, `direct`
/// never reaches that code.
pub const SETS: &[&str] = &["stable", "direct", "direct-kprobe"];

/// Tests left out in the VM, and why (passed to the test binaries as `--skip`).
const VM_SKIPS: &[(&str, &str)] = &[
    (
        "memcached_from_debian",
        "needs Debian's memcached package, which the initramfs does not carry (runs on the host)",
    ),
    (
        "listener_living_under_a_millisecond",
        "under TCG emulation socket+bind+listen+close alone takes over 1 ms (1.6 ms seen), \
         so the test cannot make a sub-millisecond listener (runs on the host)",
    ),
];

/// Test binaries left out of the VM, and why.
const VM_LEFT_OUT: &[(&str, &str)] = &[
    (
        "alerts",
        "risk classification is user-space logic over the same events on every kernel \
         (runs on the host); left out to keep the matrix within a few minutes",
    ),
    (
        "cli",
        "command-line and config-file errors are found before anything touches the \
         kernel (runs on the host)",
    ),
    (
        "reliability",
        "output faults, SIGHUP and capabilities are user-space paths, and its 40,000-listener \
         flood would take minutes under TCG (runs on the host)",
    ),
    (
        "sinks",
        "destinations are user-space, and rsyslog is not in the initramfs (runs on the host)",
    ),
    (
        "delivery",
        "TLS, RELP and the disk spool are user-space and need rsyslog and openssl, which \
         the initramfs does not carry (runs on the host)",
    ),
    (
        "firewall",
        "the verdict is user-space evaluation of the ruleset and needs nft, iptables and \
         python3 in private network namespaces, which the busybox guest lacks (runs on the \
         host)",
    ),
    (
        "local_user",
        "needs useradd and a delegated cgroup subtree, which the busybox guest lacks; \
         attribution and advice are user-space logic over the same events (runs on the host)",
    ),
    (
        "flood",
        "two processes flooding for seconds per test would take minutes under TCG, and the \
         guest has no useradd; the fold path of every hook set runs in the VM through \
         sensor's fold tests (runs on the host)",
    ),
];

/// The kprobe flavour runs the core socket tests only: it shares every line after the
/// hook with the fentry flavour, which runs the whole VM suite.
const KPROBE_BINARIES: &[&str] = &["hooks", "sensor"];

/// Seconds one matrix VM may run. The 6.1 guest took 696-755 s of 900 under TCG on this
/// 2-core machine (2026-11-28, with other work running): a loaded machine must slow a
/// passing run, not fail it.
pub const VM_TIMEOUT: u64 = 1200;

const SET_MARK: &str = "=== PORTWATCH SET ";
const RUN_BEGIN: &str = "=== PORTWATCH RUN ";

#[derive(clap::Args, Debug)]
pub struct TestVmArgs {
    /// Which Debian kernel to boot: 6.1, 6.12 or all.
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    pub kernel: KernelChoice,
    /// Hook sets to run (comma-separated): stable, direct, direct-kprobe.
    #[arg(long, value_delimiter = ',', default_values_t = SETS.iter().map(|s| s.to_string()))]
    pub sets: Vec<String>,
    /// Only test binaries whose name is listed (comma-separated: sensor, hooks, ...).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Seconds one VM may run before it is killed.
    #[arg(long, default_value_t = VM_TIMEOUT)]
    pub timeout: u64,
}

/// One test binary for the guest: its name (`sensor`) and path on the host.
struct TestBin {
    name: String,
    path: PathBuf,
}

/// What one hook set did on one kernel.
#[derive(Debug, Default, PartialEq)]
struct SetResult {
    set: String,
    /// `fentry`, `kprobe`, `tracepoint+cgroup`; empty if the set did not start.
    via: String,
    /// Why the set could not run here (then no test ran).
    unsupported: Option<String>,
    passed: u64,
    failed: Vec<String>,
    skipped: Vec<String>,
    /// Every test that passed, and whether it only skipped (for `cargo xtask ci`).
    outcomes: Vec<coverage::Outcome>,
    /// Binaries that never reported a summary (crash, timeout).
    incomplete: Vec<String>,
}

impl SetResult {
    fn ok(&self) -> bool {
        self.unsupported.is_none()
            && self.failed.is_empty()
            && self.incomplete.is_empty()
            && self.passed > 0
    }
}

/// Runs the matrix; each kernel and hook set's test outcomes go into `coverage` as
/// `KERNEL SET` (e.g. `6.1 direct`).
pub fn run(args: &TestVmArgs, coverage: &mut Coverage) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("xtask test-vm installs packages and builds initramfs trees: run as root");
    }
    let root = vm::workspace_root();
    let agent = root.join("target/release/portwatch");
    if !agent.is_file() {
        bail!(
            "{} is missing: run `cargo xtask build` first",
            agent.display()
        );
    }
    for s in &args.sets {
        if !SETS.contains(&s.as_str()) {
            bail!("unknown hook set {s:?}: use {}", SETS.join(", "));
        }
    }
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    vm::ensure_packages()?;
    let mut bins = test_binaries(&root)?;
    if args.only.is_empty() {
        bins.retain(|b| !VM_LEFT_OUT.iter().any(|(n, _)| *n == b.name));
    } else {
        bins.retain(|b| args.only.contains(&b.name));
    }
    if bins.is_empty() {
        bail!("no test binaries to run");
    }

    let specs: Vec<&KernelSpec> = vm::KERNELS
        .iter()
        .filter(|k| match args.kernel {
            KernelChoice::All => true,
            KernelChoice::V6_1 => k.label == "6.1",
            KernelChoice::V6_12 => k.label == "6.12",
        })
        .collect();
    let mut report = Vec::new();
    for spec in specs {
        let t = Instant::now();
        let res = run_kernel(spec, &vm_dir, &agent, &bins, args);
        report.push((spec.label, res, t.elapsed().as_secs_f64()));
    }

    eprintln!();
    eprintln!("kernel test matrix (tests: {}):", names(&bins));
    for (label, reason) in VM_LEFT_OUT.iter().chain(VM_SKIPS) {
        eprintln!("  left out in the VM: {label}: {reason}");
    }
    eprintln!(
        "  direct-kprobe runs {} only: the kprobe flavour differs from fentry only in the hook",
        KPROBE_BINARIES.join(", ")
    );
    let mut bad = 0;
    for (label, res, secs) in &report {
        match res {
            Err(e) => {
                bad += 1;
                eprintln!("FAIL {label}: {e:#} ({secs:.0} s)");
            }
            Ok((release, sets)) => {
                eprintln!("kernel {label} ({release}), {secs:.0} s:");
                for r in sets {
                    if !r.ok() {
                        bad += 1;
                    }
                    eprintln!("  {}", describe(r));
                    coverage.add(&format!("{label} {}", r.set), &r.outcomes);
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} kernel/hook-set run(s) failed");
    }
    // Then the smoke check (about 10 s a kernel): the agent's defaults (auto, so the
    // direct set there) against listeners the guest's own tools make, checked against
    // what the guest itself sees of them (pids, inodes, network namespace, IPV6_V6ONLY).
    // A run narrowed to some test binaries (`--only`) leaves it out, and says so.
    if args.only.is_empty() {
        step("checking the agent against nc and udhcpd on the same kernels (smoke check)");
        vm::smoke(args.kernel).context("VM smoke check")?;
    } else {
        step("smoke check not run: --only narrowed this run to some test binaries");
    }
    Ok(())
}

fn names(bins: &[TestBin]) -> String {
    bins.iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(r: &SetResult) -> String {
    let head = if r.ok() { "PASS" } else { "FAIL" };
    let via = if r.via.is_empty() {
        String::new()
    } else {
        format!(" (via {})", r.via)
    };
    if let Some(why) = &r.unsupported {
        return format!("{head} {}: cannot run on this kernel: {why}", r.set);
    }
    let mut s = format!(
        "{head} {}{via}: {} passed, {} failed",
        r.set,
        r.passed,
        r.failed.len()
    );
    if !r.failed.is_empty() {
        s += &format!(" ({})", r.failed.join(", "));
    }
    if !r.incomplete.is_empty() {
        s += &format!("; no summary from {}", r.incomplete.join(", "));
    }
    for k in &r.skipped {
        s += &format!("\n      {k}");
    }
    s
}

/// Builds the integration test binaries (`cargo test --no-run`) and lists them.
fn test_binaries(root: &Path) -> anyhow::Result<Vec<TestBin>> {
    step("building the real-kernel test binaries");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        // The default members, as `cargo xtask test` builds them: with `--package` the
        // features would resolve differently and every test binary be built again.
        .args(["test", "--release", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test = v["reason"] == "compiler-artifact"
            && v["profile"]["test"] == true
            && v["manifest_path"]
                .as_str()
                .is_some_and(|m| Path::new(m) == root.join("tests/Cargo.toml"))
            && v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            v["target"]["name"].as_str(),
            v["executable"].as_str(),
        ) {
            bins.push(TestBin {
                name: name.to_owned(),
                path: PathBuf::from(exe),
            });
        }
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}

fn run_kernel(
    spec: &KernelSpec,
    vm_dir: &Path,
    agent: &Path,
    bins: &[TestBin],
    args: &TestVmArgs,
) -> anyhow::Result<(String, Vec<SetResult>)> {
    let deb = vm::kernel_deb(spec, vm_dir)?;
    let kernel = vm::unpack_kernel(&deb)?;
    let work = vm_dir.join(format!("test-{}", spec.label));
    fs::create_dir_all(&work)?;
    let staging = work.join("initramfs");
    let initrd = work.join("initrd.gz");
    build_initramfs(&staging, &initrd, agent, bins, &args.sets)?;
    step(&format!(
        "kernel {}: booting {} under QEMU TCG, running {} with hook sets {} (timeout {} s)",
        spec.label,
        kernel.release,
        names(bins),
        args.sets.join(", "),
        args.timeout
    ));
    // Two vCPUs: the tests run an agent beside the process they watch.
    let console = vm::boot_with(
        &kernel.vmlinuz,
        &initrd,
        Duration::from_secs(args.timeout),
        2,
        2048,
    );
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&initrd);
    let console = console?;
    let log = work.join("console.log");
    fs::write(&log, &console.text)?;
    let mut results = parse(&console.text, &args.sets, bins);
    if console.timed_out {
        for r in &mut results {
            if r.unsupported.is_none() && !r.incomplete.is_empty() {
                r.incomplete
                    .iter_mut()
                    .for_each(|b| *b += " (VM timed out)");
            }
        }
    }
    // Retried probes pass silently otherwise: say so, with what the guest knew.
    for note in console
        .text
        .lines()
        .filter(|l| l.contains("=== PORTWATCH NOTE "))
    {
        eprintln!("  kernel {}: {}", spec.label, vm::truncate(note, 300));
    }
    if results.iter().any(|r| !r.ok()) {
        eprintln!(
            "--- kernel {} console (last 60 lines; all in {}) ---",
            spec.label,
            log.display()
        );
        let lines: Vec<&str> = console.text.lines().collect();
        for l in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("{}", vm::truncate(l, 300));
        }
        eprintln!("--- end of console ---");
    }
    Ok((kernel.release, results))
}

fn build_initramfs(
    staging: &Path,
    initrd: &Path,
    agent: &Path,
    bins: &[TestBin],
    sets: &[String],
) -> anyhow::Result<()> {
    let t = Instant::now();
    vm::busybox_root(staging, agent, &["tests"])?;
    let mut libs = vm::needed_libs(agent)?;
    for b in bins {
        let dst = staging.join("tests").join(&b.name);
        fs::copy(&b.path, &dst).with_context(|| format!("copying {}", b.path.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
        libs.extend(vm::needed_libs(&b.path)?);
    }
    // iproute2's ip over busybox's applet, which has no `ip netns` (the network
    // namespace test needs it). Without it on the host, that test skips and says so.
    let ip = Path::new("/bin/ip");
    if fs::symlink_metadata(ip).is_ok_and(|m| m.is_file()) {
        let dst = staging.join("bin/ip");
        let _ = fs::remove_file(&dst);
        fs::copy(ip, &dst).context("copying /bin/ip")?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
        libs.extend(vm::needed_libs(ip)?);
    }
    libs.sort();
    libs.dedup();
    for lib in &libs {
        vm::copy_into(staging, lib, 0o755)?;
    }
    fs::write(
        staging.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(staging.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let init = staging.join("init");
    fs::write(&init, init_script(bins, sets))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let st = Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > "$2""#)
        .arg("sh")
        .arg(staging)
        .arg(initrd)
        .status()
        .context("running find | cpio | gzip")?;
    if !st.success() {
        bail!("building {} failed: {st}", initrd.display());
    }
    step(&format!(
        "initramfs {} ({:.1} MiB) built in {:.1} s",
        initrd.display(),
        fs::metadata(initrd)?.len() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// PID 1 of the guest: mount what the agent and tests need, then per hook set: check the
/// agent starts with it, and run every test binary, one test at a time.
fn init_script(bins_list: &[TestBin], sets: &[String]) -> String {
    let skips: String = VM_SKIPS
        .iter()
        .map(|(t, _)| format!(" --skip {t}"))
        .collect();
    let bins: String = bins_list
        .iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let kprobe_bins: String = bins_list
        .iter()
        .map(|b| b.name.as_str())
        .filter(|n| KPROBE_BINARIES.contains(n))
        .collect::<Vec<_>>()
        .join(" ");
    let sets = sets.join(" ");
    format!(
        r#"#!/bin/sh
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
hostname portwatch-vm
echo "=== PORTWATCH FACT kernel $(uname -r) ==="
probe() {{
    /bin/portwatch watch --format json --no-snapshot --hooks $1 > /tmp/probe.json 2> /tmp/probe.err &
    pid=$!
    i=0
    while [ $i -lt 900 ] && ! grep -q '"sensor-started"' /tmp/probe.json; do
        kill -0 $pid 2>/dev/null || break
        i=$((i + 1)); sleep 0.1
    done
}}
for set in {sets}; do
    probe $set
    # An agent that neither started nor said why (seen twice after the stable set's
    # tests: on 6.12 it ended "Killed" by the timeout, on 6.1 it was still running) is
    # not a verdict on the kernel: say what is known (where it is stuck, what it
    # logged, the kernel log), stop it, and try once more.
    if ! grep -q '"sensor-started"' /tmp/probe.json && ! grep -v '^portwatch: info' /tmp/probe.err | grep -q .; then
        state="exited"
        if kill -0 $pid 2>/dev/null; then
            state="still running after $i polls: $(cut -d' ' -f3 /proc/$pid/stat) in $(cat /proc/$pid/wchan); stack $(cat /proc/$pid/stack 2>/dev/null | head -n 8 | tr '\n' ' ')"
            kill -KILL $pid
        fi
        wait $pid; rc=$?
        echo "=== PORTWATCH NOTE $set: no sensor-started and no error ($state, status $rc); retrying; agent log: $(tail -n 3 /tmp/probe.err | tr '\n' ' ' | head -c 400); kernel log: $(dmesg | tail -n 5 | tr '\n' ' ' | head -c 600) ==="
        probe $set
    fi
    if grep -q '"sensor-started"' /tmp/probe.json; then
        via=$(grep -o '"via":"[^"]*"' /tmp/probe.json | head -1 | cut -d'"' -f4)
        kill -TERM $pid; wait $pid
        echo "{SET_MARK}$set ok $via ==="
    else
        kill -KILL $pid 2>/dev/null; wait $pid; rc=$?
        why=$(grep -v '^portwatch: info' /tmp/probe.err | tr '\n' ' ' | head -c 600)
        [ -n "$why" ] || why="no sensor-started and no error after $i polls (status $rc)"
        echo "{SET_MARK}$set unsupported $why ==="
        continue
    fi
    bins="{bins}"
    [ "$set" = direct-kprobe ] && bins="{kprobe_bins}"
    for t in $bins; do
        echo "{RUN_BEGIN}$set $t begin ==="
        PORTWATCH_HOOKS=$set PORTWATCH_BIN=/bin/portwatch /tests/$t --test-threads=1 --show-output{skips} 2>&1
        echo "{RUN_BEGIN}$set $t end $? ==="
    done
done
poweroff -f
"#
    )
}

/// Results per hook set from a guest's console.
fn parse(console: &str, sets: &[String], bins: &[TestBin]) -> Vec<SetResult> {
    let lines: Vec<&str> = console.lines().collect();
    let mut out = Vec::new();
    for set in sets {
        let mut r = SetResult {
            set: set.clone(),
            ..SetResult::default()
        };
        let mark = format!("{SET_MARK}{set} ");
        let Some(status) = lines.iter().find_map(|l| {
            let at = l.find(&mark)?;
            l[at + mark.len()..].trim_end().strip_suffix("===")
        }) else {
            r.unsupported = Some("the guest never got to this set".into());
            out.push(r);
            continue;
        };
        match status.trim().split_once(' ').unwrap_or((status.trim(), "")) {
            ("ok", via) => r.via = via.trim().to_owned(),
            (_, why) => {
                r.unsupported = Some(why.trim().to_owned());
                out.push(r);
                continue;
            }
        }
        for b in bins
            .iter()
            .filter(|b| set != "direct-kprobe" || KPROBE_BINARIES.contains(&b.name.as_str()))
        {
            let begin = format!("{RUN_BEGIN}{set} {} begin ===", b.name);
            let end = format!("{RUN_BEGIN}{set} {} end ", b.name);
            let Some(start) = lines.iter().position(|l| l.contains(&begin)) else {
                r.incomplete.push(b.name.clone());
                continue;
            };
            let body: Vec<&str> = lines[start + 1..]
                .iter()
                .take_while(|l| !l.contains(&end))
                .copied()
                .collect();
            let mut summary = false;
            let mut current = "";
            // The agents' stderr shares the console, so a "test NAME ... FAILED" line may
            // be split by it: the failures are also read from libtest's closing list
            // ("failures:" then one indented name a line) and from the exit status.
            let failed_before = r.failed.len();
            let mut listing = false;
            let fail = |r: &mut SetResult, name: &str| {
                let name = format!("{}::{name}", b.name);
                if !r.failed.contains(&name) {
                    r.failed.push(name);
                }
            };
            for l in &body {
                if *l == "failures:" {
                    listing = true;
                    continue;
                }
                if listing {
                    match l.strip_prefix("    ") {
                        Some(name) if !name.is_empty() && !name.contains(' ') => fail(&mut r, name),
                        _ => listing = false,
                    }
                }
                if let Some(rest) = l.strip_prefix("---- ") {
                    current = rest.split_whitespace().next().unwrap_or("");
                }
                if let Some(rest) = l.strip_prefix("test ") {
                    if let Some(name) = rest.strip_suffix(" ... FAILED") {
                        fail(&mut r, name);
                    }
                    if rest.starts_with("result: ") {
                        summary = true;
                        r.passed += count_before(rest, " passed");
                    }
                }
                if let Some(at) = l.find("skipped: ") {
                    r.skipped.push(format!(
                        "{}::{current}: {}",
                        b.name,
                        vm::truncate(&l[at..], 200)
                    ));
                }
            }
            if !summary {
                r.incomplete.push(b.name.clone());
            }
            // A binary that exited nonzero failed, whether or not a name was found.
            let status = lines[start + 1..]
                .iter()
                .find_map(|l| l.split_once(&end))
                .and_then(|(_, rest)| {
                    rest.trim_end()
                        .strip_suffix("===")?
                        .trim()
                        .parse::<i32>()
                        .ok()
                });
            if let Some(code) = status.filter(|c| *c != 0)
                && r.failed.len() == failed_before
            {
                r.failed.push(format!("{}::(exit status {code})", b.name));
            }
            r.outcomes
                .extend(coverage::parse(&body.join("\n"), &b.name));
        }
        out.push(r);
    }
    out
}

/// `N` in "... N passed; ..." (0 when absent).
fn count_before(s: &str, word: &str) -> u64 {
    s.find(word)
        .and_then(|at| s[..at].rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins() -> Vec<TestBin> {
        ["hooks", "sensor"]
            .iter()
            .map(|n| TestBin {
                name: (*n).into(),
                path: PathBuf::new(),
            })
            .collect()
    }

    #[test]
    fn parses_pass_fail_skip_and_unsupported_sets() {
        let console = "\
=== PORTWATCH SET stable ok tracepoint+cgroup ===
=== PORTWATCH RUN stable hooks begin ===
test a ... ok
test b ... ok

successes:

---- b stdout ----
skipped: this kernel cannot run the direct hook set

successes:
    a
    b

test result: ok. 2 passed; 0 failed; 0 ignored
=== PORTWATCH RUN stable hooks end 0 ===
=== PORTWATCH RUN stable sensor begin ===
test c ... FAILED
test result: FAILED. 10 passed; 1 failed; 0 ignored
=== PORTWATCH RUN stable sensor end 101 ===
=== PORTWATCH SET direct unsupported portwatch: error: fentry refused: EPERM ===
";
        let sets = vec![
            "stable".to_owned(),
            "direct".to_owned(),
            "direct-kprobe".to_owned(),
        ];
        let r = parse(console, &sets, &bins());
        assert_eq!(r[0].via, "tracepoint+cgroup");
        assert_eq!(r[0].passed, 12);
        assert_eq!(r[0].failed, vec!["sensor::c".to_owned()]);
        assert_eq!(r[0].skipped.len(), 1, "{:?}", r[0].skipped);
        assert!(r[0].skipped[0].starts_with("hooks::b: skipped: this kernel"));
        let o: Vec<(&str, bool)> = r[0]
            .outcomes
            .iter()
            .map(|o| (o.test.as_str(), o.skipped.is_some()))
            .collect();
        assert_eq!(o, vec![("hooks::a", false), ("hooks::b", true)]);
        assert!(!r[0].ok());
        assert_eq!(
            r[1].unsupported.as_deref(),
            Some("portwatch: error: fentry refused: EPERM")
        );
        assert!(r[2].unsupported.is_some());
    }

    /// The VM run of 2026-11-29 05:00: agents' warnings split the "... FAILED" line,
    /// and the set was reported passed.
    #[test]
    fn a_failure_split_by_stderr_or_known_only_by_exit_status_is_a_failure() {
        let console = "\
=== PORTWATCH SET stable ok sock-ops+cgroup ===
=== PORTWATCH RUN stable hooks begin ===
test a ... portwatch: warn: firewall: not fully read
ok
test b ... portwatch: warn: firewall: not fully read
portwatch: warn: firewall: cannot follow
FAILED

successes:
    a

failures:

---- b stdout ----
thread 'b' panicked at tests/tests/hooks.rs:337:9:
    indented output of the test

failures:
    b

test result: FAILED. 1 passed; 1 failed; 0 ignored
=== PORTWATCH RUN stable hooks end 101 ===
=== PORTWATCH RUN stable sensor begin ===
test c ... ok
test result: ok. 1 passed; 0 failed
=== PORTWATCH RUN stable sensor end 101 ===
";
        let r = parse(console, &["stable".to_owned()], &bins());
        assert_eq!(
            r[0].failed,
            vec![
                "hooks::b".to_owned(),
                "sensor::(exit status 101)".to_owned()
            ]
        );
        assert_eq!(r[0].passed, 2);
        assert!(!r[0].ok());
    }

    #[test]
    fn a_binary_without_a_summary_is_incomplete() {
        let console = "\
=== PORTWATCH SET direct ok fentry ===
=== PORTWATCH RUN direct hooks begin ===
test a ... ok
test result: ok. 1 passed; 0 failed
=== PORTWATCH RUN direct hooks end 0 ===
=== PORTWATCH RUN direct sensor begin ===
test c ... ok
";
        let r = parse(console, &["direct".to_owned()], &bins());
        assert_eq!(r[0].passed, 1);
        assert_eq!(r[0].incomplete, vec!["sensor".to_owned()]);
        assert!(!r[0].ok());
    }
}
