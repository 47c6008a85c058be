//! Sinks: one JSON document per line for machines, one readable line for people.

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{self, IsTerminal, Write},
    os::{fd::AsFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::event::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Text,
}

/// Stop writing: the reader went away (`| head`). Not an error for the user.
#[derive(Debug, thiserror::Error)]
#[error("output closed by the reader")]
pub struct Closed;

/// Events waiting for the writer thread, by default. An event is about 1 KiB in memory,
/// so the queue holds at most ~16 MiB; at full listener churn it covers ~80 ms of stall.
pub const QUEUE_EVENTS: usize = 16_384;
/// Events rendered into one write(2).
const WRITE_BATCH: usize = 1024;
/// Output errors are logged once, then at most this often (they are counted regardless).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the writer thread and the event loop share: counters for health and loss
/// reports, and the flags that steer the writer.
#[derive(Default)]
pub struct OutputShared {
    /// Events dropped because the queue was full, not yet reported as lost.
    pub queue_dropped: AtomicU64,
    /// Events that a failed write(2) took with it, not yet reported as lost.
    pub write_lost: AtomicU64,
    /// Failed write(2) calls since start.
    pub write_errors: AtomicU64,
    /// Events written since start.
    pub written: AtomicU64,
    /// Events queued and not yet written (approximate: updated per batch).
    pub depth: AtomicUsize,
    /// Set when the reader of stdout (or a pipe) went away: the agent stops.
    pub closed: AtomicBool,
    pub closed_notify: tokio::sync::Notify,
    /// Set by SIGHUP: reopen the output file before the next write.
    pub reopen: AtomicBool,
}

/// The output side of the agent: a bounded queue and a thread that numbers, renders and
/// writes events. The event loop never blocks on output: when the queue is full an
/// event is dropped and counted (reported as `events-lost`, reason `output-queue-full`).
/// `event.sequence` is assigned here, at write time, so the written stream is gap-free
/// and a consumer can detect loss downstream of the agent.
pub struct Output {
    tx: Option<SyncSender<Box<Event>>>,
    shared: Arc<OutputShared>,
    /// The writer and its end of the queue until `start`.
    pending: Option<(Writer, Receiver<Box<Event>>)>,
    thread: Option<JoinHandle<()>>,
    /// Wait for room instead of dropping (one-shot commands, where nothing is live).
    block: bool,
}

impl Output {
    /// Open the destination (`path` None is stdout) so that a bad path fails now; the
    /// writer thread starts with [`Output::start`]. Colour only on a terminal and never
    /// with NO_COLOR set.
    pub fn new(
        format: Format,
        path: Option<&Path>,
        queue: usize,
        block: bool,
    ) -> anyhow::Result<Output> {
        let (sink, tty) = Sink::open(path)?;
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let shared = Arc::new(OutputShared::default());
        let (tx, rx) = sync_channel::<Box<Event>>(queue.max(1));
        let writer = Writer {
            sink,
            path: path.map(Path::to_path_buf),
            format,
            color,
            seq: 0,
            buf: Vec::with_capacity(1 << 16),
            line: String::with_capacity(256),
            shared: shared.clone(),
            last_error_log: None,
        };
        Ok(Output {
            tx: Some(tx),
            shared,
            pending: Some((writer, rx)),
            thread: None,
            block,
        })
    }

    /// Start the writer thread (the agent does so after dropping its capabilities, so the
    /// thread inherits the reduced set).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Some((writer, rx)) = self.pending.take() {
            let thread = std::thread::Builder::new()
                .name("portwatch-out".into())
                .spawn(move || writer.run(rx))
                .context("starting the output thread")?;
            self.thread = Some(thread);
        }
        Ok(())
    }

    /// Queue one event. Returns false when it was dropped (queue full or output closed);
    /// a drop while the output is open is counted in `queue_dropped`.
    pub fn send(&self, ev: Event) -> bool {
        let Some(tx) = &self.tx else { return false };
        let ev = Box::new(ev);
        // Counted before the send: the writer decrements after taking it.
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        let ok = if self.block {
            tx.send(ev).is_ok()
        } else {
            tx.try_send(ev).is_ok()
        };
        if !ok {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            if !self.shared.closed.load(Ordering::Relaxed) {
                self.shared.queue_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        ok
    }

    pub fn shared(&self) -> &Arc<OutputShared> {
        &self.shared
    }

    /// Write everything queued and stop the writer thread. `Closed` when the reader
    /// went away.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.start()?;
        self.tx = None;
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the output thread panicked"))?;
        }
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Closed.into());
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Errors were reported by whoever called finish(); here only the thread is joined.
        let _ = self.finish();
    }
}

/// Where the bytes go: stdout or an append-only file (created 0600). For a regular
/// file, a write that fails half-way (disk full) is cut back to the last whole line.
struct Sink {
    file: File,
    regular: bool,
    /// A failed write may have left half a line that could not be cut back: the next
    /// batch starts with a newline so that at most that one line is damaged.
    broken_line: bool,
}

impl Sink {
    fn open(path: Option<&Path>) -> anyhow::Result<(Sink, bool)> {
        match path {
            None => {
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating stdout")?;
                let file = File::from(fd);
                let regular = file.metadata().is_ok_and(|m| m.is_file());
                let sink = Sink {
                    file,
                    regular,
                    broken_line: false,
                };
                Ok((sink, io::stdout().is_terminal()))
            }
            Some(p) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
                    .with_context(|| {
                        format!(
                            "cannot open output file {} for appending; check the directory \
                             exists and is writable",
                            p.display()
                        )
                    })?;
                let regular = f.metadata().is_ok_and(|m| m.is_file());
                let sink = Sink {
                    file: f,
                    regular,
                    broken_line: false,
                };
                Ok((sink, false))
            }
        }
    }

    /// Write all of `buf`, or (regular files) nothing: the stream stays whole lines.
    fn write_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        let before = if self.regular {
            self.file.metadata().ok().map(|m| m.len())
        } else {
            None
        };
        if self.broken_line {
            self.file.write_all(b"\n")?;
            self.broken_line = false;
        }
        let res = self.file.write_all(buf);
        if res.is_err() {
            self.broken_line = before.is_none_or(|len| self.file.set_len(len).is_err());
        }
        res
    }
}

struct Writer {
    sink: Sink,
    path: Option<PathBuf>,
    format: Format,
    color: bool,
    seq: u64,
    buf: Vec<u8>,
    line: String,
    shared: Arc<OutputShared>,
    last_error_log: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Box<Event>>) {
        // Block for the first event, then take whatever else is queued: one write(2) per
        // batch, and nothing waits in a buffer for a later event.
        while let Ok(first) = rx.recv() {
            self.buf.clear();
            self.render(*first);
            let mut n = 1;
            while n < WRITE_BATCH {
                let Ok(ev) = rx.try_recv() else { break };
                self.render(*ev);
                n += 1;
            }
            self.shared.depth.fetch_sub(n, Ordering::Relaxed);
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.reopen();
            }
            match self.sink.write_batch(&self.buf) {
                Ok(()) => {
                    self.shared.written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.shared.closed.store(true, Ordering::Relaxed);
                    self.shared.closed_notify.notify_one();
                    return;
                }
                Err(e) => {
                    // The batch was cut back: its numbers are given to the next events,
                    // so the file stays gap-free and the loss is told by events-lost.
                    self.seq -= n as u64;
                    self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .write_lost
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let now = Instant::now();
                    if self
                        .last_error_log
                        .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY)
                    {
                        self.last_error_log = Some(now);
                        log::error!(
                            "writing events to {}: {e}; {n} events lost (counted, reported as \
                             events-lost once the output works again)",
                            self.target()
                        );
                    }
                }
            }
        }
    }

    fn target(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string())
    }

    /// SIGHUP (logrotate moved the file away): continue in a new file at the same path.
    fn reopen(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        match Sink::open(Some(&path)) {
            Ok((sink, _)) => {
                self.sink = sink;
                log::info!("reopened {}", path.display());
            }
            Err(e) => log::error!("{e:#}; still writing to the file open before"),
        }
    }

    fn render(&mut self, mut ev: Event) {
        self.seq += 1;
        ev.event.sequence = self.seq;
        match self.format {
            Format::Json => {
                // Typed structs with string keys always serialise; were one not to, its
                // half-written bytes are taken back so the stream stays one JSON per line.
                let mark = self.buf.len();
                if serde_json::to_writer(&mut self.buf, &ev).is_ok() {
                    self.buf.push(b'\n');
                } else {
                    self.buf.truncate(mark);
                }
            }
            Format::Text => {
                self.line.clear();
                text_line(&mut self.line, &ev, self.color);
                self.line.push('\n');
                self.buf.extend_from_slice(self.line.as_bytes());
            }
        }
    }
}

/// Replace control characters (and other non-printables) with visible escapes, so a
/// process named "\x1b[2J" cannot drive the reader's terminal.
pub fn sanitize(out: &mut String, s: &str) {
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
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
        let ip = if s.ip.contains(':') {
            format!("[{}]", s.ip)
        } else {
            s.ip.clone()
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
        let _ = write!(out, " container={}", c.id.get(..12).unwrap_or(&c.id));
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
    fn durations_read_well() {
        assert_eq!(human_ns(512), "512ns");
        assert_eq!(human_ns(1_500_000), "1.5ms");
        assert_eq!(human_ns(2_000_000_000), "2.0s");
    }
}
