//! The command line, declared with clap. `--help` on every command explains it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Operate devsync: prepare the database and JetStream, inspect queues, run a local stack.
///
/// Settings are read like the services read them: defaults, then the TOML file given with
/// --config (or DEVSYNC_CONFIG), then DEVSYNC_* environment variables (DEVSYNC_NATS__URL,
/// DEVSYNC_DATABASE__URL, ...; NATS_URL and DATABASE_URL are accepted too).
#[derive(Debug, Parser)]
#[command(name = "devsyncctl", version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file (overrides DEVSYNC_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations built into this binary (safe to run repeatedly and from
    /// several replicas at once).
    Migrate,
    /// Declare every JetStream stream, consumer, KV bucket and object store, and print what was
    /// created, found unchanged, corrected, or found drifted. Fails if drift cannot be corrected.
    Bootstrap,
    /// Show streams and consumers with their pending and ack-pending counts.
    Status(StatusArgs),
    /// Search the audit trail (what happened to a device, and which worker did it), follow it
    /// live, or verify that nothing in it was altered.
    Audit(AuditArgs),
    /// Check an installation end to end with a throwaway device: register it, report, refresh,
    /// acknowledge, and find its actions in the audit trail; then remove it. Used by `helm test`.
    Smoke(SmokeArgs),
    /// Start the whole system locally: NATS (JetStream) and PostgreSQL in ./.devsync, migrated
    /// and bootstrapped, the devsync services and a simulated fleet, with a live status line,
    /// until Ctrl-C. Uses NATS_URL / DATABASE_URL instead of starting its own when they are set.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// List every reconcile partition consumer instead of one line per lane.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the local stack keeps its data.
    #[arg(long, default_value = ".devsync", value_name = "DIR")]
    pub dir: PathBuf,
    /// Delete the data directory first.
    #[arg(long)]
    pub fresh: bool,
    /// Exit after the stack is up and bootstrapped (for scripts and tests) instead of waiting
    /// for Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
    /// Simulated devices to run (0: none).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Start only NATS and PostgreSQL, not the devsync services and devices.
    #[arg(long)]
    pub no_services: bool,
    /// Seconds a simulated device sleeps between wake cycles.
    #[arg(long, default_value_t = 10)]
    pub device_sleep: u64,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Events of this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Events of this worker (`<service>/<instance>`).
    #[arg(long)]
    pub worker: Option<String>,
    /// Events of this request id (the whole chain of one device message).
    #[arg(long)]
    pub request: Option<String>,
    /// Events of this trace id.
    #[arg(long)]
    pub trace: Option<String>,
    /// Events of this stage (ingress, reconcile, refresh, ...).
    #[arg(long)]
    pub stage: Option<String>,
    /// Events with this outcome (ok, rejected, retry, failed, skipped).
    #[arg(long)]
    pub outcome: Option<String>,
    /// From: an RFC 3339 time or a duration ago (1h, 7d). Default: 24h.
    #[arg(long)]
    pub since: Option<String>,
    /// Until (exclusive): an RFC 3339 time or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// Most events to show.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep running and print new events as they are stored.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain and report any day whose events were altered, removed or
    /// added by hand. Exits non-zero when something does not verify.
    Verify {
        /// Only this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        day: Option<chrono::NaiveDate>,
    },
}

#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// How long the whole round trip may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}
