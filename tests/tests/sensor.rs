//! The sensor core against the real kernel: each test does the socket work itself and
//! waits for the event it caused, filtered to its own pid and port.

use std::{
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use portwatch_tests::{
    Agent, FoldCounts, Marker, Value, action, can_run_kernel_tests, comm_of, fold_counts, is, raw,
    socket_inode,
};

fn me() -> u32 {
    std::process::id()
}

fn check_listener_event(e: &Value, transport: &str, ip: &str, p: u16) {
    assert_eq!(e["network"]["transport"], transport, "{e}");
    assert_eq!(e["server"]["ip"], ip, "{e}");
    assert_eq!(e["server"]["port"], p, "{e}");
    assert_eq!(e["process"]["pid"], me(), "{e}");
    assert_eq!(e["process"]["name"], comm_of(me()), "{e}");
    assert_eq!(e["user"]["id"], "0", "{e}");
    assert!(
        e["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{e}"
    );
    assert!(e["event"]["sequence"].as_u64().is_some(), "{e}");
    assert!(
        e["portwatch"]["socket"]["inode"]
            .as_u64()
            .is_some_and(|i| i > 0),
        "{e}"
    );
}

fn tcp_start_stop(bind: &str, ip: &str, family: &str) {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let l = TcpListener::bind(bind).unwrap();
    let p = l.local_addr().unwrap().port();
    let inode = socket_inode(l.as_raw_fd());
    let start = agent.expect("listen-started", |e| is(e, "listen-started", me(), p));
    check_listener_event(&start, "tcp", ip, p);
    assert_eq!(start["network"]["type"], family);
    assert_eq!(start["portwatch"]["socket"]["inode"], inode);
    drop(l);
    let stop = agent.expect("listen-stopped", |e| is(e, "listen-stopped", me(), p));
    check_listener_event(&stop, "tcp", ip, p);
    assert!(
        stop["event"]["duration"].as_u64().is_some_and(|d| d > 0),
        "{stop}"
    );
    assert_eq!(stop["process"]["entity_id"], start["process"]["entity_id"]);
    assert_eq!(stop["portwatch"]["socket"]["inode"], inode);
    let (status, _) = agent.stop();
    assert!(status.success(), "agent exit: {status}");
}

#[test]
fn tcp_ipv4_listen_start_and_stop() {
    tcp_start_stop("127.0.0.1:0", "127.0.0.1", "ipv4");
}

#[test]
fn tcp_ipv6_listen_start_and_stop() {
    tcp_start_stop("[::1]:0", "::1", "ipv6");
}

fn udp_bind_release(bind: &str, ip: &str) {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let s = UdpSocket::bind(bind).unwrap();
    let p = s.local_addr().unwrap().port();
    let bound = agent.expect("udp-bound", |e| is(e, "udp-bound", me(), p));
    check_listener_event(&bound, "udp", ip, p);
    drop(s);
    let released = agent.expect("udp-released", |e| is(e, "udp-released", me(), p));
    check_listener_event(&released, "udp", ip, p);
    assert!(
        released["event"]["duration"]
            .as_u64()
            .is_some_and(|d| d > 0)
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn udp_ipv4_bind_and_release() {
    udp_bind_release("127.0.0.1:0", "127.0.0.1");
}

#[test]
fn udp_ipv6_bind_and_release() {
    udp_bind_release("[::1]:0", "::1");
}

#[test]
fn listen_without_bind_reports_the_assigned_port() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let fd = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    assert_eq!(raw::listen(fd), 0);
    let p = raw::local_port(fd);
    assert_ne!(p, 0);
    let e = agent.expect("listen-started on the autobound port", |e| {
        is(e, "listen-started", me(), p)
    });
    assert_eq!(e["server"]["ip"], "0.0.0.0");
    raw::close(fd);
    agent.expect("listen-stopped", |e| is(e, "listen-stopped", me(), p));
}

#[test]
fn failed_listen_is_not_reported() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    // Two SO_REUSEADDR sockets may bind one port, but only one may listen on it: the
    // second listen() enters LISTEN, fails in get_port() and goes back to CLOSE.
    let a = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    let b = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    raw::set_reuseaddr(a);
    raw::set_reuseaddr(b);
    assert_eq!(raw::bind_v4(a, [127, 0, 0, 1], 0), 0);
    let p = raw::local_port(a);
    assert_eq!(raw::bind_v4(b, [127, 0, 0, 1], p), 0);
    assert_eq!(raw::listen(a), 0);
    assert_ne!(
        raw::listen(b),
        0,
        "second listen on the same port must fail"
    );
    let failed_inode = socket_inode(b);
    // A marker listener after the failure: once its event is in, the failure's would be.
    let marker = Marker::new();
    let seen = agent.drain_until(|e| marker.started(e)).to_vec();
    assert!(
        seen.iter().any(|e| is(e, "listen-started", me(), p)),
        "first listen reported"
    );
    let bogus: Vec<&Value> = seen
        .iter()
        .filter(|e| e["portwatch"]["socket"]["inode"] == failed_inode)
        .collect();
    assert!(bogus.is_empty(), "failed listen() was reported: {bogus:?}");
    raw::close(a);
    raw::close(b);
}

#[test]
fn listener_living_under_a_millisecond_is_caught() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let t = Instant::now();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    let lived = t.elapsed();
    assert!(
        lived < Duration::from_millis(1),
        "listener lived {lived:?}, test is void"
    );
    agent.expect("listen-started", |e| is(e, "listen-started", me(), p));
    let stop = agent.expect("listen-stopped", |e| is(e, "listen-stopped", me(), p));
    let d = stop["event"]["duration"].as_u64().expect("duration");
    assert!(d > 0 && d < 1_000_000, "duration {d} ns");
}

#[test]
fn burst_of_1000_listeners_is_fully_reported_or_counted_lost() {
    if !can_run_kernel_tests() {
        return;
    }
    // Folding off: the burst plus its marker is above the default budget of 1,000 a
    // second, and this test is about the one-by-one path (tests/flood.rs covers folds).
    let mut agent = Agent::start(&["--no-snapshot", "--fold-above", "0"]);
    const N: usize = 1000;
    // Ports are reused by the kernel within the burst: match on socket inodes.
    let mut inodes = std::collections::HashSet::new();
    let t = Instant::now();
    for _ in 0..N {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        inodes.insert(socket_inode(l.as_raw_fd()));
    }
    let took = t.elapsed();
    let marker = Marker::new();
    agent.drain_until(|e| marker.started(e));
    let (status, events) = agent.stop();
    assert!(status.success());
    let ours = |e: &&Value| {
        e["portwatch"]["socket"]["inode"]
            .as_u64()
            .is_some_and(|i| inodes.contains(&i))
    };
    let started = events
        .iter()
        .filter(|e| action(e) == "listen-started")
        .filter(ours)
        .count();
    let stopped = events
        .iter()
        .filter(|e| action(e) == "listen-stopped")
        .filter(ours)
        .count();
    let lost: u64 = events
        .iter()
        .filter(|e| action(e) == "events-lost")
        .map(|e| e["portwatch"]["lost"]["count"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "burst: {N} listeners opened and closed in {took:?}; reported {started} started, \
         {stopped} stopped; events-lost reported {lost}"
    );
    assert!(
        started + stopped + lost as usize >= 2 * N,
        "shortfall not accounted: started {started} + stopped {stopped} + lost {lost} < {}",
        2 * N
    );
    if lost == 0 {
        assert_eq!(started, N, "every listener reported");
    }
}

#[test]
fn agent_leaves_no_program_attached_after_exit() {
    if !can_run_kernel_tests() {
        return;
    }
    // Identify this agent's programs by id (taken while it runs), not by name alone:
    // another portwatch on the host (a parallel test run) loads programs of the same names.
    let names: Vec<&str> = portwatch::kernel::probes::programs().collect();
    let ours = || -> Vec<(u32, String)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| Some((p.id(), p.name_as_str()?.to_owned())))
            .filter(|(_, n)| names.contains(&n.as_str()))
            .collect()
    };
    let before: Vec<u32> = ours().into_iter().map(|(id, _)| id).collect();
    let agent = Agent::start(&["--no-snapshot"]);
    // The programs of the hook set this agent chose (stable or direct).
    let expected = agent.hooks()["programs"].as_array().map_or(0, |p| p.len());
    assert!(
        expected > 0,
        "sensor-started names no programs: {}",
        agent.hooks()
    );
    let loaded: Vec<(u32, String)> = ours()
        .into_iter()
        .filter(|(id, _)| !before.contains(id))
        .collect();
    assert!(
        loaded.len() >= expected,
        "programs while running: {loaded:?}, want {}",
        agent.hooks()["programs"]
    );
    let (status, events) = agent.stop();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(events.iter().any(|e| action(e) == "sensor-started"));
    // Program teardown is asynchronous in the kernel (RCU): poll, with a deadline.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<u32> = ours().into_iter().map(|(id, _)| id).collect();
        let left: Vec<&(u32, String)> = loaded.iter().filter(|(id, _)| now.contains(id)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "still loaded after exit: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `IORING_OP_LISTEN` (Linux 6.11+) never passes through the listen() syscall: an
/// implant listening this way must not be invisible.
#[test]
fn io_uring_listen_is_reported() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here ({e})");
            return;
        }
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err()
        || !probe.is_supported(io_uring::opcode::Listen::CODE)
    {
        eprintln!("skipped: this kernel has no IORING_OP_LISTEN (needs Linux 6.11+)");
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let fd = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    assert_eq!(raw::bind_v4(fd, [127, 0, 0, 1], 0), 0);
    let p = raw::local_port(fd);
    let sqe = io_uring::opcode::Listen::new(io_uring::types::Fd(fd), 16)
        .build()
        .user_data(7);
    unsafe { ring.submission().push(&sqe).expect("queue the listen") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!(cqe.result(), 0, "IORING_OP_LISTEN failed");
    let e = agent.expect("listen-started through io_uring", |e| {
        is(e, "listen-started", me(), p)
    });
    assert_eq!(e["portwatch"]["socket"]["inode"], socket_inode(fd), "{e}");
    raw::close(fd);
    agent.expect("listen-stopped", |e| is(e, "listen-stopped", me(), p));
}

/// Each connection accepted on a listener is cloned from it (LISTEN -> SYN_RECV in the
/// tracepoint): that must never read as the listener stopping.
#[test]
fn accepted_connections_do_not_end_the_listener() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    for _ in 0..3 {
        let c = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
        let (s, _) = l.accept().unwrap();
        drop((c, s));
    }
    let marker = Marker::new();
    let seen = agent.drain_until(|e| marker.started(e)).to_vec();
    let stops = seen
        .iter()
        .filter(|e| action(e) == "listen-stopped" && e["server"]["port"] == p);
    assert_eq!(
        stops.count(),
        0,
        "accepting connections reported the listener as stopped"
    );
    drop(l);
    agent.expect("the real listen-stopped", |e| {
        is(e, "listen-stopped", me(), p)
    });
}

/// Above its budget a process's starts are folded in the kernel, and every start and end
/// is still accounted for exactly: here with a budget of 50 a second, so that the test is
/// quick on every kernel of the matrix (and under emulation), with whichever hook set
/// the agent runs (the direct set folds through the same code).
fn fold_accounts_for_every_start(udp: bool) {
    if !can_run_kernel_tests() {
        return;
    }
    let agent = Agent::start(&["--no-snapshot", "--fold-above", "50"]);
    const N: usize = 400;
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..N {
        let p = if udp {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        } else {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        ports.insert(p);
    }
    let (sent, folded) = check_folds(agent, N as u64, &ports, udp);
    println!("fold: {N} starts: {sent} sent, {folded} folded");
}

/// Stop the agent once this process's final fold report covers `starts`, then check
/// its accounting: every start sent or folded, every sent start's end sent and every
/// folded one's counted in its fold, the kernel's per-process totals the same, nothing
/// lost, and the ports reported (sent and folded) exactly `ports`. Returns (sent, folded).
fn check_folds(
    mut agent: Agent,
    starts: u64,
    ports: &std::collections::BTreeSet<u16>,
    udp: bool,
) -> (u64, u64) {
    let start = if udp { "udp-bound" } else { "listen-started" };
    let mine = |e: &Value| e["process"]["pid"] == me();
    agent.expect("a final listeners-folded", |e| {
        action(e) == "listeners-folded"
            && mine(e)
            && e["portwatch"]["fold"]["final"] == true
            && e["portwatch"]["fold"]["process_sent"].as_u64().unwrap_or(0)
                + e["portwatch"]["fold"]["process_folded"]
                    .as_u64()
                    .unwrap_or(0)
                >= starts
    });
    let (status, events) = agent.stop();
    assert!(status.success());
    let folds: Vec<&Value> = events
        .iter()
        .filter(|e| action(e) == "listeners-folded" && mine(e))
        .collect();
    let FoldCounts {
        sent,
        sent_ends: ended,
        folded,
        folded_ends,
    } = fold_counts(&events, u64::from(me()), udp);
    println!("ends: {ended} sent, {folded_ends} folded");
    assert!(folded > 0, "nothing was folded");
    assert_eq!(sent + folded, starts, "sent + folded = generated");
    assert_eq!(ended, sent, "every sent start's end sent");
    assert_eq!(folded_ends, folded, "every folded start's end folded");
    let last = &folds.last().unwrap()["portwatch"]["fold"];
    assert_eq!(last["process_sent"].as_u64(), Some(sent), "{last}");
    assert_eq!(last["process_folded"].as_u64(), Some(folded), "{last}");
    assert_eq!(last["process_lost"].as_u64(), Some(0), "{last}");
    assert_eq!(last["scope"], "loopback");
    let mut seen: std::collections::BTreeSet<u16> = events
        .iter()
        .filter(|e| action(e) == start && mine(e))
        .map(|e| e["server"]["port"].as_u64().unwrap() as u16)
        .collect();
    for f in &folds {
        for part in f["portwatch"]["fold"]["ports"].as_str().unwrap().split(',') {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            seen.extend(lo.parse::<u16>().unwrap()..=hi.parse::<u16>().unwrap());
        }
    }
    assert_eq!(
        &seen, ports,
        "the reported ports are exactly the ports used"
    );
    (sent, folded)
}

/// The local port of a socket, by `getsockname()`.
fn bound_port(fd: i32) -> u16 {
    let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a socket this test owns and a buffer of the size given.
    let r = unsafe { libc::getsockname(fd, (&raw mut a).cast(), &mut len) };
    assert_eq!(r, 0, "getsockname");
    u16::from_be(a.sin_port)
}

/// Folded listeners end in every way a listener can: closed while listening, shut down
/// first, and shut down then listening again (a second start) before the close. Every
/// start is sent or folded and every end is sent or counted in its fold, whichever way
/// the hook set learns of it (the sock_ops flavour leaves folded listeners unwatched
/// and counts their ends at release).
#[test]
fn folded_listeners_shut_down_or_listening_again_still_end_in_their_fold() {
    if !can_run_kernel_tests() {
        return;
    }
    let agent = Agent::start(&["--no-snapshot", "--fold-above", "50"]);
    const N: usize = 300;
    let mut ports = std::collections::BTreeSet::new();
    let mut starts = 0u64;
    for i in 0..N {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        ports.insert(l.local_addr().unwrap().port());
        starts += 1;
        if i % 3 >= 1 {
            // SAFETY: plain calls on a socket this test owns.
            assert_eq!(
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) },
                0,
                "shutdown"
            );
        }
        if i % 3 == 2 {
            // The port was released with the listen (bound to port 0): a new one.
            assert_eq!(unsafe { libc::listen(fd, 8) }, 0, "listen again");
            ports.insert(bound_port(fd));
            starts += 1;
        }
        drop(l);
    }
    let (sent, folded) = check_folds(agent, starts, &ports, false);
    println!("{starts} starts: {sent} sent, {folded} folded");
    assert!(folded > N as u64 / 2, "most were folded");
}

/// The kernel counts at most 512 folds at once; the agent deletes a fold once its
/// process is gone and reported, and the entry is used again. More short-lived folding
/// processes than that, one after another (TCP and UDP in turn): each is counted
/// exactly in a fold of its own, none inherits an earlier process's counts from a
/// reused entry, and none is sent one by one for want of an entry.
#[test]
fn more_folding_processes_than_fold_entries_each_count_exactly() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--fold-above",
        "5",
        "--fold-user-above",
        "0",
    ]);
    const CHILDREN: usize = 600;
    const STARTS: usize = 20;
    let mut children = Vec::new();
    let began = Instant::now();
    for i in 0..CHILDREN {
        let udp = i % 2 == 1;
        // SAFETY: the child makes only async-signal-safe calls (socket, bind, listen,
        // close, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            for _ in 0..STARTS {
                let ty = if udp {
                    libc::SOCK_DGRAM
                } else {
                    libc::SOCK_STREAM
                };
                // SAFETY: a plain call (no allocation, no panic: this is a forked child).
                let fd = unsafe { libc::socket(libc::AF_INET, ty, 0) };
                let ok = fd >= 0
                    && raw::bind_v4(fd, [127, 0, 0, 1], 0) == 0
                    && (udp || raw::listen(fd) == 0);
                raw::close(fd);
                if !ok {
                    unsafe { libc::_exit(1) };
                }
            }
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        children.push((pid as u64, udp));
        // 60 processes a second: each fold lives about 3 s after its process (two agent
        // ticks to see it gone), so about 200 are counted at once, well under 512.
        let due = began + Duration::from_secs_f64((i + 1) as f64 / 60.0);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let mut waiting: std::collections::BTreeSet<u64> = children.iter().map(|c| c.0).collect();
    while !waiting.is_empty() {
        let hit = agent.wait_for(Duration::from_secs(30), |e| {
            action(e) == "listeners-folded"
                && e["portwatch"]["fold"]["final"] == true
                && waiting.contains(&portwatch_tests::pid(e))
        });
        let Some(e) = hit else {
            panic!("no final fold report for {} processes", waiting.len());
        };
        waiting.remove(&portwatch_tests::pid(&e));
    }
    let (_, events) = agent.stop();
    for (pid, udp) in children {
        let c = fold_counts(&events, pid, udp);
        assert!(
            c.sent == 5 && c.sent_ends == 5 && c.folded == 15 && c.folded_ends == 15,
            "pid {pid} (udp {udp}): {c:?}, want 5 sent and 15 folded, each ended"
        );
    }
    println!("{CHILDREN} folding processes, each 5 sent + 15 folded");
}

#[test]
fn tcp_starts_above_the_budget_are_folded_and_counted_exactly() {
    fold_accounts_for_every_start(false);
}

#[test]
fn udp_binds_above_the_budget_are_folded_and_counted_exactly() {
    fold_accounts_for_every_start(true);
}

/// A process over its budget is folded until its one-second window ends, and no longer:
/// the next window's starts are sent again, up to the budget. (A CPU that folded a start
/// of a process remembers it, so the next start skips the budget lookup; that memory
/// must end with the window, and follow the process from one fold to another: the second
/// burst alternates loopback and wildcard binds, two folds.)
#[test]
fn a_budget_window_that_ends_lets_starts_through_again() {
    if !can_run_kernel_tests() {
        return;
    }
    const LIMIT: u64 = 20;
    const BURST: u64 = 100;
    let mut agent = Agent::start(&["--no-snapshot", "--fold-above", &LIMIT.to_string()]);
    let burst = |wildcard_too: bool| {
        for i in 0..BURST {
            let ip = if wildcard_too && i % 2 == 1 {
                "0.0.0.0:0"
            } else {
                "127.0.0.1:0"
            };
            drop(UdpSocket::bind(ip).unwrap());
        }
    };
    burst(false);
    std::thread::sleep(Duration::from_millis(1300));
    burst(true);
    let mine = |e: &Value| e["process"]["pid"] == me();
    agent.expect("final listeners-folded covering both bursts", |e| {
        let f = &e["portwatch"]["fold"];
        action(e) == "listeners-folded"
            && mine(e)
            && f["final"] == true
            && f["process_sent"].as_u64().unwrap_or(0) + f["process_folded"].as_u64().unwrap_or(0)
                >= 2 * BURST
    });
    let (status, events) = agent.stop();
    assert!(status.success());
    let c = fold_counts(&events, u64::from(me()), true);
    println!("{c:?}");
    assert_eq!(c.sent, 2 * LIMIT, "{LIMIT} sent in each window: {c:?}");
    assert_eq!(c.folded, 2 * (BURST - LIMIT), "the rest folded: {c:?}");
    assert_eq!(c.sent_ends, c.sent, "{c:?}");
    assert_eq!(c.folded_ends, c.folded, "{c:?}");
    let folds: Vec<&Value> = events
        .iter()
        .filter(|e| action(e) == "listeners-folded" && mine(e))
        .map(|e| &e["portwatch"]["fold"])
        .collect();
    let in_scope = |scope: &str| -> u64 {
        folds
            .iter()
            .filter(|f| f["scope"] == scope)
            .map(|f| f["started"].as_u64().unwrap())
            .sum()
    };
    assert!(in_scope("wildcard") > 0, "{folds:?}");
    assert_eq!(in_scope("loopback") + in_scope("wildcard"), c.folded);
    let last = folds.last().unwrap();
    assert_eq!(last["process_sent"].as_u64(), Some(c.sent), "{last}");
    assert_eq!(last["process_folded"].as_u64(), Some(c.folded), "{last}");
    assert_eq!(last["process_lost"].as_u64(), Some(0), "{last}");
}

/// A UDP-Lite socket (protocol 136) bound to a risky port is a listener like any other:
/// reported live (`network.transport: udplite`), alerted on, ended, and found by the
/// startup snapshot (/proc/net/udplite) when it was bound before the agent.
#[test]
fn udplite_binds_are_reported_live_and_by_the_snapshot() {
    if !can_run_kernel_tests() {
        return;
    }
    const IPPROTO_UDPLITE: i32 = 136;
    // SAFETY: probing socket(2) support; the fd is closed at once.
    let probe = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            IPPROTO_UDPLITE,
        )
    };
    if probe < 0 {
        eprintln!("skipped: this kernel has no UDP-Lite (so no UDP-Lite listener can exist)");
        return;
    }
    raw::close(probe);
    let bind = |port: u16| -> (i32, u16) {
        // SAFETY: plain socket syscalls on a fd this test owns.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                IPPROTO_UDPLITE,
            )
        };
        assert!(fd >= 0, "socket(AF_INET, SOCK_DGRAM, IPPROTO_UDPLITE)");
        raw::set_reuseaddr(fd);
        assert_eq!(raw::bind_v4(fd, [0, 0, 0, 0], port), 0, "bind");
        (fd, raw::local_port(fd))
    };
    // Bound before the agent: the snapshot must find it. (CLOEXEC: a socket the agent
    // inherited would be its own, and never reported.)
    let (before, pb) = bind(0);
    let mut agent = Agent::start(&[]);
    let present = agent
        .wait_for(Duration::from_secs(10), |e| {
            action(e) == "listener-present" && e["server"]["port"] == pb
        })
        .unwrap_or_else(|| {
            panic!(
                "no listener-present for port {pb}: {:?}; /proc/net/udplite: {}",
                agent.seen.iter().map(action).collect::<Vec<_>>(),
                std::fs::read_to_string("/proc/net/udplite").unwrap_or_default()
            )
        });
    assert_eq!(present["network"]["transport"], "udplite", "{present}");
    let (fd, p) = bind(11211);
    let started = agent.expect("udp-bound for the udplite socket", |e| {
        is(e, "udp-bound", me(), p)
    });
    assert_eq!(started["network"]["transport"], "udplite", "{started}");
    assert_eq!(started["server"]["ip"], "0.0.0.0");
    agent.expect("its alert", |e| {
        action(e) == "risky-listener" && e["server"]["port"] == p && e["process"]["pid"] == me()
    });
    raw::close(fd);
    let ended = agent.expect("udp-released", |e| is(e, "udp-released", me(), p));
    assert_eq!(ended["network"]["transport"], "udplite");
    raw::close(before);
    agent.stop();
}

/// A risky listener inside a fold still raises its alert: the fold's port set is
/// classified like listeners of their own.
#[test]
fn a_risky_port_inside_a_fold_raises_its_alert() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--fold-above", "50"]);
    // Spend the budget, then (within the same second) bind the risky port.
    for _ in 0..100 {
        drop(UdpSocket::bind("127.0.0.1:0").unwrap());
    }
    let risky = UdpSocket::bind("0.0.0.0:11211").unwrap();
    let alert = agent.expect("the alert from the fold", |e| {
        action(e) == "risky-listener" && e["server"]["port"] == 11211 && e["process"]["pid"] == me()
    });
    assert!(
        alert["portwatch"]["fold"].is_object(),
        "the alert came from a fold (the bind was over budget): {alert}"
    );
    assert_eq!(alert["portwatch"]["fold"]["scope"], "wildcard");
    assert_eq!(alert["rule"]["id"], "memcached");
    drop(risky);
    agent.stop();
}
