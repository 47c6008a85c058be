//! Reads `iptables-save` / `ip6tables-save` text into the evaluator's model: the
//! whole ruleset for iptables-legacy, and the meaning of the xtables matches of
//! iptables-nft rules (which nft's JSON shows only by name, see [`fill_xt`]).
//!
//! The text is input: unknown options become [`Test::Unmodelled`], unknown targets
//! [`Action::Unknown`]; nothing panics.

use std::collections::HashMap;
use std::net::IpAddr;

use super::model::{
    Action, AddrRange, AddrType, Base, Chain, Cond, Family, Hook, MarkOp, MarkSet, Nat, Origin,
    Rule, Ruleset, Test, ct, l4proto,
};

/// Largest save output read.
pub const MAX_TEXT: usize = 64 << 20;

/// One table of a save file: chains in order, with the policy of built-in chains.
struct Table {
    name: String,
    chains: Vec<(String, Option<String>, Vec<Vec<String>>)>,
}

/// Splits a save line into words, honouring double quotes (`--comment "a b"`).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn tables(text: &str) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            out.push(Table {
                name: name.to_owned(),
                chains: Vec::new(),
            });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let mut it = decl.split_whitespace();
            let name = it.next().unwrap_or("").to_owned();
            let policy = it.next().filter(|p| *p != "-").map(str::to_owned);
            t.chains.push((name, policy, Vec::new()));
        } else if line.starts_with("-A ") {
            let w = words(line);
            let Some(chain) = w.get(1) else { continue };
            let rule = w[2..].to_vec();
            match t.chains.iter_mut().find(|c| &c.0 == chain) {
                Some(c) => c.2.push(rule),
                None => t.chains.push((chain.clone(), None, vec![rule])),
            }
        }
    }
    out
}

/// iptables' built-in chains: hook and priority (NF_IP_PRI_*).
fn builtin(table: &str, chain: &str) -> Option<(Hook, i32)> {
    let prio = match table {
        "raw" => -300,
        "mangle" => -150,
        "nat" if chain == "PREROUTING" || chain == "OUTPUT" => -100,
        "nat" => 100,
        "filter" => 0,
        "security" => 50,
        _ => return None,
    };
    match Hook::parse(chain) {
        Hook::Other => None,
        h => Some((h, prio)),
    }
}

/// Parses save output into chains of `family` (Ip for iptables, Ip6 for ip6tables).
pub fn parse(text: &str, family: Family, origin: Origin) -> Ruleset {
    let mut rs = Ruleset::default();
    let text = &text[..text.len().min(MAX_TEXT)];
    for t in tables(text) {
        let first = rs.chains.len();
        let index: HashMap<&str, usize> = t
            .chains
            .iter()
            .enumerate()
            .map(|(i, c)| (c.0.as_str(), first + i))
            .collect();
        for (name, policy, _) in &t.chains {
            let base = builtin(&t.name, name).map(|(hook, prio)| Base {
                hook,
                prio,
                policy_drop: policy.as_deref() == Some("DROP"),
                kind: t.name.clone(),
            });
            rs.chains.push(Chain {
                family,
                table: t.name.clone(),
                name: name.clone(),
                origin,
                base,
                rules: Vec::new(),
            });
        }
        for (i, (name, _, rules)) in t.chains.iter().enumerate() {
            let parsed: Vec<Rule> = rules
                .iter()
                .map(|w| parse_rule(name, w, family, &index))
                .collect();
            rs.chains[first + i].rules = parsed;
        }
    }
    rs
}

fn split_ports(s: &str) -> Option<Vec<(u16, u16)>> {
    s.split(',')
        .map(|p| match p.split_once(':') {
            Some((lo, hi)) => {
                let lo = if lo.is_empty() { 0 } else { lo.parse().ok()? };
                let hi = if hi.is_empty() {
                    u16::MAX
                } else {
                    hi.parse().ok()?
                };
                Some((lo, hi))
            }
            None => p.parse().ok().map(|p| (p, p)),
        })
        .collect()
}

fn split_addrs(s: &str, v6: bool) -> Option<Vec<AddrRange>> {
    s.split(',')
        .map(|a| {
            let (addr, len) = match a.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (a, None),
            };
            let addr: IpAddr = addr.parse().ok()?;
            if addr.is_ipv6() != v6 {
                return None;
            }
            match len {
                None => Some(AddrRange::single(addr)),
                Some(l) => match l.parse::<u8>() {
                    Ok(n) => AddrRange::prefix(addr, n),
                    // A dotted netmask: count its bits if contiguous.
                    Err(_) => {
                        let m: std::net::Ipv4Addr = l.parse().ok()?;
                        let bits = u32::from(m);
                        let n = bits.leading_ones();
                        (bits.checked_shl(n).unwrap_or(0) == 0)
                            .then(|| AddrRange::prefix(addr, n as u8))
                            .flatten()
                    }
                },
            }
        })
        .collect()
}

fn parse_rule(chain: &str, w: &[String], family: Family, index: &HashMap<&str, usize>) -> Rule {
    let v6 = family == Family::Ip6;
    let mut conds = Vec::new();
    let mut marks = Vec::new();
    let mut action = Action::Continue;
    // The target's name when its options decide what it does (DNAT, REDIRECT, MARK).
    let mut target = "";
    let mut proto: Option<u8> = None;
    let mut module = String::new();
    let mut neg = false;
    let mut i = 0;
    let arg = |i: usize| w.get(i + 1).map(String::as_str).unwrap_or("");
    while i < w.len() {
        let opt = w[i].as_str();
        if opt == "!" {
            neg = true;
            i += 1;
            continue;
        }
        let mut push = |test: Option<Test>, text: String| {
            conds.push(Cond {
                neg,
                test: test.unwrap_or(Test::Unmodelled(text)),
            });
        };
        let a = arg(i);
        let mut used = 2; // option and one argument
        match opt {
            "-p" | "--protocol" => {
                if a != "all" && a != "0" {
                    proto = l4proto(a);
                    push(proto.map(|p| Test::L4Proto(vec![p])), format!("-p {a}"));
                }
            }
            "-s" | "--source" => push(split_addrs(a, v6).map(Test::Saddr), format!("-s {a}")),
            "-d" | "--destination" => push(split_addrs(a, v6).map(Test::Daddr), format!("-d {a}")),
            "-i" | "--in-interface" => push(Some(Test::IifName(vec![a.to_owned()])), String::new()),
            "-o" | "--out-interface" => {
                push(Some(Test::OifName(vec![a.to_owned()])), String::new())
            }
            "-m" | "--match" => {
                module = a.to_owned();
                if module == "limit" {
                    push(None, "-m limit".to_owned());
                }
            }
            "--dport" | "--destination-port" | "--sport" | "--source-port"
                if matches!(module.as_str(), "" | "tcp" | "udp") =>
            {
                let r = split_ports(a).filter(|_| proto.is_some());
                let t = if opt == "--dport" || opt == "--destination-port" {
                    r.map(|r| Test::Dport(proto, r))
                } else {
                    r.map(|r| Test::Sport(proto, r))
                };
                push(t, format!("{opt} {a}"));
            }
            "--dports" | "--destination-ports" | "--sports" | "--source-ports" | "--ports"
                if module == "multiport" =>
            {
                let r = split_ports(a).filter(|_| proto.is_some());
                let t = match opt {
                    "--ports" => None, // either port: not modelled
                    o if o.starts_with("--d") => r.map(|r| Test::Dport(proto, r)),
                    _ => r.map(|r| Test::Sport(proto, r)),
                };
                push(t, format!("-m multiport {opt} {a}"));
            }
            "--ctstate" | "--state" => {
                let mut bits = Some(0u32);
                let mut dnat = false;
                for s in a.split(',') {
                    match s {
                        "DNAT" => dnat = true,
                        s => bits = bits.zip(ct::state(s)).map(|(b, x)| b | x),
                    }
                }
                let t = match (bits, dnat) {
                    (Some(b), false) => Some(Test::CtState(b)),
                    (Some(0), true) => Some(Test::CtStatusDnat),
                    _ => None,
                };
                push(t, format!("{opt} {a}"));
            }
            "--src-type" if module == "addrtype" => {
                // A packet from another host never has a local source.
                let t = (a == "LOCAL").then_some(Test::SaddrLocal);
                push(t, format!("-m addrtype --src-type {a}"));
            }
            "--mark" if module == "mark" || module == "connmark" => {
                let t = mark_value(a).map(|(value, mask)| Test::Mark {
                    ct: module == "connmark",
                    mask,
                    value,
                });
                push(t, format!("-m {module} --mark {a}"));
            }
            "--to-destination" if target == "DNAT" => {
                action = dnat_to(a).map_or_else(
                    || Action::Unknown(format!("-j DNAT --to-destination {a}")),
                    Action::Nat,
                );
            }
            "--to-ports" if target == "REDIRECT" => {
                action = match a.parse::<u16>() {
                    Ok(p) => Action::Nat(Nat {
                        redirect: true,
                        addr: None,
                        port: Some(p),
                    }),
                    Err(_) => Action::Unknown(format!("-j REDIRECT --to-ports {a}")),
                };
            }
            "--set-mark" | "--set-xmark" | "--or-mark" | "--xor-mark" | "--and-mark"
                if target == "MARK" || target == "CONNMARK" =>
            {
                let op = match (opt, mark_value(a)) {
                    ("--or-mark", Some((v, _))) => MarkOp::Or(v),
                    ("--xor-mark", Some((v, _))) => MarkOp::Xor(v),
                    ("--and-mark", Some((v, _))) => MarkOp::Xmark(0, !v),
                    ("--set-mark", Some((v, m))) => MarkOp::Xmark(v, m),
                    ("--set-xmark", Some((v, m))) => MarkOp::Xmark(v, m),
                    _ => MarkOp::Unknown,
                };
                if let Some(last) = marks.last_mut() {
                    *last = MarkSet {
                        ct: target == "CONNMARK",
                        op,
                    };
                }
            }
            "--random" | "--persistent" | "--random-fully" => used = 1,
            "--dst-type" if module == "addrtype" => {
                let types: Vec<AddrType> = a.split(',').map(AddrType::parse).collect();
                push(Some(Test::FibDaddrType(types)), String::new());
            }
            "--syn" => {
                used = 1;
                push(Some(Test::TcpSyn), String::new());
            }
            "--comment" | "--limit" | "--limit-burst" | "--log-prefix" | "--log-level"
            | "--reject-with" | "--log-uid" => {}
            "--log-tcp-options" | "--log-ip-options" | "--log-tcp-sequence" => used = 1,
            "-j" | "--jump" | "-g" | "--goto" => {
                let goto = opt == "-g" || opt == "--goto";
                target = match a {
                    "DNAT" | "REDIRECT" | "MARK" | "CONNMARK" => a,
                    _ => "",
                };
                if target == "MARK" || target == "CONNMARK" {
                    // Made known by its option (`--or-mark`...), else unknown.
                    marks.push(MarkSet {
                        ct: target == "CONNMARK",
                        op: MarkOp::Unknown,
                    });
                }
                action = match a {
                    // `-j DNAT` without `--to-destination` is not valid; REDIRECT
                    // alone keeps the port.
                    "DNAT" => Action::Unknown("-j DNAT".into()),
                    "REDIRECT" => Action::Nat(Nat {
                        redirect: true,
                        addr: None,
                        port: None,
                    }),
                    "ACCEPT" => Action::Accept,
                    "DROP" => Action::Drop,
                    "REJECT" => Action::Reject,
                    "RETURN" => Action::Return,
                    "LOG" | "NFLOG" | "MARK" | "CONNMARK" | "CT" => Action::Continue,
                    t => match index.get(t) {
                        Some(&c) if goto => Action::Goto(c),
                        Some(&c) => Action::Jump(c),
                        None => Action::Unknown(format!("-j {t}")),
                    },
                };
            }
            "-c" | "--set-counters" => used = 3,
            _ => {
                // Unknown option: it and its arguments (the words up to the next option).
                let mut n = 1;
                while w
                    .get(i + n)
                    .is_some_and(|x| !x.starts_with('-') && x != "!")
                {
                    n += 1;
                }
                used = n;
                let text = match module.as_str() {
                    "" => w[i..i + n].join(" "),
                    m => format!("-m {m} {}", w[i..i + n].join(" ")),
                };
                push(None, text);
            }
        }
        neg = false;
        i += used;
    }
    Rule {
        handle: None,
        text: format!("-A {chain} {}", w.join(" ")),
        conds,
        marks,
        action,
    }
}

/// `0x4000/0x4000` (value/mask) or `5` (mask all ones).
fn mark_value(s: &str) -> Option<(u32, u32)> {
    let num = |x: &str| match x.strip_prefix("0x").or_else(|| x.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => x.parse().ok(),
    };
    match s.split_once('/') {
        Some((v, m)) => Some((num(v)?, num(m)?)),
        None => Some((num(s)?, u32::MAX)),
    }
}

/// `172.17.0.2:80`, `172.17.0.2`, `[fd00::2]:80`, `fd00::2`; a range (`a-b`, `:80-90`)
/// is not modelled.
fn dnat_to(s: &str) -> Option<Nat> {
    if s.contains('-') {
        return None;
    }
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once(']')?;
        (a, p.strip_prefix(':'))
    } else if s.matches(':').count() == 1 {
        let (a, p) = s.split_once(':')?;
        (a, Some(p))
    } else {
        (s, None)
    };
    Some(Nat {
        redirect: false,
        addr: Some(addr.parse().ok()?),
        port: port.map(str::parse).transpose().ok()?,
    })
}

/// Gives each iptables-nft rule in `xt_rules` (chain, rule index) the meaning of the
/// same rule in `iptables-nft-save` output: the n-th `-A CHAIN` line of the table is
/// the n-th rule of that chain in nft's listing. Chains whose rule counts differ (the
/// ruleset changed between the two reads) are left unmodelled.
pub fn fill_xt(rs: &mut Ruleset, xt_rules: &[(usize, usize)], save: &str, family: Family) {
    let saved = parse(save, family, Origin::Nftables);
    // Map saved chain indexes to the nft ruleset's chain indexes, by table and name.
    let to_nft: Vec<Option<usize>> = saved
        .chains
        .iter()
        .map(|c| {
            rs.chains
                .iter()
                .position(|n| n.family == family && n.table == c.table && n.name == c.name)
        })
        .collect();
    for &(ci, ri) in xt_rules {
        let Some(chain) = rs.chains.get(ci) else {
            continue;
        };
        if chain.family != family {
            continue;
        }
        let Some(sc) = saved
            .chains
            .iter()
            .find(|c| c.table == chain.table && c.name == chain.name)
        else {
            continue;
        };
        if sc.rules.len() != chain.rules.len() {
            continue;
        }
        let Some(mut rule) = sc.rules.get(ri).cloned() else {
            continue;
        };
        let remap = |t: usize| to_nft.get(t).copied().flatten();
        rule.action = match rule.action {
            Action::Jump(t) => remap(t).map_or(Action::Unknown("jump".into()), Action::Jump),
            Action::Goto(t) => remap(t).map_or(Action::Unknown("goto".into()), Action::Goto),
            a => a,
        };
        let target = &mut rs.chains[ci].rules[ri];
        rule.handle = target.handle;
        *target = rule;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_ports() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a \"b\" c" -j ACCEPT"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "ACCEPT"
            ]
        );
        assert_eq!(
            split_ports("80,1000:2000,:10"),
            Some(vec![(80, 80), (1000, 2000), (0, 10)])
        );
        assert_eq!(split_ports("x"), None);
        let r = split_addrs("10.0.0.0/255.0.0.0", false).unwrap();
        assert!(r[0].contains("10.9.9.9".parse().unwrap()));
        assert!(split_addrs("10.0.0.0/255.0.255.0", false).is_none());
    }
}
