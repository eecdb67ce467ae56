//! The scenarios. Each starts its own environment, runs a load, injects its fault while the
//! load runs, then hands the ledger to the checker. All traffic is on loopback, every load and
//! fault is bounded in count and time.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::check::{self, Verdict};
use crate::env::Env;
use crate::load::{self, LoadSpec};

pub const REQUESTOR: &str = "devsync-requestor";
pub const RECONCILER: &str = "devsync-reconciler";
pub const AUDIT: &str = "devsync-audit";

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub devices: usize,
    pub reports_per_device: u64,
    /// Kills in the kill scenarios.
    pub kills: usize,
    /// How long a timed fault lasts.
    pub fault: Duration,
    /// Reports per second over all devices: the load spans the faults.
    pub rate: u32,
}

impl Size {
    fn load(&self) -> LoadSpec {
        let mut spec = LoadSpec::new(self.devices, self.reports_per_device);
        spec.rate = Some(self.rate);
        spec
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub fault: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// From the end of the fault until every acknowledged report was applied.
    pub recovery_seconds: f64,
    /// p99 answer latency of acknowledged reports sent during the fault, and overall.
    pub p99_fault_ms: Option<f64>,
    pub p99_all_ms: Option<f64>,
    /// Scenario-specific figures.
    pub notes: String,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.verdict.passed()
    }
}

/// The services every scenario runs: a requestor, the audit service, `reconcilers` replicas.
async fn base(env: &mut Env, reconcilers: usize) -> anyhow::Result<()> {
    env.spawn(REQUESTOR, "requestor-1", &[]).await?;
    env.spawn(AUDIT, "audit-1", &[]).await?;
    for i in 1..=reconcilers {
        env.spawn(RECONCILER, &format!("reconciler-{i}"), &[])
            .await?;
    }
    // Let the reconcilers split the partitions before the load starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Runs `fault` while the load runs; returns the row. `fault` gets the environment and the
/// load's stop token, and returns (when the fault started, when it ended, notes), measured
/// from `started`.
async fn under_load<F>(
    scenario: &'static str,
    description: String,
    mut env: Env,
    spec: LoadSpec,
    fault: F,
) -> anyhow::Result<Row>
where
    F: AsyncFnOnce(&mut Env, Instant) -> anyhow::Result<(Duration, Duration, String)>,
{
    let stop = CancellationToken::new();
    let url = env.nats.url().to_owned();
    let started = Instant::now();
    let load = tokio::spawn(load::run_owned(url, spec, stop.clone()));
    let faulted = fault(&mut env, started).await;
    let (from, to, notes) = match faulted {
        Ok(done) => done,
        Err(error) => {
            stop.cancel();
            let _ = load.await;
            return Err(error.context(format!("{scenario}: injecting the fault")));
        }
    };
    let ledger = load.await.context("load task")??;
    let fault_end = started + to;
    let checking = Instant::now();
    let verdict = check::check(&env, &ledger, Duration::from_secs(180)).await?;
    // From the end of the fault until the checker saw every acknowledged report applied.
    let recovery =
        verdict.converge_seconds + checking.saturating_duration_since(fault_end).as_secs_f64();
    env.stop_services();
    Ok(Row {
        scenario,
        fault: description,
        p99_fault_ms: ledger.p99_ms(Some((from, to))),
        p99_all_ms: ledger.p99_ms(None),
        recovery_seconds: recovery,
        verdict,
        notes,
    })
}

/// 1. kill -9 a reconciler replica at random moments, `kills` times, during the load.
pub async fn kill_reconciler(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    base(&mut env, 2).await?;
    let spec = size.load();
    let kills = size.kills;
    under_load(
        "kill-reconciler",
        format!("kill -9 one of 2 reconcilers {kills} times, restart it"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            let from = started.elapsed();
            let mut done = 0;
            for i in 0..kills {
                let pause = rand::rng().random_range(300..1500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let victim = format!("reconciler-{}", i % 2 + 1);
                env.kill(&victim);
                tokio::time::sleep(Duration::from_millis(200)).await;
                env.spawn_nowait(RECONCILER, &victim, &[])?;
                done += 1;
            }
            Ok((from, started.elapsed(), format!("{done} kills")))
        },
    )
    .await
}

/// 2. The reconciler aborts right after a commit, before publishing and acking (failpoint,
///    each batch with a small probability), and is restarted, `kills` times.
pub async fn commit_crash(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    env.spawn(REQUESTOR, "requestor-1", &[]).await?;
    env.spawn(AUDIT, "audit-1", &[]).await?;
    let failpoint = [("DEVSYNC_RECONCILER__FAILPOINT", "abort-after-commit:0.05")];
    env.spawn_nowait(RECONCILER, "reconciler-1", &failpoint)?;
    let spec = size.load();
    let crashes = size.kills;
    under_load(
        "commit-crash",
        format!("abort between commit and ack {crashes} times (failpoint), restart"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            let from = started.elapsed();
            let mut seen = 0;
            let deadline = Instant::now() + Duration::from_secs(300);
            while seen < crashes && Instant::now() < deadline {
                if !env.is_running("reconciler-1") {
                    seen += 1;
                    let settings: &[(&str, &str)] = if seen < crashes { &failpoint } else { &[] };
                    env.spawn_nowait(RECONCILER, "reconciler-1", settings)?;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if seen < crashes {
                // The load ended before enough commits: run on without the failpoint.
                env.kill("reconciler-1");
                env.spawn_nowait(RECONCILER, "reconciler-1", &[])?;
            }
            Ok((
                from,
                started.elapsed(),
                format!("{seen} aborts after commit"),
            ))
        },
    )
    .await
}

/// 5. PostgreSQL shut down immediately (no checkpoint) under load, restarted after `fault`.
pub async fn postgres_crash(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    base(&mut env, 1).await?;
    let spec = size.load();
    let outage = size.fault;
    under_load(
        "postgres-crash",
        format!("pg_ctl stop -m immediate under load, start after {outage:?}"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let from = started.elapsed();
            env.postgres_crash()?;
            tokio::time::sleep(outage).await;
            env.postgres_start()?;
            Ok((from, started.elapsed(), String::new()))
        },
    )
    .await
}

/// 6. A lock on the devices table held longer than `ack_wait`: workers block in the
///    database; progress acks must keep their batches from being redelivered.
pub async fn table_lock(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    base(&mut env, 1).await?;
    let spec = size.load();
    let hold = size.fault.max(Duration::from_secs(7));
    under_load(
        "table-lock",
        format!("LOCK TABLE devices for {hold:?} (ack_wait 5s) under load"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut db = env.db().await?;
            let from = started.elapsed();
            let tx = db.transaction().await?;
            tx.batch_execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
                .await?;
            tokio::time::sleep(hold).await;
            tx.commit().await?;
            Ok((from, started.elapsed(), String::new()))
        },
    )
    .await
}

/// 8. Reports published faster than they are applied (no reconciler for a while, then one),
///    then drained: the reconciler's memory stays flat while it drains the backlog.
pub async fn overload(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    env.spawn(REQUESTOR, "requestor-1", &[]).await?;
    env.spawn(AUDIT, "audit-1", &[]).await?;
    let spec = size.load();
    let outage = size.fault;
    under_load(
        "overload",
        format!("no reconciler for {outage:?} under full load, then drain"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            let from = started.elapsed();
            tokio::time::sleep(outage).await;
            env.spawn(RECONCILER, "reconciler-1", &[]).await?;
            let first = env.rss_mib("reconciler-1");
            let mut samples = Vec::new();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                samples.push(env.rss_mib("reconciler-1"));
            }
            let last = samples.last().copied().unwrap_or(first);
            Ok((
                from,
                started.elapsed(),
                format!(
                    "reconciler RSS while draining: {first:.0} -> {last:.0} MiB, peak {:.0} MiB",
                    env.peak_rss_mib("reconciler-1")
                ),
            ))
        },
    )
    .await
}

/// Runs every scenario named in `only` (all when empty), in order, each in its own
/// directory under `dir`.
pub async fn run_all(dir: &Path, size: Size, only: &[String]) -> anyhow::Result<Vec<Row>> {
    type Scenario = for<'a> fn(
        &'a Path,
        Size,
    )
        -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Row>> + 'a>>;
    let all: [(&str, Scenario); 5] = [
        ("kill-reconciler", |d, s| Box::pin(kill_reconciler(d, s))),
        ("commit-crash", |d, s| Box::pin(commit_crash(d, s))),
        ("postgres-crash", |d, s| Box::pin(postgres_crash(d, s))),
        ("table-lock", |d, s| Box::pin(table_lock(d, s))),
        ("overload", |d, s| Box::pin(overload(d, s))),
    ];
    let mut rows = Vec::new();
    for (name, scenario) in all {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        println!("chaos: {name} ...");
        let row = scenario(&dir.join(name), size).await?;
        println!(
            "chaos: {name}: {} sent, {} acked, {} lost, {} duplicated, {} redelivered, recovered in {:.1}s{}",
            row.verdict.sent,
            row.verdict.acked,
            row.verdict.lost,
            row.verdict.duplicated,
            row.verdict.redelivered,
            row.recovery_seconds,
            if row.verdict.problems.is_empty() {
                String::new()
            } else {
                format!("; problems: {:?}", row.verdict.problems)
            }
        );
        rows.push(row);
    }
    Ok(rows)
}
