//! Reliability under faults, against the real kernel: a ring too small for a flood, an
//! output that stalls, fills up or goes away, SIGHUP, the capability drop. Every lost
//! event must be accounted for; the agent must survive and say what happened.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    process::Stdio,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use portwatch_tests::{
    Agent, Reap, Value, action, can_run_kernel_tests, poll, port, raw, read_json_lines,
    socket_inode, spawn_watch,
};

/// Every agent sees every listener on the host, so the tests that account for each event
/// exactly (or fill a tiny disk) must not run while another test floods: they take this.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn me() -> u32 {
    std::process::id()
}

fn mine(e: &Value) -> bool {
    e["process"]["pid"] == me()
}

/// socket + bind(127.0.0.1:0) + listen; the fd and its port.
fn listener() -> (i32, u16) {
    let fd = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    assert_eq!(raw::bind_v4(fd, [127, 0, 0, 1], 0), 0, "bind");
    assert_eq!(raw::listen(fd), 0, "listen");
    (fd, raw::local_port(fd))
}

/// Open and close `n` listeners as fast as possible; every `keep_every`-th stays open
/// and is returned (fd, port).
fn churn(n: usize, keep_every: usize) -> Vec<(i32, u16)> {
    let mut kept = Vec::new();
    for i in 0..n {
        let (fd, p) = listener();
        if keep_every > 0 && i % keep_every == 0 {
            kept.push((fd, p));
        } else {
            raw::close(fd);
        }
    }
    kept
}

/// Sum of `events-lost` counts, by reason.
fn lost_by_reason(events: &[Value]) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for e in events.iter().filter(|e| action(e) == "events-lost") {
        let reason = e["portwatch"]["lost"]["reason"].as_str().unwrap_or("?");
        *m.entry(reason.to_owned()).or_default() +=
            e["portwatch"]["lost"]["count"].as_u64().unwrap();
    }
    m
}

/// Wait until every loss reported so far is followed by a resync that completed after
/// it (a resync is allowed every 10 s), after letting a tick report the latest losses.
fn wait_for_repair(agent: &mut Agent) {
    agent.wait_for(Duration::from_millis(1500), |_| false);
    let last = |seen: &[Value], act: &str| seen.iter().rposition(|e| action(e) == act);
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        let lost = last(&agent.seen, "events-lost");
        let resync = last(&agent.seen, "resync-complete");
        if lost.is_none() || resync > lost {
            return;
        }
        agent.wait_for(Duration::from_millis(200), |_| false);
    }
    panic!("no resync after the last loss within 25 s");
}

/// Wait until the agent writing to `file` has started.
fn wait_started(file: &std::path::Path) {
    poll(Duration::from_secs(10), || {
        read_json_lines(file)
            .iter()
            .any(|e| action(e) == "sensor-started")
            .then_some(())
    })
    .expect("sensor-started in the output file");
}

fn assert_gap_free(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["event"]["sequence"].as_u64(),
            Some(i as u64 + 1),
            "sequence gap at line {}: {e}",
            i + 1
        );
    }
}

/// A 4 KiB ring (about 30 records) against a listener flood: every record the kernel
/// produced is either in the stream or counted in `events-lost`, exactly; and the resync
/// that follows each loss reports every long-lived listener whose start was lost, then
/// ends every one whose end was lost.
#[test]
fn tiny_ring_flood_generated_equals_captured_plus_lost_and_resync_repairs() {
    if !can_run_kernel_tests() {
        return;
    }
    let _alone = exclusive();
    const N: usize = 20_000;
    const KEEP_EVERY: usize = 100;
    // Folding off: this test measures the ring's loss accounting, one record at a time.
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--fold-above",
        "0",
        "--ring-bytes",
        "4096",
        "--priority-boost",
        "0",
    ]);

    let kept = churn(N, KEEP_EVERY);
    // By socket inode: churned listeners reuse the kept ones' ports before and after.
    let kept_inodes: HashSet<u64> = kept.iter().map(|&(fd, _)| socket_inode(fd)).collect();
    let inode = |e: &Value| e["portwatch"]["socket"]["inode"].as_u64().unwrap_or(0);
    wait_for_repair(&mut agent);
    let lossy = agent.seen.iter().any(|e| action(e) == "events-lost");

    // Each kept listener is known exactly once: live, or found by the resync.
    let events = agent.seen.clone();
    for p in &kept_inodes {
        let n = events
            .iter()
            .filter(|e| {
                inode(e) == *p
                    && mine(e)
                    && (action(e) == "listen-started"
                        || (action(e) == "listener-present" && e["portwatch"]["resync"] == true))
            })
            .count();
        assert_eq!(
            n, 1,
            "listener on port {p} (socket inode) reported {n} times (loss seen: {lossy})"
        );
    }

    // Close the kept ones inside a second flood: their ends may be lost too.
    let t_close = Instant::now();
    churn(N / 2, 0);
    for &(fd, _) in &kept {
        raw::close(fd);
    }
    churn(N / 2, 0);
    wait_for_repair(&mut agent);
    let (status, events) = agent.stop();
    assert!(status.success());
    let took = t_close.elapsed();

    let generated = 2 * (N + N) as u64; // each listener: one start, one end
    let captured = events
        .iter()
        .filter(|e| {
            mine(e)
                && e["portwatch"]["resync"] != true
                && matches!(action(e), "listen-started" | "listen-stopped")
        })
        .count() as u64;
    let lost = lost_by_reason(&events);
    let lost_records: u64 = [
        "ring-buffer-full",
        "kernel-map-full",
        "output-queue-full",
        "output-error",
    ]
    .iter()
    .map(|r| lost.get(*r).copied().unwrap_or(0))
    .sum();
    println!(
        "generated {generated} records, captured {captured}, lost {lost:?}, \
         {} resyncs, second phase {took:?}",
        events
            .iter()
            .filter(|e| action(e) == "resync-complete")
            .count()
    );
    assert_eq!(
        captured + lost_records,
        generated,
        "generated = captured + reported lost (lost {lost:?})"
    );
    // Every kept listener ended exactly once: live or by the resync.
    for p in &kept_inodes {
        let n = events
            .iter()
            .filter(|e| inode(e) == *p && mine(e) && action(e) == "listen-stopped")
            .count();
        assert_eq!(n, 1, "end of the listener on port {p} reported {n} times");
    }
    assert_gap_free(&events);
}

/// An output nobody reads: the agent keeps draining the kernel, drops into a counted
/// `output-queue-full` loss, and once read again says how many it lost; the stream it
/// wrote stays gap-free.
#[test]
fn stalled_output_drops_are_counted_and_memory_stays_bounded() {
    if !can_run_kernel_tests() {
        return;
    }
    let _alone = exclusive();
    let mut child = spawn_watch(
        // Folding off: every listener must reach the (stalled) queue.
        &["--no-snapshot", "--fold-above", "0", "--queue-events", "64"],
        Stdio::piped(),
        Stdio::null(),
    );
    let _reap = Reap(child.id());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("sensor-started"), "{first}");
    // Nobody reads now: the pipe (64 KiB) and the 64-event queue fill up.
    const N: usize = 3000;
    churn(N, 0);
    let agent_pid = child.id();
    let rss_kib = || -> u64 {
        std::fs::read_to_string(format!("/proc/{agent_pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib();
    // Read again until the loss is reported (next tick), then a marker listener proves
    // the agent kept working.
    let mut events = vec![serde_json::from_str::<Value>(&first).unwrap()];
    let mut line = String::new();
    let mut next = |out: &mut BufReader<_>| -> Option<Value> {
        line.clear();
        (out.read_line(&mut line).unwrap() > 0).then(|| serde_json::from_str(&line).unwrap())
    };
    while let Some(e) = next(&mut out) {
        let lost = action(&e) == "events-lost";
        events.push(e);
        if lost {
            break;
        }
    }
    let (marker, mp) = listener();
    // By inode too: a port may have been handed out before (see `Marker`).
    let mi = socket_inode(marker);
    let mut saw_marker = false;
    while let Some(e) = next(&mut out) {
        saw_marker |= action(&e) == "listen-started"
            && port(&e) == u64::from(mp)
            && e["portwatch"]["socket"]["inode"] == mi;
        events.push(e);
        if saw_marker {
            break;
        }
    }
    raw::close(marker);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for l in out.lines() {
        events.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    assert!(child.wait().unwrap().success());

    let lost = lost_by_reason(&events);
    let captured = events
        .iter()
        .filter(|e| mine(e) && matches!(action(e), "listen-started" | "listen-stopped"))
        .filter(|e| port(e) != u64::from(mp))
        .count() as u64;
    let dropped = lost.get("output-queue-full").copied().unwrap_or(0);
    // The kernel side may also have lost some while the machine was busy: all counted.
    let kernel_lost: u64 = ["ring-buffer-full", "kernel-map-full"]
        .iter()
        .map(|r| lost.get(*r).copied().unwrap_or(0))
        .sum();
    println!(
        "generated {} records, written {captured}, output-queue-full {dropped}, agent RSS {rss} KiB while stalled",
        2 * N
    );
    assert!(saw_marker, "the agent stopped working after the stall");
    assert!(
        dropped > 0,
        "nothing dropped although nobody read: {lost:?}"
    );
    // Exact on a quiet host; other processes' events may add drops: at least.
    assert!(
        captured + dropped + kernel_lost >= 2 * N as u64,
        "{captured} + {dropped} < {}",
        2 * N
    );
    assert!(
        rss < 64 * 1024,
        "agent RSS {rss} KiB while its output stalled"
    );
    assert_gap_free(&events);
}

/// `| head -1`: when the reader goes away the agent ends, status 0, programs detached.
#[test]
fn closed_stdout_ends_the_agent_cleanly() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut child = spawn_watch(&["--no-snapshot"], Stdio::piped(), Stdio::piped());
    let _reap = Reap(child.id());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    // The next write meets EPIPE.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    drop(l);
    let status = poll(Duration::from_secs(5), || child.try_wait().unwrap());
    let Some(status) = status else {
        let _ = child.kill();
        panic!("agent still running 5 s after its reader went away");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit status {status}; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A full disk: writes fail, the agent keeps running, says so once on stderr, counts
/// the events it could not write and reports them when there is room again.
#[test]
fn full_disk_is_survived_counted_and_reported() {
    if !can_run_kernel_tests() {
        return;
    }
    let _alone = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let rc = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(mnt)
        .status()
        .unwrap();
    assert!(rc.success(), "mounting a tmpfs");
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mnt);
    let file = mnt.join("events.json");
    let file_s = file.to_str().unwrap();
    let stderr_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = spawn_watch(
        &["--no-snapshot", "--fold-above", "0", "--output", file_s],
        Stdio::null(),
        Stdio::from(stderr_file.reopen().unwrap()),
    );
    let _reap = Reap(child.id());
    wait_started(&file);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "output file mode"
    );
    // Fill the disk, then cause events.
    let filler = mnt.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 128 * 1024]);
    churn(200, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "agent died on a full disk"
    );
    // Room again: the loss is reported, and new events arrive.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(1200)); // a tick reports the loss
    let (fd, mp) = listener();
    let mi = socket_inode(fd);
    let found = poll(Duration::from_secs(10), || {
        let ev = read_json_lines(&file);
        let lost = lost_by_reason(&ev)
            .get("output-error")
            .copied()
            .unwrap_or(0);
        let marker = ev.iter().any(|e| {
            action(e) == "listen-started"
                && port(e) == u64::from(mp)
                && e["portwatch"]["socket"]["inode"] == mi
        });
        (lost > 0 && marker).then_some(lost)
    });
    raw::close(fd);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let err = std::fs::read_to_string(stderr_file.path()).unwrap();
    let lost = found.unwrap_or_else(|| panic!("no output-error loss reported; stderr: {err}"));
    println!("output-error: {lost} events reported lost; stderr: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line on stderr, got: {err}");
    assert!(error_lines[0].contains("No space left"), "{err}");
    assert_gap_free(&read_json_lines(&file));
}

/// SIGHUP: the output file is reopened (logrotate moved it away), the rules are
/// re-read, and a broken rules file keeps the rules in force with a `config-error`.
#[test]
fn sighup_reopens_the_output_and_reloads_rules() {
    if !can_run_kernel_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.json");
    let rules = dir.path().join("rules.toml");
    let deny = |port: u16| format!("[[deny]]\nport = {port}\nreason = \"test\"\n");
    let (fd_a, port_a) = listener();
    raw::close(fd_a);
    let (fd_b, port_b) = listener();
    raw::close(fd_b);
    std::fs::write(&rules, deny(port_a)).unwrap();
    let mut child = spawn_watch(
        &[
            "--no-snapshot",
            "--output",
            file.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
        Stdio::null(),
        Stdio::null(),
    );
    let _reap = Reap(child.id());
    wait_started(&file);
    // logrotate: move the file away, then HUP.
    let rotated = dir.path().join("events.json.1");
    std::fs::rename(&file, &rotated).unwrap();
    std::fs::write(&rules, deny(port_b)).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloaded = poll(Duration::from_secs(10), || {
        read_json_lines(&file)
            .iter()
            .any(|e| action(e) == "rules-reloaded")
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "no rules-reloaded event in the reopened file"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The new rules are in force: port_b alerts.
    let b = std::net::TcpListener::bind(("0.0.0.0", port_b)).unwrap();
    let alert_b = poll(Duration::from_secs(10), || {
        read_json_lines(&file)
            .iter()
            .any(|e| action(e) == "risky-listener" && port(e) == u64::from(port_b))
            .then_some(())
    });
    drop(b);
    assert!(alert_b.is_some(), "reloaded deny rule did not alert");
    // A broken file: config-error, and the previous rules stay.
    std::fs::write(&rules, "[[deny]]\nport = 70000\n").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let err = poll(Duration::from_secs(10), || {
        read_json_lines(&file)
            .into_iter()
            .find(|e| action(e) == "config-error")
    })
    .expect("config-error event");
    assert!(err["message"].as_str().unwrap().contains("70000"), "{err}");
    // (Another address: the same one would be folded into the first alert.)
    let b = std::net::TcpListener::bind(("127.0.0.1", port_b)).unwrap();
    let still = poll(Duration::from_secs(10), || {
        let n = read_json_lines(&file)
            .iter()
            .filter(|e| action(e) == "risky-listener" && port(e) == u64::from(port_b))
            .count();
        (n >= 2).then_some(())
    });
    drop(b);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(
        still.is_some(),
        "the rules in force were lost with the broken file"
    );
    assert!(
        read_json_lines(&rotated)
            .iter()
            .any(|e| action(e) == "sensor-started"),
        "the rotated file keeps what was written before"
    );
}

/// Once attached, every thread of the agent holds only the runtime capabilities
/// (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN, and CAP_NET_ADMIN and CAP_NET_RAW
/// for the firewall tools), bounding set included: no CAP_BPF, CAP_PERFMON or
/// CAP_SYS_RESOURCE after attach. Its own self-check sockets never appear in the stream.
#[test]
fn capabilities_are_dropped_after_attach_and_own_sockets_are_silent() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let started = agent.expect("sensor-started", |e| action(e) == "sensor-started");
    assert_eq!(
        started["portwatch"]["stats"]["self_check"], "passed",
        "{started}"
    );
    let want = (1u64 << 2) | (1 << 12) | (1 << 13) | (1 << 19) | (1 << 21);
    let runtime: u64 = portwatch::kernel::host::RUNTIME_CAPS
        .iter()
        .map(|c| 1u64 << c)
        .sum();
    assert_eq!(
        runtime, want,
        "the runtime set changed: update this test with care"
    );
    let pid = agent.pid();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    assert!(
        tasks.len() >= 2,
        "expected the output thread too: {tasks:?}"
    );
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            assert_eq!(v, want, "{field} of {} is {v:#x}", t.display());
        }
    }
    let (status, events) = agent.stop();
    assert!(status.success());
    assert!(
        !events.iter().any(|e| e["process"]["pid"] == pid),
        "the agent reported its own sockets"
    );
}

/// A process whose comm and argv carry newlines, terminal escapes, invalid UTF-8 and a
/// 128 KiB argument: its event is one valid JSON line with the bytes preserved (invalid
/// ones as `\xNN`), and the text view shows no raw control character.
#[test]
fn hostile_process_names_and_command_lines_stay_one_safe_line() {
    use std::{
        ffi::OsStr,
        io::Write as _,
        os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
        process::Command,
    };
    if !can_run_kernel_tests() {
        return;
    }
    // Text view alongside the JSON one.
    let mut text_agent = Command::new(portwatch_tests::agent_binary())
        .args(["watch", "--format", "text", "--no-snapshot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = Reap(text_agent.id());
    let text_out = BufReader::new(text_agent.stdout.take().unwrap());
    let (tx, text_lines) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for l in text_out.split(b'\n') {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    text_lines
        .recv_timeout(Duration::from_secs(30))
        .expect("text agent started");
    let mut agent = Agent::start(&["--no-snapshot"]);

    let comm: &[u8] = b"\x1b[1mAB\nCD\xffEFGH"; // 15 bytes, the kernel's limit
    let argv0: &[u8] = b"evil\nname\x1b[2J\xff";
    // 128 KiB of command line, as two arguments (one may hold at most 128 KiB - 1).
    let big = "A".repeat(64 * 1024);
    let hex: String = comm.iter().map(|b| format!("{b:02x}")).collect();
    let mut helper = Command::new(env!("CARGO_BIN_EXE_pw-listen"))
        .arg0(OsStr::from_bytes(argv0))
        .arg("--title\x1b]0;pwned\x07")
        .arg(OsStr::from_bytes(b"\xfe\xfd"))
        .arg(&big)
        .arg(&big)
        .env("PW_COMM_HEX", hex)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port_line = String::new();
    BufReader::new(helper.stdout.take().unwrap())
        .read_line(&mut port_line)
        .unwrap();
    let hp: u64 = port_line.trim().parse().unwrap();
    let hpid = helper.id();
    let ev = agent.expect("the hostile listener", |e| {
        action(e) == "listen-started" && port(e) == hp && e["process"]["pid"] == hpid
    });
    // Done: let it exit.
    helper.stdin.take().unwrap().flush().unwrap();
    helper.wait().unwrap();

    let p = &ev["process"];
    assert_eq!(p["name"], "\u{1b}[1mAB\nCD\\xffEFGH", "{p}");
    let args: Vec<&str> = p["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "evil\nname\u{1b}[2J\\xff");
    assert_eq!(args[1], "--title\u{1b}]0;pwned\u{7}");
    assert_eq!(args[2], "\\xfe\\xfd");
    // Kept up to the 64 KiB cap (of raw bytes; `\xNN` escapes add a few): the first big
    // argument is cut short and the second is gone.
    let kept: usize = args.iter().map(|a| a.len() + 1).sum();
    assert_eq!(args.len(), 4, "{kept} bytes kept");
    assert!(args[3].starts_with("AAAA") && args[3].len() < big.len());
    assert!(kept <= 64 * 1024 + 16, "{kept} bytes kept");
    let line = serde_json::to_string(&ev).unwrap();
    assert!(
        !line.contains('\n') && !line.contains('\u{1b}'),
        "raw control bytes in JSON"
    );

    // The text view: the line for this listener, with nothing raw in it.
    let end = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{hp} ");
    let text = loop {
        let left = end.saturating_duration_since(Instant::now());
        let l = text_lines
            .recv_timeout(left)
            .expect("text line for the listener");
        if String::from_utf8_lossy(&l).contains(&needle) {
            break l;
        }
    };
    let shown = String::from_utf8_lossy(&text).into_owned();
    assert!(
        !text.iter().any(|&b| b < 0x20 && b != b'\t'),
        "raw control byte in the text view: {shown:?}"
    );
    assert!(shown.contains("\\x1b[1mAB\\x0aCD\\xffEFGH"), "{shown}");
    unsafe { libc::kill(text_agent.id() as i32, libc::SIGTERM) };
    text_agent.wait().unwrap();
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// A clean stop ends every destination's stream with `sensor-stopped` (why, uptime,
/// totals), after the last listener event: a SIEM can tell a stopped sensor from a dead
/// one. SIGTERM and SIGINT alike.
#[test]
fn clean_stop_ends_every_stream_with_sensor_stopped() {
    if !can_run_kernel_tests() {
        return;
    }
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        let mut child = spawn_watch(
            &[
                "--no-snapshot",
                "--output",
                a.to_str().unwrap(),
                "--output",
                b.to_str().unwrap(),
            ],
            Stdio::null(),
            Stdio::null(),
        );
        let _reap = Reap(child.id());
        wait_started(&a);
        let (fd, p) = listener();
        poll(Duration::from_secs(10), || {
            read_json_lines(&a)
                .iter()
                .any(|e| action(e) == "listen-started" && port(e) == u64::from(p))
                .then_some(())
        })
        .expect("the listener reported");
        unsafe { libc::kill(child.id() as i32, sig) };
        assert!(child.wait().unwrap().success());
        raw::close(fd);
        for f in [&a, &b] {
            let events = read_json_lines(f);
            let last = events.last().expect("events");
            assert_eq!(action(last), "sensor-stopped", "{name}: last line of {f:?}");
            assert_eq!(last["event"]["kind"], "state");
            assert_eq!(last["portwatch"]["stats"]["reason"], name);
            assert!(last["portwatch"]["stats"]["uptime_s"].as_f64().unwrap() > 0.0);
            assert!(
                events
                    .iter()
                    .any(|e| action(e) == "listen-started" && port(e) == u64::from(p)),
                "{name}: the listener is in {f:?}"
            );
            assert_eq!(
                events
                    .iter()
                    .filter(|e| action(e) == "sensor-stopped")
                    .count(),
                1
            );
        }
    }
}

/// An output file deleted under the agent (not rotated with SIGHUP): within about a
/// second the agent notices, writes to a new file at the same path, and that file says
/// how many events went to the deleted one since it was last seen.
#[test]
fn deleted_output_file_is_reopened_and_the_gap_reported() {
    if !can_run_kernel_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.json");
    let mut child = spawn_watch(
        &["--no-snapshot", "--output", file.to_str().unwrap()],
        Stdio::null(),
        Stdio::null(),
    );
    let _reap = Reap(child.id());
    wait_started(&file);
    let seen = |p: u16| {
        poll(Duration::from_secs(10), || {
            read_json_lines(&file)
                .iter()
                .any(|e| action(e) == "listen-started" && port(e) == u64::from(p))
                .then_some(())
        })
    };
    let (a, pa) = listener();
    seen(pa).expect("first listener before the delete");
    std::fs::remove_file(&file).unwrap();
    // Written to the deleted file (the agent has not noticed yet).
    let (b, pb) = listener();
    raw::close(b);
    // The next check (every second) notices; the gap report recreates the file.
    poll(Duration::from_secs(10), || file.exists().then_some(())).expect("file recreated");
    let (c, pc) = listener();
    seen(pc).expect("a listener after the reopen");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    raw::close(a);
    raw::close(c);
    let events = read_json_lines(&file);
    let lost: Vec<&Value> = events
        .iter()
        .filter(|e| {
            action(e) == "events-lost" && e["portwatch"]["lost"]["reason"] == "output-file-deleted"
        })
        .collect();
    assert_eq!(lost.len(), 1, "one gap report: {lost:?}");
    let n = lost[0]["portwatch"]["lost"]["count"].as_u64().unwrap();
    assert!(
        n >= 2,
        "at least the start and end of the listener made meanwhile: {n}"
    );
    assert!(
        !events
            .iter()
            .any(|e| port(e) == u64::from(pb) && action(e) == "listen-started"),
        "the listener made after the delete went to the deleted file"
    );
    assert_eq!(action(events.last().unwrap()), "sensor-stopped");
}
