//! devsync's PostgreSQL store: the schema, as versioned migrations embedded in every binary,
//! and the connection pool.
//!
//! Schema (see `migrations/`): `devices` with desired and reported JSON documents and their
//! monotonic versions; `desired_history`; `desired_changes` (captured by trigger from any
//! change of `desired`, plain SQL included) and `relay_cursors`; `processed_requests` for
//! idempotency; `outbox` for outputs published after commit; campaigns and their per-device
//! status; `audit_events`, partitioned by day.
//!
//! Migrations run under a PostgreSQL advisory lock, so replicas starting together apply them
//! once.

pub mod audit;
pub mod campaigns;
pub mod devices;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key held while migrating ("devsync" in ASCII).
const MIGRATION_LOCK: i64 = 0x0064_6576_7379_6e63;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database url: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot connect to postgres: {0}")]
    Connect(tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] refinery::Error),
    #[error("postgres: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("connection pool: {0}")]
    Pool(String),
}

/// The database's own message and SQLSTATE, which `tokio_postgres::Error`'s Display leaves out.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A migration that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
}

/// Applies every pending migration to the database at `url`; returns what was applied
/// (nothing when the schema is current).
pub async fn migrate(url: &str) -> Result<Vec<Applied>, StoreError> {
    let config: tokio_postgres::Config = url.parse().map_err(StoreError::Url)?;
    let (mut client, connection) = config.connect(NoTls).await.map_err(StoreError::Connect)?;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "migration connection ended");
        }
    });
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(&mut client)
        .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    let applied = report?
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version() as i32,
            name: m.name().to_owned(),
        })
        .collect::<Vec<_>>();
    for migration in &applied {
        tracing::info!(version = migration.version, name = %migration.name, "migration applied");
    }
    Ok(applied)
}

/// The migrations built into this binary, as (version, name).
pub fn known_migrations() -> Vec<(i32, String)> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| (m.version() as i32, m.name().to_owned()))
        .collect()
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(query) => format!("{root}/{database}?{query}"),
        None => format!("{root}/{database}"),
    }
}

/// Creates the database `url` names if it does not exist (connecting to the server's
/// `postgres` database to do so). Returns whether it was created.
pub async fn ensure_database(url: &str) -> Result<bool, StoreError> {
    let config: tokio_postgres::Config = url.parse().map_err(StoreError::Url)?;
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let admin = with_database(url, "postgres");
    let (client, connection) = tokio_postgres::connect(&admin, NoTls)
        .await
        .map_err(StoreError::Connect)?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await?;
    }
    drop(client);
    let _ = driver.await;
    Ok(!exists)
}

/// A connection pool of at most `size` connections to `url`.
pub fn pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let config: tokio_postgres::Config = url.parse().map_err(StoreError::Url)?;
    pool_from(config, size)
}

/// A connection pool whose connections show as `name` (a worker id) in `pg_stat_activity`,
/// unless `url` names an `application_name` itself: an operator sees which replica holds
/// which connection, and what it is running.
pub fn named_pool(url: &str, size: usize, name: &str) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(StoreError::Url)?;
    if config.get_application_name().is_none() {
        config.application_name(name);
    }
    pool_from(config, size)
}

fn pool_from(config: tokio_postgres::Config, size: usize) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}
