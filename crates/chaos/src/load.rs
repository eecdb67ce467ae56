//! The load generator and its ledger. Simulated devices report through the real device client
//! (request/reply, retries with the same sequence) and every report is logged with its outcome:
//! acknowledged (durable: devsync must apply it), refused (devsync said no: it must not), or
//! unknown (no answer: it may or may not be applied). Each report writes a field of its own
//! (`s<sequence>`), so the checker can tell exactly which reports reached the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devsync_device::{Device, DeviceError, RetryPolicy};
use devsync_types::DeviceId;
use governor::{Quota, RateLimiter};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What happened to one report, as the device saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Acked,
    Refused,
    Unknown,
}

/// One report sent.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub sequence: u64,
    pub outcome: Sent,
    /// When it was sent, from the start of the load.
    pub at: Duration,
    pub latency: Duration,
}

/// Everything a load sent, per device.
#[derive(Debug, Default)]
pub struct Ledger {
    pub devices: Vec<(DeviceId, Vec<Entry>)>,
}

impl Ledger {
    /// Appends a later load over the same devices.
    pub fn merge(&mut self, later: Ledger) {
        for (id, entries) in later.devices {
            match self.devices.iter_mut().find(|(d, _)| *d == id) {
                Some((_, mine)) => mine.extend(entries),
                None => self.devices.push((id, entries)),
            }
        }
    }

    pub fn count(&self, outcome: Sent) -> usize {
        self.entries().filter(|e| e.outcome == outcome).count()
    }

    pub fn total(&self) -> usize {
        self.entries().count()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.devices.iter().flat_map(|(_, entries)| entries.iter())
    }

    /// The p99 answer latency (ms) of acknowledged reports sent within `window`.
    pub fn p99_ms(&self, window: Option<(Duration, Duration)>) -> Option<f64> {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).ok()?;
        for entry in self.entries() {
            let inside = window.is_none_or(|(from, to)| entry.at >= from && entry.at <= to);
            if entry.outcome == Sent::Acked && inside {
                let _ = histogram.record(entry.latency.as_micros().max(1) as u64);
            }
        }
        (!histogram.is_empty()).then(|| histogram.value_at_quantile(0.99) as f64 / 1000.0)
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Devices `sim-000000`.. (registered by the environment).
    pub devices: std::ops::Range<usize>,
    pub reports_per_device: u64,
    /// Reports per second over all devices; `None` sends as fast as answers come.
    pub rate: Option<u32>,
    /// The first sequence is `first_sequence + 1`.
    pub first_sequence: u64,
    pub retry: RetryPolicy,
}

impl LoadSpec {
    pub fn new(devices: usize, reports_per_device: u64) -> Self {
        Self {
            devices: 0..devices,
            reports_per_device,
            rate: None,
            first_sequence: 0,
            retry: RetryPolicy {
                timeout: Duration::from_secs(3),
                attempts: 8,
                backoff: Duration::from_millis(200),
            },
        }
    }
}

/// The payload of report `sequence`: a field of its own, and the newest sequence.
pub fn report(sequence: u64) -> serde_json::Value {
    json!({ format!("s{sequence}"): sequence, "last": sequence })
}

/// Sends the load over `connections` NATS connections; stops early when `stop` is set (the
/// reports not sent are simply not in the ledger).
pub async fn run_owned(
    nats_url: String,
    spec: LoadSpec,
    stop: CancellationToken,
) -> anyhow::Result<Ledger> {
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(crate::env::connect(&nats_url).await?);
    }
    let limiter = spec.rate.map(|rate| {
        Arc::new(RateLimiter::direct(Quota::per_second(
            std::num::NonZeroU32::new(rate.max(1)).expect("at least 1"),
        )))
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in spec.devices.clone() {
        let id = devsync_sim::device_id(index);
        let device = Device::with_client(
            clients[index % clients.len()].clone(),
            id.clone(),
            spec.first_sequence,
        )
        .with_retry(spec.retry);
        let (limiter, stop) = (limiter.clone(), stop.clone());
        let reports = spec.reports_per_device;
        tasks.spawn(async move {
            let mut entries = Vec::with_capacity(reports as usize);
            for _ in 0..reports {
                if stop.is_cancelled() {
                    break;
                }
                if let Some(limiter) = &limiter {
                    limiter.until_ready().await;
                }
                let sequence = device.last_sequence() + 1;
                let at = started.elapsed();
                let sent = Instant::now();
                let outcome = match device.report(&report(sequence), false).await {
                    Ok(_) => Sent::Acked,
                    Err(DeviceError::Refused { .. }) => Sent::Refused,
                    Err(_) => Sent::Unknown,
                };
                entries.push(Entry {
                    sequence,
                    outcome,
                    at,
                    latency: sent.elapsed(),
                });
            }
            (id, entries)
        });
    }
    let mut ledger = Ledger::default();
    while let Some(done) = tasks.join_next().await {
        ledger.devices.push(done?);
    }
    ledger.devices.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(ledger)
}
