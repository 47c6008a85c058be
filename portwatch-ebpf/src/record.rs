//! What every hook set shares: the maps the agent reads, the record a socket event
//! becomes (`build`), its delivery, the UDP bookkeeping that ties a release to its bind,
//! and the reads of kernel memory at the offsets the agent found in BTF.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated,
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use portwatch_common::{
    AF_INET, FLAG_INODE, FLAG_KTHREAD, FLAG_NETNS, FLAG_PPID, FLAG_START, FLAG_UNTRACKED,
    FLAG_V6ONLY, Header, IPPROTO_UDP, IPPROTO_UDPLITE, KernelOffsets, Kind, SocketRecord, stat,
};

use crate::deliver::{
    FoldAttr, FoldTag, Start, count, decide, deliver_end, deliver_start, end_folded, important,
    send_start, try_fold,
};

/// UDP sockets we reported bound, keyed by `struct sock` address, so that
/// `sock_release` reports only those (not every autobound client socket).
#[map]
pub(crate) static BOUND: HashMap<u64, Bound> = HashMap::with_max_entries(65536, 0);

#[unsafe(no_mangle)]
pub(crate) static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::unknown());

/// Local address of a UDP socket, kept from its bind for its release.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Bound {
    pub(crate) family: u16,
    pub(crate) port: u16,
    pub(crate) _pad: [u8; 4],
    pub(crate) addr: [u8; 16],
}

/// `PF_KTHREAD` from include/linux/sched.h.
pub(crate) const PF_KTHREAD: u32 = 0x0020_0000;
pub(crate) const UNKNOWN: u32 = KernelOffsets::UNKNOWN;

/// UDP or UDP-Lite (a datagram socket bound like UDP, on protocol 136's own ports: a local
/// user must not hide a service by choosing it).
#[inline(always)]
pub(crate) fn is_udp(protocol: u32) -> bool {
    protocol == IPPROTO_UDP as u32 || protocol == IPPROTO_UDPLITE as u32
}

/// A UDP socket is being released (`inet_release()`): report it if we saw it bound.
/// `tag` names it as its bind hook did.
#[inline(always)]
pub(crate) fn udp_released(sock: u64, tag: FoldTag, family: u16, protocol: u16) {
    // Folded first: in a flood, the usual case, and its table is warm (cookies in
    // sequence), where a `BOUND` miss reads a cold bucket (perf: the largest single cost
    // of a folded UDP release when it came first).
    if end_folded(tag) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // sock_release may not read the address fields, so they come from the bind.
    let Some(b) = (unsafe { BOUND.get(sock) }).copied() else {
        // Not seen bound. If it holds a port it may be a listener found by the agent's
        // startup snapshot, whose end must not go missing; the agent drops the rest.
        let Some(port) = read_kernel::<u16>(sock, offset!(sock_num)) else {
            return;
        };
        if port != 0 {
            let addr = local_addr(sock, family, offset!(sock_rcv_saddr));
            report_end(
                Kind::UdpReleased,
                now,
                bpf_get_current_pid_tgid(),
                &Sock {
                    key: sock,
                    family,
                    protocol,
                    port,
                    addr,
                },
                FLAG_UNTRACKED,
            );
        }
        return;
    };
    let _ = BOUND.remove(sock);
    report_end(
        Kind::UdpReleased,
        now,
        bpf_get_current_pid_tgid(),
        &Sock {
            key: sock,
            family: b.family,
            protocol,
            port: b.port,
            addr: b.addr,
        },
        0,
    );
}

#[inline(always)]
pub(crate) fn udp_bound_flags(
    sock: u64,
    tag: FoldTag,
    family: u16,
    protocol: u16,
    port: u16,
    addr: [u8; 16],
    flags: u32,
) {
    // Folded: its release is found in FOLDED_SOCKS instead.
    if !report_start_as(
        &Helpers,
        Kind::UdpBound,
        || sock,
        tag,
        family,
        protocol,
        port,
        &addr,
        || flags,
    ) {
        remember_bound(sock, family, port, addr);
    }
}

/// Keep a reported UDP socket's address for its release (`sock_release` may not read it).
#[inline(always)]
pub(crate) fn remember_bound(sock: u64, family: u16, port: u16, addr: [u8; 16]) {
    let b = Bound {
        family,
        port,
        _pad: [0; 4],
        addr,
    };
    if BOUND.insert(sock, b, 0).is_err() {
        count(stat::BOUND_FULL);
    }
}

/// Scratch space for the direct set's records (one per CPU).
#[map]
pub(crate) static SCRATCH: PerCpuArray<SocketRecord> = PerCpuArray::with_max_entries(1, 0);

/// A start the direct set reports: the record is built first, into per-CPU map memory,
/// and then delivered. Map memory is opaque to the verifier, so the many values the
/// record's flags can take (one per combination of fields read) do not multiply the
/// paths of the delivery that follows; built on the stack, the fexit on `inet_bind`
/// went past 6.1's million-instruction limit. (The stable set decides on the budgets
/// before building; its programs stay well within the limit.) True when folded.
#[inline(always)]
pub(crate) fn report_start_built(
    kind: Kind,
    sock: u64,
    family: u16,
    protocol: u16,
    port: u16,
    addr: &[u8; 16],
    extra: u32,
) -> bool {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a per-CPU map value, ours for the program's run.
    unsafe {
        *rec = build(
            kind,
            now,
            pid_tgid,
            &Sock {
                key: sock,
                family,
                protocol,
                port,
                addr: *addr,
            },
            extra,
        );
        deliver_start(&mut *rec, FoldTag::Addr(sock))
    }
}

/// `udp_bound_flags` for the direct set: the record built first (see `report_start_built`).
#[inline(always)]
pub(crate) fn udp_bound_direct(sock: u64, family: u16, protocol: u16, port: u16, addr: [u8; 16]) {
    if !report_start_built(Kind::UdpBound, sock, family, protocol, port, &addr, 0) {
        remember_bound(sock, family, port, addr);
    }
}

/// A start whose port is known, in its task: the budgets first (a start over budget is
/// folded without attribution reads), then the record, sent in its lane. True when it
/// was folded. `cur` finds the current task's identity; `sock` (the `struct sock`
/// address) and `extra` (record flags) are asked for only when needed: a folded start
/// of a known fold needs neither. Timed by the coarse clock unless a record is built:
/// for the cgroup and sock_ops programs only (no tracing program may read that clock).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "who is running, the socket (its address, its name in the fold tables, its local address) and the record's flags"
)]
pub(crate) fn report_start_as(
    cur: &impl Current,
    kind: Kind,
    sock: impl Fn() -> u64,
    tag: FoldTag,
    family: u16,
    protocol: u16,
    port: u16,
    addr: &[u8; 16],
    extra: impl FnOnce() -> u32,
) -> bool {
    let pid_tgid = cur.pid_tgid();
    let s = Start {
        pid_tgid,
        start_boottime_ns: leader_start(pid_tgid).unwrap_or(0),
        now: coarse_now(),
        family,
        protocol,
        port,
        addr: *addr,
    };
    let mut d = decide(&s, || cur.uid_gid());
    if try_fold(&s, &mut d, tag, || fold_attr_as(cur, sock())) {
        return true;
    }
    let urgent = important(port, family, addr);
    let mut rec = build_as(
        cur,
        kind,
        unsafe { bpf_ktime_get_ns() },
        pid_tgid,
        &Sock {
            key: sock(),
            family,
            protocol,
            port,
            addr: *addr,
        },
        extra(),
    );
    send_start(&mut rec, &d, urgent);
    false
}

/// An end (close or release) of a start that was sent, built and put in the lane its
/// address calls for (decided before building: see `important`).
#[inline(always)]
pub(crate) fn report_end(kind: Kind, now: u64, pid_tgid: u64, s: &Sock, extra: u32) {
    report_end_as(&Helpers, kind, now, pid_tgid, s, extra);
}

/// `report_end` for a program that finds the current task's identity through `cur`.
#[inline(always)]
pub(crate) fn report_end_as(
    cur: &impl Current,
    kind: Kind,
    now: u64,
    pid_tgid: u64,
    s: &Sock,
    extra: u32,
) {
    let urgent = important(s.port, s.family, &s.addr);
    let mut rec = build_as(cur, kind, now, pid_tgid, s, extra);
    deliver_end(&mut rec, urgent);
}

/// The local address as the hooks report it: for IPv4 at `v4_offset`, `inet_saddr` for
/// a listener (what `sock:inet_sock_set_state` records) or `skc_rcv_saddr` for UDP (what
/// `bpf_sock.src_ip4` is); `skc_v6_rcv_saddr` for IPv6 in both. Zero where unreadable.
#[inline(always)]
pub(crate) fn local_addr(sk: u64, family: u16, v4_offset: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if family == AF_INET {
        if let Some(a) = read_kernel::<[u8; 4]>(sk, v4_offset) {
            addr[..4].copy_from_slice(&a);
        }
    } else if let Some(a) = read_kernel::<[u8; 16]>(sk, offset!(sock_v6_rcv_saddr)) {
        addr = a;
    }
    addr
}

/// The socket an event is about, as its hook found it.
pub(crate) struct Sock {
    /// The kernel's `struct sock` address: the key of the per-socket maps.
    pub(crate) key: u64,
    pub(crate) family: u16,
    pub(crate) protocol: u16,
    pub(crate) port: u16,
    pub(crate) addr: [u8; 16],
}

/// Who is running: the current task's identity, through the helpers where the program
/// type has them, or read from the task itself (sock_ops, whose helper set lacks them
/// before 6.10). Both give the same values.
pub(crate) trait Current {
    fn pid_tgid(&self) -> u64;
    fn uid_gid(&self) -> u64;
    fn cgroup_id(&self) -> u64;
    fn comm(&self) -> [u8; 16];
}

/// The current-task helpers (tracepoints, cgroup sock and sock_addr programs, fentry).
pub(crate) struct Helpers;

impl Current for Helpers {
    #[inline(always)]
    fn pid_tgid(&self) -> u64 {
        bpf_get_current_pid_tgid()
    }
    #[inline(always)]
    fn uid_gid(&self) -> u64 {
        bpf_get_current_uid_gid()
    }
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_get_current_cgroup_id() }
    }
    #[inline(always)]
    fn comm(&self) -> [u8; 16] {
        bpf_get_current_comm().unwrap_or([0; 16])
    }
}

/// The same values read from `current` at the offsets the agent found in BTF (which it
/// checks are all known before it loads a program that uses this).
pub(crate) struct TaskReads {
    pub(crate) task: u64,
}

impl TaskReads {
    #[inline(always)]
    pub(crate) fn current() -> TaskReads {
        TaskReads {
            task: current_task(),
        }
    }
}

impl Current for TaskReads {
    /// `pid` then `tgid`, read as one little-endian word: `tgid << 32 | pid`.
    #[inline(always)]
    fn pid_tgid(&self) -> u64 {
        read_or_zero(self.task, offset!(task_pid))
    }
    /// `cred->uid` then `cred->gid` (kernel ids, as the helper gives them).
    #[inline(always)]
    fn uid_gid(&self) -> u64 {
        read_or_zero(
            read_or_zero(self.task, offset!(task_cred)),
            offset!(cred_uid),
        )
    }
    /// `cgroups->dfl_cgrp->kn->id`, what `bpf_get_current_cgroup_id()` returns.
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        let cset = read_or_zero(self.task, offset!(task_cgroups));
        let cgrp = read_or_zero(cset, offset!(css_set_dfl_cgrp));
        read_or_zero(
            read_or_zero(cgrp, offset!(cgroup_kn)),
            offset!(kernfs_node_id),
        )
    }
    #[inline(always)]
    fn comm(&self) -> [u8; 16] {
        read_or_zero(self.task, offset!(task_comm))
    }
}

/// Read a `T` at `base + offset` in kernel memory, zero when the read faults (a zero
/// `base` included: the helper zero-fills on failure). Without a branch on the result,
/// so a chain of these adds no paths for the verifier to walk: the sock_ops program that
/// reads the task this way went past 6.1's million-instruction limit with `read_kernel`.
/// Only for offsets the agent checked are known before loading the program.
#[inline(always)]
fn read_or_zero<T: Default>(base: u64, offset: u32) -> T {
    let mut v = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `v`.
    unsafe {
        generated::bpf_probe_read_kernel(
            (&raw mut v).cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(u64::from(offset)) as *const _,
        );
    }
    v
}

/// The full record of a socket event, captured in the current task's context.
#[inline(always)]
pub(crate) fn build(
    kind: Kind,
    ktime_ns: u64,
    pid_tgid: u64,
    s: &Sock,
    extra: u32,
) -> SocketRecord {
    build_as(&Helpers, kind, ktime_ns, pid_tgid, s, extra)
}

/// `build` for a program that finds the current task's identity through `cur`.
#[inline(always)]
pub(crate) fn build_as(
    cur: &impl Current,
    kind: Kind,
    ktime_ns: u64,
    pid_tgid: u64,
    s: &Sock,
    extra: u32,
) -> SocketRecord {
    let sock = s.key;
    // An end needs only what pairs it with its start (the inode); the agent reuses the
    // start's attribution, so the namespace and task reads are skipped for it.
    let starting = matches!(kind, Kind::ListenStarted | Kind::UdpBound);
    let mut flags = extra;

    let socket = read_kernel::<u64>(sock, offset!(sock_socket)).filter(|s| *s != 0);
    let inode = socket.and_then(|s| {
        read_kernel::<u64>(s, offset!(socket_to_inode).wrapping_add(offset!(inode_ino)))
    });
    if inode.is_some() {
        flags |= FLAG_INODE;
    }
    let net = if starting {
        read_kernel::<u64>(sock, offset!(sock_net)).filter(|n| *n != 0)
    } else {
        None
    };
    let netns = net.and_then(|n| read_kernel::<u32>(n, offset!(net_inum)));
    if netns.is_some() {
        flags |= FLAG_NETNS;
    }
    if read_kernel::<u8>(sock, offset!(sock_ipv6only_byte))
        .is_some_and(|b| b & (1u8 << (offset!(sock_ipv6only_bit) & 7)) != 0)
    {
        flags |= FLAG_V6ONLY;
    }
    let task = if starting { current_task() } else { 0 };
    let leader = read_kernel::<u64>(task, offset!(task_group_leader)).filter(|l| *l != 0);
    let start = leader.and_then(|l| read_kernel::<u64>(l, offset!(task_start_boottime)));
    if start.is_some() {
        flags |= FLAG_START;
    }
    let parent = read_kernel::<u64>(task, offset!(task_real_parent)).filter(|p| *p != 0);
    let ppid = parent.and_then(|p| read_task_u32(p, offset!(task_tgid)));
    if ppid.is_some() {
        flags |= FLAG_PPID;
    }

    SocketRecord {
        header: Header {
            kind: kind as u32,
            cpu: unsafe { bpf_get_smp_processor_id() },
            ktime_ns,
            pid_tgid,
        },
        uid_gid: cur.uid_gid(),
        cgroup_id: cur.cgroup_id(),
        sock_key: sock,
        inode: inode.unwrap_or(0),
        start_boottime_ns: start.unwrap_or(0),
        netns_ino: netns.unwrap_or(0),
        ppid: ppid.unwrap_or(0),
        flags,
        family: s.family,
        protocol: s.protocol,
        port: s.port,
        _pad: 0,
        _pad2: 0,
        addr: s.addr,
        comm: cur.comm(),
    }
}

/// `FLAG_KTHREAD` when the current task is a kernel thread (no process owns the socket).
#[inline(always)]
pub(crate) fn kthread_flag() -> u32 {
    let task_flags = read_task_u32(current_task(), offset!(task_flags));
    if task_flags.is_some_and(|f| f & PF_KTHREAD != 0) {
        FLAG_KTHREAD
    } else {
        0
    }
}

/// The network namespace and parent of a folded start's process (for a new fold).
#[inline(always)]
pub(crate) fn fold_attr(sock: u64) -> FoldAttr {
    fold_attr_as(&Helpers, sock)
}

#[inline(always)]
pub(crate) fn fold_attr_as(cur: &impl Current, sock: u64) -> FoldAttr {
    let netns = read_kernel::<u64>(sock, offset!(sock_net))
        .filter(|n| *n != 0)
        .and_then(|n| read_kernel::<u32>(n, offset!(net_inum)));
    let parent = read_kernel::<u64>(current_task(), offset!(task_real_parent)).filter(|p| *p != 0);
    let ppid = parent.and_then(|p| read_task_u32(p, offset!(task_tgid)));
    FoldAttr {
        uid_gid: cur.uid_gid(),
        netns_ino: netns.unwrap_or(0),
        ppid: ppid.unwrap_or(0),
        flags: if netns.is_some() { FLAG_NETNS } else { 0 }
            | if ppid.is_some() { FLAG_PPID } else { 0 },
        cgroup_id: cur.cgroup_id(),
        comm: cur.comm(),
    }
}

/// `start_boottime` of the current thread group's leader (what `build` records).
#[inline(always)]
pub(crate) fn task_start() -> Option<u64> {
    let leader = read_kernel::<u64>(current_task(), offset!(task_group_leader)).filter(|l| *l != 0);
    leader.and_then(|l| read_kernel::<u64>(l, offset!(task_start_boottime)))
}

/// `task_start()` for a task whose pid and tgid are known: a thread group's leader
/// (the usual socket opener) is read directly, one read instead of two.
#[inline(always)]
pub(crate) fn leader_start(pid_tgid: u64) -> Option<u64> {
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 {
        return read_kernel::<u64>(current_task(), offset!(task_start_boottime));
    }
    task_start()
}

#[inline(always)]
pub(crate) fn current_task() -> u64 {
    unsafe { bpf_get_current_task() }
}

#[inline(always)]
pub(crate) fn read_task_u32(task: u64, offset: u32) -> Option<u32> {
    read_kernel::<u32>(task, offset)
}

/// Per CPU: the jiffy this CPU last read the coarse clock in, and what it read.
#[map]
static COARSE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// `CLOCK_MONOTONIC` as of the last tick, like `bpf_ktime_get_coarse_ns()`, which it
/// calls once per jiffy per CPU: `bpf_jiffies64()` is inlined by the verifier (one load)
/// where the clock helper is a call, and on these machines (AMD, "Safe RET") every call
/// and return costs (perf, udp churn: the clock was a tenth of a folded bind's cost). A
/// tick may pass between `jiffies` and the clock's update: the time is then one more
/// tick behind, until the next jiffy. Budget windows and fold times only.
#[inline(always)]
pub(crate) fn coarse_now() -> u64 {
    let jiffy = unsafe { generated::bpf_jiffies64() };
    let Some(c) = COARSE.get_ptr_mut(0) else {
        return unsafe { generated::bpf_ktime_get_coarse_ns() };
    };
    // Copied out at once: another task on this CPU may rewrite it meanwhile.
    let [seen, t] = unsafe { read_volatile(c) };
    if seen == jiffy {
        return t;
    }
    let t = unsafe { generated::bpf_ktime_get_coarse_ns() };
    unsafe { write_volatile(c, [jiffy, t]) };
    t
}

/// Read a `T` at `base + offset` in kernel memory; `None` when the offset is unknown
/// (not in this kernel's BTF) or the read faults.
#[inline(always)]
pub(crate) fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    if offset == UNKNOWN || base == 0 {
        return None;
    }
    let r = unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) };
    if r.is_err() {
        count(stat::READ_FAILED);
    }
    r.ok()
}
