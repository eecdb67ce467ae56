//! The audit trail in PostgreSQL: batch insert (idempotent, hash-chained), search with keyset
//! pagination, verification of the chain, and retention by whole partitions.
//!
//! The chain: each batch insert adds, per UTC day it touches, a link holding the ids of the
//! rows it stored, the SHA-256 of those rows' canonical text (computed by PostgreSQL from the
//! stored values, `devsync_audit_row_text`), and the hash chained to the previous link of that
//! day. Links of a day are written under an advisory lock, so replicas take turns per day.
//! Verification recomputes every link: a row changed, removed or slipped in by hand breaks it.

use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::GenericClient;
use devsync_types::{AuditOutcome, AuditRecord, DeviceId, RequestId, WorkerId};
use serde::Serialize;
use serde_json::Value;

use crate::StoreError;

/// Stores a batch and returns, per UTC day it touched, the events it stored (by id and time,
/// in chain order) and the hash of their canonical text: one statement, no re-read. The text
/// is `devsync_audit_row_text` of the row as stored, as [`verify`] recomputes it.
macro_rules! insert_sql {
    ($conflict:literal) => {
        concat!(
            "WITH stored AS (
                INSERT INTO audit_events (at, event_id, device_id, worker_id, request_id, stage,
                                          action, outcome, details, trace_id)
                SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[],
                                     $5::text[], $6::text[], $7::text[], $8::text[],
                                     $9::jsonb[], $10::text[]) ",
            $conflict,
            " RETURNING event_id, at, devsync_audit_row_text(audit_events) AS text
            )
            SELECT (at AT TIME ZONE 'UTC')::date AS day,
                   array_agg(event_id ORDER BY at, event_id),
                   array_agg(at ORDER BY at, event_id),
                   sha256(convert_to(string_agg(text, E'\\x1e' ORDER BY at, event_id), 'UTF8'))
            FROM stored GROUP BY 1 ORDER BY 1"
        )
    };
}

/// The usual case, a batch never stored before: a plain insert. `ON CONFLICT` makes
/// PostgreSQL probe the unique index before every row (8% of its CPU during ingest).
const INSERT: &str = insert_sql!("");

/// A batch received again (redelivered, or replayed by a service): skips what is stored.
const INSERT_SKIPPING_STORED: &str = insert_sql!("ON CONFLICT DO NOTHING");

/// The hash of the events a link covers, named by (event_id, at).
const BATCH_HASH: &str =
    "SELECT sha256(convert_to(coalesce(string_agg(devsync_audit_row_text(e), E'\\x1e'
        ORDER BY e.at, e.event_id), ''), 'UTF8'))
    FROM audit_events e
    JOIN unnest($3::text[], $4::timestamptz[]) AS k(event_id, at)
        ON e.event_id = k.event_id AND e.at = k.at
    WHERE e.at >= $1 AND e.at < $2";

/// The same for links made before V8, which name their events by id only.
const BATCH_HASH_BY_ID: &str =
    "SELECT sha256(convert_to(coalesce(string_agg(devsync_audit_row_text(e), E'\\x1e'
        ORDER BY e.at, e.event_id), ''), 'UTF8'))
    FROM audit_events e
    WHERE e.at >= $1 AND e.at < $2 AND e.event_id = ANY($3)";

/// Appends a link after the day's last one (the first link chains to the empty hash).
const LINK: &str =
    "INSERT INTO audit_chain (day, seq, event_ids, event_ats, batch_hash, chain_hash)
    SELECT $1, coalesce(head.seq, 0) + 1, $2, $3, $4::bytea,
           sha256(coalesce(head.chain_hash, ''::bytea) || $4::bytea)
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT seq, chain_hash FROM audit_chain WHERE day = $1 ORDER BY seq DESC LIMIT 1
    ) AS head ON true";

fn day_bounds(day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    (start, start + chrono::Duration::days(1))
}

/// Stores `records` in one transaction; events already stored are skipped. Returns how many
/// were new.
pub async fn insert(
    client: &mut deadpool_postgres::Object,
    records: &[AuditRecord],
) -> Result<usize, StoreError> {
    if records.is_empty() {
        return Ok(0);
    }
    let mut tx = client.transaction().await?;
    let mut days: Vec<NaiveDate> = records.iter().map(|r| r.at.date_naive()).collect();
    days.sort_unstable();
    days.dedup();
    for day in &days {
        tx.execute("SELECT devsync_audit_ensure_partitions($1, 1)", &[day])
            .await?;
    }
    let at: Vec<DateTime<Utc>> = records.iter().map(|r| r.at).collect();
    let ids: Vec<&str> = records.iter().map(|r| r.event_id.as_str()).collect();
    let devices: Vec<Option<&str>> = records
        .iter()
        .map(|r| r.device_id.as_ref().map(DeviceId::as_str))
        .collect();
    let workers: Vec<String> = records.iter().map(|r| r.worker_id.to_string()).collect();
    let requests: Vec<Option<&str>> = records
        .iter()
        .map(|r| r.request_id.as_ref().map(RequestId::as_str))
        .collect();
    let stages: Vec<&str> = records.iter().map(|r| r.stage.as_str()).collect();
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    let outcomes: Vec<&str> = records.iter().map(|r| r.outcome.as_str()).collect();
    let details: Vec<&Value> = records.iter().map(|r| &r.details).collect();
    let traces: Vec<Option<&str>> = records.iter().map(|r| r.trace_id.as_deref()).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &at, &ids, &devices, &workers, &requests, &stages, &actions, &outcomes, &details, &traces,
    ];
    let insert = tx.prepare_cached(INSERT).await?;
    let attempt = tx.savepoint("devsync_audit_insert").await?;
    let days = match attempt.query(&insert, &params).await {
        Ok(days) => {
            attempt.commit().await?;
            days
        }
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            attempt.rollback().await?;
            let insert = tx.prepare_cached(INSERT_SKIPPING_STORED).await?;
            tx.query(&insert, &params).await?
        }
        Err(error) => return Err(error.into()),
    };
    let mut stored = 0;
    let link = tx.prepare_cached(LINK).await?;
    for row in &days {
        let day: NaiveDate = row.get(0);
        let ids: Vec<String> = row.get(1);
        let ats: Vec<DateTime<Utc>> = row.get(2);
        let hash: Vec<u8> = row.get(3);
        stored += ids.len();
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('devsync-audit-chain'), $1)",
            &[&chrono::Datelike::num_days_from_ce(&day)],
        )
        .await?;
        tx.execute(&link, &[&day, &ids, &ats, &hash]).await?;
    }
    tx.commit().await?;
    Ok(stored)
}

/// A search of the audit trail. Times are a half-open range `[since, until)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    pub device: Option<DeviceId>,
    pub worker: Option<WorkerId>,
    pub request: Option<RequestId>,
    pub trace: Option<String>,
    pub stage: Option<String>,
    pub outcome: Option<AuditOutcome>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// 1..=1000.
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// Where a page ended: the (time, event id) of its last event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub event_id: String,
}

impl fmt::Display for Cursor {
    /// `<microseconds>-<hex of the event id>`: opaque, URL-safe.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-", self.at.timestamp_micros())?;
        for byte in self.event_id.as_bytes() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a cursor returned by a previous page");
        let (micros, hex) = s.split_once('-').ok_or_else(bad)?;
        let at =
            DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
        if hex.len() % 2 != 0 {
            return Err(bad());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        Ok(Self {
            at,
            event_id: String::from_utf8(bytes).map_err(|_| bad())?,
        })
    }
}

/// One page of results, in time order.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub events: Vec<AuditRecord>,
    /// Pass back as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Builds the SQL and parameters of `query`.
fn plan(
    query: &Query,
) -> (
    String,
    Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
) {
    let mut sql = String::from(
        "SELECT at, event_id, device_id, worker_id, request_id, stage, action, outcome, details, trace_id
         FROM audit_events WHERE true",
    );
    let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
    let mut add = |sql: &mut String,
                   clause: &str,
                   value: Box<dyn tokio_postgres::types::ToSql + Sync + Send>| {
        params.push(value);
        sql.push_str(&clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(device) = &query.device {
        add(&mut sql, " AND device_id = ?", Box::new(device.to_string()));
    }
    if let Some(worker) = &query.worker {
        add(&mut sql, " AND worker_id = ?", Box::new(worker.to_string()));
    }
    if let Some(request) = &query.request {
        add(
            &mut sql,
            " AND request_id = ?",
            Box::new(request.to_string()),
        );
    }
    if let Some(trace) = &query.trace {
        add(&mut sql, " AND trace_id = ?", Box::new(trace.clone()));
    }
    if let Some(stage) = &query.stage {
        add(&mut sql, " AND stage = ?", Box::new(stage.clone()));
    }
    if let Some(outcome) = &query.outcome {
        add(
            &mut sql,
            " AND outcome = ?",
            Box::new(outcome.as_str().to_owned()),
        );
    }
    if let Some(since) = query.since {
        add(&mut sql, " AND at >= ?", Box::new(since));
    }
    if let Some(until) = query.until {
        add(&mut sql, " AND at < ?", Box::new(until));
    }
    if let Some(cursor) = &query.cursor {
        params.push(Box::new(cursor.at));
        params.push(Box::new(cursor.event_id.clone()));
        let n = params.len();
        sql.push_str(&format!(" AND (at, event_id) > (${}, ${})", n - 1, n));
    }
    params.push(Box::new(i64::from(query.limit.clamp(1, 1000)) + 1));
    sql.push_str(&format!(" ORDER BY at, event_id LIMIT ${}", params.len()));
    (sql, params)
}

/// The query plan PostgreSQL would use for `query` (for tests and troubleshooting).
pub async fn explain(client: &impl GenericClient, query: &Query) -> Result<String, StoreError> {
    let (sql, params) = plan(query);
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(|p| p.as_ref() as _).collect();
    let rows = client.query(&format!("EXPLAIN {sql}"), &refs).await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Runs `query`.
pub async fn search(client: &impl GenericClient, query: &Query) -> Result<Page, StoreError> {
    let (sql, params) = plan(query);
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(|p| p.as_ref() as _).collect();
    let rows = client.query(&sql, &refs).await?;
    let limit = query.limit.clamp(1, 1000) as usize;
    let mut events = Vec::with_capacity(rows.len().min(limit));
    for row in rows.iter().take(limit) {
        let worker: String = row.get(3);
        let outcome: String = row.get(7);
        events.push(AuditRecord {
            at: row.get(0),
            event_id: row.get(1),
            device_id: row
                .get::<_, Option<String>>(2)
                .and_then(|d| DeviceId::parse(d).ok()),
            worker_id: worker
                .parse()
                .map_err(|e| StoreError::Pool(format!("stored worker id {worker:?}: {e}")))?,
            request_id: row
                .get::<_, Option<String>>(4)
                .and_then(|r| RequestId::parse(r).ok()),
            stage: row.get(5),
            action: row.get(6),
            outcome: outcome
                .parse()
                .map_err(|e| StoreError::Pool(format!("stored outcome: {e}")))?,
            details: row.get(8),
            trace_id: row.get(9),
        });
    }
    let next_cursor = (rows.len() > limit)
        .then(|| events.last())
        .flatten()
        .map(|last| {
            Cursor {
                at: last.at,
                event_id: last.event_id.clone(),
            }
            .to_string()
        });
    Ok(Page {
        events,
        next_cursor,
    })
}

/// What verification found for one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayReport {
    pub day: NaiveDate,
    pub links: usize,
    pub events: usize,
    /// Human-readable problems; empty when the day verifies.
    pub problems: Vec<String>,
}

/// [`verify`] in one read-only snapshot (`REPEATABLE READ`), so events the audit service
/// stores meanwhile are neither counted without their link nor the other way round. What
/// `devsyncctl audit verify` runs.
pub async fn verify_snapshot(
    client: &mut deadpool_postgres::Object,
    day: Option<NaiveDate>,
) -> Result<Vec<DayReport>, StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let reports = verify(&tx, day).await?;
    tx.commit().await?;
    Ok(reports)
}

/// Verifies the chain of `day`, or of every day with links. Run it in one snapshot
/// ([`verify_snapshot`]) while events are being stored.
pub async fn verify(
    client: &impl GenericClient,
    day: Option<NaiveDate>,
) -> Result<Vec<DayReport>, StoreError> {
    let days: Vec<NaiveDate> = match day {
        Some(day) => vec![day],
        None => client
            .query("SELECT DISTINCT day FROM audit_chain ORDER BY day", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    let mut reports = Vec::new();
    for day in days {
        let (start, end) = day_bounds(day);
        let links = client
            .query(
                "SELECT seq, event_ids, batch_hash, chain_hash, event_ats FROM audit_chain
                 WHERE day = $1 ORDER BY seq",
                &[&day],
            )
            .await?;
        let mut problems = Vec::new();
        let mut previous: Vec<u8> = Vec::new();
        let mut events = 0;
        for link in &links {
            let seq: i64 = link.get(0);
            let ids: Vec<String> = link.get(1);
            let stored_batch: Vec<u8> = link.get(2);
            let stored_chain: Vec<u8> = link.get(3);
            events += ids.len();
            let ats: Option<Vec<DateTime<Utc>>> = link.get(4);
            let batch: Vec<u8> = match &ats {
                Some(ats) => {
                    client
                        .query_one(BATCH_HASH, &[&start, &end, &ids, ats])
                        .await?
                }
                None => {
                    client
                        .query_one(BATCH_HASH_BY_ID, &[&start, &end, &ids])
                        .await?
                }
            }
            .get(0);
            let chain: Vec<u8> = client
                .query_one(
                    "SELECT sha256($1::bytea || $2::bytea)",
                    &[&previous, &batch],
                )
                .await?
                .get(0);
            if batch != stored_batch {
                problems.push(format!(
                    "link {seq}: the {} events it covers were altered or removed",
                    ids.len()
                ));
            } else if chain != stored_chain {
                problems.push(format!(
                    "link {seq}: the chain is broken (a link was altered or removed)"
                ));
            }
            previous = stored_chain;
        }
        let stored: i64 = client
            .query_one(
                "SELECT count(*) FROM audit_events WHERE at >= $1 AND at < $2",
                &[&start, &end],
            )
            .await?
            .get(0);
        if stored as usize != events {
            problems.push(format!(
                "{stored} events stored but {events} covered by the chain (events added or removed by hand)"
            ));
        }
        reports.push(DayReport {
            day,
            links: links.len(),
            events,
            problems,
        });
    }
    Ok(reports)
}

/// Creates partitions for today and the next `ahead_days`, and drops those older than
/// `retention`. Returns (created, dropped).
pub async fn maintain(
    client: &impl GenericClient,
    retention: std::time::Duration,
    ahead_days: i32,
) -> Result<(i32, i32), StoreError> {
    let today = Utc::now().date_naive();
    let created: i32 = client
        .query_one(
            "SELECT devsync_audit_ensure_partitions($1, $2)",
            &[&today, &(ahead_days + 1)],
        )
        .await?
        .get(0);
    let keep = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(30));
    let cutoff = (Utc::now() - keep).date_naive();
    let dropped: i32 = client
        .query_one("SELECT devsync_audit_drop_before($1)", &[&cutoff])
        .await?
        .get(0);
    Ok((created, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            event_id: "report:d1:7/reconcile/report.applied".into(),
        };
        let text = cursor.to_string();
        assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(text.parse::<Cursor>().unwrap(), cursor);
        assert!("nonsense".parse::<Cursor>().is_err());
        assert!("12-zz".parse::<Cursor>().is_err());
    }
}
