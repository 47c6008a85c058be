//! The host firewall verdict against the real kernel: for each ruleset shape, a server
//! network namespace (veth `veth-pub`, 203.0.113.5/24: TEST-NET-3, a "public" address
//! only inside these namespaces) runs a listener, the agent reports its
//! `portwatch.exposure.firewall`, and a client namespace (203.0.113.77) sends a real SYN
//! through the ruleset. The evaluator's verdict must agree with the probe. Nothing here
//! touches the host's own ruleset or addresses; both namespaces go away on drop, even
//! when a test fails.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use portwatch_tests::{Agent, Value, action, can_run_kernel_tests};

const SERVER: &str = "203.0.113.5";
const CLIENT: &str = "203.0.113.77";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(ns: &str, script: &str, stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip netns exec: {e}"))?;
    if let Some(text) = stdin {
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A server and a client namespace joined by a veth pair; deleted on drop.
struct Lab {
    srv: String,
    cli: String,
    listeners: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pwfw{}x{n}", std::process::id());
        let lab = Lab {
            srv: format!("{tag}s"),
            cli: format!("{tag}c"),
            listeners: Vec::new(),
        };
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &lab.srv]);
        run(&["netns", "add", &lab.cli]);
        run(&[
            "link", "add", "veth-pub", "netns", &lab.srv, "type", "veth", "peer", "name",
            "veth-out", "netns", &lab.cli,
        ]);
        for (ns, dev, addr) in [
            (&lab.srv, "veth-pub", SERVER),
            (&lab.cli, "veth-out", CLIENT),
        ] {
            sh(
                ns,
                &format!(
                    "ip addr add {addr}/24 dev {dev} && ip link set {dev} up && ip link set lo up"
                ),
                None,
            )
            .expect("addresses");
        }
        lab
    }

    /// A TCP listener on 0.0.0.0:`port` in the server namespace, in its own process (the
    /// agent finds the namespace through /proc/PID/ns/net). Returns its pid.
    fn listen(&mut self, port: u16) -> u32 {
        let script = format!(
            "import socket,sys,time\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0',{port})); s.listen(16); print('ready', flush=True)\n\
             s.settimeout(0.2)\n\
             while True:\n  \
               try:\n    c,_=s.accept(); c.close()\n  \
               except socket.timeout: pass\n"
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.srv, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 listener");
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let pid = c.id();
        self.listeners.push(c);
        pid
    }

    /// Loads a ruleset in the server namespace with `cmd` reading `text` on stdin.
    fn load(&self, cmd: &str, text: &str) {
        sh(&self.srv, cmd, Some(text)).unwrap_or_else(|e| panic!("loading ruleset: {e}"));
    }

    /// A real SYN from the client namespace: did the connection open?
    fn probe(&self, port: u16) -> bool {
        let script = format!(
            "import socket,sys\ns=socket.socket(); s.settimeout(1.5)\n\
             try:\n  s.connect(('{SERVER}',{port})); print('open')\n\
             except Exception as e: print('closed', e)\n"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.cli, "python3", "-c", &script])
            .output()
            .expect("probe");
        String::from_utf8_lossy(&out.stdout).starts_with("open")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.listeners {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.srv, &self.cli] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn started(e: &Value, pid: u32, port: u16) -> bool {
    action(e) == "listen-started" && e["process"]["pid"] == pid && e["server"]["port"] == port
}

/// The agent's firewall verdict for the listener `pid` has on `port`.
fn verdict(agent: &mut Agent, pid: u32, port: u16) -> Value {
    let e = agent.expect("listen-started in the lab", |e| started(e, pid, port));
    let fw = e["portwatch"]["exposure"]["firewall"].clone();
    assert!(fw.is_object(), "no firewall verdict: {e}");
    fw
}

/// Every shape: ssh (22) and memcached (11211) listen; each verdict agrees with a real
/// SYN through the ruleset (accepted = it connects; filtered = it does not; unknown is
/// a failure here, since every shape below is modelled).
fn check_shape(load: impl FnOnce(&Lab), want: [(u16, &str); 2]) -> Vec<Value> {
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = Lab::new();
    load(&lab);
    let mut out = Vec::new();
    for (port, expected) in want {
        let pid = lab.listen(port);
        let fw = verdict(&mut agent, pid, port);
        let connected = lab.probe(port);
        let verdict = fw["verdict"].as_str().unwrap_or("?");
        assert_eq!(
            (verdict, connected),
            (expected, expected == "accepted"),
            "port {port}: evaluator said {fw}, the probe {}",
            if connected {
                "connected"
            } else {
                "did not connect"
            }
        );
        assert_eq!(fw["source"], "public", "{fw}");
        assert!(
            fw["probe"]
                .as_str()
                .unwrap_or("")
                .ends_with(&format!("{SERVER}:{port} on veth-pub")),
            "{fw}"
        );
        out.push(fw);
    }
    out
}

#[test]
fn no_firewall_everything_is_accepted() {
    if !can_run_kernel_tests() {
        return;
    }
    let v = check_shape(|_| {}, [(22, "accepted"), (11211, "accepted")]);
    assert_eq!(v[1]["ruleset"], "nftables");
}

#[test]
fn nftables_inet_filter_policy_drop_with_ssh() {
    if !can_run_kernel_tests() {
        return;
    }
    let rules = "table inet filter {\n\
        chain input {\n\
          type filter hook input priority filter; policy drop;\n\
          ct state established,related accept\n\
          ct state invalid drop\n\
          iifname \"lo\" accept\n\
          meta l4proto { icmp, ipv6-icmp } accept\n\
          tcp dport 22 accept\n\
        }\n\
      }\n";
    let v = check_shape(
        |lab| lab.load("nft -f -", rules),
        [(22, "accepted"), (11211, "filtered")],
    );
    let rule = &v[1]["rule"];
    assert_eq!(
        (
            &rule["family"],
            &rule["table"],
            &rule["chain"],
            &rule["text"]
        ),
        (
            &"inet".into(),
            &"filter".into(),
            &"input".into(),
            &"policy drop".into()
        ),
        "{rule}"
    );
}

#[test]
fn firewalld_zone_chains() {
    if !can_run_kernel_tests() {
        return;
    }
    let rules = include_str!("../../portwatch/src/classify/firewall/testdata/firewalld.nft");
    let v = check_shape(
        |lab| lab.load("nft -f -", rules),
        [(22, "accepted"), (11211, "filtered")],
    );
    let rule = &v[1]["rule"];
    assert_eq!(rule["chain"], "filter_INPUT", "{rule}");
    assert_eq!(rule["action"], "reject", "{rule}");
    assert!(rule["handle"].as_u64().is_some(), "{rule}");
}

#[test]
fn ufw_on_iptables_nft() {
    if !can_run_kernel_tests() {
        return;
    }
    let rules = include_str!("../data/ufw-iptables-nft.rules");
    let v = check_shape(
        |lab| lab.load("iptables-nft-restore", rules),
        [(22, "accepted"), (11211, "filtered")],
    );
    let rule = &v[1]["rule"];
    assert_eq!(
        (&rule["table"], &rule["chain"]),
        (&"filter".into(), &"INPUT".into()),
        "{rule}"
    );
    assert_eq!(rule["text"], "policy drop", "{rule}");
}

#[test]
fn iptables_legacy_input_drop() {
    if !can_run_kernel_tests() {
        return;
    }
    if !tool("iptables-legacy-restore") {
        panic!("iptables-legacy-restore is missing: install Debian's iptables package");
    }
    let rules = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                 -A INPUT -i lo -j ACCEPT\n\
                 -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                 -A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT\n\
                 COMMIT\n";
    let v = check_shape(
        |lab| lab.load("iptables-legacy-restore", rules),
        [(22, "accepted"), (11211, "filtered")],
    );
    let rule = &v[1]["rule"];
    assert_eq!(rule["origin"], "iptables-legacy", "{rule}");
    assert_eq!(rule["text"], "policy drop", "{rule}");
    assert!(
        v[1]["ruleset"]
            .as_str()
            .unwrap_or("")
            .contains("iptables-legacy"),
        "{}",
        v[1]
    );
}

/// Closing the loop: memcached alerts as public behind Debian's default nftables.conf
/// (an inet filter input chain that accepts); the test runs the nftables step the alert
/// suggested, exactly as written, in the server namespace; the agent then reports
/// `exposure-changed` from accepted to filtered, and the probe agrees.
#[test]
fn pasting_the_suggested_nft_step_turns_the_listener_filtered() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = Lab::new();
    // /etc/nftables.conf as Debian 12 ships it.
    lab.load(
        "nft -f -",
        "table inet filter {\n\
           chain input { type filter hook input priority filter; }\n\
           chain forward { type filter hook forward priority filter; }\n\
           chain output { type filter hook output priority filter; }\n\
         }\n",
    );
    let pid = lab.listen(11211);
    let alert = agent.expect("memcached alert", |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid
    });
    let fw = &alert["portwatch"]["exposure"]["firewall"];
    assert_eq!(fw["verdict"], "accepted", "{alert}");
    assert!(lab.probe(11211), "the probe must connect before the fix");
    let steps = alert["portwatch"]["alert"]["steps"]
        .as_array()
        .expect("steps");
    let step = steps
        .iter()
        .filter_map(|s| s["commands"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .find(|c| c.starts_with("nft "))
        .unwrap_or_else(|| panic!("no nft step in {alert}"))
        .to_owned();
    sh(&lab.srv, &step, None).unwrap_or_else(|e| panic!("the suggested step failed: {e}"));
    let changed = agent.expect("exposure-changed", |e| {
        action(e) == "exposure-changed" && e["process"]["pid"] == pid
    });
    let ch = &changed["portwatch"]["exposure_change"];
    assert_eq!(ch["before"]["verdict"], "accepted", "{changed}");
    assert_eq!(ch["after"]["verdict"], "filtered", "{changed}");
    assert!(
        ch["after"]["rule"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("dport 11211 drop"),
        "{changed}"
    );
    assert_eq!(
        changed["portwatch"]["exposure"]["firewall"]["verdict"],
        "filtered"
    );
    assert!(
        !lab.probe(11211),
        "the probe must not connect after the fix"
    );
    // Becoming filtered raises no new alert.
    let again = agent.wait_for(Duration::from_millis(500), |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid && e != &alert
    });
    assert!(again.is_none(), "{again:?}");
}

// ---------------------------------------------------------------------------------
// NAT publishing: a "host" namespace publishes a port of a "container" namespace
// (behind a bridge, as container runtimes wire them) with DNAT; an "outside" namespace
// probes the host port. No listener on the host side (docker's `userland-proxy: false`,
// kube-proxy, netavark): only the NAT rule makes the container's listener reachable.

const HOST_PUBLIC: &str = "203.0.113.5";
const OUTSIDE: &str = "203.0.113.77";

/// Outside -- veth-pub/veth-out -- host -- bridge `bridge` + veth -- container.
struct NatLab {
    host: String,
    ctr: String,
    out: String,
    ctr_addr: String,
    listeners: Vec<Child>,
}

impl NatLab {
    /// `bridge` (e.g. docker0) holds `gw/len` on the host; the container has `addr`.
    fn new(bridge: &str, gw: &str, addr: &str, len: u8) -> NatLab {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pwnat{}x{n}", std::process::id());
        let lab = NatLab {
            host: format!("{tag}h"),
            ctr: format!("{tag}c"),
            out: format!("{tag}o"),
            ctr_addr: addr.to_owned(),
            listeners: Vec::new(),
        };
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        for ns in [&lab.host, &lab.ctr, &lab.out] {
            run(&["netns", "add", ns]);
        }
        run(&[
            "link", "add", "veth-pub", "netns", &lab.host, "type", "veth", "peer", "name",
            "veth-out", "netns", &lab.out,
        ]);
        run(&[
            "link", "add", "vethctr", "netns", &lab.host, "type", "veth", "peer", "name", "eth0",
            "netns", &lab.ctr,
        ]);
        sh(
            &lab.host,
            &format!(
                "ip link set lo up && ip addr add {HOST_PUBLIC}/24 dev veth-pub && ip link set veth-pub up \
                 && ip link add {bridge} type bridge && ip addr add {gw}/{len} dev {bridge} \
                 && ip link set {bridge} up && ip link set vethctr master {bridge} && ip link set vethctr up \
                 && sysctl -qw net.ipv4.ip_forward=1"
            ),
            None,
        )
        .expect("host side");
        sh(
            &lab.ctr,
            &format!(
                "ip link set lo up && ip addr add {addr}/{len} dev eth0 && ip link set eth0 up \
                 && ip route add default via {gw}"
            ),
            None,
        )
        .expect("container side");
        sh(
            &lab.out,
            &format!(
                "ip link set lo up && ip addr add {OUTSIDE}/24 dev veth-out && ip link set veth-out up"
            ),
            None,
        )
        .expect("outside");
        lab
    }

    /// A TCP listener on 0.0.0.0:`port` in the container namespace; its pid.
    fn listen(&mut self, port: u16) -> u32 {
        let script = format!(
            "import socket,time\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0',{port})); s.listen(16); print('ready', flush=True)\n\
             s.settimeout(0.2)\n\
             while True:\n  \
               try:\n    c,_=s.accept(); c.close()\n  \
               except socket.timeout: pass\n"
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.ctr, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 listener");
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let pid = c.id();
        self.listeners.push(c);
        pid
    }

    /// A real SYN from outside to `addr`:`port`: `open`, `refused` (it reached the
    /// container, where nothing listens) or `timeout` (dropped on the way).
    fn probe_to(&self, addr: &str, port: u16) -> String {
        connect_from(&self.out, addr, port)
    }

    fn probe(&self, port: u16) -> String {
        self.probe_to(HOST_PUBLIC, port)
    }

    /// A connection from a process of the host namespace itself to `addr`:`port`:
    /// `open`, `refused` or `timeout`, as [`NatLab::probe_to`].
    fn probe_local(&self, addr: &str, port: u16) -> String {
        connect_from(&self.host, addr, port)
    }

    fn host_sh(&self, script: &str, stdin: Option<&str>) {
        sh(&self.host, script, stdin).unwrap_or_else(|e| panic!("host namespace: {e}"));
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for c in &mut self.listeners {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.host, &self.ctr, &self.out] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The docker fixture (`docker.save`) without its comment lines.
/// A TCP connect from network namespace `ns` to `addr`:`port`: `open`, `refused` or
/// `timeout`.
fn connect_from(ns: &str, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns=socket.socket(); s.settimeout(1.5)\n\
         try:\n  s.connect(('{addr}',{port})); print('open')\n\
         except ConnectionRefusedError: print('refused')\n\
         except Exception as e: print('timeout')\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .output()
        .expect("probe");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn docker_rules() -> String {
    include_str!("../../portwatch/src/classify/firewall/testdata/docker.save")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn published(e: &Value) -> &Value {
    &e["portwatch"]["exposure"]["published"]
}

/// The evaluator's verdict must agree with the probe: accepted = the SYN reached the
/// container (open, or refused by it); filtered = it did not.
fn agrees(verdict: &str, probe: &str) -> bool {
    match verdict {
        "accepted" => probe == "open" || probe == "refused",
        "filtered" => probe == "timeout",
        _ => false,
    }
}

fn unbacked(e: &Value, port: u16, type_: &str) -> bool {
    action(e) == "exposure-without-listener"
        && e["server"]["port"] == port
        && e["event"]["type"][0] == type_
}

/// docker with `userland-proxy: false` on iptables-nft: the port is published before
/// anything listens (`exposure-without-listener`, and the SYN reaches the container,
/// which refuses it); then redis listens in the container on 0.0.0.0:6379, behind a
/// private address, and is reported as published on the public host port, alerting as
/// public, and the unbacked exposure ends.
#[test]
fn docker_publishes_a_container_port_without_a_host_listener() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    lab.host_sh("iptables-nft-restore", Some(&docker_rules()));
    let e = agent.expect("exposure-without-listener start", |e| {
        unbacked(e, 6379, "start") && published(e)["target"]["ip"] == "172.17.0.2"
    });
    let p = published(&e);
    assert_eq!(p["verdict"], "accepted", "{e}");
    assert_eq!(p["source"], "public", "{e}");
    assert_eq!(p["host"]["ip"], HOST_PUBLIC, "{e}");
    assert!(
        p["rule"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("-j DNAT --to-destination 172.17.0.2:6379"),
        "{e}"
    );
    assert_eq!(e["event"]["kind"], "alert", "{e}");
    // Rated as the redis that binds there next would be: the catalogue's severity.
    assert_eq!(e["rule"]["id"], "redis", "{e}");
    assert_eq!(e["log"]["level"], "critical", "{e}");
    assert_eq!(e["portwatch"]["risk"]["outcome"], "exposed", "{e}");
    let probe = lab.probe(6379);
    assert_eq!(probe, "refused", "the SYN reaches the container: {e}");

    let pid = lab.listen(6379);
    let started = agent.expect("listen-started in the container", |e| started(e, pid, 6379));
    let p = published(&started);
    assert_eq!(p["verdict"], "accepted", "{started}");
    assert_eq!(p["host"]["port"], 6379, "{started}");
    assert_eq!(p["target"]["ip"], lab.ctr_addr, "{started}");
    assert!(
        p["netns"].as_u64().is_some() && p["target_netns"].as_u64().is_some(),
        "{started}"
    );
    // Its own address is private; the NAT makes it public.
    assert_eq!(
        started["portwatch"]["exposure"]["firewall"]["source"], "private",
        "{started}"
    );
    let alert = agent.expect("risky-listener for the published redis", |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid
    });
    assert_eq!(alert["portwatch"]["risk"]["outcome"], "exposed", "{alert}");
    assert_eq!(alert["log"]["level"], "critical", "{alert}");
    let end = agent.expect("exposure-without-listener end", |e| {
        unbacked(e, 6379, "end")
    });
    assert_eq!(end["portwatch"]["ended_by"], "listener-appeared", "{end}");
    let probe = lab.probe(6379);
    assert!(
        agrees("accepted", &probe),
        "evaluator: accepted, probe: {probe}"
    );
}

/// The same with a DOCKER-USER drop for traffic from the public interface: the
/// forward path drops it, the verdict names DOCKER-USER, and the probe times out.
#[test]
fn docker_user_drop_filters_the_published_port() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    let rules = docker_rules().replace(
        "-A DOCKER-USER -j RETURN",
        "-A DOCKER-USER -i veth-pub -p tcp -m tcp --dport 6379 -j DROP\n-A DOCKER-USER -j RETURN",
    );
    lab.host_sh("iptables-nft-restore", Some(&rules));
    agent.expect("exposure-without-listener start", |e| {
        unbacked(e, 6379, "start")
    });
    let pid = lab.listen(6379);
    let started = agent.expect("listen-started", |e| started(e, pid, 6379));
    let p = published(&started);
    assert_eq!(p["verdict"], "filtered", "{started}");
    assert_eq!(p["filter_rule"]["chain"], "DOCKER-USER", "{started}");
    let probe = lab.probe(6379);
    assert!(
        agrees("filtered", &probe),
        "evaluator: filtered, probe: {probe}"
    );
    // Filtered on the public side: the alert is one step lower, as for the input chain.
    let alert = agent.expect("risky-listener", |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid
    });
    assert_eq!(alert["portwatch"]["risk"]["outcome"], "filtered", "{alert}");
}

/// The loop closed for a published port: the alert on the container's redis suggests a
/// forward-path step (never an input-chain one, which forwarded traffic never meets);
/// pasting it as the alert gives it makes the listener `filtered`, the probe agrees, and
/// no new alert is raised.
#[test]
fn pasting_the_suggested_forward_step_filters_the_published_port() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    lab.host_sh("iptables-nft-restore", Some(&docker_rules()));
    agent.expect("exposure-without-listener start", |e| {
        unbacked(e, 6379, "start")
    });
    let pid = lab.listen(6379);
    let alert = agent.expect("risky-listener for the published redis", |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid
    });
    assert!(
        agrees("accepted", &lab.probe(6379)),
        "reachable before the fix"
    );
    let cmds: Vec<String> = alert["portwatch"]["alert"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["commands"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    assert!(
        !cmds
            .iter()
            .any(|c| c.contains(" INPUT ") || c.contains("filter input")),
        "input-chain steps for a forwarded port: {cmds:#?}"
    );
    let step = cmds
        .iter()
        .find(|c| c.starts_with("iptables -I DOCKER-USER"))
        .unwrap_or_else(|| panic!("no DOCKER-USER step in {alert}"));
    lab.host_sh(step, None);
    let changed = agent.expect("exposure-changed to filtered", |e| {
        action(e) == "exposure-changed"
            && e["process"]["pid"] == pid
            && e["portwatch"]["exposure_change"]["published_after"]["verdict"] == "filtered"
    });
    let after = &changed["portwatch"]["exposure_change"]["published_after"];
    assert_eq!(after["filter_rule"]["chain"], "DOCKER-USER", "{changed}");
    let probe = lab.probe(6379);
    assert!(
        agrees("filtered", &probe),
        "evaluator: filtered, probe: {probe}"
    );
    let again = agent.wait_for(Duration::from_millis(500), |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid && e != &alert
    });
    assert!(
        again.is_none(),
        "became filtered, yet alerted again: {again:?}"
    );
}

/// podman netavark's nftables table: host port 8080 to the container's 6379, accepted
/// on forward by the ct mark the DNAT rule sets.
#[test]
fn netavark_nftables_table_publishes() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("podman0", "10.88.0.1", "10.88.0.14", 16);
    lab.host_sh(
        "nft -f -",
        Some(include_str!(
            "../../portwatch/src/classify/firewall/testdata/netavark.nft"
        )),
    );
    agent.expect("exposure-without-listener start", |e| {
        unbacked(e, 8080, "start")
    });
    let pid = lab.listen(6379);
    let started = agent.expect("listen-started", |e| started(e, pid, 6379));
    let p = published(&started);
    assert_eq!(p["verdict"], "accepted", "{started}");
    assert_eq!(p["host"]["port"], 8080, "{started}");
    assert_eq!(
        p["rule"]["chain"], "nv_2f259bab_10_88_0_0_nm16_dnat",
        "{started}"
    );
    assert_eq!(p["ruleset"], "nftables", "{started}");
    let probe = lab.probe(8080);
    assert!(
        agrees("accepted", &probe),
        "evaluator: accepted, probe: {probe}"
    );
}

/// kube-proxy (iptables mode): NodePorts 3002 and 3003 lead through KUBE-SERVICES,
/// KUBE-NODEPORTS, KUBE-EXT-*, KUBE-SVC-* to KUBE-SEP-*'s DNAT to the pod at
/// 10.180.0.3:80, and FORWARD (policy drop) accepts them by the 0x4000 mark
/// KUBE-MARK-MASQ set on the way.
#[test]
fn kube_proxy_nodeport() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("cni0", "10.180.0.1", "10.180.0.3", 16);
    let rules: String =
        include_str!("../../portwatch/src/classify/firewall/testdata/kube-proxy.save")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
    lab.host_sh("iptables-nft-restore", Some(&rules));
    agent.expect("exposure-without-listener start", |e| {
        unbacked(e, 3003, "start")
    });
    let pid = lab.listen(80);
    let started = agent.expect("listen-started", |e| started(e, pid, 80));
    let p = published(&started);
    assert_eq!(p["verdict"], "accepted", "{started}");
    assert!(
        p["host"]["port"] == 3002 || p["host"]["port"] == 3003,
        "{started}"
    );
    assert!(
        p["rule"]["chain"]
            .as_str()
            .unwrap_or("")
            .starts_with("KUBE-SEP-"),
        "{started}"
    );
    for port in [3002, 3003] {
        let probe = lab.probe(port);
        assert!(agrees("accepted", &probe), "port {port}: probe {probe}");
    }
    // 3001 (externalTrafficPolicy Local, no local endpoint) publishes nothing: the
    // probe is not forwarded to the pod (nothing answers on the host either).
    assert_ne!(lab.probe(3001), "open");
}

/// While the agent runs: the listener exists first (not published); docker's rules
/// come (published, accepted); a DOCKER-USER drop is added (filtered); the host's
/// public address changes (published on the new address); the NAT rules go (no longer
/// published, and the unbacked exposure that never was stays unreported). Each step is
/// one `exposure-changed`, in this order, and the probe agrees at each step.
#[test]
fn ruleset_and_address_changes_are_reported_in_order() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    let pid = lab.listen(6379);
    let started = agent.expect("listen-started", |e| started(e, pid, 6379));
    assert!(published(&started).is_null(), "{started}");
    let changed = |e: &Value| action(e) == "exposure-changed" && e["process"]["pid"] == pid;
    let after = |e: &Value| e["portwatch"]["exposure_change"]["published_after"].clone();

    lab.host_sh("iptables-nft-restore", Some(&docker_rules()));
    let e1 = agent.expect("published", changed);
    assert_eq!(after(&e1)["verdict"], "accepted", "{e1}");
    assert!(
        e1["portwatch"]["exposure_change"]["published_before"].is_null(),
        "{e1}"
    );
    assert!(agrees("accepted", &lab.probe(6379)));

    lab.host_sh(
        "iptables-nft -I DOCKER-USER -i veth-pub -p tcp -m tcp --dport 6379 -j DROP",
        None,
    );
    let e2 = agent.expect("filtered", |e| {
        changed(e) && after(e)["verdict"] == "filtered"
    });
    assert_eq!(after(&e2)["verdict"], "filtered", "{e2}");
    assert_eq!(
        e2["portwatch"]["exposure_change"]["published_before"]["verdict"], "accepted",
        "{e2}"
    );
    assert!(agrees("filtered", &lab.probe(6379)));

    // A new public address first, then the old one goes (the new one, a secondary of
    // the same subnet, would go with it unless promoted).
    lab.host_sh(
        "sysctl -qw net.ipv4.conf.veth-pub.promote_secondaries=1 \
         && ip addr add 203.0.113.9/24 dev veth-pub && ip addr del 203.0.113.5/24 dev veth-pub",
        None,
    );
    let e3 = agent.expect("published on the new address", |e| {
        changed(e) && after(e)["host"]["ip"] == "203.0.113.9"
    });
    assert_eq!(after(&e3)["verdict"], "filtered", "{e3}");
    assert!(agrees("filtered", &lab.probe_to("203.0.113.9", 6379)));

    lab.host_sh("iptables-nft -t nat -F DOCKER", None);
    let e4 = agent.expect("no longer published", |e| changed(e) && after(e).is_null());
    assert!(
        e4["message"]
            .as_str()
            .unwrap_or("")
            .contains("no longer published"),
        "{e4}"
    );
    assert_eq!(
        lab.probe_to("203.0.113.9", 6379),
        "refused",
        "no DNAT: the host refuses"
    );
}

/// The output NAT chain: only an OUTPUT DNAT (no PREROUTING one) sends host port 16379
/// to the container's 6379, so only processes of the host namespace reach it, through
/// the host's own address. With nothing behind it: an informational
/// exposure-without-listener with source local. Then redis listens in the container:
/// its publication has source local and agrees with a real connection from the host;
/// the outside gets nothing. Then an output filter drop for the target: filtered
/// (exposure-changed, naming the rule), and the connection times out.
#[test]
fn output_dnat_publishes_to_local_processes_only() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let mut lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    lab.host_sh(
        "iptables-nft-restore",
        Some(&format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n\
             -A OUTPUT -d {HOST_PUBLIC}/32 -p tcp -m tcp --dport 16379 -j DNAT --to-destination 172.17.0.2:6379\n\
             COMMIT\n"
        )),
    );
    let e = agent.expect("exposure-without-listener start (local)", |e| {
        unbacked(e, 16379, "start")
    });
    let p = published(&e);
    assert_eq!(p["source"], "local", "{e}");
    assert_eq!(p["verdict"], "accepted", "{e}");
    assert_eq!(p["host"]["ip"], HOST_PUBLIC, "{e}");
    assert_eq!(p["target"]["ip"], "172.17.0.2", "{e}");
    assert_eq!(p["target"]["port"], 6379, "{e}");
    // Local only: informational, not an alert, though redis's port is catalogued.
    assert_eq!(e["event"]["kind"], "event", "{e}");
    assert!(e["event"]["severity"].is_null(), "{e}");
    assert_eq!(e["portwatch"]["risk"]["rule"], "redis", "{e}");
    assert_eq!(
        lab.probe_local(HOST_PUBLIC, 16379),
        "refused",
        "the connection reaches the container: {e}"
    );

    let pid = lab.listen(6379);
    let started = agent.expect("listen-started in the container", |e| started(e, pid, 6379));
    let p = published(&started);
    assert_eq!(p["source"], "local", "{started}");
    assert_eq!(p["verdict"], "accepted", "{started}");
    assert_eq!(p["host"]["port"], 16379, "{started}");
    assert!(
        p["probe"]
            .as_str()
            .unwrap_or("")
            .contains("from a local process"),
        "{started}"
    );
    let probe = lab.probe_local(HOST_PUBLIC, 16379);
    assert!(
        agrees("accepted", &probe),
        "evaluator: accepted, local probe: {probe}"
    );
    // Not a network exposure: from outside the host port leads nowhere.
    assert_eq!(lab.probe(16379), "refused", "the host itself refuses 16379");
    agent.expect("exposure-without-listener end", |e| {
        unbacked(e, 16379, "end")
    });

    lab.host_sh(
        "iptables-nft -A OUTPUT -d 172.17.0.2/32 -p tcp -m tcp --dport 6379 -j DROP",
        None,
    );
    let changed = agent.expect("exposure-changed to filtered", |e| {
        action(e) == "exposure-changed"
            && e["process"]["pid"] == pid
            && e["portwatch"]["exposure_change"]["published_after"]["verdict"] == "filtered"
    });
    let after = &changed["portwatch"]["exposure_change"]["published_after"];
    assert_eq!(after["source"], "local", "{changed}");
    assert_eq!(after["filter_rule"]["chain"], "OUTPUT", "{changed}");
    assert_eq!(after["filter_rule"]["table"], "filter", "{changed}");
    let probe = lab.probe_local(HOST_PUBLIC, 16379);
    assert!(
        agrees("filtered", &probe),
        "evaluator: filtered, local probe: {probe}"
    );
}

/// A published port with nothing behind it, and the end of that when the rule goes.
#[test]
fn exposure_without_listener_ends_when_the_rule_goes() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let lab = NatLab::new("docker0", "172.17.0.1", "172.17.0.2", 16);
    lab.host_sh("iptables-nft-restore", Some(&docker_rules()));
    let start = agent.expect("start", |e| unbacked(e, 6379, "start"));
    assert_eq!(published(&start)["verdict"], "accepted", "{start}");
    assert!(agrees("accepted", &lab.probe(6379)));
    lab.host_sh("iptables-nft -t nat -F DOCKER", None);
    let end = agent.expect("end", |e| unbacked(e, 6379, "end"));
    assert_eq!(end["portwatch"]["ended_by"], "rule-removed", "{end}");
}

/// A real container runtime: podman (Debian 12: 4.3, netavark 1.4 with its iptables
/// driver) with runc publishes port 6379 of a container, all inside a private "host"
/// namespace (entered with nsenter: `ip netns exec` remounts /sys, and runc then finds
/// no cgroup mount), its storage in a temporary directory, its image imported from
/// busybox-static (no registry is reachable). Two settings get it going on this VM: runc
/// instead of crun, and `default_ulimits = []` (podman's default nofile limit, 1048576,
/// is above the VM's hard limit, and raising it is refused). The agent must find the
/// rules netavark wrote, join them to busybox's `nc` in the container's namespace, and
/// agree with a SYN from outside.
#[test]
fn podman_publishes_a_port_for_real() {
    if !can_run_kernel_tests() {
        return;
    }
    for t in ["podman", "runc", "busybox", "nsenter"] {
        if !tool(t) {
            panic!("{t} is missing: install Debian's podman, netavark, runc, busybox-static");
        }
    }
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let lab = PodLab::new();
    lab.podman(
        &["import", "-", "localhost/pwbusybox"],
        Some(&lab.rootfs_tar()),
    );
    lab.podman(
        &[
            "--runtime",
            "runc",
            "run",
            "-d",
            "--name",
            "pwt",
            "-p",
            "6379:6379",
            "localhost/pwbusybox",
            "/bin/sh",
            "-c",
            "while :; do nc -l -p 6379 -e /bin/true; done",
        ],
        None,
    );
    // The listener may start before the agent has read the namespace podman just
    // made (it looks for new ones every 3 s): then `exposure-changed` brings the
    // publication.
    let started = agent.expect("nc listening in the podman container, published", |e| {
        (action(e) == "listen-started" || action(e) == "exposure-changed")
            && e["process"]["name"] == "nc"
            && e["server"]["port"] == 6379
            && published(e).is_object()
    });
    let p = published(&started);
    assert_eq!(p["verdict"], "accepted", "{started}");
    assert_eq!(p["host"]["ip"], HOST_PUBLIC, "{started}");
    assert!(
        p["target"]["ip"]
            .as_str()
            .unwrap_or("")
            .starts_with("10.88."),
        "{started}"
    );
    assert!(
        p["rule"]["chain"]
            .as_str()
            .unwrap_or("")
            .starts_with("NETAVARK-DN-"),
        "{started}"
    );
    let probe = lab.probe();
    assert!(
        agrees("accepted", &probe),
        "evaluator: accepted, probe: {probe}"
    );
}

/// A "host" namespace with a public address, an outside namespace, and podman's state
/// in a temporary directory; the container and everything on drop.
struct PodLab {
    host: String,
    out: String,
    dir: std::path::PathBuf,
}

impl PodLab {
    fn new() -> PodLab {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pwpod{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(dir.join("rootfs/bin")).unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        let lab = PodLab {
            host: format!("{tag}h"),
            out: format!("{tag}o"),
            dir,
        };
        for ns in [&lab.host, &lab.out] {
            let st = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let st = Command::new("ip")
            .args([
                "link", "add", "veth-pub", "netns", &lab.host, "type", "veth", "peer", "name",
                "veth-out", "netns", &lab.out,
            ])
            .status()
            .unwrap();
        assert!(st.success());
        sh(
            &lab.host,
            &format!(
                "ip link set lo up && ip addr add {HOST_PUBLIC}/24 dev veth-pub && ip link set veth-pub up"
            ),
            None,
        )
        .unwrap();
        sh(
            &lab.out,
            &format!(
                "ip link set lo up && ip addr add {OUTSIDE}/24 dev veth-out && ip link set veth-out up"
            ),
            None,
        )
        .unwrap();
        lab
    }

    /// busybox-static as a root filesystem, as a tar stream.
    fn rootfs_tar(&self) -> Vec<u8> {
        let root = self.dir.join("rootfs");
        let busybox = Command::new("sh")
            .args(["-c", "command -v busybox"])
            .output()
            .unwrap();
        let busybox = String::from_utf8_lossy(&busybox.stdout).trim().to_owned();
        std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
        for a in ["sh", "nc", "true"] {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
        }
        let out = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    fn podman(&self, args: &[&str], stdin: Option<&[u8]>) {
        let mut c = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host))
            .arg("podman")
            .args(["--storage-driver", "vfs", "--network-backend", "netavark"])
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman");
        if let Some(data) = stdin {
            c.stdin.take().unwrap().write_all(data).unwrap();
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn probe(&self) -> String {
        let script = format!(
            "import socket\ns=socket.socket(); s.settimeout(1.5)\n\
             try:\n  s.connect(('{HOST_PUBLIC}',6379)); print('open')\n\
             except ConnectionRefusedError: print('refused')\n\
             except Exception as e: print('timeout')\n"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.out, "python3", "-c", &script])
            .output()
            .expect("probe");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PodLab {
    fn drop(&mut self) {
        // The container, its network namespace and netavark's rules go with it.
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host))
            .arg("podman")
            .args(["--storage-driver", "vfs", "--network-backend", "netavark"])
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["rm", "-f", "-t", "0", "pwt"])
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output();
        for ns in [&self.host, &self.out] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
