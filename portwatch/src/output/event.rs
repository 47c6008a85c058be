//! The output event: ECS field names as nested objects, serialised with serde.
//!
//! Documents are built from typed structs (no `serde_json::Value` per event): at full
//! listener churn this runs a couple of hundred thousand times a second.

use std::{
    net::IpAddr,
    ops::Deref,
    sync::{Arc, OnceLock},
};

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::classify::{Outcome, Remediation, Severity};

/// A part of many events (host, agent, process, container, user...): shared between
/// them, and rendered to JSON once, the first time one of them is written, instead of
/// once per event. At full listener churn, escaping the same keys and strings for every
/// event was the writer's largest cost (perf: `format_escaped_str`).
pub type Shared<T> = Arc<Rendered<T>>;

pub fn shared<T>(value: T) -> Shared<T> {
    Arc::new(Rendered {
        value,
        json: OnceLock::new(),
    })
}

/// A value and its JSON, made on first use. Read-only: a change means a new value.
pub struct Rendered<T> {
    value: T,
    json: OnceLock<Option<Box<RawValue>>>,
}

impl<T> Deref for Rendered<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Rendered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: Serialize> Serialize for Rendered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Any serde_json serializer (writer or `to_value`) takes the raw JSON as is.
        match self
            .json
            .get_or_init(|| serde_json::value::to_raw_value(&self.value).ok())
        {
            Some(raw) => raw.serialize(s),
            None => self.value.serialize(s),
        }
    }
}

/// What happened: `event.action`. Each action has one ECS `event.kind`, category and
/// type, so they are derived from it, never set apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    ListenStarted,
    ListenStopped,
    UdpBound,
    UdpReleased,
    ListenerPresent,
    ExposureChanged,
    ExposureWithoutListener,
    ListenersFolded,
    RiskyListener,
    RiskyListenerRepeated,
    EventsLost,
    SensorHealth,
    SensorStarted,
    SensorStopped,
    SnapshotComplete,
    ResyncComplete,
    RulesReloaded,
    ConfigError,
}

impl Action {
    pub const ALL: [Action; 18] = [
        Action::ListenStarted,
        Action::ListenStopped,
        Action::UdpBound,
        Action::UdpReleased,
        Action::ListenerPresent,
        Action::ExposureChanged,
        Action::ExposureWithoutListener,
        Action::ListenersFolded,
        Action::RiskyListener,
        Action::RiskyListenerRepeated,
        Action::EventsLost,
        Action::SensorHealth,
        Action::SensorStarted,
        Action::SensorStopped,
        Action::SnapshotComplete,
        Action::ResyncComplete,
        Action::RulesReloaded,
        Action::ConfigError,
    ];

    /// `event.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ListenStarted => "listen-started",
            Action::ListenStopped => "listen-stopped",
            Action::UdpBound => "udp-bound",
            Action::UdpReleased => "udp-released",
            Action::ListenerPresent => "listener-present",
            Action::ExposureChanged => "exposure-changed",
            Action::ExposureWithoutListener => "exposure-without-listener",
            Action::ListenersFolded => "listeners-folded",
            Action::RiskyListener => "risky-listener",
            Action::RiskyListenerRepeated => "risky-listener-repeated",
            Action::EventsLost => "events-lost",
            Action::SensorHealth => "sensor-health",
            Action::SensorStarted => "sensor-started",
            Action::SensorStopped => "sensor-stopped",
            Action::SnapshotComplete => "snapshot-complete",
            Action::ResyncComplete => "resync-complete",
            Action::RulesReloaded => "rules-reloaded",
            Action::ConfigError => "config-error",
        }
    }

    /// ECS `event.kind`.
    pub fn kind(self) -> Kind {
        match self {
            Action::ListenStarted
            | Action::ListenStopped
            | Action::UdpBound
            | Action::UdpReleased
            | Action::ListenerPresent
            | Action::ExposureChanged
            | Action::ExposureWithoutListener
            | Action::ListenersFolded => Kind::Event,
            Action::RiskyListener | Action::RiskyListenerRepeated => Kind::Alert,
            Action::EventsLost | Action::SensorHealth => Kind::Metric,
            Action::SensorStarted
            | Action::SensorStopped
            | Action::SnapshotComplete
            | Action::ResyncComplete
            | Action::RulesReloaded
            | Action::ConfigError => Kind::State,
        }
    }

    /// ECS `event.category` and `event.type`.
    pub fn category_type(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Action::ListenStarted | Action::UdpBound => (&["network"], &["start"]),
            Action::ListenStopped | Action::UdpReleased => (&["network"], &["end"]),
            Action::ListenerPresent => (&["network"], &["info"]),
            Action::ExposureChanged => (&["network"], &["change"]),
            _ => (&["host"], &["info"]),
        }
    }

    /// The start of a listener (live).
    pub fn is_start(self) -> bool {
        matches!(self, Action::ListenStarted | Action::UdpBound)
    }

    /// The end of a listener.
    pub fn is_end(self) -> bool {
        matches!(self, Action::ListenStopped | Action::UdpReleased)
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// ECS `event.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    #[default]
    Event,
    Alert,
    State,
    Metric,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Alert => "alert",
            Kind::State => "state",
            Kind::Metric => "metric",
        }
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// ECS `log.level` (syslog's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Notice,
    Warning,
    Error,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Notice => "notice",
            Level::Warning => "warning",
            Level::Error => "error",
            Level::Critical => "critical",
        }
    }
}

impl Serialize for Level {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Nanoseconds since the epoch, written as RFC 3339 (`@timestamp`, `event.created`).
fn rfc3339<S: Serializer>(ns: &i128, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::time::rfc3339(*ns))
}

fn rfc3339_opt<S: Serializer>(ns: &Option<i128>, s: S) -> Result<S::Ok, S::Error> {
    match ns {
        Some(ns) => rfc3339(ns, s),
        None => s.serialize_none(),
    }
}

/// An alert's severity, written as ECS `event.severity` (0-100).
fn ecs_severity_num<S: Serializer>(sev: &Option<Severity>, s: S) -> Result<S::Ok, S::Error> {
    match sev {
        Some(v) => s.serialize_u8(ecs_severity(*v).0),
        None => s.serialize_none(),
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    )*};
}
display_as_str!(Action, Kind, Level, crate::socket::Protocol);

/// ECS version the field names follow.
pub const ECS_VERSION: &str = "8.11.0";

#[derive(Serialize, Debug, Clone)]
pub struct Event {
    /// When it happened (the kernel's time of the syscall, for a live listener event),
    /// nanoseconds since the epoch.
    #[serde(rename = "@timestamp", serialize_with = "rfc3339")]
    pub time_ns: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub event: EventMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<Log>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Shared<Process>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Shared<Named>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Shared<Named>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Shared<Container>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    pub host: Shared<Host>,
    pub agent: Shared<Agent>,
    pub ecs: Ecs,
    pub portwatch: Portwatch,
}

impl Event {
    /// An event with only the fields every event has: `action` (its kind, category and
    /// type follow from it), when it happened and when it was made (nanoseconds since the
    /// epoch), and the host and agent. `event.sequence` is set when it is written.
    pub fn new(
        action: Action,
        time_ns: i128,
        created_ns: i128,
        host: Shared<Host>,
        agent: Shared<Agent>,
    ) -> Event {
        let (category, type_) = action.category_type();
        Event {
            time_ns,
            message: None,
            event: EventMeta {
                kind: action.kind(),
                category,
                type_,
                action,
                dataset: "portwatch.listener",
                module: "portwatch",
                sequence: 0,
                duration: None,
                severity: None,
                created_ns,
            },
            log: None,
            network: None,
            server: None,
            process: None,
            user: None,
            group: None,
            container: None,
            rule: None,
            host,
            agent,
            ecs: Ecs {
                version: ECS_VERSION,
            },
            portwatch: Portwatch::default(),
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct EventMeta {
    pub kind: Kind,
    pub category: &'static [&'static str],
    #[serde(rename = "type")]
    pub type_: &'static [&'static str],
    pub action: Action,
    pub dataset: &'static str,
    pub module: &'static str,
    pub sequence: u64,
    /// Nanoseconds a listener lived (on its end event, when its start was seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// An alert's severity (written as ECS's 0-100 number).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ecs_severity_num"
    )]
    pub severity: Option<Severity>,
    /// When the agent made the event (the kernel time is `@timestamp`), nanoseconds
    /// since the epoch.
    #[serde(rename = "created", serialize_with = "rfc3339")]
    pub created_ns: i128,
}

#[derive(Serialize, Debug, Clone)]
pub struct Log {
    pub level: Level,
}

#[derive(Serialize, Debug, Clone)]
pub struct Network {
    pub transport: crate::socket::Protocol,
    #[serde(rename = "type")]
    pub type_: &'static str,
}

#[derive(Serialize, Debug, Clone)]
pub struct Server {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct Process {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// When the process started, nanoseconds since the epoch.
    #[serde(
        rename = "start",
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub start_ns: Option<i128>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<String>,
    /// Owner (uid) of the executable file, for `[[allow]]` rules by process name; not
    /// written (ECS has no field for it, and the event names the executable).
    #[serde(skip)]
    pub executable_owner: Option<u32>,
}

/// `portwatch.attribution_changed`: what /proc says now, where it differs from what the
/// kernel captured when the socket started listening. A process can exec another
/// program, rename itself or move to another cgroup between its bind and the agent's
/// read of /proc; the event names what the kernel saw (`process.name`, `user`,
/// `portwatch.cgroup`, `portwatch.systemd`) and classification and advice use those.
#[derive(Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct AttributionChanged {
    /// `renamed` (the thread's name differs: an exec or a rename since the bind),
    /// `cgroup-moved`, `uid-changed`.
    pub reasons: Vec<&'static str>,
    /// /proc's name now (with `renamed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// /proc's executable and command line now (with `renamed`): they may be those of a
    /// program exec'd after the bind, so they are not in `process.*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    /// /proc's cgroup path now (with `cgroup-moved`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// /proc's real uid now (with `uid-changed`; a daemon that drops privileges after
    /// binding shows this too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Parent {
    pub pid: u32,
}

#[derive(Serialize, Debug, Clone)]
pub struct Named {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Container {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<&'static str>,
}

#[derive(Serialize, Debug)]
pub struct Host {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
}

#[derive(Serialize, Debug)]
pub struct Boot {
    pub id: String,
}

#[derive(Serialize, Debug)]
pub struct Agent {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub name: &'static str,
    pub version: &'static str,
}

#[derive(Serialize, Debug, Clone)]
pub struct Ecs {
    pub version: &'static str,
}

#[derive(Serialize, Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub ruleset: &'static str,
}

/// Fields ECS has no name for, under the agent's own namespace.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Portwatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<Socket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd: Option<Shared<Systemd>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Shared<Cgroup>>,
    /// Present when `process.command_line`/`process.args` were cut to fit
    /// [`crate::attribution::procfs::ARGV_EVENT_BUDGET`]: what the whole command line was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Shared<ArgvCut>>,
    /// Where the process fields came from: `proc` (read from /proc and matched to the
    /// kernel's start time), `kernel` (the process was gone or its pid reused: only what
    /// the kernel captured), `snapshot`, or `kernel-socket` (no process owns it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<&'static str>,
    /// /proc, read after the kernel reported the listener, disagrees with what the kernel
    /// captured at that moment. The event's own fields keep the kernel's values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution_changed: Option<Shared<AttributionChanged>>,
    /// Where the listener can be reached from (scope, reachable scopes, public address,
    /// and the host firewall's verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposure: Option<ExposureOut>,
    /// On `exposure-changed`: the firewall verdict before and after a ruleset change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposure_change: Option<ExposureChange>,
    /// On the end of `exposure-without-listener`: why it ended (`listener-appeared`,
    /// `rule-removed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<&'static str>,
    /// The catalogue or policy entry the listener matched, and the outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<Risk>,
    /// On alerts: remediation steps and the number of folded repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    /// Found or ended by the resync that follows a loss (not seen live).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resync: bool,
    /// On `risky-listener-repeated`: alerts folded since the last one written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    /// On `sensor-started`: the hook set in use and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<crate::kernel::probes::Hooks>,
    /// On `listeners-folded`: what the kernel counted instead of sending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fold: Option<FoldInfo>,
    /// The event was too large for its destination (a syslog datagram) and was re-rendered
    /// with long fields shortened: its size before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shrunk_from: Option<u64>,
    /// Not written: the event travels in the urgent lane of the output queues (an
    /// important listener, an alert, a fold, a loss report), ahead of bulk churn.
    #[serde(skip)]
    pub urgent: bool,
}

/// `portwatch.exposure`: the address exposure and, when evaluated, the firewall verdict.
#[derive(Serialize, Debug, Clone)]
pub struct ExposureOut {
    #[serde(flatten)]
    pub exposure: crate::classify::Exposure,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<Arc<crate::classify::firewall::Firewall>>,
    /// A host port a NAT rule sends to this listener (the most exposed one), with the
    /// forward path's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<Arc<crate::classify::firewall::nat::Publication>>,
}

impl Deref for ExposureOut {
    type Target = crate::classify::Exposure;

    fn deref(&self) -> &crate::classify::Exposure {
        &self.exposure
    }
}

/// `portwatch.exposure_change` on `exposure-changed`.
#[derive(Serialize, Debug, Clone)]
pub struct ExposureChange {
    /// The verdict reported before (none: not evaluated then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Arc<crate::classify::firewall::Firewall>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Arc<crate::classify::firewall::Firewall>>,
    /// The NAT publication before and after, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_before: Option<Arc<crate::classify::firewall::nat::Publication>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_after: Option<Arc<crate::classify::firewall::nat::Publication>>,
}

/// `portwatch.fold` on `listeners-folded`: starts a process made above its budget,
/// counted exactly in the kernel instead of sent one by one.
#[derive(Serialize, Debug, Clone)]
pub struct FoldInfo {
    /// Starts (listens or binds) folded since the previous report of this fold.
    pub started: u64,
    /// Ends of folded listeners since the previous report.
    pub ended: u64,
    /// Since the fold began.
    pub started_total: u64,
    pub ended_total: u64,
    /// Every port folded so far, as ranges (`"1024-1030,11211"`).
    pub ports: String,
    /// How many distinct ports that is.
    pub port_count: u32,
    /// `loopback`, `wildcard` or `address` (then `server.ip` is the first address seen).
    pub scope: &'static str,
    /// First and latest folded start.
    pub first: String,
    pub last: String,
    /// Which budgets were spent: `process`, `user`.
    pub budget: Vec<&'static str>,
    /// The process stopped (or stopped churning): no more reports for this fold unless
    /// it churns again.
    #[serde(rename = "final")]
    pub final_: bool,
    /// The process's exact totals: starts sent one by one, folded, lost in the kernel.
    /// sent + folded + lost = every start the process made while the agent ran.
    pub process_sent: u64,
    pub process_folded: u64,
    pub process_lost: u64,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct Socket {
    /// Socket inode (as in `/proc/<pid>/fd` and `ss -e`): joins a start with its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Network namespace inode (`readlink /proc/<pid>/ns/net`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_netns: Option<bool>,
    /// For `::` binds: true when IPV6_V6ONLY is set (no IPv4 traffic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
    /// True for sockets owned by the kernel (nfsd, in-kernel RPC): no process.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kernel: bool,
    /// A UDP socket with no `bind()`: the kernel chose its port at its first unconnected
    /// send, and it hears anyone on that port.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub implicit_bind: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<u32>,
    /// Every process holding the socket (snapshot; a forked server shares it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Systemd {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    /// Set when `unit` is run by a user's manager (`user@N.service`): the uid N. Such a
    /// unit's name is whatever user N chose; the system manager's unit of that name is
    /// another unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_manager: Option<u32>,
}

/// `portwatch.process`: the command line was longer than an event carries.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ArgvCut {
    /// Always true (the object is only present when something was cut).
    pub truncated: bool,
    /// Bytes of the whole raw command line (`/proc/<pid>/cmdline`, NULs included).
    pub original_length: u64,
    /// Arguments in the whole command line.
    pub original_args_count: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Cgroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Lost {
    /// Events lost since the previous `events-lost` event.
    pub count: u64,
    /// Events lost since the agent started.
    pub total: u64,
    /// `ring-buffer-full` (the kernel could not reserve space), `kernel-map-full`,
    /// `hook-run-skipped` (the kernel skipped a hook program already running on that
    /// CPU: it may have carried a start or an end), `decode-error`, `untracked` (a start could not be tracked: its end will carry no
    /// duration), `output-queue-full` (the output fell behind and the bounded queue
    /// overflowed), `output-error` (a write failed: disk full, I/O error), `spool-full`
    /// (a destination's spool on disk was full: its oldest events were dropped) or
    /// `spool-torn-record` (a damaged record in a spool, left by a crash, was skipped).
    pub reason: &'static str,
    /// For output losses: the sink that lost them (`stdout`, `file:...`, `syslog:...`,
    /// `forward:...`, `relp:...`); the other sinks may have written those events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// Which lane lost them: `urgent` (important events) or `bulk`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_once_writes_what_the_value_writes() {
        let p = Process {
            pid: 7,
            name: Some("a \"quoted\"\nname".into()),
            args: Some(vec!["x".into(), "\u{1b}[31m".into()]),
            ..Process::default()
        };
        let plain = serde_json::to_string(&p).unwrap();
        let s = shared(p.clone());
        // Twice: the first renders and keeps, the second reuses.
        assert_eq!(serde_json::to_string(&s).unwrap(), plain);
        assert_eq!(serde_json::to_string(&s).unwrap(), plain);
        // Into a Value too (the OCSF renderer's path).
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::to_value(&p).unwrap()
        );
        assert_eq!(s.pid, 7, "fields read through");
    }
}

/// What the classifier said about a listener, on its event.
#[derive(Serialize, Debug, Clone)]
pub struct Risk {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<String>,
}

/// Alert details beyond ECS `rule.*` and `message`.
#[derive(Serialize, Debug, Clone)]
pub struct AlertInfo {
    /// Alerts for the same rule, process, address and port folded since the last one.
    pub repeats: u64,
    #[serde(flatten)]
    pub remediation: Remediation,
}

/// ECS `event.severity` (0-100) and `log.level` for a severity.
pub fn ecs_severity(s: Severity) -> (u8, Level) {
    match s {
        Severity::Low => (21, Level::Notice),
        Severity::Medium => (47, Level::Warning),
        Severity::High => (73, Level::Error),
        Severity::Critical => (99, Level::Critical),
    }
}
