//! The tools portwatch is compared with, on the same loads: a bpftrace one-liner on the
//! same tracepoint, and `ss` polled at fixed intervals.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddrV4, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    agent::wait_idle,
    load::{Kind, Load},
    results::{Observer, match_capture},
    util::{self, pcts},
};

/// The issue's one-liner: one line per listen, from the state-change tracepoint.
pub const BT_TCP: &str = r#"tracepoint:sock:inet_sock_set_state /args->newstate == 10/ { printf("%d %d\n", pid, args->sport); }"#;
/// Paced runs also print the kernel time, so the delivery latency can be read.
pub const BT_TCP_TS: &str = r#"tracepoint:sock:inet_sock_set_state /args->newstate == 10/ { printf("%d %d %lld\n", pid, args->sport, nsecs); }"#;
/// UDP has no state change: successful bind() calls, per pid (no port in this record).
const BT_UDP: &str =
    r#"tracepoint:syscalls:sys_exit_bind /args->ret == 0/ { printf("%d 0\n", pid); }"#;

pub struct BtOpts {
    pub log_file: PathBuf,
    pub kernel_stats: bool,
}

struct BtOut {
    caps: HashMap<(u32, u16), u64>,
    lat: Vec<i64>,
    lost: u64,
    lines: u64,
}

/// A listener or UDP socket of the bench itself, made once the tool says it attached:
/// seeing it in the output proves the probe was live before the load started.
fn sentinel(kind: Kind) -> anyhow::Result<u16> {
    let lo = SocketAddrV4::new([127, 0, 0, 1].into(), 0);
    Ok(if kind.is_udp() {
        UdpSocket::bind(lo)?.local_addr()?.port()
    } else {
        TcpListener::bind(lo)?.local_addr()?.port()
    })
}

pub fn run_bpftrace(
    o: &BtOpts,
    kind: Kind,
    load: impl FnOnce() -> anyhow::Result<Load>,
) -> anyhow::Result<(Load, Observer)> {
    let timed = kind == Kind::Paced;
    let script = match kind {
        Kind::UdpChurn => BT_UDP,
        Kind::Paced => BT_TCP_TS,
        _ => BT_TCP,
    };
    let mut cmd = Command::new("bpftrace");
    if timed {
        // Unbuffered, so the arrival time of a line means something.
        cmd.args(["-B", "none"]);
    }
    cmd.args(["-e", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&o.log_file)?);
    let mut child = cmd.spawn().context("starting bpftrace")?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let attached = Arc::new(AtomicBool::new(false));
    let att = attached.clone();
    let reader = thread::spawn(move || {
        util::reader_priority();
        let mut out = BtOut {
            caps: HashMap::new(),
            lat: Vec::new(),
            lost: 0,
            lines: 0,
        };
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            let now = util::monotonic_ns();
            let l = line.trim();
            if l.starts_with("Attaching") {
                att.store(true, Ordering::Release);
            } else if let Some(n) = lost_count(l) {
                out.lost += n;
            } else {
                let mut it = l.split_whitespace();
                let pid = it.next().and_then(|s| s.parse::<u32>().ok());
                let port = it.next().and_then(|s| s.parse::<u16>().ok());
                if let (Some(pid), Some(port)) = (pid, port) {
                    out.lines += 1;
                    *out.caps.entry((pid, port)).or_insert(0) += 1;
                    if let Some(ts) = it.next().and_then(|s| s.parse::<i64>().ok()) {
                        out.lat.push(now - ts);
                    }
                }
            }
            line.clear();
        }
        out
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
                util::read_tail(&o.log_file, 400)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    // "Attaching N probes..." is printed just before the attach calls.
    thread::sleep(Duration::from_millis(500));
    let sentinel_port = sentinel(kind)?;
    // Sampled only when kernel statistics are asked for: no ids, no samples.
    let prog_ids = if o.kernel_stats {
        util::bpf_prog_ids(pid)
    } else {
        Vec::new()
    };
    let before = util::prog_samples(&prog_ids);
    let cpu0 = util::cpu_seconds(pid);

    let load = match load() {
        Ok(l) => l,
        Err(e) => {
            kill(&mut child);
            return Err(e);
        }
    };

    let mut notes = Vec::new();
    if !wait_idle(pid, None, Duration::from_secs(30)) {
        notes.push("bpftrace still busy 30 s after the load ended".into());
    }
    let cpu1 = util::cpu_seconds(pid);
    let hwm = util::vm_hwm_kib(pid);
    let after = util::prog_samples(&prog_ids);
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
    let mut out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("bpftrace reader panicked"))?;
    let stderr = std::fs::read_to_string(&o.log_file).unwrap_or_default();
    out.lost += stderr
        .lines()
        .filter_map(|l| lost_count(l.trim()))
        .sum::<u64>();

    let me = std::process::id();
    let verified = if kind.is_udp() {
        out.caps.keys().any(|(p, _)| *p == me)
    } else {
        out.caps.contains_key(&(me, sentinel_port))
    };
    let ours: HashSet<u32> = load.pids.iter().copied().collect();
    out.caps.retain(|(p, _), _| ours.contains(p));
    let capture = match_capture(&load, &out.caps, !kind.is_udp());
    let cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    if kind.is_udp() {
        notes.push("UDP: sys_exit_bind (ret 0) per pid; the record has no port".into());
    }
    let events = capture.captured;
    let obs = Observer {
        tool: "bpftrace".into(),
        capture: Some(capture),
        lost: Some(out.lost),
        lat_read: if timed { pcts(&mut out.lat) } else { None },
        cpu_s,
        cpu_pct: cpu_s.map(|c| 100.0 * c / load.elapsed_s.max(1e-3)),
        events_for_cpu: events,
        events_basis: "captured",
        cpu_ms_per_1k_events: cpu_s
            .filter(|_| events >= super::agent::MIN_EVENTS_FOR_CPU)
            .map(|c| c * 1e6 / events as f64),
        peak_rss_kib: hwm,
        progs: util::prog_costs(&before, &after),
        lines: out.lines,
        attach_verified: Some(verified),
        notes,
        ..Observer::default()
    };
    Ok((load, obs))
}

/// bpftrace reports perf buffer losses as "Lost N events".
pub fn lost_count(l: &str) -> Option<u64> {
    let rest = l.strip_prefix("Lost ")?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("events").then(|| n.parse().ok()).flatten()
}

/// One `ss -Htuln` poll: (udp?, port) of each listening/unconnected socket on 127.0.0.1.
fn ss_poll() -> Vec<(bool, u16)> {
    let Ok(out) = Command::new("ss")
        .arg("-Htuln")
        .stdin(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(4)?.rsplit_once(':')?;
            (addr == "127.0.0.1").then_some(())?;
            Some((*f.first()? == "udp", port.parse().ok()?))
        })
        .collect()
}

/// `ss` polled every `intervals` (each in its own thread) while the load runs.
/// Seen = distinct generated ports found in any poll, over listens generated.
pub fn run_ss(
    intervals: &[Duration],
    kind: Kind,
    load: impl FnOnce() -> anyhow::Result<Load>,
) -> anyhow::Result<(Load, Vec<Observer>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for &iv in intervals {
        let stop = stop.clone();
        let seen = Arc::new(Mutex::new((0u64, HashSet::<(bool, u16)>::new())));
        let s2 = seen.clone();
        let h = thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let ports = ss_poll();
                {
                    let mut g = s2.lock().expect("poisoned");
                    g.0 += 1;
                    g.1.extend(ports);
                }
                next += iv;
                let now = Instant::now();
                if next > now {
                    // Sleep in short steps so a stop is noticed quickly.
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
                    }
                } else {
                    next = now;
                }
            }
        });
        pollers.push((iv, h, seen));
    }
    // Give the first polls a moment to run before the load starts.
    thread::sleep(Duration::from_millis(200));
    let res = load();
    stop.store(true, Ordering::Relaxed);
    let mut observers = Vec::new();
    let load = res?;
    let udp = kind.is_udp();
    let ports: HashSet<u16> = load.generated.keys().map(|(_, p)| *p).collect();
    for (iv, h, seen) in pollers {
        let _ = h.join();
        let g = seen.lock().expect("poisoned");
        let n =
            g.1.iter()
                .filter(|(u, p)| *u == udp && ports.contains(p))
                .count() as u64;
        let captured = n.min(load.listens);
        observers.push(Observer {
            tool: ss_name(iv),
            capture: Some(super::results::Capture {
                generated: load.listens,
                captured,
                extra: 0,
                match_on: "port",
                stops_generated: None,
                stops_captured: None,
                folded: None,
                stops_folded: None,
            }),
            polls: Some(g.0),
            notes: vec![format!(
                "distinct generated {} ports seen in {} polls of `ss -Htuln`",
                if udp { "UDP" } else { "TCP" },
                g.0
            )],
            ..Observer::default()
        });
    }
    Ok((load, observers))
}

pub fn ss_name(iv: Duration) -> String {
    if iv >= Duration::from_secs(1) {
        format!("ss every {} s", iv.as_secs())
    } else {
        format!("ss every {} ms", iv.as_millis())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lost() {
        assert_eq!(super::lost_count("Lost 123 events"), Some(123));
        assert_eq!(super::lost_count("Lost x events"), None);
        assert_eq!(super::lost_count("4242 80"), None);
    }
}
