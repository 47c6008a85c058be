//! The `portwatch` command line.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _};

use portwatch::{
    classify,
    cli::{Cli, Command, RulesCommand},
    inventory,
    output::sinks::{Format, SinkSpec},
    pipeline::agent,
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
    // `portwatch generate DIR`: the packagers' hook (`cargo xtask package`). It is added
    // here, not in `Cli`, so the man pages and completions rendered from `Cli` omit it;
    // clap_complete lists even hidden subcommands.
    let matches = Cli::command()
        .subcommand(
            clap::Command::new("generate")
                .hide(true)
                .about("Write the man pages and shell completions into DIR")
                .arg(
                    clap::Arg::new("dir")
                        .required(true)
                        .value_parser(clap::value_parser!(PathBuf)),
                ),
        )
        .try_get_matches();
    let matches = match matches {
        Ok(m) => m,
        Err(e) => return usage_error(&e),
    };
    if let Some(("generate", m)) = matches.subcommand() {
        let dir = m.get_one::<PathBuf>("dir").expect("required by clap");
        return match portwatch::cli::generate(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "portwatch: error: writing man pages and completions to {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
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
            eprintln!("portwatch: error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// A bad flag or value gets one line, like every other error, with exit status 2: clap's
/// own rendering adds a tip, the usage and a pointer to --help on lines of their own.
/// Help and version (asked for, or shown for a missing subcommand) print as clap has them.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.render().to_string();
    // The message is what comes before clap's first blank line.
    let msg = text.split("\n\n").next().unwrap_or_default().trim();
    let msg = msg.strip_prefix("error: ").unwrap_or(msg);
    // clap puts "[possible values: ...]" on a line of its own.
    let msg = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("portwatch: error: {} (see --help)", one_line(&msg));
    ExitCode::from(2)
}

/// Errors quote what the user gave (paths, values): control characters in them, line
/// breaks included, are escaped, so an error is always one line on a terminal.
fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Watch {
            config,
            format,
            output,
            syslog,
            forward,
            relp,
            tls_ca,
            tls_cert,
            tls_key,
            spool_dir,
            spool_max_bytes,
            stdout,
            metrics,
            ring_bytes,
            no_snapshot,
            hooks,
            priority_boost,
            queue_events,
            fold_above,
            fold_user_above,
            health_interval,
            allow_degraded,
            policy,
        } => {
            let file = match &config {
                Some(path) => portwatch::config::load(path)?,
                None => portwatch::config::Config::default(),
            };
            let mut policy = policy;
            if policy.rules.is_none() {
                policy.rules.clone_from(&file.rules);
            }
            let policy = policy.load()?;
            portwatch::kernel::host::require_root()?;
            portwatch::kernel::host::boost_priority(
                priority_boost.or(file.priority_boost).unwrap_or(5),
            );
            let mut sinks: Vec<SinkSpec> = file.sink_specs();
            sinks.extend(output.into_iter().map(SinkSpec::File));
            sinks.extend(syslog.into_iter().map(SinkSpec::Syslog));
            sinks.extend(forward.into_iter().map(SinkSpec::Forward));
            sinks.extend(relp.into_iter().map(SinkSpec::Relp));
            let delivery = portwatch::output::sinks::Delivery {
                tls: portwatch::output::tls::TlsFiles {
                    ca: tls_ca.or(file.tls_ca.clone()),
                    cert: tls_cert.or(file.tls_cert.clone()),
                    key: tls_key.or(file.tls_key.clone()),
                },
                spool_dir: spool_dir
                    .or(file.spool_dir.clone())
                    .unwrap_or_else(|| portwatch::output::sinks::SPOOL_DIR.into()),
                spool_max_bytes: spool_max_bytes
                    .or(file.spool_max_bytes)
                    .unwrap_or(portwatch::output::spool::DEFAULT_MAX_BYTES),
            };
            if (stdout || sinks.is_empty()) && !sinks.iter().any(|s| matches!(s, SinkSpec::Stdout))
            {
                sinks.insert(0, SinkSpec::Stdout);
            }
            let to_stdout = sinks.iter().any(|s| matches!(s, SinkSpec::Stdout));
            let format = format.or(file.format.map(Format::from)).unwrap_or(
                if to_stdout && std::io::stdout().is_terminal() {
                    Format::Text
                } else {
                    Format::Json
                },
            );
            let health_interval = health_interval.or(file.health_interval).unwrap_or(60);
            let fold_above = fold_above
                .or(file.fold_above)
                .unwrap_or(portwatch::pipeline::agent::FOLD_ABOVE);
            let fold_user_above = fold_user_above
                .or(file.fold_user_above)
                .unwrap_or(fold_above.saturating_mul(4));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::watch(agent::WatchOptions {
                format,
                sinks,
                delivery,
                metrics: metrics.or(file.metrics),
                ring_bytes: ring_bytes.or(file.ring_bytes).unwrap_or(1 << 20),
                snapshot: !no_snapshot,
                queue_events: queue_events
                    .or(file.queue_events)
                    .unwrap_or(portwatch::output::sinks::QUEUE_EVENTS),
                health_interval: (health_interval > 0)
                    .then(|| std::time::Duration::from_secs(health_interval)),
                allow_degraded,
                hooks,
                fold_above,
                fold_user_above,
                policy,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { format, policy } => {
            let alerts = inventory::snapshot_command(format, policy.load()?)?;
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
            for w in policy.warnings() {
                eprintln!("portwatch: warning: {w}");
            }
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
