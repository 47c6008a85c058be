//! The command line's definition, in the library so that `cargo xtask` can generate
//! shell completions and the man page from the same clap tree the binary parses.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{
    classify::{self, Lang},
    inventory::SnapshotFormat,
    kernel::probes::HooksChoice,
    output::sinks::Format,
    pipeline::agent,
};

#[derive(Parser)]
#[command(name = "portwatch", version, about, propagate_version = true)]
pub struct Cli {
    /// More diagnostics on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing the flags would only add indirection"
)]
pub enum Command {
    /// Stream listener events: what already listens, then every change, live.
    Watch {
        /// Settings and destinations from a TOML file (flags win; destinations add up).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Output format [default: text on a terminal, json otherwise].
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Append events to this file (created 0600, reopened on SIGHUP). Repeatable.
        #[arg(long, short, value_name = "FILE")]
        output: Vec<PathBuf>,
        /// Send each event as RFC 5424 syslog to unix:/dev/log, udp:HOST:PORT,
        /// tcp:HOST:PORT (octet-counted) or tls:HOST:PORT (RFC 5425). Repeatable.
        #[arg(long, value_name = "ENDPOINT")]
        syslog: Vec<crate::output::sinks::Endpoint>,
        /// Stream JSON lines to tcp:HOST:PORT, tls:HOST:PORT or unix:/PATH (Vector,
        /// Fluent Bit, Logstash), reconnecting with back-off. Repeatable.
        #[arg(long, value_name = "ENDPOINT")]
        forward: Vec<crate::output::sinks::Endpoint>,
        /// Send each event as RFC 5424 syslog over RELP to HOST:PORT (or tls:HOST:PORT):
        /// delivered only once the relay acknowledged it (rsyslog imrelp).
        /// Repeatable.
        #[arg(long, value_name = "ENDPOINT", value_parser = crate::output::sinks::Endpoint::parse_relp)]
        relp: Vec<crate::output::sinks::Endpoint>,
        /// CA certificate(s), PEM, that tls: destinations must be signed by [default: the
        /// system's store]. Verification cannot be turned off.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Client certificate (PEM) for tls: destinations that ask for one.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Where each stream destination (forward, syslog tcp:/tls:, relp) keeps the
        /// events it has not delivered yet, one directory per destination [default:
        /// /var/lib/portwatch/spool].
        #[arg(long, value_name = "DIR")]
        spool_dir: Option<PathBuf>,
        /// Most bytes each destination's spool may take on disk; when full, the oldest
        /// events are dropped and counted [default: 268435456].
        #[arg(long, value_name = "BYTES", value_parser = parse_spool_bytes)]
        spool_max_bytes: Option<u64>,
        /// Write to stdout too [default: only when no other destination is given].
        #[arg(long)]
        stdout: bool,
        /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9100), paths /metrics and /healthz.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Kernel ring buffer size in bytes (a power of two, at least 4096) [default:
        /// 1048576].
        #[arg(long, value_parser = parse_ring_bytes)]
        ring_bytes: Option<u32>,
        /// Do not report the listeners that exist at start.
        #[arg(long)]
        no_snapshot: bool,
        /// Kernel hook set: direct (fentry/fexit or kprobes on inet_listen/inet_bind) where
        /// the kernel allows it, else stable (tracepoint + cgroup hooks).
        #[arg(long, value_enum, default_value_t = HooksChoice::Auto)]
        hooks: HooksChoice,
        /// Run this many nice levels above normal (0 keeps normal priority) [default: 5].
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=20))]
        priority_boost: Option<u8>,
        /// Events each destination may fall behind by before they are dropped (and
        /// counted) [default: 16384].
        #[arg(long, value_parser = parse_queue_events)]
        queue_events: Option<usize>,
        /// Listens/binds per second one process may report one by one; above it the kernel
        /// folds the rest into `listeners-folded` events (exact counts and ports; 0:
        /// never fold) [default: 1000].
        #[arg(long, value_name = "N")]
        fold_above: Option<u32>,
        /// The same budget for all processes of one user together (0: none)
        /// [default: 4 x --fold-above].
        #[arg(long, value_name = "N")]
        fold_user_above: Option<u32>,
        /// Seconds between `sensor-health` events (0: none) [default: 60].
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
        health_interval: Option<u64>,
        /// Keep running when the start-up self-check finds a hook that delivers nothing
        /// (reported in `sensor-started` and every `sensor-health`).
        #[arg(long)]
        allow_degraded: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Print what listens now, attributed: the `ss -tulp` audit, complete.
    Snapshot {
        /// Output format.
        #[arg(long, value_enum, default_value_t = SnapshotFormat::Table)]
        format: SnapshotFormat,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Work with rules files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Subcommand)]
pub enum RulesCommand {
    /// Validate a rules file without starting the sensor.
    Check {
        /// The TOML rules file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct PolicyArgs {
    /// Site rules (TOML): allow, deny, extra risky ports, severity overrides.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Language of alert messages and advice [default: from LC_ALL/LC_MESSAGES/LANG].
    #[arg(long, value_enum)]
    pub lang: Option<LangArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LangArg {
    En,
    Ja,
}

impl PolicyArgs {
    pub fn load(self) -> anyhow::Result<agent::PolicyOptions> {
        let rules = match &self.rules {
            Some(path) => Some(classify::load_rules(path)?),
            None => None,
        };
        let lang = match self.lang {
            Some(LangArg::En) => Lang::En,
            Some(LangArg::Ja) => Lang::Ja,
            None => classify::lang_from_env(),
        };
        Ok(agent::PolicyOptions {
            rules,
            rules_path: self.rules,
            lang,
        })
    }
}

fn parse_queue_events(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (16..=1_048_576).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of events from 16 to 1048576"
        )),
    }
}

pub fn parse_spool_bytes(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= crate::output::spool::MIN_MAX_BYTES => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of bytes of at least {} (try 268435456)",
            crate::output::spool::MIN_MAX_BYTES
        )),
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if !(4096..=1 << 30).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "{n} is not a power of two from 4096 to 1073741824 (try 1048576)"
        ));
    }
    Ok(n)
}

/// Sections of the top-level man page that clap has no place for.
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Stopped by SIGINT or SIGTERM after detaching every program and flushing; or the reader of
the output went away. \fBsnapshot\fR: no listener raises an alert.
.TP
\fB1\fR
An error, explained in one line on stderr (not root, no BTF, a hook that cannot attach,
an unwritable output file).
.TP
\fB2\fR
A bad flag or argument.
.TP
\fB3\fR
\fBsnapshot\fR: at least one listener raises an alert.
.SH ENVIRONMENT
.TP
\fBLC_ALL\fR, \fBLC_MESSAGES\fR, \fBLANG\fR
Messages and advice are in Japanese when the first one set starts with \fBja\fR
(unless \fB\-\-lang\fR says otherwise).
.TP
\fBNO_COLOR\fR
When set and not empty, alerts on a terminal are not coloured.
.SH FILES
.TP
\fI/var/log/portwatch/events.json\fR
The events of the packaged service, one ECS JSON document per line.
.TP
\fI/etc/default/portwatch\fR
\fBPORTWATCH_OPTS\fR: extra \fBwatch\fR arguments for the packaged service.
.TP
\fI/usr/lib/systemd/system/portwatch.service\fR
The service, with its capability bounding set and sandboxing.
.SH "SEE ALSO"
\fBportwatch-watch\fR(8), \fBportwatch-snapshot\fR(8), \fBportwatch-rules\fR(8),
\fBss\fR(8), \fBsystemd.exec\fR(5)
"#;

/// Writes the man pages (section 8: the agent runs as root) and the bash, zsh and fish
/// completions for this command line into `dir`: man/portwatch*.8 and
/// completions/{portwatch.bash,_portwatch,portwatch.fish}.
///
/// The binary runs this for `portwatch generate DIR`, a subcommand it adds to [`Cli`]
/// itself, hidden, so that it is in none of these pages.
pub fn generate(dir: &Path) -> io::Result<()> {
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    fs::create_dir_all(&man_dir)?;
    fs::create_dir_all(&completions)?;

    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    write_man_pages(&cmd, &man_dir, true)?;

    let mut cmd = Cli::command();
    for (shell, file) in [
        (clap_complete::Shell::Bash, "portwatch.bash"),
        (clap_complete::Shell::Zsh, "_portwatch"),
        (clap_complete::Shell::Fish, "portwatch.fish"),
    ] {
        let mut out = io::BufWriter::new(fs::File::create(completions.join(file))?);
        clap_complete::generate(shell, &mut cmd, "portwatch", &mut out);
        out.flush()?;
    }
    Ok(())
}

/// One page per visible (sub)command, named as `git` does: portwatch-rules-check.8.
fn write_man_pages(cmd: &clap::Command, dir: &Path, top: bool) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, dir, false)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration");
    let mut page = Vec::new();
    man.render(&mut page)?;
    if top {
        page.extend_from_slice(MAN_EXTRA.as_bytes());
    }
    fs::write(dir.join(man.get_filename()), page)
}
