//! Devices as an operator manages them (`devsyncctl devices`): register, list by labels, show
//! one with its delta, change labels, enable or disable, and replace or merge-patch the desired
//! document.
//!
//! Versions and change capture stay with the database: the table's triggers bump
//! `desired_version` and record every change of `desired` (history, and the outbox the
//! requestor relays), whatever statement made it. Writers here only name themselves as the
//! source of the change (`devsync.change_source`, set local to the transaction like
//! `SET LOCAL`), so the history says who made it.
//!
//! A merge patch (RFC 7386) is applied in Rust with the same code the reconciler uses, on the
//! row locked with `SELECT ... FOR UPDATE`, so concurrent changes of one device cannot lose
//! each other's fields.
//!
//! "In sync" means the delta (desired − reported) is empty, which is how the reconciler decides
//! a device converged; the version the device acknowledged (`applied_desired_version`) is
//! shown beside it, not used for it.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use devsync_types::{DeviceId, state};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::Row;

use crate::StoreError;

/// Every column, in the order [`from_row`] reads them.
const COLUMNS: &str = "id, enabled, labels, http_endpoint, desired, desired_version,
    desired_changed_at, reported, reported_version, reported_at, applied_desired_version,
    applied_at, last_seen, created_at, updated_at";

/// A device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0} does not exist")]
    NotFound(DeviceId),
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    /// What was asked for cannot be stored (the message names the problem).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for DeviceError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// A device to register.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    pub id: DeviceId,
    /// Label names and values (strings).
    pub labels: Map<String, Value>,
    /// Webhook for desired-state pushes (`http://` or `https://`).
    pub http_endpoint: Option<String>,
    /// The initial desired document; a non-empty one starts at version 1.
    pub desired: Map<String, Value>,
    pub enabled: bool,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub id: DeviceId,
    pub enabled: bool,
    pub labels: Map<String, Value>,
    pub http_endpoint: Option<String>,
    pub desired: Value,
    pub desired_version: i64,
    pub desired_changed_at: Option<DateTime<Utc>>,
    pub reported: Value,
    pub reported_version: i64,
    pub reported_at: Option<DateTime<Utc>>,
    /// The desired version the device last acknowledged as applied.
    pub applied_desired_version: i64,
    pub applied_at: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Device {
    /// Desired minus reported: what the device has not reached yet; `None` when in sync.
    pub fn delta(&self) -> Option<Value> {
        state::delta(&self.desired, &self.reported)
    }

    /// Whether the device reports everything it is asked for.
    pub fn in_sync(&self) -> bool {
        self.delta().is_none()
    }
}

fn from_row(row: &Row) -> Result<Device, DeviceError> {
    let id: String = row.try_get(0)?;
    let id = DeviceId::parse(id)
        .map_err(|e| DeviceError::Invalid(format!("stored device id is invalid: {e}")))?;
    let labels = match row.try_get::<_, Value>(2)? {
        Value::Object(labels) => labels,
        other => {
            return Err(DeviceError::Invalid(format!(
                "stored labels of {id} are not an object: {other}"
            )));
        }
    };
    Ok(Device {
        id,
        enabled: row.try_get(1)?,
        labels,
        http_endpoint: row.try_get(3)?,
        desired: row.try_get(4)?,
        desired_version: row.try_get(5)?,
        desired_changed_at: row.try_get(6)?,
        reported: row.try_get(7)?,
        reported_version: row.try_get(8)?,
        reported_at: row.try_get(9)?,
        applied_desired_version: row.try_get(10)?,
        applied_at: row.try_get(11)?,
        last_seen: row.try_get(12)?,
        created_at: row.try_get(13)?,
        updated_at: row.try_get(14)?,
    })
}

/// Names `source` as the origin of desired-state changes made by the rest of the transaction
/// (what `SET LOCAL devsync.change_source = '...'` does; the capture trigger reads it).
async fn set_change_source(
    tx: &deadpool_postgres::Transaction<'_>,
    source: &str,
) -> Result<(), DeviceError> {
    tx.execute(
        "SELECT set_config('devsync.change_source', $1, true)",
        &[&source],
    )
    .await?;
    Ok(())
}

/// Registers `device`, its initial desired document recorded as coming from `source`. Returns
/// the desired version it starts at (0 without a desired document, else 1). Fails with
/// [`DeviceError::AlreadyExists`], changing nothing, when the id is taken.
pub async fn register(
    client: &mut deadpool_postgres::Object,
    device: &NewDevice,
    source: &str,
) -> Result<i64, DeviceError> {
    let tx = client.transaction().await?;
    set_change_source(&tx, source).await?;
    let row = tx
        .query_opt(
            "INSERT INTO devices (id, labels, http_endpoint, desired, enabled)
             VALUES ($1, $2::jsonb, $3, $4::jsonb, $5)
             ON CONFLICT (id) DO NOTHING
             RETURNING desired_version",
            &[
                &device.id.as_str(),
                &Value::Object(device.labels.clone()),
                &device.http_endpoint,
                &Value::Object(device.desired.clone()),
                &device.enabled,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(DeviceError::AlreadyExists(device.id.clone()));
    };
    tx.commit().await?;
    Ok(row.try_get(0)?)
}

/// The device `id`.
pub async fn get(client: &impl GenericClient, id: &DeviceId) -> Result<Device, DeviceError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM devices WHERE id = $1"),
            &[&id.as_str()],
        )
        .await?
        .ok_or_else(|| DeviceError::NotFound(id.clone()))?;
    from_row(&row)
}

/// One page of devices, by id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    pub devices: Vec<Device>,
    /// More devices match than were returned.
    pub more: bool,
}

/// Devices carrying every label of `labels` (all devices when it is empty), ordered by id, at
/// most `limit` (at least 1).
pub async fn list(
    client: &impl GenericClient,
    labels: &Map<String, Value>,
    limit: u32,
) -> Result<Listing, DeviceError> {
    let limit = i64::from(limit.max(1));
    let fetch = limit + 1;
    let rows = if labels.is_empty() {
        client
            .query(
                &format!("SELECT {COLUMNS} FROM devices ORDER BY id LIMIT $1"),
                &[&fetch],
            )
            .await?
    } else {
        // `@>` on the GIN (jsonb_path_ops) index of labels.
        client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM devices WHERE labels @> $1::jsonb ORDER BY id LIMIT $2"
                ),
                &[&Value::Object(labels.clone()), &fetch],
            )
            .await?
    };
    let more = rows.len() as i64 > limit;
    let devices = rows
        .iter()
        .take(limit as usize)
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Listing { devices, more })
}

/// Merges `set` into the labels of `id` and removes the labels named in `remove`, in one
/// statement. Returns the labels now stored.
pub async fn update_labels(
    client: &impl GenericClient,
    id: &DeviceId,
    set: &Map<String, Value>,
    remove: &[String],
) -> Result<Map<String, Value>, DeviceError> {
    if let Some(key) = remove.iter().find(|key| set.contains_key(*key)) {
        return Err(DeviceError::Invalid(format!(
            "label {key:?} is both set and removed"
        )));
    }
    let row = client
        .query_opt(
            "UPDATE devices SET labels = (labels - $2::text[]) || $3::jsonb, updated_at = now()
             WHERE id = $1
             RETURNING labels",
            &[&id.as_str(), &remove, &Value::Object(set.clone())],
        )
        .await?
        .ok_or_else(|| DeviceError::NotFound(id.clone()))?;
    match row.try_get::<_, Value>(0)? {
        Value::Object(labels) => Ok(labels),
        other => Err(DeviceError::Invalid(format!(
            "stored labels of {id} are not an object: {other}"
        ))),
    }
}

/// Enables or disables `id`. Returns whether that changed anything (false when it already
/// was so).
pub async fn set_enabled(
    client: &mut deadpool_postgres::Object,
    id: &DeviceId,
    enabled: bool,
) -> Result<bool, DeviceError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT enabled FROM devices WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        .ok_or_else(|| DeviceError::NotFound(id.clone()))?;
    if row.try_get::<_, bool>(0)? == enabled {
        return Ok(false);
    }
    tx.execute(
        "UPDATE devices SET enabled = $2, updated_at = now() WHERE id = $1",
        &[&id.as_str(), &enabled],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// How to change a desired document.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredChange {
    /// Replace it with this document.
    Replace(Map<String, Value>),
    /// Apply this RFC 7386 merge patch to it (`null` removes a field).
    Merge(Map<String, Value>),
}

/// What a change of the desired document did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredUpdate {
    pub previous_version: i64,
    /// Equal to `previous_version` when the document did not change.
    pub version: i64,
    pub desired: Value,
}

impl DesiredUpdate {
    /// Whether the document changed (and got a new version).
    pub fn changed(&self) -> bool {
        self.version != self.previous_version
    }
}

/// Replaces or merge-patches the desired document of `id` in one transaction, with the row
/// locked, recording `source` as the origin of the change. The triggers bump the version (only
/// when the document really changes) and capture the change.
pub async fn set_desired(
    client: &mut deadpool_postgres::Object,
    id: &DeviceId,
    change: &DesiredChange,
    source: &str,
) -> Result<DesiredUpdate, DeviceError> {
    let tx = client.transaction().await?;
    set_change_source(&tx, source).await?;
    let row = tx
        .query_opt(
            "SELECT desired, desired_version FROM devices WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        .ok_or_else(|| DeviceError::NotFound(id.clone()))?;
    let current: Value = row.try_get(0)?;
    let previous_version: i64 = row.try_get(1)?;
    let desired = match change {
        DesiredChange::Replace(document) => Value::Object(document.clone()),
        DesiredChange::Merge(patch) => {
            let mut document = current.clone();
            state::apply(&mut document, &Value::Object(patch.clone()));
            document
        }
    };
    state::ensure_object(&desired).map_err(|e| DeviceError::Invalid(e.to_string()))?;
    if desired == current {
        return Ok(DesiredUpdate {
            previous_version,
            version: previous_version,
            desired,
        });
    }
    let version: i64 = tx
        .query_one(
            "UPDATE devices SET desired = $2::jsonb WHERE id = $1 RETURNING desired_version",
            &[&id.as_str(), &desired],
        )
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(DesiredUpdate {
        previous_version,
        version,
        desired,
    })
}
