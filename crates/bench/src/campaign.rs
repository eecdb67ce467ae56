//! Scenario b: one campaign over many registered devices, policy `push`, no rate limit and no
//! max in flight. The requestor (campaign driver, holding the scheduler lease) and the fan-out
//! run as processes, as deployed. Measured: devices per second from the campaign's creation to
//! the last delivery through NATS (KV last value + notification), the driver's dispatch rate
//! alone, and the fan-out's peak RSS, which must not grow with the campaign's size (it handles
//! one batch of devices at a time).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use devsync_store::campaigns::{self, AbortCriteria, NewCampaign, Selector};
use devsync_types::{CampaignId, PushPolicy};
use serde::Serialize;
use serde_json::{Map, json};
use tokio_postgres::NoTls;

use crate::procs::{ProcStats, ServiceProcess};

/// What scenario b measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub devices: u64,
    /// Campaign created to the last device delivered.
    pub seconds: f64,
    pub delivered_per_second: f64,
    /// Campaign created to the last device dispatched by the driver (patched in PostgreSQL and
    /// handed to the fan-out).
    pub dispatch_seconds: f64,
    pub dispatched_per_second: f64,
    /// Fan-out peak RSS sampled at a quarter of the run and at its end (MiB): flat means it
    /// does not grow with the campaign.
    pub fanout_rss_quarter_mib: f64,
    pub processes: Vec<ProcStats>,
}

const DELIVERED: &str = "devsync_fanout_deliveries_total{result=\"delivered\",source=\"campaign\"}";

/// Runs scenario b over `devices` devices (registered here with label `fleet=campaign`).
pub async fn run(
    nats_url: &str,
    database_url: &str,
    dir: &Path,
    devices: u64,
) -> anyhow::Result<Results> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    println!("scenario b: registering {devices} devices");
    client
        .execute(
            "INSERT INTO devices (id, labels, last_seen)
             SELECT 'cmp-' || lpad(i::text, 7, '0'), '{\"fleet\": \"campaign\"}', now()
             FROM generate_series(0, $1::int8 - 1) AS i ON CONFLICT DO NOTHING",
            &[&(devices as i64)],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE devices").await?;
    let env = vec![
        ("DEVSYNC_NATS__URL".to_owned(), nats_url.to_owned()),
        ("DEVSYNC_DATABASE__URL".to_owned(), database_url.to_owned()),
        (
            "DEVSYNC_REQUESTOR__SCHEDULER__CAMPAIGN_PAGE".to_owned(),
            "2000".to_owned(),
        ),
        (
            "DEVSYNC_REQUESTOR__SCHEDULER__CAMPAIGN_TICK".to_owned(),
            "50ms".to_owned(),
        ),
    ];
    let mut requestor = ServiceProcess::spawn("devsync-requestor", &env, dir)?;
    let mut fanout = ServiceProcess::spawn("devsync-fanout", &env, dir)?;
    requestor.wait_ready(Duration::from_secs(60)).await?;
    fanout.wait_ready(Duration::from_secs(60)).await?;

    let mut labels = Map::new();
    labels.insert("fleet".into(), json!("campaign"));
    let campaign = NewCampaign {
        id: CampaignId::parse("bench-campaign").expect("valid id"),
        selector: Selector::Labels(labels),
        patch: json!({"firmware": "2.0.0"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        policy: PushPolicy::Push,
        rate_per_sec: None,
        max_in_flight: None,
        waves: vec![1000],
        abort: AbortCriteria::default(),
        wave_wait: Duration::ZERO,
    };
    let pool = devsync_store::pool(database_url, 1)?;
    campaigns::create(&pool.get().await?, &campaign)
        .await
        .context("create the campaign")?;
    let started = Instant::now();
    println!("scenario b: campaign over {devices} devices, push, no rate limit");
    let mut dispatch_seconds = None;
    let mut quarter_rss = None;
    let mut last_print = Instant::now();
    let mut last_check = Instant::now();
    loop {
        let metrics = fanout.metrics().await.unwrap_or_default();
        let delivered = crate::procs::counter(&metrics, DELIVERED).unwrap_or(0.0) as u64;
        if dispatch_seconds.is_none() && last_check.elapsed() >= Duration::from_secs(1) {
            // A cheap check (one row), so the measurement does not load PostgreSQL.
            last_check = Instant::now();
            let dispatched: bool = pool
                .get()
                .await?
                .query_one(
                    "SELECT state = 'completed' OR wave_dispatched_at IS NOT NULL
                     FROM campaigns WHERE id = $1",
                    &[&campaign.id.as_str()],
                )
                .await?
                .get(0);
            if dispatched {
                dispatch_seconds = Some(started.elapsed().as_secs_f64());
            }
        }
        if quarter_rss.is_none() && delivered >= devices / 4 {
            quarter_rss = Some(fanout.stats().peak_rss_mib);
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "scenario b: {delivered} delivered after {:.0}s",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if delivered >= devices {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("the campaign did not finish within 30 minutes ({delivered} delivered)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let dispatch_seconds = dispatch_seconds.unwrap_or(seconds);
    let processes = vec![requestor.stop(), fanout.stop()];
    Ok(Results {
        devices,
        seconds,
        delivered_per_second: devices as f64 / seconds,
        dispatch_seconds,
        dispatched_per_second: devices as f64 / dispatch_seconds,
        fanout_rss_quarter_mib: quarter_rss.unwrap_or(0.0),
        processes,
    })
}
