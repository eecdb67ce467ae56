//! The transactional outbox: the outputs of a database transaction are stored in the same
//! transaction ([`insert`]), published after commit with deterministic message ids, and the
//! row then deleted: by the owner's next transaction, which deletes the rows published since
//! the previous one with its own insert ([`Published`]), or by the sweeper's next tick when no
//! transaction followed. Used by the reconciler's batches and the campaign driver.
//!
//! The sweeper ([`run`]) publishes rows a crashed (or slow) transaction left behind. A row
//! older than `age` is therefore a leftover: the sweeper locks it (`SKIP LOCKED`, so replicas
//! share the work), publishes its messages with their original message ids (the streams drop
//! what was already stored) and deletes it.

use std::sync::{Arc, Mutex};
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

/// The new row, and the deletion of rows already published, in one statement (a statement in
/// `WITH` that changes data runs whether or not the query reads it). A published row another
/// transaction holds is skipped rather than waited for (the batch holds its devices' locks):
/// a sweeper that claimed it deletes it, and otherwise it is swept once `age` old.
const INSERT: &str = "WITH published AS (
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox WHERE id = ANY($4) FOR UPDATE SKIP LOCKED))
    INSERT INTO outbox (owner, subject, msg_id, payload)
    VALUES ($1, 'batch', $2, $3) RETURNING id";

/// Deletes published rows, skipping any another transaction holds (as [`INSERT`] does).
const DELETE_PUBLISHED: &str = "DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)";

const DELETE: &str = "DELETE FROM outbox WHERE id = ANY($1)";

/// Stores `messages` in the outbox inside `tx`, as `owner`'s (only `owner`'s sweeper
/// republishes them: a service may publish only its own subjects), and deletes the rows
/// `published` (taken from [`Published::take`]) with the same statement; returns the new row's
/// id, to [`Published::push`] once its messages are published. `key` names the row for
/// inspection (it is not a message id).
pub async fn insert(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    key: &str,
    messages: &[Outgoing],
    published: &[i64],
) -> Result<i64, tokio_postgres::Error> {
    let batch = OutboxBatch {
        messages: messages.iter().map(Outgoing::to_outbox).collect(),
    };
    let statement = tx.prepare_cached(INSERT).await?;
    let row = tx
        .query_one(
            &statement,
            &[&owner, &key, &batch.encode_to_vec(), &published],
        )
        .await?;
    Ok(row.get(0))
}

/// Outbox rows whose messages were published, waiting to be deleted.
///
/// Deleting each row in a transaction of its own cost the database a transaction and the
/// owner a round trip per batch, before the batch's ack. The owner's next transaction now
/// deletes them with its own row ([`insert`]); the sweeper deletes those no transaction took
/// within its tick ([`Published::flush`]), so a row whose messages went out is not swept (and
/// published again) only because no transaction followed it. Clones share the rows.
#[derive(Clone, Debug, Default)]
pub struct Published(Arc<Mutex<Vec<i64>>>);

impl Published {
    /// Row `id`'s messages were published: it may be deleted.
    pub fn push(&self, id: i64) {
        self.0.lock().expect("published lock").push(id);
    }

    /// The rows waiting, for a transaction to delete (they are gone from here: prefer
    /// [`Published::commit`], which gives them back if the transaction does not commit).
    pub fn take(&self) -> Vec<i64> {
        std::mem::take(&mut *self.0.lock().expect("published lock"))
    }

    /// Rows a transaction took but did not delete wait again.
    fn restore(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            self.0.lock().expect("published lock").extend(ids);
        }
    }

    /// Stores `messages` (when there are any) in the outbox inside `tx` as `owner`'s with
    /// [`insert`], deleting the rows waiting here in the same statement, and commits `tx`;
    /// returns the new row's id, to [`Published::push`] once its messages are published.
    /// Should the transaction not commit, the rows wait again.
    pub async fn commit(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        owner: &str,
        key: &str,
        messages: &[Outgoing],
    ) -> Result<Option<i64>, tokio_postgres::Error> {
        let published = if messages.is_empty() {
            Vec::new()
        } else {
            self.take()
        };
        let committed = async {
            let id = match messages {
                [] => None,
                _ => Some(insert(&tx, owner, key, messages, &published).await?),
            };
            tx.commit().await?;
            Ok(id)
        }
        .await;
        if committed.is_err() {
            self.restore(published);
        }
        committed
    }

    /// Deletes the rows waiting in a transaction of their own; returns how many were waiting.
    /// The commit does not wait for its WAL flush (`synchronous_commit = off` for this
    /// transaction only): a delete lost in a crash only makes a sweeper publish the rows
    /// again, which the streams drop as duplicates when that happens within their duplicate
    /// window (2 minutes; audit events and stages are idempotent beyond it too). On an error
    /// the rows wait again.
    pub async fn flush(&self, pool: &Pool) -> anyhow::Result<usize> {
        let ids = self.take();
        if ids.is_empty() {
            return Ok(0);
        }
        let deleted = async {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await?;
            tx.execute(DELETE_PUBLISHED, &[&ids]).await?;
            tx.commit().await?;
            anyhow::Ok(())
        }
        .await;
        match deleted {
            Ok(()) => Ok(ids.len()),
            Err(error) => {
                self.restore(ids);
                Err(error)
            }
        }
    }

    /// [`Published::flush`], logging a failure (the rows then wait for the next flush, or are
    /// swept once `age` old).
    pub async fn flush_or_warn(&self, pool: &Pool) {
        if let Err(error) = self.flush(pool).await {
            tracing::warn!(%error, "cannot delete published outbox rows");
        }
    }
}

/// Sweeps `owner`'s rows every `every` until `shutdown`, first deleting the rows `published`
/// that no transaction took (so `every` must be well below `age`); a sweep that found a full
/// claim of rows is followed by the next at once, so leftovers of a NATS outage (hundreds of
/// rows when every transaction's publish failed for a few seconds) drain at the speed of
/// publishing, not [`SWEEP_ROWS`] per tick. The owner flushes `published` once more after its
/// last transaction.
pub async fn run(
    js: async_nats::jetstream::Context,
    pool: Pool,
    owner: &'static str,
    every: Duration,
    age: Duration,
    published: Published,
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
        published.flush_or_warn(&pool).await;
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
        tx.execute(DELETE, &[&ids]).await?;
    }
    tx.commit().await?;
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(ids.len()),
    }
}
