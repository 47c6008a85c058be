//! Running `portwatch watch` around a load, and reading its JSON lines cheaply.
//!
//! At full churn the agent writes a few hundred thousand lines a second, and the bench
//! shares two cores with it and the load: a full JSON parse per line would cost more than
//! the agent itself. Lines are scanned for the handful of fields needed (memmem over
//! the serialised field names, which cannot occur inside JSON strings since quotes are
//! escaped there), one line in 512 is also fully parsed and compared, and any line the
//! scanner cannot read takes the full parse.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use memchr::memmem::Finder;

use super::{
    OutputMode,
    load::{Kind, Load},
    results::{Observer, match_capture},
    util::{self, ProgCost, pcts},
};

/// Below this many events, CPU per 1,000 events is tick noise (10 ms /proc resolution).
pub const MIN_EVENTS_FOR_CPU: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ListenStarted,
    ListenStopped,
    UdpBound,
    UdpReleased,
    /// `risky-listener`: the alert raised for a listener (a copy of its start event).
    RiskyListener,
    Other,
}

#[derive(Clone, Copy, Debug)]
pub struct Rec {
    pub action: Action,
    pub pid: u32,
    pub port: u16,
    pub ts_ns: i64,
    pub created_ns: i64,
    /// When the bench read the line (0: not read live).
    pub recv_ns: i64,
}

#[derive(Default)]
pub struct Collected {
    pub recs: Vec<Rec>,
    pub lost: BTreeMap<String, u64>,
    pub lines: u64,
    pub bad_lines: u64,
    pub checked: u64,
    pub mismatches: u64,
    pub first_mismatch: Option<String>,
    /// A `sensor-started` line was seen.
    pub started: bool,
    /// `listeners-folded` per (pid, UDP?): (starts, ends) folded.
    pub folded: HashMap<(u32, bool), (u64, u64)>,
    /// `risky-listener-repeated` per server port: alerts folded into the last one sent.
    pub alert_repeats: HashMap<u16, u64>,
}

pub struct Scanner {
    ts: Finder<'static>,
    action: Finder<'static>,
    created: Finder<'static>,
    pid: Finder<'static>,
    server: Finder<'static>,
    port: Finder<'static>,
    lost: Finder<'static>,
    reason: Finder<'static>,
    lane: Finder<'static>,
    n: u64,
}

fn read_str(line: &[u8], at: usize) -> Option<&[u8]> {
    let rest = line.get(at..)?;
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

fn read_u64(line: &[u8], at: usize) -> Option<u64> {
    let rest = line.get(at..)?;
    let end = rest
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if end == 0 {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn action_of(s: &[u8]) -> Action {
    match s {
        b"listen-started" => Action::ListenStarted,
        b"listen-stopped" => Action::ListenStopped,
        b"udp-bound" => Action::UdpBound,
        b"udp-released" => Action::UdpReleased,
        b"risky-listener" => Action::RiskyListener,
        _ => Action::Other,
    }
}

/// Fields of one line: (action text, pid, port, @timestamp, created, lost count,
/// reason, with the lane in parentheses when the agent names one).
type Fields = (String, u32, u16, i64, i64, Option<u64>, Option<String>);

fn full_parse(line: &[u8]) -> Option<Fields> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let ts = |x: &serde_json::Value| {
        x.as_str()
            .and_then(|s| util::parse_rfc3339_ns(s.as_bytes()))
    };
    Some((
        v["event"]["action"].as_str()?.to_string(),
        v["process"]["pid"].as_u64().unwrap_or(0) as u32,
        v["server"]["port"].as_u64().unwrap_or(0) as u16,
        ts(&v["@timestamp"]).unwrap_or(0),
        ts(&v["event"]["created"]).unwrap_or(0),
        v["portwatch"]["lost"]["count"].as_u64(),
        v["portwatch"]["lost"]["reason"]
            .as_str()
            .map(|r| with_lane(r, v["portwatch"]["lost"]["lane"].as_str())),
    ))
}

/// `ring-buffer-full (urgent)`: the loss reason and, when given, the lane it was in.
fn with_lane(reason: &str, lane: Option<&str>) -> String {
    match lane {
        Some(l) => format!("{reason} ({l})"),
        None => reason.to_string(),
    }
}

/// What a `listeners-folded` line says: (pid, UDP?, starts, ends) folded.
fn fold_of(v: &serde_json::Value) -> (u32, bool, u64, u64) {
    let f = &v["portwatch"]["fold"];
    (
        v["process"]["pid"].as_u64().unwrap_or(0) as u32,
        v["network"]["transport"]
            .as_str()
            .is_some_and(|t| t.starts_with("udp")),
        f["started"].as_u64().unwrap_or(0),
        f["ended"].as_u64().unwrap_or(0),
    )
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner {
            ts: Finder::new(b"\"@timestamp\":\""),
            action: Finder::new(b"\"action\":\""),
            created: Finder::new(b"\"created\":\""),
            pid: Finder::new(b"\"process\":{\"pid\":"),
            server: Finder::new(b"\"server\":{"),
            port: Finder::new(b"\"port\":"),
            lost: Finder::new(b"\"lost\":{\"count\":"),
            reason: Finder::new(b"\"reason\":\""),
            lane: Finder::new(b"\"lane\":\""),
            n: 0,
        }
    }

    fn fast(&self, line: &[u8]) -> Option<Fields> {
        let a = self.action.find(line)? + self.action.needle().len();
        let action = read_str(line, a)?;
        let t = self.ts.find(line)? + self.ts.needle().len();
        let ts = util::parse_rfc3339_ns(read_str(line, t)?)?;
        let created = self
            .created
            .find(line)
            .and_then(|c| read_str(line, c + self.created.needle().len()))
            .and_then(util::parse_rfc3339_ns)
            .unwrap_or(0);
        let pid = self
            .pid
            .find(line)
            .and_then(|p| read_u64(line, p + self.pid.needle().len()))
            .unwrap_or(0);
        let port = self
            .server
            .find(line)
            .and_then(|s| {
                self.port
                    .find(&line[s..])
                    .map(|p| s + p + self.port.needle().len())
            })
            .and_then(|p| read_u64(line, p))
            .unwrap_or(0);
        let (lost, reason) = match self.lost.find(line) {
            Some(l) => {
                let count = read_u64(line, l + self.lost.needle().len());
                let reason = self.reason.find(&line[l..]).and_then(|r| {
                    read_str(line, l + r + self.reason.needle().len())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                });
                let lane = self.lane.find(&line[l..]).and_then(|r| {
                    read_str(line, l + r + self.lane.needle().len())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                });
                (count, reason.map(|r| with_lane(&r, lane.as_deref())))
            }
            None => (None, None),
        };
        Some((
            String::from_utf8_lossy(action).into_owned(),
            pid as u32,
            port as u16,
            ts,
            created,
            lost,
            reason,
        ))
    }

    pub fn line(&mut self, line: &[u8], recv_ns: i64, out: &mut Collected) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        out.lines += 1;
        self.n += 1;
        let fields = match self.fast(line) {
            Some(f) => {
                if self.n % 512 == 1 {
                    out.checked += 1;
                    let full = full_parse(line);
                    if full.as_ref() != Some(&f) {
                        out.mismatches += 1;
                        if out.first_mismatch.is_none() {
                            out.first_mismatch = Some(String::from_utf8_lossy(line).into_owned());
                        }
                        if let Some(full) = full { full } else { f }
                    } else {
                        f
                    }
                } else {
                    f
                }
            }
            None => match full_parse(line) {
                Some(f) => f,
                None => {
                    out.bad_lines += 1;
                    return;
                }
            },
        };
        let (action, pid, port, ts_ns, created_ns, lost, reason) = fields;
        if action == "sensor-started" {
            out.started = true;
        }
        if action == "listeners-folded" || action == "risky-listener-repeated" {
            // Rare (at most one a second per fold or alert key): always parsed in full, and
            // the fast scan's pid and port checked against it, since the counts hang on them.
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(v) if action == "listeners-folded" => {
                    let (fpid, udp, started, ended) = fold_of(&v);
                    out.checked += 1;
                    if fpid != pid {
                        out.mismatches += 1;
                        if out.first_mismatch.is_none() {
                            out.first_mismatch = Some(String::from_utf8_lossy(line).into_owned());
                        }
                    }
                    let e = out.folded.entry((fpid, udp)).or_insert((0, 0));
                    e.0 += started;
                    e.1 += ended;
                }
                Ok(v) => {
                    let p = v["server"]["port"].as_u64().unwrap_or(0) as u16;
                    out.checked += 1;
                    if p != port {
                        out.mismatches += 1;
                        if out.first_mismatch.is_none() {
                            out.first_mismatch = Some(String::from_utf8_lossy(line).into_owned());
                        }
                    }
                    *out.alert_repeats.entry(p).or_insert(0) +=
                        v["portwatch"]["folded"].as_u64().unwrap_or(0);
                }
                Err(_) => out.bad_lines += 1,
            }
        }
        if action == "events-lost" {
            *out.lost
                .entry(reason.unwrap_or_else(|| "unknown".into()))
                .or_insert(0) += lost.unwrap_or(0);
        }
        let action = action_of(action.as_bytes());
        if action != Action::Other {
            out.recs.push(Rec {
                action,
                pid,
                port,
                ts_ns,
                created_ns,
                recv_ns,
            });
        }
    }
}

/// Feeds complete lines of a byte stream to the scanner.
struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    fn feed(&mut self, data: &[u8], recv_ns: i64, sc: &mut Scanner, out: &mut Collected) {
        let mut start = 0;
        // A line's receive time is when its last byte (the newline) arrived.
        for nl in memchr::memchr_iter(b'\n', data) {
            if self.buf.is_empty() {
                sc.line(&data[start..nl], recv_ns, out);
            } else {
                self.buf.extend_from_slice(&data[start..nl]);
                let l = std::mem::take(&mut self.buf);
                sc.line(&l, recv_ns, out);
                self.buf = l;
                self.buf.clear();
            }
            start = nl + 1;
        }
        self.buf.extend_from_slice(&data[start..]);
    }
}

/// How the bench reads the agent's output while the load runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// As fast as it can: the pipe live (stdout), or the file once the agent stopped.
    Fast,
    /// Stdout pipe read by a consumer slower than a flood, through a buffer of this many
    /// bytes: it sleeps this long after each line while the load runs, then drains at full
    /// speed so the run ends in bounded time.
    Slow(Duration, usize),
    /// File mode read live, as `tail -f` would: new bytes are polled for every millisecond
    /// and each line is timestamped when it appears.
    Tail,
}

#[derive(Default)]
struct Live {
    lines: AtomicU64,
    started: AtomicBool,
    /// The slow reader still sleeps after each line.
    slow: AtomicBool,
    /// The agent has exited: the tail reader stops at the end of the file.
    done: AtomicBool,
}

impl Live {
    fn update(&self, col: &Collected) {
        if col.started && !self.started.load(Ordering::Relaxed) {
            self.started.store(true, Ordering::Release);
        }
        self.lines.store(col.lines, Ordering::Relaxed);
    }
}

fn spawn_reader(mut out: ChildStdout, live: Arc<Live>) -> JoinHandle<Collected> {
    thread::spawn(move || {
        util::reader_priority();
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut split = LineSplitter { buf: Vec::new() };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = util::realtime_ns();
            split.feed(&buf[..n], now, &mut sc, &mut col);
            live.update(&col);
        }
        col
    })
}

/// A consumer that handles one line at a time and takes `per_line` over each (while
/// `live.slow` holds): the pipe fills and the agent has to choose what to send first.
fn spawn_slow_reader(
    out: ChildStdout,
    live: Arc<Live>,
    per_line: Duration,
    buf: usize,
) -> JoinHandle<Collected> {
    thread::spawn(move || {
        util::reader_priority();
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut r = BufReader::with_capacity(buf, out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let now = util::realtime_ns();
            sc.line(line.strip_suffix(b"\n").unwrap_or(&line), now, &mut col);
            live.update(&col);
            if live.slow.load(Ordering::Relaxed) {
                thread::sleep(per_line);
            }
        }
        col
    })
}

/// Follows the agent's output file like `tail -f` until the agent has exited and the end
/// of the file is reached.
fn spawn_tail(path: PathBuf, live: Arc<Live>) -> JoinHandle<Collected> {
    thread::spawn(move || {
        util::reader_priority();
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut split = LineSplitter { buf: Vec::new() };
        let mut buf = vec![0u8; 1 << 20];
        let mut file = None;
        loop {
            // Read before looking at the end: what the agent wrote before it exited counts.
            let done = live.done.load(Ordering::Acquire);
            if file.is_none() {
                file = File::open(&path).ok();
            }
            let n = file
                .as_mut()
                .map_or(0, |f: &mut File| f.read(&mut buf).unwrap_or(0));
            if n > 0 {
                split.feed(&buf[..n], util::realtime_ns(), &mut sc, &mut col);
                live.update(&col);
                continue;
            }
            if done {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        col
    })
}

fn parse_file(path: &Path) -> anyhow::Result<Collected> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut sc = Scanner::new();
    let mut col = Collected::default();
    let mut split = LineSplitter { buf: Vec::new() };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        split.feed(&buf[..n], 0, &mut sc, &mut col);
    }
    Ok(col)
}

pub struct AgentOpts<'a> {
    pub bin: &'a Path,
    pub mode: OutputMode,
    pub ring_bytes: Option<u32>,
    pub events_file: PathBuf,
    pub log_file: PathBuf,
    pub kernel_stats: bool,
    /// More `portwatch watch` arguments (`--fold-above 0`, `--hooks floor ...`).
    pub extra: &'a [&'a str],
    /// The row's name (`portwatch`, `portwatch-nofold`, `floor`, ...).
    pub name: &'static str,
    /// How the output is read while the load runs.
    pub reader: Reader,
}

/// One agent run before scoring: what it wrote and what it cost.
pub struct AgentRun {
    pub load: Load,
    pub col: Collected,
    pub notes: Vec<String>,
    pub cpu_s: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub progs: Vec<ProgCost>,
}

/// Sets the flag on drop: a tail reader left behind by an early return stops too.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Kills the child on drop unless it was waited for.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn stop(
    child: &mut Child,
    sig: i32,
    grace: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if t.elapsed() > grace {
            let _ = child.kill();
            let st = child.wait()?;
            bail!("did not exit within {grace:?} of signal {sig}; killed ({st})");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the process' CPU time (and, when given, the line count) stops moving.
pub fn wait_idle(pid: u32, lines: Option<&AtomicU64>, max: Duration) -> bool {
    let t = Instant::now();
    let mut last = (
        util::cpu_seconds(pid),
        lines.map(|l| l.load(Ordering::Relaxed)),
    );
    let mut still = 0;
    while t.elapsed() < max {
        thread::sleep(Duration::from_millis(100));
        let now = (
            util::cpu_seconds(pid),
            lines.map(|l| l.load(Ordering::Relaxed)),
        );
        if now == last {
            still += 1;
            if still >= 3 {
                return true;
            }
        } else {
            still = 0;
        }
        last = now;
    }
    false
}

/// Start the agent, run `load` once it is attached, stop it, and score it.
pub fn run(
    o: &AgentOpts<'_>,
    kind: Kind,
    load: impl FnOnce() -> anyhow::Result<Load>,
) -> anyhow::Result<(Load, Observer)> {
    let r = collect(o, load)?;
    Ok(observe(o, kind, r))
}

/// Start the agent, run `load` once it is attached, stop it, and gather its output.
pub fn collect(
    o: &AgentOpts<'_>,
    load: impl FnOnce() -> anyhow::Result<Load>,
) -> anyhow::Result<AgentRun> {
    let mut cmd = Command::new(o.bin);
    cmd.args(["watch", "--format", "json", "--no-snapshot"]);
    cmd.args(o.extra);
    if let Some(r) = o.ring_bytes {
        cmd.args(["--ring-bytes", &r.to_string()]);
    }
    match o.mode {
        OutputMode::Stdout => {
            cmd.stdout(Stdio::piped());
        }
        OutputMode::File => {
            let _ = fs::remove_file(&o.events_file);
            cmd.arg("--output")
                .arg(&o.events_file)
                .stdout(Stdio::null());
        }
        OutputMode::Null => {
            cmd.args(["--output", "/dev/null"]).stdout(Stdio::null());
        }
    }
    let log = File::create(&o.log_file)?;
    cmd.stdin(Stdio::null()).stderr(log);
    let mut guard = Guard(Some(
        cmd.spawn()
            .with_context(|| format!("starting {}", o.bin.display()))?,
    ));
    let child = guard.0.as_mut().expect("child");
    let pid = child.id();
    let live = Arc::new(Live::default());
    let tail = o.mode == OutputMode::File && o.reader == Reader::Tail;
    let reader = match (child.stdout.take(), o.reader) {
        (Some(s), Reader::Slow(d, buf)) => {
            live.slow.store(true, Ordering::Relaxed);
            Some(spawn_slow_reader(s, live.clone(), d, buf))
        }
        (Some(s), _) => Some(spawn_reader(s, live.clone())),
        (None, _) if tail => Some(spawn_tail(o.events_file.clone(), live.clone())),
        (None, _) => None,
    };
    let _stop_tail = SetOnDrop(&live.done);

    // Attached? stdout/file: the sensor-started line. null: its bpf_link fds are there.
    let t = Instant::now();
    let mut notes = Vec::new();
    let (mut links, mut links_still) = (0, 0);
    loop {
        if let Some(st) = child.try_wait()? {
            bail!(
                "portwatch exited before it was attached ({st}): {}",
                util::read_tail(&o.log_file, 600)
            );
        }
        let ready = match o.mode {
            OutputMode::Stdout => live.started.load(Ordering::Acquire),
            OutputMode::File if tail => live.started.load(Ordering::Acquire),
            OutputMode::File => fs::read(&o.events_file)
                .is_ok_and(|b| memchr::memmem::find(&b, b"\"sensor-started\"").is_some()),
            OutputMode::Null => {
                // Every hook attached: at least the five documented links, and no new
                // one for 200 ms.
                let n = util::bpf_link_count(pid);
                links_still = if n == links { links_still + 1 } else { 0 };
                links = n;
                n >= 5 && links_still >= 20
            }
        };
        if ready {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "portwatch did not report sensor-started within 30 s: {}",
                util::read_tail(&o.log_file, 600)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    if o.mode == OutputMode::Null {
        // Links exist before the last attach returns and the loop starts: a margin.
        thread::sleep(Duration::from_millis(300));
        notes.push(format!(
            "output to /dev/null: attach detected from its bpf_link fds ({links})"
        ));
    }
    // Sampled only when kernel statistics are asked for: no ids, no samples.
    let prog_ids = if o.kernel_stats {
        util::bpf_prog_ids(pid)
    } else {
        Vec::new()
    };
    let before = util::prog_samples(&prog_ids);
    let cpu0 = util::cpu_seconds(pid);

    let load = load();
    // The slow consumer catches up at full speed once the load is over.
    live.slow.store(false, Ordering::Relaxed);
    let load = load?;

    let lines = (o.mode == OutputMode::Stdout || tail).then_some(&live.lines);
    if !wait_idle(pid, lines, Duration::from_secs(30)) {
        notes.push("agent still busy 30 s after the load ended".into());
    }
    let cpu1 = util::cpu_seconds(pid);
    let hwm = util::vm_hwm_kib(pid);
    let after = util::prog_samples(&prog_ids);
    let mut child = guard.0.take().expect("child");
    let st = stop(&mut child, libc::SIGTERM, Duration::from_secs(20));
    live.done.store(true, Ordering::Release);
    let st = st?;
    if !st.success() {
        notes.push(format!("portwatch exited with {st} after SIGTERM"));
    }
    let col = match reader {
        Some(r) => r
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?,
        None if o.mode == OutputMode::File => parse_file(&o.events_file)?,
        None => Collected::default(),
    };
    let stderr_tail = util::read_tail(&o.log_file, 300);
    if !stderr_tail.is_empty() {
        notes.push(format!("stderr: {stderr_tail}"));
    }
    Ok(AgentRun {
        load,
        col,
        notes,
        cpu_s: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        peak_rss_kib: hwm,
        progs: util::prog_costs(&before, &after),
    })
}

/// Score an agent run against what `kind` of load generated.
pub fn observe(o: &AgentOpts<'_>, kind: Kind, r: AgentRun) -> (Load, Observer) {
    let AgentRun {
        load,
        col,
        mut notes,
        cpu_s,
        peak_rss_kib,
        progs,
    } = r;
    let mut obs = score(&col, &load, kind, o.mode, &mut notes);
    obs.tool = o.name.into();
    if o.name.starts_with("floor") {
        // Do-nothing programs: nothing to capture, only the cost of the hooks.
        obs.capture = None;
        obs.lost = None;
    }
    obs.cpu_s = cpu_s;
    obs.cpu_pct = obs.cpu_s.map(|c| 100.0 * c / load.elapsed_s.max(1e-3));
    obs.cpu_ms_per_1k_events = obs
        .cpu_s
        .filter(|_| obs.events_for_cpu >= MIN_EVENTS_FOR_CPU)
        .map(|c| c * 1e3 / (obs.events_for_cpu as f64 / 1e3));
    obs.peak_rss_kib = peak_rss_kib;
    obs.progs = progs;
    obs.notes = notes;
    (load, obs)
}

fn score(
    col: &Collected,
    load: &Load,
    kind: Kind,
    mode: OutputMode,
    notes: &mut Vec<String>,
) -> Observer {
    let (start, stop) = if kind.is_udp() {
        (Action::UdpBound, Action::UdpReleased)
    } else {
        (Action::ListenStarted, Action::ListenStopped)
    };
    let ours: std::collections::HashSet<u32> = load.pids.iter().copied().collect();
    let mut cap: HashMap<(u32, u16), u64> = HashMap::new();
    let mut stops = 0u64;
    let mut lat_read = Vec::new();
    let mut lat_created = Vec::new();
    for r in &col.recs {
        if !ours.contains(&r.pid) || (r.action != start && r.action != stop) {
            continue;
        }
        if r.action == start {
            *cap.entry((r.pid, r.port)).or_insert(0) += 1;
        } else {
            stops += 1;
        }
        if r.recv_ns > 0 && r.ts_ns > 0 {
            lat_read.push(r.recv_ns - r.ts_ns);
        }
        if r.created_ns > 0 && r.ts_ns > 0 {
            lat_created.push(r.created_ns - r.ts_ns);
        }
    }
    let read_lines = mode != OutputMode::Null;
    let mut capture = match_capture(load, &cap, true);
    capture.stops_generated = Some(load.listens);
    capture.stops_captured = Some(stops);
    let (folded, stops_folded) = col
        .folded
        .iter()
        .filter(|((pid, udp), _)| ours.contains(pid) && *udp == kind.is_udp())
        .fold((0, 0), |(a, b), (_, (s, e))| (a + s, b + e));
    capture.folded = Some(folded);
    capture.stops_folded = Some(stops_folded);
    // captured + folded = generated: each start reported once, one way or the other.
    if read_lines && capture.captured + folded > load.listens {
        notes.push(format!(
            "captured {} + folded {folded} exceed the {} generated",
            capture.captured, load.listens
        ));
    }
    if col.bad_lines > 0 {
        notes.push(format!("{} lines were not JSON", col.bad_lines));
    }
    if col.mismatches > 0 {
        notes.push(format!(
            "fast field scan disagreed with the JSON parse on {} of {} checked lines; e.g. {}",
            col.mismatches,
            col.checked,
            col.first_mismatch
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>()
        ));
    }
    let events = if read_lines {
        capture.captured + stops + folded + stops_folded
    } else {
        2 * load.listens
    };
    Observer {
        tool: "portwatch".into(),
        capture: read_lines.then_some(capture),
        lost: read_lines.then(|| col.lost.values().sum()),
        lost_by_reason: col.lost.clone(),
        lat_read: pcts(&mut lat_read),
        lat_created: pcts(&mut lat_created),
        events_for_cpu: events,
        events_basis: if read_lines { "captured" } else { "expected" },
        lines: col.lines,
        parse_checked: Some(col.checked),
        parse_mismatches: Some(col.mismatches),
        ..Observer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"@timestamp":"2026-11-26T23:21:35.000001000Z","message":"a \"action\":\"udp-bound\" b","event":{"kind":"event","category":["network"],"type":["start"],"action":"listen-started","dataset":"portwatch.listener","module":"portwatch","sequence":7,"created":"2026-11-26T23:21:35.000051000Z"},"network":{"transport":"tcp","type":"ipv4"},"server":{"ip":"127.0.0.1","port":43211},"process":{"pid":4242,"name":"loadgen"},"host":{"name":"h"},"agent":{"type":"portwatch","name":"h","version":"0.1.0"},"ecs":{"version":"8.11.0"},"portwatch":{"socket":{"inode":5,"port":9}}}"#;

    #[test]
    fn fast_scan_matches_full_parse() {
        let sc = Scanner::new();
        let f = sc.fast(LINE.as_bytes()).unwrap();
        assert_eq!(f, full_parse(LINE.as_bytes()).unwrap());
        assert_eq!(f.0, "listen-started");
        assert_eq!((f.1, f.2), (4242, 43211));
        assert_eq!(f.4 - f.3, 50_000);
    }

    #[test]
    fn folded_lines_count_per_pid() {
        let l = r#"{"@timestamp":"2026-11-26T23:21:35Z","message":"m","event":{"kind":"event","action":"listeners-folded","created":"2026-11-26T23:21:35Z"},"network":{"transport":"tcp","type":"ipv4"},"process":{"pid":4242,"name":"loadgen"},"portwatch":{"fold":{"started":900,"ended":899,"ports":"1-3","final":false}}}"#;
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut split = LineSplitter { buf: Vec::new() };
        let text = format!("{l}\n{l}\n{LINE}\n");
        split.feed(text.as_bytes(), 1, &mut sc, &mut col);
        assert_eq!(col.folded.get(&(4242, false)), Some(&(1800, 1798)));
        assert!(col.checked >= 2, "every fold line is checked in full");
        assert_eq!(col.recs.len(), 1, "a fold is not a listener record");
        assert_eq!((col.bad_lines, col.mismatches), (0, 0));
    }

    #[test]
    fn alert_and_repeats() {
        let alert = LINE.replace(
            "\"action\":\"listen-started\"",
            "\"action\":\"risky-listener\"",
        );
        let rep = r#"{"@timestamp":"2026-11-28T08:16:01.127888137Z","message":"2 more alerts","event":{"kind":"alert","action":"risky-listener-repeated","created":"2026-11-28T08:16:01.127888307Z"},"network":{"transport":"tcp","type":"ipv4"},"server":{"ip":"0.0.0.0","port":11211},"portwatch":{"folded":2}}"#;
        let lost = r#"{"@timestamp":"2026-11-26T23:21:35Z","event":{"action":"events-lost"},"portwatch":{"lost":{"count":4,"total":4,"reason":"output-queue-full","sink":"stdout","lane":"bulk"}}}"#;
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut split = LineSplitter { buf: Vec::new() };
        let text = format!("{LINE}\n{alert}\n{rep}\n{rep}\n{lost}\n");
        split.feed(text.as_bytes(), 1, &mut sc, &mut col);
        assert_eq!(col.recs[1].action, Action::RiskyListener);
        assert_eq!((col.recs[1].pid, col.recs[1].port), (4242, 43211));
        assert_eq!(col.alert_repeats.get(&11211), Some(&4));
        assert_eq!(col.lost.get("output-queue-full (bulk)"), Some(&4));
        assert_eq!(
            sc.fast(lost.as_bytes()),
            full_parse(lost.as_bytes()),
            "the lane is read the same both ways"
        );
        assert_eq!((col.bad_lines, col.mismatches), (0, 0));
    }

    #[test]
    fn lost_lines() {
        let l = r#"{"@timestamp":"2026-11-26T23:21:35Z","message":"3 events lost","event":{"action":"events-lost","created":"2026-11-26T23:21:35Z"},"portwatch":{"lost":{"count":3,"total":9,"reason":"ring-buffer-full"}}}"#;
        let mut sc = Scanner::new();
        let mut col = Collected::default();
        let mut split = LineSplitter { buf: Vec::new() };
        let text = format!("{l}\n{LINE}\n{l}");
        let (a, b) = text.as_bytes().split_at(100);
        split.feed(a, 1, &mut sc, &mut col);
        split.feed(b, 2, &mut sc, &mut col);
        split.feed(b"\n", 3, &mut sc, &mut col);
        assert_eq!(col.lines, 3);
        assert_eq!(col.lost.get("ring-buffer-full"), Some(&6));
        assert_eq!(col.recs.len(), 1);
        assert_eq!(col.recs[0].recv_ns, 2);
        assert_eq!(col.mismatches, 0);
    }
}
