//! Conversions between the wire types of `devsync-proto` and the domain types of this crate.
//! Decoding code calls `try_into()` once at the edge and works on domain types afterwards.

use chrono::{DateTime, Utc};
use devsync_proto::v1 as pb;

use crate::ids::{DeviceId, IdError, RequestId, WorkerId};
use crate::model::{AuditOutcome, AuditRecord, Lane, PushPolicy};

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("field {field} is missing")]
    Missing { field: &'static str },
    #[error("field {field} has the unknown value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("field {field}: {source}")]
    Id {
        field: &'static str,
        source: IdError,
    },
    #[error("field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConvertError {
    fn id(field: &'static str) -> impl FnOnce(IdError) -> Self {
        move |source| Self::Id { field, source }
    }
}

impl TryFrom<pb::Lane> for Lane {
    type Error = ConvertError;
    fn try_from(lane: pb::Lane) -> Result<Self, Self::Error> {
        match lane {
            pb::Lane::Rt => Ok(Lane::Rt),
            pb::Lane::Bulk => Ok(Lane::Bulk),
            pb::Lane::Unspecified => Err(ConvertError::Missing { field: "lane" }),
        }
    }
}

impl From<Lane> for pb::Lane {
    fn from(lane: Lane) -> Self {
        match lane {
            Lane::Rt => pb::Lane::Rt,
            Lane::Bulk => pb::Lane::Bulk,
        }
    }
}

/// The domain policy of a wire policy; `Unspecified` means "use the global policy" (`None`).
pub fn push_policy(policy: pb::PushPolicy) -> Option<PushPolicy> {
    match policy {
        pb::PushPolicy::Unspecified => None,
        pb::PushPolicy::Push => Some(PushPolicy::Push),
        pb::PushPolicy::PushActive => Some(PushPolicy::PushActive),
        pb::PushPolicy::PullOnly => Some(PushPolicy::PullOnly),
    }
}

impl From<PushPolicy> for pb::PushPolicy {
    fn from(policy: PushPolicy) -> Self {
        match policy {
            PushPolicy::Push => pb::PushPolicy::Push,
            PushPolicy::PushActive => pb::PushPolicy::PushActive,
            PushPolicy::PullOnly => pb::PushPolicy::PullOnly,
        }
    }
}

impl TryFrom<pb::Outcome> for AuditOutcome {
    type Error = ConvertError;
    fn try_from(outcome: pb::Outcome) -> Result<Self, Self::Error> {
        Ok(match outcome {
            pb::Outcome::Ok => AuditOutcome::Ok,
            pb::Outcome::Rejected => AuditOutcome::Rejected,
            pb::Outcome::Retry => AuditOutcome::Retry,
            pb::Outcome::Failed => AuditOutcome::Failed,
            pb::Outcome::Skipped => AuditOutcome::Skipped,
            pb::Outcome::Unspecified => return Err(ConvertError::Missing { field: "outcome" }),
        })
    }
}

impl From<AuditOutcome> for pb::Outcome {
    fn from(outcome: AuditOutcome) -> Self {
        match outcome {
            AuditOutcome::Ok => pb::Outcome::Ok,
            AuditOutcome::Rejected => pb::Outcome::Rejected,
            AuditOutcome::Retry => pb::Outcome::Retry,
            AuditOutcome::Failed => pb::Outcome::Failed,
            AuditOutcome::Skipped => pb::Outcome::Skipped,
        }
    }
}

/// A protobuf timestamp from a UTC time.
pub fn timestamp(at: DateTime<Utc>) -> devsync_proto::Timestamp {
    devsync_proto::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A UTC time from a protobuf timestamp; `None` when out of range.
pub fn from_timestamp(ts: &devsync_proto::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

fn optional<T>(
    value: String,
    parse: impl FnOnce(String) -> Result<T, IdError>,
    field: &'static str,
) -> Result<Option<T>, ConvertError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse(value).map(Some).map_err(ConvertError::id(field))
}

impl TryFrom<pb::AuditEvent> for AuditRecord {
    type Error = ConvertError;
    fn try_from(event: pb::AuditEvent) -> Result<Self, Self::Error> {
        if event.event_id.is_empty() {
            return Err(ConvertError::Missing { field: "event_id" });
        }
        let outcome =
            pb::Outcome::try_from(event.outcome).map_err(|_| ConvertError::UnknownEnum {
                field: "outcome",
                value: event.outcome,
            })?;
        let at = event
            .at
            .as_ref()
            .ok_or(ConvertError::Missing { field: "at" })
            .and_then(|ts| {
                from_timestamp(ts).ok_or(ConvertError::Invalid {
                    field: "at",
                    reason: "timestamp out of range".into(),
                })
            })?;
        let details = if event.details_json.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(&event.details_json).map_err(|e| ConvertError::Invalid {
                field: "details_json",
                reason: e.to_string(),
            })?
        };
        Ok(AuditRecord {
            event_id: event.event_id,
            at,
            device_id: optional(event.device_id, DeviceId::parse, "device_id")?,
            worker_id: event
                .worker_id
                .parse::<WorkerId>()
                .map_err(ConvertError::id("worker_id"))?,
            request_id: optional(event.request_id, RequestId::parse, "request_id")?,
            stage: event.stage,
            action: event.action,
            outcome: outcome.try_into()?,
            details,
            trace_id: (!event.trace_id.is_empty()).then_some(event.trace_id),
        })
    }
}

impl From<&AuditRecord> for pb::AuditEvent {
    fn from(record: &AuditRecord) -> Self {
        pb::AuditEvent {
            event_id: record.event_id.clone(),
            at: Some(timestamp(record.at)),
            device_id: record
                .device_id
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            worker_id: record.worker_id.to_string(),
            request_id: record
                .request_id
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            stage: record.stage.clone(),
            action: record.action.clone(),
            outcome: pb::Outcome::from(record.outcome) as i32,
            details_json: serde_json::to_vec(&record.details)
                .unwrap_or_default()
                .into(),
            trace_id: record.trace_id.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServiceName;

    #[test]
    fn audit_record_round_trips() {
        let record = AuditRecord {
            event_id: "e1".into(),
            at: DateTime::from_timestamp(1_700_000_000, 5).unwrap(),
            device_id: Some(DeviceId::parse("d1").unwrap()),
            worker_id: WorkerId::new(ServiceName::Reconciler, "pod-1").unwrap(),
            request_id: Some(RequestId::parse("r1").unwrap()),
            stage: "reconcile".into(),
            action: "report.applied".into(),
            outcome: AuditOutcome::Ok,
            details: serde_json::json!({"version": 3}),
            trace_id: None,
        };
        let wire = pb::AuditEvent::from(&record);
        assert_eq!(AuditRecord::try_from(wire).unwrap(), record);
    }

    #[test]
    fn audit_record_rejects_bad_fields() {
        let mut wire = pb::AuditEvent {
            event_id: "e".into(),
            at: Some(timestamp(Utc::now())),
            worker_id: "audit/x".into(),
            outcome: 1,
            device_id: "bad device".into(),
            ..Default::default()
        };
        let err = AuditRecord::try_from(wire.clone()).unwrap_err().to_string();
        assert!(err.starts_with("field device_id: device id"), "{err}");
        wire.device_id.clear();
        wire.outcome = 99;
        let err = AuditRecord::try_from(wire).unwrap_err().to_string();
        assert_eq!(err, "field outcome has the unknown value 99");
    }
}
