//! What one measured run produced, and matching captured events to generated ones.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{
    load::Load,
    util::{Pcts, ProgCost},
};

#[derive(Serialize, Clone, Debug, Default)]
pub struct Capture {
    /// Listens (TCP) or binds (UDP) the load generator made.
    pub generated: u64,
    /// Of those, how many the tool reported (multiset match, never above generated).
    pub captured: u64,
    /// Reports from the generator's pids beyond what it generated (duplicates).
    pub extra: u64,
    /// What a report was matched on: `pid+port`, `pid` or `port`.
    pub match_on: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stops_generated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stops_captured: Option<u64>,
    /// Starts (and ends) the agent folded into `listeners-folded` for the generator's
    /// pids: counted exactly, not sent one by one. captured + folded = generated is
    /// everything accounted for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stops_folded: Option<u64>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Observer {
    pub tool: String,
    pub capture: Option<Capture>,
    /// Events the tool itself said it lost.
    pub lost: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lost_by_reason: BTreeMap<String, u64>,
    /// Bench read the line from the pipe − kernel timestamp of the event.
    pub lat_read: Option<Pcts>,
    /// `event.created` − `@timestamp` (agent's own view).
    pub lat_created: Option<Pcts>,
    /// utime + stime while the load ran (and while it drained), seconds.
    pub cpu_s: Option<f64>,
    /// cpu_s over the load's duration, percent of one core.
    pub cpu_pct: Option<f64>,
    pub events_for_cpu: u64,
    /// `captured` (lines counted) or `expected` (output not read: generated starts+stops).
    pub events_basis: &'static str,
    pub cpu_ms_per_1k_events: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub progs: Vec<ProgCost>,
    pub lines: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_checked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_mismatches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub polls: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// flood-evasion runs: the bench's own risky listeners, and what the tool saw of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<FloodObs>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Run {
    pub round: u32,
    pub workload: String,
    /// `none`, `portwatch`, `portwatch-nofold`, `floor`, `bpftrace`, `ss` (flood-evasion:
    /// `portwatch-file`, `portwatch-slow-pipe`, `bpftrace`, `ss`).
    pub tool: String,
    /// BPF run-time statistics were on (a separate pass: they slow every program).
    pub kernel_stats: bool,
    pub error: Option<String>,
    pub load: Option<Load>,
    pub observers: Vec<Observer>,
    /// CPU-seconds used on the host during the load by everything but the generator,
    /// the observer and the bench (other processes; `ss` itself in ss runs). The
    /// observer's time also covers its drain after the load, so this is a lower bound.
    pub other_cpu_s: Option<f64>,
}

impl Run {
    pub fn set_other_cpu(&mut self) {
        let Some(l) = &self.load else { return };
        let obs: f64 = self.observers.iter().filter_map(|o| o.cpu_s).sum();
        self.other_cpu_s = Some((l.host_busy_s - l.cpu_s - l.bench_cpu_s - obs).max(0.0));
    }
}

/// Match reports to generated listens. `cap` holds (pid, port) -> reports from the
/// generator's pids; with `by_port` false ports are ignored (counts per pid).
pub fn match_capture(load: &Load, cap: &HashMap<(u32, u16), u64>, by_port: bool) -> Capture {
    let mut captured = 0;
    let mut extra = 0;
    if by_port {
        for (k, &n) in cap {
            let g = u64::from(load.generated.get(k).copied().unwrap_or(0));
            captured += n.min(g);
            extra += n.saturating_sub(g);
        }
    } else {
        let per_gen = load.per_pid();
        let mut per_pid: HashMap<u32, u64> = HashMap::new();
        for ((pid, _), n) in cap {
            *per_pid.entry(*pid).or_insert(0) += n;
        }
        for (pid, n) in per_pid {
            let g = per_gen.get(&pid).copied().unwrap_or(0);
            captured += n.min(g);
            extra += n.saturating_sub(g);
        }
    }
    Capture {
        generated: load.listens,
        captured,
        extra,
        match_on: if by_port { "pid+port" } else { "pid" },
        stops_generated: None,
        stops_captured: None,
        folded: None,
        stops_folded: None,
    }
}

/// What a tool saw of the bench's listeners in one run.
#[derive(Serialize, Clone, Debug, Default)]
pub struct FloodObs {
    /// Listeners the bench opened (K unless a bind failed).
    pub opened: u64,
    /// Of those, reported: a `listen-started` from the bench's pid (portwatch), a
    /// pid+port line (bpftrace), seen in a poll (ss).
    pub reported: u64,
    /// portwatch: `listen-stopped` for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stops_reported: Option<u64>,
    /// portwatch: `risky-listener` alerts for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<u64>,
    /// portwatch: alerts for port 11211 folded into `risky-listener-repeated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_repeats: Option<u64>,
    /// Per reported listener: its first report's arrival − when listen() returned, ns.
    pub report_lat_ns: Vec<i64>,
    /// Per `risky-listener`: its arrival − when its listener's listen() returned, ns.
    pub alert_lat_ns: Vec<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub opener_errors: Vec<String>,
}
