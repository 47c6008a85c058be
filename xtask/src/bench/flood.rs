//! `flood-evasion`: can a flood of harmless listeners hide a risky one?
//!
//! The load generator churns on every core (TCP in `flood-evasion-tcp`, UDP in
//! `flood-evasion-udp`), far above any per-process budget, while the bench itself opens
//! [`K`] TCP listeners on 0.0.0.0:[`PORT`] (memcached, a catalogue rule), each for 50 ms,
//! 100-200 ms apart, and notes when each listen() returned. Per tool: how many of the K
//! it reported, whether the alert was raised, and how long after listen() returned the
//! report (and the alert) reached its reader.
//!
//! Rows: portwatch writing to a file followed like `tail -f`; portwatch writing to a pipe
//! whose reader takes 1 ms a line (slower than the flood: the agent must choose what to
//! send first); bpftrace's one-liner on the state tracepoint; `ss` polled every 100 ms.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    OutputMode,
    agent::{self, Action, AgentOpts, Reader},
    load::{self, Load, Workload},
    peers,
    results::{FloodObs, Observer, match_capture},
    util,
};

/// Risky listeners the bench opens per run.
pub const K: usize = 20;
/// memcached: a catalogue rule, and an important record (risky port, not loopback).
pub const PORT: u16 = 11211;
const HOLD: Duration = Duration::from_millis(50);
const GAP_MS: (u64, u64) = (100, 200);
/// The flood is under way before the first listener opens.
const LEAD: Duration = Duration::from_millis(500);
/// The flood outlasts the opener: LEAD + K x 50 ms + (K - 1) x 200 ms = 5.3 s at most.
pub const MIN_FLOOD_SECS: f64 = 6.0;
/// The slow consumer's time per line.
pub const SLOW_PER_LINE: Duration = Duration::from_millis(1);
/// The slow consumer's read buffer: small, so that what queues in front of an alert is
/// the agent's doing (and the pipe's), not the consumer's.
pub const SLOW_BUF: usize = 4096;
/// Events within this of a listener's open interval belong to it (listeners are at
/// least 100 ms apart).
const SLACK_NS: i64 = 20_000_000;

/// One of the bench's listeners on 0.0.0.0:11211.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Opened {
    /// CLOCK_REALTIME: before bind(), when listen() had returned, after close().
    pub before_rt: i64,
    pub listen_rt: i64,
    pub close_rt: i64,
    /// CLOCK_MONOTONIC (bpftrace's `nsecs`): before bind(), after close().
    pub before_mono: i64,
    pub close_mono: i64,
}

#[derive(Default)]
struct Opener {
    opened: Vec<Opened>,
    errors: Vec<String>,
}

/// A flood observation of the bench's listeners as `op` opened them.
fn flood_obs(op: &Opener) -> FloodObs {
    FloodObs {
        opened: op.opened.len() as u64,
        opener_errors: op.errors.clone(),
        ..FloodObs::default()
    }
}

/// Paths and settings a flood run needs from the bench.
pub struct Env<'a> {
    pub loadgen: &'a Path,
    pub tmp: &'a Path,
    pub agent: &'a Path,
    pub log_file: &'a Path,
    pub events_file: &'a Path,
    pub ring_bytes: Option<u32>,
}

/// Open the K listeners, one at a time.
fn open_listeners() -> Opener {
    let mut op = Opener::default();
    // xorshift: gaps need not be good random numbers, only not a fixed beat.
    let mut x = util::realtime_ns() as u64 | 1;
    let mut gap = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(GAP_MS.0 + x % (GAP_MS.1 - GAP_MS.0 + 1))
    };
    thread::sleep(LEAD);
    for i in 0..K {
        if i > 0 {
            thread::sleep(gap());
        }
        let (before_rt, before_mono) = (util::realtime_ns(), util::monotonic_ns());
        // std sets SO_REUSEADDR; bind() then listen() is the last call.
        match TcpListener::bind(("0.0.0.0", PORT)) {
            Ok(l) => {
                let listen_rt = util::realtime_ns();
                thread::sleep(HOLD);
                drop(l);
                op.opened.push(Opened {
                    before_rt,
                    listen_rt,
                    close_rt: util::realtime_ns(),
                    before_mono,
                    close_mono: util::monotonic_ns(),
                });
            }
            Err(e) => op.errors.push(format!("listener {i}: 0.0.0.0:{PORT}: {e}")),
        }
    }
    op
}

/// The flood on every core, with the opener running meanwhile.
fn flood_load(env: &Env<'_>, w: &Workload) -> anyhow::Result<(Load, Opener)> {
    let h = thread::spawn(open_listeners);
    let l = load::run(env.loadgen, env.tmp, w);
    let op = h
        .join()
        .map_err(|_| anyhow::anyhow!("the listener opener panicked"))?;
    Ok((l?, op))
}

/// The listener an event at `t` belongs to (by its open interval on that clock).
fn which(opened: &[Opened], t: i64, span: impl Fn(&Opened) -> (i64, i64)) -> Option<usize> {
    opened.iter().position(|o| {
        let (a, b) = span(o);
        a - SLACK_NS <= t && t <= b + SLACK_NS
    })
}

fn by_realtime(o: &Opened) -> (i64, i64) {
    (o.before_rt, o.close_rt)
}

/// Is port 11211 free? A listener already there (a real memcached) would make every
/// figure meaningless.
pub fn check_port() -> anyhow::Result<()> {
    TcpListener::bind(("0.0.0.0", PORT))
        .map(drop)
        .with_context(|| format!("flood-evasion needs port {PORT}/tcp free on 0.0.0.0"))
}

/// portwatch to a file followed like `tail -f` (`slow` false), or to a pipe read at
/// 1 ms a line (`slow` true).
pub fn run_portwatch(
    env: &Env<'_>,
    w: &Workload,
    name: &'static str,
    slow: bool,
) -> anyhow::Result<(Load, Observer)> {
    let o = AgentOpts {
        bin: env.agent,
        mode: if slow {
            OutputMode::Stdout
        } else {
            OutputMode::File
        },
        ring_bytes: env.ring_bytes,
        events_file: env.events_file.to_path_buf(),
        log_file: env.log_file.to_path_buf(),
        kernel_stats: false,
        extra: &[],
        name,
        reader: if slow {
            Reader::Slow(SLOW_PER_LINE, SLOW_BUF)
        } else {
            Reader::Tail
        },
    };
    let mut opener = None;
    let run = agent::collect(&o, || {
        let (l, op) = flood_load(env, w)?;
        opener = Some(op);
        Ok(l)
    })?;
    let op = opener.unwrap_or_default();
    let me = std::process::id();
    let mut f = flood_obs(&op);
    let mut first = vec![None; op.opened.len()];
    let mut stopped = vec![false; op.opened.len()];
    let (mut alerts, mut alert_lat) = (0, Vec::new());
    for r in run
        .col
        .recs
        .iter()
        .filter(|r| r.pid == me && r.port == PORT)
    {
        let Some(i) = which(&op.opened, r.ts_ns, by_realtime) else {
            continue;
        };
        let lat = (r.recv_ns - op.opened[i].listen_rt).max(0);
        match r.action {
            Action::ListenStarted => {
                first[i].get_or_insert(lat);
            }
            Action::ListenStopped => stopped[i] = true,
            Action::RiskyListener => {
                alerts += 1;
                alert_lat.push(lat);
            }
            _ => {}
        }
    }
    f.report_lat_ns = first.iter().flatten().copied().collect();
    f.reported = f.report_lat_ns.len() as u64;
    f.stops_reported = Some(stopped.iter().filter(|s| **s).count() as u64);
    f.alerts = Some(alerts);
    f.alert_lat_ns = alert_lat;
    f.alert_repeats = Some(run.col.alert_repeats.get(&PORT).copied().unwrap_or(0));
    let (load, mut obs) = agent::observe(&o, w.kind, run);
    if slow {
        obs.notes.push(format!(
            "pipe read at {} ms a line while the flood ran, then drained at full speed",
            SLOW_PER_LINE.as_millis()
        ));
    }
    obs.flood = Some(f);
    Ok((load, obs))
}

/// bpftrace's one-liner (with `nsecs`, unbuffered), read as fast as the bench can.
pub fn run_bpftrace(env: &Env<'_>, w: &Workload) -> anyhow::Result<(Load, Observer)> {
    let mut child = Command::new("bpftrace")
        .args(["-B", "none", "-e", peers::BT_TCP_TS])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(env.log_file)?)
        .spawn()
        .context("starting bpftrace")?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let attached = Arc::new(AtomicBool::new(false));
    let att = attached.clone();
    let me = std::process::id();
    // (pid, port) -> lines; lines for the bench's listeners: (nsecs, arrival); lost.
    type Seen = (HashMap<(u32, u16), u64>, Vec<(i64, i64)>, u64, u64);
    let reader = thread::spawn(move || -> Seen {
        util::reader_priority();
        let (mut caps, mut ours, mut lost, mut lines) = (HashMap::new(), Vec::new(), 0, 0);
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            let now = util::realtime_ns();
            let l = line.trim();
            if l.starts_with("Attaching") {
                att.store(true, Ordering::Release);
            } else if let Some(n) = peers::lost_count(l) {
                lost += n;
            } else {
                let mut it = l.split_whitespace();
                let p = it.next().and_then(|s| s.parse::<u32>().ok());
                let port = it.next().and_then(|s| s.parse::<u16>().ok());
                let ts = it.next().and_then(|s| s.parse::<i64>().ok());
                if let (Some(p), Some(port)) = (p, port) {
                    lines += 1;
                    *caps.entry((p, port)).or_insert(0u64) += 1;
                    if p == me && port == PORT {
                        ours.push((ts.unwrap_or(0), now));
                    }
                }
            }
            line.clear();
        }
        (caps, ours, lost, lines)
    });
    let kill = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let t = Instant::now();
    while !attached.load(Ordering::Acquire) {
        if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
            kill(&mut child);
            bail!(
                "bpftrace did not attach: {}",
                util::read_tail(env.log_file, 400)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    // "Attaching N probes..." is printed just before the attach calls.
    thread::sleep(Duration::from_millis(500));
    let cpu0 = util::cpu_seconds(pid);
    let (load, op) = match flood_load(env, w) {
        Ok(x) => x,
        Err(e) => {
            kill(&mut child);
            return Err(e);
        }
    };
    let mut notes = Vec::new();
    if !agent::wait_idle(pid, None, Duration::from_secs(30)) {
        notes.push("bpftrace still busy 30 s after the load ended".into());
    }
    let cpu1 = util::cpu_seconds(pid);
    let hwm = util::vm_hwm_kib(pid);
    // SAFETY: signalling our own child; bpftrace flushes its output on SIGINT.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let t = Instant::now();
    while child.try_wait()?.is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            notes.push("bpftrace ignored SIGINT for 20 s; killed".into());
            kill(&mut child);
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (mut caps, ours, mut lost, lines) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("bpftrace reader panicked"))?;
    lost += std::fs::read_to_string(env.log_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| peers::lost_count(l.trim()))
        .sum::<u64>();

    let mut f = flood_obs(&op);
    let mut first = vec![None; op.opened.len()];
    for (ts, at) in ours {
        if let Some(i) = which(&op.opened, ts, |o| (o.before_mono, o.close_mono)) {
            first[i].get_or_insert((at - op.opened[i].listen_rt).max(0));
        }
    }
    f.report_lat_ns = first.iter().flatten().copied().collect();
    f.reported = f.report_lat_ns.len() as u64;
    let pids: std::collections::HashSet<u32> = load.pids.iter().copied().collect();
    caps.retain(|(p, _), _| pids.contains(p));
    let cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    if w.kind.is_udp() {
        notes.push("the TCP state tracepoint does not see the UDP flood".into());
    }
    let obs = Observer {
        tool: "bpftrace".into(),
        // The TCP flood's listens, matched on pid+port; the UDP flood is not its business.
        capture: (!w.kind.is_udp()).then(|| match_capture(&load, &caps, true)),
        lost: Some(lost),
        cpu_s,
        cpu_pct: cpu_s.map(|c| 100.0 * c / load.elapsed_s.max(1e-3)),
        peak_rss_kib: hwm,
        lines,
        notes,
        flood: Some(f),
        ..Observer::default()
    };
    Ok((load, obs))
}

/// `ss -Htln 'sport = :11211'` every 100 ms while the flood runs.
pub fn run_ss(env: &Env<'_>, w: &Workload) -> anyhow::Result<(Load, Observer)> {
    const EVERY: Duration = Duration::from_millis(100);
    let stop = Arc::new(AtomicBool::new(false));
    // (start, end) CLOCK_REALTIME of each poll that showed a listener on 0.0.0.0:11211.
    let seen = Arc::new(Mutex::new((0u64, Vec::<(i64, i64)>::new())));
    let (st, s2) = (stop.clone(), seen.clone());
    let poller = thread::spawn(move || {
        let mut next = Instant::now();
        while !st.load(Ordering::Relaxed) {
            let start = util::realtime_ns();
            let out = Command::new("ss")
                .args(["-Htln", &format!("sport = :{PORT}")])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            let end = util::realtime_ns();
            let hit = out.is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.contains(&format!("0.0.0.0:{PORT}")))
            });
            {
                let mut g = s2.lock().expect("poisoned");
                g.0 += 1;
                if hit {
                    g.1.push((start, end));
                }
            }
            next += EVERY;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    });
    thread::sleep(Duration::from_millis(200));
    let res = flood_load(env, w);
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    let (load, op) = res?;
    let g = seen.lock().expect("poisoned");
    let mut f = flood_obs(&op);
    let mut first = vec![None; op.opened.len()];
    for &(start, end) in &g.1 {
        if let Some(i) = op
            .opened
            .iter()
            .position(|o| o.before_rt <= end && start <= o.close_rt)
        {
            first[i].get_or_insert((end - op.opened[i].listen_rt).max(0));
        }
    }
    f.report_lat_ns = first.iter().flatten().copied().collect();
    f.reported = f.report_lat_ns.len() as u64;
    let obs = Observer {
        tool: peers::ss_name(EVERY),
        polls: Some(g.0),
        notes: vec![format!(
            "a listener counts as seen when a poll overlapping its 50 ms shows 0.0.0.0:{PORT}; \
             latency: that poll's end − listen()"
        )],
        flood: Some(f),
        ..Observer::default()
    };
    Ok((load, obs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_belong_to_their_listener() {
        let o = |a: i64| Opened {
            before_rt: a,
            listen_rt: a + 10,
            close_rt: a + 50_000_000,
            before_mono: a,
            close_mono: a + 50_000_000,
        };
        let v = [o(1_000_000_000), o(1_200_000_000)];
        assert_eq!(which(&v, 1_000_000_005, by_realtime), Some(0));
        assert_eq!(
            which(&v, 1_060_000_000, by_realtime),
            Some(0),
            "a late stop"
        );
        assert_eq!(which(&v, 1_120_000_000, by_realtime), None);
        assert_eq!(which(&v, 1_199_000_000, by_realtime), Some(1));
    }
}
