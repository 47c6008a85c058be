//! The service manager's readiness and watchdog protocol (`sd_notify(3)`), without
//! libsystemd: one datagram per state to the socket named by `$NOTIFY_SOCKET`.
//!
//! The unit is `Type=notify`: systemd calls portwatch started only once `READY=1`
//! arrives, which the agent sends after its self-check has seen its own listener and
//! bind through the hooks, not when the process merely exists. With `WatchdogSec=` the
//! agent's one-second tick sends `WATCHDOG=1`; an event loop that stops turning is
//! killed and restarted by systemd.

use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    time::{Duration, Instant},
};

/// Where the notifications go; nothing is sent when the agent was not started by a
/// service manager that asked for them.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// `WATCHDOG_USEC` halved (systemd's advice), when the watchdog is on for us.
    watchdog_every: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) and
    /// `$WATCHDOG_USEC`/`$WATCHDOG_PID`. A socket that cannot be used is an error: the
    /// manager is waiting for `READY=1` and would time the start out.
    pub fn from_env() -> io::Result<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::new(
            socket.as_deref().and_then(|s| s.to_str()),
            watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()),
        )
    }

    pub fn new(socket: Option<&str>, watchdog_every: Option<Duration>) -> io::Result<Notifier> {
        let target = match socket.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                let addr = match s.strip_prefix('@') {
                    Some(name) => {
                        <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
                            name.as_bytes(),
                        )?
                    }
                    None => SocketAddr::from_pathname(s)?,
                };
                Some((UnixDatagram::unbound()?, addr))
            }
        };
        Ok(Notifier {
            watchdog_every: watchdog_every.filter(|_| target.is_some()),
            target,
            last_ping: None,
        })
    }

    fn send(&self, msg: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(msg.as_bytes(), addr).map(drop),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line (`systemctl status` shows it).
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    /// `WATCHDOG=1` when half the watchdog interval has passed since the last one.
    pub fn watchdog(&mut self) -> io::Result<()> {
        let Some(every) = self.watchdog_every else {
            return Ok(());
        };
        if self.last_ping.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        self.last_ping = Some(Instant::now());
        self.send("WATCHDOG=1")
    }
}

/// Half of `WATCHDOG_USEC` when the watchdog is meant for process `me`.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.parse() != Ok(me)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// A status is one line: the protocol separates assignments by newlines.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_ready_status_stopping_and_paced_watchdog_pings() {
        let path = std::env::temp_dir().join(format!("portwatch-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut n =
            Notifier::new(path.to_str(), Some(Duration::from_secs(3600))).expect("notifier");
        n.ready("watching\nall").unwrap();
        assert_eq!(recv(&manager), "READY=1\nSTATUS=watching all");
        n.watchdog().unwrap();
        n.watchdog().unwrap(); // too soon: not sent
        n.stopping().unwrap();
        assert_eq!(recv(&manager), "WATCHDOG=1");
        assert_eq!(recv(&manager), "STOPPING=1");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn abstract_sockets_and_no_socket() {
        let name = format!("portwatch-notify-test-{}", std::process::id());
        let addr =
            <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
                .unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(Some(&format!("@{name}")), None)
            .unwrap()
            .ready("x")
            .unwrap();
        assert_eq!(recv(&manager), "READY=1\nSTATUS=x");
        let mut quiet = Notifier::new(None, Some(Duration::ZERO)).unwrap();
        quiet.ready("x").unwrap();
        quiet.watchdog().unwrap();
        assert!(quiet.watchdog_every.is_none());
    }

    #[test]
    fn the_watchdog_is_for_its_pid_only() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }
}
