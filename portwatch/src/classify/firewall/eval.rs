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

use super::model::{Action, AddrType, Chain, Cond, Hook, Ruleset, Test, ct, ifname_matches};

/// Most evaluation runs for one packet (each unmodelled condition reached doubles them).
pub const MAX_PATHS: usize = 256;
/// Deepest chain nesting followed (the kernel allows 16 jumps deep in nf_tables).
const MAX_DEPTH: usize = 64;

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
}

impl Packet<'_> {
    fn v6(&self) -> bool {
        matches!(self.daddr.to_canonical(), IpAddr::V6(_))
    }
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
    /// `drop` or `reject`.
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

/// One run's end.
enum Outcome {
    Accepted,
    Filtered(RuleRef),
    Unknown(String),
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

/// The verdict for one packet.
pub fn evaluate(rs: &Ruleset, p: &Packet<'_>) -> Verdict {
    if !rs.unread.is_empty() {
        return Verdict::Unknown(format!("ruleset not fully read: {}", rs.unread.join("; ")));
    }
    let mut choices = Choices {
        taken: Vec::new(),
        pos: 0,
        first_reason: None,
    };
    let mut first: Option<Outcome> = None;
    let mut accepted = false;
    let mut filtered = false;
    for _ in 0..MAX_PATHS {
        choices.pos = 0;
        let out = run(rs, p, &mut choices);
        match &out {
            Outcome::Unknown(why) => return Verdict::Unknown(why.clone()),
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
            };
        }
    }
    Verdict::Unknown(format!(
        "more than {MAX_PATHS} combinations of unmodelled expressions (first: {})",
        choices.first_reason.unwrap_or_default()
    ))
}

/// One pass through every hook and base chain with the choices given.
fn run(rs: &Ruleset, p: &Packet<'_>, choices: &mut Choices) -> Outcome {
    let v6 = p.v6();
    for hook in [Hook::Prerouting, Hook::Input] {
        for ci in rs.base_chains(hook, v6) {
            match run_base(rs, ci, p, choices) {
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

fn run_base(rs: &Ruleset, base: usize, p: &Packet<'_>, choices: &mut Choices) -> Step {
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
        if rule.action == Action::Continue {
            continue;
        }
        if !rule.conds.iter().all(|c| cond_holds(c, p, choices)) {
            continue;
        }
        match &rule.action {
            Action::Continue => {}
            Action::Accept => return Step::Accept,
            Action::Drop | Action::Reject => {
                return Step::Stop(Outcome::Filtered(RuleRef {
                    origin: chain.origin.as_str(),
                    family: chain.family.as_str(),
                    table: chain.table.clone(),
                    chain: chain.name.clone(),
                    handle: rule.handle,
                    text: rule.text.clone(),
                    action: if rule.action == Action::Drop {
                        "drop"
                    } else {
                        "reject"
                    },
                }));
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

fn cond_holds(c: &Cond, p: &Packet<'_>, choices: &mut Choices) -> bool {
    let v6 = p.v6();
    // Tests that only apply to one family (an `ip saddr` on an IPv6 packet) do not
    // match at all, negated or not: nft adds an implicit protocol check.
    let positive = match &c.test {
        Test::IifName(names) => names.iter().any(|n| ifname_matches(n, p.iif)),
        Test::OifName(_) => false,
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
        Test::CtStatusDnat => false,
        Test::FibDaddrType(types) => types.contains(&p.daddr_type),
        Test::PktTypeHost(host) => *host == matches!(p.daddr_type, AddrType::Local),
        Test::TcpSyn => {
            if p.l4proto != 6 {
                return false;
            }
            true
        }
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
            conds: conds
                .into_iter()
                .map(|test| Cond { neg: false, test })
                .collect(),
            action,
        }
    }

    fn packet(dport: u16) -> Packet<'static> {
        Packet {
            iif: "eth0",
            saddr: "198.51.100.1".parse().unwrap(),
            daddr: "203.0.113.5".parse().unwrap(),
            l4proto: 6,
            sport: 40000,
            dport,
            daddr_type: AddrType::Local,
        }
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
}
