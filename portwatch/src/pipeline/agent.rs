//! `portwatch watch`: attach, stream live events, merge the startup snapshot, report
//! losses, and detach cleanly on SIGINT/SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
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
    attribution::enrich::Owner,
    attribution::scan,
    classify::{Lang, Policy},
    kernel::host,
    kernel::probes::{self, KernelStats},
    kernel::ring::{self, Record, Transport},
    output::event::{
        Action, Event, Kind as EventKind, Level, Lost, Named, Network, Rule, Server, Shared, Socket,
    },
    output::sinks::{Closed, Format, Output},
    pipeline::assess::Assessor,
    pipeline::core::{Core, Step, Tracked},
    pipeline::events::{Events, Listener},
    socket::Protocol,
};

/// Default budget: starts per second one process may report one by one before the
/// kernel folds the rest (`--fold-above`). A service starting up opens a handful of
/// listeners, a busy reverse proxy with SO_REUSEPORT a few per worker; 1,000 a second
/// is far above any of them and far below what one process can churn (~250,000/s
/// here), and the urgent ring holds a whole second of a user's budget, starts and ends.
pub const FOLD_ABOVE: u32 = 1000;

pub use crate::pipeline::core::OPEN_MAX;
/// Items handled per wake-up before yielding to signals and timers.
const BATCH_MAX: usize = 4096;
/// Wake-ups closer together than this mean events are streaming: switch to polling the
/// ring every NAP without asking the kernel for wake-ups. Each kernel-side wake-up cost
/// the listening process ~5 µs here, which halved the rate of a listen() loop.
const BUSY_GAP: Duration = Duration::from_micros(500);
/// Sleep between two polls while streaming. Busy-waiting instead (the previous policy)
/// took a whole core from the workload on a 2-core machine: `cargo xtask bench --quick`,
/// tcp-churn-1p throughput 0.655 of bare speed spinning, 0.816 napping 200 µs; 100 µs
/// and 500 µs naps measured within noise of it.
const NAP: Duration = Duration::from_micros(200);
/// Polling stops (and wake-ups are asked for again) once the ring stayed empty this long.
/// Shorter than the gaps of a paced stream (1,000 listens/s: 1 ms), which a wake-up per
/// event serves with less delay than a nap (bench: p50 186 µs with 2 ms here).
const POLL_QUIET: Duration = Duration::from_micros(500);
/// Longest stretch spent polling before signals and timers get a turn.
const POLL_MAX: Duration = Duration::from_millis(10);

/// Site policy and language for alerts.
pub struct PolicyOptions {
    pub rules: Option<Policy>,
    /// Where `rules` came from: re-read on SIGHUP.
    pub rules_path: Option<PathBuf>,
    pub lang: Lang,
}

pub struct WatchOptions {
    pub policy: PolicyOptions,
    pub format: Format,
    /// Where events go (at least one).
    pub sinks: Vec<crate::output::sinks::SinkSpec>,
    /// TLS files and the spool of the network destinations.
    pub delivery: crate::output::sinks::Delivery,
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<String>,
    pub ring_bytes: u32,
    pub snapshot: bool,
    /// Bound of the queue between the event loop and the output thread.
    pub queue_events: usize,
    /// Period of `sensor-health` events; None: none.
    pub health_interval: Option<Duration>,
    /// Keep running when the start-up self-check finds a hook that delivers nothing.
    pub allow_degraded: bool,
    /// Which hook set: auto, stable or direct.
    pub hooks: probes::HooksChoice,
    /// Per-process and per-user budgets before the kernel folds (0: never).
    pub fold_above: u32,
    pub fold_user_above: u32,
}

/// What the driver keeps about an open listener (the core keeps its key, start time and
/// namespace): its attribution for the end event, and what the end event needs when it
/// has to be made up by a resync (the end itself was lost).
#[derive(Debug)]
struct Held {
    owner: Owner,
    user: Option<Shared<Named>>,
    group: Option<Shared<Named>>,
    transport: Transport,
    udplite: bool,
    addr: std::net::IpAddr,
    port: u16,
    /// IPV6_V6ONLY of a `::` socket, to assess it again when the ruleset changes.
    v6only: Option<bool>,
    /// The firewall verdict last reported for it.
    firewall: Option<Arc<crate::classify::firewall::Firewall>>,
    /// The NAT publication last reported for it (the most exposed).
    published: Option<Arc<Publication>>,
    /// Every publication it is behind (so none of them is `exposure-without-listener`).
    backs: Vec<PubKey>,
}

type Publication = crate::classify::firewall::nat::Publication;
type PubKey = crate::classify::firewall::nat::PubKey;

/// What an `exposure-changed` compares: the firewall verdict, and which publication
/// with which verdict.
type ExposureSig = (
    Option<crate::classify::firewall::State>,
    Option<(
        PubKey,
        crate::classify::firewall::State,
        Option<crate::classify::firewall::State>,
    )>,
);

fn exposure_sig(
    fw: &Option<Arc<crate::classify::firewall::Firewall>>,
    published: Option<&Publication>,
) -> ExposureSig {
    (
        fw.as_ref().map(|f| f.verdict),
        published.map(|p| (p.full_key(), p.verdict, p.local_verdict)),
    )
}

/// Running totals for `sensor-health`.
struct Health {
    started: Instant,
    records: u64,
    records_at_last: u64,
    last: Option<Instant>,
    last_trim: Option<Instant>,
}

/// How often freed heap memory is handed back to the system. A burst (a stalled output
/// filling its queue, a flood of new processes) leaves freed memory that malloc keeps;
/// trimming makes the resident size follow the real state instead of the high-water mark.
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// Most `events-lost` events one tick may write (kernel, map, decode, untracked, and two
/// per destination): the queues must have this much room before losses are reported.
const LOSS_REPORTS_MAX: usize = 32;

pub struct Pipeline {
    /// Attribution and the fields every event carries.
    ev: Events,
    output: Output,
    /// Open listeners, the merge with /proc, own sockets and loss accounting.
    core: Core<Held>,
    assessor: Assessor,
    health: Health,
    rules_path: Option<PathBuf>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The hook set in use, for the `sensor-started` event.
    pub hooks: Option<probes::Hooks>,
    /// What was reported of the kernel's folds.
    folds: crate::kernel::folds::Folds,
    /// Requests to the firewall watcher thread, when the firewall is followed.
    fw_watch: Option<std::sync::mpsc::Sender<crate::classify::firewall::watch::Request>>,
    /// Published host ports with nothing listening behind them, as last reported.
    unbacked: std::collections::BTreeMap<PubKey, Arc<Publication>>,
}

impl Pipeline {
    pub fn new(output: Output, cgroup_root: PathBuf, policy: PolicyOptions) -> Pipeline {
        let mut ev = Events::new(cgroup_root, Vec::new());
        let assessor = Assessor::new(policy.rules, policy.lang, ev.host_netns);
        ev.important_ports = assessor.important_ports();
        Pipeline {
            ev,
            output,
            core: Core::new(
                std::process::id(),
                host::in_initial_pid_ns().then(std::process::id),
            ),
            assessor,
            folds: crate::kernel::folds::Folds::default(),
            health: Health {
                started: Instant::now(),
                records: 0,
                records_at_last: 0,
                last: None,
                last_trim: None,
            },
            rules_path: policy.rules_path,
            metrics: None,
            hooks: None,
            fw_watch: None,
            unbacked: std::collections::BTreeMap::new(),
        }
    }

    /// Queue an event for the output threads (never blocks; a drop is counted there).
    fn write(&mut self, ev: Event) {
        if let Some(m) = &self.metrics {
            m.event(ev.event.action, ev.network.as_ref().map(|n| n.transport));
            if let Some(r) = ev
                .rule
                .as_ref()
                .filter(|_| ev.event.kind == EventKind::Alert)
            {
                m.alert(&r.id);
            }
        }
        self.output.send(ev);
    }

    /// Classify a new listener's event, write it, then its alert right behind it.
    /// Returns the firewall verdict it carries, to compare with after a ruleset change.
    fn write_assessed(&mut self, mut ev: Event) -> Assessed {
        let alert = self.assessor.assess(&mut ev);
        let backs = self.assessor.take_backs();
        let firewall = ev
            .portwatch
            .exposure
            .as_ref()
            .and_then(|e| e.firewall.clone());
        let published = ev
            .portwatch
            .exposure
            .as_ref()
            .and_then(|e| e.published.clone());
        if alert.is_some() {
            // An alert and its listener travel together, ahead of bulk churn.
            ev.portwatch.urgent = true;
        }
        self.write(ev);
        if let Some(mut alert) = alert {
            alert.portwatch.urgent = true;
            self.write(alert);
        }
        Assessed {
            firewall,
            published,
            backs,
        }
    }

    /// Follow the host firewall: each listener's verdict from now on, and (with
    /// `watch`) re-evaluation when a namespace's ruleset changes.
    pub fn enable_firewall(
        &mut self,
        watch: Option<std::sync::mpsc::Sender<crate::classify::firewall::watch::Request>>,
    ) {
        self.fw_watch = watch.clone();
        self.assessor.enable_firewall(watch);
    }

    /// A namespace's ruleset or addresses changed: assess the open listeners again and
    /// report each whose firewall verdict or NAT publication changed
    /// (`exposure-changed`), with the alert when one becomes exposed; then the
    /// published ports with nothing behind them (`exposure-without-listener`).
    pub fn firewall_changed(&mut self, u: crate::classify::firewall::watch::Update) {
        if !self.assessor.update_namespace(&u) {
            return;
        }
        // Every namespace's listeners, not only those of the one that changed: its NAT
        // rules may publish a listener of another.
        let keys: Vec<u64> = self.core.open().map(|(k, _)| *k).collect();
        let now = self.ev.now();
        for key in keys {
            let Some(o) = self.core.open_get(key) else {
                continue;
            };
            let socket = Socket {
                inode: o.by_inode.then_some(key),
                netns: o.netns,
                host_netns: o.netns.zip(self.ev.host_netns).map(|(a, b)| a == b),
                v6only: o.held.v6only,
                ..Socket::default()
            };
            let h = &o.held;
            let l = Listener {
                transport: h.transport,
                udplite: h.udplite,
                addr: h.addr,
                port: h.port,
                socket,
                user: h.user.clone(),
                group: h.group.clone(),
            };
            let owner = h.owner.clone();
            let before = h.firewall.clone();
            let published_before = h.published.clone();
            let mut ev = self
                .ev
                .listener_event(Action::ExposureChanged, now, l, &owner);
            let (fw_now, pubs_now) = self.assessor.firewall_now(&ev);
            let backs: Vec<PubKey> = pubs_now.iter().map(Publication::full_key).collect();
            if let Some(o) = self.core.open_get_mut(key) {
                o.held.backs = backs;
            }
            // Only a changed verdict is assessed (and may alert): assessing every open
            // listener would count each in the alert folder as if it had alerted again.
            if exposure_sig(&before, published_before.as_deref())
                == exposure_sig(&fw_now, pubs_now.first())
            {
                continue;
            }
            let alert = self.assessor.assess(&mut ev);
            let _ = self.assessor.take_backs();
            let exposure = ev.portwatch.exposure.as_ref();
            let after = exposure.and_then(|e| e.firewall.clone());
            let published_after = exposure.and_then(|e| e.published.clone());
            if exposure_sig(&before, published_before.as_deref())
                == exposure_sig(&after, published_after.as_deref())
            {
                continue;
            }
            if let Some(o) = self.core.open_get_mut(key) {
                o.held.firewall = after.clone();
                o.held.published = published_after.clone();
            }
            let name = |f: &Option<Arc<crate::classify::firewall::Firewall>>| {
                f.as_ref().map_or("not evaluated", |f| f.verdict.as_str())
            };
            let what = format!(
                "{} {}:{}",
                o_transport(ev.network.as_ref()),
                ev.server
                    .as_ref()
                    .map_or(String::new(), |s| s.ip.to_string()),
                ev.server.as_ref().map_or(0, |s| s.port),
            );
            let mut parts = Vec::new();
            if before.as_ref().map(|f| f.verdict) != after.as_ref().map(|f| f.verdict) {
                let mut m = format!(
                    "host firewall verdict for new connections changed from {} to {}",
                    name(&before),
                    name(&after),
                );
                if let Some(r) = after.as_ref().and_then(|f| f.rule.as_ref()) {
                    m.push_str(&format!(" ({})", r.short()));
                }
                parts.push(m);
            }
            let pub_sig = |p: &Option<Arc<Publication>>| {
                p.as_ref()
                    .map(|p| (p.full_key(), p.verdict, p.local_verdict))
            };
            if pub_sig(&published_before) != pub_sig(&published_after) {
                parts.push(match &published_after {
                    Some(p) => publication_text(p),
                    None => "no longer published by a NAT rule".to_owned(),
                });
            }
            ev.message = Some(format!("{what}: {}", parts.join("; ")));
            ev.portwatch.exposure_change = Some(crate::output::event::ExposureChange {
                before,
                after: after.clone(),
                published_before,
                published_after: published_after.clone(),
            });
            ev.portwatch.urgent = true;
            self.write(ev);
            // Became reachable (or unknown): raise the alert again. Became filtered: the
            // event above says so; no new alert.
            let exposed = after
                .as_ref()
                .is_some_and(|f| f.verdict != crate::classify::firewall::State::Filtered)
                || published_after
                    .as_ref()
                    .is_some_and(|p| p.verdict != crate::classify::firewall::State::Filtered);
            if let (true, Some(mut alert)) = (exposed, alert) {
                alert.portwatch.urgent = true;
                self.write(alert);
            }
        }
        self.check_unbacked();
    }

    /// Reports published host ports with nothing listening behind them
    /// (`exposure-without-listener`, type start), and the end of each that got a
    /// listener or lost its rule.
    fn check_unbacked(&mut self) {
        if self.core.scanning() {
            return; // the open-listener table is not complete yet
        }
        let backed: HashSet<PubKey> = self
            .core
            .open()
            .flat_map(|(_, o)| o.held.backs.iter().copied())
            .collect();
        let all = self.assessor.publications();
        let now: std::collections::BTreeMap<PubKey, Publication> = all
            .iter()
            .filter(|p| !backed.contains(&p.full_key()))
            .map(|p| (p.full_key(), p.clone()))
            .collect();
        let ended: Vec<(PubKey, Arc<Publication>)> = self
            .unbacked
            .iter()
            .filter(|(k, _)| !now.contains_key(*k))
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        for (k, p) in ended {
            self.unbacked.remove(&k);
            let why = if all.iter().any(|x| x.full_key() == k) {
                "listener-appeared"
            } else {
                "rule-removed"
            };
            let ev = self.unbacked_event(&p, Some(why));
            self.write(ev);
        }
        for (k, p) in now {
            if let Some(old) = self.unbacked.get_mut(&k) {
                *old = Arc::new(p);
                continue;
            }
            let p = Arc::new(p);
            self.unbacked.insert(k, p.clone());
            let ev = self.unbacked_event(&p, None);
            self.write(ev);
        }
    }

    /// The `exposure-without-listener` event of a publication: its start (`end` none)
    /// or its end, with why.
    fn unbacked_event(&mut self, p: &Arc<Publication>, end: Option<&'static str>) -> Event {
        let now = self.ev.now();
        let mut ev = self.ev.base(now, Action::ExposureWithoutListener);
        // Rated like the listener that would bind there next: the catalogue's severity
        // for its port, and an alert when the network reaches it unfiltered.
        let risk = self.assessor.classify_publication(p);
        if end.is_none() && risk.alert {
            ev.event.kind = EventKind::Alert;
            ev.rule = risk.rule;
        }
        if let Some(s) = risk.severity {
            let (_, level) = crate::output::event::ecs_severity(s);
            ev.event.severity = Some(s);
            ev.log = Some(crate::output::event::Log { level });
        }
        ev.portwatch.risk = risk.risk;
        ev.event.category = &["network"];
        ev.event.type_ = if end.is_some() { &["end"] } else { &["start"] };
        ev.network = Some(Network {
            transport: Protocol::new(p.transport, false),
            type_: if p.host.ip.is_ipv4() { "ipv4" } else { "ipv6" },
        });
        ev.server = Some(Server {
            ip: p.host.ip,
            port: p.host.port,
        });
        ev.portwatch.exposure = Some(crate::output::event::ExposureOut {
            exposure: risk.exposure,
            firewall: None,
            published: Some(p.clone()),
        });
        ev.portwatch.ended_by = end;
        ev.portwatch.urgent = true;
        let target = match p.target.ip {
            std::net::IpAddr::V4(a) => format!("{a}:{}", p.target.port),
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", p.target.port),
        };
        ev.message = Some(match end {
            None if p.is_local_source() => format!(
                "{} {} is sent to {target} for local processes ({}), where nothing \
                 listens: whatever binds there next gets their connections ({})",
                p.transport,
                fmt_endpoint(p.host.ip, p.host.port),
                p.rule.short(),
                p.verdict.as_str(),
            ),
            None => format!(
                "{} host port {} is published to {target} ({}), where nothing listens: \
                 whatever binds there next is exposed at once ({}{})",
                p.transport,
                p.host.port,
                p.rule.short(),
                p.verdict.as_str(),
                match p.local_verdict {
                    Some(v) => format!("; local processes too: {}", v.as_str()),
                    None => String::new(),
                },
            ),
            Some("listener-appeared") => format!(
                "{} host port {}: a listener now answers at {target}",
                p.transport, p.host.port
            ),
            Some(_) => format!(
                "{} host port {}: the NAT rule publishing it to {target} is gone",
                p.transport, p.host.port
            ),
        });
        ev
    }

    /// Namespaces with an open listener: the firewall watcher keeps only those.
    /// The host's namespace is always kept. A namespace dropped here is forgotten by the
    /// assessor too, so its next listener reads the ruleset again and has it followed
    /// again (a cached ruleset nobody follows would go stale).
    fn retain_watched(&mut self) {
        if let Some(w) = &self.fw_watch {
            let mut keep: HashSet<u64> = self.core.open().filter_map(|(_, o)| o.netns).collect();
            keep.extend(self.ev.host_netns);
            self.assessor.retain_rulesets(&keep);
            if w.send(crate::classify::firewall::watch::Request::Retain(keep))
                .is_err()
            {
                // Said once: without the watcher, verdicts keep the rulesets read so far.
                log::error!(
                    "firewall: the ruleset watcher thread is gone; ruleset changes are no longer followed"
                );
                self.fw_watch = None;
            }
        }
    }

    /// The important-port bitmap for the kernel (RISKY_PORTS), from the rules in force.
    pub fn important_ports(&self) -> &[u64] {
        &self.ev.important_ports
    }

    /// Count into `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: Arc<crate::metrics::Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Refresh the metrics' gauges (each tick).
    /// Open listeners exposed beyond loopback whose firewall verdict is `state`.
    fn exposed(&self, state: crate::classify::firewall::State) -> u64 {
        self.core
            .open()
            .filter(|(_, o)| o.held.firewall.as_ref().is_some_and(|f| f.verdict == state))
            .count() as u64
    }

    /// Open listeners behind a NAT publication whose verdict is `state`.
    fn published(&self, state: crate::classify::firewall::State) -> u64 {
        self.core
            .open()
            .filter(|(_, o)| {
                o.held
                    .published
                    .as_ref()
                    .is_some_and(|p| p.verdict == state)
            })
            .count() as u64
    }

    fn update_gauges(&self, hooks: usize, degraded: usize) {
        let Some(m) = &self.metrics else { return };
        m.beat();
        let (process_cache, cgroup_cache) = self.ev.enricher.cache_sizes();
        m.set_gauges(crate::metrics::Gauges {
            hooks_attached: hooks as u64,
            hooks_degraded: degraded as u64,
            open_listeners: self.core.open_len() as u64,
            exposed_accepted: self.exposed(crate::classify::firewall::State::Accepted),
            exposed_filtered: self.exposed(crate::classify::firewall::State::Filtered),
            exposed_unknown: self.exposed(crate::classify::firewall::State::Unknown),
            published_accepted: self.published(crate::classify::firewall::State::Accepted),
            published_filtered: self.published(crate::classify::firewall::State::Filtered),
            published_unknown: self.published(crate::classify::firewall::State::Unknown),
            published_without_listener: self.unbacked.len() as u64,
            process_cache: process_cache as u64,
            cgroup_cache: cgroup_cache as u64,
            ..crate::metrics::Gauges::from_output(self.output.shared())
        });
    }

    /// Hand what was written since the last call to the output threads.
    pub fn flush_output(&mut self) {
        self.output.flush();
    }

    /// Write everything queued and stop the output thread.
    pub fn finish_output(&mut self) -> anyhow::Result<()> {
        self.output.finish()
    }

    pub fn output_shared(&self) -> Arc<crate::output::sinks::OutputShared> {
        self.output.shared().clone()
    }

    /// `sensor-started`: the hook set in use (and why) in `portwatch.hooks`.
    pub fn sensor_started(&mut self, stats: serde_json::Value) {
        let now = self.ev.now();
        let mut ev = self.ev.base(now, Action::SensorStarted);
        ev.portwatch.stats = Some(stats);
        ev.portwatch.hooks = self.hooks.clone();
        self.write(ev);
    }

    /// `sensor-stopped`, the last event of a clean stop, in every destination: why, uptime
    /// and totals. Written even to a full queue (the writers drain it before exiting).
    pub fn sensor_stopped(&mut self, why: &str) {
        let out = self.output.shared().clone();
        let stats = serde_json::json!({
            "reason": why,
            "uptime_s": self.health.started.elapsed().as_secs_f64(),
            "records_received": self.health.records,
            "events_written": out.sinks.iter().map(|s| s.written.load(Ordering::Relaxed)).max(),
            "lost_total": self.core.lost_total(),
            "listeners_open": self.core.open_len(),
            "resyncs": self.core.resyncs(),
        });
        let now = self.ev.now();
        let mut ev = self.ev.base(now, Action::SensorStopped);
        ev.message = Some(format!("portwatch stopped ({why})"));
        ev.portwatch.stats = Some(stats);
        self.output.set_blocking();
        self.write(ev);
        self.output.flush();
    }

    /// A state event about the agent itself (`sensor-started`, `snapshot-complete`, ...).
    pub fn state(&mut self, action: Action, stats: serde_json::Value) {
        let now = self.ev.now();
        let mut ev = self.ev.base(now, action);
        ev.portwatch.stats = Some(stats);
        self.write(ev);
    }

    pub fn handle(&mut self, bytes: &[u8]) {
        self.health.records += 1;
        let r = match ring::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.core.decode_failed();
                log::warn!("dropping undecodable record: {e}");
                return;
            }
        };
        let step = self.core.record(&r);
        let (key, ended_ns) = match step {
            Step::Own | Step::Duplicate | Step::NotListener => return,
            Step::Start { key, ended_ns } => (key, ended_ns),
            Step::End {
                tracked,
                duration_ns,
            } => return self.report_end(&r, tracked.map(|t| t.held), duration_ns),
        };
        let (owner, user, group) = self.record_owner(&r);
        let action = if r.kind == Kind::ListenStarted {
            Action::ListenStarted
        } else {
            Action::UdpBound
        };
        let mut ev = self.record_event(&r, action, &owner, user.clone(), group.clone());
        ev.portwatch.urgent |= r.urgent;
        if let Some(end) = ended_ns {
            // Its end reached the agent first (and was reported): over already.
            ev.event.duration = Some(end.saturating_sub(r.ktime_ns));
        }
        let Assessed {
            firewall,
            published,
            backs,
        } = self.write_assessed(ev);
        let behind = !backs.is_empty();
        if ended_ns.is_none() {
            let held = Held {
                owner,
                user,
                group,
                transport: r.transport,
                udplite: r.udplite,
                addr: r.addr,
                port: r.port,
                v6only: r.addr.is_ipv6().then_some(r.v6only),
                firewall,
                published,
                backs,
            };
            self.core.track(
                key,
                Tracked {
                    ktime_ns: Some(r.ktime_ns),
                    netns: r.netns.map(u64::from),
                    by_inode: r.inode.is_some(),
                    held,
                },
            );
        }
        if behind {
            // A published port whose listener just appeared.
            self.check_unbacked();
        }
    }

    /// Who a record's task is, as the kernel saw it (with /proc's additions).
    fn record_owner(
        &mut self,
        r: &Record,
    ) -> (Owner, Option<Shared<Named>>, Option<Shared<Named>>) {
        (
            self.ev.enricher.owner_for_record(r),
            Some(self.ev.enricher.user(r.uid)),
            Some(self.ev.enricher.group(r.gid)),
        )
    }

    /// The listener event of a live record, at the kernel's time of it.
    fn record_event(
        &mut self,
        r: &Record,
        action: Action,
        owner: &Owner,
        user: Option<Shared<Named>>,
        group: Option<Shared<Named>>,
    ) -> Event {
        let wall = self.ev.enricher.clocks.wall_from_ktime(r.ktime_ns);
        let l = Listener {
            transport: r.transport,
            udplite: r.udplite,
            addr: r.addr,
            port: r.port,
            socket: self.record_socket(r),
            user,
            group,
        };
        self.ev.listener_event(action, wall, l, owner)
    }

    /// `portwatch.socket` of a live record.
    fn record_socket(&self, r: &Record) -> Socket {
        Socket {
            inode: r.inode,
            netns: r.netns.map(u64::from),
            host_netns: r
                .netns
                .zip(self.ev.host_netns)
                .map(|(a, b)| u64::from(a) == b),
            v6only: (r.addr.is_ipv6()).then_some(r.v6only),
            kernel: r.kthread,
            implicit_bind: r.implicit,
            thread_id: Some(r.tid),
            pids: Vec::new(),
        }
    }

    /// The end of a listener: attributed as its start was, or, when it started before the
    /// agent, to the closing task (the best owner there is).
    fn report_end(&mut self, r: &Record, held: Option<Held>, duration_ns: Option<u64>) {
        let was_behind = held.as_ref().is_some_and(|h| !h.backs.is_empty());
        let (owner, user, group) = match held {
            Some(h) => (h.owner, h.user, h.group),
            None => self.record_owner(r),
        };
        let action = if r.kind == Kind::ListenStopped {
            Action::ListenStopped
        } else {
            Action::UdpReleased
        };
        let mut ev = self.record_event(r, action, &owner, user, group);
        ev.portwatch.urgent |= r.urgent;
        ev.event.duration = duration_ns;
        self.write(ev);
        if was_behind {
            // Its host port is published to nothing now.
            self.check_unbacked();
        }
    }

    /// The self-check's sockets, by inode: their records name the agent's kernel pid.
    fn expect_own(&mut self, inodes: &[u64]) {
        self.core.expect_own(inodes);
    }

    /// Whether the start of the agent's own listener (inode `tcp`) and bind (`udp`) came.
    fn own_seen(&self, tcp: u64, udp: u64) -> (bool, bool) {
        self.core.own_seen(tcp, udp)
    }

    /// A /proc scan starts: at start-up, or (`resync`) after a loss.
    pub fn snapshot_started(&mut self, resync: bool) {
        self.core.scan_started(resync);
    }

    /// Merge the /proc snapshot: report each listener the live stream has not already
    /// reported (started or stopped while the scan ran).
    ///
    /// With `resync` (after a loss) the scan is compared with the open-listener table:
    /// listeners it finds that the table lacks are reported (`portwatch.resync`), and
    /// listeners the table holds that the scan no longer finds get their end event.
    pub fn merge_snapshot(&mut self, found: Vec<scan::Found>, took: Duration, resync: bool) {
        let now = self.ev.now();
        let merge = self.core.merge(&found, resync, Instant::now());
        let mut owners = HashMap::new();
        for &i in &merge.report {
            let f = &found[i];
            let (mut ev, owner, user) = self.ev.present(f, now, &mut owners);
            ev.portwatch.resync = resync;
            let Assessed {
                firewall,
                published,
                backs,
            } = self.write_assessed(ev);
            let key = f.socket.inode;
            if key != 0 {
                let held = Held {
                    owner,
                    user,
                    group: None,
                    transport: f.socket.transport.transport(),
                    udplite: f.socket.transport.is_udplite(),
                    addr: f.socket.addr,
                    port: f.socket.port,
                    v6only: f.v6only,
                    firewall,
                    published,
                    backs,
                };
                let tracked = Tracked {
                    ktime_ns: None,
                    netns: Some(f.netns_ino),
                    by_inode: true,
                    held,
                };
                self.core.track(key, tracked);
            }
        }
        let ended = merge.gone.len();
        for (key, o) in merge.gone {
            let socket = Socket {
                inode: Some(key),
                netns: o.netns,
                host_netns: o.netns.zip(self.ev.host_netns).map(|(a, b)| a == b),
                ..Socket::default()
            };
            let h = o.held;
            let action = match h.transport {
                Transport::Tcp => Action::ListenStopped,
                Transport::Udp => Action::UdpReleased,
            };
            let l = Listener {
                transport: h.transport,
                udplite: h.udplite,
                addr: h.addr,
                port: h.port,
                socket,
                user: h.user,
                group: h.group,
            };
            let mut ev = self.ev.listener_event(action, now, l, &h.owner);
            ev.portwatch.resync = true;
            ev.message = Some(
                "closed at an unknown time while events were being lost (found by resync)".into(),
            );
            self.write(ev);
        }
        self.check_unbacked();
        let reported = merge.report.len();
        if resync {
            self.state(
                Action::ResyncComplete,
                serde_json::json!({
                    "listeners_found": reported,
                    "listeners_ended": ended,
                    "already_known": merge.skipped,
                    "duration_ms": took.as_secs_f64() * 1e3,
                }),
            );
        } else {
            self.state(
                Action::SnapshotComplete,
                serde_json::json!({
                    "listeners": reported,
                    "already_reported_live": merge.skipped,
                    "duration_ms": took.as_secs_f64() * 1e3,
                }),
            );
        }
    }

    /// Periodic work: follow the wall clock, report losses, end the startup grace.
    pub fn tick(&mut self, stats: Option<KernelStats>, last: bool) {
        self.ev.enricher.clocks = crate::time::Clocks::now();
        self.output.check_files();
        if self
            .health
            .last_trim
            .is_none_or(|t| t.elapsed() >= TRIM_EVERY)
        {
            self.health.last_trim = Some(Instant::now());
            // SAFETY: malloc_trim only releases free heap memory (~1 ms here).
            unsafe { libc::malloc_trim(0) };
        }
        self.core.tick(Instant::now());
        // Loss reports wait until every destination's queue has room for them: a report
        // dropped by a full queue would take its count with it. Until then the counts
        // keep adding up (the kernel's in `stats`, ours in the fields and atomics).
        let room = self.output.has_room(LOSS_REPORTS_MAX);
        if room || last {
            self.report_losses(stats);
        }
        for (key, n) in self.assessor.quiet_folds(last) {
            let now = self.ev.now();
            let mut ev = self.ev.base(now, Action::RiskyListenerRepeated);
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
                transport: Protocol::new(key.transport, false),
                type_: if key.addr.is_ipv4() { "ipv4" } else { "ipv6" },
            });
            ev.server = Some(Server {
                ip: key.addr,
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
            self.write(ev);
        }
    }

    /// `events-lost` for everything lost since the last report, by reason (and, for
    /// output losses, by destination).
    fn report_losses(&mut self, stats: Option<KernelStats>) {
        for loss in self.core.losses(stats) {
            self.lost_event(loss.count, loss.reason, None, loss.lane);
        }
        // Output-side losses (reported only when every queue has room: see tick).
        let out = self.output.shared().clone();
        for sink in &out.sinks {
            let n = sink.queue_dropped.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_lane(n, "output-queue-full", Some(&sink.name), "bulk");
            }
            let n = sink.urgent_dropped.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_lane(n, "output-queue-full", Some(&sink.name), "urgent");
            }
            let n = sink.write_lost.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_in(n, "output-error", Some(&sink.name));
            }
            let n = sink.deleted_lost.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_in(n, "output-file-deleted", Some(&sink.name));
            }
            let n = sink.spool_full.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_in(n, "spool-full", Some(&sink.name));
            }
            // Damaged stretches of the spool (a write torn by a crash): each is at least
            // one event.
            let n = sink.spool_torn.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.lost_in(n, "spool-torn-record", Some(&sink.name));
            }
        }
    }

    /// `listeners-folded` for every kernel fold that grew (at most once a tick), or went
    /// quiet or lost its process (the final one); then delete the folds of processes that
    /// are gone. Each report is attributed like a listener event, and every risky port in
    /// the fold's set is classified like a listener, so its alert is raised.
    pub fn report_folds(&mut self, maps: &mut probes::FoldMaps, last: bool) {
        let kernel = maps.list();
        if kernel.is_empty() {
            return;
        }
        let refs: Vec<_> = kernel.iter().map(|(k, _, f)| (*k, f)).collect();
        let enricher = &self.ev.enricher;
        let (reports, delete) = self.folds.reports(&refs, Instant::now(), last, |k| {
            enricher.alive(k.tgid, k.start_boottime_ns)
        });
        for r in &reports {
            let Some((_, _, fold)) = kernel.iter().find(|(k, _, _)| *k == r.key) else {
                continue;
            };
            let budget = maps
                .budgets
                .get(&r.key.tgid, 0)
                .ok()
                .filter(|b| b.start_boottime_ns == r.key.start_boottime_ns);
            let folded = crate::kernel::folds::process_folded(&refs, &r.key);
            self.fold_event(r, fold, budget, folded);
        }
        for k in &delete {
            let Some((_, index, _)) = kernel.iter().find(|(key, _, _)| key == k) else {
                continue;
            };
            // One that fails while still indexed is listed, and retried, next tick.
            if let Err(e) = maps.delete(k, *index) {
                log::warn!("deleting the fold of pid {}: {e:#}", k.tgid);
            }
        }
    }

    fn fold_event(
        &mut self,
        r: &crate::kernel::folds::Report,
        fold: &portwatch_common::Fold,
        budget: Option<portwatch_common::Budget>,
        process_folded: u64,
    ) {
        use portwatch_common::{
            AF_INET, FLAG_KTHREAD, FLAG_NETNS, FLAG_PPID, IPPROTO_UDP, IPPROTO_UDPLITE,
        };
        let key = r.key;
        let udplite = key.protocol == IPPROTO_UDPLITE;
        let transport = if key.protocol == IPPROTO_UDP || udplite {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let addr = if key.family == AF_INET {
            std::net::IpAddr::from([fold.addr[0], fold.addr[1], fold.addr[2], fold.addr[3]])
        } else {
            std::net::IpAddr::from(fold.addr)
        };
        let comm_len = fold
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(fold.comm.len());
        // What the kernel captured at the first folded start: attribution as for a record.
        let rec = Record {
            kind: if transport == Transport::Tcp {
                Kind::ListenStarted
            } else {
                Kind::UdpBound
            },
            ktime_ns: fold.first_ns,
            pid: key.tgid,
            tid: key.tgid,
            uid: fold.uid_gid as u32,
            gid: (fold.uid_gid >> 32) as u32,
            cgroup_id: fold.cgroup_id,
            sock_key: 0,
            inode: None,
            start_boottime_ns: (key.start_boottime_ns != 0).then_some(key.start_boottime_ns),
            netns: (fold.flags & FLAG_NETNS != 0).then_some(fold.netns_ino),
            ppid: (fold.flags & FLAG_PPID != 0).then_some(fold.ppid),
            kthread: fold.flags & FLAG_KTHREAD != 0,
            v6only: false,
            untracked: false,
            urgent: true,
            udplite,
            implicit: false,
            transport,
            addr,
            port: 0,
            comm: fold.comm[..comm_len].to_vec(),
        };
        let owner = self.ev.enricher.owner_for_record(&rec);
        let user = Some(self.ev.enricher.user(rec.uid));
        let group = Some(self.ev.enricher.group(rec.gid));
        let (ports, port_count) = crate::kernel::folds::ranges(&fold.ports);
        let clocks = &self.ev.enricher.clocks;
        let info = crate::output::event::FoldInfo {
            started: r.started,
            ended: r.ended,
            started_total: r.started_total,
            ended_total: r.ended_total,
            ports,
            port_count,
            scope: crate::kernel::folds::scope_name(key.scope),
            first: crate::time::rfc3339(clocks.wall_from_ktime(fold.first_ns)),
            last: crate::time::rfc3339(clocks.wall_from_ktime(fold.last_ns)),
            budget: crate::kernel::folds::budget_names(fold.reason),
            final_: r.final_,
            process_sent: budget.map_or(0, |b| b.sent),
            process_folded,
            process_lost: budget.map_or(0, |b| b.lost),
        };
        let wall = self.ev.enricher.clocks.wall_from_ktime(fold.last_ns);
        let socket = Socket {
            netns: rec.netns.map(u64::from),
            host_netns: rec
                .netns
                .zip(self.ev.host_netns)
                .map(|(a, b)| u64::from(a) == b),
            kernel: rec.kthread,
            ..Socket::default()
        };
        let process_name = owner
            .process
            .as_ref()
            .and_then(|p| p.name.clone())
            .unwrap_or_default();
        // Every risky port inside the fold is classified as a listener of its own.
        let mut alerts = Vec::new();
        for port in crate::kernel::folds::ports(&fold.ports) {
            if !self.important_ports_has(port) {
                continue;
            }
            let l = Listener {
                transport,
                udplite,
                addr,
                port,
                socket: socket.clone(),
                user: user.clone(),
                group: group.clone(),
            };
            let mut probe = self.ev.listener_event(
                if transport == Transport::Tcp {
                    Action::ListenStarted
                } else {
                    Action::UdpBound
                },
                wall,
                l,
                &owner,
            );
            if let Some(mut alert) = self.assessor.assess(&mut probe) {
                alert.portwatch.urgent = true;
                alert.portwatch.fold = Some(info.clone());
                alerts.push(alert);
            }
        }
        let l = Listener {
            transport,
            udplite,
            addr,
            port: 0,
            socket,
            user,
            group,
        };
        let mut ev = self
            .ev
            .listener_event(Action::ListenersFolded, wall, l, &owner);
        ev.server = None;
        ev.event.category = &["network"];
        ev.event.type_ = &["info"];
        ev.message = Some(format!(
            "{} {} {} by {} folded ({} ended; ports {}){}",
            r.started,
            transport.as_str(),
            if transport == Transport::Tcp {
                "listeners"
            } else {
                "binds"
            },
            if process_name.is_empty() {
                format!("pid {}", key.tgid)
            } else {
                format!("{process_name} (pid {})", key.tgid)
            },
            r.ended,
            short_ports(&info.ports, info.port_count),
            if r.final_ { "; final" } else { "" }
        ));
        ev.portwatch.fold = Some(info);
        ev.portwatch.urgent = true;
        self.write(ev);
        for a in alerts {
            self.write(a);
        }
    }

    fn important_ports_has(&self, port: u16) -> bool {
        self.ev
            .important_ports
            .get(usize::from(port) / 64)
            .is_some_and(|w| w & (1 << (port % 64)) != 0)
    }

    /// Whether a resync is due (a loss since the last one); clears the request.
    pub fn take_resync(&mut self) -> bool {
        self.core.take_resync()
    }

    /// `sensor-health`: what a monitoring system needs to trust the stream.
    pub fn health(&mut self, hooks: &[String], degraded: &[String]) {
        let now = Instant::now();
        let rate = self.health.last.map_or(0.0, |t| {
            let secs = now.duration_since(t).as_secs_f64();
            (self.health.records - self.health.records_at_last) as f64 / secs.max(1e-9)
        });
        self.health.last = Some(now);
        self.health.records_at_last = self.health.records;
        let out = self.output.shared().clone();
        let (cpu, rss) = host::self_usage();
        let stats = serde_json::json!({
            "hooks_attached": hooks,
            "degraded": degraded,
            "records_received": self.health.records,
            "records_per_sec": (rate * 10.0).round() / 10.0,
            "events_written": out.sinks.iter().map(|s| s.written.load(Ordering::Relaxed)).max(),
            "lost_total": self.core.lost_total(),
            "queue_depth": out.sinks.iter().map(|s| s.depth.load(Ordering::Relaxed)).max(),
            "output_write_errors": out.sinks.iter().map(|s| s.write_errors.load(Ordering::Relaxed)).sum::<u64>(),
            "sinks": out.sinks.iter().map(|s| serde_json::json!({
                "name": s.name,
                "connected": s.connected.load(Ordering::Relaxed),
                "written": s.written.load(Ordering::Relaxed),
                "queue_depth": s.depth.load(Ordering::Relaxed),
                "spooled": s.spooled.load(Ordering::Relaxed),
                "write_errors": s.write_errors.load(Ordering::Relaxed),
            })).collect::<Vec<_>>(),
            "listeners_open": self.core.open_len(),
            "resyncs": self.core.resyncs(),
            "cpu_seconds": cpu,
            "rss_bytes": rss,
        });
        let wall = self.ev.now();
        let mut ev = self.ev.base(wall, Action::SensorHealth);
        if !degraded.is_empty() {
            ev.log = Some(crate::output::event::Log {
                level: Level::Warning,
            });
            ev.message = Some(format!("running degraded: {}", degraded.join("; ")));
        }
        ev.portwatch.stats = Some(stats);
        self.write(ev);
    }

    /// SIGHUP: read the rules file again. A bad file keeps the rules in force and says
    /// so in a `config-error` event.
    pub fn reload_rules(&mut self) {
        let Some(path) = self.rules_path.clone() else {
            return;
        };
        let wall = self.ev.now();
        match crate::classify::load_rules(&path) {
            Ok(policy) => {
                self.assessor.set_policy(Some(policy));
                self.ev.important_ports = self.assessor.important_ports();
                log::info!("rules reloaded from {}", path.display());
                let mut ev = self.ev.base(wall, Action::RulesReloaded);
                ev.message = Some(format!("rules reloaded from {}", path.display()));
                self.write(ev);
            }
            Err(e) => {
                log::error!("{e}; keeping the rules in force");
                let mut ev = self.ev.base(wall, Action::ConfigError);
                ev.log = Some(crate::output::event::Log {
                    level: Level::Error,
                });
                ev.message = Some(format!("{e}; the previous rules stay in force"));
                self.write(ev);
            }
        }
    }

    /// An `events-lost` event; `sink` names the output that lost them, for output losses
    /// (the other sinks may have written those events).
    fn lost_in(&mut self, count: u64, reason: &'static str, sink: Option<&str>) {
        self.lost_event(count, reason, sink, None);
    }

    fn lost_lane(
        &mut self,
        count: u64,
        reason: &'static str,
        sink: Option<&str>,
        lane: &'static str,
    ) {
        self.lost_event(count, reason, sink, Some(lane));
    }

    fn lost_event(
        &mut self,
        count: u64,
        reason: &'static str,
        sink: Option<&str>,
        lane: Option<&'static str>,
    ) {
        let total = self.core.count_lost(count);
        if let Some(m) = &self.metrics {
            m.lost(reason, count);
        }
        let now = self.ev.now();
        let mut ev = self.ev.base(now, Action::EventsLost);
        ev.log = Some(crate::output::event::Log {
            level: Level::Warning,
        });
        let at = sink.map(|s| format!(" at {s}")).unwrap_or_default();
        let lane_text = lane.map(|l| format!(", {l} lane")).unwrap_or_default();
        ev.message = Some(format!(
            "{count} events lost{at} ({reason}{lane_text}); {total} since start"
        ));
        ev.portwatch.lost = Some(Lost {
            count,
            total,
            reason,
            sink: sink.map(str::to_owned),
            lane,
        });
        ev.portwatch.urgent = true;
        self.write(ev);
    }
}

/// A fold's port list for a one-line message: the first ranges, then how many more
/// ports (the whole list is in `portwatch.fold.ports`).
fn short_ports(ranges: &str, count: u32) -> String {
    const SHOWN: usize = 8;
    let parts: Vec<&str> = ranges.split(',').collect();
    if parts.len() <= SHOWN {
        return ranges.to_owned();
    }
    let shown = parts[..SHOWN].join(",");
    let in_shown: u32 = parts[..SHOWN]
        .iter()
        .map(|p| match p.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (
                    lo.parse::<u32>().unwrap_or(0),
                    hi.parse::<u32>().unwrap_or(0),
                );
                (hi + 1).saturating_sub(lo)
            }
            None => 1,
        })
        .sum();
    format!("{shown},... {} more", count.saturating_sub(in_shown))
}

/// What a listener's event returns to the table of open listeners.
struct Assessed {
    firewall: Option<Arc<crate::classify::firewall::Firewall>>,
    published: Option<Arc<Publication>>,
    backs: Vec<PubKey>,
}

fn fmt_endpoint(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// "published on 203.0.113.5:6379 by ... (accepted)".
fn publication_text(p: &Publication) -> String {
    let host = fmt_endpoint(p.host.ip, p.host.port);
    let mut s = format!(
        "published on host port {host} ({} source) by {}: {}",
        p.source,
        p.rule.short(),
        p.verdict.as_str()
    );
    if let Some(r) = &p.filter_rule {
        s.push_str(&format!(" ({})", r.short()));
    }
    if let Some(v) = p.local_verdict {
        s.push_str(&format!("; from local processes: {}", v.as_str()));
    }
    s
}

fn o_transport(n: Option<&Network>) -> &'static str {
    n.map_or("?", |n| n.transport.as_str())
}

/// How long the start-up self-check waits for the agent's own listener and bind.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Fewest seconds between two resyncs: each one re-reads /proc for the whole host.
const RESYNC_MIN_GAP: Duration = Duration::from_secs(10);

/// Drain everything the ring holds now (up to BATCH_MAX) into the output batch. The
/// batch goes to the writers at the top of the event loop, or when it is full: waking a
/// writer thread per small drain cost more CPU than the events themselves (the writer
/// shares a core with the event loop on a busy 2-core machine).
fn drain(
    ring: &mut RingBuf<MapData>,
    urgent: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
) -> usize {
    // Important records first, all of them: budgets keep them few.
    while let Some(item) = urgent.next() {
        pipeline.handle(&item);
    }
    let mut n = 0;
    while n < BATCH_MAX {
        let Some(item) = ring.next() else { break };
        pipeline.handle(&item);
        n += 1;
    }
    n
}

/// Drain; when `busy`, go on polling every NAP until the ring has stayed empty for
/// POLL_QUIET. Returns true when records are still waiting (a full batch, or the POLL_MAX
/// budget ran out while they kept coming), so the caller yields to the other event-loop
/// branches. Each nap hands what was drained to the writers first.
fn drain_for(
    ring: &mut RingBuf<MapData>,
    urgent: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
    busy: bool,
) -> bool {
    if drain(ring, urgent, pipeline) == BATCH_MAX {
        return true;
    }
    if !busy {
        return false;
    }
    let start = Instant::now();
    let mut quiet_since = start;
    loop {
        match drain(ring, urgent, pipeline) {
            BATCH_MAX => return true,
            0 => {}
            _ => quiet_since = Instant::now(),
        }
        let now = Instant::now();
        if now.duration_since(quiet_since) >= POLL_QUIET {
            return false;
        }
        if now.duration_since(start) >= POLL_MAX {
            return true;
        }
        pipeline.flush_output();
        std::thread::sleep(NAP);
    }
}

/// The two ring buffers: bulk records, and important ones (drained first).
struct Rings {
    bulk: RingBuf<MapData>,
    urgent: RingBuf<MapData>,
}

/// What the event loop needs besides the pipeline.
struct RunConfig {
    /// New rulesets from the firewall watcher thread.
    firewall: tokio::sync::mpsc::UnboundedReceiver<crate::classify::firewall::watch::Update>,
    ring_bytes: u32,
    snapshot: bool,
    health_interval: Option<Duration>,
    allow_degraded: bool,
}

pub async fn watch(opts: WatchOptions) -> anyhow::Result<()> {
    // Opened first: an unwritable output is reported before anything is loaded.
    let output = Output::new(
        opts.format,
        &opts.sinks,
        opts.queue_events,
        false,
        &opts.delivery,
    )?;
    // Bound before loading (a bad or busy address fails first; a port below 1024 still
    // may be bound), served after the capability drop (its threads inherit the set).
    let metrics_listener = opts
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let sensor = probes::load(&probes::Options {
        ring_bytes: opts.ring_bytes,
        hooks: opts.hooks,
        fold_above: opts.fold_above,
        fold_user_above: opts.fold_user_above,
    })?;
    // Loaded and attached: what is left needs only /proc and namespaces. Done before any
    // other thread exists, so every thread runs with the reduced set.
    host::drop_capabilities(host::RUNTIME_CAPS)?;
    let probes::Sensor {
        ebpf,
        ring,
        urgent,
        mut folds,
        stats: sensor_stats,
        sleep_flag,
        logger,
        cgroup_root,
        hooks,
        ..
    } = sensor;
    let WatchOptions {
        policy,
        ring_bytes,
        snapshot,
        health_interval,
        allow_degraded,
        ..
    } = opts;
    let mut pipeline = Pipeline::new(output, cgroup_root.clone(), policy);
    pipeline.hooks = Some(hooks);
    // The host firewall: rulesets are read and followed by their own thread, which hands
    // the event loop whole new rulesets.
    let (fw_tx, fw_rx) = tokio::sync::mpsc::unbounded_channel();
    let fw_watch = crate::classify::firewall::watch::spawn(move |u| fw_tx.send(u).is_ok())
        .context("starting the firewall watcher thread")?;
    pipeline.enable_firewall(Some(fw_watch));
    folds.set_risky(pipeline.important_ports())?;
    pipeline.output.start()?;
    if let Some(listener) = metrics_listener {
        let m = Arc::new(crate::metrics::Metrics::new());
        crate::metrics::serve(listener, m.clone())?;
        pipeline.set_metrics(m);
    }
    // Loading parsed several MiB of kernel BTF that is now free: hand it back to the
    // system so the resident size of a long-running agent reflects its real state.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    let config = RunConfig {
        firewall: fw_rx,
        ring_bytes,
        snapshot,
        health_interval,
        allow_degraded,
    };
    let result = run(
        &mut pipeline,
        Rings { bulk: ring, urgent },
        &mut folds,
        &sensor_stats,
        sleep_flag,
        logger,
        config,
    )
    .await;
    // Final loss report, even after an error in the loop.
    let kernel = sensor_stats.read().ok();
    log::info!("kernel-side counters at exit: {kernel:?}");
    pipeline.report_folds(&mut folds, true);
    pipeline.tick(kernel, true);
    // The stream's last line: a SIEM tells a stopped sensor from a dead or blinded one
    // (a missing heartbeat without this event).
    let why = match &result {
        Ok(why) => why,
        Err(e) if e.is::<Closed>() => "stdout-closed",
        Err(_) => "error",
    };
    pipeline.sensor_stopped(why);
    drop(ebpf); // detaches every program (bpf_link fds close)
    let flushed = pipeline.finish_output();
    match result.map(|_| ()).and(flushed) {
        Err(e) if e.is::<Closed>() => Ok(()),
        other => other,
    }
}

/// The agent's own loopback listener and bind, used to prove the hooks deliver.
struct SelfCheck {
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
}

impl SelfCheck {
    fn open() -> anyhow::Result<SelfCheck> {
        let tcp = std::net::TcpListener::bind(("127.0.0.1", 0))
            .context("self-check: opening a loopback TCP listener")?;
        let udp = std::net::UdpSocket::bind(("127.0.0.1", 0))
            .context("self-check: binding a loopback UDP socket")?;
        Ok(SelfCheck { tcp, udp })
    }

    fn ports(&self) -> (u16, u16) {
        let port = |a: std::io::Result<std::net::SocketAddr>| a.map_or(0, |a| a.port());
        (port(self.tcp.local_addr()), port(self.udp.local_addr()))
    }

    /// Socket inodes: how the agent knows its own records, whatever pid namespace it
    /// runs in.
    fn inodes(&self) -> (u64, u64) {
        use std::os::fd::AsRawFd as _;
        let ino = |fd: i32| {
            // SAFETY: fstat fills the struct it is given; fd is open for the call.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(fd, &mut st) } == 0 {
                st.st_ino
            } else {
                0
            }
        };
        (ino(self.tcp.as_raw_fd()), ino(self.udp.as_raw_fd()))
    }
}

/// Open a listener and a UDP bind, and wait until the ring brings both back. Returns the
/// hooks that delivered nothing (empty: all good).
async fn self_check(
    ring: &mut RingBuf<MapData>,
    urgent: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
) -> anyhow::Result<Vec<String>> {
    let check = SelfCheck::open()?;
    let (tcp, udp) = check.ports();
    let (tcp_ino, udp_ino) = check.inodes();
    pipeline.expect_own(&[tcp_ino, udp_ino]);
    let t0 = Instant::now();
    let (mut tcp_ok, mut udp_ok) = (false, false);
    while t0.elapsed() < SELF_CHECK_TIMEOUT {
        drain(ring, urgent, pipeline);
        (tcp_ok, udp_ok) = pipeline.own_seen(tcp_ino, udp_ino);
        if tcp_ok && udp_ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(check);
    let mut broken = Vec::new();
    if !tcp_ok {
        broken.push(format!(
            "the TCP listen hooks reported nothing for the agent's own listener on 127.0.0.1:{tcp} within {SELF_CHECK_TIMEOUT:?}"
        ));
    }
    if !udp_ok {
        broken.push(format!(
            "the UDP bind hooks reported nothing for the agent's own bind on 127.0.0.1:{udp} within {SELF_CHECK_TIMEOUT:?}"
        ));
    }
    log::info!(
        "self-check: {} in {:.1} ms",
        if broken.is_empty() {
            "passed"
        } else {
            "FAILED"
        },
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(broken)
}

/// Start a /proc scan on a blocking thread; its result arrives on the returned channel.
fn spawn_scan() -> tokio::sync::oneshot::Receiver<(std::io::Result<Vec<scan::Found>>, Duration)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let res = scan::scan();
        // The receiver is gone only if the agent is already shutting down.
        let _ = tx.send((res, t.elapsed()));
    });
    rx
}

async fn run(
    pipeline: &mut Pipeline,
    rings: Rings,
    folds: &mut probes::FoldMaps,
    stats: &probes::StatsReader,
    mut sleep_flag: probes::SleepFlag,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    mut config: RunConfig,
) -> anyhow::Result<&'static str> {
    let mut last_wake = Instant::now() - BUSY_GAP;
    // Records are submitted without a wake-up unless this flag is up: raise it before
    // the first wait, and pick up whatever arrived before the ring was registered.
    // SAFETY: the ring buffer and the logger own their map fds and never close or
    // replace them while registered; both live until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(rings.bulk, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the event loop: {e}"))?;
    // SAFETY: as above.
    let mut urgent = unsafe { AsyncFd::register_with_interest(rings.urgent, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the urgent ring buffer: {e}"))?;
    let mut logger = match logger {
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the eBPF log buffer: {e}"))?,
        ),
        None => None,
    };
    let mut notifier = crate::pipeline::notify::Notifier::from_env()
        .context("NOTIFY_SOCKET names a socket the agent cannot use")?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let health_every = config.health_interval.unwrap_or(Duration::from_secs(3600));
    let mut health =
        tokio::time::interval_at(tokio::time::Instant::now() + health_every, health_every);
    let out = pipeline.output_shared();

    // Every live start from the moment the probes attached is remembered until the
    // snapshot is merged, so the snapshot never reports one a second time.
    if config.snapshot {
        pipeline.snapshot_started(false);
    }
    // (The flag stays up while draining here: at worst a spare wake-up.)
    sleep_flag.going_to_sleep()?;
    drain(ring.get_mut(), urgent.get_mut(), pipeline);

    // Prove the hooks deliver before claiming to watch.
    let degraded = self_check(ring.get_mut(), urgent.get_mut(), pipeline).await?;
    if !degraded.is_empty() && !config.allow_degraded {
        anyhow::bail!(
            "self-check failed: {}; the kernel accepted the hooks but they deliver nothing \
             (run with --allow-degraded to keep running anyway)",
            degraded.join("; ")
        );
    }
    for d in &degraded {
        log::warn!("running degraded: {d}");
    }
    pipeline.sensor_started(serde_json::json!({
        "self_check": if degraded.is_empty() { "passed" } else { "failed" },
        "degraded": degraded,
        "ring_buffer_bytes": config.ring_bytes,
        "pid": std::process::id(),
    }));
    // Only now, with the hooks proven, does the service manager hear the sensor is up.
    let status = if degraded.is_empty() {
        "watching: self-check passed".to_owned()
    } else {
        format!("watching, degraded: {}", degraded.join("; "))
    };
    if let Err(e) = notifier.ready(&status) {
        log::warn!("telling the service manager the sensor is ready: {e}");
    }

    let attached: Vec<String> = pipeline
        .hooks
        .as_ref()
        .map(|h| h.attached.clone())
        .unwrap_or_default();

    // Probes are attached and the ring is being drained: now read what already exists.
    let mut scan = config.snapshot.then(spawn_scan);
    let mut scan_is_resync = false;
    let mut last_resync: Option<Instant> = None;
    let mut ticks: u64 = 0;

    let why = loop {
        // Whatever the last branch wrote goes to the writers before waiting again.
        pipeline.flush_output();
        tokio::select! {
            biased;
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = out.closed_notify.notified() => break "stdout-closed",
            guard = urgent.readable_mut() => {
                let mut guard = guard.context("waiting on the urgent ring buffer")?;
                drain(ring.get_mut(), guard.get_inner_mut(), pipeline);
                guard.clear_ready();
                // A record committed after the drain re-arms readiness on its own
                // (default wake-up): nothing is left behind.
                drain(ring.get_mut(), guard.get_inner_mut(), pipeline);
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                sleep_flag.awake()?;
                // Events arriving faster than every BUSY_GAP: keep reading for a moment
                // instead of blocking, so the kernel side need not wake us per record.
                let busy = last_wake.elapsed() < BUSY_GAP;
                last_wake = Instant::now();
                if drain_for(guard.get_inner_mut(), urgent.get_mut(), pipeline, busy) {
                    continue; // more is waiting: stay ready, let signals and timers in
                }
                sleep_flag.going_to_sleep()?;
                if drain(guard.get_inner_mut(), urgent.get_mut(), pipeline) == 0 {
                    guard.clear_ready();
                } else {
                    sleep_flag.awake()?;
                }
            }
            res = async { scan.as_mut().expect("guarded by is_some").await }, if scan.is_some() => {
                scan = None;
                let (found, took) = res.context("snapshot task vanished")?;
                match found {
                    Ok(found) => {
                        // The startup snapshot's only: a resync finds listeners whose
                        // listen() was seen, whose ends `listen_ops` reports itself.
                        let refused = if scan_is_resync {
                            0
                        } else {
                            folds.remember_old_listeners(&found)
                        };
                        if refused > 0 {
                            log::warn!(
                                "{refused} listeners found by /proc did not fit the kernel's \
                                 OLD_LISTENERS map: if one is shut down without a close, its \
                                 end will not be reported"
                            );
                        }
                        pipeline.merge_snapshot(found, took, scan_is_resync);
                    }
                    // At start a failed scan is fatal (the user asked for it); a resync
                    // that fails is retried after the next loss.
                    Err(e) if scan_is_resync => log::error!("resync: reading /proc: {e}"),
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context("reading the listeners already open from /proc"));
                    }
                }
            }
            _ = sighup.recv() => {
                out.reopen.fetch_add(1, Ordering::Relaxed);
                pipeline.reload_rules();
                if let Err(e) = folds.set_risky(pipeline.important_ports()) {
                    log::error!("{e:#}");
                }
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
            Some(update) = config.firewall.recv() => pipeline.firewall_changed(update),
            _ = health.tick(), if config.health_interval.is_some() => {
                pipeline.health(&attached, &degraded);
            }
            _ = tick.tick() => {
                if let Err(e) = notifier.watchdog() {
                    log::warn!("service manager watchdog: {e}");
                }
                pipeline.report_folds(folds, false);
                // Totals: a failed read loses nothing, the next one reports it.
                let kernel = stats
                    .read()
                    .inspect_err(|e| log::warn!("reading the kernel-side counters: {e:#}"))
                    .ok();
                pipeline.tick(kernel, false);
                pipeline.update_gauges(attached.len(), degraded.len());
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    pipeline.retain_watched();
                }
                // After a loss the open-listener table may be wrong: re-read /proc (no
                // more often than RESYNC_MIN_GAP; the request waits until then).
                let due = last_resync.is_none_or(|t| t.elapsed() >= RESYNC_MIN_GAP);
                if scan.is_none() && due && pipeline.take_resync() {
                    log::info!("events were lost: re-reading the listeners from /proc");
                    pipeline.snapshot_started(true);
                    scan = Some(spawn_scan());
                    scan_is_resync = true;
                    last_resync = Some(Instant::now());
                }
            }
        }
    };
    if let Err(e) = notifier.stopping() {
        log::warn!("telling the service manager the sensor is stopping: {e}");
    }
    // Whatever the kernel wrote before we stopped still goes out.
    while drain(ring.get_mut(), urgent.get_mut(), pipeline) == BATCH_MAX {}
    Ok(why)
}

#[cfg(test)]
mod tests {
    use super::short_ports;

    #[test]
    fn fold_messages_show_the_first_ranges_and_count_the_rest() {
        assert_eq!(short_ports("1-3,7", 4), "1-3,7");
        let many = "1,3,5,7,9,11,13,15-20,30,40";
        // Shown: 7 singles + 15-20 (6 ports) = 13 of 15.
        assert_eq!(short_ports(many, 15), "1,3,5,7,9,11,13,15-20,... 2 more");
    }
}
