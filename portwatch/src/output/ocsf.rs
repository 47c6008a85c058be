//! OCSF rendering of portwatch events, for SIEMs that take the Open Cybersecurity Schema
//! Framework instead of ECS. Follows OCSF [`OCSF_VERSION`] (1.5.0), written in every
//! event's `metadata.version`.
//!
//! Why 1.5.0: `Listen` (activity 7 of Network Activity) arrived in 1.3.0 (ocsf-schema
//! #1147, which also made `src_endpoint` optional so a listen can carry only the local
//! end), `Application Error` and the `src_endpoint`/`dst_endpoint` at-least-one rule in
//! 1.4.0, and `device.boot_uid` in 1.5.0. Nothing used here changed meaning up to 1.9.
//!
//! | portwatch `event.action` | OCSF class (`class_uid`) | activity (`activity_id`) |
//! |---|---|---|
//! | `listen-started`, `udp-bound`, `listener-present` | Network Activity (4001) | Listen (7) |
//! | `listen-stopped`, `udp-released` | Network Activity (4001) | Close (2) |
//! | `risky-listener` | Detection Finding (2004) | Create (1) |
//! | `risky-listener-repeated` | Detection Finding (2004) | Update (2) |
//! | `sensor-started` | Application Lifecycle (6002) | Start (3) |
//! | `rules-reloaded` | Application Lifecycle (6002) | Other (99), `activity_name: "Reload"` |
//! | `config-error`, `events-lost` | Application Error (6008) | General Error (1) |
//! | `sensor-health`, `snapshot-complete`, `resync-complete` | Base Event (0) | Other (99) |
//!
//! The listened-on address is `dst_endpoint`: OCSF defines `dst_endpoint` as the
//! responder of a connection, which is what a listener is for every connection it will
//! accept; there is no initiator yet, so there is no `src_endpoint`.
//! `connection_info.direction_id` is Inbound (1) for the same reason. A bound UDP socket
//! receives datagrams rather than connections, but it is the same exposure, so it is a
//! Listen too.
//!
//! Events the agent writes about itself: its start and rule reloads are Application
//! Lifecycle; a broken rules file and lost events are Application Error (the class's
//! own description: issues of an application that produces OCSF events, message in
//! `message`); health figures and scan completions have no OCSF class (no heartbeat
//! or metric class exists in 1.x), so they are Base Event with activity Other and the
//! figures under `unmapped`.
//!
//! `severity_id`: alerts map ECS `event.severity` (0-100) by range: 0-19 Informational
//! (1), 20-39 Low (2), 40-59 Medium (3), 60-79 High (4), 80-100 Critical (5), so
//! portwatch's low/medium/high/critical (21/47/73/99) land on OCSF's. Fatal (6) is never
//! used: OCSF reserves it for an error too late to act on, and every portwatch alert
//! comes with something to do. Events without a severity map `log.level`: error High,
//! warning Medium, notice Low, none Informational.
//!
//! Nothing is dropped silently. Portwatch fields OCSF has no attribute for keep their
//! ECS path under `unmapped` (`unmapped.portwatch.socket.inode`,
//! `unmapped.portwatch.exposure`, `unmapped.process.args`, ...). Conversions: times
//! become epoch milliseconds (`@timestamp` is also kept whole in
//! `metadata.original_time`, and `event.duration`'s nanoseconds in
//! `unmapped.event.duration`); the task's group becomes the one entry of
//! `actor.user.groups`. ECS classification (`event.kind`, `.category`, `.type`,
//! `.module`, `ecs.version`, `agent.type`) is replaced by the OCSF class, activity and
//! `metadata.product`, not repeated.
//!
//! Portwatch has no per-event id that survives an agent restart, so `metadata.uid` is
//! left out; `metadata.sequence` is the gap-free `event.sequence`. A finding's
//! `finding_info.uid` is built from host, rule, transport, address and port, so a
//! `risky-listener-repeated` updates the finding its `risky-listener` created.
//!
//! Like the ECS output, documents are typed borrowed structs (no `serde_json::Value`
//! per event) and serde_json escapes every control character, so one event is one line.

use serde::Serialize;

use crate::{
    classify::{Lang, Severity, Step},
    output::event::Risk,
    output::event::{Action, ArgvCut, Cgroup, Event, Kind, Level, Lost, Socket, Systemd},
    socket::Protocol,
};

/// OCSF schema version the documents follow (`metadata.version`).
pub const OCSF_VERSION: &str = "1.5.0";

/// `metadata.product.vendor_name`: portwatch is its own vendor (there is no company).
const VENDOR: &str = "portwatch";

/// Append one OCSF JSON object for `ev` to `out`, without a trailing newline.
/// `ev.event.sequence` is written as it is: the caller numbers events.
pub fn render(ev: &Event, out: &mut Vec<u8>) -> serde_json::Result<()> {
    serde_json::to_writer(out, &document(ev))
}

/// The OCSF class and activity of a portwatch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Listen,
    Close,
    FindingCreate,
    FindingUpdate,
    AppStart,
    AppStop,
    AppReload,
    AppError,
    Base,
}

/// Fixed OCSF identifiers and captions of a class/activity pair.
struct Ids {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    type_name: &'static str,
}

impl Class {
    fn of(ev: &Event) -> Class {
        match ev.event.action {
            Action::ListenStarted | Action::UdpBound | Action::ListenerPresent => Class::Listen,
            Action::ListenStopped | Action::UdpReleased => Class::Close,
            Action::RiskyListener => Class::FindingCreate,
            Action::RiskyListenerRepeated => Class::FindingUpdate,
            Action::SensorStarted => Class::AppStart,
            Action::SensorStopped => Class::AppStop,
            Action::RulesReloaded => Class::AppReload,
            Action::ConfigError | Action::EventsLost => Class::AppError,
            // No OCSF class says these better than the base event (with the listener's
            // endpoint when it has one).
            Action::ExposureChanged
            | Action::ExposureWithoutListener
            | Action::ListenersFolded
            | Action::SensorHealth
            | Action::SnapshotComplete
            | Action::ResyncComplete => match ev.event.kind {
                Kind::Alert => Class::FindingCreate,
                _ if ev.server.is_some() => Class::Listen,
                _ => Class::Base,
            },
        }
    }

    fn ids(self) -> Ids {
        const NET: (u32, &str, u32, &str) = (4001, "Network Activity", 4, "Network Activity");
        const FIND: (u32, &str, u32, &str) = (2004, "Detection Finding", 2, "Findings");
        const LIFE: (u32, &str, u32, &str) =
            (6002, "Application Lifecycle", 6, "Application Activity");
        const ERR: (u32, &str, u32, &str) = (6008, "Application Error", 6, "Application Activity");
        const BASE: (u32, &str, u32, &str) = (0, "Base Event", 0, "Uncategorized");
        let ((class_uid, class_name, category_uid, category_name), activity_id, type_name) =
            match self {
                Class::Listen => (NET, 7, "Network Activity: Listen"),
                Class::Close => (NET, 2, "Network Activity: Close"),
                Class::FindingCreate => (FIND, 1, "Detection Finding: Create"),
                Class::FindingUpdate => (FIND, 2, "Detection Finding: Update"),
                Class::AppStart => (LIFE, 3, "Application Lifecycle: Start"),
                Class::AppStop => (LIFE, 4, "Application Lifecycle: Stop"),
                Class::AppReload => (LIFE, 99, "Application Lifecycle: Other"),
                Class::AppError => (ERR, 1, "Application Error: General Error"),
                Class::Base => (BASE, 99, "Base Event: Other"),
            };
        Ids {
            class_uid,
            class_name,
            category_uid,
            category_name,
            activity_id,
            type_name,
        }
    }

    fn is_finding(self) -> bool {
        matches!(self, Class::FindingCreate | Class::FindingUpdate)
    }
}

#[derive(Serialize)]
struct Doc<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'a str,
    type_uid: u32,
    type_name: &'static str,
    time: i64,
    severity_id: u8,
    severity: &'static str,
    status_id: u8,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    /// Milliseconds the listener lived (Close).
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    metadata: Metadata<'a>,
    device: Device<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Actor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_info: Option<ConnectionInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_endpoint: Option<Endpoint>,
    /// Application Lifecycle: the application the event is about (portwatch itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<Product<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finding_info: Option<FindingInfo<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_alert: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    evidences: Option<[Evidence<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remediation: Option<Remediation<'a>>,
    #[serde(skip_serializing_if = "Unmapped::is_empty")]
    unmapped: Unmapped<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    version: &'static str,
    product: Product<'a>,
    profiles: &'static [&'static str],
    sequence: u64,
    /// The portwatch action, e.g. `listen-started`.
    event_code: &'static str,
    log_name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<&'static str>,
    /// `@timestamp` as written by the agent (nanoseconds, RFC 3339).
    original_time: String,
    /// `event.created`: when the agent wrote the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    logged_time: Option<i64>,
}

#[derive(Serialize, Clone, Copy)]
struct Product<'a> {
    name: &'a str,
    vendor_name: &'static str,
    version: &'a str,
}

#[derive(Serialize)]
struct Device<'a> {
    hostname: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_uid: Option<&'a str>,
    /// Required by OCSF; portwatch does not know whether it runs on a server or a laptop.
    type_id: u8,
    #[serde(rename = "type")]
    type_: &'static str,
}

#[derive(Serialize, Clone, Copy)]
struct Actor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<Process<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<User<'a>>,
}

#[derive(Serialize, Clone, Copy)]
struct Process<'a> {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmd_line: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<File<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_process: Option<ParentProcess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_time: Option<i64>,
    /// ECS `process.entity_id`: the same on a listener's start and end.
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    /// The thread that called listen()/bind().
    #[serde(skip_serializing_if = "Option::is_none")]
    tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<Container<'a>>,
}

#[derive(Serialize, Clone, Copy)]
struct File<'a> {
    name: &'a str,
    path: &'a str,
    /// Regular File (1): the executable.
    type_id: u8,
}

#[derive(Serialize, Clone, Copy)]
struct ParentProcess {
    pid: u32,
}

#[derive(Serialize, Clone, Copy)]
struct Container<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<&'static str>,
}

#[derive(Serialize, Clone, Copy)]
struct User<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<[Group<'a>; 1]>,
}

#[derive(Serialize, Clone, Copy)]
struct Group<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize, Clone, Copy)]
struct ConnectionInfo {
    protocol_name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_num: Option<u8>,
    protocol_ver_id: u8,
    direction_id: u8,
    direction: &'static str,
}

#[derive(Serialize, Clone, Copy)]
struct Endpoint {
    ip: std::net::IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct FindingInfo<'a> {
    uid: String,
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    desc: Option<&'a str>,
    types: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    src_url: Option<&'a str>,
    analytic: Analytic<'a>,
}

#[derive(Serialize)]
struct Analytic<'a> {
    uid: &'a str,
    name: &'a str,
    /// Rule (1).
    type_id: u8,
    #[serde(rename = "type")]
    type_: &'static str,
    /// ECS `rule.ruleset`: `portwatch-catalogue` or `portwatch-site-policy`.
    category: &'static str,
}

#[derive(Serialize)]
struct Evidence<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Actor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_info: Option<ConnectionInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_endpoint: Option<Endpoint>,
}

#[derive(Serialize)]
struct Remediation<'a> {
    /// The advice, then each step with its commands: OCSF 1.x has no structured steps
    /// (its `kb_article_list` is for vendor advisories), and an analyst reading the
    /// finding in a SIEM should see what to paste. The structured steps are in
    /// `unmapped.portwatch.alert.steps`.
    desc: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    references: Option<[&'a str; 1]>,
}

/// Portwatch fields with no OCSF attribute, at their ECS paths.
#[derive(Serialize)]
struct Unmapped<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<UnmappedEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<UnmappedProcess<'a>>,
    #[serde(skip_serializing_if = "Rest::is_empty")]
    portwatch: Rest<'a>,
}

impl Unmapped<'_> {
    fn is_empty(&self) -> bool {
        self.event.is_none() && self.process.is_none() && self.portwatch.is_empty()
    }
}

#[derive(Serialize)]
struct UnmappedEvent {
    /// Nanoseconds (OCSF `duration` has milliseconds).
    duration: u64,
}

#[derive(Serialize)]
struct UnmappedProcess<'a> {
    args: &'a [String],
}

/// `portwatch.*` minus what has an OCSF home (`folded` is `count`; an alert's message,
/// summary and reference are `message`, `remediation.desc` and `remediation.references`).
#[derive(Serialize)]
struct Rest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<&'a Socket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    systemd: Option<&'a Systemd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a Cgroup>,
    /// The command line was cut (OCSF `cmd_line` has no truncation attribute).
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<&'a ArgvCut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attribution: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attribution_changed: Option<&'a crate::output::event::AttributionChanged>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exposure: Option<&'a crate::output::event::ExposureOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exposure_change: Option<&'a crate::output::event::ExposureChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    risk: Option<&'a Risk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<AlertRest<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lost: Option<&'a Lost>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<&'a serde_json::Value>,
}

impl Rest<'_> {
    fn is_empty(&self) -> bool {
        self.socket.is_none()
            && self.systemd.is_none()
            && self.cgroup.is_none()
            && self.process.is_none()
            && self.attribution.is_none()
            && self.attribution_changed.is_none()
            && self.exposure.is_none()
            && self.exposure_change.is_none()
            && self.ended_by.is_none()
            && self.risk.is_none()
            && self.alert.is_none()
            && self.lost.is_none()
            && !self.resync
            && self.stats.is_none()
    }
}

#[derive(Serialize)]
struct AlertRest<'a> {
    repeats: u64,
    lang: Lang,
    steps: &'a [Step],
}

fn document(ev: &Event) -> Doc<'_> {
    let class = Class::of(ev);
    let ids = class.ids();
    let pw = &ev.portwatch;
    let time = epoch_ms(ev.time_ns);
    let (severity_id, severity) = severity(ev.event.severity, ev.log.as_ref().map(|l| l.level));
    let (status_id, status) = match class {
        Class::FindingCreate | Class::FindingUpdate => (1, "New"),
        Class::AppError => (2, "Failure"),
        _ => (1, "Success"),
    };
    let activity_name = match class {
        Class::Listen => "Listen",
        Class::Close => "Close",
        Class::FindingCreate => "Create",
        Class::FindingUpdate => "Update",
        Class::AppStart => "Start",
        Class::AppStop => "Stop",
        Class::AppReload => "Reload",
        Class::AppError => "General Error",
        // Other (99): the caption is the source's own name for it.
        Class::Base => ev.event.action.as_str(),
    };
    let product = Product {
        name: ev.agent.name,
        vendor_name: VENDOR,
        version: ev.agent.version,
    };
    let actor = actor(ev);
    let connection_info = ev.network.as_ref().map(|n| ConnectionInfo {
        protocol_name: n.transport.as_str(),
        protocol_num: Some(match n.transport {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::UdpLite => 136,
        }),
        protocol_ver_id: if n.type_ == "ipv6" { 6 } else { 4 },
        direction_id: 1,
        direction: "Inbound",
    });
    let dst_endpoint = ev.server.as_ref().map(|s| Endpoint {
        ip: s.ip,
        port: s.port,
    });
    let alert = pw.alert.as_ref();
    let finding = class.is_finding();
    let count = match class {
        Class::FindingUpdate => pw.folded,
        // This alert stands for itself and the repeats folded into it.
        Class::FindingCreate => alert.map(|a| a.repeats + 1),
        _ => None,
    };
    let finding_info = ev.rule.as_ref().filter(|_| finding).map(|r| FindingInfo {
        uid: finding_uid(ev, &r.id),
        title: ev.message.as_deref().unwrap_or(&r.name),
        desc: Some(&r.description),
        types: ["risky-listener"],
        src_url: r.reference.as_deref(),
        analytic: Analytic {
            uid: &r.id,
            name: &r.name,
            type_id: 1,
            type_: "Rule",
            category: r.ruleset,
        },
    });
    let remediation = alert.filter(|_| finding).map(|a| Remediation {
        desc: remediation_text(&a.remediation.summary, &a.remediation.steps),
        references: a.remediation.reference.as_deref().map(|r| [r]),
    });
    let profiles: &'static [&'static str] = if ev.container.is_some() {
        &["host", "container"]
    } else {
        &["host"]
    };
    let args = ev.process.as_ref().and_then(|p| p.args.as_deref());
    Doc {
        class_uid: ids.class_uid,
        class_name: ids.class_name,
        category_uid: ids.category_uid,
        category_name: ids.category_name,
        activity_id: ids.activity_id,
        activity_name,
        type_uid: ids.class_uid * 100 + ids.activity_id,
        type_name: ids.type_name,
        time,
        severity_id,
        severity,
        status_id,
        status,
        message: ev.message.as_deref(),
        count,
        duration: ev.event.duration.map(|ns| ns / 1_000_000),
        metadata: Metadata {
            version: OCSF_VERSION,
            product,
            profiles,
            sequence: ev.event.sequence,
            event_code: ev.event.action.as_str(),
            log_name: ev.event.dataset,
            log_level: ev.log.as_ref().map(|l| l.level.as_str()),
            original_time: crate::time::rfc3339(ev.time_ns),
            logged_time: Some(epoch_ms(ev.event.created_ns)),
        },
        device: Device {
            hostname: &ev.host.name,
            uid: ev.host.id.as_deref(),
            boot_uid: ev.host.boot.as_ref().map(|b| b.id.as_str()),
            type_id: 0,
            type_: "Unknown",
        },
        // On a finding the listener is evidence, not the actor of the finding.
        actor: actor.filter(|_| !finding),
        connection_info: connection_info.filter(|_| !finding),
        dst_endpoint: dst_endpoint.filter(|_| !finding),
        app: matches!(class, Class::AppStart | Class::AppStop | Class::AppReload)
            .then_some(product),
        finding_info,
        is_alert: finding.then_some(true),
        evidences: finding.then_some([Evidence {
            actor,
            connection_info,
            dst_endpoint,
        }]),
        remediation,
        unmapped: Unmapped {
            event: ev.event.duration.map(|duration| UnmappedEvent { duration }),
            process: args.map(|args| UnmappedProcess { args }),
            portwatch: Rest {
                socket: pw.socket.as_ref(),
                systemd: pw.systemd.as_deref().map(|v| &**v),
                cgroup: pw.cgroup.as_deref().map(|v| &**v),
                process: pw.process.as_deref().map(|v| &**v),
                attribution: pw.attribution,
                attribution_changed: pw.attribution_changed.as_deref().map(|v| &**v),
                exposure: pw.exposure.as_ref(),
                exposure_change: pw.exposure_change.as_ref(),
                ended_by: pw.ended_by,
                risk: pw.risk.as_ref(),
                alert: alert.map(|a| AlertRest {
                    repeats: a.repeats,
                    lang: a.remediation.lang,
                    steps: &a.remediation.steps,
                }),
                lost: pw.lost.as_ref(),
                resync: pw.resync,
                stats: pw.stats.as_ref(),
            },
        },
    }
}

/// The listener's owner: process (with container) and user (with the task's group).
fn actor(ev: &Event) -> Option<Actor<'_>> {
    let process = ev.process.as_deref().map(|p| Process {
        pid: p.pid,
        name: p.name.as_deref(),
        cmd_line: p.command_line.as_deref(),
        file: p.executable.as_deref().map(|path| File {
            name: path.rsplit('/').next().unwrap_or(path),
            path,
            type_id: 1,
        }),
        parent_process: p.parent.as_ref().map(|pp| ParentProcess { pid: pp.pid }),
        created_time: p.start_ns.map(epoch_ms),
        uid: p.entity_id.as_deref(),
        tid: ev.portwatch.socket.as_ref().and_then(|s| s.thread_id),
        container: ev.container.as_deref().map(|c| Container {
            uid: &c.id,
            runtime: c.runtime,
        }),
    });
    let user = ev.user.as_ref().map(|u| User {
        uid: &u.id,
        name: u.name.as_deref(),
        groups: ev.group.as_ref().map(|g| {
            [Group {
                uid: &g.id,
                name: g.name.as_deref(),
            }]
        }),
    });
    (process.is_some() || user.is_some()).then_some(Actor { process, user })
}

/// Stable id of the finding about one exposed socket: the same for a
/// `risky-listener` and the `risky-listener-repeated` that follows it.
fn finding_uid(ev: &Event, rule: &str) -> String {
    let host = ev.host.id.as_deref().unwrap_or(&ev.host.name);
    let transport = ev.network.as_ref().map_or("", |n| n.transport.as_str());
    match &ev.server {
        Some(s) => format!("portwatch:{host}:{rule}:{transport}:[{}]:{}", s.ip, s.port),
        None => format!("portwatch:{host}:{rule}"),
    }
}

fn remediation_text(summary: &str, steps: &[Step]) -> String {
    use std::fmt::Write as _;
    let mut s = summary.to_owned();
    for (i, step) in steps.iter().enumerate() {
        let _ = write!(s, "\n{}. {}", i + 1, step.title);
        for c in &step.commands {
            let _ = write!(s, "\n   {c}");
        }
    }
    s
}

/// OCSF `severity_id` and its caption, from an alert's severity or the event's log level.
fn severity(alert: Option<Severity>, level: Option<Level>) -> (u8, &'static str) {
    let id = match (alert, level) {
        (Some(Severity::Low), _) => 2,
        (Some(Severity::Medium), _) => 3,
        (Some(Severity::High), _) => 4,
        (Some(Severity::Critical), _) => 5,
        (None, Some(Level::Critical)) => 5,
        (None, Some(Level::Error)) => 4,
        (None, Some(Level::Warning)) => 3,
        (None, Some(Level::Notice)) => 2,
        (None, None) => 1,
    };
    let caption = match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Critical",
    };
    (id, caption)
}

/// Milliseconds since the epoch (OCSF's timestamps) of nanoseconds since the epoch.
fn epoch_ms(ns: i128) -> i64 {
    i64::try_from(ns.div_euclid(1_000_000)).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use serde_json::{Value, json};

    use super::*;
    use crate::{
        classify::Policy,
        output::event::{
            Agent, Boot, Container as EcsContainer, Host, Log, Named, Network, Parent,
            Process as EcsProcess, Rule, Server, Shared, shared,
        },
        pipeline::assess::Assessor,
    };

    const TS: &str = "2026-11-27T01:09:40.451005964Z";
    const TS_NS: i128 = 1_795_741_780_451_005_964;
    const CREATED_NS: i128 = 1_795_741_780_451_276_043;
    const TS_MS: i64 = 1_795_741_780_451;

    /// ECS fields that have an OCSF attribute, or that OCSF's class/activity/product
    /// replace. Every other field of an event must be under `unmapped` at its ECS path.
    const MAPPED: &[&str] = &[
        "@timestamp",                // time, metadata.original_time
        "message",                   // message (finding_info.title on findings)
        "event.kind",                // class_uid
        "event.category",            // class_uid
        "event.type",                // activity_id
        "event.module",              // metadata.product.name
        "event.action",              // metadata.event_code
        "event.dataset",             // metadata.log_name
        "event.sequence",            // metadata.sequence
        "event.severity",            // severity_id
        "event.created",             // metadata.logged_time
        "log.level",                 // metadata.log_level, severity_id
        "network.transport",         // connection_info.protocol_name, protocol_num
        "network.type",              // connection_info.protocol_ver_id
        "server.ip",                 // dst_endpoint.ip
        "server.port",               // dst_endpoint.port
        "process.pid",               // actor.process.pid
        "process.name",              // actor.process.name
        "process.parent.pid",        // actor.process.parent_process.pid
        "process.executable",        // actor.process.file.path (and .name)
        "process.command_line",      // actor.process.cmd_line
        "process.start",             // actor.process.created_time
        "process.entity_id",         // actor.process.uid
        "user.id",                   // actor.user.uid
        "user.name",                 // actor.user.name
        "group.id",                  // actor.user.groups[0].uid
        "group.name",                // actor.user.groups[0].name
        "container.id",              // actor.process.container.uid
        "container.runtime",         // actor.process.container.runtime
        "rule.id",                   // finding_info.analytic.uid
        "rule.name",                 // finding_info.analytic.name
        "rule.description",          // finding_info.desc
        "rule.reference",            // finding_info.src_url
        "rule.ruleset",              // finding_info.analytic.category
        "host.name",                 // device.hostname
        "host.id",                   // device.uid
        "host.boot.id",              // device.boot_uid
        "agent.type",                // metadata.product
        "agent.name",                // metadata.product.name
        "agent.version",             // metadata.product.version
        "ecs.version",               // metadata.version
        "portwatch.folded",          // count
        "portwatch.alert.message",   // message
        "portwatch.alert.summary",   // remediation.desc
        "portwatch.alert.reference", // remediation.references
    ];

    fn host() -> Shared<Host> {
        shared(Host {
            name: "vm".into(),
            id: Some("3d1219c7c4c5404aaa1f6d2a48adfda4".into()),
            boot: Some(Boot {
                id: "3800f63a-650d-4f11-8a9d-eea26c506d7f".into(),
            }),
        })
    }

    /// As `Pipeline::base` builds it.
    fn base(action: Action) -> Event {
        let mut ev = Event::new(
            action,
            TS_NS,
            CREATED_NS,
            host(),
            shared(Agent {
                type_: "portwatch",
                name: "portwatch",
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        ev.event.sequence = 42;
        ev
    }

    fn python() -> Shared<EcsProcess> {
        shared(EcsProcess {
            pid: 10849,
            name: Some("python3".into()),
            parent: Some(Parent { pid: 10843 }),
            executable: Some("/root/.pyenv/versions/3.11.7/bin/python3.11".into()),
            command_line: Some("python3 -c import socket ...".into()),
            args: Some(vec![
                "python3".into(),
                "-c".into(),
                "import socket ...".into(),
            ]),
            start_ns: Some(1_795_741_780_358_453_171),
            entity_id: Some("7b72bf9fd06433c9".into()),
            executable_owner: Some(0),
        })
    }

    /// As `Pipeline::listener_event` builds it, for a live record.
    fn listener(action: Action, transport: Protocol, ip: &str, port: u16) -> Event {
        let addr: IpAddr = ip.parse().unwrap();
        let mut ev = base(action);
        ev.network = Some(Network {
            transport,
            type_: if addr.is_ipv4() { "ipv4" } else { "ipv6" },
        });
        ev.server = Some(Server { ip: addr, port });
        ev.process = Some(python());
        ev.user = Some(shared(Named {
            id: "0".into(),
            name: Some("root".into()),
        }));
        ev.group = Some(shared(Named {
            id: "0".into(),
            name: Some("root".into()),
        }));
        ev.portwatch.cgroup = Some(shared(Cgroup {
            id: Some(1),
            path: Some("/".into()),
        }));
        ev.portwatch.attribution = Some("proc");
        ev.portwatch.socket = Some(Socket {
            inode: Some(297_522_928),
            netns: Some(4_026_531_833),
            host_netns: Some(true),
            v6only: addr.is_ipv6().then_some(false),
            kernel: false,
            implicit_bind: false,
            thread_id: Some(10849),
            pids: Vec::new(),
        });
        ev
    }

    /// Render, check it is one line of one JSON object, and parse it back.
    fn render_value(ev: &Event) -> Value {
        let mut out = b"previous".to_vec();
        render(ev, &mut out).expect("render");
        let line = &out[b"previous".len()..];
        assert!(
            !line.contains(&b'\n') && !line.contains(&b'\r'),
            "not one line"
        );
        let mut docs = serde_json::Deserializer::from_slice(line).into_iter::<Value>();
        let v = docs.next().expect("a document").expect("valid JSON");
        assert!(docs.next().is_none(), "exactly one document");
        assert!(v.is_object());
        v
    }

    /// The attributes every OCSF event must have.
    fn assert_base(v: &Value, ev: &Event, class_uid: u64, category_uid: u64, activity_id: u64) {
        assert_eq!(v["class_uid"], class_uid, "{v}");
        assert_eq!(v["category_uid"], category_uid, "{v}");
        assert_eq!(v["activity_id"], activity_id, "{v}");
        assert_eq!(v["type_uid"], class_uid * 100 + activity_id);
        assert_eq!(v["time"], TS_MS);
        assert!(
            v["severity_id"]
                .as_u64()
                .is_some_and(|s| (0..=6).contains(&s))
        );
        assert!(v["status_id"].is_u64());
        let m = &v["metadata"];
        assert_eq!(m["version"], OCSF_VERSION);
        assert_eq!(m["product"]["name"], "portwatch");
        assert_eq!(m["product"]["vendor_name"], "portwatch");
        assert_eq!(m["product"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(m["sequence"], ev.event.sequence);
        assert_eq!(m["event_code"], ev.event.action.as_str());
        assert_eq!(m["original_time"], TS);
        assert_eq!(m["logged_time"], epoch_ms(CREATED_NS));
        assert_eq!(v["device"]["hostname"], "vm");
        assert_eq!(v["device"]["uid"], "3d1219c7c4c5404aaa1f6d2a48adfda4");
        assert_eq!(
            v["device"]["boot_uid"],
            "3800f63a-650d-4f11-8a9d-eea26c506d7f"
        );
        assert_eq!(v["device"]["type_id"], 0);
    }

    /// Every ECS leaf is mapped (see [`MAPPED`]) or kept whole under `unmapped`.
    fn assert_nothing_dropped(ev: &Event, v: &Value) {
        fn leaves(path: String, v: &Value, out: &mut Vec<(String, Value)>) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        leaves(p, x, out);
                    }
                }
                _ => out.push((path, v.clone())),
            }
        }
        let mut all = Vec::new();
        leaves(String::new(), &serde_json::to_value(ev).unwrap(), &mut all);
        for (path, value) in all {
            let mapped = MAPPED
                .iter()
                .any(|m| path == *m || path.starts_with(&format!("{m}.")));
            if mapped {
                continue;
            }
            let pointer = format!("/unmapped/{}", path.replace('.', "/"));
            assert_eq!(
                v.pointer(&pointer),
                Some(&value),
                "{path} is neither mapped nor under unmapped: {v}"
            );
        }
    }

    fn assert_python_actor(actor: &Value) {
        let p = &actor["process"];
        assert_eq!(p["pid"], 10849);
        assert_eq!(p["name"], "python3");
        assert_eq!(p["cmd_line"], "python3 -c import socket ...");
        assert_eq!(
            p["file"]["path"],
            "/root/.pyenv/versions/3.11.7/bin/python3.11"
        );
        assert_eq!(p["file"]["name"], "python3.11");
        assert_eq!(p["file"]["type_id"], 1);
        assert_eq!(p["parent_process"]["pid"], 10843);
        assert_eq!(p["created_time"], 1_795_741_780_358_i64);
        assert_eq!(p["uid"], "7b72bf9fd06433c9");
        assert_eq!(actor["user"]["uid"], "0");
        assert_eq!(actor["user"]["name"], "root");
    }

    #[test]
    fn listen_started_is_network_activity_listen() {
        let mut ev = listener(Action::ListenStarted, Protocol::Tcp, "127.0.0.1", 8080);
        ev.container = Some(shared(EcsContainer {
            id: "4f66ad9a0b2e".into(),
            runtime: Some("docker"),
        }));
        ev.portwatch.systemd = Some(shared(Systemd {
            unit: Some("web.service".into()),
            slice: Some("system.slice".into()),
            user_manager: Some(1000),
        }));
        ev.portwatch.process = Some(shared(crate::output::event::ArgvCut {
            truncated: true,
            original_length: 65_009,
            original_args_count: 2,
        }));
        // Classified as the agent does: loopback-only, so exposure and risk, no alert.
        let alert = Assessor::new(None, Lang::En, None).assess(&mut ev);
        assert!(alert.is_none());
        assert!(ev.portwatch.risk.is_some() && ev.portwatch.exposure.is_some());

        let v = render_value(&ev);
        assert_base(&v, &ev, 4001, 4, 7);
        assert_eq!(v["activity_name"], "Listen");
        assert_eq!(v["type_name"], "Network Activity: Listen");
        assert_eq!(v["severity_id"], 1);
        assert_eq!(v["dst_endpoint"], json!({"ip": "127.0.0.1", "port": 8080}));
        assert!(v.get("src_endpoint").is_none());
        let c = &v["connection_info"];
        assert_eq!(c["protocol_name"], "tcp");
        assert_eq!(c["protocol_num"], 6);
        assert_eq!(c["protocol_ver_id"], 4);
        assert_eq!(c["direction_id"], 1);
        assert_python_actor(&v["actor"]);
        assert_eq!(v["actor"]["process"]["tid"], 10849);
        assert_eq!(
            v["actor"]["user"]["groups"],
            json!([{"uid": "0", "name": "root"}])
        );
        assert_eq!(
            v["actor"]["process"]["container"],
            json!({"uid": "4f66ad9a0b2e", "runtime": "docker"})
        );
        assert_eq!(v["metadata"]["profiles"], json!(["host", "container"]));
        let u = &v["unmapped"];
        assert_eq!(u["portwatch"]["socket"]["inode"], 297_522_928);
        assert_eq!(u["portwatch"]["socket"]["netns"], 4_026_531_833_u64);
        assert_eq!(u["portwatch"]["systemd"]["unit"], "web.service");
        assert_eq!(
            u["portwatch"]["process"],
            json!({"truncated": true, "original_length": 65_009, "original_args_count": 2})
        );
        assert_eq!(u["portwatch"]["attribution"], "proc");
        assert_eq!(u["portwatch"]["exposure"]["scope"], "loopback");
        assert_eq!(u["portwatch"]["risk"]["outcome"], "loopback-only");
        assert_eq!(u["process"]["args"][0], "python3");
        assert!(v.get("finding_info").is_none() && v.get("evidences").is_none());
        assert_nothing_dropped(&ev, &v);
    }

    #[test]
    fn udp_released_is_close_with_duration() {
        let mut ev = listener(Action::UdpReleased, Protocol::Udp, "::", 5353);
        ev.event.duration = Some(1_500_000_123);
        ev.portwatch.resync = true;
        let v = render_value(&ev);
        assert_base(&v, &ev, 4001, 4, 2);
        assert_eq!(v["activity_name"], "Close");
        assert_eq!(v["dst_endpoint"], json!({"ip": "::", "port": 5353}));
        assert_eq!(v["connection_info"]["protocol_name"], "udp");
        assert_eq!(v["connection_info"]["protocol_num"], 17);
        assert_eq!(v["connection_info"]["protocol_ver_id"], 6);
        assert_eq!(v["duration"], 1500);
        assert_eq!(v["unmapped"]["event"]["duration"], 1_500_000_123);
        assert_eq!(v["unmapped"]["portwatch"]["resync"], true);
        assert_eq!(v["unmapped"]["portwatch"]["socket"]["v6only"], false);
        assert_eq!(v["metadata"]["profiles"], json!(["host"]));
        assert_python_actor(&v["actor"]);
        assert_nothing_dropped(&ev, &v);
    }

    #[test]
    fn kernel_socket_from_snapshot_is_listen_without_process() {
        // As `Pipeline::present` builds it for nfsd: no process, the socket's pids empty.
        let mut ev = listener(Action::ListenerPresent, Protocol::Tcp, "0.0.0.0", 2049);
        ev.process = None;
        ev.group = None;
        ev.portwatch.attribution = Some("kernel-socket");
        if let Some(s) = ev.portwatch.socket.as_mut() {
            s.kernel = true;
            s.thread_id = None;
            s.pids = vec![1, 2];
        }
        let v = render_value(&ev);
        assert_base(&v, &ev, 4001, 4, 7);
        assert!(v["actor"].get("process").is_none());
        assert_eq!(v["actor"]["user"]["uid"], "0");
        assert_eq!(v["unmapped"]["portwatch"]["socket"]["kernel"], true);
        assert_eq!(v["unmapped"]["portwatch"]["socket"]["pids"], json!([1, 2]));
        assert_eq!(v["unmapped"]["portwatch"]["attribution"], "kernel-socket");
        assert_nothing_dropped(&ev, &v);
    }

    /// The alert the real classifier raises for memcached on every interface.
    fn memcached_alert() -> (Event, Event) {
        let mut ev = listener(Action::UdpBound, Protocol::Udp, "0.0.0.0", 11211);
        // No namespace: the classifier assumes the worst instead of reading this host's
        // interfaces, so the test does not depend on the machine.
        if let Some(s) = ev.portwatch.socket.as_mut() {
            s.netns = None;
            s.host_netns = None;
        }
        let alert = Assessor::new(Some(Policy::default()), Lang::En, None)
            .assess(&mut ev)
            .expect("memcached on 0.0.0.0 alerts");
        (ev, alert)
    }

    #[test]
    fn risky_listener_is_detection_finding() {
        let (_, alert) = memcached_alert();
        let info = alert.portwatch.alert.as_ref().unwrap();
        let rule = alert.rule.as_ref().unwrap();
        let v = render_value(&alert);
        assert_base(&v, &alert, 2004, 2, 1);
        assert_eq!(v["type_name"], "Detection Finding: Create");
        assert_eq!(
            v["severity_id"],
            severity(alert.event.severity, None).0,
            "from event.severity {:?}",
            alert.event.severity
        );
        assert!(v["severity_id"].as_u64().unwrap() >= 2);
        assert_eq!(
            v["metadata"]["log_level"],
            alert.log.as_ref().unwrap().level.as_str()
        );
        assert_eq!(v["status_id"], 1);
        assert_eq!(v["is_alert"], true);
        assert_eq!(v["count"], info.repeats + 1);
        assert_eq!(v["message"], info.remediation.message.as_str());
        let f = &v["finding_info"];
        assert_eq!(
            f["uid"],
            "portwatch:3d1219c7c4c5404aaa1f6d2a48adfda4:memcached:udp:[0.0.0.0]:11211"
        );
        assert_eq!(f["title"], alert.message.as_deref().unwrap());
        assert_eq!(f["desc"], rule.description.as_str());
        assert_eq!(f["analytic"]["uid"], rule.id.as_str());
        assert_eq!(f["analytic"]["name"], rule.name.as_str());
        assert_eq!(f["analytic"]["type_id"], 1);
        assert_eq!(f["analytic"]["category"], "portwatch-catalogue");
        assert_eq!(f["src_url"].as_str(), rule.reference.as_deref());
        // The listener is the evidence, not the finding's actor.
        assert!(v.get("actor").is_none() && v.get("dst_endpoint").is_none());
        let e = &v["evidences"][0];
        assert_eq!(e["dst_endpoint"], json!({"ip": "0.0.0.0", "port": 11211}));
        assert_eq!(e["connection_info"]["protocol_name"], "udp");
        assert_python_actor(&e["actor"]);
        let desc = v["remediation"]["desc"].as_str().unwrap();
        assert!(desc.starts_with(&info.remediation.summary));
        assert!(!info.remediation.steps.is_empty());
        for cmd in info.remediation.commands() {
            assert!(desc.contains(cmd), "{cmd} missing from {desc}");
        }
        assert_eq!(
            v["remediation"]["references"][0].as_str(),
            info.remediation.reference.as_deref()
        );
        assert_eq!(
            v["unmapped"]["portwatch"]["alert"]["steps"],
            serde_json::to_value(&info.remediation.steps).unwrap()
        );
        assert_eq!(v["unmapped"]["portwatch"]["risk"]["outcome"], "exposed");
        assert_nothing_dropped(&alert, &v);
    }

    #[test]
    fn risky_listener_repeated_updates_the_same_finding() {
        let (_, alert) = memcached_alert();
        // As `Pipeline::tick` builds it from a quiet fold key.
        let mut ev = base(Action::RiskyListenerRepeated);
        ev.message = Some("3 more alerts for rule memcached (11211/udp on 0.0.0.0 by python3) were folded into the last one".into());
        ev.network = Some(Network {
            transport: Protocol::Udp,
            type_: "ipv4",
        });
        ev.server = Some(Server {
            ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port: 11211,
        });
        ev.portwatch.folded = Some(3);
        ev.rule = Some(Rule {
            id: "memcached".into(),
            name: "memcached".into(),
            description: "repeated alerts folded into one".into(),
            reference: None,
            ruleset: "portwatch-catalogue",
        });
        let v = render_value(&ev);
        assert_base(&v, &ev, 2004, 2, 2);
        assert_eq!(v["activity_name"], "Update");
        assert_eq!(v["count"], 3);
        let created = render_value(&alert);
        assert_eq!(v["finding_info"]["uid"], created["finding_info"]["uid"]);
        assert_eq!(v["evidences"][0]["dst_endpoint"]["port"], 11211);
        assert!(v["evidences"][0].get("actor").is_none());
        assert!(v.get("remediation").is_none());
        assert_nothing_dropped(&ev, &v);
    }

    #[test]
    fn agent_events_pick_their_class() {
        let state = |action, stats: Value| {
            let mut ev = base(action);
            ev.portwatch.stats = Some(stats);
            ev
        };
        let started = state(
            Action::SensorStarted,
            json!({"hooks": ["cgroup/sock_ops"], "self_check": "passed", "degraded": [],
                   "ring_buffer_bytes": 1_048_576, "pid": 7}),
        );
        let v = render_value(&started);
        assert_base(&v, &started, 6002, 6, 3);
        assert_eq!(v["app"]["name"], "portwatch");
        assert_eq!(v["unmapped"]["portwatch"]["stats"]["self_check"], "passed");
        assert_nothing_dropped(&started, &v);

        let mut reloaded = base(Action::RulesReloaded);
        reloaded.message = Some("rules reloaded from /etc/portwatch/rules.toml".into());
        let v = render_value(&reloaded);
        assert_base(&v, &reloaded, 6002, 6, 99);
        assert_eq!(v["activity_name"], "Reload");
        assert_eq!(
            v["message"],
            "rules reloaded from /etc/portwatch/rules.toml"
        );
        assert!(v.get("unmapped").is_none(), "nothing to keep: {v}");
        assert_nothing_dropped(&reloaded, &v);

        let mut bad = base(Action::ConfigError);
        bad.log = Some(Log {
            level: Level::Error,
        });
        bad.message = Some("rules.toml:2:8: bad port 70000".into());
        let v = render_value(&bad);
        assert_base(&v, &bad, 6008, 6, 1);
        assert_eq!(
            (v["severity_id"].as_u64(), v["status_id"].as_u64()),
            (Some(4), Some(2))
        );
        assert_nothing_dropped(&bad, &v);

        let mut lost = base(Action::EventsLost);
        lost.log = Some(Log {
            level: Level::Warning,
        });
        lost.message = Some("12 events lost (ring-buffer-full); 12 since start".into());
        lost.portwatch.lost = Some(Lost {
            count: 12,
            total: 12,
            reason: "ring-buffer-full",
            sink: None,
            lane: Some("bulk"),
        });
        let v = render_value(&lost);
        assert_base(&v, &lost, 6008, 6, 1);
        assert_eq!(v["severity_id"], 3);
        assert_eq!(
            v["unmapped"]["portwatch"]["lost"],
            json!({"count": 12, "total": 12, "reason": "ring-buffer-full", "lane": "bulk"})
        );
        assert_nothing_dropped(&lost, &v);

        for action in [
            Action::SensorHealth,
            Action::SnapshotComplete,
            Action::ResyncComplete,
        ] {
            let ev = state(action, json!({"listeners": 3, "duration_ms": 1.5}));
            let v = render_value(&ev);
            assert_base(&v, &ev, 0, 0, 99);
            assert_eq!(v["type_uid"], 99);
            assert_eq!(v["activity_name"], action.as_str());
            assert_eq!(v["severity_id"], 1);
            assert_eq!(v["unmapped"]["portwatch"]["stats"]["listeners"], 3);
            assert_nothing_dropped(&ev, &v);
        }
    }

    #[test]
    fn hostile_strings_stay_on_one_line() {
        let name = "evil\nname\r\"}\\\u{1b}[31m\u{0}\u{2028}\u{7f}x";
        let cmd = "sh -c 'printf \"\\n{\\\"class_uid\\\":0}\\n\"'\n\u{85}";
        let exe = "/tmp/a\nb/\u{1b}]0;pwned\u{7}";
        let mut ev = listener(Action::ListenStarted, Protocol::Tcp, "0.0.0.0", 4444);
        ev.process = Some(shared(EcsProcess {
            name: Some(name.into()),
            command_line: Some(cmd.into()),
            executable: Some(exe.into()),
            args: Some(vec![name.into(), "\n".into()]),
            ..(*python()).clone()
        }));
        ev.user = Some(shared(Named {
            id: "1000".into(),
            name: Some("\n\"user\"".into()),
        }));
        let v = render_value(&ev);
        let p = &v["actor"]["process"];
        assert_eq!(p["name"], name);
        assert_eq!(p["cmd_line"], cmd);
        assert_eq!(p["file"]["path"], exe);
        assert_eq!(p["file"]["name"], "\u{1b}]0;pwned\u{7}");
        assert_eq!(v["actor"]["user"]["name"], "\n\"user\"");
        assert_eq!(v["unmapped"]["process"]["args"][1], "\n");
        assert_nothing_dropped(&ev, &v);
    }

    #[test]
    fn severity_ranges() {
        // portwatch's own ECS values (assess::ecs_severity) land on the OCSF names.
        use crate::{classify::Severity, output::event::ecs_severity};
        for (s, want) in [
            (Severity::Low, (2, "Low")),
            (Severity::Medium, (3, "Medium")),
            (Severity::High, (4, "High")),
            (Severity::Critical, (5, "Critical")),
        ] {
            let (_, level) = ecs_severity(s);
            assert_eq!(severity(Some(s), Some(level)), want, "{s}");
            assert_eq!(severity(Some(s), None), want, "{s}");
        }
        assert_eq!(severity(None, None).0, 1);
        assert_eq!(severity(None, Some(Level::Notice)).0, 2);
        assert_eq!(severity(None, Some(Level::Warning)).0, 3);
        assert_eq!(severity(None, Some(Level::Error)).0, 4);
        assert_eq!(severity(None, Some(Level::Critical)).0, 5);
    }

    #[test]
    fn epoch_ms_is_the_millisecond_of_the_nanoseconds() {
        assert_eq!(epoch_ms(TS_NS), TS_MS);
        assert_eq!(epoch_ms(0), 0);
        assert_eq!(epoch_ms(999_999), 0);
        assert_eq!(epoch_ms(1_000_000), 1);
        assert_eq!(epoch_ms(-1), -1, "before the epoch rounds down");
        assert_eq!(epoch_ms(i128::MAX), i64::MAX);
        assert_eq!(epoch_ms(i128::MIN), i64::MIN);
        assert_eq!(crate::time::rfc3339(TS_NS), TS);
    }

    /// The README's example line: `cargo test --release -p portwatch --lib
    /// ocsf::tests::readme_example -- --nocapture` prints it.
    #[test]
    fn readme_example() {
        let mut ev = listener(Action::ListenStarted, Protocol::Tcp, "127.0.0.1", 8080);
        ev.event.sequence = 2;
        if let Some(s) = ev.portwatch.socket.as_mut() {
            s.netns = Some(4_026_531_833);
        }
        Assessor::new(None, Lang::En, Some(4_026_531_833)).assess(&mut ev);
        let mut out = Vec::new();
        render(&ev, &mut out).unwrap();
        println!("{}", String::from_utf8(out).unwrap());
    }
}
