//! The two hook sets against the real kernel: which one runs, that `--hooks direct`
//! fails clearly where it cannot run, and that both report the same events for the same
//! socket activity (where this kernel runs both: Debian's 6.1 and 6.12 in the VM matrix).

use std::{
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
};

use portwatch_tests::{
    Agent, Value, action, agent_binary, can_run_kernel_tests, hooks_from_env, is, raw, socket_inode,
};

fn me() -> u32 {
    std::process::id()
}

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
        "stable" => assert_eq!(via, "tracepoint+cgroup", "{hooks}"),
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
    let mut direct = match Agent::try_start(&direct_args) {
        Ok(a) => a,
        Err(e) => {
            println!(
                "skipped: this kernel cannot run the direct hook set, so there is nothing \
                 to compare the stable set with ({e})"
            );
            return;
        }
    };
    let mut stable = Agent::start(&["--no-snapshot", "--hooks", "stable"]);
    assert_eq!(stable.hooks()["set"], "stable");
    assert_eq!(direct.hooks()["set"], "direct");

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
    inodes.extend([socket_inode(a), socket_inode(b)]);
    let u4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    inodes.push(socket_inode(u4.as_raw_fd()));
    let u6 = UdpSocket::bind("[::]:0").unwrap();
    inodes.push(socket_inode(u6.as_raw_fd()));
    drop((l4, l6, u4, u6));
    raw::close(auto);
    raw::close(a);
    raw::close(b);

    // A marker after everything: once both agents reported it, they reported the rest.
    let marker = TcpListener::bind("127.0.0.1:0").unwrap();
    let mp = marker.local_addr().unwrap().port();
    let seen_stable = stable
        .drain_until(|e| is(e, "listen-started", me(), mp))
        .to_vec();
    let seen_direct = direct
        .drain_until(|e| is(e, "listen-started", me(), mp))
        .to_vec();
    for (name, seen) in [("stable", &seen_stable), ("direct", &seen_direct)] {
        let lost: Vec<&Value> = seen.iter().filter(|e| action(e) == "events-lost").collect();
        assert!(lost.is_empty(), "{name} set lost events: {lost:?}");
    }
    let s = ours(&seen_stable, &inodes);
    let d = ours(&seen_direct, &inodes);
    // 4 listeners + 2 UDP sockets, each a start and an end; the failed listen() nothing.
    assert_eq!(s.len(), 12, "stable set events: {s:#?}");
    for (i, (se, de)) in s.iter().zip(&d).enumerate() {
        assert_eq!(se, de, "event {i} differs:\nstable: {se}\ndirect: {de}");
    }
    assert_eq!(s.len(), d.len(), "direct set events: {d:#?}");
    println!(
        "identical: {} events from each set (via {})",
        s.len(),
        direct.hooks()["via"]
    );
}
