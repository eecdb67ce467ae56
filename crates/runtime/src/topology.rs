//! The JetStream topology of DESIGN.md, declared in one place.
//!
//! [`Topology`] knows every stream, consumer, KV bucket and object store devsync needs and their
//! settings. [`Topology::declare`] creates what is missing, leaves what matches alone (a second
//! declaration changes nothing), corrects settings the server can change in place, and reports
//! drift it cannot correct (retention, storage) instead of destroying data.
//! [`Topology::verify`] does the same comparison without changing anything.
//!
//! Choices worth knowing:
//! - Device ingress (`devsync.in.>`) is served by the requestor's queue group and becomes
//!   durable in `DEVSYNC_REQ`; no stream captures it (see the requestor's crate docs for why),
//!   so a device that asks with request/reply gets devsync's own answer, not a stream ack.
//! - `DEVSYNC_REQ` partitions by device with a subject transform; one consumer per lane and
//!   partition, pinned-client priority group, so one reconciler replica owns a partition.
//! - No consumer sets `backoff`: it would replace `ack_wait`; workers nak with explicit delays.
//! - Max-delivery advisories of the work streams are captured in `DEVSYNC_ADVISORIES`, so the
//!   DLQ sweeper can move messages that exhausted their deliveries (they otherwise stay stuck in
//!   a WorkQueue stream).

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PriorityPolicy};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{
    self, DiscardPolicy, RetentionPolicy, StorageType, SubjectTransform,
};
use async_nats::jetstream::{self, ErrorCode, kv, object_store};
use devsync_types::{Lane, names, subjects};

use crate::config::{StorageKind, TopologySettings};

/// What kind of asset a report line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    Stream,
    Consumer,
    KeyValue,
    ObjectStore,
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stream => "stream",
            Self::Consumer => "consumer",
            Self::KeyValue => "kv",
            Self::ObjectStore => "object store",
        })
    }
}

/// One setting that differs between the declaration and the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Setting name, as in the JetStream API.
    pub field: &'static str,
    /// Declared value.
    pub want: String,
    /// Value on the server.
    pub have: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: want {}, have {}", self.field, self.want, self.have)
    }
}

/// What declaring (or verifying) an asset did or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It exists with the declared settings.
    Unchanged,
    /// It existed with other settings, which were corrected in place.
    Updated(Vec<Difference>),
    /// It exists with settings that cannot be changed in place; left alone.
    Drifted(Vec<Difference>),
    /// It does not exist (verify only).
    Missing,
}

/// One line of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetReport {
    pub kind: AssetKind,
    /// Asset name; consumers are `<stream>/<consumer>`.
    pub name: String,
    pub action: Action,
}

/// The result of [`Topology::declare`] or [`Topology::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub assets: Vec<AssetReport>,
}

impl Report {
    /// Whether anything was created or updated.
    pub fn changed(&self) -> bool {
        self.assets
            .iter()
            .any(|a| matches!(a.action, Action::Created | Action::Updated(_)))
    }

    /// Assets that are missing or drifted: the topology is not as declared.
    pub fn problems(&self) -> impl Iterator<Item = &AssetReport> {
        self.assets
            .iter()
            .filter(|a| matches!(a.action, Action::Drifted(_) | Action::Missing))
    }

    /// Counts of (created, unchanged, updated, drifted, missing).
    pub fn counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for asset in &self.assets {
            let index = match asset.action {
                Action::Created => 0,
                Action::Unchanged => 1,
                Action::Updated(_) => 2,
                Action::Drifted(_) => 3,
                Action::Missing => 4,
            };
            counts[index] += 1;
        }
        counts
    }
}

/// A JetStream call that failed while declaring or verifying.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name}: {message}")]
pub struct TopologyError {
    pub kind: AssetKind,
    pub name: String,
    pub message: String,
}

impl TopologyError {
    fn new(kind: AssetKind, name: &str, error: impl fmt::Display) -> Self {
        Self {
            kind,
            name: name.to_owned(),
            message: error.to_string(),
        }
    }
}

/// Every JetStream asset devsync uses, with its settings.
#[derive(Debug, Clone)]
pub struct Topology {
    settings: TopologySettings,
}

/// The streams whose consumers can run out of deliveries (they feed the DLQ sweeper).
const WORK_STREAMS: [&str; 3] = [names::STREAM_REQ, names::STREAM_FANOUT, names::STREAM_AUDIT];

impl Topology {
    /// The topology for these settings.
    pub fn new(settings: TopologySettings) -> Self {
        Self { settings }
    }

    /// The settings it was made from.
    pub fn settings(&self) -> &TopologySettings {
        &self.settings
    }

    fn storage(&self) -> StorageType {
        match self.settings.storage {
            StorageKind::File => StorageType::File,
            StorageKind::Memory => StorageType::Memory,
        }
    }

    fn work_stream(&self, name: &str, subjects: Vec<String>) -> stream::Config {
        let s = &self.settings;
        stream::Config {
            name: name.to_owned(),
            subjects,
            retention: RetentionPolicy::WorkQueue,
            storage: self.storage(),
            num_replicas: s.replicas,
            max_age: s.max_age,
            duplicate_window: s.duplicate_window,
            max_message_size: s.max_message_size,
            discard: DiscardPolicy::New,
            ..Default::default()
        }
    }

    /// Every stream, in declaration order.
    pub fn streams(&self) -> Vec<stream::Config> {
        let s = &self.settings;
        let requests = stream::Config {
            description: Some("sync requests, partitioned by device, lanes rt and bulk".into()),
            subject_transform: Some(SubjectTransform {
                source: subjects::REQUEST_INPUT.into(),
                destination: subjects::request_transform_destination(s.partitions),
            }),
            allow_message_ttl: true,
            ..self.work_stream(names::STREAM_REQ, vec![subjects::REQUEST_INPUT.into()])
        };
        let fanout = stream::Config {
            description: Some("device pushes and campaign waves for the fan-out".into()),
            ..self.work_stream(
                names::STREAM_FANOUT,
                vec![subjects::FANOUT_ALL.into(), subjects::WEBHOOK_ALL.into()],
            )
        };
        let audit = stream::Config {
            description: Some("audit events of every service".into()),
            ..self.work_stream(names::STREAM_AUDIT, vec![subjects::AUDIT_ALL.into()])
        };
        let dlq = stream::Config {
            name: names::STREAM_DLQ.into(),
            description: Some("dead letters: original message, sequence, deliveries, error".into()),
            subjects: vec![subjects::DLQ_ALL.into()],
            retention: RetentionPolicy::Limits,
            storage: self.storage(),
            num_replicas: s.replicas,
            max_age: s.dlq_max_age,
            duplicate_window: s.duplicate_window,
            max_message_size: s.max_message_size.saturating_add(64 * 1024),
            allow_direct: true,
            ..Default::default()
        };
        let advisories = stream::Config {
            description: Some("max-deliveries advisories of the work streams".into()),
            ..self.work_stream(
                names::STREAM_ADVISORIES,
                WORK_STREAMS
                    .iter()
                    .map(|stream| subjects::max_deliveries_advisory(stream, "*"))
                    .collect(),
            )
        };
        vec![requests, fanout, audit, dlq, advisories]
    }

    fn durable(&self, name: &str, filter: &str) -> consumer::pull::Config {
        let s = &self.settings;
        consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: s.ack_wait,
            max_deliver: s.max_deliver,
            max_ack_pending: s.max_ack_pending,
            ..Default::default()
        }
    }

    /// Every consumer, with the stream it belongs to.
    pub fn consumers(&self) -> Vec<(&'static str, consumer::pull::Config)> {
        let mut consumers = vec![
            (
                names::STREAM_FANOUT,
                self.durable(names::CONSUMER_FANOUT, subjects::FANOUT_ALL),
            ),
            (
                names::STREAM_FANOUT,
                self.durable(names::CONSUMER_WEBHOOK, subjects::WEBHOOK_ALL),
            ),
            (
                names::STREAM_AUDIT,
                self.durable(names::CONSUMER_AUDIT, subjects::AUDIT_ALL),
            ),
            (
                names::STREAM_ADVISORIES,
                consumer::pull::Config {
                    filter_subject: String::new(),
                    ..self.durable(names::CONSUMER_DLQ_SWEEPER, "")
                },
            ),
        ];
        for lane in Lane::ALL {
            for partition in self.settings.partitions.all() {
                let name = names::reconcile_consumer(lane, partition);
                let filter = subjects::request_partition_filter(lane, partition);
                consumers.push((
                    names::STREAM_REQ,
                    consumer::pull::Config {
                        priority_policy: PriorityPolicy::PinnedClient,
                        priority_groups: vec![names::RECONCILE_GROUP.into()],
                        priority_timeout: self.settings.pin_timeout,
                        ..self.durable(&name, &filter)
                    },
                ));
            }
        }
        consumers
    }

    /// Every KV bucket.
    pub fn key_values(&self) -> Vec<kv::Config> {
        let s = &self.settings;
        let bucket = |name: &str, description: &str, history: i64, max_age: Duration| kv::Config {
            bucket: name.into(),
            description: description.into(),
            history,
            max_age,
            storage: self.storage(),
            num_replicas: s.replicas,
            max_value_size: s.max_message_size,
            ..Default::default()
        };
        vec![
            bucket(
                names::KV_DESIRED,
                "last desired state per device",
                1,
                Duration::ZERO,
            ),
            bucket(
                names::KV_MEMBERS,
                "reconciler membership, partition assignment, leases",
                1,
                s.member_ttl,
            ),
            bucket(names::KV_CONFIG, "live settings", 10, Duration::ZERO),
        ]
    }

    /// Every object store.
    pub fn object_stores(&self) -> Vec<object_store::Config> {
        vec![object_store::Config {
            bucket: names::OBJECT_BLOBS.into(),
            description: Some("claim-checked payloads, content-addressed".into()),
            max_age: self.settings.blob_max_age,
            storage: self.storage(),
            num_replicas: self.settings.replicas,
            ..Default::default()
        }]
    }

    /// Creates what is missing and corrects what can be corrected; see the module docs.
    pub async fn declare(&self, js: &jetstream::Context) -> Result<Report, TopologyError> {
        self.run(js, true).await
    }

    /// Compares the server with the declaration without changing anything.
    pub async fn verify(&self, js: &jetstream::Context) -> Result<Report, TopologyError> {
        self.run(js, false).await
    }

    async fn run(&self, js: &jetstream::Context, apply: bool) -> Result<Report, TopologyError> {
        let mut report = Report::default();
        for config in self.streams() {
            let action = self.sync_stream(js, &config, apply).await?;
            report.assets.push(AssetReport {
                kind: AssetKind::Stream,
                name: config.name,
                action,
            });
        }
        for (stream, config) in self.consumers() {
            let action = sync_consumer(js, stream, &config, apply).await?;
            report.assets.push(AssetReport {
                kind: AssetKind::Consumer,
                name: format!(
                    "{stream}/{}",
                    config.durable_name.as_deref().unwrap_or_default()
                ),
                action,
            });
        }
        for config in self.key_values() {
            let stream = format!("KV_{}", config.bucket);
            let action = match existing_stream(js, AssetKind::KeyValue, &stream).await? {
                Some(have) => Action::Drifted(kv_diff(&config, &have)),
                None if apply => {
                    js.create_key_value(config.clone())
                        .await
                        .map_err(|e| TopologyError::new(AssetKind::KeyValue, &config.bucket, e))?;
                    Action::Created
                }
                None => Action::Missing,
            };
            report.assets.push(AssetReport {
                kind: AssetKind::KeyValue,
                name: config.bucket,
                action: settle(action),
            });
        }
        for config in self.object_stores() {
            let stream = format!("OBJ_{}", config.bucket);
            let action = match existing_stream(js, AssetKind::ObjectStore, &stream).await? {
                Some(have) => Action::Drifted(object_diff(&config, &have)),
                None if apply => {
                    js.create_object_store(config.clone()).await.map_err(|e| {
                        TopologyError::new(AssetKind::ObjectStore, &config.bucket, e)
                    })?;
                    Action::Created
                }
                None => Action::Missing,
            };
            report.assets.push(AssetReport {
                kind: AssetKind::ObjectStore,
                name: config.bucket,
                action: settle(action),
            });
        }
        Ok(report)
    }

    async fn sync_stream(
        &self,
        js: &jetstream::Context,
        want: &stream::Config,
        apply: bool,
    ) -> Result<Action, TopologyError> {
        let err = |e: &dyn fmt::Display| TopologyError::new(AssetKind::Stream, &want.name, e);
        let Some(have) = existing_stream(js, AssetKind::Stream, &want.name).await? else {
            if !apply {
                return Ok(Action::Missing);
            }
            js.create_stream(want.clone()).await.map_err(|e| err(&e))?;
            return Ok(Action::Created);
        };
        let (fixable, fixed) = stream_diff(want, &have);
        let fixable = match verdict(fixable, fixed, apply) {
            Ok(action) => return Ok(action),
            Err(fixable) => fixable,
        };
        // Keep the server's values for settings we do not manage.
        let mut update = have;
        update.description = want.description.clone();
        update.subjects = want.subjects.clone();
        update.max_age = want.max_age;
        update.duplicate_window = want.duplicate_window;
        update.max_messages_per_subject = want.max_messages_per_subject;
        update.discard_new_per_subject = want.discard_new_per_subject;
        update.max_message_size = want.max_message_size;
        update.num_replicas = want.num_replicas;
        update.subject_transform = want.subject_transform.clone();
        update.allow_message_ttl = want.allow_message_ttl;
        update.allow_direct = want.allow_direct;
        js.update_stream(update).await.map_err(|e| err(&e))?;
        tracing::warn!(stream = %want.name, changes = %join(&fixable), "corrected drifted stream");
        Ok(Action::Updated(fixable))
    }
}

/// What to do with an existing asset, from its differences: `Ok(action)` when nothing is to be
/// changed (unchanged, drifted beyond repair, or verify only), `Err(fixable)` when the fixable
/// differences should be applied.
fn verdict(
    fixable: Vec<Difference>,
    fixed: Vec<Difference>,
    apply: bool,
) -> Result<Action, Vec<Difference>> {
    if !fixed.is_empty() {
        let mut all = fixed;
        all.extend(fixable);
        return Ok(Action::Drifted(all));
    }
    if fixable.is_empty() {
        return Ok(Action::Unchanged);
    }
    if !apply {
        return Ok(Action::Drifted(fixable));
    }
    Err(fixable)
}

/// A KV bucket or object store can only be reported, never silently re-created.
fn settle(action: Action) -> Action {
    match action {
        Action::Drifted(diffs) if diffs.is_empty() => Action::Unchanged,
        other => other,
    }
}

fn join(diffs: &[Difference]) -> String {
    diffs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

async fn existing_stream(
    js: &jetstream::Context,
    kind: AssetKind,
    name: &str,
) -> Result<Option<stream::Config>, TopologyError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(TopologyError::new(kind, name, e)),
        },
    }
}

fn differ<T: PartialEq + fmt::Debug>(
    out: &mut Vec<Difference>,
    field: &'static str,
    want: &T,
    have: &T,
) {
    if want != have {
        out.push(Difference {
            field,
            want: format!("{want:?}"),
            have: format!("{have:?}"),
        });
    }
}

/// The server reports "no limit" as -1 whatever was sent (0 or -1).
fn unlimited(value: i64) -> i64 {
    if value <= 0 { -1 } else { value }
}

/// Returns (differences the server can change in place, differences it cannot).
fn stream_diff(want: &stream::Config, have: &stream::Config) -> (Vec<Difference>, Vec<Difference>) {
    let mut fixable = Vec::new();
    let mut fixed = Vec::new();
    differ(&mut fixed, "retention", &want.retention, &have.retention);
    differ(&mut fixed, "storage", &want.storage, &have.storage);
    differ(&mut fixable, "subjects", &want.subjects, &have.subjects);
    differ(&mut fixable, "max_age", &want.max_age, &have.max_age);
    differ(
        &mut fixable,
        "duplicate_window",
        &want.duplicate_window,
        &have.duplicate_window,
    );
    differ(
        &mut fixable,
        "max_msgs_per_subject",
        &unlimited(want.max_messages_per_subject),
        &unlimited(have.max_messages_per_subject),
    );
    differ(
        &mut fixable,
        "discard_new_per_subject",
        &want.discard_new_per_subject,
        &have.discard_new_per_subject,
    );
    differ(
        &mut fixable,
        "max_msg_size",
        &unlimited(i64::from(want.max_message_size)),
        &unlimited(i64::from(have.max_message_size)),
    );
    differ(
        &mut fixable,
        "num_replicas",
        &want.num_replicas,
        &have.num_replicas,
    );
    differ(
        &mut fixable,
        "subject_transform",
        &want.subject_transform,
        &have.subject_transform,
    );
    differ(
        &mut fixable,
        "allow_msg_ttl",
        &want.allow_message_ttl,
        &have.allow_message_ttl,
    );
    differ(
        &mut fixable,
        "allow_direct",
        &want.allow_direct,
        &have.allow_direct,
    );
    (fixable, fixed)
}

fn kv_diff(want: &kv::Config, have: &stream::Config) -> Vec<Difference> {
    let mut out = Vec::new();
    differ(
        &mut out,
        "history",
        &unlimited(want.history),
        &unlimited(have.max_messages_per_subject),
    );
    differ(&mut out, "max_age", &want.max_age, &have.max_age);
    differ(
        &mut out,
        "num_replicas",
        &want.num_replicas,
        &have.num_replicas,
    );
    out
}

fn object_diff(want: &object_store::Config, have: &stream::Config) -> Vec<Difference> {
    let mut out = Vec::new();
    differ(&mut out, "max_age", &want.max_age, &have.max_age);
    differ(
        &mut out,
        "num_replicas",
        &want.num_replicas,
        &have.num_replicas,
    );
    out
}

/// Returns (differences the server can change in place, differences it cannot).
fn consumer_diff(
    want: &consumer::pull::Config,
    have: &consumer::Config,
) -> (Vec<Difference>, Vec<Difference>) {
    let mut fixable = Vec::new();
    let mut fixed = Vec::new();
    differ(&mut fixed, "ack_policy", &want.ack_policy, &have.ack_policy);
    differ(
        &mut fixed,
        "deliver_policy",
        &want.deliver_policy,
        &have.deliver_policy,
    );
    differ(
        &mut fixed,
        "priority_policy",
        &want.priority_policy,
        &have.priority_policy,
    );
    differ(
        &mut fixed,
        "priority_groups",
        &want.priority_groups,
        &have.priority_groups,
    );
    differ(
        &mut fixable,
        "filter_subject",
        &want.filter_subject,
        &have.filter_subject,
    );
    differ(&mut fixable, "ack_wait", &want.ack_wait, &have.ack_wait);
    differ(
        &mut fixable,
        "max_deliver",
        &want.max_deliver,
        &have.max_deliver,
    );
    differ(
        &mut fixable,
        "max_ack_pending",
        &unlimited(want.max_ack_pending),
        &unlimited(have.max_ack_pending),
    );
    differ(&mut fixable, "backoff", &want.backoff, &have.backoff);
    if want.priority_policy == PriorityPolicy::PinnedClient {
        differ(
            &mut fixable,
            "priority_timeout",
            &want.priority_timeout,
            &have.priority_timeout,
        );
    }
    (fixable, fixed)
}

fn consumer_missing(error: &async_nats::jetstream::context::ConsumerInfoError) -> bool {
    match error.kind() {
        ConsumerInfoErrorKind::NotFound => true,
        ConsumerInfoErrorKind::JetStream(inner) => {
            inner.error_code() == ErrorCode::CONSUMER_NOT_FOUND
        }
        _ => false,
    }
}

async fn sync_consumer(
    js: &jetstream::Context,
    stream: &str,
    want: &consumer::pull::Config,
    apply: bool,
) -> Result<Action, TopologyError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let label = format!("{stream}/{name}");
    let err = |e: &dyn fmt::Display| TopologyError::new(AssetKind::Consumer, &label, e);
    let info = {
        let handle = js.get_stream_no_info(stream).await.map_err(|e| err(&e))?;
        handle.consumer_info(&name).await
    };
    let have = match info {
        Ok(info) => info.config,
        Err(e) if consumer_missing(&e) => {
            if !apply {
                return Ok(Action::Missing);
            }
            js.create_consumer_strict_on_stream(want.clone(), stream)
                .await
                .map_err(|e| err(&e))?;
            return Ok(Action::Created);
        }
        Err(e) => return Err(err(&e)),
    };
    let (fixable, fixed) = consumer_diff(want, &have);
    let fixable = match verdict(fixable, fixed, apply) {
        Ok(action) => return Ok(action),
        Err(fixable) => fixable,
    };
    js.update_consumer_on_stream(want.clone(), stream)
        .await
        .map_err(|e| err(&e))?;
    tracing::warn!(consumer = %label, changes = %join(&fixable), "corrected drifted consumer");
    Ok(Action::Updated(fixable))
}
