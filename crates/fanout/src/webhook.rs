//! Webhook delivery: the `fanout-webhook` consumer's handler.
//!
//! Each task is one `POST` of the device's desired state (JSON: device id, desired version,
//! document, campaign, request id; `Idempotency-Key: <device>:<version>`) to its registered
//! endpoint, with a timeout. A 2xx answer acknowledges the task. Anything else is retried
//! through JetStream redelivery with the workers' jittered exponential backoff, so a retry
//! holds no worker while it waits; after `webhook_attempts` attempts the task is
//! dead-lettered, and a campaign's device is marked `failed`.
//!
//! A circuit breaker per endpoint origin (scheme, host, port) opens after
//! `breaker_failures` consecutive failures: while open, tasks for that endpoint are put back
//! for later without a call, so a dead endpoint costs nothing and never slows deliveries to
//! others; after `breaker_open` one call is let through to probe it. Tasks of a batch are
//! delivered concurrently, and several worker loops share the consumer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::FanoutTask;
use devsync_runtime::audit::Auditor;
use devsync_runtime::service::Service;
use devsync_runtime::worker::{Delivery, Handler, Outcome};
use devsync_runtime::{blobs, publish};
use devsync_types::{AuditOutcome, AuditRecord, DeviceId, RequestId};
use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{self, ConsecutiveFailures};
use failsafe::{Config, Instrument, StateMachine};
use moka::sync::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tracing::Instrument as _;

use crate::FanoutSettings;

/// Webhook metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    calls: Family<Vec<(String, String)>, Counter>,
    circuits_opened: Counter,
}

impl Metrics {
    /// Registers the webhook counters.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            calls: Family::default(),
            circuits_opened: Counter::default(),
        };
        registry.register(
            "devsync_webhook_calls",
            "webhook attempts by result (delivered, failed, rejected-open)",
            metrics.calls.clone(),
        );
        registry.register(
            "devsync_webhook_circuits_opened",
            "times an endpoint's circuit opened",
            metrics.circuits_opened.clone(),
        );
        metrics
    }

    fn call(&self, result: &str) {
        self.calls
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }
}

/// Logs and counts circuit transitions of one endpoint.
#[derive(Debug, Clone)]
struct Transitions {
    endpoint: Arc<str>,
    opened: Counter,
}

impl Instrument for Transitions {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.opened.inc();
        tracing::warn!(endpoint = %self.endpoint, "webhook circuit opened");
    }

    fn on_half_open(&self) {
        tracing::info!(endpoint = %self.endpoint, "webhook circuit half-open: probing");
    }

    fn on_closed(&self) {}
}

type Breaker = StateMachine<ConsecutiveFailures<Constant>, Transitions>;

/// The `fanout-webhook` consumer's handler.
pub struct Webhooks {
    http: reqwest::Client,
    breakers: Cache<String, Breaker>,
    js: jetstream::Context,
    pool: Pool,
    auditor: Auditor,
    settings: FanoutSettings,
    metrics: Metrics,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

/// Why one call did not deliver.
enum Failure {
    /// The endpoint's circuit is open; no call was made.
    Open,
    /// The call failed.
    Call(String),
}

impl Handler for Webhooks {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let results: Vec<(Outcome, Option<AuditRecord>)> = futures::future::join_all(
            batch
                .iter()
                .map(|delivery| self.one(delivery).instrument(delivery.span.clone())),
        )
        .await;
        let audits: Vec<AuditRecord> = results.iter().filter_map(|r| r.1.clone()).collect();
        if let Err(error) = publish::publish_all(&self.js, self.auditor.message(&audits)).await {
            tracing::warn!(%error, "cannot publish webhook audit events");
        }
        results.into_iter().map(|r| r.0).collect()
    }
}

impl Webhooks {
    /// A handler for `service`.
    pub fn new(
        service: &Service,
        settings: FanoutSettings,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(settings.webhook_timeout)
            .connect_timeout(settings.webhook_timeout)
            .user_agent(concat!("devsync-fanout/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            breakers: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            js: service.js.clone(),
            pool: service.pool.clone(),
            auditor: service.auditor.clone(),
            settings,
            metrics,
        })
    }

    fn breaker(&self, origin: &str) -> Breaker {
        // `get_with` initialises once even when tasks for a new endpoint race.
        self.breakers.get_with(origin.to_owned(), || {
            Config::new()
                .failure_policy(failure_policy::consecutive_failures(
                    self.settings.breaker_failures,
                    backoff::constant(self.settings.breaker_open),
                ))
                .instrument(Transitions {
                    endpoint: origin.into(),
                    opened: self.metrics.circuits_opened.clone(),
                })
                .build()
        })
    }

    async fn one(&self, delivery: &Delivery) -> (Outcome, Option<AuditRecord>) {
        let task = match FanoutTask::decode(delivery.payload().clone()) {
            Ok(task) => task,
            Err(error) => {
                return (
                    Outcome::Reject(format!("not a webhook task: {error}")),
                    None,
                );
            }
        };
        let Some(push) = task.push.as_ref() else {
            return (Outcome::Reject("webhook task without a push".into()), None);
        };
        let device = match DeviceId::parse(push.device_id.clone()) {
            Ok(device) => device,
            Err(error) => return (Outcome::Reject(error.to_string()), None),
        };
        let url = match reqwest::Url::parse(&task.http_endpoint) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            _ => {
                return (
                    Outcome::Reject(format!("bad webhook endpoint {:?}", task.http_endpoint)),
                    None,
                );
            }
        };
        let request_id =
            RequestId::parse(task.request_id.clone()).unwrap_or_else(|_| RequestId::generate());
        let attempt = delivery.delivered();
        let version = push.desired_version;
        let origin = url.origin().ascii_serialization();
        let breaker = self.breaker(&origin);
        let result = if breaker.is_call_permitted() {
            let result = self.call(url, &device, &request_id, &task).await;
            match &result {
                Ok(()) => breaker.on_success(),
                Err(_) => breaker.on_error(),
            }
            result.map_err(Failure::Call)
        } else {
            Err(Failure::Open)
        };
        let record = |action: &str, outcome: AuditOutcome, details: Value| {
            let mut record = self.auditor.record(
                Utc::now(),
                Some(&device),
                Some(&request_id),
                "webhook",
                action,
                outcome,
                details,
            );
            // One event per attempt.
            record.event_id = format!("{}/{attempt}", record.event_id);
            Some(record)
        };
        match result {
            Ok(()) => {
                self.metrics.call("delivered");
                (
                    Outcome::Ack,
                    record(
                        "webhook.delivered",
                        AuditOutcome::Ok,
                        json!({"desired_version": version, "endpoint": origin, "attempt": attempt}),
                    ),
                )
            }
            Err(failure) => {
                let (reason, result) = match failure {
                    Failure::Open => ("circuit open".to_owned(), "rejected-open"),
                    Failure::Call(error) => (error, "failed"),
                };
                self.metrics.call(result);
                if attempt >= self.settings.webhook_attempts {
                    if !push.campaign_id.is_empty() {
                        self.fail_campaign_device(&push.campaign_id, &device, &reason)
                            .await;
                    }
                    (
                        Outcome::Reject(format!(
                            "webhook failed after {attempt} attempts: {reason}"
                        )),
                        record(
                            "webhook.failed",
                            AuditOutcome::Failed,
                            json!({"desired_version": version, "endpoint": origin, "attempt": attempt, "error": reason}),
                        ),
                    )
                } else {
                    (
                        Outcome::Retry(reason.clone()),
                        record(
                            "webhook.attempt",
                            AuditOutcome::Retry,
                            json!({"desired_version": version, "endpoint": origin, "attempt": attempt, "error": reason}),
                        ),
                    )
                }
            }
        }
    }

    async fn call(
        &self,
        url: reqwest::Url,
        device: &DeviceId,
        request_id: &RequestId,
        task: &FanoutTask,
    ) -> Result<(), String> {
        let push = task.push.as_ref().expect("checked by the caller");
        let document = match &push.desired {
            Some(payload) => {
                let bytes = blobs::load(&self.js, payload).await?;
                serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("document: {e}"))?
            }
            None => Value::Null,
        };
        let body = json!({
            "device_id": device.as_str(),
            "desired_version": push.desired_version,
            "desired": document,
            "campaign_id": push.campaign_id,
            "request_id": request_id.as_str(),
        });
        let response = self
            .http
            .post(url)
            .header(
                "Idempotency-Key",
                format!("{device}:{}", push.desired_version),
            )
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    format!("request failed: {e}")
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("endpoint answered {status}"))
        }
    }

    async fn fail_campaign_device(&self, campaign: &str, device: &DeviceId, reason: &str) {
        let result = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    "UPDATE campaign_devices SET status = 'failed', error = $3, updated_at = now()
                     WHERE campaign_id = $1 AND device_id = $2 AND status IN ('sent', 'pending')",
                    &[&campaign, &device.as_str(), &format!("webhook: {reason}")],
                )
                .await
                .map_err(|e| devsync_store::describe(&e))
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, campaign, device_id = %device, "cannot record the failed delivery");
        }
    }
}
