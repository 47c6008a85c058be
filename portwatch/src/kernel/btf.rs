//! Just enough of a BTF reader to find struct member offsets in the running kernel
//! (`/sys/kernel/btf/vmlinux`). Rust eBPF has no CO-RE relocations, so the offsets the
//! programs need are looked up here and passed in as load-time globals.
//!
//! Format: Documentation/bpf/btf.rst (`struct btf_header`, `struct btf_type` and the
//! per-kind trailers).

use portwatch_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not a BTF blob (bad magic)")]
    BadMagic,
    #[error("BTF blob truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} at type id {id}")]
    UnknownKind { kind: u32, id: u32 },
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A BTF blob, borrowed: types are decoded on demand from their offsets, so the
/// agent's peak memory stays near the size of the blob (vmlinux BTF is ~6 MiB with
/// ~150k types; decoding every type up front cost several times that).
pub struct Btf<'a> {
    data: &'a [u8],
    /// Byte offset of each type record; index = type id (0 is `void`).
    types: Vec<u32>,
    strings: &'a [u8],
}

/// Where a member lives: byte offset and, for bitfields, the bit within that byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPos {
    pub byte: u32,
    pub bit: u32,
}

/// One decoded `struct btf_type` header.
#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `type` for modifiers/typedefs; `size` for structs.
    size_or_type: u32,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Truncated(at))
}

fn header_at(data: &[u8], at: usize) -> Result<TypeHeader, BtfError> {
    let info = u32_at(data, at + 4)?;
    Ok(TypeHeader {
        at,
        name_off: u32_at(data, at)?,
        kind: (info >> 24) & 0x1f,
        vlen: (info & 0xffff) as usize,
        kind_flag: info >> 31 == 1,
        size_or_type: u32_at(data, at + 8)?,
    })
}

/// Bytes that follow a type header, by kind (Documentation/bpf/btf.rst, 2.2).
fn trailer_len(h: &TypeHeader, id: usize) -> Result<usize, BtfError> {
    Ok(match h.kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * h.vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * h.vlen,
        0 | 2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC | 16
        | KIND_TYPE_TAG => 0,
        kind => {
            return Err(BtfError::UnknownKind {
                kind,
                id: id as u32,
            });
        }
    })
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Truncated(hdr_len + str_off))?;
        if types_end > data.len() {
            return Err(BtfError::Truncated(types_end));
        }
        let mut types = vec![0u32];
        let mut at = types_start;
        while at < types_end {
            let h = header_at(data, at)?;
            types.push(at as u32);
            at += 12 + trailer_len(&h, types.len() - 1)?;
        }
        if at > types_end {
            return Err(BtfError::Truncated(types_end));
        }
        Ok(Btf {
            data,
            types,
            strings,
        })
    }

    fn string(&self, off: u32) -> &'a [u8] {
        let tail = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        &tail[..end]
    }

    fn header(&self, id: u32) -> Option<TypeHeader> {
        let at = *self.types.get(id as usize)?;
        if id == 0 {
            return None;
        }
        header_at(self.data, at as usize).ok()
    }

    /// Follow typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<TypeHeader> {
        for _ in 0..32 {
            let t = self.header(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The first complete struct or union called `name`.
    fn find_struct(&self, name: &str) -> Option<TypeHeader> {
        (1..self.types.len() as u32)
            .filter_map(|id| self.header(id))
            .find(|t| {
                (t.kind == KIND_STRUCT || t.kind == KIND_UNION)
                    && t.name_off != 0
                    && self.string(t.name_off) == name.as_bytes()
            })
    }

    /// Type id of the function (`BTF_KIND_FUNC`) called `name`: what an fentry program
    /// names as its `attach_btf_id`.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        (1..self.types.len() as u32).find(|id| {
            self.header(*id).is_some_and(|t| {
                t.kind == KIND_FUNC && t.name_off != 0 && self.string(t.name_off) == name.as_bytes()
            })
        })
    }

    /// Bit offset and type of `name` inside struct/union `t`, searching anonymous
    /// members too (`sock_common` keeps `skc_num` inside an anonymous struct in a union).
    fn member(&self, t: &TypeHeader, name: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 || (t.kind != KIND_STRUCT && t.kind != KIND_UNION) {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.at + 12 + 12 * i;
            let name_off = u32_at(self.data, at).ok()?;
            let type_id = u32_at(self.data, at + 4).ok()?;
            let offset = u32_at(self.data, at + 8).ok()?;
            // With kind_flag the top 8 bits are the bitfield size.
            let bits = if t.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            if name_off != 0 {
                if self.string(name_off) == name.as_bytes() {
                    return Some((bits, type_id));
                }
                continue;
            }
            let inner = self.resolve(type_id)?;
            if let Some((off, ty)) = self.member(&inner, name, depth + 1) {
                return Some((bits + off, ty));
            }
        }
        None
    }

    /// Position of `path` (e.g. `["__sk_common", "skc_num"]`) inside `struct name`.
    pub fn field(&self, name: &str, path: &[&str]) -> Option<FieldPos> {
        let mut t = self.find_struct(name)?;
        let mut bits = 0;
        for (i, part) in path.iter().enumerate() {
            let (off, ty) = self.member(&t, part, 0)?;
            bits += off;
            if i + 1 < path.len() {
                t = self.resolve(ty)?;
            }
        }
        Some(FieldPos {
            byte: bits / 8,
            bit: bits % 8,
        })
    }

    fn byte(&self, name: &str, path: &[&str]) -> u32 {
        self.field(name, path)
            .map_or(KernelOffsets::UNKNOWN, |p| p.byte)
    }

    /// Every offset the programs use. A field missing from this kernel stays UNKNOWN and
    /// the matching output field is reported as unknown, never guessed.
    pub fn kernel_offsets(&self) -> KernelOffsets {
        let socket_to_inode = match (
            self.field("socket_alloc", &["vfs_inode"]),
            self.field("socket_alloc", &["socket"]),
        ) {
            (Some(i), Some(s)) if i.byte >= s.byte => i.byte - s.byte,
            _ => KernelOffsets::UNKNOWN,
        };
        let v6only = self.field("sock_common", &["skc_ipv6only"]);
        let kern_sock = self.field("sock", &["sk_kern_sock"]);
        // Pairs read as one 8-byte word: only where the second follows the first.
        let pair = |st: &str, a: &str, b: &str| match (self.field(st, &[a]), self.field(st, &[b])) {
            (Some(a), Some(b)) if b.byte == a.byte + 4 && a.bit == 0 && b.bit == 0 => a.byte,
            _ => KernelOffsets::UNKNOWN,
        };
        KernelOffsets {
            sock_num: self.byte("sock", &["__sk_common", "skc_num"]),
            sock_socket: self.byte("sock", &["sk_socket"]),
            // `possible_net_t` is a typedef'd anonymous struct holding `net`.
            sock_net: self.byte("sock", &["__sk_common", "skc_net", "net"]),
            sock_ipv6only_byte: v6only.map_or(KernelOffsets::UNKNOWN, |p| p.byte),
            sock_ipv6only_bit: v6only.map_or(0, |p| p.bit),
            socket_to_inode,
            inode_ino: self.byte("inode", &["i_ino"]),
            net_inum: self.byte("net", &["ns", "inum"]),
            task_real_parent: self.byte("task_struct", &["real_parent"]),
            task_tgid: self.byte("task_struct", &["tgid"]),
            task_group_leader: self.byte("task_struct", &["group_leader"]),
            task_start_boottime: self.byte("task_struct", &["start_boottime"]),
            task_flags: self.byte("task_struct", &["flags"]),
            sock_rcv_saddr: self.byte("sock_common", &["skc_rcv_saddr"]),
            sock_v6_rcv_saddr: self.byte("sock_common", &["skc_v6_rcv_saddr"]),
            sock_state: self.byte("sock_common", &["skc_state"]),
            sock_family: self.byte("sock_common", &["skc_family"]),
            sock_protocol: self.byte("sock", &["sk_protocol"]),
            inet_sport: self.byte("inet_sock", &["inet_sport"]),
            inet_saddr: self.byte("inet_sock", &["inet_saddr"]),
            socket_sk: self.byte("socket", &["sk"]),
            sock_kern_byte: kern_sock.map_or(KernelOffsets::UNKNOWN, |p| p.byte),
            sock_kern_bit: kern_sock.map_or(0, |p| p.bit),
            tcp_cb_flags: self.byte("tcp_sock", &["bpf_sock_ops_cb_flags"]),
            task_pid: pair("task_struct", "pid", "tgid"),
            task_cred: self.byte("task_struct", &["cred"]),
            cred_uid: pair("cred", "uid", "gid"),
            task_comm: self.byte("task_struct", &["comm"]),
            task_cgroups: self.byte("task_struct", &["cgroups"]),
            css_set_dfl_cgrp: self.byte("css_set", &["dfl_cgrp"]),
            cgroup_kn: self.byte("cgroup", &["kn"]),
            kernfs_node_id: self.byte("kernfs_node", &["id"]),
        }
    }
}

/// Names of the offsets the direct hook set needs that this kernel's BTF did not
/// provide (without them it cannot tell a socket's family, state or protocol).
pub fn missing_direct(offsets: &KernelOffsets) -> Vec<&'static str> {
    let o = offsets;
    [
        ("sock_common.skc_state", o.sock_state),
        ("sock_common.skc_family", o.sock_family),
        ("sock.sk_protocol", o.sock_protocol),
        ("inet_sock.inet_sport", o.inet_sport),
        ("inet_sock.inet_saddr", o.inet_saddr),
        ("socket.sk", o.socket_sk),
        ("sock.sk_kern_sock", o.sock_kern_byte),
    ]
    .into_iter()
    .filter(|(_, v)| *v == KernelOffsets::UNKNOWN)
    .map(|(n, _)| n)
    .collect()
}

/// Names of the offsets the sock_ops flavour of the stable set needs that this kernel's
/// BTF did not provide (without them its programs cannot tell who listened).
pub fn missing_sockops(offsets: &KernelOffsets) -> Vec<&'static str> {
    let o = offsets;
    [
        ("tcp_sock.bpf_sock_ops_cb_flags", o.tcp_cb_flags),
        ("task_struct.pid+tgid", o.task_pid),
        ("task_struct.cred", o.task_cred),
        ("cred.uid+gid", o.cred_uid),
        ("task_struct.comm", o.task_comm),
        ("task_struct.cgroups", o.task_cgroups),
        ("css_set.dfl_cgrp", o.css_set_dfl_cgrp),
        ("cgroup.kn", o.cgroup_kn),
        ("kernfs_node.id", o.kernfs_node_id),
    ]
    .into_iter()
    .filter(|(_, v)| *v == KernelOffsets::UNKNOWN)
    .map(|(n, _)| n)
    .collect()
}

/// Names of the offsets that this kernel's BTF did not provide.
pub fn missing(offsets: &KernelOffsets) -> Vec<&'static str> {
    let o = offsets;
    [
        ("sock.skc_num", o.sock_num),
        ("sock.sk_socket", o.sock_socket),
        ("sock.skc_net", o.sock_net),
        ("sock_common.skc_ipv6only", o.sock_ipv6only_byte),
        ("socket_alloc.vfs_inode", o.socket_to_inode),
        ("inode.i_ino", o.inode_ino),
        ("net.ns.inum", o.net_inum),
        ("task_struct.real_parent", o.task_real_parent),
        ("task_struct.tgid", o.task_tgid),
        ("task_struct.group_leader", o.task_group_leader),
        ("task_struct.start_boottime", o.task_start_boottime),
        ("task_struct.flags", o.task_flags),
        ("sock_common.skc_rcv_saddr", o.sock_rcv_saddr),
        ("sock_common.skc_v6_rcv_saddr", o.sock_v6_rcv_saddr),
    ]
    .into_iter()
    .filter(|(_, v)| *v == KernelOffsets::UNKNOWN)
    .map(|(n, _)| n)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; union { struct { short x; short y; }; }; }`
    /// with a bitfield struct, to check anonymous-member search and bitfield positions.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0y\0x\0bits\0f\0g\0".to_vec();
        let s = |name: &str| -> u32 {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: anonymous struct { short x @0; short y @16 }  (types use int for brevity)
        push(0);
        push((KIND_STRUCT << 24) | 2);
        push(4);
        push(s("x"));
        push(1);
        push(0);
        push(s("y"));
        push(1);
        push(16);
        // 3: anonymous union { struct 2 }
        push(0);
        push((KIND_UNION << 24) | 1);
        push(4);
        push(0);
        push(2);
        push(0);
        // 4: struct outer { int a @0; union 3 @32 }
        push(s("outer"));
        push((KIND_STRUCT << 24) | 2);
        push(8);
        push(s("a"));
        push(1);
        push(0);
        push(0);
        push(3);
        push(32);
        // 5: struct bits { f:4 @0, g:1 @13 } with kind_flag
        push(s("bits"));
        push((1 << 31) | (KIND_STRUCT << 24) | 2);
        push(4);
        push(s("f"));
        push(1);
        push(4 << 24);
        push(s("g"));
        push(1);
        push((1 << 24) | 13);

        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_bitfields() {
        let b = blob();
        let btf = Btf::parse(&b).unwrap();
        assert_eq!(
            btf.field("outer", &["a"]),
            Some(FieldPos { byte: 0, bit: 0 })
        );
        assert_eq!(
            btf.field("outer", &["y"]),
            Some(FieldPos { byte: 6, bit: 0 })
        );
        assert_eq!(
            btf.field("bits", &["g"]),
            Some(FieldPos { byte: 1, bit: 5 })
        );
        assert_eq!(btf.field("outer", &["nope"]), None);
        assert_eq!(btf.field("nope", &["a"]), None);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(Btf::parse(b"hello"), Err(BtfError::BadMagic)));
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn running_kernel_has_every_offset() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: /sys/kernel/btf/vmlinux is not readable on this machine");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let offsets = btf.kernel_offsets();
        assert_eq!(missing(&offsets), Vec::<&str>::new());
        assert_eq!(missing_direct(&offsets), Vec::<&str>::new());
        // skc_num sits right after skc_dport in the port pair: a fixed fact since 2.6.
        assert_eq!(offsets.sock_num, 14);
        // The direct set's fentry targets.
        for f in ["inet_listen", "inet_bind", "inet6_bind", "inet_release"] {
            assert!(btf.func_id(f).is_some(), "no BTF FUNC {f}");
        }
    }
}
