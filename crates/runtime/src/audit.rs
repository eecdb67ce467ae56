//! Audit events, made the same way by every service. An event names the worker (service and
//! instance), device, request, stage, action and outcome, carries the current trace id, and has
//! a deterministic id when it belongs to a request, so the same action audited twice (a
//! redelivery, an outbox re-publish) is stored once.

use chrono::{DateTime, Utc};
use devsync_proto::Message as _;
use devsync_proto::v1 as pb;
use devsync_types::{AuditOutcome, AuditRecord, DeviceId, RequestId, WorkerId, subjects};
use serde_json::Value;

use crate::publish::Outgoing;
use crate::telemetry;

/// Makes audit events for one worker.
#[derive(Debug, Clone)]
pub struct Auditor {
    worker: WorkerId,
    subject: String,
}

impl Auditor {
    /// An auditor for `worker`, publishing on `devsync.audit.<service>`.
    pub fn new(worker: WorkerId) -> Self {
        let subject = subjects::audit(worker.service());
        Self { worker, subject }
    }

    /// The worker this auditor speaks for.
    pub fn worker(&self) -> &WorkerId {
        &self.worker
    }

    /// An event about `device` / `request`, at `at`, in the current span's trace.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        at: DateTime<Utc>,
        device: Option<&DeviceId>,
        request: Option<&RequestId>,
        stage: &str,
        action: &str,
        outcome: AuditOutcome,
        details: Value,
    ) -> AuditRecord {
        let event_id = match request {
            Some(request) => format!("{request}/{stage}/{action}"),
            None => uuid::Uuid::now_v7().to_string(),
        };
        AuditRecord {
            event_id,
            at,
            device_id: device.cloned(),
            worker_id: self.worker.clone(),
            request_id: request.cloned(),
            stage: stage.to_owned(),
            action: action.to_owned(),
            outcome,
            details,
            trace_id: telemetry::trace_id(&tracing::Span::current()),
        }
    }

    /// The messages that carry `records` to `DEVSYNC_AUDIT`: `AuditBatch`es of at most
    /// [`EVENTS_PER_MESSAGE`] events (so a batch never nears the message size limit), each
    /// with a message id derived from its events so a re-publish is deduplicated. Empty when
    /// there is nothing to record.
    pub fn message(&self, records: &[AuditRecord]) -> Vec<Outgoing> {
        records
            .chunks(EVENTS_PER_MESSAGE)
            .map(|chunk| {
                let (first, last) = (&chunk[0], &chunk[chunk.len() - 1]);
                let batch = pb::AuditBatch {
                    events: chunk.iter().map(pb::AuditEvent::from).collect(),
                };
                Outgoing {
                    subject: self.subject.clone(),
                    msg_id: format!("audit:{}:{}:{}", first.event_id, last.event_id, chunk.len()),
                    payload: batch.encode_to_vec().into(),
                    headers: None,
                }
            })
            .collect()
    }
}

/// Collects audit records from many tasks and publishes them in few messages (up to
/// [`EVENTS_PER_MESSAGE`] each, at least every 20 ms while there are any), for paths that
/// record one event per device message, where a message per event would cost more than the
/// work it records.
#[derive(Debug, Clone)]
pub struct Sink {
    tx: tokio::sync::mpsc::UnboundedSender<AuditRecord>,
}

impl Sink {
    /// Starts the publishing task; it flushes what is queued and ends at `shutdown`.
    pub fn spawn(
        js: async_nats::jetstream::Context,
        auditor: Auditor,
        shutdown: crate::Shutdown,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AuditRecord>();
        let task = tokio::spawn(async move {
            let mut buffer = Vec::with_capacity(EVENTS_PER_MESSAGE);
            loop {
                let stopping = tokio::select! {
                    record = rx.recv() => match record {
                        Some(record) => { buffer.push(record); false }
                        None => true,
                    },
                    _ = shutdown.cancelled() => true,
                };
                if !stopping {
                    let deadline =
                        tokio::time::Instant::now() + std::time::Duration::from_millis(20);
                    while buffer.len() < EVENTS_PER_MESSAGE * 4 {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(record)) => buffer.push(record),
                            _ => break,
                        }
                    }
                } else {
                    while let Ok(record) = rx.try_recv() {
                        buffer.push(record);
                    }
                }
                if !buffer.is_empty()
                    && let Err(error) =
                        crate::publish::publish_all(&js, auditor.message(&buffer)).await
                {
                    tracing::warn!(%error, events = buffer.len(), "cannot publish audit events");
                }
                buffer.clear();
                if stopping {
                    break;
                }
            }
        });
        (Self { tx }, task)
    }

    /// Queues `record` for publishing.
    pub fn record(&self, record: AuditRecord) {
        let _ = self.tx.send(record);
    }
}

/// Most events in one `DEVSYNC_AUDIT` message.
pub const EVENTS_PER_MESSAGE: usize = 500;

/// The events a `DEVSYNC_AUDIT` message carries.
pub fn decode(payload: &[u8]) -> Result<Vec<pb::AuditEvent>, devsync_proto::prost::DecodeError> {
    pb::AuditBatch::decode(payload).map(|batch| batch.events)
}
