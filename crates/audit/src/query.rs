//! Search parameters, as the HTTP API, the NATS endpoint and `devsyncctl audit` give them,
//! parsed into a store query. Every bad parameter gets an error that names it.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use devsync_store::audit::{Cursor, Query};
use devsync_types::{AuditOutcome, DeviceId, RequestId, WorkerId};

/// The parameters a search accepts.
pub const PARAMETERS: [&str; 10] = [
    "device", "worker", "request", "trace", "stage", "outcome", "since", "until", "limit", "cursor",
];

/// Default page size.
pub const DEFAULT_LIMIT: u32 = 100;
/// How far back a search looks when it names no time, request, trace or cursor.
pub const DEFAULT_WINDOW_HOURS: i64 = 24;

/// A parameter that cannot be used; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

fn bad(name: &str, problem: impl std::fmt::Display) -> QueryError {
    QueryError(format!("parameter {name}: {problem}"))
}

/// A time: RFC 3339 (`2026-11-24T08:00:00Z`) or a duration ago (`90s`, `15m`, `2h`, `7d`).
pub fn parse_time(
    name: &str,
    value: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, QueryError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        bad(
            name,
            format!("{value:?} is neither an RFC 3339 time nor a duration like 1h or 7d"),
        )
    })?;
    let ago = Duration::from_std(ago).map_err(|_| bad(name, "duration out of range"))?;
    Ok(now - ago)
}

/// Parses search parameters. `device` may also come from the path (timelines).
pub fn parse(params: &BTreeMap<String, String>, now: DateTime<Utc>) -> Result<Query, QueryError> {
    if let Some(unknown) = params.keys().find(|k| !PARAMETERS.contains(&k.as_str())) {
        return Err(QueryError(format!(
            "unknown parameter {unknown}; known: {}",
            PARAMETERS.join(", ")
        )));
    }
    let get = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let mut query = Query {
        limit: DEFAULT_LIMIT,
        ..Query::default()
    };
    if let Some(device) = get("device") {
        query.device = Some(DeviceId::parse(device).map_err(|e| bad("device", e))?);
    }
    if let Some(worker) = get("worker") {
        query.worker = Some(worker.parse::<WorkerId>().map_err(|e| bad("worker", e))?);
    }
    if let Some(request) = get("request") {
        query.request = Some(RequestId::parse(request).map_err(|e| bad("request", e))?);
    }
    if let Some(trace) = get("trace") {
        if trace.len() != 32 || !trace.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("trace", "must be 32 hexadecimal digits"));
        }
        query.trace = Some(trace.to_ascii_lowercase());
    }
    if let Some(stage) = get("stage") {
        if stage.len() > 64 {
            return Err(bad("stage", "longer than 64 characters"));
        }
        query.stage = Some(stage.to_owned());
    }
    if let Some(outcome) = get("outcome") {
        query.outcome = Some(
            outcome
                .parse::<AuditOutcome>()
                .map_err(|e| bad("outcome", e))?,
        );
    }
    if let Some(since) = get("since") {
        query.since = Some(parse_time("since", since, now)?);
    }
    if let Some(until) = get("until") {
        query.until = Some(parse_time("until", until, now)?);
    }
    if let (Some(since), Some(until)) = (query.since, query.until)
        && since >= until
    {
        return Err(bad("until", "must be later than since"));
    }
    if let Some(limit) = get("limit") {
        let limit: u32 = limit
            .parse()
            .map_err(|_| bad("limit", format!("{limit:?} is not a whole number")))?;
        if !(1..=1000).contains(&limit) {
            return Err(bad("limit", "must be between 1 and 1000"));
        }
        query.limit = limit;
    }
    if let Some(cursor) = get("cursor") {
        query.cursor = Some(cursor.parse::<Cursor>().map_err(|e| bad("cursor", e))?);
    }
    let pinned = query.request.is_some() || query.trace.is_some() || query.cursor.is_some();
    if query.since.is_none() && !pinned {
        query.since = Some(now - Duration::hours(DEFAULT_WINDOW_HOURS));
    }
    Ok(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_parameters_are_named() {
        let now = Utc::now();
        let cases = [
            (
                vec![("limit", "0")],
                "parameter limit: must be between 1 and 1000",
            ),
            (
                vec![("limit", "lots")],
                "parameter limit: \"lots\" is not a whole number",
            ),
            (
                vec![("device", "a.b")],
                "parameter device: device id \"a.b\" contains '.'",
            ),
            (
                vec![("outcome", "meh")],
                "parameter outcome: outcome \"meh\" is not one of",
            ),
            (
                vec![("since", "yesterday")],
                "parameter since: \"yesterday\" is neither",
            ),
            (
                vec![("since", "1h"), ("until", "2h")],
                "parameter until: must be later than since",
            ),
            (vec![("cursor", "x")], "parameter cursor:"),
            (
                vec![("trace", "xyz")],
                "parameter trace: must be 32 hexadecimal digits",
            ),
            (vec![("worker", "nobody/x")], "parameter worker:"),
            (vec![("colour", "red")], "unknown parameter colour"),
        ];
        for (input, expected) in cases {
            let err = parse(&params(&input), now).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn defaults_and_relative_times() {
        let now = Utc::now();
        let q = parse(&params(&[("device", "d1")]), now).unwrap();
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.since, Some(now - Duration::hours(24)));
        let q = parse(&params(&[("since", "30m")]), now).unwrap();
        assert_eq!(q.since, Some(now - Duration::minutes(30)));
        let q = parse(&params(&[("request", "report:d1:1")]), now).unwrap();
        assert_eq!(
            q.since, None,
            "a request id is searched over the whole retention"
        );
    }
}
