//! Answers a waking device: the merge patch from the desired version it applied last to the
//! current one (from `desired_history`), the whole document when that version is no longer
//! kept or was never applied, or "up to date". One indexed query, no queueing.

use deadpool_postgres::Pool;
use devsync_proto::v1::{Payload, RefreshReply, payload, refresh_reply::Kind};
use devsync_types::{DeviceId, state};
use serde_json::Value;

const QUERY: &str = "SELECT d.desired, d.desired_version, h.desired
                     FROM devices d
                     LEFT JOIN desired_history h ON h.device_id = d.id AND h.version = $2
                     WHERE d.id = $1";

/// Builds the reply for `device`, which applied `since` last.
pub async fn answer(pool: &Pool, device: &DeviceId, since: u64) -> Result<RefreshReply, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(QUERY)
        .await
        .map_err(|e| e.to_string())?;
    let since_version = i64::try_from(since).unwrap_or(i64::MAX);
    let row = client
        .query_opt(&statement, &[&device.as_str(), &since_version])
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("device {device} is not registered"))?;
    let current: Value = row.get(0);
    let version = row.get::<_, i64>(1) as u64;
    let base: Option<Value> = row.get(2);
    let (kind, document) = if since == version {
        (Kind::UpToDate, None)
    } else {
        match base {
            Some(base) if since > 0 && since < version => {
                (Kind::Delta, Some(state::diff(&base, &current)))
            }
            _ => (Kind::Full, Some(current)),
        }
    };
    Ok(RefreshReply {
        kind: kind as i32,
        desired_version: version,
        desired: document.map(|doc| Payload {
            body: Some(payload::Body::InlineJson(
                serde_json::to_vec(&doc).unwrap_or_default().into(),
            )),
        }),
    })
}
