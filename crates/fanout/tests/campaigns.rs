//! Campaigns end to end: the requestor's driver expands and dispatches, the fan-out
//! delivers, devices acknowledge through the normal path (requestor, reconciler), and the
//! campaign's progress in PostgreSQL follows.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use devsync_device::Device;
use devsync_stack::Stack;
use devsync_store::campaigns::{self, AbortCriteria, NewCampaign, Selector};
use devsync_testkit::wait_for;
use devsync_types::{CampaignId, DeviceId, PushPolicy};
use futures::StreamExt as _;
use serde_json::{Map, json};
use tokio::sync::Semaphore;

/// Registers `count` devices `<prefix>-00000`... with label fleet=<prefix>.
async fn register(stack: &Stack, prefix: &str, count: i64) {
    stack
        .db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO devices (id, labels)
             SELECT $1 || '-' || lpad(i::text, 5, '0'), jsonb_build_object('fleet', $1::text)
             FROM generate_series(0, $2::int8 - 1) AS i",
            &[&prefix, &count],
        )
        .await
        .unwrap();
}

/// Acknowledges every desired-state notification through the device protocol, as devices
/// would: success, except for devices `fails` picks.
fn acker(url: String, fails: fn(&str) -> bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = async_nats::connect(url).await.unwrap();
        let mut notifications = client
            .subscribe(devsync_types::subjects::DEVICE_DESIRED_ALL)
            .await
            .unwrap();
        let limit = Arc::new(Semaphore::new(256));
        while let Some(message) = notifications.next().await {
            let Some(id) = message.subject.split('.').nth(2) else {
                continue;
            };
            let Ok(push) =
                <devsync_proto::v1::DesiredPush as devsync_proto::Message>::decode(message.payload)
            else {
                continue;
            };
            let ok = !fails(id);
            let device = Device::with_client(
                client.clone(),
                DeviceId::parse(id).unwrap(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_micros() as u64,
            );
            let permit = limit.clone().acquire_owned().await.unwrap();
            tokio::spawn(async move {
                let error = if ok { "" } else { "cannot apply" };
                let _ = device.ack(push.desired_version, ok, error).await;
                drop(permit);
            });
        }
    })
}

fn campaign(id: &str, fleet: &str) -> NewCampaign {
    let mut labels = Map::new();
    labels.insert("fleet".into(), json!(fleet));
    NewCampaign {
        id: CampaignId::parse(id).unwrap(),
        selector: Selector::Labels(labels),
        patch: json!({"firmware": {"version": "9.1"}})
            .as_object()
            .unwrap()
            .clone(),
        policy: PushPolicy::Push,
        rate_per_sec: None,
        max_in_flight: None,
        waves: vec![1000],
        abort: AbortCriteria::default(),
        wave_wait: Duration::from_secs(300),
    }
}

fn requestor_settings(stack: &Stack) -> devsync_requestor::Settings {
    let mut settings = stack.requestor_settings();
    settings.requestor.scheduler.campaign_tick = Duration::from_millis(50);
    settings.requestor.rate_per_device = 1000;
    settings.requestor.burst_per_device = 1000;
    settings
}

async fn progress(stack: &Stack, id: &str) -> campaigns::Progress {
    let client = stack.db.pool.get().await.unwrap();
    campaigns::progress(&client, &CampaignId::parse(id).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_campaign_over_ten_thousand_devices_keeps_its_rate_max_in_flight_and_waves() {
    let stack = Stack::start().await;
    register(&stack, "fleet", 10_000).await;
    let requestor = stack.requestor(requestor_settings(&stack)).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let fanout = stack.fanout(stack.fanout_settings("fanout-1")).await;
    let acks = acker(stack.nats.url(), |_| false);

    let rate = 4000;
    let max_in_flight = 600;
    let mut new = campaign("rollout-1", "fleet");
    new.rate_per_sec = Some(rate);
    new.max_in_flight = Some(max_in_flight);
    new.waves = vec![1, 100, 500, 1000];
    campaigns::create(&stack.db.pool.get().await.unwrap(), &new)
        .await
        .unwrap();

    // Sample the devices in flight while it runs.
    let most_in_flight = std::sync::atomic::AtomicI64::new(0);
    let done = wait_for(
        Duration::from_secs(120),
        "the campaign to complete",
        || async {
            let progress = progress(&stack, "rollout-1").await;
            most_in_flight.fetch_max(progress.sent, std::sync::atomic::Ordering::Relaxed);
            progress.finished().then_some(progress)
        },
    )
    .await;
    let most_in_flight = most_in_flight.into_inner();
    assert_eq!(done.state, "completed", "{done:?}");
    assert_eq!(done.targeted, 10_000);
    assert_eq!(
        done.acked + done.converged,
        10_000,
        "every device acknowledged"
    );
    assert!(
        most_in_flight <= i64::from(max_in_flight),
        "at most {max_in_flight} in flight, saw {most_in_flight}"
    );
    assert!(
        most_in_flight > 0,
        "the sampling saw the campaign in flight"
    );

    let client = stack.db.pool.get().await.unwrap();
    // Every device got the patch exactly once.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE desired_version = 1 AND desired -> 'firmware' ->> 'version' = '9.1'),
                    count(*) FILTER (WHERE applied_desired_version = 1)
             FROM devices",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (10_000, 10_000)
    );

    // Waves in order: a wave starts only after the previous one was dispatched.
    let waves = client
        .query(
            "SELECT wave, count(*), min(sent_at), max(sent_at) FROM campaign_devices
             WHERE campaign_id = 'rollout-1' GROUP BY wave ORDER BY wave",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(waves.len(), 4, "four waves");
    let counts: Vec<i64> = waves.iter().map(|r| r.get(1)).collect();
    assert!((1..=40).contains(&counts[0]), "canary ~0.1%: {counts:?}");
    let cumulative_10 = counts[0] + counts[1];
    assert!(
        (800..=1200).contains(&cumulative_10),
        "first two waves ~10%: {counts:?}"
    );
    for pair in waves.windows(2) {
        let previous_last: DateTime<Utc> = pair[0].get(3);
        let next_first: DateTime<Utc> = pair[1].get(2);
        assert!(
            next_first >= previous_last,
            "wave {} started before wave {} was dispatched",
            pair[1].get::<_, i32>(0),
            pair[0].get::<_, i32>(0)
        );
    }
    // The rate, measured over the biggest wave (50% of the devices), within 15% plus a burst.
    let biggest = &waves[3];
    let span: DateTime<Utc> = biggest.get(3);
    let span = (span - biggest.get::<_, DateTime<Utc>>(2)).num_milliseconds() as f64 / 1000.0;
    let measured = biggest.get::<_, i64>(1) as f64 / span.max(0.001);
    assert!(
        measured <= f64::from(rate) * 1.15 + f64::from(rate / 10),
        "dispatched at {measured:.0}/s, limit {rate}/s"
    );

    acks.abort();
    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn a_campaign_resumes_after_the_fanout_is_killed_and_delivers_everything_once() {
    let stack = Stack::start().await;
    register(&stack, "fleet", 2000).await;
    stack.declare().await;
    let requestor = stack.requestor(requestor_settings(&stack)).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let acks = acker(stack.nats.url(), |_| false);

    let mut child = stack.process(
        env!("CARGO_BIN_EXE_devsync-fanout"),
        "fanout-killed",
        &[("DEVSYNC_TOPOLOGY__ACK_WAIT", "3s")],
    );

    let mut new = campaign("resume-1", "fleet");
    new.rate_per_sec = Some(800);
    campaigns::create(&stack.db.pool.get().await.unwrap(), &new)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "some devices acknowledged",
        || async {
            let progress = progress(&stack, "resume-1").await;
            (progress.acked >= 200).then_some(())
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = progress(&stack, "resume-1").await;
    assert!(at_kill.pending > 0, "killed mid-campaign: {at_kill:?}");

    let fanout = stack.fanout(stack.fanout_settings("fanout-2")).await;
    let done = wait_for(
        Duration::from_secs(90),
        "the campaign to complete",
        || async {
            let progress = progress(&stack, "resume-1").await;
            (progress.finished() && progress.acked == 2000).then_some(progress)
        },
    )
    .await;
    assert_eq!(done.state, "completed");
    let client = stack.db.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE desired_version = 1), count(*) FILTER (WHERE applied_desired_version = 1)
             FROM devices",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (2000, 2000),
        "each device patched once and acknowledged"
    );

    acks.abort();
    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn a_campaign_aborts_when_its_failure_ratio_is_crossed() {
    let stack = Stack::start().await;
    register(&stack, "fleet", 1000).await;
    let requestor = stack.requestor(requestor_settings(&stack)).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let fanout = stack.fanout(stack.fanout_settings("fanout-1")).await;
    // A quarter of the devices fail to apply the change.
    let acks = acker(stack.nats.url(), |id| id.ends_with(['0', '4', '8']));

    let mut new = campaign("failing-1", "fleet");
    new.waves = vec![100, 1000];
    new.abort = AbortCriteria {
        failure_ratio: Some(0.1),
        not_converged_after: None,
    };
    campaigns::create(&stack.db.pool.get().await.unwrap(), &new)
        .await
        .unwrap();
    let done = wait_for(Duration::from_secs(60), "the campaign to abort", || async {
        let progress = progress(&stack, "failing-1").await;
        progress.finished().then_some(progress)
    })
    .await;
    assert_eq!(done.state, "aborted", "{done:?}");
    assert!(
        done.reason
            .as_deref()
            .unwrap_or_default()
            .contains("failure ratio"),
        "{done:?}"
    );
    assert!(done.failed > 0);
    assert_eq!(done.wave, 0, "the second wave never started");
    assert!(
        done.pending >= 800,
        "the rest was never dispatched: {done:?}"
    );
    let untouched: i64 = stack
        .scalar("SELECT count(*) FROM devices WHERE desired_version = 0")
        .await;
    assert_eq!(
        untouched, done.pending,
        "undispatched devices kept their state"
    );

    acks.abort();
    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn active_devices_are_dispatched_first_and_the_driver_resumes_at_its_cursor() {
    let stack = Stack::start().await;
    register(&stack, "mixed", 3000).await;
    let client = stack.db.pool.get().await.unwrap();
    // Every third device was seen just now; the others never.
    client
        .execute(
            "UPDATE devices SET last_seen = now()
             WHERE right(id, 5)::int % 3 = 0 AND id LIKE 'mixed-%'",
            &[],
        )
        .await
        .unwrap();
    stack.declare().await;
    let requestor = stack.requestor(requestor_settings(&stack)).await;
    let mut new = campaign("cursor-1", "mixed");
    new.rate_per_sec = Some(300);
    campaigns::create(&stack.db.pool.get().await.unwrap(), &new)
        .await
        .unwrap();
    let at_stop = wait_for(
        Duration::from_secs(60),
        "some active devices dispatched",
        || async {
            let progress = progress(&stack, "cursor-1").await;
            (progress.dispatched() >= 400).then_some(progress)
        },
    )
    .await;
    requestor.stop().await;
    assert!(at_stop.pending > 0, "stopped mid-campaign: {at_stop:?}");
    assert_eq!(at_stop.targeted, 3000, "targets counted at the start");

    // Another replica takes the lease and continues from the stored cursor.
    let requestor = stack.requestor(requestor_settings(&stack)).await;
    wait_for(
        Duration::from_secs(90),
        "every device dispatched",
        || async {
            let row = client
                .query_one(
                    "SELECT count(*), wave_dispatched_at IS NOT NULL FROM campaign_devices, campaigns
                     WHERE campaign_id = 'cursor-1' AND campaigns.id = 'cursor-1'
                     GROUP BY wave_dispatched_at",
                    &[],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) == 3000 && row.get::<_, bool>(1)).then_some(())
        },
    )
    .await;

    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE d.desired_version = 1),
                    (SELECT count(*) FROM desired_history WHERE source = 'campaign:cursor-1'),
                    count(*) FILTER (WHERE c.priority = 0),
                    max(c.sent_at) FILTER (WHERE c.priority = 0)
                        <= min(c.sent_at) FILTER (WHERE c.priority = 1)
             FROM devices d JOIN campaign_devices c ON c.device_id = d.id
             WHERE c.campaign_id = 'cursor-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        3000,
        "each device patched exactly once across the restart"
    );
    assert_eq!(row.get::<_, i64>(1), 3000, "one history entry per device");
    assert_eq!(
        row.get::<_, i64>(2),
        1000,
        "the devices seen recently went in the first pass"
    );
    assert!(
        row.get::<_, bool>(3),
        "every active device was dispatched before any inactive one"
    );
    requestor.stop().await;
}
