//! Risk classification of listening sockets.
//!
//! Given a listener (transport, address, port, and whatever attribution is
//! known) and its [`Exposure`], the [`Classifier`] decides whether it is a
//! risky service reachable from where it should not be, and how severe that
//! is. [`remediation`](mod@remediation) turns a verdict into text and commands for a person,
//! and [`fold::Folder`] keeps a restart loop from flooding alerts.
//!
//! # Semantics
//!
//! A listener is *risky* when its (port, transport) is in the built-in
//! catalogue ([`catalogue::builtin`]) or in a site `[[risky]]` entry (which
//! wins over the catalogue for the same pair). Whether it alerts depends on
//! the *effective scope* ([`Exposure::effective_scope`]):
//!
//! | effective scope | catalogue / `[[risky]]` port |
//! | --- | --- |
//! | loopback | no alert (SMTP or MySQL on 127.0.0.1 is how it should be) |
//! | public (public address, or wildcard reached by a public address or with unknown addresses) | alert at the entry's severity |
//! | private, link-local, multicast (incl. wildcard on a host with no public address) | alert with severity **lowered one step** (configurable: `[settings] private_exposure`) |
//!
//! Local-network exposure still alerts because other hosts on a LAN, VPC or
//! VPN are where lateral movement starts, and a port forward or load balancer
//! can expose a private address; it is rated one step lower because it is not
//! reachable by internet-wide scanning. A wildcard bind is never rated below
//! private (see [`Exposure::effective_scope`]).
//!
//! Then policy ([`rules`]):
//! * `[[deny]]` matches alert **always**, on any scope including loopback and
//!   on ports outside the catalogue, at the rule's severity (else the
//!   entry's, else high), never lowered and not subject to `min_severity`.
//!   An explicit prohibition is the site saying "this must never listen".
//! * `[[allow]]` matches silence an alert (`allowed_by` names the rule).
//! * Deny beats allow.
//! * Alerts below `[settings] min_severity` are dropped.
//!
//! # Cost
//!
//! [`Classifier::classify`] is O(1) for the common case (a port-indexed table
//! per transport, plus a port bitset for deny rules) and never allocates: the
//! verdict borrows entries and labels from the classifier.

pub mod catalogue;
pub mod exposure;
pub mod firewall;
pub mod fold;
pub mod model;
pub mod remediation;
pub mod rules;

use std::net::IpAddr;

use serde::{Serialize, Serializer};

pub use catalogue::{EntryOrigin, LoopbackHint, RiskEntry};
pub use exposure::{
    Exposure, Scope, ScopeSet, Stack, interface_addrs, interface_addrs_in_netns,
    interface_addrs_named, interface_addrs_named_in_netns, scope_of,
};
pub use fold::{FoldDecision, FoldKey, Folder};
pub use model::{Lang, Localized, PortSpec, Severity, Transport, lang_from_env};
pub use remediation::{Remediation, Step, StepKind, message, remediation};
pub use rules::{
    MatchRule, Policy, PrivateExposure, RulesError, Settings, load_rules, parse_rules,
};

/// One listening socket as seen by the sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Listener<'a> {
    /// TCP or UDP.
    pub transport: Transport,
    /// Bound address (v4-mapped IPv6 is fine; it is canonicalised).
    pub addr: IpAddr,
    /// Bound port.
    pub port: u16,
    /// IPV6_V6ONLY of an IPv6 socket, if known.
    pub v6only: Option<bool>,
    /// Process name (comm, at most 15 bytes).
    pub process_name: Option<&'a str>,
    /// Executable path.
    pub executable: Option<&'a str>,
    /// Owning systemd unit.
    pub systemd_unit: Option<&'a str>,
    /// Container id, when the process runs in a container.
    pub container_id: Option<&'a str>,
    /// Process id, used in remediation (`systemctl status PID`, `kill PID`).
    pub pid: Option<u32>,
    /// Real uid of the task that listened (kernel-captured).
    pub uid: Option<u32>,
    /// Its user name, where the host knows it.
    pub user_name: Option<&'a str>,
    /// Set when `systemd_unit` is run by user N's manager (`user@N.service`), not by
    /// the system manager: the uid N.
    pub user_manager: Option<u32>,
    /// Owner (uid) of the executable file.
    pub executable_owner: Option<u32>,
    /// Processes found holding the socket's inode when the alert was made; `None` when
    /// nobody looked. Only these are named in a `kill` step.
    pub holders: Option<&'a [u32]>,
    /// The `.socket` unit that listens on this port, when pid 1 holds the socket.
    pub socket_unit: Option<&'a str>,
    /// The host port a NAT rule of another namespace sends to it (DNAT): traffic that
    /// takes the forward path, which an input-chain rule never sees.
    #[serde(skip)]
    pub published: Option<Published<'a>>,
}

/// How a listener is reached through a DNAT rule of another namespace, for the advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published<'a> {
    /// The host port (and address the probe used).
    pub host_port: u16,
    /// Where the NAT sends it: the listener's own address and port.
    pub target: IpAddr,
    pub target_port: u16,
    /// The interface the published traffic comes in on.
    pub interface: &'a str,
    /// The NAT rule is docker's (its `DOCKER` chain): filter in `DOCKER-USER`, which
    /// docker keeps first in FORWARD.
    pub docker: bool,
}

impl<'a> Listener<'a> {
    /// A listener with no attribution; set the other fields as known.
    pub fn new(transport: Transport, addr: IpAddr, port: u16) -> Self {
        Listener {
            transport,
            addr,
            port,
            v6only: None,
            process_name: None,
            executable: None,
            systemd_unit: None,
            container_id: None,
            pid: None,
            uid: None,
            user_name: None,
            user_manager: None,
            executable_owner: None,
            holders: None,
            socket_unit: None,
            published: None,
        }
    }
}

/// Why a verdict came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Port not in the catalogue or `[[risky]]`, and no deny rule matched.
    NotRisky,
    /// Risky port, but only reachable over loopback.
    LoopbackOnly,
    /// Risky port reachable from the internet: alert.
    Exposed,
    /// Risky port reachable from local networks only: alert (possibly lowered).
    ExposedLocal,
    /// Local-network exposure ignored by `private_exposure = "ignore"`.
    LocalIgnored,
    /// Risky port exposed by its address, but the host firewall filters new
    /// connections from there: alert one severity step lower, without the firewall
    /// steps (the operator still wants to know: a ruleset can change, and upstream
    /// filtering is not the host's).
    Filtered,
    /// Severity below `min_severity`.
    BelowThreshold,
    /// Silenced by an `[[allow]]` rule.
    Allowed,
    /// Raised by a `[[deny]]` rule.
    Denied,
}

/// The classifier's answer for one listener. Borrows from the [`Classifier`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Verdict<'c> {
    /// The exposure the decision was based on.
    pub exposure: Exposure,
    /// [`Exposure::effective_scope`], which drove the decision.
    pub effective_scope: Scope,
    /// The catalogue or `[[risky]]` entry the (port, transport) matched.
    #[serde(serialize_with = "ser_entry_id")]
    pub rule: Option<&'c RiskEntry>,
    /// Whether a person should be alerted.
    pub alert: bool,
    /// Severity as rated for this exposure (after lowering / deny severity).
    /// `None` when nothing risky matched or the exposure is loopback only.
    pub severity: Option<Severity>,
    /// Label of the `[[allow]]` rule that silenced the alert.
    pub allowed_by: Option<&'c str>,
    /// The `[[deny]]` rule that raised the alert.
    #[serde(serialize_with = "ser_rule_label")]
    pub denied_by: Option<&'c MatchRule>,
    /// Why.
    pub outcome: Outcome,
}

fn ser_entry_id<S: Serializer>(e: &Option<&RiskEntry>, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_some(&e.id),
        None => s.serialize_none(),
    }
}

fn ser_rule_label<S: Serializer>(r: &Option<&MatchRule>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_some(&r.label),
        None => s.serialize_none(),
    }
}

impl<'c> Verdict<'c> {
    /// Identifier for alert folding and logs: the entry id, else the deny
    /// rule's label, else `None`.
    pub fn rule_id(&self) -> Option<&'c str> {
        self.rule
            .map(|e| e.id.as_str())
            .or(self.denied_by.map(|d| d.label.as_str()))
    }
}

/// Number of ports per transport; the index tables have one slot per port.
const PORTS: usize = 1 << 16;
/// Marks an empty slot in the port index.
const NO_ENTRY: u16 = u16::MAX;

/// Decides verdicts; build once (catalogue + optional policy), query per event.
#[derive(Debug, Clone)]
pub struct Classifier {
    entries: Vec<RiskEntry>,
    /// Per transport: entry index for each port, `NO_ENTRY` if none.
    index: [Box<[u16]>; 2],
    allow: Vec<MatchRule>,
    deny: Vec<MatchRule>,
    /// Per transport: bit set for each port some port-constrained deny rule names.
    deny_ports: [Box<[u64]>; 2],
    /// Some deny rule has no port condition, so every event must check them.
    deny_portless: bool,
    settings: Settings,
}

fn bit_set(bits: &mut [u64], port: u16) {
    bits[usize::from(port) / 64] |= 1 << (port % 64);
}

fn bit_get(bits: &[u64], port: u16) -> bool {
    bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
}

impl Classifier {
    /// Builds a classifier from the built-in catalogue and an optional policy.
    pub fn new(policy: Option<Policy>) -> Self {
        let policy = policy.unwrap_or_default();
        let mut entries: Vec<RiskEntry> = catalogue::builtin().to_vec();
        // Site entries come last so they overwrite catalogue slots below.
        // parse_rules caps [[risky]] at MAX_RISKY, keeping indexes < NO_ENTRY.
        entries.extend(policy.risky.into_iter().take(rules::MAX_RISKY));
        for o in &policy.severity {
            for e in entries.iter_mut().filter(|e| e.id == o.rule) {
                e.severity = o.severity;
            }
        }
        let mut index = [
            vec![NO_ENTRY; PORTS].into_boxed_slice(),
            vec![NO_ENTRY; PORTS].into_boxed_slice(),
        ];
        for (i, e) in entries.iter().enumerate() {
            let Ok(i) = u16::try_from(i) else { break };
            for p in &e.ports {
                for port in p.lo..=p.hi {
                    for t in &e.protocols {
                        index[t.index()][usize::from(port)] = i;
                    }
                }
            }
        }
        let mut deny_ports = [
            vec![0u64; PORTS / 64].into_boxed_slice(),
            vec![0u64; PORTS / 64].into_boxed_slice(),
        ];
        let mut deny_portless = false;
        for d in &policy.deny {
            if !d.has_ports() {
                deny_portless = true;
                continue;
            }
            let transports: &[Transport] = if d.protocols.is_empty() {
                &[Transport::Tcp, Transport::Udp]
            } else {
                &d.protocols
            };
            for p in &d.ports {
                for port in p.lo..=p.hi {
                    for t in transports {
                        bit_set(&mut deny_ports[t.index()], port);
                    }
                }
            }
        }
        Classifier {
            entries,
            index,
            allow: policy.allow,
            deny: policy.deny,
            deny_ports,
            deny_portless,
            settings: policy.settings,
        }
    }

    /// Every port that a catalogue / `[[risky]]` entry or a port-constrained deny rule
    /// names, on either transport, one bit per port: what the kernel programs send in
    /// their urgent lane even on loopback.
    pub fn important_ports(&self) -> Vec<u64> {
        let mut bits = vec![0u64; PORTS / 64];
        for t in 0..2 {
            for (port, i) in self.index[t].iter().enumerate() {
                if *i != NO_ENTRY {
                    bits[port / 64] |= 1 << (port % 64);
                }
            }
            for (w, d) in bits.iter_mut().zip(self.deny_ports[t].iter()) {
                *w |= d;
            }
        }
        bits
    }

    /// The catalogue / `[[risky]]` entry for a (transport, port), if any.
    pub fn lookup(&self, transport: Transport, port: u16) -> Option<&RiskEntry> {
        let i = self.index[transport.index()][usize::from(port)];
        if i == NO_ENTRY {
            None
        } else {
            self.entries.get(usize::from(i))
        }
    }

    /// An entry by id (with severity overrides applied).
    pub fn entry(&self, id: &str) -> Option<&RiskEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// All entries: catalogue then site.
    pub fn entries(&self) -> &[RiskEntry] {
        &self.entries
    }

    /// The policy settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Classifies one listener. Allocation-free.
    pub fn classify(&self, l: &Listener<'_>, exposure: &Exposure) -> Verdict<'_> {
        let entry = self.lookup(l.transport, l.port);
        let entry_id = entry.map(|e| e.id.as_str());
        let eff = exposure.effective_scope();
        let mut v = Verdict {
            exposure: *exposure,
            effective_scope: eff,
            rule: entry,
            alert: false,
            severity: None,
            allowed_by: None,
            denied_by: None,
            outcome: Outcome::NotRisky,
        };

        // The bitset keeps the no-deny-rule path to one memory read.
        let deny_possible =
            self.deny_portless || bit_get(&self.deny_ports[l.transport.index()], l.port);
        if deny_possible
            && let Some(d) = self.deny.iter().find(|d| d.matches(l, exposure, entry_id))
        {
            v.denied_by = Some(d);
            v.alert = true;
            v.severity = Some(
                d.severity
                    .or(entry.map(|e| e.severity))
                    .unwrap_or(Severity::High),
            );
            v.outcome = Outcome::Denied;
            return v;
        }

        let Some(e) = entry else { return v };
        let (severity, outcome) = match eff {
            Scope::Loopback => {
                v.outcome = Outcome::LoopbackOnly;
                return v;
            }
            Scope::Public | Scope::AllInterfaces => (e.severity, Outcome::Exposed),
            Scope::Private | Scope::LinkLocal | Scope::Multicast => {
                match self.settings.private_exposure {
                    PrivateExposure::Lower => (e.severity.lowered(), Outcome::ExposedLocal),
                    PrivateExposure::Alert => (e.severity, Outcome::ExposedLocal),
                    PrivateExposure::Ignore => {
                        v.severity = Some(e.severity.lowered());
                        v.outcome = Outcome::LocalIgnored;
                        return v;
                    }
                }
            }
        };
        let (severity, outcome) =
            if exposure.firewall == Some(crate::classify::firewall::State::Filtered) {
                (severity.lowered(), Outcome::Filtered)
            } else {
                (severity, outcome)
            };
        v.severity = Some(severity);
        if severity < self.settings.min_severity {
            v.outcome = Outcome::BelowThreshold;
            return v;
        }
        if let Some(a) = self.allow.iter().find(|a| a.matches(l, exposure, entry_id)) {
            v.allowed_by = Some(&a.label);
            v.outcome = Outcome::Allowed;
            return v;
        }
        v.alert = true;
        v.outcome = outcome;
        v
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::new(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test literal")
    }

    const PUBLIC_HOST: &[&str] = &["127.0.0.1", "::1", "10.0.0.5", "203.0.113.5", "fe80::1"];

    fn ifaces(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| ip(s)).collect()
    }

    fn check<'c>(c: &'c Classifier, l: &Listener<'_>, host: &[&str]) -> Verdict<'c> {
        let ifs = ifaces(host);
        let e = Exposure::new(l.addr, l.v6only, Some(&ifs));
        c.classify(l, &e)
    }

    #[test]
    fn wildcard_memcached_alerts_on_tcp_and_udp() {
        let c = Classifier::new(None);
        for t in [Transport::Tcp, Transport::Udp] {
            let l = Listener::new(t, ip("0.0.0.0"), 11211);
            let v = check(&c, &l, PUBLIC_HOST);
            assert!(v.alert, "{t}");
            assert_eq!(v.outcome, Outcome::Exposed);
            assert_eq!(v.rule.map(|e| e.id.as_str()), Some("memcached"));
            assert_eq!(v.severity, Some(Severity::Critical));
            assert_eq!(v.effective_scope, Scope::Public);
        }
        // Dual-stack :: too.
        let l = Listener::new(Transport::Udp, ip("::"), 11211);
        assert!(check(&c, &l, PUBLIC_HOST).alert);
    }

    #[test]
    fn loopback_is_quiet() {
        let c = Classifier::new(None);
        let l = Listener::new(Transport::Tcp, ip("127.0.0.1"), 3306);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(!v.alert);
        assert_eq!(v.outcome, Outcome::LoopbackOnly);
        assert_eq!(v.severity, None);
        assert_eq!(v.rule.map(|e| e.id.as_str()), Some("mysql"));
        let l = Listener::new(Transport::Udp, ip("::1"), 5353);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(!v.alert);
        assert_eq!(v.outcome, Outcome::LoopbackOnly);
        let l = Listener::new(Transport::Tcp, ip("::ffff:127.0.0.1"), 6379);
        assert!(!check(&c, &l, PUBLIC_HOST).alert);
    }

    #[test]
    fn not_in_catalogue_is_quiet() {
        let c = Classifier::new(None);
        for (t, port) in [
            (Transport::Tcp, 25),
            (Transport::Udp, 3306),
            (Transport::Tcp, 443),
        ] {
            let l = Listener::new(t, ip("0.0.0.0"), port);
            let v = check(&c, &l, PUBLIC_HOST);
            assert!(!v.alert && v.rule.is_none() && v.outcome == Outcome::NotRisky);
        }
    }

    #[test]
    fn private_exposure_is_lowered() {
        let c = Classifier::new(None);
        let l = Listener::new(Transport::Tcp, ip("10.0.0.5"), 27017);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(v.alert);
        assert_eq!(v.outcome, Outcome::ExposedLocal);
        assert_eq!(v.severity, Some(Severity::High)); // critical lowered
        // Wildcard on a host without public addresses: private, lowered.
        let l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 6379);
        let v = check(&c, &l, &["127.0.0.1", "192.168.1.10"]);
        assert!(v.alert);
        assert_eq!(v.effective_scope, Scope::Private);
        assert_eq!(v.severity, Some(Severity::High));
        // Public address bound directly: full severity.
        let l = Listener::new(Transport::Tcp, ip("203.0.113.5"), 6379);
        assert_eq!(
            check(&c, &l, PUBLIC_HOST).severity,
            Some(Severity::Critical)
        );
    }

    #[test]
    fn a_filtered_listener_still_alerts_one_step_lower() {
        let c = Classifier::new(None);
        let l = Listener::new(Transport::Udp, ip("0.0.0.0"), 11211);
        let ifs = ifaces(PUBLIC_HOST);
        let mut e = Exposure::new(l.addr, l.v6only, Some(&ifs));
        e.firewall = Some(crate::classify::firewall::State::Filtered);
        let v = c.classify(&l, &e);
        assert!(v.alert);
        assert_eq!(v.outcome, Outcome::Filtered);
        assert_eq!(v.severity, Some(Severity::High));
        // The alert says so, and offers no firewall rule to add.
        let fix = remediation::remediation(&l, &v, Lang::En);
        assert!(
            fix.message
                .contains("the host firewall filters new connections"),
            "{}",
            fix.message
        );
        assert!(!fix.steps.iter().any(|s| matches!(
            s.kind,
            StepKind::Firewalld | StepKind::Nftables | StepKind::Iptables
        )));
        for s in [
            crate::classify::firewall::State::Accepted,
            crate::classify::firewall::State::Unknown,
        ] {
            e.firewall = Some(s);
            let v = c.classify(&l, &e);
            assert_eq!(
                (v.outcome, v.severity),
                (Outcome::Exposed, Some(Severity::Critical))
            );
        }
    }

    #[test]
    fn settings_change_private_handling() {
        let p = parse_rules("[settings]\nprivate_exposure = \"ignore\"\n", "r").expect("rules");
        let c = Classifier::new(Some(p));
        let l = Listener::new(Transport::Tcp, ip("10.0.0.5"), 27017);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(!v.alert);
        assert_eq!(v.outcome, Outcome::LocalIgnored);
        let p = parse_rules(
            "[settings]\nprivate_exposure = \"alert\"\nmin_severity = \"high\"\n",
            "r",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        assert_eq!(
            check(&c, &l, PUBLIC_HOST).severity,
            Some(Severity::Critical)
        );
        // http-alt is medium: below the threshold.
        let l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 8080);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(!v.alert);
        assert_eq!(v.outcome, Outcome::BelowThreshold);
    }

    #[test]
    fn allow_by_process_name_checks_executable_and_owners() {
        let p = parse_rules(
            "[[allow]]\nport = 11211\nprocess = \"memcached\"\n\
             [[allow]]\nport = 6379\nprocess = \"redis-server\"\n\
             executable = \"/opt/redis/bin/redis-server\"\nuser = \"redis\"\n\
             [[allow]]\nport = 5432\nuid = 1000\n\
             [[allow]]\nport = 3306\nunit = \"mysql\"\n",
            "rules.toml",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        let genuine = |port| {
            let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), port);
            l.process_name = Some("memcached");
            l.executable = Some("/usr/bin/memcached");
            l.executable_owner = Some(0);
            l.uid = Some(104);
            l.user_name = Some("memcache");
            l
        };
        let mut l = genuine(11211);
        l.transport = Transport::Udp;
        assert!(
            !check(&c, &l, PUBLIC_HOST).alert,
            "the real daemon is allowed"
        );
        // uid 1000 naming itself memcached: its executable is python3.
        let mut fake = l;
        fake.executable = Some("/usr/bin/python3.11");
        fake.uid = Some(1000);
        assert!(check(&c, &fake, PUBLIC_HOST).alert);
        // ...running the real binary as a login user.
        let mut fake = l;
        fake.uid = Some(1000);
        assert!(check(&c, &fake, PUBLIC_HOST).alert);
        // ...its own copy of a binary called memcached.
        let mut fake = l;
        fake.executable = Some("/home/u/memcached");
        fake.executable_owner = Some(1000);
        assert!(check(&c, &fake, PUBLIC_HOST).alert);
        // ...executable unknown.
        let mut fake = l;
        fake.executable = None;
        assert!(check(&c, &fake, PUBLIC_HOST).alert);

        // With executable and user pinned, those decide.
        let mut r = genuine(6379);
        r.process_name = Some("redis-server");
        r.executable = Some("/opt/redis/bin/redis-server");
        r.uid = Some(1001);
        r.user_name = Some("redis");
        assert!(!check(&c, &r, PUBLIC_HOST).alert);
        r.user_name = Some("mallory");
        assert!(check(&c, &r, PUBLIC_HOST).alert);

        // uid condition.
        let mut u = Listener::new(Transport::Tcp, ip("0.0.0.0"), 5432);
        u.uid = Some(1000);
        assert!(!check(&c, &u, PUBLIC_HOST).alert);
        u.uid = Some(1001);
        assert!(check(&c, &u, PUBLIC_HOST).alert);

        // unit: a user manager's unit of the same name does not match.
        let mut m = Listener::new(Transport::Tcp, ip("0.0.0.0"), 3306);
        m.systemd_unit = Some("mysql.service");
        assert!(!check(&c, &m, PUBLIC_HOST).alert);
        m.user_manager = Some(1000);
        assert!(check(&c, &m, PUBLIC_HOST).alert);
    }

    #[test]
    fn rules_check_warns_about_names_a_user_controls() {
        let p = parse_rules(
            "[[allow]]\nport = 11211\nprocess = \"memcached\"\n\
             [[allow]]\nname = \"pinned\"\nport = 6379\nprocess = \"redis-server\"\n\
             executable = \"/usr/bin/redis-server\"\nuser = \"redis\"\n\
             [[deny]]\nport = 4444\nprocess = \"nc\"\n",
            "rules.toml",
        )
        .expect("rules");
        let w = p.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("rules.toml:1: [[allow]] matches on the process name"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn allow_rule_silences() {
        let p = parse_rules(
            "[[allow]]\nport = 11211\nprocess = \"memcached\"\nscope = [\"private\"]\n",
            "rules.toml",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        let mut l = Listener::new(Transport::Udp, ip("10.0.0.5"), 11211);
        l.process_name = Some("memcached");
        // The name alone is not enough: executable, its owner and the uid back it.
        assert!(check(&c, &l, PUBLIC_HOST).alert);
        l.executable = Some("/usr/bin/memcached");
        l.executable_owner = Some(0);
        l.uid = Some(104);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(!v.alert);
        assert_eq!(v.outcome, Outcome::Allowed);
        assert_eq!(v.allowed_by, Some("rules.toml:1"));
        assert_eq!(v.severity, Some(Severity::High));
        // Same on a public address: the allow's scope does not match.
        l.addr = ip("203.0.113.5");
        assert!(check(&c, &l, PUBLIC_HOST).alert);
        // Wildcard on a private-only host matches scope "private".
        l.addr = ip("0.0.0.0");
        assert!(!check(&c, &l, &["10.0.0.5"]).alert);
        // ...but not on a host with a public address.
        assert!(check(&c, &l, PUBLIC_HOST).alert);
        // Another process name: not allowed.
        l.addr = ip("10.0.0.5");
        l.process_name = Some("nc");
        assert!(check(&c, &l, PUBLIC_HOST).alert);
    }

    #[test]
    fn deny_rule_raises() {
        let p = parse_rules(
            "[[deny]]\nname = \"no-4444\"\nport = 4444\nreason = \"backdoor port\"\n\
             [[deny]]\nport = 3306\nscope = \"loopback\"\nseverity = \"low\"\n\
             [[deny]]\nprocess = \"nc\"\n\
             [[allow]]\nport = 4444\n",
            "rules.toml",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        // Off-catalogue port, on loopback, and despite an allow rule.
        let l = Listener::new(Transport::Tcp, ip("127.0.0.1"), 4444);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(v.alert);
        assert_eq!(v.outcome, Outcome::Denied);
        assert_eq!(v.denied_by.map(|d| d.label.as_str()), Some("no-4444"));
        assert_eq!(v.severity, Some(Severity::High));
        assert_eq!(v.rule_id(), Some("no-4444"));
        // Catalogue port denied on loopback with its own severity.
        let l = Listener::new(Transport::Tcp, ip("127.0.0.1"), 3306);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(v.alert);
        assert_eq!(v.severity, Some(Severity::Low));
        assert_eq!(v.rule_id(), Some("mysql"));
        // Port-less deny by process.
        let mut l = Listener::new(Transport::Udp, ip("127.0.0.1"), 31337);
        l.process_name = Some("nc");
        assert!(check(&c, &l, PUBLIC_HOST).alert);
        l.process_name = Some("ncat");
        assert!(!check(&c, &l, PUBLIC_HOST).alert);
    }

    #[test]
    fn severity_override_and_site_entries() {
        let p = parse_rules(
            "[[severity]]\nrule = \"mysql\"\nseverity = \"critical\"\n\
             [[risky]]\nport = 9999\nprotocols = [\"tcp\"]\nservice = \"internal-admin\"\nseverity = \"high\"\nreason = \"Our admin daemon\"\n\
             [[risky]]\nid = \"site-redis\"\nport = 6379\nprotocols = \"tcp\"\nservice = \"Our Redis\"\nseverity = \"low\"\nreason = \"Sandbox\"\n",
            "rules.toml",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        let l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 3306);
        let v = check(&c, &l, PUBLIC_HOST);
        assert_eq!(v.severity, Some(Severity::Critical));
        assert_eq!(v.rule.map(|e| e.default_severity), Some(Severity::High));
        let l = Listener::new(Transport::Tcp, ip("203.0.113.5"), 9999);
        let v = check(&c, &l, PUBLIC_HOST);
        assert!(v.alert);
        assert_eq!(v.rule.map(|e| e.id.as_str()), Some("internal-admin"));
        assert_eq!(v.severity, Some(Severity::High));
        // The site entry replaces the catalogue one for 6379/tcp.
        let l = Listener::new(Transport::Tcp, ip("203.0.113.5"), 6379);
        let v = check(&c, &l, PUBLIC_HOST);
        assert_eq!(v.rule_id(), Some("site-redis"));
        assert_eq!(v.severity, Some(Severity::Low));
    }

    #[test]
    fn container_and_unit_conditions() {
        let p = parse_rules(
            "[[allow]]\nport = 8080\ncontainer = true\n\
             [[allow]]\nport = 5432\nunit = \"postgresql\"\n\
             [[deny]]\ncontainer = \"0123456789ab\"\nscope = \"public\"\n",
            "r",
        )
        .expect("rules");
        let c = Classifier::new(Some(p));
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 8080);
        assert!(check(&c, &l, PUBLIC_HOST).alert);
        l.container_id = Some("ffff");
        assert!(!check(&c, &l, PUBLIC_HOST).alert);
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 5432);
        l.systemd_unit = Some("postgresql.service");
        assert!(!check(&c, &l, PUBLIC_HOST).alert);
        let mut l = Listener::new(Transport::Tcp, ip("0.0.0.0"), 80);
        l.container_id = Some("0123456789abcdef0123");
        assert_eq!(check(&c, &l, PUBLIC_HOST).outcome, Outcome::Denied);
        assert_eq!(check(&c, &l, &["10.0.0.1"]).outcome, Outcome::NotRisky);
    }

    #[test]
    fn verdict_serializes() {
        let c = Classifier::new(None);
        let l = Listener::new(Transport::Udp, ip("0.0.0.0"), 11211);
        let v = check(&c, &l, PUBLIC_HOST);
        let j = serde_json::to_value(v).expect("json");
        assert_eq!(j["rule"], "memcached");
        assert_eq!(j["alert"], true);
        assert_eq!(j["severity"], "critical");
        assert_eq!(j["outcome"], "exposed");
        assert_eq!(j["exposure"]["scope"], "all-interfaces");
        assert_eq!(j["exposure"]["public_addr"], "203.0.113.5");
    }

    #[test]
    fn ranges_are_indexed() {
        let c = Classifier::new(None);
        assert_eq!(
            c.lookup(Transport::Tcp, 5905).map(|e| e.id.as_str()),
            Some("vnc")
        );
        assert_eq!(
            c.lookup(Transport::Tcp, 6063).map(|e| e.id.as_str()),
            Some("x11")
        );
        assert!(c.lookup(Transport::Tcp, 6064).is_none());
        assert!(c.lookup(Transport::Udp, 5900).is_none());
    }
}
