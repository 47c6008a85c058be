//! The direct hook set: the kernel functions that make a listener or a bound UDP socket,
//! hooked themselves. Used where the kernel allows fentry/fexit (or, failing that,
//! kprobes); the stable set in `stable.rs` is the fallback. Both fill the same
//! `SocketRecord` through `build()`, field for field, so the agent cannot tell them apart.
//!
//! | program (fentry/fexit, kprobe) | kernel function | source |
//! |---|---|---|
//! | `listen_enter`, `listen_enter_kp` | `inet_listen()` entry | net/ipv4/af_inet.c |
//! | `listen_exit`, `listen_exit_kp` | `inet_listen()` return | net/ipv4/af_inet.c |
//! | `listen_stop`, `listen_stop_kp` | `inet_csk_listen_stop()` | net/ipv4/inet_connection_sock.c |
//! | `udp_bind4_exit`, `bind_exit_kp` | `inet_bind()` return | net/ipv4/af_inet.c |
//! | `udp_bind6_exit`, `bind_exit_kp` | `inet6_bind()` return | net/ipv6/af_inet6.c |
//! | `release_enter`, `release_kp` | `inet_release()` (also via `inet6_release()`) | net/ipv4/af_inet.c |
//!
//! Struct fields come from the running kernel's BTF (`OFFSETS`): Rust eBPF has no CO-RE.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use portwatch_common::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, Kind, TCP_LISTEN, stat,
};

use crate::{
    deliver::{FoldTag, count, end_folded},
    record::{
        Sock, kthread_flag, local_addr, read_kernel, report_end, report_start_built,
        udp_bound_direct, udp_released,
    },
};

/// `listen()` calls in flight that may move a socket into LISTEN, keyed by thread
/// (`pid_tgid`): the `struct sock` the call started with. A `listen()` on a socket that
/// already listens only resizes its backlog and is not a new listener (the stable set's
/// state tracepoint does not fire for it either), so it is never entered here.
/// LRU: an entry whose return was never seen (a kretprobe that missed, when more calls
/// are in flight than kretprobe instances) goes first instead of staying for good.
#[map]
static LISTEN_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// `bind()` calls in flight for the kprobe flavour (a kretprobe sees no arguments):
/// thread -> `struct socket`. LRU for the same reason.
#[map]
static BIND_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

// --- fentry/fexit flavour (BTF-typed arguments; the return value follows them) ---

#[fentry(function = "inet_listen")]
pub fn listen_enter(ctx: FEntryContext) -> u32 {
    listen_called(ctx.arg::<u64>(0));
    0
}

/// `int inet_listen(struct socket *sock, int backlog)`: the result is argument 2.
#[fexit(function = "inet_listen")]
pub fn listen_exit(ctx: FExitContext) -> u32 {
    listen_returned(ctx.arg::<i64>(2) as i32);
    0
}

#[fentry(function = "inet_csk_listen_stop")]
pub fn listen_stop(ctx: FEntryContext) -> u32 {
    listen_stopped(ctx.arg::<u64>(0));
    0
}

/// `int inet_bind(struct socket *sock, struct sockaddr *uaddr, int addr_len)`.
#[fexit(function = "inet_bind")]
pub fn udp_bind4_exit(ctx: FExitContext) -> u32 {
    if ctx.arg::<i64>(3) as i32 == 0 {
        bind_returned(ctx.arg::<u64>(0));
    }
    0
}

/// `int inet6_bind(struct socket *sock, struct sockaddr *uaddr, int addr_len)`.
#[fexit(function = "inet6_bind")]
pub fn udp_bind6_exit(ctx: FExitContext) -> u32 {
    if ctx.arg::<i64>(3) as i32 == 0 {
        bind_returned(ctx.arg::<u64>(0));
    }
    0
}

#[fentry(function = "inet_release")]
pub fn release_enter(ctx: FEntryContext) -> u32 {
    release_called(ctx.arg::<u64>(0));
    0
}

// --- kprobe flavour (for kernels without fentry: same functions, pt_regs arguments) ---

#[kprobe]
pub fn listen_enter_kp(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        listen_called(sock);
    }
    0
}

#[kretprobe]
pub fn listen_exit_kp(ctx: RetProbeContext) -> u32 {
    listen_returned(ctx.ret::<i64>() as i32);
    0
}

#[kprobe]
pub fn listen_stop_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        listen_stopped(sk);
    }
    0
}

/// Attached to both `inet_bind()` and `inet6_bind()`.
#[kprobe]
pub fn bind_enter_kp(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0)
        && BIND_CALLS
            .insert(bpf_get_current_pid_tgid(), sock, 0)
            .is_err()
    {
        count(stat::CALLS_FULL);
    }
    0
}

#[kretprobe]
pub fn bind_exit_kp(ctx: RetProbeContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(sock) = (unsafe { BIND_CALLS.get(key) }).copied() else {
        return 0;
    };
    let _ = BIND_CALLS.remove(key);
    if ctx.ret::<i64>() as i32 == 0 {
        bind_returned(sock);
    }
    0
}

#[kprobe]
pub fn release_kp(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        release_called(sock);
    }
    0
}

// --- shared by both flavours ---

/// `struct socket` -> its `struct sock`, when it is an inet socket of `protocol`
/// (`IPPROTO_UDP` also takes UDP-Lite), with the socket's own protocol.
#[inline(always)]
fn inet_sock_of(socket: u64, protocol: u16) -> Option<(u64, u16)> {
    let sk = read_kernel::<u64>(socket, offset!(socket_sk)).filter(|s| *s != 0)?;
    let p = read_kernel::<u16>(sk, offset!(sock_protocol))?;
    (p == protocol || (protocol == IPPROTO_UDP && p == IPPROTO_UDPLITE)).then_some((sk, p))
}

#[inline(always)]
fn family_of(sk: u64) -> u16 {
    read_kernel::<u16>(sk, offset!(sock_family)).unwrap_or(0)
}

#[inline(always)]
fn listen_called(socket: u64) {
    let Some((sk, _)) = inet_sock_of(socket, IPPROTO_TCP) else {
        return;
    };
    if read_kernel::<u8>(sk, offset!(sock_state)) == Some(TCP_LISTEN as u8) {
        return;
    }
    if LISTEN_CALLS
        .insert(bpf_get_current_pid_tgid(), sk, 0)
        .is_err()
    {
        count(stat::CALLS_FULL);
    }
}

/// `inet_listen()` returned: 0 means the socket listens, with its port chosen (an
/// unbound socket's too). Anything else is a failed listen, never reported.
#[inline(always)]
fn listen_returned(ret: i32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(sk) = (unsafe { LISTEN_CALLS.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = LISTEN_CALLS.remove(pid_tgid);
    if ret != 0 {
        count(stat::LISTEN_FAILED);
        return;
    }
    let port = read_kernel::<u16>(sk, offset!(sock_num)).unwrap_or(0);
    let kthread = kthread_flag();
    // One call per family, each with the family constant: the verifier then prunes the
    // other family's paths in each (one call with the family unknown walked both
    // everywhere and hit 6.1's million-instruction limit).
    if family_of(sk) == AF_INET {
        let addr = local_addr(sk, AF_INET, offset!(inet_saddr));
        report_start_built(
            Kind::ListenStarted,
            sk,
            AF_INET,
            IPPROTO_TCP,
            port,
            &addr,
            kthread,
        );
    } else {
        let addr = local_addr(sk, AF_INET6, offset!(inet_saddr));
        report_start_built(
            Kind::ListenStarted,
            sk,
            AF_INET6,
            IPPROTO_TCP,
            port,
            &addr,
            kthread,
        );
    }
}

/// `inet_csk_listen_stop()`: a listener's close (`tcp_close()`), `shutdown()`
/// (`tcp_disconnect()`) or `SOCK_DESTROY` (`tcp_abort()`); never a failed `listen()`.
/// `tcp_close()` has already released an autobound port here (`inet_num` is 0), so the
/// port is `inet_sport`, as in the state tracepoint.
#[inline(always)]
fn listen_stopped(sk: u64) {
    // DCCP listeners stop here too.
    if read_kernel::<u16>(sk, offset!(sock_protocol)) != Some(IPPROTO_TCP) {
        return;
    }
    if end_folded(FoldTag::Addr(sk)) {
        return;
    }
    let family = family_of(sk);
    let port = read_kernel::<u16>(sk, offset!(inet_sport)).map_or(0, u16::from_be);
    let addr = local_addr(sk, family, offset!(inet_saddr));
    report_end(
        Kind::ListenStopped,
        unsafe { bpf_ktime_get_ns() },
        bpf_get_current_pid_tgid(),
        &Sock {
            key: sk,
            family,
            protocol: IPPROTO_TCP,
            port,
            addr,
        },
        0,
    );
}

/// A `bind()` of an inet socket returned 0: for UDP, the port is reserved (the real one
/// for a port-0 bind), as the stable set's cgroup `post_bind4/6` sees it.
#[inline(always)]
fn bind_returned(socket: u64) {
    let Some((sk, protocol)) = inet_sock_of(socket, IPPROTO_UDP) else {
        return;
    };
    let port = read_kernel::<u16>(sk, offset!(sock_num)).unwrap_or(0);
    // Family constant per call, as in `listen_returned`.
    if family_of(sk) == AF_INET {
        let addr = local_addr(sk, AF_INET, offset!(sock_rcv_saddr));
        udp_bound_direct(sk, AF_INET, protocol, port, addr);
    } else {
        let addr = local_addr(sk, AF_INET6, offset!(sock_rcv_saddr));
        udp_bound_direct(sk, AF_INET6, protocol, port, addr);
    }
}

/// `inet_release()` entry, where the kernel runs cgroup `sock_release`: for sockets a
/// process owns only (`!sk->sk_kern_sock`), as that hook.
#[inline(always)]
fn release_called(socket: u64) {
    let Some((sk, protocol)) = inet_sock_of(socket, IPPROTO_UDP) else {
        return;
    };
    if read_kernel::<u8>(sk, offset!(sock_kern_byte))
        .is_some_and(|b| b & (1u8 << (offset!(sock_kern_bit) & 7)) != 0)
    {
        return;
    }
    udp_released(sk, FoldTag::Addr(sk), family_of(sk), protocol);
}
