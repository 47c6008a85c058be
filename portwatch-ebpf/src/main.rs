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

/// One field of `record::OFFSETS`, the offsets the agent found in BTF, read on its own.
/// `Global::load()` reads the whole struct (a volatile read: 32 loads, every time, on
/// every path that needs one offset); this reads the one word that is used. Volatile,
/// as `load()` is: the value is written by the agent at load time, not the one compiled.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: `Global` is `repr(transparent)` over an initialised `KernelOffsets`.
        unsafe {
            core::ptr::read_volatile(
                &raw const (*(&raw const crate::record::OFFSETS)
                    .cast::<portwatch_common::KernelOffsets>())
                .$field,
            )
        }
    };
}

mod deliver;
mod direct;
mod floor;
mod record;
mod stable;

// Host builds (clippy over the workspace) link std, which brings its own handler.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
