//! Campaigns as an operator manages them (`devsyncctl campaign`): create one, read its
//! progress, list them, pause, resume or abort.
//!
//! A created campaign is only a row: the requestor replica holding the scheduler lease picks
//! it up, counts its targets and dispatches it (`devsync-requestor`'s campaign driver), and
//! its progress is read from `campaign_devices` (a row per dispatched device), which the
//! driver, the fan-out and device acknowledgements (through the reconciler) keep current.
//! Pause, resume and abort are state changes the driver obeys at its next step.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use devsync_types::{CampaignId, PushPolicy};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::StoreError;

/// A campaign operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("campaign {0} does not exist")]
    NotFound(CampaignId),
    #[error("campaign {0} already exists")]
    AlreadyExists(CampaignId),
    /// The request cannot be honoured (the message says why).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for CampaignError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// Which devices a campaign targets (enabled devices only).
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Devices whose labels contain all of these (an empty map: every device).
    Labels(Map<String, Value>),
    /// Devices with the label `group` equal to this.
    Group(String),
    /// These devices.
    Ids(Vec<String>),
}

impl Selector {
    /// The selector as stored in `campaigns.selector`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Labels(labels) => json!({ "labels": labels }),
            Self::Group(group) => json!({ "group": group }),
            Self::Ids(ids) => json!({ "ids": ids }),
        }
    }
}

/// When a campaign stops by itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AbortCriteria {
    /// Abort when failed / dispatched exceeds this (0..1).
    pub failure_ratio: Option<f64>,
    /// Abort when a device has not converged this long after it was sent.
    pub not_converged_after: Option<Duration>,
}

impl AbortCriteria {
    fn to_json(&self) -> Value {
        let mut map = Map::new();
        if let Some(ratio) = self.failure_ratio {
            map.insert("failure_ratio".into(), json!(ratio));
        }
        if let Some(after) = self.not_converged_after {
            map.insert(
                "not_converged_after_secs".into(),
                json!(after.as_secs_f64()),
            );
        }
        Value::Object(map)
    }
}

/// A campaign to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCampaign {
    pub id: CampaignId,
    pub selector: Selector,
    /// RFC 7386 merge patch applied to each targeted device's desired document.
    pub patch: Map<String, Value>,
    pub policy: PushPolicy,
    /// Devices dispatched per second at most.
    pub rate_per_sec: Option<u32>,
    /// Devices sent and not yet acknowledged at most.
    pub max_in_flight: Option<u32>,
    /// Cumulative share of the targets per wave, in per mille, ending at 1000.
    pub waves: Vec<u16>,
    pub abort: AbortCriteria,
    /// How long a dispatched wave waits for acknowledgements before the next starts.
    pub wave_wait: Duration,
}

/// Parses waves like `canary,10%,50%,100%` into cumulative per mille (`[1, 100, 500, 1000]`).
/// `canary` is 0.1 % of the targets; the shares must grow and the last must be 100 %.
pub fn parse_waves(text: &str) -> Result<Vec<u16>, String> {
    let mut waves = Vec::new();
    for part in text.split(',').map(str::trim) {
        let per_mille = if part.eq_ignore_ascii_case("canary") {
            1
        } else {
            let number = part.strip_suffix('%').ok_or_else(|| {
                format!("wave {part:?}: expected `canary` or a percentage like 10%")
            })?;
            let percent: f64 = number
                .trim()
                .parse()
                .map_err(|_| format!("wave {part:?}: {number:?} is not a number"))?;
            if !(0.1..=100.0).contains(&percent) {
                return Err(format!("wave {part:?}: must be between 0.1% and 100%"));
            }
            (percent * 10.0).round() as u16
        };
        if waves.last().is_some_and(|last| *last >= per_mille) {
            return Err(format!(
                "wave {part:?}: waves are cumulative and must grow (canary,10%,50%,100%)"
            ));
        }
        waves.push(per_mille);
    }
    match waves.last() {
        Some(1000) => Ok(waves),
        _ => Err("the last wave must be 100%".into()),
    }
}

/// Creates a campaign in state `pending`; the scheduler starts it.
pub async fn create(
    client: &impl GenericClient,
    campaign: &NewCampaign,
) -> Result<(), CampaignError> {
    if campaign.waves.last() != Some(&1000) {
        return Err(CampaignError::Invalid("the last wave must be 100%".into()));
    }
    if let Some(ratio) = campaign.abort.failure_ratio
        && !(0.0..1.0).contains(&ratio)
    {
        return Err(CampaignError::Invalid(format!(
            "failure ratio {ratio} must be at least 0 and below 1"
        )));
    }
    let to_i32 = |v: Option<u32>, what: &str| -> Result<Option<i32>, CampaignError> {
        match v {
            None => Ok(None),
            Some(0) => Err(CampaignError::Invalid(format!("{what} must be at least 1"))),
            Some(v) => i32::try_from(v)
                .map(Some)
                .map_err(|_| CampaignError::Invalid(format!("{what} {v} is too large"))),
        }
    };
    let rate = to_i32(campaign.rate_per_sec, "rate")?;
    let max_in_flight = to_i32(campaign.max_in_flight, "max in flight")?;
    let wave_wait = i32::try_from(campaign.wave_wait.as_secs())
        .map_err(|_| CampaignError::Invalid("wave wait is too long".into()))?;
    let inserted = client
        .execute(
            "INSERT INTO campaigns (id, selector, patch, policy, rate_per_sec, max_in_flight,
                 waves, abort_criteria, wave_wait_secs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            &[
                &campaign.id.as_str(),
                &campaign.selector.to_json(),
                &Value::Object(campaign.patch.clone()),
                &campaign.policy.as_str(),
                &rate,
                &max_in_flight,
                &json!(campaign.waves),
                &campaign.abort.to_json(),
                &wave_wait,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(CampaignError::AlreadyExists(campaign.id.clone()));
    }
    Ok(())
}

/// A campaign and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    pub id: String,
    pub state: String,
    pub reason: Option<String>,
    pub policy: String,
    pub selector: Value,
    pub patch: Value,
    pub rate_per_sec: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub waves: Value,
    pub abort_criteria: Value,
    /// The wave being dispatched (0-based).
    pub wave: i32,
    /// Whether the targets have been counted (`targeted` is set; final once the campaign
    /// completes).
    pub expanded: bool,
    pub targeted: i64,
    /// Targeted and not dispatched yet (a device gets its `campaign_devices` row when it is
    /// dispatched).
    pub pending: i64,
    /// Dispatched and not yet acknowledged.
    pub sent: i64,
    pub acked: i64,
    pub converged: i64,
    pub failed: i64,
    pub skipped: i64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Progress {
    /// Devices dispatched so far (whatever happened to them since).
    pub fn dispatched(&self) -> i64 {
        self.sent + self.acked + self.converged + self.failed + self.skipped
    }

    /// Whether the campaign is over.
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "aborted" | "expired")
    }
}

const PROGRESS: &str = "SELECT c.id, c.state, c.state_reason, c.policy, c.selector, c.patch,
        c.rate_per_sec, c.max_in_flight, c.waves, c.abort_criteria, c.current_wave, c.expanded,
        c.targeted,
        coalesce(s.pending, 0) + CASE WHEN c.expanded
            THEN greatest(c.targeted - coalesce(s.total, 0), 0) ELSE 0 END,
        coalesce(s.sent, 0), coalesce(s.acked, 0),
        coalesce(s.converged, 0), coalesce(s.failed, 0), coalesce(s.skipped, 0),
        c.created_at, c.started_at, c.finished_at
    FROM campaigns c LEFT JOIN LATERAL (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'sent') AS sent,
               count(*) FILTER (WHERE status = 'acked') AS acked,
               count(*) FILTER (WHERE status = 'converged') AS converged,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'skipped') AS skipped
        FROM campaign_devices WHERE campaign_id = c.id
    ) s ON true";

fn progress_from(row: &tokio_postgres::Row) -> Progress {
    Progress {
        id: row.get(0),
        state: row.get(1),
        reason: row.get(2),
        policy: row.get(3),
        selector: row.get(4),
        patch: row.get(5),
        rate_per_sec: row.get(6),
        max_in_flight: row.get(7),
        waves: row.get(8),
        abort_criteria: row.get(9),
        wave: row.get(10),
        expanded: row.get(11),
        targeted: row.get(12),
        pending: row.get(13),
        sent: row.get(14),
        acked: row.get(15),
        converged: row.get(16),
        failed: row.get(17),
        skipped: row.get(18),
        created_at: row.get(19),
        started_at: row.get(20),
        finished_at: row.get(21),
    }
}

/// One campaign's progress.
pub async fn progress(
    client: &impl GenericClient,
    id: &CampaignId,
) -> Result<Progress, CampaignError> {
    let row = client
        .query_opt(&format!("{PROGRESS} WHERE c.id = $1"), &[&id.as_str()])
        .await?
        .ok_or_else(|| CampaignError::NotFound(id.clone()))?;
    Ok(progress_from(&row))
}

/// The most recent campaigns, newest first.
pub async fn list(client: &impl GenericClient, limit: i64) -> Result<Vec<Progress>, CampaignError> {
    let rows = client
        .query(
            &format!("{PROGRESS} ORDER BY c.created_at DESC, c.id LIMIT $1"),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(progress_from).collect())
}

/// What an operator can do to a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop dispatching until resumed.
    Pause,
    /// Continue a paused campaign.
    Resume,
    /// End it: nothing more is dispatched; devices already sent keep the change.
    Abort,
}

impl Control {
    fn transition(self) -> (&'static [&'static str], &'static str, &'static str) {
        match self {
            Self::Pause => (&["pending", "running"], "paused", "paused by an operator"),
            Self::Resume => (&["paused"], "running", "resumed by an operator"),
            Self::Abort => (
                &["pending", "running", "paused"],
                "aborted",
                "aborted by an operator",
            ),
        }
    }
}

/// Applies `control` to campaign `id`; returns the new state.
pub async fn control(
    client: &impl GenericClient,
    id: &CampaignId,
    control: Control,
) -> Result<&'static str, CampaignError> {
    let (from, to, reason) = control.transition();
    let from: Vec<&str> = from.to_vec();
    let changed = client
        .execute(
            "UPDATE campaigns SET state = $2, state_reason = $3, updated_at = now(),
                 finished_at = CASE WHEN $2 = 'aborted' THEN now() ELSE finished_at END
             WHERE id = $1 AND state = ANY($4)",
            &[&id.as_str(), &to, &reason, &from],
        )
        .await?;
    if changed == 1 {
        return Ok(to);
    }
    let state: Option<String> = client
        .query_opt("SELECT state FROM campaigns WHERE id = $1", &[&id.as_str()])
        .await?
        .map(|row| row.get(0));
    match state {
        None => Err(CampaignError::NotFound(id.clone())),
        Some(state) => Err(CampaignError::Invalid(format!(
            "campaign {id} is {state}; it can be {} only when {}",
            to,
            from.join(" or ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_into_cumulative_per_mille() {
        assert_eq!(
            parse_waves("canary,10%,50%,100%").unwrap(),
            vec![1, 100, 500, 1000]
        );
        assert_eq!(parse_waves("100%").unwrap(), vec![1000]);
        assert_eq!(parse_waves(" 0.5% , 100% ").unwrap(), vec![5, 1000]);
        for bad in [
            "",
            "10%",
            "50%,10%,100%",
            "ten%,100%",
            "10,100%",
            "100%,100%",
            "150%",
        ] {
            assert!(parse_waves(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
