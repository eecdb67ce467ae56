//! devsync's domain types, and the only place where subjects and asset names are spelled.
//!
//! - [`ids`]: `DeviceId` (parsed so it is always a safe single NATS subject token), `RequestId`,
//!   `WorkerId`, `CampaignId`.
//! - [`model`]: lanes, partitions, versions, message kinds, push policy, audit outcomes.
//! - [`subjects`]: every NATS subject devsync publishes or subscribes to.
//! - [`names`]: every stream, consumer, KV bucket and object store name.
//! - [`convert`]: `TryFrom` between the prost types of `devsync-proto` and these types.
//!
//! Parse, don't validate later: a `DeviceId` that exists is valid, so code holding one never
//! has to ask again whether it can be put into a subject.

pub mod convert;
pub mod ids;
pub mod model;
pub mod names;
pub mod state;
pub mod subjects;

pub use convert::ConvertError;
pub use ids::{CampaignId, DeviceId, IdError, RequestId, ServiceName, WorkerId};
pub use model::{
    AuditOutcome, AuditRecord, Lane, MessageKind, Partition, PartitionCount, PushPolicy, Version,
};
