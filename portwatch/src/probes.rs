//! Loading and attaching the kernel programs, in one place: which hook is used for what,
//! and a one-line error when the running kernel cannot provide it.
//!
//! | program        | hook                                    | kernel source                       |
//! |----------------|-----------------------------------------|-------------------------------------|
//! | `listen_state` | tracepoint `sock:inet_sock_set_state`   | include/trace/events/sock.h         |
//! | `listen_sockops` | cgroup sock_ops `TCP_LISTEN_CB` on the cgroup2 root | net/ipv4/af_inet.c `__inet_listen_sk()` |
//! | `udp_bind4`    | cgroup `post_bind4` on the cgroup2 root | net/ipv4/af_inet.c `__inet_bind()`  |
//! | `udp_bind6`    | cgroup `post_bind6` on the cgroup2 root | net/ipv6/af_inet6.c `__inet6_bind()`|
//! | `udp_release`  | cgroup `sock_release` on the cgroup2 root | net/ipv4/af_inet.c `inet_release()`|

use std::{fs::File, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, SockOps, TracePoint},
};
use portwatch_common::{KernelOffsets, stat};

use crate::{btf, procfs, sys};

/// The eBPF object, built by build.rs from portwatch-ebpf and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch.bpf.o"));

/// Names of every program in the object, as the kernel reports them.
pub const PROGRAMS: [&str; 5] = [
    "listen_state",
    "listen_sockops",
    "udp_bind4",
    "udp_bind6",
    "udp_release",
];

/// Loaded and attached programs. Dropping it detaches everything: the cgroup
/// attachments are bpf_links (kernel >= 5.7) owned by this process, so they also go
/// away if the process is killed.
pub struct Sensor {
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    pub stats: StatsReader,
    pub sleep_flag: SleepFlag,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub offsets: KernelOffsets,
    pub cgroup_root: PathBuf,
}

pub struct Options {
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
}

pub fn load(opts: &Options) -> anyhow::Result<Sensor> {
    sys::require_root()?;
    sys::raise_memlock();
    sys::ensure_tracefs()?;
    // aya's loader always parses the kernel BTF when created. The object has no BTF and
    // needs no CO-RE relocation (offsets come in as globals), so that copy is dropped at
    // once, before our own read: the two never coexist, which keeps peak memory down.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let offsets = {
        let btf_bytes = sys::require_btf()?;
        let kernel_btf = btf::Btf::parse(&btf_bytes).context("parsing /sys/kernel/btf/vmlinux")?;
        kernel_btf.kernel_offsets()
    };
    let missing = btf::missing(&offsets);
    if offsets.sock_num == KernelOffsets::UNKNOWN {
        bail!("this kernel's BTF has no `struct sock_common.skc_num`; cannot read listen ports");
    }
    if !missing.is_empty() {
        log::warn!(
            "kernel BTF lacks {}: those fields will be reported as unknown",
            missing.join(", ")
        );
    }

    let cgroup_root = procfs::cgroup2_mount()
        .context("reading /proc/self/mountinfo")?
        .ok_or_else(|| {
            anyhow!(
                "no cgroup2 filesystem is mounted (needed for the UDP bind hooks); mount one \
                 with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
            )
        })?;

    let mut ebpf = loader
        .override_global("OFFSETS", &offsets, true)
        .map_max_entries("EVENTS", opts.ring_bytes)
        .load(OBJECT)
        .map_err(|e| {
            anyhow!(
                "loading the eBPF object failed: {e}; portwatch needs Linux >= 5.8 with \
                 BPF ring buffers (CONFIG_BPF_SYSCALL=y)"
            )
        })?;
    // The logger owns the log map: keep it alive or later loads fail (PLATFORM.md).
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("eBPF logging unavailable: {e}");
            None
        }
    };

    let cgroup = File::open(&cgroup_root)
        .with_context(|| format!("opening cgroup2 root {}", cgroup_root.display()))?;
    let prog: &mut SockOps = ebpf
        .program_mut("listen_sockops")
        .ok_or_else(|| anyhow!("program listen_sockops missing from the embedded object"))?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!("the kernel refused program listen_sockops: {e}"))?;
    prog.attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| {
            anyhow!(
                "attaching listen_sockops to {} failed: {}; the kernel needs CONFIG_CGROUP_BPF=y",
                cgroup_root.display(),
                error_chain(&e)
            )
        })?;
    for name in ["udp_bind4", "udp_bind6", "udp_release"] {
        let prog: &mut CgroupSock = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the kernel refused program {name}: {e}"))?;
        // aya attaches through bpf_link_create (kernel >= 5.7), where the kernel rejects
        // any flag (`cgroup_bpf_link_attach()`) and links always coexist with other
        // programs, as BPF_F_ALLOW_MULTI would. So the mode here must be `Single` (0).
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| {
                anyhow!(
                    "attaching {name} to {} failed: {}; the kernel needs CONFIG_CGROUP_BPF=y",
                    cgroup_root.display(),
                    error_chain(&e)
                )
            })?;
    }
    // The state tracepoint goes last: a LISTEN it parks must always be followed by the
    // sock_ops confirmation, or its close would be mistaken for a failed listen().
    attach_tracepoint(&mut ebpf, "listen_state", "sock", "inet_sock_set_state")?;
    log::info!(
        "hooks attached: tracepoint sock:inet_sock_set_state, cgroup sock_ops \
         (TCP_LISTEN_CB), post_bind4/post_bind6/sock_release on {}",
        cgroup_root.display()
    );

    let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
    let stats = StatsReader(PerCpuArray::try_from(
        ebpf.take_map("STATS").context("STATS map missing")?,
    )?);
    let flag = Array::try_from(
        ebpf.take_map("AGENT_SLEEPING")
            .context("AGENT_SLEEPING map missing")?,
    )?;
    let sleep_flag = SleepFlag {
        map: flag,
        sleeping: false,
    };
    Ok(Sensor {
        ebpf,
        ring,
        stats,
        sleep_flag,
        logger,
        offsets,
        cgroup_root,
    })
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &str,
    category: &str,
    event: &str,
) -> anyhow::Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!("the kernel refused program {name}: {e}"))?;
    prog.attach(category, event).map_err(|e| {
        anyhow!(
            "attaching {name} to tracepoint {category}:{event} failed: {}; check that \
             /sys/kernel/tracing/events/{category}/{event} exists (CONFIG_TRACEPOINTS, \
             CONFIG_FTRACE_SYSCALLS)",
            error_chain(&e)
        )
    })?;
    Ok(())
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub ring_full: u64,
    pub listen_failed: u64,
    pub pending_full: u64,
    pub bound_full: u64,
    pub read_failed: u64,
}

/// The agent's half of the wake-up handshake (`AGENT_SLEEPING` in the programs): the
/// kernel side submits records without waking the reader and only wakes it when this
/// flag says it is about to block.
pub struct SleepFlag {
    map: Array<MapData, u32>,
    sleeping: bool,
}

impl SleepFlag {
    /// Announce that the reader is about to block. The caller must look at the ring
    /// once more afterwards: a record committed before the flag was visible got no
    /// wake-up, so it has to be seen now.
    pub fn going_to_sleep(&mut self) -> anyhow::Result<()> {
        self.map.set(0, 1, 0).context("setting AGENT_SLEEPING")?;
        // Order the flag store before the ring re-check (pairs with the producer's
        // commit-then-load): store->load reordering would lose a wake-up.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.sleeping = true;
        Ok(())
    }

    pub fn awake(&mut self) -> anyhow::Result<()> {
        if self.sleeping {
            self.map.set(0, 0, 0).context("clearing AGENT_SLEEPING")?;
            self.sleeping = false;
        }
        Ok(())
    }
}

/// Reads the kernel-side `STATS` counters.
pub struct StatsReader(pub PerCpuArray<MapData, u64>);

impl StatsReader {
    pub fn read(&self) -> anyhow::Result<KernelStats> {
        let sum = |i: u32| -> anyhow::Result<u64> { Ok(self.0.get(&i, 0)?.iter().copied().sum()) };
        Ok(KernelStats {
            ring_full: sum(stat::RING_FULL)?,
            listen_failed: sum(stat::LISTEN_FAILED)?,
            pending_full: sum(stat::PENDING_FULL)?,
            bound_full: sum(stat::BOUND_FULL)?,
            read_failed: sum(stat::READ_FAILED)?,
        })
    }
}

/// `e: source: source...` on one line (aya's errors keep the errno in `source()`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
