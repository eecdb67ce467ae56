//! The desired-change relay: administrators' edits of desired state, captured by a database
//! trigger into `desired_changes`, relayed in order to `DEVSYNC_REQ`.
//!
//! The relay reads changes after its persisted cursor in `(txid, id)` order, and only those
//! of transactions older than the oldest one still running (`pg_snapshot_xmin`): a change
//! committed late by a long transaction can never fall behind the cursor. Each batch is
//! published (message id `admin:<change id>`, so a re-publish after a crash is deduplicated)
//! before the cursor moves and the relayed rows are deleted, in one transaction that holds the
//! cursor row: with several requestor replicas, one relays and the others skip. A change made
//! while every requestor was down is relayed when one comes back.
//!
//! `LISTEN devsync_desired_changes` only wakes the relay; a periodic poll covers a lost
//! notification or a broken listening connection.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use devsync_proto::Message as _;
use devsync_proto::v1::{self as pb, AdminChange, SyncRequest, sync_request};
use devsync_runtime::Shutdown;
use devsync_runtime::audit::Auditor;
use devsync_runtime::publish::{self, Outgoing};
use devsync_runtime::telemetry;
use devsync_types::convert::timestamp;
use devsync_types::{AuditOutcome, DeviceId, Lane, RequestId, subjects};
use serde_json::json;
use tokio::sync::Notify;

/// The database channel the capture trigger notifies.
pub const CHANNEL: &str = "devsync_desired_changes";
/// The relay's row in `relay_cursors`.
pub const CURSOR: &str = "desired_changes";

const ENSURE_CURSOR: &str =
    "INSERT INTO relay_cursors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
const LOCK_CURSOR: &str = "SELECT txid::text, last_id FROM relay_cursors WHERE name = $1
    FOR UPDATE SKIP LOCKED";
const NEXT: &str = "SELECT id, txid::text, device_id, desired_version, bulk, source, changed_at
    FROM desired_changes
    WHERE (txid, id) > ($1::text::xid8, $2) AND txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY txid, id LIMIT $3";
const MOVE_CURSOR: &str = "UPDATE relay_cursors SET txid = $2::text::xid8, last_id = $3,
    updated_at = now() WHERE name = $1";
const FORGET: &str = "DELETE FROM desired_changes WHERE (txid, id) <= ($1::text::xid8, $2)";

/// The relay.
#[derive(Clone)]
pub struct Relay {
    js: jetstream::Context,
    pool: Pool,
    auditor: Auditor,
    batch: i64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("batch", &self.batch).finish()
    }
}

impl Relay {
    /// A relay publishing through `js`, reading `pool`, `batch` changes per transaction.
    pub fn new(js: jetstream::Context, pool: Pool, auditor: Auditor, batch: usize) -> Self {
        Self {
            js,
            pool,
            auditor,
            batch: batch.max(1) as i64,
        }
    }

    /// Relays until `shutdown`: woken by `LISTEN` on `database_url`, and every `poll`.
    pub async fn run(self, database_url: String, poll: Duration, shutdown: Shutdown) {
        let wake = Arc::new(Notify::new());
        let woken = Arc::clone(&wake);
        // Every notification wakes the relay, and so does a new connection: anything
        // committed before its LISTEN took effect is found by that wake-up.
        let listener = tokio::spawn(crate::listen::listen(
            database_url,
            CHANNEL,
            shutdown.clone(),
            move |_| woken.notify_one(),
        ));
        loop {
            loop {
                match self.relay_once().await {
                    Ok(count) if count as i64 >= self.batch => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "relaying desired changes failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        let _ = listener.await;
    }

    /// Relays one batch; returns how many changes it published (0 when another replica holds
    /// the cursor or nothing is pending).
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let mut client = self.pool.get().await?;
        client.execute(ENSURE_CURSOR, &[&CURSOR]).await?;
        let tx = client.transaction().await?;
        let Some(cursor) = tx.query_opt(LOCK_CURSOR, &[&CURSOR]).await? else {
            return Ok(0);
        };
        let (txid, last_id): (String, i64) = (cursor.get(0), cursor.get(1));
        let rows = tx.query(NEXT, &[&txid, &last_id, &self.batch]).await?;
        let Some(last) = rows.last() else {
            return Ok(0);
        };
        let (last_txid, last_id): (String, i64) = (last.get(1), last.get(0));
        let now = Utc::now();
        let mut messages = Vec::with_capacity(rows.len() + 1);
        let mut audits = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let device: String = row.get(2);
            let Ok(device) = DeviceId::parse(device) else {
                continue;
            };
            let version: i64 = row.get(3);
            let lane = if row.get::<_, bool>(4) {
                Lane::Bulk
            } else {
                Lane::Rt
            };
            let source: String = row.get(5);
            let changed_at: DateTime<Utc> = row.get(6);
            let request_id = RequestId::parse(format!("admin:{id}")).expect("valid request id");
            messages.push(change_message(
                &device,
                &request_id,
                lane,
                id,
                version,
                changed_at,
            ));
            audits.push(self.auditor.record(
                now,
                Some(&device),
                Some(&request_id),
                "relay",
                "admin.relayed",
                AuditOutcome::Ok,
                json!({"desired_version": version, "lane": lane.to_string(), "source": source}),
            ));
        }
        messages.extend(self.auditor.message(&audits));
        publish::publish_all(&self.js, messages).await?;
        tx.execute(MOVE_CURSOR, &[&CURSOR, &last_txid, &last_id])
            .await?;
        tx.execute(FORGET, &[&last_txid, &last_id]).await?;
        tx.commit().await?;
        tracing::debug!(changes = rows.len(), "relayed desired changes");
        Ok(rows.len())
    }
}

fn change_message(
    device: &DeviceId,
    request_id: &RequestId,
    lane: Lane,
    change_id: i64,
    version: i64,
    changed_at: DateTime<Utc>,
) -> Outgoing {
    let request = SyncRequest {
        request_id: request_id.to_string(),
        device_id: device.to_string(),
        lane: match lane {
            Lane::Rt => pb::Lane::Rt,
            Lane::Bulk => pb::Lane::Bulk,
        } as i32,
        received_at: Some(timestamp(changed_at)),
        causation_id: String::new(),
        kind: Some(sync_request::Kind::AdminChange(AdminChange {
            outbox_id: change_id.max(0) as u64,
            desired_version: version.max(0) as u64,
            campaign_id: String::new(),
        })),
        reply_to: String::new(),
        accepted_by: String::new(),
    };
    let mut headers = HeaderMap::new();
    telemetry::inject(&mut headers);
    Outgoing {
        subject: subjects::request(lane, device),
        msg_id: request_id.to_string(),
        payload: request.encode_to_vec().into(),
        headers: Some(headers),
    }
}
