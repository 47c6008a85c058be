//! The built-in catalogue of risky services (`catalogue.toml`, embedded at
//! compile time so the sensor works with no configuration).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::model::{Localized, PortSpec, Severity, Transport};

/// The catalogue source, embedded so a fresh install needs no data files.
pub const CATALOGUE_TOML: &str = include_str!("catalogue.toml");

/// How to make a daemon listen on loopback only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopbackHint {
    /// Configuration file(s) to edit, as a person would look for them.
    pub file: String,
    /// Lines to set in that file.
    pub lines: Vec<String>,
    /// What to do, in English.
    pub en: String,
    /// What to do, in Japanese.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ja: Option<String>,
}

/// Where a [`RiskEntry`] came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EntryOrigin {
    /// The built-in catalogue.
    Catalogue,
    /// A `[[risky]]` table of a rules file.
    Site {
        /// The rules file (as given to the loader).
        file: String,
        /// 1-based line of the `[[risky]]` header.
        line: usize,
    },
}

/// One risky service: a built-in catalogue entry or a site `[[risky]]` entry.
///
/// The classifier hands out `&RiskEntry` in verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RiskEntry {
    /// Stable identifier ("memcached"), used by rules files.
    pub id: String,
    /// Service name shown to people.
    pub service: String,
    /// Risky ports.
    pub ports: Vec<PortSpec>,
    /// Every port is risky on each of these protocols.
    pub protocols: Vec<Transport>,
    /// Effective severity on a public address (after `[[severity]]` overrides).
    pub severity: Severity,
    /// Severity before any `[[severity]]` override.
    pub default_severity: Severity,
    /// Short clause for one-line messages ("it is used for UDP reflection attacks").
    pub risk: Localized,
    /// One or two sentences on why exposure is dangerous.
    pub why: Localized,
    /// Where to read more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Systemd units that usually run the service (hint when the real unit is unknown).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    /// firewalld service name that opens these ports, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewalld: Option<String>,
    /// How to bind the daemon to loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loopback: Option<LoopbackHint>,
    /// Catalogue or site rules file.
    pub origin: EntryOrigin,
}

impl RiskEntry {
    /// Whether this entry covers `port` on `transport`.
    pub fn covers(&self, transport: Transport, port: u16) -> bool {
        self.protocols.contains(&transport) && self.ports.iter().any(|p| p.contains(port))
    }
}

/// On-disk form of one `[[service]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    id: String,
    name: String,
    ports: Vec<PortSpec>,
    protocols: Vec<Transport>,
    severity: Severity,
    risk: Localized,
    why: Localized,
    reference: String,
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    firewalld: Option<String>,
    #[serde(default)]
    loopback: Option<LoopbackHint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    service: Vec<RawService>,
}

/// Parses catalogue text (the embedded one, or a test fixture).
pub fn parse_catalogue(text: &str) -> Result<Vec<RiskEntry>, toml::de::Error> {
    let raw: RawCatalogue = toml::from_str(text)?;
    Ok(raw
        .service
        .into_iter()
        .map(|s| RiskEntry {
            id: s.id,
            service: s.name,
            ports: s.ports,
            protocols: s.protocols,
            severity: s.severity,
            default_severity: s.severity,
            risk: s.risk,
            why: s.why,
            reference: Some(s.reference),
            units: s.units,
            firewalld: s.firewalld,
            loopback: s.loopback,
            origin: EntryOrigin::Catalogue,
        })
        .collect())
}

/// The built-in catalogue, parsed once.
pub fn builtin() -> &'static [RiskEntry] {
    static CATALOGUE: OnceLock<Vec<RiskEntry>> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        // The text is compiled in and checked by the unit tests below, so a
        // failure here is a build defect, not bad input.
        parse_catalogue(CATALOGUE_TOML).expect("embedded catalogue.toml must parse")
    })
}

/// Looks up a built-in entry by id.
pub fn builtin_entry(id: &str) -> Option<&'static RiskEntry> {
    builtin().iter().find(|e| e.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use Transport::{Tcp, Udp};

    #[test]
    fn catalogue_parses_and_is_complete() {
        let cat = builtin();
        assert!(cat.len() >= 30, "catalogue has {} entries", cat.len());
        for e in cat {
            assert!(!e.id.is_empty() && !e.service.is_empty());
            assert!(!e.ports.is_empty() && !e.protocols.is_empty(), "{}", e.id);
            assert!(
                e.risk.ja.is_some() && e.why.ja.is_some(),
                "{} lacks Japanese",
                e.id
            );
            let r = e.reference.as_deref().unwrap_or("");
            assert!(r.starts_with("https://"), "{} reference {r:?}", e.id);
            assert!(!e.risk.en.ends_with('.'), "{}: risk is a clause", e.id);
            if let Some(l) = &e.loopback {
                assert!(
                    !l.lines.is_empty() && l.ja.is_some(),
                    "{} loopback hint",
                    e.id
                );
            }
        }
    }

    #[test]
    fn ids_and_port_protocol_pairs_are_unique() {
        let mut ids = HashMap::new();
        let mut pairs: HashMap<(Transport, u16), &str> = HashMap::new();
        for e in builtin() {
            assert!(
                ids.insert(e.id.as_str(), ()).is_none(),
                "duplicate id {}",
                e.id
            );
            for p in &e.ports {
                for port in p.lo..=p.hi {
                    for t in &e.protocols {
                        if let Some(prev) = pairs.insert((*t, port), &e.id) {
                            panic!("{port}/{t} is in both {prev} and {}", e.id);
                        }
                    }
                }
            }
        }
    }

    /// The coverage the sensor promises: every one of these ports is present
    /// with exactly the listed protocols.
    #[test]
    fn required_ports_are_covered() {
        let required: &[(u16, &[Transport])] = &[
            (11211, &[Tcp, Udp]), // memcached
            (3306, &[Tcp]),       // MySQL
            (2049, &[Tcp, Udp]),  // NFS
            (8080, &[Tcp]),       // HTTP alt / admin UIs
            (8081, &[Tcp]),
            (8888, &[Tcp]),     // admin interfaces
            (111, &[Tcp, Udp]), // SunRPC portmapper
            (5353, &[Udp]),     // mDNS
            (27017, &[Tcp]),    // MongoDB
            (137, &[Udp]),      // NetBIOS name
            (138, &[Udp]),      // NetBIOS datagram
            (139, &[Tcp]),      // NetBIOS session
            (445, &[Tcp]),      // SMB
            (23, &[Tcp]),       // telnet
            (6379, &[Tcp]),     // Redis
            (5432, &[Tcp]),     // PostgreSQL
            (9200, &[Tcp]),     // Elasticsearch
            (9300, &[Tcp]),
            (2375, &[Tcp]), // Docker API
            (2376, &[Tcp]),
            (2379, &[Tcp]), // etcd
            (2380, &[Tcp]),
            (10250, &[Tcp]),   // kubelet
            (1900, &[Udp]),    // SSDP
            (161, &[Udp]),     // SNMP
            (123, &[Udp]),     // NTP
            (389, &[Udp]),     // CLDAP
            (19, &[Tcp, Udp]), // chargen
            (5900, &[Tcp]),    // VNC
            (3389, &[Tcp]),    // RDP
            (1433, &[Tcp]),    // MSSQL
            (1521, &[Tcp]),    // Oracle
            (5984, &[Tcp]),    // CouchDB
            (15672, &[Tcp]),   // RabbitMQ management
            (9092, &[Tcp]),    // Kafka
            (8086, &[Tcp]),    // InfluxDB
        ];
        for (port, protos) in required {
            for t in [Tcp, Udp] {
                let found = builtin().iter().find(|e| e.covers(t, *port));
                assert_eq!(
                    found.is_some(),
                    protos.contains(&t),
                    "{port}/{t}: expected {} in catalogue, found {:?}",
                    if protos.contains(&t) {
                        "present"
                    } else {
                        "absent"
                    },
                    found.map(|e| &e.id)
                );
            }
        }
    }

    #[test]
    fn loopback_hints_for_known_daemons() {
        let line = |id: &str| -> String {
            builtin_entry(id)
                .and_then(|e| e.loopback.as_ref())
                .map(|l| l.lines.join("\n"))
                .unwrap_or_default()
        };
        assert!(line("memcached").contains("-l 127.0.0.1"));
        assert!(line("mysql").contains("bind-address = 127.0.0.1"));
        assert!(line("mongodb").contains("bindIp: 127.0.0.1"));
        assert!(line("redis").contains("bind 127.0.0.1 -::1"));
        assert!(line("redis").contains("protected-mode yes"));
        assert!(line("postgresql").contains("listen_addresses = 'localhost'"));
        assert!(line("elasticsearch").contains("network.host"));
        assert!(line("portmapper").contains("-h 127.0.0.1"));
        assert!(line("smb").contains("bind interfaces only = yes"));
        assert!(line("mdns").contains("allow-interfaces"));
    }
}
