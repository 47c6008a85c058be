//! Harness for the real-kernel tests: runs the built agent (`target/release/portwatch`,
//! or `$PORTWATCH_BIN`) as a child, reads its JSON lines, and lets a test wait for the
//! event it caused, with a deadline, never a fixed sleep.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

pub use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// True when this process may load BPF programs; otherwise the caller prints why it skips.
pub fn can_run_kernel_tests() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: kernel tests need root (they load eBPF programs)");
        return false;
    }
    true
}

pub fn agent_binary() -> PathBuf {
    std::env::var_os("PORTWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/portwatch")
        })
}

pub struct Agent {
    child: Child,
    lines: Receiver<Value>,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
    /// The spool directory given to an agent whose test names none, so that tests never
    /// share /var/lib/portwatch (removed with the agent).
    _spool: Option<tempfile::TempDir>,
}

/// The hook set every test agent is started with: `$PORTWATCH_HOOKS` (`auto`, `stable`,
/// `direct`, ...), so the same test binaries run against each set; unset: the agent's
/// default (`auto`).
pub fn hooks_from_env() -> Option<String> {
    std::env::var("PORTWATCH_HOOKS")
        .ok()
        .filter(|h| !h.is_empty())
}

impl Agent {
    /// Start `portwatch watch --format json ARGS` (with `--hooks $PORTWATCH_HOOKS` when
    /// set) and wait until its probes are attached.
    pub fn start(args: &[&str]) -> Agent {
        let mut all: Vec<String> = Vec::new();
        // A test that names its set itself keeps it.
        let from_env = hooks_from_env().filter(|_| !args.contains(&"--hooks"));
        if let Some(h) = &from_env {
            all.extend(["--hooks".to_owned(), h.clone()]);
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let agent = Self::spawn(&all, false).unwrap_or_else(|e| panic!("agent did not start: {e}"));
        if let Some(want) = from_env.filter(|h| h == "stable" || h.starts_with("direct")) {
            let set = agent.hooks()["set"].as_str().unwrap_or("").to_owned();
            assert!(
                want.starts_with(&set) && !set.is_empty(),
                "PORTWATCH_HOOKS={want} but the agent runs the {set:?} set"
            );
            if want == "direct-kprobe" {
                assert_eq!(agent.hooks()["via"], "kprobe", "{}", agent.hooks());
            }
        }
        agent
    }

    /// Start an agent with exactly `args` (no `$PORTWATCH_HOOKS`); `Err` with the
    /// agent's stderr when it exits before reporting `sensor-started`.
    pub fn try_start(args: &[&str]) -> Result<Agent, String> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::spawn(&args, true)
    }

    /// `portwatch.hooks` of this agent's `sensor-started` event.
    pub fn hooks(&self) -> Value {
        self.seen
            .iter()
            .find(|e| action(e) == "sensor-started")
            .map(|e| e["portwatch"]["hooks"].clone())
            .unwrap_or(Value::Null)
    }

    fn spawn(args: &[String], capture_stderr: bool) -> Result<Agent, String> {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        let spool = (!args.contains(&"--spool-dir"))
            .then(|| tempfile::tempdir().expect("a spool directory for the agent"));
        let spool_path = spool.as_ref().map(|d| d.path().display().to_string());
        if let Some(p) = &spool_path {
            args.extend(["--spool-dir", p.as_str()]);
        }
        let stderr = if capture_stderr {
            Stdio::piped()
        } else {
            Stdio::inherit()
        };
        let mut child = spawn_watch(&args, Stdio::piped(), stderr);
        let stderr = child.stderr.take().map(|mut err| {
            thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut s);
                s
            })
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // A line cut short by SIGKILL (a test that failed and dropped its agent) is
                // not the agent's fault; any complete line must be JSON.
                if !line.ends_with('\n') {
                    break;
                }
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("agent wrote a line that is not JSON ({e}): {line}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child,
            lines: rx,
            seen: Vec::new(),
            _spool: spool,
        };
        // Loading takes a while on a slow (emulated) machine: up to 60 s.
        if agent
            .wait_for(Duration::from_secs(60), |e| action(e) == "sensor-started")
            .is_some()
        {
            return Ok(agent);
        }
        // Its stdout closed: it is exiting (give it a moment to be reaped), or it hangs.
        let mut status = None;
        for _ in 0..40 {
            status = agent.child.try_wait().ok().flatten();
            if status.is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if status.is_none() {
            unsafe { libc::kill(agent.child.id() as i32, libc::SIGKILL) };
            let _ = agent.child.wait();
        }
        let err = stderr
            .and_then(|t| t.join().ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Err(match status {
            Some(st) => format!("agent exited ({st}) before sensor-started: {err}"),
            None => format!("agent did not report sensor-started within 60 s: {err}"),
        })
    }

    /// Wait for the first event (already seen or new) matching `pred`.
    pub fn wait_for(&mut self, deadline: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return Some(v.clone());
        }
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    let hit = pred(&v);
                    self.seen.push(v);
                    if hit {
                        return self.seen.last().cloned();
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None;
                }
            }
        }
    }

    /// Like `wait_for`, panicking with `what` when nothing matches in time.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(DEADLINE, pred).unwrap_or_else(|| {
            panic!(
                "no event for {what} within {DEADLINE:?}; saw {} events: {:?}",
                self.seen.len(),
                self.seen
                    .iter()
                    .map(|e| e["event"]["action"].to_string()
                        + " "
                        + &e["server"]["port"].to_string()
                        + " "
                        + &e["message"].to_string())
                    .collect::<Vec<_>>()
            )
        })
    }

    /// Receive everything until `pred` matches (inclusive) and return all events seen.
    pub fn drain_until(&mut self, pred: impl Fn(&Value) -> bool) -> &[Value] {
        self.wait_for(DEADLINE * 3, pred)
            .expect("marker event never arrived");
        &self.seen
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait; returns the exit status and every event written until exit.
    pub fn stop(mut self) -> (ExitStatus, Vec<Value>) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for the agent");
        while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(v);
        }
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed test must not leave an agent (and its hooks) behind.
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Kills an agent started by hand (not through [`Agent`]) if the test fails before it
/// stops it: a leftover agent keeps its hooks attached and skews everything after it.
pub struct Reap(pub u32);

impl Drop for Reap {
    fn drop(&mut self) {
        if std::thread::panicking() {
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// `portwatch watch --format json ARGS` with the given stdout and stderr.
pub fn spawn_watch(args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
    let bin = agent_binary();
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test`",
        bin.display()
    );
    Command::new(&bin)
        .args(["watch", "--format", "json"])
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()))
}

/// Every line of a JSON-lines file, parsed (a line that is not JSON fails the test).
pub fn read_json_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Poll `f` until it returns Some, or the deadline passes.
pub fn poll<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn action(e: &Value) -> &str {
    e["event"]["action"].as_str().unwrap_or("")
}

pub fn port(e: &Value) -> u64 {
    e["server"]["port"].as_u64().unwrap_or(0)
}

pub fn pid(e: &Value) -> u64 {
    e["process"]["pid"].as_u64().unwrap_or(0)
}

/// An event of `act` for `port` owned by `owner`.
pub fn is(e: &Value, act: &str, owner: u32, p: u16) -> bool {
    action(e) == act && port(e) == u64::from(p) && pid(e) == u64::from(owner)
}

/// A loopback listener of this process that marks a point in the event stream: once its
/// start is in, so is every event caused before it. Known by its socket inode as well as
/// its port: the port may have been handed out before to a listener the test closed (it
/// was, in the VM: `[::1]:0`, then `127.0.0.1:0`), and a wait for the port alone would
/// stop at that earlier listener's start.
pub struct Marker {
    pub listener: std::net::TcpListener,
    pub port: u16,
    pub inode: u64,
}

impl Marker {
    pub fn new() -> Marker {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a marker");
        let port = listener.local_addr().expect("marker address").port();
        let inode = socket_inode(std::os::fd::AsRawFd::as_raw_fd(&listener));
        Marker {
            listener,
            port,
            inode,
        }
    }

    /// Whether `e` is this marker's `act` (`listen-started`, `listen-stopped`).
    pub fn is(&self, e: &Value, act: &str) -> bool {
        is(e, act, std::process::id(), self.port) && e["portwatch"]["socket"]["inode"] == self.inode
    }

    pub fn started(&self, e: &Value) -> bool {
        self.is(e, "listen-started")
    }
}

impl Default for Marker {
    fn default() -> Marker {
        Marker::new()
    }
}

/// Process name the kernel shows for `pid` (`/proc/<pid>/comm`).
pub fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Inode of the socket behind `fd`.
pub fn socket_inode(fd: i32) -> u64 {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0, "fstat");
    st.st_ino
}

/// Raw socket helpers for cases std cannot express (listen without bind, failing listen).
pub mod raw {
    pub fn socket(family: i32, ty: i32) -> i32 {
        let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        fd
    }

    pub fn set_reuseaddr(fd: i32) {
        let one: libc::c_int = 1;
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                std::ptr::from_ref(&one).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "setsockopt");
    }

    pub fn bind_v4(fd: i32, addr: [u8; 4], port: u16) -> i32 {
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr),
            },
            sin_zero: [0; 8],
        };
        unsafe {
            libc::bind(
                fd,
                std::ptr::from_ref(&sa).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        }
    }

    pub fn local_port(fd: i32) -> u16 {
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_in6>() as u32;
        let rc = unsafe { libc::getsockname(fd, std::ptr::from_mut(&mut sa).cast(), &mut len) };
        assert_eq!(rc, 0, "getsockname");
        // sin_port and sin6_port sit at the same offset.
        u16::from_be(sa.sin6_port)
    }

    pub fn listen(fd: i32) -> i32 {
        unsafe { libc::listen(fd, 16) }
    }

    pub fn close(fd: i32) {
        unsafe { libc::close(fd) };
    }
}

/// One process's starts and ends as an agent reported them: sent one by one, and
/// counted in its `listeners-folded` reports.
#[derive(Debug)]
pub struct FoldCounts {
    pub sent: u64,
    pub sent_ends: u64,
    pub folded: u64,
    pub folded_ends: u64,
}

/// Count `pid`'s TCP (`udp` false) or UDP starts and ends in `events`.
pub fn fold_counts(events: &[Value], pid_: u64, udp: bool) -> FoldCounts {
    let (start, stop) = if udp {
        ("udp-bound", "udp-released")
    } else {
        ("listen-started", "listen-stopped")
    };
    let count = |a: &str| {
        events
            .iter()
            .filter(|e| action(e) == a && pid(e) == pid_)
            .count() as u64
    };
    let sum = |k: &str| -> u64 {
        events
            .iter()
            .filter(|e| action(e) == "listeners-folded" && pid(e) == pid_)
            .map(|e| e["portwatch"]["fold"][k].as_u64().unwrap())
            .sum()
    };
    FoldCounts {
        sent: count(start),
        sent_ends: count(stop),
        folded: sum("started"),
        folded_ends: sum("ended"),
    }
}
