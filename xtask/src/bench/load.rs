//! Running the load generator and reading what it generated.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    TcpChurn,
    UdpChurn,
    Paced,
    TcpTraffic,
    /// TCP churn on every core while the bench opens risky listeners (bench/flood.rs).
    FloodTcp,
    /// The same with UDP churn as the flood.
    FloodUdp,
}

impl Kind {
    pub fn loadgen_cmd(self) -> &'static str {
        match self {
            Kind::TcpChurn | Kind::FloodTcp => "tcp-churn",
            Kind::UdpChurn | Kind::FloodUdp => "udp-churn",
            Kind::Paced => "paced",
            Kind::TcpTraffic => "tcp-traffic",
        }
    }
    pub fn is_udp(self) -> bool {
        matches!(self, Kind::UdpChurn | Kind::FloodUdp)
    }
    pub fn is_flood(self) -> bool {
        matches!(self, Kind::FloodTcp | Kind::FloodUdp)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub id: String,
    pub kind: Kind,
    pub procs: u32,
    pub secs: f64,
    pub rate: u32,
    pub what: String,
}

impl Workload {
    pub fn with_secs(&self, secs: f64) -> Workload {
        Workload {
            secs,
            ..self.clone()
        }
    }
}

/// What one loadgen run did.
#[derive(Clone, Debug, Serialize)]
pub struct Load {
    pub ops: u64,
    /// Listens (TCP) or binds (UDP) that succeeded: the events a sensor should report.
    pub listens: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub first_error: String,
    pub ops_per_sec: f64,
    pub elapsed_s: f64,
    /// CPU time of the workers (their system calls and the BPF programs they trigger).
    pub cpu_s: f64,
    /// ops per worker CPU-second: the per-operation cost, whatever else runs on the host.
    pub ops_per_cpu_s: f64,
    /// CPU-seconds the whole host was busy (all cores) while the load ran.
    pub host_busy_s: f64,
    /// CPU-seconds stolen by the hypervisor while the load ran.
    pub host_steal_s: f64,
    /// CPU-seconds of the bench itself (its reader and poller threads) meanwhile.
    pub bench_cpu_s: f64,
    pub late_max_us: f64,
    pub pids: Vec<u32>,
    /// Generated (pid, port) -> count.
    #[serde(skip)]
    pub generated: HashMap<(u32, u16), u32>,
}

impl Load {
    pub fn per_pid(&self) -> HashMap<u32, u64> {
        let mut m = HashMap::new();
        for ((pid, _), n) in &self.generated {
            *m.entry(*pid).or_insert(0) += u64::from(*n);
        }
        m
    }
}

pub fn run(loadgen: &Path, tmp: &Path, w: &Workload) -> anyhow::Result<Load> {
    let ports: PathBuf = tmp.join("ports.txt");
    let _ = fs::remove_file(&ports);
    let mut cmd = Command::new(loadgen);
    cmd.arg(w.kind.loadgen_cmd())
        .args([
            "--procs",
            &w.procs.to_string(),
            "--secs",
            &w.secs.to_string(),
        ])
        .arg("--ports-out")
        .arg(&ports)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if w.kind == Kind::Paced {
        cmd.args(["--rate", &w.rate.to_string()]);
    }
    let cpu0 = host_cpu_s();
    let me = std::process::id();
    let bench0 = super::util::cpu_seconds(me);
    let t = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", loadgen.display()))?;
    let pid = child.id();
    // Bounded: the generator stops by itself; kill it if it hangs far past its time.
    let limit = Duration::from_secs_f64(w.secs + 30.0);
    let watchdog = std::thread::spawn(move || {
        while t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output()?;
    let (busy, steal) = host_cpu_s()
        .zip(cpu0)
        .map_or((0.0, 0.0), |(b, a)| (b.0 - a.0, b.1 - a.1));
    let bench_cpu = super::util::cpu_seconds(me)
        .zip(bench0)
        .map_or(0.0, |(b, a)| b - a);
    let _ = watchdog.join();
    if !out.status.success() {
        bail!(
            "loadgen {} failed: {}: {}",
            w.id,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("loadgen printed no JSON summary")?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut generated = HashMap::new();
    for l in fs::read_to_string(&ports)
        .context("reading loadgen ports")?
        .lines()
    {
        let mut it = l.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pid)), Some(Ok(port)), Some(Ok(n))) = (it.next(), it.next(), it.next()) {
            generated.insert((pid as u32, port as u16), n as u32);
        }
    }
    let pids = v["workers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w["pid"].as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default();
    Ok(Load {
        ops: f("ops") as u64,
        listens: f("listens") as u64,
        errors: f("errors") as u64,
        first_error: v["first_error"].as_str().unwrap_or("").to_string(),
        ops_per_sec: f("ops_per_sec"),
        elapsed_s: f("elapsed_s"),
        cpu_s: f("cpu_s"),
        ops_per_cpu_s: if f("cpu_s") > 0.0 {
            f("ops") / f("cpu_s")
        } else {
            0.0
        },
        host_busy_s: busy,
        host_steal_s: steal,
        bench_cpu_s: bench_cpu,
        late_max_us: f("late_max_us"),
        pids,
        generated,
    })
}

/// (busy, steal) CPU-seconds of the host so far, all cores. Busy: user, nice, system,
/// irq, softirq from /proc/stat (guest time is inside user); steal: time the hypervisor
/// gave to someone else.
fn host_cpu_s() -> Option<(f64, f64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((busy as f64 / hz, *f.get(7)? as f64 / hz))
}
