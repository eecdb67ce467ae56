//! Simulated devices, built on the same client library real devices embed.
//!
//! A simulated device lives in cycles: it wakes, asks what changed since the desired version it
//! applied last (refresh), applies it and acknowledges the new version, reports its state a few
//! times (a merge patch of sensor readings, and the desired settings it now runs with, so it
//! converges), checks in, and sleeps. A [`Fleet`] runs many of them over a few shared NATS
//! connections and counts what happened, for the local stack's live view and for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devsync_device::{Device, Refresh};
use devsync_types::DeviceId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How the simulated devices behave.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Reports per wake cycle.
    pub reports_per_wake: u32,
    /// Pause between two reports while awake.
    pub report_interval: Duration,
    /// How long a device sleeps between wake cycles.
    pub sleep: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            reports_per_wake: 3,
            report_interval: Duration::from_secs(1),
            sleep: Duration::from_secs(10),
        }
    }
}

/// What the fleet has done so far.
#[derive(Debug, Default)]
pub struct Counters {
    pub reports: AtomicU64,
    pub refreshes: AtomicU64,
    pub applied: AtomicU64,
    pub checkins: AtomicU64,
    pub errors: AtomicU64,
    /// Devices awake right now.
    pub awake: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running fleet of simulated devices.
#[derive(Debug)]
pub struct Fleet {
    pub counters: Arc<Counters>,
    pub size: usize,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

/// The id of simulated device number `index`.
pub fn device_id(index: usize) -> DeviceId {
    DeviceId::parse(format!("sim-{index:06}")).expect("sim ids are valid")
}

/// Registers `count` simulated devices (`sim-000000`...) in the database, once.
pub async fn register(database_url: &str, count: usize) -> anyhow::Result<()> {
    let pool = devsync_store::pool(database_url, 1)?;
    let client = pool.get().await?;
    let ids: Vec<String> = (0..count).map(|i| device_id(i).to_string()).collect();
    client
        .execute(
            "INSERT INTO devices (id, labels) SELECT id, '{\"fleet\": \"sim\"}'::jsonb
             FROM unnest($1::text[]) AS id ON CONFLICT (id) DO NOTHING",
            &[&ids],
        )
        .await?;
    Ok(())
}

impl Fleet {
    /// Starts `count` devices on `connections` NATS connections to `url`.
    pub async fn start(
        url: &str,
        count: usize,
        connections: usize,
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(async_nats::connect(url).await?);
        }
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..count {
            let client = clients[index % clients.len()].clone();
            let device = Device::with_client(client, device_id(index), clock_sequence());
            let counters = counters.clone();
            let behaviour = behaviour.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                simulate(device, index as u64, behaviour, counters, stop).await;
            });
        }
        Ok(Self {
            counters,
            size: count,
            stop,
            tasks,
        })
    }

    /// Stops every device and waits for them.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// A starting sequence that grows across restarts of the simulator (milliseconds since the
/// epoch), so a restarted fleet is not mistaken for replaying old reports.
fn clock_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 * 1000)
        .unwrap_or(0)
}

async fn simulate(
    device: Device,
    seed: u64,
    behaviour: Behaviour,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut applied_version = 0u64;
    let mut desired = json!({});
    // Spread the first wake-ups over one sleep period.
    let first = behaviour.sleep.mul_f64(rng.random::<f64>());
    if sleep_or_stop(first, &stop).await {
        return;
    }
    loop {
        counters.awake.fetch_add(1, Ordering::Relaxed);
        let awake = wake(
            &device,
            &mut rng,
            &behaviour,
            &counters,
            &mut applied_version,
            &mut desired,
            &stop,
        )
        .await;
        counters.awake.fetch_sub(1, Ordering::Relaxed);
        if awake.is_break() || sleep_or_stop(behaviour.sleep, &stop).await {
            return;
        }
    }
}

async fn wake(
    device: &Device,
    rng: &mut SmallRng,
    behaviour: &Behaviour,
    counters: &Counters,
    applied_version: &mut u64,
    desired: &mut Value,
    stop: &CancellationToken,
) -> std::ops::ControlFlow<()> {
    match device.refresh(*applied_version).await {
        Ok(refresh) => {
            Counters::add(&counters.refreshes);
            let (version, changed) = match refresh {
                Refresh::UpToDate { version } => (version, false),
                Refresh::Delta { version, patch } => {
                    json_patch::merge(desired, &patch);
                    (version, true)
                }
                Refresh::Full { version, document } => {
                    *desired = document;
                    (version, true)
                }
            };
            if changed && version > *applied_version {
                *applied_version = version;
                Counters::add(&counters.applied);
                if device.ack(version, true, "").await.is_err() {
                    Counters::add(&counters.errors);
                }
            }
        }
        Err(error) => {
            tracing::debug!(device_id = %device.id(), %error, "refresh failed");
            Counters::add(&counters.errors);
        }
    }
    for _ in 0..behaviour.reports_per_wake {
        let mut state = json!({
            "temperature": 15.0 + rng.random::<f64>() * 15.0,
            "battery": rng.random_range(5..100),
        });
        // Report the settings the device runs with, so it converges to its desired state.
        if let (Some(state), Some(settings)) = (state.as_object_mut(), desired.as_object()) {
            for (key, value) in settings {
                state.insert(key.clone(), value.clone());
            }
        }
        match device.report(&state, false).await {
            Ok(_) => Counters::add(&counters.reports),
            Err(error) => {
                tracing::debug!(device_id = %device.id(), %error, "report failed");
                Counters::add(&counters.errors);
            }
        }
        if sleep_or_stop(behaviour.report_interval, stop).await {
            return std::ops::ControlFlow::Break(());
        }
    }
    match device.check_in(*applied_version).await {
        Ok(_) => Counters::add(&counters.checkins),
        Err(_) => Counters::add(&counters.errors),
    }
    std::ops::ControlFlow::Continue(())
}

/// Sleeps; true when stopped meanwhile.
async fn sleep_or_stop(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(duration) => false,
    }
}
