//! The audit service: every action of every devsync service, stored and searchable, so an
//! operator can answer "what happened to device X, and which worker did it?" in seconds.
//!
//! - [`ingest`]: a shared durable consumer on `DEVSYNC_AUDIT` (replicas split the load, and
//!   each replica runs `audit.workers` pulls at once); each batch of messages is stored in one
//!   transaction (set-based insert; a batch that was stored before is retried with `ON
//!   CONFLICT DO NOTHING`, so a redelivered event is stored once), hash-chained per day, and
//!   acked after commit.
//! - [`query`]: the search parameters, validated with an error that names the bad one.
//! - [`api`]: `GET /v1/audit` and `GET /v1/devices/<id>/timeline` (JSON, cursor pagination),
//!   and the same search as the NATS service endpoint `devsync.api.audit.search`.
//! - Retention: partitions are created ahead and dropped whole once older than
//!   `audit.retention` (`DEVSYNC_AUDIT_RETENTION`).

pub mod api;
pub mod ingest;
pub mod query;

use std::sync::Arc;
use std::time::Duration;

use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, ConfigError, Settings as SettingsTrait};
use devsync_runtime::service::Service;
use devsync_runtime::worker::{self, WorkerMetrics};
use devsync_types::{ServiceName, names};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The audit service's own settings (`[audit]`, `DEVSYNC_AUDIT__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditSettings {
    /// How long events are kept; whole days are dropped after it (`DEVSYNC_AUDIT_RETENTION`).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Messages stored per transaction. A message carries up to 500 events, so this also
    /// bounds the events held in memory (64 × 500).
    pub batch_size: usize,
    /// Batches stored at once by this replica, each on its own pull of the shared consumer and
    /// its own database connection (the hash chain alone takes turns).
    pub workers: usize,
    /// How long a batch waits for more messages after its first (at most `batch_size`): a
    /// transaction costs about as much for a few events as for thousands, and audit events
    /// can wait a little. At half the peak report rate, batches of two or three messages took
    /// three times the database CPU per event of full load.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// How often partitions are created ahead and old ones dropped.
    #[serde(with = "humantime_serde")]
    pub maintain_every: Duration,
    /// Days of partitions created ahead.
    pub partitions_ahead: i32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            batch_size: 64,
            workers: 2,
            linger: Duration::from_millis(100),
            maintain_every: Duration::from_secs(3600),
            partitions_ahead: 7,
        }
    }
}

/// Everything the audit service reads from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: CommonSettings,
    pub audit: AuditSettings,
}

impl SettingsTrait for Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        if self.audit.retention < Duration::from_secs(24 * 3600) {
            return Err(ConfigError::invalid(
                "audit.retention",
                "must be at least one day (partitions are daily)",
            ));
        }
        if !(1..=10_000).contains(&self.audit.batch_size) {
            return Err(ConfigError::invalid(
                "audit.batch_size",
                "must be between 1 and 10000",
            ));
        }
        if !(1..=16).contains(&self.audit.workers) {
            return Err(ConfigError::invalid(
                "audit.workers",
                "must be between 1 and 16",
            ));
        }
        Ok(())
    }

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    fn extract(figment: &figment::Figment) -> Result<Self, figment::Error> {
        let mut audit: AuditSettings = devsync_runtime::config::section(figment, "audit")?;
        // The documented short form DEVSYNC_AUDIT_RETENTION (key `audit_retention`).
        if let Ok(text) = figment.extract_inner_lossy::<String>("audit_retention") {
            audit.retention = humantime::parse_duration(&text).map_err(|e| {
                figment::Error::from(format!("DEVSYNC_AUDIT_RETENTION {text:?}: {e}"))
            })?;
        }
        Ok(Self {
            common: figment.extract_lossy()?,
            audit,
        })
    }
}

/// A started service (see `devsync_runtime::service::Running`).
pub use devsync_runtime::service::Running;

/// Starts the audit service; it runs until `shutdown`.
pub async fn start(settings: Settings, shutdown: Shutdown) -> anyhow::Result<Running> {
    let service = Service::start(settings.common.clone(), ServiceName::Audit).await?;
    {
        let client = service.pool.get().await?;
        let (created, dropped) = devsync_store::audit::maintain(
            &client,
            settings.audit.retention,
            settings.audit.partitions_ahead,
        )
        .await?;
        tracing::info!(created, dropped, "audit partitions maintained");
    }
    let mut registry = Registry::default();
    let metrics = ingest::Metrics::register(&mut registry);
    let worker_metrics = WorkerMetrics::register(&mut registry);
    let http = service
        .serve_http(
            registry,
            api::router(service.pool.clone()),
            shutdown.clone(),
        )
        .await?;
    let nats_api = tokio::spawn(api::serve_nats(
        service.client.clone(),
        service.pool.clone(),
        shutdown.clone(),
    ));
    let mut spec = service.worker_spec(names::STREAM_AUDIT, names::CONSUMER_AUDIT, None);
    spec.batch_size = settings.audit.batch_size;
    spec.linger = settings.audit.linger;
    let ingest = Arc::new(ingest::Ingest::new(service.pool.clone(), metrics));
    let consumers: Vec<_> = (0..settings.audit.workers)
        .map(|_| {
            tokio::spawn(worker::run(
                service.js.clone(),
                spec.clone(),
                ingest.clone(),
                worker_metrics.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    let maintenance = tokio::spawn(maintain(
        service.pool.clone(),
        settings.audit.clone(),
        shutdown.clone(),
    ));
    let task = tokio::spawn(async move {
        for consumer in consumers {
            let _ = consumer.await;
        }
        let _ = maintenance.await;
        let _ = nats_api.await;
        let _ = http.task.await;
        tracing::info!("audit service stopped");
        Ok(())
    });
    Ok(Running::new(http.local_addr, task))
}

async fn maintain(pool: deadpool_postgres::Pool, settings: AuditSettings, shutdown: Shutdown) {
    let mut ticker = tokio::time::interval(settings.maintain_every);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let result = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            devsync_store::audit::maintain(&client, settings.retention, settings.partitions_ahead)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok((created, dropped)) => {
                tracing::info!(created, dropped, "audit partitions maintained")
            }
            Err(error) => tracing::warn!(%error, "audit maintenance failed"),
        }
    }
}

/// Runs the audit service until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    start(settings, shutdown).await?.wait().await
}
