//! The checker: after a scenario, compares what the devices were told with what the database,
//! the outbox, the dead-letter stream and the audit trail hold.
//!
//! - every acknowledged report is in its device's reported state (`lost` counts the missing);
//! - no refused report is;
//! - every device's state is what its applied reports imply: `last` is the highest applied
//!   sequence and `reported_version` counts exactly the applied reports (each writes a field
//!   of its own, so a report applied twice or half would show);
//! - the audit trail records each applied report once (`duplicated` counts the extra
//!   `report.applied` events), and its hash chain verifies;
//! - the outbox drains (every committed output was published).
//!
//! `redelivered` counts reports the reconciler handled on a second or later delivery (the
//! `delivery` field of their audit events): the work a fault caused to be repeated.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::env::Env;
use crate::load::{Ledger, Sent};

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub sent: usize,
    pub acked: usize,
    pub refused: usize,
    pub unknown: usize,
    /// Acknowledged reports missing from the database.
    pub lost: usize,
    /// Reports recorded as applied more than once.
    pub duplicated: usize,
    /// Reports handled on a redelivery.
    pub redelivered: usize,
    /// From the end of the fault until every acknowledged report was in the database.
    pub converge_seconds: f64,
    pub dead_letters: u64,
    /// Devices whose desired state an admin changed during the fault (each must get a push
    /// of its final desired version).
    pub admin_devices: usize,
    /// Everything else that is wrong, in words.
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.problems.is_empty()
    }
}

/// Runs every check; waits up to `timeout` for convergence.
pub async fn check(env: &Env, ledger: &Ledger, timeout: Duration) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let mut verdict = Verdict {
        sent: ledger.total(),
        acked: ledger.count(Sent::Acked),
        refused: ledger.count(Sent::Refused),
        unknown: ledger.count(Sent::Unknown),
        ..Verdict::default()
    };
    let db = env.db().await?;
    let ids: Vec<String> = ledger
        .devices
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    let expected: BTreeMap<String, BTreeSet<u64>> = ledger
        .devices
        .iter()
        .map(|(id, entries)| {
            let acked = entries
                .iter()
                .filter(|e| e.outcome == Sent::Acked)
                .map(|e| e.sequence)
                .collect();
            (id.to_string(), acked)
        })
        .collect();

    // 1. Every acknowledged report reaches the database.
    let mut rows = Vec::new();
    let mut missing = usize::MAX;
    let deadline = started + timeout;
    while Instant::now() < deadline {
        rows = db
            .query(
                "SELECT id, reported, reported_version FROM devices WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        missing = rows
            .iter()
            .map(|row| {
                let id: String = row.get(0);
                let reported: serde_json::Value = row.get(1);
                expected[&id]
                    .iter()
                    .filter(|seq| reported.get(format!("s{seq}")).is_none())
                    .count()
            })
            .sum();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    verdict.converge_seconds = started.elapsed().as_secs_f64();
    verdict.lost = missing;
    if missing > 0 {
        verdict.problems.push(format!(
            "{missing} acknowledged reports never reached the database"
        ));
    }

    // 2. Each device's state is what its applied reports imply; refused ones are absent.
    let entries_of: BTreeMap<&str, &Vec<crate::load::Entry>> = ledger
        .devices
        .iter()
        .map(|(id, entries)| (id.as_str(), entries))
        .collect();
    let mut applied_total = 0usize;
    for row in &rows {
        let id: String = row.get(0);
        let reported: serde_json::Value = row.get(1);
        let version: i64 = row.get(2);
        let entries = entries_of[id.as_str()];
        let present: Vec<u64> = entries
            .iter()
            .map(|e| e.sequence)
            .filter(|seq| reported.get(format!("s{seq}")).is_some())
            .collect();
        applied_total += present.len();
        for entry in entries.iter().filter(|e| e.outcome == Sent::Refused) {
            if reported.get(format!("s{}", entry.sequence)).is_some() {
                verdict.problems.push(format!(
                    "{id}: refused report {} was applied",
                    entry.sequence
                ));
            }
        }
        if version != present.len() as i64 {
            verdict.problems.push(format!(
                "{id}: reported_version {version} but {} reports applied",
                present.len()
            ));
        }
        let last = reported.get("last").and_then(|v| v.as_u64());
        if last != present.iter().max().copied() {
            verdict.problems.push(format!(
                "{id}: last = {last:?}, highest applied report {:?}",
                present.iter().max()
            ));
        }
    }

    // 3. The outbox drains.
    let drained = devsync_testkit::poll_until(Duration::from_secs(30), || async {
        let left: i64 = db
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .ok()?
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    if drained.is_none() {
        verdict
            .problems
            .push("the outbox still holds unpublished outputs".into());
    }

    // 4. The audit trail: every applied report once, chain intact.
    let applied_events = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        let count: i64 = db
            .query_one(
                "SELECT count(DISTINCT request_id) FROM audit_events
                 WHERE action = 'report.applied' AND device_id = ANY($1)",
                &[&ids],
            )
            .await
            .ok()?
            .get(0);
        (count as usize >= applied_total).then_some(count)
    })
    .await;
    if applied_events.is_none() {
        verdict.problems.push(format!(
            "the audit trail does not hold a report.applied event for each of the {applied_total} applied reports"
        ));
    }
    let duplicated: i64 = db
        .query_one(
            "SELECT coalesce(sum(n - 1), 0)::int8 FROM (
                 SELECT count(*) AS n FROM audit_events
                 WHERE action = 'report.applied' AND device_id = ANY($1)
                 GROUP BY request_id HAVING count(*) > 1) AS d",
            &[&ids],
        )
        .await?
        .get(0);
    verdict.duplicated = duplicated as usize;
    let redelivered: i64 = db
        .query_one(
            "SELECT count(DISTINCT request_id) FROM audit_events
             WHERE action IN ('report.applied', 'report.duplicate') AND device_id = ANY($1)
               AND coalesce((details->>'delivery')::int, 1) > 1",
            &[&ids],
        )
        .await?
        .get(0);
    verdict.redelivered = redelivered as usize;
    let mut db = db;
    for day in devsync_store::audit::verify_snapshot(&mut db, None).await? {
        for problem in day.problems {
            verdict
                .problems
                .push(format!("audit chain {}: {problem}", day.day));
        }
    }

    // 5. Dead letters (a report dead-lettered after it was acknowledged is also lost above).
    let js = async_nats::jetstream::new(crate::env::connect(&env.nats_url).await?);
    if let Ok(mut stream) = js.get_stream(devsync_types::names::STREAM_DLQ).await {
        verdict.dead_letters = stream.info().await?.state.messages;
    }
    Ok(verdict)
}

/// Admin changes made during the fault: every change was relayed (`desired_changes` drained)
/// and, for each changed device, the reconciler requested a push of its final desired version.
pub async fn check_admin(
    env: &Env,
    devices: &[String],
    verdict: &mut Verdict,
) -> anyhow::Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let db = env.db().await?;
    let relayed = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        let left: i64 = db
            .query_one("SELECT count(*) FROM desired_changes", &[])
            .await
            .ok()?
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    if relayed.is_none() {
        verdict
            .problems
            .push("admin changes were not all relayed to the reconciler".into());
    }
    let pushed = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        let missing: i64 = db
            .query_one(
                "SELECT count(*) FROM devices d WHERE d.id = ANY($1) AND NOT EXISTS (
                     SELECT 1 FROM audit_events e
                     WHERE e.device_id = d.id AND e.action = 'push.requested'
                       AND (e.details->>'desired_version')::int8 = d.desired_version)",
                &[&devices],
            )
            .await
            .ok()?
            .get(0);
        (missing == 0).then_some(())
    })
    .await;
    if pushed.is_none() {
        verdict.problems.push(format!(
            "some of the {} devices changed by an admin got no push of their final desired version",
            devices.len()
        ));
    }
    verdict.admin_devices = devices.len();
    Ok(())
}
