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

use crate::emit::OutputShared;

/// `Content-Type` of the OpenMetrics text format (the crate names only the Prometheus
/// one).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value for events that have no transport (agent state, health, losses).
const NO_TRANSPORT: &str = "none";

/// Every (action, transport) the agent writes, each with a counter made at start so that
/// a scrape shows it at 0 before the first one (Prometheus' advice: no series appearing
/// from nowhere) and the hot path needs no lookup. Index = [`event_slot`].
const EVENT_SERIES: &[(&str, &str)] = &[
    ("listen-started", "tcp"),
    ("listen-stopped", "tcp"),
    ("udp-bound", "udp"),
    ("udp-released", "udp"),
    ("listener-present", "tcp"),
    ("listener-present", "udp"),
    ("risky-listener", "tcp"),
    ("risky-listener", "udp"),
    ("risky-listener-repeated", "tcp"),
    ("risky-listener-repeated", "udp"),
    ("events-lost", NO_TRANSPORT),
    ("sensor-started", NO_TRANSPORT),
    ("sensor-health", NO_TRANSPORT),
    ("snapshot-complete", NO_TRANSPORT),
    ("resync-complete", NO_TRANSPORT),
    ("rules-reloaded", NO_TRANSPORT),
    ("config-error", NO_TRANSPORT),
];

/// Where [`EVENT_SERIES`] keeps (action, transport); None for a pair not in it (counted
/// through the family: correct, only slower).
fn event_slot(action: &str, transport: Option<&str>) -> Option<usize> {
    Some(match (action, transport) {
        ("listen-started", Some("tcp")) => 0,
        ("listen-stopped", Some("tcp")) => 1,
        ("udp-bound", Some("udp")) => 2,
        ("udp-released", Some("udp")) => 3,
        ("listener-present", Some("tcp")) => 4,
        ("listener-present", Some("udp")) => 5,
        ("risky-listener", Some("tcp")) => 6,
        ("risky-listener", Some("udp")) => 7,
        ("risky-listener-repeated", Some("tcp")) => 8,
        ("risky-listener-repeated", Some("udp")) => 9,
        ("events-lost", None) => 10,
        ("sensor-started", None) => 11,
        ("sensor-health", None) => 12,
        ("snapshot-complete", None) => 13,
        ("resync-complete", None) => 14,
        ("rules-reloaded", None) => 15,
        ("config-error", None) => 16,
        _ => return None,
    })
}

/// Loss reasons (as in `portwatch.lost.reason`) and the side of the ring buffer where
/// the events were lost: the kernel could not deliver them, or the agent dropped them.
const LOSS_SERIES: &[(&str, &str)] = &[
    ("ring-buffer-full", "kernel"),
    ("kernel-map-full", "kernel"),
    ("output-queue-full", "userspace"),
    ("output-error", "userspace"),
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
            queue_depth: out.depth.load(Ordering::Relaxed) as u64,
            events_written: out.written.load(Ordering::Relaxed),
            output_write_errors: out.write_errors.load(Ordering::Relaxed),
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
                events.get_or_create_owned(&EventLabels { action, transport })
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
        }
    }

    /// One event produced for output: its `event.action` and `network.transport`.
    /// For the agent's event actions this is one atomic add.
    #[inline]
    pub fn event(&self, action: &'static str, transport: Option<&'static str>) {
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
    fn event_slow(&self, action: &'static str, transport: Option<&'static str>) {
        let labels = EventLabels {
            action,
            transport: transport.unwrap_or(NO_TRANSPORT),
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
        prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
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
        let (cpu, rss) = crate::sys::self_usage();
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
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; more is answered 431.
const REQUEST_MAX: usize = 8 * 1024;
/// Connections served at once; more are answered 503 and closed. A scraper or two, and
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
            io::ErrorKind::AddrInUse => {
                "address in use; pick another --metrics address".to_owned()
            }
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
        let mut stream = match conn {
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
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = respond(&mut stream, 503, "Service Unavailable", None, &[]);
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
    Metrics { head: bool, openmetrics: bool },
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// One request, one response, close (HTTP/1.1 with `Connection: close`).
fn handle(mut stream: TcpStream, metrics: &Metrics, request_timeout: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let head = match read_head(&mut stream, request_timeout)? {
        Head::Complete(h) => h,
        Head::TooLarge => {
            return respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                None,
                &[],
            );
        }
        Head::TimedOut => return respond(&mut stream, 408, "Request Timeout", None, &[]),
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
            respond(&mut stream, 200, "OK", Some((content_type, length)), body)
        }
        Request::NotFound => respond(&mut stream, 404, "Not Found", None, b"not found\n"),
        Request::MethodNotAllowed => respond(
            &mut stream,
            405,
            "Method Not Allowed",
            None,
            b"method not allowed\n",
        ),
        Request::Bad => respond(&mut stream, 400, "Bad Request", None, b"bad request\n"),
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
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
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
    if path != "/metrics" {
        return Request::NotFound;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
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
    stream.flush()?;
    // Tell the client we are done; then close.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}
