//! `portwatch snapshot`: what listens now, attributed, as a table for a person or as the
//! same `listener-present` JSON events `watch` writes at start. The manual
//! `ss -tulp state listening` audit, made complete.

use std::{
    cmp::Reverse,
    io::{self, IsTerminal, Write},
    path::PathBuf,
};

use anyhow::Context as _;

use crate::{
    attribution::procfs,
    attribution::scan,
    output::event::Event,
    output::sinks::sanitize,
    pipeline::{agent::PolicyOptions, assess::Assessor, core::Core, events::Events},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotFormat {
    Table,
    Json,
}

/// Prints the snapshot; returns how many listeners raised an alert.
pub fn snapshot_command(format: SnapshotFormat, policy: PolicyOptions) -> anyhow::Result<usize> {
    let color = format == SnapshotFormat::Table
        && io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if unsafe { libc::geteuid() } != 0 {
        log::warn!("not root: sockets of other users' processes cannot be attributed");
    }
    let cgroup_root = procfs::cgroup2_mount()
        .ok()
        .flatten()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let found = scan::scan().context("reading listeners from /proc")?;
    let mut events = present_events(&found, cgroup_root, policy);
    events.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    let mut seq = 0;
    for (ev, alert) in events.iter_mut() {
        for e in std::iter::once(ev).chain(alert.as_mut()) {
            seq += 1;
            e.event.sequence = seq;
        }
    }
    let alerts = events.iter().filter(|(_, a)| a.is_some()).count();
    match format {
        SnapshotFormat::Json => {
            let mut buf = Vec::new();
            for ev in events
                .iter()
                .flat_map(|(ev, alert)| std::iter::once(ev).chain(alert))
            {
                crate::output::json::write_event(&mut buf, ev).context("rendering an event")?;
                buf.push(b'\n');
            }
            let mut out = io::stdout().lock();
            match out.write_all(&buf).and_then(|()| out.flush()) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other.context("writing the events")?,
            }
        }
        SnapshotFormat::Table => {
            let table = render_table(&events, color);
            let mut out = io::stdout().lock();
            match out.write_all(table.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other.context("writing the table")?,
            }
        }
    }
    Ok(alerts)
}

/// Each listener found, as the `listener-present` event `watch` writes at start, classified
/// (firewall verdict included), with the alert it raises. The agent's own sockets are left
/// out by the same merge `watch` uses.
fn present_events(
    found: &[scan::Found],
    cgroup_root: PathBuf,
    policy: PolicyOptions,
) -> Vec<(Event, Option<Event>)> {
    let mut events = Events::new(cgroup_root, Vec::new());
    let mut assessor = Assessor::new(policy.rules, policy.lang, events.host_netns);
    events.important_ports = assessor.important_ports();
    assessor.enable_firewall(None);
    let mut core: Core<()> = Core::new(std::process::id(), None);
    core.scan_started(false);
    let merge = core.merge(found, false, std::time::Instant::now());
    let now = events.now();
    let mut owners = std::collections::HashMap::new();
    merge
        .report
        .into_iter()
        .map(|i| {
            let mut ev = events.present(&found[i], now, &mut owners).0;
            let alert = assessor.assess(&mut ev);
            (ev, alert)
        })
        .collect()
}

/// Worst first: alert severity, then risky-but-quiet, then by transport and port.
fn sort_key(
    (e, alert): &(Event, Option<Event>),
) -> (
    Reverse<Option<crate::classify::Severity>>,
    Reverse<bool>,
    &'static str,
    u16,
) {
    let severity = alert.as_ref().and_then(|a| a.event.severity);
    let risky = e.portwatch.risk.is_some();
    let transport = e.network.as_ref().map_or("", |n| n.transport.as_str());
    let port = e.server.as_ref().map_or(0, |s| s.port);
    (Reverse(severity), Reverse(risky), transport, port)
}

/// Plain columns, widths fitted to the content; every string from the host is sanitised.
pub fn render_table(events: &[(Event, Option<Event>)], color: bool) -> String {
    let header = [
        "RISK",
        "PROTO",
        "ADDRESS",
        "EXPOSURE",
        "FIREWALL",
        "PUBLISHED",
        "SERVICE",
        "PID",
        "PROGRAM",
        "USER",
        "UNIT",
        "CONTAINER",
        "NETNS",
    ];
    let mut rows: Vec<[String; 13]> = Vec::with_capacity(events.len());
    let mut advice = String::new();
    for (e, alert) in events {
        let clean = |s: &str| {
            let mut out = String::new();
            sanitize(&mut out, s);
            out
        };
        let (proto, addr) = match (&e.network, &e.server) {
            (Some(n), Some(s)) if s.ip.is_ipv6() => {
                (n.transport.to_string(), format!("[{}]:{}", s.ip, s.port))
            }
            (Some(n), Some(s)) => (n.transport.to_string(), format!("{}:{}", s.ip, s.port)),
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
            .map_or("-".into(), |c| clean(c.id.get(..12).unwrap_or(&c.id)));
        let netns = match socket {
            Some(s) if s.host_netns == Some(true) => "host".to_owned(),
            Some(s) => s.netns.map_or("?".into(), |n| n.to_string()),
            None => "?".into(),
        };
        let risk = match (alert, &e.portwatch.risk) {
            (Some(a), _) => a
                .log
                .as_ref()
                .map_or("alert", |l| l.level.as_str())
                .to_uppercase(),
            (None, Some(r)) if r.allowed_by.is_some() => "allowed".into(),
            (None, Some(_)) => "ok".into(),
            (None, None) => "-".into(),
        };
        let exposure = e.portwatch.exposure.as_ref().map_or("?".into(), |x| {
            if x.is_wildcard() {
                format!("all ({})", x.effective_scope().as_str())
            } else {
                x.scope.as_str().to_owned()
            }
        });
        // The host firewall's verdict for a new connection from where it is exposed.
        let firewall = e
            .portwatch
            .exposure
            .as_ref()
            .and_then(|x| x.firewall.as_ref())
            .map_or("-".into(), |f| f.verdict.as_str().to_owned());
        // The host port a NAT rule publishes it on, and that path's verdict.
        let published = e
            .portwatch
            .exposure
            .as_ref()
            .and_then(|x| x.published.as_ref())
            .map_or("-".into(), |p| {
                let mut s = format!("{}:{} {}", p.host.ip, p.host.port, p.verdict.as_str());
                // Output NAT chain: local processes only, or them as well.
                if p.is_local_source() {
                    s.push_str(" (local)");
                } else if let Some(v) = p.local_verdict {
                    s.push_str(&format!(" (local {})", v.as_str()));
                }
                s
            });
        let service = alert
            .as_ref()
            .and_then(|a| a.rule.as_ref())
            .map(|r| r.name.clone())
            .or_else(|| e.portwatch.risk.as_ref().and_then(|r| r.rule.clone()))
            .unwrap_or_else(|| "-".into());
        if let Some(a) = alert {
            let (on, off) = if color {
                ("\x1b[1;31m", "\x1b[0m")
            } else {
                ("", "")
            };
            advice.push_str(&format!("\n{on}{risk}{off} {addr} ({proto}): "));
            sanitize(&mut advice, a.message.as_deref().unwrap_or(""));
            advice.push('\n');
            if let Some(info) = &a.portwatch.alert {
                for step in &info.remediation.steps {
                    advice.push_str("  # ");
                    sanitize(&mut advice, &step.title);
                    advice.push('\n');
                    for c in &step.commands {
                        advice.push_str("  ");
                        sanitize(&mut advice, c);
                        advice.push('\n');
                    }
                }
            }
        }
        rows.push([
            risk, proto, addr, exposure, firewall, published, service, pid, program, user, unit,
            container, netns,
        ]);
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
    let alerts = events.iter().filter(|(_, a)| a.is_some()).count();
    out.push_str(&format!(
        "{} listeners, {alerts} raising an alert\n",
        rows.len()
    ));
    out.push_str(&advice);
    out
}
