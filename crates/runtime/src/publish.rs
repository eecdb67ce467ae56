//! Pipelined JetStream publishing: send a whole set of messages, then wait for all their
//! acknowledgements. Publishing one message at a time and waiting for each ack caps out around
//! 10k msg/s; keeping thousands in flight reaches the raw publish rate.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use devsync_proto::v1::{Header, OutboxMessage};
use futures::future::try_join_all;

/// One message to publish, with its deduplication id.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id`; deterministic so a re-publish is deduplicated by the stream.
    pub msg_id: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
}

impl Outgoing {
    /// The outbox form of this message.
    pub fn to_outbox(&self) -> OutboxMessage {
        OutboxMessage {
            subject: self.subject.clone(),
            msg_id: self.msg_id.clone(),
            payload: self.payload.clone(),
            headers: self
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .flat_map(|(name, values)| {
                    values.iter().map(move |value| Header {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                })
                .collect(),
        }
    }

    /// The message an outbox entry describes.
    pub fn from_outbox(message: OutboxMessage) -> Self {
        let headers = (!message.headers.is_empty()).then(|| {
            let mut map = HeaderMap::new();
            for header in &message.headers {
                map.append(header.name.as_str(), header.value.as_str());
            }
            map
        });
        Self {
            subject: message.subject,
            msg_id: message.msg_id,
            payload: message.payload,
            headers,
        }
    }
}

/// Publishing failed; nothing is known about the messages not yet acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("publish to {subject}: {message}")]
pub struct PublishError {
    pub subject: String,
    pub message: String,
}

/// Sends one message and returns the future of its acknowledgement.
pub async fn send(
    js: &jetstream::Context,
    message: Outgoing,
) -> Result<PublishAckFuture, PublishError> {
    let mut publish = PublishMessage::build()
        .payload(message.payload)
        .message_id(&message.msg_id);
    if let Some(headers) = message.headers {
        for (name, values) in headers.iter() {
            for value in values {
                publish = publish.header(name.clone(), value.clone());
            }
        }
    }
    js.send_publish(message.subject.clone(), publish)
        .await
        .map_err(|e| PublishError {
            subject: message.subject,
            message: e.to_string(),
        })
}

/// Sends every message, in order, then waits until all are stored. Returns how many were
/// duplicates the stream had already stored.
pub async fn publish_all(
    js: &jetstream::Context,
    messages: impl IntoIterator<Item = Outgoing>,
) -> Result<usize, PublishError> {
    let mut pending = Vec::new();
    for message in messages {
        let subject = message.subject.clone();
        let ack = send(js, message).await?;
        pending.push(async move {
            ack.await.map_err(|e| PublishError {
                subject,
                message: e.to_string(),
            })
        });
    }
    let acks = try_join_all(pending).await?;
    Ok(acks.iter().filter(|ack| ack.duplicate).count())
}
