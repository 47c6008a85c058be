//! The listeners that already exist on the host, read from /proc.
//!
//! Kernel hooks only see binds made after they are attached, so the sensor starts
//! from this snapshot: every TCP socket in LISTEN and every bound, unconnected UDP socket,
//! in every network namespace, with the processes holding it.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use crate::socket::Protocol;

/// One socket line from `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` that is a listener:
/// TCP in state 0A (LISTEN); UDP with a non-zero local port and state 07 (unconnected;
/// remote `0.0.0.0:0` / `[::]:0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSocket {
    /// TCP or UDP.
    pub transport: Protocol,
    /// Local address. IPv4-mapped addresses from tcp6/udp6 stay IPv6
    /// (`IpAddr::to_canonical` turns them into IPv4).
    pub addr: IpAddr,
    /// Local port, host order.
    pub port: u16,
    /// Owner uid (the creator's fsuid), mapped into the user namespace of whoever opened the
    /// file: 65534 when it has no mapping there.
    pub uid: u32,
    /// Socket inode; 0 means no inode (kernel-owned or orphan socket).
    pub inode: u64,
    /// True when the line came from tcp6/udp6.
    pub ipv6: bool,
}

/// A line of a /proc/net file, or an address, that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The first line is not the column header the kernel prints.
    #[error("line 1: expected the \"sl local_address ...\" header, found {found:?}")]
    Header {
        /// The first line as found.
        found: String,
    },
    /// A line ends before the inode column.
    #[error("line {line}: {found} columns, expected at least {expected} (up to inode)", expected = MIN_COLUMNS)]
    Truncated {
        /// 1-based line number.
        line: usize,
        /// How many columns the line has.
        found: usize,
    },
    /// A column does not hold what the kernel prints there.
    #[error("line {line}: bad {field} {value:?}: {reason}")]
    Field {
        /// 1-based line number.
        line: usize,
        /// Column name as in the header.
        field: &'static str,
        /// The column's text.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`parse_hex_addr`] was given something that is not a kernel hex address.
    #[error("bad hex address {value:?}: {reason}")]
    Address {
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ParseError {
    /// The 1-based line number the error is about, if it is about a line.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Header { .. } => Some(1),
            Self::Truncated { line, .. } | Self::Field { line, .. } => Some(*line),
            Self::Address { .. } => None,
        }
    }
}

// include/net/tcp_states.h. UDP reuses TCP's numbers: an unconnected socket is TCP_CLOSE,
// connect() moves it to TCP_ESTABLISHED.
const TCP_LISTEN: u8 = 0x0A;
const TCP_CLOSE: u8 = 0x07;

// Columns up to inode are common to the tcp and udp formats; what follows differs.
const MIN_COLUMNS: usize = 10;
const COL_LOCAL: usize = 1;
const COL_REMOTE: usize = 2;
const COL_STATE: usize = 3;
const COL_UID: usize = 7;
const COL_INODE: usize = 9;

/// The files read for each namespace: name, transport, IPv6.
const NET_FILES: [(&str, Protocol, bool); 6] = [
    ("tcp", Protocol::Tcp, false),
    ("tcp6", Protocol::Tcp, true),
    ("udp", Protocol::Udp, false),
    ("udp6", Protocol::Udp, true),
    ("udplite", Protocol::UdpLite, false),
    ("udplite6", Protocol::UdpLite, true),
];

enum LineError<'a> {
    Truncated(usize),
    Field {
        field: &'static str,
        value: &'a str,
        reason: &'static str,
    },
}

/// Parse the full text of one /proc/net/{tcp,tcp6,udp,udp6} file. `ipv6` says which.
///
/// Returns only listeners (see [`ProcSocket`]). Every line is checked, listener or not; a
/// malformed line is an error naming its 1-based line number. Empty text gives no sockets;
/// otherwise the first line must be the header. Blank lines are ignored.
pub fn parse_proc_net(
    text: &str,
    transport: Protocol,
    ipv6: bool,
) -> Result<Vec<ProcSocket>, ParseError> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    if header.split_ascii_whitespace().next() != Some("sl") {
        return Err(ParseError::Header {
            found: header.to_owned(),
        });
    }
    let mut out = Vec::new();
    for (idx, line) in lines.enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        // +2: 1-based, and the header was line 1.
        let line_no = idx + 2;
        match parse_line(line, transport, ipv6) {
            Ok(Some(socket)) => out.push(socket),
            Ok(None) => {}
            Err(LineError::Truncated(found)) => {
                return Err(ParseError::Truncated {
                    line: line_no,
                    found,
                });
            }
            Err(LineError::Field {
                field,
                value,
                reason,
            }) => {
                return Err(ParseError::Field {
                    line: line_no,
                    field,
                    value: value.to_owned(),
                    reason,
                });
            }
        }
    }
    Ok(out)
}

fn parse_line(
    line: &str,
    transport: Protocol,
    ipv6: bool,
) -> Result<Option<ProcSocket>, LineError<'_>> {
    let mut cols = [""; MIN_COLUMNS];
    let mut found = 0;
    for (slot, col) in cols.iter_mut().zip(line.split_ascii_whitespace()) {
        *slot = col;
        found += 1;
    }
    if found < MIN_COLUMNS {
        return Err(LineError::Truncated(found));
    }
    let field_err = |field: &'static str, idx: usize, reason: &'static str| LineError::Field {
        field,
        value: cols[idx],
        reason,
    };
    let (addr, port) = parse_endpoint(cols[COL_LOCAL], ipv6)
        .map_err(|reason| field_err("local_address", COL_LOCAL, reason))?;
    let (remote_addr, remote_port) = parse_endpoint(cols[COL_REMOTE], ipv6)
        .map_err(|reason| field_err("rem_address", COL_REMOTE, reason))?;
    let state = hex(cols[COL_STATE].as_bytes(), 2)
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| field_err("st", COL_STATE, "expected 1-2 hex digits"))?;
    let uid: u32 = cols[COL_UID]
        .parse()
        .map_err(|_| field_err("uid", COL_UID, "expected a decimal u32"))?;
    let inode: u64 = cols[COL_INODE]
        .parse()
        .map_err(|_| field_err("inode", COL_INODE, "expected a decimal u64"))?;

    let listening = match transport {
        Protocol::Tcp => state == TCP_LISTEN,
        // Port 0 would be a socket that was never bound (nothing can reach it).
        Protocol::Udp | Protocol::UdpLite => {
            state == TCP_CLOSE && port != 0 && remote_port == 0 && remote_addr.is_unspecified()
        }
    };
    Ok(listening.then_some(ProcSocket {
        transport,
        addr,
        port,
        uid,
        inode,
        ipv6,
    }))
}

/// `ADDRESS:PORT` as the kernel prints it.
fn parse_endpoint(s: &str, ipv6: bool) -> Result<(IpAddr, u16), &'static str> {
    let (addr, port) = s.split_once(':').ok_or("expected ADDRESS:PORT")?;
    match (ipv6, addr.len()) {
        (false, 8) | (true, 32) => {}
        (false, _) => return Err("expected 8 hex digits of IPv4 address"),
        (true, _) => return Err("expected 32 hex digits of IPv6 address"),
    }
    let addr = decode_addr(addr.as_bytes())?;
    let port = hex(port.as_bytes(), 4)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or("port is not 1-4 hex digits")?;
    Ok((addr, port))
}

/// Up to `max_digits` (at most 8) hex digits, either case, nothing else (no sign, no 0x).
fn hex(s: &[u8], max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits {
        return None;
    }
    s.iter().try_fold(0u32, |acc, &b| {
        Some((acc << 4) | char::from(b).to_digit(16)?)
    })
}

fn decode_addr(s: &[u8]) -> Result<IpAddr, &'static str> {
    // The kernel prints each 32-bit word of the address (__be32: network order in memory)
    // as a native integer with %08X, so on little-endian hosts the digits come out byte-swapped.
    // The word's native in-memory bytes are therefore the address bytes, on any host.
    let word = |chunk: &[u8]| {
        hex(chunk, 8)
            .filter(|_| chunk.len() == 8)
            .map(u32::to_ne_bytes)
            .ok_or("not hex digits")
    };
    match s.len() {
        8 => Ok(IpAddr::V4(Ipv4Addr::from(word(s)?))),
        32 => {
            let mut octets = [0u8; 16];
            for (dst, chunk) in octets.chunks_exact_mut(4).zip(s.chunks_exact(8)) {
                dst.copy_from_slice(&word(chunk)?);
            }
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => Err("expected 8 (IPv4) or 32 (IPv6) hex digits"),
    }
}

/// Hex address decoding as the kernel prints it: IPv4 is one u32 printed with %08X of the
/// network-order value as stored in memory (so on little-endian "0100007F" is 127.0.0.1);
/// IPv6 is four such u32 words ("00000000000000000000000001000000" is ::1,
/// "0000000000000000FFFF00000100007F" is ::ffff:127.0.0.1). Correct for the host's endianness.
pub fn parse_hex_addr(s: &str) -> Result<IpAddr, ParseError> {
    decode_addr(s.as_bytes()).map_err(|reason| ParseError::Address {
        value: s.to_owned(),
        reason,
    })
}

/// One network namespace and a process living in it (used to read its `/proc/<pid>/net` files).
///
/// `pid` is 0 for a namespace held only by a bind mount under /run/netns, with no process
/// in it: see [`NetnsMount`] and [`listeners_in`].
#[derive(Clone, Debug)]
pub struct Namespace {
    /// Namespace inode, as in `net:[4026531840]`.
    pub ino: u64,
    /// A process in it (the lowest pid), or 0 when no process is in it.
    pub pid: u32,
}

/// A network namespace bind-mounted on a file, as `ip netns add` does under /run/netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsMount {
    /// Namespace inode.
    pub ino: u64,
    /// The file it is mounted on.
    pub path: PathBuf,
}

/// Where `ip netns add` bind-mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Every network namespace on the host, each once.
///
/// Reads `/proc/<pid>/ns/net` of every numeric /proc entry, in ascending pid order; the first
/// pid seen for each inode wins. Then adds the namespaces held only by bind mounts under
/// /run/netns, with `pid` 0. Processes that vanish mid-scan, or that we may not inspect,
/// are skipped. Errors: /proc cannot be listed, or a /run/netns entry cannot be opened
/// (e.g. not root).
pub fn namespaces() -> io::Result<Vec<Namespace>> {
    let pids = list_pids()?;
    let (namespaces, _) = discover_namespaces(&pids, Path::new(NETNS_RUN_DIR))?;
    Ok(namespaces)
}

/// The network namespaces bind-mounted under /run/netns, whether or not a process lives in
/// them. Files there that are not a mounted network namespace (left over when a mount was
/// undone) are skipped; a missing /run/netns gives none.
pub fn netns_mounts() -> io::Result<Vec<NetnsMount>> {
    netns_mounts_in(Path::new(NETNS_RUN_DIR))
}

/// The listeners of one namespace: through `/proc/<pid>/net` when `ns.pid` is not 0, else by
/// entering the namespace through its /run/netns mount in a short-lived thread of its own.
///
/// `Ok(None)` when the namespace cannot be reached any more: the process exited (or moved to
/// another namespace), or the mount is gone.
pub fn listeners_in(ns: &Namespace) -> io::Result<Option<Vec<ProcSocket>>> {
    if ns.pid != 0 {
        return read_via_pid(ns.pid, ns.ino, &mut String::new());
    }
    match netns_mounts()?.into_iter().find(|m| m.ino == ns.ino) {
        Some(mount) => read_via_mount(&mount),
        None => Ok(None),
    }
}

/// socket inode -> pids holding it, by reading every `/proc/<pid>/fd/*` link (`socket:[12345]`).
///
/// Only thread-group leaders (the numeric dirs in /proc); pids are ascending and each listed
/// once per socket. Processes that vanish, or whose fds we may not read, are skipped; if /proc
/// itself cannot be listed the map is empty.
pub fn socket_owners() -> HashMap<u64, Vec<u32>> {
    match list_pids() {
        Ok(pids) => collect_owners(&pids, None).pids,
        Err(_) => HashMap::new(),
    }
}

/// Pids holding socket `inode` now, ascending (empty: nobody, or nobody we may see);
/// `None` when /proc cannot be listed.
pub fn holders_of(inode: u64) -> Option<Vec<u32>> {
    let pids = list_pids().ok()?;
    let wanted = HashSet::from([inode]);
    let mut owners = collect_owners(&pids, Some(&wanted));
    Some(owners.pids.remove(&inode).unwrap_or_default())
}

/// One listener of the host: the namespace it lives in and the processes holding it.
#[derive(Clone, Debug)]
pub struct Found {
    /// Inode of the network namespace the socket belongs to.
    pub netns_ino: u64,
    /// The socket.
    pub socket: ProcSocket,
    /// Pids holding it; empty for a kernel-owned socket (e.g. nfsd) or one no process holds.
    pub owners: Vec<u32>,
    /// No owner was found, but some processes' fds could not be read (EACCES even as
    /// root, e.g. a sandbox's init): the owner is unknown, not necessarily the kernel.
    pub owner_hidden: bool,
    /// `IPV6_V6ONLY` of a `::` socket, when it could be asked (see `v6only_of`).
    pub v6only: Option<bool>,
}

/// The listeners of the whole host: for each namespace (see [`namespaces`]) its 4 files, each
/// listener tagged with the namespace inode and its owning pids.
///
/// Namespaces whose only known process exits mid-scan are skipped. Errors: /proc cannot be
/// listed, a /run/netns namespace cannot be entered (not root), or a file does not parse.
pub fn scan() -> io::Result<Vec<Found>> {
    scan_with(Path::new(NETNS_RUN_DIR))
}

/// Inode of this process's own network namespace (the host's when run on the host).
pub fn own_netns() -> io::Result<u64> {
    let mut cpath = Vec::new();
    let mut link = [0u8; LINK_BUF];
    netns_of(b"/proc/self/ns/net", &mut cpath, &mut link)
}

fn scan_with(netns_dir: &Path) -> io::Result<Vec<Found>> {
    let pids = list_pids()?;
    let (namespaces, mounts) = discover_namespaces(&pids, netns_dir)?;
    // Proc net files report size 0, so without room up front every read grows the buffer.
    let mut buf = String::with_capacity(64 * 1024);
    let mut found = Vec::new();
    let mut inodes = HashSet::new();
    for ns in &namespaces {
        let via_pid = if ns.pid != 0 {
            read_via_pid(ns.pid, ns.ino, &mut buf)?
        } else {
            None
        };
        let sockets = match via_pid {
            Some(sockets) => Some(sockets),
            None => match mounts.iter().find(|m| m.ino == ns.ino) {
                Some(mount) => read_via_mount(mount)?,
                None => None,
            },
        };
        for socket in sockets.into_iter().flatten() {
            // A seq_file is not read atomically: a socket that moves in the hash table between
            // two read() calls can be printed twice. Socket inodes are unique host-wide, so
            // one sighting is enough.
            if socket.inode != 0 && !inodes.insert(socket.inode) {
                continue;
            }
            found.push(Found {
                netns_ino: ns.ino,
                socket,
                owners: Vec::new(),
                owner_hidden: false,
                v6only: None,
            });
        }
    }
    // Listed again so that a process started during the scan, holding a socket we just read,
    // is looked at too.
    let pids = list_pids()?;
    let Owners {
        pids: mut owners,
        first_fd,
        unreadable,
    } = collect_owners(&pids, Some(&inodes));
    for f in &mut found {
        if f.socket.inode != 0 {
            f.owners = owners.remove(&f.socket.inode).unwrap_or_default();
        }
        f.owner_hidden = f.owners.is_empty() && unreadable > 0;
        // Only a `::` bind's exposure depends on it (dual-stack or IPv6 only).
        if f.socket.addr == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
            f.v6only = first_fd
                .get(&f.socket.inode)
                .and_then(|&(pid, fd)| v6only_of(pid, fd));
        }
    }
    Ok(found)
}

/// Numeric /proc entries, ascending.
fn list_pids() -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Errors that mean a process is gone (ENOENT, ESRCH: exited, or a zombie whose namespaces and
/// fds are already released) or not ours to inspect (EACCES, EPERM).
fn process_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ESRCH | libc::EACCES | libc::EPERM)
    )
}

fn discover_namespaces(
    pids: &[u32],
    netns_dir: &Path,
) -> io::Result<(Vec<Namespace>, Vec<NetnsMount>)> {
    let mut seen = HashSet::new();
    let mut namespaces = Vec::new();
    let mut cpath = Vec::with_capacity(32);
    let mut link = [0u8; LINK_BUF];
    for &pid in pids {
        let path = format!("/proc/{pid}/ns/net");
        match netns_of(path.as_bytes(), &mut cpath, &mut link) {
            Ok(ino) => {
                if seen.insert(ino) {
                    namespaces.push(Namespace { ino, pid });
                }
            }
            Err(e) if process_unreachable(&e) => {}
            Err(e) => return Err(e),
        }
    }
    // Every mount is kept, not only those of namespaces no process is in: the process a
    // namespace was found through may be gone by the time it is read (a short-lived
    // `nft` or `ip netns exec` child), and then the mount still leads there.
    let mounts = netns_mounts_in(netns_dir)?;
    for mount in &mounts {
        if seen.insert(mount.ino) {
            namespaces.push(Namespace {
                ino: mount.ino,
                pid: 0,
            });
        }
    }
    Ok((namespaces, mounts))
}

fn netns_mounts_in(dir: &Path) -> io::Result<Vec<NetnsMount>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut mounts = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            // `ip netns del` ran meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // `ip netns add` creates an empty file and bind-mounts the namespace on it; if the
        // mount is gone the plain file stays behind. Only nsfs answers NS_GET_NSTYPE.
        // SAFETY: `file` is an open fd for the duration of the call; NS_GET_NSTYPE takes no
        // argument.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if nstype != libc::CLONE_NEWNET {
            continue;
        }
        mounts.push(NetnsMount {
            ino: file.metadata()?.ino(),
            path,
        });
    }
    Ok(mounts)
}

/// Room for the links we look for ("socket:[N]", "net:[N]", at most 29 bytes); longer
/// links come back truncated and then fail to parse, which is what we want for them.
const LINK_BUF: usize = 64;

/// readlink(2) of `path` (without NUL) into `link`, using `cpath` as the NUL-terminated copy,
/// so walking thousands of fds allocates nothing per fd.
fn readlink_into<'l>(
    path: &[u8],
    cpath: &mut Vec<u8>,
    link: &'l mut [u8; LINK_BUF],
) -> io::Result<&'l [u8]> {
    cpath.clear();
    cpath.extend_from_slice(path);
    cpath.push(0);
    let cstr = CStr::from_bytes_with_nul(cpath)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cstr` is NUL-terminated and `link` is writable for `link.len()` bytes; readlink
    // writes at most that many and does not NUL-terminate.
    let n = unsafe { libc::readlink(cstr.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    Ok(&link[..n])
}

/// The number N in `{prefix}N]`.
fn bracketed_inode(link: &[u8], prefix: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(prefix)?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn netns_of(path: &[u8], cpath: &mut Vec<u8>, link: &mut [u8; LINK_BUF]) -> io::Result<u64> {
    let target = readlink_into(path, cpath, link)?;
    bracketed_inode(target, b"net:[").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: unexpected link {:?}",
                String::from_utf8_lossy(path),
                String::from_utf8_lossy(target)
            ),
        )
    })
}

/// Also returns how many processes' fd tables could not be read for lack of permission.
/// Pids holding each socket, where the first of them holds it (pid, fd), and how many
/// processes' fd tables could not be read.
struct Owners {
    pids: HashMap<u64, Vec<u32>>,
    first_fd: HashMap<u64, (u32, i32)>,
    unreadable: usize,
}

fn collect_owners(pids: &[u32], wanted: Option<&HashSet<u64>>) -> Owners {
    let mut owners: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut first_fd = HashMap::new();
    let mut unreadable = 0;
    let mut path = Vec::with_capacity(64);
    let mut cpath = Vec::with_capacity(64);
    let mut link = [0u8; LINK_BUF];
    for &pid in pids {
        let dir = format!("/proc/{pid}/fd/");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                unreadable += 1;
                continue;
            }
            Err(_) => continue,
        };
        for entry in entries {
            // readdir fails part-way once the process exits.
            let Ok(entry) = entry else { break };
            path.clear();
            path.extend_from_slice(dir.as_bytes());
            path.extend_from_slice(entry.file_name().as_bytes());
            // The fd may be closed between readdir and readlink. Permission can be refused
            // per link even when the directory lists (ptrace access mode checks).
            let target = match readlink_into(&path, &mut cpath, &mut link) {
                Ok(target) => target,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    unreadable += 1;
                    break;
                }
                Err(_) => continue,
            };
            let Some(ino) = bracketed_inode(target, b"socket:[") else {
                continue;
            };
            if wanted.is_some_and(|w| !w.contains(&ino)) {
                continue;
            }
            if let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            {
                first_fd.entry(ino).or_insert((pid, fd));
            }
            let holders = owners.entry(ino).or_default();
            // A process holding one socket in several fds (dup, SCM_RIGHTS) counts once;
            // its fds are walked together, so a repeat is always the last pid pushed.
            if holders.last() != Some(&pid) {
                holders.push(pid);
            }
        }
    }
    Owners {
        pids: owners,
        first_fd,
        unreadable,
    }
}

/// `IPV6_V6ONLY` of another process's socket: /proc/net does not show it, so borrow the
/// socket with pidfd_getfd(2) (Linux 5.6+, root) and ask it. `None` when that fails.
fn v6only_of(pid: u32, fd: i32) -> Option<bool> {
    // SAFETY: plain syscalls; every fd opened here is closed before returning.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let sock = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        if sock < 0 {
            return None;
        }
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        let rc = libc::getsockopt(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        );
        libc::close(sock);
        (rc == 0).then_some(v != 0)
    }
}

type NetFiles = [Option<File>; 6];

/// Opens the files under `dir`; only the IPv6 ones and UDP-Lite's may be missing.
fn open_net_files(dir: &str) -> io::Result<NetFiles> {
    let mut files: NetFiles = Default::default();
    for (slot, (name, transport, ipv6)) in files.iter_mut().zip(NET_FILES) {
        match File::open(format!("{dir}/{name}")) {
            Ok(file) => *slot = Some(file),
            // With IPv6 disabled (ipv6.disable=1) the kernel creates no tcp6/udp6; a
            // kernel may be built without UDP-Lite.
            Err(e)
                if (ipv6 || transport == Protocol::UdpLite)
                    && e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

fn read_net_files(files: NetFiles, dir: &str, buf: &mut String) -> io::Result<Vec<ProcSocket>> {
    let mut out = Vec::new();
    for (file, (name, transport, ipv6)) in files.into_iter().zip(NET_FILES) {
        let Some(mut file) = file else { continue };
        buf.clear();
        file.read_to_string(buf)?;
        let sockets = parse_proc_net(buf, transport, ipv6).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{dir}/{name}: {e}"))
        })?;
        out.extend(sockets);
    }
    Ok(out)
}

fn read_via_pid(pid: u32, ino: u64, buf: &mut String) -> io::Result<Option<Vec<ProcSocket>>> {
    let dir = format!("/proc/{pid}/net");
    let files = match open_net_files(&dir) {
        Ok(files) => files,
        Err(e) if process_unreachable(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    // An open proc net file stays bound to the namespace the process was in at open(). If the
    // pid now names a process elsewhere (exited and reused, or it called setns), what we
    // opened may not be namespace `ino`.
    let mut cpath = Vec::new();
    let mut link = [0u8; LINK_BUF];
    let ns_path = format!("/proc/{pid}/ns/net");
    match netns_of(ns_path.as_bytes(), &mut cpath, &mut link) {
        Ok(now) if now == ino => {}
        Ok(_) => return Ok(None),
        Err(e) if process_unreachable(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    read_net_files(files, &dir, buf).map(Some)
}

fn read_via_mount(mount: &NetnsMount) -> io::Result<Option<Vec<ProcSocket>>> {
    let mount = mount.clone();
    // setns() changes the namespace of the calling thread only, and that thread keeps it: a
    // thread of our own that exits right after is the only one it may be done on.
    let reader = std::thread::Builder::new()
        .name("portwatch-netns".into())
        .spawn(move || -> io::Result<Option<Vec<ProcSocket>>> {
            let ns = match File::open(&mount.path) {
                Ok(ns) => ns,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // The name may have been deleted and re-created for another namespace since.
            if ns.metadata()?.ino() != mount.ino {
                return Ok(None);
            }
            // SAFETY: `ns` is an open fd for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // /proc/self/net follows the thread-group leader's namespace; thread-self is ours.
            let dir = "/proc/thread-self/net";
            read_net_files(open_net_files(dir)?, dir, &mut String::new()).map(Some)
        })?;
    reader
        .join()
        .map_err(|_| io::Error::other("netns reader thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};
    use std::os::fd::AsFd;

    const TCP_SAMPLE: &str = concat!(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     \n",
        "   0: 0100007F:2CAB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   997        0 12828 1 00000000c1c57b48 100 0 0 10 0                     \n",
        "   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1209 1 00000000fc8f72e7 100 0 0 10 0                      \n",
        "   2: 0100007F:B5C2 0100007F:2CAB 01 00000000:00000000 00:00000000 00000000     0        0 12829 2 0000000061eb5c1e 20 0 0 10 -1                     \n",
        "   3: 0100007F:2CAB 0100007F:B5C2 01 00000000:00000000 00:00000000 00000000     0        0 12830 1 00000000753640bd 20 0 0 10 -1                     \n",
        "   4: 0100007F:0801 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 00000000753640bd 100 0 0 10 0                     \n",
    );

    const TCP6_SAMPLE: &str = concat!(
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
        "   0: 00000000000000000000000001000000:14E9 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12833 1 00000000ad30b9b9 100 0 0 10 0\n",
        "   1: 0000000000000000FFFF00000100007F:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12832 1 00000000d4334b72 100 0 0 10 0\n",
        "   2: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12831 1 0000000097a8dd46 100 0 0 10 0\n",
        "   3: 00000000000000000000000001000000:14E9 00000000000000000000000001000000:DF7E 01 00000000:00000000 00:00000000 00000000     0        0 12835 1 00000000ecef12bd 20 0 0 10 -1\n",
        "   4: 00000000000000000000000001000000:DF7E 00000000000000000000000001000000:14E9 01 00000000:00000000 00:00000000 00000000     0        0 12834 2 000000004a15b4b2 20 0 0 10 -1\n",
    );

    const UDP_SAMPLE: &str = concat!(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            \n",
        " 9101: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12836 2 0000000021f8eef3 0         \n",
        "16280: 0100007F:9C40 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 12837 2 0000000028c629f5 0         \n",
        "16281: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12839 2 0000000028c629f5 0         \n",
    );

    const UDP6_SAMPLE: &str = concat!(
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n",
        "14401: 00000000000000000000000001000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12838 2 00000000cbe819de 0\n",
    );

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn hex_ipv4_follows_host_byte_order() {
        // The kernel prints the in-memory (network order) bytes as a native u32.
        let printed = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(parse_hex_addr(&printed).unwrap(), ip("127.0.0.1"));
        let printed = format!("{:08X}", u32::from_ne_bytes([192, 168, 1, 20]));
        assert_eq!(parse_hex_addr(&printed).unwrap(), ip("192.168.1.20"));
        assert_eq!(parse_hex_addr("00000000").unwrap(), ip("0.0.0.0"));
        if cfg!(target_endian = "little") {
            assert_eq!(parse_hex_addr("0100007F").unwrap(), ip("127.0.0.1"));
            assert_eq!(parse_hex_addr("1401A8C0").unwrap(), ip("192.168.1.20"));
            // Lower case is accepted too.
            assert_eq!(parse_hex_addr("1401a8c0").unwrap(), ip("192.168.1.20"));
        }
    }

    #[test]
    fn hex_ipv6_words_follow_host_byte_order() {
        let printed: String = [
            [0x20, 0x01, 0x0d, 0xb8],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ]
        .iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(*w)))
        .collect();
        assert_eq!(
            parse_hex_addr(&printed).unwrap(),
            ip("2001:db8::1"),
            "{printed}"
        );
        assert_eq!(
            parse_hex_addr("00000000000000000000000000000000").unwrap(),
            ip("::")
        );
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_hex_addr("00000000000000000000000001000000").unwrap(),
                ip("::1")
            );
            assert_eq!(
                parse_hex_addr("B80D0120000000000000000001000000").unwrap(),
                ip("2001:db8::1")
            );
            let mapped = parse_hex_addr("0000000000000000FFFF00000100007F").unwrap();
            assert_eq!(mapped, ip("::ffff:127.0.0.1"));
            assert!(mapped.is_ipv6());
            assert_eq!(mapped.to_canonical(), ip("127.0.0.1"));
        }
    }

    #[test]
    fn hex_address_rejects_garbage() {
        for bad in [
            "",
            "0100007",
            "0100007F0",
            "+100007F",
            "0x00007F",
            "0100007G",
            "0000000000000000FFFF00000100007",
            "0000000000000000FFFF0000010000é",
        ] {
            let err = parse_hex_addr(bad).unwrap_err();
            assert!(matches!(err, ParseError::Address { .. }), "{bad:?}: {err}");
            assert_eq!(err.line(), None);
        }
    }

    #[test]
    fn tcp_sample_keeps_listeners_only() {
        let got = parse_proc_net(TCP_SAMPLE, Protocol::Tcp, false).unwrap();
        let expect = |addr: &str, port, uid, inode| ProcSocket {
            transport: Protocol::Tcp,
            addr: ip(addr),
            port,
            uid,
            inode,
            ipv6: false,
        };
        assert_eq!(
            got,
            vec![
                expect("127.0.0.1", 11435, 997, 12828),
                expect("0.0.0.0", 2024, 0, 1209),
                // No inode: a kernel-owned listener.
                expect("127.0.0.1", 2049, 0, 0),
            ]
        );
    }

    #[test]
    fn tcp6_sample_decodes_v6_and_v4_mapped() {
        let got = parse_proc_net(TCP6_SAMPLE, Protocol::Tcp, true).unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|s| (s.addr, s.port, s.uid, s.inode))
            .collect();
        assert_eq!(
            summary,
            vec![
                (ip("::1"), 5353, 0, 12833),
                (ip("::ffff:127.0.0.1"), 9090, 0, 12832),
                (ip("::"), 8080, 1000, 12831),
            ]
        );
        assert!(got.iter().all(|s| s.ipv6 && s.transport == Protocol::Tcp));
    }

    #[test]
    fn udp_sample_keeps_bound_unconnected_only() {
        let got = parse_proc_net(UDP_SAMPLE, Protocol::Udp, false).unwrap();
        assert_eq!(
            got,
            vec![ProcSocket {
                transport: Protocol::Udp,
                addr: ip("0.0.0.0"),
                port: 53,
                uid: 0,
                inode: 12836,
                ipv6: false,
            }]
        );
        let got = parse_proc_net(UDP6_SAMPLE, Protocol::Udp, true).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].addr, got[0].port, got[0].ipv6),
            (ip("::1"), 5353, true)
        );
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let header = TCP_SAMPLE.lines().next().unwrap();
        let good = TCP_SAMPLE.lines().nth(1).unwrap();
        let truncated = "   1: 0100007F:2CAB 00000000:0000 0A 00000000:00000000 00:00000000";
        let text = format!("{header}\n{good}\n{truncated}\n");
        let err = parse_proc_net(&text, Protocol::Tcp, false).unwrap_err();
        assert!(
            matches!(err, ParseError::Truncated { line: 3, found: 6 }),
            "{err}"
        );
        assert_eq!(err.line(), Some(3));
        assert!(err.to_string().starts_with("line 3:"), "{err}");

        let cases: [(&str, &str); 7] = [
            (
                "   0: 0100007F2CAB 00000000:0000 0A 0:0 0:0 0 0 0 1 1",
                "local_address",
            ),
            (
                "   0: 0100007F:2CAB 00000000:00000 0A 0:0 0:0 0 0 0 1 1",
                "rem_address",
            ),
            (
                "   0: 0100007F:2CAB 00000000:0000 0AA 0:0 0:0 0 0 0 1 1",
                "st",
            ),
            (
                "   0: 0100007F:2CAB 00000000:0000 0A 0:0 0:0 0 -1 0 1 1",
                "uid",
            ),
            (
                "   0: 0100007F:2CAB 00000000:0000 0A 0:0 0:0 0 0 0 x 1",
                "inode",
            ),
            // An IPv6 address in a v4 file.
            (
                "   0: 00000000000000000000000001000000:14E9 00000000:0000 0A 0:0 0:0 0 0 0 1 1",
                "local_address",
            ),
            // Not a listener, still checked.
            (
                "   0: 0100007F:2CAB 0100007Z:0000 01 0:0 0:0 0 0 0 1 1",
                "rem_address",
            ),
        ];
        for (line, column) in cases {
            let text = format!("{header}\n{good}\n\n{line}\n");
            match parse_proc_net(&text, Protocol::Tcp, false) {
                Err(ParseError::Field { line: 4, field, .. }) => assert_eq!(field, column),
                other => panic!("{line:?}: {other:?}"),
            }
        }

        let err = parse_proc_net(good, Protocol::Tcp, false).unwrap_err();
        assert!(matches!(err, ParseError::Header { .. }), "{err}");
        assert_eq!(err.line(), Some(1));
    }

    #[test]
    fn empty_and_header_only_files_have_no_sockets() {
        assert_eq!(parse_proc_net("", Protocol::Tcp, false).unwrap(), vec![]);
        let header = UDP6_SAMPLE.lines().next().unwrap();
        assert_eq!(
            parse_proc_net(&format!("{header}\n"), Protocol::Udp, true).unwrap(),
            vec![]
        );
    }

    fn socket_inode(fd: impl AsFd) -> u64 {
        let file = File::from(fd.as_fd().try_clone_to_owned().unwrap());
        file.metadata().unwrap().ino()
    }

    #[test]
    fn scan_finds_our_own_listeners() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        let own = own_netns().unwrap();

        let found = scan().unwrap();
        for (transport, port, inode) in [
            (
                Protocol::Tcp,
                tcp.local_addr().unwrap().port(),
                socket_inode(&tcp),
            ),
            (
                Protocol::Udp,
                udp.local_addr().unwrap().port(),
                socket_inode(&udp),
            ),
        ] {
            let f = found
                .iter()
                .find(|f| f.socket.transport == transport && f.socket.inode == inode)
                .unwrap_or_else(|| panic!("{transport:?} port {port} not found"));
            assert_eq!(f.socket.addr, ip("127.0.0.1"));
            assert_eq!(f.socket.port, port);
            assert!(!f.socket.ipv6);
            // SAFETY: geteuid has no preconditions.
            assert_eq!(f.socket.uid, unsafe { libc::geteuid() });
            assert_eq!(f.netns_ino, own);
            assert!(f.owners.contains(&me), "{f:?}");
        }

        assert!(
            namespaces()
                .unwrap()
                .iter()
                .any(|ns| ns.ino == own && ns.pid != 0)
        );
        let owners = socket_owners();
        assert!(owners[&socket_inode(&tcp)].contains(&me));
    }

    /// Removes the bind mount and its directory even when the test fails.
    struct MountGuard {
        dir: PathBuf,
        target: PathBuf,
    }

    impl Drop for MountGuard {
        fn drop(&mut self) {
            if let Ok(target) = std::ffi::CString::new(self.target.as_os_str().as_bytes()) {
                // SAFETY: `target` is NUL-terminated.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn scan_enters_namespaces_held_only_by_a_mount() {
        let dir = std::env::temp_dir().join(format!("portwatch-netns-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let target = dir.join("held");
        File::create(&target).unwrap();
        // A plain file, as `ip netns add` leaves behind when the mount is gone: not a namespace.
        File::create(dir.join("stale")).unwrap();
        let guard = MountGuard {
            dir: dir.clone(),
            target: target.clone(),
        };

        // A namespace no process's main thread is in: only the mount keeps it findable.
        let (tcp, udp, ino) = std::thread::spawn(move || {
            // SAFETY: affects only this thread, which exits right after.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // lo is down in a fresh namespace, so 127.0.0.1 cannot be bound; the wildcard can.
            let tcp = TcpListener::bind("0.0.0.0:0").unwrap();
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            let src = c"/proc/thread-self/ns/net";
            let dst = std::ffi::CString::new(target.as_os_str().as_bytes()).unwrap();
            // SAFETY: both paths are NUL-terminated; fstype and data may be null for MS_BIND.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            let ino = fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
            (tcp, udp, ino)
        })
        .join()
        .unwrap();
        assert_ne!(ino, own_netns().unwrap());

        let mounts = netns_mounts_in(&dir).unwrap();
        assert_eq!(
            mounts,
            vec![NetnsMount {
                ino,
                path: guard.target.clone()
            }]
        );

        let found = scan_with(&dir).unwrap();
        let me = std::process::id();
        let in_ns: Vec<_> = found.iter().filter(|f| f.netns_ino == ino).collect();
        assert_eq!(in_ns.len(), 2, "{in_ns:?}");
        for (transport, port) in [
            (Protocol::Tcp, tcp.local_addr().unwrap().port()),
            (Protocol::Udp, udp.local_addr().unwrap().port()),
        ] {
            let f = in_ns
                .iter()
                .find(|f| f.socket.transport == transport)
                .unwrap();
            assert_eq!((f.socket.addr, f.socket.port), (ip("0.0.0.0"), port));
            assert_eq!(f.owners, vec![me]);
        }

        let pids = list_pids().unwrap();
        let (namespaces, _) = discover_namespaces(&pids, &dir).unwrap();
        assert!(namespaces.iter().any(|ns| ns.ino == ino && ns.pid == 0));
        drop(guard);
    }
}
