//! `cargo xtask soak`: the agent under a steady mixed churn for a long while (10 minutes
//! by default), printing what a person needs to trust it for months: resident memory
//! over time, events lost, and whether its open-listener table matches what `/proc`
//! says at the end.
//!
//! The load, at `--rate` operations per second: short-lived TCP listeners and UDP binds
//! in this process; long-lived ones (1-30 s) from a pool; and every second a child
//! process (a re-run of `loadgen paced`) that opens its own listeners and exits, so
//! processes come and go. The hostile phase runs throughout: every second another child,
//! as user `nobody`, with one 65,000-byte argument of 0xFF bytes, binds a UDP socket
//! for a moment (what a local user does to blow up the agent's memory and its log
//! lines). At the end the load stops with some pool listeners still open, the agent's
//! last `sensor-health` is compared with `portwatch snapshot`, and the longest line the
//! agent wrote must stay under [`LINE_MAX`].

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader},
    net::{TcpListener, UdpSocket},
    os::fd::OwnedFd,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Longest event line the agent may write under the hostile phase: command lines and
/// arguments are cut to 4 KiB in all, so a line stays well under this.
const LINE_MAX: usize = 16 * 1024;

/// The hostile child's argument: 65,000 bytes of 0xFF (not UTF-8, escaped by the agent).
const HOSTILE_ARG_BYTES: usize = 65_000;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Operations per second in the soak process (each opens and closes a socket).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
}

/// Tiny xorshift: the soak needs variety, not statistical quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    crate::build_loadgen()?;
    // Private copies: a rebuild in the shared workspace during a long soak must not swap
    // the binaries under it.
    let dir = crate::workspace_root().join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let agent_bin = dir.join("portwatch");
    let loadgen = dir.join("loadgen");
    std::fs::copy(crate::agent_binary(), &agent_bin).context("copying the agent")?;
    std::fs::copy(
        crate::workspace_root().join("target/release/loadgen"),
        &loadgen,
    )
    .context("copying loadgen")?;
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    println!(
        "soak: {:.1} min at {} ops/s plus a short-lived child process every second",
        args.minutes, args.rate
    );

    let mut agent = Command::new(&agent_bin)
        .args(["watch", "--format", "json", "--health-interval", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let stdout = agent.stdout.take().context("agent stdout")?;
    // The reader keeps only what the soak reports on; everything else is counted.
    let (tx, rx) = mpsc::channel::<Value>();
    let reader = thread::spawn(move || {
        let (mut lines, mut longest) = (0u64, 0usize);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines += 1;
            longest = longest.max(line.len());
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                eprintln!("soak: the agent wrote a line that is not JSON: {line}");
                continue;
            };
            let action = v["event"]["action"].as_str().unwrap_or("");
            if matches!(
                action,
                "sensor-started" | "sensor-health" | "events-lost" | "snapshot-complete"
            ) && tx.send(v).is_err()
            {
                break;
            }
        }
        (lines, longest)
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .context("no sensor-started from the agent within 30 s")?;
    if first["event"]["action"] != "sensor-started" {
        bail!("unexpected first event: {first}");
    }

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Long-lived listeners, closed (dropped) when their time is up.
    let mut pool: VecDeque<(Instant, OwnedFd)> = VecDeque::new();
    let mut children = Vec::new();
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let start = Instant::now();
    let mut next = start;
    let mut next_child = start;
    let mut ops = 0u64;
    let mut health: Vec<(f64, Value)> = Vec::new();
    let mut lost_total = 0u64;
    let mut hostile = 0u64;
    let mut last_print = start;
    while start.elapsed() < duration {
        let now = Instant::now();
        // Short-lived: open and close.
        match ops % 2 {
            0 => drop(TcpListener::bind("127.0.0.1:0")?),
            _ => drop(UdpSocket::bind("127.0.0.1:0")?),
        }
        // Long-lived: one in ten goes to the pool for 1-30 s.
        if ops.is_multiple_of(10) {
            let held = if rng.next().is_multiple_of(2) {
                OwnedFd::from(TcpListener::bind("127.0.0.1:0")?)
            } else {
                OwnedFd::from(UdpSocket::bind("127.0.0.1:0")?)
            };
            let life = Duration::from_millis(1000 + rng.next() % 29_000);
            pool.push_back((now + life, held));
        }
        pool.retain(|(until, _)| *until > now);
        if now >= next_child {
            children.push(
                Command::new(&loadgen)
                    .args(["paced", "--secs", "0.5", "--rate", "50"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting loadgen")?,
            );
            children.push(hostile_child().context("starting the hostile child")?);
            hostile += 1;
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            next_child += Duration::from_secs(1);
        }
        ops += 1;
        while let Ok(v) = rx.try_recv() {
            collect(&v, start, &mut health, &mut lost_total);
        }
        if now.duration_since(last_print) >= Duration::from_secs(60) {
            last_print = now;
            if let Some((t, h)) = health.last() {
                println!(
                    "  {:>5.0} s: rss {:.1} MiB, listeners open {}, lost {lost_total}, \
                     pool {}",
                    t,
                    mib(&h["portwatch"]["stats"]["rss_bytes"]),
                    h["portwatch"]["stats"]["listeners_open"],
                    pool.len()
                );
            }
        }
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    for mut c in children {
        let _ = c.wait();
    }
    let load_secs = start.elapsed().as_secs_f64();
    let held_open = pool.len();

    // Quiet now, with the pool still open: the next health report must match /proc.
    // Pool members expire only when the loop runs, so they are all still open here.
    thread::sleep(Duration::from_secs(2));
    let snap = Command::new(&agent_bin)
        .args(["snapshot", "--format", "json"])
        .stderr(Stdio::null())
        .output()
        .context("running portwatch snapshot")?;
    let reality = String::from_utf8_lossy(&snap.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"]["action"] == "listener-present")
        .count();
    let deadline = Instant::now() + Duration::from_secs(8);
    let before = health.len();
    while health.len() == before && Instant::now() < deadline {
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
            collect(&v, start, &mut health, &mut lost_total);
        }
    }
    drop(pool);
    // SAFETY: kill with a valid signal on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait()?;
    while let Ok(v) = rx.recv_timeout(Duration::from_millis(500)) {
        collect(&v, start, &mut health, &mut lost_total);
    }
    let (lines, longest) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread"))?;

    let (first_rss, last_rss, max_rss) = rss_span(&health);
    let table = health
        .iter()
        .rev()
        .find(|(t, _)| *t > load_secs)
        .map(|(_, h)| {
            h["portwatch"]["stats"]["listeners_open"]
                .as_u64()
                .unwrap_or(0)
        });
    println!("soak results ({load_secs:.0} s of load, {ops} ops in this process):");
    println!("  agent lines written        {lines}");
    println!(
        "  hostile children           {hostile} (one {HOSTILE_ARG_BYTES}-byte argument each); \
         longest line {longest} bytes"
    );
    println!("  events lost (reported)     {lost_total}");
    println!(
        "  RSS first / last / max     {:.1} / {:.1} / {:.1} MiB (health events every 5 s)",
        first_rss, last_rss, max_rss
    );
    println!(
        "  listeners: agent table {} vs /proc (portwatch snapshot) {reality}; {held_open} \
         soak listeners held open",
        table.map_or_else(|| "?".to_owned(), |n| n.to_string())
    );
    println!("  agent exit status          {status}");
    let flat = last_rss <= first_rss + 2.0;
    let matched = table == Some(reality as u64);
    let short = longest <= LINE_MAX;
    println!(
        "  verdict: RSS {}, table {}, loss {}, lines {}",
        if flat { "flat" } else { "GREW" },
        if matched { "matches" } else { "DIFFERS" },
        if lost_total == 0 { "none" } else { "SOME" },
        if short { "bounded" } else { "TOO LONG" }
    );
    if !(flat && matched && short && lost_total == 0 && status.success()) {
        bail!("soak failed (see the figures above)");
    }
    Ok(())
}

/// A process of user `nobody` with one huge non-UTF-8 argument that binds a UDP socket
/// on the wildcard address for 300 ms.
fn hostile_child() -> std::io::Result<std::process::Child> {
    use std::os::unix::{ffi::OsStringExt as _, process::CommandExt as _};
    Command::new("python3")
        .args([
            "-c",
            "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.bind(('0.0.0.0', 0)); time.sleep(0.3)",
        ])
        .arg(std::ffi::OsString::from_vec(vec![0xFF; HOSTILE_ARG_BYTES]))
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn collect(v: &Value, start: Instant, health: &mut Vec<(f64, Value)>, lost: &mut u64) {
    match v["event"]["action"].as_str() {
        Some("sensor-health") => health.push((start.elapsed().as_secs_f64(), v.clone())),
        Some("events-lost") => *lost += v["portwatch"]["lost"]["count"].as_u64().unwrap_or(0),
        _ => {}
    }
}

fn mib(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

/// RSS at the first report after a 30 s warm-up, at the last report, and the maximum.
fn rss_span(health: &[(f64, Value)]) -> (f64, f64, f64) {
    let rss = |h: &Value| mib(&h["portwatch"]["stats"]["rss_bytes"]);
    let first = health
        .iter()
        .find(|(t, _)| *t >= 30.0)
        .or(health.first())
        .map_or(0.0, |(_, h)| rss(h));
    let last = health.last().map_or(0.0, |(_, h)| rss(h));
    let max = health.iter().map(|(_, h)| rss(h)).fold(0.0, f64::max);
    (first, last, max)
}
