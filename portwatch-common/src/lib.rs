//! Records that cross the BPF ring buffer, defined once for both sides.
//!
//! Every record starts with [`Header`]; the agent's decoder reads the header first,
//! checks `kind` against [`Kind`] by integer (never by transmute) and only then reads
//! the body. All records are `#[repr(C)]`, `Copy` and have no implicit padding: the
//! `const` assertions below fail the build if a field change introduces any.
#![no_std]

/// TCP state numbers from `include/net/tcp_states.h`.
pub const TCP_LISTEN: i32 = 10;
pub const TCP_CLOSE: i32 = 7;
/// The state a connection accepted on a listener starts in (include/net/tcp_states.h).
pub const TCP_SYN_RECV: i32 = 3;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
/// UDP-Lite (RFC 3828): datagram sockets on their own port space, bound like UDP.
pub const IPPROTO_UDPLITE: u16 = 136;

pub const COMM_LEN: usize = 16;

/// Record kinds. The numeric ids are the wire format: never renumber one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TCP socket entered LISTEN and `listen()` returned 0.
    ListenStarted = 1,
    /// A TCP socket left LISTEN (closed, or `shutdown()`).
    ListenStopped = 2,
    /// A UDP socket was bound to a local port (cgroup `post_bind4`/`post_bind6`).
    UdpBound = 3,
    /// A UDP socket that we saw bound was released (cgroup `sock_release`).
    UdpReleased = 4,
}

impl Kind {
    /// Decode a kind id read from the kernel; `None` for an id this build does not know.
    pub const fn from_u32(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::ListenStarted),
            2 => Some(Kind::ListenStopped),
            3 => Some(Kind::UdpBound),
            4 => Some(Kind::UdpReleased),
            _ => None,
        }
    }
}

/// First bytes of every record. The decoder relies on this being at offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    /// A [`Kind`] id.
    pub kind: u32,
    /// CPU the record was produced on (diagnostics only).
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the kernel saw the event.
    pub ktime_ns: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high 32 bits, thread id in the low.
    pub pid_tgid: u64,
}

/// One socket lifecycle event. Fields the kernel side could not read are zero and the
/// matching bit in `flags` is clear: zero is never a guess.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketRecord {
    pub header: Header,
    /// `bpf_get_current_uid_gid()`: gid high, uid low.
    pub uid_gid: u64,
    /// cgroup v2 id of the current task (`bpf_get_current_cgroup_id()`).
    pub cgroup_id: u64,
    /// Kernel address of the `struct sock`. Used only to pair a start with its end
    /// inside the agent; it is never written out (it would leak KASLR).
    pub sock_key: u64,
    /// Inode of the socket (what `/proc/<pid>/fd` and `/proc/net/*` show).
    pub inode: u64,
    /// `task->start_boottime` of the thread group leader, ns since boot.
    pub start_boottime_ns: u64,
    /// Inode of the socket's network namespace.
    pub netns_ino: u32,
    /// tgid of the real parent.
    pub ppid: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP` or `IPPROTO_UDPLITE`.
    pub protocol: u16,
    /// Local port, host byte order.
    pub port: u16,
    /// Two words, not six bytes (see `FoldKey::_pad`).
    pub _pad: u16,
    pub _pad2: u32,
    /// Local address: 4 bytes for IPv4 (rest zero), 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// `comm` of the current thread.
    pub comm: [u8; COMM_LEN],
}

/// `inode` was read from the kernel.
pub const FLAG_INODE: u32 = 1 << 0;
/// `netns_ino` was read from the kernel.
pub const FLAG_NETNS: u32 = 1 << 1;
/// `ppid` was read from the kernel.
pub const FLAG_PPID: u32 = 1 << 2;
/// `start_boottime_ns` was read from the kernel.
pub const FLAG_START: u32 = 1 << 3;
/// The current task is a kernel thread (no user process owns the socket).
pub const FLAG_KTHREAD: u32 = 1 << 4;
/// IPv6 socket with `IPV6_V6ONLY` set (only meaningful for `::`).
pub const FLAG_V6ONLY: u32 = 1 << 5;
/// A UDP release of a socket whose bind was not seen (bound before the agent started,
/// or a client socket the kernel bound implicitly), or the close of a TCP listener whose
/// listen() was not seen (one older than the agent): the agent keeps it only for a
/// socket it knows (from its startup snapshot).
pub const FLAG_UNTRACKED: u32 = 1 << 6;
/// The kernel judged the record important (a port in `RISKY_PORTS`, or an address that
/// is not loopback) and put it in the `URGENT` ring, which bulk churn cannot fill.
pub const FLAG_URGENT: u32 = 1 << 7;
/// Kernel-internal, never sent: a parked listen whose budget was charged when it began.
pub const FLAG_CHARGED: u32 = 1 << 8;
/// A UDP socket the kernel bound implicitly (its first `sendmsg()` without a `bind()`),
/// found unconnected: it receives datagrams from anyone on its port, like a bound one.
pub const FLAG_IMPLICIT: u32 = 1 << 9;

pub const SOCKET_RECORD_SIZE: usize = core::mem::size_of::<SocketRecord>();
const _: () = assert!(core::mem::size_of::<Header>() == 24);
const _: () = assert!(SOCKET_RECORD_SIZE == 24 + 5 * 8 + 3 * 4 + 3 * 2 + 6 + 16 + 16);
const _: () = assert!(SOCKET_RECORD_SIZE.is_multiple_of(8));

/// Indices into the `STATS` per-CPU array.
pub mod stat {
    /// Ring buffer reservations that failed (events lost in the kernel).
    pub const RING_FULL: u32 = 0;
    /// `listen()` calls that entered LISTEN but returned an error.
    pub const LISTEN_FAILED: u32 = 1;
    /// LISTEN transitions we could not track (pending map full).
    pub const PENDING_FULL: u32 = 2;
    /// UDP binds we could not track for their release (bound map full).
    pub const BOUND_FULL: u32 = 3;
    /// Kernel struct reads that failed (fields reported as unknown).
    pub const READ_FAILED: u32 = 4;
    /// `URGENT` ring reservations that failed (important events lost in the kernel).
    pub const URGENT_FULL: u32 = 5;
    /// Starts over budget that could not be folded (every `FOLDS` entry taken): sent one by one
    /// instead, so nothing is lost, but the flood was not contained.
    pub const FOLD_FULL: u32 = 6;
    /// Ends of folded listeners whose fold entry was already gone (nothing to count into).
    pub const FOLD_END_ORPHAN: u32 = 7;
    /// `bind()`/`listen()` calls the direct set could not track from entry to return
    /// (`BIND_CALLS`/`LISTEN_CALLS` refused the entry): their result is not reported.
    pub const CALLS_FULL: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Entries in the `RISKY_PORTS` bitmap (`u64` words): one bit per port.
pub const RISKY_WORDS: u32 = 1024;
/// Words of a fold's port bitmap: one bit per port, 8 KiB.
pub const FOLD_PORT_WORDS: usize = 1024;
/// Entries of the `FOLDS` array (8 KiB each, preallocated: 4 MiB): folds counted at once.
pub const FOLD_ENTRIES: u32 = 512;

/// Where a folded listener's address lies (part of [`FoldKey`]).
pub const SCOPE_LOOPBACK: u16 = 0;
pub const SCOPE_WILDCARD: u16 = 1;
/// Any other address; the fold keeps the first one seen as its sample.
pub const SCOPE_ADDRESS: u16 = 2;

/// A process over its budget has its further starts counted here instead of sent, per
/// (process, transport, address scope). `start_boottime_ns` tells a reused tgid apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub tgid: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `SCOPE_*`.
    pub scope: u16,
    /// Two words, not six bytes: a zeroed `[u8; 6]` is a byte loop (a `memset` call) in
    /// the BPF programs, on every folded start.
    pub _pad: u16,
    pub _pad2: u32,
    pub start_boottime_ns: u64,
}

impl FoldKey {
    /// The key as three words, for a comparison without a byte loop in the BPF programs.
    #[inline(always)]
    pub fn words(&self) -> [u64; 3] {
        [
            u64::from(self.tgid) | u64::from(self.protocol) << 32 | u64::from(self.family) << 48,
            u64::from(self.scope) | u64::from(self._pad) << 16 | u64::from(self._pad2) << 32,
            self.start_boottime_ns,
        ]
    }
}

/// The counts of one fold, an entry of the `FOLDS` array. The kernel only adds
/// (atomically) and sets bits; the agent reads cumulative values and reports the
/// differences, so no update is ever lost to a read-and-reset race. The attribution
/// fields are those of the first folded start.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Fold {
    /// Whose fold this entry holds (all zero: a free entry). A socket or a budget that
    /// remembers the entry's index checks this before counting into it.
    pub key: FoldKey,
    /// Starts folded.
    pub started: u64,
    /// Ends of folded listeners.
    pub ended: u64,
    /// `bpf_ktime_get_ns()` of the first and the latest folded start.
    pub first_ns: u64,
    pub last_ns: u64,
    pub uid_gid: u64,
    pub cgroup_id: u64,
    pub netns_ino: u32,
    pub ppid: u32,
    /// `FOLD_BY_*`: which budget made the process fold (bits accumulate).
    pub reason: u32,
    pub flags: u32,
    /// Sample address (the first folded start's).
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// Bit `p` set: port `p` was folded at least once.
    pub ports: [u64; FOLD_PORT_WORDS],
}

impl Fold {
    /// A free entry (what the agent writes into one it gives back).
    pub const FREE: Fold = Fold {
        key: FoldKey {
            tgid: 0,
            protocol: 0,
            family: 0,
            scope: 0,
            _pad: 0,
            _pad2: 0,
            start_boottime_ns: 0,
        },
        started: 0,
        ended: 0,
        first_ns: 0,
        last_ns: 0,
        uid_gid: 0,
        cgroup_id: 0,
        netns_ino: 0,
        ppid: 0,
        reason: 0,
        flags: 0,
        addr: [0; 16],
        comm: [0; COMM_LEN],
        ports: [0; FOLD_PORT_WORDS],
    };
}

/// The process's own budget was spent.
pub const FOLD_BY_PROCESS: u32 = 1 << 0;
/// The budget shared by all processes of its user was spent.
pub const FOLD_BY_USER: u32 = 1 << 1;

/// A TCP listener the agent's startup snapshot found (`OLD_LISTENERS`, keyed by socket
/// inode): the sock_ops hook set never saw its listen(), so this is how the kernel side
/// recognises its end when it leaves LISTEN without a close (`shutdown(2)`), at its release.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OldListener {
    pub family: u16,
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 4],
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<OldListener>() == 24);

/// A budget (per process in `PROC_BUDGET`, per user in `USER_BUDGET`) and, per process,
/// its exact totals: every start of the process is exactly one of sent, folded or lost.
/// The folded ones are counted in the process's folds (`Fold::started`), not here: a
/// folded start need not find its budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Budget {
    /// `start_boottime_ns` of the process (0 for a user): a reused tgid starts afresh.
    pub start_boottime_ns: u64,
    /// Start of the current one-second window, and the starts counted in it.
    pub window_ns: u64,
    pub in_window: u64,
    pub sent: u64,
    pub lost: u64,
    /// The process's latest fold: its `FOLDS` index + 1 (0: none). A hint, checked
    /// against the entry's key, so a folded start finds its fold without a hash lookup.
    pub fold_hint: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<FoldKey>() == 24);
const _: () = assert!(core::mem::offset_of!(FoldKey, start_boottime_ns) == 16);
const _: () = assert!(core::mem::offset_of!(SocketRecord, addr) == 88);
const _: () =
    assert!(core::mem::size_of::<Fold>() == 24 + 8 * 6 + 4 * 4 + 16 + 16 + 8 * FOLD_PORT_WORDS);
const _: () = assert!(core::mem::size_of::<Budget>() == 48);

/// Field offsets in kernel structs, read from the running kernel's BTF by the agent and
/// set as load-time globals. A value of `u32::MAX` means "not found": the program
/// then leaves the field unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common.skc_num` (local port, host order).
    pub sock_num: u32,
    /// `struct sock.sk_socket`.
    pub sock_socket: u32,
    /// `struct sock_common.skc_net` (a `possible_net_t`, first member `net`).
    pub sock_net: u32,
    /// `struct sock_common.skc_ipv6only` is a bitfield; we read the byte holding it.
    pub sock_ipv6only_byte: u32,
    /// Bit within that byte.
    pub sock_ipv6only_bit: u32,
    /// `struct socket_alloc.vfs_inode` minus `struct socket_alloc.socket`.
    pub socket_to_inode: u32,
    /// `struct inode.i_ino`.
    pub inode_ino: u32,
    /// `struct net.ns` + `struct ns_common.inum`.
    pub net_inum: u32,
    /// `struct task_struct.real_parent`.
    pub task_real_parent: u32,
    /// `struct task_struct.tgid`.
    pub task_tgid: u32,
    /// `struct task_struct.group_leader`.
    pub task_group_leader: u32,
    /// `struct task_struct.start_boottime`.
    pub task_start_boottime: u32,
    /// `struct task_struct.flags`.
    pub task_flags: u32,
    /// `struct sock_common.skc_rcv_saddr` (bound IPv4 address).
    pub sock_rcv_saddr: u32,
    /// `struct sock_common.skc_v6_rcv_saddr` (bound IPv6 address).
    pub sock_v6_rcv_saddr: u32,
    // The direct hook set (inet_listen/inet_bind/...) reads these; the stable set gets
    // them from its tracepoint record or `bpf_sock` context instead.
    /// `struct sock_common.skc_state` (u8).
    pub sock_state: u32,
    /// `struct sock_common.skc_family` (u16).
    pub sock_family: u32,
    /// `struct sock.sk_protocol` (u16 since 5.6).
    pub sock_protocol: u32,
    /// `struct inet_sock.inet_sport` (network order; kept after the port is released).
    pub inet_sport: u32,
    /// `struct inet_sock.inet_saddr` (what `sock:inet_sock_set_state` reports for IPv4).
    pub inet_saddr: u32,
    /// `struct socket.sk`.
    pub socket_sk: u32,
    /// `struct sock.sk_kern_sock` is a bitfield: the byte holding it, and the bit.
    pub sock_kern_byte: u32,
    pub sock_kern_bit: u32,
    // The sock_ops flavour of the stable set reads the listening task itself (sock_ops
    // programs have no current-task helpers before 6.10) and a listener's callback flags.
    /// `struct tcp_sock.bpf_sock_ops_cb_flags` (u8).
    pub tcp_cb_flags: u32,
    /// `struct task_struct.pid`, when `tgid` follows it: one 8-byte read there is the
    /// `bpf_get_current_pid_tgid()` value.
    pub task_pid: u32,
    /// `struct task_struct.cred`.
    pub task_cred: u32,
    /// `struct cred.uid`, when `gid` follows it: one 8-byte read there is the
    /// `bpf_get_current_uid_gid()` value.
    pub cred_uid: u32,
    /// `struct task_struct.comm`.
    pub task_comm: u32,
    /// `struct task_struct.cgroups`.
    pub task_cgroups: u32,
    /// `struct css_set.dfl_cgrp`.
    pub css_set_dfl_cgrp: u32,
    /// `struct cgroup.kn`.
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id` (u64 since 5.5).
    pub kernfs_node_id: u32,
}

impl KernelOffsets {
    pub const UNKNOWN: u32 = u32::MAX;
    pub const fn unknown() -> Self {
        KernelOffsets {
            sock_num: Self::UNKNOWN,
            sock_socket: Self::UNKNOWN,
            sock_net: Self::UNKNOWN,
            sock_ipv6only_byte: Self::UNKNOWN,
            sock_ipv6only_bit: 0,
            socket_to_inode: Self::UNKNOWN,
            inode_ino: Self::UNKNOWN,
            net_inum: Self::UNKNOWN,
            task_real_parent: Self::UNKNOWN,
            task_tgid: Self::UNKNOWN,
            task_group_leader: Self::UNKNOWN,
            task_start_boottime: Self::UNKNOWN,
            task_flags: Self::UNKNOWN,
            sock_rcv_saddr: Self::UNKNOWN,
            sock_v6_rcv_saddr: Self::UNKNOWN,
            sock_state: Self::UNKNOWN,
            sock_family: Self::UNKNOWN,
            sock_protocol: Self::UNKNOWN,
            inet_sport: Self::UNKNOWN,
            inet_saddr: Self::UNKNOWN,
            socket_sk: Self::UNKNOWN,
            sock_kern_byte: Self::UNKNOWN,
            sock_kern_bit: 0,
            tcp_cb_flags: Self::UNKNOWN,
            task_pid: Self::UNKNOWN,
            task_cred: Self::UNKNOWN,
            cred_uid: Self::UNKNOWN,
            task_comm: Self::UNKNOWN,
            task_cgroups: Self::UNKNOWN,
            css_set_dfl_cgrp: Self::UNKNOWN,
            cgroup_kn: Self::UNKNOWN,
            kernfs_node_id: Self::UNKNOWN,
        }
    }
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 32 * 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data, every bit pattern is valid, no padding (asserted above).
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above (sizes asserted at the top level).
    unsafe impl aya::Pod for super::FoldKey {}
    unsafe impl aya::Pod for super::Fold {}
    unsafe impl aya::Pod for super::Budget {}
    unsafe impl aya::Pod for super::OldListener {}
}
