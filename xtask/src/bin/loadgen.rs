//! Load generator for `cargo xtask bench`: loopback only, bounded in time.
//!
//! Every workload forks `--procs` worker processes that start together (a shared
//! CLOCK_MONOTONIC instant), run for `--secs`, and report back through a pipe: their
//! pid, operation count, errors, and how many times each local port was handed out
//! (a 64 Ki counter array filled in memory, so the hot loop neither allocates nor writes
//! files). The parent prints one JSON summary on stdout and, with `--ports-out`, writes
//! `pid port count` lines so the bench can match captured events per pid and per
//! (pid, port): the kernel reuses ports across iterations, so ports are a multiset.
//!
//! Hot loops are raw libc system calls:
//! - `tcp-churn`:   socket + bind(127.0.0.1:0) + listen + getsockname + close
//! - `udp-churn`:   socket + bind(127.0.0.1:0) + getsockname + close
//! - `paced`:       the tcp-churn cycle at a fixed rate (absolute-time sleeps)
//! - `tcp-traffic`: one listener per process, then connect + accept + close (RST, so no
//!   TIME_WAIT piles up and the ephemeral range never runs dry)

use std::{
    fs::File,
    io::{BufWriter, Read as _, Write as _},
    mem,
    os::fd::FromRawFd as _,
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Loopback socket load for the portwatch benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// socket + bind(127.0.0.1:0) + listen + close, as fast as possible.
    TcpChurn(Common),
    /// socket(UDP) + bind(127.0.0.1:0) + close, as fast as possible.
    UdpChurn(Common),
    /// TCP listens at a fixed total rate.
    Paced {
        #[command(flatten)]
        common: Common,
        /// Listens per second (all processes together).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// One listener per process, then a loopback connect/accept/close loop.
    TcpTraffic(Common),
}

#[derive(Args, Clone)]
struct Common {
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    procs: u32,
    /// Seconds each worker runs.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Write `pid port count` lines here (ports handed out to listen/bind).
    #[arg(long)]
    ports_out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    TcpChurn,
    UdpChurn,
    Paced,
    TcpTraffic,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::TcpChurn => "tcp-churn",
            Kind::UdpChurn => "udp-churn",
            Kind::Paced => "paced",
            Kind::TcpTraffic => "tcp-traffic",
        }
    }
}

/// What one worker sends back.
struct WorkerResult {
    pid: u32,
    ops: u64,
    errors: u64,
    first_errno: i32,
    elapsed_ns: u64,
    /// Worst lateness against the paced schedule.
    late_max_ns: u64,
    /// Listens or binds that succeeded (tcp-traffic: its one listener).
    listens: u64,
    /// utime + stime of the worker (in-kernel BPF programs run in its context), ns.
    cpu_ns: u64,
    ports: Vec<(u16, u32)>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (kind, common, rate) = match cli.cmd {
        Cmd::TcpChurn(c) => (Kind::TcpChurn, c, 0),
        Cmd::UdpChurn(c) => (Kind::UdpChurn, c, 0),
        Cmd::Paced { common, rate } => (Kind::Paced, common, rate),
        Cmd::TcpTraffic(c) => (Kind::TcpTraffic, c, 0),
    };
    if common.procs == 0 || common.procs > 256 {
        bail!("--procs must be 1..=256");
    }
    if !(common.secs > 0.0 && common.secs <= 3600.0) {
        bail!("--secs must be in (0, 3600]");
    }
    if kind == Kind::Paced && rate == 0 {
        bail!("--rate must be > 0");
    }
    let secs_ns = (common.secs * 1e9) as u64;
    // Everyone starts at the same instant, a little after the last fork.
    let start_ns = monotonic_ns() + 20_000_000 + 2_000_000 * u64::from(common.procs);

    let mut kids = Vec::new();
    for _ in 0..common.procs {
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid 2-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe2: {}", std::io::Error::last_os_error());
        }
        // SAFETY: single-threaded here; the child only runs the worker and _exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: closing our copy of the read end.
            unsafe { libc::close(fds[0]) };
            let per_proc_rate = if kind == Kind::Paced {
                f64::from(rate) / f64::from(common.procs)
            } else {
                0.0
            };
            let res = worker(kind, start_ns, secs_ns, per_proc_rate);
            // SAFETY: the write end is ours; File closes it.
            let f = unsafe { File::from_raw_fd(fds[1]) };
            let _ = send(f, &res);
            // SAFETY: leave without running the parent's destructors or atexit hooks.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: the parent's copy of the write end.
        unsafe { libc::close(fds[1]) };
        kids.push((pid, fds[0]));
    }

    let mut results = Vec::new();
    for (pid, rfd) in kids {
        // SAFETY: the read end belongs to us.
        let mut f = unsafe { File::from_raw_fd(rfd) };
        let mut text = String::new();
        f.read_to_string(&mut text)
            .context("reading a worker's report")?;
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
            bail!("worker {pid} failed (status {st:#x})");
        }
        results.push(parse_report(&text).with_context(|| format!("worker {pid} report"))?);
    }

    if let Some(path) = &common.ports_out {
        let mut w = BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for r in &results {
            for (port, n) in &r.ports {
                writeln!(w, "{} {} {}", r.pid, port, n)?;
            }
        }
        w.flush()?;
    }

    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let listens: u64 = results.iter().map(|r| r.listens).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let ops_per_sec: f64 = results
        .iter()
        .map(|r| {
            if r.elapsed_ns > 0 {
                r.ops as f64 * 1e9 / r.elapsed_ns as f64
            } else {
                0.0
            }
        })
        .sum();
    let elapsed_s = results.iter().map(|r| r.elapsed_ns).max().unwrap_or(0) as f64 / 1e9;
    let cpu_s = results.iter().map(|r| r.cpu_ns).sum::<u64>() as f64 / 1e9;
    let first_errno = results
        .iter()
        .map(|r| r.first_errno)
        .find(|e| *e != 0)
        .unwrap_or(0);
    let summary = serde_json::json!({
        "workload": kind.name(),
        "procs": common.procs,
        "secs": common.secs,
        "rate": rate,
        "ops": ops,
        "listens": listens,
        "errors": errors,
        "first_error": if first_errno != 0 {
            std::io::Error::from_raw_os_error(first_errno).to_string()
        } else {
            String::new()
        },
        "ops_per_sec": ops_per_sec,
        "elapsed_s": elapsed_s,
        "cpu_s": cpu_s,
        "late_max_us": results.iter().map(|r| r.late_max_ns).max().unwrap_or(0) as f64 / 1e3,
        "workers": results.iter().map(|r| serde_json::json!({
            "pid": r.pid, "ops": r.ops, "listens": r.listens, "errors": r.errors,
            "elapsed_s": r.elapsed_ns as f64 / 1e9,
            "cpu_s": r.cpu_ns as f64 / 1e9,
        })).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

fn send(f: File, r: &WorkerResult) -> std::io::Result<()> {
    let mut w = BufWriter::new(f);
    writeln!(
        w,
        "{} {} {} {} {} {} {} {}",
        r.pid, r.ops, r.errors, r.first_errno, r.elapsed_ns, r.late_max_ns, r.listens, r.cpu_ns
    )?;
    for (port, n) in &r.ports {
        writeln!(w, "{port} {n}")?;
    }
    w.flush()
}

fn parse_report(text: &str) -> anyhow::Result<WorkerResult> {
    let mut lines = text.lines();
    let head: Vec<u64> = lines
        .next()
        .context("empty report")?
        .split_whitespace()
        .map(|t| t.parse::<i64>().map(|v| v as u64))
        .collect::<Result<_, _>>()?;
    if head.len() != 8 {
        bail!("bad report header");
    }
    let mut ports = Vec::new();
    for l in lines {
        let mut it = l.split_whitespace();
        let port: u16 = it.next().context("port")?.parse()?;
        let n: u32 = it.next().context("count")?.parse()?;
        ports.push((port, n));
    }
    Ok(WorkerResult {
        pid: head[0] as u32,
        ops: head[1],
        errors: head[2],
        first_errno: head[3] as i32,
        elapsed_ns: head[4],
        late_max_ns: head[5],
        listens: head[6],
        cpu_ns: head[7],
        ports,
    })
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// utime + stime of this process so far.
fn self_cpu_ns() -> u64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn sleep_until(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; EINTR just returns early and the callers re-check the clock.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn loopback_any_port() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = 0;
    sa.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    sa
}

const SA_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// The local port of `fd`, or 0.
fn local_port(fd: i32) -> u16 {
    // SAFETY: out-parameters sized for sockaddr_in.
    unsafe {
        let mut sa: libc::sockaddr_in = mem::zeroed();
        let mut len = SA_LEN;
        if libc::getsockname(fd, (&raw mut sa).cast(), &mut len) != 0 {
            return 0;
        }
        u16::from_be(sa.sin_port)
    }
}

/// One socket cycle. Returns the port on success, or the errno.
fn churn_once(ty: i32, listen: bool, addr: &libc::sockaddr_in) -> Result<u16, i32> {
    // SAFETY: plain socket system calls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        if libc::bind(fd, (addr as *const libc::sockaddr_in).cast(), SA_LEN) != 0 {
            let e = errno();
            libc::close(fd);
            return Err(e);
        }
        if listen && libc::listen(fd, 16) != 0 {
            let e = errno();
            libc::close(fd);
            return Err(e);
        }
        let port = local_port(fd);
        libc::close(fd);
        Ok(port)
    }
}

fn worker(kind: Kind, start_ns: u64, secs_ns: u64, rate: f64) -> WorkerResult {
    let mut counts = vec![0u32; 65536];
    let addr = loopback_any_port();
    let mut r = WorkerResult {
        pid: std::process::id(),
        ops: 0,
        errors: 0,
        first_errno: 0,
        elapsed_ns: 0,
        late_max_ns: 0,
        listens: 0,
        cpu_ns: 0,
        ports: Vec::new(),
    };
    let fail = |r: &mut WorkerResult, e: i32| {
        r.errors += 1;
        if r.first_errno == 0 {
            r.first_errno = e;
        }
    };

    // tcp-traffic: the one listener is opened before the clock starts.
    let mut listener = -1;
    let mut target = addr;
    if kind == Kind::TcpTraffic {
        // SAFETY: plain socket calls on descriptors we own.
        unsafe {
            listener = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if listener < 0
                || libc::bind(listener, (&raw const addr).cast(), SA_LEN) != 0
                || libc::listen(listener, 1024) != 0
            {
                fail(&mut r, errno());
                return r;
            }
        }
        let port = local_port(listener);
        counts[usize::from(port)] += 1;
        r.listens = 1;
        target.sin_port = port.to_be();
    }

    sleep_until(start_ns);
    let end_ns = start_ns + secs_ns;
    let mut now: u64;
    match kind {
        Kind::TcpChurn | Kind::UdpChurn => {
            let (ty, listen) = if kind == Kind::TcpChurn {
                (libc::SOCK_STREAM, true)
            } else {
                (libc::SOCK_DGRAM, false)
            };
            'outer: loop {
                for _ in 0..16 {
                    match churn_once(ty, listen, &addr) {
                        Ok(port) => {
                            r.ops += 1;
                            counts[usize::from(port)] += 1;
                        }
                        Err(e) => fail(&mut r, e),
                    }
                }
                now = monotonic_ns();
                if now >= end_ns {
                    break 'outer;
                }
            }
            r.listens = r.ops;
        }
        Kind::Paced => {
            let period = 1e9 / rate;
            let mut i: u64 = 0;
            loop {
                let due = start_ns + (i as f64 * period) as u64;
                if due >= end_ns {
                    break;
                }
                now = monotonic_ns();
                if now < due {
                    sleep_until(due);
                    now = monotonic_ns();
                }
                r.late_max_ns = r.late_max_ns.max(now.saturating_sub(due));
                match churn_once(libc::SOCK_STREAM, true, &addr) {
                    Ok(port) => {
                        r.ops += 1;
                        counts[usize::from(port)] += 1;
                    }
                    Err(e) => fail(&mut r, e),
                }
                i += 1;
            }
            now = monotonic_ns().max(end_ns);
            r.listens = r.ops;
        }
        Kind::TcpTraffic => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            'outer: loop {
                for _ in 0..8 {
                    // SAFETY: plain socket calls on descriptors we own and close.
                    unsafe {
                        let c =
                            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                        if c < 0 {
                            fail(&mut r, errno());
                            continue;
                        }
                        // Close with RST: no TIME_WAIT, the ephemeral range never fills.
                        libc::setsockopt(
                            c,
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&raw const linger).cast(),
                            mem::size_of::<libc::linger>() as libc::socklen_t,
                        );
                        if libc::connect(c, (&raw const target).cast(), SA_LEN) != 0 {
                            fail(&mut r, errno());
                            libc::close(c);
                            continue;
                        }
                        let a = libc::accept4(
                            listener,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        );
                        libc::close(c);
                        if a < 0 {
                            fail(&mut r, errno());
                            continue;
                        }
                        libc::close(a);
                        r.ops += 1;
                    }
                }
                now = monotonic_ns();
                if now >= end_ns {
                    break 'outer;
                }
            }
            // SAFETY: our listener.
            unsafe { libc::close(listener) };
        }
    }
    r.elapsed_ns = now.saturating_sub(start_ns);
    r.cpu_ns = self_cpu_ns();
    r.ports = counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| (p as u16, *n))
        .collect();
    r
}
