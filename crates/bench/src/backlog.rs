//! Scenario d: a backlog built while the reconciler is stopped, then drained.
//!
//! Device reports (the same sync requests the requestor makes of accepted reports, with the
//! same deterministic message ids) are published into `DEVSYNC_REQ` while no reconciler
//! runs; then a reconciler process starts and drains them. Measured: how fast the backlog
//! was built and drained, that every report was applied exactly once (zero loss: each
//! device's reported version equals the reports it sent), and the reconciler's peak RSS at a
//! quarter and at the end of the drain, which must be flat (it pulls bounded batches, however
//! long the backlog).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use devsync_proto::Message as _;
use devsync_proto::v1::{self as pb, DeviceReport, Payload, SyncRequest, payload, sync_request};
use devsync_runtime::publish::{self, Outgoing};
use devsync_types::convert::timestamp;
use devsync_types::{DeviceId, Lane, MessageKind, RequestId, names, subjects};
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::procs::{ProcStats, ServiceProcess};

/// What scenario d measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub requests: u64,
    pub devices: u64,
    pub built_per_second: f64,
    pub drained_per_second: f64,
    /// Reports applied (sum of reported versions over the scenario's devices); equal to
    /// `requests` when nothing was lost or applied twice.
    pub applied: u64,
    pub reconciler_rss_quarter_mib: f64,
    pub reconciler: ProcStats,
}

fn device(index: u64) -> DeviceId {
    DeviceId::parse(format!("bkl-{index:06}")).expect("valid id")
}

fn report(device: &DeviceId, sequence: u64) -> Outgoing {
    let request_id = RequestId::for_device_message(device, MessageKind::Report, sequence);
    let body = format!("{{\"temp\": {}, \"seq\": {sequence}}}", 20 + sequence % 10);
    let request = SyncRequest {
        request_id: request_id.to_string(),
        device_id: device.to_string(),
        lane: pb::Lane::Rt as i32,
        received_at: Some(timestamp(Utc::now())),
        causation_id: String::new(),
        kind: Some(sync_request::Kind::Report(DeviceReport {
            device_id: device.to_string(),
            sequence,
            reported: Some(Payload {
                body: Some(payload::Body::InlineJson(Bytes::from(body))),
            }),
            full: false,
            sent_at: None,
        })),
        reply_to: String::new(),
        accepted_by: String::new(),
    };
    Outgoing {
        subject: subjects::request(Lane::Rt, device),
        msg_id: request_id.to_string(),
        payload: request.encode_to_vec().into(),
        headers: None,
    }
}

/// Runs scenario d: `devices` devices × `per_device` reports.
pub async fn run(
    nats_url: &str,
    database_url: &str,
    dir: &Path,
    devices: u64,
    per_device: u64,
) -> anyhow::Result<Results> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO devices (id) SELECT 'bkl-' || lpad(i::text, 6, '0')
             FROM generate_series(0, $1::int8 - 1) AS i ON CONFLICT DO NOTHING",
            &[&(devices as i64)],
        )
        .await?;
    let nats = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(nats);
    let requests = devices * per_device;
    println!("scenario d: building a backlog of {requests} requests, no reconciler running");
    let started = Instant::now();
    // Sequence-major order, as devices report over time.
    let mut batch = Vec::with_capacity(5000);
    for sequence in 1..=per_device {
        for index in 0..devices {
            batch.push(report(&device(index), sequence));
            if batch.len() == 5000 {
                publish::publish_all(&js, std::mem::take(&mut batch)).await?;
            }
        }
    }
    publish::publish_all(&js, batch).await?;
    let built = started.elapsed().as_secs_f64();
    let stored = js
        .get_stream(names::STREAM_REQ)
        .await?
        .info()
        .await?
        .state
        .messages;
    println!("scenario d: {stored} requests waiting after {built:.1}s; starting the reconciler");

    let env = vec![
        ("DEVSYNC_NATS__URL".to_owned(), nats_url.to_owned()),
        ("DEVSYNC_DATABASE__URL".to_owned(), database_url.to_owned()),
    ];
    let drain_started = Instant::now();
    let mut reconciler = ServiceProcess::spawn("devsync-reconciler", &env, dir)?;
    reconciler.wait_ready(Duration::from_secs(60)).await?;
    let mut quarter_rss = None;
    let mut last_print = Instant::now();
    loop {
        let left = js
            .get_stream(names::STREAM_REQ)
            .await?
            .info()
            .await?
            .state
            .messages;
        if quarter_rss.is_none() && left <= stored * 3 / 4 {
            quarter_rss = Some(reconciler.stats().peak_rss_mib);
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "scenario d: {left} requests left after {:.0}s",
                drain_started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if left == 0 {
            break;
        }
        if drain_started.elapsed() > Duration::from_secs(3600) {
            anyhow::bail!("the backlog was not drained within an hour ({left} left)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = drain_started.elapsed().as_secs_f64();
    let applied: i64 = client
        .query_one(
            "SELECT coalesce(sum(reported_version), 0)::int8 FROM devices WHERE id LIKE 'bkl-%'",
            &[],
        )
        .await?
        .get(0);
    let stats = reconciler.stop();
    Ok(Results {
        requests,
        devices,
        built_per_second: requests as f64 / built,
        drained_per_second: requests as f64 / drained,
        applied: applied as u64,
        reconciler_rss_quarter_mib: quarter_rss.unwrap_or(0.0),
        reconciler: stats,
    })
}
