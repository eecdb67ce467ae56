//! What every devsync service shares, written once.
//!
//! - [`config`]: typed settings, layered defaults < optional TOML file < `DEVSYNC_*` env vars,
//!   validated at start with a one-line error that names the bad setting.
//! - [`telemetry`]: `tracing` (pretty or JSON), OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set, W3C trace context carried in NATS headers, flushed on shutdown.
//! - [`nats`]: connecting with reconnect and credentials.
//! - [`topology`]: every stream, consumer, KV bucket and object store of DESIGN.md, declared
//!   idempotently in one place and checked for drift.
//! - [`worker`]: the consumer loop every service uses (batched pull, ack after success, nak with
//!   backoff, progress acks, DLQ for poison and last deliveries, metrics per outcome).
//! - [`dlq`]: dead letters: publishing them and sweeping max-delivery advisories.
//! - [`outbox`]: outputs stored with the transaction, published after commit, swept after a
//!   crash.
//! - [`lease`]: one replica at a time for singleton jobs (a KV entry with a TTL).
//! - [`retry`]: the one retry/backoff policy.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`shutdown`]: SIGTERM/SIGINT into a cancellation token that drains in-flight work.

pub mod audit;
pub mod blobs;
pub mod config;
pub mod dlq;
pub mod health;
pub mod lease;
pub mod nats;
pub mod outbox;
pub mod publish;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod worker;

pub use config::{CommonSettings, ConfigError, ConfigSources};
pub use shutdown::Shutdown;
