//! The reconciler: devsync's workers.
//!
//! - [`membership`]: replicas find each other in the `devsync-members` KV bucket and split the
//!   partitions of `DEVSYNC_REQ` by rendezvous hashing; adding or removing a replica moves
//!   partitions within a heartbeat or two, without restarting anyone.
//! - [`owner`]: runs a worker loop per owned partition and lane (pinned-client consumers, so
//!   one replica is active per partition even during a handover).
//! - [`apply`]: one PostgreSQL transaction per batch, idempotent per device sequence, outputs
//!   through the outbox, acked only after commit and publish.
//! - `devsync_runtime::outbox`: publishes what a crash left in the outbox.
//!
//! Lanes: `rt` and `bulk` have separate pools of transaction slots (`reconciler.bulk_share` of
//! `reconciler.transactions` for bulk, the rest for rt), so campaigns and sweeps cannot delay
//! device traffic beyond their share and are never starved by it. Few slots on purpose: the
//! batches that wait for a slot are applied together (group commit), and a few large
//! transactions cost less CPU per request than many small ones. A lane runs a second
//! transaction beside a running one only when `reconciler.parallel_above` requests wait; a
//! slot is freed at commit, before the outputs are published.

pub mod apply;
pub mod membership;
pub mod owner;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, ConfigError, Settings as SettingsTrait};
use devsync_runtime::service::Service;
use devsync_runtime::worker::WorkerMetrics;
use devsync_types::{Lane, Partition, ServiceName};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::apply::{Applier, Failpoint, Shared};

/// The reconciler's own settings (`[reconciler]`, `DEVSYNC_RECONCILER__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconcilerSettings {
    /// Transactions running at once, both lanes together (at least 2, one per lane; at most
    /// `database.pool_size`). Batches waiting for a slot go together in the next transaction.
    pub transactions: usize,
    /// Share of the transaction slots reserved for the bulk lane (0 < share < 1).
    pub bulk_share: f64,
    /// Requests that must be waiting before a lane starts a transaction beside one already
    /// running; fewer wait for it to commit and go into the next one together (at moderate
    /// rates, fewer and larger transactions: less database CPU per request).
    pub parallel_above: usize,
    /// Desired documents larger than this travel through the object store.
    pub claim_check_threshold: usize,
    /// Devices seen within this window count as active for push policies.
    #[serde(with = "humantime_serde")]
    pub active_window: Duration,
    /// How often the outbox sweeper looks for leftovers, and deletes the published rows no
    /// transaction took since its last look (below `outbox_age`, or they are swept first).
    #[serde(with = "humantime_serde")]
    pub outbox_sweep_every: Duration,
    /// How old an outbox row must be before the sweeper publishes it.
    #[serde(with = "humantime_serde")]
    pub outbox_age: Duration,
    /// Test-only fault: `abort-after-commit` (the first commit), `abort-after-commit:<p>`
    /// (each commit with probability p; the chaos suite's), or `refuse-device:<id>` (every
    /// transaction holding that device's requests fails).
    pub failpoint: Option<String>,
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        Self {
            transactions: 3,
            bulk_share: 0.25,
            parallel_above: 256,
            claim_check_threshold: 8 * 1024,
            active_window: Duration::from_secs(15 * 60),
            outbox_sweep_every: Duration::from_secs(2),
            outbox_age: Duration::from_secs(5),
            failpoint: None,
        }
    }
}

/// Everything the reconciler reads from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: CommonSettings,
    pub reconciler: ReconcilerSettings,
}

impl Settings {
    fn failpoint(&self) -> Result<Option<Failpoint>, ConfigError> {
        match self.reconciler.failpoint.as_deref() {
            None | Some("") => Ok(None),
            Some("abort-after-commit") => {
                Ok(Some(Failpoint::AbortAfterCommit { probability: 1.0 }))
            }
            Some(other) if let Some(device) = other.strip_prefix("refuse-device:") => {
                devsync_types::DeviceId::parse(device)
                    .map(|d| Some(Failpoint::RefuseDevice(d)))
                    .map_err(|e| ConfigError::invalid("reconciler.failpoint", e.to_string()))
            }
            Some(other) => {
                let probability = other
                    .strip_prefix("abort-after-commit:")
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| *p > 0.0 && *p <= 1.0);
                match probability {
                    Some(probability) => Ok(Some(Failpoint::AbortAfterCommit { probability })),
                    None => Err(ConfigError::invalid(
                        "reconciler.failpoint",
                        format!(
                            "{other:?} is not a failpoint (abort-after-commit, \
                             abort-after-commit:<probability per batch, 0 < p <= 1>, or \
                             refuse-device:<device id>)"
                        ),
                    )),
                }
            }
        }
    }
}

impl SettingsTrait for Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        let share = self.reconciler.bulk_share;
        if !(share > 0.0 && share < 1.0) {
            return Err(ConfigError::invalid(
                "reconciler.bulk_share",
                "must be between 0 and 1 (exclusive)",
            ));
        }
        let transactions = self.reconciler.transactions;
        if transactions < 2 || transactions > self.common.database.pool_size {
            return Err(ConfigError::invalid(
                "reconciler.transactions",
                "must be at least 2 (one per lane) and at most database.pool_size",
            ));
        }
        if self.reconciler.outbox_sweep_every >= self.reconciler.outbox_age {
            return Err(ConfigError::invalid(
                "reconciler.outbox_sweep_every",
                "must be below reconciler.outbox_age",
            ));
        }
        self.failpoint()?;
        Ok(())
    }

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    fn extract(figment: &figment::Figment) -> Result<Self, figment::Error> {
        Ok(Self {
            common: figment.extract_lossy()?,
            reconciler: devsync_runtime::config::section(figment, "reconciler")?,
        })
    }
}

/// A started reconciler.
#[derive(Debug)]
pub struct Running {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_addr: std::net::SocketAddr,
    owned: Arc<RwLock<BTreeSet<Partition>>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The partitions this replica runs now.
    pub fn owned(&self) -> BTreeSet<Partition> {
        self.owned.read().expect("owned lock").clone()
    }

    /// The partitions with a batch being handled at this moment.
    pub fn active(&self) -> BTreeSet<Partition> {
        self.shared
            .active
            .lock()
            .expect("active lock")
            .keys()
            .copied()
            .collect()
    }

    /// Waits until the reconciler has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("reconciler task panicked")
    }
}

/// Transaction slots per lane: `bulk_share` of them for bulk (at least one), the rest rt.
fn lane_slots(transactions: usize, bulk_share: f64) -> (usize, usize) {
    let bulk = ((transactions as f64 * bulk_share).round() as usize).clamp(1, transactions - 1);
    (transactions - bulk, bulk)
}

/// Starts the reconciler; it runs until `shutdown`.
pub async fn start(settings: Settings, shutdown: Shutdown) -> anyhow::Result<Running> {
    let failpoint = settings.failpoint()?;
    let service = Service::start(settings.common.clone(), ServiceName::Reconciler).await?;
    let mut registry = Registry::default();
    let metrics = apply::Metrics::register(&mut registry);
    let worker_metrics = WorkerMetrics::register(&mut registry);
    let http = service
        .serve_http(registry, Router::new(), shutdown.clone())
        .await?;
    let shared = Arc::new(Shared {
        js: service.js.clone(),
        pool: service.pool.clone(),
        auditor: service.auditor.clone(),
        claim_check_threshold: settings.reconciler.claim_check_threshold,
        active_window: settings.reconciler.active_window,
        parallel_above: settings.reconciler.parallel_above,
        metrics,
        failpoint,
        active: Mutex::new(HashMap::new()),
        published: devsync_runtime::outbox::Published::default(),
    });
    let (rt_slots, bulk_slots) = lane_slots(
        settings.reconciler.transactions,
        settings.reconciler.bulk_share,
    );
    let appliers = [
        Applier::new(shared.clone(), Lane::Rt, rt_slots),
        Applier::new(shared.clone(), Lane::Bulk, bulk_slots),
    ];
    let instance = service.worker_id.instance().to_owned();
    let mut members = membership::run(
        service.js.clone(),
        instance.clone(),
        settings.common.topology.member_ttl,
        shutdown.clone(),
    )
    .await
    .context("join reconciler membership")?;
    let partitions = settings.common.topology.partitions;
    let (assign_tx, assign_rx) =
        watch::channel(membership::assign(&members.borrow(), partitions, &instance));
    let follow = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = follow.cancelled() => break,
                changed = members.changed() => if changed.is_err() { break },
            }
            let mine = membership::assign(&members.borrow_and_update(), partitions, &instance);
            assign_tx.send_if_modified(|current| {
                let changed = *current != mine;
                *current = mine;
                changed
            });
        }
    });
    let owned = Arc::new(RwLock::new(BTreeSet::new()));
    let owner = owner::Owner {
        service: service.clone(),
        appliers,
        metrics: worker_metrics,
        owned: owned.clone(),
    };
    let sweeper = tokio::spawn(devsync_runtime::outbox::run(
        service.js.clone(),
        service.pool.clone(),
        apply::OUTBOX_OWNER,
        settings.reconciler.outbox_sweep_every,
        settings.reconciler.outbox_age,
        shared.published.clone(),
        shutdown.clone(),
    ));
    let owner_shutdown = shutdown.clone();
    let flush = shared.clone();
    let task = tokio::spawn(async move {
        owner.run(assign_rx, owner_shutdown).await;
        let _ = sweeper.await;
        // What the last transactions published; a row left here (the flush failed) is
        // published again by the next sweeper, a duplicate the streams drop within their
        // duplicate window.
        flush.published.flush_or_warn(&flush.pool).await;
        let _ = http.task.await;
        tracing::info!("reconciler stopped");
    });
    Ok(Running {
        http_addr: http.local_addr,
        owned,
        shared,
        task,
    })
}

/// Runs the reconciler until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    start(settings, shutdown).await?.wait().await
}

#[cfg(test)]
mod tests {
    use super::{Settings, lane_slots};
    use devsync_runtime::config::Settings as _;

    #[test]
    fn both_lanes_always_get_slots() {
        assert_eq!(lane_slots(3, 0.25), (2, 1));
        assert_eq!(lane_slots(8, 0.25), (6, 2));
        assert_eq!(lane_slots(2, 0.25), (1, 1));
        assert_eq!(lane_slots(2, 0.9), (1, 1));
        assert_eq!(lane_slots(16, 0.5), (8, 8));
    }

    #[test]
    fn transactions_need_a_slot_per_lane_and_a_connection_each() {
        let mut settings = Settings::default();
        settings.validate().unwrap();
        settings.reconciler.transactions = 1;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("reconciler.transactions"), "{error}");
        settings.reconciler.transactions = settings.common.database.pool_size + 1;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("at most database.pool_size"), "{error}");
    }

    #[test]
    fn the_outbox_sweeper_looks_more_often_than_a_row_ages() {
        let mut settings = Settings::default();
        settings.reconciler.outbox_sweep_every = settings.reconciler.outbox_age;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("reconciler.outbox_sweep_every"), "{error}");
        assert!(error.contains("below reconciler.outbox_age"), "{error}");
    }
}
