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
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::event::Event;

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

/// Where a network sink sends: `unix:/path`, `udp:host:port` or `tcp:host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Udp(String),
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        let bad =
            || format!("`{s}` is not an endpoint: use unix:/path, udp:host:port or tcp:host:port");
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
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Udp(a) => write!(f, "udp:{a}"),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
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
    /// JSON lines over a TCP or unix stream socket (Vector, Fluent Bit, Logstash),
    /// reconnecting with back-off.
    Forward(Endpoint),
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::File(p) => write!(f, "file:{}", p.display()),
            SinkSpec::Syslog(e) => write!(f, "syslog:{e}"),
            SinkSpec::Forward(e) => write!(f, "forward:{e}"),
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
    queues: Vec<Sender<Vec<Arc<Event>>>>,
    /// Events sent since the last flush: handed over as one batch per sink, so the event
    /// loop pays one channel operation (and at most one wake-up) per drained batch, not
    /// per event.
    batch: Vec<Arc<Event>>,
    shared: Arc<OutputShared>,
    /// Writers and their ends of the queues until `start`.
    pending: Vec<(Writer, Receiver<Vec<Arc<Event>>>)>,
    threads: Vec<JoinHandle<()>>,
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
    ) -> anyhow::Result<Output> {
        let mut shared = OutputShared::default();
        let mut writers = Vec::new();
        for spec in sinks {
            let conn = Conn::open(spec)?;
            let tty = matches!(spec, SinkSpec::Stdout) && io::stdout().is_terminal();
            let render = match spec {
                SinkSpec::Syslog(e) => Render::Syslog {
                    framing: if matches!(e, Endpoint::Tcp(_)) {
                        Framing::OctetCounted
                    } else {
                        Framing::Datagram
                    },
                    inner: format,
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
                connected: AtomicBool::new(conn.is_connected()),
                path,
                file_ino: AtomicU64::new(ino),
                ..SinkShared::default()
            });
            shared.sinks.push(sink.clone());
            writers.push((conn, render, tty, sink));
        }
        let shared = Arc::new(shared);
        let color_ok = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let mut queues = Vec::new();
        let mut pending = Vec::new();
        for (conn, render, tty, sink) in writers {
            let (tx, rx) = channel::<Vec<Arc<Event>>>();
            queues.push(tx);
            let writer = Writer {
                conn,
                render,
                color: tty && color_ok,
                seq: 0,
                reopened: 0,
                buf: Vec::with_capacity(1 << 16),
                ends: Vec::new(),
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
    /// TCP or unix stream, reconnected on failure.
    Connected {
        endpoint: Endpoint,
        stream: Option<Box<dyn Write + Send>>,
        backoff: Duration,
    },
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
    /// RFC 6587 octet counting: `LEN SP MSG`.
    OctetCounted,
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
            SinkSpec::Syslog(e @ Endpoint::Tcp(_)) | SinkSpec::Forward(e) => {
                if let Endpoint::Udp(a) = e {
                    anyhow::bail!(
                        "--forward sends JSON lines over a stream: udp:{a} is not one; use tcp: or unix:"
                    );
                }
                let stream = connect_stream(e).ok();
                if stream.is_none() {
                    log::warn!("{e}: not reachable yet; will retry (events queue meanwhile)");
                }
                Conn::Connected {
                    endpoint: e.clone(),
                    stream,
                    backoff: RECONNECT_MIN,
                }
            }
        })
    }

    fn is_connected(&self) -> bool {
        match self {
            Conn::UnixDgram { sock, .. } => sock.is_some(),
            Conn::Connected { stream, .. } => stream.is_some(),
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

fn connect_stream(e: &Endpoint) -> io::Result<Box<dyn Write + Send>> {
    let timeout = Duration::from_secs(2);
    match e {
        Endpoint::Tcp(addr) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_write_timeout(Some(Duration::from_secs(10)))?;
                        s.set_nodelay(true)?;
                        return Ok(Box::new(s));
                    }
                    Err(err) => last = err,
                }
            }
            Err(last)
        }
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path)?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(Box::new(s))
        }
        Endpoint::Udp(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream endpoint",
        )),
    }
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
                    self.sink.written.fetch_add(n as u64, Ordering::Relaxed);
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
            Conn::Connected {
                endpoint,
                stream,
                backoff,
            } => {
                // Hold the batch until connected: meanwhile the queue fills and the event
                // loop counts what it cannot queue. At shutdown, give up after a grace.
                let mut since_stop: Option<Instant> = None;
                while stream.is_none() {
                    match connect_stream(endpoint) {
                        Ok(s) => {
                            log::info!("{endpoint}: connected");
                            *stream = Some(s);
                            *backoff = RECONNECT_MIN;
                        }
                        Err(e) => {
                            if self.shared.stopping.load(Ordering::Relaxed) {
                                let t = *since_stop.get_or_insert_with(Instant::now);
                                if t.elapsed() >= SHUTDOWN_GRACE {
                                    return Err(e);
                                }
                            }
                            self.sink.connected.store(false, Ordering::Relaxed);
                            std::thread::sleep(*backoff);
                            *backoff = (*backoff * 2).min(RECONNECT_MAX);
                        }
                    }
                }
                self.sink.connected.store(true, Ordering::Relaxed);
                let s = stream.as_mut().expect("connected above");
                let res = s.write_all(&self.buf).and_then(|()| s.flush());
                if res.is_err() {
                    *stream = None;
                    self.sink.connected.store(false, Ordering::Relaxed);
                }
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
                if framing == Framing::OctetCounted {
                    let _ = write!(self.buf, "{} ", self.msg.len());
                }
                self.buf.extend_from_slice(&self.msg);
                ok
            }
        };
        if ok {
            self.ends.push(self.buf.len());
        } else {
            // Typed structs with string keys always serialise; were one not to, its
            // half-written bytes are taken back so the stream stays one event per line.
            self.buf.truncate(mark);
        }
    }

    /// One syslog message (header and body) in `msg`.
    fn syslog_message(&mut self, inner: Format, ev: &Event) -> bool {
        self.msg.clear();
        crate::syslog::header(ev, &mut self.msg);
        let body_at = self.buf.len();
        let ok = self.body(inner, ev);
        self.msg.extend_from_slice(&self.buf[body_at..]);
        self.buf.truncate(body_at);
        ok
    }

    /// The event's body in `format`, appended to `buf`.
    fn body(&mut self, format: Format, ev: &Event) -> bool {
        match format {
            Format::Json => crate::json::write_event(&mut self.buf, ev).is_ok(),
            Format::Ocsf => crate::ocsf::render(ev, &mut self.buf).is_ok(),
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
        let mut p: crate::event::Process = (**p).clone();
        if level >= 2 {
            p.command_line = None;
        } else {
            p.command_line = p.command_line.as_deref().map(cut);
        }
        p.args = None;
        ev.process = Some(crate::event::shared(p));
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
    let ts = ev.timestamp.get(11..23).unwrap_or(&ev.timestamp);
    let alert = ev.event.kind == "alert";
    let (on, off) = match (color, alert, ev.event.severity) {
        (true, true, Some(s)) if s >= 70 => ("\x1b[1;31m", "\x1b[0m"),
        (true, true, _) => ("\x1b[1;33m", "\x1b[0m"),
        (true, false, _) if ev.event.action == "events-lost" => ("\x1b[35m", "\x1b[0m"),
        (true, false, _) => ("", ""),
        (false, _, _) => ("", ""),
    };
    let _ = write!(out, "{ts} {on}{:<16}{off}", ev.event.action);
    if let (true, Some(level)) = (alert, &ev.log) {
        let _ = write!(out, " {on}{}{off}", level.level.to_uppercase());
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
