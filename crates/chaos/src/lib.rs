//! devsync's chaos suite: faults under load, and a checker that proves what was kept.
//!
//! Each scenario ([`scenarios`]) starts its own nats-server and PostgreSQL ([`env`]), runs the
//! services as processes, drives simulated devices whose every report is logged with the
//! answer they got ([`load`]), injects its fault while the load runs, and hands the ledger to
//! the checker ([`check`]): every acknowledged report applied exactly once, every device in
//! the state its reports imply, the outbox drained, the audit trail complete and its chain
//! intact. It prints one table (scenario, messages, lost, duplicated effects, redeliveries,
//! recovery time, p99 during the fault) and writes it as JSON and Markdown.
//!
//! `--quick` runs a short version of every scenario (what `just test` runs); the full sizes
//! are `just chaos`. The process exits non-zero when any scenario lost or duplicated anything.

pub mod check;
pub mod env;
pub mod load;
pub mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use scenarios::Row;

/// devsync chaos suite: faults under load, then a checker.
#[derive(Debug, Clone, Parser)]
#[command(name = "devsync-chaos", version)]
pub struct Args {
    /// Short versions (a few thousand reports per scenario).
    #[arg(long)]
    pub quick: bool,
    /// Only these scenarios (repeatable).
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// Devices per scenario.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Reports each device sends.
    #[arg(long)]
    pub reports_per_device: Option<u64>,
    /// Reports per second over all devices (the load must outlast the faults).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Where results go.
    #[arg(long, default_value = "chaos-results")]
    pub out: PathBuf,
    /// Where scenarios keep their NATS and PostgreSQL data (deleted first).
    #[arg(long, default_value = "target/devsync-chaos")]
    pub dir: PathBuf,
}

/// Runs the scenarios, prints and writes the table.
pub async fn run(args: Args) -> anyhow::Result<Vec<Row>> {
    let size = if args.quick {
        scenarios::Size {
            devices: args.devices.unwrap_or(100),
            reports_per_device: args.reports_per_device.unwrap_or(20),
            kills: 3,
            fault: Duration::from_secs(3),
            rate: args.rate.unwrap_or(250),
            storage_limit: 64 << 20,
            overload: Duration::from_secs(4),
        }
    } else {
        scenarios::Size {
            devices: args.devices.unwrap_or(1000),
            reports_per_device: args.reports_per_device.unwrap_or(100),
            kills: 20,
            fault: Duration::from_secs(10),
            rate: args.rate.unwrap_or(2500),
            storage_limit: 512 << 20,
            overload: Duration::from_secs(60),
        }
    };
    let rows = scenarios::run_all(&args.dir, size, &args.only).await?;
    let table = markdown(&rows);
    println!("\n{table}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("chaos.md"), &table)?;
    std::fs::write(
        args.out.join("chaos.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    println!("results written to {}", args.out.display());
    Ok(rows)
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The results as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | fault | reports sent / acked | lost | duplicated | redelivered | dead letters | recovery | p99 during fault / overall (ms) | result |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let v = &row.verdict;
        let mut result = if row.passed() {
            "ok".to_owned()
        } else {
            "FAILED".to_owned()
        };
        if !row.notes.is_empty() {
            result.push_str(&format!("; {}", row.notes));
        }
        if v.admin_devices > 0 {
            result.push_str(&format!(
                "; admin SQL changes on {} devices during the fault, each pushed",
                v.admin_devices
            ));
        }
        for problem in v.problems.iter().take(3) {
            result.push_str(&format!("; {problem}"));
        }
        out.push_str(&format!(
            "| {} | {} | {} / {} | {} | {} | {} | {} | {:.1} s | {} / {} | {} |\n",
            row.scenario,
            row.fault,
            v.sent,
            v.acked,
            v.lost,
            v.duplicated,
            v.redelivered,
            v.dead_letters,
            row.recovery_seconds,
            ms(row.p99_fault_ms),
            ms(row.p99_all_ms),
            result
        ));
    }
    out
}
