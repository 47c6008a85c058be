//! The kernels under QEMU, and the smoke check `cargo xtask test-vm` ends with: boot
//! Debian's 6.1 and 6.12 cloud kernels under QEMU (TCG) with a busybox initramfs, run the
//! already-built `target/release/portwatch` inside with its defaults, make real listeners
//! with the guest's own tools and check the agent's JSON against what the guest sees.
//!
//! Why: the eBPF side is Rust, which has no CO-RE, so every kernel struct offset the
//! programs use comes from the running kernel's BTF at start. This proves the same
//! binary reports the right ports, pids, socket inodes and network namespaces on
//! kernels whose struct layouts differ from the build machine's.
//!
//! Everything lives in `target/vm/`: the downloaded `.deb`s (kept: a cached one is used
//! even when apt has a newer ABI; delete it to move on), their unpacked `/boot`, and per
//! kernel an initramfs and `console.log`.

use std::{
    collections::BTreeMap,
    env,
    fmt::Write as _,
    fs,
    io::Read,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Debian packages the VM run needs on the host.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];

/// Ports the guest listens on; the checks look for exactly these.
const TCP_PORT: u16 = 4242;
/// busybox's nc has no UDP mode here; udhcpd's fixed port is the UDP listener.
const UDP_PORT: u16 = 67;

const OUT_BEGIN: &str = "=== PORTWATCH OUTPUT BEGIN ===";
const OUT_END: &str = "=== PORTWATCH OUTPUT END ===";
const ERR_BEGIN: &str = "=== PORTWATCH STDERR BEGIN ===";
const ERR_END: &str = "=== PORTWATCH STDERR END ===";
/// Prefix of the `key value...` lines the guest reports facts with (pids, inodes, exit).
const FACT: &str = "=== PORTWATCH FACT ";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

/// One Debian kernel flavour the VM can boot.
pub(crate) struct KernelSpec {
    pub(crate) label: &'static str,
    /// `apt-cache search --names-only` pattern of the image packages (one per ABI).
    apt_pattern: &'static str,
    /// Start of those packages' names, to find a cached `.deb` without asking apt.
    name_prefix: &'static str,
}

pub(crate) const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "6.1",
        apt_pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
        name_prefix: "linux-image-6.1.0-",
    },
    KernelSpec {
        label: "6.12",
        // bookworm ships 6.12 as linux-6.12 in bookworm-security (+deb12); bookworm-backports
        // as +bpo, if that suite is in the apt sources.
        apt_pattern: r"^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-cloud-amd64$",
        name_prefix: "linux-image-6.12.",
    },
];

/// Kernel options the agent and the init script rely on. Each must be built in (`=y`):
/// a module would have to be found, with its dependencies, in the unpacked `.deb`
/// (whose modules.dep is only made by depmod at install time) and loaded by init.
/// In Debian's 6.1 and 6.12 cloud kernels all of them are built in.
const REQUIRED_CONFIG: &[(&str, &str)] = &[
    ("CONFIG_BPF_SYSCALL", "bpf(2)"),
    ("CONFIG_DEBUG_INFO_BTF", "/sys/kernel/btf/vmlinux"),
    ("CONFIG_BPF_EVENTS", "BPF tracepoint programs"),
    ("CONFIG_FTRACE_SYSCALLS", "syscalls:sys_exit_listen"),
    ("CONFIG_TRACING", "tracefs"),
    ("CONFIG_CGROUPS", "cgroup2"),
    (
        "CONFIG_CGROUP_BPF",
        "cgroup post_bind/sock_release programs",
    ),
    ("CONFIG_INET", "TCP/UDP"),
    ("CONFIG_IPV6", "IPv6 sockets"),
    ("CONFIG_DEVTMPFS", "/dev"),
    ("CONFIG_BLK_DEV_INITRD", "the initramfs"),
    ("CONFIG_RD_GZIP", "a gzip initramfs"),
    ("CONFIG_SERIAL_8250_CONSOLE", "console=ttyS0"),
];

/// Workspace root when `--root` is not given: $PORTWATCH_ROOT, else the parent of the
/// crate this file is compiled in when that is xtask, else /work/main (a scratch copy).
pub(crate) fn workspace_root() -> PathBuf {
    if let Some(r) = env::var_os("PORTWATCH_ROOT") {
        return PathBuf::from(r);
    }
    match Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        Some(p) if p.join("xtask/src/vm.rs").is_file() => p.to_path_buf(),
        _ => PathBuf::from("/work/main"),
    }
}

pub(crate) fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub(crate) fn output_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

/// Seconds one smoke-check VM may run (boot, test, power-off) before it is killed.
pub(crate) const SMOKE_TIMEOUT: u64 = 180;

/// The smoke check on `kernel`: the agent (default `--hooks auto`) against `nc` and
/// `udhcpd` in the guest, checked against what the guest itself sees of them.
pub fn smoke(kernel: KernelChoice) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the VM smoke check installs packages and builds initramfs trees: run as root");
    }
    let root = workspace_root();
    let agent = root.join("target/release/portwatch");
    if !agent.is_file() {
        bail!(
            "{} is missing: run `cargo xtask build` first",
            agent.display()
        );
    }
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    ensure_packages()?;
    let specs: Vec<&KernelSpec> = KERNELS
        .iter()
        .filter(|k| match kernel {
            KernelChoice::All => true,
            KernelChoice::V6_1 => k.label == "6.1",
            KernelChoice::V6_12 => k.label == "6.12",
        })
        .collect();

    // One VM at a time: TCG keeps a core busy and this machine has two.
    let mut results = Vec::new();
    for spec in specs {
        let outcome = run_kernel(spec, &vm_dir, &agent);
        results.push((spec.label, outcome));
    }

    eprintln!();
    let mut failed = 0;
    for (label, outcome) in &results {
        match outcome {
            Ok(r) if r.failures.is_empty() => {
                eprintln!("PASS {label} ({}): {:.1} s", r.release, r.secs);
            }
            Ok(r) => {
                failed += 1;
                eprintln!(
                    "FAIL {label} ({}): {:.1} s: {}",
                    r.release,
                    r.secs,
                    r.failures.join("; ")
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("FAIL {label}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} kernel(s) failed", results.len());
    }
    Ok(())
}

pub(crate) fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("vm packages: all present");
        return Ok(());
    }
    step(&format!("vm packages: installing {}", missing.join(" ")));
    run_ok(Command::new("apt-get").args(["update", "-q"]))?;
    let mut wanted: Vec<String> = missing.iter().map(|p| (*p).to_owned()).collect();
    // This kind of machine ships a backported qemu-utils (10.0) without the backports
    // source; Debian's qemu-system-x86 (7.2) depends on qemu-utils of its own version, so
    // apt would remove the installed one. Install both at qemu-system-x86's version in
    // one transaction instead: that downgrades qemu-img and removes nothing.
    if missing.contains(&"qemu-system-x86") && installed("qemu-utils") {
        let want = candidate("qemu-system-x86")?;
        if installed_version("qemu-utils").as_deref() != Some(want.as_str()) {
            step(&format!(
                "vm packages: qemu-utils {} -> {want}, to match qemu-system-x86",
                installed_version("qemu-utils").unwrap_or_default()
            ));
            wanted.push(format!("qemu-utils={want}"));
        }
    }
    let install = |simulate: bool| {
        let mut c = Command::new("apt-get");
        c.args([
            "install",
            "-q",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .arg(if simulate { "-s" } else { "-y" })
        .args(&wanted)
        .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    // A dry run names what would go: nothing may be removed.
    let sim = output_ok(&mut install(true))?;
    let removals = removals(&sim);
    if !removals.is_empty() {
        bail!(
            "installing {} would remove {}; install the kernel matrix's packages by hand \
             (README, Development) and rerun",
            wanted.join(" "),
            removals.join(" ")
        );
    }
    run_ok(&mut install(false))
}

/// Packages an `apt-get install -s` transcript removes (its `Remv NAME [VERSION]` lines).
fn removals(sim: &str) -> Vec<&str> {
    sim.lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// The version apt would install of `pkg`.
fn candidate(pkg: &str) -> anyhow::Result<String> {
    let out = output_ok(Command::new("apt-cache").args(["policy", pkg]))?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_owned)
        .with_context(|| format!("apt has no candidate version of {pkg}"))
}

/// The installed version of `pkg`, if it is installed.
fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Orders names like `linux-image-6.1.0-56-...` by their digit groups, so 56 > 9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest cached `.deb` of this kernel, else the newest apt knows, downloaded.
pub(crate) fn kernel_deb(spec: &KernelSpec, vm_dir: &Path) -> anyhow::Result<PathBuf> {
    let cached = fs::read_dir(vm_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(spec.name_prefix)
                    && n.contains("-cloud-amd64_")
                    && n.ends_with(".deb")
            })
        })
        .max_by_key(|p| version_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    if let Some(deb) = cached {
        step(&format!("kernel {}: cached {}", spec.label, deb.display()));
        return Ok(deb);
    }

    let names =
        output_ok(Command::new("apt-cache").args(["search", "--names-only", spec.apt_pattern]))?;
    let Some(pkg) = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version_key(n))
    else {
        bail!(
            "apt knows no package matching {} (is bookworm / bookworm-security in the apt sources?)",
            spec.apt_pattern
        );
    };
    let t = Instant::now();
    step(&format!("kernel {}: apt-get download {pkg}", spec.label));
    run_ok(
        Command::new("apt-get")
            // As root, apt's _apt sandbox user cannot write target/vm: say so up front
            // rather than have apt warn on every download.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", pkg])
            .current_dir(vm_dir),
    )?;
    let deb = fs::read_dir(vm_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download {pkg} left no {pkg}_*.deb in {}",
                vm_dir.display()
            )
        })?;
    step(&format!(
        "kernel {}: downloaded in {:.1} s",
        spec.label,
        t.elapsed().as_secs_f64()
    ));
    Ok(deb)
}

/// An unpacked kernel package: the bootable image and its release string.
pub(crate) struct Unpacked {
    pub(crate) vmlinuz: PathBuf,
    pub(crate) release: String,
}

/// Unpacks the `.deb`'s /boot once (next to it, named after it) and checks the config.
pub(crate) fn unpack_kernel(deb: &Path) -> anyhow::Result<Unpacked> {
    let dir = deb.with_extension("");
    let boot = dir.join("boot");
    if !boot.is_dir() {
        // Only /boot: every option REQUIRED_CONFIG lists is built in, so the ~100 MB of
        // modules are never needed. Unpacked beside the final name so an interrupted run
        // never leaves a half tree that looks complete.
        let tmp = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        let mut deb_tar = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting dpkg-deb")?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&tmp)
            .arg("./boot")
            .stdin(deb_tar.stdout.take().context("dpkg-deb stdout")?)
            .status()
            .context("running tar")?;
        let dpkg = deb_tar.wait()?;
        if !dpkg.success() || !tar.success() {
            bail!(
                "unpacking /boot of {}: dpkg-deb {dpkg}, tar {tar}",
                deb.display()
            );
        }
        fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
    }
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let config_path = boot.join(format!("config-{release}"));
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut bad = Vec::new();
    for (opt, why) in REQUIRED_CONFIG {
        let val = config
            .lines()
            .find_map(|l| l.strip_prefix(opt).and_then(|r| r.strip_prefix('=')));
        match val {
            Some("y") => {}
            Some("m") => bad.push(format!(
                "{opt}=m ({why}: a module, not loaded by this init)"
            )),
            _ => bad.push(format!("{opt} not set ({why})")),
        }
    }
    if !bad.is_empty() {
        bail!("kernel {release} lacks: {}", bad.join(", "));
    }
    Ok(Unpacked { vmlinuz, release })
}

/// What one VM run found.
struct KernelResult {
    release: String,
    secs: f64,
    failures: Vec<String>,
}

fn run_kernel(spec: &KernelSpec, vm_dir: &Path, agent: &Path) -> anyhow::Result<KernelResult> {
    let deb = kernel_deb(spec, vm_dir)?;
    let kernel = unpack_kernel(&deb)?;
    let work = vm_dir.join(spec.label);
    fs::create_dir_all(&work)?;
    let staging = work.join("initramfs");
    let initrd = work.join("initrd.gz");
    build_initramfs(&staging, &initrd, agent)?;

    step(&format!(
        "kernel {}: booting {} under QEMU TCG (timeout {} s)",
        spec.label, kernel.release, SMOKE_TIMEOUT
    ));
    let t = Instant::now();
    let boot = boot(&kernel.vmlinuz, &initrd, Duration::from_secs(SMOKE_TIMEOUT));
    let secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&initrd);
    let console = boot?;
    let log = work.join("console.log");
    fs::write(&log, &console.text).with_context(|| format!("writing {}", log.display()))?;

    let mut failures = Vec::new();
    if console.timed_out {
        failures.push(format!("VM still running after {SMOKE_TIMEOUT} s: killed"));
    }
    failures.extend(check(&console.text));
    if !failures.is_empty() {
        eprintln!(
            "--- kernel {} console (last 40 lines; all in {}) ---",
            spec.label,
            log.display()
        );
        let lines: Vec<&str> = console.text.lines().collect();
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{}", truncate(l, 400));
        }
        eprintln!("--- end of console ---");
    }
    Ok(KernelResult {
        release: kernel.release,
        secs,
        failures,
    })
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Shared libraries (and the loader) a dynamic binary needs, as `ldd` lists them.
pub(crate) fn needed_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = output_ok(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or the loader
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1` has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!(
            "ldd {} listed no libraries (is it static? then none are needed, but glibc builds are not)",
            bin.display()
        );
    }
    Ok(libs)
}

/// Copies `src` to the same absolute path under `root` (following symlinks: the
/// initramfs gets real files at the paths the loader looks up).
pub(crate) fn copy_into(root: &Path, src: &Path, mode: u32) -> anyhow::Result<()> {
    let dst = root.join(src.strip_prefix("/").unwrap_or(src));
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(src, &dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A fresh busybox root in `staging` (rebuilt every run: the agent binary changes between
/// runs, and this is quick): the usual top-level directories plus `extra_dirs`, busybox
/// with a link per applet, and the agent at /bin/portwatch (its libraries are the
/// caller's, with the rest of what it copies in).
pub fn busybox_root(staging: &Path, agent: &Path, extra_dirs: &[&str]) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(staging);
    let dirs = ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run"];
    for d in dirs.iter().chain(extra_dirs) {
        fs::create_dir_all(staging.join(d))?;
    }
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
    ] {
        let l = staging.join(link);
        fs::create_dir_all(l.parent().unwrap_or(staging))?;
        symlink(target, &l)?;
    }
    let busybox = Path::new("/bin/busybox");
    let dst = staging.join("bin/busybox");
    fs::copy(busybox, &dst).context("copying /bin/busybox (from busybox-static)")?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    let applets = output_ok(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            symlink("busybox", staging.join("bin").join(applet))?;
        }
    }
    let dst = staging.join("bin/portwatch");
    fs::copy(agent, &dst).with_context(|| format!("copying {}", agent.display()))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn build_initramfs(staging: &Path, initrd: &Path, agent: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    busybox_root(staging, agent, &[])?;
    for lib in needed_libs(agent)? {
        copy_into(staging, &lib, 0o755)?;
    }

    // Names for uid/gid 0 so user.name/group.name are filled as on a real host.
    fs::write(
        staging.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )?;
    fs::write(staging.join("etc/group"), "root:x:0:\n")?;
    fs::write(staging.join("etc/udhcpd.conf"), UDHCPD_CONF)?;
    fs::write(staging.join("tmp/udhcpd.leases"), "")?;
    let init = staging.join("init");
    fs::write(&init, init_script())?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    // /dev/console comes from the kernel's built-in initramfs (default_cpio_list), which
    // this archive is unpacked over, so init has a console before devtmpfs is mounted.
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
    let size = fs::metadata(initrd)?.len();
    step(&format!(
        "initramfs {} ({:.1} MiB) built in {:.1} s",
        initrd.display(),
        size as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The guest's PID 1 (busybox sh). Lines for the host start with `=== PORTWATCH`.
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
# PID 1 of the VM smoke check: mount what the agent needs, run it, make listeners, print.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
hostname portwatch-vm
fact() {{ echo "{FACT}$* ==="; }}
fact kernel "$(uname -r)"
fact netns "$(readlink /proc/self/ns/net)"
[ -r /sys/kernel/btf/vmlinux ] || fact missing /sys/kernel/btf/vmlinux

# "INODE PORT" of pid $1's socket found in /proc/net/$2 or $2"6" in state $3 (0A: TCP
# LISTEN, 07: UDP bound), polled up to 10 s: once it shows, listen()/bind() returned.
sock_of() {{
    i=0
    while [ $i -lt 100 ]; do
        for fd in /proc/$1/fd/*; do
            l=$(readlink $fd 2>/dev/null)
            case "$l" in
            socket:*)
                ino=${{l#socket:[}}; ino=${{ino%]}}
                hex=$(awk -v ino="$ino" -v st="$3" \
                    '$10 == ino && $4 == st {{ n = split($2, a, ":"); print a[n]; exit }}' \
                    /proc/net/$2 /proc/net/${{2}}6)
                if [ -n "$hex" ]; then echo "$ino $((0x$hex))"; return; fi ;;
            esac
        done
        i=$((i + 1)); sleep 0.1
    done
    echo "0 0"
}}
# What the guest itself sees of listener $1 (pid $2), for the host to compare.
listener() {{
    set -- $1 $2 $(sock_of $2 $3 $4)
    fact $1_pid $2
    fact $1_inode $3
    fact $1_port $4
}}
# Waits up to 10 s for the agent to write a line containing $1.
wait_out() {{
    i=0
    while [ $i -lt 100 ] && ! grep -q "$1" /out.json; do i=$((i + 1)); sleep 0.1; done
}}

/bin/portwatch watch --format json --no-snapshot > /out.json 2> /err.txt &
agent=$!
# Loading and attaching take a while under TCG: up to 60 s.
i=0
while [ $i -lt 600 ] && ! grep -q '"sensor-started"' /out.json; do
    kill -0 $agent 2>/dev/null || break
    i=$((i + 1)); sleep 0.1
done

if grep -q '"sensor-started"' /out.json; then
    # Full paths: busybox sh would otherwise run its applet through /proc/self/exe and
    # the process name would be "exe". busybox nc listens on :: (dual-stack).
    /bin/nc -l -p {TCP_PORT} < /dev/null > /dev/null 2>&1 &
    pid=$!
    listener tcp $pid tcp 0A
    kill $pid; wait $pid

    # No -p: nc binds port 0 and the kernel picks the port. bindv6only=1 makes the new
    # socket IPV6_V6ONLY (busybox has no flag for it), so skc_ipv6only is seen set.
    echo 1 > /proc/sys/net/ipv6/bindv6only
    /bin/nc -l < /dev/null > /dev/null 2>&1 &
    pid=$!
    listener eph $pid tcp 0A
    echo 0 > /proc/sys/net/ipv6/bindv6only
    kill $pid; wait $pid

    # UDP: this busybox's nc has no -u; udhcpd binds 0.0.0.0:{UDP_PORT}.
    /bin/udhcpd -f /etc/udhcpd.conf < /dev/null > /dev/null 2>&1 &
    pid=$!
    listener udp $pid udp 07
    kill $pid; wait $pid

    wait_out '"udp-released"'
fi

kill -TERM $agent 2>/dev/null
# A hung agent must not hang the VM: SIGKILL after 30 s (exit 137 then).
( sleep 30; kill -KILL $agent 2>/dev/null ) &
wait $agent
fact agent_exit $?
echo "{ERR_BEGIN}"
cat /err.txt
echo "{ERR_END}"
echo "{OUT_BEGIN}"
cat /out.json
echo "{OUT_END}"
poweroff -f
"#
    )
}

/// udhcpd's configuration: serve nothing real, just bind its UDP port on lo.
const UDHCPD_CONF: &str = "interface lo\nstart 127.0.0.10\nend 127.0.0.20\n\
                           lease_file /tmp/udhcpd.leases\npidfile /tmp/udhcpd.pid\n";

/// The console of a finished (or killed) VM.
pub(crate) struct Console {
    pub(crate) text: String,
    pub(crate) timed_out: bool,
}

pub(crate) fn boot(vmlinuz: &Path, initrd: &Path, timeout: Duration) -> anyhow::Result<Console> {
    boot_with(vmlinuz, initrd, timeout, 1, 1024)
}

/// Boots with `cpus` vCPUs and `mem_mib` of memory.
pub(crate) fn boot_with(
    vmlinuz: &Path,
    initrd: &Path,
    timeout: Duration,
    cpus: u32,
    mem_mib: u32,
) -> anyhow::Result<Console> {
    let mut child = Command::new("qemu-system-x86_64")
        // KVM hangs on these machines (docs/PLATFORM.md): TCG, no display.
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", &mem_mib.to_string(), "-smp", &cpus.to_string()])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // quiet: kernel messages on the shared serial console could split a JSON line;
        // panic=-1 + -no-reboot: a crashed init ends QEMU instead of hanging.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    // The serial line ends lines with \r\n.
    let mut text = String::from_utf8_lossy(&out).replace('\r', "");
    if !err.is_empty() {
        let _ = write!(text, "\n[qemu stderr]\n{}", String::from_utf8_lossy(&err));
    }
    if !status.success() && !timed_out {
        let _ = writeln!(text, "[qemu exited: {status}]");
    }
    Ok(Console { text, timed_out })
}

/// Lines strictly between `begin` and `end` (None if `begin` never appeared).
pub(crate) fn section<'a>(text: &'a str, begin: &str, end: &str) -> Option<Vec<&'a str>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != begin);
    lines.next()?;
    Some(lines.take_while(|l| l.trim() != end).collect())
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

/// A listener the guest makes and the events the agent must report for it.
struct Expect {
    /// Prefix of the guest's facts about it (`tcp_pid`, `tcp_inode`, `tcp_port`).
    key: &'static str,
    start: &'static str,
    stop: &'static str,
    process: &'static str,
    /// The port asked for; `None`: the kernel picks it (the guest reports which).
    port: Option<u16>,
    /// `portwatch.socket.v6only` expected on an IPv6 socket.
    v6only: bool,
}

const EXPECTED: &[Expect] = &[
    Expect {
        key: "tcp",
        start: "listen-started",
        stop: "listen-stopped",
        process: "nc",
        port: Some(TCP_PORT),
        v6only: false,
    },
    Expect {
        key: "eph",
        start: "listen-started",
        stop: "listen-stopped",
        process: "nc",
        port: None,
        v6only: true,
    },
    Expect {
        key: "udp",
        start: "udp-bound",
        stop: "udp-released",
        process: "udhcpd",
        port: Some(UDP_PORT),
        v6only: false,
    },
];

/// Everything wrong with one run's console; empty means PASS.
fn check(console: &str) -> Vec<String> {
    let mut fails = Vec::new();
    let facts: BTreeMap<&str, &str> = console
        .lines()
        // The first console line also carries SeaBIOS's terminal escapes: search, not
        // strip_prefix.
        .filter_map(|l| {
            let at = l.find(FACT)?;
            l[at + FACT.len()..].trim_end().strip_suffix(" ===")
        })
        .filter_map(|f| f.split_once(' '))
        .collect();
    let fact_u64 = |k: &str| facts.get(k).and_then(|v| v.parse::<u64>().ok());

    if let Some(err) = section(console, ERR_BEGIN, ERR_END) {
        let err: Vec<&str> = err.into_iter().filter(|l| !l.trim().is_empty()).collect();
        if !err.is_empty() {
            eprintln!("agent stderr in the VM:\n  {}", err.join("\n  "));
        }
    }
    if let Some(what) = facts.get("missing") {
        fails.push(format!("the guest kernel has no {what}"));
    }
    let Some(lines) = section(console, OUT_BEGIN, OUT_END) else {
        fails.push("no agent output on the console (init never got that far)".into());
        return fails;
    };
    let mut events = Vec::new();
    for l in lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        match serde_json::from_str::<Value>(l) {
            Ok(v) => events.push(v),
            Err(e) => fails.push(format!("not JSON ({e}): {}", truncate(l, 120))),
        }
    }
    let action_is = |v: &Value, a: &str| str_at(v, &["event", "action"]) == Some(a);

    match fact_u64("agent_exit") {
        Some(0) => {}
        Some(rc) => fails.push(format!("agent exit status {rc}")),
        None => fails.push("agent exit status not reported".into()),
    }
    if !events.iter().any(|v| action_is(v, "sensor-started")) {
        fails.push("no sensor-started".into());
        return fails;
    }
    for lost in events.iter().filter(|v| action_is(v, "events-lost")) {
        fails.push(format!(
            "events-lost: {}",
            lost.get("portwatch").unwrap_or(&Value::Null)
        ));
    }

    let netns = facts.get("netns").and_then(|s| {
        s.strip_prefix("net:[")?
            .strip_suffix(']')?
            .parse::<u64>()
            .ok()
    });
    for exp in EXPECTED {
        let guest_port = fact_u64(&format!("{}_port", exp.key)).unwrap_or(0);
        let port = match exp.port {
            Some(p) if u64::from(p) == guest_port => guest_port,
            None if guest_port > 0 => guest_port,
            _ => {
                fails.push(format!(
                    "the guest never saw {} ({}) listening (port {:?}, /proc/net says {guest_port})",
                    exp.process, exp.key, exp.port
                ));
                continue;
            }
        };
        let on_port = |a: &str| {
            events
                .iter()
                .find(|v| action_is(v, a) && u64_at(v, &["server", "port"]) == Some(port))
        };
        let what = format!("{} {port}", exp.start);
        match on_port(exp.start) {
            Some(ev) => {
                let want = Owner {
                    process: exp.process,
                    pid: fact_u64(&format!("{}_pid", exp.key)),
                    inode: fact_u64(&format!("{}_inode", exp.key)),
                    netns,
                };
                check_owner(&mut fails, &what, ev, &want);
                if str_at(ev, &["network", "type"]) == Some("ipv6") {
                    let v6 = ev
                        .pointer("/portwatch/socket/v6only")
                        .and_then(Value::as_bool);
                    if v6 != Some(exp.v6only) {
                        fails.push(format!(
                            "{what}: portwatch.socket.v6only {v6:?}, want {}",
                            exp.v6only
                        ));
                    }
                }
            }
            None => fails.push(format!("no {what}")),
        }
        let what = format!("{} {port}", exp.stop);
        match on_port(exp.stop) {
            Some(ev) => {
                let d = u64_at(ev, &["event", "duration"]);
                if d.is_none_or(|d| d == 0) {
                    fails.push(format!("{what}: event.duration {d:?}"));
                }
            }
            None => fails.push(format!("no {what}")),
        }
    }
    fails
}

/// What the guest itself saw of a listener's owner and socket.
struct Owner {
    process: &'static str,
    pid: Option<u64>,
    inode: Option<u64>,
    netns: Option<u64>,
}

/// The event's owner and socket against the guest's view: each field exercises some
/// of the BTF offsets the programs were given.
fn check_owner(fails: &mut Vec<String>, what: &str, ev: &Value, want: &Owner) {
    let pid = u64_at(ev, &["process", "pid"]);
    if pid.is_none() || pid == Some(0) || pid != want.pid {
        fails.push(format!(
            "{what}: process.pid {pid:?}, the guest's {} is {:?}",
            want.process, want.pid
        ));
    }
    let name = str_at(ev, &["process", "name"]);
    if name != Some(want.process) {
        fails.push(format!(
            "{what}: process.name {name:?}, want {:?}",
            want.process
        ));
    }
    // A child of init: task_struct.real_parent and tgid.
    let ppid = u64_at(ev, &["process", "parent", "pid"]);
    if ppid != Some(1) {
        fails.push(format!(
            "{what}: process.parent.pid {ppid:?}, want 1 (init)"
        ));
    }
    // "proc": the kernel's start_boottime (of group_leader) matched /proc's start time.
    let attr = str_at(ev, &["portwatch", "attribution"]);
    if attr != Some("proc") {
        fails.push(format!(
            "{what}: portwatch.attribution {attr:?}, want \"proc\""
        ));
    }
    // sock.sk_socket -> socket_alloc.vfs_inode -> inode.i_ino, against /proc/net.
    let ino = u64_at(ev, &["portwatch", "socket", "inode"]);
    if ino.is_none() || ino == Some(0) || ino != want.inode {
        fails.push(format!(
            "{what}: portwatch.socket.inode {ino:?}, /proc/net says {:?}",
            want.inode
        ));
    }
    // sock_common.skc_net -> net.ns.inum, against /proc/self/ns/net.
    let ns = u64_at(ev, &["portwatch", "socket", "netns"]);
    if ns.is_none() || ns != want.netns {
        fails.push(format!(
            "{what}: portwatch.socket.netns {ns:?}, the guest's is {:?}",
            want.netns
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console as a passing run prints it, with `edit` applied to each event.
    fn console(facts: &[(&str, &str)], edit: impl Fn(&mut Value)) -> String {
        let mut c = String::from("\x1bc\x1b[?7l");
        for (k, v) in facts {
            c += &format!("{FACT}{k} {v} ===\n");
        }
        c += &format!("{OUT_BEGIN}\n");
        let ev = |action: &str, port: u16, pid: u32, name: &str, ino: u32, v6: Option<bool>| {
            let mut v = serde_json::json!({
                "event": {"action": action, "duration": 5},
                "network": {"type": if v6.is_some() { "ipv6" } else { "ipv4" }},
                "server": {"port": port},
                "process": {"pid": pid, "name": name, "parent": {"pid": 1}},
                "portwatch": {"socket": {"inode": ino, "netns": 4026531840_u64, "v6only": v6},
                              "attribution": "proc"},
            });
            edit(&mut v);
            v.to_string() + "\n"
        };
        c += &serde_json::json!({"event": {"action": "sensor-started"}}).to_string();
        c += "\n";
        c += &ev("listen-started", 4242, 105, "nc", 10, Some(false));
        c += &ev("listen-stopped", 4242, 105, "nc", 10, Some(false));
        c += &ev("listen-started", 34037, 117, "nc", 11, Some(true));
        c += &ev("listen-stopped", 34037, 117, "nc", 11, Some(true));
        c += &ev("udp-bound", 67, 124, "udhcpd", 12, None);
        c += &ev("udp-released", 67, 124, "udhcpd", 12, None);
        c += &format!("{OUT_END}\n");
        c
    }

    const FACTS: &[(&str, &str)] = &[
        ("netns", "net:[4026531840]"),
        ("tcp_pid", "105"),
        ("tcp_inode", "10"),
        ("tcp_port", "4242"),
        ("eph_pid", "117"),
        ("eph_inode", "11"),
        ("eph_port", "34037"),
        ("udp_pid", "124"),
        ("udp_inode", "12"),
        ("udp_port", "67"),
        ("agent_exit", "0"),
    ];

    #[test]
    fn a_run_that_matches_the_guest_passes() {
        assert_eq!(check(&console(FACTS, |_| {})), Vec::<String>::new());
    }

    #[test]
    fn each_mismatch_is_named() {
        let fails = check(&console(FACTS, |v| {
            if v["server"]["port"] == 4242 {
                v["process"]["pid"] = 999.into();
            }
        }));
        assert_eq!(fails.len(), 1, "{fails:?}");
        assert!(fails[0].contains("process.pid Some(999)"), "{fails:?}");

        let fails = check(&console(FACTS, |v| {
            if v["event"]["action"] == "udp-bound" {
                v["event"]["action"] = "other".into();
            }
        }));
        assert_eq!(fails, vec!["no udp-bound 67".to_string()]);

        let fails = check(&console(FACTS, |v| {
            v["portwatch"]["socket"]["v6only"] = false.into();
            v["portwatch"]["attribution"] = "kernel".into();
        }));
        assert!(
            fails
                .iter()
                .any(|f| f.contains("v6only Some(false), want true"))
        );
        assert_eq!(
            fails.iter().filter(|f| f.contains("attribution")).count(),
            3
        );

        let fails = check(&console(FACTS, |v| {
            v["event"]["duration"] = 0.into();
        }));
        assert_eq!(fails.len(), 3, "{fails:?}");
    }

    #[test]
    fn agent_exit_lost_events_and_garbage_fail() {
        let mut facts = FACTS.to_vec();
        facts.retain(|(k, _)| *k != "agent_exit");
        facts.push(("agent_exit", "1"));
        assert_eq!(
            check(&console(&facts, |_| {})),
            vec!["agent exit status 1".to_string()]
        );

        let c = console(FACTS, |_| {}).replace(
            OUT_END,
            &format!(
                "{{\"event\":{{\"action\":\"events-lost\"}},\"portwatch\":{{\"lost\":1}}}}\n\
                 {{\"event\":[ [ 12.3] kernel: oops\n{OUT_END}"
            ),
        );
        let fails = check(&c);
        assert_eq!(fails.len(), 2, "{fails:?}");
        assert!(fails[0].starts_with("not JSON"));
        assert!(fails[1].starts_with("events-lost"));

        assert_eq!(
            check("boot messages only\n"),
            vec!["no agent output on the console (init never got that far)".to_string()]
        );
    }

    /// Simulations seen on a fresh machine of this kind (2026-11-28): Debian's QEMU alone
    /// removes the backported qemu-utils; with qemu-utils pinned to its version, nothing.
    #[test]
    fn a_simulated_removal_is_found() {
        let alone = "\
0 upgraded, 29 newly installed, 1 to remove and 122 not upgraded.
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst qemu-system-common (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
";
        assert_eq!(removals(alone), vec!["qemu-utils"]);
        let pinned = "\
The following packages will be DOWNGRADED:
0 upgraded, 29 newly installed, 1 downgraded, 0 to remove and 122 not upgraded.
Inst qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
";
        assert_eq!(removals(pinned), Vec::<&str>::new());
    }

    #[test]
    fn newest_kernel_by_number_not_text() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1.0-10-cloud-amd64",
        ];
        let newest = names.iter().max_by_key(|n| version_key(n));
        assert_eq!(newest, Some(&"linux-image-6.1.0-56-cloud-amd64"));
    }
}
