//! The outbox sweeper: publishes outbox rows a crashed (or slow) transaction left behind.
//!
//! The normal path publishes a batch's outputs right after commit and deletes its row. A row
//! older than `age` is therefore a leftover: the sweeper locks it (`SKIP LOCKED`, so replicas
//! share the work), publishes its messages with their original message ids (the streams drop
//! what was already stored) and deletes it.

use std::time::Duration;

use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::OutboxBatch;
use devsync_runtime::Shutdown;
use devsync_runtime::publish::{self, Outgoing};

const CLAIM: &str = "SELECT id, payload FROM outbox
    WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)
    ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED";

/// Sweeps every `every` until `shutdown`.
pub async fn run(
    js: async_nats::jetstream::Context,
    pool: Pool,
    every: Duration,
    age: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match sweep(&js, &pool, age).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(rows = count, "published outbox leftovers"),
            Err(error) => tracing::warn!(%error, "outbox sweep failed"),
        }
    }
}

/// One sweep; returns how many rows were published.
pub async fn sweep(
    js: &async_nats::jetstream::Context,
    pool: &Pool,
    age: Duration,
) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx.query(CLAIM, &[&age.as_secs_f64()]).await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.get(0);
        let payload: Vec<u8> = row.get(1);
        let batch = match OutboxBatch::decode(payload.as_slice()) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(outbox_id = id, %error, "undecodable outbox row kept for inspection");
                continue;
            }
        };
        publish::publish_all(js, batch.messages.into_iter().map(Outgoing::from_outbox)).await?;
        ids.push(id);
    }
    if !ids.is_empty() {
        tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
            .await?;
    }
    tx.commit().await?;
    Ok(ids.len())
}
