//! Test helper: churn sockets as fast as possible, as an attacker would.
//!
//! `pw-flood tcp|udp loopback|wildcard SECS [UID]`: with UID, drop to that user (and its
//! group) first. Loops socket + bind(ADDR:0) [+ listen] + close for SECS seconds, then
//! prints `PID COUNT` and the ports it was given as ranges (`1-3,7`), one line each.
//! With `hold=N` for SECS: opens N sockets, keeps them all open, then closes them all.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(
        args.len() >= 4,
        "usage: pw-flood tcp|udp loopback|wildcard SECS [UID]"
    );
    let tcp = args[1] == "tcp";
    let addr: u32 = if args[2] == "wildcard" {
        0
    } else {
        u32::from_be_bytes([127, 0, 0, 1])
    };
    let hold: Option<usize> = args[3].strip_prefix("hold=").map(|n| n.parse().expect("N"));
    let secs: f64 = if hold.is_some() {
        0.0
    } else {
        args[3].parse().expect("SECS")
    };
    if let Some(n) = hold {
        // Room for N descriptors, raised while still root.
        let lim = libc::rlimit {
            rlim_cur: n as u64 + 64,
            rlim_max: n as u64 + 64,
        };
        // SAFETY: a plain syscall on a local struct.
        assert_eq!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
            0,
            "setrlimit"
        );
    }
    if let Some(uid) = args.get(4) {
        let uid: u32 = uid.parse().expect("UID");
        // SAFETY: plain syscalls; group first, while still allowed.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
            assert_eq!(libc::setgid(uid), 0, "setgid");
            assert_eq!(libc::setuid(uid), 0, "setuid");
        }
    }
    let mut ports = vec![0u64; 1024];
    let mut count = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let ty = if tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let mut held = Vec::new();
    while Instant::now() < end || held.len() < hold.unwrap_or(0) {
        for _ in 0..256 {
            // SAFETY: plain socket syscalls on a fd this loop owns.
            unsafe {
                let fd = libc::socket(libc::AF_INET, ty, 0);
                assert!(fd >= 0, "socket");
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = addr.to_be();
                let len = size_of::<libc::sockaddr_in>() as u32;
                assert_eq!(libc::bind(fd, (&raw const sa).cast(), len), 0, "bind");
                if tcp {
                    assert_eq!(libc::listen(fd, 1), 0, "listen");
                }
                let mut got: libc::sockaddr_in = std::mem::zeroed();
                let mut glen = len;
                libc::getsockname(fd, (&raw mut got).cast(), &mut glen);
                let p = u16::from_be(got.sin_port);
                ports[usize::from(p) / 64] |= 1 << (p % 64);
                if hold.is_some() {
                    held.push(fd);
                } else {
                    libc::close(fd);
                }
            }
            count += 1;
            if hold.is_some_and(|n| held.len() >= n) {
                break;
            }
        }
    }
    for fd in held {
        // SAFETY: a fd this program opened.
        unsafe { libc::close(fd) };
    }
    println!("{} {count}", std::process::id());
    let mut out = String::new();
    let mut run: Option<(u32, u32)> = None;
    for p in 0..65536u32 {
        if ports[p as usize / 64] & (1 << (p % 64)) == 0 {
            continue;
        }
        run = match run {
            Some((lo, hi)) if hi + 1 == p => Some((lo, p)),
            Some((lo, hi)) => {
                push(&mut out, lo, hi);
                Some((p, p))
            }
            None => Some((p, p)),
        };
    }
    if let Some((lo, hi)) = run {
        push(&mut out, lo, hi);
    }
    println!("{out}");
}

fn push(out: &mut String, lo: u32, hi: u32) {
    if !out.is_empty() {
        out.push(',');
    }
    if lo == hi {
        out.push_str(&lo.to_string());
    } else {
        out.push_str(&format!("{lo}-{hi}"));
    }
}
