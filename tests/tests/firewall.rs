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
