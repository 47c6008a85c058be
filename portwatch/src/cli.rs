//! The command line's definition, in the library so that `cargo xtask` can generate
//! shell completions and the man page from the same clap tree the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    agent,
    classify::{self, Lang},
    emit::Format,
    probes::HooksChoice,
    report::SnapshotFormat,
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
pub enum Command {
    /// Stream listener events: what already listens, then every change, live.
    Watch {
        /// Output format [default: text on a terminal, json otherwise].
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Append events to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Kernel ring buffer size in bytes (a power of two, at least 4096).
        #[arg(long, default_value_t = 1 << 20, value_parser = parse_ring_bytes)]
        ring_bytes: u32,
        /// Do not report the listeners that exist at start.
        #[arg(long)]
        no_snapshot: bool,
        /// Kernel hook set: direct (fentry/fexit or kprobes on inet_listen/inet_bind) where
        /// the kernel allows it, else stable (tracepoint + cgroup hooks).
        #[arg(long, value_enum, default_value_t = HooksChoice::Auto)]
        hooks: HooksChoice,
        /// Run this many nice levels above normal (0 keeps normal priority).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=20))]
        priority_boost: u8,
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
        Ok(agent::PolicyOptions { rules, lang })
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two >= 4096 (try 1048576)"));
    }
    Ok(n)
}
