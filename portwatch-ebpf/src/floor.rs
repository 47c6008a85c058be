//! Do-nothing programs at the stable set's hooks (same program types, same count), for
//! the benchmark's floor run (`portwatch watch --hooks floor`, hidden): what the hooks
//! themselves cost a workload, apart from anything portwatch does in them.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB},
    macros::{cgroup_sock, cgroup_sock_addr, raw_tracepoint, sock_ops, tracepoint},
    programs::{
        RawTracePointContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext,
    },
};
use portwatch_common::TCP_SYN_RECV;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn floor_state(_ctx: TracePointContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn floor_rawtp(_ctx: RawTracePointContext) -> u32 {
    0
}

#[sock_ops]
pub fn floor_sockops(_ctx: SockOpsContext) -> u32 {
    1
}

/// The floor of the sock_ops flavour: sets and clears the `STATE_CB` flag where
/// `listen_ops` does (each listener's, and each accepted connection's it inherited), so
/// the same callbacks run, and does nothing else.
#[sock_ops]
pub fn floor_ops(ctx: SockOpsContext) -> u32 {
    let op = unsafe { read_volatile(&raw const (*ctx.ops).op) };
    let flags = unsafe { read_volatile(&raw const (*ctx.ops).bpf_sock_ops_cb_flags) };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == BPF_SOCK_OPS_STATE_CB
        && unsafe { read_volatile(&raw const (*ctx.ops).__bindgen_anon_1.args[0]) }
            == TCP_SYN_RECV as u32
    {
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    1
}

#[cgroup_sock(post_bind4)]
pub fn floor_bind4(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_sock(post_bind6)]
pub fn floor_bind6(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_sock(sock_release)]
pub fn floor_release(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn floor_send4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn floor_send6(_ctx: SockAddrContext) -> i32 {
    1
}
