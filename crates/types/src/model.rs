//! Small domain values: lanes, partitions, versions, device message kinds, push policy and
//! the audit record every service emits.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, RequestId, WorkerId};

/// A value that is not one of the accepted words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not one of {expected}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Work lane of a sync request. `Rt` is served before `Bulk` with a weighted share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Device-driven work and single admin edits.
    Rt,
    /// Campaigns and periodic sweeps.
    Bulk,
}

impl Lane {
    /// Both lanes, `rt` first.
    pub const ALL: [Lane; 2] = [Lane::Rt, Lane::Bulk];

    /// The lane's subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rt => "rt",
            Self::Bulk => "bulk",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lane {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rt" => Ok(Self::Rt),
            "bulk" => Ok(Self::Bulk),
            _ => Err(UnknownValue {
                what: "lane",
                value: s.to_owned(),
                expected: "rt, bulk",
            }),
        }
    }
}

/// How many partitions `DEVSYNC_REQ` is split into. Fixed at bootstrap: changing it re-maps
/// devices to partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct PartitionCount(u16);

impl PartitionCount {
    /// The largest supported count (one consumer per lane and partition).
    pub const MAX: u16 = 1024;

    /// A partition count in `1..=1024`.
    pub fn new(count: u16) -> Result<Self, String> {
        if count == 0 || count > Self::MAX {
            return Err(format!(
                "partition count must be between 1 and {}, got {count}",
                Self::MAX
            ));
        }
        Ok(Self(count))
    }

    /// The count.
    pub fn get(self) -> u16 {
        self.0
    }

    /// Every partition, in order.
    pub fn all(self) -> impl Iterator<Item = Partition> {
        (0..self.0).map(Partition)
    }

    /// The partition a device belongs to. Identical to the NATS subject-mapping function
    /// `partition(n, token)`, which hashes the token with 32-bit FNV-1a, so the stream's
    /// subject transform and this function always agree.
    pub fn of(self, device: &DeviceId) -> Partition {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in device.as_str().bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        Partition((hash % u32::from(self.0)) as u16)
    }
}

/// 16 by default: measured on the 2-core machine, 16 partitions (32 consumers) sustain about
/// 50% more reports/s than 64 (128 consumers), because nats-server checks every consumer of a
/// WorkQueue stream on each ack; 8 is no faster than 16. Sixteen partitions allow up to 16
/// active reconciler replicas.
impl Default for PartitionCount {
    fn default() -> Self {
        Self(16)
    }
}

impl TryFrom<u16> for PartitionCount {
    type Error = String;
    fn try_from(value: u16) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<PartitionCount> for u16 {
    fn from(count: PartitionCount) -> Self {
        count.0
    }
}

/// One partition of `DEVSYNC_REQ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Partition(pub u16);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A monotonic per-device document version (desired or reported). 0 means "nothing yet".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Version(pub u64);

impl Version {
    /// The version after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a device can publish: the last token of `devsync.in.<device>.<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// Reported state (`DeviceReport`).
    Report,
    /// Liveness (`CheckIn`).
    CheckIn,
    /// What changed since a version (`RefreshRequest`).
    Refresh,
    /// A desired version was applied (`DesiredAck`).
    Ack,
}

impl MessageKind {
    /// Every kind.
    pub const ALL: [MessageKind; 4] = [Self::Report, Self::CheckIn, Self::Refresh, Self::Ack];

    /// The kind's subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::CheckIn => "checkin",
            Self::Refresh => "refresh",
            Self::Ack => "ack",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageKind {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownValue {
                what: "message kind",
                value: s.to_owned(),
                expected: "report, checkin, refresh, ack",
            })
    }
}

/// How a desired-state change reaches devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushPolicy {
    /// Every targeted device gets a push.
    #[default]
    Push,
    /// Only devices seen within the active window get a push; the rest pull on wake-up.
    PushActive,
    /// Nothing is pushed; devices load updates only when they read.
    PullOnly,
}

impl PushPolicy {
    /// The policy's name as written in config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::PushActive => "push-active",
            Self::PullOnly => "pull-only",
        }
    }
}

impl fmt::Display for PushPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PushPolicy {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "push" => Ok(Self::Push),
            "push-active" => Ok(Self::PushActive),
            "pull-only" => Ok(Self::PullOnly),
            _ => Err(UnknownValue {
                what: "push policy",
                value: s.to_owned(),
                expected: "push, push-active, pull-only",
            }),
        }
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    Ok,
    Rejected,
    Retry,
    Failed,
    Skipped,
}

impl AuditOutcome {
    /// The outcome as stored and searched.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Retry => "retry",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditOutcome {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ok" => Ok(Self::Ok),
            "rejected" => Ok(Self::Rejected),
            "retry" => Ok(Self::Retry),
            "failed" => Ok(Self::Failed),
            "skipped" => Ok(Self::Skipped),
            _ => Err(UnknownValue {
                what: "outcome",
                value: s.to_owned(),
                expected: "ok, rejected, retry, failed, skipped",
            }),
        }
    }
}

/// One audited action, in domain terms (the audit service stores these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Deterministic id: the same action audited twice has the same id.
    pub event_id: String,
    /// When the action happened.
    pub at: DateTime<Utc>,
    /// The device concerned, if any.
    pub device_id: Option<DeviceId>,
    /// Who acted.
    pub worker_id: WorkerId,
    /// The request the action belongs to, if any.
    pub request_id: Option<RequestId>,
    /// Pipeline stage.
    pub stage: String,
    /// What was done.
    pub action: String,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// Free-form details (a JSON object).
    pub details: serde_json::Value,
    /// W3C trace id, if the action ran in a trace.
    pub trace_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_fnv1a_mod_n() {
        let count = PartitionCount::new(64).unwrap();
        // FNV-1a("a") = 0xe40c292c
        let a = DeviceId::parse("a").unwrap();
        assert_eq!(count.of(&a), Partition((0xe40c_292c_u32 % 64) as u16));
        assert!(PartitionCount::new(0).is_err());
        assert!(PartitionCount::new(1025).is_err());
    }

    #[test]
    fn words_round_trip() {
        for lane in Lane::ALL {
            assert_eq!(lane.as_str().parse::<Lane>().unwrap(), lane);
        }
        for kind in MessageKind::ALL {
            assert_eq!(kind.as_str().parse::<MessageKind>().unwrap(), kind);
        }
        let err = "reboot".parse::<MessageKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            "message kind \"reboot\" is not one of report, checkin, refresh, ack"
        );
        assert_eq!(
            "push-active".parse::<PushPolicy>().unwrap(),
            PushPolicy::PushActive
        );
    }
}
