//! Risk classification and alerts against the real kernel: real sockets on the risky
//! ports, the agent's alert events checked for content.

use std::{
    io::Write,
    net::{TcpListener, UdpSocket},
};

use portwatch_tests::{Agent, Marker, Value, action, can_run_kernel_tests, is};

/// Three tests bind 0.0.0.0:11211 (memcached's port); they take turns.
static MEMCACHED_PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memcached_port() -> std::sync::MutexGuard<'static, ()> {
    MEMCACHED_PORT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn me() -> u32 {
    std::process::id()
}

fn alert_for(e: &Value, transport: &str, port: u16) -> bool {
    action(e) == "risky-listener"
        && e["network"]["transport"] == transport
        && e["server"]["port"] == port
        && e["process"]["pid"] == me()
}

/// Binds a marker listener and waits for it: every event caused before is then in.
fn settle(agent: &mut Agent) -> Vec<Value> {
    let marker = Marker::new();
    agent.drain_until(|e| marker.started(e)).to_vec()
}

fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn wildcard_memcached_tcp_and_udp_are_alerts_with_remediation() {
    if !can_run_kernel_tests() {
        return;
    }
    let _port = memcached_port();
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let tcp = TcpListener::bind("0.0.0.0:11211").expect("11211/tcp must be free for this test");
    let udp = UdpSocket::bind("0.0.0.0:11211").expect("11211/udp must be free for this test");
    for transport in ["tcp", "udp"] {
        let a = agent.expect("memcached alert", |e| alert_for(e, transport, 11211));
        assert_eq!(a["event"]["kind"], "alert", "{a}");
        assert_eq!(a["rule"]["id"], "memcached", "{a}");
        assert!(
            a["rule"]["name"].as_str().is_some_and(|n| !n.is_empty()),
            "{a}"
        );
        assert!(
            a["rule"]["description"]
                .as_str()
                .is_some_and(|n| !n.is_empty()),
            "{a}"
        );
        assert!(
            a["rule"]["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with("http")),
            "{a}"
        );
        assert!(
            a["event"]["severity"].as_u64().is_some_and(|s| s > 0),
            "{a}"
        );
        assert!(a["log"]["level"].as_str().is_some(), "{a}");
        let msg = a["message"].as_str().unwrap();
        assert!(msg.contains("11211") && msg.contains(transport), "{msg}");
        let steps = a["portwatch"]["alert"]["steps"].as_array().expect("steps");
        let commands: Vec<&str> = steps
            .iter()
            .flat_map(|s| s["commands"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        assert!(
            commands.iter().any(|c| c.starts_with("iptables")),
            "{commands:?}"
        );
        assert!(
            commands.iter().any(|c| c.starts_with("nft")),
            "{commands:?}"
        );
        assert!(
            commands.iter().any(|c| c.starts_with("firewall-cmd")),
            "{commands:?}"
        );
        // The underlying event stays in the stream, before its alert.
        let start = if transport == "tcp" {
            "listen-started"
        } else {
            "udp-bound"
        };
        let ev = agent.expect("underlying event", |e| is(e, start, me(), 11211));
        assert!(ev["event"]["sequence"].as_u64() < a["event"]["sequence"].as_u64());
        assert_eq!(
            ev["portwatch"]["exposure"]["scope"], "all-interfaces",
            "{ev}"
        );
    }
    drop((tcp, udp));
}

#[test]
fn loopback_mysql_and_mdns_are_not_alerts() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let mysql = TcpListener::bind("127.0.0.1:3306").expect("127.0.0.1:3306 must be free");
    let mdns = UdpSocket::bind("[::1]:5353").expect("[::1]:5353 must be free");
    let events = settle(&mut agent);
    let mine = |act: &str, port: u16| {
        events
            .iter()
            .find(|e| is(e, act, me(), port))
            .cloned()
            .expect("event missing")
    };
    let m = mine("listen-started", 3306);
    assert_eq!(m["portwatch"]["risk"]["rule"], "mysql", "{m}");
    assert_eq!(m["portwatch"]["risk"]["outcome"], "loopback-only", "{m}");
    let d = mine("udp-bound", 5353);
    assert_eq!(d["portwatch"]["exposure"]["scope"], "loopback", "{d}");
    assert!(
        !events.iter().any(|e| action(e) == "risky-listener"
            && e["process"]["pid"] == me()
            && (e["server"]["port"] == 3306 || e["server"]["port"] == 5353)),
        "loopback listeners raised an alert"
    );
    drop((mysql, mdns));
}

#[test]
fn allow_rule_silences_and_deny_rule_raises() {
    if !can_run_kernel_tests() {
        return;
    }
    let _port = memcached_port();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let rules = rules_file(&format!(
        "[[allow]]\nname = \"test-allow\"\nport = 11211\nexecutable = \"{}\"\n\n\
         [[deny]]\nname = \"no-4444\"\nport = 44444\nreason = \"never on this host\"\n",
        exe.display()
    ));
    let path = rules.path().to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--no-snapshot", "--rules", &path]);
    let allowed = TcpListener::bind("0.0.0.0:11211").expect("11211/tcp must be free");
    let denied = TcpListener::bind("127.0.0.1:44444").expect("44444/tcp must be free");
    let a = agent.expect("deny alert", |e| alert_for(e, "tcp", 44444));
    assert_eq!(a["rule"]["id"], "no-4444", "{a}");
    let events = settle(&mut agent);
    let ev = events
        .iter()
        .find(|e| is(e, "listen-started", me(), 11211))
        .expect("11211 event");
    assert_eq!(ev["portwatch"]["risk"]["allowed_by"], "test-allow", "{ev}");
    assert!(
        !events.iter().any(|e| alert_for(e, "tcp", 11211)),
        "allowed listener alerted"
    );
    drop((allowed, denied));
}

#[test]
fn restart_loop_alerts_once_and_counts_the_rest() {
    if !can_run_kernel_tests() {
        return;
    }
    let _port = memcached_port();
    let mut agent = Agent::start(&["--no-snapshot"]);
    const RESTARTS: usize = 5;
    for _ in 0..RESTARTS {
        let l = TcpListener::bind("0.0.0.0:11211").expect("11211/tcp must be free");
        drop(l);
    }
    settle(&mut agent);
    let (status, events) = agent.stop();
    assert!(status.success());
    let starts = events
        .iter()
        .filter(|e| is(e, "listen-started", me(), 11211))
        .count();
    let alerts = events.iter().filter(|e| alert_for(e, "tcp", 11211)).count();
    let folded: u64 = events
        .iter()
        .filter(|e| action(e) == "risky-listener-repeated" && e["server"]["port"] == 11211)
        .filter_map(|e| e["portwatch"]["folded"].as_u64())
        .sum();
    assert_eq!(
        starts, RESTARTS,
        "every underlying event stays in the stream"
    );
    assert_eq!(alerts, 1, "one alert for the restart loop");
    assert_eq!(
        folded,
        RESTARTS as u64 - 1,
        "the folded repeats are counted"
    );
}

#[test]
fn bad_rules_file_is_a_one_line_error() {
    let rules = rules_file("[[allow]]\nport = 70000\n");
    let out = std::process::Command::new(portwatch_tests::agent_binary())
        .args(["rules", "check"])
        .arg(rules.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(":2:"), "names the line: {err}");
}
