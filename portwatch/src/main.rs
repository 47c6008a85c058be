//! The `portwatch` command line.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use portwatch::{
    agent,
    classify::{self, Lang},
    emit::Format,
    report::{self, SnapshotFormat},
};

#[derive(Parser)]
#[command(name = "portwatch", version, about, propagate_version = true)]
struct Cli {
    /// More diagnostics on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum RulesCommand {
    /// Validate a rules file without starting the sensor.
    Check {
        /// The TOML rules file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// Site rules (TOML): allow, deny, extra risky ports, severity overrides.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Language of alert messages and advice [default: from LC_ALL/LC_MESSAGES/LANG].
    #[arg(long, value_enum)]
    lang: Option<LangArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LangArg {
    En,
    Ja,
}

impl PolicyArgs {
    fn load(self) -> anyhow::Result<agent::PolicyOptions> {
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

/// Minimal stderr logger: one line per message, no timestamps (journald adds them).
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "portwatch: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    log::set_max_level(level);
    let _ = log::set_boxed_logger(Box::new(StderrLog(level)));

    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portwatch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Watch {
            format,
            output,
            ring_bytes,
            no_snapshot,
            priority_boost,
            policy,
        } => {
            let policy = policy.load()?;
            portwatch::sys::require_root()?;
            portwatch::sys::boost_priority(priority_boost);
            let format = format.unwrap_or(if output.is_none() && std::io::stdout().is_terminal() {
                Format::Text
            } else {
                Format::Json
            });
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::watch(agent::WatchOptions {
                format,
                output,
                ring_bytes,
                snapshot: !no_snapshot,
                policy,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { format, policy } => {
            let alerts = report::snapshot_command(format, policy.load()?)?;
            // Usable from cron and CI: 3 means "something risky is exposed".
            Ok(if alerts > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Rules {
            command: RulesCommand::Check { file },
        } => {
            let policy = classify::load_rules(&file)?;
            println!(
                "{}: ok ({} risky ports, {} allow, {} deny, {} severity overrides)",
                file.display(),
                policy.risky.len(),
                policy.allow.len(),
                policy.deny.len(),
                policy.severity.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
