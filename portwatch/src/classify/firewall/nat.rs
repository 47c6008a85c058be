//! Ports published by destination NAT: which host ports a namespace's prerouting NAT
//! chains send to another address (a container's, a pod's) or port, and what the
//! forward path (or, for `redirect`, the input path) does with that connection.
//!
//! Container runtimes publish this way (docker's `DOCKER` nat chain, podman netavark's
//! `NETAVARK-HOSTPORT-DNAT`, kube-proxy's `KUBE-NODEPORTS`). The traffic never meets the
//! input chain that host firewalls (ufw, firewalld) fill, and often no socket listens
//! on the host port at all (docker with `userland-proxy: false`, kube-proxy), so the
//! listener behind it is as exposed as the host port, whatever its own address says.
//!
//! Pure: the ruleset, the namespace's addresses and its forwarding switches in, the
//! publications out. The host ports tried are those the NAT tables test (`dport`
//! values): a rule that publishes every port of an address without naming one is not
//! found. Each candidate is walked like a real first packet from a public source (or a
//! neighbour, for private addresses) by [`super::eval::nat_walk`].

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use serde::Serialize;

use super::eval::{self, NatHit, Oif, Packet, Path, Verdict};
use super::model::{Action, AddrRange, AddrType, Family, Hook, MapKey, Ruleset, Test};
use super::{IfAddr, PUBLIC_SOURCE_V4, PUBLIC_SOURCE_V6, RuleOut, SOURCE_PORT, State, neighbour};
use crate::classify::{Scope, Transport, scope_of};

/// Most (protocol, port) candidates tried per namespace: a kube-proxy node with
/// thousands of NodePorts is cut here, and says so.
pub const MAX_CANDIDATES: usize = 4096;
/// A dport range up to this wide is tried port by port; a wider one at its ends only.
const RANGE_ENUMERATED: u32 = 32;

/// An address and port (`host`, `target` of a publication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

/// A host port that a NAT rule sends on to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Publication {
    /// `accepted`, `filtered` or `unknown`: what the forward path (or input path,
    /// for a redirect) does with a new connection to the host port.
    pub verdict: State,
    /// `public`, or `private` when only a private host address publishes it, or
    /// `local` for a publication only processes of the publishing namespace reach
    /// (its output NAT chain: connections they make to one of its own addresses).
    pub source: &'static str,
    pub transport: Transport,
    /// The host address and port the connection was sent to.
    pub host: Endpoint,
    /// The interface it came in on.
    pub interface: String,
    /// Where the NAT sends it.
    pub target: Endpoint,
    /// The target is an address of the publishing namespace itself (`redirect`).
    pub local: bool,
    /// The packet tried.
    pub probe: String,
    /// The NAT rule.
    pub rule: RuleOut,
    /// The rule (or chain policy, or forwarding switch) that drops or rejects it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_rule: Option<RuleOut>,
    /// Why the verdict is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The NAT happens only on some outcomes of a condition the evaluator does not
    /// model (kube-proxy picks an endpoint with `statistic`): named here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditional: Option<String>,
    /// The publishing network namespace (its inode number), set by the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// The target's network namespace, when the agent knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_netns: Option<u64>,
    /// What was read: `nftables`, `iptables-legacy`.
    pub ruleset: String,
    /// The verdict for the same host port and target from processes of the publishing
    /// namespace (its output NAT chain), when they reach it too: carried by the
    /// network publication, which stands for both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_verdict: Option<State>,
    /// The probe's source (what the target namespace sees: DNAT keeps it).
    #[serde(skip)]
    pub saddr: IpAddr,
}

/// A publication's identity across re-reads: publishing namespace, transport, host
/// endpoint, target.
pub type PubKey = (Option<u64>, Transport, Endpoint, Endpoint);

impl Publication {
    /// Identity across re-reads and namespaces.
    pub fn full_key(&self) -> PubKey {
        (self.netns, self.transport, self.host, self.target)
    }

    /// The key that identifies one publication across re-reads.
    pub fn key(&self) -> (Transport, Endpoint, Endpoint) {
        (self.transport, self.host, self.target)
    }

    /// Whether a listener on `bound`:`port` (`transport`) in a namespace with
    /// addresses `addrs` is the one behind this publication.
    pub fn reaches(
        &self,
        transport: Transport,
        bound: IpAddr,
        port: u16,
        addrs: &[IpAddr],
    ) -> bool {
        if transport != self.transport || port != self.target.port {
            return false;
        }
        let target = self.target.ip.to_canonical();
        if !addrs.iter().any(|a| a.to_canonical() == target) {
            return false;
        }
        let bound = bound.to_canonical();
        bound == target || (bound.is_unspecified() && (bound.is_ipv6() || target.is_ipv4()))
    }

    /// Rank for "most exposed first": reachable at all, then from the public side,
    /// then from a private one (local processes last), then accepted over unknown.
    pub fn rank(&self) -> u8 {
        let reachable = u8::from(self.verdict != State::Filtered);
        let reach = match self.source {
            "public" => 2,
            "private" => 1,
            _ => 0,
        };
        let sure = u8::from(self.verdict == State::Accepted);
        reachable * 8 + reach * 2 + sure
    }

    /// Only processes of the publishing namespace reach it (its output NAT chain).
    pub fn is_local_source(&self) -> bool {
        self.source == "local"
    }
}

/// The publications of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub list: Vec<Publication>,
    /// What may hide more: an unmodelled NAT statement met, candidates cut.
    pub incomplete: Vec<String>,
}

/// A port test's protocol (none: any with ports) and port ranges.
type PortTest = (Option<u8>, Vec<(u16, u16)>);

/// The ports (by protocol) the NAT chains of `rs` test: the candidates to walk.
fn candidates(rs: &Ruleset) -> (Vec<(u8, u16)>, bool) {
    // Tables with a NAT base chain on prerouting or output.
    let nat_tables: HashSet<(Family, &str)> = rs
        .chains
        .iter()
        .filter(|c| {
            c.base.as_ref().is_some_and(|b| {
                b.kind == "nat" && matches!(b.hook, Hook::Prerouting | Hook::Output)
            })
        })
        .map(|c| (c.family, c.table.as_str()))
        .collect();
    let mut set: BTreeSet<(u8, u16)> = BTreeSet::new();
    let mut cut = false;
    let mut add = |proto: Option<u8>, port: u16, set: &mut BTreeSet<(u8, u16)>| {
        for p in [6u8, 17] {
            if proto.is_none_or(|x| x == p) {
                if set.len() >= MAX_CANDIDATES {
                    cut = true;
                    return;
                }
                set.insert((p, port));
            }
        }
    };
    for c in &rs.chains {
        if !nat_tables.contains(&(c.family, c.table.as_str())) {
            continue;
        }
        for r in &c.rules {
            // The keys of a NAT map on the destination port are ports it publishes.
            let keys: Vec<PortTest> = match &r.action {
                Action::NatMap(m) => match m.key {
                    MapKey::Dport(proto) => {
                        vec![(proto, m.entries.iter().map(|e| e.ports).collect())]
                    }
                    MapKey::Daddr => Vec::new(),
                },
                _ => Vec::new(),
            };
            let tests = r.conds.iter().filter_map(|cond| match &cond.test {
                Test::Dport(proto, ranges) => Some((*proto, ranges.clone())),
                _ => None,
            });
            for (proto, ranges) in tests.chain(keys) {
                for &(lo, hi) in &ranges {
                    if u32::from(hi) - u32::from(lo) <= RANGE_ENUMERATED {
                        for port in lo..=hi {
                            add(proto, port, &mut set);
                        }
                    } else {
                        add(proto, lo, &mut set);
                        add(proto, hi, &mut set);
                    }
                }
            }
        }
    }
    (set.into_iter().collect(), cut)
}

fn fmt_addr(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The interface of the longest connected prefix that holds `addr`.
fn route_out(ifaces: &[IfAddr], addr: IpAddr) -> Option<&str> {
    ifaces
        .iter()
        .filter(|i| {
            AddrRange::prefix(i.addr.to_canonical(), i.prefix).is_some_and(|r| r.contains(addr))
        })
        .max_by_key(|i| i.prefix)
        .map(|i| i.ifname.as_str())
}

fn sysctl_ref(v6: bool) -> RuleOut {
    RuleOut {
        origin: "sysctl",
        family: if v6 { "ip6" } else { "ip" },
        table: String::new(),
        chain: String::new(),
        handle: None,
        text: if v6 {
            "net.ipv6.conf.all.forwarding = 0".to_owned()
        } else {
            "net.ipv4.ip_forward = 0".to_owned()
        },
        action: "drop",
    }
}

/// Every publication of the namespace whose ruleset is `rs` and whose addresses are
/// `ifaces`.
pub fn find(rs: &Ruleset, ifaces: &[IfAddr]) -> Published {
    let mut out = Published::default();
    let (ports, cut) = candidates(rs);
    if cut {
        out.incomplete.push(format!(
            "more than {MAX_CANDIDATES} ports in the NAT tables: the rest were not tried"
        ));
    }
    if ports.is_empty() {
        return out;
    }
    let local: Vec<IpAddr> = ifaces.iter().map(|i| i.addr.to_canonical()).collect();
    for i in ifaces {
        let daddr = i.addr.to_canonical();
        let scope = scope_of(daddr);
        if !matches!(scope, Scope::Public | Scope::Private) {
            continue;
        }
        let saddr = match (scope, daddr) {
            (Scope::Public, IpAddr::V4(_)) => IpAddr::V4(PUBLIC_SOURCE_V4),
            (Scope::Public, IpAddr::V6(_)) => IpAddr::V6(PUBLIC_SOURCE_V6),
            _ => neighbour(daddr, i.prefix),
        };
        for &(l4proto, port) in &ports {
            let p = Packet::inbound(&i.ifname, saddr, daddr, l4proto, SOURCE_PORT, port);
            let walk = eval::nat_walk(rs, &p);
            if let Some(w) = walk.unknown
                && !out.incomplete.contains(&w)
            {
                out.incomplete.push(w);
            }
            for hit in walk.hits {
                let publ = publication(rs, ifaces, &local, i, &p, scope, hit);
                match out.list.iter_mut().find(|x| x.key() == publ.key()) {
                    Some(x) if x.rank() >= publ.rank() => {}
                    Some(x) => *x = publ,
                    None => out.list.push(publ),
                }
            }
        }
    }
    // Same host port to the same target through several host addresses: the most
    // exposed one stands for them (one publication per host port and target).
    let mut best: Vec<Publication> = Vec::new();
    for p in out.list.drain(..) {
        let key = (p.transport, p.host.port, p.target);
        match best
            .iter_mut()
            .find(|b| (b.transport, b.host.port, b.target) == key)
        {
            Some(b) if b.rank() >= p.rank() => {}
            Some(b) => *b = p,
            None => best.push(p),
        }
    }
    // What processes of the namespace reach through its output NAT chains: carried
    // by the network publication of the same host port and target when there is one
    // (it stands for both), else reported on its own.
    for lp in local_publications(rs, ifaces, &local, &ports, &mut out.incomplete) {
        let key = (lp.transport, lp.host.port, lp.target);
        if let Some(b) = best
            .iter_mut()
            .find(|b| !b.is_local_source() && (b.transport, b.host.port, b.target) == key)
        {
            b.local_verdict = Some(match b.local_verdict {
                Some(v) if open_rank(v) >= open_rank(lp.verdict) => v,
                _ => lp.verdict,
            });
            continue;
        }
        match best
            .iter_mut()
            .find(|b| (b.transport, b.host.port, b.target) == key)
        {
            Some(b) if b.rank() >= lp.rank() => {}
            Some(b) => *b = lp,
            None => best.push(lp),
        }
    }
    out.list = best;
    out
}

fn open_rank(s: State) -> u8 {
    match s {
        State::Accepted => 2,
        State::Unknown => 1,
        State::Filtered => 0,
    }
}

/// Publications on the output NAT chains: for each address of the namespace
/// (loopback included) and candidate port, a connection a local process makes, walked
/// through the output NAT chains, then through the chains the translated packet meets.
fn local_publications(
    rs: &Ruleset,
    ifaces: &[IfAddr],
    local: &[IpAddr],
    ports: &[(u8, u16)],
    incomplete: &mut Vec<String>,
) -> Vec<Publication> {
    let has_output_nat = rs.chains.iter().any(|c| {
        c.base
            .as_ref()
            .is_some_and(|b| b.kind == "nat" && b.hook == Hook::Output)
    });
    let mut out = Vec::new();
    if !has_output_nat {
        return out;
    }
    let mut seen: HashSet<IpAddr> = HashSet::new();
    for i in ifaces {
        let daddr = i.addr.to_canonical();
        // A link-local address needs an interface to be reached by; not tried.
        if matches!(scope_of(daddr), Scope::LinkLocal | Scope::Multicast) || !seen.insert(daddr) {
            continue;
        }
        for &(l4proto, port) in ports {
            let p = Packet::local_out(daddr, l4proto, SOURCE_PORT, port);
            let walk = eval::nat_walk_on(rs, &p, Hook::Output);
            if let Some(w) = walk.unknown
                && !incomplete.contains(&w)
            {
                incomplete.push(w);
            }
            for hit in walk.hits {
                let publ = local_publication(rs, ifaces, local, &p, hit);
                match out
                    .iter_mut()
                    .find(|x: &&mut Publication| x.key() == publ.key())
                {
                    Some(x) if x.rank() >= publ.rank() => {}
                    Some(x) => *x = publ,
                    None => out.push(publ),
                }
            }
        }
    }
    out
}

/// Filtered by the kernel rather than a rule: a loopback source leaving `lo`.
fn kernel_ref(text: String, family: &'static str) -> RuleOut {
    RuleOut {
        origin: "kernel",
        family,
        table: String::new(),
        chain: String::new(),
        handle: None,
        text,
        action: "drop",
    }
}

fn local_publication(
    rs: &Ruleset,
    ifaces: &[IfAddr],
    local: &[IpAddr],
    p: &Packet<'_>,
    hit: NatHit,
) -> Publication {
    let v6 = p.daddr.is_ipv6();
    // `redirect` of a locally generated packet goes to the loopback address
    // (nf_nat_redirect_ipv4/6, net/netfilter/nf_nat_redirect.c).
    let target_ip = match hit.nat.addr {
        Some(a) if !hit.nat.redirect => a.to_canonical(),
        _ if v6 => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    };
    let target_port = hit.nat.port.unwrap_or(p.dport);
    let is_local = hit.nat.redirect || target_ip.is_loopback() || local.contains(&target_ip);
    let oif = if is_local {
        Some("lo")
    } else {
        route_out(ifaces, target_ip)
    };
    let after = Packet {
        daddr: target_ip,
        dport: target_port,
        daddr_type: if is_local {
            AddrType::Local
        } else {
            AddrType::Unicast
        },
        oif: oif.map_or(Oif::Unknown, Oif::Known),
        dnat: true,
        marks: hit.marks,
        ..*p
    };
    let mut kernel_drop = None;
    let verdict = if target_ip.is_ipv6() != v6 {
        Verdict::Unknown("NAT between IPv4 and IPv6".to_owned())
    } else if is_local {
        eval::evaluate_path(rs, &after, Path::OutputToLocal)
    } else if p.saddr.is_loopback() && v6 {
        // ip6_rcv_core drops a packet from ::1 that arrives on anything but lo (RFC
        // 4291 2.5.3), so the target never sees it.
        kernel_drop = Some(kernel_ref(
            "source ::1 never leaves lo (RFC 4291 2.5.3)".to_owned(),
            "ip6",
        ));
        Verdict::Accepted
    } else if p.saddr.is_loopback() {
        // The route to another host from 127.0.0.0/8 is refused unless route_localnet
        // is on for the output interface (__mkroute_output, net/ipv4/route.c).
        match (&rs.route_localnet, oif) {
            (None, _) => Verdict::Unknown("route_localnet of the namespace not read".to_owned()),
            (Some(_), None) => Verdict::Unknown("no connected route to the NAT target".to_owned()),
            (Some(on), Some(o)) if on.iter().any(|x| x == "all" || x == o) => {
                eval::evaluate_path(rs, &after, Path::OutputToRemote)
            }
            (Some(_), Some(o)) => {
                kernel_drop = Some(RuleOut {
                    origin: "sysctl",
                    ..kernel_ref(format!("net.ipv4.conf.{o}.route_localnet = 0"), "ip")
                });
                Verdict::Accepted
            }
        }
    } else {
        eval::evaluate_path(rs, &after, Path::OutputToRemote)
    };
    let (state, filter_rule, reason) = match (kernel_drop, verdict) {
        (Some(k), _) => (State::Filtered, Some(k), None),
        (None, Verdict::Accepted) => (State::Accepted, None, None),
        (None, Verdict::Filtered(r)) => (State::Filtered, Some(RuleOut::from(r)), None),
        (None, Verdict::Unknown(w)) => (State::Unknown, None, Some(w)),
    };
    let transport = if p.l4proto == 17 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let probe = format!(
        "{transport} {} -> {} from a local process, {} to {} out {}",
        fmt_addr(p.saddr, p.sport),
        fmt_addr(p.daddr, p.dport),
        hit.rule.action,
        fmt_addr(target_ip, target_port),
        oif.unwrap_or("?"),
    );
    Publication {
        verdict: state,
        source: "local",
        transport,
        host: Endpoint {
            ip: p.daddr,
            port: p.dport,
        },
        interface: "lo".to_owned(),
        target: Endpoint {
            ip: target_ip,
            port: target_port,
        },
        local: is_local,
        probe,
        rule: RuleOut::from(hit.rule),
        filter_rule,
        reason,
        conditional: hit.conditional,
        netns: None,
        target_netns: None,
        ruleset: rs.sources.join("+"),
        local_verdict: None,
        saddr: p.saddr,
    }
}

fn publication(
    rs: &Ruleset,
    ifaces: &[IfAddr],
    local: &[IpAddr],
    i: &IfAddr,
    p: &Packet<'_>,
    scope: Scope,
    hit: NatHit,
) -> Publication {
    // `redirect` goes to the primary address of the interface it came in on: the one
    // it was sent to is as good for finding the socket (a wildcard listener).
    let target_ip = match hit.nat.addr {
        Some(a) if !hit.nat.redirect => a.to_canonical(),
        _ => p.daddr,
    };
    let target_port = hit.nat.port.unwrap_or(p.dport);
    let is_local = hit.nat.redirect || local.contains(&target_ip);
    let v6 = target_ip.is_ipv6();
    let oif = if is_local {
        None
    } else {
        route_out(ifaces, target_ip)
    };
    let after = Packet {
        daddr: target_ip,
        dport: target_port,
        daddr_type: if is_local {
            AddrType::Local
        } else {
            AddrType::Unicast
        },
        oif: match (is_local, oif) {
            (true, _) => Oif::Local,
            (false, Some(o)) => Oif::Known(o),
            (false, None) => Oif::Unknown,
        },
        dnat: true,
        marks: hit.marks,
        ..*p
    };
    let forwarding = if v6 { rs.forward_v6 } else { rs.forward_v4 };
    let verdict = if is_local {
        eval::evaluate_path(rs, &after, Path::LocalAfterNat)
    } else if p.daddr.is_ipv6() != v6 {
        Verdict::Unknown("NAT between IPv4 and IPv6".to_owned())
    } else {
        match forwarding {
            Some(false) => Verdict::Filtered(eval::RuleRef {
                origin: "sysctl",
                family: "",
                table: String::new(),
                chain: String::new(),
                handle: None,
                text: String::new(),
                action: "drop",
            }),
            None => Verdict::Unknown("forwarding switch of the namespace not read".to_owned()),
            Some(true) => eval::evaluate_path(rs, &after, Path::ForwardAfterNat),
        }
    };
    let (state, filter_rule, reason) = match verdict {
        Verdict::Accepted => (State::Accepted, None, None),
        Verdict::Filtered(r) if r.origin == "sysctl" => {
            (State::Filtered, Some(sysctl_ref(v6)), None)
        }
        Verdict::Filtered(r) => (State::Filtered, Some(RuleOut::from(r)), None),
        Verdict::Unknown(w) => (State::Unknown, None, Some(w)),
    };
    let transport = if p.l4proto == 17 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let mut probe = format!(
        "{transport} {} -> {} on {}, {} to {}",
        fmt_addr(p.saddr, p.sport),
        fmt_addr(p.daddr, p.dport),
        i.ifname,
        hit.rule.action,
        fmt_addr(target_ip, target_port)
    );
    match (is_local, oif) {
        (true, _) => probe.push_str(" (local)"),
        (false, Some(o)) => probe.push_str(&format!(" out {o}")),
        (false, None) => probe.push_str(" out ?"),
    }
    Publication {
        verdict: state,
        source: if scope == Scope::Public {
            "public"
        } else {
            "private"
        },
        transport,
        host: Endpoint {
            ip: p.daddr,
            port: p.dport,
        },
        interface: i.ifname.clone(),
        target: Endpoint {
            ip: target_ip,
            port: target_port,
        },
        local: is_local,
        probe,
        rule: RuleOut::from(hit.rule),
        filter_rule,
        reason,
        conditional: hit.conditional,
        netns: None,
        target_netns: None,
        ruleset: rs.sources.join("+"),
        local_verdict: None,
        saddr: p.saddr,
    }
}

/// The target namespace's own firewall on the published connection: the packet
/// arrives there from the original source (DNAT keeps it) on the interface that holds
/// the target address. `None` when that interface is not among `ifaces`.
pub fn target_verdict(rs: &Ruleset, ifaces: &[IfAddr], publ: &Publication) -> Option<Verdict> {
    let t = publ.target.ip.to_canonical();
    let i = ifaces.iter().find(|i| i.addr.to_canonical() == t)?;
    let l4 = if publ.transport == Transport::Udp {
        17
    } else {
        6
    };
    let p = Packet::inbound(&i.ifname, publ.saddr, t, l4, SOURCE_PORT, publ.target.port);
    Some(eval::evaluate(rs, &p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::firewall::{ipt, model::Origin, nft, tests::ifs};

    const HOST: &[(&str, &str, u8)] = &[
        ("lo", "127.0.0.1", 8),
        ("eth0", "203.0.113.5", 24),
        ("docker0", "172.17.0.1", 16),
        ("podman0", "10.88.0.1", 16),
        ("cni0", "10.180.0.1", 16),
    ];

    fn legacy(text: &str) -> Ruleset {
        let mut rs = ipt::parse(text, Family::Ip, Origin::IptablesLegacy);
        rs.sources.push("iptables-legacy");
        rs.forward_v4 = Some(true);
        rs
    }

    fn one(p: &Published, port: u16) -> &Publication {
        let v: Vec<_> = p.list.iter().filter(|x| x.host.port == port).collect();
        assert_eq!(v.len(), 1, "{:#?}", p.list);
        v[0]
    }

    #[test]
    fn docker_dnat_is_published_and_forwarded() {
        let rs = legacy(include_str!("testdata/docker.save"));
        let p = find(&rs, &ifs(HOST));
        assert!(p.incomplete.is_empty(), "{:?}", p.incomplete);
        let d = one(&p, 6379);
        assert_eq!(d.verdict, State::Accepted, "{d:#?}");
        assert_eq!(d.source, "public");
        assert_eq!(d.target.ip.to_string(), "172.17.0.2");
        assert_eq!(d.target.port, 6379);
        assert!(!d.local);
        assert_eq!(
            d.rule.text,
            "-A DOCKER ! -i docker0 -p tcp -m tcp --dport 6379 -j DNAT --to-destination 172.17.0.2:6379"
        );
        assert_eq!((d.rule.table.as_str(), d.rule.action), ("nat", "dnat"));
        assert!(d.probe.ends_with("out docker0"), "{}", d.probe);
        assert!(d.conditional.is_none());
        // Only TCP was published.
        assert!(p.list.iter().all(|x| x.transport == Transport::Tcp));
        // A Listener at 0.0.0.0:6379 in the container's namespace is the one behind it.
        let c: Vec<IpAddr> = vec!["172.17.0.2".parse().unwrap()];
        assert!(d.reaches(Transport::Tcp, "0.0.0.0".parse().unwrap(), 6379, &c));
        assert!(!d.reaches(Transport::Udp, "0.0.0.0".parse().unwrap(), 6379, &c));
        assert!(!d.reaches(Transport::Tcp, "127.0.0.1".parse().unwrap(), 6379, &c));
    }

    #[test]
    fn docker_user_drop_and_forwarding_off_filter_it() {
        let text = include_str!("testdata/docker.save").replace(
            "-A DOCKER-USER -j RETURN",
            "-A DOCKER-USER -i eth0 -p tcp -m tcp --dport 6379 -j DROP\n-A DOCKER-USER -j RETURN",
        );
        let rs = legacy(&text);
        // (Host addresses on eth0 and docker0 only: from podman0, a private network,
        // the port is still reachable, and that would be the publication reported.)
        let p = find(&rs, &ifs(&HOST[..3]));
        let d = one(&p, 6379);
        assert_eq!(d.verdict, State::Filtered, "{d:#?}");
        let r = d.filter_rule.as_ref().unwrap();
        assert_eq!(r.chain, "DOCKER-USER");
        assert_eq!(r.action, "drop");

        let mut rs = legacy(include_str!("testdata/docker.save"));
        rs.forward_v4 = Some(false);
        let d = find(&rs, &ifs(HOST)).list.remove(0);
        assert_eq!(d.verdict, State::Filtered);
        assert_eq!(d.filter_rule.unwrap().text, "net.ipv4.ip_forward = 0");
        rs.forward_v4 = None;
        let d = find(&rs, &ifs(HOST)).list.remove(0);
        assert_eq!(d.verdict, State::Unknown, "never filtered when not known");
    }

    #[test]
    fn docker_on_iptables_nft_needs_the_save_output() {
        let parsed = nft::parse(include_bytes!("testdata/docker-iptables-nft.json")).unwrap();
        let mut rs = parsed.ruleset;
        rs.forward_v4 = Some(true);
        // Without the save output the DNAT target is opaque: nothing certain.
        let p = find(&rs, &ifs(HOST));
        assert!(p.list.is_empty(), "{:#?}", p.list);
        assert!(!p.incomplete.is_empty());
        ipt::fill_xt(
            &mut rs,
            &parsed.xt_rules,
            include_str!("testdata/docker-iptables-nft.save"),
            Family::Ip,
        );
        let p = find(&rs, &ifs(HOST));
        let d = one(&p, 6379);
        assert_eq!(d.verdict, State::Accepted, "{d:#?}");
        assert_eq!(d.target.ip.to_string(), "172.17.0.2");
        assert!(d.rule.handle.is_some());
    }

    #[test]
    fn netavark_ct_mark_is_followed_to_forward() {
        let mut rs = nft::parse(include_bytes!("testdata/netavark.json"))
            .unwrap()
            .ruleset;
        rs.forward_v4 = Some(true);
        let p = find(&rs, &ifs(HOST));
        assert!(p.incomplete.is_empty(), "{:?}", p.incomplete);
        let d = one(&p, 8080);
        assert_eq!(d.verdict, State::Accepted, "{d:#?}");
        assert_eq!(d.target.ip.to_string(), "10.88.0.14");
        assert_eq!(d.target.port, 6379);
        assert_eq!(d.rule.chain, "nv_2f259bab_10_88_0_0_nm16_dnat");
        assert_eq!(
            d.rule.text,
            "tcp dport 8080 ct mark set meta mark | 0x00001000 dnat ip to 10.88.0.14:6379"
        );
        // A drop policy on forward in another table: the ct mark accept in netavark's
        // chain ends only that base chain.
        let mut text =
            String::from_utf8(include_bytes!("testdata/netavark.json").to_vec()).unwrap();
        text = text.replacen(
            "{\"table\": {\"family\": \"inet\", \"name\": \"netavark\"",
            "{\"table\": {\"family\": \"inet\", \"name\": \"f\", \"handle\": 90}}, \
             {\"chain\": {\"family\": \"inet\", \"table\": \"f\", \"name\": \"forward\", \"handle\": 91, \
               \"type\": \"filter\", \"hook\": \"forward\", \"prio\": 10, \"policy\": \"drop\"}}, \
             {\"table\": {\"family\": \"inet\", \"name\": \"netavark\"",
            1,
        );
        let mut rs = nft::parse(text.as_bytes()).unwrap().ruleset;
        rs.forward_v4 = Some(true);
        let d = find(&rs, &ifs(HOST)).list.remove(0);
        assert_eq!(d.verdict, State::Filtered, "{d:#?}");
        assert_eq!(d.filter_rule.unwrap().table, "f");
    }

    #[test]
    fn kube_proxy_nodeports() {
        let rs = legacy(include_str!("testdata/kube-proxy.save"));
        let p = find(&rs, &ifs(HOST));
        // 3003 and 3002: one endpoint each, accepted by KUBE-FORWARD's mark rule
        // (FORWARD policy drop), the mark set by KUBE-MARK-MASQ on the way.
        for port in [3002, 3003] {
            let d = one(&p, port);
            assert_eq!(d.verdict, State::Accepted, "{d:#?}");
            assert_eq!(d.target.ip.to_string(), "10.180.0.3");
            assert_eq!(d.target.port, 80);
            assert!(d.conditional.is_none(), "{d:#?}");
            assert!(d.rule.chain.starts_with("KUBE-SEP-"));
        }
        // 3004: both endpoints, each depending on `statistic`.
        let four: Vec<_> = p.list.iter().filter(|x| x.host.port == 3004).collect();
        let mut targets: Vec<String> = four.iter().map(|x| x.target.ip.to_string()).collect();
        targets.sort();
        assert_eq!(targets, ["10.180.0.4", "10.180.0.5"]);
        assert!(
            four.iter()
                .all(|x| x.conditional.as_deref().unwrap_or("").contains("statistic"))
        );
        // 3001 (Local policy, no local endpoint): not published.
        assert!(p.list.iter().all(|x| x.host.port != 3001), "{:#?}", p.list);
        // Without the mark rule, the FORWARD policy drops it.
        let rs = legacy(&include_str!("testdata/kube-proxy.save").replace(
            "-m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-m mark --mark 0x8000/0x8000 -j ACCEPT",
        ));
        let d = find(&rs, &ifs(HOST))
            .list
            .into_iter()
            .find(|x| x.host.port == 3003)
            .unwrap();
        assert_eq!(d.verdict, State::Filtered, "{d:#?}");
        assert_eq!(d.filter_rule.unwrap().text, "policy drop");
    }

    #[test]
    fn redirect_is_local_and_meets_input() {
        let rs = legacy(
            "*nat\n:PREROUTING ACCEPT [0:0]\n\
             -A PREROUTING -i eth0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080\n\
             COMMIT\n*filter\n:INPUT DROP [0:0]\n\
             -A INPUT -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n",
        );
        let d = find(&rs, &ifs(HOST)).list.remove(0);
        assert!(d.local);
        assert_eq!(d.target.port, 8080);
        assert_eq!(d.rule.action, "redirect");
        // Input sees port 8080 after the redirect: the policy drops it.
        assert_eq!(d.verdict, State::Filtered, "{d:#?}");
        let h: Vec<IpAddr> = HOST.iter().map(|h| h.1.parse().unwrap()).collect();
        assert!(d.reaches(Transport::Tcp, "::".parse().unwrap(), 8080, &h));
    }

    #[test]
    fn nft_dnat_shapes_and_garbage() {
        let json = br#"{"nftables":[
          {"table":{"family":"ip","name":"n","handle":1}},
          {"chain":{"family":"ip","table":"n","name":"pre","handle":2,"type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":3,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[2222,{"range":[9000,9001]}]}}},
            {"dnat":{"addr":"10.0.0.9","port":22}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":4,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},
            {"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"udp","field":"dport"}},"data":{"set":[[53,"10.0.0.53"]]}}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":5,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":7}},
            {"dnat":{"addr":"10.0.0.0/8","port":"x"}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":6,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":8}},
            {"redirect":{"port":8443}}]}}
        ]}"#;
        let mut rs = nft::parse(json).unwrap().ruleset;
        rs.forward_v4 = Some(true);
        let ifaces = ifs(&[("eth0", "203.0.113.5", 24), ("br", "10.0.0.1", 24)]);
        let p = find(&rs, &ifaces);
        let ports: BTreeSet<u16> = p.list.iter().map(|x| x.host.port).collect();
        assert_eq!(ports, BTreeSet::from([8, 53, 2222, 9000, 9001]));
        assert!(
            p.list
                .iter()
                .filter(|x| ![8, 53].contains(&x.host.port))
                .all(|x| x.target.port == 22)
        );
        // The map on `udp dport` is modelled: its key is a candidate, its entry the NAT.
        let dns = one(&p, 53);
        assert_eq!(dns.transport, Transport::Udp);
        assert_eq!(dns.target.ip.to_string(), "10.0.0.53");
        assert_eq!(dns.target.port, 53);
        assert_eq!(
            dns.rule.text,
            "udp dport 53 dnat to udp dport map { 53 : 10.0.0.53 }"
        );
        // The prefix is not modelled: said, never guessed.
        assert!(
            p.incomplete.iter().any(|w| w.contains("10.0.0.0/8")),
            "{:?}",
            p.incomplete
        );
        for doc in [
            &b"{\"nftables\":[{\"chain\":{\"family\":\"ip\",\"table\":\"t\",\"name\":\"c\",\"type\":\"nat\",\"hook\":\"prerouting\"}},{\"rule\":{\"family\":\"ip\",\"table\":\"t\",\"chain\":\"c\",\"expr\":[{\"dnat\":7},{\"redirect\":{\"port\":-1}},{\"mangle\":{\"key\":{\"ct\":{\"key\":\"mark\"}},\"value\":{\"|\":[1]}}}]}}]}"[..],
            b"{\"nftables\":[{\"rule\":{\"family\":\"ip\",\"table\":\"t\",\"chain\":\"c\",\"expr\":[{\"match\":{\"op\":\"==\",\"left\":{\"&\":[{\"ct\":{\"key\":\"mark\"}}]},\"right\":1}}]}}]}",
        ] {
            if let Ok(parsed) = nft::parse(doc) {
                let _ = find(&parsed.ruleset, &ifaces);
            }
        }
        let garbage = ipt::parse(
            "*nat\n:PREROUTING ACCEPT\n-A PREROUTING -p tcp --dport 1 -j DNAT --to-destination\n\
             -A PREROUTING -p tcp --dport 2 -j DNAT --to-destination [::1\n\
             -A PREROUTING -p tcp --dport 3 -j DNAT --to-destination 1.2.3.4:99999\n\
             -A PREROUTING -p tcp --dport 4 -j REDIRECT --to-ports x\n\
             -A PREROUTING -p tcp --dport 5 -j MARK --or-mark 0xzz\n\
             -A PREROUTING -m mark --mark / -j DNAT\nCOMMIT\n",
            Family::Ip,
            Origin::IptablesLegacy,
        );
        let p = find(&garbage, &ifaces);
        assert!(p.list.is_empty(), "{:#?}", p.list);
    }

    /// Host addresses with loopback: what local processes connect to.
    const LOCAL_HOST: &[(&str, &str, u8)] = &[
        ("lo", "127.0.0.1", 8),
        ("lo", "::1", 128),
        ("eth0", "203.0.113.5", 24),
        ("docker0", "172.17.0.1", 16),
    ];

    fn locals(p: &Published) -> Vec<&Publication> {
        p.list.iter().filter(|x| x.is_local_source()).collect()
    }

    #[test]
    fn docker_output_jump_reaches_the_container_from_local_processes() {
        // userland-proxy on: `! -d 127.0.0.0/8`; the network publication stands for
        // both and says local processes reach it too.
        let rs = legacy(include_str!("testdata/docker.save"));
        let p = find(&rs, &ifs(LOCAL_HOST));
        let d = one(&p, 6379);
        assert_eq!(d.source, "public");
        assert_eq!(d.local_verdict, Some(State::Accepted), "{d:#?}");
        assert!(locals(&p).is_empty(), "{:#?}", p.list);

        // Only the OUTPUT jump (no PREROUTING one): a local publication on its own, from
        // the host's own addresses but never from 127.0.0.1.
        let only_output = include_str!("testdata/docker.save")
            .replace("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n", "");
        let rs = legacy(&only_output);
        let p = find(&rs, &ifs(LOCAL_HOST));
        let l = one(&p, 6379);
        assert_eq!(l.source, "local", "{l:#?}");
        assert_eq!(l.verdict, State::Accepted, "{l:#?}");
        assert_eq!(l.target.ip.to_string(), "172.17.0.2");
        assert!(!l.host.ip.is_loopback(), "{l:#?}");
        assert_eq!(l.interface, "lo");
        assert!(l.probe.contains("from a local process"), "{}", l.probe);
        assert!(l.probe.ends_with("out docker0"), "{}", l.probe);
        assert!(l.rule.text.contains("! -i docker0"), "{}", l.rule.text);

        // userland-proxy off: no `! -d 127.0.0.0/8`, so 127.0.0.1 is DNATed too; it
        // leaves lo only with route_localnet (docker sets it on docker0).
        let no_proxy = only_output.replace(
            "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype",
            "-A OUTPUT -m addrtype",
        );
        let rs = legacy(&no_proxy);
        let l = one(&find(&rs, &ifs(LOCAL_HOST)), 6379).clone();
        assert_eq!((l.source, l.verdict), ("local", State::Accepted), "{l:#?}");
        // (Here only 127.0.0.1 is sent to DOCKER, to see its own verdict.)
        let mut rs = legacy(&no_proxy.replace(
            "-A OUTPUT -m addrtype",
            "-A OUTPUT -d 127.0.0.1/32 -m addrtype",
        ));
        let lo_only = ifs(&[("lo", "127.0.0.1", 8), ("docker0", "172.17.0.1", 16)]);
        rs.route_localnet = Some(vec!["docker0".into()]);
        let l = find(&rs, &lo_only).list.remove(0);
        assert_eq!((l.source, l.verdict), ("local", State::Accepted), "{l:#?}");
        assert_eq!(l.host.ip.to_string(), "127.0.0.1");
        rs.route_localnet = Some(Vec::new());
        let l = find(&rs, &lo_only).list.remove(0);
        assert_eq!(l.verdict, State::Filtered, "{l:#?}");
        assert_eq!(
            l.filter_rule.unwrap().text,
            "net.ipv4.conf.docker0.route_localnet = 0"
        );
        rs.route_localnet = None;
        let l = find(&rs, &lo_only).list.remove(0);
        assert_eq!(l.verdict, State::Unknown, "never filtered when not read");
    }

    #[test]
    fn plain_output_dnat_to_another_namespace() {
        let rs = legacy(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -d 203.0.113.5/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.9:80\n\
             COMMIT\n",
        );
        let p = find(&rs, &ifs(LOCAL_HOST));
        let l = one(&p, 8080);
        assert_eq!(l.source, "local");
        assert_eq!(l.verdict, State::Accepted, "{l:#?}");
        assert_eq!(
            (l.target.ip.to_string(), l.target.port),
            ("172.17.0.9".into(), 80)
        );
        assert!(!l.local);
        assert_eq!(l.saddr.to_string(), "203.0.113.5", "the kernel's source");
        // It never becomes a network publication, and no other address publishes it.
        assert_eq!(p.list.len(), 1, "{:#?}", p.list);
        let c: Vec<IpAddr> = vec!["172.17.0.9".parse().unwrap()];
        assert!(l.reaches(Transport::Tcp, "0.0.0.0".parse().unwrap(), 80, &c));
    }

    #[test]
    fn nft_output_hook_dnat_and_an_output_filter_drop() {
        let json = br#"{"nftables":[
          {"table":{"family":"inet","name":"n","handle":1}},
          {"chain":{"family":"inet","table":"n","name":"out","handle":2,"type":"nat","hook":"output","prio":-100,"policy":"accept"}},
          {"rule":{"family":"inet","table":"n","chain":"out","handle":3,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":8080}},
            {"dnat":{"family":"ip","addr":"172.17.0.9","port":80}}]}},
          {"chain":{"family":"inet","table":"n","name":"ofilter","handle":4,"type":"filter","hook":"output","prio":0,"policy":"accept"}},
          {"rule":{"family":"inet","table":"n","chain":"ofilter","handle":5,"expr":[
            {"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"docker0"}},
            {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"172.17.0.9"}},
            {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":80}},
            {"counter":{"packets":0,"bytes":0}},{"drop":null}]}}
        ]}"#;
        let mut rs = nft::parse(json).unwrap().ruleset;
        // (From 127.0.0.1 with route_localnet not read it would be unknown, and the
        // most exposed address stands for all.)
        rs.route_localnet = Some(vec!["all".into()]);
        let p = find(&rs, &ifs(LOCAL_HOST));
        // The output filter sees the new destination, out docker0, and drops it.
        let l = one(&p, 8080);
        assert_eq!(l.source, "local");
        assert_eq!(l.verdict, State::Filtered, "{l:#?}");
        let r = l.filter_rule.as_ref().unwrap();
        assert_eq!(
            (r.chain.as_str(), r.handle, r.action),
            ("ofilter", Some(5), "drop")
        );
        assert_eq!(
            r.text,
            "oifname docker0 ip daddr 172.17.0.9 tcp dport 80 counter drop"
        );
        // Without the drop: accepted.
        let text = std::str::from_utf8(json)
            .unwrap()
            .replace("{\"drop\":null}", "{\"accept\":null}");
        let mut rs = nft::parse(text.as_bytes()).unwrap().ruleset;
        rs.route_localnet = Some(vec!["all".into()]);
        assert_eq!(
            one(&find(&rs, &ifs(LOCAL_HOST)), 8080).verdict,
            State::Accepted
        );
    }

    #[test]
    fn output_redirect_goes_to_loopback_and_meets_input() {
        let rs = legacy(
            "*nat\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080\n\
             COMMIT\n*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A INPUT -i lo -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n",
        );
        let p = find(&rs, &ifs(LOCAL_HOST));
        let l = one(&p, 80);
        assert_eq!(l.source, "local");
        assert!(l.local);
        assert_eq!(l.target.ip.to_string(), "127.0.0.1", "{l:#?}");
        assert_eq!(l.target.port, 8080);
        // Input sees port 8080 from lo: the policy drops it.
        assert_eq!(l.verdict, State::Filtered, "{l:#?}");
        assert_eq!(l.filter_rule.as_ref().unwrap().text, "policy drop");
        // `-i lo` accepting 8080 lets it through: the looped packet comes in on lo.
        let rs = legacy(
            "*nat\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080\n\
             COMMIT\n*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A INPUT -i lo -p tcp -m tcp --dport 8080 -j ACCEPT\nCOMMIT\n",
        );
        let l = find(&rs, &ifs(LOCAL_HOST)).list.remove(0);
        assert_eq!(l.verdict, State::Accepted, "{l:#?}");
        // A listener on 127.0.0.1:8080 (or the wildcard) of this namespace is behind it.
        let h: Vec<IpAddr> = LOCAL_HOST.iter().map(|h| h.1.parse().unwrap()).collect();
        assert!(l.reaches(Transport::Tcp, "127.0.0.1".parse().unwrap(), 8080, &h));
        assert!(l.reaches(Transport::Tcp, "0.0.0.0".parse().unwrap(), 8080, &h));
        assert!(!l.reaches(Transport::Tcp, "203.0.113.5".parse().unwrap(), 8080, &h));
    }

    #[test]
    fn nft_dnat_maps() {
        let json = br#"{"nftables":[
          {"table":{"family":"ip","name":"n","handle":1}},
          {"map":{"family":"ip","name":"pm","table":"n","type":"inet_service","handle":2,"map":"ipv4_addr","elem":[[81,"10.0.0.3"]]}},
          {"map":{"family":"ip","name":"cm","table":"n","type":"inet_service","handle":3,"map":"ipv4_addr . inet_service","elem":[[8081,{"concat":["10.0.0.3",81]}]]}},
          {"chain":{"family":"ip","table":"n","name":"pre","handle":4,"type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":5,"expr":[{"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":{"set":[[80,"10.0.0.2"],[{"range":[443,444]},"10.0.0.4"]]}}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":6,"expr":[{"dnat":{"family":"ip","addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":{"set":[[8080,{"concat":["10.0.0.2",80]}]]}}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":7,"expr":[{"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":"@pm"}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":8,"expr":[{"dnat":{"family":"ip","addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":"@cm"}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":9,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":5353}},
            {"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"ip","field":"daddr"}},"data":{"set":[["203.0.113.5","10.0.0.53"]]}}}}}]}},
          {"rule":{"family":"ip","table":"n","chain":"pre","handle":10,"expr":[{"dnat":{"addr":{"map":{"key":{"concat":[{"payload":{"protocol":"ip","field":"saddr"}},{"payload":{"protocol":"tcp","field":"dport"}}]},"data":{"set":[]}}}}}]}},
          {"chain":{"family":"ip","table":"n","name":"out","handle":11,"type":"nat","hook":"output","prio":-100,"policy":"accept"}},
          {"rule":{"family":"ip","table":"n","chain":"out","handle":12,"expr":[
            {"match":{"op":"==","left":{"meta":{"key":"l4proto"}},"right":"tcp"}},
            {"redirect":{"port":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":{"set":[[25,2525]]}}}}}]}}
        ]}"#;
        let mut rs = nft::parse(json).unwrap().ruleset;
        rs.forward_v4 = Some(true);
        let ifaces = ifs(&[
            ("lo", "127.0.0.1", 8),
            ("eth0", "203.0.113.5", 24),
            ("br", "10.0.0.1", 24),
        ]);
        let p = find(&rs, &ifaces);
        let got: BTreeSet<(u16, String, u16, &str)> = p
            .list
            .iter()
            .map(|x| {
                (
                    x.host.port,
                    x.target.ip.to_string(),
                    x.target.port,
                    x.source,
                )
            })
            .collect();
        let want: BTreeSet<(u16, String, u16, &str)> = [
            (80, "10.0.0.2", 80, "public"),
            (443, "10.0.0.4", 443, "public"),
            (444, "10.0.0.4", 444, "public"),
            (8080, "10.0.0.2", 80, "public"),
            (81, "10.0.0.3", 81, "public"),
            (8081, "10.0.0.3", 81, "public"),
            (5353, "10.0.0.53", 5353, "public"),
            (25, "127.0.0.1", 2525, "local"),
        ]
        .into_iter()
        .map(|(a, b, c, d)| (a, b.to_owned(), c, d))
        .collect();
        assert_eq!(got, want, "{:#?}", p.list);
        // Keyed on `tcp dport`: never UDP.
        assert!(
            p.list
                .iter()
                .filter(|x| x.host.port == 80)
                .all(|x| x.transport == Transport::Tcp)
        );
        assert_eq!(
            one(&p, 8080).rule.text,
            "dnat ip to tcp dport map { 8080 : 10.0.0.2 . 80 }"
        );
        assert_eq!(one(&p, 81).rule.text, "dnat to tcp dport map @pm");
        // The concatenated key is not modelled: said, never guessed.
        assert!(
            p.incomplete.iter().any(|w| w.contains("concat")),
            "{:?}",
            p.incomplete
        );
    }

    #[test]
    fn output_nat_garbage_never_panics() {
        for doc in [
            &br#"{"nftables":[{"chain":{"family":"ip","table":"t","name":"o","type":"nat","hook":"output"}},{"rule":{"family":"ip","table":"t","chain":"o","expr":[{"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":{"set":[[1],[2,3,4],["x","y"],[{"range":[9]},"1.2.3.4"],[70000,"1.2.3.4"]]}}}}}]}}]}"#[..],
            br#"{"nftables":[{"chain":{"family":"ip","table":"t","name":"o","type":"nat","hook":"output"}},{"rule":{"family":"ip","table":"t","chain":"o","expr":[{"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":"@nope"}}}},{"redirect":{"port":{"map":7}}}]}}]}"#,
            br#"{"nftables":[{"map":{"family":"ip","table":"t","name":"m","elem":5}},{"chain":{"family":"ip","table":"t","name":"o","type":"nat","hook":"output"}},{"rule":{"family":"ip","table":"t","chain":"o","expr":[{"redirect":{"addr":"1.2.3.4","port":{"map":{"key":{"payload":{"protocol":"th","field":"dport"}},"data":"@m"}}}}]}},{"rule":{"family":"ip","table":"t","chain":"o","expr":[{"dnat":{"addr":{"map":{"key":{"payload":{"protocol":"ip","field":"daddr"}},"data":{"set":[["::1","1.2.3.4"]]}}}}}]}}]}"#,
        ] {
            if let Ok(parsed) = nft::parse(doc) {
                let p = find(&parsed.ruleset, &ifs(LOCAL_HOST));
                assert!(p.list.is_empty(), "{:#?}", p.list);
            }
        }
        let garbage = ipt::parse(
            "*nat\n:OUTPUT ACCEPT\n-A OUTPUT -p tcp --dport 1 -j DNAT --to-destination\n\
             -A OUTPUT -p tcp --dport 2 -j REDIRECT --to-ports\n\
             -A OUTPUT ! -i -j DOCKER\n-A OUTPUT -m addrtype --src-type -j ACCEPT\nCOMMIT\n",
            Family::Ip,
            Origin::IptablesLegacy,
        );
        let p = find(&garbage, &ifs(LOCAL_HOST));
        assert!(p.list.iter().all(|x| x.host.port == 2), "{:#?}", p.list);
    }
}
