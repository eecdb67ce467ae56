//! The client library a device embeds to talk to devsync (the protocol is in
//! `proto/README.md`, so devices in other languages can implement it too).
//!
//! - [`Device::report`]: send reported state (merge patch or full document). Each report gets
//!   the next sequence number; retries reuse it, so a report is applied at most once.
//! - [`Device::check_in`], [`Device::ack`]: liveness, and "I applied desired version N".
//! - [`Device::refresh`]: on wake-up, "what changed since version N" — a merge patch, the full
//!   document, or "up to date".
//! - [`Device::pushes`], [`Device::last_desired`]: pushed desired state, live or as the last
//!   value kept for devices that were asleep.
//!
//! Every request waits for devsync's answer, which comes only once the message is durable.
//! Timeouts, "no responders", `UNAVAILABLE` and `RATE_LIMITED` are retried with backoff (the
//! server's `retry_after` when it gives one); other refusals are returned at once, as they will
//! not succeed by retrying.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use devsync_proto::Message as _;
use devsync_proto::v1::{
    Accepted, CheckIn, DesiredAck, DesiredPush, DeviceReport, ErrorReply, Payload, RefreshReply,
    RefreshRequest, error_reply::Code, payload, refresh_reply,
};
use devsync_types::{DeviceId, MessageKind, names, subjects};
use futures::{Stream, StreamExt};
use serde_json::Value;

/// What can go wrong talking to devsync.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("refused ({code:?}): {message}")]
    Refused {
        code: Code,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("no answer after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("nats: {0}")]
    Nats(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// How long to wait for one answer.
    pub timeout: Duration,
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// First backoff; doubles each attempt.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            attempts: 6,
            backoff: Duration::from_millis(100),
        }
    }
}

/// What a refresh brought.
#[derive(Debug, Clone, PartialEq)]
pub enum Refresh {
    /// Nothing changed since the version the device has.
    UpToDate { version: u64 },
    /// A merge patch from the device's version to `version`.
    Delta { version: u64, patch: Value },
    /// The whole desired document at `version`.
    Full { version: u64, document: Value },
}

/// A device's connection to devsync.
#[derive(Debug)]
pub struct Device {
    client: Client,
    id: DeviceId,
    sequence: AtomicU64,
    retry: RetryPolicy,
}

impl Device {
    /// Connects as `id`, with its own inbox prefix so replies cannot be read by other devices.
    /// `options` carries the device's credentials.
    pub async fn connect(
        url: &str,
        id: DeviceId,
        options: ConnectOptions,
    ) -> Result<Self, DeviceError> {
        let client = options
            .custom_inbox_prefix(subjects::device_inbox_prefix(&id))
            .name(format!("device-{id}"))
            .connect(url)
            .await
            .map_err(|e| DeviceError::Nats(e.to_string()))?;
        Ok(Self::with_client(client, id, 0))
    }

    /// Uses an existing connection; `last_sequence` is the last sequence number this device
    /// used (persist it across restarts, or start from a clock-based value).
    pub fn with_client(client: Client, id: DeviceId, last_sequence: u64) -> Self {
        Self {
            client,
            id,
            sequence: AtomicU64::new(last_sequence),
            retry: RetryPolicy::default(),
        }
    }

    /// Changes how requests are retried.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The device id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The last sequence number used.
    pub fn last_sequence(&self) -> u64 {
        self.sequence.load(Ordering::SeqCst)
    }

    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Reports state: a merge patch over what was reported before, or the whole document.
    pub async fn report(&self, state: &Value, full: bool) -> Result<Accepted, DeviceError> {
        let payload = Self::report_bytes(&self.id, self.next_sequence(), state, full);
        self.send_accepted(MessageKind::Report, payload).await
    }

    /// The bytes a report of `state` as `sequence` is sent as (what a capture of the wire
    /// holds, for replay tests).
    pub fn report_bytes(id: &DeviceId, sequence: u64, state: &Value, full: bool) -> Bytes {
        DeviceReport {
            device_id: id.to_string(),
            sequence,
            reported: Some(json_payload(state)),
            full,
            sent_at: None,
        }
        .encode_to_vec()
        .into()
    }

    /// Says the device is alive and which desired version it has applied.
    pub async fn check_in(&self, applied_version: u64) -> Result<Accepted, DeviceError> {
        let checkin = CheckIn {
            device_id: self.id.to_string(),
            sequence: self.next_sequence(),
            applied_desired_version: applied_version,
            sent_at: None,
        };
        self.send_accepted(MessageKind::CheckIn, checkin.encode_to_vec().into())
            .await
    }

    /// Acknowledges that desired `version` was applied (or failed to apply).
    pub async fn ack(
        &self,
        version: u64,
        success: bool,
        error: &str,
    ) -> Result<Accepted, DeviceError> {
        self.send_ack(version, success, error, String::new()).await
    }

    /// Acknowledges a received push: like [`Device::ack`] for its version, naming the request
    /// that caused it, so the acknowledgement joins that request's audit chain.
    pub async fn ack_push(
        &self,
        push: &DesiredPush,
        success: bool,
        error: &str,
    ) -> Result<Accepted, DeviceError> {
        self.send_ack(
            push.desired_version,
            success,
            error,
            push.request_id.clone(),
        )
        .await
    }

    async fn send_ack(
        &self,
        version: u64,
        success: bool,
        error: &str,
        causation_id: String,
    ) -> Result<Accepted, DeviceError> {
        let ack = DesiredAck {
            device_id: self.id.to_string(),
            desired_version: version,
            sequence: self.next_sequence(),
            success,
            error: error.to_owned(),
            causation_id,
        };
        self.send_accepted(MessageKind::Ack, ack.encode_to_vec().into())
            .await
    }

    /// Asks what changed since desired version `since` (0: never applied anything).
    pub async fn refresh(&self, since: u64) -> Result<Refresh, DeviceError> {
        let request = RefreshRequest {
            device_id: self.id.to_string(),
            since_version: since,
            sequence: self.next_sequence(),
        };
        let bytes = self
            .request(MessageKind::Refresh, request.encode_to_vec().into())
            .await?;
        let reply =
            RefreshReply::decode(bytes).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        let version = reply.desired_version;
        let document = || -> Result<Value, DeviceError> {
            match reply.desired.as_ref().and_then(|p| p.body.as_ref()) {
                Some(payload::Body::InlineJson(bytes)) => {
                    serde_json::from_slice(bytes).map_err(|e| DeviceError::Protocol(e.to_string()))
                }
                _ => Err(DeviceError::Protocol("refresh without a document".into())),
            }
        };
        match refresh_reply::Kind::try_from(reply.kind) {
            Ok(refresh_reply::Kind::UpToDate) => Ok(Refresh::UpToDate { version }),
            Ok(refresh_reply::Kind::Delta) => Ok(Refresh::Delta {
                version,
                patch: document()?,
            }),
            Ok(refresh_reply::Kind::Full) => Ok(Refresh::Full {
                version,
                document: document()?,
            }),
            _ => Err(DeviceError::Protocol(format!(
                "refresh kind {}",
                reply.kind
            ))),
        }
    }

    /// Pushed desired states, as they arrive (`devsync.out.<device>.desired`).
    pub async fn pushes(&self) -> Result<impl Stream<Item = DesiredPush> + use<>, DeviceError> {
        let subscription = self
            .client
            .subscribe(subjects::device_desired(&self.id))
            .await
            .map_err(|e| DeviceError::Nats(e.to_string()))?;
        Ok(subscription
            .filter_map(|message| async move { DesiredPush::decode(message.payload).ok() }))
    }

    /// The last desired state pushed to this device, kept for devices that were asleep
    /// (a direct get on the `devsync-desired` KV bucket).
    pub async fn last_desired(&self) -> Result<Option<DesiredPush>, DeviceError> {
        let subject = subjects::kv_direct_get(names::KV_DESIRED, self.id.as_str());
        let message = self
            .client
            .request(subject, Bytes::new())
            .await
            .map_err(|e| DeviceError::Nats(e.to_string()))?;
        let status = message.status.map(|s| s.as_u16()).unwrap_or(200);
        if status == 404 {
            return Ok(None);
        }
        if message.payload.is_empty() {
            return Ok(None);
        }
        DesiredPush::decode(message.payload)
            .map(Some)
            .map_err(|e| DeviceError::Protocol(e.to_string()))
    }

    async fn send_accepted(
        &self,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<Accepted, DeviceError> {
        let bytes = self.request(kind, payload).await?;
        Accepted::decode(bytes).map_err(|e| DeviceError::Protocol(e.to_string()))
    }

    /// Sends a request and returns the answer's payload, retrying what can be retried.
    async fn request(&self, kind: MessageKind, payload: Bytes) -> Result<Bytes, DeviceError> {
        let subject = subjects::ingress(&self.id, kind);
        let mut backoff = self.retry.backoff;
        let mut last = String::new();
        for attempt in 1..=self.retry.attempts {
            let sent = tokio::time::timeout(
                self.retry.timeout,
                self.client.request(subject.clone(), payload.clone()),
            )
            .await;
            let wait = match sent {
                Ok(Ok(message)) => match answer(message.headers.as_ref(), message.payload) {
                    Ok(bytes) => return Ok(bytes),
                    Err(DeviceError::Refused {
                        code: Code::Unavailable | Code::RateLimited,
                        message,
                        retry_after,
                    }) => {
                        last = message;
                        retry_after.unwrap_or(backoff)
                    }
                    Err(error) => return Err(error),
                },
                Ok(Err(error)) => {
                    last = error.to_string();
                    backoff
                }
                Err(_) => {
                    last = format!("no answer within {:?}", self.retry.timeout);
                    backoff
                }
            };
            if attempt < self.retry.attempts {
                tracing::debug!(device_id = %self.id, attempt, reason = %last, "retrying");
                tokio::time::sleep(wait).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        Err(DeviceError::GaveUp {
            attempts: self.retry.attempts,
            last,
        })
    }
}

/// Splits an answer into its payload or the refusal it carries.
fn answer(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Bytes, DeviceError> {
    let status = headers
        .and_then(|h| h.get(subjects::STATUS_HEADER))
        .map(|v| v.as_str().to_owned());
    match status.as_deref() {
        Some(subjects::STATUS_OK) => Ok(payload),
        Some(subjects::STATUS_ERROR) => {
            let reply =
                ErrorReply::decode(payload).map_err(|e| DeviceError::Protocol(e.to_string()))?;
            Err(DeviceError::Refused {
                code: Code::try_from(reply.code).unwrap_or(Code::Unspecified),
                message: reply.message,
                retry_after: (reply.retry_after_ms > 0)
                    .then(|| Duration::from_millis(reply.retry_after_ms)),
            })
        }
        other => Err(DeviceError::Protocol(format!(
            "answer without a {} header ({other:?})",
            subjects::STATUS_HEADER
        ))),
    }
}

fn json_payload(value: &Value) -> Payload {
    Payload {
        body: Some(payload::Body::InlineJson(
            serde_json::to_vec(value).unwrap_or_default().into(),
        )),
    }
}

/// The JSON document a push carries inline (claim-checked pushes need the object store, which
/// devices do not read; the fan-out inlines documents for devices).
pub fn push_document(push: &DesiredPush) -> Option<Value> {
    match push.desired.as_ref()?.body.as_ref()? {
        payload::Body::InlineJson(bytes) => serde_json::from_slice(bytes).ok(),
        payload::Body::Blob(_) => None,
    }
}
