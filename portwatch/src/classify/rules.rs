//! Site policy: an optional TOML rules file that allows, denies, re-rates and
//! adds risky services.
//!
//! # Schema
//!
//! Every table is optional; unknown keys are errors. Keys that take a list
//! also take a single value (`scope = "private"` means `scope = ["private"]`);
//! empty lists are rejected (omit the key to match anything).
//!
//! ```toml
//! [settings]
//! private_exposure = "lower"   # lower (default) | alert | ignore: what to do when a
//!                              # risky port is reachable only from local networks
//! min_severity = "low"         # alerts below this severity are dropped (not deny rules)
//!
//! [[risky]]                    # site-specific risky port
//! id = "internal-admin"        # optional; defaults to `service`, lowercased, spaces -> '-'
//! port = 9999                  # `port` and/or `ports`: integers or "LOW-HIGH" strings
//! protocols = ["tcp"]          # required: "tcp" and/or "udp"
//! service = "internal-admin"   # required: name shown in alerts
//! severity = "high"            # low | medium (default) | high | critical
//! reason = "Our admin daemon"  # required: why it is risky (English)
//! reason_ja = "社内管理デーモン"   # optional Japanese reason
//! reference = "https://wiki.example/admin"   # optional
//! units = ["admin.service"]    # optional: units that usually run it
//! loopback = { file = "/etc/admin.conf", lines = ["listen 127.0.0.1"], en = "Bind to loopback." }
//!
//! [[allow]]                    # silence matching alerts
//! port = 11211
//! process = "memcached"
//! executable = "/usr/bin/memcached"
//! user = "memcache"
//! scope = ["private"]
//!
//! [[deny]]                     # always alert, even on loopback and off-catalogue
//! port = 4444
//! reason = "Metasploit's default handler port"
//! severity = "critical"        # optional; default: the catalogue entry's, else high
//!
//! [[severity]]                 # re-rate a catalogue (or [[risky]]) entry
//! rule = "mysql"
//! severity = "critical"
//! ```
//!
//! ## Match conditions (`[[allow]]` and `[[deny]]`)
//!
//! All given conditions must hold; a rule needs at least one.
//!
//! | key | matches when |
//! | --- | --- |
//! | `port`, `ports` | the listener's port is one of them (ranges allowed) |
//! | `protocols` (`protocol`) | the transport is one of them |
//! | `scope` | the exposure's scope **or** its effective scope is listed: `"all-interfaces"` matches every wildcard bind, `"public"` also matches a wildcard that a public address reaches, `"private"` a wildcard that none does |
//! | `process` | the process name (comm) equals one; names longer than 15 bytes also match the kernel's 15-byte truncation. In `[[allow]]` a name alone proves nothing (any process can call itself `memcached`), so the executable and its owners are checked too, see below |
//! | `executable` | the executable path equals one; a value without `/` matches the file name; a trailing ` (deleted)` (binary replaced by an upgrade) is ignored |
//! | `unit` (`systemd_unit`) | the systemd unit equals one; a value without `.` also matches `VALUE.service`. Only units the system manager runs match: a unit under `user@N.service` is named by user N and never matches |
//! | `uid` | the real uid of the process that listened is one of them |
//! | `user` | the name of that uid is one of them |
//! | `container` | `true`: in any container; `false`: not in a container; `"ID"`: the container id equals it, or starts with it when it has at least 12 characters (docker's short ids) |
//! | `rule` | the listener matched one of these catalogue / `[[risky]]` ids |
//!
//! ### `process` in `[[allow]]`
//!
//! An allow rule with `process` also requires, besides the name (comm):
//!
//! - the executable is known and is the rule's `executable` when the rule gives one,
//!   else its file name is the process name (`/usr/bin/memcached` for `memcached`);
//! - the executable file is owned by root (a user cannot make one that is);
//! - the process runs as one of the rule's `uid`/`user` when the rule gives them, else
//!   as a system account (uid below 1000, Debian's and Fedora's `SYS_UID_MAX` + 1), so a
//!   login user starting `/usr/bin/memcached` on the port is not allowed by it.
//!
//! `portwatch rules check` warns about an allow rule that names a process without an
//! `executable` or a `uid`/`user`. In `[[deny]]` the name alone matches: a name match
//! there can only raise an alert.
//!
//! Optional descriptive keys: `name` (shown as `allowed_by` / `denied_by`;
//! default `FILE:LINE`) and `reason`. `severity` is allowed in `[[deny]]` only.
//!
//! ## Precedence
//!
//! Deny beats allow: a listener matched by any `[[deny]]` alerts whatever the
//! `[[allow]]` rules say, so a broad allow cannot hide an explicit prohibition.
//! A `[[risky]]` entry on a (port, protocol) that the catalogue also covers
//! replaces the catalogue entry for that pair.
//!
//! ## Errors
//!
//! Every problem is reported as one line `FILE:LINE:COL: message`, with the
//! position of the offending key or value: unknown keys, bad ports (`70000`),
//! unknown protocols, scopes or severities, unknown ids in `rule`, rules that
//! match everything, duplicate ids.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::Listener;
use super::catalogue::{self, EntryOrigin, LoopbackHint, RiskEntry};
use super::exposure::{Exposure, Scope};
use super::model::{Localized, NonEmpty, PortSpec, Severity, Transport, one_or_many};

/// Upper bound on `[[risky]]` entries: the classifier's port index stores
/// entry numbers in a `u16`, and no sane site needs more.
pub const MAX_RISKY: usize = 10_000;

/// A parsed, validated rules file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    /// The file the rules came from (for messages).
    pub origin: String,
    /// Global settings.
    pub settings: Settings,
    /// Site-specific risky services (`[[risky]]`).
    pub risky: Vec<RiskEntry>,
    /// Silencing rules (`[[allow]]`), in file order.
    pub allow: Vec<MatchRule>,
    /// Alerting rules (`[[deny]]`), in file order.
    pub deny: Vec<MatchRule>,
    /// Severity overrides (`[[severity]]`).
    pub severity: Vec<SeverityOverride>,
}

impl Policy {
    /// Rules that work but trust what a local user controls, one line each
    /// (`FILE:LINE: ...`), for `portwatch rules check`.
    pub fn warnings(&self) -> Vec<String> {
        self.allow
            .iter()
            .filter(|r| r.trusts_user_chosen_name())
            .map(|r| {
                let at = format!("{}:{}", self.origin, r.line);
                let name = if r.label == at {
                    String::new()
                } else {
                    format!(" {:?}", r.label)
                };
                format!(
                    "{at}: [[allow]]{name} matches on the process name, which any local user \
                     can give a process; pin the owner with `executable` and `user` (or `uid`)"
                )
            })
            .collect()
    }
}

/// What to do when a risky port is reachable only from local networks
/// (private, link-local or multicast scope, or a wildcard bind on a host that
/// has no public address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateExposure {
    /// Alert with the severity lowered one step (default).
    #[default]
    Lower,
    /// Alert with the full severity.
    Alert,
    /// No alert.
    Ignore,
}

/// `[settings]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Handling of local-network-only exposure.
    pub private_exposure: PrivateExposure,
    /// Catalogue / `[[risky]]` alerts below this are dropped. Deny rules ignore it.
    pub min_severity: Severity,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            private_exposure: PrivateExposure::Lower,
            min_severity: Severity::Low,
        }
    }
}

/// One `[[severity]]` override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeverityOverride {
    /// Catalogue or `[[risky]]` id.
    pub rule: String,
    /// New severity.
    pub severity: Severity,
    /// 1-based line in the rules file.
    pub line: usize,
}

/// The `container` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerMatch {
    /// `container = true`: the listener is in some container.
    Any,
    /// `container = false`: the listener is not in a container.
    HostOnly,
    /// `container = "ID"`: exact id, or prefix of at least 12 characters.
    Id(String),
}

impl<'de> Deserialize<'de> for ContainerMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ContainerMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a container id string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ContainerMatch, E> {
                Ok(if v {
                    ContainerMatch::Any
                } else {
                    ContainerMatch::HostOnly
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ContainerMatch, E> {
                if v.trim().is_empty() {
                    return Err(E::custom("empty container id"));
                }
                Ok(ContainerMatch::Id(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// An `[[allow]]` or `[[deny]]` rule. Empty lists mean "any".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchRule {
    /// `name`, or `FILE:LINE` of the table header; reported as
    /// `allowed_by` / `denied_by`.
    pub label: String,
    /// Free-text reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Ports (from `port` and `ports`).
    pub ports: Vec<PortSpec>,
    /// Transports.
    pub protocols: Vec<Transport>,
    /// Scopes (see module docs for how wildcards match).
    pub scopes: Vec<Scope>,
    /// Process names (comm).
    pub processes: Vec<String>,
    /// Executable paths or file names.
    pub executables: Vec<String>,
    /// Systemd units.
    pub units: Vec<String>,
    /// Real uids of the listening process.
    pub uids: Vec<u32>,
    /// User names of the listening process.
    pub users: Vec<String>,
    /// An allow rule: a `process` condition also checks executable and owners.
    pub allow: bool,
    /// Container condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerMatch>,
    /// Catalogue / `[[risky]]` ids.
    pub rules: Vec<String>,
    /// Severity of the alert (deny only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// 1-based line of the table header.
    pub line: usize,
}

/// First uid of login users on Debian and Fedora (`SYS_UID_MAX` is 999).
const SYSTEM_UID_END: u32 = 1000;

/// Linux truncates process names (comm) to 15 bytes.
const COMM_MAX: usize = 15;

fn comm_matches(rule: &str, comm: &str) -> bool {
    rule == comm
        || (rule.len() > COMM_MAX
            && comm.len() == COMM_MAX
            && rule.as_bytes().starts_with(comm.as_bytes()))
}

fn exe_matches(rule: &str, exe: &str) -> bool {
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    if rule.contains('/') {
        rule == exe
    } else {
        exe.rsplit('/').next() == Some(rule)
    }
}

fn unit_matches(rule: &str, unit: &str) -> bool {
    rule == unit
        || (!rule.contains('.')
            && unit
                .strip_suffix(".service")
                .is_some_and(|stem| stem == rule))
}

impl MatchRule {
    /// Whether the rule matches a listener with this exposure; `entry_id` is
    /// the catalogue / `[[risky]]` id the listener matched, if any.
    ///
    /// Allocation-free: it runs on the per-event path for deny rules.
    pub fn matches(&self, l: &Listener<'_>, exposure: &Exposure, entry_id: Option<&str>) -> bool {
        if !self.ports.is_empty() && !self.ports.iter().any(|p| p.contains(l.port)) {
            return false;
        }
        if !self.protocols.is_empty() && !self.protocols.contains(&l.transport) {
            return false;
        }
        if !self.scopes.is_empty() {
            let eff = exposure.effective_scope();
            if !self
                .scopes
                .iter()
                .any(|s| *s == exposure.scope || *s == eff)
            {
                return false;
            }
        }
        if !self.processes.is_empty()
            && !l
                .process_name
                .is_some_and(|n| self.processes.iter().any(|p| comm_matches(p, n)))
        {
            return false;
        }
        if self.allow && !self.processes.is_empty() && !self.process_is_vouched_for(l) {
            return false;
        }
        if !self.uids.is_empty() && !l.uid.is_some_and(|u| self.uids.contains(&u)) {
            return false;
        }
        if !self.users.is_empty()
            && !l
                .user_name
                .is_some_and(|n| self.users.iter().any(|u| u == n))
        {
            return false;
        }
        if !self.executables.is_empty()
            && !l
                .executable
                .is_some_and(|x| self.executables.iter().any(|p| exe_matches(p, x)))
        {
            return false;
        }
        if !self.units.is_empty()
            && (l.user_manager.is_some()
                || !l
                    .systemd_unit
                    .is_some_and(|u| self.units.iter().any(|p| unit_matches(p, u))))
        {
            return false;
        }
        let container_ok = match &self.container {
            None => true,
            Some(ContainerMatch::Any) => l.container_id.is_some(),
            Some(ContainerMatch::HostOnly) => l.container_id.is_none(),
            Some(ContainerMatch::Id(id)) => l
                .container_id
                .is_some_and(|c| c == id || (id.len() >= 12 && c.starts_with(id.as_str()))),
        };
        if !container_ok {
            return false;
        }
        if !self.rules.is_empty() && !entry_id.is_some_and(|e| self.rules.iter().any(|r| r == e)) {
            return false;
        }
        true
    }

    /// For an allow rule naming a process: the name is backed by the executable (the
    /// rule's, else one whose file name is the process name), a root-owned executable
    /// file, and an owner the rule names or a system account. See the module docs.
    fn process_is_vouched_for(&self, l: &Listener<'_>) -> bool {
        let Some(exe) = l.executable else {
            return false;
        };
        let exe_ok = if self.executables.is_empty() {
            let file = exe.strip_suffix(" (deleted)").unwrap_or(exe);
            let file = file.rsplit('/').next().unwrap_or(file);
            self.processes
                .iter()
                .any(|p| comm_matches(file, p) || p == file)
        } else {
            true // checked as the `executable` condition
        };
        let owner_ok = if self.uids.is_empty() && self.users.is_empty() {
            l.uid.is_some_and(|u| u < SYSTEM_UID_END)
        } else {
            true // checked as the `uid`/`user` conditions
        };
        exe_ok && owner_ok && l.executable_owner == Some(0)
    }

    /// Whether an allow rule trusts a name any local user can choose: it names a process
    /// without pinning the executable or the owner.
    pub fn trusts_user_chosen_name(&self) -> bool {
        self.allow
            && !self.processes.is_empty()
            && (self.executables.is_empty() || (self.uids.is_empty() && self.users.is_empty()))
    }

    /// Whether the rule constrains ports (the classifier indexes those).
    pub fn has_ports(&self) -> bool {
        !self.ports.is_empty()
    }
}

/// Error loading or validating a rules file.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read. The reason is part of the message, not a `source`:
    /// `main` prints the chain, which would say it twice.
    #[error("{path}: {}", io_reason(.error))]
    Io {
        /// The path as given.
        path: String,
        /// The underlying error.
        error: io::Error,
    },
    /// Syntax or validation error, with its position when known.
    #[error("{origin}:{}{message}", fmt_pos(*.line, *.col))]
    Invalid {
        /// The file (or origin string given to [`parse_rules`]).
        origin: String,
        /// 1-based line, 0 if unknown.
        line: usize,
        /// 1-based column in characters, 0 if unknown.
        col: usize,
        /// What is wrong (one line).
        message: String,
    },
}

fn io_reason(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::InvalidData {
        // read_to_string's own words ("stream did not contain valid UTF-8") do not say
        // what the user gave us.
        "not a text file (a rules file is UTF-8 TOML)".to_owned()
    } else {
        e.to_string()
    }
}

fn fmt_pos(line: usize, col: usize) -> String {
    if line == 0 {
        " ".to_owned()
    } else {
        format!("{line}:{col}: ")
    }
}

impl RulesError {
    /// `(line, column)`, 1-based, when the error has a position.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            RulesError::Invalid { line, col, .. } if *line > 0 => Some((*line, *col)),
            _ => None,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

struct Ctx<'t> {
    text: &'t str,
    origin: &'t str,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, message: impl Into<String>) -> RulesError {
        let (line, col) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        let message: String = message.into();
        // Keep the Display a single line whatever toml produced: its
        // syntax errors put "expected ..." on a second line.
        let joined = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        // serde quotes the file's own text unescaped ("unknown variant `...`"): a tab,
        // a carriage return or a terminal escape from the file must not reach the
        // terminal as such (found by the `rules` fuzz target).
        let mut message = String::with_capacity(joined.len());
        for c in joined.chars() {
            if c.is_control() {
                message.extend(c.escape_default());
            } else {
                message.push(c);
            }
        }
        RulesError::Invalid {
            origin: self.origin.to_owned(),
            line,
            col,
            message,
        }
    }

    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    settings: Settings,
    #[serde(default)]
    risky: Vec<Spanned<RawRisky>>,
    #[serde(default)]
    allow: Vec<Spanned<RawMatch>>,
    #[serde(default)]
    deny: Vec<Spanned<RawMatch>>,
    #[serde(default)]
    severity: Vec<Spanned<RawSeverity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRisky {
    #[serde(default)]
    id: Option<Spanned<NonEmpty>>,
    #[serde(default, deserialize_with = "one_or_many")]
    port: Vec<PortSpec>,
    #[serde(default, deserialize_with = "one_or_many")]
    ports: Vec<PortSpec>,
    #[serde(deserialize_with = "one_or_many", alias = "protocol")]
    protocols: Vec<Transport>,
    service: NonEmpty,
    #[serde(default = "default_risky_severity")]
    severity: Severity,
    reason: NonEmpty,
    #[serde(default)]
    reason_ja: Option<NonEmpty>,
    #[serde(default)]
    reference: Option<NonEmpty>,
    #[serde(default, deserialize_with = "one_or_many")]
    units: Vec<NonEmpty>,
    #[serde(default)]
    firewalld: Option<NonEmpty>,
    #[serde(default)]
    loopback: Option<LoopbackHint>,
}

fn default_risky_severity() -> Severity {
    Severity::Medium
}

/// `rule = "id"` or `rule = ["a", "b"]`, kept whole so its span is known.
#[derive(Deserialize)]
#[serde(transparent)]
struct RuleIds(#[serde(deserialize_with = "one_or_many")] Vec<NonEmpty>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    name: Option<NonEmpty>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    port: Vec<PortSpec>,
    #[serde(default, deserialize_with = "one_or_many")]
    ports: Vec<PortSpec>,
    #[serde(default, deserialize_with = "one_or_many", alias = "protocol")]
    protocols: Vec<Transport>,
    #[serde(default, deserialize_with = "one_or_many")]
    scope: Vec<Scope>,
    #[serde(default, deserialize_with = "one_or_many")]
    process: Vec<NonEmpty>,
    #[serde(default, deserialize_with = "one_or_many")]
    executable: Vec<NonEmpty>,
    #[serde(default, deserialize_with = "one_or_many", alias = "systemd_unit")]
    unit: Vec<NonEmpty>,
    #[serde(default, deserialize_with = "one_or_many")]
    uid: Vec<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    user: Vec<NonEmpty>,
    #[serde(default)]
    container: Option<ContainerMatch>,
    #[serde(default)]
    rule: Option<Spanned<RuleIds>>,
    #[serde(default)]
    severity: Option<Spanned<Severity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeverity {
    rule: Spanned<String>,
    severity: Severity,
}

fn strings(v: Vec<NonEmpty>) -> Vec<String> {
    v.into_iter().map(|s| s.0).collect()
}

fn default_id(service: &str) -> String {
    service
        .trim()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("-")
}

/// Rules files are a few KiB. Anything larger is not one, and `--rules /dev/zero`
/// must not read until memory runs out.
pub const MAX_RULES_BYTES: u64 = 1 << 20;

/// Reads and validates the rules file at `path` (at most [`MAX_RULES_BYTES`]; a pipe
/// such as `<(generate-rules)` is fine).
pub fn load_rules(path: &Path) -> Result<Policy, RulesError> {
    use std::io::Read as _;

    let origin = path.display().to_string();
    let io_err = |error| RulesError::Io {
        path: origin.clone(),
        error,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_RULES_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_RULES_BYTES {
        return Err(io_err(io::Error::other(format!(
            "larger than {} MiB: not a rules file",
            MAX_RULES_BYTES >> 20
        ))));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    parse_rules(&text, &origin)
}

/// Parses and validates rules text; `origin` names it in errors and labels
/// (usually the file path).
pub fn parse_rules(text: &str, origin: &str) -> Result<Policy, RulesError> {
    let cx = Ctx { text, origin };
    let raw: RawFile = toml::from_str(text).map_err(|e| cx.err(e.span(), e.message()))?;

    let mut policy = Policy {
        origin: origin.to_owned(),
        settings: raw.settings,
        ..Policy::default()
    };

    if raw.risky.len() > MAX_RISKY {
        let span = raw.risky.get(MAX_RISKY).map(|r| r.span());
        return Err(cx.err(
            span,
            format!("too many [[risky]] entries (at most {MAX_RISKY})"),
        ));
    }

    // Site entries first: [[allow]]/[[deny]]/[[severity]] may refer to them.
    let mut site_ids: HashMap<String, usize> = HashMap::new();
    for r in raw.risky {
        let span = r.span();
        let line = cx.line(&span);
        let r = r.into_inner();
        let mut ports = r.port;
        ports.extend(r.ports);
        if ports.is_empty() {
            return Err(cx.err(Some(span), "[[risky]] needs `port` or `ports`"));
        }
        let (id, id_span) = match r.id {
            Some(id) => {
                let s = id.span();
                (id.into_inner().0, s)
            }
            None => (default_id(&r.service.0), span.clone()),
        };
        if catalogue::builtin_entry(&id).is_some() {
            return Err(cx.err(
                Some(id_span),
                format!(
                    "id {id:?} is a built-in catalogue entry; give this [[risky]] entry another `id` \
                     (use [[severity]] to re-rate the built-in one)"
                ),
            ));
        }
        if let Some(prev) = site_ids.get(&id) {
            return Err(cx.err(
                Some(id_span),
                format!("duplicate [[risky]] id {id:?} (first defined on line {prev})"),
            ));
        }
        site_ids.insert(id.clone(), line);
        let reason = r.reason.0;
        policy.risky.push(RiskEntry {
            id,
            service: r.service.0,
            ports,
            protocols: r.protocols,
            severity: r.severity,
            default_severity: r.severity,
            risk: Localized {
                en: reason.trim_end_matches('.').to_owned(),
                ja: r
                    .reason_ja
                    .as_ref()
                    .map(|s| s.0.trim_end_matches('。').to_owned()),
            },
            why: Localized {
                en: reason,
                ja: r.reason_ja.map(|s| s.0),
            },
            reference: r.reference.map(|s| s.0),
            units: strings(r.units),
            firewalld: r.firewalld.map(|s| s.0),
            loopback: r.loopback,
            origin: EntryOrigin::Site {
                file: origin.to_owned(),
                line,
            },
        });
    }

    let known = |id: &str| catalogue::builtin_entry(id).is_some() || site_ids.contains_key(id);

    for (kind, list, is_deny) in [("allow", raw.allow, false), ("deny", raw.deny, true)] {
        for m in list {
            let span = m.span();
            let line = cx.line(&span);
            let m = m.into_inner();
            let severity = match m.severity {
                Some(s) if !is_deny => {
                    return Err(cx.err(
                        Some(s.span()),
                        "`severity` is only meaningful in [[deny]] (use [[severity]] to re-rate an entry)",
                    ));
                }
                Some(s) => Some(s.into_inner()),
                None => None,
            };
            let mut rules = Vec::new();
            if let Some(ids) = m.rule {
                let ids_span = ids.span();
                for id in ids.into_inner().0 {
                    if !known(&id.0) {
                        return Err(cx.err(
                            Some(ids_span),
                            format!(
                                "unknown rule id {:?}: not in the catalogue or [[risky]]",
                                id.0
                            ),
                        ));
                    }
                    rules.push(id.0);
                }
            }
            let mut ports = m.port;
            ports.extend(m.ports);
            let rule = MatchRule {
                label: m
                    .name
                    .map(|n| n.0)
                    .unwrap_or_else(|| format!("{origin}:{line}")),
                reason: m.reason,
                ports,
                protocols: m.protocols,
                scopes: m.scope,
                processes: strings(m.process),
                executables: strings(m.executable),
                units: strings(m.unit),
                uids: m.uid,
                users: strings(m.user),
                allow: !is_deny,
                container: m.container,
                rules,
                severity,
                line,
            };
            let unconditional = rule.ports.is_empty()
                && rule.protocols.is_empty()
                && rule.scopes.is_empty()
                && rule.processes.is_empty()
                && rule.executables.is_empty()
                && rule.units.is_empty()
                && rule.uids.is_empty()
                && rule.users.is_empty()
                && rule.container.is_none()
                && rule.rules.is_empty();
            if unconditional {
                return Err(cx.err(
                    Some(span),
                    format!(
                        "[[{kind}]] has no condition and would match every listener; add port, \
                         protocols, scope, process, executable, unit, uid, user, container or rule"
                    ),
                ));
            }
            if is_deny {
                policy.deny.push(rule);
            } else {
                policy.allow.push(rule);
            }
        }
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    for s in raw.severity {
        let line = cx.line(&s.span());
        let s = s.into_inner();
        let rule_span = s.rule.span();
        let rule = s.rule.into_inner();
        if !known(&rule) {
            return Err(cx.err(
                Some(rule_span),
                format!(
                    "unknown rule id {rule:?} in [[severity]]: not in the catalogue or [[risky]]"
                ),
            ));
        }
        if let Some(prev) = seen.get(&rule) {
            return Err(cx.err(
                Some(rule_span),
                format!("duplicate [[severity]] for {rule:?} (first on line {prev})"),
            ));
        }
        seen.insert(rule.clone(), line);
        policy.severity.push(SeverityOverride {
            rule,
            severity: s.severity,
            line,
        });
    }

    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[risky]]            # site-specific port
port = 9999
protocols = ["tcp"]
service = "internal-admin"
severity = "high"
reason = "Our admin daemon"

[[allow]]            # silence
port = 11211
process = "memcached"
scope = ["private"]

[[deny]]
port = 4444
reason = "Metasploit default port"

[[severity]]
rule = "mysql"
severity = "critical"
"#;

    fn err(text: &str) -> (usize, usize, String) {
        match parse_rules(text, "rules.toml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => {
                let (l, c) = e.position().unwrap_or((0, 0));
                (l, c, e.to_string())
            }
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let p = parse_rules(EXAMPLE, "rules.toml").expect("example parses");
        assert_eq!(p.risky.len(), 1);
        let r = &p.risky[0];
        assert_eq!(r.id, "internal-admin");
        assert_eq!(r.ports, vec![PortSpec::single(9999)]);
        assert_eq!(r.severity, Severity::High);
        assert_eq!(
            r.origin,
            EntryOrigin::Site {
                file: "rules.toml".into(),
                line: 2
            }
        );
        assert_eq!(p.allow.len(), 1);
        assert_eq!(p.allow[0].scopes, vec![Scope::Private]);
        assert_eq!(p.allow[0].processes, vec!["memcached".to_owned()]);
        assert_eq!(p.allow[0].label, "rules.toml:9");
        assert_eq!(p.deny[0].ports, vec![PortSpec::single(4444)]);
        assert_eq!(p.severity[0].rule, "mysql");
        assert_eq!(p.settings, Settings::default());
    }

    #[test]
    fn parses_the_module_doc_schema() {
        let text = r#"
[settings]
private_exposure = "alert"
min_severity = "medium"

[[risky]]
id = "x-admin"
ports = [9999, "7000-7010"]
protocol = "udp"
service = "X admin"
reason = "Admin."
reason_ja = "管理用。"
units = "x.service"
loopback = { file = "/etc/x.conf", lines = ["listen 127.0.0.1"], en = "Bind to loopback." }

[[allow]]
name = "lab memcached"
rule = ["memcached", "x-admin"]
executable = "/usr/bin/memcached"
unit = "memcached"
container = false

[[deny]]
protocols = "tcp"
container = "0123456789ab"
severity = "critical"
"#;
        let p = parse_rules(text, "r.toml").expect("parses");
        assert_eq!(p.settings.private_exposure, PrivateExposure::Alert);
        assert_eq!(p.settings.min_severity, Severity::Medium);
        assert_eq!(p.risky[0].ports[1], PortSpec { lo: 7000, hi: 7010 });
        assert_eq!(p.risky[0].protocols, vec![Transport::Udp]);
        assert_eq!(p.risky[0].risk.en, "Admin");
        assert_eq!(p.risky[0].risk.ja.as_deref(), Some("管理用"));
        assert_eq!(p.allow[0].label, "lab memcached");
        assert_eq!(p.allow[0].container, Some(ContainerMatch::HostOnly));
        assert_eq!(p.deny[0].severity, Some(Severity::Critical));
        assert_eq!(
            p.deny[0].container,
            Some(ContainerMatch::Id("0123456789ab".into()))
        );
        assert!(parse_rules("", "empty.toml").is_ok());
    }

    #[test]
    fn unknown_key() {
        let (l, c, msg) =
            err("[[allow]]\nport = 1\n\n[[deny]]\nport = 2\nreason = \"x\"\nprot = \"tcp\"\n");
        assert_eq!((l, c), (7, 1));
        assert!(
            msg.starts_with("rules.toml:7:1: unknown field `prot`, expected one of"),
            "{msg}"
        );
        let (l, c, msg) = err("[[alow]]\nport = 1\n");
        assert_eq!((l, c), (1, 3), "{msg}");
        assert!(msg.contains("unknown field `alow`"), "{msg}");
    }

    #[test]
    fn bad_port() {
        let (l, c, msg) = err("[[allow]]\nport = 70000\n");
        assert_eq!((l, c), (2, 8));
        assert_eq!(msg, "rules.toml:2:8: bad port 70000: ports are 1-65535");
        let (l, c, msg) = err("[[deny]]\nports = [22, 0]\n");
        assert_eq!((l, c), (2, 14), "{msg}");
        assert!(msg.contains("bad port 0"));
        let (l, c, msg) = err("[[deny]]\nport = \"9000-80\"\n");
        assert_eq!((l, c), (2, 8), "{msg}");
        assert!(msg.contains("start is after end"));
        let (_, _, msg) = err("[[deny]]\nport = \"http\"\n");
        assert!(msg.contains("bad port range \"http\""), "{msg}");
    }

    #[test]
    fn unknown_protocol() {
        let (l, c, msg) = err("[[deny]]\nport = 1\nprotocols = [\"tcp\", \"sctp\"]\n");
        assert_eq!((l, c), (3, 21));
        assert!(
            msg.contains("unknown variant `sctp`, expected `tcp` or `udp`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_scope() {
        let (l, c, msg) = err("[[allow]]\nport = 1\nscope = \"internal\"\n");
        assert_eq!((l, c), (3, 9));
        assert!(msg.contains("unknown variant `internal`"), "{msg}");
        assert!(msg.contains("`all-interfaces`"), "{msg}");
    }

    #[test]
    fn unknown_severity() {
        let (l, c, msg) = err("[[severity]]\nrule = \"redis\"\nseverity = \"severe\"\n");
        assert_eq!((l, c), (3, 12));
        assert!(msg.contains("unknown variant `severe`"), "{msg}");
        let (l, c, msg) = err("[settings]\nmin_severity = \"urgent\"\n");
        assert_eq!((l, c), (2, 16), "{msg}");
    }

    #[test]
    fn unknown_catalogue_id() {
        let (l, c, msg) = err("[[severity]]\nrule = \"mysqll\"\nseverity = \"low\"\n");
        assert_eq!((l, c), (2, 8));
        assert!(msg.contains("unknown rule id \"mysqll\""), "{msg}");
        let (l, c, msg) = err("[[allow]]\nrule = [\"redis\", \"nope\"]\n");
        assert_eq!((l, c), (2, 8), "{msg}");
        assert!(msg.contains("\"nope\""));
    }

    #[test]
    fn structural_errors() {
        // A rule with no condition.
        let (l, c, msg) = err("\n[[allow]]\nreason = \"everything\"\n");
        assert_eq!((l, c), (2, 1), "{msg}");
        assert!(msg.contains("would match every listener"));
        // Empty list.
        let (l, c, msg) = err("[[allow]]\nport = 1\nprocess = []\n");
        assert_eq!((l, c), (3, 11), "{msg}");
        assert!(msg.contains("empty array"));
        // severity in allow.
        let (l, c, msg) = err("[[allow]]\nport = 1\nseverity = \"low\"\n");
        assert_eq!((l, c), (3, 12), "{msg}");
        // risky without port, colliding ids, missing required key.
        let (l, _, msg) = err("[[risky]]\nprotocols = \"tcp\"\nservice = \"a\"\nreason = \"b\"\n");
        assert_eq!(l, 1, "{msg}");
        assert!(msg.contains("needs `port` or `ports`"));
        let (l, c, msg) = err(
            "[[risky]]\nid = \"redis\"\nport = 1\nprotocols = \"tcp\"\nservice = \"a\"\nreason = \"b\"\n",
        );
        assert_eq!((l, c), (2, 6), "{msg}");
        assert!(msg.contains("built-in catalogue entry"));
        let (_, _, msg) = err(
            "[[risky]]\nport = 1\nprotocols = \"tcp\"\nservice = \"A b\"\nreason = \"b\"\n\
             [[risky]]\nport = 2\nprotocols = \"tcp\"\nservice = \"a B\"\nreason = \"b\"\n",
        );
        assert!(
            msg.contains("duplicate [[risky]] id \"a-b\" (first defined on line 1)"),
            "{msg}"
        );
        let (_, _, msg) = err("[[risky]]\nport = 1\nservice = \"a\"\nreason = \"b\"\n");
        assert!(msg.contains("missing field `protocols`"), "{msg}");
        let (l, c, msg) = err("[[allow]]\nport = 1\nunit = \"\"\n");
        assert_eq!((l, c), (3, 8), "{msg}");
        // Duplicate [[severity]].
        let (l, _, msg) = err(
            "[[severity]]\nrule = \"nfs\"\nseverity = \"low\"\n[[severity]]\nrule = \"nfs\"\nseverity = \"high\"\n",
        );
        assert_eq!(l, 5, "{msg}");
        // Syntax error.
        let (l, _, msg) = err("[[allow]\nport = 1\n");
        assert_eq!(l, 1, "{msg}");
        assert!(!msg.contains('\n'));
        assert!(msg.contains("invalid table header: expected"), "{msg}");
    }

    #[test]
    fn columns_count_characters() {
        // A Japanese comment before the bad value must not inflate the column.
        let (l, c, _) = err("[[allow]]\nport = 1\nscope = \"x\" # 日本語\n");
        assert_eq!((l, c), (3, 9));
        let (l, c, _) = err("[[allow]]\nname = \"日本\"\nport = 1\nprot = 1\n");
        assert_eq!((l, c), (4, 1));
        assert_eq!(line_col("ab\n日本x", 9), (2, 3));
    }

    #[test]
    fn load_reports_path() {
        let e = load_rules(Path::new("/nonexistent/rules.toml")).expect_err("missing file");
        assert!(
            e.to_string().starts_with("/nonexistent/rules.toml: "),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("pw-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("rules.toml");
        std::fs::write(&path, "[[deny]]\nport = 99999\n").expect("write");
        let e = load_rules(&path).expect_err("bad port");
        assert_eq!(
            e.to_string(),
            format!("{}:2:8: bad port 99999: ports are 1-65535", path.display())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn matching_helpers() {
        assert!(comm_matches("memcached", "memcached"));
        assert!(comm_matches("elasticsearch-node", "elasticsearch-n"));
        assert!(!comm_matches("elasticsearch-node", "elasticsearch"));
        assert!(exe_matches(
            "/usr/bin/memcached",
            "/usr/bin/memcached (deleted)"
        ));
        assert!(exe_matches("memcached", "/usr/bin/memcached"));
        assert!(!exe_matches(
            "/usr/bin/memcached",
            "/usr/local/bin/memcached"
        ));
        assert!(unit_matches("memcached", "memcached.service"));
        assert!(unit_matches("rpcbind.socket", "rpcbind.socket"));
        assert!(!unit_matches("memcached", "memcached.socket"));
    }
}
