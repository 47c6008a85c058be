//! Sinks against real receivers: Debian's rsyslog (unix datagram, UDP and TCP inputs,
//! RFC 5424 parsed by rsyslog itself) and JSON-lines receivers on TCP and unix sockets
//! that go away and come back.

use std::{
    io::{BufRead as _, BufReader},
    net::{TcpListener, UdpSocket},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use portwatch_tests::{Agent, Value, action, can_run_kernel_tests, poll, port};

fn me() -> u32 {
    std::process::id()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// rsyslogd in the foreground with a private configuration: inputs on a unix socket,
/// UDP and TCP; every message to one file, one line each, with the fields rsyslog
/// parsed out of the RFC 5424 header.
struct Rsyslog {
    child: Child,
    out: PathBuf,
    sock: PathBuf,
    udp: u16,
    tcp: u16,
    _dir: tempfile::TempDir,
}

impl Rsyslog {
    fn start() -> Option<Rsyslog> {
        let Ok(bin) = which("rsyslogd") else {
            eprintln!("skipped: rsyslogd is not installed (cargo xtask setup installs it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (out, sock) = (d.join("out.log"), d.join("log.sock"));
        let (udp, tcp) = (free_udp_port(), free_port());
        let conf = format!(
            r#"global(workDirectory="{d}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{sock}" UseSpecialParser="off" ParseHostname="on")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="string"
  string="%inputname%|%pri%|%hostname%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\n")
*.* action(type="omfile" file="{out}" template="fields")
"#,
            d = d.display(),
            sock = sock.display(),
            out = out.display(),
        );
        let conf_path = d.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(d.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Rsyslog {
            child,
            out,
            sock,
            udp,
            tcp,
            _dir: dir,
        };
        // Ready when all three inputs exist.
        poll(Duration::from_secs(10), || {
            (r.sock.exists() && TcpListener::bind(("127.0.0.1", r.tcp)).is_err()).then_some(())
        })
        .expect("rsyslogd did not open its inputs");
        Some(r)
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> std::io::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(std::io::ErrorKind::NotFound.into())
}

/// One listener reaches rsyslog three times (unix socket, UDP, TCP), each parsed by
/// rsyslog as RFC 5424: app-name, msgid, structured data, and the event JSON as MSG.
#[test]
fn syslog_rfc5424_reaches_a_real_rsyslog_over_unix_udp_and_tcp() {
    if !can_run_kernel_tests() {
        return;
    }
    let Some(rs) = Rsyslog::start() else { return };
    let unix = format!("unix:{}", rs.sock.display());
    let udp = format!("udp:127.0.0.1:{}", rs.udp);
    let tcp = format!("tcp:127.0.0.1:{}", rs.tcp);
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--stdout",
        "--syslog",
        &unix,
        "--syslog",
        &udp,
        "--syslog",
        &tcp,
    ]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    agent.expect("the listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == u64::from(p)
    });
    let want = format!("port=\"{p}\"");
    let got = poll(Duration::from_secs(10), || {
        let hits: Vec<String> = rs
            .lines()
            .into_iter()
            .filter(|l| l.contains(&want) && l.contains("|listen-started|"))
            .collect();
        (hits.len() >= 3).then_some(hits)
    });
    drop(l);
    let (status, _) = agent.stop();
    assert!(status.success());
    let hits = got.unwrap_or_else(|| panic!("rsyslog got: {:?}", rs.lines()));
    let mut inputs: Vec<&str> = Vec::new();
    for h in &hits {
        let f: Vec<&str> = h.splitn(8, '|').collect();
        let [input, pri, _host, app, _procid, msgid, sd, msg] = f[..] else {
            panic!("{h}")
        };
        inputs.push(input);
        assert_eq!(pri, "30", "daemon.info: {h}"); // facility 3 * 8 + severity 6
        assert_eq!(app, "portwatch", "{h}");
        assert_eq!(msgid, "listen-started", "{h}");
        assert!(sd.starts_with("[portwatch@32473 "), "{h}");
        assert!(sd.contains(&format!("pid=\"{}\"", me())), "{h}");
        assert!(sd.contains("transport=\"tcp\""), "{h}");
        let ev: Value = serde_json::from_str(msg.trim_start())
            .unwrap_or_else(|e| panic!("MSG is not the event JSON ({e}): {msg}"));
        assert_eq!(ev["server"]["port"], p, "{ev}");
    }
    inputs.sort_unstable();
    assert_eq!(inputs, ["imtcp", "imudp", "imuxsock"], "{hits:?}");
}

/// JSON lines over TCP: the receiver goes away and comes back; the agent reconnects,
/// the events in between are queued (or counted lost), and the stream stays JSON lines.
#[test]
fn forward_json_lines_over_tcp_reconnects() {
    if !can_run_kernel_tests() {
        return;
    }
    let rx_port = free_port();
    let receiver = TcpListener::bind(("127.0.0.1", rx_port)).unwrap();
    let target = format!("tcp:127.0.0.1:{rx_port}");
    let mut agent = Agent::start(&["--no-snapshot", "--stdout", "--forward", &target]);
    let (conn, _) = receiver.accept().unwrap();
    let (tx, lines) = mpsc::channel::<Value>();
    let reader = |s: std::net::TcpStream, tx: mpsc::Sender<Value>| {
        std::thread::spawn(move || {
            for l in BufReader::new(s).lines() {
                let Ok(l) = l else { break };
                let v: Value = serde_json::from_str(&l).unwrap();
                if tx.send(v).is_err() {
                    break;
                }
            }
        })
    };
    reader(conn.try_clone().unwrap(), tx.clone());
    let wait = |what: &str, p: u16| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let v = lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no {what} on the forward stream"));
            if action(&v) == "listen-started" && port(&v) == u64::from(p) {
                return v;
            }
        }
    };
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let pa = a.local_addr().unwrap().port();
    wait("first listener", pa);
    // The receiver goes away: the next write fails, the agent reconnects.
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let pb = b.local_addr().unwrap().port();
    agent.expect("second listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == u64::from(pb)
    });
    // The first write after the close goes into the dead connection (TCP reports the
    // close only then); the agent notices at the next write. Keep making events until it
    // has reconnected.
    receiver.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let conn2 = loop {
        match receiver.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < end,
                    "the agent did not reconnect within 10 s"
                );
                drop(TcpListener::bind("127.0.0.1:0").unwrap());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn2.set_nonblocking(false).unwrap();
    reader(conn2, tx);
    let c = TcpListener::bind("127.0.0.1:0").unwrap();
    let pc = c.local_addr().unwrap().port();
    let third = wait("third listener after reconnecting", pc);
    assert!(third["event"]["sequence"].as_u64().unwrap() > 1);
    drop((a, b, c));
    let (status, events) = agent.stop();
    assert!(status.success());
    // Whatever the broken connection took is accounted for, per sink.
    for e in events.iter().filter(|e| action(e) == "events-lost") {
        assert_eq!(
            e["portwatch"]["lost"]["sink"],
            format!("forward:{target}"),
            "{e}"
        );
    }
}

/// JSON lines over a unix stream socket that does not exist yet when the agent starts.
#[test]
fn forward_json_lines_over_unix_waits_for_the_receiver() {
    if !can_run_kernel_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.sock");
    let target = format!("unix:{}", path.display());
    let mut agent = Agent::start(&["--no-snapshot", "--stdout", "--forward", &target]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    agent.expect("the listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == u64::from(p)
    });
    // The receiver appears late: the queued events arrive once it is there.
    let receiver = UnixListener::bind(&path).unwrap();
    let (conn, _) = receiver.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let found = BufReader::new(conn)
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str::<Value>(&l).unwrap())
        .find(|v| action(v) == "listen-started" && port(v) == u64::from(p));
    drop(l);
    let (status, _) = agent.stop();
    assert!(status.success());
    let v = found.expect("the queued event after the receiver appeared");
    assert_eq!(v["process"]["pid"], me());
}

/// `--config`: destinations from the file and from flags are used together.
#[test]
fn config_file_destinations_add_to_the_flags() {
    if !can_run_kernel_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.json");
    let config = dir.path().join("portwatch.toml");
    std::fs::write(
        &config,
        format!(
            "health_interval = 0\n[[sink]]\ntype = \"file\"\npath = \"{}\"\n",
            events.display()
        ),
    )
    .unwrap();
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--stdout",
        "--config",
        config.to_str().unwrap(),
    ]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    agent.expect("the listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == u64::from(p)
    });
    let in_file = poll(Duration::from_secs(10), || {
        portwatch_tests::read_json_lines(&events)
            .into_iter()
            .find(|e| action(e) == "listen-started" && port(e) == u64::from(p))
    });
    drop(l);
    let (status, _) = agent.stop();
    assert!(status.success());
    assert!(in_file.is_some(), "the config file's sink got nothing");
}

/// `--metrics`: a running agent serves Prometheus text; a listener shows in the counters.
#[test]
fn metrics_endpoint_counts_a_real_listener() {
    use std::io::{Read as _, Write as _};
    if !can_run_kernel_tests() {
        return;
    }
    let mp = free_port();
    let addr = format!("127.0.0.1:{mp}");
    let mut agent = Agent::start(&["--no-snapshot", "--metrics", &addr]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    agent.expect("the listener", |e| {
        action(e) == "listen-started" && port(e) == u64::from(p)
    });
    drop(l);
    let scrape = || -> String {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // Gauges refresh each second. Every hook sensor-started names is attached.
    let hooks = agent.hooks()["attached"].as_array().map_or(0, Vec::len);
    assert!(hooks > 0, "{}", agent.hooks());
    let text = poll(Duration::from_secs(5), || {
        let t = scrape();
        (value(&t, "portwatch_hooks_attached") == Some(hooks as f64)).then_some(t)
    })
    .unwrap_or_else(|| panic!("hooks_attached {hooks} within 5 s"));
    let (status, _) = agent.stop();
    assert!(status.success());
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let started = value(
        &text,
        "portwatch_events_total{action=\"listen-started\",transport=\"tcp\"}",
    );
    assert!(started >= Some(1.0), "{text}");
    assert!(
        value(&text, "portwatch_process_resident_memory_bytes") > Some(1e6),
        "{text}"
    );
}

/// `--format ocsf`: the listener as OCSF Network Activity / Listen.
#[test]
fn ocsf_format_renders_listeners_as_network_activity_listen() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut child = Command::new(portwatch_tests::agent_binary())
        .args(["watch", "--format", "ocsf", "--no-snapshot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reap = portwatch_tests::Reap(child.id());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Started (Application Lifecycle / Start); other hosts' events may come first.
    let started = lines
        .by_ref()
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
        .find(|v| v["class_uid"] == 6002)
        .expect("sensor-started in OCSF");
    assert_eq!(started["activity_id"], 3, "{started}");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    let ev = lines
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
        .find(|v| v["dst_endpoint"]["port"] == p)
        .expect("the listener in OCSF");
    drop(l);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert_eq!(ev["class_uid"], 4001, "{ev}");
    assert_eq!(ev["activity_id"], 7, "{ev}");
    assert_eq!(ev["type_uid"], 400_107, "{ev}");
    assert_eq!(ev["actor"]["process"]["pid"], me(), "{ev}");
    assert_eq!(ev["metadata"]["product"]["name"], "portwatch", "{ev}");
}

/// A process with a huge command line (three 65,000-byte arguments): over a syslog
/// datagram destination its event still arrives, whole JSON, within one datagram, with
/// the long fields shortened (`portwatch.shrunk_from`) rather than cut or dropped.
#[test]
fn oversized_events_fit_a_syslog_datagram_as_whole_json() {
    if !can_run_kernel_tests() {
        return;
    }
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let target = format!("udp:127.0.0.1:{}", rx.local_addr().unwrap().port());
    let agent = Agent::start(&["--no-snapshot", "--stdout", "--syslog", &target]);
    let big = "\u{ff}".repeat(65_000);
    let mut helper = std::process::Command::new(env!("CARGO_BIN_EXE_pw-listen"))
        .args([&big, &big, &big])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(helper.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let t = std::time::Instant::now();
    let mut found = None;
    while found.is_none() && t.elapsed() < std::time::Duration::from_secs(10) {
        let Ok(n) = rx.recv(&mut buf) else { continue };
        assert!(n <= 65_000, "a datagram of {n} bytes");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let at = text.find('{').expect("JSON body after the syslog header");
        let v: Value = serde_json::from_str(&text[at..]).expect("the body is whole JSON");
        if v["event"]["action"] == "listen-started" && v["server"]["port"] == port {
            found = Some(v);
        }
    }
    drop(helper.stdin.take());
    let _ = helper.wait();
    let v = found.expect("the listener's event arrived over syslog udp");
    let cmd = v["process"]["command_line"].as_str().unwrap_or("");
    let full = v["portwatch"]["shrunk_from"].is_null();
    assert!(
        !full || cmd.len() < 65_000,
        "not shrunk, yet its command line is {} bytes",
        cmd.len()
    );
    if !full {
        assert!(v["portwatch"]["shrunk_from"].as_u64().unwrap() > 65_000);
    }
    let (_, events) = agent.stop();
    drop(events);
}
