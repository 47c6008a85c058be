//! Alert text and remediation steps for a person, in English or Japanese.
//!
//! Commands are meant to be pasted into a root shell. Arguments that come from
//! the event (unit names, process names) are shell-quoted. Steps that need the
//! person's judgement carry a placeholder in angle brackets (`<trusted-cidr>`,
//! `<PID>`) that the shell rejects until it is replaced.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::catalogue::RiskEntry;
use super::exposure::{Scope, Stack};
use super::model::Lang;
use super::{Listener, Verdict};

/// Kind of a remediation step, so a UI can group or pick them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Stop and disable the systemd unit.
    StopService,
    /// Find which unit or process owns the socket (unit unknown).
    FindOwner,
    /// The listener runs in a container.
    Container,
    /// Reconfigure the daemon to listen on loopback.
    BindLoopback,
    /// firewalld commands.
    Firewalld,
    /// nftables commands.
    Nftables,
    /// iptables / ip6tables commands.
    Iptables,
    /// Filter traffic a NAT rule forwards to the listener (or stop publishing it).
    Forward,
}

/// A configuration change: lines to set in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEdit {
    /// File(s) to edit.
    pub file: String,
    /// Lines to set.
    pub lines: Vec<String>,
}

/// One thing a person can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// What kind of step.
    pub kind: StepKind,
    /// One-line description in the chosen language.
    pub title: String,
    /// Shell commands, in order.
    pub commands: Vec<String>,
    /// Configuration to change first, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigEdit>,
}

/// Everything a person needs to act on one alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remediation {
    /// Language of the text fields.
    pub lang: Lang,
    /// One-sentence alert message.
    pub message: String,
    /// Short explanation and advice (one to three sentences).
    pub summary: String,
    /// Where to read more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Alternative or complementary steps, most direct first.
    pub steps: Vec<Step>,
}

impl Remediation {
    /// All commands of all steps, in order.
    pub fn commands(&self) -> impl Iterator<Item = &str> {
        self.steps
            .iter()
            .flat_map(|s| s.commands.iter().map(String::as_str))
    }
}

/// Quotes `s` for a POSIX shell when it has anything but safe characters.
fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn subject(l: &Listener<'_>, entry: Option<&RiskEntry>, lang: Lang) -> String {
    let proto = l.transport.as_str();
    match (entry, l.process_name) {
        (Some(e), _) => format!("{} ({}/{proto})", e.service, l.port),
        (None, Some(p)) => match lang {
            Lang::En => format!("Port {}/{proto} ({p})", l.port),
            Lang::Ja => format!("ポート {}/{proto} ({p})", l.port),
        },
        (None, None) => match lang {
            Lang::En => format!("Port {}/{proto}", l.port),
            Lang::Ja => format!("ポート {}/{proto}", l.port),
        },
    }
}

/// "all interfaces (0.0.0.0) including public address 203.0.113.5" and friends.
fn location(v: &Verdict<'_>, lang: Lang) -> String {
    let e = &v.exposure;
    let addr = e.addr;
    match e.scope {
        Scope::AllInterfaces => {
            let bind = match (e.stack, lang) {
                (Some(Stack::DualStack), Lang::En) => format!("{addr}, IPv4 and IPv6"),
                (Some(Stack::DualStack), Lang::Ja) => format!("{addr}、IPv4 と IPv6"),
                (Some(Stack::Ipv6Only), Lang::En) => format!("{addr}, IPv6 only"),
                (Some(Stack::Ipv6Only), Lang::Ja) => format!("{addr}、IPv6 のみ"),
                _ => addr.to_string(),
            };
            match (lang, e.public_addr, e.reachable_public) {
                (Lang::En, Some(p), _) => {
                    format!("all interfaces ({bind}) including public address {p}")
                }
                (Lang::Ja, Some(p), _) => {
                    format!("全インターフェース ({bind}、グローバルアドレス {p} を含む)")
                }
                (Lang::En, None, true) => format!("all interfaces ({bind})"),
                (Lang::Ja, None, true) => format!("全インターフェース ({bind})"),
                (Lang::En, None, false) => {
                    format!("all interfaces ({bind}), currently reachable from local networks only")
                }
                (Lang::Ja, None, false) => {
                    format!(
                        "全インターフェース ({bind}、現在はローカルネットワークからのみ到達可能)"
                    )
                }
            }
        }
        s => {
            let kind = match (s, lang) {
                (Scope::Loopback, Lang::En) => "loopback address",
                (Scope::Loopback, Lang::Ja) => "ループバックアドレス",
                (Scope::LinkLocal, Lang::En) => "link-local address",
                (Scope::LinkLocal, Lang::Ja) => "リンクローカルアドレス",
                (Scope::Private, Lang::En) => "private address",
                (Scope::Private, Lang::Ja) => "プライベートアドレス",
                (Scope::Multicast, Lang::En) => "multicast group",
                (Scope::Multicast, Lang::Ja) => "マルチキャストグループ",
                (_, Lang::En) => "public address",
                (_, Lang::Ja) => "グローバルアドレス",
            };
            format!("{kind} {addr}")
        }
    }
}

/// The one-sentence alert message, e.g. "memcached (11211/udp) is listening on
/// all interfaces (0.0.0.0) including public address 203.0.113.5; it is used
/// for UDP reflection attacks and exposes cached data without authentication."
pub fn message(l: &Listener<'_>, v: &Verdict<'_>, lang: Lang) -> String {
    let subj = subject(l, v.rule, lang);
    let loc = location(v, lang);
    let mut s = String::new();
    match lang {
        Lang::En => {
            let _ = write!(s, "{subj} is listening on {loc}");
            if let Some(c) = l.container_id {
                let _ = write!(s, " in container {}", short_id(c));
            }
            match (v.denied_by, v.rule) {
                (Some(d), _) => {
                    s.push_str(", which the site policy forbids");
                    match &d.reason {
                        Some(r) => {
                            let _ = write!(s, ": {}", r.trim_end_matches('.'));
                        }
                        None => {
                            let _ = write!(s, " ({})", d.label);
                        }
                    }
                }
                (None, Some(e)) => {
                    let _ = write!(s, "; {}", e.risk.en.trim_end_matches('.'));
                }
                (None, None) => {}
            }
            if v.outcome == super::Outcome::Filtered {
                s.push_str(
                    "; the host firewall filters new connections to it from there \
                     (portwatch.exposure.firewall names the rule)",
                );
            }
            s.push('.');
        }
        Lang::Ja => {
            let _ = write!(s, "{subj} が");
            if let Some(c) = l.container_id {
                let _ = write!(s, "コンテナ {} の", short_id(c));
            }
            let _ = write!(s, "{loc} で待ち受けています");
            match (v.denied_by, v.rule) {
                (Some(d), _) => {
                    s.push_str("が、サイトのポリシーで禁止されています");
                    let why = d.reason.as_deref().unwrap_or(&d.label);
                    let _ = write!(s, "（{}）", why.trim_end_matches(['.', '。']));
                }
                (None, Some(e)) => {
                    let _ = write!(s, "（{}）", e.risk.get(Lang::Ja));
                }
                (None, None) => {}
            }
            if v.outcome == super::Outcome::Filtered {
                s.push_str("（ホストのファイアウォールが新規接続を遮断しています）");
            }
            s.push('。');
        }
    }
    s
}

fn summary(v: &Verdict<'_>, lang: Lang) -> String {
    let local = v.effective_scope == Scope::Loopback;
    let why = match (v.denied_by, v.rule) {
        (Some(d), e) => d
            .reason
            .clone()
            .or_else(|| e.map(|e| e.why.get(lang).to_owned()))
            .unwrap_or_else(|| match lang {
                Lang::En => "The site policy forbids this listener.".to_owned(),
                Lang::Ja => "サイトのポリシーでこの待ち受けは禁止されています。".to_owned(),
            }),
        (None, Some(e)) => e.why.get(lang).to_owned(),
        (None, None) => String::new(),
    };
    let advice = match (lang, local) {
        (Lang::En, true) => "Stop it if it is not needed.",
        (Lang::Ja, true) => "不要であれば停止してください。",
        (Lang::En, false) => {
            "Stop it if it is not needed; otherwise make it listen on loopback only, or block the port in the host firewall."
        }
        (Lang::Ja, false) => {
            "不要であれば停止し、必要ならループバックのみで待ち受けるよう設定するか、ホストのファイアウォールでポートを遮断してください。"
        }
    };
    let why = why.trim();
    if why.is_empty() {
        advice.to_owned()
    } else {
        let sep = if lang == Lang::Ja { "" } else { " " };
        let end = if why.ends_with(['.', '。', '!', '?']) {
            ""
        } else if lang == Lang::Ja {
            "。"
        } else {
            "."
        };
        format!("{why}{end}{sep}{advice}")
    }
}

/// Stem of a unit name: "rpcbind.service" -> "rpcbind".
fn unit_stem(u: &str) -> &str {
    u.rsplit_once('.').map_or(u, |(s, _)| s)
}

/// Pids named in a step at most (a forking server can have hundreds of holders).
const HOLDERS_NAMED: usize = 8;

fn owner_steps(l: &Listener<'_>, entry: Option<&RiskEntry>, lang: Lang, steps: &mut Vec<Step>) {
    let en = lang == Lang::En;
    let port = l.port;
    let ss_flags = match l.transport {
        super::Transport::Tcp => "-Hltnp",
        super::Transport::Udp => "-Hlunp",
    };
    let ss = format!("ss {ss_flags} 'sport = :{port}'");
    // pid 1 owning the socket means systemd socket activation: the remedy is the
    // .socket unit, and "kill 1" must never be suggested. Only the pid says so: any
    // process can call itself "systemd".
    if l.pid == Some(1) {
        socket_activation_steps(l, &ss, lang, steps);
        return;
    }

    // A .scope or .slice (login sessions, pid 1's init.scope) is not a service to stop.
    let unit = l
        .systemd_unit
        .filter(|u| !(u.ends_with(".scope") || u.ends_with(".slice")));
    if let (Some(unit), None) = (unit, l.container_id) {
        let mut units: Vec<String> = Vec::new();
        // Stop the matching .socket first, or activation restarts the service.
        if let Some(e) = entry {
            for s in e.units.iter().filter(|s| s.ends_with(".socket")) {
                if unit_stem(s) == unit_stem(unit) && s != unit && l.user_manager.is_none() {
                    units.push(s.clone());
                }
            }
        }
        units.push(unit.to_owned());
        let names = units
            .iter()
            .map(|u| sh_quote(u))
            .collect::<Vec<_>>()
            .join(" ");
        let systemctl = systemctl_for(l);
        let commands = vec![
            format!("{systemctl} stop -- {names}"),
            format!("{systemctl} disable -- {names}"),
        ];
        let title = match (l.user_manager, en) {
            (Some(uid), true) => format!(
                "{unit} is a unit of user {uid}'s own service manager (not a system unit): if it is not needed, stop and disable it there"
            ),
            (Some(uid), false) => format!(
                "{unit} はユーザー {uid} 自身のサービスマネージャーのユニットです（システムのユニットではありません）。不要ならそこで停止して無効化します"
            ),
            (None, true) => format!("If {unit} is not needed, stop and disable it"),
            (None, false) => format!("{unit} が不要なら停止して無効化します"),
        };
        steps.push(Step {
            kind: StepKind::StopService,
            title,
            commands,
            config: None,
        });
    } else if let Some(c) = l.container_id {
        let id = sh_quote(c);
        let proto = l.transport.as_str();
        steps.push(Step {
            kind: StepKind::Container,
            title: if en {
                format!(
                    "It runs in container {}: stop it, or publish the port on loopback only (-p 127.0.0.1:{port}:{port}); \
                     Docker-published ports bypass the INPUT chain, so filter them in DOCKER-USER (use the host port shown by docker port)",
                    short_id(c)
                )
            } else {
                format!(
                    "コンテナ {} 内で動作しています。停止するか、ポートをループバックのみに公開します（-p 127.0.0.1:{port}:{port}）。\
                     Docker が公開したポートは INPUT チェーンを通らないため DOCKER-USER で遮断します（ホスト側ポートは docker port で確認）",
                    short_id(c)
                )
            },
            commands: vec![
                format!("docker ps --no-trunc --filter id={id}"),
                format!("docker port -- {id}"),
                format!("docker stop -- {id}"),
                format!(
                    "iptables -I DOCKER-USER -p {proto} -m conntrack --ctorigdstport {port} --ctdir ORIGINAL -j DROP"
                ),
            ],
            config: None,
        });
    }
    holder_steps(l, entry, &ss, lang, steps);
}

/// The `systemctl` that manages the listener's unit: the system manager's, or for a
/// unit under `user@N.service`, user N's (`--user -M N@`).
fn systemctl_for(l: &Listener<'_>) -> String {
    match l.user_manager {
        Some(uid) => format!("systemctl --user -M {uid}@"),
        None => "systemctl".to_owned(),
    }
}

/// Always: which processes hold the socket now, by pid, and `ss -p` to see it live.
/// `kill` only names processes found holding the socket's inode when the alert was
/// made: the pid that listened may have forked and exited, or been reused.
fn holder_steps(
    l: &Listener<'_>,
    entry: Option<&RiskEntry>,
    ss: &str,
    lang: Lang,
    steps: &mut Vec<Step>,
) {
    let en = lang == Lang::En;
    let usual = entry
        .map(|e| {
            e.units
                .iter()
                .filter(|u| u.ends_with(".service"))
                .cloned()
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let usual_note = if usual.is_empty() {
        String::new()
    } else if en {
        format!(" (usually {})", usual.join(", "))
    } else {
        format!("（通常は {}）", usual.join(", "))
    };
    let holders: &[u32] = l.holders.unwrap_or(&[]);
    let named = &holders[..holders.len().min(HOLDERS_NAMED)];
    let list = named
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let listened = match (l.pid, en) {
        (Some(pid), true) => format!("process {pid} listened"),
        (Some(pid), false) => format!("プロセス {pid} が待ち受けを開始"),
        (None, true) => "the listening process is unknown".to_owned(),
        (None, false) => "待ち受けたプロセスは不明".to_owned(),
    };
    let mut commands = vec![ss.to_owned()];
    let title = if named.is_empty() {
        if en {
            format!(
                "Find the process that holds the port now ({listened}; no holder was found when this alert was made, so check before stopping anything){usual_note}"
            )
        } else {
            format!(
                "現在ポートを保持しているプロセスを確認します（{listened}。アラート作成時に保持プロセスは見つかりませんでした。停止する前に確認してください）{usual_note}"
            )
        }
    } else {
        for pid in named {
            commands.push(format!("systemctl status -- {pid}"));
        }
        // pid 1 holding it too (socket activation handed it on): never "kill 1".
        let killable: Vec<String> = named
            .iter()
            .filter(|&&p| p != 1)
            .map(u32::to_string)
            .collect();
        if !killable.is_empty() {
            commands.push(format!("kill {}", killable.join(" ")));
        }
        if en {
            format!(
                "Processes holding the socket when this alert was made: {list} ({listened}); check with ss, find their unit, and stop them if they are not needed{usual_note}"
            )
        } else {
            format!(
                "アラート作成時にソケットを保持していたプロセス: {list}（{listened}）。ss で確認し、ユニットを特定して、不要なら停止します{usual_note}"
            )
        }
    };
    steps.push(Step {
        kind: StepKind::FindOwner,
        title,
        commands,
        config: None,
    });
}

/// pid 1 holds the socket: stop and mask the `.socket` unit and its service (as CIS
/// advises for `rpcbind.socket`), or, with the unit unknown, find it first.
fn socket_activation_steps(l: &Listener<'_>, ss: &str, lang: Lang, steps: &mut Vec<Step>) {
    let en = lang == Lang::En;
    let port = l.port;
    let (title, commands) = match l.socket_unit {
        Some(sock) => {
            let service = format!("{}.service", unit_stem(sock));
            let names = format!("{} {}", sh_quote(sock), sh_quote(&service));
            (
                if en {
                    format!(
                        "systemd listens on this port for {sock} (socket activation): if it is not needed, stop and mask {sock} and {service}"
                    )
                } else {
                    format!(
                        "systemd が {sock} のためにこのポートで待ち受けています（ソケット起動）。不要なら {sock} と {service} を停止してマスクします"
                    )
                },
                vec![
                    format!("systemctl stop -- {names}"),
                    format!("systemctl mask -- {names}"),
                ],
            )
        }
        None => (
            if en {
                "systemd holds this socket (socket activation): find its .socket unit, then stop and mask it and its service (replace the placeholders)".to_owned()
            } else {
                "systemd がソケットを保持しています（ソケット起動）。該当する .socket ユニットを特定し、サービスとともに停止してマスクします（プレースホルダーを置き換え）".to_owned()
            },
            vec![
                format!("systemctl list-sockets --all | grep -E ':{port}([^0-9]|$)'"),
                "systemctl stop -- <socket-unit> <service-unit>".to_owned(),
                "systemctl mask -- <socket-unit> <service-unit>".to_owned(),
            ],
        ),
    };
    steps.push(Step {
        kind: StepKind::StopService,
        title,
        commands,
        config: None,
    });
    steps.push(Step {
        kind: StepKind::FindOwner,
        title: if en {
            "Check that systemd (pid 1) is what holds the port".to_owned()
        } else {
            "ポートを保持しているのが systemd (pid 1) であることを確認します".to_owned()
        },
        commands: vec![ss.to_owned()],
        config: None,
    });
}

fn firewall_steps(
    l: &Listener<'_>,
    v: &Verdict<'_>,
    entry: Option<&RiskEntry>,
    lang: Lang,
    steps: &mut Vec<Step>,
) {
    let en = lang == Lang::En;
    let proto = l.transport.as_str();
    let port = l.port;
    let e = &v.exposure;
    let specific: Option<IpAddr> = (!e.is_wildcard()).then_some(e.addr);
    let (v4, v6) = match (specific, e.stack) {
        (Some(IpAddr::V4(_)), _) => (true, false),
        (Some(IpAddr::V6(_)), _) => (false, true),
        (None, Some(Stack::Ipv4Only)) => (true, false),
        (None, Some(Stack::Ipv6Only)) => (false, true),
        (None, _) => (true, true),
    };

    // firewalld
    let mut fw = vec![format!(
        "firewall-cmd --permanent --remove-port={port}/{proto} && firewall-cmd --reload"
    )];
    if let Some(svc) = entry.and_then(|e| e.firewalld.as_deref()) {
        fw.push(format!(
            "firewall-cmd --permanent --remove-service={} && firewall-cmd --reload",
            sh_quote(svc)
        ));
    }
    for (fam, on) in [("ipv4", v4), ("ipv6", v6)] {
        if on {
            fw.push(format!(
                "firewall-cmd --permanent --add-rich-rule='rule family=\"{fam}\" source address=\"<trusted-cidr>\" \
                 port port=\"{port}\" protocol=\"{proto}\" accept' && firewall-cmd --reload"
            ));
        }
    }
    steps.push(Step {
        kind: StepKind::Firewalld,
        title: if en {
            format!(
                "firewalld: close {port}/{proto}, or allow it only from a trusted source (replace <trusted-cidr>)"
            )
        } else {
            format!("firewalld: {port}/{proto} を閉じるか、信頼できる送信元のみ許可します（<trusted-cidr> を置き換え）")
        },
        commands: fw,
        config: None,
    });

    // nftables: insert (not add) so the drop precedes any accept rule.
    let nft_match = match specific {
        Some(IpAddr::V4(a)) => format!("ip daddr {a}"),
        Some(IpAddr::V6(a)) => format!("ip6 daddr {a}"),
        None => "iifname != \"lo\"".to_owned(),
    };
    steps.push(Step {
        kind: StepKind::Nftables,
        title: if en {
            "nftables: drop the port except on loopback (assumes an inet filter table with an input chain; add the rule to /etc/nftables.conf to keep it)".to_owned()
        } else {
            "nftables: ループバック以外からのポートを遮断します（inet filter テーブルと input チェーンが前提。永続化は /etc/nftables.conf に追記）".to_owned()
        },
        commands: vec![format!(
            "nft 'insert rule inet filter input {nft_match} {proto} dport {port} drop'"
        )],
        config: None,
    });

    // iptables / ip6tables
    let ipt_match = |addr: Option<IpAddr>| match addr {
        Some(a) => format!("-d {a}"),
        None => "! -i lo".to_owned(),
    };
    let mut ipt = Vec::new();
    if v4 {
        ipt.push(format!(
            "iptables -I INPUT {} -p {proto} --dport {port} -j DROP",
            ipt_match(specific)
        ));
    }
    if v6 {
        ipt.push(format!(
            "ip6tables -I INPUT {} -p {proto} --dport {port} -j DROP",
            ipt_match(specific)
        ));
    }
    steps.push(Step {
        kind: StepKind::Iptables,
        title: if en {
            "iptables: drop the port except on loopback (not persistent: save with netfilter-persistent save or iptables-save)".to_owned()
        } else {
            "iptables: ループバック以外からのポートを遮断します（永続化されないため netfilter-persistent save か iptables-save で保存）".to_owned()
        },
        commands: ipt,
        config: None,
    });
}

/// Steps for a listener reached through a DNAT rule: publish it on loopback only, or
/// drop the forwarded traffic from the interface it arrives on. After the NAT the
/// packet is addressed to the listener itself (`target`), which is what the forward
/// rules match; the input chain never sees it, so input rules do not help.
fn forward_steps(l: &Listener<'_>, p: &super::Published<'_>, lang: Lang, steps: &mut Vec<Step>) {
    let en = lang == Lang::En;
    let proto = l.transport.as_str();
    // A name a command can carry as it is (inside the nft quotes too), else a placeholder
    // for the person to fill in: an interface name may hold quotes.
    let iface = if !p.interface.is_empty()
        && p.interface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        p.interface.to_owned()
    } else {
        "<public-interface>".to_owned()
    };
    let (hp, tp) = (p.host_port, p.target_port);
    steps.push(Step {
        kind: StepKind::Forward,
        title: if en {
            format!(
                "Host port {hp}/{proto} is published to this listener by a NAT rule: publish it on \
                 loopback only (docker/podman: -p 127.0.0.1:{hp}:{tp}), or remove the publication"
            )
        } else {
            format!(
                "ホストのポート {hp}/{proto} が NAT ルールでこのリスナーに公開されています。\
                 ループバックのみに公開する（docker/podman: -p 127.0.0.1:{hp}:{tp}）か、公開をやめます"
            )
        },
        commands: Vec::new(),
        config: None,
    });
    let (ipt, nft_family) = match p.target {
        IpAddr::V4(_) => ("iptables", "ip"),
        IpAddr::V6(_) => ("ip6tables", "ip6"),
    };
    let chain = if p.docker { "DOCKER-USER" } else { "FORWARD" };
    let target = p.target;
    steps.push(Step {
        kind: StepKind::Forward,
        title: if en {
            format!(
                "Or drop the forwarded traffic from {iface}: iptables ({chain}{}; not persistent: \
                 save it) or nftables (assumes an inet filter table with a forward chain)",
                if p.docker {
                    ", the chain docker keeps first in FORWARD"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "または {iface} から転送される通信を遮断します: iptables（{chain}。永続化されないため保存が必要）か \
                 nftables（inet filter テーブルと forward チェーンが前提）"
            )
        },
        commands: vec![
            format!("{ipt} -I {chain} -i {iface} -p {proto} -d {target} --dport {tp} -j DROP"),
            format!(
                "nft 'insert rule inet filter forward iifname {iface} {nft_family} daddr {target} {proto} dport {tp} drop'"
            ),
        ],
        config: None,
    });
}

/// Builds the message, summary and steps for an alert.
///
/// Steps, in order: stop/disable the unit (or find the owner / handle the
/// container), bind the daemon to loopback (catalogue hint), then firewalld,
/// nftables and iptables commands. Loopback-only verdicts (possible with deny
/// rules) get only the first kind: a firewall cannot help there.
pub fn remediation(l: &Listener<'_>, v: &Verdict<'_>, lang: Lang) -> Remediation {
    let entry = v.rule;
    let mut steps = Vec::new();
    owner_steps(l, entry, lang, &mut steps);
    let local_only = v.effective_scope == Scope::Loopback;
    if !local_only {
        if let Some(h) = entry.and_then(|e| e.loopback.as_ref()) {
            // Restart the listener's own unit only; any other name (the catalogue's usual
            // unit) may be a different daemon that happens to be installed.
            let own = l.systemd_unit.filter(|u| {
                l.container_id.is_none()
                    && l.pid != Some(1)
                    && !(u.ends_with(".socket") || u.ends_with(".scope") || u.ends_with(".slice"))
            });
            let restart = match own {
                Some(u) => format!("{} restart -- {}", systemctl_for(l), sh_quote(u)),
                None => "systemctl restart -- <unit>".to_owned(),
            };
            steps.push(Step {
                kind: StepKind::BindLoopback,
                title: match lang {
                    Lang::En => h.en.clone(),
                    Lang::Ja => h.ja.clone().unwrap_or_else(|| h.en.clone()),
                },
                commands: vec![restart],
                config: Some(ConfigEdit {
                    file: h.file.clone(),
                    lines: h.lines.clone(),
                }),
            });
        }
        // Already filtered by the host firewall: a firewall rule is not the step to take.
        // Reached through a NAT rule: the traffic takes the forward path, where an
        // input-chain rule never sees it.
        if v.outcome != super::Outcome::Filtered {
            match l.published {
                Some(p) => forward_steps(l, &p, lang, &mut steps),
                None => firewall_steps(l, v, entry, lang, &mut steps),
            }
        }
    }
    Remediation {
        lang,
        message: message(l, v, lang),
        summary: summary(v, lang),
        reference: entry.and_then(|e| e.reference.clone()),
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Classifier, Exposure, Transport, parse_rules};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test literal")
    }

    fn run(c: &Classifier, l: &Listener<'_>, ifaces: &[&str], lang: Lang) -> Remediation {
        let ifs: Vec<IpAddr> = ifaces.iter().map(|s| ip(s)).collect();
        let e = Exposure::new(l.addr, l.v6only, Some(&ifs));
        let v = c.classify(l, &e);
        remediation(l, &v, lang)
    }

    #[test]
    fn a_published_listener_gets_forward_steps_not_input_ones() {
        let c = Classifier::new(None);
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 6379);
        l.container_id = Some("0123456789abcdef0123");
        l.published = Some(crate::classify::Published {
            host_port: 16379,
            target: ip("172.17.0.2"),
            target_port: 6379,
            interface: "eth0",
            docker: true,
        });
        let r = run(&c, &l, &["127.0.0.1", "203.0.113.5"], Lang::En);
        let cmds: Vec<&str> = r.commands().collect();
        for want in [
            "iptables -I DOCKER-USER -i eth0 -p tcp -d 172.17.0.2 --dport 6379 -j DROP",
            "nft 'insert rule inet filter forward iifname eth0 ip daddr 172.17.0.2 tcp dport 6379 drop'",
        ] {
            assert!(cmds.contains(&want), "missing {want:?} in {cmds:#?}");
        }
        assert!(
            !cmds
                .iter()
                .any(|c| c.contains(" INPUT ") || c.contains("filter input")),
            "an input-chain rule does not see forwarded traffic: {cmds:#?}"
        );
        assert!(
            r.steps
                .iter()
                .any(|s| s.kind == StepKind::Forward && s.title.contains("-p 127.0.0.1:16379:6379")),
            "{:#?}",
            r.steps
        );
        // Not docker's rule: FORWARD; an interface name that could carry quotes is not
        // pasted into a command.
        l.published = Some(crate::classify::Published {
            docker: false,
            interface: "ev'il",
            ..l.published.unwrap()
        });
        let r = run(&c, &l, &["127.0.0.1", "203.0.113.5"], Lang::En);
        let cmds: Vec<&str> = r.commands().collect();
        assert!(
            cmds.contains(&"iptables -I FORWARD -i <public-interface> -p tcp -d 172.17.0.2 --dport 6379 -j DROP"),
            "{cmds:#?}"
        );
        assert!(!cmds.iter().any(|c| c.contains("ev'il")), "{cmds:#?}");
    }

    #[test]
    fn memcached_message_and_steps_en() {
        let c = Classifier::new(None);
        let mut l = Listener::new(Transport::Udp, ip("0.0.0.0"), 11211);
        l.systemd_unit = Some("memcached.service");
        let r = run(&c, &l, &["127.0.0.1", "203.0.113.5"], Lang::En);
        assert_eq!(
            r.message,
            "memcached (11211/udp) is listening on all interfaces (0.0.0.0) including public address \
             203.0.113.5; it is used for UDP reflection attacks and exposes cached data without authentication."
        );
        let cmds: Vec<&str> = r.commands().collect();
        for want in [
            "systemctl stop -- memcached.service",
            "systemctl disable -- memcached.service",
            "systemctl restart -- memcached.service",
            "ss -Hlunp 'sport = :11211'",
            "firewall-cmd --permanent --remove-port=11211/udp && firewall-cmd --reload",
            "firewall-cmd --permanent --remove-service=memcache && firewall-cmd --reload",
            "nft 'insert rule inet filter input iifname != \"lo\" udp dport 11211 drop'",
            "iptables -I INPUT ! -i lo -p udp --dport 11211 -j DROP",
        ] {
            assert!(cmds.contains(&want), "missing {want:?} in {cmds:#?}");
        }
        // 0.0.0.0 is IPv4 only: no ip6tables.
        assert!(!cmds.iter().any(|c| c.starts_with("ip6tables")));
        let bind = r
            .steps
            .iter()
            .find(|s| s.kind == StepKind::BindLoopback)
            .expect("bind step");
        assert!(
            bind.config
                .as_ref()
                .is_some_and(|c| c.lines.contains(&"-l 127.0.0.1".to_owned()))
        );
        assert!(r.summary.starts_with("memcached has no authentication"));
        assert!(r.reference.is_some());
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["steps"][0]["kind"], "stop-service");
    }

    #[test]
    fn japanese_message() {
        let c = Classifier::new(None);
        let l = Listener::new(Transport::Udp, ip("0.0.0.0"), 11211);
        let r = run(&c, &l, &["203.0.113.5"], Lang::Ja);
        assert_eq!(
            r.message,
            "memcached (11211/udp) が全インターフェース (0.0.0.0、グローバルアドレス 203.0.113.5 を含む) で待ち受けています\
             （UDP リフレクション攻撃に悪用され、キャッシュ内容が認証なしで読み書きされます）。"
        );
        assert!(r.summary.contains("不要であれば停止"));
        assert!(r.steps.iter().all(|s| !s.title.is_empty()));
        let find = &r.steps[0];
        assert_eq!(find.kind, StepKind::FindOwner);
        assert!(find.title.contains("memcached.service"));
        assert!(
            find.commands
                .contains(&"ss -Hlunp 'sport = :11211'".to_owned())
        );
    }

    #[test]
    fn ipv6_and_specific_address_firewall_rules() {
        let c = Classifier::new(None);
        let mut l = Listener::new(Transport::Tcp, ip("::"), 6379);
        l.v6only = Some(false);
        let r = run(&c, &l, &["2001:db8::5", "10.0.0.1"], Lang::En);
        assert!(
            r.message.contains(
                "all interfaces (::, IPv4 and IPv6) including public address 2001:db8::5"
            )
        );
        let cmds: Vec<&str> = r.commands().collect();
        assert!(cmds.contains(&"iptables -I INPUT ! -i lo -p tcp --dport 6379 -j DROP"));
        assert!(cmds.contains(&"ip6tables -I INPUT ! -i lo -p tcp --dport 6379 -j DROP"));
        let l = Listener::new(Transport::Tcp, ip("2001:db8::5"), 6379);
        let r = run(&c, &l, &[], Lang::En);
        let cmds: Vec<&str> = r.commands().collect();
        assert!(cmds.contains(&"ip6tables -I INPUT -d 2001:db8::5 -p tcp --dport 6379 -j DROP"));
        assert!(cmds.contains(
            &"nft 'insert rule inet filter input ip6 daddr 2001:db8::5 tcp dport 6379 drop'"
        ));
        assert!(!cmds.iter().any(|c| c.starts_with("iptables ")));
        let l = Listener::new(Transport::Tcp, ip("10.0.0.5"), 3306);
        let r = run(&c, &l, &[], Lang::En);
        assert!(
            r.message.starts_with(
                "MySQL / MariaDB (3306/tcp) is listening on private address 10.0.0.5;"
            )
        );
    }

    #[test]
    fn owner_variants() {
        let c = Classifier::new(None);
        // Known pid, no unit, nobody looked for holders: no kill, ss instead.
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 27017);
        l.pid = Some(4242);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(r.steps[0].commands, vec!["ss -Hltnp 'sport = :27017'"]);
        assert!(
            r.steps[0].title.contains("process 4242"),
            "{}",
            r.steps[0].title
        );
        assert!(!r.commands().any(|c| c.starts_with("kill")));
        // Holders found at alert time: those, and only those, are named.
        let holders = [4300, 4301];
        l.holders = Some(&holders);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            r.steps[0].commands,
            vec![
                "ss -Hltnp 'sport = :27017'",
                "systemctl status -- 4300",
                "systemctl status -- 4301",
                "kill 4300 4301"
            ]
        );
        assert!(!r.commands().any(|c| c.contains("4242")));
        // pid 1 among the holders is never killed.
        let with_init = [1, 4300];
        l.holders = Some(&with_init);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert!(r.commands().any(|c| c == "kill 4300"));
        assert!(
            !r.commands()
                .any(|c| c.starts_with("kill") && c.split(' ').any(|w| w == "1"))
        );
        // Looked, found nobody (the process is gone): no kill.
        l.holders = Some(&[]);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert!(!r.commands().any(|c| c.starts_with("kill")));
        // Socket activation: never "kill 1".
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 111);
        l.pid = Some(1);
        l.process_name = Some("systemd");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert!(r.commands().all(|c| c != "kill 1"));
        assert!(r.steps[0].title.contains("socket activation"));
        assert!(
            r.commands()
                .any(|c| c == "systemctl mask -- <socket-unit> <service-unit>")
        );
        // ...with the .socket unit known: stop and mask both it and its service.
        l.socket_unit = Some("rpcbind.socket");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            r.steps[0].commands,
            vec![
                "systemctl stop -- rpcbind.socket rpcbind.service",
                "systemctl mask -- rpcbind.socket rpcbind.service"
            ]
        );
        // A process that calls itself "systemd" is not socket activation.
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 111);
        l.pid = Some(5000);
        l.process_name = Some("systemd");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(r.steps[0].kind, StepKind::FindOwner);
        assert!(!r.steps[0].title.contains("socket activation"));
        assert!(!r.commands().any(|c| c.contains("<socket-unit>")));
        assert!(r.steps[0].title.contains("process 5000"));
        // A user manager's unit: stopped through that manager, never the system's.
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 6379);
        l.pid = Some(5001);
        l.systemd_unit = Some("ssh.service");
        l.user_manager = Some(1000);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            r.steps[0].commands,
            vec![
                "systemctl --user -M 1000@ stop -- ssh.service",
                "systemctl --user -M 1000@ disable -- ssh.service"
            ]
        );
        assert!(
            !r.commands()
                .any(|c| c.starts_with("systemctl stop") || c.starts_with("systemctl disable"))
        );
        assert!(r.commands().any(|c| c == "ss -Hltnp 'sport = :6379'"));
        assert!(r.steps.iter().any(|s| s.title.contains("process 5001")));
        // rpcbind.service: stop the .socket too, first.
        let mut l = Listener::new(Transport::Udp, ip("0.0.0.0"), 111);
        l.systemd_unit = Some("rpcbind.service");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            r.steps[0].commands,
            vec![
                "systemctl stop -- rpcbind.socket rpcbind.service",
                "systemctl disable -- rpcbind.socket rpcbind.service"
            ]
        );
        // Odd unit names are quoted.
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 8080);
        l.systemd_unit = Some("app\\x2dweb.service");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            r.steps[0].commands[0],
            "systemctl stop -- 'app\\x2dweb.service'"
        );
        // Container.
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 6379);
        l.container_id = Some("0123456789abcdef");
        let r = run(&c, &l, &["172.17.0.2"], Lang::En);
        assert!(
            r.message.contains("in container 0123456789ab"),
            "{}",
            r.message
        );
        assert!(
            r.message
                .contains("currently reachable from local networks only"),
            "{}",
            r.message
        );
        assert_eq!(r.steps[0].kind, StepKind::Container);
        assert!(
            r.steps[0]
                .commands
                .iter()
                .any(|c| c.contains("DOCKER-USER"))
        );
    }

    #[test]
    fn bind_to_loopback_restarts_only_the_listeners_own_unit() {
        let c = Classifier::new(None);
        let restart = |r: &Remediation| {
            r.steps
                .iter()
                .find(|s| s.kind == StepKind::BindLoopback)
                .expect("bind step")
                .commands
                .clone()
        };
        // No unit: a placeholder, not the catalogue's memcached.service.
        let mut l = Listener::new(Transport::Udp, ip("0.0.0.0"), 11211);
        l.pid = Some(77);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(restart(&r), vec!["systemctl restart -- <unit>"]);
        // Its own unit.
        l.systemd_unit = Some("memcached.service");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(restart(&r), vec!["systemctl restart -- memcached.service"]);
        // A login session scope is not a unit to restart.
        l.systemd_unit = Some("session-3.scope");
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(restart(&r), vec!["systemctl restart -- <unit>"]);
        // A user unit: through the user's manager.
        l.systemd_unit = Some("memcached.service");
        l.user_manager = Some(1000);
        let r = run(&c, &l, &["203.0.113.5"], Lang::En);
        assert_eq!(
            restart(&r),
            vec!["systemctl --user -M 1000@ restart -- memcached.service"]
        );
    }

    #[test]
    fn deny_messages() {
        let p = parse_rules(
            "[[deny]]\nport = 4444\nreason = \"Metasploit default port.\"\n",
            "rules.toml",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        let mut l = Listener::new(Transport::Tcp, ip("127.0.0.1"), 4444);
        l.process_name = Some("nc");
        let r = run(&c, &l, &[], Lang::En);
        assert_eq!(
            r.message,
            "Port 4444/tcp (nc) is listening on loopback address 127.0.0.1, which the site policy forbids: Metasploit default port."
        );
        // Loopback: only the owner step, no firewall.
        assert_eq!(r.steps.len(), 1);
        assert_eq!(
            r.summary,
            "Metasploit default port. Stop it if it is not needed."
        );
        let r = run(&c, &l, &[], Lang::Ja);
        assert_eq!(
            r.message,
            "ポート 4444/tcp (nc) がループバックアドレス 127.0.0.1 で待ち受けていますが、サイトのポリシーで禁止されています（Metasploit default port）。"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("memcached.service"), "memcached.service");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
