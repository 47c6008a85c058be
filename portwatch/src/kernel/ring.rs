//! Decoding the records the kernel programs put in the ring buffer.
//!
//! The kernel struct is never serialised: it is decoded into [`Record`], which the
//! pipeline enriches into an output event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portwatch_common::{
    AF_INET, AF_INET6, FLAG_IMPLICIT, FLAG_INODE, FLAG_KTHREAD, FLAG_NETNS, FLAG_PPID, FLAG_START,
    FLAG_UNTRACKED, FLAG_URGENT, FLAG_V6ONLY, Header, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
    Kind, SOCKET_RECORD_SIZE, SocketRecord,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    ShortHeader(usize),
    #[error("record of {got} bytes is shorter than a socket record ({want} bytes)")]
    Short { got: usize, want: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    #[error("unknown protocol {0}")]
    UnknownProtocol(u16),
}

pub use crate::socket::Transport;

/// A decoded kernel record. `Option` fields are `None` when the kernel could not read
/// them (see the FLAG_* bits): unknown is never replaced by a guess.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub sock_key: u64,
    pub inode: Option<u64>,
    pub start_boottime_ns: Option<u64>,
    pub netns: Option<u32>,
    pub ppid: Option<u32>,
    pub kthread: bool,
    pub v6only: bool,
    /// A UDP release whose bind the kernel side did not see (see FLAG_UNTRACKED).
    pub untracked: bool,
    /// The kernel judged it important and sent it in the urgent ring.
    pub urgent: bool,
    /// A UDP-Lite socket (protocol 136): handled as UDP, reported as `udplite`.
    pub udplite: bool,
    /// A UDP socket bound implicitly by an unconnected send (see FLAG_IMPLICIT).
    pub implicit: bool,
    pub transport: Transport,
    pub addr: IpAddr,
    pub port: u16,
    /// Raw `comm` bytes up to the first NUL (the kernel does not promise UTF-8).
    pub comm: Vec<u8>,
}

/// Decode one ring buffer item.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < size_of::<Header>() {
        return Err(DecodeError::ShortHeader(bytes.len()));
    }
    let kind_id = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let kind = Kind::from_u32(kind_id).ok_or(DecodeError::UnknownKind(kind_id))?;
    if bytes.len() < SOCKET_RECORD_SIZE {
        return Err(DecodeError::Short {
            got: bytes.len(),
            want: SOCKET_RECORD_SIZE,
        });
    }
    // SAFETY: length checked above; SocketRecord is plain old data with no invalid bit
    // patterns, and read_unaligned copes with the ring's 8-byte alignment or worse.
    let r: SocketRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = match r.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(r.addr[0], r.addr[1], r.addr[2], r.addr[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(r.addr)),
        f => return Err(DecodeError::UnknownFamily(f)),
    };
    let transport = match r.protocol {
        IPPROTO_TCP => Transport::Tcp,
        IPPROTO_UDP | IPPROTO_UDPLITE => Transport::Udp,
        p => return Err(DecodeError::UnknownProtocol(p)),
    };
    let has = |f: u32| r.flags & f != 0;
    let comm_len = r.comm.iter().position(|b| *b == 0).unwrap_or(r.comm.len());
    Ok(Record {
        kind,
        ktime_ns: r.header.ktime_ns,
        pid: (r.header.pid_tgid >> 32) as u32,
        tid: r.header.pid_tgid as u32,
        uid: r.uid_gid as u32,
        gid: (r.uid_gid >> 32) as u32,
        cgroup_id: r.cgroup_id,
        sock_key: r.sock_key,
        inode: has(FLAG_INODE).then_some(r.inode),
        start_boottime_ns: has(FLAG_START).then_some(r.start_boottime_ns),
        netns: has(FLAG_NETNS).then_some(r.netns_ino),
        ppid: has(FLAG_PPID).then_some(r.ppid),
        kthread: has(FLAG_KTHREAD),
        v6only: has(FLAG_V6ONLY),
        untracked: has(FLAG_UNTRACKED),
        urgent: has(FLAG_URGENT),
        udplite: r.protocol == IPPROTO_UDPLITE,
        implicit: has(FLAG_IMPLICIT),
        transport,
        addr,
        port: r.port,
        comm: r.comm[..comm_len].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32, family: u16) -> Vec<u8> {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"nc\x1b[");
        let r = SocketRecord {
            header: Header {
                kind,
                cpu: 1,
                ktime_ns: 42,
                pid_tgid: (7 << 32) | 8,
            },
            uid_gid: (1000 << 32) | 998,
            cgroup_id: 5,
            sock_key: 0xffff_8880_0000_1000,
            inode: 12345,
            start_boottime_ns: 99,
            netns_ino: 4_026_531_840,
            ppid: 1,
            flags: FLAG_INODE | FLAG_NETNS | FLAG_PPID,
            family,
            protocol: IPPROTO_TCP,
            port: 8080,
            _pad: 0,
            _pad2: 0,
            addr,
            comm,
        };
        let p = std::ptr::from_ref(&r).cast::<u8>();
        unsafe { std::slice::from_raw_parts(p, SOCKET_RECORD_SIZE) }.to_vec()
    }

    #[test]
    fn decodes_a_full_record() {
        let r = decode(&record(Kind::ListenStarted as u32, AF_INET)).unwrap();
        assert_eq!(r.kind, Kind::ListenStarted);
        assert_eq!((r.pid, r.tid, r.uid, r.gid), (7, 8, 998, 1000));
        assert_eq!(r.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(r.port, 8080);
        assert_eq!(r.inode, Some(12345));
        assert_eq!(r.netns, Some(4_026_531_840));
        assert_eq!(r.ppid, Some(1));
        assert_eq!(r.start_boottime_ns, None, "FLAG_START clear means unknown");
        assert_eq!(r.comm, b"nc\x1b[");
    }

    #[test]
    fn unknown_kind_and_short_records_are_errors() {
        assert_eq!(
            decode(&record(99, AF_INET)),
            Err(DecodeError::UnknownKind(99))
        );
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::ShortHeader(3)));
        let full = record(Kind::UdpBound as u32, AF_INET);
        assert_eq!(
            decode(&full[..40]),
            Err(DecodeError::Short {
                got: 40,
                want: SOCKET_RECORD_SIZE
            })
        );
        assert_eq!(decode(&record(1, 3)), Err(DecodeError::UnknownFamily(3)));
    }

    #[test]
    fn ipv6_addresses_keep_network_order() {
        let mut bytes = record(Kind::UdpBound as u32, AF_INET6);
        let at = SOCKET_RECORD_SIZE - 32;
        bytes[at..at + 16].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            decode(&bytes).unwrap().addr,
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
    }
}
