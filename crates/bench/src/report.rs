//! The results table, and the same as JSON and Markdown in the results directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Args;
use crate::e2e;
use crate::raw::Limits;

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: String,
    pub quick: bool,
    pub raw: Limits,
    pub e2e: Option<e2e::Results>,
    pub campaign: Option<crate::campaign::Results>,
    pub backlog: Option<crate::backlog::Results>,
    pub audit: Option<crate::audit::Results>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let postgres = crate::POSTGRES_SETTINGS
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{cores} cores ({cpu}), {memory:.0} GiB; NATS, PostgreSQL and all services on the same machine; \
         PostgreSQL with fsync and synchronous commit on, {postgres}"
    )
}

impl Results {
    /// Collects a run's results.
    pub fn new(
        args: &Args,
        raw: Limits,
        e2e: Option<e2e::Results>,
        campaign: Option<crate::campaign::Results>,
        backlog: Option<crate::backlog::Results>,
        audit: Option<crate::audit::Results>,
    ) -> Self {
        Self {
            audit,
            campaign,
            backlog,
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            machine: machine(),
            quick: args.quick,
            raw,
            e2e,
        }
    }

    /// The Markdown report; `chart` is the file name of the chart image beside it, if drawn.
    pub fn markdown(&self, chart: Option<&str>) -> String {
        let r = &self.raw;
        let ms = |v: Option<f64>| match v {
            None => "n/a".to_owned(),
            Some(v) if v.is_infinite() => "beyond the largest bucket".to_owned(),
            Some(v) => format!("{v:.1}"),
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# devsync benchmark, {}\n\n{}\n",
            self.date, self.machine
        );
        let _ = writeln!(out, "## Raw limits (same run)\n");
        let _ = writeln!(out, "| measurement | per second |\n|---|---:|");
        let _ = writeln!(
            out,
            "| JetStream async publish, 300 B | {:.0} |",
            r.jetstream_publish
        );
        let _ = writeln!(
            out,
            "| JetStream pull consume + ack, 300 B | {:.0} |",
            r.jetstream_consume
        );
        let _ = writeln!(out, "| core NATS publish, 300 B | {:.0} |", r.core_publish);
        let _ = writeln!(
            out,
            "| PostgreSQL upsert, UNNEST batches of 500 | {:.0} rows |",
            r.postgres_upsert_rows
        );
        if let Some(e) = &self.e2e {
            let _ = writeln!(out, "\n## Scenario a: device reports end to end\n");
            let _ = writeln!(
                out,
                "{} reports from {} devices (requestor, reconciler and audit as separate processes).\n",
                e.reports, e.devices
            );
            let _ = writeln!(out, "| figure | value | vs raw |\n|---|---:|---:|");
            let _ = writeln!(
                out,
                "| reports applied in PostgreSQL | {:.0}/s | {:.1}% of JetStream publish, {:.1}% of PostgreSQL upsert |",
                e.applied_per_second,
                100.0 * e.applied_per_second / r.jetstream_publish,
                100.0 * e.applied_per_second / r.postgres_upsert_rows
            );
            let _ = writeln!(
                out,
                "| reports applied with their audit trail stored | {:.0}/s | {:.1}% of JetStream publish |",
                e.audited_per_second,
                100.0 * e.audited_per_second / r.jetstream_publish
            );
            let _ = writeln!(
                out,
                "| reports accepted (durable) | {:.0}/s | {:.1}% of JetStream publish |",
                e.ingest_per_second,
                100.0 * e.ingest_per_second / r.jetstream_publish
            );
            let _ = writeln!(
                out,
                "| ingress answer latency p50 / p99 / p99.9 | {:.1} / {:.1} / {:.1} ms | |",
                e.ingress_p50_ms, e.ingress_p99_ms, e.ingress_p999_ms
            );
            let _ = writeln!(
                out,
                "| report to database p50 / p99 (bucket bound) | {} / {} ms | |",
                ms(e.report_to_db_p50_ms),
                ms(e.report_to_db_p99_ms)
            );
            let _ = writeln!(out, "| device-side retries | {} | |", e.errors);
            if let Some(paced) = &e.half_load {
                let _ = writeln!(
                    out,
                    "| scenario c: reports paced at half the peak: achieved, ingress p50 / p99 | {:.0}/s, {:.1} / {:.1} ms | |",
                    paced.per_second, paced.ingress_p50_ms, paced.ingress_p99_ms
                );
                let _ = writeln!(
                    out,
                    "| scenario c: report to database p50 / p99 at half the peak (bucket bound) | {} / {} ms | |",
                    ms(paced.to_db_p50_ms),
                    ms(paced.to_db_p99_ms)
                );
                if let Some(autovacuum) = &paced.autovacuum {
                    let _ = writeln!(
                        out,
                        "| scenario c: PostgreSQL autovacuum running (share of 0.5 s samples: what) | {} | |",
                        autovacuum_cell(autovacuum)
                    );
                }
            }
            for (label, figures) in [
                (
                    "refresh at 1,000/s during the full-speed report load",
                    &e.refresh_under_load,
                ),
                (
                    "scenario c: refresh at 1,000/s during the half-peak load",
                    &e.refresh_half_load,
                ),
                ("refresh at 1,000/s after the load", &e.refresh_idle),
            ] {
                if let Some(f) = figures {
                    let inside = f
                        .in_requestor_p99_ms
                        .map(|p99| format!("; inside the requestor p99 ≤ {p99:.1} ms"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "| {label}: p50 / p99 | {:.1} / {:.1} ms ({:.0}/s sent, {} errors{inside}) | |",
                        f.p50_ms, f.p99_ms, f.per_second, f.errors
                    );
                }
            }
            let _ = writeln!(out, "\n| service | peak RSS | CPU |\n|---|---:|---:|");
            for s in &e.services {
                let _ = writeln!(
                    out,
                    "| {} | {:.1} MiB | {:.1} s |",
                    s.name, s.peak_rss_mib, s.cpu_seconds
                );
            }
            if let Some(chart) = chart {
                let _ = writeln!(
                    out,
                    "\n![reports per second over the run, and ingress latency by percentile]({chart})"
                );
            }
        }
        if let Some(c) = &self.campaign {
            let _ = writeln!(out, "\n## Scenario b: one campaign, push, no rate limit\n");
            let _ = writeln!(
                out,
                "{} registered devices targeted (requestor as the campaign driver and fan-out as separate processes).\n",
                c.devices
            );
            let _ = writeln!(out, "| figure | value | vs raw |\n|---|---:|---:|");
            let _ = writeln!(
                out,
                "| devices delivered through NATS (KV last value + notification) | {:.0}/s | {:.1}% of JetStream publish |",
                c.delivered_per_second,
                100.0 * c.delivered_per_second / r.jetstream_publish
            );
            let _ = writeln!(
                out,
                "| devices dispatched by the driver (patched in PostgreSQL, handed to the fan-out) | {:.0}/s | {:.1}% of PostgreSQL upsert |",
                c.dispatched_per_second,
                100.0 * c.dispatched_per_second / r.postgres_upsert_rows
            );
            let _ = writeln!(
                out,
                "| fan-out peak RSS at a quarter of the campaign / at its end | {:.1} / {:.1} MiB | |",
                c.fanout_rss_quarter_mib,
                c.processes
                    .iter()
                    .find(|p| p.name.contains("fanout"))
                    .map_or(0.0, |p| p.peak_rss_mib)
            );
            let _ = writeln!(out, "\n| service | peak RSS | CPU |\n|---|---:|---:|");
            for s in &c.processes {
                let _ = writeln!(
                    out,
                    "| {} | {:.1} MiB | {:.1} s |",
                    s.name, s.peak_rss_mib, s.cpu_seconds
                );
            }
        }
        if let Some(d) = &self.backlog {
            let _ = writeln!(
                out,
                "\n## Scenario d: a backlog built while the reconciler is stopped, then drained\n"
            );
            let _ = writeln!(out, "| figure | value | vs raw |\n|---|---:|---:|");
            let _ = writeln!(
                out,
                "| backlog built ({} requests from {} devices) | {:.0}/s | {:.1}% of JetStream publish |",
                d.requests,
                d.devices,
                d.built_per_second,
                100.0 * d.built_per_second / r.jetstream_publish
            );
            let _ = writeln!(
                out,
                "| drained into PostgreSQL by one reconciler | {:.0}/s | {:.1}% of PostgreSQL upsert |",
                d.drained_per_second,
                100.0 * d.drained_per_second / r.postgres_upsert_rows
            );
            let _ = writeln!(
                out,
                "| reports applied / sent (zero loss when equal) | {} / {} | |",
                d.applied, d.requests
            );
            let _ = writeln!(
                out,
                "| reconciler peak RSS at a quarter of the drain / at its end | {:.1} / {:.1} MiB | |",
                d.reconciler_rss_quarter_mib, d.reconciler.peak_rss_mib
            );
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(out, "\n## Audit store\n");
            let _ = writeln!(out, "| figure | value | vs raw |\n|---|---:|---:|");
            let _ = writeln!(
                out,
                "| ingest through the audit service ({} events) | {:.0} events/s | {:.1}% of PostgreSQL upsert |",
                a.ingested_events,
                a.ingest_per_second,
                100.0 * a.ingest_per_second / r.postgres_upsert_rows
            );
            let _ = writeln!(
                out,
                "| search by device (last 7 days, up to 100 events) over {} stored events: p50 / p99 | {:.1} / {:.1} ms | |",
                a.stored_events, a.search_p50_ms, a.search_p99_ms
            );
            let _ = writeln!(
                out,
                "| devsync-audit during ingest | {:.1} MiB peak RSS, {:.1} s CPU | |",
                a.service.peak_rss_mib, a.service.cpu_seconds
            );
        }
        out
    }

    /// Prints the report.
    pub fn print(&self) {
        println!("\n{}", self.markdown(None));
    }

    /// Writes `<out>/<stamp>.json`, `.md` and, with scenario a, the chart `.svg`; returns the
    /// Markdown path.
    pub fn write(&self, out: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(out)?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        std::fs::write(
            out.join(format!("{stamp}.json")),
            serde_json::to_vec_pretty(self)?,
        )?;
        let chart = match &self.e2e {
            Some(e2e) => {
                let name = format!("{stamp}.svg");
                crate::chart::render(e2e, &out.join(&name))?;
                Some(name)
            }
            None => None,
        };
        let md = out.join(format!("{stamp}.md"));
        std::fs::write(&md, self.markdown(chart.as_deref()))?;
        Ok(md)
    }
}

/// `35% (VACUUM public.devices; ANALYZE public.audit_events_20261125)`, or `none`.
fn autovacuum_cell(autovacuum: &e2e::AutovacuumFigures) -> String {
    if autovacuum.work.is_empty() {
        return "none".into();
    }
    format!(
        "{:.0}% ({})",
        autovacuum.busy_share * 100.0,
        autovacuum.work.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::autovacuum_cell;
    use crate::e2e::AutovacuumFigures;

    #[test]
    fn the_autovacuum_cell_says_how_often_and_what() {
        assert_eq!(autovacuum_cell(&AutovacuumFigures::default()), "none");
        let busy = AutovacuumFigures {
            busy_share: 0.35,
            work: vec![
                "VACUUM public.devices".into(),
                "ANALYZE public.audit_events_20261125".into(),
            ],
        };
        assert_eq!(
            autovacuum_cell(&busy),
            "35% (VACUUM public.devices; ANALYZE public.audit_events_20261125)"
        );
    }
}
