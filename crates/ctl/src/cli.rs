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
    /// Register, list and inspect devices, change their labels, enable or disable them, and
    /// replace or merge-patch their desired state (versioned and captured by the database like
    /// any change, with 'devsyncctl' as its source).
    Devices(DevicesArgs),
    /// Create campaigns (one merge patch rolled out to a selection of devices in waves, at a
    /// rate, with abort criteria), follow their progress, list them, pause, resume or abort
    /// them. The requestor replica holding the scheduler lease runs them.
    Campaign(CampaignArgs),
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
pub struct DevicesArgs {
    #[command(subcommand)]
    pub command: DevicesCommand,
}

/// Device ids are 1 to 128 of `A-Z a-z 0-9 _ -`. A JSON document is given inline or as
/// `@FILE` (`@-`: standard input) and must be an object.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register a new device (fails if the id is taken).
    Register {
        /// The device id.
        id: String,
        /// A label, repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Webhook (http:// or https://) the fan-out calls with new desired state.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// The initial desired state (a non-empty one starts at version 1).
        #[arg(long, value_name = "JSON|@FILE")]
        desired: Option<String>,
        /// Register it disabled (its messages are refused until it is enabled).
        #[arg(long)]
        disabled: bool,
    },
    /// List devices by id, with their versions and whether they are in sync.
    List {
        /// Only devices with this label, repeatable (all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Most devices to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a device: desired and reported state, the delta (desired minus reported), versions,
    /// last seen, endpoint, labels.
    Show {
        /// The device id.
        id: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set labels (KEY=VALUE, merged into the existing ones) and remove labels (--remove KEY).
    Label {
        /// The device id.
        id: String,
        /// Labels to set.
        #[arg(value_name = "KEY=VALUE", required_unless_present = "remove")]
        set: Vec<String>,
        /// A label to remove, repeatable.
        #[arg(long, value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Disable a device: the requestor refuses its messages until it is enabled again (the
    /// database notifies every requestor, which forgets the cached registration at once).
    Disable {
        /// The device id.
        id: String,
    },
    /// Enable a disabled device.
    Enable {
        /// The device id.
        id: String,
    },
    /// Replace the desired state of a device, or merge-patch it (RFC 7386: null removes a
    /// field) with --merge. Prints the new desired version.
    SetDesired {
        /// The device id.
        id: String,
        /// The new desired state, or the merge patch with --merge.
        #[arg(value_name = "JSON|@FILE")]
        document: String,
        /// Apply the document as an RFC 7386 merge patch instead of replacing.
        #[arg(long)]
        merge: bool,
    },
}

#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// How long the whole round trip may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct CampaignArgs {
    #[command(subcommand)]
    pub command: CampaignCommand,
}

/// Campaign ids, like device ids, are 1 to 128 of `A-Z a-z 0-9 _ -`.
#[derive(Debug, Subcommand)]
pub enum CampaignCommand {
    /// Create a campaign (state `pending`; the scheduler starts it). Prints its id and what it
    /// targets.
    Create {
        /// The campaign id.
        id: String,
        /// Which enabled devices: `labels:K=V,K2=V2` (all must match), `group:NAME` (the label
        /// `group`), `ids:A,B,C`, `ids:@FILE` (one id per line; `@-`: standard input) or `all`.
        #[arg(long, value_name = "SEL")]
        selector: String,
        /// The RFC 7386 merge patch applied to each device's desired state (null removes a
        /// field): a JSON object inline or as `@FILE` (`@-`: standard input).
        #[arg(long, value_name = "JSON|@FILE")]
        patch: String,
        /// push (every targeted device), push-active (devices seen recently; the others pull
        /// on wake-up) or pull-only (no pushes).
        #[arg(long, default_value = "push", value_name = "POLICY")]
        policy: String,
        /// Devices dispatched per second at most (`100` or `100/s`). Default: unlimited.
        #[arg(long, value_name = "N")]
        rate: Option<String>,
        /// Devices sent and not yet acknowledged at most. Default: unlimited.
        #[arg(long, value_name = "N")]
        max_in_flight: Option<String>,
        /// Cumulative waves: `canary` (0.1 %) and percentages, growing, ending at 100%.
        #[arg(long, default_value = "100%", value_name = "WAVES")]
        waves: String,
        /// Abort when `failure-ratio>0.05` (failed / dispatched; `5%` works too) or
        /// `not-converged-after 10m` (a device sent that long ago has not converged); join
        /// both with ` or `, or repeat the option.
        #[arg(long = "abort-if", value_name = "EXPR")]
        abort_if: Vec<String>,
        /// How long a dispatched wave waits for acknowledgements before the next one starts
        /// (whole seconds: 30s, 5m, 1h).
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        wave_wait: String,
    },
    /// Show a campaign: state (and why), policy, wave, and how many devices are targeted,
    /// pending, sent, acknowledged, converged, failed and skipped.
    Status {
        /// The campaign id.
        id: String,
        /// One JSON object instead of text (with --watch: one per refresh).
        #[arg(long)]
        json: bool,
        /// Follow the progress (refreshed twice a second) until the campaign is completed,
        /// aborted or expired, then print its final status. Without a terminal: one line per
        /// refresh.
        #[arg(long)]
        watch: bool,
    },
    /// List the most recent campaigns, newest first.
    List {
        /// Most campaigns to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a pending or running campaign: nothing more is dispatched until it is resumed.
    Pause {
        /// The campaign id.
        id: String,
    },
    /// Resume a paused campaign.
    Resume {
        /// The campaign id.
        id: String,
    },
    /// Abort a pending, running or paused campaign: nothing more is dispatched; devices already
    /// sent keep the change.
    Abort {
        /// The campaign id.
        id: String,
    },
}
