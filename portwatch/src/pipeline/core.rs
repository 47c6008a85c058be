//! The sensor's bookkeeping, with no I/O: which sockets are open, how the /proc scan and
//! the live stream are merged without a gap or a duplicate, when a resync is due, and
//! what was lost. Records and scan findings go in; decisions come out ([`Step`],
//! [`Merge`], [`Loss`]), and the driver ([`super::agent`]) turns them into events.
//!
//! Everything the kernel tests exercise about merging, deduplication and resync can be
//! driven here from synthetic records, and so can the races a kernel test cannot time:
//! an end that reaches the agent before its start, a scan that saw a socket the stream
//! has just closed, a pid reused while the scan runs.
//!
//! Keys are sockets, never pids: a socket's inode when the kernel could read it (the
//! same number /proc shows), else its kernel address.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use portwatch_common::Kind;

use crate::{attribution::scan::Found, kernel::probes::KernelStats, kernel::ring::Record};

/// Open listeners tracked to pair a start with its end. Beyond this many, new starts are
/// not tracked (their end carries no duration) and the shortfall is reported as
/// `events-lost` with reason `untracked`.
pub const OPEN_MAX: usize = 65_536;
/// How long after the snapshot a live start for a socket it already reported is taken
/// as a duplicate. Records reach the agent within milliseconds of the syscall.
pub const SNAPSHOT_GRACE: Duration = Duration::from_secs(5);
/// Ends whose start was never seen, remembered (by key and kernel time) so that a start
/// arriving after its own end is reported as already ended instead of being tracked as
/// open forever. Two threads racing listen() and close() on one socket can commit their
/// records to the ring in either order.
const ENDED_MAX: usize = 4096;
/// How long such an end is remembered, in kernel time.
const ENDED_FOR_NS: u64 = 5_000_000_000;
/// Own records kept for the self-check.
const OWN_SEEN_MAX: usize = 64;

/// What the driver keeps about an open listener, besides what the core needs.
#[derive(Debug, Clone)]
pub struct Tracked<T> {
    /// Kernel time of the start; None when the scan found it (started before the agent).
    pub ktime_ns: Option<u64>,
    /// The network namespace it is in (to know whether a resync scan covered it).
    pub netns: Option<u64>,
    /// Keyed by socket inode (comparable with /proc), not by kernel address.
    pub by_inode: bool,
    /// The driver's part: owner, addresses, verdicts.
    pub held: T,
}

/// What to do with one record.
#[derive(Debug)]
pub enum Step<T> {
    /// The agent's own socket (self-check, sinks, metrics): noted, never reported.
    Own,
    /// Already reported: by the scan, or an unconnected send from a socket already known.
    Duplicate,
    /// The release of a socket never seen bound: a client socket, not a listener.
    NotListener,
    /// Report this start, then hand it to [`Core::track`]. `ended_ns` is set when its end
    /// came first (kernel time of the end): report it, but do not track it.
    Start { key: u64, ended_ns: Option<u64> },
    /// Report this end. `tracked` is what its start left; None when it started before
    /// the agent (or was not tracked). `duration_ns` is from the start's kernel time.
    End {
        tracked: Option<Tracked<T>>,
        duration_ns: Option<u64>,
    },
}

/// What a merged scan asks the driver to report.
#[derive(Debug)]
pub struct Merge<T> {
    /// Indices into the scan's findings to report as present (then [`Core::track`]).
    pub report: Vec<usize>,
    /// Resync only: open listeners the scan no longer finds; their end was lost.
    pub gone: Vec<(u64, Tracked<T>)>,
    /// Findings left out: the agent's own, or reported by the live stream already.
    pub skipped: u64,
}

/// Events lost, by reason (and lane, for the kernel rings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    pub count: u64,
    pub reason: &'static str,
    pub lane: Option<&'static str>,
}

/// Snapshot merge state: what the live stream reported while a /proc scan ran, and what
/// the scan reported (so a late live record for it is not a duplicate). Used at start and
/// by the resync after a loss.
#[derive(Debug, Default)]
struct Scan {
    live_started: HashSet<u64>,
    live_stopped: HashSet<u64>,
    reported: HashSet<u64>,
    running: bool,
    /// The running scan is a resync, not the start-up snapshot.
    resync: bool,
    grace_until: Option<Instant>,
}

/// The agent's own sockets are never reported. /proc names the agent `proc_pid`; the
/// kernel names it by its pid in the initial pid namespace, `kernel_pid`: the same on a
/// host, different inside a container, where it is learned from the self-check's
/// sockets (matched by inode).
#[derive(Debug)]
struct Own {
    proc_pid: u32,
    kernel_pid: Option<u32>,
    probe_inodes: Vec<u64>,
    seen: Vec<(Kind, u64)>,
}

#[derive(Debug, Default)]
struct Losses {
    kernel_seen: KernelStats,
    decode_errors: u64,
    untracked: u64,
    total: u64,
    /// A loss made the open-listener table doubtful: re-read /proc.
    resync_wanted: bool,
}

#[derive(Debug)]
pub struct Core<T> {
    open: HashMap<u64, Tracked<T>>,
    scan: Scan,
    own: Own,
    losses: Losses,
    /// Ends of sockets not in the table: key -> kernel time of the end.
    ended: HashMap<u64, u64>,
    /// Latest kernel time seen, to expire `ended`.
    latest_ns: u64,
    resyncs: u64,
}

impl<T> Core<T> {
    /// `proc_pid`: the agent's pid as /proc shows it; `kernel_pid`: as the kernel's
    /// records show it, when known (the same when the agent runs in the initial pid
    /// namespace).
    pub fn new(proc_pid: u32, kernel_pid: Option<u32>) -> Core<T> {
        Core {
            open: HashMap::new(),
            scan: Scan::default(),
            own: Own {
                proc_pid,
                kernel_pid,
                probe_inodes: Vec::new(),
                seen: Vec::new(),
            },
            losses: Losses::default(),
            ended: HashMap::new(),
            latest_ns: 0,
            resyncs: 0,
        }
    }

    /// The key of a record's socket.
    pub fn key(r: &Record) -> u64 {
        r.inode.unwrap_or(r.sock_key)
    }

    /// The self-check's sockets, by inode: their records name the agent's kernel pid.
    pub fn expect_own(&mut self, inodes: &[u64]) {
        self.own.probe_inodes = inodes.to_vec();
    }

    /// Whether the start of the agent's own listener (inode `tcp`) and bind (`udp`) came.
    pub fn own_seen(&self, tcp: u64, udp: u64) -> (bool, bool) {
        let seen = |k: Kind, inode: u64| {
            self.own
                .seen
                .iter()
                .any(|&(kind, i)| kind == k && i == inode)
        };
        (seen(Kind::ListenStarted, tcp), seen(Kind::UdpBound, udp))
    }

    /// A record could not be decoded: counted, reported as lost at the next tick.
    pub fn decode_failed(&mut self) {
        self.losses.decode_errors += 1;
    }

    /// Decide what one record means.
    pub fn record(&mut self, r: &Record) -> Step<T> {
        self.latest_ns = self.latest_ns.max(r.ktime_ns);
        let probe = r.inode.is_some_and(|i| self.own.probe_inodes.contains(&i));
        if probe {
            self.own.kernel_pid = Some(r.pid);
        }
        if probe || self.own.kernel_pid == Some(r.pid) {
            if self.own.seen.len() < OWN_SEEN_MAX {
                self.own.seen.push((r.kind, r.inode.unwrap_or(0)));
            }
            return Step::Own;
        }
        let key = Self::key(r);
        match r.kind {
            Kind::ListenStarted | Kind::UdpBound => {
                if self.scan.running {
                    self.scan.live_started.insert(key);
                } else if self.scan.reported.remove(&key) {
                    return Step::Duplicate; // the snapshot already reported this socket
                }
                if r.implicit && self.open.contains_key(&key) {
                    // An unconnected send from a socket already known (the snapshot
                    // found it bound before the agent started).
                    return Step::Duplicate;
                }
                // Its end came first, from a later moment: it is already over.
                let ended_ns = self.ended.remove(&key).filter(|&end| end >= r.ktime_ns);
                Step::Start { key, ended_ns }
            }
            Kind::ListenStopped | Kind::UdpReleased => {
                // A release whose bind the kernel side never saw is reported for the
                // sockets we know (from the snapshot), and while the startup snapshot
                // runs (it may be one the snapshot is about to find); the rest are client
                // sockets bound implicitly by a send.
                let scanning_at_start = self.scan.running && !self.scan.resync;
                if r.untracked && !scanning_at_start && !self.open.contains_key(&key) {
                    return Step::NotListener;
                }
                if self.scan.running {
                    self.scan.live_stopped.insert(key);
                }
                self.scan.reported.remove(&key);
                let tracked = self.open.remove(&key);
                if tracked.is_none() {
                    self.remember_end(key, r.ktime_ns);
                }
                let duration_ns = tracked
                    .as_ref()
                    .and_then(|t| t.ktime_ns)
                    .map(|t| r.ktime_ns.saturating_sub(t));
                Step::End {
                    tracked,
                    duration_ns,
                }
            }
        }
    }

    fn remember_end(&mut self, key: u64, ktime_ns: u64) {
        if self.ended.len() >= ENDED_MAX {
            let horizon = self.latest_ns.saturating_sub(ENDED_FOR_NS);
            self.ended.retain(|_, &mut t| t >= horizon);
            if self.ended.len() >= ENDED_MAX {
                // Still full within the horizon (a flood of ends of unknown sockets):
                // forget the oldest half. Forgetting only means a start that comes after
                // its own end is tracked as open until the next resync.
                let mut times: Vec<u64> = self.ended.values().copied().collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                self.ended.retain(|_, &mut t| t > cut);
            }
        }
        self.ended.insert(key, ktime_ns);
    }

    /// Track a reported start (from [`Step::Start`] or [`Merge::report`]). Beyond
    /// [`OPEN_MAX`] it is not tracked and counted as `untracked`.
    pub fn track(&mut self, key: u64, tracked: Tracked<T>) {
        if self.open.len() < OPEN_MAX || self.open.contains_key(&key) {
            self.open.insert(key, tracked);
        } else {
            self.losses.untracked += 1;
        }
    }

    /// A /proc scan starts: at start-up, or (`resync`) after a loss.
    pub fn scan_started(&mut self, resync: bool) {
        self.scan.running = true;
        self.scan.resync = resync;
    }

    /// Whether a scan is running.
    pub fn scanning(&self) -> bool {
        self.scan.running
    }

    /// Merge a finished scan: each listener the live stream has not already reported
    /// (started or stopped while the scan ran) is to be reported.
    ///
    /// With `resync` (after a loss) the scan is compared with the open-listener table:
    /// listeners it finds that the table lacks are reported, and listeners the table
    /// holds that the scan no longer finds are handed back as `gone` (their end was lost).
    pub fn merge(&mut self, found: &[Found], resync: bool, now: Instant) -> Merge<T> {
        let mut report = Vec::new();
        let mut skipped = 0u64;
        let mut seen = HashSet::new();
        let mut scanned_netns = HashSet::new();
        for (i, f) in found.iter().enumerate() {
            let key = f.socket.inode;
            scanned_netns.insert(f.netns_ino);
            seen.insert(key);
            if f.owners.contains(&self.own.proc_pid)
                || (key != 0
                    && (self.scan.live_started.contains(&key)
                        || self.scan.live_stopped.contains(&key)
                        || (resync && self.open.contains_key(&key))))
            {
                skipped += 1;
                continue;
            }
            if key != 0 {
                self.scan.reported.insert(key);
            }
            report.push(i);
        }
        let mut gone = Vec::new();
        if resync {
            // Open in the table, in a namespace the scan read, started before the scan
            // and not found by it: its end was among the events lost.
            let keys: Vec<u64> = self
                .open
                .iter()
                .filter(|(key, o)| {
                    o.by_inode
                        && o.netns.is_some_and(|n| scanned_netns.contains(&n))
                        && !seen.contains(*key)
                        && !self.scan.live_started.contains(*key)
                })
                .map(|(key, _)| *key)
                .collect();
            for key in keys {
                if let Some(o) = self.open.remove(&key) {
                    gone.push((key, o));
                }
            }
            self.resyncs += 1;
        }
        self.scan.running = false;
        self.scan.live_started.clear();
        self.scan.live_stopped.clear();
        self.scan.grace_until = Some(now + SNAPSHOT_GRACE);
        Merge {
            report,
            gone,
            skipped,
        }
    }

    /// Periodic work: end the snapshot's grace, forget old ends.
    pub fn tick(&mut self, now: Instant) {
        if self.scan.grace_until.is_some_and(|t| now >= t) {
            self.scan.reported.clear();
            self.scan.grace_until = None;
        }
        let horizon = self.latest_ns.saturating_sub(ENDED_FOR_NS);
        self.ended.retain(|_, &mut t| t >= horizon);
    }

    /// Losses the kernel counted since the last call (`stats` are its running totals),
    /// and ours (undecodable records, starts the table could not hold). A kernel loss of
    /// starts or ends makes a resync due.
    pub fn losses(&mut self, stats: Option<KernelStats>) -> Vec<Loss> {
        let mut out = Vec::new();
        let mut push = |count: u64, reason, lane| {
            if count > 0 {
                out.push(Loss {
                    count,
                    reason,
                    lane,
                });
            }
        };
        if let Some(s) = stats {
            let seen = &self.losses.kernel_seen;
            // Totals only grow; a smaller one (maps re-created) counts from zero.
            let d = |now: u64, then: u64| if now >= then { now - then } else { now };
            let ring = d(s.ring_full, seen.ring_full);
            let urgent = d(s.urgent_full, seen.urgent_full);
            let maps = d(s.pending_full, seen.pending_full)
                + d(s.bound_full, seen.bound_full)
                + d(s.calls_full, seen.calls_full);
            // Ends of folded listeners counted after their fold was reported and deleted
            // (the grace of two reports should leave none): not in any report.
            let orphan = d(s.fold_end_orphan, seen.fold_end_orphan);
            // Runs of a hook the kernel skipped (it was already running on that CPU):
            // each may have been a start or an end, of any lane.
            let skipped = d(s.recursion_misses, seen.recursion_misses);
            push(ring, "ring-buffer-full", Some("bulk"));
            push(urgent, "ring-buffer-full", Some("urgent"));
            push(maps, "kernel-map-full", None);
            push(orphan, "folded-end-unreported", None);
            push(skipped, "hook-run-skipped", None);
            // Starts or ends went missing: the open-listener table may be wrong.
            self.losses.resync_wanted |= ring > 0 || urgent > 0 || maps > 0 || skipped > 0;
            self.losses.kernel_seen = s;
        }
        push(
            std::mem::take(&mut self.losses.decode_errors),
            "decode-error",
            None,
        );
        push(
            std::mem::take(&mut self.losses.untracked),
            "untracked",
            None,
        );
        out
    }

    /// Add a reported loss (any reason, the driver's output losses too) to the total;
    /// returns the total since start.
    pub fn count_lost(&mut self, count: u64) -> u64 {
        self.losses.total += count;
        self.losses.total
    }

    pub fn lost_total(&self) -> u64 {
        self.losses.total
    }

    /// Whether a resync is due (a loss since the last one); clears the request.
    pub fn take_resync(&mut self) -> bool {
        std::mem::take(&mut self.losses.resync_wanted)
    }

    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    pub fn open(&self) -> impl Iterator<Item = (&u64, &Tracked<T>)> {
        self.open.iter()
    }

    pub fn open_get(&self, key: u64) -> Option<&Tracked<T>> {
        self.open.get(&key)
    }

    pub fn open_get_mut(&mut self, key: u64) -> Option<&mut Tracked<T>> {
        self.open.get_mut(&key)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::attribution::scan::{self, ProcSocket};
    use crate::kernel::ring::Transport;

    const AGENT: u32 = 4242;
    const NS: u64 = 4026531840;

    fn rec(kind: Kind, inode: u64, ktime_ns: u64, pid: u32) -> Record {
        Record {
            kind,
            ktime_ns,
            pid,
            tid: pid,
            uid: 1000,
            gid: 1000,
            cgroup_id: 1,
            sock_key: 0xffff_0000_0000 + inode,
            inode: Some(inode),
            start_boottime_ns: Some(1),
            netns: Some(NS as u32),
            ppid: Some(1),
            kthread: false,
            v6only: false,
            untracked: false,
            urgent: false,
            udplite: false,
            implicit: false,
            transport: match kind {
                Kind::ListenStarted | Kind::ListenStopped => Transport::Tcp,
                _ => Transport::Udp,
            },
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 11211,
            comm: b"memcached".to_vec(),
        }
    }

    fn listen(inode: u64, t: u64) -> Record {
        rec(Kind::ListenStarted, inode, t, 100)
    }

    fn stop(inode: u64, t: u64) -> Record {
        rec(Kind::ListenStopped, inode, t, 100)
    }

    fn found(inode: u64, netns: u64, owners: &[u32]) -> Found {
        Found {
            netns_ino: netns,
            socket: ProcSocket {
                transport: scan::Protocol::Tcp,
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: 11211,
                uid: 0,
                inode,
                ipv6: false,
            },
            owners: owners.to_vec(),
            owner_hidden: false,
            v6only: None,
        }
    }

    /// Feed a record the way the driver does: track every start it is told to report.
    /// Returns what the core said, with the payload being the record's pid.
    fn feed(core: &mut Core<u32>, r: &Record) -> Step<u32> {
        let step = core.record(r);
        if let Step::Start {
            key,
            ended_ns: None,
        } = step
        {
            core.track(
                key,
                Tracked {
                    ktime_ns: Some(r.ktime_ns),
                    netns: r.netns.map(u64::from),
                    by_inode: r.inode.is_some(),
                    held: r.pid,
                },
            );
        }
        step
    }

    /// Merge the way the driver does: track every finding it reports.
    fn merge(core: &mut Core<u32>, f: &[Found], resync: bool, now: Instant) -> Merge<u32> {
        let m = core.merge(f, resync, now);
        for &i in &m.report {
            let tracked = Tracked {
                ktime_ns: None,
                netns: Some(f[i].netns_ino),
                by_inode: true,
                held: f[i].owners.first().copied().unwrap_or(0),
            };
            core.track(f[i].socket.inode, tracked);
        }
        m
    }

    fn core() -> Core<u32> {
        Core::new(AGENT, Some(AGENT))
    }

    #[test]
    fn a_start_then_its_end_carries_the_start_and_the_duration() {
        let mut c = core();
        assert!(matches!(
            feed(&mut c, &listen(7, 1_000)),
            Step::Start {
                key: 7,
                ended_ns: None
            }
        ));
        assert_eq!(c.open_len(), 1);
        match feed(&mut c, &stop(7, 51_000_000)) {
            Step::End {
                tracked: Some(t),
                duration_ns,
            } => {
                assert_eq!(t.held, 100);
                assert_eq!(duration_ns, Some(50_999_000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.open_len(), 0);
    }

    #[test]
    fn an_end_before_its_start_is_not_left_open_and_no_resync_ends_it_twice() {
        let mut c = core();
        // close() committed its record before listen() did: the end comes first.
        assert!(matches!(
            feed(&mut c, &stop(9, 2_000)),
            Step::End {
                tracked: None,
                duration_ns: None
            }
        ));
        match feed(&mut c, &listen(9, 1_000)) {
            Step::Start { key: 9, ended_ns } => assert_eq!(ended_ns, Some(2_000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.open_len(), 0, "a socket already over is not open");
        // A resync that does not find it has nothing to end.
        c.scan_started(true);
        let m = merge(&mut c, &[], true, Instant::now());
        assert!(m.gone.is_empty());
    }

    #[test]
    fn a_start_after_an_end_of_an_earlier_socket_with_the_same_key_is_open() {
        let mut c = core();
        feed(&mut c, &stop(9, 1_000));
        // Later in kernel time: a new socket that reuses the key.
        assert!(matches!(
            feed(&mut c, &listen(9, 5_000)),
            Step::Start { ended_ns: None, .. }
        ));
        assert_eq!(c.open_len(), 1);
    }

    #[test]
    fn remembered_ends_stay_bounded_under_a_flood_of_unknown_ends() {
        let mut c = core();
        for i in 0..(3 * ENDED_MAX as u64) {
            feed(&mut c, &stop(i, 1_000 + i));
        }
        assert!(c.ended.len() <= ENDED_MAX, "{}", c.ended.len());
        // The newest are the ones kept.
        assert!(c.ended.contains_key(&(3 * ENDED_MAX as u64 - 1)));
        // And they expire with kernel time.
        feed(&mut c, &listen(1 << 40, 1_000 + ENDED_FOR_NS * 3));
        c.tick(Instant::now());
        assert!(c.ended.is_empty());
    }

    #[test]
    fn startup_scan_and_stream_report_each_socket_once() {
        let mut c = core();
        let t0 = Instant::now();
        c.scan_started(false);
        // While the scan runs: a start (the scan also finds it) and a stop (the scan saw
        // the socket before it closed).
        assert!(matches!(feed(&mut c, &listen(1, 10)), Step::Start { .. }));
        assert!(matches!(
            feed(&mut c, &stop(2, 20)),
            Step::End { tracked: None, .. }
        ));
        let f = [
            found(1, NS, &[100]),
            found(2, NS, &[100]),
            found(3, NS, &[100]),
        ];
        let m = merge(&mut c, &f, false, t0);
        assert_eq!(
            m.report,
            vec![2],
            "only the socket the stream did not report"
        );
        assert_eq!(m.skipped, 2);
        // A live start for the scanned socket reaching the agent late is a duplicate,
        // once.
        assert!(matches!(feed(&mut c, &listen(3, 30)), Step::Duplicate));
        assert_eq!(c.open_len(), 2); // 1 (live) and 3 (scan)
        // Its end pairs with what the scan reported.
        match feed(&mut c, &stop(3, 40)) {
            Step::End {
                tracked: Some(t),
                duration_ns: None,
            } => assert_eq!(t.ktime_ns, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_scanned_socket_that_the_stream_closes_after_the_merge_is_ended_once() {
        let mut c = core();
        c.scan_started(false);
        let m = merge(&mut c, &[found(5, NS, &[100])], false, Instant::now());
        assert_eq!(m.report, vec![0]);
        assert!(matches!(
            feed(&mut c, &stop(5, 99)),
            Step::End {
                tracked: Some(_),
                ..
            }
        ));
        // The same end again (it cannot be, but a record must not resurrect it).
        assert!(matches!(
            feed(&mut c, &stop(5, 100)),
            Step::End { tracked: None, .. }
        ));
        assert_eq!(c.open_len(), 0);
    }

    #[test]
    fn the_snapshot_grace_ends_at_the_tick_after_it() {
        let mut c = core();
        let t0 = Instant::now();
        c.scan_started(false);
        merge(&mut c, &[found(6, NS, &[100])], false, t0);
        c.tick(t0 + SNAPSHOT_GRACE + Duration::from_millis(1));
        // After the grace a start for the same key is a new socket (inodes are reused
        // only much later): reported.
        assert!(matches!(feed(&mut c, &listen(6, 10)), Step::Start { .. }));
    }

    #[test]
    fn keys_are_sockets_not_pids_so_a_pid_reused_mid_merge_changes_nothing() {
        let mut c = core();
        // pid 100 listens on socket 11, exits; pid 100 is reused by another program that
        // listens on socket 12 while the resync scan runs.
        feed(&mut c, &listen(11, 10));
        c.scan_started(true);
        feed(&mut c, &stop(11, 20));
        let mut r = listen(12, 30);
        r.comm = b"other".to_vec();
        assert!(matches!(feed(&mut c, &r), Step::Start { key: 12, .. }));
        // The scan saw both (it read /proc before the first one closed).
        let f = [found(11, NS, &[100]), found(12, NS, &[100])];
        let m = merge(&mut c, &f, true, Instant::now());
        assert!(m.report.is_empty(), "{:?}", m.report);
        assert!(m.gone.is_empty());
        assert_eq!(c.open().map(|(k, _)| *k).collect::<Vec<_>>(), vec![12]);
    }

    #[test]
    fn the_agents_own_sockets_are_never_reported() {
        let mut c: Core<u32> = Core::new(AGENT, None);
        c.expect_own(&[900, 901]);
        // Inside a container the kernel pid is unknown until a self-check record names it.
        assert!(matches!(
            c.record(&rec(Kind::ListenStarted, 900, 1, 77_000)),
            Step::Own
        ));
        assert!(matches!(
            c.record(&rec(Kind::UdpBound, 901, 2, 77_000)),
            Step::Own
        ));
        assert_eq!(c.own_seen(900, 901), (true, true));
        // Any later socket of that pid is the agent's too (sinks, metrics).
        assert!(matches!(
            c.record(&rec(Kind::ListenStarted, 950, 3, 77_000)),
            Step::Own
        ));
        // /proc names the agent by its own pid.
        c.scan_started(false);
        let m = c.merge(&[found(960, NS, &[AGENT])], false, Instant::now());
        assert!(m.report.is_empty());
        assert_eq!(m.skipped, 1);
    }

    #[test]
    fn client_releases_are_not_listeners_except_while_the_startup_scan_runs() {
        let mut c = core();
        let mut r = rec(Kind::UdpReleased, 30, 5, 100);
        r.untracked = true;
        assert!(matches!(c.record(&r), Step::NotListener));
        c.scan_started(false);
        assert!(matches!(c.record(&r), Step::End { tracked: None, .. }));
        merge(&mut c, &[], false, Instant::now());
        c.scan_started(true);
        assert!(matches!(c.record(&r), Step::NotListener));
    }

    #[test]
    fn an_implicit_bind_of_a_scanned_socket_is_a_duplicate() {
        let mut c = core();
        c.scan_started(false);
        let mut f = found(40, NS, &[100]);
        f.socket.transport = scan::Protocol::Udp;
        merge(&mut c, &[f], false, Instant::now());
        c.tick(Instant::now() + SNAPSHOT_GRACE * 2);
        let mut r = rec(Kind::UdpBound, 40, 5, 100);
        r.implicit = true;
        assert!(matches!(c.record(&r), Step::Duplicate));
    }

    #[test]
    fn a_resync_ends_what_it_no_longer_finds_in_the_namespaces_it_read() {
        let mut c = core();
        const OTHER: u64 = 99;
        feed(&mut c, &listen(1, 1)); // closed while records were lost
        feed(&mut c, &listen(2, 2)); // still open
        let mut elsewhere = listen(3, 3); // in a namespace the scan did not read
        elsewhere.netns = Some(OTHER as u32);
        feed(&mut c, &elsewhere);
        let mut by_addr = listen(4, 4); // no inode: cannot be compared with /proc
        by_addr.inode = None;
        feed(&mut c, &by_addr);
        c.scan_started(true);
        feed(&mut c, &listen(5, 5)); // started during the scan, after /proc was read
        let f = [found(2, NS, &[100]), found(6, NS, &[100])]; // 6: its start was lost
        let m = merge(&mut c, &f, true, Instant::now());
        assert_eq!(m.report, vec![1]);
        assert_eq!(m.skipped, 1);
        assert_eq!(m.gone.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![1]);
        let mut open: Vec<u64> = c.open().map(|(k, _)| *k).collect();
        open.sort_unstable();
        assert_eq!(open, vec![2, 3, 5, 6, by_addr.sock_key]);
        assert_eq!(c.resyncs(), 1);
    }

    #[test]
    fn kernel_losses_are_reported_by_lane_and_make_a_resync_due() {
        let mut c = core();
        let s1 = KernelStats {
            ring_full: 10,
            urgent_full: 0,
            pending_full: 1,
            bound_full: 2,
            calls_full: 3,
            fold_end_orphan: 4,
            ..KernelStats::default()
        };
        let l = c.losses(Some(s1));
        assert_eq!(
            l,
            vec![
                Loss {
                    count: 10,
                    reason: "ring-buffer-full",
                    lane: Some("bulk")
                },
                Loss {
                    count: 6,
                    reason: "kernel-map-full",
                    lane: None
                },
                Loss {
                    count: 4,
                    reason: "folded-end-unreported",
                    lane: None
                },
            ]
        );
        assert!(c.take_resync());
        assert!(!c.take_resync(), "the request is cleared");
        // Only what grew since is reported; an orphaned fold end alone wants no resync.
        let s2 = KernelStats {
            urgent_full: 2,
            fold_end_orphan: 5,
            ..s1
        };
        let l = c.losses(Some(s2));
        assert_eq!(
            l,
            vec![
                Loss {
                    count: 2,
                    reason: "ring-buffer-full",
                    lane: Some("urgent")
                },
                Loss {
                    count: 1,
                    reason: "folded-end-unreported",
                    lane: None
                },
            ]
        );
        assert!(c.take_resync());
        let s3 = KernelStats {
            fold_end_orphan: 6,
            ..s2
        };
        assert_eq!(c.losses(Some(s3)).len(), 1);
        assert!(!c.take_resync());
        // Runs of a hook the kernel skipped may have carried a start or an end.
        let s4 = KernelStats {
            recursion_misses: 7,
            ..s3
        };
        assert_eq!(
            c.losses(Some(s4)),
            vec![Loss {
                count: 7,
                reason: "hook-run-skipped",
                lane: None
            }]
        );
        assert!(c.take_resync());
        // Counters that went back (maps re-created) count from zero, never underflow.
        let l = c.losses(Some(KernelStats {
            ring_full: 3,
            ..KernelStats::default()
        }));
        assert_eq!(
            l[0],
            Loss {
                count: 3,
                reason: "ring-buffer-full",
                lane: Some("bulk")
            }
        );
    }

    #[test]
    fn undecodable_records_and_a_full_table_are_counted_as_lost() {
        let mut c = core();
        c.decode_failed();
        c.decode_failed();
        for i in 0..(OPEN_MAX as u64 + 3) {
            feed(&mut c, &listen(i + 1, i));
        }
        assert_eq!(c.open_len(), OPEN_MAX);
        let l = c.losses(None);
        assert_eq!(
            l,
            vec![
                Loss {
                    count: 2,
                    reason: "decode-error",
                    lane: None
                },
                Loss {
                    count: 3,
                    reason: "untracked",
                    lane: None
                },
            ]
        );
        assert!(c.losses(None).is_empty(), "reported once");
        assert_eq!(c.count_lost(5), 5);
        assert_eq!(c.count_lost(2), 7);
        assert_eq!(c.lost_total(), 7);
    }
}
