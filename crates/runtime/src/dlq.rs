//! Dead letters. A message that is poison, or that ran out of deliveries, is copied to
//! `DEVSYNC_DLQ` (`devsync.dlq.<stream>`) with its subject, stream sequence, delivery count,
//! headers and the reason, and only then removed from its stream. The copy is deduplicated on
//! `dlq:<stream>:<sequence>`, so the worker loop and the advisory sweeper can both try.
//!
//! [`AdvisorySweeper`] handles what the worker loop cannot see: a message whose last delivery
//! was never answered (the worker died). JetStream raises a max-deliveries advisory, which
//! `DEVSYNC_ADVISORIES` captures; the sweeper copies the message to the DLQ and deletes it, as a
//! WorkQueue message past `max_deliver` would otherwise stay in its stream forever.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::Utc;
use devsync_proto::Message as _;
use devsync_proto::v1::{DeadLetter, Header};
use devsync_types::convert::timestamp;
use devsync_types::subjects;
use serde::Deserialize;

use crate::worker::{Delivery, Handler, Outcome};

/// The message a dead letter is made from.
#[derive(Debug, Clone)]
pub struct Original<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    pub subject: &'a str,
    pub stream_sequence: u64,
    pub delivery_count: u64,
    pub payload: &'a Bytes,
    pub headers: Option<&'a HeaderMap>,
}

/// Publishing a dead letter failed; the original must not be removed.
#[derive(Debug, thiserror::Error)]
#[error("dead letter for {stream} #{sequence} not stored: {message}")]
pub struct DeadLetterError {
    pub stream: String,
    pub sequence: u64,
    pub message: String,
}

/// Copies `original` to the DLQ with `error` as the reason and waits until it is stored.
pub async fn publish(
    js: &jetstream::Context,
    original: Original<'_>,
    error: &str,
) -> Result<(), DeadLetterError> {
    let fail = |message: String| DeadLetterError {
        stream: original.stream.to_owned(),
        sequence: original.stream_sequence,
        message,
    };
    let headers = original
        .headers
        .map(|headers| {
            headers
                .iter()
                .flat_map(|(name, values)| {
                    values.iter().map(move |value| Header {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let letter = DeadLetter {
        original: original.payload.clone(),
        subject: original.subject.to_owned(),
        stream: original.stream.to_owned(),
        consumer: original.consumer.to_owned(),
        stream_sequence: original.stream_sequence,
        delivery_count: original.delivery_count,
        error: error.to_owned(),
        dead_at: Some(timestamp(Utc::now())),
        headers,
    };
    // Messages refused before reaching any stream have no sequence: give them a unique id.
    let msg_id = if original.stream_sequence > 0 {
        format!("dlq:{}:{}", original.stream, original.stream_sequence)
    } else {
        format!("dlq:{}:{}", original.stream, uuid::Uuid::now_v7())
    };
    let publish = PublishMessage::build()
        .payload(letter.encode_to_vec().into())
        .message_id(msg_id);
    js.send_publish(subjects::dlq(original.stream), publish)
        .await
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(e.to_string()))?;
    tracing::warn!(
        stream = original.stream,
        consumer = original.consumer,
        sequence = original.stream_sequence,
        deliveries = original.delivery_count,
        reason = error,
        "message dead-lettered"
    );
    Ok(())
}

/// The fields of a `io.nats.jetstream.advisory.v1.max_deliver` advisory we use.
#[derive(Debug, Deserialize)]
struct MaxDeliverAdvisory {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Moves messages named by max-deliveries advisories to the DLQ (run on `DEVSYNC_ADVISORIES`).
#[derive(Debug, Clone)]
pub struct AdvisorySweeper {
    js: jetstream::Context,
}

impl AdvisorySweeper {
    /// A sweeper using `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    async fn sweep_one(&self, delivery: &Delivery) -> Outcome {
        let advisory: MaxDeliverAdvisory = match serde_json::from_slice(delivery.payload()) {
            Ok(advisory) => advisory,
            Err(e) => return Outcome::Reject(format!("not a max-deliveries advisory: {e}")),
        };
        let stream = match self.js.get_stream_no_info(&advisory.stream).await {
            Ok(stream) => stream,
            Err(e) => return Outcome::Retry(format!("stream {}: {e}", advisory.stream)),
        };
        let message = match stream.get_raw_message(advisory.stream_seq).await {
            Ok(message) => message,
            // Already gone: acknowledged late, or swept before.
            Err(e) if e.to_string().contains("not found") => return Outcome::Ack,
            Err(e) => return Outcome::Retry(format!("get message: {e}")),
        };
        let original = Original {
            stream: &advisory.stream,
            consumer: &advisory.consumer,
            subject: message.subject.as_str(),
            stream_sequence: advisory.stream_seq,
            delivery_count: advisory.deliveries,
            payload: &message.payload,
            headers: Some(&message.headers),
        };
        let reason = format!(
            "ran out of deliveries ({}) without a final outcome",
            advisory.deliveries
        );
        if let Err(e) = publish(&self.js, original, &reason).await {
            return Outcome::Retry(e.to_string());
        }
        match stream.delete_message(advisory.stream_seq).await {
            Ok(_) => Outcome::Ack,
            Err(e) if e.to_string().contains("not found") => Outcome::Ack,
            Err(e) => Outcome::Retry(format!("delete message: {e}")),
        }
    }
}

impl Handler for AdvisorySweeper {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for delivery in batch {
            outcomes.push(self.sweep_one(delivery).await);
        }
        outcomes
    }
}
