//! Loading and attaching the kernel programs, in one place: which hook set is used, why,
//! and a one-line error when the running kernel cannot provide it.
//!
//! Two hook sets report the same events (same record, same fields):
//!
//! The stable set (any kernel with BTF, ring buffers and cgroup BPF; the only one on
//! kernels that refuse fentry and lack kprobes). Its default flavour has no tracepoint:
//!
//! | program        | hook                                    | kernel source                       |
//! |----------------|-----------------------------------------|-------------------------------------|
//! | `listen_ops`   | cgroup sock_ops `TCP_LISTEN_CB`, and `STATE_CB` of the listeners it flags | net/ipv4/af_inet.c `__inet_listen_sk()`, net/ipv4/tcp.c `tcp_set_state()` |
//! | `sock_released` | cgroup `sock_release` (UDP, and listeners older than the agent) | net/ipv4/af_inet.c `inet_release()` |
//! | `udp_bind4`, `udp_bind6`, `udp_send4`, `udp_send6` | as below | |
//!
//! Where the kernel refuses that flavour, the tracepoint flavour:
//!
//! | program        | hook                                    | kernel source                       |
//! |----------------|-----------------------------------------|-------------------------------------|
//! | `listen_rawtp` | raw tracepoint `inet_sock_set_state` | include/trace/events/sock.h         |
//! | `listen_state` | tracepoint `sock:inet_sock_set_state` (where the raw one cannot run) | include/trace/events/sock.h |
//! | `listen_sockops` | cgroup sock_ops `TCP_LISTEN_CB` on the cgroup2 root | net/ipv4/af_inet.c `__inet_listen_sk()` |
//! | `udp_bind4`    | cgroup `post_bind4` on the cgroup2 root | net/ipv4/af_inet.c `__inet_bind()`  |
//! | `udp_bind6`    | cgroup `post_bind6` on the cgroup2 root | net/ipv6/af_inet6.c `__inet6_bind()`|
//! | `udp_release`  | cgroup `sock_release` on the cgroup2 root | net/ipv4/af_inet.c `inet_release()`|
//! | `udp_send4`    | cgroup `sendmsg4` on the cgroup2 root   | net/ipv4/udp.c `udp_sendmsg()`      |
//! | `udp_send6`    | cgroup `sendmsg6` on the cgroup2 root   | net/ipv6/udp.c `udpv6_sendmsg()`    |
//!
//! The direct set hooks `inet_listen()`, `inet_csk_listen_stop()`, `inet_bind()`,
//! `inet6_bind()` and `inet_release()` themselves, with fentry/fexit where the kernel
//! allows it, else kprobe/kretprobe (see portwatch-ebpf/src/direct.rs), and sees the
//! result of each call directly. Both sets find implicitly bound UDP sockets with the
//! same `udp_send4`/`udp_send6` (`inet_autobind()` is static, often inlined: no
//! function to hook).

use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, FEntry, FExit, KProbe, ProgramFd,
        RawTracePoint, SockOps, TracePoint,
    },
};
use portwatch_common::{KernelOffsets, stat};

use crate::{attribution::procfs, kernel::btf, kernel::host};

/// The eBPF object, built by build.rs from portwatch-ebpf and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch.bpf.o"));

/// Programs of the stable set, as the kernel reports their names.
pub const STABLE_PROGRAMS: [&str; 7] = [
    "listen_state",
    "listen_sockops",
    "udp_bind4",
    "udp_bind6",
    "udp_release",
    "udp_send4",
    "udp_send6",
];

/// The floor set: do-nothing programs at the stable set's hooks (the bench's floor run).
pub const FLOOR_PROGRAMS: [&str; 7] = [
    "floor_state",
    "floor_sockops",
    "floor_bind4",
    "floor_bind6",
    "floor_release",
    "floor_send4",
    "floor_send6",
];

/// The sock_ops flavour of the stable and floor sets: (sock_ops program, release
/// program), in place of the tracepoint, `listen_sockops` and the release program.
pub const SOCKOPS_STABLE: [&str; 2] = ["listen_ops", "sock_released"];
pub const SOCKOPS_FLOOR: [&str; 2] = ["floor_ops", "floor_release"];

/// The raw tracepoint flavours of the stable and floor sets' state programs: the
/// classic tracepoint copies its whole record for every TCP state change on the host
/// before the program runs; the raw one passes three arguments. The classic one stays
/// for kernels where the raw one cannot load.
pub const STATE_RAW: [&str; 2] = ["listen_rawtp", "floor_rawtp"];

/// The unconnected-send pair both real sets attach (implicitly bound UDP sockets).
const SEND_PROGRAMS: [&str; 2] = ["udp_send4", "udp_send6"];

/// Programs of the direct set with fentry/fexit: (program, kernel function, is fexit).
/// Attached in this order: the end hooks before the start hooks, so that no listener
/// is reported started without its end being watched.
const FENTRY_HOOKS: [(&str, &str, bool); 6] = [
    ("release_enter", "inet_release", false),
    ("listen_stop", "inet_csk_listen_stop", false),
    ("udp_bind4_exit", "inet_bind", true),
    ("udp_bind6_exit", "inet6_bind", true),
    ("listen_exit", "inet_listen", true),
    ("listen_enter", "inet_listen", false),
];

/// The same with kprobes: (program, kernel functions, is kretprobe).
const KPROBE_HOOKS: [(&str, &[&str], bool); 6] = [
    ("release_kp", &["inet_release"], false),
    ("listen_stop_kp", &["inet_csk_listen_stop"], false),
    ("bind_exit_kp", &["inet_bind", "inet6_bind"], true),
    ("bind_enter_kp", &["inet_bind", "inet6_bind"], false),
    ("listen_exit_kp", &["inet_listen"], true),
    ("listen_enter_kp", &["inet_listen"], false),
];

/// Names of every program in the object, as the kernel reports them: the lists above,
/// each name once (a unit test holds them to the object's own list).
pub fn programs() -> impl Iterator<Item = &'static str> {
    STABLE_PROGRAMS
        .into_iter()
        .chain(FLOOR_PROGRAMS)
        .chain(STATE_RAW)
        .chain(SOCKOPS_STABLE.into_iter().chain(["floor_ops"]))
        .chain(FENTRY_HOOKS.iter().map(|h| h.0))
        .chain(KPROBE_HOOKS.iter().map(|h| h.0))
}

/// `--hooks`: which hook set to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HooksChoice {
    /// The direct set when this kernel loads it, else the stable set.
    Auto,
    /// cgroup hooks (else a tracepoint and cgroup hooks): works wherever portwatch runs.
    Stable,
    /// fentry/fexit (else kprobes) on inet_listen/inet_bind; an error if unavailable.
    Direct,
    /// The direct set with kprobes even where fentry works (to test that fallback).
    #[value(hide = true)]
    DirectKprobe,
    /// Do-nothing programs at the stable set's hooks: reports nothing (the self-check
    /// fails: use --allow-degraded). For the benchmark's floor run.
    #[value(hide = true)]
    Floor,
    /// The floor set without its tracepoint: the cgroup hooks alone. For the benchmark,
    /// to show what the `sock:inet_sock_set_state` tracepoint costs by itself.
    #[value(hide = true)]
    FloorCgroup,
    /// The stable set with the classic tracepoint even where the raw one runs (to test
    /// that fallback, and for the benchmark's comparison).
    #[value(hide = true)]
    StableClassic,
    /// The floor set with the classic tracepoint.
    #[value(hide = true)]
    FloorClassic,
    /// The stable set's raw tracepoint flavour even where the sock_ops one runs (to test
    /// that fallback, and for the benchmark's comparison).
    #[value(hide = true)]
    StableRawtp,
    /// The floor set of the raw tracepoint flavour.
    #[value(hide = true)]
    FloorRawtp,
}

/// Which hooks are attached, and why: reported in the `sensor-started` event.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hooks {
    /// `stable` or `direct`.
    pub set: &'static str,
    /// `tracepoint+cgroup`, `fentry` or `kprobe`.
    pub via: &'static str,
    /// Why this set was chosen (the probe results).
    pub reason: String,
    /// Program names attached.
    pub programs: Vec<&'static str>,
    /// Kernel hook points, `kind/target`.
    pub attached: Vec<String>,
}

/// Loaded and attached programs. Dropping it detaches everything: the cgroup
/// attachments are bpf_links (kernel >= 5.7) owned by this process, so they also go
/// away if the process is killed.
pub struct Sensor {
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    /// Important records (see portwatch-ebpf/src/deliver.rs): drained first.
    pub urgent: RingBuf<MapData>,
    pub folds: FoldMaps,
    pub stats: StatsReader,
    pub sleep_flag: SleepFlag,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub offsets: KernelOffsets,
    pub cgroup_root: PathBuf,
    pub hooks: Hooks,
}

pub struct Options {
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    pub hooks: HooksChoice,
    /// Starts per second a process may send one by one before the kernel folds the rest
    /// (0 = never), and the same for all processes of one user.
    pub fold_above: u32,
    pub fold_user_above: u32,
}

/// Smallest urgent ring: 1 MiB, 8,192 records of 128 bytes (record and ring header).
pub const URGENT_RING_MIN: u32 = 1 << 20;
/// Largest urgent ring the budgets may ask for.
pub const URGENT_RING_MAX: u32 = 1 << 24;

/// Size of the urgent ring for these budgets. Important records are bounded by the
/// budgets, but a budget is a second's allowance that may all arrive at once: a user's
/// processes can send their whole budget of starts, and their ends, within milliseconds
/// (two wildcard churners do, at the start of a flood). The ring holds that second whole,
/// starts and ends, even while the agent reads nothing: at the default 4,000 starts/s per
/// user, 8,000 records, 1 MiB. (256 KiB, a quarter of it, lost records in exactly that
/// burst once each event also carried a firewall verdict.)
pub fn urgent_ring_bytes(fold_above: u32, fold_user_above: u32) -> u32 {
    const RECORD: u64 = (size_of::<portwatch_common::SocketRecord>() + 8) as u64;
    let budget = u64::from(fold_above.max(fold_user_above));
    let want = (budget * 2 * RECORD).next_power_of_two();
    want.clamp(u64::from(URGENT_RING_MIN), u64::from(URGENT_RING_MAX)) as u32
}

/// The kernel maps behind priority and folding.
pub struct FoldMaps {
    /// Per (process, transport, scope): what was folded, in the entry `index` names.
    pub folds: Array<MapData, portwatch_common::Fold>,
    pub index: aya::maps::HashMap<MapData, portwatch_common::FoldKey, u32>,
    /// `folds` entries not in use.
    pub free: aya::maps::Queue<MapData, u32>,
    /// Per tgid: budget and exact totals (sent, folded, lost).
    pub budgets: aya::maps::HashMap<MapData, u32, portwatch_common::Budget>,
    /// The ports the kernel treats as important.
    pub risky: Array<MapData, u64>,
    /// TCP listeners of the startup snapshot, by inode (see `remember_old_listeners`):
    /// only where `sock_released`, their only reader, runs.
    pub old_listeners: Option<aya::maps::HashMap<MapData, u64, portwatch_common::OldListener>>,
}

impl FoldMaps {
    /// Every fold the kernel counts: its key, its entry's index, its counts. An entry
    /// that no longer holds its key (given back meanwhile) is left out.
    pub fn list(&self) -> Vec<(portwatch_common::FoldKey, u32, portwatch_common::Fold)> {
        self.index
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, i)| {
                let f = self.folds.get(&i, 0).ok()?;
                (f.key == key).then_some((key, i, f))
            })
            .collect()
    }

    /// Delete a fold nothing can add to any more (its process is gone): out of the index
    /// first, so no start finds it; then its entry zeroed, so no socket that remembers
    /// it counts into it; then the entry freed for the next fold.
    pub fn delete(&mut self, key: &portwatch_common::FoldKey, index: u32) -> anyhow::Result<()> {
        self.index.remove(key).context("deleting from FOLD_INDEX")?;
        self.folds
            .set(index, portwatch_common::Fold::FREE, 0)
            .context("zeroing a FOLDS entry")?;
        self.free.push(index, 0).context("freeing a FOLDS entry")?;
        Ok(())
    }

    /// Load the important-port bitmap (one bit per port, `RISKY_WORDS` words).
    pub fn set_risky(&mut self, words: &[u64]) -> anyhow::Result<()> {
        for (i, w) in words
            .iter()
            .enumerate()
            .take(portwatch_common::RISKY_WORDS as usize)
        {
            self.risky
                .set(i as u32, *w, 0)
                .context("filling RISKY_PORTS")?;
        }
        Ok(())
    }

    /// Tell the kernel side which TCP listeners the snapshot found: the sock_ops hook set
    /// never saw their listen(), and recognises by this map the end of one that is shut
    /// down rather than closed. Returns how many did not fit (the map is full).
    pub fn remember_old_listeners(&mut self, found: &[crate::attribution::scan::Found]) -> usize {
        let Some(old_listeners) = &mut self.old_listeners else {
            return 0;
        };
        let mut refused = 0;
        for f in found {
            let s = &f.socket;
            if s.transport != crate::socket::Protocol::Tcp || s.inode == 0 {
                continue;
            }
            let mut l = portwatch_common::OldListener {
                port: s.port,
                ..Default::default()
            };
            match s.addr {
                std::net::IpAddr::V4(a) => {
                    l.family = portwatch_common::AF_INET;
                    l.addr[..4].copy_from_slice(&a.octets());
                }
                std::net::IpAddr::V6(a) => {
                    l.family = portwatch_common::AF_INET6;
                    l.addr = a.octets();
                }
            }
            if old_listeners.insert(s.inode, l, 0).is_err() {
                refused += 1;
            }
        }
        refused
    }
}

pub fn load(opts: &Options) -> anyhow::Result<Sensor> {
    host::require_root()?;
    host::raise_memlock();
    host::ensure_tracefs()?;
    // aya's loader always parses the kernel BTF when created. The object has no BTF and
    // needs no CO-RE relocation (offsets come in as globals), so that copy is dropped at
    // once, before our own read: the two never coexist, which keeps peak memory down.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let (offsets, fentry_probe) = {
        let btf_bytes = host::require_btf()?;
        let kernel_btf = btf::Btf::parse(&btf_bytes).context("parsing /sys/kernel/btf/vmlinux")?;
        // Whether this kernel loads fentry programs at all, asked with our own BTF parse:
        // aya's (needed to load the real ones) costs ~8 MiB of peak memory, not worth
        // paying on kernels that refuse fentry anyway.
        let probe = match opts.hooks {
            HooksChoice::Stable
            | HooksChoice::StableClassic
            | HooksChoice::DirectKprobe
            | HooksChoice::Floor
            | HooksChoice::FloorClassic
            | HooksChoice::FloorCgroup => None,
            _ => Some(match kernel_btf.func_id(FENTRY_HOOKS[0].1) {
                Some(id) => fentry_loads(id),
                None => Err(format!(
                    "this kernel's BTF has no function {}",
                    FENTRY_HOOKS[0].1
                )),
            }),
        };
        (kernel_btf.kernel_offsets(), probe)
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
                "no cgroup2 filesystem is mounted (needed for the stable set's cgroup hooks \
                 and for cgroup paths); mount one with \
                 `mount -t cgroup2 none /sys/fs/cgroup/unified`"
            )
        })?;

    let mut ebpf = loader
        .override_global("OFFSETS", &offsets, true)
        .override_global("FOLD_ABOVE", &opts.fold_above, true)
        .override_global("FOLD_USER_ABOVE", &opts.fold_user_above, true)
        .map_max_entries("EVENTS", opts.ring_bytes)
        .map_max_entries(
            "URGENT",
            urgent_ring_bytes(opts.fold_above, opts.fold_user_above),
        )
        .load(OBJECT)
        .map_err(|e| {
            anyhow!(
                "loading the eBPF object failed: {e}; portwatch needs Linux >= 5.8 with \
                 BPF ring buffers (CONFIG_BPF_SYSCALL=y)"
            )
        })?;
    // The logger owns the log map: keep it alive or later loads fail (docs/PLATFORM.md).
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("eBPF logging unavailable: {e}");
            None
        }
    };

    let hooks = choose_and_attach(&mut ebpf, opts.hooks, &offsets, fentry_probe, &cgroup_root)?;
    log::info!(
        "hooks: {} set via {} ({}): {}",
        hooks.set,
        hooks.via,
        hooks.reason,
        hooks.attached.join(", ")
    );

    let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)?;
    let urgent = RingBuf::try_from(ebpf.take_map("URGENT").context("URGENT map missing")?)?;
    let folds = FoldMaps {
        folds: Array::try_from(ebpf.take_map("FOLDS").context("FOLDS map missing")?)?,
        index: aya::maps::HashMap::try_from(
            ebpf.take_map("FOLD_INDEX")
                .context("FOLD_INDEX map missing")?,
        )?,
        free: {
            let mut free = aya::maps::Queue::try_from(
                ebpf.take_map("FREE_FOLDS")
                    .context("FREE_FOLDS map missing")?,
            )?;
            for i in 0..portwatch_common::FOLD_ENTRIES {
                free.push(i, 0).context("filling FREE_FOLDS")?;
            }
            free
        },
        budgets: aya::maps::HashMap::try_from(
            ebpf.take_map("PROC_BUDGET")
                .context("PROC_BUDGET map missing")?,
        )?,
        risky: Array::try_from(
            ebpf.take_map("RISKY_PORTS")
                .context("RISKY_PORTS map missing")?,
        )?,
        old_listeners: if hooks.programs.contains(&SOCKOPS_STABLE[1]) {
            Some(aya::maps::HashMap::try_from(
                ebpf.take_map("OLD_LISTENERS")
                    .context("OLD_LISTENERS map missing")?,
            )?)
        } else {
            None
        },
    };
    let stats = StatsReader {
        counters: PerCpuArray::try_from(ebpf.take_map("STATS").context("STATS map missing")?)?,
        guarded: guarded_programs(&ebpf, &hooks.programs),
        misses_unreadable: false.into(),
    };
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
        urgent,
        folds,
        stats,
        sleep_flag,
        logger,
        offsets,
        cgroup_root,
        hooks,
    })
}

/// The one place that decides which hook set runs: the direct set where this kernel
/// loads and attaches it (tried for real: a kernel may list fentry and still refuse it,
/// as 6.18 microVMs do with EPERM), else the stable set, saying why.
fn choose_and_attach(
    ebpf: &mut Ebpf,
    choice: HooksChoice,
    offsets: &KernelOffsets,
    fentry_probe: Option<Result<(), String>>,
    cgroup_root: &Path,
) -> anyhow::Result<Hooks> {
    let floor = |ebpf: &mut Ebpf, state: StateHook, set: &'static str, why: &str| {
        let mut hooks = attach_cgroup_set(
            ebpf,
            cgroup_root,
            &FLOOR_PROGRAMS,
            state,
            offsets,
            format!("asked for with --hooks {set}: {why}"),
        )?;
        hooks.set = set;
        anyhow::Ok(hooks)
    };
    match choice {
        HooksChoice::Stable => {
            return attach_stable(
                ebpf,
                cgroup_root,
                offsets,
                StateHook::SockOps,
                "asked for with --hooks stable".into(),
            );
        }
        HooksChoice::StableRawtp => {
            return attach_stable(
                ebpf,
                cgroup_root,
                offsets,
                StateHook::Raw,
                "asked for with --hooks stable-rawtp".into(),
            );
        }
        HooksChoice::StableClassic => {
            return attach_stable(
                ebpf,
                cgroup_root,
                offsets,
                StateHook::Classic,
                "asked for with --hooks stable-classic".into(),
            );
        }
        HooksChoice::Floor => {
            return floor(
                ebpf,
                StateHook::SockOps,
                "floor",
                "do-nothing programs, nothing is reported",
            );
        }
        HooksChoice::FloorRawtp => {
            return floor(
                ebpf,
                StateHook::Raw,
                "floor-rawtp",
                "do-nothing programs, nothing is reported",
            );
        }
        HooksChoice::FloorClassic => {
            return floor(
                ebpf,
                StateHook::Classic,
                "floor-classic",
                "do-nothing programs, nothing is reported",
            );
        }
        HooksChoice::FloorCgroup => {
            return floor(
                ebpf,
                StateHook::Off,
                "floor-cgroup",
                "do-nothing programs at the cgroup hooks only, nothing is reported",
            );
        }
        HooksChoice::Auto | HooksChoice::Direct | HooksChoice::DirectKprobe => {}
    }
    let direct = match btf::missing_direct(offsets) {
        m if !m.is_empty() => Err(format!("this kernel's BTF lacks {}", m.join(", "))),
        _ if choice == HooksChoice::DirectKprobe => attach_kprobe(ebpf),
        _ => fentry_probe
            .unwrap_or(Ok(()))
            .and_then(|()| attach_fentry(ebpf))
            .or_else(|fentry| match attach_kprobe(ebpf) {
                // Keep why fentry was not used: it is part of the reason for kprobes.
                Ok(hooks) => Ok(Hooks {
                    reason: fentry,
                    ..hooks
                }),
                Err(kprobe) => Err(format!("{fentry}; {kprobe}")),
            }),
    };
    // The direct set finds implicit UDP binds with the stable set's cgroup pair.
    let direct = direct.and_then(|mut hooks| {
        let attached =
            attach_sends(ebpf, cgroup_root, SEND_PROGRAMS).map_err(|e| format!("{e:#}"))?;
        hooks.programs.extend(SEND_PROGRAMS);
        hooks.attached.extend(attached);
        Ok(hooks)
    });
    match (direct, choice) {
        (Ok(mut hooks), _) => {
            let how = match choice {
                HooksChoice::Auto => "auto",
                HooksChoice::DirectKprobe => "asked for with --hooks direct-kprobe",
                _ => "asked for with --hooks direct",
            };
            hooks.reason = if hooks.reason.is_empty() {
                format!(
                    "{how}: this kernel loads and attaches {} programs",
                    hooks.via
                )
            } else {
                format!("{how}: {}; kprobes work", hooks.reason)
            };
            Ok(hooks)
        }
        (Err(why), HooksChoice::Auto) => attach_stable(
            ebpf,
            cgroup_root,
            offsets,
            StateHook::SockOps,
            format!("auto: the direct set is unavailable: {why}"),
        ),
        (Err(why), _) => bail!(
            "the direct hook set cannot run on this kernel: {why}; use --hooks stable \
             (or --hooks auto to fall back by itself)"
        ),
    }
}

/// Loads a do-nothing fentry program on BTF function `func_id` and closes it again:
/// Ok when this kernel accepts fentry programs (a kernel may have them built and still
/// refuse them, as the 6.18 microVM does with EPERM). A raw `BPF_PROG_LOAD`, because
/// aya's loader needs its own full parse of the kernel BTF first.
fn fentry_loads(func_id: u32) -> Result<(), String> {
    use aya_obj::generated::{
        bpf_attach_type::BPF_TRACE_FENTRY, bpf_attr, bpf_cmd::BPF_PROG_LOAD,
        bpf_prog_type::BPF_PROG_TYPE_TRACING,
    };
    // `r0 = 0; exit`
    let insns: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), 0x95];
    let license = c"GPL";
    // SAFETY: all-zero is a valid `bpf_attr` (plain integers), and the kernel requires
    // every byte it does not know to be zero.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the union's bytes are initialised (zeroed above); this is its
    // BPF_PROG_LOAD member.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = BPF_PROG_TYPE_TRACING as u32;
    load.insn_cnt = insns.len() as u32;
    load.insns = insns.as_ptr() as u64;
    load.license = license.as_ptr() as u64;
    load.expected_attach_type = BPF_TRACE_FENTRY as u32;
    load.attach_btf_id = func_id;
    // SAFETY: the pointers in attr point at live locals.
    let fd = match unsafe { sys_bpf(BPF_PROG_LOAD, &attr) } {
        Ok(fd) => fd,
        Err(e) => {
            let name = match e.raw_os_error() {
                Some(libc::EPERM) => "EPERM".to_owned(),
                Some(libc::EINVAL) => "EINVAL".to_owned(),
                Some(libc::ENOTSUP) | Some(524) => "ENOTSUPP".to_owned(),
                _ => e.to_string(),
            };
            return Err(format!("fentry programs refused: {name}"));
        }
    };
    // SAFETY: the kernel just gave us this fd.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// fentry/fexit on the kernel functions. On any failure every program of the flavour is
/// unloaded again (detaching what was attached) and the reason returned.
fn attach_fentry(ebpf: &mut Ebpf) -> Result<Hooks, String> {
    // fentry targets are named by BTF type id; aya needs its own parse of the kernel BTF
    // for that. Only here: the stable set never pays for it.
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("fentry: reading kernel BTF: {e}"))?;
    let mut attached = Vec::new();
    let res = (|| -> anyhow::Result<()> {
        for (name, func, exit) in FENTRY_HOOKS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))?;
            if exit {
                let p: &mut FExit = prog.try_into()?;
                p.load(func, &btf)
                    .map_err(|e| anyhow!("fexit {func} refused: {}", load_error(&e)))?;
                p.attach()
                    .map_err(|e| anyhow!("fexit {func} attach: {}", error_chain(&e)))?;
                attached.push(format!("fexit/{func}"));
            } else {
                let p: &mut FEntry = prog.try_into()?;
                p.load(func, &btf)
                    .map_err(|e| anyhow!("fentry {func} refused: {}", load_error(&e)))?;
                p.attach()
                    .map_err(|e| anyhow!("fentry {func} attach: {}", error_chain(&e)))?;
                attached.push(format!("fentry/{func}"));
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(Hooks {
            set: "direct",
            via: "fentry",
            reason: String::new(),
            programs: FENTRY_HOOKS.iter().map(|h| h.0).collect(),
            attached,
        }),
        Err(e) => {
            unload(ebpf, FENTRY_HOOKS.iter().map(|h| h.0));
            Err(format!("{e:#}"))
        }
    }
}

/// kprobe/kretprobe on the same functions, for kernels without fentry.
fn attach_kprobe(ebpf: &mut Ebpf) -> Result<Hooks, String> {
    // aya attaches kprobes through the perf `kprobe` PMU; without it (CONFIG_KPROBES
    // unset) every attach fails, so say that rather than the errno.
    if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        return Err("kprobes: this kernel has no kprobe PMU (CONFIG_KPROBES is not set)".into());
    }
    let mut attached = Vec::new();
    let res = (|| -> anyhow::Result<()> {
        for (name, funcs, ret) in KPROBE_HOOKS {
            let p: &mut KProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))?
                .try_into()?;
            p.load()
                .map_err(|e| anyhow!("kprobe program {name} refused: {}", load_error(&e)))?;
            let kind = if ret { "kretprobe" } else { "kprobe" };
            for func in funcs {
                p.attach(*func, 0)
                    .map_err(|e| anyhow!("{kind} {func}: {}", error_chain(&e)))?;
                attached.push(format!("{kind}/{func}"));
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(Hooks {
            set: "direct",
            via: "kprobe",
            reason: String::new(),
            programs: KPROBE_HOOKS.iter().map(|h| h.0).collect(),
            attached,
        }),
        Err(e) => {
            unload(ebpf, KPROBE_HOOKS.iter().map(|h| h.0));
            Err(format!("kprobes: {e:#}"))
        }
    }
}

/// Unload (and so detach) whichever of `names` got loaded; the rest are left alone.
fn unload<'a>(ebpf: &mut Ebpf, names: impl Iterator<Item = &'a str>) {
    for name in names {
        let res = match ebpf.program_mut(name) {
            Some(aya::programs::Program::FEntry(p)) => p.unload(),
            Some(aya::programs::Program::FExit(p)) => p.unload(),
            Some(aya::programs::Program::KProbe(p)) => p.unload(),
            _ => Ok(()),
        };
        // Not loaded at all is the usual case here: nothing to undo.
        if let Err(e) = res {
            log::debug!("unloading {name}: {e}");
        }
    }
}

/// How a set sees a listener's start and end: sock_ops alone, or the
/// `inet_sock_set_state` tracepoint (in one of two flavours) with sock_ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateHook {
    /// sock_ops `TCP_LISTEN_CB` and `STATE_CB` and the release hook, no tracepoint, where
    /// this kernel loads it; else as `Raw`.
    SockOps,
    /// The raw tracepoint where this kernel runs it, else the classic one.
    Raw,
    /// The classic tracepoint.
    Classic,
    /// None (the floor-cgroup bench run).
    Off,
}

/// The tracepoint + cgroup set.
fn attach_stable(
    ebpf: &mut Ebpf,
    cgroup_root: &Path,
    offsets: &KernelOffsets,
    state: StateHook,
    reason: String,
) -> anyhow::Result<Hooks> {
    attach_cgroup_set(ebpf, cgroup_root, &STABLE_PROGRAMS, state, offsets, reason)
}

/// The cgroup hooks of a set (`names`: state tracepoint, sock_ops, post_bind4,
/// post_bind6, sock_release, sendmsg4, sendmsg6), and its state tracepoint as `state`
/// says.
fn attach_cgroup_set(
    ebpf: &mut Ebpf,
    cgroup_root: &Path,
    names: &[&'static str; 7],
    state: StateHook,
    offsets: &KernelOffsets,
    mut reason: String,
) -> anyhow::Result<Hooks> {
    let [
        state_name,
        mut sockops,
        bind4,
        bind6,
        mut release,
        send4,
        send6,
    ] = *names;
    let stable = names[0] == STABLE_PROGRAMS[0];
    let flavour = if stable {
        SOCKOPS_STABLE
    } else {
        SOCKOPS_FLOOR
    };
    let mut state = state;
    if state == StateHook::SockOps {
        match load_sockops(ebpf, flavour[0], offsets) {
            Ok(()) => [sockops, release] = flavour,
            Err(why) => {
                log::info!("sock_ops flavour unavailable, using the state tracepoint: {why}");
                reason = format!("{reason}; tracepoint flavour: {why}");
                state = StateHook::Raw;
            }
        }
    }
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("opening cgroup2 root {}", cgroup_root.display()))?;
    let prog: &mut SockOps = ebpf
        .program_mut(sockops)
        .ok_or_else(|| anyhow!("program {sockops} missing from the embedded object"))?
        .try_into()?;
    if state != StateHook::SockOps {
        prog.load()
            .map_err(|e| anyhow!("the kernel refused program {sockops}: {e}"))?;
    }
    prog.attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| {
            anyhow!(
                "attaching {sockops} to {} failed: {}; the kernel needs CONFIG_CGROUP_BPF=y",
                cgroup_root.display(),
                error_chain(&e)
            )
        })?;
    for name in [bind4, bind6, release] {
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
    let sends = attach_sends(ebpf, cgroup_root, [send4, send6])?;
    // The state tracepoint goes last: a LISTEN it parks must always be followed by the
    // sock_ops confirmation, or its close would be mistaken for a failed listen().
    let mut attached: Vec<String> = Vec::new();
    let mut programs = names.to_vec();
    programs[1] = sockops;
    programs[4] = release;
    let mut via = "tracepoint+cgroup";
    let raw_name = if stable { STATE_RAW[0] } else { STATE_RAW[1] };
    let raw = match state {
        StateHook::Raw => Some(attach_state_raw(ebpf, raw_name, offsets)),
        StateHook::SockOps | StateHook::Classic | StateHook::Off => None,
    };
    match (state, raw) {
        (StateHook::Off, _) => {
            programs.remove(0);
            via = "cgroup";
        }
        (StateHook::SockOps, _) => {
            programs.remove(0);
            via = "sock-ops+cgroup";
        }
        (_, Some(Ok(()))) => {
            attached.push("raw_tracepoint/inet_sock_set_state".into());
            programs[0] = raw_name;
            via = "raw-tracepoint+cgroup";
        }
        (_, raw) => {
            if let Some(Err(why)) = raw {
                log::info!("raw tracepoint unavailable, using the classic one: {why}");
                reason = format!("{reason}; classic tracepoint: {why}");
            }
            attach_tracepoint(ebpf, state_name, "sock", "inet_sock_set_state")?;
            attached.push("tracepoint/sock/inet_sock_set_state".into());
        }
    }
    attached.extend([
        "cgroup/sock_ops".into(),
        "cgroup/post_bind4".into(),
        "cgroup/post_bind6".into(),
        "cgroup/sock_release".into(),
    ]);
    attached.extend(sends);
    Ok(Hooks {
        set: "stable",
        via,
        reason,
        programs,
        attached,
    })
}

/// Load the sock_ops program of the sock_ops flavour (`name`): it reads the listening
/// task at BTF offsets, so those must be known, and the kernel must accept its helpers
/// in a sock_ops program.
fn load_sockops(ebpf: &mut Ebpf, name: &str, offsets: &KernelOffsets) -> Result<(), String> {
    let missing = btf::missing_sockops(offsets);
    if !missing.is_empty() {
        return Err(format!("this kernel's BTF lacks {}", missing.join(", ")));
    }
    let prog: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the embedded object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load()
        .map_err(|e| format!("{name} refused: {}", load_error(&e)))
}

/// Attach the unconnected-send pair (`sendmsg4`, `sendmsg6`) to the cgroup2 root.
fn attach_sends(
    ebpf: &mut Ebpf,
    cgroup_root: &Path,
    names: [&str; 2],
) -> anyhow::Result<Vec<String>> {
    let cgroup = File::open(cgroup_root)
        .with_context(|| format!("opening cgroup2 root {}", cgroup_root.display()))?;
    let mut attached = Vec::new();
    for (name, hook) in names
        .into_iter()
        .zip(["cgroup/sendmsg4", "cgroup/sendmsg6"])
    {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the kernel refused program {name}: {e}"))?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| {
                anyhow!(
                    "attaching {name} to {} failed: {}; the kernel needs CONFIG_CGROUP_BPF=y",
                    cgroup_root.display(),
                    error_chain(&e)
                )
            })?;
        attached.push(hook.to_owned());
    }
    Ok(attached)
}

/// The raw tracepoint flavour of the state program, where this kernel runs it: its
/// socket fields come from kernel memory at the BTF offsets, so those must be known.
fn attach_state_raw(ebpf: &mut Ebpf, name: &str, offsets: &KernelOffsets) -> Result<(), String> {
    let unknown: Vec<&str> = [
        ("sock_common.skc_family", offsets.sock_family),
        ("sock.sk_protocol", offsets.sock_protocol),
        ("inet_sock.inet_sport", offsets.inet_sport),
        ("sock_common.skc_rcv_saddr", offsets.sock_rcv_saddr),
        ("sock_common.skc_v6_rcv_saddr", offsets.sock_v6_rcv_saddr),
    ]
    .into_iter()
    .filter(|(_, o)| *o == KernelOffsets::UNKNOWN)
    .map(|(f, _)| f)
    .collect();
    if !unknown.is_empty() {
        return Err(format!("this kernel's BTF lacks {}", unknown.join(", ")));
    }
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the embedded object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load()
        .map_err(|e| format!("refused: {}", load_error(&e)))?;
    if let Err(e) = prog.attach("inet_sock_set_state") {
        let why = format!("attach: {}", error_chain(&e));
        if let Err(e) = prog.unload() {
            log::debug!("unloading {name}: {e}");
        }
        return Err(why);
    }
    Ok(())
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
    pub urgent_full: u64,
    pub fold_full: u64,
    pub fold_end_orphan: u64,
    pub calls_full: u64,
    /// Runs the kernel skipped because the program was already running on that CPU
    /// (`bpf_prog_info.recursion_misses` of the tracing programs): each may have been a
    /// listener's start or end.
    pub recursion_misses: u64,
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

/// Reads the kernel-side `STATS` counters, and what the kernel counts itself.
pub struct StatsReader {
    counters: PerCpuArray<MapData, u64>,
    /// The attached programs the kernel guards against running nested on one CPU
    /// (tracepoints, raw tracepoints, fentry/fexit, kprobes; cgroup programs are not
    /// guarded), by name.
    guarded: Vec<(&'static str, ProgramFd)>,
    /// Said once that a program's misses cannot be read (they are then not counted).
    misses_unreadable: std::sync::atomic::AtomicBool,
}

impl StatsReader {
    /// The programs whose recursion misses are counted.
    pub fn guarded(&self) -> Vec<&'static str> {
        self.guarded.iter().map(|(n, _)| *n).collect()
    }

    pub fn read(&self) -> anyhow::Result<KernelStats> {
        let sum =
            |i: u32| -> anyhow::Result<u64> { Ok(self.counters.get(&i, 0)?.iter().copied().sum()) };
        let mut recursion_misses = 0;
        for (name, fd) in &self.guarded {
            match recursion_misses_of(fd.as_fd()) {
                Ok(n) => recursion_misses += n,
                Err(e) => {
                    use std::sync::atomic::Ordering::Relaxed;
                    if !self.misses_unreadable.swap(true, Relaxed) {
                        log::warn!(
                            "reading bpf_prog_info of {name}: {e}; runs the kernel skips \
                             (recursion misses) are not counted"
                        );
                    }
                }
            }
        }
        Ok(KernelStats {
            ring_full: sum(stat::RING_FULL)?,
            listen_failed: sum(stat::LISTEN_FAILED)?,
            pending_full: sum(stat::PENDING_FULL)?,
            bound_full: sum(stat::BOUND_FULL)?,
            read_failed: sum(stat::READ_FAILED)?,
            urgent_full: sum(stat::URGENT_FULL)?,
            fold_full: sum(stat::FOLD_FULL)?,
            fold_end_orphan: sum(stat::FOLD_END_ORPHAN)?,
            calls_full: sum(stat::CALLS_FULL)?,
            recursion_misses,
        })
    }
}

/// The attached programs among `names` that the kernel may skip on recursion, with a
/// descriptor of each to ask it how often it did.
fn guarded_programs(ebpf: &Ebpf, names: &[&'static str]) -> Vec<(&'static str, ProgramFd)> {
    use aya::programs::Program;
    let mut out = Vec::new();
    for &name in names {
        let fd = match ebpf.program(name) {
            Some(Program::TracePoint(p)) => p.fd(),
            Some(Program::RawTracePoint(p)) => p.fd(),
            Some(Program::FEntry(p)) => p.fd(),
            Some(Program::FExit(p)) => p.fd(),
            Some(Program::KProbe(p)) => p.fd(),
            _ => continue,
        };
        match fd
            .map_err(anyhow::Error::from)
            .and_then(|fd| Ok(fd.try_clone()?))
        {
            Ok(fd) => out.push((name, fd)),
            Err(e) => log::warn!("{name}: its recursion misses will not be counted: {e:#}"),
        }
    }
    out
}

/// `bpf_prog_info.recursion_misses` (kernel >= 5.12; 0 before): aya's `ProgramInfo`
/// does not expose it, so a raw `BPF_OBJ_GET_INFO_BY_FD`.
fn recursion_misses_of(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    use aya_obj::generated::{bpf_attr, bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, bpf_prog_info};
    // SAFETY: all-zero is a valid value of both (plain integers and pointers-as-u64).
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the union's bytes are initialised (zeroed above); this is its
    // BPF_OBJ_GET_INFO_BY_FD member.
    let get = unsafe { &mut attr.info };
    get.bpf_fd = fd.as_raw_fd() as u32;
    get.info_len = size_of::<bpf_prog_info>() as u32;
    get.info = (&raw mut info) as u64;
    // SAFETY: info outlives the call; the kernel writes at most info_len bytes.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) }?;
    Ok(info.recursion_misses)
}

/// The `bpf(2)` system call with `cmd` and `attr`: its non-negative result, or the errno.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` does with it.
unsafe fn sys_bpf(
    cmd: aya_obj::generated::bpf_cmd,
    attr: &aya_obj::generated::bpf_attr,
) -> std::io::Result<i64> {
    // SAFETY: attr is a live bpf_attr of the size given; the caller vouches for the
    // pointers in it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_ref(attr),
            size_of::<aya_obj::generated::bpf_attr>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A program load failure in one line: the errno by name (`EPERM` is how a kernel that
/// forbids a program type answers), plus the verifier's last words when it had any.
fn load_error(e: &aya::programs::ProgramError) -> String {
    let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    else {
        return error_chain(e);
    };
    let name = match io_error.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(524) => "ENOTSUPP",
        _ => "",
    };
    let log = verifier_log.to_string();
    let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    match (name, tail.is_empty()) {
        ("", true) => io_error.to_string(),
        ("", false) => format!("{io_error}; verifier: {tail}"),
        (n, true) => n.to_string(),
        (n, false) => format!("{n}; verifier: {tail}"),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_urgent_ring_holds_a_users_whole_second() {
        // Default budgets: 1,000/s per process, 4,000/s per user.
        assert_eq!(urgent_ring_bytes(1000, 4000), 1 << 20);
        let record = size_of::<portwatch_common::SocketRecord>() as u32 + 8;
        assert!(urgent_ring_bytes(1000, 4000) >= 4000 * 2 * record);
        assert_eq!(urgent_ring_bytes(0, 0), URGENT_RING_MIN);
        assert_eq!(urgent_ring_bytes(20_000, 80_000), 1 << 25 >> 1); // capped
        assert!(urgent_ring_bytes(10_000, 10_000) >= 10_000 * 2 * record);
    }

    /// Every program the object holds is in exactly one list of this file, by the name
    /// the kernel will report (at most 15 bytes), and every listed name is in it.
    #[test]
    fn the_lists_name_exactly_the_objects_programs() {
        let object = aya_obj::Object::parse(OBJECT).expect("parsing the embedded object");
        let in_object: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let listed: Vec<&str> = programs().collect();
        let unique: BTreeSet<&str> = listed.iter().copied().collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "a name listed twice: {listed:?}"
        );
        assert_eq!(in_object, unique);
        for name in listed {
            assert!(name.len() < 16, "{name}: longer than BPF_OBJ_NAME_LEN - 1");
        }
        // The direct set's cgroup pair is the stable set's.
        assert!(SEND_PROGRAMS.iter().all(|p| STABLE_PROGRAMS.contains(p)));
    }
}
