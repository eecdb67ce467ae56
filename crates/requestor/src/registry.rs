//! Which devices may talk to devsync: registered and enabled. Cached per device (positive and
//! negative answers alike) so ingress costs no database query per message; concurrent misses
//! for one device share one query. The cache is `quick_cache` (about 100 bytes per device; the
//! fleet's active devices must fit in a requestor's memory budget), entries expire after the
//! TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use devsync_types::DeviceId;
use quick_cache::sync::Cache;

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

/// The cached registry.
#[derive(Clone)]
pub struct Registry {
    pool: Pool,
    ttl: Duration,
    cache: Arc<Cache<DeviceId, (Registration, Instant)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Registry {
    /// A registry reading `pool`, caching up to `capacity` devices for `ttl`.
    pub fn new(pool: Pool, capacity: u64, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: Arc::new(Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))),
        }
    }

    /// The device's registration; a database error is returned, not cached.
    pub async fn lookup(&self, device: &DeviceId) -> Result<Registration, Arc<String>> {
        if let Some((registration, at)) = self.cache.get(device) {
            if at.elapsed() < self.ttl {
                return Ok(registration);
            }
            self.cache.remove(device);
        }
        // A miss: the first caller queries, concurrent callers for the device wait for it.
        match self.cache.get_value_or_guard_async(device).await {
            Ok((registration, _)) => Ok(registration),
            Err(guard) => {
                let registration = self.query(device).await.map_err(Arc::new)?;
                let _ = guard.insert((registration, Instant::now()));
                Ok(registration)
            }
        }
    }

    async fn query(&self, device: &DeviceId) -> Result<Registration, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let statement = client
            .prepare_cached("SELECT enabled FROM devices WHERE id = $1")
            .await
            .map_err(|e| e.to_string())?;
        let row = client
            .query_opt(&statement, &[&device.as_str()])
            .await
            .map_err(|e| e.to_string())?;
        Ok(match row {
            Some(row) if row.get::<_, bool>(0) => Registration::Enabled,
            Some(_) => Registration::Disabled,
            None => Registration::Unknown,
        })
    }
}
