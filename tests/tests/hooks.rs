//! The two hook sets against the real kernel: which one runs, that `--hooks direct`
//! fails clearly where it cannot run, and that both report the same events for the same
//! socket activity (where this kernel runs both: Debian's 6.1 and 6.12 in the VM matrix).

use std::{
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
};

use portwatch::kernel::probes::{self, HooksChoice};
use portwatch_tests::{
    Agent, Marker, Value, action, agent_binary, can_run_kernel_tests, hooks_from_env, raw,
    socket_inode,
};

#[test]
fn sensor_started_names_the_hook_set_and_why() {
    if !can_run_kernel_tests() {
        return;
    }
    let agent = Agent::start(&["--no-snapshot"]);
    let hooks = agent.hooks();
    let set = hooks["set"].as_str().unwrap_or("");
    assert!(set == "stable" || set == "direct", "{hooks}");
    let via = hooks["via"].as_str().unwrap_or("");
    match set {
        // Every kernel portwatch is tested on (6.1, 6.12, this one) loads the sock_ops
        // flavour: a fallback to the tracepoint here would be a silent regression.
        "stable" => assert_eq!(via, "sock-ops+cgroup", "{hooks}"),
        _ => assert!(via == "fentry" || via == "kprobe", "{hooks}"),
    }
    assert!(
        hooks["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{hooks}"
    );
    assert!(
        hooks["attached"].as_array().is_some_and(|a| !a.is_empty()),
        "{hooks}"
    );
    println!("hook set here: {set} via {via}: {}", hooks["reason"]);
}

/// Where the direct set cannot run, asking for it is a one-line error that says what
/// to use instead (and the agent does not start).
#[test]
fn direct_where_unavailable_is_a_one_line_error() {
    if !can_run_kernel_tests() {
        return;
    }
    match Agent::try_start(&["--no-snapshot", "--hooks", "direct"]) {
        Ok(agent) => {
            println!(
                "skipped: this kernel runs the direct set ({}), so there is no error to check",
                agent.hooks()["via"]
            );
        }
        Err(_) => {
            let out = Command::new(agent_binary())
                .args(["watch", "--no-snapshot", "--hooks", "direct"])
                .output()
                .expect("running the agent");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "want one line on stderr: {stderr}");
            assert!(lines[0].starts_with("portwatch: error: "), "{stderr}");
            assert!(lines[0].contains("direct hook set"), "{stderr}");
            assert!(lines[0].contains("--hooks stable"), "{stderr}");
            assert_eq!(out.status.code(), Some(1), "exit status");
        }
    }
}

/// Fields that differ between two agents watching the same socket for reasons that
/// have nothing to do with the hooks: when each saw it and wrote it.
fn normalised(e: &Value) -> Value {
    let mut e = e.clone();
    if let Some(o) = e.as_object_mut() {
        o.remove("@timestamp");
    }
    // The kernel's task start time turned into wall-clock time with each agent's own
    // boot-time offset (read at its start): equal to the microsecond or so. The raw
    // start time is compared through process.entity_id, a hash of it.
    if let Some(o) = e["process"].as_object_mut() {
        o.remove("start");
    }
    if let Some(o) = e["event"].as_object_mut() {
        o.remove("created");
        o.remove("sequence");
        // A difference of two kernel timestamps.
        o.remove("duration");
    }
    e
}

/// The events of these sockets, normalised, in a fixed order: by socket, start before
/// end. (The stream's own order is kept within a lane only: a destination writes urgent
/// events, such as a wildcard listener's, ahead of bulk ones such as a loopback
/// listener's, so two agents may interleave the lanes differently.)
fn ours(events: &[Value], inodes: &[u64]) -> Vec<Value> {
    let mut v: Vec<Value> = events
        .iter()
        .filter(|e| {
            e["portwatch"]["socket"]["inode"]
                .as_u64()
                .is_some_and(|i| inodes.contains(&i))
        })
        .filter(|e| e["event"]["kind"] == "event")
        .map(normalised)
        .collect();
    v.sort_by_key(|e| {
        (
            e["portwatch"]["socket"]["inode"].as_u64(),
            e["event"]["type"][0] != "start",
        )
    });
    v
}

/// The same activity seen by a stable-set agent and a direct-set agent at once: TCP
/// IPv4 and IPv6 listeners (bound, and autobound by listen()), a failed listen(), a
/// listen() repeated on a listener, UDP IPv4 and IPv6 binds and their releases.
#[test]
fn both_hook_sets_report_identical_events() {
    if !can_run_kernel_tests() {
        return;
    }
    let direct_args = match hooks_from_env().as_deref() {
        Some("direct-kprobe") => ["--no-snapshot", "--hooks", "direct-kprobe"],
        _ => ["--no-snapshot", "--hooks", "direct"],
    };
    let direct = match Agent::try_start(&direct_args) {
        Ok(a) => a,
        Err(e) => {
            println!(
                "skipped: this kernel cannot run the direct hook set, so there is nothing \
                 to compare the stable set with ({e})"
            );
            return;
        }
    };
    let stable = Agent::start(&["--no-snapshot", "--hooks", "stable"]);
    assert_eq!(stable.hooks()["set"], "stable");
    assert_eq!(direct.hooks()["set"], "direct");
    same_events(stable, direct);
}

/// The stable set's sock_ops flavour (no tracepoint) and its tracepoint flavour report
/// the same events for the same activity, a listener shut down without a close included.
#[test]
fn sockops_and_tracepoint_flavours_report_identical_events() {
    if !can_run_kernel_tests() {
        return;
    }
    let ops = Agent::start(&["--no-snapshot", "--hooks", "stable"]);
    let tp = Agent::start(&["--no-snapshot", "--hooks", "stable-rawtp"]);
    assert_eq!(ops.hooks()["via"], "sock-ops+cgroup", "{}", ops.hooks());
    assert_eq!(
        ops.hooks()["programs"],
        serde_json::json!([
            "listen_ops",
            "udp_bind4",
            "udp_bind6",
            "sock_released",
            "udp_send4",
            "udp_send6"
        ]),
        "{}",
        ops.hooks()
    );
    assert_eq!(tp.hooks()["via"], "raw-tracepoint+cgroup", "{}", tp.hooks());
    same_events(ops, tp);
}

/// The stable set's two flavours of the state tracepoint (raw, where the kernel runs
/// it, and classic) report the same events for the same activity.
#[test]
fn raw_and_classic_state_tracepoints_report_identical_events() {
    if !can_run_kernel_tests() {
        return;
    }
    let raw = Agent::start(&["--no-snapshot", "--hooks", "stable-rawtp"]);
    let classic = Agent::start(&["--no-snapshot", "--hooks", "stable-classic"]);
    // Every kernel portwatch supports (>= 5.8, BTF) runs raw tracepoints: the fallback
    // is for a kernel that refuses them, and must not be taken here.
    assert_eq!(
        raw.hooks()["via"],
        "raw-tracepoint+cgroup",
        "{}",
        raw.hooks()
    );
    assert_eq!(
        classic.hooks()["via"],
        "tracepoint+cgroup",
        "{}",
        classic.hooks()
    );
    assert_eq!(classic.hooks()["programs"][0], "listen_state");
    same_events(raw, classic);
}

/// The kernel's own count of skipped runs (`recursion_misses`) is read for the tracing
/// program of the set (and only for it: cgroup programs are never skipped), and reads
/// as zero after ordinary activity. (A nonzero count needs an interrupt to fire the
/// same tracepoint inside the program's run: not something a test can time.)
#[test]
fn recursion_misses_of_the_state_tracepoint_are_read() {
    if !can_run_kernel_tests() {
        return;
    }
    for (choice, want) in [
        (HooksChoice::StableRawtp, "listen_rawtp"),
        (HooksChoice::StableClassic, "listen_state"),
    ] {
        let sensor = probes::load(&probes::Options {
            ring_bytes: 1 << 20,
            hooks: choice,
            fold_above: 0,
            fold_user_above: 0,
        })
        .expect("loading the sensor");
        assert_eq!(
            sensor.stats.guarded(),
            vec![want],
            "cgroup programs are not guarded"
        );
        for _ in 0..100 {
            drop(TcpListener::bind("127.0.0.1:0").unwrap());
        }
        let s = sensor.stats.read().expect("reading the kernel counters");
        assert_eq!(s.recursion_misses, 0, "{s:?}");
        println!("{want}: {s:?}");
    }
}

/// One line of an event for a failure message: what, whose, which socket.
fn brief(e: &Value) -> String {
    format!(
        "{} {} pid={} {}:{} inode={} {}",
        e["event"]["kind"].as_str().unwrap_or("?"),
        action(e),
        e["process"]["pid"],
        e["server"]["ip"],
        e["server"]["port"],
        e["portwatch"]["socket"]["inode"],
        e["message"].as_str().unwrap_or(""),
    )
}

/// Drive the activity above and check that agents `a` and `b` report identical events
/// for it, and lose none.
fn same_events(mut a: Agent, mut b: Agent) {
    let mut inodes = Vec::new();
    let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
    inodes.push(socket_inode(l4.as_raw_fd()));
    // A second listen() on a listener only resizes its backlog: not a new listener.
    assert_eq!(raw::listen(l4.as_raw_fd()), 0);
    let l6 = TcpListener::bind("[::1]:0").unwrap();
    inodes.push(socket_inode(l6.as_raw_fd()));
    let auto = raw::socket(libc::AF_INET6, libc::SOCK_STREAM);
    assert_eq!(raw::listen(auto), 0);
    inodes.push(socket_inode(auto));
    // A listen() that fails in get_port (second SO_REUSEADDR socket on one port).
    let s1 = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    let s2 = raw::socket(libc::AF_INET, libc::SOCK_STREAM);
    raw::set_reuseaddr(s1);
    raw::set_reuseaddr(s2);
    assert_eq!(raw::bind_v4(s1, [127, 0, 0, 1], 0), 0);
    let p = raw::local_port(s1);
    assert_eq!(raw::bind_v4(s2, [127, 0, 0, 1], p), 0);
    assert_eq!(raw::listen(s1), 0);
    assert_ne!(
        raw::listen(s2),
        0,
        "second listen on the same port must fail"
    );
    inodes.extend([socket_inode(s1), socket_inode(s2)]);
    // A listener shut down (it leaves LISTEN, its socket stays open), then closed.
    let shut = TcpListener::bind("127.0.0.1:0").unwrap();
    inodes.push(socket_inode(shut.as_raw_fd()));
    assert_eq!(
        unsafe { libc::shutdown(shut.as_raw_fd(), libc::SHUT_RDWR) },
        0
    );
    // A connection accepted on a listener (it is cloned from the listener, flags and
    // all): its states must not end or start anything.
    let acc = TcpListener::bind("127.0.0.1:0").unwrap();
    inodes.push(socket_inode(acc.as_raw_fd()));
    let client = std::net::TcpStream::connect(acc.local_addr().unwrap()).unwrap();
    let (server, _) = acc.accept().unwrap();
    inodes.extend([
        socket_inode(client.as_raw_fd()),
        socket_inode(server.as_raw_fd()),
    ]);
    drop((client, server, acc, shut));
    let u4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    inodes.push(socket_inode(u4.as_raw_fd()));
    let u6 = UdpSocket::bind("[::]:0").unwrap();
    inodes.push(socket_inode(u6.as_raw_fd()));
    drop((l4, l6, u4, u6));
    raw::close(auto);
    raw::close(s1);
    raw::close(s2);

    // A marker after everything: once both agents reported it, they reported the rest.
    // Known by its inode too (see `Marker`): `[::1]:0` above and this `127.0.0.1:0` got
    // the same port in the VM, and a drain for the port stopped at l6's start.
    let marker = Marker::new();
    let is_marker = |e: &Value| marker.started(e);
    let name = |g: &Agent| format!("{}/{}", g.hooks()["set"], g.hooks()["via"]);
    let (an, bn) = (name(&a), name(&b));
    let seen_a = a.drain_until(is_marker).to_vec();
    let seen_b = b.drain_until(is_marker).to_vec();
    let lost = |seen: &[Value]| seen.iter().any(|e| action(e) == "events-lost");
    let ea = ours(&seen_a, &inodes);
    let eb = ours(&seen_b, &inodes);
    // 6 listeners + 2 UDP sockets, each a start and an end; the failed listen() and
    // the connections nothing.
    let same = ea.len() == 16 && ea == eb && !lost(&seen_a) && !lost(&seen_b);
    if !same {
        // Everything both agents wrote until they exit, one line an event: a start the
        // test did not find by its inode may have come late, folded, or under another.
        let differs = ea
            .iter()
            .zip(&eb)
            .position(|(x, y)| x != y)
            .map(|i| format!("event {i} differs:\n{an}: {}\n{bn}: {}\n", ea[i], eb[i]))
            .unwrap_or_default();
        let (_, all_a) = a.stop();
        let (_, all_b) = b.stop();
        let brief = |all: &[Value]| all.iter().map(brief).collect::<Vec<_>>().join("\n");
        panic!(
            "{differs}the agents differ; the test's socket inodes: {inodes:?}\n\
             {an}: {} of ours (want 16)\n{}\n\
             {bn}: {} of ours\n{}",
            ea.len(),
            brief(&all_a),
            eb.len(),
            brief(&all_b),
        );
    }
    println!("identical: {} events from {an} and {bn}", ea.len());
}
