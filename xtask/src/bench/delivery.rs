//! Delivery rows: the agent sending to a network destination that confirms what it got.
//!
//! Destinations (the `--tools` names): `forward-tls` (JSON lines over TLS, `--forward
//! tls:`), `relp` (`--relp HOST:PORT`) and `relp-tls` (`--relp tls:`). The receiver is
//! the bench's own, in process, not rsyslog: rsyslog writing every message to a file on
//! these two shared cores would be the bottleneck the rows mean to measure, and its
//! acknowledgement time cannot be seen from outside. The receiver answers each RELP
//! `syslog` frame with `200 OK` as soon as it has parsed it (what imrelp does before its
//! queue), with rustls on the server side for TLS and a certificate the bench makes with
//! `openssl`; the agent verifies it against that CA (`--tls-ca`).
//!
//! Per run: delivered/s (the load's events, starts and stops, that the receiver
//! acknowledged, over the time from the load's start to the last acknowledgement, so a
//! backlog drained after the load counts against it), latency from the event's kernel
//! time to its acknowledgement (RELP) or its receipt (`forward-tls`: the protocol has no
//! acknowledgement), and the agent's CPU per 1,000 events delivered (utime+stime from the
//! load's start until the agent is idle again, as in the other rows).
//!
//! Workloads: `delivery-paced-1000/s` (1,000 listens a second, 2,000 events: latency at
//! a steady rate) and `delivery-churn-1p` (one process flat out, folding off so every
//! start and stop is sent one by one: the most the destination path takes).

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    Config, OutputMode,
    agent::{self, AgentOpts, AgentRun, Collected, Reader, Scanner},
    load::{self, Kind, Load, Workload},
    results::Observer,
    util::{self, median},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Dest {
    ForwardTls,
    Relp,
    RelpTls,
}

impl Dest {
    pub const ALL: [Dest; 3] = [Dest::ForwardTls, Dest::Relp, Dest::RelpTls];

    pub fn name(self) -> &'static str {
        match self {
            Dest::ForwardTls => "forward-tls",
            Dest::Relp => "relp",
            Dest::RelpTls => "relp-tls",
        }
    }

    fn tls(self) -> bool {
        self != Dest::Relp
    }

    fn relp(self) -> bool {
        self != Dest::ForwardTls
    }
}

/// The delivery workloads `--workloads` selects (prefix match, like the others).
pub fn workloads(cfg: &Config) -> Vec<Workload> {
    let mut v = vec![
        Workload {
            id: "delivery-paced-1000/s".into(),
            kind: Kind::Paced,
            procs: 1,
            secs: cfg.paced_secs,
            rate: 1000,
            what: "1,000 TCP listens per second, the agent sending to a network destination".into(),
        },
        Workload {
            id: "delivery-churn-1p".into(),
            kind: Kind::TcpChurn,
            procs: 1,
            secs: cfg.secs,
            rate: 0,
            what: "TCP churn flat out, 1 process, folding off: every event to a network \
                   destination"
                .into(),
        },
    ];
    let filter = &cfg.args.workloads;
    v.retain(|w| filter.is_empty() || filter.iter().any(|f| w.id.starts_with(f.as_str())));
    v
}

/// The destinations `--tools` selects.
pub fn dests(cfg: &Config) -> Vec<Dest> {
    let f = &cfg.args.tools;
    Dest::ALL
        .into_iter()
        .filter(|d| f.is_empty() || f.iter().any(|n| n == d.name()))
        .collect()
}

#[derive(Serialize, Clone, Debug)]
pub struct DeliveryRun {
    pub round: u32,
    pub workload: String,
    pub dest: &'static str,
    pub error: Option<String>,
    pub load: Option<Load>,
    /// The agent as the other rows score it: capture of the load's events at the
    /// receiver, its own loss reports, CPU; `lat_read` is the latency to acknowledgement
    /// (to receipt for forward-tls).
    pub observer: Option<Observer>,
    /// The load's events (starts and stops) the receiver acknowledged or received.
    pub delivered: u64,
    /// delivered / (last acknowledgement − the load's start), events per second.
    pub delivered_per_s: Option<f64>,
    /// Connections the agent made to the receiver (more than one: it reconnected).
    pub connections: u64,
}

/// A certificate authority and a server certificate for `localhost` it signed, made with
/// the `openssl` command in `dir`.
pub struct Certs {
    pub ca: PathBuf,
    config: Arc<rustls::ServerConfig>,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Certs {
    pub fn make(dir: &Path) -> anyhow::Result<Certs> {
        fs::create_dir_all(dir)?;
        let ec = "ec_paramgen_curve:P-256";
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                ec,
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=portwatch bench CA",
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                ec,
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        )?;
        fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        )?;
        use pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Certs {
            ca: dir.join("ca.pem"),
            config: Arc::new(config),
        })
    }
}

/// What the receiver gathered, shared by its connection threads.
struct Shared {
    sc: Scanner,
    col: Collected,
}

/// A connection's thread: Err says why it ended badly.
type Conn = JoinHandle<Result<(), String>>;

struct Receiver {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    lines: Arc<AtomicU64>,
    started: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<Vec<Conn>>>,
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

impl Receiver {
    fn start(dest: Dest, certs: &Certs) -> anyhow::Result<Receiver> {
        let l = TcpListener::bind("127.0.0.1:0").context("receiver: binding 127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let shared = Arc::new(Mutex::new(Shared {
            sc: Scanner::new(),
            col: Collected::default(),
        }));
        let (lines, started, connections, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let tls = dest.tls().then(|| certs.config.clone());
        let accept = {
            let (shared, lines, started, connections, stop) = (
                shared.clone(),
                lines.clone(),
                started.clone(),
                connections.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                let mut conns = Vec::new();
                for s in l.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(tcp) = s else { continue };
                    connections.fetch_add(1, Ordering::Relaxed);
                    let (shared, lines, started, tls) =
                        (shared.clone(), lines.clone(), started.clone(), tls.clone());
                    conns.push(thread::spawn(move || {
                        util::reader_priority();
                        let _ = tcp.set_nodelay(true);
                        let stream: Box<dyn Stream> = match tls {
                            Some(cfg) => {
                                let conn = rustls::ServerConnection::new(cfg)
                                    .map_err(|e| format!("TLS: {e}"))?;
                                Box::new(rustls::StreamOwned::new(conn, tcp))
                            }
                            None => Box::new(tcp),
                        };
                        serve(stream, dest.relp(), &shared, &lines, &started)
                    }));
                }
                conns
            })
        };
        Ok(Receiver {
            port,
            shared,
            lines,
            started,
            connections,
            stop,
            accept: Some(accept),
        })
    }

    /// Once the agent has exited (its connections are closed): stop accepting, wait for
    /// the connection threads, and hand over what was received.
    fn finish(mut self) -> (Collected, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let mut errors = Vec::new();
        if let Some(a) = self.accept.take()
            && let Ok(conns) = a.join()
        {
            for c in conns {
                match c.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push("receiver thread panicked".into()),
                }
            }
        }
        let mut sh = self.shared.lock().expect("receiver state");
        (std::mem::take(&mut sh.col), errors)
    }
}

/// One connection: JSON lines (forward) or RELP frames, until the agent closes it. RELP
/// frames are acknowledged per read, all the frames of a read in one write; each
/// event's time is taken once its acknowledgement is written.
fn serve(
    mut s: Box<dyn Stream>,
    relp: bool,
    shared: &Mutex<Shared>,
    lines: &AtomicU64,
    started: &AtomicBool,
) -> Result<(), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 256 << 10];
    let mut acks = Vec::new();
    let mut events: Vec<(usize, usize)> = Vec::new();
    let json_start = memchr::memmem::Finder::new(b"{\"@timestamp\"");
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // The agent stopping (SIGTERM) may cut a TLS session without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("receiver: reading: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
        events.clear();
        acks.clear();
        let mut at = 0;
        let mut closed = false;
        if relp {
            while let Some((txnr, cmd, data, used)) = relp_frame(&buf[at..])? {
                let (d0, d1) = (at + data.0, at + data.1);
                match cmd {
                    "open" => {
                        let offer = "200 OK\nrelp_version=0\nrelp_software=portwatch-bench\n\
                                     commands=syslog";
                        let _ = writeln!(acks, "{txnr} rsp {} {offer}", offer.len());
                    }
                    "syslog" => {
                        let _ = writeln!(acks, "{txnr} rsp 6 200 OK");
                        match json_start.find(&buf[d0..d1]) {
                            Some(j) => events.push((d0 + j, d1)),
                            None => return Err("receiver: a syslog frame without JSON".into()),
                        }
                    }
                    "close" => {
                        let _ = writeln!(acks, "{txnr} rsp 0");
                        closed = true;
                    }
                    other => return Err(format!("receiver: unexpected RELP command {other}")),
                }
                at += used;
            }
            if !acks.is_empty() {
                s.write_all(&acks)
                    .and_then(|()| s.flush())
                    .map_err(|e| format!("receiver: acknowledging: {e}"))?;
            }
        } else {
            while let Some(nl) = memchr::memchr(b'\n', &buf[at..]) {
                events.push((at, at + nl));
                at += nl + 1;
            }
        }
        let done_ns = util::realtime_ns();
        {
            let mut sh = shared.lock().map_err(|_| "receiver state poisoned")?;
            let Shared { sc, col } = &mut *sh;
            for &(a, b) in &events {
                sc.line(&buf[a..b], done_ns, col);
            }
            lines.store(col.lines, Ordering::Relaxed);
            if col.started {
                started.store(true, Ordering::Release);
            }
        }
        buf.drain(..at);
        if closed {
            return Ok(());
        }
    }
}

/// The RELP frame at the start of `b`: (txnr, command, data range, bytes used), None
/// when incomplete. `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
type RelpFrame<'a> = (u32, &'a str, (usize, usize), usize);

fn relp_frame(b: &[u8]) -> Result<Option<RelpFrame<'_>>, String> {
    let bad = || {
        format!(
            "receiver: bad RELP frame: {:?}",
            String::from_utf8_lossy(&b[..b.len().min(60)])
        )
    };
    let Some(sp1) = memchr::memchr(b' ', b) else {
        return if b.len() > 9 { Err(bad()) } else { Ok(None) };
    };
    let Some(sp2) = memchr::memchr(b' ', &b[sp1 + 1..]).map(|i| sp1 + 1 + i) else {
        return if b.len() > 50 { Err(bad()) } else { Ok(None) };
    };
    let txnr: u32 = std::str::from_utf8(&b[..sp1])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let cmd = std::str::from_utf8(&b[sp1 + 1..sp2]).map_err(|_| bad())?;
    let rest = &b[sp2 + 1..];
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == rest.len() {
        return Ok(None);
    }
    let len: usize = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let d0 = sp2 + 1 + digits + usize::from(len > 0);
    let end = d0 + len;
    if b.len() <= end {
        return Ok(None);
    }
    if b[end] != b'\n' || (len > 0 && b[d0 - 1] != b' ') {
        return Err(bad());
    }
    Ok(Some((txnr, cmd, (d0, end), end + 1)))
}

pub struct Env<'a> {
    pub agent: &'a Path,
    pub loadgen: &'a Path,
    pub tmp: &'a Path,
    pub logs: &'a Path,
    pub certs: &'a Certs,
    pub ring_bytes: Option<u32>,
}

pub fn run_one(env: &Env<'_>, w: &Workload, dest: Dest, round: u32, tag: &str) -> DeliveryRun {
    let mut run = DeliveryRun {
        round: round + 1,
        workload: w.id.clone(),
        dest: dest.name(),
        error: None,
        load: None,
        observer: None,
        delivered: 0,
        delivered_per_s: None,
        connections: 0,
    };
    if let Err(e) = measure(env, w, dest, tag, &mut run) {
        run.error = Some(format!("{e:#}"));
    }
    run
}

fn measure(
    env: &Env<'_>,
    w: &Workload,
    dest: Dest,
    tag: &str,
    run: &mut DeliveryRun,
) -> anyhow::Result<()> {
    let rx = Receiver::start(dest, env.certs)?;
    let spool = env.tmp.join(format!("spool-{tag}"));
    let _ = fs::remove_dir_all(&spool);
    let log_file = env.logs.join(format!("{tag}.stderr"));
    let mut cmd = Command::new(env.agent);
    cmd.args(["watch", "--format", "json", "--no-snapshot"])
        .arg("--spool-dir")
        .arg(&spool);
    if let Some(r) = env.ring_bytes {
        cmd.args(["--ring-bytes", &r.to_string()]);
    }
    if w.kind == Kind::TcpChurn {
        cmd.args(["--fold-above", "0"]);
    }
    let ca = env.certs.ca.display().to_string();
    match dest {
        Dest::ForwardTls => cmd.args(["--forward", &format!("tls:localhost:{}", rx.port)]),
        Dest::Relp => cmd.args(["--relp", &format!("127.0.0.1:{}", rx.port)]),
        Dest::RelpTls => cmd.args(["--relp", &format!("tls:localhost:{}", rx.port)]),
    };
    if dest.tls() {
        cmd.args(["--tls-ca", &ca]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log_file)?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", env.agent.display()))?;
    let pid = child.id();
    let t = Instant::now();
    while !rx.started.load(Ordering::Acquire) {
        if let Some(st) = child.try_wait()? {
            bail!(
                "portwatch exited before its sensor-started reached the receiver ({st}): {}",
                util::read_tail(&log_file, 600)
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "sensor-started did not reach the receiver within 30 s: {}",
                util::read_tail(&log_file, 600)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut notes = Vec::new();
    let cpu0 = util::cpu_seconds(pid);
    let load_start_ns = util::realtime_ns();
    let load = load::run(env.loadgen, env.tmp, w);
    // Drained: nothing more arrives and the agent is idle (the spool's replay included).
    if !agent::wait_idle(pid, Some(&rx.lines), Duration::from_secs(60)) {
        notes.push("agent still sending 60 s after the load ended".into());
    }
    let cpu1 = util::cpu_seconds(pid);
    let hwm = util::vm_hwm_kib(pid);
    let st = agent::stop(&mut child, libc::SIGTERM, Duration::from_secs(20));
    let connections = rx.connections.load(Ordering::Relaxed);
    let (col, errors) = rx.finish();
    let load = load?;
    let st = st?;
    if !st.success() {
        notes.push(format!("portwatch exited with {st} after SIGTERM"));
    }
    notes.extend(errors);
    let tail = util::read_tail(&log_file, 300);
    if !tail.is_empty() {
        notes.push(format!("stderr: {tail}"));
    }
    let ours: std::collections::HashSet<u32> = load.pids.iter().copied().collect();
    let mut last_ns = 0;
    let mut delivered = 0u64;
    for r in &col.recs {
        if ours.contains(&r.pid)
            && matches!(
                r.action,
                agent::Action::ListenStarted | agent::Action::ListenStopped
            )
        {
            delivered += 1;
            last_ns = last_ns.max(r.recv_ns);
        }
    }
    run.delivered = delivered;
    run.connections = connections;
    run.delivered_per_s = (last_ns > load_start_ns)
        .then(|| delivered as f64 / ((last_ns - load_start_ns) as f64 / 1e9));
    let opts = AgentOpts {
        bin: env.agent,
        mode: OutputMode::Stdout,
        ring_bytes: env.ring_bytes,
        events_file: PathBuf::new(),
        log_file,
        kernel_stats: false,
        extra: &[],
        name: dest.name(),
        reader: Reader::Fast,
    };
    let (load, obs) = agent::observe(
        &opts,
        w.kind,
        AgentRun {
            load,
            col,
            notes,
            cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
            peak_rss_kib: hwm,
            progs: Vec::new(),
        },
    );
    run.load = Some(load);
    run.observer = Some(obs);
    Ok(())
}

pub fn progress_line(r: &DeliveryRun) -> String {
    match (&r.error, &r.observer) {
        (Some(e), _) => format!("{} {}: error: {e}", r.workload, r.dest),
        (None, Some(o)) => format!(
            "{} {}: {} delivered, {} events/s, ack p50 {} p99 {}, {} ms CPU per 1k events",
            r.workload,
            r.dest,
            r.delivered,
            r.delivered_per_s
                .map_or("n/a".into(), |x| format!("{x:.0}")),
            o.lat_read
                .map_or("n/a".into(), |p| format!("{:.0} µs", p.p50_us)),
            o.lat_read
                .map_or("n/a".into(), |p| format!("{:.0} µs", p.p99_us)),
            o.cpu_ms_per_1k_events
                .map_or("n/a".into(), |x| format!("{x:.1}")),
        ),
        (None, None) => format!("{} {}: no result", r.workload, r.dest),
    }
}

/// The delivery table: medians over rounds per workload and destination.
pub fn markdown(runs: &[DeliveryRun], workloads: &[Workload], dests: &[Dest]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "## Delivery to a network destination\n");
    let _ = writeln!(
        s,
        "The agent sends to the bench's in-process receiver (not rsyslog, which would be \
         the bottleneck here): forward-tls = `--forward tls:` (JSON lines; no \
         acknowledgement in that protocol, so latency is to receipt), relp = `--relp` and \
         relp-tls = `--relp tls:` (each `syslog` frame answered `200 OK` once parsed; \
         latency is to that acknowledgement). Delivered: the load's starts and stops that \
         arrived, of those generated (lost: the agent's own `events-lost` counts). \
         Delivered/s: over the time from the load's start to the last one delivered. \
         Latency: acknowledgement (receipt) − the event's kernel time. CPU: the agent's \
         utime+stime until it was idle again, per 1,000 events delivered. Medians over \
         rounds.\n"
    );
    let _ = writeln!(
        s,
        "| workload | destination | generated | delivered | lost | delivered/s | latency p50 / p99 / max | CPU ms / 1k ev | peak RSS | notes |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
    for w in workloads {
        for d in dests {
            let rs: Vec<&DeliveryRun> = runs
                .iter()
                .filter(|r| r.workload == w.id && r.dest == d.name())
                .collect();
            let ok: Vec<(&DeliveryRun, &Observer)> = rs
                .iter()
                .filter_map(|r| r.observer.as_ref().map(|o| (*r, o)))
                .collect();
            let med = |f: &dyn Fn(&DeliveryRun, &Observer) -> Option<f64>| {
                median(&ok.iter().filter_map(|(r, o)| f(r, o)).collect::<Vec<_>>())
            };
            let num = |x: Option<f64>, p: usize| x.map_or("n/a".into(), |x| format!("{x:.p$}"));
            let generated: u64 = ok
                .iter()
                .filter_map(|(r, _)| r.load.as_ref().map(|l| 2 * l.listens))
                .sum();
            let delivered: u64 = ok.iter().map(|(r, _)| r.delivered).sum();
            let lost: u64 = ok.iter().filter_map(|(_, o)| o.lost).sum();
            let mut notes: Vec<String> = rs.iter().filter_map(|r| r.error.clone()).collect();
            notes.extend(
                ok.iter()
                    .flat_map(|(_, o)| o.notes.iter())
                    .filter(|n| !n.starts_with("stderr"))
                    .cloned(),
            );
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} / {} / {} µs | {} | {} | {} |",
                w.id,
                d.name(),
                generated,
                delivered,
                lost,
                num(med(&|r, _| r.delivered_per_s), 0),
                num(med(&|_, o| o.lat_read.map(|p| p.p50_us)), 0),
                num(med(&|_, o| o.lat_read.map(|p| p.p99_us)), 0),
                num(med(&|_, o| o.lat_read.map(|p| p.max_us)), 0),
                num(med(&|_, o| o.cpu_ms_per_1k_events), 1),
                med(&|_, o| o.peak_rss_kib.map(|k| k as f64))
                    .map_or("n/a".into(), |k| format!("{:.1} MiB", k / 1024.0)),
                notes.join("; ").replace('|', "/"),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relp_frames_parse_whole_or_not_at_all() {
        let open = b"1 open 14 relp_version=0\n2 syslog 3 abc\n3 close 0\n";
        let (t, c, d, used) = relp_frame(open).unwrap().unwrap();
        assert_eq!((t, c, &open[d.0..d.1]), (1, "open", &b"relp_version=0"[..]));
        let (t, c, d, used2) = relp_frame(&open[used..]).unwrap().unwrap();
        assert_eq!(
            (t, c, &open[used + d.0..used + d.1]),
            (2, "syslog", &b"abc"[..])
        );
        let (t, c, d, _) = relp_frame(&open[used + used2..]).unwrap().unwrap();
        assert_eq!((t, c, d.0 == d.1), (3, "close", true));
        for cut in 1..used {
            assert_eq!(relp_frame(&open[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(relp_frame(b"1 syslog 3 abcX").is_err());
        assert!(relp_frame(b"x syslog 3 abc\n").is_err());
    }
}
