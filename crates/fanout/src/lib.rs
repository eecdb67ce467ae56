//! The fan-out: delivers new desired state from the database to devices.
//!
//! - [`push`]: the shared durable consumer `fanout` on `DEVSYNC_FANOUT`. A push task (one
//!   device, from the reconciler) or a campaign batch (many devices, from the campaign driver)
//!   is delivered by writing the device's last desired state into the `devsync-desired` KV
//!   bucket (so a device that was asleep reads it on wake-up) and notifying the device on
//!   `devsync.out.<device>.desired`. Devices with an HTTP endpoint also get a webhook task.
//!   Active devices are served first.
//! - [`policy`]: the push policy of a delivery — the task's own, its campaign's, or the global
//!   one, live-changeable in the `devsync-config` KV bucket (`push_policy`): `push`,
//!   `push-active` (devices not seen within the active window are skipped and pull on
//!   wake-up), `pull-only` (nothing is written).
//! - [`webhook`]: the consumer `fanout-webhook`: one POST per task, with a timeout, retried
//!   with jittered exponential backoff through JetStream redelivery, and a circuit breaker per
//!   endpoint so a failing endpoint costs nothing while open and never slows other deliveries.
//!   A webhook that fails every attempt is dead-lettered (and fails its campaign device).
//!
//! Every delivery attempt and its outcome is an audit event.

pub mod policy;
pub mod push;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, ConfigError, Settings as SettingsTrait};
use devsync_runtime::service::Service;
use devsync_runtime::worker::{self, WorkerMetrics};
use devsync_types::{PushPolicy, ServiceName, names};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The fan-out's own settings (`[fanout]`, `DEVSYNC_FANOUT__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FanoutSettings {
    /// The push policy when neither the task nor its campaign sets one and the
    /// `devsync-config` bucket has no `push_policy`.
    pub default_policy: PushPolicy,
    /// Devices seen within this window count as active (`push-active`, and served first).
    #[serde(with = "humantime_serde")]
    pub active_window: Duration,
    /// Desired documents larger than this travel through the object store.
    pub claim_check_threshold: usize,
    /// Deliveries in flight at once within one batch.
    pub concurrency: usize,
    /// How long one webhook call may take.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Attempts of one webhook before it is dead-lettered.
    pub webhook_attempts: u64,
    /// Webhook worker loops (each handles a batch concurrently).
    pub webhook_workers: usize,
    /// Consecutive failures of one endpoint that open its circuit.
    pub breaker_failures: u32,
    /// How long an open circuit rejects calls before one is let through again.
    #[serde(with = "humantime_serde")]
    pub breaker_open: Duration,
    /// How long a campaign's policy is cached.
    #[serde(with = "humantime_serde")]
    pub campaign_cache_ttl: Duration,
}

impl Default for FanoutSettings {
    fn default() -> Self {
        Self {
            default_policy: PushPolicy::Push,
            active_window: Duration::from_secs(15 * 60),
            claim_check_threshold: 8 * 1024,
            concurrency: 256,
            webhook_timeout: Duration::from_secs(5),
            webhook_attempts: 5,
            webhook_workers: 4,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
            campaign_cache_ttl: Duration::from_secs(10),
        }
    }
}

/// Everything the fan-out reads from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: CommonSettings,
    pub fanout: FanoutSettings,
}

impl SettingsTrait for Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        let f = &self.fanout;
        if f.concurrency == 0 {
            return Err(ConfigError::invalid(
                "fanout.concurrency",
                "must be at least 1",
            ));
        }
        if f.webhook_attempts == 0
            || f.webhook_attempts > self.common.topology.max_deliver.max(0) as u64
        {
            return Err(ConfigError::invalid(
                "fanout.webhook_attempts",
                "must be between 1 and topology.max_deliver",
            ));
        }
        if f.webhook_workers == 0 || f.breaker_failures == 0 {
            return Err(ConfigError::invalid(
                "fanout.webhook_workers",
                "webhook workers and breaker failures must be at least 1",
            ));
        }
        if f.webhook_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "fanout.webhook_timeout",
                "must be above zero",
            ));
        }
        Ok(())
    }

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    fn extract(figment: &figment::Figment) -> Result<Self, figment::Error> {
        Ok(Self {
            common: figment.extract_lossy()?,
            fanout: devsync_runtime::config::section(figment, "fanout")?,
        })
    }
}

/// A started service (see `devsync_runtime::service::Running`).
pub use devsync_runtime::service::Running;

/// Starts the fan-out; it runs until `shutdown` is cancelled.
pub async fn start(settings: Settings, shutdown: Shutdown) -> anyhow::Result<Running> {
    let service = Service::start(settings.common.clone(), ServiceName::Fanout).await?;
    let desired = service
        .js
        .get_key_value(names::KV_DESIRED)
        .await
        .context("kv bucket devsync-desired")?;
    let config = service
        .js
        .get_key_value(names::KV_CONFIG)
        .await
        .context("kv bucket devsync-config")?;
    let mut registry = Registry::default();
    let metrics = push::Metrics::register(&mut registry);
    let webhook_metrics = webhook::Metrics::register(&mut registry);
    let worker_metrics = WorkerMetrics::register(&mut registry);
    let http = service
        .serve_http(registry, Router::new(), shutdown.clone())
        .await?;
    let policies = policy::Policies::start(
        config,
        service.pool.clone(),
        settings.fanout.default_policy,
        settings.fanout.campaign_cache_ttl,
        shutdown.clone(),
    )
    .await?;
    let pusher = Arc::new(push::Pusher::new(
        &service,
        desired,
        policies,
        settings.fanout.clone(),
        metrics,
    ));
    let mut workers = vec![tokio::spawn(worker::run(
        service.js.clone(),
        service.worker_spec(names::STREAM_FANOUT, names::CONSUMER_FANOUT, None),
        pusher,
        worker_metrics.clone(),
        shutdown.clone(),
    ))];
    let webhooks = Arc::new(webhook::Webhooks::new(
        &service,
        settings.fanout.clone(),
        webhook_metrics,
    )?);
    for _ in 0..settings.fanout.webhook_workers {
        workers.push(tokio::spawn(worker::run(
            service.js.clone(),
            service.worker_spec(names::STREAM_FANOUT, names::CONSUMER_WEBHOOK, None),
            webhooks.clone(),
            worker_metrics.clone(),
            shutdown.clone(),
        )));
    }
    let task = tokio::spawn(async move {
        for worker in workers {
            let _ = worker.await;
        }
        let _ = http.task.await;
        tracing::info!("fan-out stopped");
        Ok(())
    });
    Ok(Running::new(http.local_addr, task))
}

/// Runs the fan-out until `shutdown`, then drains.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    start(settings, shutdown).await?.wait().await
}
