//! One replica at a time: a lease held as an entry of the `devsync-members` KV bucket.
//!
//! The bucket's max age is the lease's time to live. A replica takes the lease with a KV
//! `create` (which only succeeds when the key is absent, deleted or expired) and renews it
//! with a compare-and-set `update` on the revision it holds, every third of the TTL. A holder
//! that dies stops renewing, the entry expires, and the next replica's `create` succeeds; a
//! holder that shuts down deletes the entry so another takes over at once. A holder whose
//! renewal fails (someone else holds a newer revision) steps down immediately.
//!
//! Jobs under the lease must still be safe to run twice around a hand-over (a paused holder
//! can act for up to one renewal period after it lost the lease): the scheduler's jobs are
//! idempotent database statements, so the lease is about efficiency, not correctness.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::watch;

use crate::Shutdown;

/// A running lease loop.
#[derive(Debug)]
pub struct Lease {
    held: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts competing for `key` as `holder`; runs until `shutdown`.
    pub fn spawn(
        kv: kv::Store,
        key: &str,
        holder: String,
        ttl: Duration,
        shutdown: Shutdown,
    ) -> Self {
        let (tx, held) = watch::channel(false);
        let key = key.to_owned();
        let task = tokio::spawn(hold(kv, key, holder, ttl, tx, shutdown));
        Self { held, task }
    }

    /// Whether this replica holds the lease now, and changes of it.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Waits until the loop has released the lease after shutdown.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn hold(
    kv: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
    held: watch::Sender<bool>,
    shutdown: Shutdown,
) {
    let value = Bytes::from(holder.clone());
    let mut revision: Option<u64> = None;
    let mut ticker = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        revision = match revision {
            None => match kv.create(&key, value.clone()).await {
                Ok(taken) => {
                    tracing::info!(lease = %key, %holder, "lease taken");
                    Some(taken)
                }
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => None,
                Err(error) => {
                    tracing::warn!(lease = %key, %error, "cannot compete for the lease");
                    None
                }
            },
            Some(current) => match kv.update(&key, value.clone(), current).await {
                Ok(renewed) => Some(renewed),
                Err(error) => {
                    tracing::warn!(lease = %key, %error, "lease lost");
                    None
                }
            },
        };
        held.send_if_modified(|now| {
            let changed = *now != revision.is_some();
            *now = revision.is_some();
            changed
        });
    }
    held.send_replace(false);
    if let Some(current) = revision {
        match kv.delete_expect_revision(&key, Some(current)).await {
            Ok(()) => tracing::info!(lease = %key, "lease released"),
            Err(error) => tracing::warn!(lease = %key, %error, "cannot release the lease"),
        }
    }
}
