//! devsync's benchmarks. One run measures, on the same machine and in this order:
//!
//! 1. the raw limits ([`raw`]): JetStream async publish and pull-consume of 300-byte messages,
//!    core NATS publish, batched PostgreSQL upsert;
//! 2. the end-to-end scenario ([`e2e`]): device reports from many devices through the
//!    requestor and reconciler (run as separate processes, as deployed) into PostgreSQL, with
//!    the ingress answer latency, the report-to-database latency, refreshes at 1,000/s during
//!    and after the load, and each service's peak RSS and CPU;
//! 3. scenario b ([`campaign`]): one campaign over a million registered devices, `push`, no
//!    rate limit — devices delivered per second through NATS and the fan-out's memory;
//! 4. scenario d ([`backlog`]): a million-request backlog built while no reconciler runs, then
//!    drained: drain rate, zero loss, and the reconciler's memory staying flat;
//! 5. the audit store ([`audit`]): ingest rate through the audit service, and search latency by
//!    device over a large stored history;
//!
//! then prints one table where every throughput is also given as a ratio of the raw limits
//! measured in the same run, so a figure from a noisy machine is still honest, and writes the
//! same as JSON and Markdown into the results directory, with a chart ([`chart`]) of scenario a's
//! throughput over time and latency by percentile. Sizes are flags; `--quick` finishes in
//! about a minute. Nothing here asserts timings: benchmarks report, tests check behaviour.

pub mod audit;
pub mod backlog;
pub mod campaign;
pub mod chart;
pub mod e2e;
pub mod procs;
pub mod raw;
pub mod report;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use devsync_localstack::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions};

/// devsync benchmarks: raw limits, then end-to-end scenarios, on this machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "devsync-bench", version)]
pub struct Args {
    /// Small sizes: finishes in about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Devices in the end-to-end scenario.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Reports each device sends.
    #[arg(long)]
    pub reports_per_device: Option<u64>,
    /// Device requests in flight at once.
    #[arg(long, default_value_t = 2000)]
    pub concurrency: usize,
    /// Audit events ingested through the audit service.
    #[arg(long)]
    pub audit_events: Option<u64>,
    /// Audit events stored before measuring search latency.
    #[arg(long)]
    pub audit_history: Option<u64>,
    /// Skip the audit scenario.
    #[arg(long)]
    pub skip_audit: bool,
    /// Skip scenario a (device reports end to end, with c and the refresh figures).
    #[arg(long)]
    pub skip_reports: bool,
    /// Skip scenario b (the campaign).
    #[arg(long)]
    pub skip_campaign: bool,
    /// Skip scenario d (the backlog).
    #[arg(long)]
    pub skip_backlog: bool,
    /// Devices in scenario d (each sends `--reports-per-device` reports into the backlog).
    #[arg(long)]
    pub backlog_devices: Option<u64>,
    /// Devices the campaign of scenario b targets.
    #[arg(long)]
    pub campaign_devices: Option<u64>,
    /// Messages for the raw JetStream measurements.
    #[arg(long)]
    pub raw_messages: Option<usize>,
    /// Where results go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Where the bench keeps its NATS and PostgreSQL data (deleted first).
    #[arg(long, default_value = "target/devsync-bench")]
    pub dir: PathBuf,
}

impl Args {
    fn devices(&self) -> usize {
        self.devices
            .unwrap_or(if self.quick { 10_000 } else { 100_000 })
    }
    fn reports_per_device(&self) -> u64 {
        self.reports_per_device.unwrap_or(10)
    }
    fn raw_messages(&self) -> usize {
        self.raw_messages
            .unwrap_or(if self.quick { 50_000 } else { 300_000 })
    }
}

/// The bench's PostgreSQL: durable as in production (fsync, full-page writes and synchronous
/// commit stay on) and sized as one would size it for this machine, for the raw limits and the
/// scenarios alike. With the defaults (128 MB of shared buffers, a checkpoint every 1 GB of WAL)
/// the scenarios spend much of their time writing full-page images after each checkpoint.
pub const POSTGRES_SETTINGS: [(&str, &str); 5] = [
    ("shared_buffers", "2GB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "15min"),
    ("wal_compression", "lz4"),
    ("wal_buffers", "64MB"),
];

/// Runs everything and writes the results.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let nats = NatsServer::start(NatsOptions::in_dir(dir.join("nats"))?).context("nats-server")?;
    let postgres = PostgresCluster::start(PostgresOptions {
        dir: dir.join("postgres"),
        port: None,
        ephemeral: false,
        settings: POSTGRES_SETTINGS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect(),
    })
    .context("postgres")?;
    let database_url = postgres.url("devsync");
    devsync_store::ensure_database(&database_url).await?;
    devsync_store::migrate(&database_url).await?;
    println!(
        "devsync-bench: nats {} , postgres {}, {} cores",
        nats.url(),
        database_url,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let raw = raw::measure(nats.url(), &database_url, args.raw_messages()).await?;
    raw.print();
    let e2e = if args.skip_reports {
        None
    } else {
        Some(
            e2e::run(
                nats.url(),
                &database_url,
                &dir,
                args.devices(),
                args.reports_per_device(),
                args.concurrency,
            )
            .await?,
        )
    };
    let campaign = if args.skip_campaign {
        None
    } else {
        let devices = args
            .campaign_devices
            .unwrap_or(if args.quick { 50_000 } else { 1_000_000 });
        Some(campaign::run(nats.url(), &database_url, &dir, devices).await?)
    };
    let backlog = if args.skip_backlog {
        None
    } else {
        let devices = args
            .backlog_devices
            .unwrap_or(if args.quick { 10_000 } else { 100_000 });
        Some(
            backlog::run(
                nats.url(),
                &database_url,
                &dir,
                devices,
                args.reports_per_device(),
            )
            .await?,
        )
    };
    let audit = if args.skip_audit {
        None
    } else {
        let ingest = args
            .audit_events
            .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
        let history = args
            .audit_history
            .unwrap_or(if args.quick { 1_000_000 } else { 10_000_000 });
        // The scenarios before left their services' audit events in DEVSYNC_AUDIT (no audit
        // service ran during b and d); drop them so the ingest figure counts only its own.
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
        if let Ok(stream) = js.get_stream(devsync_types::names::STREAM_AUDIT).await {
            stream.purge().await?;
        }
        Some(audit::run(nats.url(), &database_url, &dir, ingest, history).await?)
    };
    let results = report::Results::new(&args, raw, e2e, campaign, backlog, audit);
    results.print();
    let written = results.write(&args.out)?;
    println!("results written to {}", written.display());
    drop(postgres);
    drop(nats);
    Ok(())
}
