//! Delivering desired state over NATS: the `fanout` consumer's handler.
//!
//! A delivery writes the device's `DesiredPush` as the last value of its key in the
//! `devsync-desired` KV bucket and publishes the same bytes on `devsync.out.<device>.desired`;
//! a device with an HTTP endpoint also gets a webhook task on `devsync.webhook.<device>`
//! (message id `webhook:<device>:<version>`, so a redelivered push does not call twice).
//!
//! - A push task (`devsync.fanout.push.<device>`) carries the document. Its KV write is skipped
//!   when the bucket already holds a newer version, so a late task never rolls a device back.
//! - A campaign batch (`devsync.fanout.wave.<campaign>`) names devices; their current desired
//!   state is read from PostgreSQL in one query, delivered concurrently, and the devices the
//!   policy skips are marked `skipped` in `campaign_devices`.
//!
//! Within a batch, active devices go first. A NATS failure retries the message (deliveries are
//! idempotent: same KV value, same webhook message id); malformed input is dead-lettered.

use std::collections::HashMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{CampaignBatch, DesiredPush, FanoutTask, Payload, payload};
use devsync_runtime::audit::Auditor;
use devsync_runtime::blobs;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::service::Service;
use devsync_runtime::telemetry;
use devsync_runtime::worker::{Delivery, Handler, Outcome};
use devsync_types::convert::timestamp;
use devsync_types::{AuditOutcome, AuditRecord, DeviceId, PushPolicy, RequestId, subjects};
use futures::StreamExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tracing::{Instrument as _, Span};

use crate::FanoutSettings;
use crate::policy::{self, Policies};

/// Fan-out metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    deliveries: Family<Vec<(String, String)>, Counter>,
}

impl Metrics {
    /// Registers the delivery counters.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            deliveries: Family::default(),
        };
        registry.register(
            "devsync_fanout_deliveries",
            "desired-state deliveries by result (delivered, skipped) and source (push, campaign)",
            metrics.deliveries.clone(),
        );
        metrics
    }

    fn count(&self, result: &str, source: &str, by: u64) {
        if by == 0 {
            return;
        }
        self.deliveries
            .get_or_create(&vec![
                ("result".into(), result.into()),
                ("source".into(), source.into()),
            ])
            .inc_by(by);
    }
}

/// One device's delivery, however it was asked for.
struct Target {
    device: DeviceId,
    request_id: RequestId,
    push: DesiredPush,
    endpoint: Option<String>,
    active: bool,
}

/// What happened to one target.
enum Delivered {
    Sent,
    Skipped,
    Stale,
}

impl Delivered {
    /// The `result` label of the delivery counter.
    fn label(&self) -> &'static str {
        match self {
            Self::Sent => "delivered",
            Self::Skipped => "skipped",
            Self::Stale => "stale",
        }
    }
}

/// Campaign batches of one fetched batch handled at once (each delivers to its devices with
/// `fanout.concurrency` in flight).
const CAMPAIGN_BATCHES_AT_ONCE: usize = 4;

/// One delivery's result with its audit event, or why it must be retried.
type Attempt = Result<(Delivered, AuditRecord), String>;

/// The `fanout` consumer's handler.
pub struct Pusher {
    js: jetstream::Context,
    client: async_nats::Client,
    desired: kv::Store,
    pool: Pool,
    auditor: Auditor,
    policies: Policies,
    settings: FanoutSettings,
    metrics: Metrics,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

impl Handler for Pusher {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut tasks = Vec::new();
        let mut waves = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            let subject = delivery.subject();
            if subject.starts_with(subjects::FANOUT_WAVE_PREFIX) {
                waves.push(index);
            } else if subject.starts_with(subjects::FANOUT_PUSH_PREFIX) {
                match self.task(delivery) {
                    Ok(task) => tasks.push((index, task, delivery.span.clone())),
                    Err(reason) => outcomes[index] = Outcome::Reject(reason),
                }
            } else {
                outcomes[index] = Outcome::Reject(format!("unexpected subject {subject}"));
            }
        }
        // Campaign batches side by side: one reads PostgreSQL while another waits for NATS.
        let delivered: Vec<(usize, Outcome)> = futures::stream::iter(waves)
            .map(|index| async move { (index, self.campaign_batch(&batch[index]).await) })
            .buffer_unordered(CAMPAIGN_BATCHES_AT_ONCE)
            .collect()
            .await;
        for (index, outcome) in delivered {
            outcomes[index] = outcome;
        }
        if !tasks.is_empty() {
            // Active devices first.
            tasks.sort_by_key(|(_, (target, _), _)| !target.active);
            for (index, outcome) in self.tasks(tasks).await {
                outcomes[index] = outcome;
            }
        }
        outcomes
    }
}

impl Pusher {
    /// A handler for `service`, writing last values into `desired`.
    pub fn new(
        service: &Service,
        desired: kv::Store,
        policies: Policies,
        settings: FanoutSettings,
        metrics: Metrics,
    ) -> Self {
        Self {
            js: service.js.clone(),
            client: service.client.clone(),
            desired,
            pool: service.pool.clone(),
            auditor: service.auditor.clone(),
            policies,
            settings,
            metrics,
        }
    }

    fn task(&self, delivery: &Delivery) -> Result<(Target, i32), String> {
        let task = FanoutTask::decode(delivery.payload().clone())
            .map_err(|e| format!("not a fan-out task: {e}"))?;
        let push = task.push.ok_or("fan-out task without a push")?;
        let device = DeviceId::parse(push.device_id.clone()).map_err(|e| e.to_string())?;
        let request_id = RequestId::parse(task.request_id)
            .unwrap_or_else(|_| push_request_id(&device, push.desired_version));
        Ok((
            Target {
                device,
                request_id,
                endpoint: Some(task.http_endpoint).filter(|e| !e.is_empty()),
                active: task.active,
                push,
            },
            task.policy,
        ))
    }

    async fn tasks(&self, tasks: Vec<(usize, (Target, i32), Span)>) -> Vec<(usize, Outcome)> {
        let now = Utc::now();
        let results: Vec<(usize, Attempt)> = futures::stream::iter(tasks)
            .map(|(index, (target, own), span)| {
                // In the delivery's span: its trace continues the publisher's.
                async move {
                    let policy = self.policies.resolve(own, &target.push.campaign_id).await;
                    let mut trace = async_nats::HeaderMap::new();
                    telemetry::inject(&mut trace);
                    (
                        index,
                        self.deliver(&target, policy, true, now, &trace).await,
                    )
                }
                .instrument(span)
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let mut audits = Vec::with_capacity(results.len());
        let mut outcomes = Vec::with_capacity(results.len());
        for (index, result) in results {
            match result {
                Ok((delivered, record)) => {
                    self.metrics.count(delivered.label(), "push", 1);
                    audits.push(record);
                    outcomes.push((index, Outcome::Ack));
                }
                Err(error) => outcomes.push((index, Outcome::Retry(error))),
            }
        }
        if let Err(error) = publish::publish_all(&self.js, self.auditor.message(&audits)).await {
            tracing::warn!(%error, "cannot publish delivery audit events");
        }
        outcomes
    }

    /// Delivers to one target under `policy`; `check_newer` guards against rolling back.
    /// `trace` (the trace context of the push or batch) goes with the notification.
    async fn deliver(
        &self,
        target: &Target,
        policy: PushPolicy,
        check_newer: bool,
        now: DateTime<Utc>,
        trace: &async_nats::HeaderMap,
    ) -> Attempt {
        let device = &target.device;
        let version = target.push.desired_version;
        let skip = match policy {
            PushPolicy::PullOnly => Some("pull-only"),
            PushPolicy::PushActive if !target.active => Some("inactive"),
            _ => None,
        };
        let audit = |action: &str, outcome: AuditOutcome, details: Value| {
            self.auditor.record(
                now,
                Some(device),
                Some(&target.request_id),
                "fanout",
                action,
                outcome,
                details,
            )
        };
        if let Some(reason) = skip {
            return Ok((
                Delivered::Skipped,
                audit(
                    "push.skipped",
                    AuditOutcome::Skipped,
                    json!({"desired_version": version, "policy": policy.as_str(), "reason": reason}),
                ),
            ));
        }
        if check_newer
            && let Some(held) = self.held_version(device).await?
            && held > version
        {
            return Ok((
                Delivered::Stale,
                audit(
                    "push.stale",
                    AuditOutcome::Skipped,
                    json!({"desired_version": version, "held_version": held}),
                ),
            ));
        }
        let mut push = target.push.clone();
        push.request_id = target.request_id.to_string();
        let bytes = Bytes::from(push.encode_to_vec());
        self.desired
            .put(device.as_str(), bytes.clone())
            .await
            .map_err(|e| format!("kv put: {e}"))?;
        self.client
            .publish_with_headers(subjects::device_desired(device), trace.clone(), bytes)
            .await
            .map_err(|e| format!("notify: {e}"))?;
        let mut channels = vec!["kv", "notify"];
        if let Some(endpoint) = &target.endpoint {
            self.webhook_task(target, endpoint).await?;
            channels.push("webhook");
        }
        Ok((
            Delivered::Sent,
            audit(
                "push.delivered",
                AuditOutcome::Ok,
                json!({"desired_version": version, "policy": policy.as_str(), "channels": channels}),
            ),
        ))
    }

    async fn held_version(&self, device: &DeviceId) -> Result<Option<u64>, String> {
        let held = self
            .desired
            .get(device.as_str())
            .await
            .map_err(|e| format!("kv get: {e}"))?;
        Ok(held
            .and_then(|bytes| DesiredPush::decode(bytes).ok())
            .map(|push| push.desired_version))
    }

    async fn webhook_task(&self, target: &Target, endpoint: &str) -> Result<(), String> {
        let task = FanoutTask {
            request_id: target.request_id.to_string(),
            push: Some(target.push.clone()),
            policy: 0,
            active: target.active,
            http_endpoint: endpoint.to_owned(),
        };
        let mut headers = async_nats::HeaderMap::new();
        telemetry::inject(&mut headers);
        let outgoing = Outgoing {
            subject: subjects::webhook(&target.device),
            msg_id: format!("webhook:{}:{}", target.device, target.push.desired_version),
            payload: task.encode_to_vec().into(),
            headers: Some(headers),
        };
        publish::send(&self.js, outgoing)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("webhook task: {e}"))?;
        Ok(())
    }

    /// Delivers one campaign batch; one outcome for the whole message.
    async fn campaign_batch(&self, delivery: &Delivery) -> Outcome {
        let batch = match CampaignBatch::decode(delivery.payload().clone()) {
            Ok(batch) => batch,
            Err(error) => return Outcome::Reject(format!("not a campaign batch: {error}")),
        };
        match self
            .deliver_batch(&batch)
            .instrument(delivery.span.clone())
            .await
        {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(campaign = %batch.campaign_id, %error, "campaign batch failed");
                Outcome::Retry(error)
            }
        }
    }

    async fn deliver_batch(&self, batch: &CampaignBatch) -> Result<(), String> {
        let policy = match policy::from_proto(batch.policy) {
            Some(policy) => policy,
            None => self.policies.resolve(0, &batch.campaign_id).await,
        };
        let mut targets = self.load(batch).await?;
        targets.sort_by_key(|target| !target.active);
        let now = Utc::now();
        // One trace context for the batch's notifications (they share its span).
        let mut trace = async_nats::HeaderMap::new();
        telemetry::inject(&mut trace);
        let trace = &trace;
        let results: Vec<(String, Attempt)> = futures::stream::iter(targets)
            .map(|target| async move {
                let result = self.deliver(&target, policy, false, now, trace).await;
                (target.device.to_string(), result)
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let mut audits = Vec::with_capacity(results.len());
        let mut skipped = Vec::new();
        let mut failure = None;
        // Counted once per batch (a labelled counter costs allocations per increment).
        let (mut sent, mut stale) = (0, 0);
        for (device, result) in results {
            match result {
                Ok((delivered, record)) => {
                    match delivered {
                        Delivered::Sent => sent += 1,
                        Delivered::Skipped => skipped.push(device),
                        Delivered::Stale => stale += 1,
                    }
                    audits.push(record);
                }
                Err(error) => failure = Some(error),
            }
        }
        for (delivered, by) in [
            (Delivered::Sent, sent),
            (Delivered::Skipped, skipped.len() as u64),
            (Delivered::Stale, stale),
        ] {
            self.metrics.count(delivered.label(), "campaign", by);
        }
        if !skipped.is_empty() {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    // One primary-key probe per device in a LATERAL subquery, whatever the
                    // statistics of the growing table say (see the campaign driver's
                    // DISPATCHED); a row changed meanwhile (acknowledged) is left alone.
                    "UPDATE campaign_devices c SET status = 'skipped', updated_at = now()
                     FROM (SELECT found.row FROM unnest($2::text[]) AS u(id)
                         CROSS JOIN LATERAL (SELECT x.ctid AS row FROM campaign_devices x
                             WHERE x.campaign_id = $1 AND x.device_id = u.id AND x.status = 'sent'
                             LIMIT 1) AS found) AS f
                     WHERE c.ctid = f.row",
                    &[&batch.campaign_id, &skipped],
                )
                .await
                .map_err(|e| devsync_store::describe(&e))?;
        }
        if let Err(error) = publish::publish_all(&self.js, self.auditor.message(&audits)).await {
            tracing::warn!(%error, "cannot publish delivery audit events");
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The batch's devices with their current desired state.
    async fn load(&self, batch: &CampaignBatch) -> Result<Vec<Target>, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT id, desired::text, desired_version, desired_changed_at, http_endpoint,
                        coalesce(last_seen > now() - make_interval(secs => $2), false)
                 FROM devices WHERE id = ANY($1) AND enabled",
                &[
                    &batch.device_ids,
                    &self.settings.active_window.as_secs_f64(),
                ],
            )
            .await
            .map_err(|e| devsync_store::describe(&e))?;
        let mut targets = Vec::with_capacity(rows.len());
        let mut order: HashMap<&str, usize> = HashMap::new();
        for (position, id) in batch.device_ids.iter().enumerate() {
            order.insert(id.as_str(), position);
        }
        for row in rows {
            let Ok(device) = DeviceId::parse(row.get::<_, String>(0)) else {
                continue;
            };
            // As text: the document's JSON as stored, not parsed and written again.
            let desired: String = row.get(1);
            let version = row.get::<_, i64>(2).max(0) as u64;
            let changed_at: Option<DateTime<Utc>> = row.get(3);
            let document = self.document(Bytes::from(desired.into_bytes())).await?;
            targets.push(Target {
                request_id: campaign_request_id(&batch.campaign_id, &device, version),
                push: DesiredPush {
                    device_id: device.to_string(),
                    desired_version: version,
                    base_version: 0,
                    full: true,
                    desired: Some(document),
                    campaign_id: batch.campaign_id.clone(),
                    changed_at: changed_at.map(timestamp),
                    request_id: String::new(),
                },
                endpoint: row.get::<_, Option<String>>(4),
                active: row.get(5),
                device,
            });
        }
        targets.sort_by_key(|t| order.get(t.device.as_str()).copied().unwrap_or(usize::MAX));
        Ok(targets)
    }

    async fn document(&self, bytes: Bytes) -> Result<Payload, String> {
        if bytes.len() > self.settings.claim_check_threshold {
            return blobs::store(&self.js, bytes).await;
        }
        Ok(Payload {
            body: Some(payload::Body::InlineJson(bytes)),
        })
    }
}

/// The request id of a push that came without one.
fn push_request_id(device: &DeviceId, version: u64) -> RequestId {
    RequestId::parse(format!("push:{device}:{version}")).unwrap_or_else(|_| RequestId::generate())
}

/// The request id of a campaign's delivery to one device (one per device and version, so each
/// has its own audit events).
pub fn campaign_request_id(campaign: &str, device: &DeviceId, version: u64) -> RequestId {
    RequestId::parse(format!("campaign:{campaign}:{device}:{version}"))
        .unwrap_or_else(|_| RequestId::generate())
}
