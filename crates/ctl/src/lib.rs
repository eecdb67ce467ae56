//! `devsyncctl`, the operator's tool.
//!
//! - `migrate`: applies the embedded database migrations.
//! - `bootstrap`: declares the JetStream topology and prints what it created or found.
//! - `status`: streams and consumers with pending and ack-pending counts.
//! - `audit`: search (table, JSON, follow) and verify the audit trail.
//! - `devices`: register, list, show (with the delta), label, enable / disable devices and
//!   replace or merge-patch their desired state.
//! - `campaign`: create campaigns (selector, merge patch, policy, rate, waves, abort criteria),
//!   show and watch their progress, list, pause, resume and abort them.
//! - `smoke`: an end-to-end round trip with a throwaway device (`helm test`).
//! - `up`: the local stack (NATS + PostgreSQL + topology) until Ctrl-C.
//!
//! Settings come from the same layered configuration as the services (`DEVSYNC_*` variables,
//! `--config FILE`), so the tool talks to exactly what the services talk to.

pub mod cli;
pub mod commands;
pub mod output;

use std::process::ExitCode;

use clap::Parser;
use devsync_runtime::config::{self, CommonSettings, ConfigSources};

use crate::cli::{Cli, Command};

/// Exit code for usage and configuration errors (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Parses arguments, loads settings and runs the command.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = ConfigSources::from_process(cli.config.clone());
    let settings: CommonSettings = match config::load(&sources) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("devsyncctl: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let _ = devsync_runtime::telemetry::init("devsyncctl", &quiet_logs(&settings), &sources);
    let result = match cli.command {
        Command::Migrate => commands::migrate::run(&settings).await,
        Command::Bootstrap => commands::bootstrap::run(&settings).await,
        Command::Status(args) => commands::status::run(&settings, &args).await,
        Command::Audit(args) => commands::audit::run(&settings, args).await,
        Command::Devices(args) => commands::devices::run(&settings, args).await,
        Command::Campaign(args) => commands::campaign::run(&settings, args).await,
        Command::Smoke(args) => commands::smoke::run(&settings, &args).await,
        Command::Up(args) => commands::up::run(settings, &sources, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("devsyncctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The tool prints its own output; logs only say something when it goes wrong.
fn quiet_logs(settings: &CommonSettings) -> config::LogSettings {
    let mut log = settings.log.clone();
    if log.level == config::LogSettings::default().level {
        log.level = "warn".into();
    }
    log
}
