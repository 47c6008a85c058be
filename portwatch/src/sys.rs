//! Host preconditions the agent sets up or checks itself: privileges, tracefs, memlock,
//! and the clocks used to turn kernel timestamps into wall-clock time.

use std::{cell::Cell, fs, io, path::Path};

use anyhow::{Context as _, bail};

/// Fail early, in one line, when we cannot possibly load BPF programs.
pub fn require_root() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "portwatch must run as root (it loads eBPF programs: CAP_BPF, CAP_PERFMON, \
             CAP_NET_ADMIN); run it with sudo"
        );
    }
    Ok(())
}

/// Tracepoint attach goes through tracefs, which a fresh machine does not mount.
pub fn ensure_tracefs() -> anyhow::Result<()> {
    let candidates = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if candidates
        .iter()
        .any(|p| Path::new(p).join("events").is_dir())
    {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({err}); run \
             `mount -t tracefs tracefs /sys/kernel/tracing` and try again"
        );
    }
    log::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use the memory
/// cgroup, and some sandboxes refuse the raise. A refusal is worth a warning only.
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        let level = if kernel_at_least(5, 11) {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11 that account BPF \
             memory to the memory cgroup",
            io::Error::last_os_error()
        );
    }
}

/// Running kernel version from uname(2), e.g. (6, 18).
pub fn kernel_version() -> Option<(u32, u32)> {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release: Vec<u8> = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let release = String::from_utf8_lossy(&release);
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    kernel_version().is_some_and(|v| v >= (major, minor))
}

/// Raise the agent's CPU priority by `boost` nice levels (like auditd's
/// `priority_boost`): when listeners churn on every core, a sensor that gets no CPU
/// loses events, and a lost event is worse than a slightly slower workload. Refusal is
/// a warning.
pub fn boost_priority(boost: u8) {
    if boost == 0 {
        return;
    }
    let nice = -i32::from(boost.min(20));
    // SAFETY: plain syscall on this process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        log::warn!(
            "could not raise the agent's priority to nice {nice} ({}); under a CPU-saturating \
             listener flood events may be lost (and are then counted)",
            io::Error::last_os_error()
        );
    }
}

pub fn require_btf() -> anyhow::Result<Vec<u8>> {
    fs::read("/sys/kernel/btf/vmlinux").context(
        "cannot read /sys/kernel/btf/vmlinux: this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF=y), \
         which portwatch needs to read socket ports and process ancestry; use a kernel built \
         with BTF (Debian, Ubuntu, RHEL >= 8.2 kernels have it)",
    )
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Converts kernel clocks to wall-clock time. Refreshed periodically so NTP steps are
/// followed; the offsets are sampled back to back, so their error is well under 1 µs.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    /// realtime - monotonic, ns.
    mono_to_wall: i128,
    /// realtime - boottime, ns: wall time of boot.
    boot_wall_ns: i128,
}

impl Clocks {
    pub fn now() -> Clocks {
        let real = clock_ns(libc::CLOCK_REALTIME) as i128;
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as i128;
        let boot = clock_ns(libc::CLOCK_BOOTTIME) as i128;
        Clocks {
            mono_to_wall: real - mono,
            boot_wall_ns: real - boot,
        }
    }

    /// Wall-clock ns since the epoch for a `bpf_ktime_get_ns()` value.
    pub fn wall_from_ktime(&self, ktime_ns: u64) -> i128 {
        ktime_ns as i128 + self.mono_to_wall
    }

    /// Wall-clock ns since the epoch for a time since boot (e.g. a task's start).
    pub fn wall_from_boottime(&self, boot_ns: u64) -> i128 {
        boot_ns as i128 + self.boot_wall_ns
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-26T23:05:59.123456789Z`.
pub fn rfc3339(wall_ns: i128) -> String {
    // Two per event on the hot path: `format!` took a fifth of the agent's CPU at full
    // listener churn (perf). The date and time of day change once a second, so they are
    // kept per thread; the nanoseconds are written digit by digit.
    thread_local! {
        static SECOND: Cell<(i64, Option<[u8; 19]>)> = const { Cell::new((i64::MIN, None)) };
    }
    let Ok(ns) = i64::try_from(wall_ns) else {
        return rfc3339_slow(wall_ns);
    };
    let secs = ns.div_euclid(1_000_000_000);
    let prefix = SECOND.with(|c| match c.get() {
        (s, p) if s == secs => p,
        _ => {
            let p = second_prefix(secs);
            c.set((secs, p));
            p
        }
    });
    let Some(prefix) = prefix else {
        return rfc3339_slow(wall_ns);
    };
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    b[..19].copy_from_slice(&prefix);
    put_digits(&mut b[20..29], ns.rem_euclid(1_000_000_000) as u64);
    std::str::from_utf8(&b)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the epoch; `None` outside years 0-9999.
fn second_prefix(secs: i64) -> Option<[u8; 19]> {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        return None;
    }
    let sod = secs.rem_euclid(86_400);
    let mut b = *b"0000-00-00T00:00:00";
    put_digits(&mut b[0..4], y as u64);
    put_digits(&mut b[5..7], u64::from(m));
    put_digits(&mut b[8..10], u64::from(d));
    put_digits(&mut b[11..13], (sod / 3600) as u64);
    put_digits(&mut b[14..16], (sod / 60 % 60) as u64);
    put_digits(&mut b[17..19], (sod % 60) as u64);
    Some(b)
}

/// `v` in decimal, right-aligned and zero-padded to fill `out`.
fn put_digits(out: &mut [u8], mut v: u64) {
    for c in out.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Any instant, years past 9999 and before 0 included.
fn rfc3339_slow(wall_ns: i128) -> String {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let nanos = wall_ns.rem_euclid(1_000_000_000);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian, days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Capabilities the running agent keeps once its programs are loaded and attached:
/// `CAP_SYS_PTRACE` (read `/proc/<pid>/exe` and `/proc/<pid>/fd` of any process, borrow
/// a socket with `pidfd_getfd` for its `IPV6_V6ONLY`), `CAP_DAC_READ_SEARCH` (read
/// `/proc/<pid>` files and walk the cgroup tree whatever their modes), `CAP_SYS_ADMIN`
/// (enter another network namespace with `setns` to read its addresses and listeners;
/// also what kernels before 6.5 check for any `bpf()` call, the ring's included),
/// `CAP_NET_ADMIN` (read the nf_tables ruleset with `nft -j list ruleset` and join the
/// netlink group that announces its changes; the iptables tools need it too) and
/// `CAP_NET_RAW` (`iptables-legacy-save` opens a raw socket to read the legacy tables).
/// Everything else (CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE, CAP_SYS_NICE,
/// CAP_DAC_OVERRIDE, CAP_SETUID, ...) is dropped, from the bounding set too.
pub const RUNTIME_CAPS: &[u32] = &[
    CAP_DAC_READ_SEARCH,
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    CAP_SYS_PTRACE,
    CAP_SYS_ADMIN,
];

// include/uapi/linux/capability.h (libc does not export them).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// Reduce this thread's capabilities (and the bounding set) to `keep`. Call it before
/// starting other threads: capabilities are per thread and inherited at creation.
pub fn drop_capabilities(keep: &[u32]) -> anyhow::Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // The bounding set first: dropping from it needs CAP_SETPCAP, about to go.
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // EPERM: no CAP_SETPCAP (already dropped by the service manager): the
            // bounding set is someone else's to set; the effective set below still is ours.
            if e.raw_os_error() != Some(libc::EPERM) {
                anyhow::bail!("dropping capability {cap} from the bounding set: {e}");
            }
        }
    }
    let mut mask = [0u32; 2];
    for &cap in keep {
        mask[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [0, 1].map(|i| Data {
        effective: mask[i],
        permitted: mask[i],
        inheritable: 0,
    });
    // SAFETY: capset reads a v3 header and two data words, both valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::from_mut(&mut header),
            data.as_ptr(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "dropping capabilities after attaching: {}",
            std::io::Error::last_os_error()
        );
    }
    log::info!(
        "capabilities reduced to {keep:?} (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN)"
    );
    Ok(())
}

/// True when this process is in the initial pid namespace (its pids are the kernel's).
/// `PROC_PID_INIT_INO` (include/linux/proc_ns.h) names that namespace.
pub fn in_initial_pid_ns() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::metadata("/proc/self/ns/pid")
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == PROC_PID_INIT_INO)
}

/// CPU seconds used and resident bytes of this process (for `sensor-health`).
pub fn self_usage() -> (f64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let cpu = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    } else {
        0.0
    };
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            pages * u64::try_from(page).unwrap_or(4096)
        });
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_digit_writer_matches_format() {
        let slow = rfc3339_slow;
        // A spread of instants from 1970 to past 9999 (the format! fallback) and before.
        let mut t: i128 = 1;
        while t < 300_000_000_000_000_000_000 {
            for v in [t, -t] {
                assert_eq!(rfc3339(v), slow(v), "{v}");
            }
            t = t * 3 / 2 + 987_654_321_987;
        }
        // Within one second (the cached date and time), and across its edges.
        let base: i128 = 1_795_734_359_000_000_000;
        for v in [
            base - 1,
            base,
            base + 1,
            base + 999_999_999,
            base + 1_000_000_000,
        ] {
            assert_eq!(rfc3339(v), slow(v), "{v}");
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (leap day) 12:34:56.000000789
        assert_eq!(
            rfc3339(951_827_696_000_000_789),
            "2000-02-29T12:34:56.000000789Z"
        );
        assert_eq!(
            rfc3339(1_795_734_359_123_456_789),
            "2026-11-26T23:05:59.123456789Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn clocks_map_now_to_now() {
        let c = Clocks::now();
        let wall = c.wall_from_ktime(monotonic_ns());
        let real = clock_ns(libc::CLOCK_REALTIME) as i128;
        assert!(
            (real - wall).abs() < 50_000_000,
            "offset off by {} ns",
            real - wall
        );
    }
}
