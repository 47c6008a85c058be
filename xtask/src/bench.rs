//! `cargo xtask bench`: figures for issue 5 (a program that prints figures, not a test).
//!
//! Each workload comes from `target/release/loadgen` (xtask/src/bin/loadgen.rs) and runs
//! under every tool in turn within a round, the order rotating from round to round:
//! no observer (`none`), portwatch, portwatch with folding off (`portwatch-nofold`),
//! do-nothing programs at portwatch's hooks (`floor`), bpftrace on the same tracepoint,
//! and `ss -Htuln` polled every 1 s and every 100 ms (both pollers in the same run).
//! Figures are medians over rounds; throughput ratios pair each run with the same round's
//! `none` run.
//!
//! `flood-evasion-tcp` and `-udp` (bench/flood.rs) flood on every core while the bench
//! opens 20 short-lived listeners on 0.0.0.0:11211: are they reported, is the alert
//! raised, how fast? Rows: portwatch to a file read like `tail -f`, portwatch to a slow
//! pipe, bpftrace, ss every 100 ms.
//!
//! In-kernel cost per program run is measured in a separate, shorter pass with BPF
//! run-time statistics on (they add two clock reads to every program run on the host,
//! which would bias the throughput ratios if they were on during the rounds).
//!
//! Results: target/bench/results.json (every run, plus the summary) and
//! target/bench/results.md (the tables, also printed). Agent and bpftrace stderr of each
//! run: target/bench/logs/.
//!
//! ```text
//! cargo xtask bench                  # 3 rounds, 5 s runs, agent output read live (~9 min)
//! cargo xtask bench --quick          # smoke run: 1 round, 2 s runs (~2 min)
//! cargo xtask bench --output null --ring-bytes 4194304
//! cargo xtask bench --workloads tcp-churn,paced --tools none,portwatch --rounds 5
//! cargo xtask bench --quick --workloads tcp-churn-1p,flood-evasion --no-kernel-cost
//! cargo xtask bench --quick --workloads delivery --no-kernel-cost   # TLS forward, RELP
//! ```
//!
//! `delivery-*` (bench/delivery.rs): the agent sending to a network destination (TLS
//! forward, RELP, RELP over TLS) that the bench receives and acknowledges in process:
//! delivered/s, latency to the acknowledgement, agent CPU per 1,000 events.
//!
//! `cargo xtask` is an unoptimised build; the bench re-executes itself from
//! target/release/xtask so that its reader of the agent's output (about 1 µs a line
//! optimised, 10 µs not) is never the bottleneck it is measuring.

mod agent;
mod delivery;
mod flood;
mod load;
mod peers;
mod report;
mod results;
mod util;

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use self::{
    load::{Kind, Workload},
    results::Run,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Agent writes to a pipe the bench reads (read latency measurable).
    Stdout,
    /// Agent appends to a file in the bench's scratch directory; parsed after each run.
    File,
    /// Agent writes to /dev/null: its cost without a consumer; nothing to count.
    Null,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Kernel ring buffer size for the agent (bytes, power of two); agent default if unset.
    #[arg(long)]
    pub ring_bytes: Option<u32>,
    /// Where the agent writes its events.
    #[arg(long, value_enum, default_value_t = OutputMode::Stdout)]
    pub output: OutputMode,
    /// Rounds (tools alternate within each round; figures are medians over rounds).
    #[arg(long, default_value_t = BenchArgs::DEFAULT_ROUNDS)]
    pub rounds: u32,
    /// Seconds per churn and traffic run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of the paced run (1,000 listens per second).
    #[arg(long, default_value_t = 10.0)]
    pub paced_secs: f64,
    /// Smoke run: 1 round, 2 s runs (paced included), 1 s kernel-cost pass.
    #[arg(long)]
    pub quick: bool,
    /// Only these workloads (comma-separated ids or prefixes, e.g. tcp-churn,paced,
    /// flood-evasion, delivery).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Only these tools (none, portwatch, portwatch-nofold, portwatch-rawtp, floor,
    /// floor-cgroup, floor-rawtp, bpftrace, ss; in flood-evasion: portwatch-file, portwatch-slow-pipe, bpftrace, ss; in
    /// delivery: forward-tls, relp, relp-tls).
    #[arg(long, value_delimiter = ',')]
    pub tools: Vec<String>,
    /// Skip the pass with BPF run-time statistics on.
    #[arg(long)]
    pub no_kernel_cost: bool,
    /// An earlier agent binary, run beside the one under test as the tool
    /// `portwatch-baseline` (same workloads, alternating within each round): an A/B of
    /// two builds in one run, which this machine's drift between runs allows no other way.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

impl BenchArgs {
    pub const DEFAULT_ROUNDS: u32 = 3;
}

/// The head of docs/BENCHMARKS.md, above the tables a full run writes.
const BENCH_PAGE_HEAD: &str = "# Benchmarks\n\n\
Written by `cargo xtask bench` (a full run: every workload and tool, default rounds).\n\
Machines of this kind differ in speed from one week to the next: compare only the ratios\n\
of one run, never absolute figures across runs. How to read the rows: README.md,\n\
\"Performance\".\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    None,
    Portwatch,
    /// portwatch with folding off (`--fold-above 0`): every start sent one by one.
    PortwatchNoFold,
    /// Do-nothing programs at portwatch's hooks: what the hooks alone cost.
    Floor,
    /// The floor's cgroup hooks alone, without the `STATE_CB` flag the sock_ops
    /// flavour sets on listeners: only when named in `--tools`.
    FloorCgroup,
    /// The floor of the stable set's tracepoint flavour (`--hooks floor-rawtp`): what
    /// the raw `inet_sock_set_state` tracepoint would cost, on TCP workloads.
    FloorRawtp,
    /// portwatch's tracepoint flavour (`--hooks stable-rawtp`): only when named in
    /// `--tools`.
    PortwatchRawtp,
    /// The agent given with `--baseline`, with portwatch's default options.
    PortwatchBaseline,
    Bpftrace,
    Ss,
    /// flood-evasion: portwatch writing to a file the bench follows like `tail -f`.
    PortwatchFile,
    /// flood-evasion: portwatch writing to a pipe read at 1 ms a line.
    PortwatchSlowPipe,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::None => "none",
            Tool::Portwatch => "portwatch",
            Tool::PortwatchNoFold => "portwatch-nofold",
            Tool::Floor => "floor",
            Tool::FloorCgroup => "floor-cgroup",
            Tool::FloorRawtp => "floor-rawtp",
            Tool::PortwatchRawtp => "portwatch-rawtp",
            Tool::PortwatchBaseline => "portwatch-baseline",
            Tool::Bpftrace => "bpftrace",
            Tool::Ss => "ss",
            Tool::PortwatchFile => "portwatch-file",
            Tool::PortwatchSlowPipe => "portwatch-slow-pipe",
        }
    }
}

pub struct Config {
    pub args: BenchArgs,
    pub rounds: u32,
    pub secs: f64,
    pub paced_secs: f64,
    pub kernel_secs: f64,
    pub cores: u32,
    pub out_dir: PathBuf,
}

struct Ctx {
    cfg: Config,
    loadgen: PathBuf,
    agent: PathBuf,
    /// `--baseline`'s agent (a private copy, as the agent under test).
    baseline: Option<PathBuf>,
    tmp: PathBuf,
    logs: PathBuf,
    have_bpftrace: bool,
    have_ss: bool,
    /// Consecutive start failures per tool: after two the tool is skipped.
    failures: [u32; 12],
    seq: u32,
}

/// Set when the bench has re-executed itself as an optimised build.
const RELEASE_ENV: &str = "PORTWATCH_BENCH_RELEASE";

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs: run as root");
    }
    if cfg!(debug_assertions) && std::env::var_os(RELEASE_ENV).is_none() {
        // `cargo xtask` builds without optimisations; unoptimised, the reader of the
        // agent's output would need ~10 µs a line and become the bottleneck it measures.
        step("re-running the bench from an optimised build of xtask");
        let root = crate::workspace_root();
        crate::status(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args(["build", "--release", "--quiet", "--package", "xtask"]),
        )?;
        let err = Command::new(root.join("target/release/xtask"))
            .args(std::env::args_os().skip(1))
            .env(RELEASE_ENV, "1")
            .exec();
        bail!("could not run target/release/xtask: {err}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (rounds, secs, paced_secs, kernel_secs) = if args.quick {
        (1, 2.0, 2.0, 1.0)
    } else {
        (
            args.rounds.max(1),
            args.duration,
            args.paced_secs,
            args.duration.min(2.0),
        )
    };
    if !(secs > 0.0 && paced_secs > 0.0) {
        bail!("--duration and --paced-secs must be positive");
    }
    let root = crate::workspace_root();
    let out_dir = root.join("target/bench");
    let cfg = Config {
        args: args.clone(),
        rounds,
        secs,
        paced_secs,
        kernel_secs,
        cores,
        out_dir,
    };
    let mut ctx = Ctx {
        loadgen: root.join("target/release/loadgen"),
        agent: crate::agent_binary(),
        baseline: None,
        // Private scratch space (the agent's copy, ports, events file), outside target/:
        // another bench, a `cargo clean` or a test run in the shared tree cannot pull it
        // away mid-run.
        tmp: std::env::temp_dir().join(format!("portwatch-bench-{}", std::process::id())),
        logs: cfg.out_dir.join("logs"),
        have_bpftrace: tool_works("bpftrace", "--version"),
        have_ss: tool_works("ss", "-V"),
        failures: [0; 12],
        seq: 0,
        cfg,
    };
    let _ = fs::remove_dir_all(&ctx.logs);
    fs::create_dir_all(&ctx.tmp)?;
    fs::create_dir_all(&ctx.logs)?;

    step("building the load generator (target/release/loadgen)");
    crate::build_loadgen()?;
    if !ctx.agent.exists() {
        bail!("{} is missing (cargo xtask build)", ctx.agent.display());
    }
    // Run a private copy: a rebuild of target/release/portwatch while the bench runs (the
    // workspace is shared) must not mix two builds in one set of figures.
    let copy = ctx.tmp.join("portwatch-under-test");
    fs::copy(&ctx.agent, &copy)
        .with_context(|| format!("copying {} to {}", ctx.agent.display(), copy.display()))?;
    let agent_info = format!(
        "{} ({} bytes, built {})",
        ctx.agent.display(),
        fs::metadata(&copy)?.len(),
        fs::metadata(&ctx.agent)
            .and_then(|m| m.modified())
            .map(report::rfc3339)
            .unwrap_or_default()
    );
    step(&format!("agent under test: a copy of {agent_info}"));
    ctx.agent = copy;
    if let Some(b) = &ctx.cfg.args.baseline {
        let copy = ctx.tmp.join("portwatch-baseline");
        fs::copy(b, &copy).with_context(|| {
            format!("--baseline: copying {} to {}", b.display(), copy.display())
        })?;
        step(&format!("baseline agent: a copy of {}", b.display()));
        ctx.baseline = Some(copy);
    }
    if !ctx.have_bpftrace {
        step("bpftrace not found: its rows are skipped");
    }
    if !ctx.have_ss {
        step("ss not found: its rows are skipped");
    }

    let workloads = workloads(&ctx.cfg);
    let d_workloads = delivery::workloads(&ctx.cfg);
    let d_dests = delivery::dests(&ctx.cfg);
    if workloads.is_empty() && d_workloads.is_empty() {
        bail!("--workloads matched nothing");
    }
    let certs = if d_workloads.is_empty() || d_dests.is_empty() {
        None
    } else {
        Some(delivery::Certs::make(&ctx.tmp.join("tls")).context("delivery rows: certificates")?)
    };
    if workloads.iter().any(|w| w.kind.is_flood()) {
        flood::check_port()?;
    }
    let load_start = util::loadavg();
    let est = estimate_secs(&ctx.cfg, &workloads)
        + f64::from(ctx.cfg.rounds)
            * d_workloads
                .iter()
                .map(|w| d_dests.len() as f64 * (w.secs + 3.0))
                .sum::<f64>();
    step(&format!(
        "{} workloads x tools, {} round(s), {} s per churn run; about {:.0} min",
        workloads.len() + d_workloads.len(),
        ctx.cfg.rounds,
        ctx.cfg.secs,
        est / 60.0
    ));

    let mut runs: Vec<Run> = Vec::new();
    let mut d_runs: Vec<delivery::DeliveryRun> = Vec::new();
    for round in 0..ctx.cfg.rounds {
        for w in &workloads {
            let mut tools = tools_for(&ctx, w);
            let n = tools.len().max(1);
            tools.rotate_left(round as usize % n);
            for tool in tools {
                let r = run_one(&mut ctx, w, tool, round, false);
                eprintln!("    {}", report::progress_line(&r));
                runs.push(r);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        if let Some(certs) = &certs {
            for w in &d_workloads {
                let mut dests = d_dests.clone();
                let n = dests.len();
                dests.rotate_left(round as usize % n);
                for dest in dests {
                    ctx.seq += 1;
                    let tag = format!("{:03}-{}-{}", ctx.seq, w.id.replace('/', "_"), dest.name());
                    let env = delivery::Env {
                        agent: &ctx.agent,
                        loadgen: &ctx.loadgen,
                        tmp: &ctx.tmp,
                        logs: &ctx.logs,
                        certs,
                        ring_bytes: ctx.cfg.args.ring_bytes,
                    };
                    let r = delivery::run_one(&env, w, dest, round, &tag);
                    eprintln!("    {}", delivery::progress_line(&r));
                    d_runs.push(r);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
    }

    let mut kernel_runs: Vec<Run> = Vec::new();
    if !ctx.cfg.args.no_kernel_cost && !workloads.is_empty() {
        step(&format!(
            "in-kernel cost pass: BPF run-time statistics on, {} s per run",
            ctx.cfg.kernel_secs
        ));
        match util::StatsGuard::enable() {
            Ok(guard) => {
                // Not flood-evasion: its figures are about the bench's own listeners.
                for w in workloads.iter().filter(|w| !w.kind.is_flood()) {
                    let w = w.with_secs(ctx.cfg.kernel_secs);
                    // --quick: portwatch only, to stay within a few minutes
                    // (portwatch-rawtp runs only when named). The floor's do-nothing
                    // programs give each hook's own cost: portwatch's work is the rest.
                    let tools: &[Tool] = if ctx.cfg.args.quick {
                        &[
                            Tool::Portwatch,
                            Tool::PortwatchBaseline,
                            Tool::PortwatchRawtp,
                            Tool::Floor,
                        ]
                    } else {
                        &[
                            Tool::Portwatch,
                            Tool::PortwatchBaseline,
                            Tool::PortwatchRawtp,
                            Tool::PortwatchNoFold,
                            Tool::Floor,
                            Tool::Bpftrace,
                        ]
                    };
                    for &tool in tools {
                        if !tools_for(&ctx, &w).contains(&tool) {
                            continue;
                        }
                        let r = run_one(&mut ctx, &w, tool, 0, true);
                        eprintln!("    {}", report::progress_line(&r));
                        kernel_runs.push(r);
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
                drop(guard);
            }
            Err(e) => step(&format!(
                "cannot enable BPF statistics ({e:#}): pass skipped"
            )),
        }
    }

    let meta = serde_json::json!({
        "date": report::rfc3339_now(),
        "agent": agent_info,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cores": ctx.cfg.cores,
        "rounds": ctx.cfg.rounds,
        "secs": ctx.cfg.secs,
        "paced_secs": ctx.cfg.paced_secs,
        "kernel_cost_secs": ctx.cfg.kernel_secs,
        "agent_output": ctx.cfg.args.output,
        "ring_bytes": ctx.cfg.args.ring_bytes,
        "loadavg_start": load_start,
        "loadavg_end": util::loadavg(),
        "wall_s": t0.elapsed().as_secs_f64(),
        "args": &ctx.cfg.args,
    });
    let rep = report::build(&ctx.cfg, &workloads, &runs, &kernel_runs);
    let mut md = report::markdown(&ctx.cfg, &meta, &rep);
    if certs.is_some() {
        md.push('\n');
        md.push_str(&delivery::markdown(&d_runs, &d_workloads, &d_dests));
    }
    let json = serde_json::json!({
        "meta": meta,
        "workloads": workloads,
        "summary": rep.rows,
        "kernel_cost": rep.kernel,
        "targets": rep.targets,
        "runs": runs,
        "kernel_cost_runs": kernel_runs,
        "delivery_workloads": d_workloads,
        "delivery_runs": d_runs,
    });
    let jpath = ctx.cfg.out_dir.join("results.json");
    let mpath = ctx.cfg.out_dir.join("results.md");
    fs::write(&jpath, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", jpath.display()))?;
    fs::write(&mpath, &md).with_context(|| format!("writing {}", mpath.display()))?;
    // The full run (every workload and tool, default rounds and durations) is the
    // project's benchmark page; partial and quick runs stay in target/bench only.
    let a = &ctx.cfg.args;
    let full = !a.quick
        && a.workloads.is_empty()
        && a.tools.is_empty()
        && !a.no_kernel_cost
        && a.rounds == BenchArgs::DEFAULT_ROUNDS;
    if full {
        let page = crate::workspace_root().join("docs/BENCHMARKS.md");
        fs::write(&page, format!("{BENCH_PAGE_HEAD}\n{md}"))
            .with_context(|| format!("writing {}", page.display()))?;
        step(&format!("wrote {}", page.display()));
    }
    let _ = fs::remove_dir_all(&ctx.tmp);
    println!("{md}");
    step(&format!(
        "bench done in {:.1} min: {} and {}",
        t0.elapsed().as_secs_f64() / 60.0,
        jpath.display(),
        mpath.display()
    ));
    Ok(())
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn tool_works(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn workloads(cfg: &Config) -> Vec<Workload> {
    let n = cfg.cores;
    let mut v = Vec::new();
    let mut procs = vec![1];
    if n > 1 {
        procs.push(n);
    }
    for (kind, name, what) in [
        (
            Kind::TcpChurn,
            "tcp-churn",
            "socket+bind(127.0.0.1:0)+listen+close, flat out",
        ),
        (
            Kind::UdpChurn,
            "udp-churn",
            "socket(UDP)+bind(127.0.0.1:0)+close, flat out",
        ),
    ] {
        for &p in &procs {
            v.push(Workload {
                id: format!("{name}-{p}p"),
                kind,
                procs: p,
                secs: cfg.secs,
                rate: 0,
                what: format!("{what}, {p} process(es)"),
            });
        }
    }
    v.push(Workload {
        id: "paced-1000/s".into(),
        kind: Kind::Paced,
        procs: 1,
        secs: cfg.paced_secs,
        rate: 1000,
        what: "1,000 TCP listens per second (latency)".into(),
    });
    v.push(Workload {
        id: format!("tcp-traffic-{n}p"),
        kind: Kind::TcpTraffic,
        procs: n,
        secs: cfg.secs,
        rate: 0,
        what: format!(
            "loopback connect+accept+close (RST), one listener per process, {n} process(es)"
        ),
    });
    for (kind, id, what) in [
        (Kind::FloodTcp, "flood-evasion-tcp", "TCP churn"),
        (Kind::FloodUdp, "flood-evasion-udp", "UDP churn"),
    ] {
        v.push(Workload {
            id: id.into(),
            kind,
            procs: n,
            secs: cfg.secs.max(flood::MIN_FLOOD_SECS),
            rate: 0,
            what: format!(
                "{what} on every core ({n} processes) while the bench opens {} listeners \
                 on 0.0.0.0:{}, 50 ms each, 100-200 ms apart",
                flood::K,
                flood::PORT
            ),
        });
    }
    let filter = &cfg.args.workloads;
    v.retain(|w| filter.is_empty() || filter.iter().any(|f| w.id.starts_with(f.as_str())));
    v
}

fn tools_for(ctx: &Ctx, w: &Workload) -> Vec<Tool> {
    let mut t = if w.kind.is_flood() {
        vec![
            Tool::PortwatchFile,
            Tool::PortwatchSlowPipe,
            Tool::Bpftrace,
            Tool::Ss,
        ]
    } else {
        vec![
            Tool::None,
            Tool::Portwatch,
            Tool::PortwatchBaseline,
            Tool::PortwatchNoFold,
            Tool::Floor,
            Tool::FloorCgroup,
            Tool::FloorRawtp,
            Tool::PortwatchRawtp,
            Tool::Bpftrace,
            Tool::Ss,
        ]
    };
    if w.kind == Kind::Paced {
        // Fixed rate: nothing to compare throughput with; latency and capture only (a
        // paced stream is under any budget: folding changes nothing there).
        t.retain(|t| {
            !matches!(
                t,
                Tool::None
                    | Tool::Floor
                    | Tool::FloorCgroup
                    | Tool::FloorRawtp
                    | Tool::PortwatchNoFold
            )
        });
    }
    if !matches!(w.kind, Kind::TcpChurn | Kind::TcpTraffic) {
        // The tracepoint and the STATE_CB flag concern TCP only.
        t.retain(|t| !matches!(t, Tool::FloorCgroup | Tool::FloorRawtp));
    }
    if w.kind == Kind::TcpTraffic {
        // Six listeners in all: folding changes nothing there.
        t.retain(|t| *t != Tool::PortwatchNoFold);
    }
    if ctx.baseline.is_none() {
        t.retain(|t| *t != Tool::PortwatchBaseline);
    }
    if !ctx.have_bpftrace {
        t.retain(|t| *t != Tool::Bpftrace);
    }
    if !ctx.have_ss {
        t.retain(|t| *t != Tool::Ss);
    }
    let f = &ctx.cfg.args.tools;
    let named = |t: &Tool| f.iter().any(|n| n == t.name());
    // portwatch-rawtp and floor-cgroup run only when asked for by name.
    t.retain(|t| {
        named(t)
            || *t == Tool::PortwatchBaseline
            || (f.is_empty() && !matches!(t, Tool::PortwatchRawtp | Tool::FloorCgroup))
    });
    t
}

fn estimate_secs(cfg: &Config, ws: &[Workload]) -> f64 {
    let per_round: f64 = ws
        .iter()
        .map(|w| {
            // Tools, and seconds each beyond the load (the floor's self-check takes 3 s).
            let (n, extra) = match w.kind {
                Kind::Paced => (3.0, 1.5),
                Kind::TcpTraffic => (6.0, 2.1),
                Kind::TcpChurn => (7.0, 2.0),
                k if k.is_flood() => (4.0, 2.5),
                _ => (6.0, 2.0),
            };
            n * (w.secs + extra)
        })
        .sum();
    let kernel = if cfg.args.no_kernel_cost {
        0.0
    } else {
        let tools = if cfg.args.quick { 2.0 } else { 4.0 };
        ws.iter().filter(|w| !w.kind.is_flood()).count() as f64 * tools * (cfg.kernel_secs + 2.0)
    };
    per_round * f64::from(cfg.rounds) + kernel
}

fn tool_index(t: Tool) -> usize {
    match t {
        Tool::None => 0,
        Tool::Portwatch => 1,
        Tool::PortwatchNoFold => 2,
        Tool::Floor => 3,
        Tool::Bpftrace => 4,
        Tool::Ss => 5,
        Tool::PortwatchFile => 6,
        Tool::PortwatchSlowPipe => 7,
        Tool::FloorCgroup => 8,
        Tool::FloorRawtp => 9,
        Tool::PortwatchRawtp => 10,
        Tool::PortwatchBaseline => 11,
    }
}

fn run_one(ctx: &mut Ctx, w: &Workload, tool: Tool, round: u32, kernel_stats: bool) -> Run {
    ctx.seq += 1;
    let mut run = Run {
        round: round + 1,
        workload: w.id.clone(),
        tool: tool.name().into(),
        kernel_stats,
        error: None,
        load: None,
        observers: Vec::new(),
        other_cpu_s: None,
    };
    let ti = tool_index(tool);
    if ctx.failures[ti] >= 2 {
        run.error = Some(format!("skipped: {} failed to start twice", tool.name()));
        return run;
    }
    let tag = format!("{:03}-{}-{}", ctx.seq, w.id.replace('/', "_"), tool.name());
    let (loadgen, tmp) = (ctx.loadgen.clone(), ctx.tmp.clone());
    let do_load = || load::run(&loadgen, &tmp, w);
    let log_file = ctx.logs.join(format!("{tag}.stderr"));
    let events_file = tmp.join("agent-events.jsonl");
    let env = flood::Env {
        loadgen: &loadgen,
        tmp: &tmp,
        agent: &ctx.agent,
        log_file: &log_file,
        events_file: &events_file,
        ring_bytes: ctx.cfg.args.ring_bytes,
    };
    let res: anyhow::Result<()> = (|| {
        if w.kind.is_flood() {
            let (l, obs) = match tool {
                Tool::PortwatchFile => flood::run_portwatch(&env, w, tool.name(), false)?,
                Tool::PortwatchSlowPipe => flood::run_portwatch(&env, w, tool.name(), true)?,
                Tool::Bpftrace => flood::run_bpftrace(&env, w)?,
                Tool::Ss => flood::run_ss(&env, w)?,
                _ => bail!("{} has no flood-evasion row", tool.name()),
            };
            run.load = Some(l);
            run.observers.push(obs);
            return Ok(());
        }
        match tool {
            Tool::None => run.load = Some(do_load()?),
            Tool::Portwatch
            | Tool::PortwatchNoFold
            | Tool::PortwatchRawtp
            | Tool::PortwatchBaseline
            | Tool::Floor
            | Tool::FloorCgroup
            | Tool::FloorRawtp => {
                let extra: &[&str] = match tool {
                    Tool::PortwatchNoFold => &["--fold-above", "0"],
                    Tool::PortwatchRawtp => &["--hooks", "stable-rawtp"],
                    Tool::FloorRawtp => &["--hooks", "floor-rawtp", "--allow-degraded"],
                    Tool::Floor => &["--hooks", "floor", "--allow-degraded"],
                    Tool::FloorCgroup => &["--hooks", "floor-cgroup", "--allow-degraded"],
                    _ => &[],
                };
                let bin = match (tool, &ctx.baseline) {
                    (Tool::PortwatchBaseline, Some(b)) => b,
                    _ => &ctx.agent,
                };
                let o = agent::AgentOpts {
                    bin,
                    mode: ctx.cfg.args.output,
                    ring_bytes: ctx.cfg.args.ring_bytes,
                    events_file: events_file.clone(),
                    log_file: ctx.logs.join(format!("{tag}.stderr")),
                    kernel_stats,
                    extra,
                    name: tool.name(),
                    reader: agent::Reader::Fast,
                };
                let (l, obs) = agent::run(&o, w.kind, do_load)?;
                run.load = Some(l);
                run.observers.push(obs);
            }
            Tool::Bpftrace => {
                let o = peers::BtOpts {
                    log_file: ctx.logs.join(format!("{tag}.stderr")),
                    kernel_stats,
                };
                let (l, obs) = peers::run_bpftrace(&o, w.kind, do_load)?;
                run.load = Some(l);
                run.observers.push(obs);
            }
            Tool::PortwatchFile | Tool::PortwatchSlowPipe => {
                bail!("{} runs only in flood-evasion", tool.name())
            }
            Tool::Ss => {
                let ivs = [Duration::from_secs(1), Duration::from_millis(100)];
                let (l, obs) = peers::run_ss(&ivs, w.kind, do_load)?;
                run.load = Some(l);
                run.observers = obs;
            }
        }
        Ok(())
    })();
    run.set_other_cpu();
    match res {
        Ok(()) => ctx.failures[ti] = 0,
        Err(e) => {
            // Only a tool that never got going counts towards skipping it.
            if run.load.is_none() {
                ctx.failures[ti] += 1;
            }
            run.error = Some(format!("{e:#}"));
        }
    }
    // File mode: the agent appends, so every run starts from no file.
    let _ = fs::remove_file(ctx.tmp.join("agent-events.jsonl"));
    run
}
