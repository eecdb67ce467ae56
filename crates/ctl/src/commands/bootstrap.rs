//! `devsyncctl bootstrap`: declare the topology and print the report.

use anyhow::{Context, bail};
use devsync_runtime::CommonSettings;
use devsync_runtime::topology::{Action, Report, Topology};

use crate::output::table;

/// Declares the topology; fails when drift could not be corrected.
pub async fn run(settings: &CommonSettings) -> anyhow::Result<()> {
    let client = devsync_runtime::nats::connect(&settings.nats, "devsyncctl").await?;
    let js = async_nats::jetstream::new(client);
    let report = Topology::new(settings.topology.clone())
        .declare(&js)
        .await
        .context("declare topology")?;
    print_report(&report);
    let problems: Vec<_> = report.problems().collect();
    if !problems.is_empty() {
        bail!(
            "{} asset(s) differ from the declaration and cannot be changed in place; fix or delete them and run bootstrap again",
            problems.len()
        );
    }
    Ok(())
}

/// Prints a report: every asset that was not unchanged (the per-partition reconcile consumers
/// folded into one line per lane and result), then a summary line.
pub fn print_report(report: &Report) {
    let mut rows: Vec<(String, String, String, usize)> = Vec::new();
    for asset in &report.assets {
        let result = match &asset.action {
            Action::Unchanged => continue,
            Action::Created => "created".to_owned(),
            Action::Missing => "missing".to_owned(),
            Action::Updated(diffs) => format!("corrected: {}", join(diffs)),
            Action::Drifted(diffs) => format!("DRIFTED: {}", join(diffs)),
        };
        let name = match asset.name.rsplit_once('-') {
            Some((prefix, _)) if asset.name.contains("/reconcile-") => format!("{prefix}-*"),
            _ => asset.name.clone(),
        };
        let kind = asset.kind.to_string();
        match rows.last_mut() {
            Some(last) if last.0 == kind && last.1 == name && last.2 == result => last.3 += 1,
            _ => rows.push((kind, name, result, 1)),
        }
    }
    if !rows.is_empty() {
        let mut out = table(["kind", "name", "result"]);
        for (kind, name, result, count) in rows {
            let name = if count > 1 {
                format!("{name} ({count})")
            } else {
                name
            };
            out.add_row([kind, name, result]);
        }
        println!("{out}");
    }
    let [created, unchanged, updated, drifted, missing] = report.counts();
    println!(
        "topology: {created} created, {unchanged} unchanged, {updated} corrected, {drifted} drifted, {missing} missing"
    );
}

fn join(diffs: &[devsync_runtime::topology::Difference]) -> String {
    diffs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
