//! The consumer loop every devsync service runs.
//!
//! [`run`] pulls batches from a durable pull consumer and hands each batch to a [`Handler`],
//! which answers one [`Outcome`] per message:
//!
//! - `Ack`: done; acknowledged only now, after the handler succeeded.
//! - `Retry`: a transient failure; nak with an explicit, growing delay (a plain nak ignores the
//!   consumer's schedule and can hot-loop). On the last allowed delivery the message is
//!   dead-lettered instead, then terminated.
//! - `Reject`: poison (cannot decode, invalid); dead-lettered with the reason, then terminated,
//!   never redelivered.
//!
//! While a handler runs, progress acks keep the batch from being redelivered. If the consumer
//! disappears (for example after a server restart without persistence), the client keeps
//! yielding errors instead of ending; the loop notices and re-binds with backoff. On shutdown it
//! finishes the current batch and hands prefetched messages straight back (nak without delay).
//!
//! Every outcome is counted in `devsync_worker_messages_total{stream,consumer,outcome}`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{MessagesErrorKind, Stream as MessageStream};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{Instrument, Span};

use crate::dlq;
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// One message handed to a handler. Cloning is cheap (shared buffers); a handler that applies
/// several workers' batches together keeps clones.
#[derive(Debug, Clone)]
pub struct Delivery {
    message: jetstream::Message,
    delivered: u64,
    stream_sequence: u64,
    /// The span the message is handled in, parented to the publisher's trace context.
    pub span: Span,
}

impl Delivery {
    fn new(message: jetstream::Message, consumer: &str) -> Self {
        let (delivered, stream_sequence) = message
            .info()
            .map(|info| (info.delivered.max(1) as u64, info.stream_sequence))
            .unwrap_or((1, 0));
        let span = tracing::info_span!(
            "handle",
            subject = %message.subject,
            consumer,
            stream_seq = stream_sequence,
            delivered,
        );
        telemetry::extract_into(&span, message.headers.as_ref());
        Self {
            message,
            delivered,
            stream_sequence,
            span,
        }
    }

    /// The subject the message was stored under.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    /// The headers, if any.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }

    /// Which delivery this is (1 = first).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The message's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// The underlying JetStream message (for replies and timestamps).
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }
}

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed; acknowledge.
    Ack,
    /// Transient failure; redeliver after a backoff (dead-letter on the last delivery).
    Retry(String),
    /// Poison; dead-letter and never redeliver.
    Reject(String),
}

/// Processes batches. Must return one outcome per message, in order.
pub trait Handler: Send + Sync + 'static {
    /// Handles `batch`, returning `batch.len()` outcomes.
    fn handle(&self, batch: &[Delivery]) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// Which consumer a worker runs and how.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Stream name.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Priority group, for pinned-client consumers.
    pub group: Option<String>,
    /// Most messages per batch.
    pub batch_size: usize,
    /// How long one pull waits on the server.
    pub pull_expires: Duration,
    /// Nak delays, and re-binding delays after losing the consumer.
    pub retry: RetryPolicy,
    /// Zero: a batch is whatever has arrived (up to `batch_size`). Otherwise a batch is
    /// handed over once it holds `batch_size` messages (less than twice that) or this long
    /// after its first message, for handlers whose cost is mostly per batch and whose
    /// messages can wait a little (audit storage).
    pub linger: Duration,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    stream: String,
    consumer: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    stream: String,
    consumer: String,
}

/// Worker metrics, shared by every worker of a process.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    messages: Family<OutcomeLabels, Counter>,
    batch_size: Family<ConsumerLabels, Histogram>,
    batch_seconds: Family<ConsumerLabels, Histogram>,
}

impl WorkerMetrics {
    /// Registers the worker metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let messages = Family::<OutcomeLabels, Counter>::default();
        let batch_size = Family::<ConsumerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 12))
        });
        let batch_seconds = Family::<ConsumerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "devsync_worker_messages",
            "messages handled, by outcome (acked, retried, dead_lettered, rejected)",
            messages.clone(),
        );
        registry.register(
            "devsync_worker_batch_size",
            "messages per handled batch",
            batch_size.clone(),
        );
        registry.register(
            "devsync_worker_batch_seconds",
            "time to handle and settle one batch",
            batch_seconds.clone(),
        );
        Self {
            messages,
            batch_size,
            batch_seconds,
        }
    }

    /// How many messages of `consumer` ended with `outcome` so far.
    pub fn count(&self, stream: &str, consumer: &str, outcome: &'static str) -> u64 {
        self.messages
            .get_or_create(&OutcomeLabels {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
                outcome,
            })
            .get()
    }
}

/// Runs `handler` on `spec`'s consumer until `shutdown` is cancelled.
pub async fn run<H: Handler>(
    js: jetstream::Context,
    spec: WorkerSpec,
    handler: Arc<H>,
    metrics: WorkerMetrics,
    shutdown: Shutdown,
) {
    let worker = Worker {
        js,
        spec,
        metrics,
        shutdown,
    };
    let mut attempt = 0u64;
    while !worker.shutdown.is_cancelled() {
        match worker.bind().await {
            Ok((consumer, messages)) => {
                attempt = 0;
                worker.consume(&consumer, messages, handler.as_ref()).await;
            }
            Err(error) => {
                attempt += 1;
                tracing::warn!(
                    stream = %worker.spec.stream,
                    consumer = %worker.spec.consumer,
                    %error,
                    attempt,
                    "cannot bind consumer; retrying"
                );
            }
        }
        if worker.shutdown.is_cancelled() {
            break;
        }
        let delay = worker.spec.retry.delay(attempt.max(1));
        tokio::select! {
            _ = worker.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tracing::debug!(consumer = %worker.spec.consumer, "worker stopped");
}

struct Worker {
    js: jetstream::Context,
    spec: WorkerSpec,
    metrics: WorkerMetrics,
    shutdown: Shutdown,
}

/// Errors in a row after which the consumer is re-bound.
const MAX_CONSECUTIVE_ERRORS: u32 = 3;

impl Worker {
    async fn bind(&self) -> Result<(PullConsumer, MessageStream), async_nats::Error> {
        let stream = self.js.get_stream_no_info(&self.spec.stream).await?;
        let consumer: PullConsumer = stream.get_consumer(&self.spec.consumer).await?;
        let mut builder = consumer
            .stream()
            .max_messages_per_batch(self.spec.batch_size)
            .expires(self.spec.pull_expires);
        if let Some(group) = &self.spec.group {
            builder = builder.group(group.clone());
        }
        let messages = builder.messages().await?;
        Ok((consumer, messages))
    }

    fn labels(&self, outcome: &'static str) -> OutcomeLabels {
        OutcomeLabels {
            stream: self.spec.stream.clone(),
            consumer: self.spec.consumer.clone(),
            outcome,
        }
    }

    async fn consume<H: Handler>(
        &self,
        consumer: &PullConsumer,
        messages: MessageStream,
        handler: &H,
    ) {
        let info = consumer.cached_info();
        let max_deliver = u64::try_from(info.config.max_deliver).unwrap_or(u64::MAX);
        let progress_every = (info.config.ack_wait / 3).max(Duration::from_millis(200));
        let mut chunks = messages.ready_chunks(self.spec.batch_size);
        let mut errors_in_a_row = 0u32;
        loop {
            let chunk = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                chunk = chunks.next() => chunk,
            };
            let Some(mut chunk) = chunk else {
                tracing::warn!(consumer = %self.spec.consumer, "message stream ended; re-binding");
                return;
            };
            // Lingering: what arrives shortly after joins the batch (it stays in hand, so a
            // shutdown meanwhile handles it as the current batch).
            let deadline = tokio::time::Instant::now() + self.spec.linger;
            while !self.spec.linger.is_zero() && chunk.len() < self.spec.batch_size {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    more = tokio::time::timeout_at(deadline, chunks.next()) => match more {
                        Ok(Some(more)) => chunk.extend(more),
                        // The deadline, or the stream ended (re-bound after this batch).
                        _ => break,
                    },
                }
            }
            let mut batch = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item {
                    Ok(message) => batch.push(Delivery::new(message, &self.spec.consumer)),
                    Err(error) => {
                        errors_in_a_row += 1;
                        tracing::warn!(consumer = %self.spec.consumer, %error, "pull error");
                        let fatal = matches!(
                            error.kind(),
                            MessagesErrorKind::ConsumerDeleted
                                | MessagesErrorKind::PushBasedConsumer
                                | MessagesErrorKind::RequestLimitExceeded
                        );
                        if fatal || errors_in_a_row >= MAX_CONSECUTIVE_ERRORS {
                            self.hand_back(batch).await;
                            return;
                        }
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            errors_in_a_row = 0;
            self.process(batch, handler, max_deliver, progress_every)
                .await;
        }
        // Shutdown: hand prefetched messages back so another replica takes them at once.
        let mut leftovers = Vec::new();
        while let Some(Some(items)) = chunks.next().now_or_never() {
            leftovers.extend(
                items
                    .into_iter()
                    .flatten()
                    .map(|m| Delivery::new(m, &self.spec.consumer)),
            );
        }
        self.hand_back(leftovers).await;
    }

    async fn hand_back(&self, batch: Vec<Delivery>) {
        for delivery in batch {
            let _ = delivery
                .message
                .ack_with(AckKind::Nak(Some(Duration::ZERO)))
                .await;
        }
    }

    async fn process<H: Handler>(
        &self,
        batch: Vec<Delivery>,
        handler: &H,
        max_deliver: u64,
        progress_every: Duration,
    ) {
        let started = Instant::now();
        let consumer_labels = ConsumerLabels {
            stream: self.spec.stream.clone(),
            consumer: self.spec.consumer.clone(),
        };
        self.metrics
            .batch_size
            .get_or_create(&consumer_labels)
            .observe(batch.len() as f64);
        let span =
            tracing::debug_span!("batch", consumer = %self.spec.consumer, size = batch.len());
        let outcomes = {
            let work = handler.handle(&batch).instrument(span);
            tokio::pin!(work);
            let mut ticker = tokio::time::interval(progress_every);
            ticker.tick().await;
            loop {
                tokio::select! {
                    outcomes = &mut work => break outcomes,
                    _ = ticker.tick() => {
                        for delivery in &batch {
                            let _ = delivery.message.ack_with(AckKind::Progress).await;
                        }
                    }
                }
            }
        };
        if outcomes.len() != batch.len() {
            tracing::error!(
                consumer = %self.spec.consumer,
                expected = batch.len(),
                got = outcomes.len(),
                "handler returned the wrong number of outcomes; missing ones are retried"
            );
        }
        let mut outcomes = outcomes.into_iter();
        for delivery in &batch {
            let outcome = outcomes
                .next()
                .unwrap_or_else(|| Outcome::Retry("handler returned no outcome".into()));
            self.settle(delivery, outcome, max_deliver).await;
        }
        self.metrics
            .batch_seconds
            .get_or_create(&consumer_labels)
            .observe(started.elapsed().as_secs_f64());
    }

    async fn settle(&self, delivery: &Delivery, outcome: Outcome, max_deliver: u64) {
        let _enter = delivery.span.enter();
        let message = &delivery.message;
        let result = match outcome {
            Outcome::Ack => {
                self.metrics
                    .messages
                    .get_or_create(&self.labels("acked"))
                    .inc();
                message.ack().await
            }
            Outcome::Retry(reason) if delivery.delivered >= max_deliver => {
                let reason = format!("last delivery ({}) failed: {reason}", delivery.delivered);
                return self.dead_letter(delivery, &reason, "dead_lettered").await;
            }
            Outcome::Retry(reason) => {
                let delay = self.spec.retry.delay(delivery.delivered);
                tracing::info!(
                    seq = delivery.stream_sequence,
                    delivered = delivery.delivered,
                    delay_ms = delay.as_millis() as u64,
                    %reason,
                    "retrying message"
                );
                self.metrics
                    .messages
                    .get_or_create(&self.labels("retried"))
                    .inc();
                message.ack_with(AckKind::Nak(Some(delay))).await
            }
            Outcome::Reject(reason) => {
                return self.dead_letter(delivery, &reason, "rejected").await;
            }
        };
        if let Err(error) = result {
            tracing::warn!(seq = delivery.stream_sequence, %error, "cannot settle message");
        }
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str, outcome: &'static str) {
        let message = &delivery.message;
        let original = dlq::Original {
            stream: &self.spec.stream,
            consumer: &self.spec.consumer,
            subject: message.subject.as_str(),
            stream_sequence: delivery.stream_sequence,
            delivery_count: delivery.delivered,
            payload: &message.payload,
            headers: message.headers.as_ref(),
        };
        match dlq::publish(&self.js, original, reason).await {
            Ok(()) => {
                self.metrics
                    .messages
                    .get_or_create(&self.labels(outcome))
                    .inc();
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(seq = delivery.stream_sequence, %error, "cannot terminate message");
                }
            }
            Err(error) => {
                // Never drop a message we could not copy: let it come back later.
                tracing::error!(%error, "dead letter failed; message will be redelivered");
                let delay = self.spec.retry.max;
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}
