//! Project chores: set-up of a fresh machine, build, run, test, bench.
//!
//! `cargo xtask run` and `cargo xtask ci` are the README's two commands: each first
//! installs what it needs and this machine lacks (Debian packages, bpf-linker), skipping
//! what is there, with a line of progress per step. `cargo xtask test [FILTER]` is the
//! fast loop.

mod bench;
mod coverage;
mod fuzz;
mod package;
mod seccomp;
mod soak;
mod testvm;
mod vm;

use std::{
    env,
    io::{self, BufRead as _, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::coverage::Coverage;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the other commands need that this machine lacks (idempotent;
    /// QEMU for the VM commands comes with them).
    Setup,
    /// Set up what building needs, then build target/release/portwatch (eBPF object
    /// embedded).
    Build,
    /// Set up, build, and start `portwatch watch` with built-in defaults.
    Run {
        /// Extra arguments for `portwatch watch`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The fast loop: set up, build, run the unit and host real-kernel tests (only those
    /// FILTER names, when given). No fuzzing, package or VM steps.
    Test {
        /// A real-kernel test binary's name (sensor, hooks, ...: tests/tests/NAME.rs)
        /// runs that binary; other words filter test names in every binary, and
        /// harness flags (--exact, --skip NAME) go to the harness.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The full run (what CI runs): set up, build, unit and real-kernel tests, fuzzing,
    /// the package checks, the kernel matrix under QEMU and the VM smoke check. Fails,
    /// never skips, when a part cannot run, or when a test skipped wherever it ran.
    Ci,
    /// Set up, build, and run the benchmark suite (prints figures, writes results).
    Bench(bench::BenchArgs),
    /// Set up, build, and run the agent under a steady mixed churn for minutes: prints
    /// RSS over time, loss, and its listener table against /proc at the end.
    Soak(soak::SoakArgs),
    /// Set up, build, and make target/package/portwatch_*.deb; then lintian and an
    /// install/purge check in a throwaway copy of this machine.
    Package(package::PackageArgs),
    /// Set up, then run each libFuzzer target (fuzz/) for a bounded time.
    Fuzz(fuzz::FuzzArgs),
    /// The kernel test matrix: the real-kernel tests on Debian's 6.1/6.12 under QEMU,
    /// once per hook set (stable, direct, direct via kprobes), then the smoke check (the
    /// agent's defaults against listeners the guest's own tools make).
    TestVm(testvm::TestVmArgs),
}

/// What a command needs of the machine: its set-up installs only that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Building the agent: Debian's rustc and `core` for BPF, LLVM 22, bpf-linker
    /// (docs/PLATFORM.md).
    Build,
    /// Loading the programs into this kernel: root, tracefs mounted.
    Kernel,
    /// What the real-kernel tests and the benchmarks drive.
    TestTools,
    /// `cargo xtask package` and its checks.
    Package,
    /// `cargo xtask fuzz`: cargo-fuzz, and g++ for libFuzzer's C++ (libfuzzer-sys).
    Fuzz,
}

/// `cargo xtask setup` and `cargo xtask ci`.
const EVERYTHING: &[Need] = &[
    Need::Build,
    Need::Kernel,
    Need::TestTools,
    Need::Package,
    Need::Fuzz,
];

impl Need {
    /// Its Debian packages.
    fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Need::Build => &[
                "rustc-web",
                "cargo-web",
                "libstd-rust-web-dev-bpf",
                "llvm-22-dev",
            ],
            Need::Kernel => &[],
            // nftables and iptables: the firewall tests load real rulesets (and the
            // agent reads them with these tools) inside private network namespaces.
            Need::TestTools => &[
                "iproute2",
                "memcached",
                "bpftrace",
                "rsyslog",
                "nftables",
                "iptables",
                "python3",
                // firewall.rs: a real container runtime publishing a port (podman with
                // netavark; runc, since crun is refused setrlimit here; an image made
                // from busybox-static, since no registry is reachable).
                "podman",
                "netavark",
                "runc",
                "busybox-static",
                // sinks.rs: syslog over TLS (imtcp gtls driver), RELP (imrelp), and the
                // certificates the tests make.
                "rsyslog-gnutls",
                "rsyslog-relp",
                // The fleet relay example (packaging/relay) forwards with omkafka.
                "rsyslog-kafka",
                "openssl",
                // The libraries of syslog-ng-core that do not conflict with rsyslog: the
                // binary itself is unpacked privately (setup_syslog_ng).
                "libivykis0",
                "libnet1",
                "libpcre3",
                "libwrap0",
            ],
            Need::Package => &[
                "dpkg-dev",
                "binutils",
                "lintian",
                "man-db",
                "systemd",
                "systemd-container",
                "python3-yaml",
            ],
            Need::Fuzz => &["g++"],
        }
    }
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Setup => setup(EVERYTHING),
        Cmd::Build => setup(&[Need::Build]).and_then(|()| build()),
        Cmd::Run { args } => setup(&[Need::Build, Need::Kernel])
            .and_then(|()| build())
            .and_then(|()| run_agent(&args)),
        Cmd::Test { args } => setup(&[Need::Build, Need::Kernel, Need::TestTools])
            .and_then(|()| build())
            .and_then(|()| test(&args)),
        Cmd::Ci => setup(EVERYTHING)
            // First: a machine that cannot get QEMU fails now, not after the other parts.
            .and_then(|()| {
                vm::ensure_packages().context("ci: installing the kernel matrix's QEMU packages")
            })
            .and_then(|()| build().context("ci: build"))
            .and_then(|()| ci()),
        Cmd::Bench(args) => setup(&[Need::Build, Need::Kernel, Need::TestTools])
            .and_then(|()| build())
            .and_then(|()| bench::run(&args)),
        Cmd::Soak(args) => setup(&[Need::Build, Need::Kernel])
            .and_then(|()| build())
            .and_then(|()| soak::run(&args)),
        // --boot runs the agent in an nspawn container: this kernel, so Kernel too.
        Cmd::Package(args) => setup(&[Need::Build, Need::Kernel, Need::Package])
            .and_then(|()| build())
            .and_then(|()| package::run(&args)),
        // The fuzz crate links portwatch, whose build script builds the eBPF object.
        Cmd::Fuzz(args) => setup(&[Need::Build, Need::Fuzz]).and_then(|()| fuzz::run(&args)),
        // The guest gets the host's iproute2 `ip` (TestTools).
        Cmd::TestVm(args) => setup(&[Need::Build, Need::TestTools])
            .and_then(|()| build())
            .and_then(|()| testvm::run(&args, &mut coverage::Coverage::default())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

/// Installs what `needs` need and this machine lacks (idempotent: each step checks
/// first and says what it found).
fn setup(needs: &[Need]) -> anyhow::Result<()> {
    let t = Instant::now();
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the set-up installs what is missing{}: run as root",
            if needs.contains(&Need::Kernel) {
                ", and this command loads eBPF programs"
            } else {
                ""
            }
        );
    }
    let needed: Vec<&str> = needs
        .iter()
        .flat_map(|n| n.apt_packages().iter().copied())
        .collect();
    let missing: Vec<&str> = needed.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step(&format!("apt packages: all {} present", needed.len()));
    } else {
        step(&format!("apt packages: installing {}", missing.join(" ")));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    if needs.contains(&Need::Build) {
        setup_bpf_linker()?;
    }
    if needs.contains(&Need::Fuzz) {
        setup_cargo_fuzz()?;
    }
    if needs.contains(&Need::TestTools) {
        setup_syslog_ng()?;
    }
    if needs.contains(&Need::Kernel) {
        if Path::new("/sys/kernel/tracing/events").is_dir() {
            step("tracefs: mounted");
        } else {
            step("tracefs: mounting at /sys/kernel/tracing");
            status(Command::new("mount").args([
                "-t",
                "tracefs",
                "tracefs",
                "/sys/kernel/tracing",
            ]))?;
        }
    }
    step(&format!(
        "set-up done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn setup_bpf_linker() -> anyhow::Result<()> {
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if have_linker {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (about 2 min)"
    ));
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// Where the syslog-ng relay check finds syslog-ng: Debian's syslog-ng-core and
/// syslog-ng-mod-rdkafka unpacked, not installed (tests/tests/delivery.rs reads the same
/// path).
const SYSLOG_NG_ROOT: &str = "/opt/portwatch-test-tools/syslog-ng";

/// syslog-ng for `syslog-ng --syntax-only` of packaging/relay/syslog-ng-relay.conf.
/// Installed with apt it would remove rsyslog (both are the system logger, and Debian
/// makes them conflict), which the other relay tests need. So its two packages are
/// fetched with `apt-get download` and unpacked with `dpkg-deb -x` into SYSLOG_NG_ROOT;
/// their libraries that conflict with nothing come from apt (TestTools). It only reads
/// configurations there: no service, no /dev/log.
fn setup_syslog_ng() -> anyhow::Result<()> {
    let root = Path::new(SYSLOG_NG_ROOT);
    let bin = root.join("usr/sbin/syslog-ng");
    let runs = Command::new(&bin)
        .arg("--version")
        .env("LD_LIBRARY_PATH", root.join("usr/lib/syslog-ng"))
        .output()
        .is_ok_and(|o| o.status.success());
    if runs && root.join(".complete").exists() {
        step(&format!(
            "syslog-ng (unpacked in {SYSLOG_NG_ROOT}): present"
        ));
        return Ok(());
    }
    step(&format!(
        "syslog-ng: unpacking syslog-ng-core and syslog-ng-mod-rdkafka into {SYSLOG_NG_ROOT} \
         (apt would remove rsyslog)"
    ));
    let _ = std::fs::remove_dir_all(root);
    let debs = root.with_extension("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let download = || {
        let mut c = Command::new("apt-get");
        c.current_dir(&debs)
            .args(["download", "-q", "syslog-ng-core", "syslog-ng-mod-rdkafka"]);
        c
    };
    // Not found: the package lists of a fresh machine are stale or absent.
    if status(&mut download()).is_err() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(&mut download())?;
    }
    for e in std::fs::read_dir(&debs)? {
        let deb = e?.path();
        if deb.extension().is_some_and(|x| x == "deb") {
            status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
        }
    }
    std::fs::remove_dir_all(&debs)?;
    let out = Command::new(&bin)
        .arg("--version")
        .env("LD_LIBRARY_PATH", root.join("usr/lib/syslog-ng"))
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} --version failed after unpacking: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::write(root.join(".complete"), b"")?;
    Ok(())
}

fn setup_cargo_fuzz() -> anyhow::Result<()> {
    let have_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have_cargo_fuzz {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step(&format!(
        "cargo-fuzz {CARGO_FUZZ_VERSION}: installing (about 1 min)"
    ));
    status(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn build() -> anyhow::Result<()> {
    let t = Instant::now();
    step("building target/release/portwatch (eBPF object embedded)");
    status(cargo().args(["build", "--release", "--package", "portwatch"]))?;
    step(&format!("build done in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(())
}

/// target/release/loadgen, the benchmark and soak load generator.
fn build_loadgen() -> anyhow::Result<()> {
    status(cargo().args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "xtask",
        "--bin",
        "loadgen",
    ]))
}

pub fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/portwatch")
}

fn run_agent(args: &[String]) -> anyhow::Result<()> {
    step("starting portwatch watch (Ctrl-C stops it)");
    let st = Command::new(agent_binary())
        .arg("watch")
        .args(args)
        .status()?;
    if !st.success() {
        bail!("portwatch exited with {st}");
    }
    Ok(())
}

/// `cargo test` of the default members (everything but the eBPF crate, which only
/// builds for BPF): unit tests and the host real-kernel tests, one at a time (they share
/// the host's hooks and sockets). `filter`: see [`split_filter`].
fn host_tests(filter: &[String]) -> anyhow::Result<Command> {
    let (binaries, harness) = split_filter(filter, &test_binaries()?);
    let mut c = cargo();
    c.args(["test", "--release"]);
    for b in &binaries {
        c.args(["--test", b]);
    }
    c.arg("--")
        // --show-output: a test that cannot run here says "skipped: why" visibly.
        .args(["--test-threads=1", "--show-output"])
        .args(harness)
        .env("PORTWATCH_BIN", agent_binary());
    Ok(c)
}

/// The real-kernel test binaries: `tests/tests/NAME.rs`.
fn test_binaries() -> anyhow::Result<Vec<String>> {
    let dir = workspace_root().join("tests/tests");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "rs")
            && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    Ok(names)
}

/// `cargo xtask test FILTER...`: a word that names a real-kernel test binary (`sensor`
/// for tests/tests/sensor.rs) runs that binary, with `--test`; every other word goes to
/// the test harness, as a test name filter (or a harness flag, like `--exact`). Test
/// names seldom contain their binary's name, so `cargo xtask test sensor` would
/// otherwise run two tests from other binaries and none of sensor's.
fn split_filter(filter: &[String], binaries: &[String]) -> (Vec<String>, Vec<String>) {
    filter.iter().cloned().partition(|w| binaries.contains(w))
}

/// The fast loop: the unit and host real-kernel tests (only those `args` name).
fn test(args: &[String]) -> anyhow::Result<()> {
    let t = Instant::now();
    step("running unit and real-kernel tests");
    status(&mut host_tests(args)?)?;
    step(&format!("tests done in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(())
}

/// Runs `cmd` with stdout and stderr on one pipe, echoing each line to `echo` as it
/// comes, and returns all of it: `cargo xtask ci` reads the tests' verdicts from it.
fn status_tee(cmd: &mut Command, echo: &mut dyn Write) -> anyhow::Result<String> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    // Close this process's write ends (held by `cmd`), or the read never sees EOF.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut reader = BufReader::new(reader);
    let mut all = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // A closed stdout (`| head`) must not stop the run: keep collecting.
        let _ = echo.write_all(&line).and_then(|()| echo.flush());
        all.extend_from_slice(&line);
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(String::from_utf8_lossy(&all).into_owned())
}

/// Everything, as CI runs it. Each part runs or fails the run, and the error names the
/// part and why. A test that skipped ("skipped: why") in one part must have run in
/// another (the host, or a kernel and hook set of the matrix), else the run fails too.
fn ci() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut coverage = Coverage::default();

    let t = Instant::now();
    step("running unit and real-kernel tests");
    let out = host_tests(&[])
        .and_then(|mut c| status_tee(&mut c, &mut io::stdout().lock()))
        .context("ci: unit and host real-kernel tests")?;
    coverage.add("host", &coverage::parse(&out, "?"));
    step(&format!("tests done in {:.1} s", t.elapsed().as_secs_f64()));

    // Hostile input: a short run of every fuzz target (the committed inputs were
    // replayed by the tests above already). Longer runs: `cargo xtask fuzz --secs N`.
    fuzz::run(&fuzz::FuzzArgs {
        secs: 8,
        targets: Vec::new(),
        sanitizer: "address".into(),
    })
    .context("ci: fuzzing (cargo xtask fuzz --secs 8)")?;

    // The Debian package of the binary just tested: lintian, the example
    // configurations, install/purge in a throwaway copy of this machine, and the
    // service running under systemd in a booted copy (~30 s in all).
    package::run(&package::PackageArgs {
        no_check: false,
        boot: true,
        write_seccomp: false,
    })
    .context("ci: package checks (cargo xtask package --boot)")?;

    // The kernel test matrix: the same real-kernel tests on Debian's 6.1 and 6.12 under
    // QEMU, once per hook set. The host kernel only runs the stable set; the direct set
    // (fentry/fexit, kprobes) is tested there, and their struct offsets differ from this
    // kernel's, which is what the BTF-driven globals must get right. QEMU was installed
    // without removing anything before the build (vm::ensure_packages), or the run
    // failed there.
    let t = Instant::now();
    step("running the real-kernel tests on Debian's 6.1 and 6.12 kernels under QEMU");
    let args = testvm::TestVmArgs {
        kernel: vm::KernelChoice::All,
        sets: testvm::SETS.iter().map(|s| s.to_string()).collect(),
        only: Vec::new(),
        timeout: testvm::VM_TIMEOUT,
    };
    testvm::run(&args, &mut coverage).context("ci: kernel test matrix (cargo xtask test-vm)")?;
    step(&format!(
        "kernel test matrix and VM smoke check done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    step(&format!(
        "tests that skipped somewhere: {} (each must have run elsewhere in this run)",
        coverage.ran_elsewhere().len() + coverage.ran_nowhere().len()
    ));
    for t in coverage.ran_elsewhere() {
        eprintln!("  {t}");
    }
    let nowhere = coverage.ran_nowhere();
    if !nowhere.is_empty() {
        for t in &nowhere {
            eprintln!("  RAN NOWHERE {t}");
        }
        bail!(
            "ci: {} test(s) ran nowhere in this run, skipped wherever they were tried (see \
             above): {}",
            nowhere.len(),
            nowhere.join(", ")
        );
    }
    step(&format!(
        "full run passed in {:.1} min ({} distinct tests ran)",
        t0.elapsed().as_secs_f64() / 60.0,
        coverage.ran()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_words_naming_a_binary_select_it() {
        let bins: Vec<String> = ["hooks", "sensor"].map(String::from).to_vec();
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split_filter(&words(&["sensor"]), &bins),
            (words(&["sensor"]), words(&[]))
        );
        assert_eq!(
            split_filter(&words(&["hooks", "io_uring", "--exact"]), &bins),
            (words(&["hooks"]), words(&["io_uring", "--exact"]))
        );
        assert_eq!(
            split_filter(&words(&["fold"]), &bins),
            (words(&[]), words(&["fold"]))
        );
    }

    #[test]
    fn status_tee_returns_both_streams_and_fails_with_the_command() {
        let sh = |script: &str| {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let mut echoed = Vec::new();
        let out = status_tee(&mut sh("echo out; echo err >&2"), &mut echoed).unwrap();
        assert_eq!(out, "out\nerr\n");
        assert_eq!(echoed, b"out\nerr\n");
        let e = status_tee(&mut sh("echo partial; exit 3"), &mut io::sink()).unwrap_err();
        assert!(format!("{e:#}").contains("exit status: 3"), "{e:#}");
    }

    #[test]
    fn the_test_binaries_are_found() {
        let bins = test_binaries().unwrap();
        assert!(bins.iter().any(|b| b == "sensor"), "{bins:?}");
    }
}
