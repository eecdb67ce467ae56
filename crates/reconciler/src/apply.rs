//! Applying a batch of sync requests: the reconciler's one transaction per batch.
//!
//! For a batch (one lane; the batches of every partition of the lane that waited for the same
//! transaction slot, see [`Applier`]), grouped by device in arrival order:
//!
//! 1. decode every request; poison is rejected (dead-lettered) without touching the rest;
//! 2. `BEGIN`; lock every device of the batch (`SELECT ... FOR UPDATE`, in id order, so
//!    replicas never deadlock);
//! 3. per device, in order: a report is applied (RFC 7386 merge patch, or replacement when
//!    `full`) with per-field sequence stamps (`reported_stamps`): JetStream may deliver a
//!    device's report N after N+1 (redelivery once a dead worker's `ack_wait` ran out, a
//!    retried batch), so a late report writes only the fields no later report wrote, and a
//!    redelivery or device retry changes nothing — recognised here, inside the same
//!    transaction, whatever JetStream did; desired-version acks are recorded; admin changes
//!    and sweeps request a push; follow-up stages run once (`processed_requests`);
//! 4. one set-based `UPDATE ... FROM unnest(...)` for all changed devices;
//! 5. every output (pushes to `DEVSYNC_FANOUT`, audit events, follow-up stages on
//!    `DEVSYNC_REQ`) goes into one outbox row of the same transaction; `COMMIT`;
//! 6. publish the outputs with deterministic `Nats-Msg-Id`s and only then ack the batch; the
//!    outbox row is deleted by the next transaction's insert (or the sweeper's next tick).
//!
//! A crash before 5 changes nothing; between 5 and 6 the outbox sweeper publishes the row
//! (duplicates are dropped by the streams); a redelivered request finds its fields stamped with
//! its own or later sequences and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{
    self as pb, DesiredPush, FanoutTask, Payload, SyncRequest, WorkflowStage, payload, sync_request,
};
use devsync_runtime::audit::Auditor;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::worker::{Delivery, Handler, Outcome};
use devsync_runtime::{blobs, outbox, telemetry};
use devsync_types::convert::{from_timestamp, timestamp};
use devsync_types::{
    AuditOutcome, AuditRecord, DeviceId, Lane, Partition, RequestId, state, subjects,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_postgres::types::Json;

/// The reconciler's rows in the shared outbox table.
pub const OUTBOX_OWNER: &str = "reconciler";

/// The stage a report emits when it brings a device into sync with its desired state.
pub const STAGE_CONVERGED: &str = "converged";

/// A deliberate fault, for tests that prove a crash or a refusing database loses and
/// duplicates nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Failpoint {
    /// Abort the process right after a commit, before publishing or acking: after each commit
    /// with this probability (1: the first).
    AbortAfterCommit { probability: f64 },
    /// Fail every transaction holding a request of this device, as a database refusing that
    /// request would.
    RefuseDevice(DeviceId),
}

/// Metrics of the apply path.
#[derive(Debug, Clone)]
pub struct Metrics {
    applied: Counter,
    duplicates: Counter,
    report_to_db: Histogram,
    transaction_seconds: Histogram,
    beside_another: Counter,
}

impl Metrics {
    /// Registers the apply metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            applied: Counter::default(),
            duplicates: Counter::default(),
            report_to_db: Histogram::new(exponential_buckets(0.0005, 1.5, 30)),
            transaction_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            beside_another: Counter::default(),
        };
        registry.register(
            "devsync_reports_applied",
            "device reports applied to the database",
            metrics.applied.clone(),
        );
        registry.register(
            "devsync_reports_duplicate",
            "device reports recognised as already applied",
            metrics.duplicates.clone(),
        );
        registry.register(
            "devsync_report_to_db_seconds",
            "from ingress to the transaction applying a device report",
            metrics.report_to_db.clone(),
        );
        registry.register(
            "devsync_reconcile_transaction_seconds",
            "one batch transaction",
            metrics.transaction_seconds.clone(),
        );
        registry.register(
            "devsync_reconcile_transactions_beside_another",
            "transactions started while another of the same lane was running",
            metrics.beside_another.clone(),
        );
        metrics
    }
}

/// What all lanes' appliers share.
pub struct Shared {
    pub js: jetstream::Context,
    pub pool: Pool,
    pub auditor: Auditor,
    /// Desired documents larger than this travel through the object store.
    pub claim_check_threshold: usize,
    /// Devices seen within this window count as active for push policies.
    pub active_window: Duration,
    /// Requests that must be waiting before a lane runs a second transaction beside one
    /// already running (`reconciler.parallel_above`). Fewer go into the next transaction once
    /// the running one commits: at half the peak report rate, a free slot starting a
    /// transaction for whatever had arrived made 365 transactions a second of 14 requests
    /// each, and the database's CPU per report as high as at full load.
    pub parallel_above: usize,
    pub metrics: Metrics,
    pub failpoint: Option<Failpoint>,
    /// Batches being handled now, per partition (observability and tests).
    pub active: Mutex<HashMap<Partition, usize>>,
    /// Outbox rows published and not yet deleted (the next transaction deletes them).
    pub published: outbox::Published,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Most requests one transaction applies when it takes several partitions' batches.
pub const MOST_PER_TRANSACTION: usize = 2048;

/// Longest a batch waits for the lane's running transaction before starting its own.
const WAIT_FOR_RUNNING: Duration = Duration::from_millis(100);

/// A partition's batch waiting for a transaction slot of its lane.
#[derive(Debug)]
struct Waiting {
    batch: Vec<Delivery>,
    done: oneshot::Sender<Vec<Outcome>>,
}

/// The handler of one lane: shares the apply path, owns the lane's database slots.
///
/// Group commit: a partition's batch waits in the lane's queue; whichever worker gets a slot
/// next applies every batch queued by then (up to [`MOST_PER_TRANSACTION`] requests), of any
/// partitions, in one transaction, and hands each worker its outcomes. Partitions never share
/// a device, and devices are locked in id order, so this is the same transaction as one
/// partition's, only larger. At moderate rates a partition's batch holds a few requests, and
/// one transaction per partition batch cost twice the CPU per report of full load. A worker
/// stopped while its batch waits (its partition handed over) leaves the batch queued: it is
/// still applied, nobody acks it, and its redelivery finds every request already applied.
/// When the database refuses a combined transaction, each batch is retried alone at once, so
/// one partition's bad request fails only its own batch. A second transaction runs beside
/// the first only when [`Shared::parallel_above`] requests wait.
#[derive(Debug, Clone)]
pub struct Applier {
    pub shared: Arc<Shared>,
    pub lane: Lane,
    /// Concurrent transactions this lane may run; the split between lanes is the weighted
    /// share that keeps either lane from starving the other.
    pub slots: Arc<Semaphore>,
    waiting: Arc<Mutex<Vec<Waiting>>>,
    /// Transactions of this lane running now, and a signal when one has committed.
    running: Arc<AtomicUsize>,
    committed: Arc<Notify>,
}

impl Applier {
    /// The applier of `lane`, running at most `slots` transactions at once.
    pub fn new(shared: Arc<Shared>, lane: Lane, slots: usize) -> Self {
        Self {
            shared,
            lane,
            slots: Arc::new(Semaphore::new(slots)),
            waiting: Arc::default(),
            running: Arc::default(),
            committed: Arc::default(),
        }
    }

    /// Applies `batch`, with whatever other batches of the lane wait at the same time.
    async fn apply_together(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let stopped = || vec![Outcome::Retry("shutting down".into()); batch.len()];
        let (done, mut outcomes) = oneshot::channel();
        self.waiting.lock().expect("waiting lock").push(Waiting {
            batch: batch.to_vec(),
            done,
        });
        loop {
            let slot = tokio::select! {
                biased;
                outcomes = &mut outcomes => return outcomes.unwrap_or_else(|_| stopped()),
                slot = self.slots.acquire() => slot,
            };
            let Ok(slot) = slot else { return stopped() };
            // Registered before looking, so a commit in between is not missed.
            let next_commit = self.committed.notified();
            let mut next_commit = std::pin::pin!(next_commit);
            next_commit.as_mut().enable();
            if self.running.load(Ordering::SeqCst) > 0
                && self.waiting_requests() < self.shared.parallel_above
            {
                // Few requests wait: they go into one transaction after the running one.
                tokio::select! {
                    biased;
                    outcomes = &mut outcomes => return outcomes.unwrap_or_else(|_| stopped()),
                    _ = next_commit => {}
                    _ = tokio::time::sleep(WAIT_FOR_RUNNING) => {}
                }
            }
            let taken = self.take_waiting();
            if taken.is_empty() {
                // Another worker took this batch with its own and is applying it.
                drop(slot);
                return outcomes.await.unwrap_or_else(|_| stopped());
            }
            // The batches' deliveries in one run, and where each batch's part ends.
            let mut together = Vec::new();
            let mut parts = Vec::with_capacity(taken.len());
            for waiting in taken {
                together.extend(waiting.batch);
                parts.push((together.len(), waiting.done));
            }
            if self.running.fetch_add(1, Ordering::SeqCst) > 0 {
                self.shared.metrics.beside_another.inc();
            }
            let (mut results, failed, committed) = self.shared.commit_or_fail(&together).await;
            if failed && parts.len() > 1 {
                // Whatever the database refused may be one batch's: each batch alone, so it
                // fails (and is retried, then dead-lettered) without the others.
                results = Vec::with_capacity(together.len());
                let mut start = 0;
                for (end, _) in &parts {
                    results.extend(self.shared.apply(&together[start..*end]).await);
                    start = *end;
                }
            }
            // Committed: the next transaction may start while this one's outputs are
            // published (waiting for JetStream's acks); it deletes this one's outbox row.
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.committed.notify_waiters();
            drop(slot);
            let results = self.shared.publish(results, committed).await;
            let mut results = results.into_iter();
            let mut start = 0;
            for (end, done) in parts {
                let _ = done.send(results.by_ref().take(end - start).collect());
                start = end;
            }
        }
    }

    /// Requests queued for the next transaction.
    fn waiting_requests(&self) -> usize {
        let waiting = self.waiting.lock().expect("waiting lock");
        waiting.iter().map(|w| w.batch.len()).sum()
    }

    /// The queued batches, oldest first, up to [`MOST_PER_TRANSACTION`] requests (always at
    /// least one batch).
    fn take_waiting(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().expect("waiting lock");
        let mut requests = 0;
        let count = waiting
            .iter()
            .take_while(|w| {
                let fits = requests == 0 || requests + w.batch.len() <= MOST_PER_TRANSACTION;
                requests += w.batch.len();
                fits
            })
            .count();
        waiting.drain(..count).collect()
    }
}

impl Handler for Applier {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let partition = batch
            .first()
            .and_then(|d| subjects::parse_request(d.subject()).ok())
            .map(|(_, p, _)| p);
        if let Some(p) = partition {
            *self
                .shared
                .active
                .lock()
                .expect("active lock")
                .entry(p)
                .or_default() += 1;
        }
        let outcomes = self.apply_together(batch).await;
        if let Some(p) = partition {
            let mut active = self.shared.active.lock().expect("active lock");
            if let Some(count) = active.get_mut(&p) {
                *count -= 1;
                if *count == 0 {
                    active.remove(&p);
                }
            }
        }
        outcomes
    }
}

/// What one request asks for, decoded.
#[derive(Debug)]
enum Work {
    Report {
        sequence: u64,
        document: Value,
        full: bool,
    },
    Ack {
        version: i64,
        success: bool,
        error: String,
    },
    Push {
        cause: &'static str,
        campaign: String,
    },
    Stage {
        stage: String,
        input: Value,
    },
}

#[derive(Debug)]
struct Request {
    index: usize,
    request_id: RequestId,
    /// The request that caused this one (an acknowledgement names the push it answers).
    causation: Option<RequestId>,
    device: DeviceId,
    received_at: Option<DateTime<Utc>>,
    /// The ingress worker that accepted the device's message (`SyncRequest.accepted_by`).
    accepted_by: Option<String>,
    work: Work,
}

impl Request {
    /// `details` of an audit event about this request's outcome, with where it came from
    /// ([`with_origin`]; `batch` is the batch holding it).
    fn details(&self, batch: &[Delivery], details: Value) -> Value {
        with_origin(details, self.accepted_by.as_deref(), &batch[self.index])
    }
}

/// `details` of an audit event about a stored request, with where the request came from: the
/// worker that accepted it and its place in `DEVSYNC_REQ`. Ingress records no event of its own
/// for a request it stored, so the reconciler's event names both workers.
fn with_origin(mut details: Value, accepted_by: Option<&str>, delivery: &Delivery) -> Value {
    if let Value::Object(map) = &mut details {
        if let Some(accepted_by) = accepted_by {
            map.insert("accepted_by".into(), Value::from(accepted_by));
        }
        map.insert(
            "stream_sequence".into(),
            Value::from(delivery.stream_sequence()),
        );
    }
    details
}

/// A device row, as locked for the batch.
#[derive(Debug, Clone)]
struct DeviceRow {
    enabled: bool,
    desired: Value,
    desired_version: i64,
    desired_changed_at: Option<DateTime<Utc>>,
    reported: Value,
    reported_version: i64,
    last_seq: i64,
    /// Per-field write stamps of `reported` (see `devsync_types::state::Stamps`).
    stamps: state::Stamps,
    applied: i64,
    http_endpoint: Option<String>,
    last_seen: Option<DateTime<Utc>>,
    changed: bool,
}

const LOCK: &str = "SELECT id, enabled, desired, desired_version, desired_changed_at, reported,
        reported_version, last_seq, applied_desired_version, http_endpoint, last_seen,
        reported_stamps
    FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE";

const UPDATE: &str = "UPDATE devices AS d SET
        reported = u.reported,
        reported_version = u.reported_version,
        reported_at = CASE WHEN u.reported_version <> d.reported_version THEN now() ELSE d.reported_at END,
        last_seq = u.last_seq,
        reported_stamps = u.stamps,
        applied_desired_version = u.applied,
        applied_at = CASE WHEN u.applied <> d.applied_desired_version THEN now() ELSE d.applied_at END,
        last_seen = now(),
        active = true,
        updated_at = now()
    FROM unnest($1::text[], $2::jsonb[], $3::int8[], $4::int8[], $5::int8[], $6::jsonb[])
        AS u(id, reported, reported_version, last_seq, applied, stamps)
    WHERE d.id = u.id";

const ACKS: &str = "UPDATE campaign_devices AS c SET
        status = CASE WHEN u.ok THEN 'acked' ELSE 'failed' END,
        error = nullif(u.error, ''), updated_at = now()
    FROM unnest($1::text[], $2::int8[], $3::bool[], $4::text[]) AS u(id, version, ok, error)
    WHERE c.device_id = u.id AND c.desired_version <= u.version
      AND c.status IN ('pending', 'sent', 'acked')";

const CONVERGED: &str = "UPDATE campaign_devices SET status = 'converged', updated_at = now()
    WHERE device_id = $1 AND desired_version <= $2 AND status IN ('pending', 'sent', 'acked')";

const STAGE_ONCE: &str = "INSERT INTO processed_requests (device_id, request_id) VALUES ($1, $2)
    ON CONFLICT DO NOTHING";

/// Everything a committed batch must publish.
struct Committed {
    outbox_id: Option<i64>,
    messages: Vec<Outgoing>,
    /// The deliveries (by index) the transaction applied: retried if publishing fails.
    applied: Vec<usize>,
}

impl Shared {
    /// Applies `batch`; one outcome per delivery.
    pub async fn apply(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.apply_or_fail(batch).await.0
    }

    /// Applies `batch`: one outcome per delivery, and whether its transaction failed (then
    /// every decoded request is to be retried).
    async fn apply_or_fail(&self, batch: &[Delivery]) -> (Vec<Outcome>, bool) {
        let (outcomes, failed, committed) = self.commit_or_fail(batch).await;
        (self.publish(outcomes, committed).await, failed)
    }

    /// The transaction half of [`Shared::apply_or_fail`]: decodes and commits `batch`,
    /// returning the outcomes so far, whether the transaction failed, and what the commit
    /// must still publish. The caller's transaction slot is free again once this returns.
    async fn commit_or_fail(&self, batch: &[Delivery]) -> (Vec<Outcome>, bool, Option<Committed>) {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut requests = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            match self.decode(index, delivery).await {
                Ok(request) => requests.push(request),
                Err(Decoded::Poison(reason)) => {
                    rejected.push(self.rejection(delivery, &reason));
                    outcomes[index] = Outcome::Reject(reason);
                }
                Err(Decoded::Transient(reason)) => outcomes[index] = Outcome::Retry(reason),
            }
        }
        if !rejected.is_empty() {
            // Poison is rare: its events go out at once, before the worker dead-letters it
            // (best effort: the dead letter itself is the record the worker guarantees).
            if let Err(error) =
                publish::publish_all(&self.js, self.auditor.message(&rejected)).await
            {
                tracing::warn!(%error, "cannot audit rejected requests");
            }
        }
        if requests.is_empty() {
            return (outcomes, false, None);
        }
        let started = std::time::Instant::now();
        let mut committed = match self.transact(batch, &requests, &mut outcomes).await {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(%error, batch = batch.len(), "batch transaction failed; retrying");
                for request in &requests {
                    outcomes[request.index] = Outcome::Retry(format!("database: {error}"));
                }
                return (outcomes, true, None);
            }
        };
        self.metrics
            .transaction_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(Failpoint::AbortAfterCommit { probability }) = &self.failpoint
            && rand::random::<f64>() < *probability
        {
            tracing::error!("failpoint abort-after-commit: aborting the process");
            std::process::abort();
        }
        committed.applied = requests.iter().map(|r| r.index).collect();
        (outcomes, false, Some(committed))
    }

    /// The publishing half of [`Shared::apply_or_fail`]: publishes what `committed` recorded
    /// and hands its outbox row to the next transaction to delete. If publishing fails, every
    /// applied request is retried (nothing is acked, the outbox sweeper publishes the row, a
    /// redelivery changes nothing).
    async fn publish(
        &self,
        mut outcomes: Vec<Outcome>,
        committed: Option<Committed>,
    ) -> Vec<Outcome> {
        let Some(committed) = committed else {
            return outcomes;
        };
        if let Err(error) = publish::publish_all(&self.js, committed.messages).await {
            tracing::warn!(%error, "publishing outputs failed; the outbox sweeper will retry");
            for index in committed.applied {
                outcomes[index] = Outcome::Retry(format!("publish outputs: {error}"));
            }
            return outcomes;
        }
        if let Some(id) = committed.outbox_id {
            self.published.push(id);
        }
        outcomes
    }

    /// The audit event of a request refused as poison: its device (from the subject), its id
    /// (the message id it was stored with) and the worker that accepted it, where they can be
    /// read. Ingress records no event for a request it stored, so without this one a
    /// dead-lettered request would have none.
    fn rejection(&self, delivery: &Delivery, reason: &str) -> AuditRecord {
        let device = subjects::parse_request(delivery.subject())
            .ok()
            .map(|(_, _, device)| device);
        let request = delivery
            .headers()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .and_then(|id| RequestId::parse(id.as_str().to_owned()).ok());
        let accepted_by = SyncRequest::decode(delivery.payload().clone())
            .ok()
            .map(|request| request.accepted_by)
            .filter(|worker| !worker.is_empty());
        self.auditor.record(
            Utc::now(),
            device.as_ref(),
            request.as_ref(),
            "reconcile",
            "request.rejected",
            AuditOutcome::Rejected,
            with_origin(
                json!({
                    "reason": reason,
                    "dead_lettered": true,
                    "delivery": delivery.delivered(),
                }),
                accepted_by.as_deref(),
                delivery,
            ),
        )
    }

    async fn decode(&self, index: usize, delivery: &Delivery) -> Result<Request, Decoded> {
        let request = SyncRequest::decode(delivery.payload().clone())
            .map_err(|e| Decoded::Poison(format!("not a sync request: {e}")))?;
        let device = DeviceId::parse(request.device_id.clone())
            .map_err(|e| Decoded::Poison(format!("device_id: {e}")))?;
        if let Ok((_, _, subject_device)) = subjects::parse_request(delivery.subject())
            && subject_device != device
        {
            return Err(Decoded::Poison(format!(
                "request for {device} stored under {}",
                delivery.subject()
            )));
        }
        let request_id = RequestId::parse(request.request_id.clone())
            .map_err(|e| Decoded::Poison(format!("request_id: {e}")))?;
        let received_at = request.received_at.as_ref().and_then(from_timestamp);
        let work = match request.kind {
            Some(sync_request::Kind::Report(report)) => {
                let bytes = match report.reported.as_ref() {
                    Some(payload) => blobs::load(&self.js, payload)
                        .await
                        .map_err(|e| Decoded::Transient(format!("reported state: {e}")))?,
                    None => return Err(Decoded::Poison("report without state".into())),
                };
                let document = state::parse_object(&bytes)
                    .map_err(|e| Decoded::Poison(format!("reported state: {e}")))?;
                Work::Report {
                    sequence: report.sequence,
                    document,
                    full: report.full,
                }
            }
            Some(sync_request::Kind::Ack(ack)) if state::storable(&ack.error).is_err() => {
                return Err(Decoded::Poison(format!(
                    "ack error {}",
                    state::NOT_STORABLE
                )));
            }
            Some(sync_request::Kind::Ack(ack)) => Work::Ack {
                version: i64::try_from(ack.desired_version).unwrap_or(i64::MAX),
                success: ack.success,
                error: ack.error,
            },
            Some(sync_request::Kind::AdminChange(change)) => Work::Push {
                cause: "admin.change",
                campaign: change.campaign_id,
            },
            Some(sync_request::Kind::Schedule(_)) => Work::Push {
                cause: "sweep.repush",
                campaign: String::new(),
            },
            Some(sync_request::Kind::Stage(stage)) => Work::Stage {
                stage: stage.stage,
                input: serde_json::from_slice(&stage.input_json).unwrap_or(Value::Null),
            },
            Some(sync_request::Kind::CheckIn(_)) | Some(sync_request::Kind::Refresh(_)) => {
                return Err(Decoded::Poison(
                    "check-ins and refreshes are answered by the requestor".into(),
                ));
            }
            None => return Err(Decoded::Poison("sync request without a kind".into())),
        };
        Ok(Request {
            index,
            causation: RequestId::parse(request.causation_id.clone()).ok(),
            request_id,
            device,
            received_at,
            accepted_by: (!request.accepted_by.is_empty()).then_some(request.accepted_by),
            work,
        })
    }

    async fn transact(
        &self,
        batch: &[Delivery],
        requests: &[Request],
        outcomes: &mut [Outcome],
    ) -> Result<Committed, TxError> {
        if let Some(Failpoint::RefuseDevice(refused)) = &self.failpoint
            && requests.iter().any(|r| &r.device == refused)
        {
            return Err(TxError::Failpoint(format!("refuse-device {refused}")));
        }
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| TxError::Pool(e.to_string()))?;
        let tx = client.transaction().await?;
        let mut ids: Vec<&str> = requests.iter().map(|r| r.device.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let lock = tx.prepare_cached(LOCK).await?;
        let mut devices: BTreeMap<String, DeviceRow> = BTreeMap::new();
        for row in tx.query(&lock, &[&ids]).await? {
            devices.insert(
                row.get(0),
                DeviceRow {
                    enabled: row.get(1),
                    desired: row.get(2),
                    desired_version: row.get(3),
                    desired_changed_at: row.get(4),
                    reported: row.get(5),
                    reported_version: row.get(6),
                    last_seq: row.get(7),
                    applied: row.get(8),
                    http_endpoint: row.get(9),
                    last_seen: row.get(10),
                    // Read straight into the map (no intermediate JSON value). Stamps
                    // that do not read as a map are treated as none, as before, but said.
                    stamps: match row.try_get::<_, Json<state::Stamps>>(11) {
                        Ok(stamps) => stamps.0,
                        Err(error) => {
                            tracing::warn!(
                                device_id = row.get::<_, &str>(0),
                                %error,
                                "reported stamps unreadable; ignored"
                            );
                            state::Stamps::default()
                        }
                    },
                    changed: false,
                },
            );
        }
        let mut out = Outputs::default();
        let mut acks: Vec<(String, i64, bool, String)> = Vec::new();
        // device -> (request, campaign, cause, index of the request's delivery in the batch)
        let mut pushes: BTreeMap<String, (RequestId, String, &'static str, usize)> =
            BTreeMap::new();
        let mut converged_before: HashMap<String, bool> = HashMap::new();
        let now = Utc::now();
        for request in requests {
            let span = batch[request.index].span.clone();
            let _enter = span.enter();
            let device_key = request.device.to_string();
            let Some(row) = devices.get_mut(&device_key) else {
                out.audit(self.auditor.record(
                    now,
                    Some(&request.device),
                    Some(&request.request_id),
                    "reconcile",
                    "request.rejected",
                    AuditOutcome::Rejected,
                    request.details(batch, json!({"reason": "device is not registered"})),
                ));
                outcomes[request.index] =
                    Outcome::Reject(format!("device {} is not registered", request.device));
                continue;
            };
            converged_before
                .entry(device_key.clone())
                .or_insert_with(|| state::delta(&row.desired, &row.reported).is_none());
            match &request.work {
                Work::Report {
                    sequence,
                    document,
                    full,
                } => {
                    let sequence = i64::try_from(*sequence).unwrap_or(i64::MAX);
                    if !row.enabled {
                        out.audit(self.auditor.record(
                            now,
                            Some(&request.device),
                            Some(&request.request_id),
                            "reconcile",
                            "report.skipped",
                            AuditOutcome::Skipped,
                            request.details(batch, json!({"reason": "device is disabled"})),
                        ));
                        continue;
                    }
                    // Reports may arrive out of order (redelivery after a worker died, a
                    // retried batch): the stamps apply a late one where no later one wrote.
                    let changed = if *full {
                        state::replace_stamped(
                            &mut row.reported,
                            &mut row.stamps,
                            document,
                            sequence,
                        )
                    } else {
                        state::apply_stamped(&mut row.reported, &mut row.stamps, document, sequence)
                    };
                    let late = sequence <= row.last_seq;
                    if late && !changed {
                        // A redelivery, a device retry, or a late report every part of which
                        // a later one overwrote.
                        self.metrics.duplicates.inc();
                        out.audit(self.auditor.record(
                            now,
                            Some(&request.device),
                            Some(&request.request_id),
                            "reconcile",
                            "report.duplicate",
                            AuditOutcome::Skipped,
                            request.details(
                                batch,
                                json!({
                                    "sequence": sequence,
                                    "last_sequence": row.last_seq,
                                    "delivery": batch[request.index].delivered(),
                                }),
                            ),
                        ));
                        continue;
                    }
                    if changed {
                        row.reported_version += 1;
                    }
                    row.last_seq = row.last_seq.max(sequence);
                    row.changed = true;
                    self.metrics.applied.inc();
                    if let Some(received) = request.received_at {
                        let seconds = (now - received).num_microseconds().unwrap_or(0) as f64 / 1e6;
                        self.metrics.report_to_db.observe(seconds.max(0.0));
                    }
                    out.audit(self.auditor.record(
                        now,
                        Some(&request.device),
                        Some(&request.request_id),
                        "reconcile",
                        "report.applied",
                        AuditOutcome::Ok,
                        request.details(
                            batch,
                            json!({
                                "sequence": sequence,
                                "reported_version": row.reported_version,
                                "full": full,
                                "late": late,
                                "delivery": batch[request.index].delivered(),
                            }),
                        ),
                    ));
                    let delta = state::delta(&row.desired, &row.reported);
                    if delta.is_some() && row.applied < row.desired_version {
                        pushes.insert(
                            device_key.clone(),
                            (
                                request.request_id.clone(),
                                String::new(),
                                "report.delta",
                                request.index,
                            ),
                        );
                    }
                }
                Work::Ack {
                    version,
                    success,
                    error,
                } => {
                    if *success && *version > row.applied && *version <= row.desired_version {
                        row.applied = *version;
                        row.changed = true;
                    }
                    acks.push((device_key.clone(), *version, *success, error.clone()));
                    // An acknowledgement of a push joins the chain of the push's request.
                    let chain = request.causation.as_ref().unwrap_or(&request.request_id);
                    let mut record = self.auditor.record(
                        now,
                        Some(&request.device),
                        Some(chain),
                        "reconcile",
                        if *success {
                            "ack.recorded"
                        } else {
                            "ack.failed"
                        },
                        if *success {
                            AuditOutcome::Ok
                        } else {
                            AuditOutcome::Failed
                        },
                        request.details(
                            batch,
                            json!({
                                "desired_version": version,
                                "error": error,
                                "request": request.request_id.as_str(),
                            }),
                        ),
                    );
                    record.event_id = format!("{}/{}", record.event_id, request.request_id);
                    out.audit(record);
                }
                Work::Push { cause, campaign } => {
                    pushes.insert(
                        device_key.clone(),
                        (
                            request.request_id.clone(),
                            campaign.clone(),
                            *cause,
                            request.index,
                        ),
                    );
                }
                Work::Stage { stage, input } => {
                    let once = tx.prepare_cached(STAGE_ONCE).await?;
                    let first = tx
                        .execute(&once, &[&device_key, &request.request_id.as_str()])
                        .await?
                        == 1;
                    if !first {
                        continue;
                    }
                    if stage == STAGE_CONVERGED {
                        let version = input
                            .get("desired_version")
                            .and_then(Value::as_i64)
                            .unwrap_or(row.desired_version);
                        let converged = tx.prepare_cached(CONVERGED).await?;
                        tx.execute(&converged, &[&device_key, &version]).await?;
                    }
                    out.audit(self.auditor.record(
                        now,
                        Some(&request.device),
                        Some(&request.request_id),
                        &format!("stage.{stage}"),
                        "stage.completed",
                        AuditOutcome::Ok,
                        input.clone(),
                    ));
                }
            }
        }
        // Follow-up stage: a device that came into sync with a desired version.
        for (device_key, row) in &devices {
            let was = converged_before.get(device_key).copied().unwrap_or(true);
            if row.changed
                && !was
                && row.desired_version > 0
                && state::delta(&row.desired, &row.reported).is_none()
            {
                let device = DeviceId::parse(device_key.clone()).expect("ids in the db are valid");
                out.messages.push(stage_message(
                    &device,
                    STAGE_CONVERGED,
                    json!({"desired_version": row.desired_version}),
                ));
            }
        }
        for (device_key, (request_id, campaign, cause, index)) in &pushes {
            let row = &devices[device_key];
            let device = DeviceId::parse(device_key.clone()).expect("ids in the db are valid");
            // The push continues the trace of the request that caused it.
            let span =
                tracing::info_span!(parent: &batch[*index].span, "push", device_id = %device);
            let _enter = span.enter();
            out.messages
                .push(self.push_message(&device, row, request_id, campaign).await);
            out.audit(self.auditor.record(
                now,
                Some(&device),
                Some(request_id),
                "reconcile",
                "push.requested",
                AuditOutcome::Ok,
                json!({"desired_version": row.desired_version, "cause": cause}),
            ));
        }
        let changed: Vec<(&String, &DeviceRow)> =
            devices.iter().filter(|(_, row)| row.changed).collect();
        if !changed.is_empty() {
            let update = tx.prepare_cached(UPDATE).await?;
            let ids: Vec<&str> = changed.iter().map(|(id, _)| id.as_str()).collect();
            let reported: Vec<&Value> = changed.iter().map(|(_, r)| &r.reported).collect();
            let versions: Vec<i64> = changed.iter().map(|(_, r)| r.reported_version).collect();
            let seqs: Vec<i64> = changed.iter().map(|(_, r)| r.last_seq).collect();
            let applied: Vec<i64> = changed.iter().map(|(_, r)| r.applied).collect();
            let stamps: Vec<Json<&state::Stamps>> =
                changed.iter().map(|(_, r)| Json(&r.stamps)).collect();
            tx.execute(
                &update,
                &[&ids, &reported, &versions, &seqs, &applied, &stamps],
            )
            .await?;
        }
        if !acks.is_empty() {
            let statement = tx.prepare_cached(ACKS).await?;
            let ids: Vec<&str> = acks.iter().map(|a| a.0.as_str()).collect();
            let versions: Vec<i64> = acks.iter().map(|a| a.1).collect();
            let ok: Vec<bool> = acks.iter().map(|a| a.2).collect();
            let errors: Vec<&str> = acks.iter().map(|a| a.3.as_str()).collect();
            tx.execute(&statement, &[&ids, &versions, &ok, &errors])
                .await?;
        }
        let messages = out.finish(&self.auditor);
        // Earlier batches' published rows are deleted with this one's.
        let key = format!("batch:{}", requests[0].request_id);
        let outbox_id = self
            .published
            .commit(tx, OUTBOX_OWNER, &key, &messages)
            .await?;
        Ok(Committed {
            outbox_id,
            messages,
            applied: Vec::new(),
        })
    }

    async fn push_message(
        &self,
        device: &DeviceId,
        row: &DeviceRow,
        request_id: &RequestId,
        campaign: &str,
    ) -> Outgoing {
        let bytes: Bytes = serde_json::to_vec(&row.desired).unwrap_or_default().into();
        let desired = if bytes.len() > self.claim_check_threshold {
            match blobs::store(&self.js, bytes.clone()).await {
                Ok(reference) => reference,
                Err(error) => {
                    tracing::warn!(%error, "claim check failed; sending inline");
                    inline(bytes)
                }
            }
        } else {
            inline(bytes)
        };
        let version = row.desired_version.max(0) as u64;
        let active = row.last_seen.is_some_and(|seen| {
            Utc::now() - seen
                <= chrono::Duration::from_std(self.active_window).unwrap_or(chrono::Duration::MAX)
        });
        let task = FanoutTask {
            request_id: request_id.to_string(),
            push: Some(DesiredPush {
                device_id: device.to_string(),
                desired_version: version,
                base_version: 0,
                full: true,
                desired: Some(desired),
                campaign_id: campaign.to_owned(),
                changed_at: row.desired_changed_at.map(timestamp),
                request_id: request_id.to_string(),
            }),
            policy: pb::PushPolicy::Unspecified as i32,
            active,
            http_endpoint: row.http_endpoint.clone().unwrap_or_default(),
        };
        let mut headers = HeaderMap::new();
        telemetry::inject(&mut headers);
        Outgoing {
            subject: subjects::fanout_push(device),
            msg_id: format!("push:{device}:{version}"),
            payload: task.encode_to_vec().into(),
            headers: Some(headers),
        }
    }
}

fn inline(bytes: Bytes) -> Payload {
    Payload {
        body: Some(payload::Body::InlineJson(bytes)),
    }
}

/// A follow-up stage for `device`, published into its own partition of `DEVSYNC_REQ`.
fn stage_message(device: &DeviceId, stage: &str, input: Value) -> Outgoing {
    let version = input
        .get("desired_version")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let request_id = RequestId::parse(format!("stage:{stage}:{device}:{version}"))
        .unwrap_or_else(|_| RequestId::generate());
    let request = SyncRequest {
        request_id: request_id.to_string(),
        device_id: device.to_string(),
        lane: pb::Lane::Rt as i32,
        received_at: Some(timestamp(Utc::now())),
        causation_id: String::new(),
        kind: Some(sync_request::Kind::Stage(WorkflowStage {
            stage: stage.to_owned(),
            step: 1,
            input_json: serde_json::to_vec(&input).unwrap_or_default().into(),
        })),
        reply_to: String::new(),
        accepted_by: String::new(),
    };
    let mut headers = HeaderMap::new();
    telemetry::inject(&mut headers);
    Outgoing {
        subject: subjects::request(Lane::Rt, device),
        msg_id: request_id.to_string(),
        payload: request.encode_to_vec().into(),
        headers: Some(headers),
    }
}

enum Decoded {
    Poison(String),
    Transient(String),
}

#[derive(Default)]
struct Outputs {
    messages: Vec<Outgoing>,
    audits: Vec<AuditRecord>,
}

impl Outputs {
    fn audit(&mut self, record: AuditRecord) {
        self.audits.push(record);
    }

    fn finish(mut self, auditor: &Auditor) -> Vec<Outgoing> {
        self.messages.extend(auditor.message(&self.audits));
        self.messages
    }
}

/// Why a batch transaction failed (always retried).
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("connection pool: {0}")]
    Pool(String),
    #[error("failpoint: {0}")]
    Failpoint(String),
    #[error("{}", devsync_store::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}
