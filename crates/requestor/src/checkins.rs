//! Last-seen times from check-ins, collected in memory and written in one set-based statement
//! per flush interval (the fan-out uses them to prefer active devices).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use devsync_runtime::Shutdown;
use devsync_types::DeviceId;

/// Rows are locked in id order and rows a reconciler holds are skipped (it sets `last_seen`
/// itself when it applies the device's work), so a flush never deadlocks with a batch.
const CHECKINS: &str = "WITH seen AS (
        SELECT u.id, u.seen FROM unnest($1::text[], $2::timestamptz[]) AS u(id, seen)
    ), locked AS (
        SELECT d.id FROM devices d JOIN seen ON seen.id = d.id
        ORDER BY d.id FOR UPDATE OF d SKIP LOCKED
    )
    UPDATE devices d SET last_seen = greatest(d.last_seen, seen.seen), active = true
    FROM seen JOIN locked ON locked.id = seen.id
    WHERE d.id = seen.id";

/// Pending last-seen times, flushed periodically.
#[derive(Clone)]
pub struct Checkins {
    pool: Pool,
    pending: Arc<Mutex<HashMap<DeviceId, DateTime<Utc>>>>,
}

impl std::fmt::Debug for Checkins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checkins")
    }
}

impl Checkins {
    /// Starts the periodic flush; the last flush happens when `flush` is called at shutdown.
    pub fn start(pool: Pool, every: Duration, shutdown: Shutdown) -> Self {
        let checkins = Self {
            pool,
            pending: Arc::default(),
        };
        let flusher = checkins.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.tick() => flusher.flush().await,
                }
            }
        });
        checkins
    }

    /// Notes that `device` was seen at `at`.
    pub fn seen(&self, device: &DeviceId, at: DateTime<Utc>) {
        let mut pending = self.pending.lock().expect("checkins lock");
        let entry = pending.entry(device.clone()).or_insert(at);
        if *entry < at {
            *entry = at;
        }
    }

    /// Writes what is pending. On failure the times are put back for the next flush.
    pub async fn flush(&self) {
        let batch: Vec<(DeviceId, DateTime<Utc>)> = {
            let mut pending = self.pending.lock().expect("checkins lock");
            pending.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        let ids: Vec<&str> = batch.iter().map(|(d, _)| d.as_str()).collect();
        let times: Vec<DateTime<Utc>> = batch.iter().map(|(_, t)| *t).collect();
        let result = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute(CHECKINS, &[&ids, &times])
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, devices = batch.len(), "cannot record check-ins; will retry");
            for (device, at) in batch {
                self.seen(&device, at);
            }
        }
    }
}
