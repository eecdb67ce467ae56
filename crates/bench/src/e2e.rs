//! Scenario (a): device reports end to end. Devices (simulated with request/reply, as the
//! device client does it) send reports through the requestor and reconciler, run as separate
//! processes, into PostgreSQL, while the audit service stores every resulting audit event.
//! Each device sends its reports one at a time, as the protocol asks; `concurrency` devices
//! are active at once. Scenario (c) paces reports at half the peak with refreshes beside them
//! and notes what PostgreSQL's autovacuum did meanwhile.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use devsync_proto::Message as _;
use devsync_proto::v1::{DeviceReport, Payload, payload};
use devsync_types::{MessageKind, subjects};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::procs::{self, ProcStats, ServiceProcess};

/// What the scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub devices: usize,
    pub reports: u64,
    /// Reports answered by the requestor (durable) per second.
    pub ingest_per_second: f64,
    /// Reports applied in PostgreSQL per second, from the first send to the last commit.
    pub applied_per_second: f64,
    /// Reports per second with their whole audit trail stored too: from the first send until
    /// `DEVSYNC_AUDIT` is empty (the audit service caught up).
    pub audited_per_second: f64,
    pub ingress_p50_ms: f64,
    pub ingress_p99_ms: f64,
    pub ingress_p999_ms: f64,
    /// Report to database commit (from the reconciler's histogram; bucket upper bounds).
    pub report_to_db_p50_ms: Option<f64>,
    pub report_to_db_p99_ms: Option<f64>,
    pub errors: u64,
    /// Refreshes at 1,000/s while the report load runs at full speed.
    pub refresh_under_load: Option<RefreshFigures>,
    /// Refreshes at 1,000/s while reports are paced at half the measured peak (scenario c).
    pub refresh_half_load: Option<RefreshFigures>,
    /// The paced report load of scenario c.
    pub half_load: Option<PacedFigures>,
    /// Refreshes at 1,000/s once the load is over.
    pub refresh_idle: Option<RefreshFigures>,
    pub services: Vec<ProcStats>,
    /// The full-speed load second by second (cumulative counts).
    pub timeline: Vec<Sample>,
    /// Ingress answer latency by percentile: (percentile, ms), for the chart.
    pub ingress_percentiles: Vec<(f64, f64)>,
}

/// Cumulative counts at one point of the full-speed load.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the first report was sent.
    pub second: f64,
    /// Reports answered by the requestor as durable.
    pub accepted: u64,
    /// Reports applied in PostgreSQL (the reconciler's counter).
    pub applied: u64,
}

/// Reports sent at a fixed rate (scenario c), and what became of them.
#[derive(Debug, Clone, Serialize)]
pub struct PacedFigures {
    /// Reports answered as durable.
    pub sent: u64,
    pub per_second: f64,
    pub ingress_p50_ms: f64,
    pub ingress_p99_ms: f64,
    /// Report to database commit over these reports only (the reconciler's histogram between
    /// two scrapes; bucket upper bounds, buckets 1.5 times apart).
    pub to_db_p50_ms: Option<f64>,
    pub to_db_p99_ms: Option<f64>,
    /// What PostgreSQL's autovacuum did meanwhile (the largest cause of this scenario's
    /// variance from run to run).
    pub autovacuum: Option<AutovacuumFigures>,
}

/// PostgreSQL's autovacuum workers over a scenario, sampled every [`AUTOVACUUM_SAMPLE`]: it
/// runs when the tables it watches have changed enough, which after scenario a is at a time
/// of its own choosing, and takes a good part of a core while it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AutovacuumFigures {
    /// Share of the samples in which at least one autovacuum worker was running.
    pub busy_share: f64,
    /// What the workers were doing (`VACUUM public.devices`, ...), each once, in order.
    pub work: Vec<String>,
}

/// How often [`watch_autovacuum`] looks.
const AUTOVACUUM_SAMPLE: Duration = Duration::from_millis(500);

/// Samples `pg_stat_activity` for autovacuum workers until `stop`.
async fn watch_autovacuum(
    client: &tokio_postgres::Client,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<AutovacuumFigures> {
    let mut ticker = tokio::time::interval(AUTOVACUUM_SAMPLE);
    let (mut samples, mut busy) = (0u32, 0u32);
    let mut work = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let rows = client
            .query(
                "SELECT regexp_replace(query, '^autovacuum: ', '') FROM pg_stat_activity
                 WHERE backend_type = 'autovacuum worker' AND coalesce(query, '') <> ''",
                &[],
            )
            .await
            .context("sample autovacuum workers")?;
        samples += 1;
        if !rows.is_empty() {
            busy += 1;
        }
        work.extend(rows.iter().map(|row| row.get::<_, String>(0)));
    }
    Ok(AutovacuumFigures {
        busy_share: f64::from(busy) / f64::from(samples.max(1)),
        work: work.into_iter().collect(),
    })
}

/// The percentiles drawn in the latency chart.
const PERCENTILES: [f64; 12] = [
    1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
];

/// Samples the cumulative counts every second until `stop`.
async fn sample(
    started: Instant,
    accepted: Arc<AtomicU64>,
    reconciler_http: String,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Sample> {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Ok(metrics) = procs::scrape(&reconciler_http).await else {
            continue;
        };
        samples.push(Sample {
            second: started.elapsed().as_secs_f64(),
            accepted: accepted.load(Ordering::Relaxed),
            applied: procs::counter(&metrics, "devsync_reports_applied_total").unwrap_or(0.0)
                as u64,
        });
    }
    samples
}

/// Latency of refreshes sent at a fixed rate.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshFigures {
    pub sent: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// p99 of the requestor's own answer time (`devsync_refresh_seconds`, bucket bound) over
    /// the same refreshes: the rest of the round trip is NATS, the network stack and waiting
    /// for a CPU.
    pub in_requestor_p99_ms: Option<f64>,
}

/// Sends reports at `rate` per second for `duration` (sequences above `first_sequence`),
/// measuring the ingress answer time; the time to the database is filled in by the caller.
async fn paced_reports(
    client: async_nats::Client,
    devices: usize,
    first_sequence: u64,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<PacedFigures> {
    // Report n is due at n / rate seconds after the start: each worker sleeps until the due
    // time of the next report it takes. (A shared rate limiter's waiters — 500 of them — kept
    // a timer thread busy, taking CPU from the system under test.)
    let interval = Duration::from_secs(1) / rate.max(1);
    let started = tokio::time::Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut sent = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let due = started + interval * index as u32;
                if due.duration_since(started) >= duration {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let device = devsync_sim::device_id(index % devices);
                // Each device's sequence keeps growing: round r of device d is first + r + 1.
                let sequence = first_sequence + (index / devices) as u64 + 1;
                let body = report_payload(device.as_str(), sequence);
                let at = Instant::now();
                if let Ok(Ok(_)) = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.request(subjects::ingress(&device, MessageKind::Report), body),
                )
                .await
                {
                    let _ = histogram.record(at.elapsed().as_micros() as u64);
                    sent += 1;
                }
            }
            (histogram, sent)
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sent = 0;
    while let Some(done) = workers.join_next().await {
        let (histogram, count) = done?;
        latency.add(histogram)?;
        sent += count;
    }
    Ok(PacedFigures {
        sent,
        per_second: sent as f64 / started.elapsed().as_secs_f64(),
        ingress_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        ingress_p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        to_db_p50_ms: None,
        to_db_p99_ms: None,
        autovacuum: None,
    })
}

/// Refreshes at 1,000/s for 10 s, sent as waking devices elsewhere would send them: on a
/// thread and runtime of their own with their own connection. Sharing the bench's runtime,
/// each answer waited behind thousands of simulated devices' tasks before its arrival was
/// even read, and the bench measured itself.
struct RefreshProbe {
    /// The requestor's metrics when the probe started.
    before: String,
    figures: tokio::sync::oneshot::Receiver<anyhow::Result<RefreshFigures>>,
}

impl RefreshProbe {
    /// Starts sending after `delay`.
    async fn start(
        requestor: &ServiceProcess,
        nats_url: &str,
        devices: usize,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let before = requestor.metrics().await.unwrap_or_default();
        let url = nats_url.to_owned();
        let (done, figures) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("refresh-probe".into())
            .spawn(move || {
                let outcome = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async {
                            tokio::time::sleep(delay).await;
                            let client = async_nats::connect(url).await?;
                            refreshes(client, devices, 1000, Duration::from_secs(10)).await
                        })
                    });
                let _ = done.send(outcome);
            })?;
        Ok(Self { before, figures })
    }

    /// The probe's figures once it is done, with the requestor's own answer time over it.
    async fn finish(self, requestor: &ServiceProcess) -> Option<RefreshFigures> {
        let mut figures = self.figures.await.ok()?.ok()?;
        let after = requestor.metrics().await.unwrap_or_default();
        figures.in_requestor_p99_ms = procs::histogram_quantile_between(
            &self.before,
            &after,
            "devsync_refresh_seconds",
            0.99,
        )
        .map(|seconds| seconds * 1000.0);
        Some(figures)
    }
}

/// Sends refreshes from random devices at `rate` per second for `duration`.
async fn refreshes(
    client: async_nats::Client,
    devices: usize,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<RefreshFigures> {
    use devsync_proto::v1::RefreshRequest;
    let total = rate * duration.as_secs();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        let client = client.clone();
        let device = devsync_sim::device_id((i as usize * 7919) % devices);
        tasks.spawn(async move {
            let request = RefreshRequest {
                device_id: String::new(),
                since_version: i % 3,
                sequence: i + 1,
            };
            let sent = Instant::now();
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                client.request(
                    subjects::ingress(&device, MessageKind::Refresh),
                    request.encode_to_vec().into(),
                ),
            )
            .await;
            let ok = matches!(&reply, Ok(Ok(m)) if m.headers.as_ref()
                .and_then(|h| h.get(subjects::STATUS_HEADER))
                .is_some_and(|v| v.as_str() == subjects::STATUS_OK));
            (ok, sent.elapsed())
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (ok, elapsed) = done?;
        if ok {
            latency.record(elapsed.as_micros() as u64)?;
        } else {
            errors += 1;
        }
    }
    Ok(RefreshFigures {
        sent: total,
        per_second: total as f64 / started.elapsed().as_secs_f64(),
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
        in_requestor_p99_ms: None,
    })
}

fn report_payload(device: &str, sequence: u64) -> Bytes {
    let state = serde_json::json!({
        "temperature": 20.0 + (sequence % 10) as f64 / 10.0,
        "battery": 100 - (sequence % 100),
        "uptime_s": sequence * 60,
        "fw": "1.4.2",
        "rssi": -61,
        "mode": "normal",
        "location": {"lat": 48.8566, "lon": 2.3522},
        "note": "bench payload padding to about three hundred bytes on the wire...",
    });
    DeviceReport {
        device_id: device.to_owned(),
        sequence,
        reported: Some(Payload {
            body: Some(payload::Body::InlineJson(
                serde_json::to_vec(&state).unwrap_or_default().into(),
            )),
        }),
        full: false,
        sent_at: None,
    }
    .encode_to_vec()
    .into()
}

/// Runs the scenario.
pub async fn run(
    nats_url: &str,
    database_url: &str,
    dir: &Path,
    devices: usize,
    per_device: u64,
    concurrency: usize,
) -> anyhow::Result<Results> {
    devsync_sim::register(database_url, devices).await?;
    let env = vec![
        ("DEVSYNC_NATS__URL".to_owned(), nats_url.to_owned()),
        ("DEVSYNC_DATABASE__URL".to_owned(), database_url.to_owned()),
    ];
    let mut requestor = ServiceProcess::spawn("devsync-requestor", &env, dir)?;
    let mut reconciler = ServiceProcess::spawn("devsync-reconciler", &env, dir)?;
    let mut audit = ServiceProcess::spawn("devsync-audit", &env, dir)?;
    requestor.wait_ready(Duration::from_secs(60)).await?;
    reconciler.wait_ready(Duration::from_secs(60)).await?;
    audit.wait_ready(Duration::from_secs(60)).await?;
    // Let the reconciler take its partitions.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Some devices have desired state, so refreshes return deltas and full documents.
    let (setup, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    setup
        .batch_execute(
            "UPDATE devices SET desired = '{\"mode\": \"eco\", \"interval_s\": 60}' WHERE id < 'sim-005000';
             UPDATE devices SET desired = desired || '{\"mode\": \"normal\"}' WHERE id < 'sim-002000';
             DELETE FROM desired_changes;",
        )
        .await?;
    let total = devices as u64 * per_device;
    println!("scenario a: {total} reports from {devices} devices, {concurrency} devices at once");
    let refresh_load =
        RefreshProbe::start(&requestor, nats_url, devices, Duration::from_secs(5)).await?;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(async_nats::connect(nats_url).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample(
        started,
        accepted.clone(),
        reconciler.http.clone(),
        stop_sampling.clone(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let client = clients[worker % clients.len()].clone();
        let next = next.clone();
        let errors = errors.clone();
        let accepted = accepted.clone();
        workers.spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= devices {
                    break;
                }
                let device = devsync_sim::device_id(index);
                let subject = subjects::ingress(&device, MessageKind::Report);
                for sequence in 1..=per_device {
                    let body = report_payload(device.as_str(), sequence);
                    for _attempt in 0..10 {
                        let sent = Instant::now();
                        let reply = tokio::time::timeout(
                            Duration::from_secs(10),
                            client.request(subject.clone(), body.clone()),
                        )
                        .await;
                        let ok = matches!(&reply, Ok(Ok(message)) if message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(subjects::STATUS_HEADER))
                            .is_some_and(|v| v.as_str() == subjects::STATUS_OK));
                        if ok {
                            let _ = histogram.record(sent.elapsed().as_micros() as u64);
                            accepted.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            histogram
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(histogram) = workers.join_next().await {
        latency.add(histogram?)?;
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    println!("scenario a: ingested in {ingest_seconds:.1}s; waiting for the database to catch up");

    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    // Progress from the reconciler's counter (a count over the devices table every 200 ms
    // would take PostgreSQL CPU from the load it measures); the table is checked once after.
    reconciler
        .wait_for_counter(
            "devsync_reports_applied_total",
            total,
            started,
            Duration::from_secs(3600),
            Duration::from_millis(200),
        )
        .await?;
    let applied_seconds = started.elapsed().as_secs_f64();
    // The audit trail is part of end to end; and scenario c must start from a system at rest,
    // not one still storing the full-speed load's audit events.
    let audit_stream = async_nats::jetstream::new(clients[0].clone())
        .get_stream(devsync_types::names::STREAM_AUDIT)
        .await?;
    loop {
        let info = audit_stream.get_info().await?;
        if info.state.messages == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the audit service did not catch up within an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let audited_seconds = started.elapsed().as_secs_f64();
    println!(
        "scenario a: applied after {applied_seconds:.1}s, audit trail stored after {audited_seconds:.1}s"
    );
    stop_sampling.cancel();
    let timeline = sampler.await?;
    let per_device_i64 = per_device as i64;
    let done: i64 = client
        .query_one(
            "SELECT count(*) FROM devices WHERE id LIKE 'sim-%' AND last_seq >= $1",
            &[&per_device_i64],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        done as usize == devices,
        "the reconciler counted {total} reports applied, but only {done} of {devices} devices \
         have all their reports"
    );
    let refresh_under_load = refresh_load.finish(&requestor).await;
    // Scenario c: reports paced at half the measured peak, refreshes at 1,000/s alongside.
    let half = (total as f64 / applied_seconds / 2.0) as u32;
    println!("scenario c: reports paced at {half}/s with refreshes at 1,000/s");
    let paced = paced_reports(
        clients[0].clone(),
        devices,
        per_device,
        half,
        Duration::from_secs(20),
    );
    let before_paced = reconciler.metrics().await.unwrap_or_default();
    let refresh_half =
        RefreshProbe::start(&requestor, nats_url, devices, Duration::from_secs(5)).await?;
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let paced = async {
        let figures = paced.await;
        stop_watching.cancel();
        figures
    };
    let (half_load, refresh_half_load, autovacuum) = tokio::join!(
        paced,
        refresh_half.finish(&requestor),
        watch_autovacuum(&client, stop_watching.clone())
    );
    let mut half_load = half_load.ok();
    if let Some(paced) = half_load.as_mut() {
        paced.autovacuum = match autovacuum {
            Ok(figures) => Some(figures),
            Err(error) => {
                eprintln!("scenario c: autovacuum not sampled: {error:#}");
                None
            }
        };
        // Every paced report applied, then its share of the reconciler's histogram.
        reconciler
            .wait_for_counter(
                "devsync_reports_applied_total",
                total + paced.sent,
                Instant::now(),
                Duration::from_secs(120),
                Duration::from_millis(200),
            )
            .await?;
        let after_paced = reconciler.metrics().await.unwrap_or_default();
        let to_db = |q| {
            procs::histogram_quantile_between(
                &before_paced,
                &after_paced,
                "devsync_report_to_db_seconds",
                q,
            )
            .map(|seconds| seconds * 1000.0)
        };
        paced.to_db_p50_ms = to_db(0.5);
        paced.to_db_p99_ms = to_db(0.99);
    }
    let refresh_idle = RefreshProbe::start(&requestor, nats_url, devices, Duration::ZERO)
        .await?
        .finish(&requestor)
        .await;
    let metrics = reconciler.metrics().await.context("reconciler metrics")?;
    let to_db = |q| {
        procs::histogram_quantile(&metrics, "devsync_report_to_db_seconds", q)
            .map(|seconds| seconds * 1000.0)
    };
    let results = Results {
        devices,
        reports: total,
        ingest_per_second: total as f64 / ingest_seconds,
        applied_per_second: total as f64 / applied_seconds,
        audited_per_second: total as f64 / audited_seconds,
        ingress_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        ingress_p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        ingress_p999_ms: latency.value_at_quantile(0.999) as f64 / 1000.0,
        report_to_db_p50_ms: to_db(0.5),
        report_to_db_p99_ms: to_db(0.99),
        errors: errors.load(Ordering::Relaxed),
        refresh_under_load,
        refresh_half_load,
        half_load,
        refresh_idle,
        services: vec![requestor.stop(), reconciler.stop(), audit.stop()],
        timeline,
        ingress_percentiles: PERCENTILES
            .iter()
            .map(|p| (*p, latency.value_at_percentile(*p) as f64 / 1000.0))
            .collect(),
    };
    Ok(results)
}
