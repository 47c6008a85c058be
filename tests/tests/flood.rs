//! Flood-proof detection, tried as an attacker would: two processes of an unprivileged
//! user churn sockets as fast as they can while a third process opens risky listeners
//! on 0.0.0.0:11211 for 50 ms each. Every risky listener must be reported and alerted
//! on, and every start of each flooder must be accounted for exactly: sent one by one,
//! folded into `listeners-folded`, or reported lost.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use portwatch_tests::{
    FoldCounts, Reap, Value, action, can_run_kernel_tests, fold_counts, pid, port, read_json_lines,
};

#[test]
fn rfc3339_parses_as_the_agent_writes_it() {
    assert_eq!(rfc3339_ns("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
    assert_eq!(
        rfc3339_ns("2026-11-28T07:08:21.836392654Z"),
        Some(1_795_849_701_836_392_654)
    );
}

const K: usize = 20;
const RISKY: u16 = 11211;
const FLOOD_SECS: f64 = 4.0;

fn flooder_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pw-flood"))
}

/// A throwaway unprivileged user for the flooders.
fn flood_uid() -> u32 {
    let name = "pw-flood";
    let id = || {
        Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(uid) = id() {
        return uid;
    }
    let st = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .expect("running useradd");
    assert!(st.success(), "useradd {name} failed");
    id().expect("uid of the new user")
}

struct Flood {
    pid: u32,
    count: u64,
    ports: BTreeSet<u16>,
}

fn parse_ranges(s: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u16, u16) = (lo.parse().expect("port"), hi.parse().expect("port"));
        out.extend(lo..=hi);
    }
    out
}

/// Start the two flooders; returns their handles.
fn start_flooders(transport: &str, scope: &str, uid: u32) -> Vec<std::process::Child> {
    (0..2)
        .map(|_| {
            Command::new(flooder_bin())
                .args([transport, scope, &FLOOD_SECS.to_string(), &uid.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", flooder_bin().display()))
        })
        .collect()
}

fn finish_flooders(children: Vec<std::process::Child>) -> Vec<Flood> {
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("flooder");
            assert!(out.status.success(), "flooder failed: {}", out.status);
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let head = lines.next().expect("pid count line");
            let (p, n) = head.split_once(' ').expect("pid count");
            Flood {
                pid: p.parse().expect("pid"),
                count: n.parse().expect("count"),
                ports: parse_ranges(lines.next().unwrap_or("")),
            }
        })
        .collect()
}

/// The risky listeners: K times 0.0.0.0:11211 for 50 ms, 100 ms apart, from this process.
/// Returns when each listen() returned (ns since the epoch).
fn open_risky_listeners() -> Vec<i128> {
    let mut opened = Vec::new();
    for _ in 0..K {
        let l = TcpListener::bind(("0.0.0.0", RISKY)).expect("binding 0.0.0.0:11211");
        opened.push(now_ns());
        thread::sleep(Duration::from_millis(50));
        drop(l);
        thread::sleep(Duration::from_millis(100));
    }
    opened
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// RFC 3339 with nanoseconds and `Z`, as the agent writes it, to ns since the epoch.
fn rfc3339_ns(s: &str) -> Option<i128> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let frac_ns: i128 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) as i128) * 1_000_000_000 + frac_ns)
}

/// Detection latency of the risky listeners, for the log (tests never assert on speed):
/// when the agent wrote each one's event (`event.created`) minus when its listen()
/// returned.
fn print_latency(events: &[Value], opened: &[i128], what: &str) {
    let me = std::process::id() as u64;
    let mut created: Vec<i128> = events
        .iter()
        .filter(|e| action(e) == "listen-started" && pid(e) == me && port(e) == u64::from(RISKY))
        .filter_map(|e| rfc3339_ns(e["event"]["created"].as_str()?))
        .collect();
    created.sort_unstable();
    let mut lat: Vec<i128> = opened
        .iter()
        .zip(&created)
        .map(|(o, c)| (c - o).max(0))
        .collect();
    lat.sort_unstable();
    if let (Some(p50), Some(p99)) = (lat.get(lat.len() / 2), lat.last()) {
        eprintln!(
            "{what}: {} risky listeners written {:.2} ms (p50) / {:.2} ms (max) after listen() returned",
            lat.len(),
            *p50 as f64 / 1e6,
            *p99 as f64 / 1e6
        );
    }
}

/// Check the whole stream: K risky listeners and their alerts, exact flood accounting.
fn check(events: &[Value], floods: &[Flood], transport: &str, scope_important: bool) {
    let me = std::process::id() as u64;
    let started_action = if transport == "tcp" {
        "listen-started"
    } else {
        "udp-bound"
    };
    let stopped_action = if transport == "tcp" {
        "listen-stopped"
    } else {
        "udp-released"
    };
    let risky: Vec<&Value> = events
        .iter()
        .filter(|e| action(e) == "listen-started" && pid(e) == me && port(e) == u64::from(RISKY))
        .collect();
    assert_eq!(risky.len(), K, "every risky listener reported");
    assert!(
        risky
            .iter()
            .all(|e| e["portwatch"]["risk"]["rule"] == "memcached"),
        "classified as memcached"
    );
    let alerts = events
        .iter()
        .filter(|e| action(e) == "risky-listener" && pid(e) == me && port(e) == u64::from(RISKY))
        .count() as u64;
    let repeats: u64 = events
        .iter()
        .filter(|e| action(e) == "risky-listener-repeated" && port(e) == u64::from(RISKY))
        .map(|e| e["portwatch"]["folded"].as_u64().unwrap_or(0))
        .sum();
    assert!(alerts >= 1, "the alert was raised");
    assert_eq!(alerts + repeats, K as u64, "alerts plus folded repeats");

    // Every flooder's accounting first: when one is off, the others say whether what
    // it misses went to them.
    for f in floods {
        let c = portwatch_tests::fold_counts(events, u64::from(f.pid), transport == "udp");
        eprintln!("flooder {}: generated {}, {c:?}", f.pid, f.count);
    }
    for f in floods {
        let p = u64::from(f.pid);
        let mine = |a: &str| {
            events
                .iter()
                .filter(|e| action(e) == a && pid(e) == p)
                .collect::<Vec<_>>()
        };
        let sent = mine(started_action);
        let ended = mine(stopped_action).len() as u64;
        let folds = mine("listeners-folded");
        let folded: u64 = folds
            .iter()
            .map(|e| e["portwatch"]["fold"]["started"].as_u64().unwrap())
            .sum();
        let folded_ends: u64 = folds
            .iter()
            .map(|e| e["portwatch"]["fold"]["ended"].as_u64().unwrap())
            .sum();
        let last = folds
            .last()
            .unwrap_or_else(|| panic!("flooder {p} ({} starts) was never folded", f.count));
        let fold = &last["portwatch"]["fold"];
        assert_eq!(fold["final"], true, "the last fold report is final: {fold}");
        let lost = fold["process_lost"].as_u64().unwrap();
        eprintln!(
            "flooder {p}: generated {}, sent {}, folded {folded}, lost {lost}; ends sent {ended}, folded {folded_ends}",
            f.count,
            sent.len()
        );
        assert_eq!(
            sent.len() as u64 + folded + lost,
            f.count,
            "flooder {p}: sent + folded + lost = generated"
        );
        assert_eq!(
            fold["process_sent"].as_u64(),
            Some(sent.len() as u64),
            "kernel's sent count"
        );
        assert_eq!(
            fold["process_folded"].as_u64(),
            Some(folded),
            "kernel's folded count"
        );
        assert_eq!(lost, 0, "nothing lost under the budget");
        let losses: Vec<String> = events
            .iter()
            .filter(|e| action(e) == "events-lost")
            .map(|e| e["portwatch"]["lost"].to_string())
            .collect();
        assert_eq!(
            ended + folded_ends,
            f.count,
            "flooder {p}: every end accounted for (fold reports: {}; losses: {losses:?})",
            folds
                .iter()
                .map(|e| {
                    let f = &e["portwatch"]["fold"];
                    format!(
                        "+{}/+{} ({}/{}{})",
                        f["started"],
                        f["ended"],
                        f["started_total"],
                        f["ended_total"],
                        if f["final"] == true { " final" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        // The exact port set: ports sent one by one plus the fold's set.
        let mut seen: BTreeSet<u16> = sent.iter().map(|e| port(e) as u16).collect();
        for e in &folds {
            seen.extend(parse_ranges(
                e["portwatch"]["fold"]["ports"].as_str().unwrap(),
            ));
        }
        assert_eq!(
            seen, f.ports,
            "flooder {p}: the reported ports are exactly its ports"
        );
        let scope = fold["scope"].as_str().unwrap();
        assert_eq!(
            scope,
            if scope_important {
                "wildcard"
            } else {
                "loopback"
            }
        );
        assert!(last["user"]["id"].as_str().is_some(), "attributed: {last}");
    }
}

/// Start an agent writing to `out` (no snapshot, `extra` options) and wait for its
/// `sensor-started`.
fn start_agent(out: &std::path::Path, extra: &[&str]) -> std::process::Child {
    let out_s = out.to_str().unwrap().to_owned();
    let mut args = vec!["--output", &out_s, "--no-snapshot"];
    args.extend_from_slice(extra);
    let agent = portwatch_tests::spawn_watch(&args, Stdio::null(), Stdio::inherit());
    portwatch_tests::poll(Duration::from_secs(30), || {
        read_json_lines(out)
            .iter()
            .any(|e| action(e) == "sensor-started")
            .then_some(())
    })
    .expect("agent started");
    agent
}

/// Run one variant with the agent writing to a file.
fn variant(transport: &str, scope: &str) {
    if !can_run_kernel_tests() {
        return;
    }
    let uid = flood_uid();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("events.json");
    let mut agent = start_agent(&out, &[]);
    let _reap = Reap(agent.id());
    let flooders = start_flooders(transport, scope, uid);
    thread::sleep(Duration::from_millis(500));
    let opened = open_risky_listeners();
    let floods = finish_flooders(flooders);
    // The final fold report comes once a flooder is gone (next tick, within ~2 s).
    let pids: Vec<u64> = floods.iter().map(|f| u64::from(f.pid)).collect();
    portwatch_tests::poll(Duration::from_secs(15), || {
        let evs = read_json_lines(&out);
        pids.iter()
            .all(|p| {
                evs.iter().any(|e| {
                    action(e) == "listeners-folded"
                        && pid(e) == *p
                        && e["portwatch"]["fold"]["final"] == true
                })
            })
            .then_some(())
    })
    .expect("final fold reports");
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().expect("agent").success());
    let events = read_json_lines(&out);
    print_latency(
        &events,
        &opened,
        &format!("{transport} {scope} flood, to a file"),
    );
    check(&events, &floods, transport, scope == "wildcard");
}

/// More folded sockets open at once than the kernel's fast table of folded sockets has
/// slots (16,384), so many go to its overflow map: every end must still be counted in
/// the fold of its start (or sent, for a start that was sent), none lost.
fn hold_many(transport: &str) {
    if !can_run_kernel_tests() {
        return;
    }
    // Above 16,384, under this machine's hard RLIMIT_NOFILE (20,000).
    const N: u64 = 18_000;
    let uid = flood_uid();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("events.json");
    // A small budget: well over 16,384 of the N are folded however slowly they open.
    let mut agent = start_agent(&out, &["--fold-above", "10"]);
    let _reap = Reap(agent.id());
    let child = Command::new(flooder_bin())
        .args([
            transport,
            "loopback",
            &format!("hold={N}"),
            &uid.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting pw-flood");
    let f = finish_flooders(vec![child]).remove(0);
    assert_eq!(f.count, N);
    let p = u64::from(f.pid);
    portwatch_tests::poll(Duration::from_secs(15), || {
        read_json_lines(&out)
            .iter()
            .any(|e| {
                action(e) == "listeners-folded"
                    && pid(e) == p
                    && e["portwatch"]["fold"]["final"] == true
            })
            .then_some(())
    })
    .expect("final fold report");
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().expect("agent").success());
    let events = read_json_lines(&out);
    let FoldCounts {
        sent,
        sent_ends,
        folded,
        folded_ends,
    } = fold_counts(&events, p, transport == "udp");
    let lost: Vec<&Value> = events
        .iter()
        .filter(|e| action(e) == "events-lost")
        .collect();
    eprintln!(
        "{transport}: held {N}: sent {sent} (ends {sent_ends}), folded {folded} (ends {folded_ends})"
    );
    assert!(lost.is_empty(), "losses: {lost:?}");
    assert_eq!(sent + folded, N, "sent + folded = opened");
    assert!(
        folded > 16_384,
        "more folded sockets open at once than fast slots"
    );
    assert_eq!(sent_ends, sent, "every sent start's end sent");
    assert_eq!(folded_ends, folded, "every folded start's end folded");
}

#[test]
fn more_folded_listeners_open_at_once_than_fast_slots_all_end_in_their_fold() {
    hold_many("tcp");
}

#[test]
fn more_folded_udp_sockets_open_at_once_than_fast_slots_all_end_in_their_fold() {
    hold_many("udp");
}

#[test]
fn tcp_flood_on_loopback_hides_no_risky_listener() {
    variant("tcp", "loopback");
}

#[test]
fn udp_flood_on_loopback_hides_no_risky_listener() {
    variant("udp", "loopback");
}

#[test]
fn wildcard_flood_is_folded_and_hides_no_risky_listener() {
    variant("tcp", "wildcard");
}

/// The agent's stdout goes through a pipe read slower than the flood's bulk output:
/// bulk events are dropped (and counted), urgent ones never.
#[test]
fn slow_pipe_keeps_every_risky_listener() {
    if !can_run_kernel_tests() {
        return;
    }
    let uid = flood_uid();
    let mut agent = portwatch_tests::spawn_watch(
        &["--no-snapshot", "--queue-events", "2048"],
        Stdio::piped(),
        Stdio::inherit(),
    );
    let _reap = Reap(agent.id());
    let stdout = agent.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = thread::spawn(move || {
        // About 1,000 lines a second: slower than the flooders' 4,000 bulk lines.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            if tx.send(v).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
    });
    let mut events = Vec::new();
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("sensor-started");
        let started = action(&v) == "sensor-started";
        events.push(v);
        if started {
            break;
        }
    }
    let flooders = start_flooders("tcp", "loopback", uid);
    thread::sleep(Duration::from_millis(500));
    let opened = open_risky_listeners();
    let _floods = finish_flooders(flooders);
    thread::sleep(Duration::from_secs(3));
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    // The agent drains its queue into the pipe before it exits.
    while let Ok(v) = rx.recv_timeout(Duration::from_secs(20)) {
        events.push(v);
    }
    assert!(agent.wait().expect("agent").success());
    let _ = reader.join();
    let me = std::process::id() as u64;
    print_latency(
        &events,
        &opened,
        "tcp loopback flood, to a slow pipe (written)",
    );
    let risky = events
        .iter()
        .filter(|e| action(e) == "listen-started" && pid(e) == me && port(e) == u64::from(RISKY))
        .count();
    assert_eq!(risky, K, "every risky listener reached the slow pipe");
    assert!(
        events
            .iter()
            .any(|e| action(e) == "risky-listener" && port(e) == u64::from(RISKY)),
        "the alert reached the slow pipe"
    );
    let lost: HashMap<String, u64> =
        events
            .iter()
            .filter(|e| action(e) == "events-lost")
            .fold(HashMap::new(), |mut m, e| {
                let l = &e["portwatch"]["lost"];
                *m.entry(l["lane"].as_str().unwrap_or("-").to_owned())
                    .or_default() += l["count"].as_u64().unwrap_or(0);
                m
            });
    eprintln!(
        "slow pipe: {} events read, lost by lane {lost:?}",
        events.len()
    );
    assert_eq!(lost.get("urgent"), None, "no urgent event lost");
}
