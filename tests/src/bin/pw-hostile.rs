//! What an unprivileged local user runs in the tests of `tests/local_user.rs`: the test
//! starts it as that user, in a cgroup of the user's delegated subtree.
//!
//! `pw-hostile [--comm NAME] [--fork-exit] [--hold-ms N] [--exec PROG] [--then-bind PORT2]
//!  tcp|udp PORT [ARGS...]`
//!
//! Renames itself to NAME (as any process may), listens on (TCP) or binds (UDP)
//! 0.0.0.0:PORT, prints `ready PID INODE` and holds the socket for N ms (default: until
//! stdin closes). With `--fork-exit` it forks after listening and exits at once; the
//! child keeps the socket, prints `ready CHILD_PID INODE` and holds it. With `--exec` it
//! then execs PROG with ARGS, passing the socket on (as a script that binds and then
//! execs a harmless-looking program does). With `--then-bind` it waits for a line on
//! stdin, then listens on (binds) PORT2 as well and prints `ready PID INODE2`. ARGS are
//! otherwise ignored: they are there to be seen in `/proc/<pid>/cmdline`.
//!
//! `udp-implicit` and `udp-connected` (PORT is where it sends, on 127.0.0.1) make a UDP
//! socket with no `bind()` that sends one datagram, unconnected (the kernel binds it
//! implicitly to 0.0.0.0 and it then hears anyone) or after `connect()` (it hears only
//! its peer).

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

fn socket_inode(fd: i32) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
    let link = link.to_string_lossy();
    link.trim_start_matches("socket:[")
        .trim_end_matches(']')
        .parse()
        .expect("socket inode")
}

/// A TCP listener or a bound UDP socket on 0.0.0.0:port, and its descriptor.
fn open(proto: &str, port: u16) -> (Box<dyn std::any::Any>, i32) {
    if proto == "udp-implicit" || proto == "udp-connected" {
        return send_unbound(proto == "udp-connected", port);
    }
    if proto == "tcp" {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("listen");
        let fd = l.as_raw_fd();
        (Box::new(l), fd)
    } else {
        let u = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
        let fd = u.as_raw_fd();
        (Box::new(u), fd)
    }
}

/// A UDP socket that never called bind(), after one datagram to 127.0.0.1:port.
fn send_unbound(connect: bool, port: u16) -> (Box<dyn std::any::Any>, i32) {
    // SAFETY: plain socket calls on a descriptor this function owns; `to` outlives them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let (to_ptr, len) = (
            (&raw const to).cast::<libc::sockaddr>(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let sent = if connect {
            assert_eq!(libc::connect(fd, to_ptr, len), 0, "connect");
            libc::send(fd, b"x".as_ptr().cast(), 1, 0)
        } else {
            libc::sendto(fd, b"x".as_ptr().cast(), 1, 0, to_ptr, len)
        };
        assert_eq!(sent, 1, "send: {}", std::io::Error::last_os_error());
        let sock: std::os::fd::OwnedFd = std::os::fd::FromRawFd::from_raw_fd(fd);
        (Box::new(sock), fd)
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let mut comm = None;
    let mut fork_exit = false;
    let mut hold_ms: Option<u64> = None;
    let mut exec: Option<std::ffi::OsString> = None;
    let mut then_bind: Option<u16> = None;
    let mut proto = String::new();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--comm") => comm = args.next().and_then(|s| s.into_string().ok()),
            Some("--fork-exit") => fork_exit = true,
            Some("--exec") => exec = args.next(),
            Some("--then-bind") => {
                then_bind = args
                    .next()
                    .and_then(|s| s.into_string().ok())
                    .and_then(|s| s.parse().ok());
            }
            Some("--hold-ms") => {
                hold_ms = args
                    .next()
                    .and_then(|s| s.into_string().ok())
                    .and_then(|s| s.parse().ok());
            }
            Some(p) => {
                proto = p.to_owned();
                break;
            }
            None => panic!("usage: pw-hostile [--comm NAME] [--fork-exit] tcp|udp PORT"),
        }
    }
    let port: u16 = args
        .next()
        .and_then(|s| s.into_string().ok())
        .and_then(|s| s.parse().ok())
        .expect("PORT");
    if let Some(name) = comm {
        let c = std::ffi::CString::new(name).expect("comm");
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
    }
    let (_first, fd) = open(&proto, port);
    let inode = socket_inode(fd);
    if fork_exit {
        // SAFETY: single-threaded; the child only prints and sleeps.
        match unsafe { libc::fork() } {
            0 => {}
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            _ => unsafe { libc::_exit(0) },
        }
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready {} {inode}", std::process::id()).expect("stdout");
    out.flush().expect("stdout");
    if let Some(prog) = exec {
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let err =
            std::os::unix::process::CommandExt::exec(std::process::Command::new(prog).args(args));
        panic!("exec: {err}");
    }
    let mut _second = None;
    if let Some(port2) = then_bind {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
        let (s, fd2) = open(&proto, port2);
        _second = Some(s);
        writeln!(out, "ready {} {}", std::process::id(), socket_inode(fd2)).expect("stdout");
        out.flush().expect("stdout");
    }
    match hold_ms {
        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
        None => {
            let _ = std::io::stdin().read(&mut [0u8; 1]);
        }
    }
}
