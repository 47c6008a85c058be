//! Reads the JSON of `nft -j list ruleset` (libnftables' JSON schema, version 1) into
//! the evaluator's [`Ruleset`].
//!
//! The JSON is input: nothing here panics on it, and anything outside the modelled
//! subset becomes [`Test::Unmodelled`] (a match: explored both ways) or
//! [`Action::Unknown`] (a statement that may change the packet's fate), never an error
//! for the whole ruleset. Only a document that is not nft's JSON at all is an error.
//!
//! iptables-nft rules show their xtables matches as opaque `{"xt": {"name": ...}}`
//! objects (libnftables does not translate them to JSON); [`Parsed::xt_rules`] lists
//! those rules so [`super::ipt::fill_xt`] can take their meaning from
//! `iptables-nft-save`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::Value;

use super::model::{
    Action, AddrRange, AddrType, Base, Chain, Cond, Family, Hook, MapEntry, MapKey, MarkOp,
    MarkSet, Nat, NatMap, Origin, Rule, Ruleset, Test, ct, l4proto,
};

/// Largest document accepted (a ruleset with tens of thousands of rules is a few MiB).
pub const MAX_JSON: usize = 64 << 20;

/// The ruleset, and the rules that used xtables matches or targets.
#[derive(Debug, Default)]
pub struct Parsed {
    pub ruleset: Ruleset,
    /// (chain index, rule index) of each rule with an `xt` expression.
    pub xt_rules: Vec<(usize, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("not nft JSON: {0}")]
    Json(String),
    #[error("not nft JSON: no top-level \"nftables\" array")]
    Shape,
    #[error("nft JSON is {0} bytes, more than the {MAX_JSON} read")]
    TooLarge(usize),
}

fn family(s: &str) -> Option<Family> {
    match s {
        "ip" => Some(Family::Ip),
        "ip6" => Some(Family::Ip6),
        "inet" => Some(Family::Inet),
        _ => None,
    }
}

/// Standard priority names (nft(8) "PRIORITY").
fn prio(v: &Value) -> i32 {
    if let Some(n) = v.as_i64() {
        return n.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
    }
    match v.as_str().unwrap_or("") {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "security" => 50,
        "srcnat" => 100,
        _ => 0,
    }
}

type Key = (Family, String, String);

/// Parses `nft -j list ruleset` output.
pub fn parse(json: &[u8]) -> Result<Parsed, NftError> {
    if json.len() > MAX_JSON {
        return Err(NftError::TooLarge(json.len()));
    }
    let doc: Value = serde_json::from_slice(json).map_err(|e| NftError::Json(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or(NftError::Shape)?;
    let mut out = Parsed::default();
    out.ruleset.sources.push("nftables");
    let mut sets: HashMap<Key, Vec<Value>> = HashMap::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    let s = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    // Sets and chains first: rules refer to both, by name.
    for item in items {
        if let Some(set) = item.get("set").or_else(|| item.get("map")) {
            let Some(fam) = family(&s(set, "family")) else {
                continue;
            };
            let elems = match set.get("elem") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            sets.insert((fam, s(set, "table"), s(set, "name")), elems);
        } else if let Some(c) = item.get("chain") {
            let fam_name = s(c, "family");
            let hook = c.get("hook").and_then(Value::as_str);
            let Some(fam) = family(&fam_name) else {
                // netdev/bridge base chains see packets before prerouting: rules there
                // are not modelled, so no verdict is claimed while one exists.
                if let Some(h) = hook {
                    out.ruleset.unread.push(format!(
                        "{fam_name} table {} has a base chain {} on {h} (not modelled)",
                        s(c, "table"),
                        s(c, "name")
                    ));
                }
                continue;
            };
            let base = hook.map(|h| Base {
                hook: Hook::parse(h),
                prio: c.get("prio").map_or(0, prio),
                policy_drop: c.get("policy").and_then(Value::as_str) == Some("drop"),
                kind: s(c, "type"),
            });
            let key = (fam, s(c, "table"), s(c, "name"));
            index.insert(key.clone(), out.ruleset.chains.len());
            out.ruleset.chains.push(Chain {
                family: fam,
                table: key.1,
                name: key.2,
                origin: Origin::Nftables,
                base,
                rules: Vec::new(),
            });
        }
    }
    for item in items {
        let Some(r) = item.get("rule") else { continue };
        let Some(fam) = family(&s(r, "family")) else {
            continue;
        };
        let table = s(r, "table");
        let Some(&ci) = index.get(&(fam, table.clone(), s(r, "chain"))) else {
            continue;
        };
        let exprs: &[Value] = r
            .get("expr")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let ctx = Ctx {
            fam,
            table: &table,
            sets: &sets,
            chains: &index,
        };
        let (rule, xt) = parse_rule(exprs, &ctx, r.get("handle").and_then(Value::as_u64));
        let chain = &mut out.ruleset.chains[ci];
        if xt {
            out.xt_rules.push((ci, chain.rules.len()));
        }
        chain.rules.push(rule);
    }
    Ok(out)
}

struct Ctx<'a> {
    fam: Family,
    table: &'a str,
    sets: &'a HashMap<Key, Vec<Value>>,
    chains: &'a HashMap<Key, usize>,
}

impl Ctx<'_> {
    fn chain(&self, target: &Value) -> Option<usize> {
        let name = target.get("target").and_then(Value::as_str)?;
        self.chains
            .get(&(self.fam, self.table.to_owned(), name.to_owned()))
            .copied()
    }

    /// The elements a right-hand side stands for: a named set, an anonymous set, or one
    /// value.
    fn elems<'v>(&'v self, right: &'v Value) -> Option<Vec<&'v Value>> {
        if let Some(name) = right.as_str().and_then(|s| s.strip_prefix('@')) {
            let set = self
                .sets
                .get(&(self.fam, self.table.to_owned(), name.to_owned()))?;
            return Some(set.iter().map(unwrap_elem).collect());
        }
        match right {
            Value::Object(o) if o.contains_key("set") => {
                Some(o.get("set")?.as_array()?.iter().map(unwrap_elem).collect())
            }
            // A list as right-hand side (`ct state` flags).
            Value::Array(a) => Some(a.iter().map(unwrap_elem).collect()),
            v => Some(vec![unwrap_elem(v)]),
        }
    }
}

/// `{"elem": {"val": X, "timeout": ...}}` is X.
fn unwrap_elem(v: &Value) -> &Value {
    v.get("elem").and_then(|e| e.get("val")).unwrap_or(v)
}

fn parse_rule(exprs: &[Value], ctx: &Ctx<'_>, handle: Option<u64>) -> (Rule, bool) {
    let mut conds = Vec::new();
    let mut marks = Vec::new();
    let mut action = Action::Continue;
    let mut xt = false;
    let mut text = String::new();
    for e in exprs {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&render(e));
        let Some((k, v)) = e.as_object().and_then(|o| o.iter().next()) else {
            conds.push(unmodelled(e));
            continue;
        };
        match k.as_str() {
            "match" => conds.extend(parse_match(v, ctx)),
            "counter" | "log" => {}
            // Marks: followed on the NAT and forward paths (kube-proxy, netavark).
            "mangle" if is_mark(v.get("key")) => marks.push(mark_set(v)),
            "accept" => action = Action::Accept,
            "drop" => action = Action::Drop,
            "reject" => action = Action::Reject,
            "return" => action = Action::Return,
            "jump" | "goto" => {
                action = match ctx.chain(v) {
                    Some(t) if k == "jump" => Action::Jump(t),
                    Some(t) => Action::Goto(t),
                    None => Action::Unknown(format!("{k} to a chain that is not there")),
                }
            }
            "xt" => {
                xt = true;
                let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
                match v.get("type").and_then(Value::as_str) {
                    Some("target") => match name {
                        "LOG" | "NFLOG" => {}
                        // Its value is in the save line (`fill_xt`); until then unknown.
                        "MARK" | "CONNMARK" => marks.push(MarkSet {
                            ct: name == "CONNMARK",
                            op: MarkOp::Unknown,
                        }),
                        "REJECT" => action = Action::Reject,
                        _ => action = Action::Unknown(format!("xt target {name}")),
                    },
                    _ => conds.push(Cond {
                        neg: false,
                        test: Test::Unmodelled(format!("xt match \"{name}\"")),
                    }),
                }
            }
            "dnat" | "redirect" => {
                // `dnat ip to` in an inet table does nothing to an IPv6 packet (and the
                // rule goes on, nft_nat_inet_eval): as if the rule did not match it.
                match v.get("family").and_then(Value::as_str) {
                    Some("ip") => conds.push(Cond {
                        neg: false,
                        test: Test::NfProto(false),
                    }),
                    Some("ip6") => conds.push(Cond {
                        neg: false,
                        test: Test::NfProto(true),
                    }),
                    _ => {}
                }
                action = match nat(k == "redirect", v) {
                    Some(n) => Action::Nat(n),
                    None => nat_map(k == "redirect", v, ctx)
                        .map_or_else(|| Action::Unknown(render(e)), Action::NatMap),
                }
            }
            "snat" | "masquerade" | "queue" | "tproxy" | "synproxy" | "notrack" | "vmap"
            | "fwd" | "dup" | "mangle" => {
                action = Action::Unknown(render(e));
            }
            _ => conds.push(unmodelled(e)),
        }
        if action != Action::Continue {
            break;
        }
    }
    (
        Rule {
            handle,
            text,
            conds,
            marks,
            action,
        },
        xt,
    )
}

/// `dnat to ADDR[:PORT]` / `redirect [to :PORT]` with one literal address and port;
/// a map, a range or an expression is not modelled (`None`).
fn nat(redirect: bool, v: &Value) -> Option<Nat> {
    if v.get("flags").is_some() || v.get("type_flags").is_some() {
        // `netmap`, `prefix`: a whole range of addresses.
        return None;
    }
    let addr = match v.get("addr") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse::<IpAddr>().ok()?),
        Some(_) => return None,
    };
    let port = match v.get("port") {
        None | Some(Value::Null) => None,
        Some(p) => Some(port(p)?),
    };
    if redirect && addr.is_some() || !redirect && addr.is_none() && port.is_none() {
        return None;
    }
    Some(Nat {
        redirect,
        addr,
        port,
    })
}

/// `dnat to KEY map { K : ADDR }`, `dnat ip to KEY map { K : ADDR . PORT }`,
/// `dnat to ADDR : KEY map { K : PORT }`, `redirect to : KEY map { K : PORT }`, with
/// an anonymous map or a named `@map`, keyed by `tcp`/`udp`/`th dport` or `ip`/`ip6
/// daddr`. Any other key (a concatenation, a mark), data that is not an address or
/// port, or an interval or prefix NAT is not modelled (`None`).
fn nat_map(redirect: bool, v: &Value, ctx: &Ctx<'_>) -> Option<NatMap> {
    if v.get("flags").is_some() || v.get("type_flags").is_some() {
        return None;
    }
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    fn map_of(x: Option<&Value>) -> Option<&Value> {
        x.and_then(|x| x.get("map"))
    }
    // Exactly one of address and port is a map; the other a literal, or absent.
    let (map, literal, data_is_addr) = match (map_of(field("addr")), map_of(field("port"))) {
        (Some(m), None) if !redirect => (m, field("port"), true),
        (None, Some(m)) => (m, field("addr"), false),
        _ => return None,
    };
    let p = map.get("key")?.get("payload")?;
    let key = match (
        p.get("protocol").and_then(Value::as_str)?,
        p.get("field").and_then(Value::as_str)?,
    ) {
        ("th", "dport") => MapKey::Dport(None),
        (proto @ ("tcp" | "udp" | "sctp" | "udplite"), "dport") => {
            MapKey::Dport(Some(l4proto(proto)?))
        }
        ("ip" | "ip6", "daddr") => MapKey::Daddr,
        _ => return None,
    };
    let elems: Vec<Value> = match map.get("data")? {
        Value::String(name) => ctx
            .sets
            .get(&(
                ctx.fam,
                ctx.table.to_owned(),
                name.strip_prefix('@')?.to_owned(),
            ))?
            .clone(),
        d => d.get("set")?.as_array()?.clone(),
    };
    let mut entries = Vec::new();
    for el in &elems {
        let [k, d] = el.as_array()?.as_slice() else {
            return None;
        };
        let k = unwrap_elem(k);
        let (ports, addrs) = match key {
            MapKey::Dport(_) => (port_ranges(&[k])?.first().copied()?, None),
            MapKey::Daddr => ((0, 0), Some(addr_range(k)?)),
        };
        let d = unwrap_elem(d);
        let nat = if data_is_addr {
            let (a, p) = match d.get("concat").and_then(Value::as_array).map(Vec::as_slice) {
                Some([a, p]) => (a, Some(port(p)?)),
                Some(_) => return None,
                None => (d, None),
            };
            // A literal port beside an address map: used unless the data has one.
            let lit_port = match literal {
                Some(x) => Some(port(x)?),
                None => None,
            };
            Nat {
                redirect: false,
                addr: Some(a.as_str()?.parse::<IpAddr>().ok()?),
                port: p.or(lit_port),
            }
        } else {
            let addr = match literal {
                Some(Value::String(a)) if !redirect => Some(a.parse::<IpAddr>().ok()?),
                None => None,
                Some(_) => return None,
            };
            Nat {
                redirect,
                addr,
                port: Some(port(d)?),
            }
        };
        entries.push(MapEntry { ports, addrs, nat });
    }
    Some(NatMap { key, entries })
}

/// The mark a `mangle` statement of a mark sets: a constant, `mark | C`, or
/// `meta mark | C` into the ct mark; anything else makes it unknown.
fn mark_set(v: &Value) -> MarkSet {
    let key = v.get("key");
    let ct = key.and_then(|k| k.get("ct")).is_some();
    let num = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    let is_key = |x: &Value, k: &str| {
        x.get(k).and_then(|m| m.get("key")).and_then(Value::as_str) == Some("mark")
    };
    let op = match v.get("value") {
        Some(x) if num(x).is_some() => MarkOp::Set(num(x).unwrap_or(0)),
        Some(x) => match x.get("|").and_then(Value::as_array).map(Vec::as_slice) {
            Some([a, b]) if num(b).is_some() => {
                let c = num(b).unwrap_or(0);
                if is_key(a, "meta") && ct {
                    MarkOp::FromMetaOr(c)
                } else if is_key(a, if ct { "ct" } else { "meta" }) {
                    MarkOp::Or(c)
                } else {
                    MarkOp::Unknown
                }
            }
            _ => MarkOp::Unknown,
        },
        None => MarkOp::Unknown,
    };
    MarkSet { ct, op }
}

fn is_mark(key: Option<&Value>) -> bool {
    let key = |k: &str| key.and_then(|v| v.get(k)).and_then(|m| m.get("key"));
    key("meta").and_then(Value::as_str) == Some("mark")
        || key("ct").and_then(Value::as_str) == Some("mark")
}

fn unmodelled(e: &Value) -> Cond {
    Cond {
        neg: false,
        test: Test::Unmodelled(render(e)),
    }
}

/// The conditions one `match` expression stands for (two when a protocol test implies
/// the IP version, like `ip protocol tcp`).
fn parse_match(m: &Value, ctx: &Ctx<'_>) -> Vec<Cond> {
    let whole = || vec![unmodelled(&serde_json::json!({ "match": m }))];
    let (Some(left), Some(right)) = (m.get("left"), m.get("right")) else {
        return whole();
    };
    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
    let neg = match op {
        "==" | "in" => false,
        "!=" => true,
        "<" | ">" | "<=" | ">=" => {
            return match port_test(left, ctx, right, op) {
                Some(t) => vec![Cond {
                    neg: false,
                    test: t,
                }],
                None => whole(),
            };
        }
        _ => return whole(),
    };
    if let Some(t) = mark_test(left, right) {
        return vec![Cond { neg, test: t }];
    }
    let Some(elems) = ctx.elems(right) else {
        return whole();
    };
    let strs = || {
        elems
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
    };
    let one = |test: Option<Test>| match test {
        Some(test) => vec![Cond { neg, test }],
        None => whole(),
    };
    if let Some(key) = left
        .get("meta")
        .and_then(|m| m.get("key"))
        .and_then(Value::as_str)
    {
        return match key {
            "iifname" | "iif" => one(strs().map(Test::IifName)),
            "oifname" | "oif" => one(strs().map(Test::OifName)),
            "l4proto" => one(protos(&elems).map(Test::L4Proto)),
            "nfproto" | "protocol" => match strs().as_deref() {
                Some([v]) if v == "ipv4" || v == "ip" => one(Some(Test::NfProto(false))),
                Some([v]) if v == "ipv6" || v == "ip6" => one(Some(Test::NfProto(true))),
                _ => whole(),
            },
            "pkttype" => match strs().as_deref() {
                Some([v]) => one(Some(Test::PktTypeHost(v == "host"))),
                _ => whole(),
            },
            _ => whole(),
        };
    }
    if let Some(p) = left.get("payload") {
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("");
        let field = p.get("field").and_then(Value::as_str).unwrap_or("");
        return match (proto, field) {
            ("ip" | "ip6", "saddr" | "daddr") => {
                let v6 = proto == "ip6";
                let ranges = elems
                    .iter()
                    .map(|v| addr_range(v))
                    .collect::<Option<Vec<_>>>()
                    .filter(|r| r.iter().all(|r| r.v6 == v6));
                let ranges = match ranges {
                    // An empty set still names its family for the implicit check.
                    Some(r) if r.is_empty() => vec![],
                    Some(r) => r,
                    None => return whole(),
                };
                let mut conds = vec![Cond {
                    neg: false,
                    test: Test::NfProto(v6),
                }];
                conds.push(Cond {
                    neg,
                    test: if field == "saddr" {
                        Test::Saddr(ranges)
                    } else {
                        Test::Daddr(ranges)
                    },
                });
                conds
            }
            ("ip", "protocol") | ("ip6", "nexthdr") => match protos(&elems) {
                Some(set) => vec![
                    Cond {
                        neg: false,
                        test: Test::NfProto(proto == "ip6"),
                    },
                    Cond {
                        neg,
                        test: Test::L4Proto(set),
                    },
                ],
                None => whole(),
            },
            ("tcp" | "udp" | "th" | "sctp" | "udplite", "dport" | "sport") => {
                match port_ranges(&elems) {
                    Some(r) => port_conds(proto, field, r, neg),
                    None => whole(),
                }
            }
            // Another field of a layer-4 header (`icmpv6 type`, `tcp flags`): nft
            // adds the protocol check, which is modelled; the field is not.
            (p, _) if l4proto(p).is_some() => vec![
                Cond {
                    neg: false,
                    test: Test::L4Proto(vec![l4proto(p).unwrap_or(0)]),
                },
                whole().remove(0),
            ],
            ("ip" | "ip6", _) => vec![
                Cond {
                    neg: false,
                    test: Test::NfProto(proto == "ip6"),
                },
                whole().remove(0),
            ],
            _ => whole(),
        };
    }
    if let Some(key) = left
        .get("ct")
        .and_then(|c| c.get("key"))
        .and_then(Value::as_str)
    {
        // Only the original-direction, whole-connection keys (no "dir").
        if left.get("ct").and_then(|c| c.get("dir")).is_some() {
            return whole();
        }
        return match (key, strs()) {
            ("state", Some(names)) => {
                let bits = names.iter().map(|n| ct::state(n)).sum::<Option<u32>>();
                one(bits.map(Test::CtState))
            }
            ("status", Some(names)) if names == ["dnat"] => one(Some(Test::CtStatusDnat)),
            _ => whole(),
        };
    }
    if let Some(fib) = left.get("fib") {
        let flags: Vec<&str> = fib
            .get("flags")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if fib.get("result").and_then(Value::as_str) == Some("type") && flags == ["daddr"] {
            return one(
                strs().map(|v| Test::FibDaddrType(v.iter().map(|s| AddrType::parse(s)).collect()))
            );
        }
    }
    whole()
}

/// `meta mark & 0x4000 == 0x4000`, `ct mark & M == V`, `meta mark 5`.
fn mark_test(left: &Value, right: &Value) -> Option<Test> {
    let value = u32::try_from(right.as_u64()?).ok()?;
    let key = |x: &Value| -> Option<bool> {
        if x.get("meta")?.get("key")?.as_str()? == "mark" {
            return Some(false);
        }
        None
    };
    let ct_key = |x: &Value| {
        x.get("ct")
            .and_then(|c| c.get("key"))
            .and_then(Value::as_str)
            == Some("mark")
            && x.get("ct").and_then(|c| c.get("dir")).is_none()
    };
    let which = |x: &Value| key(x).or_else(|| ct_key(x).then_some(true));
    if let Some(ct) = which(left) {
        return Some(Test::Mark {
            ct,
            mask: u32::MAX,
            value,
        });
    }
    match left.get("&")?.as_array()?.as_slice() {
        [k, m] => Some(Test::Mark {
            ct: which(k)?,
            mask: u32::try_from(m.as_u64()?).ok()?,
            value,
        }),
        _ => None,
    }
}

/// `tcp dport 22` also requires TCP; `th dport` only some protocol with ports.
fn port_conds(proto: &str, field: &str, ranges: Vec<(u16, u16)>, neg: bool) -> Vec<Cond> {
    let p = match proto {
        "th" => None,
        other => l4proto(other),
    };
    let mut conds = Vec::new();
    if let (Some(p), true) = (p, neg) {
        // `tcp dport != 22` still only matches TCP packets.
        conds.push(Cond {
            neg: false,
            test: Test::L4Proto(vec![p]),
        });
    }
    conds.push(Cond {
        neg,
        test: if field == "dport" {
            Test::Dport(p, ranges)
        } else {
            Test::Sport(p, ranges)
        },
    });
    conds
}

fn port_test(left: &Value, _ctx: &Ctx<'_>, right: &Value, op: &str) -> Option<Test> {
    let p = left.get("payload")?;
    let proto = p.get("protocol")?.as_str()?;
    let field = p.get("field")?.as_str()?;
    if !matches!(proto, "tcp" | "udp" | "th" | "sctp" | "udplite")
        || !matches!(field, "dport" | "sport")
    {
        return None;
    }
    let n = u16::try_from(right.as_u64()?).ok()?;
    let range = match op {
        "<" => (0, n.checked_sub(1)?),
        "<=" => (0, n),
        ">" => (n.checked_add(1)?, u16::MAX),
        _ => (n, u16::MAX),
    };
    let p = if proto == "th" { None } else { l4proto(proto) };
    Some(if field == "dport" {
        Test::Dport(p, vec![range])
    } else {
        Test::Sport(p, vec![range])
    })
}

fn protos(elems: &[&Value]) -> Option<Vec<u8>> {
    elems
        .iter()
        .map(|v| match v {
            Value::String(s) => l4proto(s),
            Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
            _ => None,
        })
        .collect()
}

fn port(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn port_ranges(elems: &[&Value]) -> Option<Vec<(u16, u16)>> {
    elems
        .iter()
        .map(|v| match v.get("range").and_then(Value::as_array) {
            Some(r) if r.len() == 2 => Some((port(&r[0])?, port(&r[1])?)),
            Some(_) => None,
            None => port(v).map(|p| (p, p)),
        })
        .collect()
}

fn addr_range(v: &Value) -> Option<AddrRange> {
    if let Some(s) = v.as_str() {
        return s.parse::<IpAddr>().ok().map(AddrRange::single);
    }
    if let Some(p) = v.get("prefix") {
        let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return AddrRange::prefix(addr, len);
    }
    let r = v.get("range")?.as_array()?;
    let (lo, hi) = (r.first()?.as_str()?, r.get(1)?.as_str()?);
    let (lo, hi) = (
        AddrRange::single(lo.parse().ok()?),
        AddrRange::single(hi.parse().ok()?),
    );
    (lo.v6 == hi.v6).then_some(AddrRange {
        v6: lo.v6,
        lo: lo.lo,
        hi: hi.hi,
    })
}

/// nft-like text of one expression (for rule references; unknown shapes as JSON).
pub fn render(e: &Value) -> String {
    let Some((k, v)) = e.as_object().and_then(|o| o.iter().next()) else {
        return e.to_string();
    };
    match k.as_str() {
        "match" => {
            let op = match v.get("op").and_then(Value::as_str) {
                Some("==") | Some("in") | None => String::new(),
                Some(op) => format!("{op} "),
            };
            format!(
                "{} {op}{}",
                render_left(v.get("left").unwrap_or(&Value::Null)),
                render_value(v.get("right").unwrap_or(&Value::Null))
            )
        }
        "accept" | "drop" | "return" | "counter" => k.clone(),
        "reject" => "reject".into(),
        "log" => match v.get("prefix").and_then(Value::as_str) {
            Some(p) => format!("log prefix {p:?}"),
            None => "log".into(),
        },
        "jump" | "goto" => format!(
            "{k} {}",
            v.get("target").and_then(Value::as_str).unwrap_or("?")
        ),
        "limit" => format!(
            "limit rate {}/{}",
            v.get("rate").map_or_else(String::new, Value::to_string),
            v.get("per").and_then(Value::as_str).unwrap_or("second")
        ),
        "xt" => format!(
            "xt {} \"{}\"",
            v.get("type").and_then(Value::as_str).unwrap_or("match"),
            v.get("name").and_then(Value::as_str).unwrap_or("?")
        ),
        "mangle" => format!(
            "{} set {}",
            render_left(v.get("key").unwrap_or(&Value::Null)),
            render_expr(v.get("value").unwrap_or(&Value::Null))
        ),
        "dnat" | "redirect" if v.is_object() || v.is_null() => {
            let fam = match v.get("family").and_then(Value::as_str) {
                Some(f) => format!(" {f}"),
                None => String::new(),
            };
            let addr = v.get("addr").map(render_expr);
            let port = v.get("port").map(render_expr);
            let to = match (addr, port) {
                (Some(a), Some(p)) if a.parse::<std::net::Ipv6Addr>().is_ok() => {
                    format!(" to [{a}]:{p}")
                }
                (Some(a), Some(p)) if v.get("port").is_some_and(|p| p.get("map").is_some()) => {
                    format!(" to {a} : {p}")
                }
                (Some(a), Some(p)) => format!(" to {a}:{p}"),
                (Some(a), None) => format!(" to {a}"),
                (None, Some(p)) => format!(" to :{p}"),
                (None, None) => String::new(),
            };
            format!("{k}{fam}{to}")
        }
        _ => e.to_string(),
    }
}

/// A value or a binary expression (`meta mark | 0x00001000`), as nft prints it.
fn render_expr(v: &Value) -> String {
    for op in ["|", "&", "^"] {
        if let Some([a, b]) = v.get(op).and_then(Value::as_array).map(Vec::as_slice) {
            let hex = |x: &Value| match x.as_u64() {
                Some(n) => format!("{n:#010x}"),
                None => render_expr(x),
            };
            let left = if a.is_object() {
                render_left(a)
            } else {
                render_value(a)
            };
            return format!("{left} {op} {}", hex(b));
        }
    }
    if v.get("meta").is_some() || v.get("ct").is_some() || v.get("payload").is_some() {
        return render_left(v);
    }
    if let Some(m) = v.get("map") {
        let data = match m.get("data") {
            Some(Value::Object(o)) => match o.get("set").and_then(Value::as_array) {
                Some(elems) => format!(
                    "{{ {} }}",
                    elems
                        .iter()
                        .map(|e| match e.as_array().map(Vec::as_slice) {
                            Some([k, d]) => format!(
                                "{} : {}",
                                render_value(unwrap_elem(k)),
                                render_expr(unwrap_elem(d))
                            ),
                            _ => render_value(e),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => render_value(&Value::Object(o.clone())),
            },
            Some(d) => render_value(d),
            None => "?".to_owned(),
        };
        return format!(
            "{} map {data}",
            render_left(m.get("key").unwrap_or(&Value::Null))
        );
    }
    if let Some(Value::Array(parts)) = v.get("concat") {
        return parts
            .iter()
            .map(render_expr)
            .collect::<Vec<_>>()
            .join(" . ");
    }
    render_value(v)
}

fn render_left(l: &Value) -> String {
    if l.get("&").is_some() || l.get("|").is_some() {
        return render_expr(l);
    }
    if let Some(k) = l
        .get("meta")
        .and_then(|m| m.get("key"))
        .and_then(Value::as_str)
    {
        return match k {
            "iifname" | "oifname" | "iif" | "oif" => k.to_owned(),
            _ => format!("meta {k}"),
        };
    }
    if let Some(p) = l.get("payload") {
        return format!(
            "{} {}",
            p.get("protocol").and_then(Value::as_str).unwrap_or("?"),
            p.get("field").and_then(Value::as_str).unwrap_or("?")
        );
    }
    if let Some(k) = l
        .get("ct")
        .and_then(|c| c.get("key"))
        .and_then(Value::as_str)
    {
        return format!("ct {k}");
    }
    if let Some(f) = l.get("fib") {
        let flags: Vec<&str> = f
            .get("flags")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        return format!(
            "fib {} {}",
            flags.join(" . "),
            f.get("result").and_then(Value::as_str).unwrap_or("?")
        );
    }
    l.to_string()
}

fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.starts_with('@') => s.clone(),
        Value::String(s) => {
            if s.parse::<IpAddr>().is_ok()
                || s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                s.clone()
            } else {
                format!("{s:?}")
            }
        }
        Value::Array(a) => a.iter().map(render_value).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let mut s = String::new();
                let _ = write!(
                    s,
                    "{}/{}",
                    p.get("addr").and_then(Value::as_str).unwrap_or("?"),
                    p.get("len").map_or_else(String::new, Value::to_string)
                );
                s
            } else if let Some(Value::Array(r)) = o.get("range") {
                r.iter().map(render_value).collect::<Vec<_>>().join("-")
            } else if let Some(Value::Array(s)) = o.get("set") {
                format!(
                    "{{ {} }}",
                    s.iter()
                        .map(|e| render_value(unwrap_elem(e)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                v.to_string()
            }
        }
        other => other.to_string(),
    }
}
