//! Which devices may talk to devsync: registered and enabled. Cached per device (positive and
//! negative answers alike) so ingress costs no database query per message; concurrent misses
//! for one device share one query.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use devsync_types::DeviceId;
use moka::future::Cache;

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
    cache: Cache<DeviceId, Registration>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cached", &self.cache.entry_count())
            .finish()
    }
}

impl Registry {
    /// A registry reading `pool`, caching up to `capacity` devices for `ttl`.
    pub fn new(pool: Pool, capacity: u64, ttl: Duration) -> Self {
        Self {
            pool,
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The device's registration; a database error is returned, not cached.
    pub async fn lookup(&self, device: &DeviceId) -> Result<Registration, Arc<String>> {
        let pool = self.pool.clone();
        let id = device.clone();
        self.cache
            .try_get_with(device.clone(), async move {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let statement = client
                    .prepare_cached("SELECT enabled FROM devices WHERE id = $1")
                    .await
                    .map_err(|e| e.to_string())?;
                let row = client
                    .query_opt(&statement, &[&id.as_str()])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(match row {
                    Some(row) if row.get::<_, bool>(0) => Registration::Enabled,
                    Some(_) => Registration::Disabled,
                    None => Registration::Unknown,
                })
            })
            .await
    }
}
