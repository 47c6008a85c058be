//! Sinks: one JSON document per line for machines, one readable line for people.

use std::{
    fmt::Write as _,
    fs::OpenOptions,
    io::{self, BufWriter, IsTerminal, Write},
    path::Path,
};

use anyhow::Context as _;

use crate::event::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Text,
}

pub struct Emitter {
    out: BufWriter<Box<dyn Write + Send>>,
    format: Format,
    color: bool,
    buf: Vec<u8>,
    line: String,
}

/// Stop writing: the reader went away (`| head`). Not an error for the user.
#[derive(Debug, thiserror::Error)]
#[error("output closed by the reader")]
pub struct Closed;

impl Emitter {
    /// `path` None is stdout. Colour only on a terminal and never with NO_COLOR set.
    pub fn new(format: Format, path: Option<&Path>) -> anyhow::Result<Emitter> {
        let (out, tty): (Box<dyn Write + Send>, bool) = match path {
            None => (Box::new(io::stdout()), io::stdout().is_terminal()),
            Some(p) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| {
                        format!(
                            "cannot open output file {} for appending; check the directory \
                         exists and is writable",
                            p.display()
                        )
                    })?;
                (Box::new(f), false)
            }
        };
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Ok(Emitter {
            out: BufWriter::with_capacity(1 << 16, out),
            format,
            color,
            buf: Vec::with_capacity(2048),
            line: String::with_capacity(256),
        })
    }

    pub fn write(&mut self, ev: &Event) -> anyhow::Result<()> {
        match self.format {
            Format::Json => {
                self.buf.clear();
                serde_json::to_writer(&mut self.buf, ev).context("serialising an event")?;
                self.buf.push(b'\n');
                let res = self.out.write_all(&self.buf);
                check(res)
            }
            Format::Text => {
                self.line.clear();
                text_line(&mut self.line, ev, self.color);
                self.line.push('\n');
                let res = self.out.write_all(self.line.as_bytes());
                check(res)
            }
        }
    }

    /// Called after each batch drained from the ring: nothing ever waits in the buffer
    /// for a later event.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        let res = self.out.flush();
        check(res)
    }
}

fn check(res: io::Result<()>) -> anyhow::Result<()> {
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing events")),
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
