//! The campaign driver: rolls one desired-state change out to many devices.
//!
//! A campaign (a row of `campaigns`, created by `devsyncctl campaign create`) moves through:
//!
//! 1. **Count.** The selector (`{"labels": {...}}`, `{"group": "..."}` or `{"ids": [...]}`)
//!    is counted in one statement (`targeted`; set to what was really dispatched at the end).
//! 2. **Dispatch**, wave by wave, straight from the selector: the driver walks the targeted
//!    devices in id order after a cursor stored in the campaign, so nothing is held in memory
//!    and a restart resumes at the cursor. Each device's wave comes from a stable hash of its
//!    id (`hashtext(id) mod 1000` against the waves' cumulative per mille), so no total count
//!    is needed. Each wave takes two passes: devices seen recently first, then every device
//!    of the wave not yet dispatched. A page of devices is, in one transaction: patched in
//!    `devices` (RFC 7386 merge in SQL; the triggers bump the version and keep the history,
//!    and do not relay campaign changes one by one), recorded once in `campaign_devices` as
//!    `sent` with the version it got, and stored in the outbox as one `CampaignBatch` for the
//!    fan-out — then published (message id `campaign:<id>:<first device>`) after commit. The
//!    rate (`governor` token bucket) and the max in flight (devices sent but not yet
//!    acknowledged) bound the pages.
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

use std::collections::HashSet;
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
        coalesce(wave_dispatched_at < now() - make_interval(secs => wave_wait_secs), false),
        dispatch_pass
    FROM campaigns WHERE id = $1";

const COUNT_LABELS: &str = "SELECT count(*) FROM devices WHERE enabled AND labels @> $1::jsonb";
const COUNT_IDS: &str = "SELECT count(*) FROM devices WHERE enabled AND id = ANY($1::text[])";

// A window of devices in id order after the cursor, each with whether the current pass takes
// it: targeted, of the wave (`width_bucket` over the wave boundaries below 1000 gives the wave
// of a hash in 0..1000) and active if this is pass 0. The window is walked through the primary
// key whatever the filters match: a LIMIT over the filtered rows let the planner misjudge them
// and sort the whole table for every page.
const WINDOW_LABELS: &str = "SELECT id, labels @> $2::jsonb
        AND width_bucket(abs(hashtext(id)::int8) % 1000, $3::int4[]) = $4
        AND ($5 OR coalesce(last_seen > now() - make_interval(secs => $6), false))
    FROM devices WHERE enabled AND id > $1 ORDER BY id LIMIT $7";
const WINDOW_IDS: &str = "SELECT id, width_bucket(abs(hashtext(id)::int8) % 1000, $3::int4[]) = $4
        AND ($5 OR coalesce(last_seen > now() - make_interval(secs => $6), false))
    FROM devices WHERE enabled AND id > $1 AND id = ANY($2::text[]) ORDER BY id LIMIT $7";

// Which of a window's devices this campaign already dispatched (not asked where the driver
// knows the answer is none, see `Driver::own_cursor`): one primary-key probe per device, in a
// LATERAL subquery with LIMIT that no plan can turn into anything else. As a NOT EXISTS in
// the window query, with `device_id = ANY($2)`, or as a join with the array, the
// planner — its statistics behind a table that grows by thousands of rows a second — read
// every row of the campaign for each window (a hash or a bitmap over the campaign):
// quadratic over a campaign. Should two drivers race (a lease handover), the second insert
// of a device's row fails on the primary key, its transaction rolls back and the next round
// skips the device.
const DISPATCHED: &str = "SELECT u.id FROM unnest($2::text[]) AS u(id)
    CROSS JOIN LATERAL (SELECT 1 FROM campaign_devices c
        WHERE c.campaign_id = $1 AND c.device_id = u.id LIMIT 1) AS found";

/// Windows read per dispatch round at most, so a sparse selector cannot hold a round long.
const WINDOWS_PER_ROUND: usize = 16;

// RFC 7386 in SQL; `||` when the patch is flat (no nested objects, no nulls), where the two
// agree and `||` is much cheaper. The statement writes the next version and its time itself,
// so the version trigger does not run per device (a device the patch leaves unchanged keeps
// its version: the schema's triggers see to it).
macro_rules! dispatch_patch {
    ($desired:literal) => {
        concat!(
            "UPDATE devices SET desired = ",
            $desired,
            ",
                desired_version = desired_version + 1, desired_changed_at = now(),
                updated_at = now()
            WHERE id = ANY($1) AND enabled RETURNING id, desired_version, applied_desired_version"
        )
    };
}
const DISPATCH_PATCH: &str = dispatch_patch!("devsync_merge_patch(desired, $2::jsonb)");
const DISPATCH_PATCH_FLAT: &str = dispatch_patch!("desired || $2::jsonb");

// One row per dispatched device, written once, with the version it got and its status.
const DISPATCH_RECORD: &str = "INSERT INTO campaign_devices
        (campaign_id, device_id, wave, priority, status, desired_version, sent_at, updated_at)
    SELECT $1, u.id, $2, $3, u.status, u.version, now(), now()
    FROM unnest($4::text[], $5::int8[], $6::text[]) AS u(id, version, status)";

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
    /// Whether the targets were counted.
    counted: bool,
    wave_dispatched: bool,
    wave_waited: bool,
    /// 0: active devices of the wave; 1: the rest.
    pass: i16,
}

impl Campaign {
    /// The wave boundaries below 1000 (per mille), for `width_bucket`.
    fn bounds(&self) -> Vec<i32> {
        let mut bounds: Vec<i32> = self
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
        bounds
    }

    /// The selector's explicit ids, or its labels (`group` is the label `group`; no selector:
    /// every device).
    fn targets(&self) -> anyhow::Result<Targets> {
        if let Some(ids) = self.selector.get("ids") {
            return Ok(Targets::Ids(serde_json::from_value(ids.clone())?));
        }
        Ok(Targets::Labels(
            match (self.selector.get("labels"), self.selector.get("group")) {
                (Some(labels), _) => labels.clone(),
                (None, Some(group)) => json!({ "group": group }),
                (None, None) => json!({}),
            },
        ))
    }
}

enum Targets {
    Labels(Value),
    Ids(Vec<String>),
}

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

impl Targets {
    /// The statement counting the targets, and its parameter.
    fn count(&self) -> (&'static str, Param<'_>) {
        match self {
            Self::Labels(labels) => (COUNT_LABELS, labels),
            Self::Ids(ids) => (COUNT_IDS, ids),
        }
    }

    /// The window statement of a pass, and its selector parameter (`$2`).
    fn window(&self) -> (&'static str, Param<'_>) {
        match self {
            Self::Labels(labels) => (WINDOW_LABELS, labels),
            Self::Ids(ids) => (WINDOW_IDS, ids),
        }
    }
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
    /// Outbox rows whose batch was published, deleted by the next transaction (or the
    /// requestor's outbox sweeper).
    published: outbox::Published,
    /// The (wave, cursor) this driver's own last round of a first pass stored. Devices of a
    /// pass are dispatched in id order and the cursor moves past them, so after that cursor no
    /// device of the wave was dispatched yet and the next round skips the check (a third of a
    /// round's reads). A new driver, the second pass and any failed round check; should
    /// another driver have raced ahead anyway, recording a device twice fails on the primary
    /// key, the round fails and the next one checks.
    own_cursor: Option<(i32, Option<String>)>,
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
        published: outbox::Published,
    ) -> Self {
        Self {
            js,
            pool,
            auditor,
            settings,
            id,
            limiter: None,
            last_check: None,
            published,
            own_cursor: None,
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
            counted: row.get(10),
            wave_dispatched: row.get(11),
            wave_waited: row.get(12),
            pass: row.get(13),
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
        if !campaign.counted {
            self.count(&campaign).await?;
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
        if !campaign.wave_dispatched {
            let allowance = self.allowance(&campaign).await?;
            if allowance == 0 {
                return Ok(Step::Idle);
            }
            self.dispatch_round(&campaign, allowance).await?;
            return Ok(Step::Busy);
        }
        // Every device of this wave was dispatched.
        let client = self.pool.get().await?;
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
                         dispatch_pass = 0, expand_cursor = NULL, updated_at = now()
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
        // Targeted is now what was dispatched: devices registered, disabled or deleted since
        // the count are accounted for.
        client
            .execute(
                "UPDATE campaigns SET targeted =
                     (SELECT count(*) FROM campaign_devices WHERE campaign_id = $1)
                 WHERE id = $1",
                &[&self.id],
            )
            .await?;
        self.finish("completed", "every wave dispatched", AuditOutcome::Ok)
            .await?;
        Ok(Step::Done)
    }

    /// Counts the targeted devices (one statement; nothing is held in memory).
    async fn count(&self, campaign: &Campaign) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let targets = campaign.targets()?;
        let (sql, selector) = targets.count();
        let row = client.query_one(sql, &[selector]).await?;
        let targeted: i64 = row.get(0);
        client
            .execute(
                "UPDATE campaigns SET targeted = $2, expanded = true, updated_at = now()
                 WHERE id = $1",
                &[&self.id, &targeted],
            )
            .await?;
        self.audit(
            "campaign.expanded",
            AuditOutcome::Ok,
            json!({"targeted": targeted}),
        )
        .await;
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

    /// Dispatches the next `allowance` devices of the current pass and moves the cursor past
    /// them: without a rate limit in `campaign_parallelism` concurrent transactions over
    /// disjoint slices of the page, so commit latency overlaps with work. Reaching the end of
    /// the devices ends the pass (the active devices, then the rest, then the wave is
    /// dispatched). A crash before the cursor moves repeats the page without the devices
    /// already dispatched.
    async fn dispatch_round(&mut self, campaign: &Campaign, allowance: i64) -> anyhow::Result<()> {
        let check = campaign.pass > 0
            || self.own_cursor.as_ref() != Some(&(campaign.wave, campaign.cursor.clone()));
        self.own_cursor = None;
        let (page, cursor, exhausted) = self.page(campaign, allowance, check).await?;
        if !page.is_empty() {
            let parts = if campaign.rate.is_none() {
                self.settings.campaign_parallelism.max(1)
            } else {
                1
            };
            let share = page.len().div_ceil(parts);
            let results = futures::future::join_all(
                page.chunks(share)
                    .map(|chunk| self.dispatch(campaign, chunk.to_vec())),
            )
            .await;
            for result in results {
                result?;
            }
        }
        // Past the page; at the end of pass 0 on to pass 1 from the start; at the end of pass 1
        // the wave is dispatched.
        let (cursor, pass, wave_done) = match (exhausted, campaign.pass) {
            (false, pass) => (cursor, pass, false),
            (true, 0) => (None, 1, false),
            (true, pass) => (cursor, pass, true),
        };
        let moved = self
            .pool
            .get()
            .await?
            .execute(
                "UPDATE campaigns SET expand_cursor = $2, dispatch_pass = $3,
                     wave_dispatched_at = CASE WHEN $4 THEN now() ELSE wave_dispatched_at END,
                     updated_at = now()
                 WHERE id = $1 AND current_wave = $5 AND dispatch_pass = $6",
                &[
                    &self.id,
                    &cursor,
                    &pass,
                    &wave_done,
                    &campaign.wave,
                    &campaign.pass,
                ],
            )
            .await?;
        if moved == 1 && pass == 0 && !wave_done {
            self.own_cursor = Some((campaign.wave, cursor));
        }
        Ok(())
    }

    /// Up to `allowance` devices the current pass takes next (without those already dispatched
    /// when `check`), the cursor after them, and whether the pass reached the end of the
    /// devices.
    async fn page(
        &self,
        campaign: &Campaign,
        allowance: i64,
        check: bool,
    ) -> anyhow::Result<(Vec<String>, Option<String>, bool)> {
        let window = allowance.max(1000);
        let active_window = self.settings.active_window.as_secs_f64();
        let everyone = campaign.pass > 0;
        let bounds = campaign.bounds();
        let targets = campaign.targets()?;
        let client = self.pool.get().await?;
        let mut cursor = campaign.cursor.clone();
        let mut page = Vec::new();
        for _ in 0..WINDOWS_PER_ROUND {
            let after = cursor.clone().unwrap_or_default();
            let (sql, selector) = targets.window();
            let rows = client
                .query(
                    sql,
                    &[
                        &after,
                        selector,
                        &bounds,
                        &campaign.wave,
                        &everyone,
                        &active_window,
                        &window,
                    ],
                )
                .await?;
            let scanned = rows.len() as i64;
            let rows: Vec<(String, bool)> = rows
                .iter()
                .map(|row| (row.get(0), row.get::<_, Option<bool>>(1).unwrap_or(false)))
                .collect();
            let candidates: Vec<&str> = rows
                .iter()
                .filter(|(_, taken)| *taken)
                .map(|(id, _)| id.as_str())
                .collect();
            let done: HashSet<String> = if candidates.is_empty() || !check {
                HashSet::new()
            } else {
                client
                    .query(DISPATCHED, &[&self.id, &candidates])
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect()
            };
            for (id, taken) in rows {
                if taken && !done.contains(&id) {
                    page.push(id.clone());
                }
                cursor = Some(id);
                if page.len() as i64 >= allowance {
                    // Full: the rest of the window is read again by the next round.
                    return Ok((page, cursor, false));
                }
            }
            if scanned < window {
                return Ok((page, cursor, true));
            }
        }
        Ok((page, cursor, false))
    }

    /// Dispatches `page` (devices of the current wave not yet dispatched, in id order) in one
    /// transaction: they are patched, recorded in `campaign_devices` and handed to the fan-out
    /// as one `CampaignBatch` through the outbox, published after commit.
    async fn dispatch(&self, campaign: &Campaign, page: Vec<String>) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT set_config('devsync.change_source', $1, true)",
            &[&format!("campaign:{}", self.id)],
        )
        .await?;
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
        // `sent`, or `converged` at once when the device had already applied that version
        // (the patch changed nothing): nothing to deliver.
        let statuses: Vec<&str> = patched
            .iter()
            .map(|r| {
                if r.get::<_, i64>(2) >= r.get::<_, i64>(1) {
                    "converged"
                } else {
                    "sent"
                }
            })
            .collect();
        tx.execute(
            DISPATCH_RECORD,
            &[
                &self.id,
                &campaign.wave,
                &campaign.pass,
                &ids,
                &versions,
                &statuses,
            ],
        )
        .await?;
        let mut sent: Vec<String> = ids
            .iter()
            .zip(&statuses)
            .filter(|(_, status)| **status == "sent")
            .map(|(id, _)| id.clone())
            .collect();
        sent.sort();
        let mut messages = Vec::new();
        if let Some(first) = sent.first() {
            let msg_id = format!("campaign:{}:{first}", self.id);
            let message = CampaignBatch {
                campaign_id: self.id.clone(),
                wave: campaign.wave.max(0) as u32,
                policy: match campaign.policy {
                    PushPolicy::Push => pb::PushPolicy::Push,
                    PushPolicy::PushActive => pb::PushPolicy::PushActive,
                    PushPolicy::PullOnly => pb::PushPolicy::PullOnly,
                } as i32,
                device_ids: sent,
            };
            let mut headers = async_nats::HeaderMap::new();
            telemetry::inject(&mut headers);
            messages.push(Outgoing {
                subject: subjects::fanout_wave(&CampaignId::parse(self.id.clone())?),
                msg_id,
                payload: message.encode_to_vec().into(),
                headers: Some(headers),
            });
        }
        // Outbox rows of batches already published are deleted with this one's.
        let outbox_id = self
            .published
            .commit(
                tx,
                OUTBOX_OWNER,
                &format!("campaign:{}", self.id),
                &messages,
            )
            .await?;
        if let Some(id) = outbox_id {
            // After commit: if this fails, the outbox sweeper publishes the batch.
            publish::publish_all(&self.js, messages).await?;
            self.published.push(id);
        }
        Ok(())
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
