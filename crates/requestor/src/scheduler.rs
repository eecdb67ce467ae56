//! Singleton jobs: what exactly one requestor replica does at a time, while it holds the
//! scheduler lease (`devsync_runtime::lease`, a KV entry with a TTL; when the holder dies
//! another replica takes over within the TTL).
//!
//! - Periodic sweeps, every `sweep_every`, each recorded in `sweep_runs` and audited:
//!   - `drift`: devices whose desired version has waited for an acknowledgement longer than
//!     `drift_after` get a re-push (a `ScheduledSweep` request in the `bulk` lane; the
//!     reconciler turns it into a push under the current push policy), at most `drift_limit`
//!     per run, oldest change first;
//!   - `expire-campaigns`: campaigns without progress for `campaign_expiry` are expired;
//!   - `inactive`: devices not seen for `inactive_after` are marked inactive (any sign of life
//!     marks them active again).
//! - The campaign driver ([`crate::campaigns`]): one task per running campaign.
//!
//! Every job is an idempotent database statement, so the short overlap possible around a
//! lease hand-over is harmless.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::Utc;
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{self as pb, ScheduledSweep, SyncRequest, sync_request};
use devsync_runtime::Shutdown;
use devsync_runtime::audit::Auditor;
use devsync_runtime::config::ConfigError;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::service::Service;
use devsync_runtime::telemetry;
use devsync_types::convert::timestamp;
use devsync_types::{AuditOutcome, DeviceId, Lane, RequestId, subjects};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::campaigns::Driver;

/// Settings of the scheduled jobs and the campaign driver (`[requestor.scheduler]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerSettings {
    /// How often the sweeps run.
    #[serde(with = "humantime_serde")]
    pub sweep_every: Duration,
    /// A device whose desired version is unacknowledged this long is re-pushed.
    #[serde(with = "humantime_serde")]
    pub drift_after: Duration,
    /// Most devices re-pushed per drift sweep.
    pub drift_limit: i64,
    /// Devices not seen this long are marked inactive.
    #[serde(with = "humantime_serde")]
    pub inactive_after: Duration,
    /// Campaigns without progress this long are expired.
    #[serde(with = "humantime_serde")]
    pub campaign_expiry: Duration,
    /// How often the campaign driver looks for work when it has none.
    #[serde(with = "humantime_serde")]
    pub campaign_tick: Duration,
    /// Most devices per campaign batch (one transaction, one fan-out message).
    pub campaign_page: i64,
    /// Concurrent dispatch transactions of a campaign without a rate limit.
    pub campaign_parallelism: usize,
    /// Devices seen within this window are dispatched first by campaigns.
    #[serde(with = "humantime_serde")]
    pub active_window: Duration,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            sweep_every: Duration::from_secs(60),
            drift_after: Duration::from_secs(300),
            drift_limit: 10_000,
            inactive_after: Duration::from_secs(24 * 3600),
            campaign_expiry: Duration::from_secs(7 * 24 * 3600),
            campaign_tick: Duration::from_millis(200),
            campaign_page: 1000,
            campaign_parallelism: 2,
            active_window: Duration::from_secs(15 * 60),
        }
    }
}

impl SchedulerSettings {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sweep_every.is_zero() || self.campaign_tick.is_zero() {
            return Err(ConfigError::invalid(
                "requestor.scheduler.sweep_every",
                "sweep_every and campaign_tick must be above zero",
            ));
        }
        if self.drift_limit < 1 || !(1..=10_000).contains(&self.campaign_page) {
            return Err(ConfigError::invalid(
                "requestor.scheduler.campaign_page",
                "drift_limit must be at least 1 and campaign_page between 1 and 10000",
            ));
        }
        Ok(())
    }
}

/// The scheduled jobs of one replica.
#[derive(Clone)]
pub struct Scheduler {
    js: jetstream::Context,
    pool: Pool,
    auditor: Auditor,
    worker: String,
    settings: SchedulerSettings,
    /// The campaign drivers' published outbox rows, which the outbox sweeper also deletes.
    published: devsync_runtime::outbox::Published,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// The jobs of `service`; its campaign drivers leave their published outbox rows in
    /// `published`.
    pub fn new(
        service: &Service,
        settings: SchedulerSettings,
        published: devsync_runtime::outbox::Published,
    ) -> Self {
        Self {
            js: service.js.clone(),
            pool: service.pool.clone(),
            auditor: service.auditor.clone(),
            worker: service.worker_id.to_string(),
            settings,
            published,
        }
    }

    /// Runs the jobs whenever `held` says this replica holds the lease, until `shutdown`.
    pub async fn run(self, mut held: watch::Receiver<bool>, shutdown: Shutdown) {
        loop {
            if !*held.borrow_and_update() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = held.changed() => if changed.is_err() { return },
                }
                continue;
            }
            tracing::info!("scheduler lease held: running sweeps and campaigns");
            let term = shutdown.child_token();
            let sweeps = tokio::spawn(self.clone().sweeps(term.clone()));
            let campaigns = tokio::spawn(self.clone().campaigns(term.clone()));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = held.changed() => {
                        if changed.is_err() || !*held.borrow_and_update() {
                            break;
                        }
                    }
                }
            }
            term.cancel();
            let _ = sweeps.await;
            let _ = campaigns.await;
            tracing::info!("scheduler stopped on this replica");
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn sweeps(self, term: Shutdown) {
        // Check often, run when due: the last run (by any replica) is the reference, so a new
        // lease holder does not run a sweep its predecessor has just run.
        let mut ticker = tokio::time::interval(self.settings.sweep_every / 5);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = ticker.tick() => {}
            }
            for sweep in [Sweep::Drift, Sweep::ExpireCampaigns, Sweep::Inactive] {
                match self.due(sweep).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(error) => {
                        tracing::warn!(sweep = sweep.name(), error = %format!("{error:#}"), "cannot read sweep runs");
                        continue;
                    }
                }
                if let Err(error) = self.sweep(sweep).await {
                    tracing::warn!(sweep = sweep.name(), error = %format!("{error:#}"), "sweep failed");
                }
            }
        }
    }

    /// Whether `sweep` last started at least one period ago (or never ran).
    async fn due(&self, sweep: Sweep) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT coalesce(max(started_at) < now() - make_interval(secs => $2), true)
                 FROM sweep_runs WHERE sweep = $1",
                &[
                    &sweep.name(),
                    &(self.settings.sweep_every.as_secs_f64() * 0.95),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Runs one sweep now, recorded in `sweep_runs` and the audit trail; returns how many
    /// devices or campaigns it affected.
    pub async fn sweep(&self, sweep: Sweep) -> anyhow::Result<i64> {
        let client = self.pool.get().await?;
        let run: i64 = client
            .query_one(
                "INSERT INTO sweep_runs (sweep, worker) VALUES ($1, $2) RETURNING id",
                &[&sweep.name(), &self.worker],
            )
            .await?
            .get(0);
        let s = &self.settings;
        let result = match sweep {
            Sweep::Drift => self.drift(run).await,
            Sweep::ExpireCampaigns => client
                .execute(
                    "UPDATE campaigns SET state = 'expired', finished_at = now(), updated_at = now(),
                         state_reason = 'no progress for ' || $1::text
                     WHERE state IN ('pending', 'running', 'paused')
                       AND updated_at < now() - make_interval(secs => $2)",
                    &[
                        &humantime::format_duration(s.campaign_expiry).to_string(),
                        &s.campaign_expiry.as_secs_f64(),
                    ],
                )
                .await
                .map(|n| n as i64)
                .map_err(anyhow::Error::from),
            Sweep::Inactive => client
                .execute(
                    "UPDATE devices SET active = false
                     WHERE active AND coalesce(last_seen, created_at) < now() - make_interval(secs => $1)",
                    &[&s.inactive_after.as_secs_f64()],
                )
                .await
                .map(|n| n as i64)
                .map_err(anyhow::Error::from),
        };
        let (affected, error) = match &result {
            Ok(affected) => (*affected, None),
            Err(error) => (0, Some(format!("{error:#}"))),
        };
        client
            .execute(
                "UPDATE sweep_runs SET finished_at = now(), affected = $2, error = $3 WHERE id = $1",
                &[&run, &affected, &error],
            )
            .await?;
        let request = RequestId::parse(format!("sweep:{}:{run}", sweep.name()))?;
        let record = self.auditor.record(
            Utc::now(),
            None,
            Some(&request),
            "scheduler",
            &format!("sweep.{}", sweep.name()),
            if error.is_none() {
                AuditOutcome::Ok
            } else {
                AuditOutcome::Failed
            },
            json!({"run": run, "affected": affected, "error": error}),
        );
        publish::publish_all(&self.js, self.auditor.message(&[record])).await?;
        tracing::debug!(sweep = sweep.name(), run, affected, "sweep done");
        result
    }

    async fn drift(&self, run: i64) -> anyhow::Result<i64> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id FROM devices
                 WHERE enabled AND desired_version > applied_desired_version
                   AND desired_changed_at < now() - make_interval(secs => $1)
                 ORDER BY desired_changed_at LIMIT $2",
                &[
                    &self.settings.drift_after.as_secs_f64(),
                    &self.settings.drift_limit,
                ],
            )
            .await?;
        let now = Utc::now();
        let messages: Vec<Outgoing> = rows
            .iter()
            .filter_map(|row| DeviceId::parse(row.get::<_, String>(0)).ok())
            .map(|device| repush(&device, run, now))
            .collect();
        let count = messages.len() as i64;
        publish::publish_all(&self.js, messages).await?;
        Ok(count)
    }

    async fn campaigns(self, term: Shutdown) {
        let mut drivers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut ticker = tokio::time::interval(self.settings.campaign_tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = term.cancelled() => break,
                _ = ticker.tick() => {}
            }
            drivers.retain(|_, task| !task.is_finished());
            let ids = match self.active_campaigns().await {
                Ok(ids) => ids,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot list campaigns");
                    continue;
                }
            };
            for id in ids {
                if drivers.contains_key(&id) {
                    continue;
                }
                let driver = Driver::new(
                    self.js.clone(),
                    self.pool.clone(),
                    self.auditor.clone(),
                    self.settings.clone(),
                    id.clone(),
                    self.published.clone(),
                );
                drivers.insert(id, tokio::spawn(driver.run(term.clone())));
            }
        }
        for (_, task) in drivers {
            let _ = task.await;
        }
    }

    async fn active_campaigns(&self) -> anyhow::Result<Vec<String>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE campaigns SET state = 'running', started_at = coalesce(started_at, now()),
                     updated_at = now()
                 WHERE state = 'pending' RETURNING id",
                &[],
            )
            .await?;
        let mut ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let rows = client
            .query(
                "SELECT id FROM campaigns WHERE state IN ('running', 'paused') ORDER BY created_at",
                &[],
            )
            .await?;
        ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The periodic sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Re-push to devices drifting longer than the threshold.
    Drift,
    /// Expire campaigns without progress.
    ExpireCampaigns,
    /// Mark devices not seen for a long time inactive.
    Inactive,
}

impl Sweep {
    /// The sweep's name in `sweep_runs` and the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drift => "drift",
            Self::ExpireCampaigns => "expire-campaigns",
            Self::Inactive => "inactive",
        }
    }
}

fn repush(device: &DeviceId, run: i64, now: chrono::DateTime<Utc>) -> Outgoing {
    let request_id = format!("sweep:drift:{run}:{device}");
    let request = SyncRequest {
        request_id: request_id.clone(),
        device_id: device.to_string(),
        lane: pb::Lane::Bulk as i32,
        received_at: Some(timestamp(now)),
        causation_id: format!("sweep:drift:{run}"),
        kind: Some(sync_request::Kind::Schedule(ScheduledSweep {
            sweep: Sweep::Drift.name().into(),
            run_id: run.to_string(),
        })),
        reply_to: String::new(),
        accepted_by: String::new(),
    };
    let mut headers = HeaderMap::new();
    telemetry::inject(&mut headers);
    Outgoing {
        subject: subjects::request(Lane::Bulk, device),
        msg_id: request_id,
        payload: request.encode_to_vec().into(),
        headers: Some(headers),
    }
}
