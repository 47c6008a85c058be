//! What each fuzz target asserts, as plain functions of the input bytes.
//!
//! The libFuzzer binaries in `fuzz_targets/` are one-line wrappers around these, and
//! `portwatch/tests/fuzz_regressions.rs` includes this file to replay every committed
//! input under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` with plain
//! `cargo test`, so a fixed crash stays fixed on machines without libFuzzer.
//!
//! A check panics (which libFuzzer reports as a crash) when a parser panics, or when its
//! result breaks a property the rest of the agent relies on: an error a user or a log
//! reader sees is one line without control characters, an event is one JSON line.

use std::net::IpAddr;

use portwatch::{
    attribution::procfs,
    attribution::scan,
    classify::{self, Classifier, Exposure, Listener},
    kernel::ring,
};

/// A target's checks on one input; panics on a failure.
pub type Check = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("proc_net", proc_net),
    ("procfs", procfs),
    ("rules", rules),
    ("ruleset", ruleset),
    ("record", record),
    ("emit", emit),
    ("remediation", remediation),
    ("relp", relp),
];

/// RELP frames from a relay (hostile or broken): the parser never panics, never claims
/// more bytes than it was given, never accepts more data than its bound, and its errors
/// are one clean line (they are logged). Responses parse to a 3-digit code and a
/// one-line text.
pub fn relp(data: &[u8]) {
    use portwatch::output::relp::{MAX_RESPONSE_DATA, parse_frame, response};
    let mut rest = data;
    while !rest.is_empty() {
        match parse_frame(rest) {
            Ok(Some((frame, n))) => {
                assert!(n > 0 && n <= rest.len(), "took {n} of {} bytes", rest.len());
                assert!(frame.data.len() <= MAX_RESPONSE_DATA);
                assert!(frame.txnr <= 999_999_999);
                assert!(!frame.command.is_empty() && frame.command.len() <= 32);
                // The same frame with more bytes after it parses the same.
                let mut longer = rest[..n].to_vec();
                longer.extend_from_slice(b"0 x");
                let again = parse_frame(&longer).expect("a prefix that parsed still parses");
                assert_eq!(again, Some((frame.clone(), n)));
                if let Ok(r) = response(&frame.data) {
                    assert!(r.code <= 999);
                    assert_one_clean_line("RELP response text", &r.text);
                }
                rest = &rest[n..];
            }
            Ok(None) => break,
            Err(e) => {
                assert_one_clean_line("RELP parse error", &e.to_string());
                break;
            }
        }
    }
}

/// An error shown to a person (stderr, a log line) must stay on its one line and must
/// not carry terminal escapes from the hostile text it quotes.
fn assert_one_clean_line(what: &str, msg: &str) {
    assert!(
        !msg.chars().any(char::is_control),
        "{what}: error message has a line break or control character: {msg:?}"
    );
}

/// `/proc/<pid>/net/{tcp,tcp6,udp,udp6}`. The first byte picks the file kind (bit 0:
/// UDP, bit 1: IPv6); the rest is the file's text (the reader rejects non-UTF-8 before
/// parsing, so such inputs are skipped).
pub fn proc_net(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let transport = if sel & 1 == 0 {
        scan::Protocol::Tcp
    } else {
        scan::Protocol::Udp
    };
    let ipv6 = sel & 2 != 0;
    match scan::parse_proc_net(text, transport, ipv6) {
        Ok(sockets) => {
            for s in sockets {
                assert_eq!(s.transport, transport);
                assert_eq!(s.ipv6, ipv6);
                assert_eq!(s.addr.is_ipv6(), ipv6, "{s:?}");
                if transport == scan::Protocol::Udp {
                    assert_ne!(s.port, 0, "an unbound UDP socket is not a listener");
                }
            }
        }
        Err(e) => {
            assert_one_clean_line("proc_net", &e.to_string());
            let line = e.line().expect("a parse error names its line");
            assert!(
                line >= 1 && line <= text.lines().count(),
                "line {line}: {e}"
            );
        }
    }
    if text.len() <= 64 {
        match scan::parse_hex_addr(text) {
            Ok(addr) => assert!(text.len() == 8 || text.len() == 32, "{addr}"),
            Err(e) => assert_one_clean_line("parse_hex_addr", &e.to_string()),
        }
    }
}

/// `/proc/<pid>/{stat,status,cgroup,cmdline}`, a cgroup path, mountinfo, /etc/passwd and
/// an exe link target: all written or named by whoever runs the process. Every parser
/// gets every input (they are cheap, and seeds for one reach code in the others).
pub fn procfs(data: &[u8]) {
    // The readers decode these files lossily, so the parsers see any text.
    let text = String::from_utf8_lossy(data);

    match procfs::parse_stat(&text) {
        Ok(st) => assert!(text.contains(st.comm.as_str())),
        Err(e) => assert_one_clean_line("parse_stat", &e.to_string()),
    }
    if let Err(e) = procfs::parse_status_ids(&text) {
        assert_one_clean_line("parse_status_ids", &e.to_string());
    }
    if let Some(path) = procfs::parse_proc_cgroup(&text) {
        assert!(text.contains(path.as_str()));
        cgroup_path(&path);
    }
    cgroup_path(&text);

    let args = procfs::parse_cmdline(data);
    let kept = data.len().min(procfs::CMDLINE_CAP);
    assert!(args.len() <= kept + 1);
    assert!(args.iter().all(|a| !a.contains('\0')));

    // Whatever it returns is a path; only panics matter.
    let _ = procfs::parse_cgroup2_mount(&text);

    for (id, name) in procfs::parse_passwd(&text) {
        assert!(!name.is_empty() && !name.contains(':'), "{id}: {name:?}");
    }

    let (path, deleted) = procfs::split_deleted(&text);
    if deleted {
        assert_eq!(format!("{path} (deleted)"), *text);
    } else {
        assert_eq!(path, text);
    }
}

fn cgroup_path(path: &str) {
    let info = procfs::parse_cgroup_path(path);
    for part in [&info.systemd_unit, &info.systemd_slice]
        .into_iter()
        .flatten()
    {
        assert!(!part.is_empty() && !part.contains('/'), "{part:?}");
        assert!(path.contains(part.as_str()), "{part:?} not in {path:?}");
    }
    if let Some(id) = &info.container_id {
        // Written unescaped into text lines (`container=...`).
        assert!(
            !id.is_empty() && !id.contains('/') && !id.chars().any(char::is_control),
            "{id:?}"
        );
    }
    if info.container_runtime.is_some() {
        assert!(info.container_id.is_some(), "runtime without id: {info:?}");
    }
}

/// A rules file (TOML). Text that parses must be usable by the classifier; text that
/// does not must give one clean line naming the file.
pub fn rules(data: &[u8]) {
    // load_rules reads with read_to_string: non-UTF-8 is an I/O error, not parsed.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match classify::parse_rules(text, "rules.toml") {
        Ok(policy) => policy,
        Err(e) => {
            let msg = e.to_string();
            assert_one_clean_line("parse_rules", &msg);
            assert!(msg.starts_with("rules.toml:"), "{msg}");
            return;
        }
    };
    let mut ports = vec![1, 22, 80, 3306, 9999, 11211, 65535];
    for r in policy.allow.iter().chain(&policy.deny) {
        ports.extend(r.ports.iter().flat_map(|p| [p.lo, p.hi]));
    }
    for e in &policy.risky {
        ports.extend(e.ports.iter().flat_map(|p| [p.lo, p.hi]));
    }
    ports.truncate(64);
    let classifier = Classifier::new(Some(policy));
    let addrs: [IpAddr; 4] = [
        [127, 0, 0, 1].into(),
        [0, 0, 0, 0].into(),
        [10, 1, 2, 3].into(),
        std::net::Ipv6Addr::UNSPECIFIED.into(),
    ];
    let public: [IpAddr; 1] = [[203, 0, 113, 5].into()];
    for port in ports {
        for addr in addrs {
            for t in [classify::Transport::Tcp, classify::Transport::Udp] {
                let mut l = Listener::new(t, addr, port);
                l.process_name = Some("memcached");
                l.systemd_unit = Some("memcached.service");
                let exposure = Exposure::new(addr, None, Some(&public));
                let v = classifier.classify(&l, &exposure);
                if v.alert {
                    assert!(v.severity.is_some(), "an alert has a severity: {v:?}");
                }
            }
        }
    }
}

/// One ring-buffer item as the kernel side writes it (`portwatch_common::SocketRecord`).
pub fn record(data: &[u8]) {
    match ring::decode(data) {
        Ok(r) => {
            assert!(data.len() >= portwatch_common::SOCKET_RECORD_SIZE);
            assert!(r.comm.len() <= portwatch_common::COMM_LEN);
            assert!(!r.comm.contains(&0), "comm stops at the first NUL");
        }
        Err(e) => assert_one_clean_line("decode", &e.to_string()),
    }
}

/// Event strings that come from hostile processes (comm, argv, exe path, cgroup and unit
/// names), written by the real [`portwatch::output::sinks::Output`] in every format: the JSON
/// line must be one valid document that gives the strings back unchanged; the text line
/// must be one line with no control characters (no terminal escapes), and so must the
/// row of `portwatch snapshot`'s table.
pub fn emit(data: &[u8]) {
    use portwatch::{
        output::event,
        output::sinks::{Format, Output, SinkSpec},
    };

    let mut parts = data
        .split(|&b| b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next().unwrap_or_default();
    let (name, exe, unit, cgroup, user) = (next(), next(), next(), next(), next());
    // As the agent does: the container comes out of the cgroup path.
    let container = procfs::parse_cgroup_path(&cgroup);
    let args: Vec<String> = std::iter::from_fn(|| parts.next()).take(32).collect();
    let process = event::Process {
        pid: 4242,
        name: Some(name.clone()),
        parent: Some(event::Parent { pid: 1 }),
        executable: Some(exe.clone()),
        command_line: Some(args.join(" ")),
        args: Some(args.clone()),
        start_ns: None,
        entity_id: Some("0123456789abcdef".into()),
        executable_owner: None,
    };
    let ev = event::Event {
        time_ns: 1_795_741_780_451_005_964,
        message: None,
        event: event::EventMeta {
            kind: event::Kind::Event,
            category: &["network"],
            type_: &["start"],
            action: event::Action::ListenStarted,
            dataset: "portwatch.listener",
            module: "portwatch",
            sequence: 1,
            duration: None,
            severity: None,
            created_ns: 1_795_741_780_451_276_043,
        },
        log: None,
        network: Some(event::Network {
            transport: portwatch::socket::Protocol::Tcp,
            type_: "ipv4",
        }),
        server: Some(event::Server {
            ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port: 8080,
        }),
        process: Some(event::shared(process)),
        user: Some(event::shared(event::Named {
            id: "1000".into(),
            name: Some(user.clone()),
        })),
        group: None,
        container: container.container_id.map(|id| {
            event::shared(event::Container {
                id,
                runtime: container.container_runtime,
            })
        }),
        rule: None,
        host: event::shared(event::Host {
            name: "host".into(),
            id: None,
            boot: None,
        }),
        agent: event::shared(event::Agent {
            type_: "portwatch",
            name: "portwatch",
            version: "0.0.0",
        }),
        ecs: event::Ecs {
            version: event::ECS_VERSION,
        },
        portwatch: event::Portwatch {
            systemd: Some(event::shared(event::Systemd {
                unit: Some(unit.clone()),
                slice: None,
                user_manager: Some(1000),
            })),
            cgroup: Some(event::shared(event::Cgroup {
                id: Some(1),
                path: Some(cgroup.clone()),
            })),
            ..Default::default()
        },
    };

    // `portwatch snapshot`'s table: a header, one row, the count line.
    let table = portwatch::inventory::render_table(&[(ev.clone(), None)], false);
    assert_eq!(table.lines().count(), 3, "{table:?}");
    assert!(
        !table
            .chars()
            .any(|c| (c.is_control() && c != '\n')
                || portwatch::output::sinks::is_invisible_format(c)),
        "the table has control characters: {table:?}"
    );

    // The real output path (queue, writer thread) into a file per process.
    let path = std::env::temp_dir().join(format!("portwatch-fuzz-emit-{}", std::process::id()));
    for format in [Format::Json, Format::Text, Format::Ocsf] {
        std::fs::write(&path, b"").expect("truncating the scratch output file");
        let mut out = Output::new(
            format,
            &[SinkSpec::File(path.clone())],
            16,
            true,
            &portwatch::output::sinks::Delivery::default(),
        )
        .expect("opening the scratch file");
        out.start().expect("starting the writer");
        out.send(ev.clone());
        out.finish().expect("writing an event");
        drop(out);
        let written = std::fs::read(&path).expect("reading the scratch file back");
        let body = written
            .strip_suffix(b"\n")
            .expect("an event ends with a newline");
        assert!(!body.contains(&b'\n'), "an event is one line: {written:?}");
        match format {
            Format::Json => {
                let v: serde_json::Value =
                    serde_json::from_slice(body).expect("an event is valid JSON");
                assert_eq!(v["process"]["name"], name.as_str());
                assert_eq!(v["process"]["executable"], exe.as_str());
                assert_eq!(v["process"]["args"], serde_json::json!(args));
                assert_eq!(v["portwatch"]["systemd"]["unit"], unit.as_str());
                assert_eq!(v["portwatch"]["cgroup"]["path"], cgroup.as_str());
                assert_eq!(v["user"]["name"], user.as_str());
                // The hand-written JSON writer is byte for byte what serde writes (the
                // writer numbered this sink's first event 1, as `ev` is).
                assert_eq!(
                    String::from_utf8_lossy(body),
                    String::from_utf8_lossy(&serde_json::to_vec(&ev).expect("serialising")),
                    "portwatch::output::json differs from serde"
                );
            }
            Format::Ocsf => {
                let v: serde_json::Value =
                    serde_json::from_slice(body).expect("an OCSF event is valid JSON");
                assert_eq!(v["actor"]["process"]["name"], name.as_str());
            }
            Format::Text => {
                let line = std::str::from_utf8(body).expect("a text line is UTF-8");
                assert!(
                    !line
                        .chars()
                        .any(|c| c.is_control() || portwatch::output::sinks::is_invisible_format(c)),
                    "a text line has no control or bidi/zero-width characters: {line:?}"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Alert advice for a listener whose process, executable, unit and container names are
/// hostile: the commands are meant to be pasted into a root shell, so every character a
/// shell would act on must be inside quotes, whatever the names are.
pub fn remediation(data: &[u8]) {
    const PORTS: [u16; 6] = [11211, 3306, 2375, 111, 23, 6379];
    let mut parts = data
        .split(|&b| b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next().filter(|s| !s.is_empty());
    let (name, exe, unit, container) = (next(), next(), next(), next());
    let port = PORTS[data.len() % PORTS.len()];
    // Building the catalogue's index costs more than the rest of a run: once.
    static CLASSIFIER: std::sync::OnceLock<Classifier> = std::sync::OnceLock::new();
    let classifier = CLASSIFIER.get_or_init(|| Classifier::new(None));
    let public: [IpAddr; 1] = [[203, 0, 113, 5].into()];
    for addr in [IpAddr::from([0, 0, 0, 0]), IpAddr::from([203, 0, 113, 5])] {
        for t in [classify::Transport::Tcp, classify::Transport::Udp] {
            let mut l = Listener::new(t, addr, port);
            l.process_name = name.as_deref();
            l.executable = exe.as_deref();
            l.systemd_unit = unit.as_deref();
            l.container_id = container.as_deref();
            l.pid = Some(4242);
            let v = classifier.classify(&l, &Exposure::new(addr, None, Some(&public)));
            if !v.alert {
                continue;
            }
            for lang in [classify::Lang::En, classify::Lang::Ja] {
                for cmd in classify::remediation(&l, &v, lang).commands() {
                    assert_shell_safe(cmd);
                }
            }
        }
    }
}

/// The command's text outside quotes (POSIX rules: nothing is special inside '...';
/// a backslash escapes the next character outside quotes and `"\$` inside "...")
/// may hold only what portwatch's own templates put there.
fn assert_shell_safe(cmd: &str) {
    let mut bare = String::new();
    let mut chars = cmd.chars();
    let mut quote = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (None, '\\') => {
                chars.next();
            }
            (None, _) => bare.push(c),
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {cmd:?}");
    // The templates' own operators (iptables' negation is a word of its own, socket
    // activation's `systemctl list-sockets | grep`) and the placeholders a person
    // replaces.
    for ok in [
        "&&",
        " | ",
        " ! ",
        "<PID>",
        "<socket-unit>",
        "<service-unit>",
        "<unit>",
    ] {
        bare = bare.replace(ok, " ");
    }
    assert!(
        !bare.contains(|c: char| c.is_control() || ";&|`$()<>*?[]{}~#!\\".contains(c)),
        "shell syntax outside quotes in {cmd:?} (bare: {bare:?})"
    );
}

/// A firewall ruleset: `nft -j list ruleset` JSON (and, split at the first NUL, an
/// `iptables-save` text for the xt rules and as a legacy ruleset). Whatever parses must
/// evaluate without panicking for a few packets; what does not must give one clean line.
pub fn ruleset(data: &[u8]) {
    use portwatch::classify::firewall::{self, IfAddr, ipt, model, nft};
    use portwatch::classify::{Scope, Stack, Transport};
    let (json, save) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let save = String::from_utf8_lossy(save);
    let mut rulesets = vec![ipt::parse(
        &save,
        model::Family::Ip,
        model::Origin::IptablesLegacy,
    )];
    match nft::parse(json) {
        Ok(mut p) => {
            ipt::fill_xt(&mut p.ruleset, &p.xt_rules, &save, model::Family::Ip);
            rulesets.push(p.ruleset);
        }
        Err(e) => assert_one_clean_line("nft::parse", &e.to_string()),
    }
    let ifaces = [
        IfAddr {
            ifname: "eth0".into(),
            addr: "203.0.113.5".parse().unwrap(),
            prefix: 24,
        },
        IfAddr {
            ifname: "eth1".into(),
            addr: "10.0.0.5".parse().unwrap(),
            prefix: 8,
        },
        IfAddr {
            ifname: "eth0".into(),
            addr: "2001:db8::5".parse().unwrap(),
            prefix: 64,
        },
    ];
    for rs in &rulesets {
        for (t, port) in [
            (Transport::Tcp, 22),
            (Transport::Udp, 11211),
            (Transport::Tcp, 1),
        ] {
            for want in [Scope::Public, Scope::Private] {
                let f = firewall::probe(
                    rs,
                    &ifaces,
                    t,
                    "::".parse().unwrap(),
                    Some(Stack::DualStack),
                    port,
                    want,
                );
                if let Some(f) = f {
                    assert_eq!(
                        f.rule.is_some(),
                        f.verdict == firewall::State::Filtered,
                        "{f:?}"
                    );
                }
            }
        }
        // NAT publications: found without panicking; a filtered one names what filters.
        let mut rs = rs.clone();
        rs.forward_v4 = Some(true);
        rs.forward_v6 = Some(false);
        for p in firewall::nat::find(&rs, &ifaces).list {
            assert_eq!(
                p.filter_rule.is_some(),
                p.verdict == firewall::State::Filtered,
                "{p:?}"
            );
        }
    }
}
