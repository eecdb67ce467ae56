//! `devsyncctl audit`: search, follow and verify the audit trail, straight from PostgreSQL with
//! the same query code the audit service's API uses.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use devsync_runtime::CommonSettings;
use devsync_store::audit::{self, Cursor};
use devsync_types::AuditRecord;

use crate::cli::{AuditArgs, AuditCommand};
use crate::output::table;

/// Runs `devsyncctl audit`.
pub async fn run(settings: &CommonSettings, args: AuditArgs) -> anyhow::Result<()> {
    let pool = devsync_store::pool(settings.database.url.expose(), 1)?;
    let mut client = pool.get().await.context("connect to postgres")?;
    if let Some(AuditCommand::Verify { day }) = args.command {
        let reports = audit::verify_snapshot(&mut client, day).await?;
        let mut out = table(["day", "links", "events", "result"]);
        let mut failed = 0;
        for report in &reports {
            let result = if report.problems.is_empty() {
                "ok".to_owned()
            } else {
                failed += 1;
                report.problems.join("; ")
            };
            out.add_row([
                report.day.to_string(),
                report.links.to_string(),
                report.events.to_string(),
                result,
            ]);
        }
        println!("{out}");
        if failed > 0 {
            bail!("{failed} day(s) do not verify");
        }
        println!("audit trail verified: {} day(s)", reports.len());
        return Ok(());
    }
    let mut params = BTreeMap::new();
    for (name, value) in [
        ("device", &args.device),
        ("worker", &args.worker),
        ("request", &args.request),
        ("trace", &args.trace),
        ("stage", &args.stage),
        ("outcome", &args.outcome),
        ("since", &args.since),
        ("until", &args.until),
    ] {
        if let Some(value) = value {
            params.insert(name.to_owned(), value.clone());
        }
    }
    params.insert("limit".into(), args.limit.to_string());
    let mut query = devsync_audit::query::parse(&params, chrono::Utc::now())?;
    let page = audit::search(&client, &query).await?;
    print_events(&page.events, args.json);
    if !args.follow {
        if page.next_cursor.is_some() && !args.json {
            println!("(more: raise --limit or narrow --since)");
        }
        return Ok(());
    }
    // Follow: keep asking for what came after the last event shown.
    let mut last = page.events.last().map(|e| Cursor {
        at: e.at,
        event_id: e.event_id.clone(),
    });
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        query.cursor = last.clone();
        let page = audit::search(&client, &query).await?;
        print_events(&page.events, args.json);
        if let Some(e) = page.events.last() {
            last = Some(Cursor {
                at: e.at,
                event_id: e.event_id.clone(),
            });
        }
    }
}

fn print_events(events: &[AuditRecord], json: bool) {
    if json {
        for event in events {
            println!("{}", serde_json::to_string(event).unwrap_or_default());
        }
        return;
    }
    if events.is_empty() {
        return;
    }
    let mut out = table([
        "time (UTC)",
        "device",
        "worker",
        "stage",
        "action",
        "outcome",
        "request",
        "details",
    ]);
    for e in events {
        out.add_row([
            e.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            e.device_id
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            e.worker_id.to_string(),
            e.stage.clone(),
            e.action.clone(),
            e.outcome.to_string(),
            e.request_id
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            e.details.to_string(),
        ]);
    }
    println!("{out}");
}
