//! Every NATS subject devsync uses, built here and nowhere else.
//!
//! | subject | who publishes | who reads |
//! |---|---|---|
//! | `devsync.in.<device>.<kind>` | devices | the requestor's queue group |
//! | `devsync.req.<lane>.<device>` | requestor, reconciler (stages) | `DEVSYNC_REQ` (stored as `devsync.req.<lane>.<partition>.<device>`) -> reconciler |
//! | `devsync.fanout.push.<device>`, `devsync.fanout.wave.<campaign>` | reconciler, requestor | `DEVSYNC_FANOUT` -> fan-out |
//! | `devsync.audit.<service>` | every service | `DEVSYNC_AUDIT` -> audit |
//! | `devsync.dlq.<stream>` | worker loops, DLQ sweeper | `DEVSYNC_DLQ` -> operators |
//! | `devsync.out.<device>.desired` | fan-out | the device |
//! | `devsync.inbox.<device>.>` | services answering a device | the device (its own inbox prefix) |

use crate::CampaignId;
use crate::ids::{DeviceId, IdError, ServiceName};
use crate::model::{Lane, MessageKind, Partition, PartitionCount};

/// Root of every devsync subject.
pub const ROOT: &str = "devsync";

/// Everything devices publish (the requestor's queue-group subscription).
pub const INGRESS_ALL: &str = "devsync.in.>";
/// Everything the reconciler consumes, as published (before partitioning).
pub const REQUEST_INPUT: &str = "devsync.req.*.*";
/// Everything for the fan-out service's push worker (pushes and campaign batches).
pub const FANOUT_ALL: &str = "devsync.fanout.>";
/// Start of every push task's subject (`devsync.fanout.push.<device>`).
pub const FANOUT_PUSH_PREFIX: &str = "devsync.fanout.push.";
/// Start of every campaign batch's subject (`devsync.fanout.wave.<campaign>`).
pub const FANOUT_WAVE_PREFIX: &str = "devsync.fanout.wave.";
/// Every webhook delivery (the fan-out's HTTP worker; same stream, its own consumer).
pub const WEBHOOK_ALL: &str = "devsync.webhook.>";
/// Every audit event.
pub const AUDIT_ALL: &str = "devsync.audit.>";
/// Every dead letter.
pub const DLQ_ALL: &str = "devsync.dlq.>";
/// JetStream advisories raised when a message ran out of deliveries.
pub const MAX_DELIVERIES_ADVISORIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";

/// Reply header telling a device whether the payload is its answer (`ok`: `Accepted` or
/// `RefreshReply`) or an `ErrorReply` (`error`).
pub const STATUS_HEADER: &str = "Devsync-Status";
/// [`STATUS_HEADER`] value of an answer.
pub const STATUS_OK: &str = "ok";
/// [`STATUS_HEADER`] value of an `ErrorReply`.
pub const STATUS_ERROR: &str = "error";

/// Where `device` publishes messages of `kind`.
pub fn ingress(device: &DeviceId, kind: MessageKind) -> String {
    ingress_token(device, kind.as_str())
}

/// The ingress subject with any kind token, known or not (what a device may send anyway;
/// for tests and fuzzing of the ingress checks).
pub fn ingress_token(device: &DeviceId, kind: &str) -> String {
    format!("devsync.in.{device}.{kind}")
}

/// Every device's messages of `kind` (`devsync.in.*.<kind>`).
pub fn ingress_of_kind(kind: MessageKind) -> String {
    format!("devsync.in.*.{kind}")
}

/// Why an ingress subject could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {subject:?} is not of the form {expected}")]
    Shape {
        subject: String,
        expected: &'static str,
    },
    #[error("subject {subject:?}: {source}")]
    Device { subject: String, source: IdError },
    #[error("subject {subject:?}: partition {token:?} is not a number")]
    Partition { subject: String, token: String },
}

/// Splits `devsync.in.<device>.<kind>` into the device and the kind token. The kind is
/// returned raw so the caller can answer an unknown kind with its own clear error.
pub fn parse_ingress(subject: &str) -> Result<(DeviceId, &str), SubjectError> {
    let shape = || SubjectError::Shape {
        subject: subject.to_owned(),
        expected: "devsync.in.<device>.<kind>",
    };
    let mut tokens = subject.split('.');
    if tokens.next() != Some(ROOT) || tokens.next() != Some("in") {
        return Err(shape());
    }
    let (Some(device), Some(kind), None) = (tokens.next(), tokens.next(), tokens.next()) else {
        return Err(shape());
    };
    let device = DeviceId::parse(device).map_err(|source| SubjectError::Device {
        subject: subject.to_owned(),
        source,
    })?;
    Ok((device, kind))
}

/// Where a sync request about `device` is published.
pub fn request(lane: Lane, device: &DeviceId) -> String {
    format!("devsync.req.{lane}.{device}")
}

/// The `DEVSYNC_REQ` subject transform destination: it inserts the device's partition.
pub fn request_transform_destination(partitions: PartitionCount) -> String {
    format!(
        "devsync.req.{{{{wildcard(1)}}}}.{{{{partition({},2)}}}}.{{{{wildcard(2)}}}}",
        partitions.get()
    )
}

/// The filter of the consumer that owns `partition` of `lane`.
pub fn request_partition_filter(lane: Lane, partition: Partition) -> String {
    format!("devsync.req.{lane}.{partition}.*")
}

/// Splits a stored request subject `devsync.req.<lane>.<partition>.<device>`.
pub fn parse_request(subject: &str) -> Result<(Lane, Partition, DeviceId), SubjectError> {
    let shape = || SubjectError::Shape {
        subject: subject.to_owned(),
        expected: "devsync.req.<lane>.<partition>.<device>",
    };
    let tokens: Vec<&str> = subject.split('.').collect();
    let [ROOT, "req", lane, partition, device] = tokens[..] else {
        return Err(shape());
    };
    let lane: Lane = lane.parse().map_err(|_| shape())?;
    let partition =
        partition
            .parse::<u16>()
            .map(Partition)
            .map_err(|_| SubjectError::Partition {
                subject: subject.to_owned(),
                token: partition.to_owned(),
            })?;
    let device = DeviceId::parse(device).map_err(|source| SubjectError::Device {
        subject: subject.to_owned(),
        source,
    })?;
    Ok((lane, partition, device))
}

/// A push of new desired state for `device`, to the fan-out service.
pub fn fanout_push(device: &DeviceId) -> String {
    format!("{FANOUT_PUSH_PREFIX}{device}")
}

/// A batch of a campaign's devices, to the fan-out service.
pub fn fanout_wave(campaign: &CampaignId) -> String {
    format!("{FANOUT_WAVE_PREFIX}{campaign}")
}

/// One webhook delivery to `device`'s endpoint, for the fan-out's HTTP worker.
pub fn webhook(device: &DeviceId) -> String {
    format!("devsync.webhook.{device}")
}

/// Where `service` publishes its audit events.
pub fn audit(service: ServiceName) -> String {
    format!("devsync.audit.{service}")
}

/// Where dead letters from `stream` go: `devsync.dlq.<stream in lowercase>`.
pub fn dlq(stream: &str) -> String {
    format!("devsync.dlq.{}", stream.to_ascii_lowercase())
}

/// The JetStream advisory raised when `consumer` of `stream` ran out of deliveries.
pub fn max_deliveries_advisory(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// The JetStream direct-get subject that reads `key` from KV bucket `bucket` (what a device
/// may use to read its own last desired state without stream-info rights).
pub fn kv_direct_get(bucket: &str, key: &str) -> String {
    format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}")
}

/// Where the fan-out notifies `device` of a new desired version.
pub fn device_desired(device: &DeviceId) -> String {
    format!("devsync.out.{device}.desired")
}

/// Every device's desired-state notifications (for monitoring; a device reads only its own).
pub const DEVICE_DESIRED_ALL: &str = "devsync.out.*.desired";

/// The inbox prefix a device uses for request/reply, so no device can read another's replies.
pub fn device_inbox_prefix(device: &DeviceId) -> String {
    format!("devsync.inbox.{device}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn ingress_round_trip() {
        let s = ingress(&dev("d-1"), MessageKind::Report);
        assert_eq!(s, "devsync.in.d-1.report");
        let (device, kind) = parse_ingress(&s).unwrap();
        assert_eq!(device, dev("d-1"));
        assert_eq!(kind, "report");
        assert!(parse_ingress("devsync.in.d-1").is_err());
        assert!(parse_ingress("devsync.in.d-1.report.extra").is_err());
        assert!(parse_ingress("other.in.d-1.report").is_err());
    }

    #[test]
    fn request_subjects() {
        assert_eq!(request(Lane::Rt, &dev("x")), "devsync.req.rt.x");
        assert_eq!(
            request_partition_filter(Lane::Bulk, Partition(7)),
            "devsync.req.bulk.7.*"
        );
        assert_eq!(
            request_transform_destination(PartitionCount::new(64).unwrap()),
            "devsync.req.{{wildcard(1)}}.{{partition(64,2)}}.{{wildcard(2)}}"
        );
        let (lane, partition, device) = parse_request("devsync.req.rt.12.abc").unwrap();
        assert_eq!(
            (lane, partition, device),
            (Lane::Rt, Partition(12), dev("abc"))
        );
        assert!(parse_request("devsync.req.rt.x.abc").is_err());
        assert!(parse_request("devsync.req.zz.1.abc").is_err());
    }

    #[test]
    fn other_subjects() {
        assert_eq!(dlq("DEVSYNC_REQ"), "devsync.dlq.devsync_req");
        assert_eq!(audit(ServiceName::Fanout), "devsync.audit.fanout");
        assert_eq!(device_desired(&dev("a")), "devsync.out.a.desired");
        assert_eq!(webhook(&dev("a")), "devsync.webhook.a");
        assert_eq!(
            fanout_wave(&CampaignId::parse("c1").unwrap()),
            "devsync.fanout.wave.c1"
        );
        assert_eq!(device_inbox_prefix(&dev("a")), "devsync.inbox.a");
    }
}
