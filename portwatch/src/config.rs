//! `portwatch watch --config FILE`: the same settings as the flags, in TOML, for a
//! service manager or a configuration-management tool. Flags given on the command line
//! win over the file; destinations from both are used together.
//!
//! ```toml
//! format = "json"                 # json | text | ocsf
//! metrics = "127.0.0.1:9100"      # Prometheus endpoint
//! rules = "/etc/portwatch/rules.toml"
//! queue_events = 16384
//! health_interval = 60            # seconds, 0: none
//! ring_bytes = 1048576
//! priority_boost = 5
//! fold_above = 1000               # per process and second, 0: never fold
//! fold_user_above = 4000          # per user and second, 0: no user budget
//!
//! [[sink]]
//! type = "file"
//! path = "/var/log/portwatch/events.json"
//!
//! [[sink]]
//! type = "syslog"
//! endpoint = "unix:/dev/log"      # or udp:HOST:PORT, tcp:HOST:PORT
//!
//! [[sink]]
//! type = "forward"                # JSON lines
//! endpoint = "tcp:127.0.0.1:9000" # or unix:/PATH
//!
//! [[sink]]
//! type = "relp"                   # RFC 5424 over RELP, acknowledged
//! endpoint = "tls:relay.example:2514" # or HOST:PORT, tcp:HOST:PORT
//!
//! [[sink]]
//! type = "stdout"
//!
//! # TLS for tls: endpoints, and the spool of stream destinations
//! tls_ca = "/etc/portwatch/relay-ca.pem"
//! tls_cert = "/etc/portwatch/client.pem"
//! tls_key = "/etc/portwatch/client.key"
//! spool_dir = "/var/lib/portwatch/spool"
//! spool_max_bytes = 268435456
//! ```
//!
//! (Top-level keys go before the first `[[sink]]` in a real file.)

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::output::sinks::{Endpoint, Format, SinkSpec};

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub format: Option<FormatName>,
    pub rules: Option<PathBuf>,
    pub queue_events: Option<usize>,
    pub health_interval: Option<u64>,
    pub ring_bytes: Option<u32>,
    pub priority_boost: Option<u8>,
    pub fold_above: Option<u32>,
    pub fold_user_above: Option<u32>,
    pub metrics: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkEntry>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum FormatName {
    Json,
    Text,
    Ocsf,
}

impl From<FormatName> for Format {
    fn from(f: FormatName) -> Format {
        match f {
            FormatName::Json => Format::Json,
            FormatName::Text => Format::Text,
            FormatName::Ocsf => Format::Ocsf,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SinkEntry {
    #[serde(rename = "type")]
    kind: String,
    path: Option<PathBuf>,
    endpoint: Option<String>,
}

/// Errors name the file, line and column, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}:{col}: {message}")]
pub struct ConfigError {
    origin: String,
    line: usize,
    col: usize,
    message: String,
}

pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(parse(&text, &path.display().to_string())?)
}

pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let at = |span: Option<std::ops::Range<usize>>, message: String| {
        let offset = span.map_or(0, |s| s.start.min(text.len()));
        let before = text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError {
            origin: origin.to_owned(),
            line,
            col,
            // toml's messages may span lines; ours is one.
            message: message.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    };
    let config: Config = toml::from_str(text).map_err(|e| at(e.span(), e.message().to_owned()))?;
    if let Some(n) = config.queue_events
        && !(16..=1_048_576).contains(&n)
    {
        return Err(at(
            None,
            format!("queue_events {n} is not from 16 to 1048576"),
        ));
    }
    if let Some(n) = config.health_interval
        && n > 86_400
    {
        return Err(at(
            None,
            format!("health_interval {n} is more than a day (86400)"),
        ));
    }
    if let Some(n) = config.ring_bytes
        && (!(4096..=1 << 30).contains(&n) || !n.is_power_of_two())
    {
        return Err(at(
            None,
            format!("ring_bytes {n} is not a power of two from 4096 to 1073741824"),
        ));
    }
    if let Some(n) = config.priority_boost
        && n > 20
    {
        return Err(at(None, format!("priority_boost {n} is more than 20")));
    }
    if let Some(n) = config.spool_max_bytes
        && n < crate::output::spool::MIN_MAX_BYTES
    {
        return Err(at(
            None,
            format!(
                "spool_max_bytes {n} is less than {}",
                crate::output::spool::MIN_MAX_BYTES
            ),
        ));
    }
    if config.tls_cert.is_some() != config.tls_key.is_some() {
        return Err(at(
            None,
            "tls_cert and tls_key go together: give both or neither".into(),
        ));
    }
    for (i, s) in config.sinks.iter().enumerate() {
        s.spec()
            .map_err(|m| at(None, format!("[[sink]] #{}: {m}", i + 1)))?;
    }
    Ok(config)
}

impl SinkEntry {
    pub fn spec(&self) -> Result<SinkSpec, String> {
        let endpoint = || -> Result<Endpoint, String> {
            self.endpoint
                .as_deref()
                .ok_or_else(|| format!("type \"{}\" needs `endpoint`", self.kind))?
                .parse()
        };
        match (self.kind.as_str(), &self.path, &self.endpoint) {
            ("stdout", None, None) => Ok(SinkSpec::Stdout),
            ("file", Some(p), None) => Ok(SinkSpec::File(p.clone())),
            ("file", None, _) => Err("type \"file\" needs `path`".into()),
            ("syslog", None, _) => endpoint().map(SinkSpec::Syslog),
            ("forward", None, _) => match endpoint()? {
                Endpoint::Udp(a) => Err(format!(
                    "forward sends JSON lines over a stream: udp:{a} is not one; use tcp:, tls: \
                     or unix:"
                )),
                e => Ok(SinkSpec::Forward(e)),
            },
            ("relp", None, Some(e)) => Endpoint::parse_relp(e).map(SinkSpec::Relp),
            ("relp", None, None) => Err("type \"relp\" needs `endpoint`".into()),
            ("stdout" | "file" | "syslog" | "forward" | "relp", _, _) => Err(format!(
                "type \"{}\" takes {}",
                self.kind,
                match self.kind.as_str() {
                    "stdout" => "no other key",
                    "file" => "only `path`",
                    _ => "only `endpoint`",
                }
            )),
            (other, _, _) => Err(format!(
                "unknown type \"{other}\" (stdout, file, syslog, forward, relp)"
            )),
        }
    }
}

impl Config {
    pub fn sink_specs(&self) -> Vec<SinkSpec> {
        // Validated by parse().
        self.sinks.iter().filter_map(|s| s.spec().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            "format = \"json\"\nqueue_events = 1024\nhealth_interval = 0\n\
             [[sink]]\ntype = \"file\"\npath = \"/var/log/pw.json\"\n\
             [[sink]]\ntype = \"syslog\"\nendpoint = \"udp:127.0.0.1:514\"\n\
             [[sink]]\ntype = \"forward\"\nendpoint = \"unix:/run/vector.sock\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.sink_specs().len(), 3);
        assert_eq!(c.queue_events, Some(1024));
    }

    #[test]
    fn errors_are_one_line_with_a_position() {
        let e = parse("format = \"xml\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:1:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = parse(
            "[[sink]]\ntype = \"forward\"\nendpoint = \"udp:h:1\"\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[[sink]] #1") && e.contains("stream"), "{e}");
        let e = parse("bogus = 1\n", "c.toml").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("ring_bytes = 1000\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("power of two"), "{e}");
    }
}
