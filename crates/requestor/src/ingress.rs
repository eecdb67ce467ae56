//! Device ingress: `devsync.in.<device>.<kind>` served by a queue group.
//!
//! Order of checks (cheapest first, so bad input costs as little as possible): subject shape
//! and device id, payload size, known kind, per-device rate limit (token bucket), registered and
//! enabled device (cached), protobuf decode, identity in the payload, content. A refresh is
//! the exception: its answering query checks the registration, after decoding (see
//! [`refresh`]). Every refusal gets an `ErrorReply` when the device used request/reply, an
//! audit event (rate-limit refusals at most one per device per second, so a flood cannot flood
//! the audit trail too), and, for undecodable input, a dead letter with the original bytes.
//! An accepted report or ack is stored as a sync request naming this worker
//! (`accepted_by`); the reconciler's event of its outcome carries that name, so ingress
//! audits a stored request only when JetStream recognised it as a device retry.
//! Nothing else is blocked: the messages in flight are handled concurrently, at most
//! `max_in_flight` (refreshes: their own budget, tasks on their own runtime).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{
    self as pb, Accepted, CheckIn, DesiredAck, DeviceReport, ErrorReply, Payload, RefreshRequest,
    SyncRequest, error_reply::Code, payload, sync_request,
};
use devsync_runtime::audit::Auditor;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::service::Service;
use devsync_runtime::{Shutdown, blobs, dlq, telemetry};
use devsync_types::convert::timestamp;
use devsync_types::{AuditOutcome, DeviceId, Lane, MessageKind, RequestId, state, subjects};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as MetricsRegistry;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::RequestorSettings;
use crate::checkins::Checkins;
use crate::refresh;
use crate::registry::{Registration, Registry};

use devsync_types::subjects::{STATUS_ERROR, STATUS_OK};

/// The queue group every requestor replica joins.
pub const QUEUE_GROUP: &str = "requestor";
/// The queue group of the refresh path (its own connection and budget, so a waking device's
/// refresh does not queue behind a flood of reports).
pub const REFRESH_QUEUE_GROUP: &str = "requestor-refresh";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// Ingress metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    accepted: Family<KindLabel, Counter>,
    refused: Family<CodeLabel, Counter>,
    refresh_seconds: Histogram,
}

impl Metrics {
    /// Registers the ingress metrics.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let metrics = Self {
            accepted: Family::default(),
            refused: Family::default(),
            refresh_seconds: Histogram::new(exponential_buckets(0.0002, 1.5, 24)),
        };
        registry.register(
            "devsync_ingress_accepted",
            "device messages accepted, by kind",
            metrics.accepted.clone(),
        );
        registry.register(
            "devsync_ingress_refused",
            "device messages refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "devsync_refresh_seconds",
            "time to answer a refresh",
            metrics.refresh_seconds.clone(),
        );
        metrics
    }
}

/// Why a message was refused.
#[derive(Debug, Clone)]
struct Refusal {
    code: Code,
    message: String,
    retry_after: Option<Duration>,
    dead_letter: bool,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            dead_letter: false,
        }
    }
}

/// What to answer an accepted message with.
enum Answer {
    Accepted(Accepted),
    Refresh(pb::RefreshReply),
}

/// The ingress handler shared by all message tasks.
pub struct Ingress {
    client: async_nats::Client,
    /// A separate connection for refreshes: its own socket, so refreshes and their answers do
    /// not wait behind reports in one TCP stream. Lives on the refresh runtime, as does
    /// `refresh_pool` ([`refresh::Runtime`]).
    refresh_client: async_nats::Client,
    refresh_pool: Pool,
    refresh_in_flight: Arc<Semaphore>,
    js: async_nats::jetstream::Context,
    auditor: Auditor,
    audits: devsync_runtime::audit::Sink,
    settings: RequestorSettings,
    registry: Registry,
    limiter: DefaultKeyedRateLimiter<DeviceId>,
    refusal_audits: DefaultKeyedRateLimiter<DeviceId>,
    checkins: Checkins,
    metrics: Metrics,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress").finish_non_exhaustive()
    }
}

/// Most refreshes in flight at once.
fn refresh_budget(settings: &RequestorSettings) -> usize {
    (settings.max_in_flight / 8).max(64)
}

fn non_zero(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value.max(1)).expect("at least 1")
}

impl Ingress {
    /// An ingress handler for `service`.
    pub fn new(
        service: &Service,
        refresh: refresh::Connections,
        settings: RequestorSettings,
        checkins: Checkins,
        metrics: Metrics,
        audits: devsync_runtime::audit::Sink,
    ) -> Self {
        let quota = Quota::per_second(non_zero(settings.rate_per_device))
            .allow_burst(non_zero(settings.burst_per_device));
        Self {
            client: service.client.clone(),
            refresh_client: refresh.nats,
            refresh_pool: refresh.pool,
            refresh_in_flight: Arc::new(Semaphore::new(refresh_budget(&settings))),
            js: service.js.clone(),
            auditor: service.auditor.clone(),
            audits,
            registry: Registry::new(
                service.pool.clone(),
                settings.device_cache_capacity,
                settings.device_cache_ttl,
            ),
            limiter: RateLimiter::keyed(quota),
            refusal_audits: RateLimiter::keyed(Quota::per_second(non_zero(1))),
            settings,
            checkins,
            metrics,
        }
    }

    /// The registration cache ingress checks devices against.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Joins the queue group on every device subject, and the refresh group on refreshes.
    pub async fn subscribe(&self) -> anyhow::Result<(Subscriber, Subscriber)> {
        let all = self
            .client
            .queue_subscribe(subjects::INGRESS_ALL, QUEUE_GROUP.into())
            .await?;
        let refresh = self
            .refresh_client
            .queue_subscribe(
                subjects::ingress_of_kind(MessageKind::Refresh),
                REFRESH_QUEUE_GROUP.into(),
            )
            .await?;
        Ok((all, refresh))
    }

    /// Handles device messages until `shutdown`; then unsubscribes so the other replicas take
    /// over, and finishes the messages in hand (at most `drain`). Refreshes are served by
    /// [`Ingress::serve_refreshes`] on the refresh runtime.
    ///
    /// The messages in flight are futures of this one task (at most `max_in_flight`), not a
    /// task each: a spawn per message cost about a tenth of the requestor's CPU (task
    /// allocation, the runtime's task list lock, wake-ups across threads), and ingress work per
    /// message is small next to the NATS round trip it waits for.
    pub async fn serve(self: &Arc<Self>, mut all: Subscriber, shutdown: Shutdown, drain: Duration) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(10));
        let mut in_flight = FuturesUnordered::new();
        let most = self.settings.max_in_flight;
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                message = all.next(), if in_flight.len() < most => message,
                _ = housekeeping.tick() => {
                    self.limiter.retain_recent();
                    self.refusal_audits.retain_recent();
                    continue;
                }
            };
            let Some(message) = message else { break };
            // Refreshes reach both groups; the refresh path answers them.
            if is_refresh(&message) {
                continue;
            }
            // A panic while handling one message drops that message only (as a task of its
            // own would), not the serving loop.
            in_flight.push(
                std::panic::AssertUnwindSafe(self.handle(message, false))
                    .catch_unwind()
                    .map(|handled| {
                        if handled.is_err() {
                            tracing::error!("ingress handler panicked; the message is dropped");
                        }
                    }),
            );
        }
        let _ = all.unsubscribe().await;
        let finished =
            tokio::time::timeout(drain, async { while in_flight.next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                in_flight = in_flight.len(),
                "ingress drain timed out with messages in flight"
            );
        }
    }

    /// Answers refreshes until `shutdown`. Spawned on the refresh runtime, so its tasks (and
    /// the connections they use) never wait in the report path's run queue.
    pub async fn serve_refreshes(self: Arc<Self>, mut refreshes: Subscriber, shutdown: Shutdown) {
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                message = refreshes.next() => message,
            };
            let Some(message) = message else { break };
            self.spawn_refresh(message).await;
        }
        let _ = refreshes.unsubscribe().await;
    }

    /// Answers a refresh in a task of the refresh runtime, holding a permit of the refresh
    /// budget.
    async fn spawn_refresh(self: &Arc<Self>, message: Message) {
        let Ok(permit) = self.refresh_in_flight.clone().acquire_owned().await else {
            return;
        };
        let ingress = Arc::clone(self);
        tokio::spawn(async move {
            ingress.handle(message, true).await;
            drop(permit);
        });
    }

    /// Waits until refreshes in flight are answered, at most `timeout` (the report path's
    /// messages are finished by [`Ingress::serve`] itself).
    pub async fn drain_refreshes(&self, timeout: Duration) {
        let refreshes = refresh_budget(&self.settings) as u32;
        let waited = tokio::time::timeout(timeout, async {
            let _ = self.refresh_in_flight.acquire_many(refreshes).await;
            // The last answers are written before the refresh connection goes away.
            let _ = self.refresh_client.flush().await;
        })
        .await;
        if waited.is_err() {
            tracing::warn!("refresh drain timed out with refreshes in flight");
        }
    }

    async fn handle(&self, message: Message, refresh_path: bool) {
        let received_at = Utc::now();
        let span = tracing::info_span!("ingress", subject = %message.subject);
        telemetry::extract_into(&span, message.headers.as_ref());
        async {
            let parsed = subjects::parse_ingress(message.subject.as_str());
            let device = parsed.as_ref().ok().map(|(d, _)| d.clone());
            let kind = parsed
                .as_ref()
                .ok()
                .and_then(|(_, k)| k.parse::<MessageKind>().ok());
            match self.accept(&message, parsed, received_at).await {
                Ok(answer) => {
                    if let Some(kind) = kind {
                        self.metrics
                            .accepted
                            .get_or_create(&KindLabel {
                                kind: kind.as_str(),
                            })
                            .inc();
                    }
                    let payload = match answer {
                        Answer::Accepted(accepted) => accepted.encode_to_vec(),
                        Answer::Refresh(reply) => reply.encode_to_vec(),
                    };
                    self.reply(&message, refresh_path, STATUS_OK, payload.into())
                        .await;
                }
                Err(refusal) => {
                    Box::pin(self.refuse(&message, refresh_path, device, refusal)).await
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn reply(
        &self,
        message: &Message,
        refresh_path: bool,
        status: &'static str,
        payload: Bytes,
    ) {
        let Some(reply) = &message.reply else { return };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::STATUS_HEADER, status);
        let client = if refresh_path {
            &self.refresh_client
        } else {
            &self.client
        };
        if let Err(error) = client
            .publish_with_headers(reply.clone(), headers, payload)
            .await
        {
            tracing::warn!(%error, "cannot answer device");
        }
    }

    async fn accept(
        &self,
        message: &Message,
        parsed: Result<(DeviceId, &str), subjects::SubjectError>,
        received_at: DateTime<Utc>,
    ) -> Result<Answer, Refusal> {
        let (device, kind) = parsed.map_err(|e| Refusal::new(Code::Invalid, e.to_string()))?;
        let size = message.payload.len();
        if size > self.settings.max_payload {
            return Err(Refusal::new(
                Code::TooLarge,
                format!(
                    "payload is {size} bytes; at most {} are accepted",
                    self.settings.max_payload
                ),
            ));
        }
        let kind: MessageKind = kind
            .parse()
            .map_err(|e: devsync_types::model::UnknownValue| {
                Refusal::new(Code::UnknownKind, e.to_string())
            })?;
        if let Err(not_until) = self.limiter.check_key(&device) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(Refusal {
                retry_after: Some(wait),
                ..Refusal::new(
                    Code::RateLimited,
                    format!(
                        "device {device} exceeds {} messages/s; retry in {} ms",
                        self.settings.rate_per_device,
                        wait.as_millis()
                    ),
                )
            });
        }
        // Rare or large futures are boxed: every message in flight holds one task, and an
        // unboxed task is as large as its largest await point. A refresh's own query checks
        // the registration (the cache would query through the report path's pool).
        let registration = if kind == MessageKind::Refresh {
            Ok(Registration::Enabled)
        } else {
            Box::pin(self.registry.lookup(&device)).await
        };
        match registration {
            Ok(Registration::Enabled) => {}
            Ok(Registration::Disabled) => {
                return Err(Refusal::new(
                    Code::UnknownDevice,
                    format!("device {device} is disabled"),
                ));
            }
            Ok(Registration::Unknown) => {
                return Err(Refusal::new(
                    Code::UnknownDevice,
                    format!("device {device} is not registered"),
                ));
            }
            Err(error) => return Err(unavailable(format!("device registry: {error}"))),
        }
        match check_content(&device, kind, &message.payload)? {
            Checked::Report { mut report, state } => {
                if state.len() > self.settings.claim_check_threshold {
                    report.reported = Some(
                        Box::pin(blobs::store(&self.js, state))
                            .await
                            .map_err(|e| unavailable(format!("claim check: {e}")))?,
                    );
                }
                report.device_id = device.to_string();
                let request_id = RequestId::for_device_message(&device, kind, report.sequence);
                let request = sync_request(
                    &request_id,
                    &device,
                    received_at,
                    sync_request::Kind::Report(report),
                );
                self.enqueue(&device, request_id, request).await
            }
            Checked::Ack(mut ack) => {
                ack.device_id = device.to_string();
                let request_id = RequestId::for_device_message(&device, kind, ack.sequence);
                let causation = std::mem::take(&mut ack.causation_id);
                let mut request = sync_request(
                    &request_id,
                    &device,
                    received_at,
                    sync_request::Kind::Ack(ack),
                );
                request.causation_id = causation;
                self.enqueue(&device, request_id, request).await
            }
            Checked::CheckIn(checkin) => {
                self.checkins.seen(&device, received_at);
                Ok(Answer::Accepted(Accepted {
                    request_id: RequestId::for_device_message(&device, kind, checkin.sequence)
                        .to_string(),
                    duplicate: false,
                }))
            }
            Checked::Refresh(request) => {
                let started = Instant::now();
                let reply = Box::pin(refresh::answer(
                    &self.refresh_pool,
                    &device,
                    request.since_version,
                ))
                .await
                .map_err(|e| match e {
                    refresh::RefreshError::Unknown(_) | refresh::RefreshError::Disabled(_) => {
                        Refusal::new(Code::UnknownDevice, e.to_string())
                    }
                    refresh::RefreshError::Unavailable(_) => unavailable(e.to_string()),
                })?;
                // Only a registered, enabled device counts as seen.
                self.checkins.seen(&device, received_at);
                self.metrics
                    .refresh_seconds
                    .observe(started.elapsed().as_secs_f64());
                let request_id = RequestId::for_device_message(&device, kind, request.sequence);
                let record = self.auditor.record(
                    received_at,
                    Some(&device),
                    Some(&request_id),
                    "refresh",
                    "refresh.answered",
                    AuditOutcome::Ok,
                    json!({
                        "since": request.since_version,
                        "desired_version": reply.desired_version,
                        "kind": pb::refresh_reply::Kind::try_from(reply.kind)
                            .map(|k| k.as_str_name())
                            .unwrap_or("unknown"),
                    }),
                );
                self.audit(record);
                Ok(Answer::Refresh(reply))
            }
        }
    }

    async fn enqueue(
        &self,
        device: &DeviceId,
        request_id: RequestId,
        mut request: SyncRequest,
    ) -> Result<Answer, Refusal> {
        request.accepted_by = self.auditor.worker().to_string();
        let mut headers = HeaderMap::new();
        telemetry::inject(&mut headers);
        let outgoing = Outgoing {
            subject: subjects::request(Lane::Rt, device),
            msg_id: request_id.to_string(),
            payload: request.encode_to_vec().into(),
            headers: Some(headers),
        };
        let ack = publish::send(&self.js, outgoing)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .await
            .map_err(|e| unavailable(format!("request not stored: {e}")))?;
        // A stored request's outcome event (the reconciler's) names this worker as the one
        // that accepted it (`accepted_by`); only a device retry of a request already stored
        // ends here, so ingress records that itself. An acknowledgement that names the push
        // it answers joins that push's chain.
        if ack.duplicate {
            let action = match &request.kind {
                Some(sync_request::Kind::Ack(_)) => "ack.duplicate",
                _ => "report.duplicate",
            };
            let chain =
                RequestId::parse(request.causation_id.clone()).unwrap_or(request_id.clone());
            let mut record = self.auditor.record(
                Utc::now(),
                Some(device),
                Some(&chain),
                "ingress",
                action,
                AuditOutcome::Skipped,
                json!({
                    "reason": "a device retry of a request already stored",
                    "stream_sequence": ack.sequence,
                    "request": request_id.as_str(),
                }),
            );
            record.event_id = format!("{}/{request_id}", record.event_id);
            self.audit(record);
        }
        Ok(Answer::Accepted(Accepted {
            request_id: request_id.to_string(),
            duplicate: ack.duplicate,
        }))
    }

    fn audit(&self, record: devsync_types::AuditRecord) {
        self.audits.record(record);
    }

    async fn refuse(
        &self,
        message: &Message,
        refresh_path: bool,
        device: Option<DeviceId>,
        refusal: Refusal,
    ) {
        let code = refusal.code.as_str_name();
        self.metrics
            .refused
            .get_or_create(&CodeLabel { code })
            .inc();
        tracing::info!(
            device_id = device.as_ref().map(|d| d.as_str()).unwrap_or(""),
            subject = %message.subject,
            code,
            reason = %refusal.message,
            "device message refused"
        );
        let reply = ErrorReply {
            code: refusal.code as i32,
            message: refusal.message.clone(),
            retry_after_ms: refusal.retry_after.map_or(0, |d| d.as_millis() as u64),
        };
        self.reply(
            message,
            refresh_path,
            STATUS_ERROR,
            reply.encode_to_vec().into(),
        )
        .await;
        let audited = match (&device, refusal.code) {
            (Some(device), Code::RateLimited) => self.refusal_audits.check_key(device).is_ok(),
            _ => true,
        };
        if audited {
            let record = self.auditor.record(
                Utc::now(),
                device.as_ref(),
                None,
                "ingress",
                "message.refused",
                AuditOutcome::Rejected,
                json!({
                    "code": code,
                    "reason": refusal.message,
                    "subject": message.subject.as_str(),
                    "size": message.payload.len(),
                }),
            );
            self.audit(record);
        }
        if refusal.dead_letter {
            let original = dlq::Original {
                stream: "ingress",
                consumer: crate::ingress::QUEUE_GROUP,
                subject: message.subject.as_str(),
                stream_sequence: 0,
                delivery_count: 1,
                payload: &message.payload,
                headers: message.headers.as_ref(),
            };
            if let Err(error) = dlq::publish(&self.js, original, &refusal.message).await {
                tracing::error!(%error, "cannot dead-letter refused message");
            }
        }
    }
}

/// Whether `message` is a refresh (`devsync.in.<device>.refresh`).
fn is_refresh(message: &Message) -> bool {
    message
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .is_some_and(|kind| kind == MessageKind::Refresh.as_str())
}

/// A device message that passed every check on its content alone.
enum Checked {
    Report { report: DeviceReport, state: Bytes },
    Ack(DesiredAck),
    CheckIn(CheckIn),
    Refresh(RefreshRequest),
}

/// The checks that need nothing but the message: decode, identity, content. Pure, so fuzz
/// targets and property tests can drive it with anything.
fn check_content(
    device: &DeviceId,
    kind: MessageKind,
    payload: &Bytes,
) -> Result<Checked, Refusal> {
    match kind {
        MessageKind::Report => {
            let report: DeviceReport = decode(payload, kind)?;
            check_identity(device, &report.device_id)?;
            if report.sequence == 0 {
                return Err(Refusal::new(Code::Invalid, "sequence must be at least 1"));
            }
            let state = inline_state(report.reported.as_ref())?;
            state::check_object(&state)
                .map_err(|e| Refusal::new(Code::Invalid, format!("reported: {e}")))?;
            Ok(Checked::Report { report, state })
        }
        MessageKind::Ack => {
            let ack: DesiredAck = decode(payload, kind)?;
            check_identity(device, &ack.device_id)?;
            state::storable(&ack.error)
                .map_err(|why| Refusal::new(Code::Invalid, format!("error {why}")))?;
            if ack.desired_version == 0 {
                return Err(Refusal::new(
                    Code::Invalid,
                    "desired_version must be at least 1",
                ));
            }
            if !ack.causation_id.is_empty() && RequestId::parse(ack.causation_id.clone()).is_err() {
                return Err(Refusal::new(
                    Code::Invalid,
                    "causation_id is not a request id (1-200 printable characters)",
                ));
            }
            Ok(Checked::Ack(ack))
        }
        MessageKind::CheckIn => {
            let checkin: CheckIn = decode(payload, kind)?;
            check_identity(device, &checkin.device_id)?;
            Ok(Checked::CheckIn(checkin))
        }
        MessageKind::Refresh => {
            let request: RefreshRequest = decode(payload, kind)?;
            check_identity(device, &request.device_id)?;
            Ok(Checked::Refresh(request))
        }
    }
}

/// Runs every check a device message gets before anything else touches it — subject, size,
/// kind, decode, identity, content — without NATS or a database (the rate limit and the
/// registry are left out). `Err` carries the refusal's code and message. What the fuzz
/// targets (`fuzz/`) and the decoder property tests drive.
pub fn check_message(
    subject: &str,
    payload: &[u8],
    max_payload: usize,
) -> Result<(), (Code, String)> {
    let refused = |r: Refusal| (r.code, r.message);
    let (device, kind) = subjects::parse_ingress(subject)
        .map_err(|e| refused(Refusal::new(Code::Invalid, e.to_string())))?;
    if payload.len() > max_payload {
        return Err((
            Code::TooLarge,
            format!("payload is {} bytes", payload.len()),
        ));
    }
    let kind: MessageKind = kind
        .parse()
        .map_err(|e: devsync_types::model::UnknownValue| (Code::UnknownKind, e.to_string()))?;
    check_content(&device, kind, &Bytes::copy_from_slice(payload))
        .map(|_| ())
        .map_err(refused)
}

fn unavailable(message: String) -> Refusal {
    tracing::warn!(reason = %message, "ingress unavailable");
    Refusal {
        retry_after: Some(Duration::from_secs(1)),
        ..Refusal::new(Code::Unavailable, message)
    }
}

fn decode<M: devsync_proto::Message + Default>(
    payload: &Bytes,
    kind: MessageKind,
) -> Result<M, Refusal> {
    M::decode(payload.clone()).map_err(|e| Refusal {
        dead_letter: true,
        ..Refusal::new(
            Code::Undecodable,
            format!("payload is not a valid {kind} message: {e}"),
        )
    })
}

fn check_identity(device: &DeviceId, claimed: &str) -> Result<(), Refusal> {
    if claimed.is_empty() || claimed == device.as_str() {
        Ok(())
    } else {
        Err(Refusal::new(
            Code::WrongIdentity,
            format!("payload claims device {claimed:?} but was sent on device {device}'s subject"),
        ))
    }
}

fn inline_state(payload: Option<&Payload>) -> Result<Bytes, Refusal> {
    match payload.and_then(|p| p.body.as_ref()) {
        Some(payload::Body::InlineJson(bytes)) => Ok(bytes.clone()),
        Some(payload::Body::Blob(_)) => Err(Refusal::new(
            Code::Invalid,
            "devices send state inline; blob references are for internal use",
        )),
        None => Err(Refusal::new(Code::Invalid, "reported state is missing")),
    }
}

fn sync_request(
    request_id: &RequestId,
    device: &DeviceId,
    received_at: DateTime<Utc>,
    kind: sync_request::Kind,
) -> SyncRequest {
    SyncRequest {
        request_id: request_id.to_string(),
        device_id: device.to_string(),
        lane: pb::Lane::Rt as i32,
        received_at: Some(timestamp(received_at)),
        causation_id: String::new(),
        kind: Some(kind),
        reply_to: String::new(),
        accepted_by: String::new(),
    }
}

#[cfg(test)]
mod decoder_properties {
    //! The decoders against anything a device could send: no input panics, and structured
    //! inputs are refused exactly when they break a rule. (Coverage-guided fuzzing of the same
    //! function: `fuzz/`.)

    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 64 * 1024;

    fn subject(kind: &str) -> String {
        subjects::ingress_token(&DeviceId::parse("dev-1").unwrap(), kind)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_refusals_say_why(
            kind in prop_oneof!["report", "ack", "checkin", "refresh", "bogus"],
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            match check_message(&subject(&kind), &payload, MAX) {
                Ok(()) => prop_assert!(kind != "bogus"),
                Err((code, message)) => {
                    prop_assert!(!message.is_empty());
                    if kind == "bogus" {
                        prop_assert_eq!(code, Code::UnknownKind);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_subjects_never_panic(subject in ".{0,80}") {
            let result = check_message(&subject, &[], MAX);
            if result.is_ok() {
                prop_assert!(subject.starts_with("devsync.in."));
            }
        }

        #[test]
        fn a_report_is_accepted_exactly_when_it_follows_the_rules(
            claimed in prop_oneof![Just(String::new()), Just("dev-1".to_owned()), "[a-z0-9-]{1,12}"],
            sequence in prop_oneof![Just(0u64), any::<u64>()],
            body in prop_oneof![
                Just(None),
                Just(Some(b"{\"temp\": 21}".to_vec())),
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(Some),
                Just(Some(b"[1, 2]".to_vec())),
            ],
        ) {
            let report = DeviceReport {
                device_id: claimed.clone(),
                sequence,
                reported: body.clone().map(|bytes| Payload {
                    body: Some(payload::Body::InlineJson(bytes.into())),
                }),
                full: false,
                sent_at: None,
            };
            let result = check_message(&subject("report"), &report.encode_to_vec(), MAX);
            let is_object = body
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .is_some_and(|v| v.is_object());
            let valid = (claimed.is_empty() || claimed == "dev-1") && sequence > 0 && is_object;
            prop_assert_eq!(result.is_ok(), valid, "{:?}", result);
            if claimed != "dev-1" && !claimed.is_empty() {
                prop_assert_eq!(result.unwrap_err().0, Code::WrongIdentity);
            }
        }

        #[test]
        fn oversized_payloads_are_refused_before_decoding(extra in 1usize..1024) {
            let payload = vec![0u8; MAX + extra];
            let (code, _) = check_message(&subject("report"), &payload, MAX).unwrap_err();
            prop_assert_eq!(code, Code::TooLarge);
        }
    }
}
