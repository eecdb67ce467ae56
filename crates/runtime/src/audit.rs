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

    /// The message that carries `records` to `DEVSYNC_AUDIT`: one `AuditBatch`, with a
    /// message id derived from its events so a re-publish is deduplicated. `None` when empty.
    pub fn message(&self, records: &[AuditRecord]) -> Option<Outgoing> {
        let (first, last) = (records.first()?, records.last()?);
        let batch = pb::AuditBatch {
            events: records.iter().map(pb::AuditEvent::from).collect(),
        };
        Some(Outgoing {
            subject: self.subject.clone(),
            msg_id: format!(
                "audit:{}:{}:{}",
                first.event_id,
                last.event_id,
                records.len()
            ),
            payload: batch.encode_to_vec().into(),
            headers: None,
        })
    }
}

/// The events a `DEVSYNC_AUDIT` message carries.
pub fn decode(payload: &[u8]) -> Result<Vec<pb::AuditEvent>, devsync_proto::prost::DecodeError> {
    pb::AuditBatch::decode(payload).map(|batch| batch.events)
}
