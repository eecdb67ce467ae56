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
    /// JetStream file storage limit in the storage-full scenario, bytes.
    pub storage_limit: u64,
    /// How long no reconciler runs in the overload scenario.
    pub overload: Duration,
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
    /// The scenario could not run here (the notes say why).
    pub skipped: bool,
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
    let url = env.nats_url.clone();
    let started = Instant::now();
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin_changes(
        env.database_url.clone(),
        spec.devices.clone(),
        admin_stop.clone(),
    ));
    let load = tokio::spawn(load::run_owned(url, spec, stop.clone()));
    let faulted = fault(&mut env, started).await;
    admin_stop.cancel();
    let admin = admin.await.context("admin task")?;
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
    let mut verdict = check::check(&env, &ledger, Duration::from_secs(180)).await?;
    check::check_admin(&env, &admin, &mut verdict).await?;
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
        skipped: false,
        notes,
    })
}

/// An administrator changing desired state with plain SQL while the fault runs: every 300 ms
/// a few devices of `devices` get a new desired value. Returns the devices changed (failed
/// statements, e.g. while PostgreSQL is down, change nothing and are not counted).
async fn admin_changes(
    database_url: String,
    devices: std::ops::Range<usize>,
    stop: CancellationToken,
) -> Vec<String> {
    let mut changed = std::collections::BTreeSet::new();
    let Ok(pool) = devsync_store::pool(&database_url, 1) else {
        return Vec::new();
    };
    let mut round = 0u64;
    while !stop.is_cancelled() {
        round += 1;
        let ids: Vec<String> = (0..5)
            .map(|_| devsync_sim::device_id(rand::rng().random_range(devices.clone())).to_string())
            .collect();
        if let Ok(client) = pool.get().await
            && client
                .execute(
                    "UPDATE devices SET desired = desired || jsonb_build_object('admin', $2::int8)
                     WHERE id = ANY($1)",
                    &[&ids, &(round as i64)],
                )
                .await
                .is_ok()
        {
            changed.extend(ids);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    changed.into_iter().collect()
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

/// 8. Reports arrive faster than they can be applied: no reconciler runs for `overload` (a
///    minute at full size) while the whole load goes on and piles up in `DEVSYNC_REQ`; then
///    one reconciler drains it. Its memory must stay flat while draining (it pulls bounded
///    batches whatever the backlog), the requestor's too while taking the load, and nothing
///    may stay stuck.
pub async fn overload(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    env.spawn(REQUESTOR, "requestor-1", &[]).await?;
    env.spawn(AUDIT, "audit-1", &[]).await?;
    let spec = size.load();
    let outage = size.overload;
    under_load(
        "overload",
        format!("no reconciler for {outage:?} under the load, then one drains the backlog"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            let from = started.elapsed();
            tokio::time::sleep(outage).await;
            let backlog = pending(env).await?;
            let requestor_peak = env.peak_rss_mib("requestor-1");
            env.spawn(RECONCILER, "reconciler-1", &[]).await?;
            let drain_started = Instant::now();
            let first = env.rss_mib("reconciler-1");
            let mut last = first;
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                last = env.rss_mib("reconciler-1");
                if pending(env).await? == 0 {
                    break;
                }
            }
            let drained = drain_started.elapsed().as_secs_f64();
            Ok((
                from,
                started.elapsed(),
                format!(
                    "backlog {backlog} drained in {drained:.1}s ({:.0}/s); reconciler RSS {first:.0} -> {last:.0} MiB (peak {:.0}); requestor peak {requestor_peak:.0} MiB",
                    backlog as f64 / drained.max(0.001),
                    env.peak_rss_mib("reconciler-1")
                ),
            ))
        },
    )
    .await
}

/// 10. One device floods at 100 times its rate limit while the others report normally: the
///     flood is refused (rate limit) and the others lose nothing; their p99 is compared with a
///     baseline run just before, without the flood.
pub async fn flood(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start(dir, size.devices).await?;
    base(&mut env, 1).await?;
    let url = env.nats_url.clone();
    let half = size.reports_per_device / 2;
    let mut spec = size.load();
    spec.devices = 1..size.devices;
    spec.reports_per_device = half;
    let baseline = load::run_owned(url.clone(), spec.clone(), CancellationToken::new()).await?;
    let baseline_p99 = baseline.p99_ms(None);
    // The requestor's default limit is 20 reports/s per device.
    let flood_rate = 2000u32;
    let stop = CancellationToken::new();
    let flooder = tokio::spawn(flood_device(url.clone(), flood_rate, stop.clone()));
    spec.first_sequence = half;
    let flooded = load::run_owned(url, spec, CancellationToken::new()).await?;
    stop.cancel();
    let (sent, accepted, refused) = flooder.await.context("flood task")??;
    let flooded_p99 = flooded.p99_ms(None);
    let mut ledger = baseline;
    ledger.merge(flooded);
    let verdict = check::check(&env, &ledger, Duration::from_secs(180)).await?;
    env.stop_services();
    let ratio = match (flooded_p99, baseline_p99) {
        (Some(f), Some(b)) if b > 0.0 => format!("{:.2}", f / b),
        _ => "-".into(),
    };
    Ok(Row {
        scenario: "flood",
        fault: format!(
            "1 device at {flood_rate}/s (100x its limit) beside {} normal ones",
            size.devices - 1
        ),
        recovery_seconds: 0.0,
        p99_fault_ms: flooded_p99,
        p99_all_ms: baseline_p99,
        skipped: false,
        notes: format!(
            "others' p99 {ratio}x the baseline (target <= 1.2x); flood: {sent} sent, {accepted} accepted, {refused} refused"
        ),
        verdict,
    })
}

/// Sends reports as `sim-000000` at `rate` until `stop`; returns (sent, accepted, refused).
async fn flood_device(
    url: String,
    rate: u32,
    stop: CancellationToken,
) -> anyhow::Result<(u64, u64, u64)> {
    use devsync_device::{Device, DeviceError, RetryPolicy};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let client = crate::env::connect(&url).await?;
    let device = Arc::new(
        Device::with_client(client, devsync_sim::device_id(0), 0).with_retry(RetryPolicy {
            timeout: Duration::from_secs(2),
            attempts: 1,
            backoff: Duration::from_millis(10),
        }),
    );
    let limiter = governor::RateLimiter::direct(governor::Quota::per_second(
        std::num::NonZeroU32::new(rate).expect("rate > 0"),
    ));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.is_cancelled() && Instant::now() < deadline {
        limiter.until_ready().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let (device, counts) = (device.clone(), counts.clone());
        tokio::spawn(async move {
            counts[0].fetch_add(1, Ordering::Relaxed);
            let state = serde_json::json!({"flood": true});
            match device.report(&state, false).await {
                Ok(_) => counts[1].fetch_add(1, Ordering::Relaxed),
                // Rate-limited answers are retried by the client; one attempt gives up.
                Err(DeviceError::Refused { .. } | DeviceError::GaveUp { .. }) => {
                    counts[2].fetch_add(1, Ordering::Relaxed)
                }
                Err(_) => 0,
            };
            drop(permit);
        });
    }
    let _ = in_flight.acquire_many(256).await;
    Ok((
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
    ))
}

/// 11. Device messages captured off the wire and replayed: after a second (inside the
///     deduplication window), after the window, and after the services restarted. No replay
///     may change any device.
pub async fn replay(dir: &Path, size: Size) -> anyhow::Result<Row> {
    use devsync_device::Device;
    let mut env = Env::start(dir, size.devices).await?;
    // A short deduplication window, so "after the window" is seconds away.
    env.set("DEVSYNC_TOPOLOGY__DUPLICATE_WINDOW", "3s");
    base(&mut env, 1).await?;
    let url = env.nats_url.clone();
    let ledger = load::run_owned(url.clone(), size.load(), CancellationToken::new()).await?;
    let verdict = check::check(&env, &ledger, Duration::from_secs(180)).await?;
    let before = snapshot(&env).await?;
    // The captured messages: exactly the bytes the device client sent (same encoding).
    let client = crate::env::connect(&url).await?;
    let captured: Vec<(String, bytes::Bytes)> = ledger
        .devices
        .iter()
        .flat_map(|(id, entries)| {
            entries.iter().map(move |e| {
                (
                    devsync_types::subjects::ingress(id, devsync_types::MessageKind::Report),
                    Device::report_bytes(id, e.sequence, &load::report(e.sequence), false),
                )
            })
        })
        .collect();
    let mut changed = 0usize;
    let mut notes = Vec::new();
    for (when, pause) in [
        ("after 1s", Duration::from_secs(1)),
        ("after the dedup window", Duration::from_secs(4)),
        ("after a restart", Duration::ZERO),
    ] {
        if when == "after a restart" {
            env.stop_services();
            base(&mut env, 1).await?;
        }
        tokio::time::sleep(pause).await;
        let mut answered = 0usize;
        for chunk in captured.chunks(200) {
            let replies = futures::future::join_all(chunk.iter().map(|(subject, body)| {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(subject.clone(), body.clone()),
                )
            }))
            .await;
            answered += replies.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        }
        idle(&env).await?;
        let now = snapshot(&env).await?;
        let differ = before
            .iter()
            .zip(&now)
            .filter(|(before, after)| before != after)
            .count();
        changed += differ;
        notes.push(format!(
            "{when}: {answered} answered, {differ} devices changed"
        ));
    }
    let mut verdict = verdict;
    if changed > 0 {
        verdict
            .problems
            .push(format!("replays changed {changed} device states"));
    }
    // Replays must not have produced a second report.applied either.
    let again = check::check(&env, &ledger, Duration::from_secs(60)).await?;
    verdict.duplicated = again.duplicated;
    verdict.redelivered = again.redelivered;
    verdict.problems.extend(again.problems);
    env.stop_services();
    Ok(Row {
        scenario: "replay",
        fault: format!("{} captured reports replayed 3 times", captured.len()),
        recovery_seconds: 0.0,
        p99_fault_ms: None,
        p99_all_ms: ledger.p99_ms(None),
        notes: notes.join("; "),
        skipped: false,
        verdict,
    })
}

/// Every device's (reported, reported_version, last_seq), in id order.
async fn snapshot(env: &Env) -> anyhow::Result<Vec<(String, serde_json::Value, i64, i64)>> {
    let db = env.db().await?;
    Ok(db
        .query(
            "SELECT id, reported, reported_version, last_seq FROM devices ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// Messages of `DEVSYNC_REQ` not yet acknowledged by a reconciler (pending or in flight).
async fn pending(env: &Env) -> anyhow::Result<u64> {
    use futures::TryStreamExt as _;
    let js = async_nats::jetstream::new(crate::env::connect(&env.nats_url).await?);
    let stream = js.get_stream(devsync_types::names::STREAM_REQ).await?;
    let infos: Vec<_> = stream.consumers().try_collect().await?;
    Ok(infos
        .iter()
        .map(|c| c.num_pending + c.num_ack_pending as u64)
        .sum())
}

/// Waits until every consumer of `DEVSYNC_REQ` has nothing pending or unacknowledged.
async fn idle(env: &Env) -> anyhow::Result<()> {
    let done = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        // A message in flight between the requestor and the stream is not counted yet.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (pending(env).await.ok()? == 0).then_some(())
    })
    .await;
    done.context("DEVSYNC_REQ did not drain within 60s")
}

/// 12. A device trying other devices' subjects, wildcards, other inboxes and the JetStream
///     API under the NATS config of `deploy/nats/`: `deploy/nats/check_permissions.py` plays
///     every user's part against a real nats-server with that config (every refusal must be
///     the server's permission error, every allowed action must take effect). It needs the
///     Python environment `just chart-test` installs (`.tools/venv`).
pub async fn permissions(_dir: &Path, _size: Size) -> anyhow::Result<Row> {
    let root = devsync_localstack::workspace_root();
    let python = root.join(".tools/venv/bin/python");
    let mut verdict = Verdict::default();
    let notes;
    let skipped = !python.is_file();
    if python.is_file() {
        let nats = devsync_localstack::nats::find_binary()?;
        let port = devsync_localstack::free_port()?;
        let output = tokio::process::Command::new(&python)
            .current_dir(&root)
            .arg("deploy/nats/check_permissions.py")
            .arg(&nats)
            .arg(port.to_string())
            .output()
            .await
            .context("run deploy/nats/check_permissions.py")?;
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        let summary = text
            .lines()
            .rev()
            .find(|l| l.contains("passed"))
            .unwrap_or("no summary")
            .trim()
            .to_owned();
        if !output.status.success() {
            verdict
                .problems
                .push(format!("permission checks failed: {summary}"));
        }
        notes = summary;
    } else {
        notes = "skipped: .tools/venv is missing (run just chart-test once)".to_owned();
    }
    Ok(Row {
        scenario: "permissions",
        fault: "devices and services try what they may not (deploy/nats config)".into(),
        recovery_seconds: 0.0,
        p99_fault_ms: None,
        p99_all_ms: None,
        notes,
        skipped,
        verdict,
    })
}

/// Index (0-based) of the node leading `DEVSYNC_REQ` in a cluster.
async fn req_leader(env: &Env) -> anyhow::Result<usize> {
    let js = async_nats::jetstream::new(crate::env::connect(&env.nats_url).await?);
    let mut stream = js.get_stream(devsync_types::names::STREAM_REQ).await?;
    let info = stream.info().await?;
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .context("DEVSYNC_REQ has no leader")?;
    leader
        .strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n - 1)
        .with_context(|| format!("unexpected server name {leader}"))
}

/// 3. A 3-node JetStream cluster (R3 streams): kill -9 the node leading `DEVSYNC_REQ` under
///    load, restart it after `fault`.
pub async fn kill_nats_node(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start_with(dir, size.devices, 3, None).await?;
    base(&mut env, 1).await?;
    let spec = size.load();
    let outage = size.fault;
    under_load(
        "kill-nats-node",
        format!("3-node cluster, R3: kill -9 the DEVSYNC_REQ leader, restart after {outage:?}"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let leader = req_leader(env).await?;
            let from = started.elapsed();
            env.nats[leader].kill();
            tokio::time::sleep(outage).await;
            env.nats[leader].restart()?;
            Ok((from, started.elapsed(), format!("killed n{}", leader + 1)))
        },
    )
    .await
}

/// 4. A 3-node JetStream cluster: the node leading `DEVSYNC_REQ` is frozen (SIGSTOP) for
///    `3 × fault` (30 s at full size), then resumed.
pub async fn freeze_nats_leader(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let mut env = Env::start_with(dir, size.devices, 3, None).await?;
    base(&mut env, 1).await?;
    let spec = size.load();
    let pause = size.fault * 3;
    under_load(
        "freeze-nats-leader",
        format!("3-node cluster, R3: SIGSTOP the DEVSYNC_REQ leader for {pause:?}"),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let leader = req_leader(env).await?;
            let pid = env.nats[leader].pid().context("leader runs")?;
            let from = started.elapsed();
            let signal = |name: &str| {
                std::process::Command::new("kill")
                    .arg(format!("-{name}"))
                    .arg(pid.to_string())
                    .status()
            };
            signal("STOP")?;
            tokio::time::sleep(pause).await;
            signal("CONT")?;
            let new_leader = req_leader(env)
                .await
                .map_or("?".into(), |n| format!("n{}", n + 1));
            Ok((
                from,
                started.elapsed(),
                format!("froze n{}; leader after: {new_leader}", leader + 1),
            ))
        },
    )
    .await
}

/// 7. JetStream storage runs full under load (a hog stream takes what the server's
///    `max_file_store` leaves), stays full for `fault`, then the space is freed. Publishers get
///    errors meanwhile; nothing acknowledged may go missing.
pub async fn storage_full(dir: &Path, size: Size) -> anyhow::Result<Row> {
    let limit = size.storage_limit;
    let mut env = Env::start_with(dir, size.devices, 1, Some(limit)).await?;
    base(&mut env, 1).await?;
    let spec = size.load();
    let full_for = size.fault;
    under_load(
        "storage-full",
        format!(
            "JetStream file storage full ({} MiB limit) for {full_for:?}",
            limit >> 20
        ),
        env,
        spec,
        async move |env: &mut Env, started: Instant| {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let js = async_nats::jetstream::new(crate::env::connect(&env.nats_url).await?);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "HOG".into(),
                subjects: vec!["hog.>".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
            let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
            let from = started.elapsed();
            let mut hogged = 0u64;
            let mut refused = None;
            // Bounded: at most twice the limit.
            for _ in 0..(2 * limit / chunk.len() as u64) {
                let sent = match js.publish("hog.fill", chunk.clone()).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                match sent {
                    Ok(()) => hogged += chunk.len() as u64,
                    Err(error) => {
                        refused = Some(error);
                        break;
                    }
                }
            }
            tokio::time::sleep(full_for).await;
            js.delete_stream("HOG").await?;
            Ok((
                from,
                started.elapsed(),
                format!(
                    "hog took {} MiB, then: {}",
                    hogged >> 20,
                    refused.as_deref().unwrap_or("never refused")
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
    let all: [(&str, Scenario); 11] = [
        ("kill-reconciler", |d, s| Box::pin(kill_reconciler(d, s))),
        ("commit-crash", |d, s| Box::pin(commit_crash(d, s))),
        ("kill-nats-node", |d, s| Box::pin(kill_nats_node(d, s))),
        ("freeze-nats-leader", |d, s| {
            Box::pin(freeze_nats_leader(d, s))
        }),
        ("postgres-crash", |d, s| Box::pin(postgres_crash(d, s))),
        ("table-lock", |d, s| Box::pin(table_lock(d, s))),
        ("storage-full", |d, s| Box::pin(storage_full(d, s))),
        ("overload", |d, s| Box::pin(overload(d, s))),
        ("flood", |d, s| Box::pin(flood(d, s))),
        ("replay", |d, s| Box::pin(replay(d, s))),
        ("permissions", |d, s| Box::pin(permissions(d, s))),
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
