//! The pipeline's classify step: the exposure of each new listener (with the host
//! firewall's verdict), its verdict against the catalogue and the site policy, and the
//! alert event for a person, folded when a service restarts in a loop. It joins
//! `classify` (pure decisions) to the event `output` carries.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    attribution::procfs,
    attribution::scan,
    classify::firewall::{
        self, Firewall, IfAddr, RuleOut, State,
        eval::Verdict,
        model::Ruleset,
        nat::{self, PubKey, Publication, Published},
        read, watch,
    },
    classify::{
        Classifier, Exposure, FoldDecision, FoldKey, Folder, Lang, Listener, Policy, Scope,
        Transport, exposure, remediation,
    },
    output::event::{Action, AlertInfo, Event, ExposureOut, Log, Risk, Rule, ecs_severity},
};

/// How long the address list of a network namespace is reused before it is read again.
const IFACE_TTL: Duration = Duration::from_secs(5);
/// Bound on cached namespaces' address lists (cleared when exceeded).
const IFACE_CACHE_MAX: usize = 1024;

/// A namespace's interface addresses (plain, and with names and prefixes for the
/// firewall probe), shared by the events that need them.
struct NsAddrs {
    ips: Vec<IpAddr>,
    named: Vec<IfAddr>,
}
type Addrs = Arc<NsAddrs>;

/// The firewall side of the assessor: the ruleset of each namespace seen, and where to
/// ask for changes in it to be followed.
struct FirewallCtx {
    rulesets: HashMap<u64, Arc<Ruleset>>,
    watch: Option<std::sync::mpsc::Sender<watch::Request>>,
    /// Addresses of each followed namespace, as the watcher last read them.
    ns_ifaces: HashMap<u64, Arc<Vec<IfAddr>>>,
    /// What each followed namespace's NAT rules publish.
    publishers: HashMap<u64, Arc<Published>>,
}

pub struct Assessor {
    classifier: Classifier,
    folder: Folder,
    lang: Lang,
    ifaces: HashMap<u64, (Instant, Option<Addrs>)>,
    host_netns: Option<u64>,
    firewall: Option<FirewallCtx>,
    pub folded: u64,
    /// Scans of /proc for a socket's holders in the current second: (second start, count).
    holder_scans: (Instant, u32),
    /// Every publication the last assessed listener is behind (see [`Assessor::take_backs`]).
    backs: Vec<PubKey>,
}

/// Scans of every `/proc/<pid>/fd` for an alert's holders per second at most. Each costs
/// a readlink per open fd on the host, and a user who can make many distinct alerts
/// (copies of a binary on catalogued ports) must not make the agent do that unbounded;
/// past it an alert names no holder, so it has no `kill` step, only `ss`.
const HOLDER_SCANS_PER_SEC: u32 = 20;

impl Assessor {
    pub fn new(policy: Option<Policy>, lang: Lang, host_netns: Option<u64>) -> Assessor {
        Assessor {
            classifier: Classifier::new(policy),
            folder: Folder::default(),
            lang,
            ifaces: HashMap::new(),
            host_netns,
            firewall: None,
            folded: 0,
            holder_scans: (Instant::now(), 0),
            backs: Vec::new(),
        }
    }

    /// Ports the kernel must treat as important (bitmap, one bit per port).
    pub fn important_ports(&self) -> Vec<u64> {
        self.classifier.important_ports()
    }

    /// Replace the site rules (SIGHUP reload); the catalogue stays.
    pub fn set_policy(&mut self, policy: Option<Policy>) {
        self.classifier = Classifier::new(policy);
    }

    /// Work out the host firewall's verdict for each listener from now on. `watch`, when
    /// given, is told of every namespace whose ruleset is read, to follow its changes.
    pub fn enable_firewall(&mut self, watch: Option<std::sync::mpsc::Sender<watch::Request>>) {
        let follow = watch.is_some();
        self.firewall = Some(FirewallCtx {
            rulesets: HashMap::new(),
            watch,
            ns_ifaces: HashMap::new(),
            publishers: HashMap::new(),
        });
        if let Some(host) = self.host_netns {
            if follow {
                // The host's NAT rules publish ports whether or not it has listeners:
                // followed from the start (the watcher's first read is an update).
                self.ruleset(host, None);
            } else {
                // No watcher (`portwatch snapshot`): read the host and the named
                // namespaces once, now.
                let mut reads = vec![(host, read::read(None))];
                for (n, path) in read::named_netns() {
                    if let Ok(f) = std::fs::File::open(&path) {
                        let fd: std::os::fd::OwnedFd = f.into();
                        reads.push((n, read::read(Some(&fd))));
                    }
                }
                for (netns, r) in reads {
                    self.update_namespace(&watch::Update {
                        netns,
                        ruleset: Arc::new(r.ruleset),
                        ifaces: r.ifaces.map(Arc::new),
                        gone: false,
                    });
                }
            }
        }
    }

    /// A namespace's ruleset or addresses, read again after a change (or its end).
    /// False when nothing modelled changed (a notification for a change that changed
    /// nothing modelled, or the watcher's first read of a namespace just read here).
    pub fn update_namespace(&mut self, u: &watch::Update) -> bool {
        let Some(fw) = self.firewall.as_mut() else {
            return false;
        };
        if u.gone {
            fw.rulesets.remove(&u.netns);
            fw.ns_ifaces.remove(&u.netns);
            return fw.publishers.remove(&u.netns).is_some();
        }
        let rs_changed = !fw
            .rulesets
            .get(&u.netns)
            .is_some_and(|old| **old == *u.ruleset);
        if rs_changed {
            fw.rulesets.insert(u.netns, u.ruleset.clone());
        }
        let if_changed = u
            .ifaces
            .as_ref()
            .is_some_and(|i| !fw.ns_ifaces.get(&u.netns).is_some_and(|old| **old == **i));
        if let Some(i) = &u.ifaces {
            fw.ns_ifaces.insert(u.netns, i.clone());
        }
        if if_changed {
            // Listeners' exposures there are worked out again from the new addresses.
            self.ifaces.remove(&u.netns);
        }
        if rs_changed || if_changed {
            let fw = self.firewall.as_mut().expect("checked above");
            if let (Some(rs), Some(ifs)) = (fw.rulesets.get(&u.netns), fw.ns_ifaces.get(&u.netns)) {
                let mut p = nat::find(rs, ifs);
                for x in &mut p.list {
                    x.netns = Some(u.netns);
                }
                if !p.incomplete.is_empty() {
                    log::info!(
                        "firewall: NAT publications of netns {} may be incomplete: {}",
                        u.netns,
                        p.incomplete.join("; ")
                    );
                }
                fw.publishers.insert(u.netns, Arc::new(p));
            }
        }
        rs_changed || if_changed
    }

    /// Whether any followed namespace publishes anything.
    pub fn has_publications(&self) -> bool {
        self.firewall
            .as_ref()
            .is_some_and(|f| f.publishers.values().any(|p| !p.list.is_empty()))
    }

    /// Every publication of every followed namespace.
    pub fn publications(&self) -> Vec<Publication> {
        let Some(fw) = self.firewall.as_ref() else {
            return Vec::new();
        };
        let mut v: Vec<Publication> = fw
            .publishers
            .values()
            .flat_map(|p| p.list.iter().cloned())
            .collect();
        v.sort_by_key(|p| p.full_key());
        v
    }

    /// The publications the listener assessed last is behind (all of them, not only
    /// the one its event shows).
    pub fn take_backs(&mut self) -> Vec<PubKey> {
        std::mem::take(&mut self.backs)
    }

    /// The publications a listener on `addr`:`port` in `netns` is behind, most exposed
    /// first, each with the listener's own namespace's firewall folded into its verdict.
    fn publications_for(
        &mut self,
        transport: Transport,
        addr: IpAddr,
        port: u16,
        netns: Option<u64>,
        pid: Option<u32>,
    ) -> Vec<Publication> {
        let Some(fw) = self.firewall.as_ref() else {
            return Vec::new();
        };
        if fw.publishers.values().all(|p| p.list.is_empty()) {
            return Vec::new();
        }
        let ifs = self.interfaces(netns, pid);
        let addrs: Vec<IpAddr> = if addr.is_unspecified() {
            ifs.as_ref().map(|a| a.ips.clone()).unwrap_or_default()
        } else {
            vec![addr]
        };
        let Some(fw) = self.firewall.as_ref() else {
            return Vec::new();
        };
        let mut found: Vec<Publication> = fw
            .publishers
            .values()
            .flat_map(|p| p.list.iter())
            // A target that is an address of the publishing namespace (a redirect, a
            // loopback address every namespace has) is a listener of that namespace.
            .filter(|x| x.reaches(transport, addr, port, &addrs) && (!x.local || x.netns == netns))
            .cloned()
            .collect();
        for x in &mut found {
            x.target_netns = netns;
            if x.netns == netns {
                continue; // the same ruleset already decided (a redirect)
            }
            let Some(ns) = netns else { continue };
            let (Some(rs), Some(ifs)) = (self.ruleset(ns, pid), ifs.as_ref()) else {
                continue;
            };
            match nat::target_verdict(&rs, &ifs.named, x) {
                _ if x.verdict == State::Filtered => {}
                Some(Verdict::Filtered(r)) => {
                    x.verdict = State::Filtered;
                    x.filter_rule = Some(RuleOut::from(r));
                    x.reason = None;
                }
                Some(Verdict::Unknown(w)) if x.verdict == State::Accepted => {
                    x.verdict = State::Unknown;
                    x.reason = Some(format!("in the listener's namespace: {w}"));
                }
                _ => {}
            }
        }
        found.sort_by_key(|x| std::cmp::Reverse(x.rank()));
        found
    }

    /// A namespace's ruleset, read again after a change. False when it is the one
    /// already in use (a notification for a change that changed nothing modelled, or
    /// the watcher's first read of a namespace just read here).
    pub fn set_ruleset(&mut self, netns: u64, ruleset: Arc<Ruleset>) -> bool {
        let Some(fw) = self.firewall.as_mut() else {
            return false;
        };
        if fw.rulesets.get(&netns).is_some_and(|old| **old == *ruleset) {
            return false;
        }
        fw.rulesets.insert(netns, ruleset);
        true
    }

    /// Forgets the rulesets of namespaces not in `keep` (no longer followed).
    pub fn retain_rulesets(&mut self, keep: &std::collections::HashSet<u64>) {
        if let Some(fw) = self.firewall.as_mut() {
            fw.rulesets.retain(|n, _| keep.contains(n));
        }
    }

    /// The namespace's ruleset: cached, else read now (once per namespace; the watcher
    /// keeps it current from then on).
    fn ruleset(&mut self, netns: u64, pid: Option<u32>) -> Option<Arc<Ruleset>> {
        let host = Some(netns) == self.host_netns;
        let fw = self.firewall.as_mut()?;
        if let Some(rs) = fw.rulesets.get(&netns) {
            return Some(rs.clone());
        }
        let ns: Option<std::os::fd::OwnedFd> = if host {
            None
        } else {
            let path = format!("/proc/{}/ns/net", pid?);
            Some(std::fs::File::open(path).ok()?.into())
        };
        let rs = Arc::new(read::read(ns.as_ref()).ruleset);
        if !rs.unread.is_empty() {
            log::warn!(
                "firewall: ruleset of netns {netns} not fully read: {}",
                rs.unread.join("; ")
            );
        }
        if let Some(w) = &fw.watch
            && w.send(watch::Request::Watch { netns, ns }).is_err()
        {
            log::error!(
                "firewall: the ruleset watcher thread is gone; ruleset changes are no longer followed"
            );
            fw.watch = None;
        }
        fw.rulesets.insert(netns, rs.clone());
        Some(rs)
    }

    /// The firewall verdict for a listener with this exposure, from where it is exposed
    /// (public sources for a public exposure, the local subnet's for a private one).
    fn firewall_verdict(
        &mut self,
        exposure: &Exposure,
        transport: Transport,
        port: u16,
        netns: Option<u64>,
        pid: Option<u32>,
    ) -> Option<Arc<Firewall>> {
        self.firewall.as_ref()?;
        let want = match exposure.effective_scope() {
            Scope::Public => Scope::Public,
            Scope::Private => Scope::Private,
            _ => return None,
        };
        let ns = netns?;
        let addrs = self.interfaces(netns, pid)?;
        let rs = self.ruleset(ns, pid)?;
        firewall::probe(
            &rs,
            &addrs.named,
            transport,
            exposure.addr,
            exposure.stack,
            port,
            want,
        )
        .map(Arc::new)
    }

    /// Addresses of the listener's namespace: the agent's own for the host namespace,
    /// else read through `/proc/<pid>/ns/net` of a process inside it.
    fn interfaces(&mut self, netns: Option<u64>, pid: Option<u32>) -> Option<Addrs> {
        let ns = netns?;
        if let Some((at, v)) = self.ifaces.get(&ns)
            && at.elapsed() < IFACE_TTL
        {
            return v.clone();
        }
        // A followed namespace: its addresses as last announced.
        if let Some(named) = self
            .firewall
            .as_ref()
            .and_then(|f| f.ns_ifaces.get(&ns))
            .map(|v| (**v).clone())
        {
            let addrs = Some(Arc::new(NsAddrs {
                ips: named.iter().map(|i| i.addr).collect(),
                named,
            }));
            self.ifaces.insert(ns, (Instant::now(), addrs.clone()));
            return addrs;
        }
        let named = if Some(ns) == self.host_netns {
            exposure::interface_addrs_named().ok()
        } else {
            let path = PathBuf::from(format!("/proc/{}/ns/net", pid?));
            exposure::interface_addrs_named_in_netns(&path).ok()
        };
        let addrs = named.map(|named| {
            Arc::new(NsAddrs {
                ips: named.iter().map(|i| i.addr).collect(),
                named,
            })
        });
        if self.ifaces.len() >= IFACE_CACHE_MAX {
            self.ifaces.clear();
        }
        self.ifaces.insert(ns, (Instant::now(), addrs.clone()));
        addrs
    }

    /// Classify the listener in `ev` (a start or present event): fill its
    /// `portwatch.exposure` and `portwatch.risk`, and return the alert to write after
    /// it, unless it was folded into an earlier one.
    /// The firewall verdict `assess` would give `ev` now, and nothing else: no
    /// classification, no alert, nothing counted in the alert folder (a ruleset change
    /// asks this of every open listener, and only a changed verdict is assessed again).
    /// The firewall verdict and the publications (most exposed first) `assess` would
    /// give `ev` now.
    pub fn firewall_now(&mut self, ev: &Event) -> (Option<Arc<Firewall>>, Vec<Publication>) {
        let fw = self.firewall_only(ev);
        let published = (|| {
            let (network, server) = (ev.network.as_ref()?, ev.server.as_ref()?);
            let transport = network.transport.transport();
            let socket = ev.portwatch.socket.as_ref();
            let netns = socket.and_then(|s| s.netns);
            let pid = ev.process.as_ref().map(|p| p.pid);
            Some(self.publications_for(transport, server.ip, server.port, netns, pid))
        })();
        (fw, published.unwrap_or_default())
    }

    fn firewall_only(&mut self, ev: &Event) -> Option<Arc<Firewall>> {
        let (network, server) = (ev.network.as_ref()?, ev.server.as_ref()?);
        let transport = network.transport.transport();
        let socket = ev.portwatch.socket.as_ref();
        let (v6only, netns) = (socket.and_then(|s| s.v6only), socket.and_then(|s| s.netns));
        let pid = ev.process.as_ref().map(|p| p.pid);
        let ifaces = if server.ip.is_unspecified() {
            self.interfaces(netns, pid)
        } else {
            None
        };
        let exposure = Exposure::new(server.ip, v6only, ifaces.as_deref().map(|a| &a.ips[..]));
        self.firewall_verdict(&exposure, transport, server.port, netns, pid)
    }

    pub fn assess(&mut self, ev: &mut Event) -> Option<Event> {
        let (network, server) = (ev.network.as_ref()?, ev.server.as_ref()?);
        let transport = network.transport.transport();
        let addr: IpAddr = server.ip;
        let port = server.port;
        let socket = ev.portwatch.socket.as_ref();
        let v6only = socket.and_then(|s| s.v6only);
        let netns = socket.and_then(|s| s.netns);
        let process = ev.process.clone();
        let pid = process.as_ref().map(|p| p.pid);
        let ifaces = if addr.is_unspecified() {
            self.interfaces(netns, pid)
        } else {
            None
        };
        let mut exposure = Exposure::new(addr, v6only, ifaces.as_deref().map(|a| &a.ips[..]));
        let fw = self.firewall_verdict(&exposure, transport, port, netns, pid);
        exposure.firewall = fw.as_ref().map(|f| f.verdict);
        let pubs = self.publications_for(transport, addr, port, netns, pid);
        self.backs = pubs.iter().map(Publication::full_key).collect();
        let published = pubs.into_iter().next().map(Arc::new);
        if let Some(p) = &published {
            apply_publication(&mut exposure, p);
        }
        // Shared handles, not copies of their strings: this runs for every new listener.
        let systemd = ev.portwatch.systemd.clone();
        let container = ev.container.clone();
        let user = ev.user.clone();
        let inode = socket.and_then(|s| s.inode);
        // The listener borrows from its own handle: `published` moves into the event.
        let nat = published.clone();
        let mut listener = Listener {
            transport,
            addr,
            port,
            v6only,
            process_name: process.as_ref().and_then(|p| p.name.as_deref()),
            executable: process.as_ref().and_then(|p| p.executable.as_deref()),
            systemd_unit: systemd.as_ref().and_then(|s| s.unit.as_deref()),
            container_id: container.as_ref().map(|c| c.id.as_str()),
            pid,
            uid: user.as_ref().and_then(|u| u.id.parse().ok()),
            user_name: user.as_ref().and_then(|u| u.name.as_deref()),
            user_manager: systemd.as_ref().and_then(|s| s.user_manager),
            executable_owner: process.as_ref().and_then(|p| p.executable_owner),
            holders: None,
            socket_unit: None,
            published: nat
                .as_deref()
                .filter(|p| !p.local && !p.is_local_source())
                .map(|p| crate::classify::Published {
                    host_port: p.host.port,
                    target: p.target.ip,
                    target_port: p.target.port,
                    interface: &p.interface,
                    docker: p.rule.chain == "DOCKER",
                }),
        };
        let verdict = self.classifier.classify(&listener, &exposure);
        ev.portwatch.exposure = Some(ExposureOut {
            exposure,
            firewall: fw,
            published,
        });
        if verdict.rule.is_some() || verdict.denied_by.is_some() {
            ev.portwatch.risk = Some(Risk {
                rule: verdict.rule_id().map(str::to_owned),
                outcome: verdict.outcome,
                severity: verdict.severity,
                allowed_by: verdict.allowed_by.map(str::to_owned),
            });
        }
        if !verdict.alert {
            return None;
        }
        let repeats = match FoldKey::for_verdict(&listener, &verdict)
            .map(|k| self.folder.offer(k, Instant::now()))
        {
            Some(FoldDecision::Suppress { .. }) => {
                self.folded += 1;
                return None;
            }
            Some(FoldDecision::Emit { repeats }) => repeats,
            None => 0,
        };
        // Who holds the socket now, not who listened: the listener may have forked and
        // exited, or be gone, and `kill` of its pid would hit whoever has it now.
        let may_scan = inode.is_some() && may_scan_holders(&mut self.holder_scans);
        let holders = inode.filter(|_| may_scan).and_then(scan::holders_of);
        listener.holders = holders.as_deref();
        // pid 1 holds it: socket activation; name the .socket unit when a unit file says.
        let socket_unit = (pid == Some(1))
            .then(|| procfs::find_socket_unit(port, transport == Transport::Udp))
            .flatten();
        listener.socket_unit = socket_unit.as_deref();
        let fix = remediation::remediation(&listener, &verdict, self.lang);
        let mut alert = ev.clone();
        alert.event.action = Action::RiskyListener;
        alert.event.kind = Action::RiskyListener.kind();
        alert.event.category = &["network", "intrusion_detection"];
        alert.event.type_ = &["info"];
        if let Some(s) = verdict.severity {
            let (_, level) = ecs_severity(s);
            alert.event.severity = Some(s);
            alert.log = Some(Log { level });
        }
        alert.message = Some(fix.message.clone());
        alert.rule = Some(match (verdict.rule, verdict.denied_by) {
            (_, Some(deny)) => Rule {
                id: deny.label.clone(),
                name: verdict
                    .rule
                    .map_or_else(|| deny.label.clone(), |e| e.service.clone()),
                description: fix.summary.clone(),
                reference: verdict.rule.and_then(|e| e.reference.clone()),
                ruleset: "portwatch-site-policy",
            },
            (Some(entry), None) => Rule {
                id: entry.id.clone(),
                name: entry.service.clone(),
                description: entry.why.get(self.lang).to_owned(),
                reference: entry.reference.clone(),
                ruleset: "portwatch-catalogue",
            },
            (None, None) => return None,
        });
        alert.portwatch.alert = Some(AlertInfo {
            repeats,
            remediation: fix,
        });
        Some(alert)
    }

    /// The catalogue's verdict on a published port with nothing behind it, as if the
    /// next process to bind the target port listened there (and, when the host port
    /// is in the catalogue too, the more severe of the two): its exposure (the
    /// publication's), the risk fields and the alert's rule, and whether to alert.
    /// Alerts only when it is reachable from the network (public or private source) and
    /// not filtered; a local-source one is informational.
    pub fn classify_publication(&self, p: &Publication) -> PublishedRisk {
        let mut exposure = Exposure::new(p.target.ip, None, None);
        apply_publication(&mut exposure, p);
        // The more severe of the two ports; a catalogued one over one that is not.
        let score = |v: &crate::classify::Verdict<'_>| {
            (v.severity, v.rule.is_some() || v.denied_by.is_some())
        };
        // (On a tie the last wins: the target port, where the next process binds.)
        let v = [p.host.port, p.target.port]
            .into_iter()
            .map(|port| {
                let l = Listener::new(p.transport, p.target.ip, port);
                self.classifier.classify(&l, &exposure)
            })
            .max_by(|a, b| score(a).cmp(&score(b)));
        let Some(v) = v.filter(|v| score(v).1) else {
            return PublishedRisk {
                exposure,
                severity: None,
                risk: None,
                rule: None,
                alert: false,
            };
        };
        let network = !p.is_local_source();
        let rule = match (v.rule, v.denied_by) {
            (_, Some(deny)) => Some(Rule {
                id: deny.label.clone(),
                name: v
                    .rule
                    .map_or_else(|| deny.label.clone(), |e| e.service.clone()),
                description: deny.label.clone(),
                reference: v.rule.and_then(|e| e.reference.clone()),
                ruleset: "portwatch-site-policy",
            }),
            (Some(entry), None) => Some(Rule {
                id: entry.id.clone(),
                name: entry.service.clone(),
                description: entry.why.get(self.lang).to_owned(),
                reference: entry.reference.clone(),
                ruleset: "portwatch-catalogue",
            }),
            (None, None) => None,
        };
        PublishedRisk {
            exposure,
            // Local only: not rated as a network exposure (no severity to page on).
            severity: v.severity.filter(|_| network),
            risk: Some(Risk {
                rule: v.rule_id().map(str::to_owned),
                // Only local processes reach it: as a loopback-only listener would be.
                outcome: if network {
                    v.outcome
                } else {
                    crate::classify::Outcome::LoopbackOnly
                },
                severity: v.severity.filter(|_| network),
                allowed_by: v.allowed_by.map(str::to_owned),
            }),
            alert: v.alert && network && p.verdict != State::Filtered,
            rule,
        }
    }

    /// Repeats folded for keys that have gone quiet (or all of them, when the agent
    /// stops): reported so no count is lost.
    pub fn quiet_folds(&mut self, all: bool) -> Vec<(FoldKey, u64)> {
        let now = Instant::now();
        // Past every window: flush() then treats every key as quiet.
        let at = if all {
            now + Duration::from_secs(365 * 86_400)
        } else {
            now
        };
        self.folder.flush(at)
    }
}

/// A listener behind a NAT publication is as exposed as the host port: its effective
/// scope and the verdict that goes with it come from the publication when that reaches
/// further than its own address (or as far, and is more open).
///
/// A publication on the output NAT chain (`source` local) is reached only by
/// processes of the publishing namespace, which is no network exposure: it leaves the
/// scope and the firewall verdict as the listener's own address gives them (a local
/// process could connect to the listener's own address anyway, unless the listener is
/// in another namespace, and even then only as far as the host does). It is shown on
/// the event (`portwatch.exposure.published`), never counted as public or private.
pub fn apply_publication(exposure: &mut Exposure, p: &Publication) {
    if p.is_local_source() {
        return;
    }
    let scope = if p.source == "public" {
        Scope::Public
    } else {
        Scope::Private
    };
    let own = exposure.own_scope();
    let open = |s: Option<State>| match s {
        Some(State::Accepted) => 2,
        Some(State::Unknown) | None => 1,
        Some(State::Filtered) => 0,
    };
    let (pr, or) = (exposure::exposure_rank(scope), exposure::exposure_rank(own));
    exposure.published = Some(scope);
    if pr > or || (pr == or && open(Some(p.verdict)) > open(exposure.firewall)) {
        exposure.firewall = Some(p.verdict);
        if scope == Scope::Public && p.verdict != State::Filtered {
            // Reachable from public sources through the host port (its own
            // `reachable` scopes stay those of its addresses).
            exposure.public_addr = Some(p.host.ip);
            exposure.reachable_public = true;
        }
    }
}

/// What the catalogue says of a published port with nothing behind it
/// ([`Assessor::classify_publication`]).
#[derive(Debug)]
pub struct PublishedRisk {
    pub exposure: Exposure,
    /// The catalogue entry's severity, as rated for the publication's exposure.
    pub severity: Option<crate::classify::Severity>,
    pub risk: Option<Risk>,
    /// The alert's `rule.*`.
    pub rule: Option<Rule>,
    /// Raise it as an alert.
    pub alert: bool,
}

/// Whether another holder scan fits in this second's budget `(second start, count)`,
/// counting it.
fn may_scan_holders(budget: &mut (Instant, u32)) -> bool {
    let (start, n) = budget;
    if start.elapsed() >= Duration::from_secs(1) {
        *start = Instant::now();
        *n = 0;
    }
    *n += 1;
    *n <= HOLDER_SCANS_PER_SEC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_scans_are_rate_limited() {
        let mut budget = (Instant::now(), 0);
        let allowed = (0..100).filter(|_| may_scan_holders(&mut budget)).count();
        assert_eq!(allowed, HOLDER_SCANS_PER_SEC as usize);
        // A new second, a new budget.
        budget.0 -= Duration::from_secs(2);
        assert!(may_scan_holders(&mut budget));
    }
}
