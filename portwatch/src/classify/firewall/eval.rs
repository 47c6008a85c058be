//! The evaluator: what the ruleset does with the first packet of a new inbound
//! connection (a TCP SYN, or a UDP datagram) to a local socket. Pure: a [`Ruleset`]
//! and a [`Packet`] in, a [`Verdict`] out.
//!
//! The packet walks the hooks a locally delivered packet walks (`prerouting`, then
//! `input`). On each hook every base chain of a table whose family sees the packet runs
//! in priority order, as the kernel does: `accept` ends that base chain only, `drop` or
//! `reject` end the packet; a chain that falls off its end applies its policy.
//!
//! A condition the evaluator does not model ([`Test::Unmodelled`]) may match or not: the
//! evaluation is repeated for both outcomes (depth-first, at most [`MAX_PATHS`] runs).
//! When every outcome agrees, that is the verdict; otherwise it is `unknown`, naming the
//! first unmodelled condition. So an unmodelled condition that cannot change the result
//! (a `limit` in front of a log-only chain, an IPv6-only rpfilter test for an IPv4
//! packet) costs nothing, and `unknown` is never turned into `filtered`.

use std::net::IpAddr;

use super::model::{
    Action, AddrType, Chain, Cond, Hook, Marks, Nat, Ruleset, Test, ct, ifname_matches,
};

/// Most evaluation runs for one packet (each unmodelled condition reached doubles them).
pub const MAX_PATHS: usize = 256;
/// Deepest chain nesting followed (the kernel allows 16 jumps deep in nf_tables).
const MAX_DEPTH: usize = 64;

/// The interface a packet leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oif<'a> {
    /// None: it is delivered to a local socket.
    Local,
    /// Forwarded out of this interface.
    Known(&'a str),
    /// Forwarded, through an interface that was not found (no connected route to the
    /// destination): `oifname` tests are unmodelled.
    Unknown,
}

/// The first packet of a new connection, as the firewall sees it on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Interface it arrives on.
    pub iif: &'a str,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    /// 6 (TCP) or 17 (UDP).
    pub l4proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// `fib daddr type` of the destination (local for an address of the namespace).
    pub daddr_type: AddrType,
    pub oif: Oif<'a>,
    /// The connection was destination-NATed (`ct status dnat`).
    pub dnat: bool,
    /// The marks, where the path tracks them (see [`Test::Mark`]).
    pub marks: Option<Marks>,
    /// Sent by a process of this namespace (the output path): its source is a local
    /// address (`-m addrtype --src-type LOCAL` holds) and, on the output hook, it has
    /// no input interface (`iif` is empty, as iptables and nft see it).
    pub local_origin: bool,
}

impl<'a> Packet<'a> {
    /// A packet from `saddr` to a local socket on `daddr`, arriving on `iif`.
    pub fn inbound(
        iif: &'a str,
        saddr: IpAddr,
        daddr: IpAddr,
        l4proto: u8,
        sport: u16,
        dport: u16,
    ) -> Packet<'a> {
        Packet {
            iif,
            saddr,
            daddr,
            l4proto,
            sport,
            dport,
            daddr_type: AddrType::Local,
            oif: Oif::Local,
            dnat: false,
            marks: None,
            local_origin: false,
        }
    }

    /// A packet a process of this namespace sends to `daddr`, an address of the
    /// namespace itself: no input interface; the kernel routes it through `lo` and
    /// picks the destination as the source (`ip route get` says `local ... src` it).
    pub fn local_out(daddr: IpAddr, l4proto: u8, sport: u16, dport: u16) -> Packet<'static> {
        Packet {
            iif: "",
            saddr: daddr,
            daddr,
            l4proto,
            sport,
            dport,
            daddr_type: AddrType::Local,
            oif: Oif::Known("lo"),
            dnat: false,
            marks: None,
            local_origin: true,
        }
    }

    fn v6(&self) -> bool {
        matches!(self.daddr.to_canonical(), IpAddr::V6(_))
    }
}

/// The hooks a packet walks, and which base chains on them count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// To a local socket on the address it was sent to: prerouting, input.
    Local,
    /// To a local socket after a destination NAT on prerouting (`redirect`): the
    /// prerouting chains that are not NAT chains, then input.
    LocalAfterNat,
    /// Forwarded after a destination NAT: the prerouting chains that are not NAT
    /// chains, then forward.
    ForwardAfterNat,
    /// Sent by a local process and destination-NATed on output to another host: the
    /// output chains that are not NAT chains, with the output interface of the new
    /// destination (never forward: the packet was not received).
    OutputToRemote,
    /// Sent by a local process and destination-NATed on output to an address of the
    /// namespace (`redirect`, or a DNAT to a local address): the output chains that are
    /// not NAT chains (output interface `lo`), then, looped back through `lo`, the
    /// prerouting and input chains that are not NAT chains (input interface `lo`; the
    /// connection's NAT is bound already, so the NAT chains do not run again).
    OutputToLocal,
}

/// The rule that stopped the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// `nftables` or `iptables-legacy`.
    pub origin: &'static str,
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    /// nft rule handle; none for the chain policy and for iptables-legacy.
    pub handle: Option<u64>,
    /// The rule text, or `policy drop` when the chain's policy dropped it.
    pub text: String,
    /// `drop` or `reject` (`dnat`, `redirect` for a NAT rule).
    pub action: &'static str,
}

/// What happens to a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It reaches the socket.
    Accepted,
    /// A rule or policy drops or rejects it.
    Filtered(RuleRef),
    /// The evaluator cannot tell (the reason names what it does not model).
    Unknown(String),
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Filtered(_) => "filtered",
            Verdict::Unknown(_) => "unknown",
        }
    }
}

/// A destination NAT rule the packet met on prerouting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatHit {
    pub rule: RuleRef,
    pub nat: Nat,
    /// The marks after the NAT chains (for the forward path), when known.
    pub marks: Option<Marks>,
    /// The first unmodelled condition this NAT depends on (kube-proxy's `statistic`
    /// between endpoints, say): set when not every combination leads here.
    pub conditional: Option<String>,
}

/// Where the NAT chains on prerouting send a packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatWalk {
    /// Each distinct NAT some combination of unmodelled conditions leads to.
    pub hits: Vec<NatHit>,
    /// Some combination ends in something not modelled (a verdict map, a NAT to a
    /// range): the hits may be incomplete.
    pub unknown: Option<String>,
}

/// One run's end.
enum Outcome {
    Accepted,
    Filtered(RuleRef),
    Unknown(String),
    Nat(RuleRef, Nat, Option<Marks>),
}

/// The choices made for unmodelled conditions in one run: a replayed prefix, then new
/// choices (each first taken as "matches").
struct Choices {
    taken: Vec<bool>,
    pos: usize,
    /// Reason of the first unmodelled condition met in any run.
    first_reason: Option<String>,
}

impl Choices {
    fn new() -> Choices {
        Choices {
            taken: Vec::new(),
            pos: 0,
            first_reason: None,
        }
    }

    fn next(&mut self, reason: &str) -> bool {
        if self.first_reason.is_none() {
            self.first_reason = Some(reason.to_owned());
        }
        let c = match self.taken.get(self.pos) {
            Some(&c) => c,
            None => {
                self.taken.push(true);
                true
            }
        };
        self.pos += 1;
        c
    }

    /// Moves to the next unexplored combination; false when all were run.
    fn advance(&mut self) -> bool {
        while let Some(last) = self.taken.pop() {
            if last {
                self.taken.push(false);
                self.pos = 0;
                return true;
            }
        }
        false
    }
}

/// The verdict for one packet to a local socket.
pub fn evaluate(rs: &Ruleset, p: &Packet<'_>) -> Verdict {
    evaluate_path(rs, p, Path::Local)
}

/// The verdict for one packet along `path`.
pub fn evaluate_path(rs: &Ruleset, p: &Packet<'_>, path: Path) -> Verdict {
    if !rs.unread.is_empty() {
        return Verdict::Unknown(format!("ruleset not fully read: {}", rs.unread.join("; ")));
    }
    let mut choices = Choices::new();
    let mut first: Option<Outcome> = None;
    let mut accepted = false;
    let mut filtered = false;
    for _ in 0..MAX_PATHS {
        choices.pos = 0;
        let out = run(rs, p, &mut choices, path);
        match &out {
            Outcome::Unknown(why) => return Verdict::Unknown(why.clone()),
            Outcome::Nat(r, ..) => {
                return Verdict::Unknown(format!(
                    "{} in {} {} {} sends it elsewhere",
                    r.text, r.family, r.table, r.chain
                ));
            }
            Outcome::Accepted => accepted = true,
            Outcome::Filtered(_) => filtered = true,
        }
        if first.is_none() {
            first = Some(out);
        }
        if accepted && filtered {
            let why = choices.first_reason.take().unwrap_or_default();
            return Verdict::Unknown(format!("depends on {why}"));
        }
        if !choices.advance() {
            return match first {
                Some(Outcome::Filtered(r)) => Verdict::Filtered(r),
                Some(Outcome::Accepted) | None => Verdict::Accepted,
                Some(Outcome::Unknown(w)) => Verdict::Unknown(w),
                Some(Outcome::Nat(..)) => Verdict::Unknown("nat".into()),
            };
        }
    }
    Verdict::Unknown(format!(
        "more than {MAX_PATHS} combinations of unmodelled expressions (first: {})",
        choices.first_reason.unwrap_or_default()
    ))
}

/// Where the NAT chains on prerouting send `p` (a packet to an address of this
/// namespace, marks tracked from zero): every destination NAT some combination of
/// unmodelled conditions reaches.
pub fn nat_walk(rs: &Ruleset, p: &Packet<'_>) -> NatWalk {
    nat_walk_on(rs, p, Hook::Prerouting)
}

/// [`nat_walk`] on `hook`: [`Hook::Output`] for a packet a local process sends
/// ([`Packet::local_out`]), whose destination NAT happens there and never on
/// prerouting.
pub fn nat_walk_on(rs: &Ruleset, p: &Packet<'_>, hook: Hook) -> NatWalk {
    let mut out = NatWalk::default();
    if !rs.unread.is_empty() {
        out.unknown = Some(format!("ruleset not fully read: {}", rs.unread.join("; ")));
        return out;
    }
    let p = Packet {
        marks: Some(p.marks.unwrap_or_default()),
        ..*p
    };
    let mut choices = Choices::new();
    let mut runs = 0usize;
    let mut without = false;
    loop {
        choices.pos = 0;
        runs += 1;
        match run_nat(rs, &p, &mut choices, hook) {
            Outcome::Nat(rule, nat, marks) => {
                if !out.hits.iter().any(|h| h.rule == rule && h.nat == nat) {
                    out.hits.push(NatHit {
                        rule,
                        nat,
                        marks,
                        conditional: None,
                    });
                }
            }
            Outcome::Unknown(w) => {
                out.unknown.get_or_insert(w);
            }
            Outcome::Accepted | Outcome::Filtered(_) => without = true,
        }
        if runs >= MAX_PATHS {
            out.unknown.get_or_insert(format!(
                "more than {MAX_PATHS} combinations of unmodelled expressions"
            ));
            break;
        }
        if !choices.advance() {
            break;
        }
    }
    // One NAT on every combination is certain; otherwise each depends on a choice.
    if without || out.hits.len() > 1 || out.unknown.is_some() {
        let why = choices.first_reason.unwrap_or_default();
        for h in &mut out.hits {
            h.conditional = Some(why.clone());
        }
    }
    out
}

fn is_nat(c: &Chain) -> bool {
    c.base.as_ref().is_some_and(|b| b.kind == "nat")
}

/// The NAT chains on `hook`, in priority order, until one translates the packet
/// (later NAT chains do not see a connection that has a NAT binding).
fn run_nat(rs: &Ruleset, p: &Packet<'_>, choices: &mut Choices, hook: Hook) -> Outcome {
    let mut marks = p.marks;
    for ci in rs.base_chains(hook, p.v6()) {
        if !is_nat(&rs.chains[ci]) {
            continue;
        }
        match run_base(rs, ci, p, choices, &mut marks) {
            Step::Accept => {}
            Step::Stop(o) => return o,
        }
    }
    Outcome::Accepted
}

/// One pass through every hook and base chain with the choices given.
fn run(rs: &Ruleset, p: &Packet<'_>, choices: &mut Choices, path: Path) -> Outcome {
    let v6 = p.v6();
    let mut marks = p.marks;
    // Back through `lo`: it arrives there, for no output interface.
    let looped = Packet {
        iif: "lo",
        oif: Oif::Local,
        ..*p
    };
    let stages: &[(Hook, &Packet<'_>)] = match path {
        Path::Local | Path::LocalAfterNat => &[(Hook::Prerouting, p), (Hook::Input, p)],
        Path::ForwardAfterNat => &[(Hook::Prerouting, p), (Hook::Forward, p)],
        Path::OutputToRemote => &[(Hook::Output, p)],
        Path::OutputToLocal => &[
            (Hook::Output, p),
            (Hook::Prerouting, &looped),
            (Hook::Input, &looped),
        ],
    };
    for &(hook, p) in stages {
        for ci in rs.base_chains(hook, v6) {
            // After the NAT was worked out, the NAT chains have had their say.
            if path != Path::Local && is_nat(&rs.chains[ci]) {
                continue;
            }
            match run_base(rs, ci, p, choices, &mut marks) {
                Step::Accept => {}
                Step::Stop(o) => return o,
            }
        }
    }
    Outcome::Accepted
}

enum Step {
    /// The base chain let it through.
    Accept,
    Stop(Outcome),
}

fn policy_ref(c: &Chain) -> RuleRef {
    RuleRef {
        origin: c.origin.as_str(),
        family: c.family.as_str(),
        table: c.table.clone(),
        chain: c.name.clone(),
        handle: None,
        text: "policy drop".to_owned(),
        action: "drop",
    }
}

fn run_base(
    rs: &Ruleset,
    base: usize,
    p: &Packet<'_>,
    choices: &mut Choices,
    marks: &mut Option<Marks>,
) -> Step {
    // (chain, next rule) to come back to after a jump.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let (mut ci, mut ri) = (base, 0usize);
    loop {
        let Some(chain) = rs.chains.get(ci) else {
            return Step::Stop(Outcome::Unknown(format!("chain #{ci} missing")));
        };
        let Some(rule) = chain.rules.get(ri) else {
            // End of a chain: back to the caller, or the base chain's policy.
            match stack.pop() {
                Some((c, r)) => {
                    (ci, ri) = (c, r);
                    continue;
                }
                None => {
                    let base_chain = &rs.chains[base];
                    return match &base_chain.base {
                        Some(b) if b.policy_drop => {
                            Step::Stop(Outcome::Filtered(policy_ref(base_chain)))
                        }
                        _ => Step::Accept,
                    };
                }
            }
        };
        ri += 1;
        // A rule without a verdict (a counter, a log) cannot change the packet's fate:
        // its conditions are not evaluated, so an unmodelled one there costs no paths.
        // Unless it sets a mark on a path that follows marks.
        let sets_marks = marks.is_some() && !rule.marks.is_empty();
        if rule.action == Action::Continue && !sets_marks {
            continue;
        }
        if !rule.conds.iter().all(|c| cond_holds(c, p, *marks, choices)) {
            continue;
        }
        if sets_marks {
            for m in &rule.marks {
                *marks = marks.and_then(|x| x.apply(m));
            }
        }
        let rref = |action: &'static str| RuleRef {
            origin: chain.origin.as_str(),
            family: chain.family.as_str(),
            table: chain.table.clone(),
            chain: chain.name.clone(),
            handle: rule.handle,
            text: rule.text.clone(),
            action,
        };
        match &rule.action {
            Action::Continue => {}
            Action::Accept => return Step::Accept,
            Action::Drop => return Step::Stop(Outcome::Filtered(rref("drop"))),
            Action::Reject => return Step::Stop(Outcome::Filtered(rref("reject"))),
            Action::Nat(n) => {
                let action = if n.redirect { "redirect" } else { "dnat" };
                return Step::Stop(Outcome::Nat(rref(action), *n, *marks));
            }
            Action::NatMap(m) => {
                // A key in no entry: the rule does not match.
                if let Some(n) = m.lookup(p.l4proto, p.daddr, p.dport) {
                    let action = if n.redirect { "redirect" } else { "dnat" };
                    return Step::Stop(Outcome::Nat(rref(action), n, *marks));
                }
            }
            Action::Jump(t) => {
                if stack.len() >= MAX_DEPTH {
                    return Step::Stop(Outcome::Unknown("chains nested too deep".into()));
                }
                stack.push((ci, ri));
                (ci, ri) = (*t, 0);
            }
            Action::Goto(t) => (ci, ri) = (*t, 0),
            Action::Return => match stack.pop() {
                Some((c, r)) => (ci, ri) = (c, r),
                // `return` in a base chain: its policy.
                None => ri = usize::MAX,
            },
            Action::Unknown(what) => {
                return Step::Stop(Outcome::Unknown(format!(
                    "{what} in {} {} {}",
                    chain.family, chain.table, chain.name
                )));
            }
        }
    }
}

fn ports_hold(ranges: &[(u16, u16)], port: u16) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi)
}

fn cond_holds(c: &Cond, p: &Packet<'_>, marks: Option<Marks>, choices: &mut Choices) -> bool {
    let v6 = p.v6();
    // Tests that only apply to one family (an `ip saddr` on an IPv6 packet) do not
    // match at all, negated or not: nft adds an implicit protocol check.
    let positive = match &c.test {
        Test::IifName(names) => names.iter().any(|n| ifname_matches(n, p.iif)),
        Test::OifName(names) => match p.oif {
            Oif::Local => false,
            Oif::Known(o) => names.iter().any(|n| ifname_matches(n, o)),
            Oif::Unknown => return choices.next("oifname (output interface not found)"),
        },
        Test::L4Proto(set) => set.contains(&p.l4proto),
        Test::NfProto(want_v6) => *want_v6 == v6,
        Test::Saddr(ranges) | Test::Daddr(ranges) => {
            let addr = if matches!(c.test, Test::Saddr(_)) {
                p.saddr
            } else {
                p.daddr
            };
            match ranges.first() {
                Some(r) if r.v6 != v6 => return false,
                _ => ranges.iter().any(|r| r.contains(addr)),
            }
        }
        Test::Dport(proto, ranges) | Test::Sport(proto, ranges) => {
            if proto.is_some_and(|x| x != p.l4proto) || !matches!(p.l4proto, 6 | 17 | 132 | 136) {
                return false;
            }
            let port = if matches!(c.test, Test::Dport(..)) {
                p.dport
            } else {
                p.sport
            };
            ports_hold(ranges, port)
        }
        Test::CtState(bits) => bits & ct::NEW != 0,
        Test::CtStatusDnat => p.dnat,
        Test::FibDaddrType(types) => types.contains(&p.daddr_type),
        // A locally generated packet is `host` too (its skb's pkt_type is zero).
        Test::PktTypeHost(host) => {
            *host == (matches!(p.daddr_type, AddrType::Local) || p.local_origin)
        }
        Test::TcpSyn => {
            if p.l4proto != 6 {
                return false;
            }
            true
        }
        Test::Mark { ct, mask, value } => match marks {
            Some(m) => (if *ct { m.ct } else { m.meta }) & mask == *value,
            None => {
                let what = if *ct { "ct mark" } else { "meta mark" };
                return choices.next(&format!("{what} & {mask:#x} == {value:#x}"));
            }
        },
        Test::SaddrLocal => p.local_origin,
        Test::Unmodelled(why) => return choices.next(why),
    };
    positive != c.neg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::firewall::model::{Base, Family, Origin, Rule};

    fn chain(name: &str, base: Option<(Hook, i32, bool)>, rules: Vec<Rule>) -> Chain {
        Chain {
            family: Family::Inet,
            table: "t".into(),
            name: name.into(),
            origin: Origin::Nftables,
            base: base.map(|(hook, prio, policy_drop)| Base {
                hook,
                prio,
                policy_drop,
                kind: "filter".into(),
            }),
            rules,
        }
    }

    fn rule(conds: Vec<Test>, action: Action) -> Rule {
        Rule {
            handle: Some(1),
            text: "r".into(),
            marks: Vec::new(),
            conds: conds
                .into_iter()
                .map(|test| Cond { neg: false, test })
                .collect(),
            action,
        }
    }

    fn packet(dport: u16) -> Packet<'static> {
        Packet::inbound(
            "eth0",
            "198.51.100.1".parse().unwrap(),
            "203.0.113.5".parse().unwrap(),
            6,
            40000,
            dport,
        )
    }

    fn rs(chains: Vec<Chain>) -> Ruleset {
        Ruleset {
            chains,
            ..Ruleset::default()
        }
    }

    #[test]
    fn unmodelled_that_cannot_matter_is_ignored_and_one_that_can_is_unknown() {
        let lim = Test::Unmodelled("limit rate 3/minute".into());
        // limit -> jump to a chain that only logs: both outcomes reach the policy drop.
        let r = rs(vec![
            chain(
                "in",
                Some((Hook::Input, 0, true)),
                vec![rule(vec![lim.clone()], Action::Jump(1))],
            ),
            chain("log", None, vec![rule(vec![], Action::Continue)]),
        ]);
        assert!(matches!(evaluate(&r, &packet(22)), Verdict::Filtered(_)));
        // limit -> accept, else policy drop: unknown.
        let r = rs(vec![chain(
            "in",
            Some((Hook::Input, 0, true)),
            vec![rule(vec![lim], Action::Accept)],
        )]);
        assert_eq!(
            evaluate(&r, &packet(22)),
            Verdict::Unknown("depends on limit rate 3/minute".into())
        );
    }

    #[test]
    fn accept_ends_only_its_base_chain() {
        let r = rs(vec![
            chain(
                "a",
                Some((Hook::Input, 10, false)),
                vec![rule(
                    vec![Test::Dport(Some(6), vec![(22, 22)])],
                    Action::Drop,
                )],
            ),
            chain(
                "b",
                Some((Hook::Input, -5, false)),
                vec![rule(vec![], Action::Accept)],
            ),
        ]);
        let v = evaluate(&r, &packet(22));
        assert!(
            matches!(v, Verdict::Filtered(ref rr) if rr.chain == "a"),
            "{v:?}"
        );
        assert_eq!(evaluate(&r, &packet(23)), Verdict::Accepted);
    }

    #[test]
    fn return_goto_and_family_scoped_tests() {
        let v4only = Test::Saddr(vec![
            crate::classify::firewall::model::AddrRange::prefix(
                "198.51.100.0".parse().unwrap(),
                24,
            )
            .unwrap(),
        ]);
        let r = rs(vec![
            chain(
                "in",
                Some((Hook::Input, 0, true)),
                vec![
                    rule(vec![], Action::Goto(1)),
                    rule(vec![], Action::Accept), // never reached: goto does not come back
                ],
            ),
            chain(
                "sub",
                None,
                vec![
                    rule(vec![Test::Dport(None, vec![(1, 1000)])], Action::Return),
                    Rule {
                        conds: vec![Cond {
                            neg: true,
                            test: v4only,
                        }],
                        ..rule(vec![], Action::Drop)
                    },
                    rule(vec![], Action::Accept),
                ],
            ),
        ]);
        // Port 22: return from a goto'd chain ends the base chain: policy drop.
        let v = evaluate(&r, &packet(22));
        assert!(
            matches!(v, Verdict::Filtered(ref rr) if rr.text == "policy drop"),
            "{v:?}"
        );
        // Port 2000 from 198.51.100.1: not negated-saddr, accepted.
        assert_eq!(evaluate(&r, &packet(2000)), Verdict::Accepted);
        // IPv6 packet: `ip saddr != X` does not match an IPv6 packet at all.
        let mut p6 = packet(2000);
        p6.saddr = "2001:db8::1".parse().unwrap();
        p6.daddr = "2001:db8::5".parse().unwrap();
        assert_eq!(evaluate(&r, &p6), Verdict::Accepted);
    }

    #[test]
    fn unknown_action_and_unread_parts_are_unknown() {
        let r = rs(vec![chain(
            "pre",
            Some((Hook::Prerouting, -100, false)),
            vec![rule(vec![], Action::Unknown("dnat".into()))],
        )]);
        assert!(matches!(evaluate(&r, &packet(80)), Verdict::Unknown(w) if w.starts_with("dnat")));
        let mut r = rs(vec![]);
        assert_eq!(evaluate(&r, &packet(80)), Verdict::Accepted);
        r.unread.push("nft: not installed".into());
        assert!(matches!(evaluate(&r, &packet(80)), Verdict::Unknown(_)));
    }

    #[test]
    fn path_explosion_is_bounded() {
        // Rules without a verdict never branch.
        let rules: Vec<Rule> = (0..20)
            .map(|i| rule(vec![Test::Unmodelled(format!("x{i}"))], Action::Continue))
            .collect();
        let r = rs(vec![chain("in", Some((Hook::Input, 0, false)), rules)]);
        assert_eq!(evaluate(&r, &packet(1)), Verdict::Accepted);
        // 20 base chains that each may accept early: 2^20 agreeing paths, cut off.
        let chains: Vec<Chain> = (0..20)
            .map(|i| {
                chain(
                    "in",
                    Some((Hook::Input, i, false)),
                    vec![rule(
                        vec![Test::Unmodelled(format!("x{i}"))],
                        Action::Accept,
                    )],
                )
            })
            .collect();
        let r = rs(chains);
        assert!(
            matches!(evaluate(&r, &packet(1)), Verdict::Unknown(w) if w.starts_with("more than"))
        );
    }

    #[test]
    fn a_locally_generated_packet_has_no_input_interface_and_a_local_source() {
        let nat = |conds: Vec<Cond>| {
            let mut c = chain(
                "out",
                Some((Hook::Output, -100, false)),
                vec![Rule {
                    conds,
                    ..rule(
                        vec![],
                        Action::Nat(Nat {
                            redirect: false,
                            addr: Some("172.17.0.2".parse().unwrap()),
                            port: None,
                        }),
                    )
                }],
            );
            if let Some(b) = c.base.as_mut() {
                b.kind = "nat".into();
            }
            rs(vec![c])
        };
        let p = Packet::local_out("203.0.113.5".parse().unwrap(), 6, 40000, 6379);
        let cond = |neg, test| Cond { neg, test };
        // `! -i docker0` holds (the name is empty), `-i docker0` does not.
        let hits = |r: &Ruleset| nat_walk_on(r, &p, Hook::Output).hits.len();
        assert_eq!(
            hits(&nat(vec![cond(
                true,
                Test::IifName(vec!["docker0".into()])
            )])),
            1
        );
        assert_eq!(
            hits(&nat(vec![cond(
                false,
                Test::IifName(vec!["docker0".into()])
            )])),
            0
        );
        // `--src-type LOCAL` holds for it, never for a packet from another host.
        assert_eq!(hits(&nat(vec![cond(false, Test::SaddrLocal)])), 1);
        let r = nat(vec![cond(false, Test::SaddrLocal)]);
        assert!(nat_walk_on(&r, &packet(6379), Hook::Output).hits.is_empty());
        // Prerouting NAT chains never see it.
        assert!(nat_walk(&r, &p).hits.is_empty());
    }
}
