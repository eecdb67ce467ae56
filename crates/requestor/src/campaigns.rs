//! The campaign driver: rolls one desired-state change out to many devices.
//!
//! A campaign (a row of `campaigns`, created by `devsyncctl campaign create`) moves through:
//!
//! 1. **Expansion.** The selector (`{"labels": {...}}`, `{"group": "..."}` or
//!    `{"ids": [...]}`) is expanded page by page in id order into `campaign_devices`, each
//!    page one statement and transaction, with the cursor stored in the campaign, so nothing
//!    is ever held in memory and a restart resumes at the cursor. Each device's wave comes
//!    from a stable hash of its id (`hashtext(id) mod 1000` against the waves' cumulative per
//!    mille), so no total count is needed; devices seen recently get priority.
//! 2. **Dispatch**, wave by wave. A batch of the current wave's pending devices (active first)
//!    is, in one transaction: patched in `devices` (RFC 7386 merge in SQL; the triggers bump
//!    the version and keep the history, and do not relay campaign changes one by one), marked
//!    `sent` with the version they got, and stored in the outbox as one `CampaignBatch` for the
//!    fan-out — then published (message id `campaign:<id>:<batch>`) after commit. The rate
//!    (`governor` token bucket) and the max in flight (devices sent but not yet acknowledged)
//!    bound the batches.
//! 3. **Waves advance** when every device of the wave was dispatched and either none is still
//!    waiting for its acknowledgement or `wave_wait_secs` passed, and the abort criteria
//!    still pass.
//! 4. **Abort criteria** are evaluated on devices' real acknowledgements (recorded by the
//!    reconciler into `campaign_devices`) and failed deliveries: a failure ratio above the
//!    limit, or a device not converged long after it was sent, aborts the campaign; devices
//!    already dispatched keep the change, nothing more is dispatched. They are checked every
//!    second while a wave is dispatched and always before the next wave starts.
//!
//! Pause stops dispatch (the driver idles), resume continues from the stored progress, abort
//! ends it. Every state change is audited.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{self as pb, CampaignBatch};
use devsync_runtime::Shutdown;
use devsync_runtime::audit::Auditor;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::{outbox, telemetry};
use devsync_types::{AuditOutcome, CampaignId, PushPolicy, RequestId, subjects};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};

use crate::scheduler::SchedulerSettings;

const LOAD: &str = "SELECT state, selector, patch, policy, rate_per_sec, max_in_flight, waves,
        abort_criteria, current_wave, expand_cursor, expanded, wave_dispatched_at IS NOT NULL,
        coalesce(wave_dispatched_at < now() - make_interval(secs => wave_wait_secs), false)
    FROM campaigns WHERE id = $1";

const EXPAND_LABELS: &str = "WITH page AS (
        SELECT id, coalesce(last_seen > now() - make_interval(secs => $5), false) AS active
        FROM devices WHERE enabled AND id > $2 AND labels @> $6::jsonb ORDER BY id LIMIT $3
    ), added AS (
        INSERT INTO campaign_devices (campaign_id, device_id, wave, priority)
        SELECT $1, id, width_bucket(abs(hashtext(id)::int8) % 1000, $4::int4[]),
            CASE WHEN active THEN 0 ELSE 1 END
        FROM page ON CONFLICT DO NOTHING RETURNING 1
    )
    SELECT (SELECT max(id) FROM page), (SELECT count(*) FROM page), (SELECT count(*) FROM added)";

const EXPAND_IDS: &str = "WITH page AS (
        SELECT id, coalesce(last_seen > now() - make_interval(secs => $5), false) AS active
        FROM devices WHERE enabled AND id > $2 AND id = ANY($6::text[]) ORDER BY id LIMIT $3
    ), added AS (
        INSERT INTO campaign_devices (campaign_id, device_id, wave, priority)
        SELECT $1, id, width_bucket(abs(hashtext(id)::int8) % 1000, $4::int4[]),
            CASE WHEN active THEN 0 ELSE 1 END
        FROM page ON CONFLICT DO NOTHING RETURNING 1
    )
    SELECT (SELECT max(id) FROM page), (SELECT count(*) FROM page), (SELECT count(*) FROM added)";

// Dispatch, in three statements of one transaction, each an index lookup by id (a single
// statement with CTEs lets the planner hash-join whole tables).
const DISPATCH_PAGE: &str = "SELECT device_id FROM campaign_devices
    WHERE campaign_id = $1 AND status = 'pending' AND wave = $2
    ORDER BY priority, device_id LIMIT $3 FOR UPDATE SKIP LOCKED";

// RFC 7386 in SQL; `||` when the patch is flat (no nested objects, no nulls), where the two
// agree and `||` is much cheaper.
const DISPATCH_PATCH: &str = "UPDATE devices SET desired = devsync_merge_patch(desired, $2::jsonb)
    WHERE id = ANY($1) RETURNING id, desired_version, applied_desired_version";
const DISPATCH_PATCH_FLAT: &str = "UPDATE devices SET desired = desired || $2::jsonb
    WHERE id = ANY($1) RETURNING id, desired_version, applied_desired_version";

const DISPATCH_MARK: &str = "UPDATE campaign_devices c SET
        status = CASE WHEN u.applied >= u.version THEN 'converged' ELSE 'sent' END,
        desired_version = u.version, sent_at = now(), updated_at = now()
    FROM unnest($2::text[], $3::int8[], $4::int8[]) AS u(id, version, applied)
    WHERE c.campaign_id = $1 AND c.device_id = ANY($2) AND c.device_id = u.id
    RETURNING c.device_id, c.status, c.priority";

/// The requestor's rows in the shared outbox table.
pub const OUTBOX_OWNER: &str = "requestor";

/// What the driver read of its campaign.
struct Campaign {
    state: String,
    selector: Value,
    patch: Value,
    policy: PushPolicy,
    rate: Option<i32>,
    max_in_flight: Option<i32>,
    waves: Value,
    abort: Value,
    wave: i32,
    cursor: Option<String>,
    expanded: bool,
    wave_dispatched: bool,
    wave_waited: bool,
}

/// Drives one campaign while this replica holds the scheduler lease.
pub struct Driver {
    js: jetstream::Context,
    pool: Pool,
    auditor: Auditor,
    settings: SchedulerSettings,
    id: String,
    limiter: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
    last_check: Option<Instant>,
    /// Outbox rows whose batch was published, deleted by the next transaction.
    published: std::sync::Mutex<Vec<i64>>,
    /// When `updated_at` (progress, for the expiry sweep) was last written.
    touched: std::sync::Mutex<Instant>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("id", &self.id).finish()
    }
}

impl Driver {
    /// A driver for campaign `id`.
    pub fn new(
        js: jetstream::Context,
        pool: Pool,
        auditor: Auditor,
        settings: SchedulerSettings,
        id: String,
    ) -> Self {
        Self {
            js,
            pool,
            auditor,
            settings,
            id,
            limiter: None,
            last_check: None,
            published: std::sync::Mutex::default(),
            touched: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Drives the campaign until it ends or `term` is cancelled.
    pub async fn run(mut self, term: Shutdown) {
        tracing::info!(campaign = %self.id, "driving campaign");
        while !term.is_cancelled() {
            let idle = match self.step().await {
                Ok(Step::Busy) => false,
                Ok(Step::Idle) => true,
                Ok(Step::Done) => break,
                Err(error) => {
                    tracing::warn!(campaign = %self.id, error = %format!("{error:#}"), "campaign step failed");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = term.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.campaign_tick) => {}
                }
            }
        }
    }

    async fn load(&self) -> anyhow::Result<Option<Campaign>> {
        let client = self.pool.get().await?;
        let Some(row) = client.query_opt(LOAD, &[&self.id]).await? else {
            return Ok(None);
        };
        Ok(Some(Campaign {
            state: row.get(0),
            selector: row.get(1),
            patch: row.get(2),
            policy: row.get::<_, String>(3).parse().unwrap_or_default(),
            rate: row.get(4),
            max_in_flight: row.get(5),
            waves: row.get(6),
            abort: row.get(7),
            wave: row.get(8),
            cursor: row.get(9),
            expanded: row.get(10),
            wave_dispatched: row.get(11),
            wave_waited: row.get(12),
        }))
    }

    async fn step(&mut self) -> anyhow::Result<Step> {
        let Some(campaign) = self.load().await? else {
            return Ok(Step::Done);
        };
        match campaign.state.as_str() {
            "running" => {}
            "paused" => return Ok(Step::Idle),
            _ => return Ok(Step::Done),
        }
        if !campaign.expanded {
            self.expand(&campaign).await?;
            return Ok(Step::Busy);
        }
        let check_due = self
            .last_check
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if check_due {
            self.last_check = Some(Instant::now());
            if let Some(reason) = self.abort_reason(&campaign).await? {
                self.finish("aborted", &reason, AuditOutcome::Failed)
                    .await?;
                return Ok(Step::Done);
            }
        }
        let allowance = self.allowance(&campaign).await?;
        if allowance > 0 && self.dispatch_parallel(&campaign, allowance).await? > 0 {
            return Ok(Step::Busy);
        }
        if allowance == 0 {
            return Ok(Step::Idle);
        }
        // Nothing pending in this wave.
        let client = self.pool.get().await?;
        if !campaign.wave_dispatched {
            client
                .execute(
                    "UPDATE campaigns SET wave_dispatched_at = now(), updated_at = now() WHERE id = $1",
                    &[&self.id],
                )
                .await?;
            return Ok(Step::Busy);
        }
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM campaign_devices
                 WHERE campaign_id = $1 AND status = 'sent' AND wave <= $2",
                &[&self.id, &campaign.wave],
            )
            .await?
            .get(0);
        if waiting > 0 && !campaign.wave_waited {
            return Ok(Step::Idle);
        }
        // A wave is judged before the next one starts (or the campaign completes).
        if let Some(reason) = self.abort_reason(&campaign).await? {
            self.finish("aborted", &reason, AuditOutcome::Failed)
                .await?;
            return Ok(Step::Done);
        }
        let waves = campaign.waves.as_array().map_or(1, Vec::len) as i32;
        if campaign.wave + 1 < waves {
            client
                .execute(
                    "UPDATE campaigns SET current_wave = current_wave + 1, wave_dispatched_at = NULL,
                         updated_at = now()
                     WHERE id = $1 AND current_wave = $2",
                    &[&self.id, &campaign.wave],
                )
                .await?;
            self.audit(
                "campaign.wave",
                AuditOutcome::Ok,
                json!({"wave": campaign.wave + 1, "waiting_in_previous": waiting}),
            )
            .await;
            return Ok(Step::Busy);
        }
        self.finish("completed", "every wave dispatched", AuditOutcome::Ok)
            .await?;
        Ok(Step::Done)
    }

    async fn expand(&self, campaign: &Campaign) -> anyhow::Result<()> {
        let page = self.settings.campaign_page * 5;
        let cursor = campaign.cursor.clone().unwrap_or_default();
        let window = self.settings.active_window.as_secs_f64();
        // `width_bucket` over the wave boundaries below 1000 gives the wave of a hash in 0..1000.
        let mut bounds: Vec<i32> = campaign
            .waves
            .as_array()
            .map(|waves| {
                waves
                    .iter()
                    .filter_map(Value::as_i64)
                    .filter(|w| *w < 1000)
                    .map(|w| w as i32)
                    .collect()
            })
            .unwrap_or_default();
        if bounds.is_empty() {
            bounds.push(1000);
        }
        let client = self.pool.get().await?;
        let row = if let Some(ids) = campaign.selector.get("ids") {
            let ids: Vec<String> = serde_json::from_value(ids.clone())?;
            client
                .query_one(
                    EXPAND_IDS,
                    &[&self.id, &cursor, &page, &bounds, &window, &ids],
                )
                .await?
        } else {
            let labels = match (
                campaign.selector.get("labels"),
                campaign.selector.get("group"),
            ) {
                (Some(labels), _) => labels.clone(),
                (None, Some(group)) => json!({ "group": group }),
                (None, None) => json!({}),
            };
            client
                .query_one(
                    EXPAND_LABELS,
                    &[&self.id, &cursor, &page, &bounds, &window, &labels],
                )
                .await?
        };
        let last: Option<String> = row.get(0);
        let seen: i64 = row.get(1);
        let added: i64 = row.get(2);
        let done = seen < page;
        client
            .execute(
                "UPDATE campaigns SET expand_cursor = coalesce($2, expand_cursor),
                     targeted = targeted + $3, expanded = $4, updated_at = now()
                 WHERE id = $1",
                &[&self.id, &last, &added, &done],
            )
            .await?;
        if done {
            let targeted: i64 = client
                .query_one("SELECT targeted FROM campaigns WHERE id = $1", &[&self.id])
                .await?
                .get(0);
            self.audit(
                "campaign.expanded",
                AuditOutcome::Ok,
                json!({"targeted": targeted}),
            )
            .await;
        }
        Ok(())
    }

    /// How many devices may be dispatched now (0: wait).
    async fn allowance(&mut self, campaign: &Campaign) -> anyhow::Result<i64> {
        let mut allowance = self.settings.campaign_page;
        if let Some(max) = campaign.max_in_flight {
            let client = self.pool.get().await?;
            let in_flight: i64 = client
                .query_one(
                    "SELECT count(*) FROM campaign_devices WHERE campaign_id = $1 AND status = 'sent'",
                    &[&self.id],
                )
                .await?
                .get(0);
            allowance = allowance.min(i64::from(max) - in_flight);
        }
        if allowance <= 0 {
            return Ok(0);
        }
        if let Some(rate) = campaign.rate.and_then(|r| NonZeroU32::new(r.max(1) as u32)) {
            // Ten batches a second at most, so the rate is smooth.
            let chunk = NonZeroU32::new((rate.get() / 10).max(1)).expect("at least one");
            let (limiter, limiter_chunk) = self.limiter.get_or_insert_with(|| {
                (
                    RateLimiter::direct(Quota::per_second(rate).allow_burst(chunk)),
                    chunk,
                )
            });
            let n =
                (*limiter_chunk).min(NonZeroU32::new(allowance as u32).unwrap_or(*limiter_chunk));
            if limiter.until_n_ready(n).await.is_err() {
                return Ok(0);
            }
            allowance = i64::from(n.get());
        }
        Ok(allowance)
    }

    /// Dispatches up to `allowance` devices: without a rate limit in `campaign_parallelism`
    /// concurrent transactions (they skip each other's rows), so commit latency overlaps with
    /// work; returns how many it took off the pending list.
    async fn dispatch_parallel(
        &self,
        campaign: &Campaign,
        allowance: i64,
    ) -> anyhow::Result<usize> {
        let parts = if campaign.rate.is_none() {
            self.settings.campaign_parallelism.max(1)
        } else {
            1
        };
        let share = (allowance / parts as i64).max(1);
        let results =
            futures::future::join_all((0..parts).map(|_| self.dispatch(campaign, share))).await;
        let mut total = 0;
        for result in results {
            total += result?;
        }
        if total > 0 && self.touched.lock().expect("lock").elapsed() >= Duration::from_secs(1) {
            *self.touched.lock().expect("lock") = Instant::now();
            self.pool
                .get()
                .await?
                .execute(
                    "UPDATE campaigns SET updated_at = now() WHERE id = $1",
                    &[&self.id],
                )
                .await?;
        }
        Ok(total)
    }

    /// Dispatches up to `limit` pending devices of the current wave; returns how many it took
    /// off the pending list.
    async fn dispatch(&self, campaign: &Campaign, limit: i64) -> anyhow::Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT set_config('devsync.change_source', $1, true)",
            &[&format!("campaign:{}", self.id)],
        )
        .await?;
        let page: Vec<String> = tx
            .query(DISPATCH_PAGE, &[&self.id, &campaign.wave, &limit])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if page.is_empty() {
            return Ok(0);
        }
        let flat = campaign
            .patch
            .as_object()
            .is_some_and(|patch| patch.values().all(|v| !v.is_object() && !v.is_null()));
        let patched = tx
            .query(
                if flat {
                    DISPATCH_PATCH_FLAT
                } else {
                    DISPATCH_PATCH
                },
                &[&page, &campaign.patch],
            )
            .await?;
        let ids: Vec<String> = patched.iter().map(|r| r.get(0)).collect();
        let versions: Vec<i64> = patched.iter().map(|r| r.get(1)).collect();
        let applied: Vec<i64> = patched.iter().map(|r| r.get(2)).collect();
        let rows = tx
            .query(DISPATCH_MARK, &[&self.id, &ids, &versions, &applied])
            .await?;
        if ids.len() < page.len() {
            // Devices deleted since the expansion: nothing to deliver.
            tx.execute(
                "UPDATE campaign_devices SET status = 'skipped', error = 'device no longer exists',
                     updated_at = now()
                 WHERE campaign_id = $1 AND device_id = ANY($2) AND status = 'pending'",
                &[&self.id, &page],
            )
            .await?;
        }
        let mut sent: Vec<(i16, String)> = rows
            .iter()
            .filter(|row| row.get::<_, String>(1) == "sent")
            .map(|row| (row.get::<_, i16>(2), row.get::<_, String>(0)))
            .collect();
        sent.sort();
        let mut outbox_id = None;
        let mut messages = Vec::new();
        if let Some((_, first)) = sent.first() {
            let msg_id = format!("campaign:{}:{first}", self.id);
            let message = CampaignBatch {
                campaign_id: self.id.clone(),
                wave: campaign.wave.max(0) as u32,
                policy: match campaign.policy {
                    PushPolicy::Push => pb::PushPolicy::Push,
                    PushPolicy::PushActive => pb::PushPolicy::PushActive,
                    PushPolicy::PullOnly => pb::PushPolicy::PullOnly,
                } as i32,
                device_ids: sent.into_iter().map(|(_, id)| id).collect(),
            };
            let mut headers = async_nats::HeaderMap::new();
            telemetry::inject(&mut headers);
            messages.push(Outgoing {
                subject: subjects::fanout_wave(&CampaignId::parse(self.id.clone())?),
                msg_id,
                payload: message.encode_to_vec().into(),
                headers: Some(headers),
            });
            outbox_id = Some(
                outbox::insert(
                    &tx,
                    OUTBOX_OWNER,
                    &format!("campaign:{}", self.id),
                    &messages,
                )
                .await?,
            );
        }
        // Outbox rows of batches already published go with this transaction's commit.
        let published: Vec<i64> = std::mem::take(&mut *self.published.lock().expect("lock"));
        if !published.is_empty() {
            tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&published])
                .await?;
        }
        tx.commit().await?;
        if let Some(id) = outbox_id {
            // After commit: if this fails, the outbox sweeper publishes the batch.
            publish::publish_all(&self.js, messages).await?;
            self.published.lock().expect("lock").push(id);
        }
        Ok(page.len())
    }

    async fn abort_reason(&self, campaign: &Campaign) -> anyhow::Result<Option<String>> {
        let client = self.pool.get().await?;
        if let Some(limit) = campaign.abort.get("failure_ratio").and_then(Value::as_f64) {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE status <> 'pending'),
                            count(*) FILTER (WHERE status = 'failed')
                     FROM campaign_devices WHERE campaign_id = $1",
                    &[&self.id],
                )
                .await?;
            let (dispatched, failed): (i64, i64) = (row.get(0), row.get(1));
            if dispatched > 0 && failed as f64 / dispatched as f64 > limit {
                return Ok(Some(format!(
                    "failure ratio {failed}/{dispatched} above {limit}"
                )));
            }
        }
        if let Some(seconds) = campaign
            .abort
            .get("not_converged_after_secs")
            .and_then(Value::as_f64)
        {
            let late: i64 = client
                .query_one(
                    "SELECT count(*) FROM campaign_devices
                     WHERE campaign_id = $1 AND status IN ('sent', 'acked')
                       AND sent_at < now() - make_interval(secs => $2)",
                    &[&self.id, &seconds],
                )
                .await?
                .get(0);
            if late > 0 {
                return Ok(Some(format!(
                    "{late} devices not converged {seconds}s after they were sent"
                )));
            }
        }
        Ok(None)
    }

    async fn finish(&self, state: &str, reason: &str, outcome: AuditOutcome) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let changed = client
            .execute(
                "UPDATE campaigns SET state = $2, state_reason = $3, finished_at = now(),
                     updated_at = now()
                 WHERE id = $1 AND state = 'running'",
                &[&self.id, &state, &reason],
            )
            .await?;
        if changed > 0 {
            tracing::info!(campaign = %self.id, state, reason, "campaign finished");
            self.audit(
                &format!("campaign.{state}"),
                outcome,
                json!({"reason": reason}),
            )
            .await;
        }
        Ok(())
    }

    async fn audit(&self, action: &str, outcome: AuditOutcome, details: Value) {
        let Ok(request) = RequestId::parse(format!("campaign:{}", self.id)) else {
            return;
        };
        let mut record = self.auditor.record(
            Utc::now(),
            None,
            Some(&request),
            "campaign",
            action,
            outcome,
            details,
        );
        record.event_id = format!("{}/{}", record.event_id, uuid_like());
        if let Err(error) = publish::publish_all(&self.js, self.auditor.message(&[record])).await {
            tracing::warn!(%error, "cannot publish campaign audit event");
        }
    }
}

/// A unique suffix for events that may repeat with the same request and action.
fn uuid_like() -> String {
    format!("{}", Utc::now().timestamp_nanos_opt().unwrap_or_default())
}

enum Step {
    /// Did work; go on at once.
    Busy,
    /// Nothing to do now; wait a tick.
    Idle,
    /// The campaign is over (or gone).
    Done,
}
