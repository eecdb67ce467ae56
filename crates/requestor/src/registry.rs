//! Which devices may talk to devsync: registered and enabled. Cached per device (positive and
//! negative answers alike) so ingress costs no database query per message; concurrent misses
//! for one device share one query. The cache is `quick_cache` (about 100 bytes per device; the
//! fleet's active devices must fit in a requestor's memory budget).
//!
//! Entries are forgotten when the registration changes: the database notifies
//! `devsync_registry` on commit of every registration, deletion, enable or disable (migration
//! V12), and [`Registry::listen`] drops the device's entry (or every entry, for a bulk change
//! or a new listening connection). The TTL is only the backstop for a notification lost
//! without the connection noticing. An answer read while a change was being forgotten is
//! returned but not cached, so a read racing a disable cannot keep the old answer.
//!
//! Misses of different devices are read together: a loader task takes every miss queued
//! while its previous reads ran and reads them in one `id = ANY($1)` query (at most
//! [`LOADS_IN_FLIGHT`] queries at once, so a burst of misses makes bigger reads, not more of
//! them). When a fleet's entries expire together — devices reporting every few tens of
//! seconds, the TTL 30 s — a query per miss was a tenth of all CPU on the bench machine.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use devsync_types::DeviceId;
use quick_cache::sync::Cache;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::listen::Heard;

/// The database channel registration changes are notified on (payload: a device id, or
/// [`FORGET_ALL`]).
pub const CHANNEL: &str = "devsync_registry";

/// The notification payload that drops every cached entry.
pub const FORGET_ALL: &str = "*";

/// Most registration reads in flight at once.
pub const LOADS_IN_FLIGHT: usize = 2;

/// Most devices read in one query.
const MOST_PER_LOAD: usize = 1000;

/// How long one read may take (waiting for a connection included) before its lookups fail
/// as unavailable, so a stuck connection cannot hold every miss of the process.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the registry knows of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Registered and enabled.
    Enabled,
    /// Registered but disabled by an operator.
    Disabled,
    /// Not registered.
    Unknown,
}

type Load = (DeviceId, oneshot::Sender<Result<Registration, Arc<String>>>);

/// The cached registry.
#[derive(Clone)]
pub struct Registry {
    ttl: Duration,
    cache: Arc<Cache<DeviceId, (Registration, Instant)>>,
    loads: mpsc::UnboundedSender<Load>,
    /// Bumped whenever entries are forgotten; a read that saw it move is not cached.
    forgotten: Arc<AtomicU64>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Registry {
    /// A registry reading `pool`, caching up to `capacity` devices for `ttl`. Spawns its
    /// loader on the current runtime; the loader ends when the last clone is dropped.
    pub fn new(pool: Pool, capacity: u64, ttl: Duration) -> Self {
        let (loads, queued) = mpsc::unbounded_channel();
        tokio::spawn(load(pool, queued));
        Self {
            ttl,
            cache: Arc::new(Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))),
            loads,
            forgotten: Arc::default(),
        }
    }

    /// Forgets what is cached of `device`, or of every device for [`FORGET_ALL`].
    pub fn forget(&self, device: &str) {
        self.forgotten.fetch_add(1, Ordering::SeqCst);
        if device == FORGET_ALL {
            self.cache.clear();
        } else if let Ok(device) = DeviceId::parse(device) {
            self.cache.remove(&device);
        }
    }

    /// Forgets entries as the database notifies registration changes, until `shutdown`; a
    /// new listening connection forgets everything (notifications may have been missed).
    pub fn listen(
        &self,
        database_url: String,
        shutdown: devsync_runtime::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(crate::listen::listen(
            database_url,
            CHANNEL,
            shutdown,
            move |heard| match heard {
                Heard::Listening => registry.forget(FORGET_ALL),
                Heard::Notification(device) => registry.forget(device),
            },
        ))
    }

    /// The device's registration; a database error is returned, not cached.
    pub async fn lookup(&self, device: &DeviceId) -> Result<Registration, Arc<String>> {
        if let Some((registration, at)) = self.cache.get(device) {
            if at.elapsed() < self.ttl {
                return Ok(registration);
            }
            self.cache.remove(device);
        }
        // A miss: the first caller asks the loader, concurrent callers for the device wait.
        match self.cache.get_value_or_guard_async(device).await {
            Ok((registration, _)) => Ok(registration),
            Err(guard) => {
                let (answer, answered) = oneshot::channel();
                let stopped = || Arc::new("device registry stopped".to_owned());
                let forgotten = self.forgotten.load(Ordering::SeqCst);
                self.loads
                    .send((device.clone(), answer))
                    .map_err(|_| stopped())?;
                let registration = answered.await.map_err(|_| stopped())??;
                if self.forgotten.load(Ordering::SeqCst) == forgotten {
                    let _ = guard.insert((registration, Instant::now()));
                }
                Ok(registration)
            }
        }
    }
}

/// The loader: reads queued misses in batches until every sender is gone.
async fn load(pool: Pool, mut queued: mpsc::UnboundedReceiver<Load>) {
    let in_flight = Arc::new(Semaphore::new(LOADS_IN_FLIGHT));
    let mut batch = Vec::new();
    loop {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        // Waits for the first miss, then takes whatever queued behind it.
        if queued.recv_many(&mut batch, MOST_PER_LOAD).await == 0 {
            return;
        }
        let pool = pool.clone();
        let taken = std::mem::take(&mut batch);
        tokio::spawn(async move {
            let ids: Vec<&str> = taken.iter().map(|(device, _)| device.as_str()).collect();
            let outcome = tokio::time::timeout(READ_TIMEOUT, read(&pool, &ids))
                .await
                .unwrap_or_else(|_| Err(format!("registry read timed out after {READ_TIMEOUT:?}")));
            match outcome {
                Ok(enabled) => {
                    for (device, answer) in taken {
                        let registration = match enabled.get(device.as_str()) {
                            Some(true) => Registration::Enabled,
                            Some(false) => Registration::Disabled,
                            None => Registration::Unknown,
                        };
                        let _ = answer.send(Ok(registration));
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for (_, answer) in taken {
                        let _ = answer.send(Err(Arc::clone(&error)));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Whether each registered device of `ids` is enabled.
async fn read(pool: &Pool, ids: &[&str]) -> Result<HashMap<String, bool>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached("SELECT id, enabled FROM devices WHERE id = ANY($1)")
        .await
        .map_err(|e| e.to_string())?;
    let rows = client
        .query(&statement, &[&ids])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, bool>(1)))
        .collect())
}
