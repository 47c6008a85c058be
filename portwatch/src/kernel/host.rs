//! Host preconditions the agent sets up or checks itself: privileges and capabilities,
//! tracefs, memlock, BTF, priority, and its own resource use.

use std::{fs, io, path::Path};

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
