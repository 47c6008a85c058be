//! The `portwatch` command line.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;

use portwatch::{
    agent, classify,
    cli::{Cli, Command, RulesCommand},
    emit::Format,
    report,
};

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
            hooks,
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
                hooks,
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
