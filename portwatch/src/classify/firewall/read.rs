//! Reads the ruleset in force in a network namespace, with the tools the rules were made
//! with: `nft -j list ruleset` (nf_tables: nft, firewalld, iptables-nft), then
//! `iptables-nft-save` when iptables-nft rules use xtables matches nft's JSON cannot
//! show, and `iptables-legacy-save` / `ip6tables-legacy-save` when legacy tables exist
//! there (`/proc/thread-self/net/ip{,6}_tables_names` is not empty).
//!
//! Run once per namespace when a listener there is first classified, and again when the
//! ruleset changes ([`super::watch`]); never per event. Everything runs in a short-lived
//! thread that joins the namespace with `setns(2)` first: the tools it starts inherit
//! that thread's namespace, and no other thread of the agent changes namespace.

use std::hash::{Hash, Hasher};
use std::io::Read as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::model::{Action, Family, Origin, Ruleset};
use super::{ipt, nft};

/// Where the ruleset tools are looked for.
const TOOL_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest a tool may take before it is killed and its part counted unread.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// The ruleset, and a digest of the legacy tables (polled for changes: legacy
/// iptables sends no notification).
#[derive(Debug, Default)]
pub struct Read {
    pub ruleset: Ruleset,
    pub legacy_digest: u64,
    /// The namespace's interface addresses, read in the same visit (what its NAT rules
    /// publish, and where they send it).
    pub ifaces: Option<Vec<super::IfAddr>>,
}

/// Where named network namespaces are (`ip netns add`, podman's and CNI's
/// `netns-*`): a NAT rule that publishes a port may live in one that has no listener.
pub const NAMED_NETNS_DIR: &str = "/run/netns";
/// Most named namespaces followed.
pub const NAMED_NETNS_MAX: usize = 256;

/// The named network namespaces: (netns inode, path).
pub fn named_netns() -> Vec<(u64, std::path::PathBuf)> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(dir) = std::fs::read_dir(NAMED_NETNS_DIR) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten().take(NAMED_NETNS_MAX * 4) {
        let path = e.path();
        // A bind mount of an nsfs inode; an unmounted placeholder (a plain empty file)
        // fails the namespace-type check and is left out.
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        if !is_netns(&path) {
            continue;
        }
        out.push((md.ino(), path));
        if out.len() >= NAMED_NETNS_MAX {
            break;
        }
    }
    out
}

/// Whether `path` is a network namespace (`NS_GET_NSTYPE` says CLONE_NEWNET).
fn is_netns(path: &std::path::Path) -> bool {
    // NS_GET_NSTYPE = _IO(0xb7, 0x3) (include/uapi/linux/nsfs.h).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: ioctl with no argument on an owned, open fd.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    t == libc::CLONE_NEWNET
}

/// Output of a tool, or why there is none.
fn run(prog: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(prog)
        .args(args)
        // Found in the system's directories only, whatever PATH the agent was started
        // with: a root agent runs these as root (Command searches the PATH given here).
        .env("PATH", TOOL_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{prog}: not installed"),
            _ => format!("{prog}: {e}"),
        })?;
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel();
    // Readers in their own threads so a full pipe never blocks the tool.
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(64 * 1024).read_to_end(&mut buf);
        }
        buf
    });
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = stdout
            .as_mut()
            .map(|o| o.take((nft::MAX_JSON + 1) as u64).read_to_end(&mut buf));
        let _ = tx.send((r.map(|r| r.is_ok()), buf));
    });
    let out = rx.recv_timeout(TOOL_TIMEOUT);
    if out.is_err() {
        // SAFETY: kill(2) of our own child's pid, which is not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let status = child.wait().map_err(|e| format!("{prog}: {e}"))?;
    let err = err_reader.join().unwrap_or_default();
    let (_, buf) = out.map_err(|_| format!("{prog}: no answer in {TOOL_TIMEOUT:?}"))?;
    if !status.success() {
        let msg = String::from_utf8_lossy(&err);
        let first = msg.lines().next().unwrap_or("").trim();
        return Err(format!("{prog}: {status}: {first}"));
    }
    Ok(buf)
}

/// Whether legacy x_tables of a family have tables in the calling thread's namespace.
fn legacy_tables(names_file: &str) -> bool {
    std::fs::read_to_string(format!("/proc/thread-self/net/{names_file}"))
        .is_ok_and(|s| !s.trim().is_empty())
}

/// Appends `other`'s chains, moving its jump targets with them.
fn append(rs: &mut Ruleset, other: Ruleset) {
    let off = rs.chains.len();
    for mut c in other.chains {
        for r in &mut c.rules {
            r.action = match std::mem::replace(&mut r.action, Action::Continue) {
                Action::Jump(t) => Action::Jump(t + off),
                Action::Goto(t) => Action::Goto(t + off),
                a => a,
            };
        }
        rs.chains.push(c);
    }
    rs.unread.extend(other.unread);
}

/// A save file's text without what changes on its own (the date comment, counters).
fn digest_text(text: &str, h: &mut impl Hasher) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        match line.strip_prefix(':') {
            Some(decl) => decl.split(" [").next().unwrap_or("").hash(h),
            None => line.hash(h),
        }
    }
}

/// Reads the ruleset of the calling thread's network namespace.
pub fn read_here() -> Read {
    let mut out = Read::default();
    match run("nft", &["-j", "list", "ruleset"])
        .and_then(|j| nft::parse(&j).map_err(|e| format!("nft -j list ruleset: {e}")))
    {
        Ok(parsed) => {
            out.ruleset = parsed.ruleset;
            for (fam, tool) in [
                (Family::Ip, "iptables-nft-save"),
                (Family::Ip6, "ip6tables-nft-save"),
            ] {
                let wanted = parsed
                    .xt_rules
                    .iter()
                    .any(|&(c, _)| out.ruleset.chains.get(c).is_some_and(|c| c.family == fam));
                if !wanted {
                    continue;
                }
                // Without it those rules stay unmodelled: verdicts through them are
                // unknown, which is honest, so a failure here is not an unread part.
                match run(tool, &[]) {
                    Ok(text) => ipt::fill_xt(
                        &mut out.ruleset,
                        &parsed.xt_rules,
                        &String::from_utf8_lossy(&text),
                        fam,
                    ),
                    Err(e) => log::debug!("firewall: {e}"),
                }
            }
        }
        Err(e) => out.ruleset.unread.push(e),
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (fam, names, tool) in [
        (Family::Ip, "ip_tables_names", "iptables-legacy-save"),
        (Family::Ip6, "ip6_tables_names", "ip6tables-legacy-save"),
    ] {
        if !legacy_tables(names) {
            continue;
        }
        match run(tool, &[]) {
            Ok(text) => {
                let text = String::from_utf8_lossy(&text);
                digest_text(&text, &mut h);
                append(
                    &mut out.ruleset,
                    ipt::parse(&text, fam, Origin::IptablesLegacy),
                );
                if !out.ruleset.sources.contains(&"iptables-legacy") {
                    out.ruleset.sources.push("iptables-legacy");
                }
            }
            Err(e) => out.ruleset.unread.push(e),
        }
    }
    out.legacy_digest = h.finish();
    // /proc/sys/net answers for the namespace of the reading thread.
    let switch = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
            .map(|v| v != 0)
    };
    out.ruleset.forward_v4 = switch("/proc/sys/net/ipv4/ip_forward");
    out.ruleset.forward_v6 = switch("/proc/sys/net/ipv6/conf/all/forwarding");
    out.ruleset.route_localnet = std::fs::read_dir("/proc/sys/net/ipv4/conf").ok().map(|d| {
        d.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let on = switch(&format!("/proc/sys/net/ipv4/conf/{name}/route_localnet"))?;
                on.then_some(name)
            })
            .collect()
    });
    out.ifaces = crate::classify::exposure::interface_addrs_named().ok();
    out
}

/// Runs `f` in a short-lived thread that joined the namespace `ns` (an open
/// `/proc/PID/ns/net`), or the agent's own with `None`.
fn in_netns<T: Send + 'static>(
    ns: Option<&OwnedFd>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let ns = ns
        .map(OwnedFd::try_clone)
        .transpose()
        .map_err(|e| format!("namespace handle: {e}"))?;
    let t = std::thread::Builder::new()
        .name("pw-fw-read".into())
        .spawn(move || {
            if let Some(fd) = ns {
                // SAFETY: setns on an owned, valid fd; only this thread changes namespace
                // and it ends when `f` is done.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "entering the listener's network namespace: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Ok(f())
        })
        .map_err(|e| format!("ruleset reader thread: {e}"))?;
    t.join()
        .map_err(|_| "ruleset reader thread failed".to_owned())?
}

/// Reads the ruleset of the namespace `ns`, or of the agent's own with `None`.
pub fn read(ns: Option<&OwnedFd>) -> Read {
    in_netns(ns, read_here).unwrap_or_else(|e| {
        let mut r = Read::default();
        r.ruleset.unread.push(e);
        r
    })
}

/// Only the digest of the legacy tables of `ns` (no tool runs when it has none): the
/// cheap poll for a kind of ruleset that sends no change notification.
pub fn legacy_digest(ns: Option<&OwnedFd>) -> Option<u64> {
    in_netns(ns, || {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (names, tool) in [
            ("ip_tables_names", "iptables-legacy-save"),
            ("ip6_tables_names", "ip6tables-legacy-save"),
        ] {
            if legacy_tables(names) {
                let text = run(tool, &[]).ok()?;
                digest_text(&String::from_utf8_lossy(&text), &mut h);
            }
        }
        Some(h.finish())
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_counters_and_dates() {
        let d = |t: &str| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            digest_text(t, &mut h);
            h.finish()
        };
        let a = "# Generated on Mon\n*filter\n:INPUT DROP [1:2]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let b = "# Generated on Tue\n*filter\n:INPUT DROP [9:99]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let c = "*filter\n:INPUT ACCEPT [9:99]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(d(a), d(b));
        assert_ne!(d(a), d(c));
    }

    #[test]
    fn a_missing_tool_is_named() {
        let e = run("portwatch-no-such-tool", &[]).unwrap_err();
        assert_eq!(e, "portwatch-no-such-tool: not installed");
        let e = run("false", &[]).unwrap_err();
        assert!(e.starts_with("false: exit status: 1"), "{e}");
    }
}
