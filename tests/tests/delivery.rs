//! Delivery a fleet can trust, against real endpoints: Debian's rsyslog with TLS (imtcp
//! and the gtls driver) and RELP (imrelp), `openssl s_server` as a TLS JSON-lines
//! receiver, certificates made here with the `openssl` command; the relay stopped under
//! a steady stream, the agent restarted or killed meanwhile, and the spool replayed.

use std::{
    collections::BTreeSet,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portwatch_tests::{Agent, Value, action, can_run_kernel_tests, poll, port};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(bin: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

/// What the relay tests need, or why they cannot run here.
fn relay_tools() -> bool {
    let missing: Vec<&str> = [("rsyslogd", "rsyslog"), ("openssl", "openssl")]
        .iter()
        .filter(|(b, _)| !have(b))
        .map(|(_, p)| *p)
        .chain(
            [
                ("lmnsd_gtls.so", "rsyslog-gnutls"),
                ("imrelp.so", "rsyslog-relp"),
                ("omkafka.so", "rsyslog-kafka"),
            ]
            .iter()
            .filter(|(m, _)| {
                !Path::new("/usr/lib/x86_64-linux-gnu/rsyslog")
                    .join(m)
                    .exists()
            })
            .map(|(_, p)| *p),
        )
        .collect();
    if !missing.is_empty() {
        eprintln!("skipped: {missing:?} not installed (cargo xtask setup installs them)");
    }
    missing.is_empty()
}

/// The relay tools, or a failed test that names what to install: a relay test never
/// skips for want of them.
fn require_relay_tools() {
    assert!(
        relay_tools(),
        "the relay tools are missing (see the line above); cargo xtask setup installs them"
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate it signed for `localhost` only, a client certificate it
/// signed (an agent's), and a second CA that signed nothing of this.
struct Certs {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for name in ["ca", "other-ca"] {
            let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &pem, "-days", "2"]);
            let subj = format!("/CN=portwatch test {name}");
            a.extend(["-subj", &subj]);
            openssl(dir, &a);
        }
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(dir, &a);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=portwatch test agent",
        ]);
        openssl(dir, &a);
        std::fs::write(
            dir.join("client-ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "client.pem",
                "-days",
                "2",
                "-extfile",
                "client-ext.cnf",
            ],
        );
        Certs {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// rsyslogd in the foreground, with its own configuration, pid file and work directory:
/// a TLS syslog input (imtcp, gtls) and a RELP input (imrelp), both on 127.0.0.1, every
/// message's MSG (the event JSON) to one file. It can be stopped and started again on the
/// same ports.
struct Rsyslog {
    child: Option<Child>,
    conf: PathBuf,
    dir: PathBuf,
    out: PathBuf,
    tls: u16,
    relp: u16,
    /// The ports start() waits for.
    inputs: Vec<u16>,
}

impl Rsyslog {
    fn new(dir: &Path, certs: &Certs) -> Rsyslog {
        let (tls, relp) = (free_port(), free_port());
        let out = dir.join("out.log");
        let conf = format!(
            r#"global(workDirectory="{d}" maxMessageSize="64k"
  DefaultNetstreamDriverCAFile="{ca}" DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" address="127.0.0.1" port="{tls}")
module(load="imrelp")
input(type="imrelp" address="127.0.0.1" port="{relp}")
template(name="msg" type="string" string="%inputname% %msg%\n")
*.* action(type="omfile" file="{out}" template="msg")
"#,
            d = dir.display(),
            ca = certs.ca.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
            out = out.display(),
        );
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        Rsyslog {
            child: None,
            conf: conf_path,
            dir: dir.to_owned(),
            out,
            tls,
            relp,
            inputs: vec![tls, relp],
        }
    }

    /// One RELP input with TLS on (`imrelp` `tls="on"`), with librelp's `tlslib`
    /// (`gnutls` or `openssl`: Debian's librelp is built with both), in a directory of its
    /// own under `dir`. Like the fleet relay (packaging/relay), it asks every client for
    /// a certificate the CA signed (`tls.authMode="certvalid"`).
    fn relp_tls(dir: &Path, certs: &Certs, tlslib: &str) -> Rsyslog {
        let dir = dir.join(format!("rsyslog-{tlslib}"));
        std::fs::create_dir_all(&dir).unwrap();
        let relp = free_port();
        let out = dir.join("out.log");
        let conf = format!(
            r#"global(workDirectory="{d}" maxMessageSize="64k")
module(load="imrelp" tls.tlslib="{tlslib}")
input(type="imrelp" address="127.0.0.1" port="{relp}" tls="on"
      tls.caCert="{ca}" tls.myCert="{cert}" tls.myPrivKey="{key}"
      tls.authMode="certvalid")
template(name="msg" type="string" string="%inputname% %msg%\n")
*.* action(type="omfile" file="{out}" template="msg")
"#,
            d = dir.display(),
            ca = certs.ca.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
            out = out.display(),
        );
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        Rsyslog {
            child: None,
            conf: conf_path,
            dir,
            out,
            tls: 0,
            relp,
            inputs: vec![relp],
        }
    }

    fn start(&mut self) {
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(self.dir.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("rsyslog.err"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.child = Some(child);
        poll(Duration::from_secs(10), || {
            self.inputs
                .iter()
                .all(|&p| TcpListener::bind(("127.0.0.1", p)).is_err())
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "rsyslogd did not open its inputs: {}",
                std::fs::read_to_string(self.dir.join("rsyslog.err")).unwrap_or_default()
            )
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// The events rsyslog wrote, from the given input.
    fn events(&self, input: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(input)?.strip_prefix(' '))
            .map(|m| {
                serde_json::from_str(m.trim_start())
                    .unwrap_or_else(|e| panic!("MSG is not the event JSON ({e}): {m}"))
            })
            .collect()
    }

    fn sequences(&self, input: &str) -> Vec<u64> {
        self.events(input)
            .iter()
            .map(|e| e["event"]["sequence"].as_u64().unwrap())
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The one `portwatch: error:` line of a failed start, asserted to be a single line that
/// contains each of `want`.
fn one_line_error(res: Result<Agent, String>, want: &[&str]) -> String {
    let Err(stderr) = res else {
        panic!("the agent started; it should have refused the certificate")
    };
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    for w in want {
        assert!(errors[0].contains(w), "{w:?} in {stderr}");
    }
    errors[0].to_owned()
}

/// Listen and close at `per_sec` cycles a second for `secs` (two events per cycle).
fn churn(per_sec: u32, secs: f64) -> u64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        drop(TcpListener::bind("127.0.0.1:0").unwrap());
        n += 1;
        let due = start + Duration::from_secs_f64(n as f64 / f64::from(per_sec));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    n
}

/// Sequences 1..=max, each present at least once.
fn assert_gap_free(seqs: &[u64]) -> u64 {
    let set: BTreeSet<u64> = seqs.iter().copied().collect();
    let max = *set.last().expect("something arrived");
    let missing: Vec<u64> = (1..=max).filter(|s| !set.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {max} sequences never arrived: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    max
}

fn lost_at<'a>(events: &'a [Value], sink: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| action(e) == "events-lost" && e["portwatch"]["lost"]["sink"] == sink)
        .collect()
}

/// Syslog over TLS (RFC 5425) reaches rsyslog's gtls input, verified against the test
/// CA; a wrong CA and a wrong name each stop the start with one line that says what to do.
#[test]
fn syslog_over_tls_reaches_rsyslog_and_bad_certificates_fail_in_one_line() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let mut rs = Rsyslog::new(dir.path(), &certs);
    rs.start();
    let target = format!("tls:localhost:{}", rs.tls);
    let ca = certs.ca.to_str().unwrap();
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--stdout",
        "--syslog",
        &target,
        "--tls-ca",
        ca,
    ]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = u64::from(l.local_addr().unwrap().port());
    agent.expect("the listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == p
    });
    let got = poll(Duration::from_secs(10), || {
        rs.events("imtcp")
            .into_iter()
            .find(|e| action(e) == "listen-started" && port(e) == p)
    });
    drop(l);
    let (status, _) = agent.stop();
    assert!(status.success());
    let ev = got.expect("the event over TLS at rsyslog");
    assert_eq!(ev["process"]["pid"], std::process::id());

    let other = certs.other_ca.to_str().unwrap();
    one_line_error(
        Agent::try_start(&["--no-snapshot", "--syslog", &target, "--tls-ca", other]),
        &["not signed by a CA", "--tls-ca"],
    );
    let by_ip = format!("tls:127.0.0.1:{}", rs.tls);
    one_line_error(
        Agent::try_start(&["--no-snapshot", "--syslog", &by_ip, "--tls-ca", ca]),
        &["not valid for the name `127.0.0.1`"],
    );
}

/// JSON lines over TLS to `openssl s_server`; the same two certificate mistakes.
#[test]
fn forward_over_tls_reaches_a_tls_listener_and_bad_certificates_fail_in_one_line() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let tls_port = free_port();
    let received = dir.path().join("received");
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{tls_port}"))
        .arg("-cert")
        .arg(&certs.cert)
        .arg("-key")
        .arg(&certs.key)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&received).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(Duration::from_secs(10), || {
        TcpListener::bind(("127.0.0.1", tls_port))
            .is_err()
            .then_some(())
    })
    .expect("s_server listening");
    let ca = certs.ca.to_str().unwrap();
    let other = certs.other_ca.to_str().unwrap();
    // The certificate mistakes first: s_server serves one client at a time.
    one_line_error(
        Agent::try_start(&[
            "--no-snapshot",
            "--forward",
            &format!("tls:localhost:{tls_port}"),
            "--tls-ca",
            other,
        ]),
        &["not signed by a CA", "--tls-ca"],
    );
    one_line_error(
        Agent::try_start(&[
            "--no-snapshot",
            "--forward",
            &format!("tls:127.0.0.1:{tls_port}"),
            "--tls-ca",
            ca,
        ]),
        &["not valid for the name"],
    );
    let target = format!("tls:localhost:{tls_port}");
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--stdout",
        "--forward",
        &target,
        "--tls-ca",
        ca,
    ]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = u64::from(l.local_addr().unwrap().port());
    agent.expect("the listener on stdout", |e| {
        action(e) == "listen-started" && port(e) == p
    });
    let got = poll(Duration::from_secs(10), || {
        portwatch_tests::read_json_lines(&received)
            .into_iter()
            .find(|e| action(e) == "listen-started" && port(e) == p)
    });
    drop(l);
    let (status, _) = agent.stop();
    let _ = server.kill();
    let _ = server.wait();
    assert!(status.success());
    got.expect("the event as a JSON line over TLS");
}

/// RELP over TLS to rsyslog's imrelp (`tls="on"`), once with each TLS library librelp
/// has on Debian 12 (GnuTLS and OpenSSL), the agent showing its client certificate as
/// the fleet relay asks: every `event.sequence` the agent wrote arrives, none is lost.
/// A wrong CA and a wrong name each stop the start with one line.
#[test]
fn relp_over_tls_reaches_rsyslog_and_bad_certificates_fail_in_one_line() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let (ca, other) = (certs.ca.to_str().unwrap(), certs.other_ca.to_str().unwrap());
    let (cert, key) = (
        certs.client_cert.to_str().unwrap(),
        certs.client_key.to_str().unwrap(),
    );
    for tlslib in ["gnutls", "openssl"] {
        let mut rs = Rsyslog::relp_tls(dir.path(), &certs, tlslib);
        rs.start();
        let target = format!("tls:localhost:{}", rs.relp);
        let sink = format!("relp:{target}");
        let mut agent = Agent::start(&[
            "--no-snapshot",
            "--stdout",
            "--relp",
            &target,
            "--tls-ca",
            ca,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]);
        churn(100, 2.0);
        // Everything the agent wrote to stdout also reached the relay, numbered alike.
        let delivered = poll(Duration::from_secs(20), || {
            agent.wait_for(Duration::from_millis(200), |_| false);
            let n = agent.seen.len() as u64;
            (rs.sequences("imrelp").into_iter().max() >= Some(n)).then_some(n)
        });
        let (status, events) = agent.stop();
        assert!(status.success(), "{tlslib}: the agent failed");
        assert!(
            delivered.is_some(),
            "{tlslib}: the relay did not get every event: {}",
            std::fs::read_to_string(rs.dir.join("rsyslog.err")).unwrap_or_default()
        );
        let seqs = poll(Duration::from_secs(10), || {
            let s = rs.sequences("imrelp");
            (s.iter().max() == Some(&(events.len() as u64))).then_some(s)
        })
        .unwrap_or_else(|| rs.sequences("imrelp"));
        let max = assert_gap_free(&seqs);
        assert_eq!(
            max,
            events.len() as u64,
            "{tlslib}: relay and agent count alike"
        );
        assert!(max > 300, "{tlslib}: {max} events in 2 s of churn");
        assert!(
            lost_at(&events, &sink).is_empty(),
            "{tlslib}: {:?}",
            lost_at(&events, &sink)
        );
        eprintln!("relp over TLS ({tlslib}): {max} events, all arrived");

        one_line_error(
            Agent::try_start(&[
                "--no-snapshot",
                "--relp",
                &target,
                "--tls-ca",
                other,
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ]),
            &["not signed by a CA", "--tls-ca"],
        );
        let by_ip = format!("tls:127.0.0.1:{}", rs.relp);
        one_line_error(
            Agent::try_start(&[
                "--no-snapshot",
                "--relp",
                &by_ip,
                "--tls-ca",
                ca,
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ]),
            &["not valid for the name `127.0.0.1`"],
        );
        rs.stop();
    }
}

/// RELP to rsyslog's imrelp under a steady stream (200 events/s): the relay is stopped
/// for OUTAGE and started again. Every `event.sequence` arrives at least once, none is
/// missing, nothing is reported lost, the spool was used meanwhile, and the relay's
/// count agrees with the agent's.
#[test]
fn relp_delivers_every_event_across_a_relay_outage() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let mut rs = Rsyslog::new(dir.path(), &certs);
    rs.start();
    let target = format!("127.0.0.1:{}", rs.relp);
    let sink = format!("relp:tcp:{target}");
    let mut agent = Agent::start(&[
        "--no-snapshot",
        "--stdout",
        "--relp",
        &target,
        "--health-interval",
        "1",
    ]);
    churn(100, 3.0);
    rs.stop();
    churn(100, OUTAGE_SECS);
    rs.start();
    churn(100, 3.0);
    // Everything the agent wrote to stdout also went to the relay, numbered alike.
    let written = poll(Duration::from_secs(30), || {
        agent.wait_for(Duration::from_millis(500), |_| false);
        let max = rs.sequences("imrelp").into_iter().max()?;
        let health = agent
            .seen
            .iter()
            .rev()
            .find(|e| action(e) == "sensor-health")?
            .clone();
        let spooled = health["portwatch"]["stats"]["sinks"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == sink)?["spooled"]
            .as_u64()?;
        eprintln!("relay has up to {max}, agent's spool holds {spooled}");
        (spooled == 0 && max > 0).then_some(max)
    });
    let (status, events) = agent.stop();
    assert!(status.success());
    assert!(
        written.is_some(),
        "the spool did not drain after the relay came back"
    );
    let seqs = poll(Duration::from_secs(10), || {
        let s = rs.sequences("imrelp");
        let n = events.len() as u64;
        (s.iter().max() == Some(&n)).then_some(s)
    })
    .unwrap_or_else(|| rs.sequences("imrelp"));
    let max = assert_gap_free(&seqs);
    assert_eq!(
        max,
        events.len() as u64,
        "relay and agent count the same events"
    );
    assert!(
        lost_at(&events, &sink).is_empty(),
        "{:?}",
        lost_at(&events, &sink)
    );
    let spooled_during_outage = events.iter().any(|e| {
        action(e) == "sensor-health"
            && e["portwatch"]["stats"]["sinks"]
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|s| s["name"] == sink && s["spooled"].as_u64() > Some(100))
                })
    });
    assert!(
        spooled_during_outage,
        "no health event saw events waiting in the spool"
    );
    eprintln!(
        "relp outage: {max} events, {} delivered twice",
        seqs.len() as u64 - max
    );
}

/// Outage length in the RELP tests: a minute, the length a relay's maintenance restart
/// may take (12,000 events at 200 events/s go to the spool meanwhile).
const OUTAGE_SECS: f64 = 60.0;

/// The same outage, with the agent stopped and started again while the relay is down:
/// the second agent replays the first one's spool, numbering on after it.
#[test]
fn relp_spool_is_replayed_by_the_next_agent() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut rs = Rsyslog::new(dir.path(), &certs);
    rs.start();
    let target = format!("127.0.0.1:{}", rs.relp);
    let sink = format!("relp:tcp:{target}");
    let args = [
        "--no-snapshot",
        "--stdout",
        "--relp",
        &target,
        "--spool-dir",
        spool_s,
    ];
    let agent = Agent::start(&args);
    churn(100, 2.0);
    rs.stop();
    churn(100, OUTAGE_SECS / 2.0);
    let (status, first) = agent.stop();
    assert!(status.success());
    let agent = Agent::start(&args);
    churn(100, OUTAGE_SECS / 2.0);
    rs.start();
    churn(100, 3.0);
    std::thread::sleep(Duration::from_secs(2));
    let (status, second) = agent.stop();
    assert!(status.success());
    let total = (first.len() + second.len()) as u64;
    let seqs = poll(Duration::from_secs(10), || {
        let s = rs.sequences("imrelp");
        (s.iter().max() == Some(&total)).then_some(s)
    })
    .unwrap_or_else(|| rs.sequences("imrelp"));
    let max = assert_gap_free(&seqs);
    assert_eq!(max, total, "relay and the two agents count the same events");
    assert!(lost_at(&first, &sink).is_empty() && lost_at(&second, &sink).is_empty());
}

/// kill -9 while the agent writes its spool (relay down), then a torn record at the
/// spool's end as a crash in the middle of a write leaves it. The next agent sends every
/// record that was in the spool, skips the torn one and reports it as lost.
#[test]
fn spool_survives_kill_9_and_counts_a_torn_record() {
    if !can_run_kernel_tests() {
        return;
    }
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut rs = Rsyslog::new(dir.path(), &certs);
    let target = format!("127.0.0.1:{}", rs.relp);
    let sink = format!("relp:tcp:{target}");
    let args = [
        "--no-snapshot",
        "--stdout",
        "--relp",
        &target,
        "--spool-dir",
        spool_s,
    ];
    let agent = Agent::start(&args);
    churn(100, 4.0);
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    drop(agent);
    // What the killed agent left in its spool.
    let sink_dir = spool.join(sink.replace(':', "_"));
    let in_spool: Vec<u64> = {
        let mut s = portwatch::output::spool::Spool::open(
            &sink_dir,
            portwatch::output::spool::DEFAULT_MAX_BYTES,
        )
        .expect("the spool opens after kill -9");
        let mut pos = s.acked();
        let mut seqs = Vec::new();
        loop {
            let (recs, next) = s.read(pos, 10_000, 1 << 20).unwrap();
            if recs.is_empty() {
                break;
            }
            seqs.extend(recs.iter().map(|r| r.seq));
            pos = next;
        }
        assert_eq!(s.take_torn(), 0);
        seqs
    };
    assert!(
        in_spool.len() > 300,
        "{} events spooled in 4 s",
        in_spool.len()
    );
    // Tear: half of one more record at the end of the newest segment.
    let newest = std::fs::read_dir(&sink_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg") && p.metadata().unwrap().len() > 0)
        .max()
        .unwrap();
    let mut rec = Vec::new();
    portwatch::output::spool::encode_record(&mut rec, 999_999, br#"{"torn":true}"#);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut f, &rec[..rec.len() / 2]).unwrap();
    drop(f);

    rs.start();
    let mut agent = Agent::start(&args);
    let torn = agent
        .wait_for(Duration::from_secs(20), |e| {
            action(e) == "events-lost"
                && e["portwatch"]["lost"]["reason"] == "spool-torn-record"
                && e["portwatch"]["lost"]["sink"] == sink
        })
        .expect("the torn record reported as events-lost");
    assert_eq!(torn["portwatch"]["lost"]["count"], 1, "{torn}");
    let want: BTreeSet<u64> = in_spool.iter().copied().collect();
    let got = poll(Duration::from_secs(20), || {
        let have: BTreeSet<u64> = rs.sequences("imrelp").into_iter().collect();
        want.is_subset(&have).then_some(have)
    });
    let (status, _) = agent.stop();
    assert!(status.success());
    let have = got.unwrap_or_else(|| {
        let have: BTreeSet<u64> = rs.sequences("imrelp").into_iter().collect();
        panic!(
            "{} spooled events never arrived",
            want.difference(&have).count()
        )
    });
    assert!(!have.contains(&999_999), "the torn record was not sent");
    // The second agent numbered on after the first one's spool.
    assert!(have.iter().any(|&s| s > *want.iter().max().unwrap()));
    assert_gap_free(&have.into_iter().collect::<Vec<_>>());
}

/// The fleet relay configuration in packaging/relay passes rsyslog's own check
/// (`rsyslogd -N1`), with its example certificate paths pointed at real files.
#[test]
fn fleet_relay_config_passes_rsyslogd_check() {
    require_relay_tools();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relay/rsyslog-relay.conf");
    let conf = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "/etc/rsyslog.d/tls/fleet-ca.pem",
            certs.ca.to_str().unwrap(),
        )
        .replace("/etc/rsyslog.d/tls/relay.pem", certs.cert.to_str().unwrap())
        .replace("/etc/rsyslog.d/tls/relay.key", certs.key.to_str().unwrap())
        .replace("/var/spool/rsyslog", dir.path().to_str().unwrap());
    let path = dir.path().join("relay.conf");
    std::fs::write(&path, conf).unwrap();
    let out = Command::new("rsyslogd")
        .arg("-N1")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("error"),
        "rsyslogd -N1: {text}"
    );
}

/// Where `cargo xtask setup` unpacks Debian's syslog-ng-core and syslog-ng-mod-rdkafka
/// (xtask/src/main.rs `SYSLOG_NG_ROOT`): installed with apt they would remove rsyslog.
const SYSLOG_NG_ROOT: &str = "/opt/portwatch-test-tools/syslog-ng";

/// The syslog-ng fleet relay configuration in packaging/relay passes syslog-ng's own
/// check (`syslog-ng --syntax-only`), its example certificate paths pointed at real
/// files (syslog-ng opens them while checking), with the modules it loads (afsocket's
/// TLS, kafka-c) from the unpacked package. A configuration with a typo fails the same
/// check, so a pass means something. No syslog-ng: the test fails, it does not skip.
#[test]
fn fleet_relay_config_passes_syslog_ng_check() {
    let root = Path::new(SYSLOG_NG_ROOT);
    let bin = root.join("usr/sbin/syslog-ng");
    assert!(
        bin.exists() && have("openssl"),
        "{} or openssl is missing: cargo xtask setup unpacks syslog-ng there (apt-get \
         download syslog-ng-core syslog-ng-mod-rdkafka, dpkg-deb -x)",
        bin.display()
    );
    let libs = root.join("usr/lib/syslog-ng");
    let modules: Vec<PathBuf> = std::fs::read_dir(&libs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("libafsocket.so").exists())
        .collect();
    assert_eq!(
        modules.len(),
        1,
        "one module directory in {}",
        libs.display()
    );
    assert!(
        modules[0].join("libkafka.so").exists(),
        "syslog-ng-mod-rdkafka is not unpacked in {}",
        root.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relay/syslog-ng-relay.conf");
    let conf = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "/etc/syslog-ng/tls/fleet-ca.pem",
            certs.ca.to_str().unwrap(),
        )
        .replace("/etc/syslog-ng/tls/relay.pem", certs.cert.to_str().unwrap())
        .replace("/etc/syslog-ng/tls/relay.key", certs.key.to_str().unwrap())
        .replace("/var/lib/syslog-ng/portwatch", dir.path().to_str().unwrap());
    let check = |conf: &str| {
        let path = dir.path().join("relay.conf");
        std::fs::write(&path, conf).unwrap();
        let out = Command::new(&bin)
            .arg("--syntax-only")
            .arg(format!("--module-path={}", modules[0].display()))
            .arg("--cfgfile")
            .arg(&path)
            .env("LD_LIBRARY_PATH", &libs)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), text)
    };
    let (ok, text) = check(&conf);
    assert!(
        ok && !text.to_lowercase().contains("error") && !text.contains("WARNING"),
        "syslog-ng --syntax-only: {text}"
    );
    let (ok, text) = check(&conf.replace("kafka-c(", "kafka-cc("));
    assert!(!ok, "a misspelt driver passed syslog-ng's check: {text}");
}
