//! The transactional outbox: the outputs of a database transaction are stored in the same
//! transaction ([`insert`]), published after commit with deterministic message ids, and the
//! row deleted ([`delete`]). Used by the reconciler's batches and the campaign driver.
//!
//! The sweeper ([`run`]) publishes rows a crashed (or slow) transaction left behind. A row
//! older than `age` is therefore a leftover: the sweeper locks it (`SKIP LOCKED`, so replicas
//! share the work), publishes its messages with their original message ids (the streams drop
//! what was already stored) and deletes it.

use std::time::Duration;

use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::OutboxBatch;

use crate::Shutdown;
use crate::publish::{self, Outgoing};

const CLAIM: &str = "SELECT id, payload FROM outbox
    WHERE owner = $2 AND published_at IS NULL AND created_at < now() - make_interval(secs => $1)
    ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED";

/// Rows one sweep claims (and holds locked while it publishes them).
pub const SWEEP_ROWS: i64 = 50;

const INSERT: &str = "INSERT INTO outbox (owner, subject, msg_id, payload)
    VALUES ($1, 'batch', $2, $3) RETURNING id";

/// Stores `messages` in the outbox inside `tx`, as `owner`'s (only `owner`'s sweeper
/// republishes them: a service may publish only its own subjects); returns the row id to
/// [`delete`] after they were published. `key` names the row for inspection (it is not a
/// message id).
pub async fn insert(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    key: &str,
    messages: &[Outgoing],
) -> Result<i64, tokio_postgres::Error> {
    let batch = OutboxBatch {
        messages: messages.iter().map(Outgoing::to_outbox).collect(),
    };
    let statement = tx.prepare_cached(INSERT).await?;
    let row = tx
        .query_one(&statement, &[&owner, &key, &batch.encode_to_vec()])
        .await?;
    Ok(row.get(0))
}

/// Deletes a published outbox row.
///
/// The commit does not wait for its WAL flush (`synchronous_commit = off` for this
/// transaction only): a delete lost in a crash only makes the sweeper publish the row again,
/// which the streams deduplicate, and waiting for the disk here held every batch's ack. One
/// simple query of two statements is one implicit transaction (rolled back whole on an
/// error), so `SET LOCAL` ends with it and the pooled connection comes back clean.
pub async fn delete(pool: &Pool, id: i64) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .batch_execute(&format!(
            "SET LOCAL synchronous_commit = off; DELETE FROM outbox WHERE id = {id}"
        ))
        .await?;
    Ok(())
}

/// Sweeps `owner`'s rows every `every` until `shutdown`; a sweep that found a full claim of
/// rows is followed by the next at once, so leftovers of a NATS outage (hundreds of rows when
/// every transaction's publish failed for a few seconds) drain at the speed of publishing,
/// not [`SWEEP_ROWS`] per tick.
pub async fn run(
    js: async_nats::jetstream::Context,
    pool: Pool,
    owner: &'static str,
    every: Duration,
    age: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(every);
    let mut more = false;
    loop {
        if more {
            // Straight on to the next claim, unless stopping.
            if shutdown.is_cancelled() {
                break;
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
        }
        more = match sweep(&js, &pool, owner, age).await {
            Ok(0) => false,
            Ok(count) => {
                tracing::info!(rows = count, "published outbox leftovers");
                count as i64 == SWEEP_ROWS
            }
            Err(error) => {
                tracing::warn!(%error, "outbox sweep failed");
                false
            }
        };
    }
}

/// One sweep of `owner`'s rows; returns how many were published.
pub async fn sweep(
    js: &async_nats::jetstream::Context,
    pool: &Pool,
    owner: &str,
    age: Duration,
) -> anyhow::Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(CLAIM, &[&age.as_secs_f64(), &owner, &SWEEP_ROWS])
        .await?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut failure = None;
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
        let published =
            publish::publish_all(js, batch.messages.into_iter().map(Outgoing::from_outbox)).await;
        if let Err(error) = published {
            // The rows published so far are deleted all the same: a sweep that fails at its
            // last row must not publish every earlier row again next time (after a NATS
            // outage a sweep of large rows could otherwise never finish).
            failure = Some(error);
            break;
        }
        ids.push(id);
    }
    if !ids.is_empty() {
        tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
            .await?;
    }
    tx.commit().await?;
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(ids.len()),
    }
}
