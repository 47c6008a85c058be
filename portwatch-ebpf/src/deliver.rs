//! Where each record goes: the `URGENT` ring, the bulk `EVENTS` ring, or a fold.
//!
//! A local user can churn sockets faster than any reader drains a ring. Two rules keep
//! that from hiding the listener the sensor exists for:
//! - **Priority.** A record is important when its port is in `RISKY_PORTS` (the
//!   catalogue and the site rules, filled by the agent) or its address is not loopback
//!   (wildcard included). Important records travel in `URGENT`, which the agent drains
//!   first; loopback churn can only fill `EVENTS`.
//! - **Budgets.** Each process, and each user, may send `FOLD_ABOVE` (per user
//!   `FOLD_USER_ABOVE`) starts per second one by one. Above that, further starts are
//!   folded: counted exactly in a `FOLDS` entry (count, port bitmap, first and last time) and
//!   reported by the agent as `listeners-folded`, at most once a second per process. A
//!   process already over its own budget does not spend its user's, so the other
//!   processes of a flooding user keep theirs. A CPU that folded a start for the
//!   process's own budget remembers it until the window ends (`FOLDING`): the next ones
//!   skip the budget.
//!
//! Ends follow their start: the end of a folded start is folded too (`FOLDED_FAST`,
//! `FOLDED_SOCKS`).
//!
//! A fold lives in an entry of the `FOLDS` array, found by its key in `FOLD_INDEX`. A
//! folded socket and its process's budget remember the entry's index, checked against
//! the entry's key: a folded start and its end count into their fold without a hash
//! lookup (each was one, of a 24-byte key, on every folded start and end). Free entries
//! wait in `FREE_FOLDS`, filled by the agent at start and given back when it deletes a
//! fold (its process gone, its last counts reported; the entry zeroed first).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    Global,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, Queue, RingBuf},
};
use portwatch_common::{
    AF_INET, Budget, FLAG_CHARGED, FLAG_URGENT, FOLD_BY_PROCESS, FOLD_BY_USER, FOLD_ENTRIES,
    FOLD_PORT_WORDS, Fold, FoldKey, RISKY_WORDS, SCOPE_ADDRESS, SCOPE_LOOPBACK, SCOPE_WILDCARD,
    SocketRecord, stat,
};

/// Important records; sized by the agent (`--urgent-ring-bytes`).
#[map]
pub static URGENT: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// One bit per port the agent calls risky (catalogue plus the rules' deny/risky lists).
#[map]
static RISKY_PORTS: Array<u64> = Array::with_max_entries(RISKY_WORDS, 0);

#[map]
static PROC_BUDGET: LruHashMap<u32, Budget> = LruHashMap::with_max_entries(16384, 0);

#[map]
static USER_BUDGET: LruHashMap<u32, Budget> = LruHashMap::with_max_entries(4096, 0);

/// Folds being counted (8 KiB each, preallocated: 4 MiB); an entry whose key is all zero
/// is free. The agent deletes a fold once its process is gone and its last counts are
/// reported: out of `FOLD_INDEX` first, then the entry zeroed, then its index freed.
#[map]
static FOLDS: Array<Fold> = Array::with_max_entries(FOLD_ENTRIES, 0);

/// Where each fold is in `FOLDS`: what the agent lists, and what a start whose process's
/// hint is stale (or a socket whose entry was given to another fold) looks up.
#[map]
static FOLD_INDEX: HashMap<FoldKey, u32> = HashMap::with_max_entries(FOLD_ENTRIES, 0);

/// `FOLDS` indices not in use (the agent pushes them all at start).
#[map]
static FREE_FOLDS: Queue<u32> = Queue::with_max_entries(FOLD_ENTRIES, 0);

/// A folded socket's fold: its key, and where its entry was when the start was folded.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FoldRef {
    key: FoldKey,
    index: u32,
    _pad: u32,
}

/// Sockets whose start was folded, so their end is folded into the same fold: those
/// named by address ([`FoldTag::Addr`]), and those named by cookie whose `FOLDED_FAST`
/// slot was taken. A plain hash (an LRU insert cost more per folded start); when it is
/// full, starts are sent one by one instead of folded (counted in FOLD_FULL). Cookies
/// (a counter) and kernel addresses never take the same value.
#[map]
static FOLDED_SOCKS: HashMap<u64, FoldRef> = HashMap::with_max_entries(65536, 0);

/// Slots in `FOLDED_FAST` (a power of two): 512 KiB.
const FAST_SLOTS: u32 = 16384;

/// Where a socket named by cookie is remembered first: the slot `cookie % FAST_SLOTS`,
/// claimed with a compare-and-swap. A hash insert and delete (bucket lock, free list)
/// per folded socket was the largest single cost of a folded start and end (perf, tcp
/// churn: a quarter of the programs' time); a slot is an inlined array lookup and two
/// atomics. Cookies are handed out in sequence (in per-CPU batches), so consecutive
/// sockets take consecutive slots and only a socket still open 16,384 cookies later can
/// find its slot taken; it goes to `FOLDED_SOCKS`.
#[map]
static FOLDED_FAST: Array<FoldedSlot> = Array::with_max_entries(FAST_SLOTS, 0);

/// `cookie`: 0 free, else the socket's cookie. Only the socket's own end reads `fold`,
/// and it cannot run before the start that claimed the slot has returned (the bind or
/// listen holds a reference to the socket's file), so the fold is written after the claim.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FoldedSlot {
    cookie: u64,
    fold: FoldRef,
}

/// How many cookie-named sockets `FOLDED_SOCKS` holds: while none, an end named by
/// cookie that is not in its slot is known not folded without a hash lookup (every end
/// of a sent start asks).
#[map]
static FOLDED_SPILLED: Array<u64> = Array::with_max_entries(1, 0);

/// How the folded-socket tables know a socket.
#[derive(Clone, Copy)]
pub enum FoldTag {
    /// By its cookie (`bpf_get_socket_cookie()`): the cgroup and sock_ops programs,
    /// which can hash it (the verifier forbids arithmetic on their socket pointers).
    Cookie(u64),
    /// By its address: programs without the cookie helper for their socket
    /// (tracepoints, fentry/fexit, kprobes); `FOLDED_SOCKS` only.
    Addr(u64),
}

#[inline(always)]
fn fast_slot(cookie: u64) -> Option<*mut FoldedSlot> {
    // 0: no cookie (the helper gives every socket one, from 1 up).
    if cookie == 0 {
        return None;
    }
    FOLDED_FAST.get_ptr_mut(cookie as u32 & (FAST_SLOTS - 1))
}

#[inline(always)]
fn spilled(delta: i64) {
    if let Some(n) = FOLDED_SPILLED.get_ptr_mut(0) {
        add(n, delta as u64);
    }
}

/// Remember the socket as folded into `fold`; false when there is no room.
#[inline(always)]
fn remember_folded(tag: FoldTag, fold: FoldRef) -> bool {
    match tag {
        FoldTag::Cookie(c) => {
            if let Some(slot) = fast_slot(c) {
                let p = unsafe { &raw mut (*slot).cookie };
                if cas(p, 0, c) {
                    unsafe { (*slot).fold = fold };
                    return true;
                }
            }
            // Counted before the insert, so an end that can find the entry sees it.
            spilled(1);
            if FOLDED_SOCKS.insert(c, fold, 0).is_err() {
                spilled(-1);
                return false;
            }
            true
        }
        FoldTag::Addr(a) => FOLDED_SOCKS.insert(a, fold, 0).is_ok(),
    }
}

/// Forget the socket if its start was folded: its fold if so.
#[inline(always)]
fn forget_folded(tag: FoldTag) -> Option<FoldRef> {
    match tag {
        FoldTag::Cookie(c) => {
            if let Some(slot) = fast_slot(c) {
                let p = unsafe { &raw mut (*slot).cookie };
                if unsafe { read_volatile(p) } == c {
                    let fold = unsafe { read_volatile(&raw const (*slot).fold) };
                    // The fold is read before the slot is given back (a full barrier).
                    xchg(p, 0);
                    return Some(fold);
                }
            }
            if !any_spilled() {
                return None;
            }
            let (fold, removed) = take_folded(c)?;
            if removed {
                spilled(-1);
            }
            Some(fold)
        }
        FoldTag::Addr(a) => take_folded(a).map(|(fold, _)| fold),
    }
}

/// `FOLDED_SOCKS`' entry for `k`, removed: its fold if there was one, and whether this
/// call removed it.
#[inline(always)]
fn take_folded(k: u64) -> Option<(FoldRef, bool)> {
    let fold = (unsafe { FOLDED_SOCKS.get(k) }).copied()?;
    Some((fold, FOLDED_SOCKS.remove(k).is_ok()))
}

#[inline(always)]
fn any_spilled() -> bool {
    FOLDED_SPILLED
        .get_ptr(0)
        .is_some_and(|n| unsafe { read_volatile(n) } != 0)
}

/// Starts per second one process may send one by one; 0 = never fold.
#[unsafe(no_mangle)]
static FOLD_ABOVE: Global<u32> = Global::new(0);

/// Starts per second all processes of one user may send one by one (0 = no user budget).
#[unsafe(no_mangle)]
static FOLD_USER_ABOVE: Global<u32> = Global::new(0);

const SECOND_NS: u64 = 1_000_000_000;

/// The address as four words (network byte order kept), read without loops: the
/// verifier must see every access bounded.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn is_loopback(family: u16, addr: &[u8; 16]) -> bool {
    if family == AF_INET {
        return addr[0] == 127;
    }
    // ::1, or ::ffff:127.x.x.x (a v4-mapped loopback).
    let w = words(addr);
    w[0] == 0
        && w[1] == 0
        && ((w[2] == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1]))
            || (w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && addr[12] == 127))
}

#[inline(always)]
fn is_wildcard(family: u16, addr: &[u8; 16]) -> bool {
    let w = words(addr);
    if family == AF_INET {
        return w[0] == 0;
    }
    w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0
}

#[inline(always)]
fn risky_port(port: u16) -> bool {
    RISKY_PORTS
        .get((port >> 6) as u32)
        .is_some_and(|w| w & (1u64 << (port & 63)) != 0)
}

/// Whether a record must not share fate with bulk churn. Callers decide it before they
/// build the record: the record's flags take many values (one per combination of fields
/// read), and a branch after them multiplies the paths the verifier walks (6.1's gave
/// up at a million instructions).
#[inline(always)]
pub fn important(port: u16, family: u16, addr: &[u8; 16]) -> bool {
    risky_port(port) || !is_loopback(family, addr)
}

/// Put a record in its lane (`urgent`: see [`important`]), counting it when there is no
/// room. Returns whether it was delivered.
#[inline(always)]
fn send(rec: &mut SocketRecord, urgent: bool) -> bool {
    if urgent {
        rec.flags |= FLAG_URGENT;
        let Some(mut entry) = URGENT.reserve::<SocketRecord>(0) else {
            count(stat::URGENT_FULL);
            return false;
        };
        entry.write(*rec);
        // Default wake-up: important records are few (budgets) and wanted at once.
        entry.submit(0);
        true
    } else {
        submit(rec)
    }
}

/// `*p += n` atomically. The result is unused, so this is BPF_ADD without fetch, which
/// every kernel with ring buffers has.
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: `p` points into a map value, valid for the program's run.
    #[cfg(target_arch = "bpf")]
    unsafe {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
    }
    // Host builds (clippy) only type-check this crate.
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *p += n
    };
}

/// `*p = new` if it was `old`, atomically (BPF_CMPXCHG, kernel >= 5.12); whether it was.
#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: as `add`.
    #[cfg(target_arch = "bpf")]
    unsafe {
        use core::intrinsics::{AtomicOrdering, atomic_cxchg};
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        let was = *p == old;
        if was {
            *p = new;
        }
        was
    }
}

/// `*p = v` atomically with a full barrier (BPF_XCHG, kernel >= 5.12).
#[inline(always)]
fn xchg(p: *mut u64, v: u64) {
    // SAFETY: as `add`.
    #[cfg(target_arch = "bpf")]
    unsafe {
        use core::intrinsics::{AtomicOrdering, atomic_xchg};
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(p, v);
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *p = v
    };
}

/// `*p |= bits` atomically: BPF_OR without fetch (kernel >= 5.12).
#[inline(always)]
fn or(p: *mut u64, bits: u64) {
    // SAFETY: as `add`.
    #[cfg(target_arch = "bpf")]
    unsafe {
        use core::intrinsics::{AtomicOrdering, atomic_or};
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bits);
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *p |= bits
    };
}

/// Count one start against a budget; true when the budget for this second is spent.
/// The window fields are updated without atomics: two CPUs racing may miscount a start
/// or two in the budget (never in the totals, which are atomic).
#[inline(always)]
fn spend(b: *mut Budget, now: u64, limit: u32) -> bool {
    unsafe {
        // Saturating: a start timed by the coarse clock (a tick behind) may follow one
        // timed by the fine clock; it belongs to the same window, not a new one.
        if now.saturating_sub((*b).window_ns) >= SECOND_NS {
            (*b).window_ns = now;
            (*b).in_window = 0;
        }
        (*b).in_window += 1;
        (*b).in_window > limit as u64
    }
}

/// The process's budget entry, (re)made for this process when missing or left by an
/// earlier owner of the same tgid.
#[inline(always)]
fn proc_budget(tgid: u32, start: u64, now: u64) -> Option<*mut Budget> {
    if let Some(b) = PROC_BUDGET.get_ptr_mut(tgid)
        && unsafe { (*b).start_boottime_ns } == start
    {
        return Some(b);
    }
    insert_budget(&PROC_BUDGET, tgid, start, now)
}

/// Room for a budget being inserted, one per CPU: built on the stack, each of the two
/// inserts took 48 bytes of it (and a call to `memset`) in every program, and 6.1's
/// verifier allows a program and its calls 512 bytes together.
#[map]
static NEW_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

/// Insert a fresh budget for `key` in `map` (window opening `now`; `start`: the
/// process's start time, 0 for a user) and return its entry.
#[inline(always)]
fn insert_budget(
    map: &LruHashMap<u32, Budget>,
    key: u32,
    start: u64,
    now: u64,
) -> Option<*mut Budget> {
    let n = NEW_BUDGET.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value, ours for the program's run; field by field, so
    // nothing is built on the stack.
    unsafe {
        (*n).start_boottime_ns = start;
        (*n).window_ns = now;
        (*n).in_window = 0;
        (*n).sent = 0;
        (*n).lost = 0;
        (*n).fold_hint = 0;
        (*n)._pad = 0;
    }
    // By reference: a value would be copied back onto the stack.
    let fresh: &Budget = unsafe { &*n };
    let _ = map.insert(key, fresh, 0);
    map.get_ptr_mut(key)
}

/// What deciding about a start needs: known before any kernel struct is read, but for
/// the task's start time (two reads), so a folded start costs no attribution reads.
/// (The user is asked for only when the user budget is (see [`decide`]).)
#[derive(Clone, Copy)]
pub struct Start {
    pub pid_tgid: u64,
    pub start_boottime_ns: u64,
    /// `CLOCK_MONOTONIC`, fine or coarse (one tick behind at most): budget windows and
    /// fold times only.
    pub now: u64,
    pub family: u16,
    pub protocol: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

impl Start {
    #[inline(always)]
    fn of(rec: &SocketRecord) -> Start {
        Start {
            pid_tgid: rec.header.pid_tgid,
            start_boottime_ns: rec.start_boottime_ns,
            now: rec.header.ktime_ns,
            family: rec.family,
            protocol: rec.protocol,
            port: rec.port,
            addr: rec.addr,
        }
    }
}

/// What a new fold records about its process besides the [`Start`]: read only when a
/// fold is created.
pub struct FoldAttr {
    pub uid_gid: u64,
    pub netns_ino: u32,
    pub ppid: u32,
    /// `FLAG_NETNS` / `FLAG_PPID` for the fields read.
    pub flags: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// The budgets' verdict on one start: the process's budget entry (for its totals), why
/// to fold (0: send), and, when this CPU already knew the process to be over its budget
/// (the budget was not looked up), the fold it knew: its index + 1 (0: not known).
pub struct Decision {
    budget: Option<*mut Budget>,
    reason: u32,
    known: u32,
}

/// Per CPU, per slot (`tgid % FOLDING_SLOTS`, so processes that take turns on a CPU do
/// not evict each other): the process whose start this CPU last folded for being over
/// its own budget, the fold that start went into, and when that budget's window ends.
/// Until then every further start of the process is folded whatever its budget says, so
/// the next one on this CPU skips the budget (an LRU hash lookup: a sixth of a folded
/// UDP bind's cost, perf, udp churn) and finds its fold without the budget's hint.
/// Checked by tgid and start time (a reused tgid is another process) and, through the
/// fold's key, by the fold itself.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Folding {
    start_boottime_ns: u64,
    until_ns: u64,
    tgid: u32,
    index: u32,
}

/// Slots per CPU in `FOLDING` (a power of two).
const FOLDING_SLOTS: u32 = 8;

#[map]
static FOLDING: PerCpuArray<Folding> = PerCpuArray::with_max_entries(FOLDING_SLOTS, 0);

/// What this CPU knows of the process being over its budget now, if anything. Read once:
/// another task on this CPU may rewrite it meanwhile (a torn read at worst names a fold
/// whose key then does not match, or misjudges a window by one start, as the budgets'
/// own unlocked counts may).
#[inline(always)]
fn known_folding(tgid: u32, s: &Start) -> u32 {
    let Some(c) = FOLDING.get_ptr(tgid & (FOLDING_SLOTS - 1)) else {
        return 0;
    };
    // Field by field, into registers (a copy of the whole would take stack, of which
    // 6.1's verifier allows 512 bytes for a program and its calls together).
    let (t, start, until, index) = unsafe {
        (
            read_volatile(&raw const (*c).tgid),
            read_volatile(&raw const (*c).start_boottime_ns),
            read_volatile(&raw const (*c).until_ns),
            read_volatile(&raw const (*c).index),
        )
    };
    if t == tgid && start == s.start_boottime_ns && s.now < until {
        index + 1
    } else {
        0
    }
}

/// Charge the start to its process's budget, and to its user's unless the process is
/// already over its own: a process over budget must not spend the budget of the other
/// processes of its user.
#[inline(always)]
pub fn decide(s: &Start, uid_gid: impl FnOnce() -> u64) -> Decision {
    let tgid = (s.pid_tgid >> 32) as u32;
    let limit = FOLD_ABOVE.load();
    // Folding off: nothing to remember, so nothing to look up.
    let known = if limit == 0 {
        0
    } else {
        known_folding(tgid, s)
    };
    if known != 0 {
        return Decision {
            budget: None,
            reason: FOLD_BY_PROCESS,
            known,
        };
    }
    let budget = proc_budget(tgid, s.start_boottime_ns, s.now);
    if limit == 0 {
        return Decision {
            budget,
            reason: 0,
            known: 0,
        };
    }
    if budget.is_some_and(|b| spend(b, s.now, limit)) {
        return Decision {
            budget,
            reason: FOLD_BY_PROCESS,
            known: 0,
        };
    }
    let user_limit = FOLD_USER_ABOVE.load();
    if user_limit == 0 {
        return Decision {
            budget,
            reason: 0,
            known: 0,
        };
    }
    let uid = uid_gid() as u32;
    let ub = match USER_BUDGET.get_ptr_mut(uid) {
        Some(b) => Some(b),
        None => insert_budget(&USER_BUDGET, uid, 0, s.now),
    };
    let reason = if ub.is_some_and(|b| spend(b, s.now, user_limit)) {
        FOLD_BY_USER
    } else {
        0
    };
    Decision {
        budget,
        reason,
        known: 0,
    }
}

/// Fold the start when the decision says so. `attr` reads the rest of the attribution,
/// called only when a new fold is created. False: send it (not over budget, or it could
/// not be folded). A process's folded total is the sum of its folds' starts (the agent
/// adds them up), so a folded start touches no budget.
#[inline(always)]
pub fn try_fold(
    s: &Start,
    d: &mut Decision,
    tag: FoldTag,
    attr: impl FnOnce() -> FoldAttr,
) -> bool {
    if d.reason == 0 {
        return false;
    }
    if let Some(index) = fold(s, d, tag, attr) {
        // Done with the fold first: fewer values live here, so this costs no stack
        // (6.1's verifier allows a program and its calls 512 bytes together).
        remember_folding(s, d, index);
        return true;
    }
    if d.known != 0 {
        // Decided without the budget, and sent after all: the send is counted in the
        // process's totals like any other. (The budget exists: its window is running.
        // A lookup only, not `proc_budget`, whose insert would be inlined a second time
        // into the stack of every program.)
        d.budget = PROC_BUDGET
            .get_ptr_mut((s.pid_tgid >> 32) as u32)
            .filter(|&b| unsafe { (*b).start_boottime_ns } == s.start_boottime_ns);
    }
    false
}

/// What this CPU knows from now on, after a start of the process was folded into the
/// fold at `index`: for its own budget, that it is over it until the window ends; for a
/// fold it did not know (another scope or transport), that this is its fold now.
#[inline(always)]
fn remember_folding(s: &Start, d: &Decision, index: u32) {
    let tgid = (s.pid_tgid >> 32) as u32;
    let Some(c) = FOLDING.get_ptr_mut(tgid & (FOLDING_SLOTS - 1)) else {
        return;
    };
    match (d.known, d.budget) {
        (known, _) if known != 0 && known != index + 1 => unsafe { (*c).index = index },
        (0, Some(b)) if d.reason == FOLD_BY_PROCESS => unsafe {
            write_volatile(&raw mut (*c).tgid, tgid);
            write_volatile(&raw mut (*c).start_boottime_ns, s.start_boottime_ns);
            write_volatile(
                &raw mut (*c).until_ns,
                (*b).window_ns.saturating_add(SECOND_NS),
            );
            write_volatile(&raw mut (*c).index, index);
        },
        _ => {}
    }
}

/// Send a start the budgets let through, counting it in its process's totals.
#[inline(always)]
pub fn send_start(rec: &mut SocketRecord, d: &Decision, urgent: bool) {
    let sent = send(rec, urgent);
    if let Some(b) = d.budget {
        if sent {
            add(unsafe { &raw mut (*b).sent }, 1);
        } else {
            add(unsafe { &raw mut (*b).lost }, 1);
        }
    }
}

/// A start (listen or bind) the kernel is about to report with its whole record: send
/// it, or fold it when its process or user is over budget. `tag` names the socket, so
/// the end of a folded start is folded too. A record marked
/// FLAG_CHARGED was already charged (and not folded) when its listen began: it is sent.
/// Returns true when the start was folded.
#[inline(always)]
pub fn deliver_start(rec: &mut SocketRecord, tag: FoldTag) -> bool {
    let s = Start::of(rec);
    let urgent = important(s.port, s.family, &s.addr);
    if rec.flags & FLAG_CHARGED != 0 {
        rec.flags &= !FLAG_CHARGED;
        let tgid = (s.pid_tgid >> 32) as u32;
        let d = Decision {
            budget: proc_budget(tgid, s.start_boottime_ns, s.now),
            reason: 0,
            known: 0,
        };
        send_start(rec, &d, urgent);
        return false;
    }
    let mut d = decide(&s, || rec.uid_gid);
    let attr = || FoldAttr {
        uid_gid: rec.uid_gid,
        netns_ino: rec.netns_ino,
        ppid: rec.ppid,
        flags: rec.flags,
        cgroup_id: rec.cgroup_id,
        comm: rec.comm,
    };
    if try_fold(&s, &mut d, tag, attr) {
        return true;
    }
    send_start(rec, &d, urgent);
    false
}

/// An end (close or release) of a start that was sent: same lane rule (`urgent`, decided
/// by the caller before building the record).
#[inline(always)]
pub fn deliver_end(rec: &mut SocketRecord, urgent: bool) {
    send(rec, urgent);
}

/// Whether the socket's start was folded (and its end not yet seen).
#[inline(always)]
pub fn is_folded(tag: FoldTag) -> bool {
    match tag {
        FoldTag::Cookie(c) => {
            fast_slot(c)
                .is_some_and(|slot| unsafe { read_volatile(&raw const (*slot).cookie) } == c)
                || (any_spilled() && unsafe { FOLDED_SOCKS.get(c) }.is_some())
        }
        FoldTag::Addr(a) => unsafe { FOLDED_SOCKS.get(a) }.is_some(),
    }
}

/// Whether the socket's start was folded; if so its end is counted into the same fold
/// and must not be sent.
#[inline(always)]
#[must_use = "a folded end must not be sent"]
pub fn end_folded(tag: FoldTag) -> bool {
    let Some(r) = forget_folded(tag) else {
        return false;
    };
    // A fold keeps its entry for its whole life, so an entry that no longer holds the
    // key means the fold was deleted (out of `FOLD_INDEX` before its entry was zeroed):
    // there is nothing to count into.
    match entry_at(r.index, &r.key) {
        Some(f) => add(unsafe { &raw mut (*f).ended }, 1),
        None => count(stat::FOLD_END_ORPHAN),
    }
    true
}

/// Whether two keys are equal, word by word.
#[inline(always)]
fn same_key(a: &FoldKey, b: &FoldKey) -> bool {
    let (a, b) = (a.words(), b.words());
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2]
}

/// The `FOLDS` entry at `index` if it holds `key`'s fold.
#[inline(always)]
fn entry_at(index: u32, key: &FoldKey) -> Option<*mut Fold> {
    let f = FOLDS.get_ptr_mut(index)?;
    let held = unsafe { read_volatile(&raw const (*f).key) };
    same_key(&held, key).then_some(f)
}

/// `key`'s fold, found through `FOLD_INDEX`: its entry and index.
#[inline(always)]
fn indexed(key: &FoldKey) -> Option<(*mut Fold, u32)> {
    let index = *unsafe { FOLD_INDEX.get(key) }?;
    entry_at(index, key).map(|f| (f, index))
}

/// A new fold for `key`: a free entry, filled in (`attr`), then published in
/// `FOLD_INDEX`. Another CPU may publish the same key first: the entry is given back
/// and theirs is used.
#[inline(always)]
fn new_fold(
    key: &FoldKey,
    now: u64,
    addr: &[u8; 16],
    attr: impl FnOnce() -> FoldAttr,
) -> Option<(*mut Fold, u32)> {
    let index = FREE_FOLDS.pop().ok().flatten()?;
    let f = FOLDS.get_ptr_mut(index)?;
    let a = attr();
    unsafe {
        (*f).first_ns = now;
        (*f).uid_gid = a.uid_gid;
        (*f).cgroup_id = a.cgroup_id;
        (*f).netns_ino = a.netns_ino;
        (*f).ppid = a.ppid;
        (*f).flags = a.flags;
        (*f).addr = *addr;
        (*f).comm = a.comm;
        (*f).key = *key;
    }
    if FOLD_INDEX.insert(key, index, BPF_NOEXIST as u64).is_ok() {
        return Some((f, index));
    }
    unsafe { (*f).key = FoldKey::default() };
    if FREE_FOLDS.push(index, 0).is_err() {
        // Cannot happen (the index just came out of it); counted if it does, as an
        // entry lost to folding.
        count(stat::FOLD_FULL);
    }
    indexed(key)
}

/// Count a start into its fold: the fold's index. None when it cannot be folded (the
/// fold map is full): the caller then sends it, so nothing is lost.
#[inline(always)]
fn fold(s: &Start, d: &Decision, tag: FoldTag, attr: impl FnOnce() -> FoldAttr) -> Option<u32> {
    let (budget, reason) = (d.budget, d.reason);
    let scope = if is_loopback(s.family, &s.addr) {
        SCOPE_LOOPBACK
    } else if is_wildcard(s.family, &s.addr) {
        SCOPE_WILDCARD
    } else {
        SCOPE_ADDRESS
    };
    let key = FoldKey {
        tgid: (s.pid_tgid >> 32) as u32,
        protocol: s.protocol,
        family: s.family,
        scope,
        _pad: 0,
        _pad2: 0,
        start_boottime_ns: s.start_boottime_ns,
    };
    // The process's latest fold first (checked against the entry's key): the one this
    // CPU knows, else its budget's hint.
    let hint = match (d.known, budget) {
        (0, Some(b)) => unsafe { (*b).fold_hint },
        (known, _) => known,
    };
    let hinted = if hint == 0 {
        None
    } else {
        entry_at(hint - 1, &key).map(|f| (f, hint - 1))
    };
    let Some((f, index)) = hinted
        .or_else(|| indexed(&key))
        .or_else(|| new_fold(&key, s.now, &s.addr, attr))
    else {
        count(stat::FOLD_FULL);
        return None;
    };
    if let Some(b) = budget
        && unsafe { (*b).fold_hint } != index + 1
    {
        unsafe { (*b).fold_hint = index + 1 };
    }
    // Remembered first: a start whose end could not be folded too is sent instead.
    let r = FoldRef {
        key,
        index,
        _pad: 0,
    };
    if !remember_folded(tag, r) {
        count(stat::FOLD_FULL);
        return None;
    }
    let word = ((s.port >> 6) as usize) & (FOLD_PORT_WORDS - 1);
    let bit = 1u64 << (s.port & 63);
    unsafe {
        (*f).reason |= reason;
        (*f).last_ns = s.now;
    }
    // Two CPUs folding ports of one process at once must not lose each other's bits. A
    // bit once set stays set, so a set one needs no locked write (a flood reuses its
    // ports).
    let ports = unsafe { &raw mut (*f).ports[word] };
    if unsafe { read_volatile(ports) } & bit == 0 {
        or(ports, bit);
    }
    add(unsafe { &raw mut (*f).started }, 1);
    Some(index)
}

/// Ring buffer size in bytes; the agent may override it at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Set to 1 by the agent just before it blocks waiting for the ring, 0 once awake.
/// Records are submitted without a wake-up (on this VM each wake-up is an interrupt and
/// cost ~5 µs in the listening process); only when the agent sleeps is it woken.
#[map]
pub(crate) static AGENT_SLEEPING: Array<u32> = Array::with_max_entries(1, 0);

/// Counters indexed by `portwatch_common::stat`.
#[map]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Put a record in the bulk ring, counting it when there is no room. Returns whether it
/// was delivered.
#[inline(always)]
pub(crate) fn submit(rec: &SocketRecord) -> bool {
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

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}
