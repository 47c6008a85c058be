//! Garbage in every flag and value of every subcommand: the built binary must exit
//! non-zero with exactly one line on stderr, `portwatch: error: ...`, and never panic
//! (issue 6). Nothing here loads eBPF: every case fails before the sensor would start,
//! and a case that starts it anyway is killed and reported.

use std::{
    ffi::{OsStr, OsString},
    io::Read as _,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portwatch_tests::agent_binary;

/// One run: (exit code, stderr). Killed and failed after a deadline: a garbage argument
/// must never leave the agent running.
fn run(args: &[OsString]) -> (i32, String) {
    let bin = agent_binary();
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask build`",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for portwatch") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portwatch {args:?} was still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_end(&mut stderr)
        .expect("reading stderr");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("portwatch {args:?} died of a signal: {status}"));
    (code, String::from_utf8_lossy(&stderr).into_owned())
}

fn os(parts: &[&[u8]]) -> Vec<OsString> {
    parts
        .iter()
        .map(|p| OsString::from_vec(p.to_vec()))
        .collect()
}

/// Asserts the one-line-error contract for one argument list; returns the line.
fn one_line_error(args: &[OsString], want_code: i32) -> String {
    let (code, stderr) = run(args);
    let shown = format!("portwatch {args:?}: exit {code}, stderr {stderr:?}");
    assert!(!stderr.contains("panicked"), "{shown}");
    assert_eq!(code, want_code, "{shown}");
    let line = stderr
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stderr does not end in a newline: {shown}"));
    assert!(
        !line.contains('\n'),
        "stderr is more than one line: {shown}"
    );
    assert!(line.starts_with("portwatch: error: "), "{shown}");
    assert!(
        !line.chars().any(char::is_control),
        "control characters reach the terminal: {shown}"
    );
    line.to_owned()
}

const HUGE: &str = "184467440737095516161844674407370955161618446744073709551616";

/// Values that are wrong for any flag that takes a number, a name or an enum.
fn bad_values() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "",
        " ",
        "-1",
        "abc",
        "0x10",
        "1e6",
        "NaN",
        "4096 ",
        HUGE,
        "\u{1b}[2J",
        "a\nb",
        "ｊａ",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(b"\xff\xfe".to_vec());
    v.push(vec![b'9'; 5000]);
    v
}

/// Flag errors (exit 2): unknown flags, bad values, missing values, extra positionals.
#[test]
fn bad_flags_and_values_are_one_line_with_status_2() {
    let mut cases: Vec<Vec<OsString>> = Vec::new();
    for sub in [&["watch"][..], &["snapshot"], &["rules", "check", "x.toml"]] {
        let sub: Vec<&[u8]> = sub.iter().map(|s| s.as_bytes()).collect();
        for junk in [
            &b"--bogus"[..],
            b"-x",
            b"--",
            b"--verbose=3",
            b"\xff",
            b"--\xff",
        ] {
            let mut a = sub.clone();
            a.push(junk);
            // "--" alone is fine where no positional follows it.
            if junk == b"--" {
                a.push(b"extra");
            }
            cases.push(os(&a));
        }
    }
    // Bad subcommands.
    for sub in [&b"frobnicate"[..], b"\xff", b"", b"WATCH", b"rules\t"] {
        cases.push(os(&[sub]));
    }
    cases.push(os(&[b"rules", b"bogus"]));
    cases.push(os(&[b"rules", b"check"]));
    cases.push(os(&[b"rules", b"check", b"a.toml", b"b.toml"]));

    // Every value-taking flag: missing value, then each bad value.
    let flags: [(&[&str], &str, &[&str]); 12] = [
        (&["watch"], "--hooks", &["auto", "stable", "direct"]),
        (&["watch"], "--format", &["json", "text", "ocsf"]),
        (&["watch"], "--queue-events", &[]),
        (&["watch"], "--health-interval", &[]),
        (&["watch"], "--syslog", &[]),
        (&["watch"], "--forward", &[]),
        (&["watch"], "--ring-bytes", &[]),
        (&["watch"], "--priority-boost", &[]),
        (&["watch"], "--lang", &["en", "ja"]),
        (&["snapshot"], "--format", &["table", "json"]),
        (&["snapshot"], "--lang", &["en", "ja"]),
        (&["watch"], "--no-snapshot", &[]),
    ];
    for (sub, flag, _valid) in flags {
        let base: Vec<&[u8]> = sub.iter().map(|s| s.as_bytes()).collect();
        if flag == "--no-snapshot" {
            // A switch given a value.
            let mut a = base.clone();
            a.push(b"--no-snapshot=yes");
            cases.push(os(&a));
            continue;
        }
        let mut a = base.clone();
        a.push(flag.as_bytes());
        cases.push(os(&a));
        for value in bad_values() {
            let mut a = base.clone();
            a.push(flag.as_bytes());
            a.push(&value);
            cases.push(os(&a));
            // The `--flag=value` spelling too.
            let mut joined = flag.as_bytes().to_vec();
            joined.push(b'=');
            joined.extend_from_slice(&value);
            let mut a = base.clone();
            a.push(&joined);
            cases.push(os(&a));
        }
    }
    // Numbers out of range, one by one.
    for n in [
        "0",
        "1",
        "4095",
        "4097",
        "3000000",
        "2147483647",
        "4294967296",
    ] {
        cases.push(os(&[b"watch", b"--ring-bytes", n.as_bytes()]));
    }
    for n in ["21", "255", "256", "-0", "+5x"] {
        cases.push(os(&[b"watch", b"--priority-boost", n.as_bytes()]));
    }
    for n in ["0", "15", "1048577", "99999999999"] {
        cases.push(os(&[b"watch", b"--queue-events", n.as_bytes()]));
    }
    for n in ["86401", "-1", "1.5"] {
        cases.push(os(&[b"watch", b"--health-interval", n.as_bytes()]));
    }
    // Endpoints: no scheme, unknown scheme, no port, port 0 or too big, relative path,
    // UDP where a stream is needed.
    for e in [
        "localhost:514",
        "http://x:1",
        "udp:host",
        "tcp::514",
        "tcp:h:0",
        "tcp:h:65536",
        "unix:relative.sock",
        "unix:",
    ] {
        cases.push(os(&[b"watch", b"--syslog", e.as_bytes()]));
        cases.push(os(&[b"watch", b"--forward", e.as_bytes()]));
    }
    // Paths that are not there at all.
    cases.push(os(&[b"watch", b"--output"]));
    cases.push(os(&[b"watch", b"--rules"]));
    cases.push(os(&[b"snapshot", b"--rules"]));

    for args in &cases {
        one_line_error(args, 2);
    }
    eprintln!("{} flag cases", cases.len());
}

/// Files that are not rules files, behind `--rules` and `rules check` (exit 1).
#[test]
fn bad_rules_files_are_one_line_with_status_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("writing a test file");
        p.into_os_string()
    };
    let mut binary = Vec::new();
    let mut x: u32 = 0x1234_5678;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        binary.push(x as u8);
    }
    let mut long_name = dir.path().as_os_str().as_bytes().to_vec();
    long_name.push(b'/');
    long_name.extend(std::iter::repeat_n(b'a', 5000));
    let files: Vec<OsString> = vec![
        write("binary.toml", &binary),
        write("nul.toml", b"\0\0\0"),
        write(
            "escape.toml",
            b"[settings]\nmin_severity = \"\x1b[2J\t\r\"\n",
        ),
        write("bad-port.toml", b"[[deny]]\nport = 70000\n"),
        write(
            "huge-port.toml",
            format!("[[deny]]\nport = {HUGE}\n").as_bytes(),
        ),
        write("negative.toml", b"[[deny]]\nport = -1\n"),
        write("unknown.toml", b"[nonsense]\nkey = 1\n"),
        write("crlf.toml", b"[[deny]]\r\nport = \"1-\"\r\n"),
        write("newline-in-key.toml", b"[[deny]]\n\"a\nb\" = 1\n"),
        write("empty-rule.toml", b"[[allow]]\n"),
        write("big.toml", &vec![b'#'; 2 << 20]),
        dir.path().as_os_str().to_owned(),
        dir.path().join("missing.toml").into_os_string(),
        dir.path().join("no/such/dir/rules.toml").into_os_string(),
        OsString::from_vec(long_name),
        OsString::from_vec(b"missing-\xff\n\x1b.toml".to_vec()),
        OsString::new(),
        // Unreadable even for root: reading it fails with EIO.
        "/proc/self/mem".into(),
        // Never ends: the read must stop.
        "/dev/zero".into(),
    ];
    // The global counter flag, far past its u8: saturates, no overflow panic.
    let many_v = format!("-{}", "v".repeat(300));
    one_line_error(
        &[
            OsString::from(many_v),
            "rules".into(),
            "check".into(),
            files[12].clone(),
        ],
        1,
    );
    let mut seen = 0;
    for file in &files {
        for prefix in [
            &["rules", "check"][..],
            &["snapshot", "--rules"],
            &["watch", "--rules"],
        ] {
            let mut args: Vec<OsString> = prefix.iter().map(OsString::from).collect();
            args.push(file.clone());
            // clap itself refuses an empty path (a flag error).
            let line = one_line_error(&args, if file.is_empty() { 2 } else { 1 });
            let shown = Path::new(file).display().to_string();
            assert!(
                file.is_empty() || line.len() < 600 || shown.len() > 500,
                "an error about {shown} is {} bytes",
                line.len()
            );
            seen += 1;
        }
    }
    eprintln!("{seen} rules file cases");
}

/// `--output` that cannot be opened (exit 1). Only `watch` takes it; the check runs
/// before anything is loaded into the kernel. Without root, the not-root error comes
/// first, which is one line as well.
#[test]
fn bad_output_paths_are_one_line_with_status_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let outputs: Vec<OsString> = vec![
        dir.path().join("no/such/dir/events.json").into_os_string(),
        dir.path().as_os_str().to_owned(),
        dir.path()
            .join(OsStr::from_bytes(b"missing-\xff-\n-dir/x"))
            .into_os_string(),
        OsStr::from_bytes(b"/proc/self/mem/x").to_owned(),
    ];
    for out in &outputs {
        let args = vec![
            OsString::from("watch"),
            OsString::from("--format"),
            OsString::from("json"),
            OsString::from("--output"),
            out.clone(),
        ];
        one_line_error(&args, 1);
    }
}

/// Config files that are not portwatch config files, and metrics addresses that cannot
/// be served: one line naming the problem, exit 1, before anything is loaded.
#[test]
fn bad_config_files_and_metrics_addresses_are_one_line_with_status_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("writing a test file");
        p.into_os_string()
    };
    let configs = vec![
        dir.path().join("missing.toml").into_os_string(),
        dir.path().as_os_str().to_owned(),
        write("binary.toml", b"\x00\xff\xfe garbage \x1b[2J"),
        write("unknown.toml", b"bogus = 1\n"),
        write("type.toml", b"queue_events = \"many\"\n"),
        write("range.toml", b"queue_events = 3\n"),
        write("ring.toml", b"ring_bytes = 1000\n"),
        write("sink.toml", b"[[sink]]\ntype = \"carrier-pigeon\"\n"),
        write("file.toml", b"[[sink]]\ntype = \"file\"\n"),
        write(
            "udp.toml",
            b"[[sink]]\ntype = \"forward\"\nendpoint = \"udp:h:1\"\n",
        ),
        write("format.toml", b"format = \"xml\"\n"),
    ];
    for c in &configs {
        let args = vec![
            OsString::from("watch"),
            OsString::from("--config"),
            c.clone(),
        ];
        one_line_error(&args, 1);
    }
    for addr in ["nonsense", "127.0.0.1:99999", "256.0.0.1:80", ""] {
        let args = vec![
            OsString::from("watch"),
            OsString::from("--metrics"),
            OsString::from(addr),
        ];
        one_line_error(&args, 1);
    }
}

/// Asking for help or a version, or giving no subcommand, is not an error message:
/// clap's help is shown (exit 2 without a subcommand, as a usage error).
#[test]
fn missing_subcommand_shows_the_usage() {
    for args in [&[][..], &["rules"]] {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let (code, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains("Usage: portwatch"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let (code, stderr) = run(&[OsString::from("--version")]);
    assert_eq!((code, stderr.as_str()), (0, ""));
}

/// `rules check` accepts an allow rule by process name alone but warns that any local
/// user can take that name (issue 14, finding 1), and is quiet once the rule pins the
/// executable and the user.
#[test]
fn rules_check_warns_about_names_a_local_user_controls() {
    let dir = tempfile::tempdir().unwrap();
    let weak = dir.path().join("weak.toml");
    std::fs::write(&weak, "[[allow]]\nport = 11211\nprocess = \"memcached\"\n").unwrap();
    let (code, err) = run(&[
        "rules".into(),
        "check".into(),
        weak.clone().into_os_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "portwatch: warning: {}:1: [[allow]] matches on the process name",
            weak.display()
        )),
        "{err}"
    );
    let pinned = dir.path().join("pinned.toml");
    std::fs::write(
        &pinned,
        "[[allow]]\nport = 11211\nprocess = \"memcached\"\n\
         executable = \"/usr/bin/memcached\"\nuser = \"memcache\"\n",
    )
    .unwrap();
    let (code, err) = run(&["rules".into(), "check".into(), pinned.into_os_string()]);
    assert_eq!((code, err.as_str()), (0, ""));
}
