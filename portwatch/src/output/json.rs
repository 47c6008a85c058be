//! The ECS JSON line of an [`Event`], written by hand.
//!
//! It writes exactly what `serde_json::to_writer(&event)` writes (the tests compare the
//! two on events with every field set), at a fraction of the cost: keys and punctuation
//! are byte literals copied in one piece, strings without anything to escape are copied
//! as they are, and the shared parts (host, process, user...) come pre-rendered. At full
//! listener churn the derived serialiser spent most of its time escaping the same
//! forty-odd keys for every event (perf: `format_escaped_str`). The rarely present parts
//! (rule, exposure, risk, alert, loss, stats, hooks) still go through serde.

use std::net::IpAddr;

use serde::Serialize;

use crate::output::event::{Event, EventMeta, Portwatch, Socket};

/// Append `ev` as one JSON document (no newline).
pub fn write_event(out: &mut Vec<u8>, ev: &Event) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"@timestamp\":");
    time(out, ev.time_ns);
    if let Some(m) = &ev.message {
        out.extend_from_slice(b",\"message\":");
        string(out, m);
    }
    out.extend_from_slice(b",\"event\":");
    event_meta(out, &ev.event);
    if let Some(l) = &ev.log {
        out.extend_from_slice(b",\"log\":{\"level\":");
        string(out, l.level.as_str());
        out.push(b'}');
    }
    if let Some(n) = &ev.network {
        out.extend_from_slice(b",\"network\":{\"transport\":");
        string(out, n.transport.as_str());
        out.extend_from_slice(b",\"type\":");
        string(out, n.type_);
        out.push(b'}');
    }
    if let Some(s) = &ev.server {
        out.extend_from_slice(b",\"server\":{\"ip\":\"");
        ip(out, s.ip);
        out.extend_from_slice(b"\",\"port\":");
        uint(out, u64::from(s.port));
        out.push(b'}');
    }
    field(out, b",\"process\":", ev.process.as_deref())?;
    field(out, b",\"user\":", ev.user.as_deref())?;
    field(out, b",\"group\":", ev.group.as_deref())?;
    field(out, b",\"container\":", ev.container.as_deref())?;
    field(out, b",\"rule\":", ev.rule.as_ref())?;
    field(out, b",\"host\":", Some(&*ev.host))?;
    field(out, b",\"agent\":", Some(&*ev.agent))?;
    out.extend_from_slice(b",\"ecs\":{\"version\":");
    string(out, ev.ecs.version);
    out.extend_from_slice(b"},\"portwatch\":");
    portwatch(out, &ev.portwatch)?;
    out.push(b'}');
    Ok(())
}

/// An RFC 3339 time, quoted (nothing in it needs escaping).
fn time(out: &mut Vec<u8>, ns: i128) {
    out.push(b'"');
    crate::time::write_rfc3339(out, ns);
    out.push(b'"');
}

fn event_meta(out: &mut Vec<u8>, m: &EventMeta) {
    out.extend_from_slice(b"{\"kind\":");
    string(out, m.kind.as_str());
    out.extend_from_slice(b",\"category\":");
    strings(out, m.category);
    out.extend_from_slice(b",\"type\":");
    strings(out, m.type_);
    out.extend_from_slice(b",\"action\":");
    string(out, m.action.as_str());
    out.extend_from_slice(b",\"dataset\":");
    string(out, m.dataset);
    out.extend_from_slice(b",\"module\":");
    string(out, m.module);
    out.extend_from_slice(b",\"sequence\":");
    uint(out, m.sequence);
    if let Some(d) = m.duration {
        out.extend_from_slice(b",\"duration\":");
        uint(out, d);
    }
    if let Some(s) = m.severity {
        out.extend_from_slice(b",\"severity\":");
        uint(out, u64::from(crate::output::event::ecs_severity(s).0));
    }
    out.extend_from_slice(b",\"created\":");
    time(out, m.created_ns);
    out.push(b'}');
}

fn portwatch(out: &mut Vec<u8>, p: &Portwatch) -> serde_json::Result<()> {
    // Fields are separated by the comma written before each one but the first.
    let mut sep = Sep::default();
    if let Some(s) = &p.socket {
        sep.key(out, b"\"socket\":");
        socket(out, s);
    }
    sep.field(out, b"\"systemd\":", p.systemd.as_deref())?;
    sep.field(out, b"\"cgroup\":", p.cgroup.as_deref())?;
    sep.field(out, b"\"process\":", p.process.as_deref())?;
    if let Some(a) = p.attribution {
        sep.key(out, b"\"attribution\":");
        string(out, a);
    }
    sep.field(
        out,
        b"\"attribution_changed\":",
        p.attribution_changed.as_deref(),
    )?;
    sep.field(out, b"\"exposure\":", p.exposure.as_ref())?;
    sep.field(out, b"\"exposure_change\":", p.exposure_change.as_ref())?;
    if let Some(e) = p.ended_by {
        sep.key(out, b"\"ended_by\":");
        string(out, e);
    }
    sep.field(out, b"\"risk\":", p.risk.as_ref())?;
    sep.field(out, b"\"alert\":", p.alert.as_ref())?;
    sep.field(out, b"\"lost\":", p.lost.as_ref())?;
    if p.resync {
        sep.key(out, b"\"resync\":true");
    }
    if let Some(f) = p.folded {
        sep.key(out, b"\"folded\":");
        uint(out, f);
    }
    sep.field(out, b"\"stats\":", p.stats.as_ref())?;
    sep.field(out, b"\"hooks\":", p.hooks.as_ref())?;
    sep.field(out, b"\"fold\":", p.fold.as_ref())?;
    if let Some(n) = p.shrunk_from {
        sep.key(out, b"\"shrunk_from\":");
        uint(out, n);
    }
    sep.end(out);
    Ok(())
}

fn socket(out: &mut Vec<u8>, s: &Socket) {
    let mut sep = Sep::default();
    if let Some(i) = s.inode {
        sep.key(out, b"\"inode\":");
        uint(out, i);
    }
    if let Some(n) = s.netns {
        sep.key(out, b"\"netns\":");
        uint(out, n);
    }
    if let Some(h) = s.host_netns {
        sep.key(out, b"\"host_netns\":");
        boolean(out, h);
    }
    if let Some(v) = s.v6only {
        sep.key(out, b"\"v6only\":");
        boolean(out, v);
    }
    if s.kernel {
        sep.key(out, b"\"kernel\":true");
    }
    if s.implicit_bind {
        sep.key(out, b"\"implicit_bind\":true");
    }
    if let Some(t) = s.thread_id {
        sep.key(out, b"\"thread_id\":");
        uint(out, u64::from(t));
    }
    if !s.pids.is_empty() {
        sep.key(out, b"\"pids\":[");
        for (i, p) in s.pids.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            uint(out, u64::from(*p));
        }
        out.push(b']');
    }
    sep.end(out);
}

/// Writes `{` before the first member of an object and `,` before each later one.
#[derive(Default)]
struct Sep {
    started: bool,
}

impl Sep {
    /// Close the object (`{}` when nothing was in it).
    fn end(self, out: &mut Vec<u8>) {
        if !self.started {
            out.push(b'{');
        }
        out.push(b'}');
    }

    fn key(&mut self, out: &mut Vec<u8>, key: &[u8]) {
        out.push(if self.started { b',' } else { b'{' });
        self.started = true;
        out.extend_from_slice(key);
    }

    fn field<T: Serialize + ?Sized>(
        &mut self,
        out: &mut Vec<u8>,
        key: &[u8],
        value: Option<&T>,
    ) -> serde_json::Result<()> {
        if let Some(v) = value {
            self.key(out, key);
            serde_json::to_writer(&mut *out, v)?;
        }
        Ok(())
    }
}

/// `key` and the value through serde, when there is one (`key` has its leading comma).
fn field<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    key: &[u8],
    value: Option<&T>,
) -> serde_json::Result<()> {
    if let Some(v) = value {
        out.extend_from_slice(key);
        serde_json::to_writer(&mut *out, v)?;
    }
    Ok(())
}

/// A JSON string: copied as is when nothing in it needs escaping (serde_json escapes
/// `"`, `\` and control characters only), else escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn strings(out: &mut Vec<u8>, v: &[&str]) {
    out.push(b'[');
    for (i, s) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, s);
    }
    out.push(b']');
}

fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

fn uint(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The address as `Display` writes it (what serde writes for `IpAddr`).
fn ip(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                uint(out, u64::from(o));
            }
        }
        IpAddr::V6(a) => {
            use std::io::Write as _;
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::output::event::{Action, Kind, Level};
    use crate::socket::Protocol;
    use crate::{
        classify::Lang,
        kernel::probes::Hooks,
        output::event::{
            Agent, ArgvCut, AttributionChanged, Boot, Cgroup, Container, ECS_VERSION, Ecs, Host,
            Log, Lost, Named, Network, Parent, Process, Rule, Server, Systemd, shared,
        },
        pipeline::assess::Assessor,
    };

    fn same_as_serde(ev: &Event) {
        let mut mine = Vec::new();
        write_event(&mut mine, ev).unwrap();
        let serde = serde_json::to_vec(ev).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&mine),
            String::from_utf8_lossy(&serde)
        );
    }

    /// Every field set, hostile strings included. Struct literals without `..Default`
    /// on purpose: a field added to an event type fails to compile here until this
    /// test sets it, and then the comparison shows whether `write_event` writes it.
    fn everything() -> Event {
        let hostile = "a \"quoted\"\\ \u{1b}[31m\n\ttab \u{7f} é \u{0}";
        Event {
            time_ns: 1_795_741_780_451_005_964,
            message: Some(hostile.into()),
            event: EventMeta {
                kind: Kind::Event,
                category: &["network"],
                type_: &["start", "info"],
                action: Action::ListenStarted,
                dataset: "portwatch.listener",
                module: "portwatch",
                sequence: u64::MAX,
                duration: Some(72_408),
                severity: Some(crate::classify::Severity::High),
                created_ns: 1_795_741_780_451_276_043,
            },
            log: Some(Log {
                level: Level::Warning,
            }),
            network: Some(Network {
                transport: Protocol::Tcp,
                type_: "ipv4",
            }),
            server: Some(Server {
                ip: [0, 0, 0, 0].into(),
                port: 11211,
            }),
            process: Some(shared(Process {
                pid: 4242,
                name: Some(hostile.into()),
                parent: Some(Parent { pid: 1 }),
                executable: Some("/usr/bin/memcached".into()),
                command_line: Some(hostile.into()),
                args: Some(vec![hostile.into(), "-p".into()]),
                start_ns: Some(1_795_741_780_358_453_171),
                entity_id: Some("7b72bf9fd06433c9".into()),
                executable_owner: Some(0),
            })),
            user: Some(shared(Named {
                id: "0".into(),
                name: Some("root".into()),
            })),
            group: Some(shared(Named {
                id: "0".into(),
                name: None,
            })),
            container: Some(shared(Container {
                id: "4f66ad9a0b2e".into(),
                runtime: Some("docker"),
            })),
            rule: Some(Rule {
                id: "memcached".into(),
                name: hostile.into(),
                description: "d".into(),
                reference: Some("https://example.org".into()),
                ruleset: "portwatch-catalogue",
            }),
            host: shared(Host {
                name: "vm".into(),
                id: Some("3d1219c7".into()),
                boot: Some(Boot {
                    id: "3800f63a".into(),
                }),
            }),
            agent: shared(Agent {
                type_: "portwatch",
                name: "portwatch",
                version: "0.1.0",
            }),
            ecs: Ecs {
                version: ECS_VERSION,
            },
            portwatch: Portwatch {
                socket: Some(Socket {
                    inode: Some(435_178_084),
                    netns: Some(4_026_531_833),
                    host_netns: Some(false),
                    v6only: Some(true),
                    kernel: true,
                    implicit_bind: true,
                    thread_id: Some(5267),
                    pids: vec![1, 2, 3],
                }),
                systemd: Some(shared(Systemd {
                    unit: Some("memcached.service".into()),
                    slice: Some("system.slice".into()),
                    user_manager: Some(1000),
                })),
                cgroup: Some(shared(Cgroup {
                    id: Some(1),
                    path: Some(hostile.into()),
                })),
                process: Some(shared(ArgvCut {
                    truncated: true,
                    original_length: 65_009,
                    original_args_count: 2,
                })),
                attribution: Some("proc"),
                attribution_changed: Some(shared(AttributionChanged {
                    reasons: vec!["renamed", "cgroup-moved", "uid-changed"],
                    name: Some(hostile.into()),
                    executable: Some(hostile.into()),
                    command_line: Some(hostile.into()),
                    cgroup: Some(hostile.into()),
                    uid: Some(1000),
                })),
                exposure: None,
                exposure_change: None,
                ended_by: Some("rule-removed"),
                risk: None,
                alert: None,
                lost: Some(Lost {
                    count: 3,
                    total: 9,
                    reason: "output-queue-full",
                    sink: Some("file:/var/log/x".into()),
                    lane: Some("urgent"),
                }),
                resync: true,
                folded: Some(4),
                stats: Some(serde_json::json!({"a": [1, 2.5, null], "b": hostile})),
                hooks: Some(Hooks {
                    set: "stable",
                    via: "tracepoint+cgroup",
                    reason: hostile.into(),
                    programs: vec!["listen_state"],
                    attached: vec!["tracepoint/sock/inet_sock_set_state".into()],
                }),
                fold: Some(crate::output::event::FoldInfo {
                    started: 5,
                    ended: 4,
                    started_total: 10,
                    ended_total: 9,
                    ports: "1024-1030,11211".into(),
                    port_count: 8,
                    scope: "wildcard",
                    first: "2026-11-28T07:00:00.000000000Z".into(),
                    last: hostile.into(),
                    budget: vec!["process", "user"],
                    final_: true,
                    process_sent: 1000,
                    process_folded: 10,
                    process_lost: 0,
                }),
                shrunk_from: Some(700_000),
                urgent: true,
            },
        }
    }

    #[test]
    fn writes_what_serde_writes_with_every_field_set() {
        same_as_serde(&everything());
    }

    #[test]
    fn writes_what_serde_writes_with_every_optional_field_empty() {
        let mut ev = everything();
        ev.message = None;
        ev.event.duration = None;
        ev.event.severity = None;
        ev.event.category = &[];
        ev.log = None;
        ev.network = None;
        ev.server = None;
        ev.process = None;
        ev.user = None;
        ev.group = None;
        ev.container = None;
        ev.rule = None;
        ev.portwatch = Portwatch::default();
        same_as_serde(&ev);
        ev.portwatch.socket = Some(Socket::default());
        same_as_serde(&ev);
    }

    #[test]
    fn writes_what_serde_writes_for_assessed_listeners_and_their_alerts() {
        for (ip, port) in [
            (IpAddr::from([0, 0, 0, 0]), 11211),
            (IpAddr::from([127, 0, 0, 1]), 3306),
            (IpAddr::from(Ipv6Addr::UNSPECIFIED), 23),
            (IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 1]), 5353),
            (IpAddr::from([192, 168, 255, 10]), 8080),
        ] {
            let mut ev = everything();
            ev.portwatch = Portwatch {
                attribution: Some("proc"),
                ..Portwatch::default()
            };
            ev.rule = None;
            ev.server = Some(Server { ip, port });
            let alert = Assessor::new(None, Lang::En, None).assess(&mut ev);
            assert!(ev.portwatch.exposure.is_some(), "{ip}:{port} classified");
            same_as_serde(&ev);
            if let Some(alert) = alert {
                same_as_serde(&alert);
            }
        }
    }

    #[test]
    fn numbers_and_addresses_match_their_display() {
        for v in [0, 9, 10, 99, 100, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            uint(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
        }
        for a in [[0, 0, 0, 0], [255, 255, 255, 255], [10, 0, 12, 100]] {
            let mut out = Vec::new();
            ip(&mut out, IpAddr::from(a));
            assert_eq!(out, IpAddr::from(a).to_string().as_bytes());
        }
    }
}
