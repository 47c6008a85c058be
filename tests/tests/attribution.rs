//! Startup snapshot, network namespaces and process attribution against the real kernel.

use std::{
    collections::HashMap,
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portwatch_tests::{Agent, Marker, Value, action, can_run_kernel_tests, is, raw, socket_inode};

fn me() -> u32 {
    std::process::id()
}

fn inode_of(e: &Value) -> u64 {
    e["portwatch"]["socket"]["inode"].as_u64().unwrap_or(0)
}

#[test]
fn snapshot_reports_a_listener_opened_before_the_agent() {
    if !can_run_kernel_tests() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    let u = UdpSocket::bind("[::1]:0").unwrap();
    let up = u.local_addr().unwrap().port();
    // One more, to be shut down instead of closed (it leaves LISTEN, stays open).
    let shut = TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = shut.local_addr().unwrap().port();
    let mut agent = Agent::start(&[]);
    let e = agent.expect("listener-present", |e| is(e, "listener-present", me(), p));
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(e["process"]["executable"], exe.to_str().unwrap(), "{e}");
    assert_eq!(e["network"]["transport"], "tcp");
    assert_eq!(e["portwatch"]["socket"]["host_netns"], true, "{e}");
    assert_eq!(inode_of(&e), socket_inode(l.as_raw_fd()));
    assert!(e["process"]["entity_id"].as_str().is_some(), "{e}");
    let ue = agent.expect("udp listener-present", |e| {
        is(e, "listener-present", me(), up)
    });
    assert_eq!(ue["network"]["transport"], "udp");
    assert_eq!(ue["server"]["ip"], "::1");
    let done = agent.expect("snapshot-complete", |e| action(e) == "snapshot-complete");
    assert!(done["portwatch"]["stats"]["listeners"].as_u64().unwrap() >= 2);
    // The end of a listener the agent found at start carries the same identity.
    drop(l);
    let stop = agent.expect("listen-stopped", |e| is(e, "listen-stopped", me(), p));
    assert_eq!(stop["process"]["entity_id"], e["process"]["entity_id"]);
    assert_eq!(inode_of(&stop), inode_of(&e));
    // A UDP socket bound before the agent: its bind was never seen, its release must be.
    drop(u);
    let rel = agent.expect("udp-released", |e| is(e, "udp-released", me(), up));
    assert_eq!(inode_of(&rel), inode_of(&ue), "{rel}");
    assert_eq!(rel["server"]["ip"], "::1", "{rel}");
    // A listener older than the agent, shut down and then closed: its end is reported
    // (at the shutdown, or at the close at the latest), once.
    let shut_inode = socket_inode(shut.as_raw_fd());
    assert_eq!(
        unsafe { libc::shutdown(shut.as_raw_fd(), libc::SHUT_RDWR) },
        0
    );
    drop(shut);
    let end = agent.expect("listen-stopped of the shut-down listener", |e| {
        is(e, "listen-stopped", me(), sp)
    });
    assert_eq!(inode_of(&end), shut_inode, "{end}");
    assert_eq!(end["server"]["ip"], "127.0.0.1", "{end}");
    let marker = Marker::new();
    let seen = agent.drain_until(|e| marker.started(e));
    let ends: Vec<&Value> = seen
        .iter()
        .filter(|e| action(e) == "listen-stopped" && inode_of(e) == shut_inode)
        .collect();
    assert_eq!(ends.len(), 1, "want one end: {ends:?}");
}

/// A network namespace made with `ip netns add`, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!("pw-test-{}", me());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: `ip netns add` failed (iproute2 missing?)");
            return None;
        }
        let ns = Netns { name };
        // Loopback up, so binding 127.0.0.1 works inside.
        Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .ok();
        Some(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path()).unwrap().ino()
    }

    /// Run `f` on a thread that has entered this namespace; sockets it makes live there.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn listener_in_another_network_namespace_is_reported_with_it() {
    if !can_run_kernel_tests() {
        return;
    }
    let Some(ns) = Netns::new() else { return };
    let before = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let bp = before.local_addr().unwrap().port();
    let mut agent = Agent::start(&[]);
    let present = agent.expect("listener-present in the netns", |e| {
        is(e, "listener-present", me(), bp) && e["portwatch"]["socket"]["netns"] == ns.inode()
    });
    assert_eq!(
        present["portwatch"]["socket"]["host_netns"], false,
        "{present}"
    );
    agent.expect("snapshot-complete", |e| action(e) == "snapshot-complete");

    let live = ns.run(|| UdpSocket::bind("127.0.0.1:0").unwrap());
    let lp = live.local_addr().unwrap().port();
    let e = agent.expect("udp-bound in the netns", |e| is(e, "udp-bound", me(), lp));
    assert_eq!(e["portwatch"]["socket"]["netns"], ns.inode(), "{e}");
    assert_eq!(e["portwatch"]["socket"]["host_netns"], false, "{e}");
    drop(before);
    drop(live);
}

fn free_port() -> u16 {
    // Free for both TCP and UDP at the time of asking.
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

#[test]
fn memcached_from_debian_is_attributed_to_its_binary_and_user() {
    if !can_run_kernel_tests() {
        return;
    }
    if !std::path::Path::new("/usr/bin/memcached").exists() {
        eprintln!("skipped: /usr/bin/memcached missing (cargo xtask setup installs it)");
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let p = free_port();
    let port = p.to_string();
    let mut child = Command::new("/usr/bin/memcached")
        .args([
            "-u",
            "memcache",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            &port,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start memcached");
    let pid = child.id();
    let tcp = agent.expect("memcached listen-started", |e| {
        is(e, "listen-started", pid, p)
    });
    let udp = agent.expect("memcached udp-bound", |e| is(e, "udp-bound", pid, p));
    for e in [&tcp, &udp] {
        assert_eq!(e["process"]["name"], "memcached", "{e}");
        assert_eq!(e["process"]["executable"], "/usr/bin/memcached", "{e}");
        assert_eq!(e["process"]["parent"]["pid"], me(), "{e}");
        assert!(
            e["process"]["command_line"]
                .as_str()
                .unwrap()
                .contains("-U"),
            "{e}"
        );
        // memcached drops root for -u after binding: the socket's owner is the daemon;
        // the user is whoever it ran as when it bound.
        assert!(e["user"]["name"].as_str().is_some(), "{e}");
    }
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let stop = agent.expect("memcached listen-stopped", |e| {
        action(e) == "listen-stopped" && e["server"]["port"] == p && e["process"]["pid"] == pid
    });
    assert_eq!(stop["process"]["entity_id"], tcp["process"]["entity_id"]);
}

#[test]
fn named_process_that_listens_and_exits_keeps_pid_name_and_parent() {
    if !can_run_kernel_tests() {
        return;
    }
    let mut agent = Agent::start(&["--no-snapshot"]);
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // Only async-signal-safe calls between fork and _exit.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"pw-ephemeral".as_ptr());
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::listen(fd, 1);
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            let mut len = size_of::<libc::sockaddr_in>() as u32;
            libc::getsockname(fd, std::ptr::from_mut(&mut sa).cast(), &mut len);
            let port = u16::from_be(sa.sin_port);
            libc::write(fds[1], std::ptr::from_ref(&port).cast(), 2);
            libc::_exit(0);
        }
    }
    let mut port = 0u16;
    assert_eq!(
        unsafe { libc::read(fds[0], std::ptr::from_mut(&mut port).cast(), 2) },
        2
    );
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
    raw::close(fds[0]);
    raw::close(fds[1]);
    let child = child as u32;
    let e = agent.expect("the child's listen-started", |e| {
        is(e, "listen-started", child, port)
    });
    assert_eq!(e["process"]["name"], "pw-ephemeral", "{e}");
    assert_eq!(e["process"]["parent"]["pid"], me(), "{e}");
    assert!(e["process"]["entity_id"].as_str().is_some(), "{e}");
}

struct Opened {
    inode: u64,
    tcp: bool,
    /// Closed only after the agent had reported its snapshot complete.
    alive_after_snapshot: bool,
}

/// A helper opens and closes TCP and UDP listeners continuously while the agent starts;
/// every listener must be reported at most once (live start or snapshot), and every one
/// still open when the snapshot completed exactly once, with its end reported.
#[test]
fn startup_race_reports_each_listener_exactly_once() {
    if !can_run_kernel_tests() {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let snapshot_done = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Opened>>> = Arc::default();
    let churn = {
        let (stop, snapshot_done, log) = (stop.clone(), snapshot_done.clone(), log.clone());
        thread::spawn(move || {
            let mut open: Vec<(u64, bool, Box<dyn std::any::Any>)> = Vec::new();
            let mut i = 0u64;
            let close = |(inode, tcp, sock): (u64, bool, Box<dyn std::any::Any>)| {
                let alive_after_snapshot = snapshot_done.load(Ordering::SeqCst);
                drop(sock);
                log.lock().unwrap().push(Opened {
                    inode,
                    tcp,
                    alive_after_snapshot,
                });
            };
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                if i.is_multiple_of(2) {
                    let l = TcpListener::bind("127.0.0.1:0").unwrap();
                    open.push((socket_inode(l.as_raw_fd()), true, Box::new(l)));
                } else {
                    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
                    open.push((socket_inode(u.as_raw_fd()), false, Box::new(u)));
                }
                if open.len() > 16 {
                    close(open.remove((i as usize * 7) % open.len()));
                }
                thread::sleep(Duration::from_micros(200));
            }
            for s in open.drain(..) {
                close(s);
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    // Folding off: the churn (~5,000/s) is above the default budget, and this test is
    // about the snapshot merge, one listener at a time.
    let mut agent = Agent::start(&["--fold-above", "0"]);
    agent.expect("snapshot-complete", |e| action(e) == "snapshot-complete");
    snapshot_done.store(true, Ordering::SeqCst);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    let marker = Marker::new();
    agent.drain_until(|e| marker.is(e, "listen-stopped") || marker.started(e));
    drop(marker);
    let (_, events) = agent.stop();

    let mut starts: HashMap<u64, usize> = HashMap::new();
    let mut ends: HashMap<u64, usize> = HashMap::new();
    for e in &events {
        match action(e) {
            "listen-started" | "udp-bound" | "listener-present" => {
                *starts.entry(inode_of(e)).or_default() += 1
            }
            "listen-stopped" | "udp-released" => *ends.entry(inode_of(e)).or_default() += 1,
            _ => {}
        }
    }
    let log = log.lock().unwrap();
    let survivors = log.iter().filter(|o| o.alive_after_snapshot).count();
    println!(
        "startup race: {} listeners opened, {survivors} alive across the snapshot",
        log.len()
    );
    assert!(
        survivors > 0 && log.len() > survivors,
        "the race was not exercised"
    );
    for o in log.iter() {
        let n = starts.get(&o.inode).copied().unwrap_or(0);
        let kind = if o.tcp { "tcp" } else { "udp" };
        assert!(n <= 1, "{kind} inode {} reported {n} times", o.inode);
        if o.alive_after_snapshot {
            assert_eq!(
                n, 1,
                "{kind} inode {} open across startup was missed",
                o.inode
            );
            assert_eq!(
                ends.get(&o.inode),
                Some(&1),
                "{kind} inode {} end not reported",
                o.inode
            );
        }
    }
}

/// /proc/net cannot tell a dual-stack `::` socket from an IPv6-only one; the snapshot
/// asks the socket itself, since exposure depends on it.
#[test]
fn snapshot_knows_ipv6_only_from_dual_stack() {
    if !can_run_kernel_tests() {
        return;
    }
    let bind_any6 = |v6only: i32| -> (i32, u16) {
        let fd = raw::socket(libc::AF_INET6, libc::SOCK_STREAM);
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                std::ptr::from_ref(&v6only).cast(),
                size_of::<i32>() as u32,
            )
        };
        assert_eq!(rc, 0);
        let sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let sa = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            ..sa
        };
        let rc = unsafe {
            libc::bind(
                fd,
                std::ptr::from_ref(&sa).cast(),
                size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind [::]:0");
        assert_eq!(raw::listen(fd), 0);
        (fd, raw::local_port(fd))
    };
    let (only, only_port) = bind_any6(1);
    let (dual, dual_port) = bind_any6(0);
    let mut agent = Agent::start(&[]);
    let e = agent.expect("v6only listener", |e| {
        is(e, "listener-present", me(), only_port)
    });
    assert_eq!(e["portwatch"]["socket"]["v6only"], true, "{e}");
    assert_eq!(e["portwatch"]["exposure"]["stack"], "ipv6-only", "{e}");
    let d = agent.expect("dual-stack listener", |e| {
        is(e, "listener-present", me(), dual_port)
    });
    assert_eq!(d["portwatch"]["socket"]["v6only"], false, "{d}");
    assert_eq!(d["portwatch"]["exposure"]["stack"], "dual-stack", "{d}");
    raw::close(only);
    raw::close(dual);
}
