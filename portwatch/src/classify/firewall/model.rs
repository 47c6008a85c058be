//! The ruleset as the evaluator sees it: base chains by hook and priority, rules as a
//! list of conditions and one action. Both readers ([`super::nft`] for the JSON of
//! `nft -j list ruleset`, [`super::ipt`] for `iptables-save` text) build this, so the
//! evaluator has one input whatever installed the rules.

use std::fmt;
use std::net::IpAddr;

/// Which packets a table sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 only (`ip`, and iptables).
    Ip,
    /// IPv6 only (`ip6`, and ip6tables).
    Ip6,
    /// Both (`inet`).
    Inet,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }

    /// Whether a packet of this IP version passes through tables of this family.
    pub fn sees(self, v6: bool) -> bool {
        match self {
            Family::Ip => !v6,
            Family::Ip6 => v6,
            Family::Inet => true,
        }
    }
}

/// Netfilter hooks a base chain can attach to (only those on the path of a packet
/// delivered to a local socket are evaluated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    /// ingress/egress and anything newer: not on the modelled path.
    Other,
}

impl Hook {
    pub fn parse(s: &str) -> Hook {
        match s {
            "prerouting" | "PREROUTING" => Hook::Prerouting,
            "input" | "INPUT" => Hook::Input,
            "forward" | "FORWARD" => Hook::Forward,
            "output" | "OUTPUT" => Hook::Output,
            "postrouting" | "POSTROUTING" => Hook::Postrouting,
            _ => Hook::Other,
        }
    }
}

/// Where a chain came from, for the rule reference in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// nf_tables (nft, firewalld, iptables-nft).
    Nftables,
    /// The legacy x_tables of `iptables-legacy`.
    IptablesLegacy,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Nftables => "nftables",
            Origin::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// What a base chain is hooked on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub hook: Hook,
    /// Lower runs first; chains of every table on one hook run in this order.
    pub prio: i32,
    /// `policy drop`: a packet reaching the end of the chain is dropped.
    pub policy_drop: bool,
    /// `filter`, `nat`, `route`.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub family: Family,
    pub table: String,
    pub name: String,
    pub origin: Origin,
    pub base: Option<Base>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// nft rule handle (none for iptables-legacy rules).
    pub handle: Option<u64>,
    /// The rule as a person reads it: nft syntax, or the `iptables-save` line.
    pub text: String,
    /// All must hold for the action to run.
    pub conds: Vec<Cond>,
    /// Marks it sets (before its action) when they hold.
    pub marks: Vec<MarkSet>,
    pub action: Action,
}

/// What a matching rule does with the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No verdict (a counter, a log): go on with the next rule.
    Continue,
    Accept,
    Drop,
    Reject,
    /// Index into [`Ruleset::chains`] (same table).
    Jump(usize),
    Goto(usize),
    Return,
    /// Destination NAT (`dnat to`, `-j DNAT`) or `redirect`: the packet goes on to
    /// another address or port. On the path of a packet to a local socket of the
    /// address it was sent to, the verdict is unknown past it; [`super::nat`] follows it.
    Nat(Nat),
    /// A destination NAT whose address or port is looked up in a map keyed by the
    /// packet's destination port or address (`dnat to tcp dport map { 80 : 10.0.0.2 }`,
    /// a named `@map`): the entry that holds the key is the NAT; a key in no entry does
    /// not match the rule (nf_tables' lookup "breaks"), so the next rule runs.
    NatMap(NatMap),
    /// A statement the evaluator does not model and that may change the packet's
    /// fate (`queue`, a verdict map, a NAT to a range): the verdict is unknown past it.
    Unknown(String),
}

/// Where a destination NAT sends the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nat {
    /// `redirect` (to the primary address of the interface it came in on) rather than
    /// `dnat`.
    pub redirect: bool,
    /// New destination address (none: unchanged for `dnat to :port`, the interface's
    /// for `redirect`).
    pub addr: Option<IpAddr>,
    /// New destination port (none: unchanged).
    pub port: Option<u16>,
}

/// What a NAT map is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapKey {
    /// `tcp dport`, `udp dport` (the protocol, which nft adds as a hidden dependency),
    /// or `th dport` (none: any protocol with ports).
    Dport(Option<u8>),
    /// `ip daddr` / `ip6 daddr`.
    Daddr,
}

/// One key (or key range) of a NAT map, and where it sends the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Ports for a [`MapKey::Dport`] map (a single port is `lo == hi`).
    pub ports: (u16, u16),
    /// Addresses for a [`MapKey::Daddr`] map.
    pub addrs: Option<AddrRange>,
    pub nat: Nat,
}

/// `dnat`/`redirect` through a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatMap {
    pub key: MapKey,
    pub entries: Vec<MapEntry>,
}

impl NatMap {
    /// The NAT for a packet (protocol, destination address and port); `None` when no
    /// entry holds its key.
    pub fn lookup(&self, l4proto: u8, daddr: IpAddr, dport: u16) -> Option<Nat> {
        match self.key {
            MapKey::Dport(proto) => {
                if proto.is_some_and(|p| p != l4proto) || !matches!(l4proto, 6 | 17 | 132 | 136) {
                    return None;
                }
                self.entries
                    .iter()
                    .find(|e| e.ports.0 <= dport && dport <= e.ports.1)
                    .map(|e| e.nat)
            }
            MapKey::Daddr => self
                .entries
                .iter()
                .find(|e| e.addrs.is_some_and(|r| r.contains(daddr)))
                .map(|e| e.nat),
        }
    }
}

/// A mark a rule sets (`meta mark set`, `ct mark set`, `-j MARK`): the forward path
/// tests them (kube-proxy's 0x4000, netavark's 0x1000 ct mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkSet {
    /// The conntrack mark rather than the packet's.
    pub ct: bool,
    pub op: MarkOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOp {
    /// mark = value.
    Set(u32),
    /// mark = mark | value (`--or-mark`).
    Or(u32),
    /// mark = mark ^ value (`--xor-mark`).
    Xor(u32),
    /// mark = (mark & !mask) ^ value (`--set-xmark value/mask`).
    Xmark(u32, u32),
    /// mark = packet mark | value (`ct mark set meta mark | value`).
    FromMetaOr(u32),
    /// Anything else: the mark is no longer known.
    Unknown,
}

/// The packet's and its connection's marks, when known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub meta: u32,
    pub ct: u32,
}

impl Marks {
    /// The marks after `m`; `None` when it makes them unknown.
    pub fn apply(self, m: &MarkSet) -> Option<Marks> {
        let cur = if m.ct { self.ct } else { self.meta };
        let new = match m.op {
            MarkOp::Set(v) => v,
            MarkOp::Or(v) => cur | v,
            MarkOp::Xor(v) => cur ^ v,
            MarkOp::Xmark(v, mask) => (cur & !mask) ^ v,
            MarkOp::FromMetaOr(v) => self.meta | v,
            MarkOp::Unknown => return None,
        };
        Some(if m.ct {
            Marks { ct: new, ..self }
        } else {
            Marks { meta: new, ..self }
        })
    }
}

/// One condition of a rule, possibly negated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub neg: bool,
    pub test: Test,
}

/// Inclusive range of addresses of one family, as 128-bit integers (IPv4 in the low
/// 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    pub v6: bool,
    pub lo: u128,
    pub hi: u128,
}

impl AddrRange {
    pub fn prefix(addr: IpAddr, len: u8) -> Option<AddrRange> {
        let (v6, bits, width) = match addr {
            IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32u32),
            IpAddr::V6(a) => (true, u128::from(a), 128u32),
        };
        let len = u32::from(len);
        if len > width {
            return None;
        }
        let host = width - len;
        let mask: u128 = if host == 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        Some(AddrRange {
            v6,
            lo: bits & !mask,
            hi: bits | mask,
        })
    }

    pub fn single(addr: IpAddr) -> AddrRange {
        match addr {
            IpAddr::V4(a) => AddrRange::prefix(addr, 32).unwrap_or(AddrRange {
                v6: false,
                lo: u128::from(u32::from(a)),
                hi: u128::from(u32::from(a)),
            }),
            IpAddr::V6(a) => AddrRange {
                v6: true,
                lo: u128::from(a),
                hi: u128::from(a),
            },
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let (v6, x) = match addr.to_canonical() {
            IpAddr::V4(a) => (false, u128::from(u32::from(a))),
            IpAddr::V6(a) => (true, u128::from(a)),
        };
        v6 == self.v6 && self.lo <= x && x <= self.hi
    }
}

/// `fib daddr type` results the evaluator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    Local,
    Unicast,
    Broadcast,
    Multicast,
    /// Anything else nft names (`unreachable`, `blackhole`...): never the type of a
    /// destination that a local socket receives on.
    Other,
}

impl AddrType {
    pub fn parse(s: &str) -> AddrType {
        match s.to_ascii_lowercase().as_str() {
            "local" => AddrType::Local,
            "unicast" => AddrType::Unicast,
            "broadcast" => AddrType::Broadcast,
            "multicast" => AddrType::Multicast,
            _ => AddrType::Other,
        }
    }
}

/// conntrack state bits as nft names them (`ct state`).
pub mod ct {
    pub const INVALID: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    pub const RELATED: u32 = 4;
    pub const NEW: u32 = 8;
    pub const UNTRACKED: u32 = 64;

    pub fn state(name: &str) -> Option<u32> {
        Some(match name.to_ascii_lowercase().as_str() {
            "invalid" => INVALID,
            "established" => ESTABLISHED,
            "related" => RELATED,
            "new" => NEW,
            "untracked" => UNTRACKED,
            _ => return None,
        })
    }
}

/// A test on the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// Input interface name; a pattern ending in `*` matches a prefix.
    IifName(Vec<String>),
    /// Output interface name: a packet to a local socket has none.
    OifName(Vec<String>),
    /// Layer-4 protocol number in the set (`meta l4proto`, `ip protocol`, `-p`).
    L4Proto(Vec<u8>),
    /// IPv6 (`true`) or IPv4 (`meta nfproto`, implied by `ip`/`ip6` payload tests).
    NfProto(bool),
    /// Source address in the set; the family of the ranges says which packets can match.
    Saddr(Vec<AddrRange>),
    Daddr(Vec<AddrRange>),
    /// Destination port in the ranges; `proto` set when the test names TCP or UDP
    /// (`tcp dport`), none for `th dport` (any protocol with ports).
    Dport(Option<u8>, Vec<(u16, u16)>),
    Sport(Option<u8>, Vec<(u16, u16)>),
    /// conntrack state bits: matches when the packet's state is one of them.
    CtState(u32),
    /// `ct status dnat` (or `--ctstate DNAT`): the connection was destination-NATed.
    CtStatusDnat,
    /// `fib daddr type` in the set.
    FibDaddrType(Vec<AddrType>),
    /// `meta pkttype host` and friends: a packet to a local unicast address is `host`.
    PktTypeHost(bool),
    /// A TCP SYN (`--syn`, `tcp flags & (syn|ack|fin|rst) == syn`).
    TcpSyn,
    /// `meta mark & mask == value` (`-m mark --mark value/mask`), or the ct mark.
    /// Known only on paths that track marks (the NAT walk and the forward path after
    /// it); elsewhere it is unmodelled.
    Mark {
        ct: bool,
        mask: u32,
        value: u32,
    },
    /// `-m addrtype --src-type LOCAL`: the source is an address of this namespace
    /// (never, for a packet from another host).
    SaddrLocal,
    /// Something the evaluator does not model (text for the reason): it may or may not
    /// match, so both outcomes are explored.
    Unmodelled(String),
}

/// The whole ruleset of one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: Vec<Chain>,
    /// What was read: "nftables", "nftables+iptables-legacy", ...
    pub sources: Vec<&'static str>,
    /// Parts that could not be read (a tool missing, a parse failure): every verdict is
    /// `unknown` while this is not empty, since rules may exist that were not seen.
    pub unread: Vec<String>,
    /// The namespace's forwarding switches (`net.ipv4.ip_forward`,
    /// `net.ipv6.conf.all.forwarding`), read with the ruleset: a published port whose
    /// target is forwarded to goes nowhere while they are off. `None`: not read.
    pub forward_v4: Option<bool>,
    pub forward_v6: Option<bool>,
    /// Interfaces with `net.ipv4.conf.<if>.route_localnet = 1` (`all` among them when
    /// it is set for all): a locally generated packet from 127.0.0.0/8 that a NAT on
    /// output sends to another host is routed out of such an interface only. `None`:
    /// not read.
    pub route_localnet: Option<Vec<String>>,
}

impl Ruleset {
    /// Chains hooked on `hook` that packets of this IP version traverse, in
    /// priority order (ties in reading order).
    pub fn base_chains(&self, hook: Hook, v6: bool) -> Vec<usize> {
        let mut v: Vec<(i32, usize)> = self
            .chains
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let b = c.base.as_ref()?;
                (b.hook == hook && c.family.sees(v6)).then_some((b.prio, i))
            })
            .collect();
        v.sort_by_key(|&(p, i)| (p, i));
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Whether any rule or policy could filter anything (cheap "no firewall" check).
    pub fn is_empty(&self) -> bool {
        self.chains.iter().all(|c| c.base.is_none())
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Protocol number for a name nft or iptables prints (or a number).
pub fn l4proto(name: &str) -> Option<u8> {
    if let Ok(n) = name.parse::<u8>() {
        return Some(n);
    }
    Some(match name.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        "udplite" => 136,
        _ => return None,
    })
}

/// Whether an interface name matches an nft/iptables pattern (`veth*`, `eth+`).
pub fn ifname_matches(pattern: &str, name: &str) -> bool {
    match pattern
        .strip_suffix('*')
        .or_else(|| pattern.strip_suffix('+'))
    {
        Some(prefix) if !pattern.ends_with("\\*") => name.starts_with(prefix),
        _ => pattern.replace("\\*", "*") == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_patterns() {
        let r = AddrRange::prefix("10.0.0.0".parse().unwrap(), 8).unwrap();
        assert!(r.contains("10.255.1.2".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        assert!(
            !r.contains("::a00:1".parse().unwrap()),
            "v6 never in a v4 range"
        );
        assert!(
            r.contains("::ffff:10.0.0.1".parse().unwrap()),
            "mapped is v4"
        );
        let all = AddrRange::prefix("::".parse().unwrap(), 0).unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!(AddrRange::prefix("10.0.0.0".parse().unwrap(), 33).is_none());
        assert!(ifname_matches("veth*", "veth0"));
        assert!(ifname_matches("eth+", "eth1"));
        assert!(!ifname_matches("eth0", "eth01"));
        assert!(ifname_matches("lo", "lo"));
    }
}
