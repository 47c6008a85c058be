//! The stable hook set: a tracepoint and cgroup hooks, present on any kernel with BTF,
//! ring buffers and cgroup BPF (the only set on kernels that refuse fentry and lack
//! kprobes). See the crate documentation for what each hook sees.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, raw_tracepoint, sock_ops, tracepoint},
    maps::HashMap,
    programs::{
        RawTracePointContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext,
    },
};
use aya_log_ebpf::warn;
use portwatch_common::{
    AF_INET, AF_INET6, FLAG_CHARGED, FLAG_IMPLICIT, FLAG_UNTRACKED, IPPROTO_TCP, Kind, OldListener,
    SocketRecord, TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV, stat,
};

use crate::{
    deliver::{FoldTag, Start, count, decide, deliver_start, end_folded, is_folded, try_fold},
    record::{
        BOUND, Current as _, Sock, TaskReads, build, fold_attr, is_udp, kthread_flag, local_addr,
        read_kernel, report_end, report_end_as, report_start_as, task_start, udp_bound_flags,
        udp_released,
    },
};

/// A LISTEN transition waiting for its confirmation, keyed by `struct sock` address:
/// the record as captured in the listening task, port still to be filled in.
#[map]
static PENDING: HashMap<u64, SocketRecord> = HashMap::with_max_entries(8192, 0);

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
    unsafe { read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn listen_state(ctx: TracePointContext) -> u32 {
    let newstate: i32 = tp_field(&ctx, TP_NEWSTATE);
    let oldstate: i32 = tp_field(&ctx, TP_OLDSTATE);
    let sock: u64 = tp_field(&ctx, TP_SKADDR);
    state_changed(&ctx, sock, oldstate, newstate, || {
        let family: u16 = tp_field(&ctx, TP_FAMILY);
        let mut addr = [0u8; 16];
        if family == AF_INET {
            let a: [u8; 4] = tp_field(&ctx, TP_SADDR);
            addr[..4].copy_from_slice(&a);
        } else {
            addr = tp_field(&ctx, TP_SADDR_V6);
        }
        Some(StateSock {
            protocol: tp_field(&ctx, TP_PROTOCOL),
            family,
            port: tp_field(&ctx, TP_SPORT),
            addr,
        })
    })
}

/// The same hook as a raw tracepoint (`inet_sock_set_state(sk, oldstate, newstate)`):
/// the kernel hands over the three arguments and nothing else, where the classic
/// tracepoint first copies every field of its record into a buffer, for every TCP
/// state change on the host. The socket's fields are read from kernel memory at the
/// offsets the agent found in BTF, and only for a change into or out of LISTEN.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn listen_rawtp(ctx: RawTracePointContext) -> u32 {
    let oldstate = ctx.arg::<u64>(1) as i32;
    let newstate = ctx.arg::<u64>(2) as i32;
    let sock = ctx.arg::<u64>(0);
    state_changed(&ctx, sock, oldstate, newstate, || {
        let family = read_kernel::<u16>(sock, offset!(sock_family))?;
        let mut addr = [0u8; 16];
        if family == AF_INET {
            addr[..4].copy_from_slice(&read_kernel::<[u8; 4]>(sock, offset!(sock_rcv_saddr))?);
        } else {
            addr = read_kernel::<[u8; 16]>(sock, offset!(sock_v6_rcv_saddr))?;
        }
        Some(StateSock {
            protocol: read_kernel::<u16>(sock, offset!(sock_protocol))?,
            family,
            // `inet_sport`, as the classic record has it: a listener's close releases
            // its port (`inet_put_port()` zeroes `skc_num`) before the state changes.
            port: u16::from_be(read_kernel::<u16>(sock, offset!(inet_sport))?),
            addr,
        })
    })
}

/// What a LISTEN transition needs of its socket (the classic record's fields).
struct StateSock {
    protocol: u16,
    family: u16,
    /// Local port, host order (0 while an unbound socket's listen() picks one).
    port: u16,
    addr: [u8; 16],
}

/// A TCP state change of `sock`, from either flavour of the tracepoint: `fields` is
/// asked only when the change is into LISTEN or from LISTEN into CLOSE.
#[inline(always)]
fn state_changed<C: EbpfContext>(
    ctx: &C,
    sock: u64,
    oldstate: i32,
    newstate: i32,
    fields: impl FnOnce() -> Option<StateSock>,
) -> u32 {
    // Every TCP state change on the host lands here: decide on the two states first.
    let entering = newstate == TCP_LISTEN;
    // Leaving LISTEN counts only into CLOSE: a connection accepted on a listener is
    // cloned from it and reported LISTEN -> SYN_RECV (`inet_csk_clone_lock()`), once per
    // connection, while the listener itself stays open.
    if !entering && (oldstate != TCP_LISTEN || newstate != TCP_CLOSE) {
        return 0;
    }
    if !entering {
        // LISTEN -> CLOSE of a socket whose listen was never confirmed: the port
        // allocation failed and the kernel is undoing it inside the same listen(). Not a
        // listener. Looked up first: a lookup takes no lock, a delete locks the bucket
        // even to find nothing, and nothing is the usual answer (every real listener's
        // close). Both maps hold TCP sockets only (for this transition), so no field
        // is read before them: a folded end, the usual one in a flood, reads none.
        if PENDING.get_ptr(sock).is_some() && PENDING.remove(sock).is_ok() {
            count(stat::LISTEN_FAILED);
            return 0;
        }
        if end_folded(FoldTag::Addr(sock)) {
            return 0;
        }
    }
    // A failed read was counted (`READ_FAILED`) by whoever read.
    let Some(f) = fields() else {
        return 0;
    };
    if f.protocol != IPPROTO_TCP {
        return 0;
    }
    let (family, addr) = (f.family, f.addr);
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = unsafe { bpf_ktime_get_ns() };

    if entering {
        // Everything about the listener is captured now, in its own task's context; the
        // port of an unbound socket is filled in when the listen is confirmed.
        let port = f.port;
        let mut extra = kthread_flag();
        if port != 0 && extra == 0 {
            // Bound already (the usual case): decide on the budgets now, so a start of a
            // process over budget is folded without any attribution read or parking.
            // (A listen() that then fails, which a bound socket does only on a
            // SO_REUSEPORT conflict, is counted in the fold as a start and an end.)
            let s = Start {
                pid_tgid,
                start_boottime_ns: task_start().unwrap_or(0),
                now,
                family,
                protocol: IPPROTO_TCP,
                port,
                addr,
            };
            let mut d = decide(&s, bpf_get_current_uid_gid);
            if try_fold(&s, &mut d, FoldTag::Addr(sock), || fold_attr(sock)) {
                return 0;
            }
            extra |= FLAG_CHARGED;
        }
        let rec = build(
            Kind::ListenStarted,
            now,
            pid_tgid,
            &Sock {
                key: sock,
                family,
                protocol: IPPROTO_TCP,
                port,
                addr,
            },
            extra,
        );
        if PENDING.insert(sock, rec, 0).is_err() {
            count(stat::PENDING_FULL);
            warn!(
                ctx,
                "portwatch: pending-listen map full, a listen() will not be reported"
            );
        }
        return 0;
    }

    report_end(
        Kind::ListenStopped,
        now,
        pid_tgid,
        &Sock {
            key: sock,
            family,
            protocol: IPPROTO_TCP,
            port: f.port,
            addr,
        },
        0,
    );
    0
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
    // Its end comes from the state tracepoint, which knows sockets by address.
    deliver_start(&mut rec, FoldTag::Addr(sock));
    1
}

/// The stable set without any tracepoint (its default flavour): sock_ops alone sees a
/// listener's whole life, and nothing runs for the host's other TCP state changes.
/// - `TCP_LISTEN_CB` (see `listen_sockops`): the start, decided and reported at once in
///   the listening task, port chosen; and, when the start was sent, the socket's
///   `STATE_CB` flag is set, so `tcp_set_state()` calls back for this socket's own
///   state changes (a folded listener's end is left to `sock_released`).
/// - `STATE_CB` LISTEN -> CLOSE: the end, by close(), shutdown() or an abort
///   (`ss -K`), before `inet_put_port()` releases the port. Called only for sockets
///   whose flag is set: listeners, and an accepted connection once (below).
/// Listeners older than the agent never had their flag set: `sock_released` reports
/// their end, and counts those of folded listeners into their fold.
#[sock_ops]
pub fn listen_ops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Context fields are loaded at their constant offsets, as the verifier requires.
    let op = unsafe { read_volatile(&raw const (*ops).op) };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        listen_began(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        let old = unsafe { read_volatile(&raw const (*ops).__bindgen_anon_1.args[0]) };
        let new = unsafe { read_volatile(&raw const (*ops).__bindgen_anon_1.args[1]) };
        if old == TCP_LISTEN as u32 && new == TCP_CLOSE as u32 {
            listen_ended(&ctx);
        } else if old == TCP_SYN_RECV as u32 {
            // A connection accepted on a listener is cloned from it, flags included
            // (`tcp_create_openreq_child()`): unwatched at its first change, so the
            // host's connections cost one callback each, not one per state. (A program
            // that sets STATE_CB on its listeners for their connections' sake would
            // lose it here; one that sets it on connections later keeps it.)
            let flags = unsafe { read_volatile(&raw const (*ops).bpf_sock_ops_cb_flags) };
            let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    }
    1
}

/// How the fold tables know a sock_ops socket: by cookie, as the cgroup sock and
/// sock_addr programs know the same socket (`sock_tag`).
#[inline(always)]
fn ops_tag(ctx: &SockOpsContext) -> FoldTag {
    FoldTag::Cookie(unsafe { bpf_get_socket_cookie(ctx.ops.cast()) })
}

/// How the fold tables know a cgroup sock program's socket (see `ops_tag`).
#[inline(always)]
fn sock_tag(ctx: &SockContext) -> FoldTag {
    FoldTag::Cookie(unsafe { bpf_get_socket_cookie(ctx.sock.cast()) })
}

/// The `struct sock` address of a sock_ops socket, as a number (one kernel read).
#[inline(always)]
fn ops_sock(ctx: &SockOpsContext) -> u64 {
    // The context is the kernel's `struct bpf_sock_ops_kern`, whose first field is the
    // `struct sock *` (include/linux/filter.h): read as a plain value, it is the same
    // map key, and kernel reads may add offsets to it (the verifier forbids arithmetic
    // on the context's typed socket pointer).
    read_kernel::<u64>(ctx.ops as u64, 0).unwrap_or(0)
}

/// The local address of a sock_ops socket, as the state records carry it.
#[inline(always)]
fn ops_local(ctx: &SockOpsContext) -> (u16, u16, [u8; 16]) {
    let ops = ctx.ops;
    let (family, port) = unsafe {
        (
            read_volatile(&raw const (*ops).family) as u16,
            // Host byte order (include/uapi/linux/bpf.h).
            read_volatile(&raw const (*ops).local_port) as u16,
        )
    };
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let v4 = unsafe { read_volatile(&raw const (*ops).local_ip4) };
        addr[..4].copy_from_slice(&v4.to_ne_bytes());
    } else {
        let v6 = unsafe {
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ]
        };
        addr[..4].copy_from_slice(&v6[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&v6[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&v6[2].to_ne_bytes());
        addr[12..].copy_from_slice(&v6[3].to_ne_bytes());
    }
    (family, port, addr)
}

/// A listen() succeeded: report (or fold) its start, and watch the end of a listener
/// whose start was sent.
///
/// A folded listener is not watched: its `STATE_CB` callback would run once more per
/// socket, in a flood, for what `sock_released` finds anyway (it runs for every socket).
/// Its end is counted into its fold when the socket is released, in LISTEN or, after a
/// shutdown() or an abort, in CLOSE; a socket that listens again after a shutdown has
/// its earlier folded start ended first, here.
#[inline(always)]
fn listen_began(ctx: &SockOpsContext) {
    let (family, port, addr) = ops_local(ctx);
    let tag = ops_tag(ctx);
    // A socket listening again after a shutdown() of its folded listen: that one ended.
    let _ = end_folded(tag);
    let folded = report_start_as(
        &TaskReads::current(),
        Kind::ListenStarted,
        || ops_sock(ctx),
        tag,
        family,
        IPPROTO_TCP,
        port,
        &addr,
        kthread_flag,
    );
    if !folded {
        // Kept with the flags other sock_ops programs set. The helper refuses only a
        // socket that is not a full TCP socket, which a listener always is; should it
        // ever refuse, `sock_released` still sees the listener's close (its flag is not
        // set), as for a listener older than the agent.
        let flags = unsafe { read_volatile(&raw const (*ctx.ops).bpf_sock_ops_cb_flags) };
        let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// A watched listener left LISTEN for CLOSE: its end, unless its start was folded.
#[inline(always)]
fn listen_ended(ctx: &SockOpsContext) {
    if end_folded(ops_tag(ctx)) {
        return;
    }
    let (family, port, addr) = ops_local(ctx);
    let cur = TaskReads::current();
    report_end_as(
        &cur,
        Kind::ListenStopped,
        unsafe { bpf_ktime_get_ns() },
        cur.pid_tgid(),
        &Sock {
            key: ops_sock(ctx),
            family,
            protocol: IPPROTO_TCP,
            port,
            addr,
        },
        0,
    );
}

/// `sock_release` of the sock_ops flavour: what `udp_release` does, and the end of a
/// TCP listener whose `STATE_CB` flag is not set (one that listened before the agent
/// started, or whose start was folded), which `listen_ops` never hears about: closed
/// while listening, or shut down first (see `old_listener_released`). The flagged ones
/// are left to `listen_ops`.
#[cgroup_sock(sock_release)]
pub fn sock_released(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let protocol = unsafe { read_volatile(&raw const (*sk).protocol) };
    let family = unsafe { read_volatile(&raw const (*sk).family) } as u16;
    if is_udp(protocol) {
        udp_released(sk as u64, sock_tag(&ctx), family, protocol as u16);
    } else if protocol == IPPROTO_TCP as u32 {
        let state = unsafe { read_volatile(&raw const (*sk).state) };
        if state == TCP_LISTEN as u32 {
            unwatched_listener_released(sk as u64, sock_tag(&ctx), family);
        } else if state == TCP_CLOSE as u32
            && unsafe { read_volatile(&raw const (*sk).dst_port) } == 0
        {
            // Never connected: a connection reset by its peer, or accepted on a
            // listener, keeps its peer's port (the usual CLOSE at release on a busy
            // server), and costs no kernel read here. A folded listener shut down or
            // aborted before its close (unwatched: see `listen_began`) ends here too.
            if !end_folded(sock_tag(&ctx)) {
                old_listener_released(sk as u64);
            }
        }
    }
    1
}

/// Listeners the agent's startup snapshot found, by socket inode (filled by the agent).
#[map]
static OLD_LISTENERS: HashMap<u64, OldListener> = HashMap::with_max_entries(16384, 0);

#[inline(always)]
fn socket_inode(sock: u64) -> Option<u64> {
    read_kernel::<u64>(sock, offset!(sock_socket))
        .filter(|s| *s != 0)
        .and_then(|s| {
            read_kernel::<u64>(s, offset!(socket_to_inode).wrapping_add(offset!(inode_ino)))
        })
}

/// A TCP socket released in CLOSE: the end of a listener older than the agent that was
/// shut down (`shutdown(2)` leaves LISTEN without `STATE_CB`, its flag never set) and is
/// now closed, if the snapshot found it. Sockets released in CLOSE are few (never
/// connected, reset, shut down): the host's connections close ESTABLISHED or later.
#[inline(always)]
fn old_listener_released(sock: u64) {
    let Some(inode) = socket_inode(sock) else {
        return;
    };
    let Some(l) = (unsafe { OLD_LISTENERS.get(inode) }).copied() else {
        return;
    };
    let _ = OLD_LISTENERS.remove(inode);
    report_end(
        Kind::ListenStopped,
        unsafe { bpf_ktime_get_ns() },
        bpf_get_current_pid_tgid(),
        &Sock {
            key: sock,
            family: l.family,
            protocol: IPPROTO_TCP,
            port: l.port,
            addr: l.addr,
        },
        FLAG_UNTRACKED,
    );
}

#[inline(always)]
fn unwatched_listener_released(sock: u64, tag: FoldTag, family: u16) {
    // The fold first, before any kernel read: in a flood, a folded listener (unflagged,
    // see `listen_began`) is the usual one released here. A flagged listener (its
    // start sent) is never in the fold tables.
    if end_folded(tag) {
        return;
    }
    let Some(cb_flags) = read_kernel::<u8>(sock, offset!(tcp_cb_flags)) else {
        return;
    };
    if u32::from(cb_flags) & BPF_SOCK_OPS_STATE_CB_FLAG != 0 {
        return;
    }
    if let Some(inode) = socket_inode(sock) {
        let _ = OLD_LISTENERS.remove(inode);
    }
    let Some(port) = read_kernel::<u16>(sock, offset!(sock_num)) else {
        return;
    };
    report_end(
        Kind::ListenStopped,
        unsafe { bpf_ktime_get_ns() },
        bpf_get_current_pid_tgid(),
        &Sock {
            key: sock,
            family,
            protocol: IPPROTO_TCP,
            port,
            addr: local_addr(sock, family, offset!(sock_rcv_saddr)),
        },
        FLAG_UNTRACKED,
    );
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
        udp_bound_flags(
            sk as u64,
            sock_tag(&ctx),
            AF_INET,
            protocol as u16,
            port as u16,
            addr,
            0,
        );
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
        udp_bound_flags(
            sk as u64,
            sock_tag(&ctx),
            AF_INET6,
            protocol as u16,
            port as u16,
            addr,
            0,
        );
    }
    1
}

#[cgroup_sock(sock_release)]
pub fn udp_release(ctx: SockContext) -> i32 {
    let protocol = unsafe { read_volatile(&raw const (*ctx.sock).protocol) };
    if is_udp(protocol) {
        // The context pointer is the kernel's `struct sock` (`__cgroup_bpf_run_filter_sk()`).
        let family = unsafe { read_volatile(&raw const (*ctx.sock).family) } as u16;
        udp_released(ctx.sock as u64, sock_tag(&ctx), family, protocol as u16);
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
    let tag = FoldTag::Cookie(unsafe { bpf_get_socket_cookie(sa.cast()) });
    if unsafe { BOUND.get(sock) }.is_some() || is_folded(tag) {
        return;
    }
    // A connected socket hears only its peer (`sendto()` with an address on a connected
    // socket also gets here).
    let state = unsafe { read_volatile(&raw const (*(*sa).__bindgen_anon_1.sk).state) };
    if state == UDP_CONNECTED {
        return;
    }
    let Some(port) = read_kernel::<u16>(sock, offset!(sock_num)) else {
        return;
    };
    if port == 0 {
        return;
    }
    let mut addr = [0u8; 16];
    if family == AF_INET as u32 {
        if let Some(a) = read_kernel::<[u8; 4]>(sock, offset!(sock_rcv_saddr)) {
            addr[..4].copy_from_slice(&a);
        }
        udp_bound_flags(
            sock,
            tag,
            AF_INET,
            protocol as u16,
            port,
            addr,
            FLAG_IMPLICIT,
        );
    } else {
        if let Some(a) = read_kernel::<[u8; 16]>(sock, offset!(sock_v6_rcv_saddr)) {
            addr = a;
        }
        udp_bound_flags(
            sock,
            tag,
            AF_INET6,
            protocol as u16,
            port,
            addr,
            FLAG_IMPLICIT,
        );
    }
}
