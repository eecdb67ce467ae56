//! The requestor: devsync's front door for devices.
//!
//! - [`ingress`]: a queue-group subscription on `devsync.in.>` (every replica shares the load).
//!   Each message is validated before anything else — size, kind, per-device rate limit,
//!   registered and enabled device (cached; for a refresh, checked by its query after the
//!   decode), protobuf decode, identity, content — then turned
//!   into a sync request on `DEVSYNC_REQ` (lane `rt`, `Nats-Msg-Id` from device + sequence, so
//!   retries are deduplicated). A device that asked with request/reply is answered only once
//!   the request is durable. Refusals get an `ErrorReply`, an audit event, and for undecodable
//!   input a dead letter.
//! - [`refresh`]: a waking device's "what changed since version N" is read-only, so it is
//!   answered here at once from PostgreSQL (changes since N, the full document, or "up to
//!   date") instead of queueing behind writes in the reconciler. Refreshes have their own
//!   queue group, in-flight budget, and a runtime thread holding their own NATS connection
//!   and database pool ([`refresh::Runtime`]), so a flood of reports does not delay them.
//! - [`checkins`]: last-seen times, written in batches.
//! - payloads over the threshold go to the object store (claim check, `devsync_runtime::blobs`).
//! - [`relay`]: administrators' desired-state edits (captured by a database trigger) relayed
//!   in order to `DEVSYNC_REQ`, with a persisted cursor.
//! - [`scheduler`]: on the one replica holding the scheduler lease, periodic sweeps (re-push to
//!   drifting devices, expire stale campaigns, mark inactive devices) and the
//!   [`campaigns`] driver (selector expansion, waves, rate, max in flight, abort criteria).
//!
//! Why a queue group and not the `DEVSYNC_IN` stream: the stream costs a JetStream write, a
//! delivery and an ack per message before the message even reaches `DEVSYNC_REQ`, where it
//! becomes durable anyway. Served directly, a report costs one JetStream write at the
//! requestor, a flooding device is refused before it costs any storage, and a device that wants
//! confirmation still gets it only once the request is durable. A fire-and-forget publish while
//! no requestor runs is lost, which is what fire-and-forget means; the device client uses
//! request/reply and retries.

pub mod campaigns;
pub mod checkins;
pub mod ingress;
pub mod listen;
pub mod refresh;
pub mod registry;
pub mod relay;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, ConfigError, Settings as SettingsTrait};
use devsync_runtime::dlq::AdvisorySweeper;
use devsync_runtime::service::Service;
use devsync_runtime::worker::{self, WorkerMetrics};
use devsync_types::{ServiceName, names};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The requestor's own settings (`[requestor]`, `DEVSYNC_REQUESTOR__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestorSettings {
    /// Largest payload a device may send, in bytes.
    pub max_payload: usize,
    /// Reported states larger than this travel through the object store.
    pub claim_check_threshold: usize,
    /// Sustained messages per second one device may send.
    pub rate_per_device: u32,
    /// Burst above the sustained rate.
    pub burst_per_device: u32,
    /// How long a device's registration (known, enabled) is cached at most. Changes are
    /// notified by the database and forget the entry at once; this is the backstop for a
    /// notification lost without the listening connection noticing.
    #[serde(with = "humantime_serde")]
    pub device_cache_ttl: Duration,
    /// Most registrations cached.
    pub device_cache_capacity: u64,
    /// Most device messages in flight at once (validated, waiting for durability).
    pub max_in_flight: usize,
    /// How often check-in times are written.
    #[serde(with = "humantime_serde")]
    pub checkin_flush: Duration,
    /// How often the desired-change relay looks for changes when no notification woke it.
    #[serde(with = "humantime_serde")]
    pub relay_poll: Duration,
    /// Desired changes relayed per transaction.
    pub relay_batch: usize,
    /// Scheduled jobs and campaigns, run by the replica holding the scheduler lease.
    pub scheduler: scheduler::SchedulerSettings,
}

impl Default for RequestorSettings {
    fn default() -> Self {
        Self {
            max_payload: 256 * 1024,
            claim_check_threshold: 8 * 1024,
            rate_per_device: 20,
            burst_per_device: 40,
            device_cache_ttl: Duration::from_secs(300),
            device_cache_capacity: 200_000,
            max_in_flight: 8192,
            checkin_flush: Duration::from_secs(1),
            relay_poll: Duration::from_secs(1),
            relay_batch: 1000,
            scheduler: scheduler::SchedulerSettings::default(),
        }
    }
}

/// Everything the requestor reads from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: CommonSettings,
    pub requestor: RequestorSettings,
}

impl SettingsTrait for Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        let r = &self.requestor;
        if r.max_payload == 0 || r.max_payload > self.common.topology.max_message_size as usize / 2
        {
            return Err(ConfigError::invalid(
                "requestor.max_payload",
                "must be between 1 and half of topology.max_message_size",
            ));
        }
        if r.claim_check_threshold == 0 || r.claim_check_threshold > r.max_payload {
            return Err(ConfigError::invalid(
                "requestor.claim_check_threshold",
                "must be between 1 and requestor.max_payload",
            ));
        }
        if r.rate_per_device == 0 || r.burst_per_device == 0 {
            return Err(ConfigError::invalid(
                "requestor.rate_per_device",
                "rate and burst must be at least 1",
            ));
        }
        if r.relay_batch == 0 {
            return Err(ConfigError::invalid(
                "requestor.relay_batch",
                "must be at least 1",
            ));
        }
        r.scheduler.validate()?;
        if r.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "requestor.max_in_flight",
                "must be at least 1",
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
            requestor: devsync_runtime::config::section(figment, "requestor")?,
        })
    }
}

/// A started service (see `devsync_runtime::service::Running`).
pub use devsync_runtime::service::Running;

/// Starts the requestor; it runs until `shutdown` is cancelled.
pub async fn start(settings: Settings, shutdown: Shutdown) -> anyhow::Result<Running> {
    let service = Service::start(settings.common.clone(), ServiceName::Requestor).await?;
    let mut registry = Registry::default();
    let ingress_metrics = ingress::Metrics::register(&mut registry);
    let worker_metrics = WorkerMetrics::register(&mut registry);
    let http = service
        .serve_http(registry, Router::new(), shutdown.clone())
        .await?;
    let checkins = checkins::Checkins::start(
        service.pool.clone(),
        settings.requestor.checkin_flush,
        shutdown.clone(),
    );
    let refresh_runtime = refresh::Runtime::start()?;
    let refresh_connections = refresh_runtime
        .connect(&settings.common, format!("{}-refresh", service.worker_id))
        .await?;
    // Ingress audit events are flushed after the ingress drained (its own token).
    let audit_stop = Shutdown::new();
    let (audits, audit_task) = devsync_runtime::audit::Sink::spawn(
        service.js.clone(),
        service.auditor.clone(),
        audit_stop.clone(),
    );
    let ingress = Arc::new(ingress::Ingress::new(
        &service,
        refresh_connections,
        settings.requestor.clone(),
        checkins.clone(),
        ingress_metrics,
        audits,
    ));
    let registry_listener = ingress.registry().listen(
        settings.common.database.url.expose().to_owned(),
        shutdown.clone(),
    );
    let (subscription, refreshes) = ingress.subscribe().await?;
    let refresh_task = refresh_runtime
        .handle()
        .spawn(Arc::clone(&ingress).serve_refreshes(refreshes, shutdown.clone()));
    let sweeper = tokio::spawn(worker::run(
        service.js.clone(),
        service.worker_spec(names::STREAM_ADVISORIES, names::CONSUMER_DLQ_SWEEPER, None),
        Arc::new(AdvisorySweeper::new(service.js.clone())),
        worker_metrics,
        shutdown.clone(),
    ));
    let relay = tokio::spawn(
        relay::Relay::new(
            service.js.clone(),
            service.pool.clone(),
            service.auditor.clone(),
            settings.requestor.relay_batch,
        )
        .run(
            settings.common.database.url.expose().to_owned(),
            settings.requestor.relay_poll,
            shutdown.clone(),
        ),
    );
    let published = devsync_runtime::outbox::Published::default();
    let outbox = tokio::spawn(devsync_runtime::outbox::run(
        service.js.clone(),
        service.pool.clone(),
        campaigns::OUTBOX_OWNER,
        Duration::from_secs(2),
        Duration::from_secs(5),
        published.clone(),
        shutdown.clone(),
    ));
    let members = service
        .js
        .get_key_value(names::KV_MEMBERS)
        .await
        .context("kv bucket devsync-members")?;
    let lease = devsync_runtime::lease::Lease::spawn(
        members,
        names::LEASE_SCHEDULER,
        service.worker_id.to_string(),
        settings.common.topology.member_ttl,
        shutdown.clone(),
    );
    let scheduler = tokio::spawn(
        scheduler::Scheduler::new(
            &service,
            settings.requestor.scheduler.clone(),
            published.clone(),
        )
        .run(lease.watch(), shutdown.clone()),
    );
    let drain = settings.common.shutdown.drain_timeout;
    let task = tokio::spawn(async move {
        ingress.serve(subscription, shutdown.clone(), drain).await;
        let _ = tokio::time::timeout(drain, refresh_task).await;
        ingress.drain_refreshes(drain).await;
        refresh_runtime.stop().await;
        audit_stop.cancel();
        let _ = audit_task.await;
        checkins.flush().await;
        let _ = sweeper.await;
        let _ = relay.await;
        let _ = registry_listener.await;
        let _ = outbox.await;
        let _ = scheduler.await;
        // The campaign drivers' last published rows (left here, the next sweeper publishes
        // them again, a duplicate the stream drops within its duplicate window).
        published.flush_or_warn(&service.pool).await;
        lease.wait().await;
        let _ = http.task.await;
        tracing::info!("requestor stopped");
        Ok(())
    });
    Ok(Running::new(http.local_addr, task))
}

/// Runs the requestor until `shutdown`, then drains.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    start(settings, shutdown).await?.wait().await
}
