//! The host firewall's verdict on a listener: would a new connection (or datagram)
//! from a public source (or, for a listener reachable only from local networks, from
//! another host of its subnet) reach it?
//!
//! Pure parts: [`model`] (the ruleset), [`nft`] (reads `nft -j list ruleset` JSON),
//! [`ipt`] (reads `iptables-save` text), [`eval`] (the packet walk) and [`probe`] here
//! (which packets to try for a listener). I/O: [`read`] runs the tools inside a network
//! namespace, [`watch`] learns when a ruleset changes.
//!
//! The verdict is for the network namespace the listener is in, computed from the
//! ruleset of that namespace, for packets arriving on its interfaces. Upstream filtering
//! (cloud security groups, a router, the firewall of the host a container's namespace
//! is reached through) is outside what a host can see and is not part of it.

pub mod eval;
pub mod ipt;
pub mod model;
pub mod nat;
pub mod nft;
pub mod read;
pub mod watch;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::classify::{Scope, Stack, Transport, scope_of};
pub use eval::{Packet, RuleRef, Verdict, evaluate};
use model::Ruleset;

/// A public source for the probe packet (TEST-NET-2 / the IPv6 documentation prefix:
/// never a real peer, and treated as public by [`scope_of`]).
pub const PUBLIC_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
pub const PUBLIC_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x77);
/// The probe's source port: an ephemeral one, as a client's would be.
pub const SOURCE_PORT: u16 = 40000;

/// One address of an interface, with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Short state of a verdict, kept in [`crate::classify::Exposure`] (which is `Copy`)
/// for the classifier and the advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Accepted,
    Filtered,
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Filtered => "filtered",
            State::Unknown => "unknown",
        }
    }
}

/// `portwatch.exposure.firewall` on an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Firewall {
    /// `accepted`, `filtered` or `unknown`.
    pub verdict: State,
    /// The source tried: `public`, or `private` for a listener reachable only from
    /// local networks.
    pub source: &'static str,
    /// The packet tried: "tcp 198.51.100.77:40000 -> 203.0.113.5:11211 on eth0".
    pub probe: String,
    /// The rule (or chain policy) that drops or rejects it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleOut>,
    /// Why the verdict is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What was read: `nftables`, `iptables-legacy`.
    pub ruleset: String,
}

/// The rule that filters, as written on events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleOut {
    pub origin: &'static str,
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    pub text: String,
    pub action: &'static str,
}

impl RuleOut {
    /// "inet filter input handle 7: tcp dport 11211 drop".
    pub fn short(&self) -> String {
        match self.handle {
            Some(h) => format!(
                "{} {} {} handle {h}: {}",
                self.family, self.table, self.chain, self.text
            ),
            None => format!(
                "{} {} {}: {}",
                self.family, self.table, self.chain, self.text
            ),
        }
    }
}

impl From<RuleRef> for RuleOut {
    fn from(r: RuleRef) -> Self {
        RuleOut {
            origin: r.origin,
            family: r.family,
            table: r.table,
            chain: r.chain,
            handle: r.handle,
            text: r.text,
            action: r.action,
        }
    }
}

/// Another host on the subnet of `a/prefix` (the first host address that is not `a`).
pub(crate) fn neighbour(a: IpAddr, prefix: u8) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let host = 32u32.saturating_sub(u32::from(prefix));
            let net = if host >= 32 {
                0
            } else {
                bits & !((1u32 << host) - 1)
            };
            let cand = if net | 1 == bits { net | 2 } else { net | 1 };
            IpAddr::V4(Ipv4Addr::from(if host < 2 { bits ^ 1 } else { cand }))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let host = 128u32.saturating_sub(u32::from(prefix));
            let net = if host >= 128 {
                0
            } else {
                bits & !((1u128 << host) - 1)
            };
            let cand = if net | 1 == bits { net | 2 } else { net | 1 };
            IpAddr::V6(Ipv6Addr::from(if host < 2 { bits ^ 1 } else { cand }))
        }
    }
}

/// The verdict for a listener on `bound`:`port` (`stack` for wildcard binds), from
/// the `want` scope (Public or Private), over every interface address of that scope
/// the socket accepts traffic on. `None` when no such address exists (nothing to
/// probe: the exposure is not from that scope).
///
/// Accepted on any interface is accepted; otherwise unknown on any is unknown;
/// filtered only when every path is filtered.
pub fn probe(
    rs: &Ruleset,
    ifaces: &[IfAddr],
    transport: Transport,
    bound: IpAddr,
    stack: Option<Stack>,
    port: u16,
    want: Scope,
) -> Option<Firewall> {
    let bound = bound.to_canonical();
    let wildcard = bound.is_unspecified();
    let accepts = |a: IpAddr| {
        if !wildcard {
            return a == bound;
        }
        matches!(
            (a, stack),
            (
                IpAddr::V4(_),
                Some(Stack::Ipv4Only | Stack::DualStack) | None
            ) | (IpAddr::V6(_), Some(Stack::Ipv6Only | Stack::DualStack))
        )
    };
    let l4proto = match transport {
        Transport::Tcp => 6,
        Transport::Udp => 17,
    };
    let mut best: Option<(u8, Firewall)> = None;
    for i in ifaces {
        let daddr = i.addr.to_canonical();
        if scope_of(daddr) != want || !accepts(daddr) {
            continue;
        }
        let saddr = match (want, daddr) {
            (Scope::Public, IpAddr::V4(_)) => IpAddr::V4(PUBLIC_SOURCE_V4),
            (Scope::Public, IpAddr::V6(_)) => IpAddr::V6(PUBLIC_SOURCE_V6),
            _ => neighbour(daddr, i.prefix),
        };
        let p = Packet::inbound(&i.ifname, saddr, daddr, l4proto, SOURCE_PORT, port);
        let v = evaluate(rs, &p);
        // Rank: accepted beats unknown beats filtered (the most exposed path wins).
        let rank = match v {
            Verdict::Accepted => 3,
            Verdict::Unknown(_) => 2,
            Verdict::Filtered(_) => 1,
        };
        if best.as_ref().is_some_and(|(r, _)| *r >= rank) {
            continue;
        }
        let fmt_addr = |a: IpAddr, port: u16| match a {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        let (verdict, rule, reason) = match v {
            Verdict::Accepted => (State::Accepted, None, None),
            Verdict::Filtered(r) => (State::Filtered, Some(RuleOut::from(r)), None),
            Verdict::Unknown(w) => (State::Unknown, None, Some(w)),
        };
        let fw = Firewall {
            verdict,
            source: if want == Scope::Public {
                "public"
            } else {
                "private"
            },
            probe: format!(
                "{} {} -> {} on {}",
                transport.as_str(),
                fmt_addr(saddr, SOURCE_PORT),
                fmt_addr(daddr, port),
                i.ifname
            ),
            rule,
            reason,
            ruleset: rs.sources.join("+"),
        };
        best = Some((rank, fw));
    }
    best.map(|(_, f)| f)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::classify::firewall::model::Family;

    /// Interfaces from (name, address, prefix) literals.
    pub(crate) fn ifs(list: &[(&str, &str, u8)]) -> Vec<IfAddr> {
        list.iter()
            .map(|(n, a, p)| IfAddr {
                ifname: (*n).into(),
                addr: a.parse().unwrap(),
                prefix: *p,
            })
            .collect()
    }

    const HOST: &[(&str, &str, u8)] = &[
        ("lo", "127.0.0.1", 8),
        ("eth0", "203.0.113.5", 24),
        ("eth1", "10.0.0.5", 24),
        ("eth0", "2001:db8::5", 64),
    ];

    fn nft(fixture: &[u8]) -> Ruleset {
        nft::parse(fixture).expect("fixture parses").ruleset
    }

    fn verdict(rs: &Ruleset, t: Transport, addr: &str, port: u16, want: Scope) -> Firewall {
        let addr: IpAddr = addr.parse().unwrap();
        let stack = if addr.is_ipv4() {
            Stack::Ipv4Only
        } else {
            Stack::DualStack
        };
        probe(rs, &ifs(HOST), t, addr, Some(stack), port, want).expect("something to probe")
    }

    #[test]
    fn no_ruleset_accepts_and_unread_is_unknown() {
        let rs = nft(br#"{"nftables":[{"metainfo":{"json_schema_version":1}}]}"#);
        let f = verdict(&rs, Transport::Tcp, "0.0.0.0", 11211, Scope::Public);
        assert_eq!(f.verdict, State::Accepted);
        assert_eq!(
            f.probe,
            "tcp 198.51.100.77:40000 -> 203.0.113.5:11211 on eth0"
        );
        let mut rs = rs;
        rs.unread.push("nft: not installed".into());
        let f = verdict(&rs, Transport::Tcp, "0.0.0.0", 11211, Scope::Public);
        assert_eq!(f.verdict, State::Unknown);
    }

    #[test]
    fn inet_filter_policy_drop_with_ssh() {
        let rs = nft(include_bytes!("testdata/inet-filter-ssh.json"));
        let ssh = verdict(&rs, Transport::Tcp, "0.0.0.0", 22, Scope::Public);
        assert_eq!(ssh.verdict, State::Accepted, "{ssh:?}");
        let mc = verdict(&rs, Transport::Udp, "::", 11211, Scope::Public);
        assert_eq!(mc.verdict, State::Filtered, "{mc:?}");
        let rule = mc.rule.expect("names the rule");
        assert_eq!(
            (
                rule.family,
                rule.table.as_str(),
                rule.chain.as_str(),
                rule.text.as_str()
            ),
            ("inet", "filter", "input", "policy drop")
        );
        // Private sources are dropped the same way.
        let p = verdict(&rs, Transport::Tcp, "10.0.0.5", 6379, Scope::Private);
        assert_eq!(p.verdict, State::Filtered);
        assert!(
            p.probe
                .starts_with("tcp 10.0.0.1:40000 -> 10.0.0.5:6379 on eth1"),
            "{}",
            p.probe
        );
        // Nothing to probe from a scope the socket is not reachable from.
        assert!(
            probe(
                &rs,
                &ifs(HOST),
                Transport::Tcp,
                "10.0.0.5".parse().unwrap(),
                None,
                1,
                Scope::Public
            )
            .is_none()
        );
    }

    #[test]
    fn firewalld_zone_chains() {
        let rs = nft(include_bytes!("testdata/firewalld.json"));
        // IPv4: the IPv6-only rpfilter test (unmodelled fib) never matters.
        let ssh = verdict(&rs, Transport::Tcp, "0.0.0.0", 22, Scope::Public);
        assert_eq!(ssh.verdict, State::Accepted, "{ssh:?}");
        let mc = verdict(&rs, Transport::Tcp, "0.0.0.0", 11211, Scope::Public);
        assert_eq!(mc.verdict, State::Filtered, "{mc:?}");
        let rule = mc.rule.expect("rule");
        assert_eq!(rule.chain, "filter_INPUT");
        assert_eq!(rule.text, "reject");
        assert_eq!(rule.action, "reject");
        assert!(rule.handle.is_some());
        // IPv6 meets the rpfilter test, which may drop or not: unknown for ssh (accept
        // vs drop), and still filtered for 11211 (dropped either way).
        let fw6 = probe(
            &rs,
            &ifs(HOST),
            Transport::Tcp,
            "::".parse().unwrap(),
            Some(Stack::Ipv6Only),
            22,
            Scope::Public,
        )
        .unwrap();
        assert_eq!(fw6.verdict, State::Unknown, "{fw6:?}");
        assert!(
            fw6.reason.as_deref().unwrap_or("").contains("fib"),
            "{fw6:?}"
        );
        let fw6 = probe(
            &rs,
            &ifs(HOST),
            Transport::Tcp,
            "::".parse().unwrap(),
            Some(Stack::Ipv6Only),
            11211,
            Scope::Public,
        )
        .unwrap();
        assert_eq!(fw6.verdict, State::Filtered, "{fw6:?}");
    }

    #[test]
    fn ufw_on_iptables_nft_needs_the_save_output() {
        let parsed = nft::parse(include_bytes!("testdata/ufw-iptables-nft.json")).unwrap();
        assert!(
            !parsed.xt_rules.is_empty(),
            "iptables-nft shows conntrack as xt"
        );
        // Without the translation the conntrack matches are opaque: unknown.
        let f = verdict(
            &parsed.ruleset,
            Transport::Tcp,
            "0.0.0.0",
            22,
            Scope::Public,
        );
        assert_eq!(f.verdict, State::Unknown, "{f:?}");
        let mut rs = parsed.ruleset;
        ipt::fill_xt(
            &mut rs,
            &parsed.xt_rules,
            include_str!("testdata/ufw-iptables-nft.save"),
            Family::Ip,
        );
        let ssh = verdict(&rs, Transport::Tcp, "0.0.0.0", 22, Scope::Public);
        assert_eq!(ssh.verdict, State::Accepted, "{ssh:?}");
        let web = verdict(&rs, Transport::Tcp, "0.0.0.0", 443, Scope::Public);
        assert_eq!(
            web.verdict,
            State::Accepted,
            "multiport from the save line: {web:?}"
        );
        let mc = verdict(&rs, Transport::Tcp, "0.0.0.0", 11211, Scope::Public);
        assert_eq!(mc.verdict, State::Filtered, "{mc:?}");
        assert_eq!(mc.rule.as_ref().unwrap().text, "policy drop");
        assert_eq!(mc.rule.as_ref().unwrap().chain, "INPUT");
        // 137/udp goes to skip-to-policy: named by its drop rule (plain nft, no xt).
        let nb = verdict(&rs, Transport::Udp, "0.0.0.0", 137, Scope::Public)
            .rule
            .unwrap();
        assert_eq!(
            (nb.chain.as_str(), nb.text.as_str()),
            ("ufw-skip-to-policy-input", "counter drop")
        );
        // A rule with an xt match is named by its iptables-save line.
        let inv = rs
            .chains
            .iter()
            .find(|c| c.name == "ufw-before-input")
            .unwrap();
        assert_eq!(
            inv.rules[1].text,
            "-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
        // The user rule for 10.0.0.0/8 udp 1000-2000: private accepted, public filtered.
        let lan = verdict(&rs, Transport::Udp, "0.0.0.0", 1500, Scope::Private);
        assert_eq!(lan.verdict, State::Accepted, "{lan:?}");
        let wan = verdict(&rs, Transport::Udp, "0.0.0.0", 1500, Scope::Public);
        assert_eq!(wan.verdict, State::Filtered);
    }

    #[test]
    fn iptables_legacy_save() {
        let save = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                    -A INPUT -i lo -j ACCEPT\n\
                    -A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT\n\
                    -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
                    -A INPUT -s 10.0.0.0/8 -p udp -m multiport --dports 161,1000:1100 -j ACCEPT\n\
                    -A INPUT -p tcp -m tcp --dport 6379 -j REJECT --reject-with tcp-reset\n\
                    COMMIT\n";
        let mut rs = ipt::parse(save, Family::Ip, model::Origin::IptablesLegacy);
        rs.sources.push("iptables-legacy");
        assert_eq!(
            verdict(&rs, Transport::Tcp, "0.0.0.0", 22, Scope::Public).verdict,
            State::Accepted
        );
        let redis = verdict(&rs, Transport::Tcp, "0.0.0.0", 6379, Scope::Public);
        let r = redis.rule.unwrap();
        assert_eq!(r.origin, "iptables-legacy");
        assert_eq!(r.action, "reject");
        assert_eq!(
            r.text,
            "-A INPUT -p tcp -m tcp --dport 6379 -j REJECT --reject-with tcp-reset"
        );
        assert_eq!(
            verdict(&rs, Transport::Udp, "0.0.0.0", 161, Scope::Private).verdict,
            State::Accepted
        );
        assert_eq!(
            verdict(&rs, Transport::Udp, "0.0.0.0", 161, Scope::Public).verdict,
            State::Filtered
        );
        // ip6tables has no table here: IPv6 is accepted.
        let v6 = probe(
            &rs,
            &ifs(HOST),
            Transport::Tcp,
            "::".parse().unwrap(),
            Some(Stack::Ipv6Only),
            6379,
            Scope::Public,
        )
        .unwrap();
        assert_eq!(v6.verdict, State::Accepted);
    }

    #[test]
    fn nft_shapes_sets_ranges_and_negation() {
        let json = br#"{"nftables":[
          {"table":{"family":"inet","name":"t","handle":1}},
          {"set":{"family":"inet","name":"lan","table":"t","type":"ipv4_addr","handle":2,"flags":["interval"],
            "elem":[{"prefix":{"addr":"10.0.0.0","len":8}},{"range":["192.168.0.1","192.168.0.9"]}]}},
          {"set":{"family":"inet","name":"ports","table":"t","type":"inet_service","handle":3,
            "elem":[{"elem":{"val":11211,"timeout":60}},{"range":[5900,5910]}]}},
          {"chain":{"family":"inet","table":"t","name":"in","handle":4,"type":"filter","hook":"input","prio":0,"policy":"accept"}},
          {"rule":{"family":"inet","table":"t","chain":"in","handle":5,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@lan"}},{"accept":null}]}},
          {"rule":{"family":"inet","table":"t","chain":"in","handle":6,"expr":[
            {"match":{"op":"!=","left":{"meta":{"key":"iifname"}},"right":{"set":["lo","veth*"]}}},
            {"match":{"op":"==","left":{"payload":{"protocol":"th","field":"dport"}},"right":"@ports"}},
            {"counter":{"packets":0,"bytes":0}},{"drop":null}]}},
          {"rule":{"family":"inet","table":"t","chain":"in","handle":7,"expr":[
            {"match":{"op":"<","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":1024}},
            {"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},
            {"reject":{"type":"tcp reset"}}]}},
          {"rule":{"family":"inet","table":"t","chain":"in","handle":8,"expr":[
            {"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},
            {"dnat":{"addr":"10.0.0.53"}}]}}
        ]}"#;
        let rs = nft(json);
        let f = verdict(&rs, Transport::Udp, "0.0.0.0", 11211, Scope::Public);
        assert_eq!(f.verdict, State::Filtered);
        let r = f.rule.unwrap();
        assert_eq!(r.handle, Some(6));
        assert_eq!(
            r.text,
            r#"iifname != { lo, "veth*" } th dport @ports counter drop"#
        );
        assert_eq!(
            verdict(&rs, Transport::Tcp, "0.0.0.0", 5905, Scope::Public).verdict,
            State::Filtered
        );
        assert_eq!(
            verdict(&rs, Transport::Tcp, "0.0.0.0", 11211, Scope::Private).verdict,
            State::Accepted
        );
        let low = verdict(&rs, Transport::Tcp, "0.0.0.0", 80, Scope::Public);
        assert_eq!(low.rule.unwrap().handle, Some(7));
        let dns = verdict(&rs, Transport::Udp, "0.0.0.0", 53, Scope::Public);
        assert_eq!(dns.verdict, State::Unknown);
        assert_eq!(
            verdict(&rs, Transport::Tcp, "0.0.0.0", 8080, Scope::Public).verdict,
            State::Accepted
        );
    }

    #[test]
    fn garbage_is_an_error_or_unmodelled_never_a_panic() {
        for doc in [
            &b"not json"[..],
            b"{}",
            b"{\"nftables\": 3}",
            b"{\"nftables\":[{\"rule\":{\"family\":\"inet\"}},{\"chain\":7},{\"set\":{\"family\":\"ip\",\"elem\":5}}]}",
            b"{\"nftables\":[{\"chain\":{\"family\":\"ip\",\"table\":\"t\",\"name\":\"c\",\"hook\":\"input\",\"prio\":1e300}},\
               {\"rule\":{\"family\":\"ip\",\"table\":\"t\",\"chain\":\"c\",\"expr\":[{\"match\":{\"left\":{\"payload\":{\"protocol\":\"tcp\",\"field\":\"dport\"}},\"op\":\"<\",\"right\":0}},{\"jump\":{\"target\":\"nowhere\"}}]}}]}",
        ] {
            if let Ok(p) = nft::parse(doc) {
                let _ = verdict(&p.ruleset, Transport::Tcp, "0.0.0.0", 1, Scope::Public);
            }
        }
        let rs = ipt::parse(
            "*filter\n:INPUT DROP\n-A INPUT ! -p\n-A INPUT -j\n-A\n-A INPUT -s 300.1.1.1 -j ACCEPT\n-A INPUT -c 1\nCOMMIT",
            Family::Ip,
            model::Origin::IptablesLegacy,
        );
        let _ = verdict(&rs, Transport::Tcp, "0.0.0.0", 1, Scope::Public);
    }

    #[test]
    fn neighbours() {
        assert_eq!(
            neighbour("10.0.0.5".parse().unwrap(), 24),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            neighbour("10.0.0.1".parse().unwrap(), 24),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            neighbour("10.0.0.1".parse().unwrap(), 32),
            "10.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            neighbour("fd00::5".parse().unwrap(), 64),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
        let _ = neighbour("10.0.0.1".parse().unwrap(), 0);
        let _ = neighbour("::1".parse().unwrap(), 0);
    }
}
