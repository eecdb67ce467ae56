//! Every stream, consumer, KV bucket and object store name devsync uses. The topology in
//! `devsync-runtime` declares exactly these; services and tools refer to them only through
//! this module.

use crate::model::{Lane, Partition};

/// Sync requests for the reconciler (WorkQueue, partitioned by device).
pub const STREAM_REQ: &str = "DEVSYNC_REQ";
/// Pushes and campaign waves for the fan-out service (WorkQueue).
pub const STREAM_FANOUT: &str = "DEVSYNC_FANOUT";
/// Audit events of every service (WorkQueue, one shared consumer).
pub const STREAM_AUDIT: &str = "DEVSYNC_AUDIT";
/// Dead letters (limits retention, kept for inspection and replay).
pub const STREAM_DLQ: &str = "DEVSYNC_DLQ";
/// Captured JetStream max-deliveries advisories, which drive the DLQ sweeper.
pub const STREAM_ADVISORIES: &str = "DEVSYNC_ADVISORIES";

/// Every stream, in declaration order.
pub const ALL_STREAMS: [&str; 5] = [
    STREAM_REQ,
    STREAM_FANOUT,
    STREAM_AUDIT,
    STREAM_DLQ,
    STREAM_ADVISORIES,
];

/// The fan-out service's shared durable consumer on `DEVSYNC_FANOUT`.
pub const CONSUMER_FANOUT: &str = "fanout";
/// The fan-out service's webhook worker on `DEVSYNC_FANOUT` (`devsync.webhook.>`).
pub const CONSUMER_WEBHOOK: &str = "fanout-webhook";
/// The audit service's shared durable consumer on `DEVSYNC_AUDIT`.
pub const CONSUMER_AUDIT: &str = "audit";
/// The DLQ sweeper's consumer on `DEVSYNC_ADVISORIES`.
pub const CONSUMER_DLQ_SWEEPER: &str = "dlq-sweeper";
/// Priority group of the reconcile consumers: pinned-client, so one replica owns a partition.
pub const RECONCILE_GROUP: &str = "owner";

/// The consumer of one lane and partition of `DEVSYNC_REQ`: `reconcile-<lane>-<partition>`.
pub fn reconcile_consumer(lane: Lane, partition: Partition) -> String {
    format!("reconcile-{lane}-{partition}")
}

/// Last desired state per device (key = device id).
pub const KV_DESIRED: &str = "devsync-desired";
/// Reconciler membership and partition assignment; also scheduler leases.
pub const KV_MEMBERS: &str = "devsync-members";
/// Live settings an SRE can change (push policy, rollout rates).
pub const KV_CONFIG: &str = "devsync-config";
/// Key in [`KV_CONFIG`]: the global push policy (`push`, `push-active`, `pull-only`).
pub const CONFIG_PUSH_POLICY: &str = "push_policy";
/// Key in [`KV_MEMBERS`]: the lease of the requestor replica that runs scheduled jobs and
/// campaigns.
pub const LEASE_SCHEDULER: &str = "lease.scheduler";
/// Claim-check store for large payloads.
pub const OBJECT_BLOBS: &str = "devsync-blobs";

/// NATS micro service name of the audit search endpoint.
pub const AUDIT_SEARCH_SERVICE: &str = "devsync-audit";
