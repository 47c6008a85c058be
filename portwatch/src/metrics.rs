//! `--metrics ADDR`: the agent's own figures (events by action and transport, alerts by
//! rule, losses, queue depth, hooks, cache sizes, CPU and memory) for Prometheus to
//! scrape.
//!
//! The registry and the exposition text come from `prometheus-client`, the Prometheus
//! org's Rust client: Prometheus text 0.0.4 by default, OpenMetrics 1.0 when the scraper
//! asks for it in `Accept` (Prometheus does).
//!
//! The event loop handles ~200k events/s at full churn, so recording an event is one
//! relaxed atomic add on a counter resolved at start: every (action, transport) pair the
//! agent writes and every loss reason has its counter made in [`Metrics::new`], found by
//! a `match`, never by hashing a label set. Only alerts (a few rules, at most one alert a
//! minute per listener) go through a label family.
//!
//! Serving runs on its own std threads, not on the agent's current-thread runtime: a
//! slow or hostile client then costs a parked thread, never a stall of the ring drain,
//! and rendering (tens of µs) never competes with the event loop for its thread.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, prometheus_text, text},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::{Registry, Unit},
};

use crate::{
    output::{event::Action, sinks::OutputShared},
    socket::Protocol,
};

/// `Content-Type` of the OpenMetrics text format (the crate names only the Prometheus
/// one).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value for events that have no transport (agent state, health, losses).
const NO_TRANSPORT: &str = "none";

/// Every (action, transport) the agent writes, each with a counter made at start so that
/// a scrape shows it at 0 before the first one (Prometheus' advice: no series appearing
/// from nowhere) and the hot path needs no lookup. Index = [`event_slot`].
const EVENT_SERIES: &[(Action, Option<Protocol>)] = &[
    (Action::ListenStarted, Some(Protocol::Tcp)),
    (Action::ListenStopped, Some(Protocol::Tcp)),
    (Action::UdpBound, Some(Protocol::Udp)),
    (Action::UdpReleased, Some(Protocol::Udp)),
    (Action::ListenerPresent, Some(Protocol::Tcp)),
    (Action::ListenerPresent, Some(Protocol::Udp)),
    (Action::RiskyListener, Some(Protocol::Tcp)),
    (Action::RiskyListener, Some(Protocol::Udp)),
    (Action::RiskyListenerRepeated, Some(Protocol::Tcp)),
    (Action::RiskyListenerRepeated, Some(Protocol::Udp)),
    (Action::EventsLost, None),
    (Action::SensorStarted, None),
    (Action::SensorHealth, None),
    (Action::SnapshotComplete, None),
    (Action::ResyncComplete, None),
    (Action::RulesReloaded, None),
    (Action::ConfigError, None),
];

/// Where [`EVENT_SERIES`] keeps (action, transport); None for a pair not in it (counted
/// through the family: correct, only slower).
fn event_slot(action: Action, transport: Option<Protocol>) -> Option<usize> {
    EVENT_SERIES
        .iter()
        .position(|&(a, t)| a == action && t == transport)
}

fn transport_label(t: Option<Protocol>) -> &'static str {
    t.map_or(NO_TRANSPORT, Protocol::as_str)
}

/// Loss reasons (as in `portwatch.lost.reason`) and the side of the ring buffer where
/// the events were lost: the kernel could not deliver them, or the agent dropped them.
const LOSS_SERIES: &[(&str, &str)] = &[
    ("ring-buffer-full", "kernel"),
    ("kernel-map-full", "kernel"),
    ("hook-run-skipped", "kernel"),
    ("output-queue-full", "userspace"),
    ("output-error", "userspace"),
    ("spool-full", "userspace"),
    ("spool-torn-record", "userspace"),
    ("decode-error", "userspace"),
    ("untracked", "userspace"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    action: &'static str,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    reason: &'static str,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FirewallLabels {
    firewall: &'static str,
}

type U64Gauge = Gauge<u64, AtomicU64>;

/// The figures the event loop knows and a scrape cannot read for itself, set together
/// by [`Metrics::set_gauges`] (once a second is plenty: Prometheus scrapes every 15 s or
/// so). CPU time and RSS are not here: each scrape reads them for the whole process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Events queued for the output thread and not yet written.
    pub queue_depth: u64,
    /// Hooks (programs) attached.
    pub hooks_attached: u64,
    /// Hooks the self-check found silent (`--allow-degraded`).
    pub hooks_degraded: u64,
    /// Listeners the agent tracks as open.
    pub open_listeners: u64,
    /// Entries in the process cache (`enrich::PROC_CACHE_MAX` at most).
    pub process_cache: u64,
    /// Entries in the cgroup cache (`enrich::CGROUP_CACHE_MAX` at most).
    pub cgroup_cache: u64,
    /// Open listeners exposed beyond loopback, by the host firewall's verdict.
    pub exposed_accepted: u64,
    pub exposed_filtered: u64,
    pub exposed_unknown: u64,
    /// Open listeners behind a NAT publication, by its verdict.
    pub published_accepted: u64,
    pub published_filtered: u64,
    pub published_unknown: u64,
    /// Published host ports with nothing listening behind them.
    pub published_without_listener: u64,
    /// Events written since start (a counter: only its increases are taken).
    pub events_written: u64,
    /// Failed write(2) calls of the output since start (a counter, likewise).
    pub output_write_errors: u64,
}

impl Gauges {
    /// The output side's figures (queue depth, events written, write errors); the caller
    /// fills in the rest.
    pub fn from_output(out: &OutputShared) -> Gauges {
        Gauges {
            // Per destination they differ; the worst queue, the most written, all errors.
            queue_depth: out
                .sinks
                .iter()
                .map(|s| s.depth.load(Ordering::Relaxed) as u64)
                .max()
                .unwrap_or(0),
            events_written: out
                .sinks
                .iter()
                .map(|s| s.written.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            output_write_errors: out
                .sinks
                .iter()
                .map(|s| s.write_errors.load(Ordering::Relaxed))
                .sum(),
            ..Gauges::default()
        }
    }
}

/// The agent's metrics. `Send + Sync`: the event loop records into an `Arc<Metrics>`,
/// the serving thread renders from the same one.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    /// Handles to the counters of [`EVENT_SERIES`] (a clone shares the atomic).
    event_counters: Box<[Counter]>,
    alerts: Family<AlertLabels, Counter>,
    lost: Family<LostLabels, Counter>,
    /// Handles to the counters of [`LOSS_SERIES`].
    lost_counters: Box<[Counter]>,
    events_written: Counter,
    output_write_errors: Counter,
    queue_depth: U64Gauge,
    hooks_attached: U64Gauge,
    hooks_degraded: U64Gauge,
    open_listeners: U64Gauge,
    process_cache: U64Gauge,
    cgroup_cache: U64Gauge,
    /// When the event loop last ticked, in ms since `born` (`/healthz`).
    heartbeat_ms: AtomicU64,
    born: Instant,
    /// accepted, filtered, unknown.
    exposed: [U64Gauge; 3],
    /// accepted, filtered, unknown.
    published: [U64Gauge; 3],
    unbacked: U64Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portwatch");

        let events = Family::<EventLabels, Counter>::default();
        let event_counters = EVENT_SERIES
            .iter()
            .map(|&(action, transport)| {
                events.get_or_create_owned(&EventLabels {
                    action: action.as_str(),
                    transport: transport_label(transport),
                })
            })
            .collect();
        registry.register(
            "events",
            "Events the agent produced for output, by event.action and network.transport \
             (none: agent events); those the output then dropped are in \
             portwatch_events_lost_total",
            events.clone(),
        );

        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register(
            "alerts",
            "Risky-listener alerts raised, by rule.id (repeats folded into a later alert \
             are not counted)",
            alerts.clone(),
        );

        let lost = Family::<LostLabels, Counter>::default();
        let lost_counters = LOSS_SERIES
            .iter()
            .map(|&(reason, side)| lost.get_or_create_owned(&LostLabels { reason, side }))
            .collect();
        registry.register(
            "events_lost",
            "Events lost, by portwatch.lost.reason and side (kernel: never reached the \
             ring buffer or the agent; userspace: dropped by the agent)",
            lost.clone(),
        );

        let events_written = Counter::default();
        registry.register(
            "events_written",
            "Events written to the output",
            events_written.clone(),
        );
        let output_write_errors = Counter::default();
        registry.register(
            "output_write_errors",
            "Failed writes to the output (disk full, I/O error)",
            output_write_errors.clone(),
        );

        let queue_depth = U64Gauge::default();
        registry.register(
            "output_queue_depth",
            "Events queued for the output thread and not yet written",
            queue_depth.clone(),
        );
        let hooks_attached = U64Gauge::default();
        registry.register(
            "hooks_attached",
            "Kernel hooks attached",
            hooks_attached.clone(),
        );
        let hooks_degraded = U64Gauge::default();
        registry.register(
            "hooks_degraded",
            "Attached hooks that the start-up self-check found silent (running with \
             --allow-degraded)",
            hooks_degraded.clone(),
        );
        let open_listeners = U64Gauge::default();
        registry.register(
            "listeners_open",
            "Listeners the agent tracks as open",
            open_listeners.clone(),
        );

        let caches = Family::<CacheLabels, U64Gauge>::default();
        let process_cache = caches.get_or_create_owned(&CacheLabels { cache: "process" });
        let cgroup_cache = caches.get_or_create_owned(&CacheLabels { cache: "cgroup" });
        let exposed_family = Family::<FirewallLabels, U64Gauge>::default();
        let exposed = ["accepted", "filtered", "unknown"]
            .map(|firewall| exposed_family.get_or_create_owned(&FirewallLabels { firewall }));
        registry.register(
            "listeners_exposed",
            "Open listeners reachable beyond loopback, by the host firewall's verdict for a new \
             connection from where they are exposed (accepted, filtered, unknown)",
            exposed_family,
        );
        let published_family = Family::<FirewallLabels, U64Gauge>::default();
        let published = ["accepted", "filtered", "unknown"]
            .map(|firewall| published_family.get_or_create_owned(&FirewallLabels { firewall }));
        registry.register(
            "listeners_published",
            "Open listeners behind a host port a NAT rule publishes, by the verdict for a new \
             connection to that port (accepted, filtered, unknown)",
            published_family,
        );
        let unbacked = U64Gauge::default();
        registry.register(
            "published_without_listener",
            "Host ports a NAT rule publishes to an address and port where nothing listens",
            unbacked.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries in the attribution caches, by cache (process, cgroup)",
            caches,
        );

        registry.register_collector(Box::new(ProcessCollector));

        Metrics {
            registry,
            events,
            event_counters,
            alerts,
            lost,
            lost_counters,
            events_written,
            output_write_errors,
            queue_depth,
            hooks_attached,
            hooks_degraded,
            open_listeners,
            process_cache,
            cgroup_cache,
            heartbeat_ms: AtomicU64::new(0),
            born: Instant::now(),
            exposed,
            published,
            unbacked,
        }
    }

    /// The event loop turned (once a second, from its tick).
    pub fn beat(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the event loop last turned (since start when it never did).
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// One event produced for output: its `event.action` and `network.transport`.
    /// For the agent's event actions this is one atomic add.
    #[inline]
    pub fn event(&self, action: Action, transport: Option<Protocol>) {
        match event_slot(action, transport) {
            Some(i) => {
                self.event_counters[i].inc();
            }
            None => {
                self.event_slow(action, transport);
            }
        }
    }

    #[cold]
    fn event_slow(&self, action: Action, transport: Option<Protocol>) {
        let labels = EventLabels {
            action: action.as_str(),
            transport: transport_label(transport),
        };
        self.events.get_or_create(&labels).inc();
    }

    /// One alert raised by `rule` (`rule.id`).
    pub fn alert(&self, rule: &str) {
        let labels = AlertLabels {
            rule: rule.to_owned(),
        };
        self.alerts.get_or_create(&labels).inc();
    }

    /// `count` events lost for `reason` (as in `portwatch.lost.reason`).
    pub fn lost(&self, reason: &'static str, count: u64) {
        match LOSS_SERIES.iter().position(|&(r, _)| r == reason) {
            Some(i) => {
                self.lost_counters[i].inc_by(count);
            }
            None => {
                let labels = LostLabels {
                    reason,
                    side: "unknown",
                };
                self.lost.get_or_create(&labels).inc_by(count);
            }
        }
    }

    /// The figures the event loop keeps (see [`Gauges`]).
    pub fn set_gauges(&self, g: Gauges) {
        self.queue_depth.set(g.queue_depth);
        self.hooks_attached.set(g.hooks_attached);
        self.hooks_degraded.set(g.hooks_degraded);
        self.open_listeners.set(g.open_listeners);
        self.process_cache.set(g.process_cache);
        self.cgroup_cache.set(g.cgroup_cache);
        for (gauge, v) in
            self.exposed
                .iter()
                .zip([g.exposed_accepted, g.exposed_filtered, g.exposed_unknown])
        {
            gauge.set(v);
        }
        for (gauge, v) in self.published.iter().zip([
            g.published_accepted,
            g.published_filtered,
            g.published_unknown,
        ]) {
            gauge.set(v);
        }
        self.unbacked.set(g.published_without_listener);
        // Counters never go back, whatever order two callers store in.
        self.events_written
            .inner()
            .fetch_max(g.events_written, Ordering::Relaxed);
        self.output_write_errors
            .inner()
            .fetch_max(g.output_write_errors, Ordering::Relaxed);
    }

    /// The exposition in the Prometheus text format 0.0.4
    /// ([`prometheus_text::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The exposition in the OpenMetrics text format 1.0 ([`OPENMETRICS_CONTENT_TYPE`]),
    /// `# EOF` included.
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// CPU time and resident memory of the whole agent, read at each scrape (getrusage and
/// /proc/self/statm are process-wide, so any thread can read them).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (cpu, rss) = crate::kernel::host::self_usage();
        let cpu = ConstCounter::new(cpu);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "CPU time used by the agent, user and system, all threads",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(rss);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory of the agent",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        Ok(())
    }
}

/// How long a client has to send its request (the whole request, not each read): a
/// scraper sends it in one packet; a client that trickles bytes is cut off.
/// `/healthz` answers 503 when the event loop has not turned for this long (it turns
/// every second; the start-up self-check and snapshot fit well within it).
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; more is answered 431.
const REQUEST_MAX: usize = 8 * 1024;
/// Connections served at once; more are closed at once, unanswered. A scraper or two, and
/// someone with curl, need far fewer.
const CONNECTIONS_MAX: usize = 8;

/// The metrics socket, bound and listening but not yet served (see [`serve`]).
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// The address bound (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Bind `addr` (`HOST:PORT`, e.g. `127.0.0.1:9101` or `[::1]:9101`) for the metrics
/// endpoint. Errors are one line that says what to do.
pub fn bind(addr: &str) -> anyhow::Result<MetricsListener> {
    let fail = |why: &str| anyhow::anyhow!("cannot serve metrics on {addr}: {why}");
    let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => {
            return Err(fail(
                "not a HOST:PORT address (e.g. 127.0.0.1:9101 or [::1]:9101)",
            ));
        }
    };
    let Some(&first) = addrs.first() else {
        return Err(fail("the name resolves to no address"));
    };
    let listener = TcpListener::bind(&addrs[..]).map_err(|e| {
        fail(&match e.kind() {
            io::ErrorKind::AddrInUse => "address in use; pick another --metrics address".to_owned(),
            io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); \
                 pick another --metrics address"
                    .to_owned()
            }
            io::ErrorKind::AddrNotAvailable => {
                "no such address on this host; pick another --metrics address".to_owned()
            }
            _ => format!("{e}"),
        })
    })?;
    let addr = listener.local_addr().unwrap_or(first);
    Ok(MetricsListener { listener, addr })
}

/// Serve `GET /metrics` on `listener` from a thread of its own (`portwatch-metrics`),
/// one short-lived thread per connection, until the process exits. Start it after the
/// agent has dropped its capabilities: threads inherit them.
pub fn serve(listener: MetricsListener, metrics: Arc<Metrics>) -> anyhow::Result<JoinHandle<()>> {
    serve_with(listener, metrics, REQUEST_TIMEOUT)
}

fn serve_with(
    listener: MetricsListener,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("portwatch-metrics".into())
        .spawn(move || accept_loop(listener.listener, metrics, request_timeout))
        .context("starting the metrics thread")
}

fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>, request_timeout: Duration) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait for a descriptor rather than spin.
                log::warn!("metrics: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
            active.fetch_sub(1, Ordering::AcqRel);
            // Closed unanswered: a 503 would need the request read first (closing on
            // unread bytes resets the connection, response and all), and this thread
            // must not wait on a client.
            drop(stream);
            continue;
        }
        let metrics = metrics.clone();
        let guard = ActiveGuard(active.clone());
        let spawned = std::thread::Builder::new()
            .name("portwatch-metrics-conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = handle(stream, &metrics, request_timeout) {
                    log::debug!("metrics: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("metrics: starting a connection thread: {e}");
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the request head asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics {
        head: bool,
        openmetrics: bool,
    },
    /// `/healthz`: 200 while the event loop turns, 503 when it stalled (liveness probe).
    Health {
        head: bool,
    },
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// One request, one response, close (HTTP/1.1 with `Connection: close`).
fn handle(mut stream: TcpStream, metrics: &Metrics, request_timeout: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    answer(&mut stream, metrics, request_timeout)?;
    linger(&mut stream);
    Ok(())
}

fn answer(stream: &mut TcpStream, metrics: &Metrics, request_timeout: Duration) -> io::Result<()> {
    let head = match read_head(stream, request_timeout)? {
        Head::Complete(h) => h,
        Head::TooLarge => {
            return respond(stream, 431, "Request Header Fields Too Large", None, &[]);
        }
        Head::TimedOut => return respond(stream, 408, "Request Timeout", None, &[]),
        Head::Closed => return Ok(()),
    };
    match parse_request(&head) {
        Request::Metrics { head, openmetrics } => {
            let (body, content_type) = if openmetrics {
                (metrics.render_openmetrics(), OPENMETRICS_CONTENT_TYPE)
            } else {
                (metrics.render(), prometheus_text::CONTENT_TYPE)
            };
            // HEAD: the headers GET would send, Content-Length included, no body.
            let length = body.len();
            let body = if head { &[][..] } else { body.as_bytes() };
            respond(stream, 200, "OK", Some((content_type, length)), body)
        }
        Request::Health { head } => {
            let since = metrics.since_beat();
            let (code, reason, body) = if since < LIVENESS_WINDOW {
                (200, "OK", "ok\n".to_owned())
            } else {
                (
                    503,
                    "Service Unavailable",
                    format!("event loop stalled for {} s\n", since.as_secs()),
                )
            };
            let length = body.len();
            let body = if head { &[][..] } else { body.as_bytes() };
            respond(
                stream,
                code,
                reason,
                Some(("text/plain; charset=utf-8", length)),
                body,
            )
        }
        Request::NotFound => respond(stream, 404, "Not Found", None, b"not found\n"),
        Request::MethodNotAllowed => respond(
            stream,
            405,
            "Method Not Allowed",
            None,
            b"method not allowed\n",
        ),
        Request::Bad => respond(stream, 400, "Bad Request", None, b"bad request\n"),
    }
}

enum Head {
    Complete(String),
    TooLarge,
    TimedOut,
    Closed,
}

/// Read up to the blank line that ends the request head, within `timeout` overall.
fn read_head(stream: &mut TcpStream, timeout: Duration) -> io::Result<Head> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::TimedOut);
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::TimedOut);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Look for the end only where it can newly be: the new bytes and the 3 before.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(Head::Complete(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > REQUEST_MAX {
            return Ok(Head::TooLarge);
        }
    }
}

/// Offset of the end of the head (`\r\n\r\n`, or a bare `\n\n` from a lenient client).
fn find_head_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find(|&i| b[i..].starts_with(b"\r\n\r\n") || b[i..].starts_with(b"\n\n"))
}

fn parse_request(head: &str) -> Request {
    let mut lines = head.lines();
    let Some(line) = lines.next() else {
        return Request::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" && path != "/healthz" {
        return Request::NotFound;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
    if path == "/healthz" {
        return Request::Health { head };
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    });
    Request::Metrics { head, openmetrics }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    content: Option<(&str, usize)>,
    body: &[u8],
) -> io::Result<()> {
    let (content_type, length) = content.unwrap_or(("text/plain; charset=utf-8", body.len()));
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {length}\r\nConnection: close\r\n"
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut response = out.into_bytes();
    response.extend_from_slice(body);
    stream.write_all(&response)?;
    stream.flush()
}

/// How long, and how much, a client may still send after its response before the
/// connection is closed anyway.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX: usize = 64 * 1024;

/// Close gently: say we are done, then read what the client still sends (a request cut
/// off at the size cap, a body nobody asked for) until it closes. Closing with unread
/// bytes makes the kernel send a reset, and a reset can cost the client the response it
/// has not read yet.
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    const _: fn() = || {
        fn shared<T: Send + Sync>() {}
        shared::<Metrics>();
    };

    /// Long enough that a test waiting on it would fail on the client's own timeout.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

    struct Response {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> &str {
            self.headers
                .get(&name.to_ascii_lowercase())
                .map_or("", String::as_str)
        }
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).expect("connecting to the metrics server");
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        s
    }

    fn read_response(mut s: TcpStream) -> Response {
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .expect("reading the response (the server must answer and close)");
        let raw = String::from_utf8(raw).expect("response is UTF-8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("a header line");
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Response {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    fn request(addr: SocketAddr, raw: &str) -> Response {
        let mut s = connect(addr);
        s.write_all(raw.as_bytes()).unwrap();
        read_response(s)
    }

    fn get(addr: SocketAddr, path: &str) -> Response {
        request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: test\r\n\r\n"),
        )
    }

    fn start(metrics: Arc<Metrics>, request_timeout: Duration) -> SocketAddr {
        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        serve_with(listener, metrics, request_timeout).unwrap();
        addr
    }

    /// A parsed exposition: HELP and TYPE by metric name, samples by name and labels.
    #[derive(Debug, Default)]
    struct Exposition {
        help: HashMap<String, String>,
        types: HashMap<String, String>,
        samples: HashMap<(String, BTreeMap<String, String>), f64>,
    }

    impl Exposition {
        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let labels = labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            self.samples.get(&(name.to_owned(), labels)).copied()
        }
    }

    /// Parse the text format (enough of it for what this registry emits: no timestamps,
    /// no exemplars), failing on any line it does not understand.
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(e.help.insert(name.into(), help.into()).is_none(), "{line}");
                continue;
            }
            if line.starts_with("# UNIT ") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                assert!(e.types.insert(name.into(), ty.into()).is_none(), "{line}");
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("labels end with }");
                    (name.to_owned(), parse_labels(rest))
                }
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "metric name {name}"
            );
            assert!(
                e.samples.insert((name, labels), value).is_none(),
                "duplicate series: {line}"
            );
        }
        e
    }

    fn parse_labels(s: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut chars = s.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "label {key} value is quoted");
            let mut value = String::new();
            loop {
                match chars.next().expect("label value ends") {
                    '"' => break,
                    '\\' => match chars.next().expect("escape") {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            }
            out.insert(key, value);
            match chars.next() {
                None | Some(',') => {}
                Some(c) => panic!("unexpected {c:?} after a label in {s}"),
            }
        }
        out
    }

    fn recorded() -> Arc<Metrics> {
        let m = Arc::new(Metrics::new());
        for _ in 0..3 {
            m.event(Action::ListenStarted, Some(Protocol::Tcp));
        }
        m.event(Action::UdpBound, Some(Protocol::Udp));
        m.event(Action::SensorHealth, None);
        // Not in the fixed table: counted all the same.
        m.event(Action::ListenersFolded, Some(Protocol::Udp));
        m.alert("mysql");
        m.alert("mysql");
        m.alert("rule \"quoted\"\\x");
        m.lost("ring-buffer-full", 5);
        m.lost("output-queue-full", 2);
        m.lost("output-queue-full", 1);
        m.lost("some-new-reason", 7);
        m.set_gauges(Gauges {
            queue_depth: 12,
            hooks_attached: 5,
            hooks_degraded: 1,
            open_listeners: 42,
            process_cache: 300,
            cgroup_cache: 17,
            exposed_accepted: 3,
            exposed_filtered: 4,
            exposed_unknown: 0,
            published_accepted: 1,
            published_filtered: 0,
            published_unknown: 0,
            published_without_listener: 2,
            events_written: 1000,
            output_write_errors: 2,
        });
        m
    }

    #[test]
    fn every_fixed_series_has_its_slot() {
        for (i, &(action, transport)) in EVENT_SERIES.iter().enumerate() {
            assert_eq!(
                event_slot(action, transport),
                Some(i),
                "{action} {transport:?}"
            );
        }
        assert_eq!(event_slot(Action::ListenStarted, Some(Protocol::Udp)), None);
        assert_eq!(event_slot(Action::ListenStarted, None), None);
    }

    #[test]
    fn healthz_follows_the_event_loop() {
        let metrics = Arc::new(Metrics::new());
        let addr = start(metrics.clone(), REQUEST_TIMEOUT);
        metrics.beat();
        let r = get(addr, "/healthz");
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        // A loop that last turned longer ago than the window: stalled.
        metrics.heartbeat_ms.store(0, Ordering::Relaxed);
        let stalled = Metrics {
            born: Instant::now() - LIVENESS_WINDOW - Duration::from_secs(5),
            ..Metrics::new()
        };
        assert!(stalled.since_beat() >= LIVENESS_WINDOW);
        let addr = start(Arc::new(stalled), REQUEST_TIMEOUT);
        let r = get(addr, "/healthz");
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.starts_with("event loop stalled for 3"), "{}", r.body);
        let r = request(addr, "HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!((r.status, r.body.as_str()), (503, ""));
    }

    #[test]
    fn scrape_over_http_and_parse() {
        let addr = start(recorded(), REQUEST_TIMEOUT);
        let r = get(addr, "/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), prometheus_text::CONTENT_TYPE);
        assert_eq!(r.header("content-length"), r.body.len().to_string());
        assert_eq!(r.header("connection"), "close");

        let e = parse(&r.body);
        // Every family has HELP and TYPE, every sample belongs to one, all prefixed.
        let expected_types = [
            ("portwatch_events_total", "counter"),
            ("portwatch_alerts_total", "counter"),
            ("portwatch_events_lost_total", "counter"),
            ("portwatch_events_written_total", "counter"),
            ("portwatch_output_write_errors_total", "counter"),
            ("portwatch_output_queue_depth", "gauge"),
            ("portwatch_hooks_attached", "gauge"),
            ("portwatch_hooks_degraded", "gauge"),
            ("portwatch_listeners_open", "gauge"),
            ("portwatch_listeners_exposed", "gauge"),
            ("portwatch_listeners_published", "gauge"),
            ("portwatch_published_without_listener", "gauge"),
            ("portwatch_cache_entries", "gauge"),
            ("portwatch_process_cpu_seconds_total", "counter"),
            ("portwatch_process_resident_memory_bytes", "gauge"),
        ];
        for (name, ty) in expected_types {
            assert_eq!(
                e.types.get(name).map(String::as_str),
                Some(ty),
                "TYPE {name}"
            );
            assert!(
                e.help.get(name).is_some_and(|h| h.len() > 10),
                "HELP {name}"
            );
        }
        assert_eq!(e.types.len(), expected_types.len(), "{:?}", e.types.keys());
        for (name, _) in e.samples.keys() {
            assert!(e.types.contains_key(name), "sample {name} without TYPE");
            assert!(name.starts_with("portwatch_"), "{name}");
        }

        let events = "portwatch_events_total";
        let ev = |a, t| e.value(events, &[("action", a), ("transport", t)]);
        assert_eq!(ev("listen-started", "tcp"), Some(3.0));
        assert_eq!(ev("udp-bound", "udp"), Some(1.0));
        assert_eq!(ev("sensor-health", "none"), Some(1.0));
        assert_eq!(ev("listeners-folded", "udp"), Some(1.0));
        // Made at start: present at 0 before the first one.
        assert_eq!(ev("listen-stopped", "tcp"), Some(0.0));
        assert_eq!(ev("risky-listener", "udp"), Some(0.0));

        let alerts = "portwatch_alerts_total";
        assert_eq!(e.value(alerts, &[("rule", "mysql")]), Some(2.0));
        assert_eq!(
            e.value(alerts, &[("rule", "rule \"quoted\"\\x")]),
            Some(1.0)
        );

        let lost = "portwatch_events_lost_total";
        let lo = |r, s| e.value(lost, &[("reason", r), ("side", s)]);
        assert_eq!(lo("ring-buffer-full", "kernel"), Some(5.0));
        assert_eq!(lo("kernel-map-full", "kernel"), Some(0.0));
        assert_eq!(lo("output-queue-full", "userspace"), Some(3.0));
        assert_eq!(lo("decode-error", "userspace"), Some(0.0));
        assert_eq!(lo("some-new-reason", "unknown"), Some(7.0));

        assert_eq!(e.value("portwatch_events_written_total", &[]), Some(1000.0));
        assert_eq!(
            e.value("portwatch_output_write_errors_total", &[]),
            Some(2.0)
        );
        assert_eq!(e.value("portwatch_output_queue_depth", &[]), Some(12.0));
        assert_eq!(e.value("portwatch_hooks_attached", &[]), Some(5.0));
        assert_eq!(e.value("portwatch_hooks_degraded", &[]), Some(1.0));
        assert_eq!(e.value("portwatch_listeners_open", &[]), Some(42.0));
        for (verdict, n) in [("accepted", 3.0), ("filtered", 4.0), ("unknown", 0.0)] {
            assert_eq!(
                e.value("portwatch_listeners_exposed", &[("firewall", verdict)]),
                Some(n),
                "{verdict}"
            );
        }
        assert_eq!(
            e.value("portwatch_listeners_published", &[("firewall", "accepted")]),
            Some(1.0)
        );
        assert_eq!(
            e.value("portwatch_published_without_listener", &[]),
            Some(2.0)
        );
        let cache = "portwatch_cache_entries";
        assert_eq!(e.value(cache, &[("cache", "process")]), Some(300.0));
        assert_eq!(e.value(cache, &[("cache", "cgroup")]), Some(17.0));
        let cpu = e.value("portwatch_process_cpu_seconds_total", &[]).unwrap();
        assert!(cpu > 0.0, "cpu {cpu}");
        let rss = e
            .value("portwatch_process_resident_memory_bytes", &[])
            .unwrap();
        assert!(rss > 1e6, "rss {rss}");
    }

    #[test]
    fn counters_from_totals_never_go_back() {
        let m = Metrics::new();
        let g = |w| Gauges {
            events_written: w,
            ..Gauges::default()
        };
        m.set_gauges(g(10));
        m.set_gauges(g(7));
        let e = parse(&m.render());
        assert_eq!(e.value("portwatch_events_written_total", &[]), Some(10.0));
    }

    #[test]
    fn gauges_from_output_shared() {
        let sink = |depth: usize, written: u64, errors: u64| {
            let s = crate::output::sinks::SinkShared::default();
            s.depth.store(depth, Ordering::Relaxed);
            s.written.store(written, Ordering::Relaxed);
            s.write_errors.store(errors, Ordering::Relaxed);
            std::sync::Arc::new(s)
        };
        let out = OutputShared {
            sinks: vec![sink(3, 99, 1), sink(1, 98, 2)],
            ..OutputShared::default()
        };
        let g = Gauges::from_output(&out);
        // The worst queue, the most written, all errors.
        assert_eq!(
            (g.queue_depth, g.events_written, g.output_write_errors),
            (3, 99, 3)
        );
    }

    #[test]
    fn openmetrics_when_asked() {
        let addr = start(recorded(), REQUEST_TIMEOUT);
        let r = request(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text;\
             version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), OPENMETRICS_CONTENT_TYPE);
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
        let e = parse(&r.body);
        // OpenMetrics names the family without the _total of its samples.
        assert_eq!(e.types["portwatch_events"], "counter");
        assert_eq!(
            e.value(
                "portwatch_events_total",
                &[("action", "listen-started"), ("transport", "tcp")]
            ),
            Some(3.0)
        );
    }

    #[test]
    fn head_query_string_and_errors() {
        let addr = start(Arc::new(Metrics::new()), REQUEST_TIMEOUT);

        let r = request(addr, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        assert!(r.header("content-length").parse::<usize>().unwrap() > 100);

        assert_eq!(get(addr, "/metrics?x=1").status, 200);

        let r = get(addr, "/");
        assert_eq!(r.status, 404);
        assert_eq!(r.header("connection"), "close");
        assert_eq!(get(addr, "/metricsx").status, 404);

        let r = request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), "GET, HEAD");

        assert_eq!(request(addr, "garbage\r\n\r\n").status, 400);
        assert_eq!(request(addr, "GET /metrics SPDY/3\r\n\r\n").status, 400);

        // A head that never ends within the cap.
        let mut s = connect(addr);
        let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        for _ in 0..(REQUEST_MAX / line.len() + 2) {
            if s.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
        assert_eq!(read_response(s).status, 431);
    }

    #[test]
    fn stalled_client_does_not_block_a_scrape() {
        // The stalled request holds its handler for a minute, longer than the client
        // waits: a server that served one connection at a time would fail the scrape.
        let addr = start(recorded(), Duration::from_secs(60));
        let mut stalled = connect(addr);
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nHost:")
            .unwrap();
        let r = get(addr, "/metrics");
        assert_eq!(r.status, 200);
        assert!(parse(&r.body).types.contains_key("portwatch_events_total"));
        drop(stalled);
    }

    #[test]
    fn slow_client_is_cut_off() {
        let addr = start(Arc::new(Metrics::new()), Duration::from_millis(200));
        let mut s = connect(addr);
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        // The server answers 408 and closes once its deadline passes (the client would
        // give up after CLIENT_TIMEOUT otherwise).
        assert_eq!(read_response(s).status, 408);
    }

    #[test]
    fn too_many_connections_are_refused_not_queued() {
        let addr = start(Arc::new(Metrics::new()), Duration::from_secs(60));
        let held: Vec<TcpStream> = (0..CONNECTIONS_MAX)
            .map(|_| {
                let mut s = connect(addr);
                s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
                s
            })
            .collect();
        assert_eq!(try_get(addr), None, "over the limit: closed, unanswered");
        // A slot frees when a client goes: the server then serves again.
        drop(held);
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        while try_get(addr) != Some(200) {
            assert!(Instant::now() < deadline, "slots never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A scrape's status, or None when the server closed without answering (an empty
    /// read, or a reset: the server closed before reading the request).
    fn try_get(addr: SocketAddr) -> Option<u16> {
        let mut s = connect(addr);
        if s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").is_err() {
            return None;
        }
        let mut raw = Vec::new();
        match s.read_to_end(&mut raw) {
            Ok(_) if raw.is_empty() => None,
            Ok(_) => {
                let status = String::from_utf8_lossy(&raw[..raw.len().min(12)]).into_owned();
                Some(status[9..12].parse().expect("a status code"))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading the response: {e}"),
        }
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot serve metrics on {addr}: address in use; pick another --metrics address"
            )
        );
        for bad in ["nonsense", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = format!("{:#}", bind(bad).unwrap_err());
            assert!(
                e.starts_with(&format!("cannot serve metrics on {bad}: not a HOST:PORT")),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(bind("[::1]:0").is_ok() || bind("127.0.0.1:0").is_ok());
    }
}
