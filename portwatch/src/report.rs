//! `portwatch snapshot`: what listens now, attributed, as a table for a person or as the
//! same `listener-present` JSON events `watch` writes at start. The manual
//! `ss -tulp state listening` audit, made complete.

use std::{
    io::{self, Write},
    path::PathBuf,
};

use anyhow::Context as _;

use crate::{
    agent::Pipeline,
    emit::{Emitter, Format, sanitize},
    event::Event,
    procfs, snapshot,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotFormat {
    Table,
    Json,
}

pub fn snapshot_command(format: SnapshotFormat) -> anyhow::Result<Vec<Event>> {
    if unsafe { libc::geteuid() } != 0 {
        log::warn!("not root: sockets of other users' processes cannot be attributed");
    }
    let cgroup_root = procfs::cgroup2_mount()
        .ok()
        .flatten()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let found = snapshot::scan().context("reading listeners from /proc")?;
    let emitter = Emitter::new(Format::Json, None)?;
    let mut pipeline = Pipeline::new(emitter, cgroup_root);
    let mut events = pipeline.present_events(&found);
    events.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    for (i, ev) in events.iter_mut().enumerate() {
        ev.event.sequence = i as u64 + 1;
    }
    match format {
        SnapshotFormat::Json => {
            for ev in &events {
                pipeline.write_now(ev)?;
            }
            pipeline.flush()?;
        }
        SnapshotFormat::Table => {
            let table = render_table(&events);
            let mut out = io::stdout().lock();
            match out.write_all(table.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other.context("writing the table")?,
            }
        }
    }
    Ok(events)
}

fn sort_key(e: &Event) -> (u8, &'static str, u16) {
    let severity = e.event.severity.unwrap_or(0);
    let transport = e.network.as_ref().map_or("", |n| n.transport);
    let port = e.server.as_ref().map_or(0, |s| s.port);
    (u8::MAX - severity, transport, port)
}

/// Plain columns, widths fitted to the content; every string from the host is sanitised.
pub fn render_table(events: &[Event]) -> String {
    let header = [
        "PROTO",
        "ADDRESS",
        "PID",
        "PROGRAM",
        "USER",
        "UNIT",
        "CONTAINER",
        "NETNS",
    ];
    let mut rows: Vec<[String; 8]> = Vec::with_capacity(events.len());
    for e in events {
        let clean = |s: &str| {
            let mut out = String::new();
            sanitize(&mut out, s);
            out
        };
        let (proto, addr) = match (&e.network, &e.server) {
            (Some(n), Some(s)) if s.ip.contains(':') => {
                (n.transport.to_owned(), format!("[{}]:{}", s.ip, s.port))
            }
            (Some(n), Some(s)) => (n.transport.to_owned(), format!("{}:{}", s.ip, s.port)),
            _ => continue,
        };
        let socket = e.portwatch.socket.as_ref();
        let kernel = socket.is_some_and(|s| s.kernel);
        let (pid, program) = match &e.process {
            Some(p) => (
                p.pid.to_string(),
                clean(p.executable.as_deref().or(p.name.as_deref()).unwrap_or("?")),
            ),
            None if kernel => ("-".into(), "[kernel]".into()),
            None => ("?".into(), "?".into()),
        };
        let user = e
            .user
            .as_ref()
            .map_or("-".into(), |u| clean(u.name.as_deref().unwrap_or(&u.id)));
        let unit = e
            .portwatch
            .systemd
            .as_ref()
            .and_then(|s| s.unit.as_deref())
            .map_or("-".into(), clean);
        let container = e
            .container
            .as_ref()
            .map_or("-".into(), |c| c.id.get(..12).unwrap_or(&c.id).to_owned());
        let netns = match socket {
            Some(s) if s.host_netns == Some(true) => "host".to_owned(),
            Some(s) => s.netns.map_or("?".into(), |n| n.to_string()),
            None => "?".into(),
        };
        rows.push([proto, addr, pid, program, user, unit, container, netns]);
    }
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            out.push_str(c);
            if i + 1 < cells.len() {
                out.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    out.push_str(&format!("{} listeners\n", rows.len()));
    out
}
