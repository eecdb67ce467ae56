//! The audit store: ingest rate of audit events through the audit service (published to
//! `DEVSYNC_AUDIT` in batches, as the services publish them, until all are stored), and search
//! latency by device over a large stored history.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use devsync_runtime::audit::Auditor;
use devsync_types::{AuditOutcome, AuditRecord, DeviceId, RequestId, ServiceName, WorkerId};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::procs::{ProcStats, ServiceProcess};

/// What the audit scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub ingested_events: u64,
    pub ingest_per_second: f64,
    pub stored_events: u64,
    pub search_devices: usize,
    pub searches: usize,
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
    pub service: ProcStats,
}

fn record(index: u64, devices: u64, at: chrono::DateTime<Utc>, worker: &WorkerId) -> AuditRecord {
    let device = format!("audit-{:06}", index % devices);
    AuditRecord {
        event_id: format!("bench-{index}"),
        at,
        device_id: Some(DeviceId::parse(device).expect("valid")),
        worker_id: worker.clone(),
        request_id: Some(RequestId::parse(format!("report:bench:{index}")).expect("valid")),
        stage: "reconcile".into(),
        action: "report.applied".into(),
        outcome: AuditOutcome::Ok,
        details: serde_json::json!({"sequence": index, "reported_version": index % 97}),
        trace_id: None,
    }
}

/// Runs the audit scenario: `ingest` events through the service, then `history` events stored
/// directly, then 1000 searches by device.
pub async fn run(
    nats_url: &str,
    database_url: &str,
    dir: &Path,
    ingest: u64,
    history: u64,
) -> anyhow::Result<Results> {
    let env = vec![
        ("DEVSYNC_NATS__URL".to_owned(), nats_url.to_owned()),
        ("DEVSYNC_DATABASE__URL".to_owned(), database_url.to_owned()),
    ];
    let mut service = ServiceProcess::spawn("devsync-audit", &env, dir)?;
    service.wait_ready(Duration::from_secs(60)).await?;
    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    let before: i64 = client
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await?
        .get(0);

    // Ingest: batches of 100 events, as a reconciler batch would publish them.
    println!("audit: ingesting {ingest} events through the audit service");
    let nats = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(nats);
    let worker = WorkerId::new(ServiceName::Reconciler, "bench").expect("valid");
    let auditor = Auditor::new(worker.clone());
    let now = Utc::now();
    let started = Instant::now();
    let mut messages = Vec::new();
    for chunk in 0..ingest.div_ceil(100) {
        let records: Vec<AuditRecord> = (chunk * 100..((chunk + 1) * 100).min(ingest))
            .map(|i| record(i, 10_000, now, &worker))
            .collect();
        messages.extend(auditor.message(&records));
        if messages.len() >= 500 {
            devsync_runtime::publish::publish_all(&js, std::mem::take(&mut messages)).await?;
        }
    }
    devsync_runtime::publish::publish_all(&js, messages).await?;
    // Progress from the service's own counter: a count(*) every 100 ms would itself scan up to
    // a million rows and take CPU from the ingest it measures.
    service
        .wait_for_counter(
            "devsync_audit_events_stored_total",
            ingest,
            started,
            Duration::from_secs(1800),
            Duration::from_millis(100),
        )
        .await?;
    let ingest_per_second = ingest as f64 / started.elapsed().as_secs_f64();
    let counted: i64 = client
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        (counted - before) as u64 == ingest,
        "audit ingest: the service counted {ingest} events stored, the table grew by {}",
        counted - before
    );
    let stats = service.stop();

    // History: stored directly, spread over the last 20 days and 10,000 devices.
    println!("audit: storing a history of {history} events for the search measurement");
    let pool = devsync_store::pool(database_url, 4)?;
    let chunk_size = 20_000u64;
    let mut tasks = tokio::task::JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..3 {
        let pool = pool.clone();
        let next = next.clone();
        let worker = worker.clone();
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(chunk_size, std::sync::atomic::Ordering::Relaxed);
                if start >= history {
                    break;
                }
                let records: Vec<AuditRecord> = (start..(start + chunk_size).min(history))
                    .map(|i| {
                        let at = now - chrono::Duration::seconds((i * 17 % (20 * 86_400)) as i64);
                        record(ingest + i, 10_000, at, &worker)
                    })
                    .collect();
                let mut client = pool.get().await?;
                devsync_store::audit::insert(&mut client, &records).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    client.batch_execute("ANALYZE audit_events").await?;
    let stored: i64 = client
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await?
        .get(0);

    // Searches: the last 100 events of a random device over the last 7 days.
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let searches = 1000;
    let store_client = pool.get().await?;
    for i in 0..searches {
        let query = devsync_store::audit::Query {
            device: Some(DeviceId::parse(format!(
                "audit-{:06}",
                (i * 7919) % 10_000
            ))?),
            since: Some(now - chrono::Duration::days(7)),
            limit: 100,
            ..Default::default()
        };
        let started = Instant::now();
        let page = devsync_store::audit::search(&store_client, &query).await?;
        latency.record(started.elapsed().as_micros() as u64)?;
        anyhow::ensure!(!page.events.is_empty(), "search found nothing");
    }
    Ok(Results {
        ingested_events: ingest,
        ingest_per_second,
        stored_events: stored as u64,
        search_devices: 10_000,
        searches,
        search_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        search_p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        service: stats,
    })
}
