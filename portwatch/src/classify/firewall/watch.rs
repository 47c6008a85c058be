//! Learns when a namespace's ruleset changes, and re-reads it.
//!
//! nf_tables announces every committed change to the `NFNLGRP_NFTABLES` multicast group
//! of a `NETLINK_NETFILTER` socket (include/uapi/linux/netfilter/nfnetlink.h); the socket
//! belongs to the namespace it was created in, so one is made per watched namespace, in
//! a thread that joined it. The messages themselves are not parsed: any message (or an
//! overflow, `ENOBUFS`) means "read the ruleset again". iptables-legacy announces
//! nothing, so the digest of its tables is taken every [`LEGACY_POLL`] (no tool runs in
//! a namespace without legacy tables) and the ruleset is read again when it moves.
//!
//! The same thread follows the namespace's addresses and routes (rtnetlink groups
//! `RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`, `RTMGRP_IPV4_ROUTE`, `RTMGRP_IPV6_ROUTE`,
//! include/uapi/linux/rtnetlink.h): a new public address changes which packets reach a
//! listener, and which host ports a NAT rule publishes. And every [`LEGACY_POLL`] it
//! lists the named namespaces ([`read::named_netns`]) and follows those too: the
//! namespace that publishes a container's port often has no listener of its own.
//!
//! One thread does all of it, off the event loop; the loop gets whole new rulesets,
//! with the namespace's addresses.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::model::Ruleset;
use super::read::{self, legacy_digest};

/// `NFNLGRP_NFTABLES` (include/uapi/linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// `RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE`.
const RTMGRP_ADDRS_ROUTES: u32 = 0x10 | 0x40 | 0x100 | 0x400;
/// How often legacy iptables tables are checked.
pub const LEGACY_POLL: Duration = Duration::from_secs(3);
/// Quiet time after a notification before re-reading (one `nft -f` is many messages).
const SETTLE: Duration = Duration::from_millis(100);

/// Asks the watcher thread to do something.
pub enum Request {
    /// Watch this namespace (`ns`: an open `/proc/PID/ns/net`, `None` for the agent's own).
    Watch { netns: u64, ns: Option<OwnedFd> },
    /// Stop watching every namespace not in the set (no listener left there): the
    /// socket and handle would keep a dead namespace alive.
    Retain(HashSet<u64>),
}

/// A namespace's ruleset and addresses, read again after a change.
pub struct Update {
    pub netns: u64,
    pub ruleset: Arc<Ruleset>,
    pub ifaces: Option<Arc<Vec<super::IfAddr>>>,
    /// A named namespace that is gone: forget what it published.
    pub gone: bool,
}

/// A `NETLINK_NETFILTER` socket subscribed to nf_tables changes, in the namespace of
/// `ns` (or the calling thread's).
pub fn subscribe(ns: Option<&OwnedFd>) -> std::io::Result<OwnedFd> {
    subscribe_to(ns, libc::NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))
}

/// A `NETLINK_ROUTE` socket subscribed to address and route changes in `ns`.
pub fn subscribe_routes(ns: Option<&OwnedFd>) -> std::io::Result<OwnedFd> {
    subscribe_to(ns, libc::NETLINK_ROUTE, RTMGRP_ADDRS_ROUTES)
}

fn subscribe_to(ns: Option<&OwnedFd>, proto: libc::c_int, groups: u32) -> std::io::Result<OwnedFd> {
    let ns = ns.map(OwnedFd::try_clone).transpose()?;
    let t = std::thread::Builder::new().name("pw-fw-sub".into()).spawn(
        move || -> std::io::Result<OwnedFd> {
            if let Some(fd) = ns {
                // SAFETY: setns on an owned fd; this thread ends right after.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    proto,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            sa.nl_groups = groups;
            // SAFETY: bind with a correctly sized sockaddr_nl.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fd)
        },
    )?;
    t.join()
        .map_err(|_| std::io::Error::other("subscribe thread panicked"))?
}

/// Reads everything pending; true if anything (or an overflow) came.
pub fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 8192];
    let mut any = false;
    loop {
        // SAFETY: recv into a buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            any = true;
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            any = true; // messages were lost: something changed
            continue;
        }
        return any;
    }
}

struct Watched {
    ns: Option<OwnedFd>,
    sock: Option<OwnedFd>,
    /// Address and route changes.
    route: Option<OwnedFd>,
    /// Found in the named namespaces' directory (kept while it is there, listener or
    /// not).
    named: bool,
    /// A change was announced at this time and not yet read.
    dirty_since: Option<Instant>,
    legacy_digest: u64,
    legacy_checked: Instant,
}

/// Starts the watcher thread: requests in, updates out through `send` (which returns
/// false when the receiver is gone, ending the thread).
pub fn spawn(send: impl Fn(Update) -> bool + Send + 'static) -> std::io::Result<Sender<Request>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pw-firewall".into())
        .spawn(move || watch_loop(rx, send))?;
    Ok(tx)
}

fn reread(netns: u64, w: &mut Watched, send: &impl Fn(Update) -> bool) -> bool {
    let r = read::read(w.ns.as_ref());
    w.legacy_digest = r.legacy_digest;
    w.legacy_checked = Instant::now();
    w.dirty_since = None;
    send(Update {
        netns,
        ruleset: Arc::new(r.ruleset),
        ifaces: r.ifaces.map(Arc::new),
        gone: false,
    })
}

/// Starts following a namespace: subscriptions, then a first read.
fn start(
    netns: u64,
    ns: Option<OwnedFd>,
    named: bool,
    send: &impl Fn(Update) -> bool,
) -> Option<Watched> {
    let sock = match subscribe(ns.as_ref()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!(
                "firewall: cannot follow ruleset changes in netns {netns} ({e}); \
                 re-reading it every {LEGACY_POLL:?}"
            );
            None
        }
    };
    let route = subscribe_routes(ns.as_ref())
        .map_err(|e| log::warn!("firewall: cannot follow address changes in netns {netns} ({e})"))
        .ok();
    let mut w = Watched {
        ns,
        sock,
        route,
        named,
        dirty_since: None,
        legacy_digest: 0,
        legacy_checked: Instant::now(),
    };
    // Read once more now that changes are followed: one made between the first read
    // and the subscription is not missed.
    reread(netns, &mut w, send).then_some(w)
}

fn watch_loop(rx: Receiver<Request>, send: impl Fn(Update) -> bool) {
    let mut watched: HashMap<u64, Watched> = HashMap::new();
    // Listed at once on the first turn.
    let mut last_named: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Request::Watch { netns, ns }) => {
                    if watched.contains_key(&netns) {
                        continue;
                    }
                    match start(netns, ns, false, &send) {
                        Some(w) => {
                            watched.insert(netns, w);
                        }
                        None => return,
                    }
                }
                Ok(Request::Retain(keep)) => watched.retain(|n, w| w.named || keep.contains(n)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if last_named.is_none_or(|t| t.elapsed() >= LEGACY_POLL) {
            last_named = Some(Instant::now());
            let named = read::named_netns();
            for (netns, path) in &named {
                if watched.contains_key(netns) {
                    if let Some(w) = watched.get_mut(netns) {
                        w.named = true;
                    }
                    continue;
                }
                let Ok(f) = std::fs::File::open(path) else {
                    continue;
                };
                match start(*netns, Some(f.into()), true, &send) {
                    Some(w) => {
                        watched.insert(*netns, w);
                    }
                    None => return,
                }
            }
            let gone: Vec<u64> = watched
                .iter()
                .filter(|(n, w)| w.named && !named.iter().any(|(m, _)| m == *n))
                .map(|(n, _)| *n)
                .collect();
            for n in gone {
                watched.remove(&n);
                let bye = Update {
                    netns: n,
                    ruleset: Arc::new(Ruleset::default()),
                    ifaces: None,
                    gone: true,
                };
                if !send(bye) {
                    return;
                }
            }
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owners: Vec<u64> = Vec::new();
        for (n, w) in &watched {
            for s in [&w.sock, &w.route].into_iter().flatten() {
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                owners.push(*n);
            }
        }
        // Short waits: requests arrive on a channel poll(2) cannot see.
        // SAFETY: poll over a valid array of pollfds of the given length.
        let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        let now = Instant::now();
        for (pfd, n) in fds.iter().zip(&owners) {
            if pfd.revents != 0
                && let Some(w) = watched.get_mut(n)
            {
                let fd = pfd.fd;
                let sock = [&w.sock, &w.route]
                    .into_iter()
                    .flatten()
                    .find(|s| s.as_raw_fd() == fd);
                if sock.is_some_and(drain) {
                    w.dirty_since = Some(now);
                }
            }
        }
        for (n, w) in watched.iter_mut() {
            if w.dirty_since.is_some_and(|t| t.elapsed() >= SETTLE) {
                if !reread(*n, w, &send) {
                    return;
                }
            } else if w.legacy_checked.elapsed() >= LEGACY_POLL {
                w.legacy_checked = Instant::now();
                // No subscription: read it all again. Otherwise only the legacy tables'
                // digest, and the whole ruleset when it moved.
                let moved = w.sock.is_none()
                    || legacy_digest(w.ns.as_ref()).is_some_and(|d| d != w.legacy_digest);
                if moved && !reread(*n, w, &send) {
                    return;
                }
            }
        }
    }
}
