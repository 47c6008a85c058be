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
    io::Read as _,
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
    util::{self, pcts},
};

/// Below this many events, CPU per 1,000 events is tick noise (10 ms /proc resolution).
pub const MIN_EVENTS_FOR_CPU: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ListenStarted,
    ListenStopped,
    UdpBound,
    UdpReleased,
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
    /// `listeners-folded` per pid: (starts, ends) folded.
    pub folded: HashMap<u32, (u64, u64)>,
}

struct Scanner {
    ts: Finder<'static>,
    action: Finder<'static>,
    created: Finder<'static>,
    pid: Finder<'static>,
    server: Finder<'static>,
    port: Finder<'static>,
    lost: Finder<'static>,
    reason: Finder<'static>,
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
        _ => Action::Other,
    }
}

/// Fields of one line: (action text, pid, port, @timestamp, created, lost count, reason).
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
            .map(str::to_string),
    ))
}

impl Scanner {
    fn new() -> Scanner {
        Scanner {
            ts: Finder::new(b"\"@timestamp\":\""),
            action: Finder::new(b"\"action\":\""),
            created: Finder::new(b"\"created\":\""),
            pid: Finder::new(b"\"process\":{\"pid\":"),
            server: Finder::new(b"\"server\":{"),
            port: Finder::new(b"\"port\":"),
            lost: Finder::new(b"\"lost\":{\"count\":"),
            reason: Finder::new(b"\"reason\":\""),
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
                (count, reason)
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

    fn line(&mut self, line: &[u8], recv_ns: i64, out: &mut Collected) {
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
        if action == "listeners-folded" {
            // Rare (at most one a second per fold): parsed in full.
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                let f = &v["portwatch"]["fold"];
                let e = out.folded.entry(pid).or_insert((0, 0));
                e.0 += f["started"].as_u64().unwrap_or(0);
                e.1 += f["ended"].as_u64().unwrap_or(0);
            } else {
                out.bad_lines += 1;
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

#[derive(Default)]
struct Live {
    lines: AtomicU64,
    started: AtomicBool,
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
            if col.started && !live.started.load(Ordering::Relaxed) {
                live.started.store(true, Ordering::Release);
            }
            live.lines.store(col.lines, Ordering::Relaxed);
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
    /// The row's name (`portwatch`, `portwatch-nofold`, `floor`).
    pub name: &'static str,
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

fn stop(child: &mut Child, sig: i32, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
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
    let reader = child.stdout.take().map(|s| spawn_reader(s, live.clone()));

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

    let load = load()?;

    let lines = (o.mode == OutputMode::Stdout).then_some(&live.lines);
    if !wait_idle(pid, lines, Duration::from_secs(30)) {
        notes.push("agent still busy 30 s after the load ended".into());
    }
    let cpu1 = util::cpu_seconds(pid);
    let hwm = util::vm_hwm_kib(pid);
    let after = util::prog_samples(&prog_ids);
    let mut child = guard.0.take().expect("child");
    let st = stop(&mut child, libc::SIGTERM, Duration::from_secs(20))?;
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

    let mut obs = score(&col, &load, kind, o.mode, &mut notes);
    obs.tool = o.name.into();
    if o.name == "floor" {
        // Do-nothing programs: nothing to capture, only the cost of the hooks.
        obs.capture = None;
        obs.lost = None;
    }
    obs.cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    obs.cpu_pct = obs.cpu_s.map(|c| 100.0 * c / load.elapsed_s.max(1e-3));
    obs.cpu_ms_per_1k_events = obs
        .cpu_s
        .filter(|_| obs.events_for_cpu >= MIN_EVENTS_FOR_CPU)
        .map(|c| c * 1e3 / (obs.events_for_cpu as f64 / 1e3));
    obs.peak_rss_kib = hwm;
    obs.progs = util::prog_costs(&before, &after);
    obs.notes = notes;
    Ok((load, obs))
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
        .filter(|(pid, _)| ours.contains(pid))
        .fold((0, 0), |(a, b), (_, (s, e))| (a + s, b + e));
    capture.folded = Some(folded);
    capture.stops_folded = Some(stops_folded);
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
        assert_eq!(col.folded.get(&4242), Some(&(1800, 1798)));
        assert_eq!(col.recs.len(), 1, "a fold is not a listener record");
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
