//! Sinks: one JSON document per line for machines, one readable line for people.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{self, IsTerminal, Write},
    net::{TcpStream, UdpSocket},
    os::{
        fd::AsFd as _,
        unix::{
            fs::OpenOptionsExt as _,
            net::{UnixDatagram, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    classify::Severity,
    output::event::{Action, Event, Kind},
    output::spool::Pos,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ECS JSON, one document per line.
    Json,
    /// One readable line per event, for people.
    Text,
    /// OCSF 1.5 JSON, one document per line (see `ocsf`).
    Ocsf,
}

/// Stop writing: the reader of stdout went away (`| head`). Not an error for the user.
#[derive(Debug, thiserror::Error)]
#[error("output closed by the reader")]
pub struct Closed;

/// Events waiting for each sink's writer thread, by default. An event is about 1 KiB in
/// memory, so a queue holds at most ~16 MiB; at full listener churn it covers ~80 ms.
pub const QUEUE_EVENTS: usize = 16_384;
/// Events rendered into one write(2) (a round may exceed it by one handed-over batch).
const WRITE_BATCH: usize = 1024;
/// Most bytes per write: ~30 events. Under a reader slower than the stream, what is in
/// the write plus what sits in the pipe is what an urgent event waits behind.
const WRITE_BYTES: usize = 16 * 1024;
/// Pipe size asked for on a stdout that is a pipe: events wait in the agent's queue,
/// where urgent ones go first, rather than in a kernel FIFO that knows no priority.
const STDOUT_PIPE_BYTES: i32 = 16 * 1024;
/// Events handed to the writers at once, at most (the event loop flushes after each
/// drained batch anyway).
const HANDOFF_BATCH: usize = 512;
/// Output errors are logged once, then at most this often (they are counted regardless).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// Reconnect back-off bounds for network sinks.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// At shutdown, how long a disconnected sink may keep trying before its queue is lost.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Largest syslog datagram sent (UDP or unix): a larger message is re-rendered with its
/// long fields shortened (never cut: the JSON stays whole) and marked
/// `portwatch.shrunk_from` with its original size.
pub const DGRAM_MAX: usize = 65_000;

/// Where a network sink sends: `unix:/path`, `udp:host:port`, `tcp:host:port` or
/// `tls:host:port` (TCP with TLS, see `tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Udp(String),
    Tcp(String),
    Tls(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        let bad = || {
            format!(
                "`{s}` is not an endpoint: use unix:/path, udp:host:port, tcp:host:port or \
                 tls:host:port"
            )
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        let host_port = |r: &str| -> Result<String, String> {
            let (host, port) = r.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad());
            }
            Ok(r.to_owned())
        };
        match scheme {
            "unix" if rest.starts_with('/') => Ok(Endpoint::Unix(PathBuf::from(rest))),
            "udp" => host_port(rest).map(Endpoint::Udp),
            "tcp" => host_port(rest).map(Endpoint::Tcp),
            "tls" => host_port(rest).map(Endpoint::Tls),
            _ => Err(bad()),
        }
    }
}

impl Endpoint {
    /// `--relp`: `HOST:PORT` (TCP), `tcp:HOST:PORT` or `tls:HOST:PORT`.
    pub fn parse_relp(s: &str) -> Result<Endpoint, String> {
        let e = if s.starts_with("tcp:") || s.starts_with("tls:") {
            s.parse()
        } else if s.contains(':') && !s.starts_with("unix:") && !s.starts_with("udp:") {
            format!("tcp:{s}").parse()
        } else {
            Err(String::new())
        };
        e.map_err(|_| {
            format!("`{s}` is not a RELP endpoint: use HOST:PORT, tcp:HOST:PORT or tls:HOST:PORT")
        })
    }

    fn is_stream(&self) -> bool {
        !matches!(self, Endpoint::Udp(_))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Udp(a) => write!(f, "udp:{a}"),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Tls(a) => write!(f, "tls:{a}"),
        }
    }
}

/// One destination of the event stream.
#[derive(Clone, Debug)]
pub enum SinkSpec {
    Stdout,
    /// Append-only file, created 0600, reopened on SIGHUP.
    File(PathBuf),
    /// RFC 5424 syslog: datagrams to a unix socket (`/dev/log`) or UDP, octet-counted
    /// frames over TCP (RFC 6587). The message is the event's JSON.
    Syslog(Endpoint),
    /// JSON lines over a TCP, TLS or unix stream socket (Vector, Fluent Bit, Logstash),
    /// reconnecting with back-off.
    Forward(Endpoint),
    /// RFC 5424 syslog over RELP (TCP or TLS): an event is delivered once the relay
    /// acknowledged it.
    Relp(Endpoint),
}

impl SinkSpec {
    /// Sinks whose events pass through a spool on disk: every stream to another process
    /// (network or unix socket), which can be down or slow.
    fn spooled(&self) -> bool {
        match self {
            SinkSpec::Syslog(e) => matches!(e, Endpoint::Tcp(_) | Endpoint::Tls(_)),
            SinkSpec::Forward(e) => e.is_stream(),
            SinkSpec::Relp(_) => true,
            SinkSpec::Stdout | SinkSpec::File(_) => false,
        }
    }

    /// The spool's directory name under `--spool-dir`: the sink's name in file-name-safe
    /// characters.
    fn spool_name(&self) -> String {
        self.to_string()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// Settings of the network destinations: TLS files and the spool.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub tls: crate::output::tls::TlsFiles,
    /// Each spooled destination gets a directory here.
    pub spool_dir: PathBuf,
    /// Bound of each destination's spool on disk.
    pub spool_max_bytes: u64,
}

/// Default `--spool-dir`.
pub const SPOOL_DIR: &str = "/var/lib/portwatch/spool";

impl Default for Delivery {
    fn default() -> Delivery {
        Delivery {
            tls: crate::output::tls::TlsFiles::default(),
            spool_dir: PathBuf::from(SPOOL_DIR),
            spool_max_bytes: crate::output::spool::DEFAULT_MAX_BYTES,
        }
    }
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::File(p) => write!(f, "file:{}", p.display()),
            SinkSpec::Syslog(e) => write!(f, "syslog:{e}"),
            SinkSpec::Forward(e) => write!(f, "forward:{e}"),
            SinkSpec::Relp(e) => write!(f, "relp:{e}"),
        }
    }
}

/// Counters and flags one sink's writer shares with the event loop.
#[derive(Default)]
pub struct SinkShared {
    pub name: String,
    /// Bulk events dropped because this sink's queue was full, not yet reported as lost.
    pub queue_dropped: AtomicU64,
    /// Urgent events dropped because even the urgent reserve was full (not yet reported).
    pub urgent_dropped: AtomicU64,
    /// Events that a failed write took with it, not yet reported as lost.
    pub write_lost: AtomicU64,
    /// Failed writes since start.
    pub write_errors: AtomicU64,
    /// Events written since start.
    pub written: AtomicU64,
    /// Events queued and not yet written.
    pub depth: AtomicUsize,
    /// A network sink currently has its connection (always true for the others).
    pub connected: AtomicBool,
    /// File sinks: the path, and the inode of the file the writer has open.
    pub path: Option<PathBuf>,
    pub file_ino: AtomicU64,
    /// Set when the file at `path` is no longer the one open (deleted or replaced): the
    /// writer reopens the path before its next write.
    pub reopen_one: AtomicBool,
    /// Events written to a file after it was deleted (at most those since the previous
    /// check found it in place), not yet reported as lost.
    pub deleted_lost: AtomicU64,
    /// Spooled sinks: events dropped from the full spool, not yet reported as lost.
    pub spool_full: AtomicU64,
    /// Spooled sinks: damaged records skipped in the spool, not yet reported as lost.
    pub spool_torn: AtomicU64,
    /// Spooled sinks: events in the spool not yet acknowledged by the destination.
    pub spooled: AtomicU64,
}

/// When `fd` is a pipe larger than STDOUT_PIPE_BYTES, shrink it to that (best effort: a
/// pipe we may not resize stays as it is).
fn shrink_pipe(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_raw_fd();
    // SAFETY: fstat and fcntl on an fd we own; failures are ignored.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(raw, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return;
        }
        let size = libc::fcntl(raw, libc::F_GETPIPE_SZ);
        if size > STDOUT_PIPE_BYTES {
            libc::fcntl(raw, libc::F_SETPIPE_SZ, STDOUT_PIPE_BYTES);
        }
    }
}

/// Inode of a file, 0 if unknown.
fn inode_of(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    f.metadata().map_or(0, |m| m.ino())
}

/// What the writers share with the event loop as a whole.
#[derive(Default)]
pub struct OutputShared {
    pub sinks: Vec<Arc<SinkShared>>,
    /// Set when the reader of stdout went away: the agent stops.
    pub closed: AtomicBool,
    pub closed_notify: tokio::sync::Notify,
    /// Bumped by SIGHUP: each file sink reopens its file before its next write.
    pub reopen: AtomicU64,
    /// Set at shutdown: disconnected sinks stop retrying after SHUTDOWN_GRACE.
    pub stopping: AtomicBool,
}

/// The output side of the agent: per sink, a bounded queue and a thread that numbers,
/// renders and writes events. The event loop never blocks on output: when a sink's
/// queue is full its copy of the event is dropped and counted (reported as
/// `events-lost`, reason `output-queue-full`, with the sink). `event.sequence` is
/// assigned per sink at write time, so each written stream is gap-free and a consumer
/// can detect loss downstream of the agent. One slow sink never holds up the others.
pub struct Output {
    /// One channel per sink, carrying batches; bounded by `depth` against `capacity`
    /// (the channel itself never blocks).
    queues: Vec<mpsc::Sender<Vec<Arc<Event>>>>,
    /// Events sent since the last flush: handed over as one batch per sink, so the event
    /// loop pays one channel operation (and at most one wake-up) per drained batch, not
    /// per event.
    batch: Vec<Arc<Event>>,
    shared: Arc<OutputShared>,
    /// Writers and their ends of the queues until `start`.
    pending: Vec<(Writer, Receiver<Vec<Arc<Event>>>)>,
    threads: Vec<JoinHandle<()>>,
    /// Spooled sinks: the threads that send from the spool, until `start`; then running.
    senders: Vec<Sender>,
    sender_threads: Vec<JoinHandle<()>>,
    spools: Vec<Arc<SpoolHandle>>,
    /// Wait for room instead of dropping (one-shot commands, where nothing is live).
    block: bool,
    /// Each queue's bound.
    capacity: usize,
    /// Per sink: events written when its file was last seen in place.
    written_at_check: Vec<u64>,
}

impl Output {
    /// Open every destination so that a bad path or address fails now; the writer threads
    /// start with [`Output::start`]. Colour only on a terminal and never with NO_COLOR.
    pub fn new(
        format: Format,
        sinks: &[SinkSpec],
        queue: usize,
        block: bool,
        delivery: &Delivery,
    ) -> anyhow::Result<Output> {
        let mut shared = OutputShared::default();
        let mut writers = Vec::new();
        let mut spooled = Vec::new();
        let mut senders_pending = Vec::new();
        let tls = if sinks.iter().any(|s| {
            matches!(
                s,
                SinkSpec::Syslog(Endpoint::Tls(_))
                    | SinkSpec::Forward(Endpoint::Tls(_))
                    | SinkSpec::Relp(Endpoint::Tls(_))
            )
        }) {
            Some(crate::output::tls::client_config(&delivery.tls)?)
        } else {
            None
        };
        for spec in sinks {
            let (conn, link) = if spec.spooled() {
                let (endpoint, proto) = match spec {
                    SinkSpec::Syslog(e) => (e, Proto::OctetCounted),
                    SinkSpec::Forward(e) => (e, Proto::Lines),
                    SinkSpec::Relp(e) => (e, Proto::Relp),
                    SinkSpec::Stdout | SinkSpec::File(_) => unreachable!("not spooled"),
                };
                let dir = delivery.spool_dir.join(spec.spool_name());
                let spool = crate::output::spool::Spool::open(&dir, delivery.spool_max_bytes)?;
                if spool.unacked() > 0 {
                    log::info!(
                        "{spec}: {} events from before the last stop wait in {}; sending them first",
                        spool.unacked(),
                        dir.display()
                    );
                }
                // Connect now, so that a certificate the destination or we get wrong stops
                // the start with its reason; a destination that is down is retried.
                let link = match connect(endpoint, tls.as_ref()) {
                    Ok(l) => Some(l),
                    Err(crate::output::tls::TlsError::Certificate(msg)) => anyhow::bail!("{msg}"),
                    Err(crate::output::tls::TlsError::Io(e)) => {
                        log::warn!(
                            "{spec}: not reachable yet ({e}); will retry (events wait in the \
                             spool at {})",
                            dir.display()
                        );
                        None
                    }
                };
                let handle = Arc::new(SpoolHandle {
                    spool: Mutex::new(spool),
                    more: Condvar::new(),
                    done: OnceLock::new(),
                });
                spooled.push((handle.clone(), endpoint.clone(), proto));
                (Conn::Spool(handle), link)
            } else {
                (Conn::open(spec)?, None)
            };
            let tty = matches!(spec, SinkSpec::Stdout) && io::stdout().is_terminal();
            let render = match spec {
                SinkSpec::Syslog(e) => Render::Syslog {
                    framing: match e {
                        // The sender frames what it takes from the spool (RFC 6587 octet
                        // counting on TCP, the same on TLS as RFC 5425 says).
                        Endpoint::Tcp(_) | Endpoint::Tls(_) => Framing::Bare,
                        Endpoint::Unix(_) | Endpoint::Udp(_) => Framing::Datagram,
                    },
                    inner: format,
                },
                SinkSpec::Relp(_) => Render::Syslog {
                    framing: Framing::Bare,
                    inner: match format {
                        Format::Text => Format::Json,
                        f => f,
                    },
                },
                SinkSpec::Forward(_) => Render::Lines(match format {
                    Format::Text => Format::Json,
                    f => f,
                }),
                _ => Render::Lines(format),
            };
            let (path, ino) = match (&conn, spec) {
                (Conn::Stream { file, .. }, SinkSpec::File(p)) => (Some(p.clone()), inode_of(file)),
                _ => (None, 0),
            };
            let sink = Arc::new(SinkShared {
                name: spec.to_string(),
                connected: AtomicBool::new(conn.is_connected() || link.is_some()),
                path,
                file_ino: AtomicU64::new(ino),
                ..SinkShared::default()
            });
            shared.sinks.push(sink.clone());
            if let Conn::Spool(h) = &conn
                && let Some((_, endpoint, proto)) = spooled.last()
            {
                let (handle, endpoint, proto) = (h.clone(), endpoint.clone(), *proto);
                writers.push((conn, render, tty, sink.clone()));
                senders_pending.push((handle, endpoint, proto, link, sink));
            } else {
                writers.push((conn, render, tty, sink));
            }
        }
        let shared = Arc::new(shared);
        let spools: Vec<Arc<SpoolHandle>> = spooled.into_iter().map(|(h, _, _)| h).collect();
        let senders = senders_pending
            .into_iter()
            .map(|(spool, endpoint, proto, link, sink)| Sender {
                endpoint,
                proto,
                tls: tls.clone(),
                link,
                spool,
                sink,
                out: Vec::with_capacity(1 << 16),
                last_error_log: None,
            })
            .collect();
        let color_ok = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let mut queues = Vec::new();
        let mut pending = Vec::new();
        for (conn, render, tty, sink) in writers {
            let (tx, rx) = channel::<Vec<Arc<Event>>>();
            queues.push(tx);
            // A spool numbers on from its newest record, across restarts: a consumer
            // tells a replayed event from a new one by `event.sequence`.
            let seq = match &conn {
                Conn::Spool(h) => lock(&h.spool).last_seq(),
                _ => 0,
            };
            let writer = Writer {
                conn,
                render,
                color: tty && color_ok,
                seq,
                reopened: 0,
                buf: Vec::with_capacity(1 << 16),
                ends: Vec::new(),
                seqs: Vec::new(),
                line: String::with_capacity(256),
                msg: Vec::with_capacity(256),
                sink,
                shared: shared.clone(),
                last_error_log: None,
                dgram_error: None,
            };
            pending.push((writer, rx));
        }
        Ok(Output {
            written_at_check: vec![0; queues.len()],
            queues,
            batch: Vec::with_capacity(HANDOFF_BATCH),
            shared,
            pending,
            threads: Vec::new(),
            senders,
            sender_threads: Vec::new(),
            spools,
            block,
            capacity: queue.max(1),
        })
    }

    /// Start the writer threads (the agent does so after dropping its capabilities, so
    /// the threads inherit the reduced set).
    pub fn start(&mut self) -> anyhow::Result<()> {
        for (writer, rx) in self.pending.drain(..) {
            let thread = std::thread::Builder::new()
                .name("portwatch-out".into())
                .spawn(move || writer.run(rx))
                .context("starting an output thread")?;
            self.threads.push(thread);
        }
        for sender in self.senders.drain(..) {
            let thread = std::thread::Builder::new()
                .name("portwatch-send".into())
                .spawn(move || sender.run())
                .context("starting a sender thread")?;
            self.sender_threads.push(thread);
        }
        Ok(())
    }

    /// Queue one event for every sink; it is handed over at the next [`Output::flush`]
    /// (or when a batch is full).
    pub fn send(&mut self, ev: Event) {
        self.batch.push(Arc::new(ev));
        if self.batch.len() >= HANDOFF_BATCH {
            self.flush();
        }
    }

    /// Hand the events sent since the last flush to every sink. A sink whose queue
    /// cannot take them all keeps what fits and loses the rest (counted in its
    /// `queue_dropped`); with `block` (one-shot commands) nothing is dropped.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let last = self.queues.len().saturating_sub(1);
        let mut batch = Some(batch);
        for (i, (tx, sink)) in self.queues.iter().zip(&self.shared.sinks).enumerate() {
            // The last sink takes the batch itself; the others a copy of the pointers.
            let mut mine = if i == last {
                batch.take().unwrap_or_default()
            } else {
                batch.clone().unwrap_or_default()
            };
            if !self.block {
                let depth = sink.depth.load(Ordering::Relaxed);
                let (bulk, urgent) = admit(&mut mine, depth, self.capacity);
                if !self.shared.closed.load(Ordering::Relaxed) {
                    sink.queue_dropped.fetch_add(bulk, Ordering::Relaxed);
                    sink.urgent_dropped.fetch_add(urgent, Ordering::Relaxed);
                }
            }
            if mine.is_empty() {
                continue;
            }
            let n = mine.len();
            // Counted before the send: the writer decrements after taking them.
            sink.depth.fetch_add(n, Ordering::Relaxed);
            if tx.send(mine).is_err() {
                sink.depth.fetch_sub(n, Ordering::Relaxed);
            }
        }
        self.batch = Vec::with_capacity(HANDOFF_BATCH);
    }

    pub fn shared(&self) -> &Arc<OutputShared> {
        &self.shared
    }

    /// Notice output files that were deleted or replaced (not by SIGHUP rotation): ask the
    /// writer to reopen the path, and count what was written since the file was last seen
    /// in place as lost (`deleted_lost`). Called every second.
    pub fn check_files(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        for (i, sink) in self.shared.sinks.iter().enumerate() {
            let Some(path) = &sink.path else { continue };
            let written = sink.written.load(Ordering::Relaxed);
            let open = sink.file_ino.load(Ordering::Relaxed);
            let here = std::fs::metadata(path).map_or(0, |m| m.ino());
            if open == 0 || here == open || sink.reopen_one.load(Ordering::Relaxed) {
                self.written_at_check[i] = written;
                continue;
            }
            let lost = written.saturating_sub(self.written_at_check[i]);
            self.written_at_check[i] = written;
            if lost > 0 {
                sink.deleted_lost.fetch_add(lost, Ordering::Relaxed);
            }
            log::warn!(
                "{} was deleted or replaced: reopening it; {lost} events written since it was                  last seen are counted as lost",
                path.display()
            );
            sink.reopen_one.store(true, Ordering::Relaxed);
        }
    }

    /// From now on nothing is dropped for lack of room (the agent is stopping: its last
    /// events must reach every destination that is still writing).
    pub fn set_blocking(&mut self) {
        self.block = true;
    }

    /// Every destination's queue has room for `n` more events. The event loop is the
    /// only producer, so room seen here is room its next `n` sends will find.
    pub fn has_room(&self, n: usize) -> bool {
        self.shared
            .sinks
            .iter()
            .all(|s| s.depth.load(Ordering::Relaxed) + self.batch.len() + n <= self.capacity)
    }

    /// Write everything queued and stop the writer threads. `Closed` when the reader of
    /// stdout went away.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.flush();
        self.start()?;
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.queues.clear();
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("an output thread panicked"))?;
        }
        // Everything is in the spools now: the senders deliver what they can within
        // SHUTDOWN_GRACE; the rest stays on disk for the next start.
        for h in &self.spools {
            let _ = h.done.set(Instant::now());
            h.more.notify_all();
        }
        for t in self.sender_threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a sender thread panicked"))?;
        }
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Closed.into());
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Errors were reported by whoever called finish(); here only the threads are joined.
        let _ = self.finish();
    }
}

/// Keep what fits of `batch` in a queue holding `depth` of `capacity` events, in order;
/// returns the (bulk, urgent) events dropped. Bulk events may fill the queue only to
/// BULK_SHARE of its bound: the rest is a reserve for urgent events (important
/// listeners, alerts, folds, loss reports), so a destination slower than a flood of bulk
/// churn still gets every important event, and loses bulk ones first.
fn admit(batch: &mut Vec<Arc<Event>>, depth: usize, capacity: usize) -> (u64, u64) {
    let bulk_cap = capacity - capacity / BULK_RESERVE_DIV;
    let mut used = depth;
    let (mut bulk, mut urgent) = (0u64, 0u64);
    batch.retain(|ev| {
        let fits = if ev.portwatch.urgent {
            used < capacity
        } else {
            used < bulk_cap
        };
        if fits {
            used += 1;
        } else if ev.portwatch.urgent {
            urgent += 1;
        } else {
            bulk += 1;
        }
        fits
    });
    (bulk, urgent)
}

/// A quarter of each queue is kept for urgent events.
const BULK_RESERVE_DIV: usize = 4;

/// The connection (or file) of one sink.
enum Conn {
    /// stdout or a file. For a regular file, a write that fails half-way (disk full) is
    /// cut back to the last whole line.
    Stream {
        file: File,
        path: Option<PathBuf>,
        regular: bool,
        /// A failed write may have left half a line that could not be cut back: the next
        /// batch starts with a newline so that at most that one line is damaged.
        broken_line: bool,
    },
    UnixDgram {
        path: PathBuf,
        sock: Option<UnixDatagram>,
    },
    Udp(UdpSocket),
    /// A stream destination: events go to its spool, its `Sender` takes them from there.
    Spool(Arc<SpoolHandle>),
}

/// How events are turned into bytes for one sink.
#[derive(Clone, Copy)]
enum Render {
    /// One event per line: JSON (ECS), text, or OCSF JSON.
    Lines(Format),
    /// RFC 5424 with the event's JSON as MSG.
    Syslog { framing: Framing, inner: Format },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// One message per datagram.
    Datagram,
    /// The message alone: the sender frames it when it takes it from the spool.
    Bare,
}

impl Conn {
    fn open(spec: &SinkSpec) -> anyhow::Result<Conn> {
        Ok(match spec {
            SinkSpec::Stdout => {
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating stdout")?;
                shrink_pipe(&fd);
                let file = File::from(fd);
                let regular = file.metadata().is_ok_and(|m| m.is_file());
                Conn::Stream {
                    file,
                    path: None,
                    regular,
                    broken_line: false,
                }
            }
            SinkSpec::File(p) => {
                let file = open_append(p)?;
                let regular = file.metadata().is_ok_and(|m| m.is_file());
                Conn::Stream {
                    file,
                    path: Some(p.clone()),
                    regular,
                    broken_line: false,
                }
            }
            SinkSpec::Syslog(Endpoint::Unix(path)) => {
                // /dev/log may come and go with the syslog daemon: a missing one now is
                // retried at each write, and counted meanwhile.
                let sock = connect_unix_dgram(path).ok();
                if sock.is_none() {
                    log::warn!("syslog socket {} not there yet; will retry", path.display());
                }
                Conn::UnixDgram {
                    path: path.clone(),
                    sock,
                }
            }
            SinkSpec::Syslog(Endpoint::Udp(addr)) => {
                let sock = UdpSocket::bind(("0.0.0.0", 0))
                    .and_then(|s| s.connect(addr.as_str()).map(|()| s))
                    .with_context(|| format!("cannot use syslog address udp:{addr}"))?;
                Conn::Udp(sock)
            }
            SinkSpec::Forward(Endpoint::Udp(a)) => anyhow::bail!(
                "--forward sends JSON lines over a stream: udp:{a} is not one; use tcp:, tls: or \
                 unix:"
            ),
            SinkSpec::Syslog(Endpoint::Tcp(_) | Endpoint::Tls(_))
            | SinkSpec::Forward(_)
            | SinkSpec::Relp(_) => unreachable!("stream sinks are spooled"),
        })
    }

    fn is_connected(&self) -> bool {
        match self {
            Conn::UnixDgram { sock, .. } => sock.is_some(),
            Conn::Spool(_) => false,
            Conn::Stream { .. } | Conn::Udp(_) => true,
        }
    }
}

fn open_append(p: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(p)
        .with_context(|| {
            format!(
                "cannot open output file {} for appending; check the directory exists and \
                 is writable",
                p.display()
            )
        })
}

fn connect_unix_dgram(path: &Path) -> io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.connect(path)?;
    Ok(s)
}

/// A connection of a stream destination.
enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<crate::output::tls::TlsStream>),
}

impl Link {
    /// Reads wait at most this long (the RELP sender polls for acknowledgements).
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.set_read_timeout(Some(t)),
            Link::Unix(s) => s.set_read_timeout(Some(t)),
            Link::Tls(s) => s.sock.set_read_timeout(Some(t)),
        }
    }
}

impl io::Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Unix(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Unix(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Unix(s) => s.flush(),
            Link::Tls(s) => s.flush(),
        }
    }
}

fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let timeout = Duration::from_secs(2);
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in std::net::ToSocketAddrs::to_socket_addrs(addr)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_write_timeout(Some(Duration::from_secs(10)))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// Connect to a stream destination (with the TLS handshake for `tls:`).
fn connect(
    e: &Endpoint,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Link, crate::output::tls::TlsError> {
    let link = match e {
        Endpoint::Tcp(addr) => Link::Tcp(connect_tcp(addr)?),
        Endpoint::Tls(addr) => {
            let config = tls.ok_or_else(|| io::Error::other("TLS is not set up"))?;
            Link::Tls(Box::new(crate::output::tls::handshake(
                connect_tcp(addr)?,
                addr,
                config,
            )?))
        }
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path)?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Link::Unix(s)
        }
        Endpoint::Udp(_) => {
            return Err(
                io::Error::new(io::ErrorKind::InvalidInput, "not a stream endpoint").into(),
            );
        }
    };
    link.set_read_timeout(ACK_POLL)?;
    Ok(link)
}

struct Writer {
    conn: Conn,
    render: Render,
    color: bool,
    seq: u64,
    /// The SIGHUP generation this writer's file was last opened at.
    reopened: u64,
    buf: Vec<u8>,
    /// End offset in `buf` of each message (datagram sinks send one per message).
    ends: Vec<usize>,
    /// `event.sequence` of each message in `buf`.
    seqs: Vec<u64>,
    line: String,
    /// Scratch for one syslog message.
    msg: Vec<u8>,
    sink: Arc<SinkShared>,
    shared: Arc<OutputShared>,
    last_error_log: Option<Instant>,
    /// The last error of a datagram batch that was partly sent.
    dgram_error: Option<io::Error>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Vec<Arc<Event>>>) {
        // Everything handed over is taken at once into two lanes; each write takes up to
        // WRITE_BATCH events, urgent ones first, so an important event never waits
        // behind a backlog of bulk churn on a slow destination. Within a lane the order
        // is kept (a listener's end always follows its start: both are in one lane).
        let mut urgent: VecDeque<Arc<Event>> = VecDeque::new();
        let mut bulk: VecDeque<Arc<Event>> = VecDeque::new();
        let take = |batch: Vec<Arc<Event>>, urgent: &mut VecDeque<_>, bulk: &mut VecDeque<_>| {
            for ev in batch {
                if ev.portwatch.urgent {
                    urgent.push_back(ev);
                } else {
                    bulk.push_back(ev);
                }
            }
        };
        loop {
            if urgent.is_empty() && bulk.is_empty() {
                match rx.recv() {
                    Ok(batch) => take(batch, &mut urgent, &mut bulk),
                    Err(_) => return,
                }
            }
            while let Ok(batch) = rx.try_recv() {
                take(batch, &mut urgent, &mut bulk);
            }
            self.buf.clear();
            self.ends.clear();
            self.seqs.clear();
            let mut n = 0;
            // Bounded in bytes too: an urgent event that arrives while a write blocks on
            // a slow reader waits for this much at most.
            while n < WRITE_BATCH && self.buf.len() < WRITE_BYTES {
                let Some(ev) = urgent.pop_front().or_else(|| bulk.pop_front()) else {
                    break;
                };
                self.render(ev);
                n += 1;
            }
            self.sink.depth.fetch_sub(n, Ordering::Relaxed);
            match self.write_batch() {
                Ok(0) => {
                    // A spooled sink's events count as written once the destination has
                    // them (its sender counts them).
                    if !matches!(self.conn, Conn::Spool(_)) {
                        self.sink.written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Ok(failed) => {
                    // Datagrams: the others of the batch went out; exactly these did not.
                    // Their sequence numbers stay used: the gaps are the reported loss.
                    let failed = failed.min(n);
                    self.sink
                        .written
                        .fetch_add((n - failed) as u64, Ordering::Relaxed);
                    self.sink.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.sink
                        .write_lost
                        .fetch_add(failed as u64, Ordering::Relaxed);
                    let e = self
                        .dgram_error
                        .take()
                        .unwrap_or_else(|| io::Error::other("send failed"));
                    self.log_error(&e, failed);
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe && self.is_stdout() => {
                    self.shared.closed.store(true, Ordering::Relaxed);
                    self.shared.closed_notify.notify_one();
                    return;
                }
                Err(e) => {
                    // The batch is gone: its numbers are given to the next events, so the
                    // stream stays gap-free and the loss is told by events-lost.
                    self.seq -= n as u64;
                    self.sink.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.sink.write_lost.fetch_add(n as u64, Ordering::Relaxed);
                    self.log_error(&e, n);
                }
            }
        }
    }

    fn is_stdout(&self) -> bool {
        matches!(self.conn, Conn::Stream { path: None, .. })
    }

    fn log_error(&mut self, e: &io::Error, n: usize) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(now);
            log::error!(
                "writing events to {}: {e}; {n} events lost (counted, reported as \
                 events-lost once the output works again)",
                self.sink.name
            );
        }
    }

    /// Write what was rendered. Ok(n): written, except `n` datagrams that could not be
    /// sent (the rest of the batch was); Err: nothing of the batch was written.
    fn write_batch(&mut self) -> io::Result<usize> {
        let generation = self.shared.reopen.load(Ordering::Relaxed);
        let reopen =
            generation != self.reopened || self.sink.reopen_one.swap(false, Ordering::Relaxed);
        self.reopened = generation;
        match &mut self.conn {
            Conn::Stream {
                file,
                path,
                regular,
                broken_line,
            } => {
                if reopen && let Some(p) = path {
                    // SIGHUP (logrotate moved the file away): continue at the same path.
                    match open_append(p) {
                        Ok(f) => {
                            *regular = f.metadata().is_ok_and(|m| m.is_file());
                            self.sink.file_ino.store(inode_of(&f), Ordering::Relaxed);
                            *file = f;
                            log::info!("reopened {}", p.display());
                        }
                        Err(e) => log::error!("{e:#}; still writing to the file open before"),
                    }
                }
                let before = if *regular {
                    file.metadata().ok().map(|m| m.len())
                } else {
                    None
                };
                if *broken_line {
                    file.write_all(b"\n")?;
                    *broken_line = false;
                }
                let res = file.write_all(&self.buf);
                if res.is_err() {
                    *broken_line = before.is_none_or(|len| file.set_len(len).is_err());
                }
                res.map(|()| 0)
            }
            Conn::UnixDgram { path, sock } => {
                if sock.is_none() {
                    *sock = Some(connect_unix_dgram(path)?);
                }
                let s = sock.as_ref().expect("connected above");
                let (failed, err) = send_each(&self.buf, &self.ends, |m| s.send(m));
                // A message too large is this message's problem; anything else means the
                // daemon went away: reconnect next time.
                if err
                    .as_ref()
                    .is_some_and(|e| e.raw_os_error() != Some(libc::EMSGSIZE))
                {
                    *sock = None;
                }
                self.sink.connected.store(sock.is_some(), Ordering::Relaxed);
                self.dgram_error = err;
                Ok(failed)
            }
            Conn::Udp(s) => {
                let (failed, err) = send_each(&self.buf, &self.ends, |m| s.send(m));
                self.dgram_error = err;
                Ok(failed)
            }
            Conn::Spool(h) => {
                let mut start = 0;
                let records = self.ends.iter().zip(&self.seqs).map(|(&end, &seq)| {
                    let r = (seq, &self.buf[start..end]);
                    start = end;
                    r
                });
                let mut spool = lock(&h.spool);
                let res = spool.append(records);
                let full = spool.take_full();
                self.sink.spooled.store(spool.unacked(), Ordering::Relaxed);
                drop(spool);
                if full > 0 {
                    self.sink.spool_full.fetch_add(full, Ordering::Relaxed);
                }
                h.more.notify_all();
                res.map(|()| 0)
            }
        }
    }

    fn render(&mut self, ev: Arc<Event>) {
        self.seq += 1;
        // The only holder (a single sink) takes it as is; otherwise this sink's copy.
        let mut ev = Arc::try_unwrap(ev).unwrap_or_else(|shared| (*shared).clone());
        ev.event.sequence = self.seq;
        let mark = self.buf.len();
        let ok = match self.render {
            Render::Lines(format) => {
                let ok = self.body(format, &ev);
                self.buf.push(b'\n');
                ok
            }
            Render::Syslog { framing, inner } => {
                // Header, then the body rendered after it; TCP frames need the length
                // first, so the message is assembled aside.
                let mut ok = self.syslog_message(inner, &ev);
                if framing == Framing::Datagram && self.msg.len() > DGRAM_MAX {
                    let from = self.msg.len() as u64;
                    for level in 1..=2 {
                        let small = shrink(&ev, level, from);
                        ok = self.syslog_message(inner, &small);
                        if self.msg.len() <= DGRAM_MAX {
                            break;
                        }
                    }
                }
                self.buf.extend_from_slice(&self.msg);
                ok
            }
        };
        if ok {
            self.ends.push(self.buf.len());
            self.seqs.push(self.seq);
        } else {
            // Typed structs with string keys always serialise; were one not to, its
            // half-written bytes are taken back so the stream stays one event per line.
            self.buf.truncate(mark);
        }
    }

    /// One syslog message (header and body) in `msg`.
    fn syslog_message(&mut self, inner: Format, ev: &Event) -> bool {
        self.msg.clear();
        crate::output::syslog::header(ev, &mut self.msg);
        let body_at = self.buf.len();
        let ok = self.body(inner, ev);
        self.msg.extend_from_slice(&self.buf[body_at..]);
        self.buf.truncate(body_at);
        ok
    }

    /// The event's body in `format`, appended to `buf`.
    fn body(&mut self, format: Format, ev: &Event) -> bool {
        match format {
            Format::Json => crate::output::json::write_event(&mut self.buf, ev).is_ok(),
            Format::Ocsf => crate::output::ocsf::render(ev, &mut self.buf).is_ok(),
            Format::Text => {
                self.line.clear();
                text_line(&mut self.line, ev, self.color);
                self.buf.extend_from_slice(self.line.as_bytes());
                true
            }
        }
    }
}

/// A copy of `ev` small enough for a datagram: level 1 shortens the long free-text
/// fields (command line, arguments, message, a fold's port list, stats); level 2 drops
/// them. Marked with the original size.
fn shrink(ev: &Event, level: u8, from: u64) -> Event {
    const KEEP: usize = 1024;
    let cut = |s: &str| -> String {
        if s.len() <= KEEP {
            return s.to_owned();
        }
        let mut end = KEEP;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    };
    let mut ev = ev.clone();
    if let Some(p) = &ev.process {
        let mut p: crate::output::event::Process = (**p).clone();
        if level >= 2 {
            p.command_line = None;
        } else {
            p.command_line = p.command_line.as_deref().map(cut);
        }
        p.args = None;
        ev.process = Some(crate::output::event::shared(p));
    }
    ev.message = ev.message.as_deref().map(cut);
    if let Some(f) = &mut ev.portwatch.fold {
        f.ports = if level >= 2 {
            String::new()
        } else {
            cut(&f.ports)
        };
    }
    if level >= 2 {
        ev.portwatch.stats = None;
        ev.portwatch.alert = None;
    }
    ev.portwatch.shrunk_from = Some(from);
    ev
}

/// Send each message of `buf` (ending at `ends`) as its own datagram, carrying on past
/// a failed one: returns how many failed, and the last error.
fn send_each(
    buf: &[u8],
    ends: &[usize],
    send: impl Fn(&[u8]) -> io::Result<usize>,
) -> (usize, Option<io::Error>) {
    let mut start = 0;
    let mut failed = 0;
    let mut last = None;
    for &end in ends {
        if let Err(e) = send(&buf[start..end]) {
            failed += 1;
            last = Some(e);
        }
        start = end;
    }
    (failed, last)
}

/// Replace control characters (and other non-printables) with visible escapes, so a
/// process named "\x1b[2J" cannot drive the reader's terminal. Characters that are not
/// controls to Rust but still rearrange or hide what a person reads are escaped as
/// `\u{XXXX}` too: bidirectional overrides and isolates (a name with U+202E shows
/// reversed, "Trojan Source"), zero-width characters (two names that look the same), and
/// the Unicode line and paragraph separators (a second, forged line).
pub fn sanitize(out: &mut String, s: &str) {
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else if is_invisible_format(c) {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
}

/// Bidi embeddings/overrides (U+202A-202E) and isolates (U+2066-2069), zero-width
/// space/non-joiner/joiner (U+200B-200D), word joiner (U+2060), BOM (U+FEFF), and the
/// line/paragraph separators (U+2028, U+2029).
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'
            | '\u{FEFF}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

fn text_line(out: &mut String, ev: &Event, color: bool) {
    let time = crate::time::rfc3339(ev.time_ns);
    let ts = time.get(11..23).unwrap_or(&time);
    let alert = ev.event.kind == Kind::Alert;
    let (on, off) = match (color, alert, ev.event.severity) {
        (true, true, Some(Severity::High | Severity::Critical)) => ("\x1b[1;31m", "\x1b[0m"),
        (true, true, _) => ("\x1b[1;33m", "\x1b[0m"),
        (true, false, _) if ev.event.action == Action::EventsLost => ("\x1b[35m", "\x1b[0m"),
        (true, false, _) => ("", ""),
        (false, _, _) => ("", ""),
    };
    let _ = write!(out, "{ts} {on}{:<16}{off}", ev.event.action);
    if let (true, Some(level)) = (alert, &ev.log) {
        let _ = write!(out, " {on}{}{off}", level.level.as_str().to_uppercase());
    }
    if let (Some(n), Some(s)) = (&ev.network, &ev.server) {
        let ip = if s.ip.is_ipv6() {
            format!("[{}]", s.ip)
        } else {
            s.ip.to_string()
        };
        let _ = write!(out, " {} {}:{}", n.transport, ip, s.port);
    }
    if let Some(p) = &ev.process {
        out.push(' ');
        sanitize(out, p.name.as_deref().unwrap_or("?"));
        let _ = write!(out, "[{}]", p.pid);
    } else if ev.portwatch.socket.as_ref().is_some_and(|s| s.kernel) {
        out.push_str(" [kernel]");
    } else if ev.server.is_some() {
        out.push_str(" [owner unknown]");
    }
    if let Some(u) = &ev.user {
        out.push_str(" user=");
        sanitize(out, u.name.as_deref().unwrap_or(&u.id));
    }
    if let Some(unit) = ev
        .portwatch
        .systemd
        .as_ref()
        .and_then(|s| s.unit.as_deref())
    {
        out.push_str(" unit=");
        sanitize(out, unit);
    }
    if let Some(c) = &ev.container {
        out.push_str(" container=");
        sanitize(out, c.id.get(..12).unwrap_or(&c.id));
    }
    if let Some(f) = ev
        .portwatch
        .exposure
        .as_ref()
        .and_then(|x| x.firewall.as_ref())
    {
        let _ = write!(out, " firewall={}", f.verdict.as_str());
    }
    if let Some(p) = ev
        .portwatch
        .exposure
        .as_ref()
        .and_then(|x| x.published.as_ref())
    {
        let _ = write!(
            out,
            " published={}:{}/{}",
            p.host.ip,
            p.host.port,
            p.verdict.as_str()
        );
        // Reached by local processes only (the output NAT chain), or by them as well.
        if p.is_local_source() {
            out.push_str("/local");
        } else if let Some(v) = p.local_verdict {
            let _ = write!(out, " published_local={}", v.as_str());
        }
    }
    if let Some(d) = ev.event.duration {
        let _ = write!(out, " lived={}", human_ns(d));
    }
    if let Some(l) = &ev.portwatch.lost {
        let _ = write!(
            out,
            " lost={} total={} reason={}",
            l.count, l.total, l.reason
        );
    }
    if let Some(m) = &ev.message {
        out.push_str(" — ");
        out.push_str(on);
        sanitize(out, m);
        out.push_str(off);
    }
}

fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.1}s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        let mut s = String::new();
        sanitize(&mut s, "evil\x1b[2J\x07name\n");
        assert_eq!(s, "evil\\x1b[2J\\x07name\\x0a");
        assert!(!s.chars().any(char::is_control));
    }

    #[test]
    fn bidi_and_zero_width_characters_are_shown_not_obeyed() {
        let mut s = String::new();
        sanitize(
            &mut s,
            "a\u{202E}b\u{200B}c\u{2066}d\u{2069}e\u{FEFF}f\u{2028}g\u{2029}h\u{2060}i\u{200D}j",
        );
        assert_eq!(
            s,
            "a\\u{202e}b\\u{200b}c\\u{2066}d\\u{2069}e\\u{feff}f\\u{2028}g\\u{2029}h\\u{2060}i\\u{200d}j"
        );
        for c in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{2067}', '\u{2068}', '\u{200C}',
        ] {
            let mut s = String::new();
            sanitize(&mut s, &c.to_string());
            assert!(!s.contains(c), "{c:?} escaped");
        }
        // Ordinary non-ASCII text stays readable.
        let mut s = String::new();
        sanitize(&mut s, "サーバー é");
        assert_eq!(s, "サーバー é");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ns(512), "512ns");
        assert_eq!(human_ns(1_500_000), "1.5ms");
        assert_eq!(human_ns(2_000_000_000), "2.0s");
    }
}

/// Reads of a stream destination wait at most this long: how often the RELP sender
/// looks for new events while it waits for acknowledgements.
const ACK_POLL: Duration = Duration::from_millis(20);
/// A destination that acknowledges nothing for this long is reconnected (and the
/// unacknowledged events sent again).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// RELP transactions sent and not yet acknowledged, at most (librelp's default window
/// is 128 too).
const RELP_WINDOW: usize = 128;
/// Bytes taken from the spool per write to a plain stream.
const SEND_BYTES: usize = 64 * 1024;

/// A spooled sink's spool, shared by the writer (which appends) and the sender (which
/// reads and acknowledges).
pub struct SpoolHandle {
    spool: Mutex<crate::output::spool::Spool>,
    /// Signalled when records were appended, or the output is stopping.
    more: Condvar,
    /// Set when the writer has appended its last event (the agent is stopping).
    done: OnceLock<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a sender frames what it takes from the spool.
#[derive(Clone, Copy, Debug)]
enum Proto {
    /// JSON lines: the record is the line.
    Lines,
    /// Syslog over TCP or TLS: `LEN SP MSG` (RFC 6587 octet counting, RFC 5425).
    OctetCounted,
    /// RELP `syslog` transactions, each acknowledged by the relay.
    Relp,
}

/// Sends a spooled sink's events from its spool to the destination, reconnecting with
/// back-off, and acknowledges them in the spool once delivered: for RELP when the relay
/// answered `200`, for plain streams when the socket took the bytes.
struct Sender {
    endpoint: Endpoint,
    proto: Proto,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The connection made at start, if the destination was up.
    link: Option<Link>,
    spool: Arc<SpoolHandle>,
    sink: Arc<SinkShared>,
    out: Vec<u8>,
    last_error_log: Option<Instant>,
}

/// Why a session with the destination ended.
type Session = Result<(), String>;

impl Sender {
    fn run(mut self) {
        let mut backoff = RECONNECT_MIN;
        let mut reconnects = 0u64;
        while !self.finished() {
            let link = match self.link.take() {
                Some(l) => Ok(l),
                None => connect(&self.endpoint, self.tls.as_ref()).map_err(|e| e.to_string()),
            };
            match link {
                Ok(mut link) => {
                    if reconnects > 0 {
                        log::info!("{}: connected", self.sink.name);
                    }
                    self.sink.connected.store(true, Ordering::Relaxed);
                    let res = match self.proto {
                        Proto::Relp => self.relp_session(&mut link),
                        Proto::Lines | Proto::OctetCounted => self.stream_session(&mut link),
                    };
                    self.sink.connected.store(false, Ordering::Relaxed);
                    match res {
                        Ok(()) => break,
                        Err(e) => {
                            self.sink.write_errors.fetch_add(1, Ordering::Relaxed);
                            self.log_error(&e);
                            backoff = RECONNECT_MIN;
                        }
                    }
                }
                Err(e) => self.log_error(&e),
            }
            reconnects += 1;
            // Back off, but notice a stop at once.
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.finished() {
                std::thread::sleep(Duration::from_millis(50));
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
        let mut spool = lock(&self.spool.spool);
        spool.sync();
        let left = spool.unacked();
        if left > 0 {
            log::warn!(
                "{}: {left} events stay in the spool at {}; they are sent when portwatch \
                 starts again",
                self.sink.name,
                spool.dir().display()
            );
        }
    }

    /// The agent is stopping and everything is delivered, or the grace is over (what is
    /// left stays in the spool).
    fn finished(&self) -> bool {
        self.spool.done.get().is_some_and(|t| {
            t.elapsed() >= SHUTDOWN_GRACE || lock(&self.spool.spool).unacked() == 0
        })
    }

    fn log_error(&mut self, e: &str) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
        {
            self.last_error_log = Some(now);
            let spooled = self.sink.spooled.load(Ordering::Relaxed);
            log::error!(
                "{}: {e}; retrying ({spooled} events wait in the spool, none lost)",
                self.sink.name
            );
        }
    }

    /// Up to `max` records from `pos`; with `wait`, wait a little for some to come.
    fn take(
        &mut self,
        pos: Pos,
        max: usize,
        bytes: usize,
        wait: bool,
    ) -> Result<(Vec<crate::output::spool::Record>, Pos), String> {
        let mut spool = lock(&self.spool.spool);
        let mut waited = false;
        loop {
            let (recs, next) = spool
                .read(pos, max, bytes)
                .map_err(|e| format!("reading the spool at {}: {e}", spool.dir().display()))?;
            let torn = spool.take_torn();
            if torn > 0 {
                self.sink.spool_torn.fetch_add(torn, Ordering::Relaxed);
            }
            if !recs.is_empty() || !wait || waited || self.spool.done.get().is_some() {
                return Ok((recs, next));
            }
            spool = self
                .spool
                .more
                .wait_timeout(spool, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            waited = true;
        }
    }

    /// The destination has everything before `to` (`n` events).
    fn ack(&self, to: Pos, n: usize) {
        let mut spool = lock(&self.spool.spool);
        spool.ack(to);
        self.sink.spooled.store(spool.unacked(), Ordering::Relaxed);
        drop(spool);
        self.sink.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn resume_at(&self) -> Pos {
        lock(&self.spool.spool).acked()
    }

    /// JSON lines or octet-counted syslog: delivered when written.
    fn stream_session(&mut self, link: &mut Link) -> Session {
        let mut pos = self.resume_at();
        loop {
            let (recs, next) = self.take(pos, WRITE_BATCH, SEND_BYTES, true)?;
            if recs.is_empty() {
                if self.finished() {
                    return Ok(());
                }
                continue;
            }
            self.out.clear();
            for r in &recs {
                if let Proto::OctetCounted = self.proto {
                    let _ = write!(self.out, "{} ", r.payload.len());
                }
                self.out.extend_from_slice(&r.payload);
            }
            link.write_all(&self.out)
                .and_then(|()| link.flush())
                .map_err(|e| format!("writing: {e}"))?;
            pos = next;
            self.ack(next, recs.len());
        }
    }

    /// RELP: open the session, then keep up to RELP_WINDOW transactions in flight; an
    /// event is acknowledged in the spool (in order) once the relay answered 200 for it
    /// and for every event before it. After a reconnect, sending resumes at the first
    /// unacknowledged event, so the relay may see an event twice, never not at all.
    fn relp_session(&mut self, link: &mut Link) -> Session {
        let mut rbuf = Vec::new();
        self.out.clear();
        crate::output::relp::encode(&mut self.out, 1, "open", &crate::output::relp::open_offer());
        link.write_all(&self.out)
            .and_then(|()| link.flush())
            .map_err(|e| format!("opening the RELP session: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let f = read_frame(link, &mut rbuf, Some(deadline))?
            .ok_or("the relay did not answer the RELP open within 10 s")?;
        match (f.txnr, f.command.as_str()) {
            (1, "rsp") => {
                let r = crate::output::relp::response(&f.data).map_err(|e| e.to_string())?;
                if r.code != 200 {
                    return Err(format!(
                        "the relay refused the RELP session ({} {})",
                        r.code, r.text
                    ));
                }
            }
            (_, "serverclose") => return Err("the relay closed the RELP session".into()),
            _ => {
                return Err(format!(
                    "unexpected RELP `{}` before the session opened",
                    f.command
                ));
            }
        }
        let mut txnr = 1u32;
        // (txnr, position after the event, acknowledged)
        let mut inflight: VecDeque<(u32, Pos, bool)> = VecDeque::new();
        let mut pos = self.resume_at();
        let mut last_progress = Instant::now();
        loop {
            if inflight.len() < RELP_WINDOW {
                let room = RELP_WINDOW - inflight.len();
                let (recs, next) = self.take(pos, room, SEND_BYTES, inflight.is_empty())?;
                if !recs.is_empty() {
                    if inflight.is_empty() {
                        last_progress = Instant::now();
                    }
                    self.out.clear();
                    for r in &recs {
                        txnr = crate::output::relp::next_txnr(txnr);
                        crate::output::relp::encode(&mut self.out, txnr, "syslog", &r.payload);
                        inflight.push_back((txnr, r.end, false));
                    }
                    link.write_all(&self.out)
                        .and_then(|()| link.flush())
                        .map_err(|e| format!("writing: {e}"))?;
                    pos = next;
                } else if inflight.is_empty() {
                    if self.finished() {
                        self.out.clear();
                        crate::output::relp::encode(
                            &mut self.out,
                            crate::output::relp::next_txnr(txnr),
                            "close",
                            b"",
                        );
                        let _ = link.write_all(&self.out).and_then(|()| link.flush());
                        return Ok(());
                    }
                    continue;
                }
            }
            // One read that waits (at most ACK_POLL), then only the frames it brought:
            // waiting again once acknowledgements came in would stall the window for a
            // poll per batch (about 2,000 events/s at most, seen in the bench).
            let mut next = read_frame(link, &mut rbuf, None)?;
            while let Some(f) = next.take() {
                next = buffered_frame(&mut rbuf)?;
                match f.command.as_str() {
                    "rsp" => {
                        let r =
                            crate::output::relp::response(&f.data).map_err(|e| e.to_string())?;
                        let Some(entry) = inflight.iter_mut().find(|e| e.0 == f.txnr) else {
                            return Err(format!(
                                "the relay answered transaction {} that was not sent",
                                f.txnr
                            ));
                        };
                        if r.code != 200 {
                            return Err(format!(
                                "the relay refused an event ({} {})",
                                r.code, r.text
                            ));
                        }
                        entry.2 = true;
                    }
                    "serverclose" => return Err("the relay closed the RELP session".into()),
                    other => {
                        return Err(format!("unexpected RELP command `{other}` from the relay"));
                    }
                }
            }
            let mut n = 0;
            let mut to = None;
            while inflight.front().is_some_and(|e| e.2) {
                to = inflight.pop_front().map(|e| e.1);
                n += 1;
            }
            if let Some(to) = to {
                self.ack(to, n);
                last_progress = Instant::now();
            }
            if !inflight.is_empty() && last_progress.elapsed() >= ACK_TIMEOUT {
                return Err(format!(
                    "no acknowledgement from the relay for {} s",
                    ACK_TIMEOUT.as_secs()
                ));
            }
            if self
                .spool
                .done
                .get()
                .is_some_and(|t| t.elapsed() >= SHUTDOWN_GRACE)
            {
                // Stopping: what is not acknowledged stays in the spool.
                return Ok(());
            }
        }
    }
}

/// The next whole RELP frame already read from the relay, without reading more.
fn buffered_frame(rbuf: &mut Vec<u8>) -> Result<Option<crate::output::relp::Frame>, String> {
    match crate::output::relp::parse_frame(rbuf) {
        Ok(Some((f, n))) => {
            rbuf.drain(..n);
            Ok(Some(f))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The next whole RELP frame from the relay: read until one is there, or until
/// `deadline` (None: a single read of at most ACK_POLL). Ok(None): none yet.
fn read_frame(
    link: &mut Link,
    rbuf: &mut Vec<u8>,
    deadline: Option<Instant>,
) -> Result<Option<crate::output::relp::Frame>, String> {
    use io::Read as _;
    let mut chunk = [0u8; 4096];
    loop {
        match crate::output::relp::parse_frame(rbuf) {
            Ok(Some((f, n))) => {
                rbuf.drain(..n);
                return Ok(Some(f));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match link.read(&mut chunk) {
            Ok(0) => return Err("the relay closed the connection".into()),
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if deadline.is_none_or(|d| Instant::now() >= d) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}
