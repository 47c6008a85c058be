//! Do-nothing programs at the stable set's hooks (same program types, same count), for
//! the benchmark's floor run (`portwatch watch --hooks floor`, hidden): what the hooks
//! themselves cost a workload, apart from anything portwatch does in them.

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, raw_tracepoint, sock_ops, tracepoint},
    programs::{
        RawTracePointContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext,
    },
};

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
