//! `portwatch watch`: attach, stream live events, merge the startup snapshot, report
//! losses, and detach cleanly on SIGINT/SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use portwatch_common::Kind;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    classify::{Lang, Policy},
    emit::{Closed, Emitter, Format},
    enrich::{Enricher, Owner},
    event::{
        Agent, Boot, ECS_VERSION, Ecs, Event, EventMeta, Host, Lost, Named, Network, Portwatch,
        Rule, Server, Socket,
    },
    probes::{self, KernelStats},
    procfs,
    ring::{self, Record, Transport},
    risk::Assessor,
    snapshot, sys,
};

/// Open listeners tracked to pair a start with its end. Beyond this many, new starts are
/// not tracked (their end carries no duration) and the shortfall is reported as
/// `events-lost` with reason `untracked`.
pub const OPEN_MAX: usize = 65_536;
/// Items handled per wake-up before yielding to signals and timers.
const BATCH_MAX: usize = 4096;
/// Wake-ups closer together than this mean events are streaming: poll briefly before
/// blocking again. Each kernel-side wake-up cost the listening process ~5 µs here, which
/// halved the rate of a listen() loop; polling for SPIN costs the agent at most SPIN of
/// CPU per wake-up, and only when events are that frequent.
const BUSY_GAP: Duration = Duration::from_micros(500);
const SPIN: Duration = Duration::from_micros(50);
/// Longest stretch spent polling before signals and timers get a turn.
const SPIN_MAX: Duration = Duration::from_millis(5);
/// How long after the snapshot a live start for a socket it already reported is taken
/// as a duplicate. Records reach the agent within milliseconds of the syscall.
const SNAPSHOT_GRACE: Duration = Duration::from_secs(5);

/// Site policy and language for alerts.
pub struct PolicyOptions {
    pub rules: Option<Policy>,
    pub lang: Lang,
}

pub struct WatchOptions {
    pub policy: PolicyOptions,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub ring_bytes: u32,
    pub snapshot: bool,
    pub hooks: probes::HooksChoice,
}

/// The socket half of a listener event.
struct Listener {
    transport: Transport,
    addr: std::net::IpAddr,
    port: u16,
    socket: Socket,
    user: Option<Named>,
    group: Option<Named>,
}

struct Open {
    ktime_ns: Option<u64>,
    owner: Owner,
    user: Option<Named>,
    group: Option<Named>,
}

/// Startup merge state: what the live stream reported while the snapshot ran, and what
/// the snapshot reported (so a late live record for it is not a duplicate).
#[derive(Default)]
struct Startup {
    live_started: HashSet<u64>,
    live_stopped: HashSet<u64>,
    reported: HashSet<u64>,
    snapshot_running: bool,
    grace_until: Option<Instant>,
}

pub struct Pipeline {
    enricher: Enricher,
    emitter: Emitter,
    host: Arc<Host>,
    agent: Arc<Agent>,
    host_netns: Option<u64>,
    seq: u64,
    open: HashMap<u64, Open>,
    startup: Startup,
    assessor: Assessor,
    kernel_seen: KernelStats,
    lost_total: u64,
    decode_errors: u64,
    untracked: u64,
    pub emitted: u64,
    /// The hook set in use, for the `sensor-started` event.
    pub hooks: Option<probes::Hooks>,
}

fn host_info(boot_id: &str, machine_id: Option<String>) -> Arc<Host> {
    Arc::new(Host {
        name: procfs::hostname(),
        id: machine_id,
        boot: (!boot_id.is_empty()).then(|| Boot {
            id: boot_id.to_owned(),
        }),
    })
}

impl Pipeline {
    pub fn new(emitter: Emitter, cgroup_root: PathBuf, policy: PolicyOptions) -> Pipeline {
        let boot_id = procfs::boot_id().unwrap_or_default();
        let machine_id = procfs::machine_id().ok();
        let host_netns = snapshot::own_netns().ok();
        Pipeline {
            enricher: Enricher::new(cgroup_root, machine_id.as_deref().unwrap_or(""), &boot_id),
            emitter,
            host: host_info(&boot_id, machine_id),
            agent: Arc::new(Agent {
                type_: "portwatch",
                name: "portwatch",
                version: env!("CARGO_PKG_VERSION"),
            }),
            host_netns,
            seq: 0,
            open: HashMap::new(),
            startup: Startup::default(),
            assessor: Assessor::new(policy.rules, policy.lang, host_netns),
            kernel_seen: KernelStats::default(),
            lost_total: 0,
            decode_errors: 0,
            untracked: 0,
            emitted: 0,
            hooks: None,
        }
    }

    fn base(&mut self, wall_ns: i128, kind: &'static str, action: &'static str) -> Event {
        self.seq += 1;
        let (category, type_): (&'static [&'static str], &'static [&'static str]) = match action {
            "listen-started" | "udp-bound" => (&["network"], &["start"]),
            "listen-stopped" | "udp-released" => (&["network"], &["end"]),
            "listener-present" => (&["network"], &["info"]),
            _ => (&["host"], &["info"]),
        };
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        Event {
            timestamp: sys::rfc3339(wall_ns),
            message: None,
            event: EventMeta {
                kind,
                category,
                type_,
                action,
                dataset: "portwatch.listener",
                module: "portwatch",
                sequence: self.seq,
                duration: None,
                severity: None,
                created: sys::rfc3339(now),
            },
            log: None,
            network: None,
            server: None,
            process: None,
            user: None,
            group: None,
            container: None,
            rule: None,
            host: self.host.clone(),
            agent: self.agent.clone(),
            ecs: Ecs {
                version: ECS_VERSION,
            },
            portwatch: Portwatch::default(),
        }
    }

    fn write(&mut self, ev: &Event) -> anyhow::Result<()> {
        self.emitted += 1;
        self.emitter.write(ev)
    }

    /// Classify a new listener's event, write it, then its alert (never batched: the
    /// alert goes out in the same flush as the event that raised it).
    fn write_assessed(&mut self, mut ev: Event) -> anyhow::Result<Event> {
        let alert = self.assessor.assess(&mut ev);
        self.write(&ev)?;
        if let Some(mut alert) = alert {
            self.seq += 1;
            alert.event.sequence = self.seq;
            self.write(&alert)?;
        }
        Ok(ev)
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.emitter.flush()
    }

    /// `sensor-started`: the hook set in use (and why) in `portwatch.hooks`.
    pub fn sensor_started(&mut self, stats: serde_json::Value) -> anyhow::Result<()> {
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        let mut ev = self.base(now, "state", "sensor-started");
        ev.portwatch.stats = Some(stats);
        ev.portwatch.hooks = self.hooks.take();
        self.write(&ev)?;
        self.flush()
    }

    /// A state event about the agent itself (`sensor-started`, `snapshot-complete`, ...).
    pub fn state(&mut self, action: &'static str, stats: serde_json::Value) -> anyhow::Result<()> {
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        let mut ev = self.base(now, "state", action);
        ev.portwatch.stats = Some(stats);
        self.write(&ev)?;
        self.flush()
    }

    fn listener_event(
        &mut self,
        action: &'static str,
        wall_ns: i128,
        l: Listener,
        owner: &Owner,
    ) -> Event {
        let Listener {
            transport,
            addr,
            port,
            socket,
            user,
            group,
        } = l;
        let mut ev = self.base(wall_ns, "event", action);
        ev.network = Some(Network {
            transport: transport.as_str(),
            type_: if addr.is_ipv4() { "ipv4" } else { "ipv6" },
        });
        ev.server = Some(Server {
            ip: addr.to_string(),
            port,
        });
        ev.process = owner.process.clone();
        ev.user = user;
        ev.group = group;
        ev.container = owner.container.clone();
        ev.portwatch.systemd = owner.systemd.clone();
        ev.portwatch.cgroup = owner.cgroup.clone();
        ev.portwatch.attribution = Some(owner.attribution);
        ev.portwatch.socket = Some(socket);
        ev
    }

    fn key(r: &Record) -> u64 {
        r.inode.unwrap_or(r.sock_key)
    }

    pub fn handle(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let r = match ring::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.decode_errors += 1;
                log::warn!("dropping undecodable record: {e}");
                return Ok(());
            }
        };
        let key = Self::key(&r);
        let wall = self.enricher.clocks.wall_from_ktime(r.ktime_ns);
        let socket = Socket {
            inode: r.inode,
            netns: r.netns.map(u64::from),
            host_netns: r.netns.zip(self.host_netns).map(|(a, b)| u64::from(a) == b),
            v6only: (r.addr.is_ipv6()).then_some(r.v6only),
            kernel: r.kthread,
            thread_id: Some(r.tid),
            pids: Vec::new(),
        };
        match r.kind {
            Kind::ListenStarted | Kind::UdpBound => {
                if self.startup.snapshot_running {
                    self.startup.live_started.insert(key);
                } else if self.startup.reported.remove(&key) {
                    return Ok(()); // the snapshot already reported this socket
                }
                let owner = self.enricher.owner_for_record(&r);
                let user = Some(self.enricher.user(r.uid));
                let group = Some(self.enricher.group(r.gid));
                let action = if r.kind == Kind::ListenStarted {
                    "listen-started"
                } else {
                    "udp-bound"
                };
                let l = Listener {
                    transport: r.transport,
                    addr: r.addr,
                    port: r.port,
                    socket,
                    user: user.clone(),
                    group: group.clone(),
                };
                let ev = self.listener_event(action, wall, l, &owner);
                self.write_assessed(ev)?;
                if self.open.len() < OPEN_MAX {
                    self.open.insert(
                        key,
                        Open {
                            ktime_ns: Some(r.ktime_ns),
                            owner,
                            user,
                            group,
                        },
                    );
                } else {
                    self.untracked += 1;
                }
            }
            Kind::ListenStopped | Kind::UdpReleased => {
                // A release whose bind the kernel side never saw is reported for the
                // sockets we know (from the snapshot), and while the snapshot runs (it
                // may be one the snapshot is about to find); the rest are client sockets
                // bound implicitly by a send.
                if r.untracked && !self.startup.snapshot_running && !self.open.contains_key(&key) {
                    return Ok(());
                }
                if self.startup.snapshot_running {
                    self.startup.live_stopped.insert(key);
                }
                self.startup.reported.remove(&key);
                let (owner, user, group, duration) = match self.open.remove(&key) {
                    Some(o) => {
                        let d = o.ktime_ns.map(|t| r.ktime_ns.saturating_sub(t));
                        (o.owner, o.user, o.group, d)
                    }
                    // Started before the agent: the closing task is the best owner we have.
                    None => {
                        let owner = self.enricher.owner_for_record(&r);
                        let user = Some(self.enricher.user(r.uid));
                        let group = Some(self.enricher.group(r.gid));
                        (owner, user, group, None)
                    }
                };
                let action = if r.kind == Kind::ListenStopped {
                    "listen-stopped"
                } else {
                    "udp-released"
                };
                let l = Listener {
                    transport: r.transport,
                    addr: r.addr,
                    port: r.port,
                    socket,
                    user,
                    group,
                };
                let mut ev = self.listener_event(action, wall, l, &owner);
                ev.event.duration = duration;
                self.write(&ev)?;
            }
        }
        Ok(())
    }

    pub fn snapshot_started(&mut self) {
        self.startup.snapshot_running = true;
    }

    /// Merge the /proc snapshot: report each listener the live stream has not already
    /// reported (started or stopped while the scan ran).
    pub fn merge_snapshot(
        &mut self,
        found: Vec<snapshot::Found>,
        took: Duration,
    ) -> anyhow::Result<()> {
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        let mut reported = 0u64;
        let mut skipped = 0u64;
        let mut owners = HashMap::new();
        for f in found {
            let key = f.socket.inode;
            if key != 0
                && (self.startup.live_started.contains(&key)
                    || self.startup.live_stopped.contains(&key))
            {
                skipped += 1;
                continue;
            }
            let (ev, owner, user) = self.present(&f, now, &mut owners);
            self.write_assessed(ev)?;
            reported += 1;
            if key != 0 {
                self.startup.reported.insert(key);
                if self.open.len() < OPEN_MAX {
                    let open = Open {
                        ktime_ns: None,
                        owner,
                        user,
                        group: None,
                    };
                    self.open.insert(key, open);
                }
            }
        }
        self.startup.snapshot_running = false;
        self.startup.live_started.clear();
        self.startup.live_stopped.clear();
        self.startup.grace_until = Some(Instant::now() + SNAPSHOT_GRACE);
        self.state(
            "snapshot-complete",
            serde_json::json!({
                "listeners": reported,
                "already_reported_live": skipped,
                "duration_ms": took.as_secs_f64() * 1e3,
            }),
        )
    }

    /// The `listener-present` event for one socket found in /proc. `owners` caches
    /// attribution per owning pid set (a forked server shares one socket among many).
    fn present(
        &mut self,
        f: &snapshot::Found,
        wall_ns: i128,
        owners: &mut HashMap<Vec<u32>, Owner>,
    ) -> (Event, Owner, Option<Named>) {
        let owner = match owners.get(&f.owners) {
            Some(o) => o.clone(),
            None => {
                let o = if f.owner_hidden {
                    Owner {
                        attribution: "unknown",
                        ..Owner::default()
                    }
                } else {
                    self.enricher.owner_for_pids(&f.owners)
                };
                owners.insert(f.owners.clone(), o.clone());
                o
            }
        };
        let transport = match f.socket.transport {
            snapshot::Transport::Tcp => Transport::Tcp,
            snapshot::Transport::Udp => Transport::Udp,
        };
        let user = Some(self.enricher.user(f.socket.uid));
        let inode = f.socket.inode;
        let socket = Socket {
            inode: (inode != 0).then_some(inode),
            netns: Some(f.netns_ino),
            host_netns: self.host_netns.map(|h| h == f.netns_ino),
            v6only: f.v6only,
            kernel: owner.kernel,
            thread_id: None,
            pids: f.owners.clone(),
        };
        let l = Listener {
            transport,
            addr: f.socket.addr,
            port: f.socket.port,
            socket,
            user: user.clone(),
            group: None,
        };
        let ev = self.listener_event("listener-present", wall_ns, l, &owner);
        (ev, owner, user)
    }

    /// Events for everything listening now (the one-shot `portwatch snapshot`), each
    /// classified, with the alert it raises.
    pub fn present_events(&mut self, found: &[snapshot::Found]) -> Vec<(Event, Option<Event>)> {
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        let mut owners = HashMap::new();
        let mut out = Vec::with_capacity(found.len());
        for f in found {
            let mut ev = self.present(f, now, &mut owners).0;
            let alert = self.assessor.assess(&mut ev);
            out.push((ev, alert));
        }
        out
    }

    /// Write one event and flush (used by one-shot commands).
    pub fn write_now(&mut self, ev: &Event) -> anyhow::Result<()> {
        self.write(ev)
    }

    /// Periodic work: follow the wall clock, report losses, end the startup grace.
    pub fn tick(&mut self, stats: Option<KernelStats>, last: bool) -> anyhow::Result<()> {
        self.enricher.clocks = sys::Clocks::now();
        if self
            .startup
            .grace_until
            .is_some_and(|t| Instant::now() >= t)
        {
            self.startup.reported.clear();
            self.startup.grace_until = None;
        }
        if let Some(s) = stats {
            let ring = s.ring_full - self.kernel_seen.ring_full;
            if ring > 0 {
                self.lost(ring, "ring-buffer-full")?;
            }
            let untracked = (s.pending_full - self.kernel_seen.pending_full)
                + (s.bound_full - self.kernel_seen.bound_full);
            if untracked > 0 {
                self.lost(untracked, "kernel-map-full")?;
            }
            self.kernel_seen = s;
        }
        if self.decode_errors > 0 {
            let n = std::mem::take(&mut self.decode_errors);
            self.lost(n, "decode-error")?;
        }
        if self.untracked > 0 {
            let n = std::mem::take(&mut self.untracked);
            self.lost(n, "untracked")?;
        }
        for (key, n) in self.assessor.quiet_folds(last) {
            let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
            let mut ev = self.base(now, "alert", "risky-listener-repeated");
            ev.message = Some(format!(
                "{n} more alerts for rule {} ({}/{} on {} by {}) were folded into the last one",
                key.rule,
                key.port,
                key.transport.as_str(),
                key.addr,
                if key.process.is_empty() {
                    "an unknown process"
                } else {
                    &key.process
                }
            ));
            ev.network = Some(Network {
                transport: key.transport.as_str(),
                type_: if key.addr.is_ipv4() { "ipv4" } else { "ipv6" },
            });
            ev.server = Some(Server {
                ip: key.addr.to_string(),
                port: key.port,
            });
            ev.portwatch.folded = Some(n);
            ev.rule = Some(Rule {
                id: key.rule.clone(),
                name: key.rule,
                description: "repeated alerts folded into one".into(),
                reference: None,
                ruleset: "portwatch-catalogue",
            });
            self.write(&ev)?;
        }
        self.flush()
    }

    fn lost(&mut self, count: u64, reason: &'static str) -> anyhow::Result<()> {
        self.lost_total += count;
        let now = self.enricher.clocks.wall_from_ktime(sys::monotonic_ns());
        let mut ev = self.base(now, "metric", "events-lost");
        ev.log = Some(crate::event::Log { level: "warning" });
        ev.message = Some(format!(
            "{count} events lost ({reason}); {} since start",
            self.lost_total
        ));
        ev.portwatch.lost = Some(Lost {
            count,
            total: self.lost_total,
            reason,
        });
        self.write(&ev)
    }
}

/// Drain everything the ring holds now (up to BATCH_MAX), then flush once.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) -> anyhow::Result<usize> {
    let mut n = 0;
    while n < BATCH_MAX {
        let Some(item) = ring.next() else { break };
        pipeline.handle(&item)?;
        n += 1;
    }
    if n > 0 {
        pipeline.flush()?;
    }
    Ok(n)
}

/// Drain; when `busy`, go on polling until the ring has stayed empty for SPIN. Returns
/// true when records are still waiting (a full batch, or the SPIN_MAX budget ran out
/// while they kept coming), so the caller yields to the other event-loop branches.
fn drain_for(
    ring: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
    busy: bool,
) -> anyhow::Result<bool> {
    if drain(ring, pipeline)? == BATCH_MAX {
        return Ok(true);
    }
    if !busy {
        return Ok(false);
    }
    let start = Instant::now();
    let mut quiet_since = start;
    loop {
        match drain(ring, pipeline)? {
            BATCH_MAX => return Ok(true),
            0 => std::hint::spin_loop(),
            _ => quiet_since = Instant::now(),
        }
        let now = Instant::now();
        if now.duration_since(quiet_since) >= SPIN {
            return Ok(false);
        }
        if now.duration_since(start) >= SPIN_MAX {
            return Ok(true);
        }
    }
}

pub async fn watch(opts: WatchOptions) -> anyhow::Result<()> {
    let emitter = Emitter::new(opts.format, opts.output.as_deref())?;
    let sensor = probes::load(&probes::Options {
        ring_bytes: opts.ring_bytes,
        hooks: opts.hooks,
    })?;
    let probes::Sensor {
        ebpf,
        ring,
        stats: sensor_stats,
        sleep_flag,
        logger,
        cgroup_root,
        hooks,
        ..
    } = sensor;
    let WatchOptions {
        policy,
        format: _,
        output: _,
        ring_bytes,
        snapshot,
        hooks: _,
    } = opts;
    let mut pipeline = Pipeline::new(emitter, cgroup_root.clone(), policy);
    pipeline.hooks = Some(hooks);
    // Loading parsed several MiB of kernel BTF that is now free: hand it back to the
    // system so the resident size of a long-running agent reflects its real state.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    let result = run(
        &mut pipeline,
        ring,
        &sensor_stats,
        sleep_flag,
        logger,
        ring_bytes,
        snapshot,
    )
    .await;
    // Final loss report and flush, even after an error in the loop.
    let kernel = sensor_stats.read().ok();
    log::info!("kernel-side counters at exit: {kernel:?}");
    let final_tick = pipeline.tick(kernel, true);
    drop(ebpf); // detaches every program (bpf_link fds close)
    match result.and(final_tick) {
        Err(e) if e.is::<Closed>() => Ok(()),
        other => other,
    }
}

async fn run(
    pipeline: &mut Pipeline,
    ring: RingBuf<MapData>,
    stats: &probes::StatsReader,
    mut sleep_flag: probes::SleepFlag,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ring_bytes: u32,
    snapshot: bool,
) -> anyhow::Result<()> {
    let mut last_wake = Instant::now() - BUSY_GAP;
    // Records are submitted without a wake-up unless this flag is up: raise it before
    // the first wait, and pick up whatever arrived before the ring was registered.
    // SAFETY: the ring buffer and the logger own their map fds and never close or
    // replace them while registered; both live until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the event loop: {e}"))?;
    let mut logger = match logger {
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the eBPF log buffer: {e}"))?,
        ),
        None => None,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));

    // Every live start from the moment the probes attached is remembered until the
    // snapshot is merged, so the snapshot never reports one a second time.
    if snapshot {
        pipeline.snapshot_started();
    }
    // (The flag stays up while draining here: at worst a spare wake-up.)
    sleep_flag.going_to_sleep()?;
    drain(ring.get_mut(), pipeline)?;
    pipeline.sensor_started(serde_json::json!({
            "ring_buffer_bytes": ring_bytes,
            "pid": std::process::id(),
    }))?;

    // Probes are attached and the ring is being drained: now read what already exists.
    let (snap_tx, mut snap_rx) = tokio::sync::oneshot::channel();
    let mut snapshot_pending = snapshot;
    if snapshot {
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let res = snapshot::scan();
            // The receiver is gone only if the agent is already shutting down.
            let _ = snap_tx.send((res, t.elapsed()));
        });
    }

    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                sleep_flag.awake()?;
                // Events arriving faster than every BUSY_GAP: keep reading for a moment
                // instead of blocking, so the kernel side need not wake us per record.
                let busy = last_wake.elapsed() < BUSY_GAP;
                last_wake = Instant::now();
                if drain_for(guard.get_inner_mut(), pipeline, busy)? {
                    continue; // more is waiting: stay ready, let signals and timers in
                }
                sleep_flag.going_to_sleep()?;
                if drain(guard.get_inner_mut(), pipeline)? == 0 {
                    guard.clear_ready();
                } else {
                    sleep_flag.awake()?;
                }
            }
            res = &mut snap_rx, if snapshot_pending => {
                snapshot_pending = false;
                let (found, took) = res.context("snapshot task vanished")?;
                let found = found.context("reading the listeners already open from /proc")?;
                pipeline.merge_snapshot(found, took)?;
            }
            guard = async {
                match logger.as_mut() {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => pipeline.tick(stats.read().ok(), false)?,
        }
    }
    // Whatever the kernel wrote before we stopped still goes out.
    let ring = ring.get_mut();
    while drain(ring, pipeline)? == BATCH_MAX {}
    Ok(())
}
