//! What an unprivileged local user can make the agent say (issue 14): each test creates a
//! throwaway login user and a cgroup subtree delegated to it the way systemd delegates
//! `user@UID.service` (made under the cgroup2 mount and chowned to the user), runs
//! `pw-hostile` (tests/src/bin) as that user in it, and checks the events and the advice.

use std::{
    ffi::{CString, OsStr, OsString},
    io::{BufRead, BufReader, Write},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use portwatch_tests::{
    Agent, DEADLINE, Reap, Value, action, can_run_kernel_tests, poll, spawn_watch,
};

/// A login user (uid >= 1000, no home, no shell) that exists for one test.
struct LocalUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl LocalUser {
    fn create(tag: &str) -> LocalUser {
        let name = format!("pw{tag}{}", std::process::id() % 100_000);
        let st = Command::new("useradd")
            .args([
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
            ])
            .arg(&name)
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}: {st}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        assert!(uid >= 1000, "{name} got uid {uid}: not a login user");
        LocalUser { name, uid, gid }
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// `user.slice/user-UID.slice/user@UID.service` under the cgroup2 mount, owned by the
/// user as systemd leaves it (the directory and its `cgroup.procs`,
/// `cgroup.subtree_control` and `cgroup.threads`), with the given sub-cgroups made by
/// the user. Removed again (deepest first) on drop.
struct Delegated {
    made: Vec<PathBuf>,
    manager: PathBuf,
}

impl Delegated {
    fn new(user: &LocalUser, subtrees: &[&str]) -> Delegated {
        let mount = portwatch::attribution::procfs::cgroup2_mount()
            .expect("mountinfo")
            .expect("a cgroup2 mount");
        let manager = mount.join(format!(
            "user.slice/user-{uid}.slice/user@{uid}.service",
            uid = user.uid
        ));
        let mut made = Vec::new();
        let mut mkdir_p = |dir: &Path| {
            let mut missing = Vec::new();
            let mut d = dir.to_path_buf();
            while !d.exists() {
                missing.push(d.clone());
                d.pop();
            }
            for d in missing.into_iter().rev() {
                std::fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
                made.push(d);
            }
        };
        mkdir_p(&manager);
        let chown = |p: &Path| {
            let c = CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path string.
            let r = unsafe { libc::chown(c.as_ptr(), user.uid, user.gid) };
            assert_eq!(r, 0, "chown {}", p.display());
        };
        let delegate = |dir: &Path| {
            chown(dir);
            for f in ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"] {
                chown(&dir.join(f));
            }
        };
        delegate(&manager);
        for sub in subtrees {
            let dir = manager.join(sub);
            mkdir_p(&dir);
            // What the user made is the user's.
            let mut d = dir.clone();
            while d != manager {
                delegate(&d);
                d.pop();
            }
        }
        Delegated { made, manager }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.manager.join(sub)
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        for d in self.made.iter().rev() {
            let _ = poll(Duration::from_secs(5), || std::fs::remove_dir(d).ok());
        }
    }
}

/// A `pw-hostile` process of `user`, in `cgroup`, that has printed `ready PID INODE`.
struct Hostile {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The pid that printed "ready" (the forked child with `--fork-exit`).
    pid: u32,
    inode: u64,
}

impl Hostile {
    fn spawn(user: &LocalUser, cgroup: &Path, args: &[OsString]) -> Hostile {
        let mut child = spawn_as(user, cgroup, args, Stdio::piped());
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (pid, inode) = ready(&mut stdout);
        Hostile {
            child,
            stdin,
            stdout,
            pid,
            inode,
        }
    }

    /// With `--then-bind`: tells it to open its second socket; returns that one's inode.
    fn then_bind(&mut self) -> u64 {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("stdin");
        stdin.flush().expect("stdin");
        ready(&mut self.stdout).1
    }
}

/// Reads pw-hostile's `ready PID INODE` line.
fn ready(stdout: &mut BufReader<ChildStdout>) -> (u32, u64) {
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    let mut f = line.split_whitespace().skip(1);
    let pid = f.next().and_then(|p| p.parse().ok());
    let inode = f.next().and_then(|p| p.parse().ok());
    let (Some(pid), Some(inode)) = (pid, inode) else {
        panic!("pw-hostile did not get ready: {line:?}");
    };
    (pid, inode)
}

impl Drop for Hostile {
    fn drop(&mut self) {
        // Closing stdin ends it (and a forked holder, which shares the pipe).
        self.stdin.take();
        let _ = self.child.wait();
        let _ = poll(Duration::from_secs(5), || {
            (!Path::new(&format!("/proc/{}", self.pid)).exists()).then_some(())
        });
    }
}

/// Runs `pw-hostile ARGS` as `user` in `cgroup`: moved there (by root, before dropping
/// privileges, as systemd does) and then running with the user's uid and gid only.
fn spawn_as(user: &LocalUser, cgroup: &Path, args: &[OsString], stdin: Stdio) -> Child {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let (uid, gid) = (user.uid, user.gid);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pw-hostile"));
    cmd.args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawning pw-hostile")
}

fn args(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

fn commands(alert: &Value) -> Vec<String> {
    alert["portwatch"]["alert"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["commands"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

fn titles(alert: &Value) -> Vec<String> {
    alert["portwatch"]["alert"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["title"].as_str().map(str::to_owned))
        .collect()
}

fn alert_of(agent: &mut Agent, pid: u32, port: u16) -> Value {
    agent.expect(&format!("risky-listener for pid {pid} port {port}"), |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid && e["server"]["port"] == port
    })
}

/// The start event of pid's listener on port, and the alert after it if any (the alert
/// is written in the same flush, right after its event).
fn start_and_alert(agent: &mut Agent, pid: u32, port: u16) -> (Value, Option<Value>) {
    let start = agent.expect(&format!("start of pid {pid} port {port}"), |e| {
        matches!(action(e), "listen-started" | "udp-bound")
            && e["process"]["pid"] == pid
            && e["server"]["port"] == port
    });
    let alert = agent.wait_for(Duration::from_secs(1), |e| {
        action(e) == "risky-listener" && e["process"]["pid"] == pid && e["server"]["port"] == port
    });
    (start, alert)
}

/// Finding 1: a unit a user names under its own manager is not the host's unit, and a
/// container shape a user makes is not a container.
#[test]
fn user_made_cgroups_choose_neither_the_unit_nor_the_container() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("u");
    let tree = Delegated::new(
        &user,
        &[
            "app.slice/ssh.service",
            "app.slice/redis-server.service",
            "lxc.payload.web",
        ],
    );
    let rules = rules_file(
        "[[allow]]\nname = \"redis-unit\"\nport = 11211\nunit = \"redis-server\"\n\
         [[allow]]\nname = \"containers\"\nport = 27017\ncontainer = true\n",
    );
    let rules_path = rules.path().to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en", "--rules", &rules_path]);

    // What `systemd-run --user --unit=ssh` makes, listening on redis' port.
    let ssh = Hostile::spawn(
        &user,
        &tree.path("app.slice/ssh.service"),
        &args(&["tcp", "6379"]),
    );
    let a = alert_of(&mut agent, ssh.pid, 6379);
    let cmds = commands(&a);
    let uid = user.uid;
    for c in &cmds {
        assert!(
            !(c.starts_with("systemctl stop") || c.starts_with("systemctl disable")),
            "advice acts on the system manager's unit of the user's chosen name: {c:?} in {cmds:#?}"
        );
    }
    assert!(
        cmds.contains(&format!("systemctl --user -M {uid}@ stop -- ssh.service")),
        "{cmds:#?}"
    );
    assert!(
        cmds.contains(&"ss -Hltnp 'sport = :6379'".to_owned()),
        "{cmds:#?}"
    );
    assert!(
        titles(&a).iter().any(|t| t.contains(&ssh.pid.to_string())),
        "no step names the pid: {:#?}",
        titles(&a)
    );
    assert_eq!(a["portwatch"]["systemd"]["unit"], "ssh.service", "{a}");
    assert_eq!(a["portwatch"]["systemd"]["user_manager"], uid, "{a}");

    // A user-made redis-server.service does not pass `unit = "redis-server"`.
    let redis = Hostile::spawn(
        &user,
        &tree.path("app.slice/redis-server.service"),
        &args(&["tcp", "11211"]),
    );
    let (start, alert) = start_and_alert(&mut agent, redis.pid, 11211);
    assert_ne!(
        start["portwatch"]["risk"]["outcome"], "allowed",
        "a user-made unit name passed an allow rule: {start}"
    );
    assert!(alert.is_some(), "no alert: {start}");

    // A user-made lxc.payload.web is not a container.
    let lxc = Hostile::spawn(
        &user,
        &tree.path("lxc.payload.web"),
        &args(&["tcp", "27017"]),
    );
    let (start, alert) = start_and_alert(&mut agent, lxc.pid, 27017);
    assert!(start["container"].is_null(), "user-made container: {start}");
    assert_ne!(start["portwatch"]["risk"]["outcome"], "allowed", "{start}");
    assert!(alert.is_some(), "no alert: {start}");
}

/// Finding 2: a process called "systemd" gets no socket-activation advice, and one called
/// "memcached" does not pass `process = "memcached"`.
#[test]
fn a_process_name_steers_neither_advice_nor_allow_rules() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("n");
    let tree = Delegated::new(&user, &["app.slice/run-u1.service"]);
    let cg = tree.path("app.slice/run-u1.service");
    let rules = rules_file("[[allow]]\nport = 11211\nprocess = \"memcached\"\n");
    let rules_path = rules.path().to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en", "--rules", &rules_path]);

    let fake_init = Hostile::spawn(&user, &cg, &args(&["--comm", "systemd", "tcp", "6379"]));
    let a = alert_of(&mut agent, fake_init.pid, 6379);
    assert_eq!(a["process"]["name"], "systemd", "{a}");
    let (cmds, titles) = (commands(&a), titles(&a));
    assert!(
        !titles.iter().any(|t| t.contains("socket activation")),
        "socket-activation advice for a process named systemd: {titles:#?}"
    );
    assert!(
        !cmds.iter().any(|c| c.contains("<socket-unit>")),
        "{cmds:#?}"
    );
    assert!(
        titles
            .iter()
            .any(|t| t.contains(&fake_init.pid.to_string())),
        "{titles:#?}"
    );

    let fake_memcached =
        Hostile::spawn(&user, &cg, &args(&["--comm", "memcached", "udp", "11211"]));
    let (start, alert) = start_and_alert(&mut agent, fake_memcached.pid, 11211);
    assert_eq!(start["process"]["name"], "memcached", "{start}");
    assert_ne!(
        start["portwatch"]["risk"]["outcome"], "allowed",
        "a uid-{} process named memcached passed the allow rule: {start}",
        user.uid
    );
    assert!(alert.is_some(), "no alert: {start}");
}

/// Finding 3: the event names what the kernel saw at bind time. A process that binds,
/// then moves to another cgroup and execs a harmless-looking program before the agent
/// reads /proc (the agent is stopped meanwhile, as it may lag under load) is reported
/// by its name at bind time and its cgroup then, with what /proc says now beside them.
#[test]
fn attribution_is_what_the_kernel_saw_at_bind_time() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("x");
    let tree = Delegated::new(
        &user,
        &["app.slice/bind.service", "app.slice/later.service"],
    );
    let (bound_in, later) = (
        tree.path("app.slice/bind.service"),
        tree.path("app.slice/later.service"),
    );
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let agent_pid = agent.pid() as i32;

    // SAFETY: signals to the agent this test started.
    unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
    let mut h = Hostile::spawn(
        &user,
        &bound_in,
        &args(&["--exec", "/usr/bin/sleep", "tcp", "11211", "60"]),
    );
    std::fs::write(later.join("cgroup.procs"), h.pid.to_string()).expect("move");
    let execd = poll(Duration::from_secs(5), || {
        (portwatch_tests::comm_of(h.pid) == "sleep").then_some(())
    });
    unsafe { libc::kill(agent_pid, libc::SIGCONT) };
    assert!(execd.is_some(), "pw-hostile did not exec sleep");

    let (start, alert) = start_and_alert(&mut agent, h.pid, 11211);
    let _ = h.child.kill();
    assert_eq!(start["process"]["name"], "pw-hostile", "{start}");
    assert!(
        start["process"]["executable"].is_null() && start["process"]["args"].is_null(),
        "the exec'd program is not the listener's: {start}"
    );
    let changed = &start["portwatch"]["attribution_changed"];
    assert_eq!(
        changed["reasons"],
        serde_json::json!(["renamed", "cgroup-moved"]),
        "{start}"
    );
    assert_eq!(changed["name"], "sleep", "{start}");
    assert_eq!(changed["executable"], "/usr/bin/sleep", "{start}");
    let path = |v: &Value| v.as_str().unwrap_or("").to_owned();
    assert!(
        path(&start["portwatch"]["cgroup"]["path"]).ends_with("/bind.service"),
        "{start}"
    );
    assert!(
        path(&changed["cgroup"]).ends_with("/later.service"),
        "{start}"
    );
    assert_eq!(
        start["portwatch"]["systemd"]["unit"], "bind.service",
        "{start}"
    );
    let alert = alert.expect("an alert for 0.0.0.0:11211");
    assert_eq!(alert["process"]["name"], "pw-hostile", "{alert}");
    assert!(
        titles(&alert)
            .iter()
            .any(|t| t.contains(&h.pid.to_string())),
        "{:#?}",
        titles(&alert)
    );

    // A process that moved between two listens: the second is reported in its new
    // cgroup (the cached owner of the first is not reused), with nothing changed.
    let mut m = Hostile::spawn(
        &user,
        &bound_in,
        &args(&["--then-bind", "6380", "tcp", "6379"]),
    );
    let (first, _) = start_and_alert(&mut agent, m.pid, 6379);
    assert!(
        path(&first["portwatch"]["cgroup"]["path"]).ends_with("/bind.service"),
        "{first}"
    );
    std::fs::write(later.join("cgroup.procs"), m.pid.to_string()).expect("move");
    m.then_bind();
    let (second, _) = start_and_alert(&mut agent, m.pid, 6380);
    assert!(
        path(&second["portwatch"]["cgroup"]["path"]).ends_with("/later.service"),
        "{second}"
    );
    assert_eq!(
        second["portwatch"]["systemd"]["unit"], "later.service",
        "{second}"
    );
    assert!(
        second["portwatch"]["attribution_changed"].is_null(),
        "{second}"
    );
}

/// Finding 8: a UDP socket that never called bind() but sent unconnected was bound by
/// the kernel to 0.0.0.0 and hears anyone on its port: reported live, once, with
/// `implicit_bind`. A connected one hears only its peer and is left out.
#[test]
fn an_implicitly_bound_udp_socket_is_reported_and_a_connected_one_is_not() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("i");
    let tree = Delegated::new(&user, &["app.slice/send.service"]);
    let cg = tree.path("app.slice/send.service");
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let connected = Hostile::spawn(&user, &cg, &args(&["udp-connected", "9"]));
    let implicit = Hostile::spawn(&user, &cg, &args(&["udp-implicit", "9"]));
    let bound = agent.expect("udp-bound of the implicitly bound socket", |e| {
        action(e) == "udp-bound" && e["portwatch"]["socket"]["inode"] == implicit.inode
    });
    assert_eq!(bound["process"]["pid"], implicit.pid, "{bound}");
    assert_eq!(
        bound["portwatch"]["socket"]["implicit_bind"], true,
        "{bound}"
    );
    assert_eq!(bound["server"]["ip"], "0.0.0.0", "{bound}");
    assert_eq!(bound["user"]["id"], user.uid.to_string(), "{bound}");
    // Its later sends are not reported again; the connected socket never is.
    let again = agent.wait_for(Duration::from_millis(500), |e| {
        let inode = &e["portwatch"]["socket"]["inode"];
        action(e) == "udp-bound"
            && (*inode == connected.inode
                || (*inode == implicit.inode
                    && e["event"]["sequence"] != bound["event"]["sequence"]))
    });
    assert!(again.is_none(), "{again:?}");
    drop(implicit);
    agent.expect("udp-released of the implicitly bound socket", |e| {
        action(e) == "udp-released"
            && e["portwatch"]["socket"]["inode"] == bound["portwatch"]["socket"]["inode"]
    });
}

/// Finding 4: `kill` names the process that holds the socket when the alert is made, not
/// the one that listened and has since exited; nobody when nobody holds it.
#[test]
fn kill_names_only_the_holders_of_the_socket() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("k");
    // A scope (what `systemd-run --user --scope` makes): no service to stop, so the
    // advice falls back to the process.
    let tree = Delegated::new(&user, &["app.slice/run-k1.scope"]);
    let cg = tree.path("app.slice/run-k1.scope");
    let mut agent = Agent::start(&["--no-snapshot", "--lang", "en"]);
    let agent_pid = agent.pid() as i32;
    // The agent is stopped while the listener forks and exits, so the alert is made
    // after that whatever the scheduling: the record waits in the ring.
    let stop = || unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
    let cont = || unsafe { libc::kill(agent_pid, libc::SIGCONT) };

    stop();
    let mut forked = Hostile::spawn(&user, &cg, &args(&["--fork-exit", "tcp", "9200"]));
    let listener_pid = forked.child.id();
    forked.child.wait().expect("the listener exits");
    let holder = forked.pid;
    assert_ne!(listener_pid, holder);
    cont();
    let a = alert_of(&mut agent, listener_pid, 9200);
    assert_eq!(a["portwatch"]["socket"]["inode"], forked.inode, "{a}");
    let cmds = commands(&a);
    let names = |c: &str, pid: u32| c.split_whitespace().any(|w| w == pid.to_string());
    assert!(
        !cmds
            .iter()
            .any(|c| c.starts_with("kill") && names(c, listener_pid)),
        "kill of the exited listener {listener_pid}: {cmds:#?}"
    );
    assert!(
        cmds.iter()
            .any(|c| c.starts_with("kill") && names(c, holder)),
        "the holder {holder} is not named: {cmds:#?}"
    );
    assert!(
        cmds.contains(&"ss -Hltnp 'sport = :9200'".to_owned()),
        "{cmds:#?}"
    );
    drop(forked);

    // Gone entirely by the time of the alert: no kill at all.
    stop();
    let mut gone = spawn_as(
        &user,
        &cg,
        &args(&["--hold-ms", "0", "tcp", "27017"]),
        Stdio::null(),
    );
    let gone_pid = gone.id();
    gone.wait().expect("exits");
    cont();
    let a = alert_of(&mut agent, gone_pid, 27017);
    let cmds = commands(&a);
    assert!(!cmds.iter().any(|c| c.starts_with("kill")), "{cmds:#?}");
    assert!(
        cmds.contains(&"ss -Hltnp 'sport = :27017'".to_owned()),
        "{cmds:#?}"
    );
    // No restart of a unit that is not the listener's (mongod.service is the
    // catalogue's usual unit; this listener has only a scope).
    for c in cmds.iter().filter(|c| c.contains(" restart ")) {
        assert!(c.contains("<unit>"), "restart of another unit: {c:?}");
    }
    for c in cmds
        .iter()
        .filter(|c| c.starts_with("systemctl") || c.starts_with("docker"))
    {
        if c.contains(" stop ") || c.contains(" disable ") || c.contains(" restart ") {
            assert!(c.contains(" -- "), "no -- before names: {c:?}");
        }
    }
}

/// VmHWM (peak RSS) of `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Processes seen by the memory test, each with one argument of [`ARG_BYTES`] 0xFF bytes.
const HOSTILE_PROCESSES: usize = 300;
const ARG_BYTES: usize = 65_000;
/// Peak RSS the agent stays under through them (measured 2026-11-28 on this project's
/// machine: 22.8 MiB at start and after; today's main before the fix: 347 MiB).
const HWM_BOUND_KIB: u64 = 48 * 1024;
/// Growth of the peak RSS over the agent's own start-up peak: the attribution caches'
/// byte bounds (8 MiB processes, 2 MiB cgroups, 1 MiB cgroup paths) plus room.
const GROWTH_BOUND_KIB: u64 = 16 * 1024;
/// Bytes an event line stays under (the command line is capped at 4 KiB in all).
const LINE_BOUND: usize = 16 * 1024;

/// Finding 5: hundreds of short-lived processes with a 65,000-byte argument of 0xFF bytes
/// neither grow the agent nor make huge lines.
#[test]
fn hostile_arguments_bound_memory_and_lines() {
    if !can_run_kernel_tests() {
        return;
    }
    let user = LocalUser::create("m");
    let tree = Delegated::new(&user, &["app.slice/big.service"]);
    let cg = tree.path("app.slice/big.service");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.json");
    let out_s = out.to_str().unwrap().to_owned();
    let mut child = spawn_watch(
        &["--no-snapshot", "--output", &out_s],
        Stdio::null(),
        Stdio::inherit(),
    );
    let _reap = Reap(child.id());
    let agent_pid = child.id();
    poll(DEADLINE * 6, || {
        std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.contains("\"sensor-started\""))
    })
    .expect("sensor-started");
    let start_hwm = vm_hwm_kib(agent_pid);

    let huge = OsStr::from_bytes(&[0xFF; ARG_BYTES]).to_owned();
    let mut pids = Vec::new();
    for _ in 0..HOSTILE_PROCESSES {
        let argv = vec![
            OsString::from("--hold-ms"),
            OsString::from("20"),
            OsString::from("udp"),
            OsString::from("0"),
            huge.clone(),
        ];
        let mut c = spawn_as(&user, &cg, &argv, Stdio::null());
        pids.push(c.id());
        c.wait().expect("hostile process");
    }
    // Every bind is in the file once the last one's release is. The file is read as it
    // grows, line by line: whatever else runs on the host lands in it too, and a test
    // that re-read it whole would be the thing that runs out of memory.
    let last = *pids.last().unwrap();
    let uid = user.uid.to_string();
    let (mut longest, mut ours, mut cut_events) = (0usize, Vec::<Value>::new(), 0usize);
    let mut reader = BufReader::new(std::fs::File::open(&out).expect("output file"));
    let mut line = Vec::new();
    let mut scan = |until_released: bool| -> bool {
        loop {
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                // A line still being written: the rest is appended next time.
                return false;
            }
            // A whole line: taken out, so the buffer starts empty for the next one.
            let line = std::mem::take(&mut line);
            longest = longest.max(line.len() - 1);
            let l = String::from_utf8_lossy(&line);
            if l.contains("\"udp-bound\"") && l.contains(&format!("\"id\":\"{uid}\"")) {
                let e: Value = serde_json::from_str(&l).expect("a JSON line");
                if e["portwatch"]["process"]["truncated"] == true {
                    cut_events += 1;
                }
                if e["user"]["id"].as_str() == Some(&uid) {
                    ours.push(e);
                }
            }
            if until_released
                && l.contains("\"udp-released\"")
                && l.contains(&format!("\"pid\":{last},"))
            {
                return true;
            }
        }
    };
    poll(DEADLINE * 3, || scan(true).then_some(())).expect("the last process's udp-released");
    let hwm = vm_hwm_kib(agent_pid);
    unsafe { libc::kill(agent_pid as i32, libc::SIGTERM) };
    child.wait().expect("agent exit");
    scan(false);
    let cut = cut_events;
    eprintln!(
        "{} hostile processes: agent VmHWM {start_hwm} KiB at start, {hwm} KiB after; \
         longest line {longest} bytes; {} udp-bound events, {cut} with a cut command line",
        HOSTILE_PROCESSES,
        ours.len()
    );
    assert!(
        longest < LINE_BOUND,
        "an event line of {longest} bytes (bound {LINE_BOUND})"
    );
    assert!(
        hwm < HWM_BOUND_KIB,
        "agent peak RSS {hwm} KiB (bound {HWM_BOUND_KIB} KiB)"
    );
    assert!(
        hwm - start_hwm < GROWTH_BOUND_KIB,
        "agent peak RSS grew by {} KiB (bound {GROWTH_BOUND_KIB} KiB)",
        hwm - start_hwm
    );
    // Nearly all: the point is that they were seen, not the loss accounting.
    assert!(
        ours.len() * 10 >= HOSTILE_PROCESSES * 9,
        "{} of {HOSTILE_PROCESSES} binds reported",
        ours.len()
    );
    assert!(
        cut > 0,
        "no event read a command line from /proc: {:?}",
        ours.first()
    );
    for e in ours
        .iter()
        .filter(|e| e["portwatch"]["process"]["truncated"] == true)
    {
        assert_eq!(e["portwatch"]["process"]["original_args_count"], 6, "{e}");
        assert!(
            e["portwatch"]["process"]["original_length"]
                .as_u64()
                .is_some_and(|n| n > ARG_BYTES as u64),
            "{e}"
        );
    }
}
