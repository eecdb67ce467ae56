//! `devsyncctl smoke`: proves an installation works, end to end, with a throwaway device.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use devsync_device::{Device, Refresh};
use devsync_runtime::CommonSettings;
use devsync_store::audit::{self, Query};
use devsync_types::DeviceId;
use serde_json::json;

use crate::cli::SmokeArgs;

/// Polls `check` every 100 ms until it is true or `deadline` passes.
async fn until<F, Fut>(deadline: Instant, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    loop {
        if check().await? {
            println!("ok    {what}");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not seen before the deadline");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the round trip; the device is removed afterwards whatever happened.
pub async fn run(settings: &CommonSettings, args: &SmokeArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let pool = devsync_store::pool(settings.database.url.expose(), 2)?;
    let db = pool.get().await.context("connect to postgres")?;
    let stamp = chrono::Utc::now().timestamp_millis();
    let id = DeviceId::parse(format!("smoke-{stamp}"))?;
    db.execute(
        "INSERT INTO devices (id, desired) VALUES ($1, $2)",
        &[&id.as_str(), &json!({"smoke": stamp})],
    )
    .await
    .context("register the smoke device")?;
    println!("ok    registered {id}");
    let result = round_trip(settings, &db, &id, deadline).await;
    let _ = db
        .execute("DELETE FROM devices WHERE id = $1", &[&id.as_str()])
        .await;
    result?;
    println!("smoke test passed");
    Ok(())
}

async fn round_trip(
    settings: &CommonSettings,
    db: &deadpool_postgres::Object,
    id: &DeviceId,
    deadline: Instant,
) -> anyhow::Result<()> {
    let client = devsync_runtime::nats::connect_with(
        &settings.nats,
        "devsyncctl-smoke",
        async_nats::ConnectOptions::new()
            .custom_inbox_prefix(devsync_types::subjects::device_inbox_prefix(id)),
    )
    .await?;
    let device = Device::with_client(client, id.clone(), 0);
    device.report(&json!({"smoke": "reported"}), true).await?;
    println!("ok    report accepted (durable)");
    until(deadline, "report applied in PostgreSQL", || async {
        let row = db
            .query_one(
                "SELECT reported_version FROM devices WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        Ok(row.get::<_, i64>(0) >= 1)
    })
    .await?;
    match device.refresh(0).await? {
        Refresh::Full { version: 1, .. } => println!("ok    refresh returned desired version 1"),
        other => bail!("refresh returned {other:?}, expected the full document at version 1"),
    }
    device.ack(1, true, "").await?;
    until(deadline, "desired version 1 acknowledged", || async {
        let row = db
            .query_one(
                "SELECT applied_desired_version FROM devices WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        Ok(row.get::<_, i64>(0) == 1)
    })
    .await?;
    until(deadline, "actions found in the audit trail", || async {
        let page = audit::search(
            db,
            &Query {
                device: Some(id.clone()),
                since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
                limit: 100,
                ..Query::default()
            },
        )
        .await?;
        Ok(page.events.iter().any(|e| e.action == "report.applied")
            && page.events.iter().any(|e| e.action == "ack.recorded"))
    })
    .await
}
