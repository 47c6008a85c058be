//! portwatch's kernel programs.
//!
//! TCP: `sock:inet_sock_set_state` (include/trace/events/sock.h, fired from
//! `inet_sk_state_store()`/`inet_sk_set_state()`) tells us a socket entered LISTEN inside
//! `inet_csk_listen_start()` (net/ipv4/inet_connection_sock.c). That happens *before*
//! `get_port()` picks the port of an unbound socket and before the call can fail, so the
//! record is captured there (in the listener's task), parked per socket, and confirmed
//! by cgroup sock_ops `BPF_SOCK_OPS_TCP_LISTEN_CB`, which the kernel calls only after a
//! successful listen, with the chosen port. No syscall tracepoint is used: enabling one
//! puts every syscall of every task on the slow path (measured: -7 % on a listen loop).
//!
//! UDP: cgroup `post_bind4`/`post_bind6` (`__inet_bind()`, net/ipv4/af_inet.c) run after
//! the port is reserved; cgroup `sock_release` (`inet_release()`) ends the socket's life.
//! A socket with no `bind()` gets its port from its first `sendmsg()` (`inet_autobind()`
//! in `inet_send_prepare()`), and then hears anyone on it: cgroup `sendmsg4`/`sendmsg6`,
//! which `udp_sendmsg()`/`udpv6_sendmsg()` run for every unconnected send, after that
//! autobind, report such a socket once (`FLAG_IMPLICIT`).
//!
//! The direct hook set (`direct.rs`) hooks the kernel functions themselves instead, where
//! the kernel allows it; the agent picks one set at start.
#![no_std]
#![no_main]
// Atomic adds and ors on map values: core has no atomic RMW for a target without CAS.
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core::intrinsics atomics")
)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

mod deliver;
mod direct;
mod floor;

use core::ptr::read_volatile;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_TCP_LISTEN_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext, TracePointContext},
};
use aya_log_ebpf::warn;
use deliver::{
    FoldAttr, Start, decide, deliver_end, deliver_start, end_folded, important, is_folded,
    send_start, try_fold,
};
use portwatch_common::{
    AF_INET, AF_INET6, FLAG_CHARGED, FLAG_IMPLICIT, FLAG_INODE, FLAG_KTHREAD, FLAG_NETNS,
    FLAG_PPID, FLAG_START, FLAG_UNTRACKED, FLAG_V6ONLY, Header, IPPROTO_TCP, IPPROTO_UDP,
    IPPROTO_UDPLITE, KernelOffsets, Kind, SocketRecord, TCP_CLOSE, TCP_LISTEN, stat,
};

/// Ring buffer size in bytes; the agent may override it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Set to 1 by the agent just before it blocks waiting for the ring, 0 once awake.
/// Records are submitted without a wake-up (on this VM each wake-up is an interrupt and
/// cost ~5 µs in the listening process); only when the agent sleeps is it woken.
#[map]
static AGENT_SLEEPING: Array<u32> = Array::with_max_entries(1, 0);

/// Counters indexed by `portwatch_common::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// A LISTEN transition waiting for its confirmation, keyed by `struct sock` address:
/// the record as captured in the listening task, port still to be filled in.
#[map]
static PENDING: HashMap<u64, SocketRecord> = HashMap::with_max_entries(8192, 0);

/// UDP sockets we reported bound, keyed by `struct sock` address, so that
/// `sock_release` reports only those (not every autobound client socket).
#[map]
static BOUND: HashMap<u64, Bound> = HashMap::with_max_entries(65536, 0);

#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::unknown());

/// Local address of a UDP socket, kept from its bind for its release.
#[derive(Clone, Copy)]
#[repr(C)]
struct Bound {
    family: u16,
    port: u16,
    _pad: [u8; 4],
    addr: [u8; 16],
}

/// `PF_KTHREAD` from include/linux/sched.h.
const PF_KTHREAD: u32 = 0x0020_0000;
const UNKNOWN: u32 = KernelOffsets::UNKNOWN;

// Offsets of the `sock:inet_sock_set_state` record, from
// /sys/kernel/tracing/events/sock/inet_sock_set_state/format (stable since 4.16).
const TP_SKADDR: usize = 8;
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_SADDR_V6: usize = 40;

/// Load a field of the tracepoint record straight from the context: tracepoint
/// programs may read their record directly (the verifier bounds it by the event's size
/// at attach), which is several times cheaper than bpf_probe_read_kernel on a path that
/// runs for every TCP state change on the host.
#[inline(always)]
fn tp_field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    use aya_ebpf::EbpfContext as _;
    unsafe { read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn listen_state(ctx: TracePointContext) -> u32 {
    match try_listen_state(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_listen_state(ctx: &TracePointContext) -> Result<u32, u32> {
    // Every TCP state change on the host lands here: decide on the two states first.
    let newstate: i32 = tp_field(ctx, TP_NEWSTATE);
    let oldstate: i32 = tp_field(ctx, TP_OLDSTATE);
    let entering = newstate == TCP_LISTEN;
    // Leaving LISTEN counts only into CLOSE: a connection accepted on a listener is
    // cloned from it and reported LISTEN -> SYN_RECV (`inet_csk_clone_lock()`), once per
    // connection, while the listener itself stays open.
    if !entering && (oldstate != TCP_LISTEN || newstate != TCP_CLOSE) {
        return Ok(0);
    }
    let protocol: u16 = tp_field(ctx, TP_PROTOCOL);
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let sock: u64 = tp_field(ctx, TP_SKADDR);
    let family: u16 = tp_field(ctx, TP_FAMILY);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = tp_field(ctx, TP_SADDR);
        addr[..4].copy_from_slice(&a);
    } else {
        addr = tp_field(ctx, TP_SADDR_V6);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = unsafe { bpf_ktime_get_ns() };

    if entering {
        // Everything about the listener is captured now, in its own task's context; the
        // port of an unbound socket is filled in when the listen is confirmed.
        let port: u16 = tp_field(ctx, TP_SPORT);
        let mut extra = kthread_flag();
        if port != 0 && extra == 0 {
            // Bound already (the usual case): decide on the budgets now, so a start of a
            // process over budget is folded without any attribution read or parking.
            // (A listen() that then fails, which a bound socket does only on a
            // SO_REUSEPORT conflict, is counted in the fold as a start and an end.)
            let s = Start {
                pid_tgid,
                uid_gid: bpf_get_current_uid_gid(),
                start_boottime_ns: task_start().unwrap_or(0),
                now,
                family,
                protocol: IPPROTO_TCP,
                port,
                addr,
            };
            let d = decide(&s);
            if try_fold(&s, &d, sock, || fold_attr(sock)) {
                return Ok(0);
            }
            extra |= FLAG_CHARGED;
        }
        let rec = build(
            Kind::ListenStarted,
            now,
            pid_tgid,
            sock,
            family,
            IPPROTO_TCP,
            port,
            &addr,
            extra,
        );
        if PENDING.insert(sock, rec, 0).is_err() {
            count(stat::PENDING_FULL);
            warn!(
                ctx,
                "portwatch: pending-listen map full, a listen() will not be reported"
            );
        }
        return Ok(0);
    }

    // LISTEN -> CLOSE of a socket whose listen was never confirmed: the port allocation
    // failed and the kernel is undoing it inside the same listen(). Not a listener.
    // Looked up first: a lookup takes no lock, a delete locks the bucket even to find
    // nothing, and nothing is the usual answer (every real listener's close).
    if newstate == TCP_CLOSE && PENDING.get_ptr(sock).is_some() && PENDING.remove(sock).is_ok() {
        count(stat::LISTEN_FAILED);
        return Ok(0);
    }
    if end_folded(sock) {
        return Ok(0);
    }
    let port: u16 = tp_field(ctx, TP_SPORT);
    let urgent = important(port, family, &addr);
    let mut rec = build(
        Kind::ListenStopped,
        now,
        pid_tgid,
        sock,
        family,
        IPPROTO_TCP,
        port,
        &addr,
        0,
    );
    deliver_end(&mut rec, urgent);
    Ok(0)
}

/// cgroup sock_ops `BPF_SOCK_OPS_TCP_LISTEN_CB`: called by `__inet_listen_sk()`
/// (net/ipv4/af_inet.c; inline in `inet_listen()` before 6.8) only after
/// `inet_csk_listen_start()` succeeded, with the port chosen. Every path to a listening
/// TCP socket goes through it: listen(2), io_uring's IORING_OP_LISTEN on any thread,
/// and in-kernel `kernel_listen()`. Confirms the transition parked above.
#[sock_ops]
pub fn listen_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Context fields are loaded at their constant offsets, as the verifier requires.
    let op = unsafe { read_volatile(&raw const (*ops).op) };
    if op != BPF_SOCK_OPS_TCP_LISTEN_CB {
        return 1;
    }
    let sock = unsafe { read_volatile(&raw const (*ops).__bindgen_anon_2.sk) } as u64;
    // Host byte order (include/uapi/linux/bpf.h).
    let port = unsafe { read_volatile(&raw const (*ops).local_port) } as u16;
    let Some(parked) = PENDING.get_ptr(sock) else {
        return 1;
    };
    let mut rec = unsafe { *parked };
    let _ = PENDING.remove(sock);
    rec.port = port;
    deliver_start(&mut rec, sock);
    1
}

#[cgroup_sock(post_bind4)]
pub fn udp_bind4(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // Context fields are readable only at constant offsets, and src_ip4 only in
    // post_bind4 (`__sock_filter_check_attach_type()`, net/core/filter.c).
    let (protocol, port, v4) = unsafe {
        (
            read_volatile(&raw const (*sk).protocol),
            read_volatile(&raw const (*sk).src_port),
            read_volatile(&raw const (*sk).src_ip4),
        )
    };
    if is_udp(protocol) {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&v4.to_ne_bytes());
        udp_bound(sk as u64, AF_INET, protocol as u16, port as u16, addr);
    }
    1
}

#[cgroup_sock(post_bind6)]
pub fn udp_bind6(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (protocol, port, v6) = unsafe {
        (
            read_volatile(&raw const (*sk).protocol),
            read_volatile(&raw const (*sk).src_port),
            [
                read_volatile(&raw const (*sk).src_ip6[0]),
                read_volatile(&raw const (*sk).src_ip6[1]),
                read_volatile(&raw const (*sk).src_ip6[2]),
                read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        )
    };
    if is_udp(protocol) {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&v6[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&v6[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&v6[2].to_ne_bytes());
        addr[12..].copy_from_slice(&v6[3].to_ne_bytes());
        udp_bound(sk as u64, AF_INET6, protocol as u16, port as u16, addr);
    }
    1
}

#[cgroup_sock(sock_release)]
pub fn udp_release(ctx: SockContext) -> i32 {
    let protocol = unsafe { read_volatile(&raw const (*ctx.sock).protocol) };
    if is_udp(protocol) {
        // The context pointer is the kernel's `struct sock` (`__cgroup_bpf_run_filter_sk()`).
        let family = unsafe { read_volatile(&raw const (*ctx.sock).family) } as u16;
        udp_released(ctx.sock as u64, family, protocol as u16);
    }
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn udp_send4(ctx: SockAddrContext) -> i32 {
    udp_sent(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn udp_send6(ctx: SockAddrContext) -> i32 {
    udp_sent(&ctx);
    1
}

/// TCP_ESTABLISHED: the state of a connected UDP socket (`ip4_datagram_connect()`).
const UDP_CONNECTED: u32 = 1;

/// An unconnected UDP send: report the socket if it was never seen bound (the kernel
/// bound it implicitly), once; later sends find it in `BOUND` and stop at that lookup.
#[inline(always)]
fn udp_sent(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (protocol, family) = unsafe {
        (
            read_volatile(&raw const (*sa).protocol),
            read_volatile(&raw const (*sa).family),
        )
    };
    if !is_udp(protocol) {
        return;
    }
    // The context is the kernel's `struct bpf_sock_addr_kern`, whose first field is the
    // `struct sock *` (include/linux/filter.h): read as a plain value, it keys the maps
    // as the bind and release hooks' context pointers do.
    let Some(sock) = read_kernel::<u64>(sa as u64, 0) else {
        return;
    };
    if unsafe { BOUND.get(sock) }.is_some() || is_folded(sock) {
        return;
    }
    // A connected socket hears only its peer (`sendto()` with an address on a connected
    // socket also gets here).
    let state = unsafe { read_volatile(&raw const (*(*sa).__bindgen_anon_1.sk).state) };
    if state == UDP_CONNECTED {
        return;
    }
    let off = OFFSETS.load();
    let Some(port) = read_kernel::<u16>(sock, off.sock_num) else {
        return;
    };
    if port == 0 {
        return;
    }
    let mut addr = [0u8; 16];
    if family == AF_INET as u32 {
        if let Some(a) = read_kernel::<[u8; 4]>(sock, off.sock_rcv_saddr) {
            addr[..4].copy_from_slice(&a);
        }
        udp_bound_flags(sock, AF_INET, protocol as u16, port, addr, FLAG_IMPLICIT);
    } else {
        if let Some(a) = read_kernel::<[u8; 16]>(sock, off.sock_v6_rcv_saddr) {
            addr = a;
        }
        udp_bound_flags(sock, AF_INET6, protocol as u16, port, addr, FLAG_IMPLICIT);
    }
}

/// UDP or UDP-Lite (a datagram socket bound like UDP, on protocol 136's own ports: a local
/// user must not hide a service by choosing it).
#[inline(always)]
fn is_udp(protocol: u32) -> bool {
    protocol == IPPROTO_UDP as u32 || protocol == IPPROTO_UDPLITE as u32
}

/// A UDP socket is being released (`inet_release()`): report it if we saw it bound.
#[inline(always)]
fn udp_released(sock: u64, family: u16, protocol: u16) {
    let now = unsafe { bpf_ktime_get_ns() };
    // sock_release may not read the address fields, so they come from the bind.
    let Some(b) = (unsafe { BOUND.get(sock) }).copied() else {
        if end_folded(sock) {
            return;
        }
        // Not seen bound. If it holds a port it may be a listener found by the agent's
        // startup snapshot, whose end must not go missing; the agent drops the rest.
        let Some(port) = read_kernel::<u16>(sock, OFFSETS.load().sock_num) else {
            return;
        };
        if port != 0 {
            let off = OFFSETS.load();
            let mut addr = [0u8; 16];
            if family == AF_INET {
                if let Some(a) = read_kernel::<[u8; 4]>(sock, off.sock_rcv_saddr) {
                    addr[..4].copy_from_slice(&a);
                }
            } else if let Some(a) = read_kernel::<[u8; 16]>(sock, off.sock_v6_rcv_saddr) {
                addr = a;
            }
            let urgent = important(port, family, &addr);
            let mut rec = build(
                Kind::UdpReleased,
                now,
                bpf_get_current_pid_tgid(),
                sock,
                family,
                protocol,
                port,
                &addr,
                FLAG_UNTRACKED,
            );
            deliver_end(&mut rec, urgent);
        }
        return;
    };
    let _ = BOUND.remove(sock);
    let urgent = important(b.port, b.family, &b.addr);
    let mut rec = build(
        Kind::UdpReleased,
        now,
        bpf_get_current_pid_tgid(),
        sock,
        b.family,
        protocol,
        b.port,
        &b.addr,
        0,
    );
    deliver_end(&mut rec, urgent);
}

#[inline(always)]
fn udp_bound(sock: u64, family: u16, protocol: u16, port: u16, addr: [u8; 16]) {
    udp_bound_flags(sock, family, protocol, port, addr, 0);
}

#[inline(always)]
fn udp_bound_flags(sock: u64, family: u16, protocol: u16, port: u16, addr: [u8; 16], flags: u32) {
    // Folded: its release is found in FOLDED_SOCKS instead.
    if !report_start(Kind::UdpBound, sock, family, protocol, port, &addr, flags) {
        remember_bound(sock, family, port, addr);
    }
}

/// Keep a reported UDP socket's address for its release (`sock_release` may not read it).
#[inline(always)]
fn remember_bound(sock: u64, family: u16, port: u16, addr: [u8; 16]) {
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
static SCRATCH: PerCpuArray<SocketRecord> = PerCpuArray::with_max_entries(1, 0);

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
            kind, now, pid_tgid, sock, family, protocol, port, addr, extra,
        );
        deliver_start(&mut *rec, sock)
    }
}

/// `udp_bound` for the direct set: the record built first (see `report_start_built`).
#[inline(always)]
pub(crate) fn udp_bound_direct(sock: u64, family: u16, protocol: u16, port: u16, addr: [u8; 16]) {
    if !report_start_built(Kind::UdpBound, sock, family, protocol, port, &addr, 0) {
        remember_bound(sock, family, port, addr);
    }
}

/// A start whose port is known, in its task: the budgets first (a start over budget is
/// folded without attribution reads), then the record, sent in its lane. True when it
/// was folded.
#[inline(always)]
pub(crate) fn report_start(
    kind: Kind,
    sock: u64,
    family: u16,
    protocol: u16,
    port: u16,
    addr: &[u8; 16],
    extra: u32,
) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let s = Start {
        pid_tgid,
        uid_gid: bpf_get_current_uid_gid(),
        start_boottime_ns: task_start().unwrap_or(0),
        now,
        family,
        protocol,
        port,
        addr: *addr,
    };
    let d = decide(&s);
    if try_fold(&s, &d, sock, || fold_attr(sock)) {
        return true;
    }
    let urgent = important(port, family, addr);
    let mut rec = build(
        kind, now, pid_tgid, sock, family, protocol, port, addr, extra,
    );
    send_start(&mut rec, &d, urgent);
    false
}

/// The full record of a socket event, captured in the current task's context.
#[expect(
    clippy::too_many_arguments,
    reason = "flat record fill, inlined into each probe"
)]
#[inline(always)]
fn build(
    kind: Kind,
    ktime_ns: u64,
    pid_tgid: u64,
    sock: u64,
    family: u16,
    protocol: u16,
    port: u16,
    addr: &[u8; 16],
    extra: u32,
) -> SocketRecord {
    let off = OFFSETS.load();
    // An end needs only what pairs it with its start (the inode); the agent reuses the
    // start's attribution, so the namespace and task reads are skipped for it.
    let starting = matches!(kind, Kind::ListenStarted | Kind::UdpBound);
    let mut flags = extra;

    let socket = read_kernel::<u64>(sock, off.sock_socket).filter(|s| *s != 0);
    let inode =
        socket.and_then(|s| read_kernel::<u64>(s, off.socket_to_inode.wrapping_add(off.inode_ino)));
    if inode.is_some() {
        flags |= FLAG_INODE;
    }
    let net = if starting {
        read_kernel::<u64>(sock, off.sock_net).filter(|n| *n != 0)
    } else {
        None
    };
    let netns = net.and_then(|n| read_kernel::<u32>(n, off.net_inum));
    if netns.is_some() {
        flags |= FLAG_NETNS;
    }
    if read_kernel::<u8>(sock, off.sock_ipv6only_byte)
        .is_some_and(|b| b & (1u8 << (off.sock_ipv6only_bit & 7)) != 0)
    {
        flags |= FLAG_V6ONLY;
    }
    let task = if starting { current_task() } else { 0 };
    let leader = read_kernel::<u64>(task, off.task_group_leader).filter(|l| *l != 0);
    let start = leader.and_then(|l| read_kernel::<u64>(l, off.task_start_boottime));
    if start.is_some() {
        flags |= FLAG_START;
    }
    let parent = read_kernel::<u64>(task, off.task_real_parent).filter(|p| *p != 0);
    let ppid = parent.and_then(|p| read_task_u32(p, off.task_tgid));
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
        uid_gid: bpf_get_current_uid_gid(),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        sock_key: sock,
        inode: inode.unwrap_or(0),
        start_boottime_ns: start.unwrap_or(0),
        netns_ino: netns.unwrap_or(0),
        ppid: ppid.unwrap_or(0),
        flags,
        family,
        protocol,
        port,
        _pad: [0; 6],
        addr: *addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Put a record in the bulk ring, counting it when there is no room. Returns whether it
/// was delivered.
#[inline(always)]
fn submit(rec: &SocketRecord) -> bool {
    let Some(mut entry) = EVENTS.reserve::<SocketRecord>(0) else {
        count(stat::RING_FULL);
        return false;
    };
    entry.write(*rec);
    // Commit first (an atomic exchange: a full barrier), then look at the flag. The agent
    // sets the flag, fences, then checks the ring once more before blocking: one of the
    // two always sees the other, so no record is left without a wake-up.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    let sleeping = AGENT_SLEEPING
        .get_ptr(0)
        .is_some_and(|p| unsafe { read_volatile(p) } != 0);
    if sleeping && let Some(nudge) = EVENTS.reserve::<u64>(0) {
        // A discarded slot is skipped by the reader; it exists to carry the wake-up.
        nudge.discard(BPF_RB_FORCE_WAKEUP as u64);
    }
    true
}

/// `FLAG_KTHREAD` when the current task is a kernel thread (no process owns the socket).
#[inline(always)]
fn kthread_flag() -> u32 {
    let task_flags = read_task_u32(current_task(), OFFSETS.load().task_flags);
    if task_flags.is_some_and(|f| f & PF_KTHREAD != 0) {
        FLAG_KTHREAD
    } else {
        0
    }
}

/// The network namespace and parent of a folded start's process (for a new fold).
#[inline(always)]
fn fold_attr(sock: u64) -> FoldAttr {
    let off = OFFSETS.load();
    let netns = read_kernel::<u64>(sock, off.sock_net)
        .filter(|n| *n != 0)
        .and_then(|n| read_kernel::<u32>(n, off.net_inum));
    let parent = read_kernel::<u64>(current_task(), off.task_real_parent).filter(|p| *p != 0);
    let ppid = parent.and_then(|p| read_task_u32(p, off.task_tgid));
    FoldAttr {
        netns_ino: netns.unwrap_or(0),
        ppid: ppid.unwrap_or(0),
        flags: if netns.is_some() { FLAG_NETNS } else { 0 }
            | if ppid.is_some() { FLAG_PPID } else { 0 },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// `start_boottime` of the current thread group's leader (what `build` records).
#[inline(always)]
fn task_start() -> Option<u64> {
    let off = OFFSETS.load();
    let leader = read_kernel::<u64>(current_task(), off.task_group_leader).filter(|l| *l != 0);
    leader.and_then(|l| read_kernel::<u64>(l, off.task_start_boottime))
}

#[inline(always)]
fn current_task() -> u64 {
    unsafe { bpf_get_current_task() }
}

#[inline(always)]
fn read_task_u32(task: u64, offset: u32) -> Option<u32> {
    read_kernel::<u32>(task, offset)
}

/// Read a `T` at `base + offset` in kernel memory; `None` when the offset is unknown
/// (not in this kernel's BTF) or the read faults.
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    if offset == UNKNOWN || base == 0 {
        return None;
    }
    let r = unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) };
    if r.is_err() {
        count(stat::READ_FAILED);
    }
    r.ok()
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

// Host builds (clippy over the workspace) link std, which brings its own handler.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
