//! Scaling as an SRE does it, with reconciler replicas as separate processes: 1, then 3, then
//! 2 (one killed) under a continuous load. Membership follows within seconds, reports keep
//! being applied through every change, and in the end every device has every report applied
//! exactly once — also those JetStream redelivered after later ones (a killed replica's
//! in-flight messages come back only after `ack_wait`).

mod common;

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::Stack;
use devsync_testkit::wait_for;
use devsync_types::names;
use futures::TryStreamExt as _;
use serde_json::json;

const DEVICES: usize = 100;

fn replica(stack: &Stack, instance: &str) -> Child {
    stack.process(
        env!("CARGO_BIN_EXE_devsync-reconciler"),
        instance,
        &[
            ("DEVSYNC_TOPOLOGY__MEMBER_TTL", "2s"),
            ("DEVSYNC_TOPOLOGY__PIN_TIMEOUT", "2s"),
            ("DEVSYNC_TOPOLOGY__ACK_WAIT", "5s"),
        ],
    )
}

async fn members(stack: &Stack) -> usize {
    let kv = stack.js.get_key_value(names::KV_MEMBERS).await.unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    keys.iter().filter(|k| k.starts_with("reconciler.")).count()
}

/// The lowest reported version over all devices (every device has at least this many of its
/// reports applied).
async fn lowest_applied(stack: &Stack) -> i64 {
    stack
        .scalar("SELECT coalesce(min(reported_version), 0) FROM devices")
        .await
}

/// What is behind when reports are missing: the devices behind, and the state of every
/// request consumer and of the dead-letter stream.
async fn diagnose(stack: &Stack, sent: i64) -> String {
    let client = stack.db.pool.get().await.unwrap();
    let behind: Vec<(String, i64, i64, Vec<i64>)> = client
        .query(
            "SELECT id, reported_version, last_seq, reported FROM devices
             WHERE reported_version < $1 ORDER BY id",
            &[&sent],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let reported: serde_json::Value = row.get(3);
            let missing = (1..=sent)
                .filter(|round| reported.get(format!("r{round}")).is_none())
                .collect();
            (row.get(0), row.get(1), row.get(2), missing)
        })
        .collect();
    let count = devsync_types::PartitionCount::new(common::PARTITIONS).unwrap();
    let mut report = format!("devices behind: {behind:?}\n");
    for (id, _, _, _) in &behind {
        let device: devsync_types::DeviceId = id.parse().unwrap();
        report += &format!("  {id} is in partition {}\n", count.of(&device).0);
    }
    let mut stream = stack.js.get_stream(names::STREAM_REQ).await.unwrap();
    let stream_info = stream.info().await.unwrap().clone();
    report += &format!("REQ: {} messages\n", stream_info.state.messages);
    for partition in count.all() {
        for lane in devsync_types::Lane::ALL {
            let name = names::reconcile_consumer(lane, partition);
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(&name).await.unwrap();
            let info = consumer.info().await.unwrap();
            report += &format!(
                "  {name}: pending {} ack-pending {} redelivered {} waiting {} delivered {:?} ack-floor {:?} pins {:?}\n",
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.num_waiting,
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence,
                info.priority_groups
                    .iter()
                    .map(|g| g.pinned_client_id.clone())
                    .collect::<Vec<_>>()
            );
        }
    }
    if let Ok(mut dlq) = stack.js.get_stream(names::STREAM_DLQ).await {
        report += &format!(
            "DLQ: {} messages\n",
            dlq.info().await.unwrap().state.messages
        );
    }
    report
}

/// Waits until every device has a report applied that was sent after now.
async fn progresses(stack: &Stack, sent: &AtomicI64, what: &str) -> Duration {
    let started = Instant::now();
    let target = sent.load(Ordering::SeqCst) + 1;
    wait_for(Duration::from_secs(60), what, || async {
        (lowest_applied(stack).await >= target).then_some(())
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn one_then_three_then_two_replicas_under_load_lose_and_repeat_nothing() {
    let stack = Stack::start().await;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("scale-{i:03}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    stack.register(&refs).await;
    stack.declare().await;
    let mut settings = stack.requestor_settings();
    settings.requestor.rate_per_device = 1000;
    settings.requestor.burst_per_device = 1000;
    let requestor = stack.requestor(settings).await;
    let devices = Arc::new(futures::future::join_all(ids.iter().map(|id| stack.device(id))).await);

    // Load: every device reports round after round until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicI64::new(0));
    // The load never panics: a refused report is counted and fails the test at the end.
    let load = tokio::spawn({
        let (devices, stop, rounds) = (devices.clone(), stop.clone(), rounds.clone());
        async move {
            let mut round = 0;
            let mut refused = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                // A new field every round: a report applied out of order must still land.
                let state = json!({"round": round, format!("r{round}"): round});
                for result in
                    futures::future::join_all(devices.iter().map(|d| d.report(&state, false))).await
                {
                    if let Err(error) = result {
                        refused.push(format!("round {round}: {error}"));
                    }
                }
                rounds.store(round, Ordering::SeqCst);
            }
            refused
        }
    });

    let mut r1 = replica(&stack, "scale-1");
    wait_for(Duration::from_secs(15), "one member", || async {
        (members(&stack).await == 1).then_some(())
    })
    .await;
    progresses(&stack, &rounds, "reports applied by one replica").await;

    let started = Instant::now();
    let mut r2 = replica(&stack, "scale-2");
    let mut r3 = replica(&stack, "scale-3");
    wait_for(Duration::from_secs(15), "three members", || async {
        (members(&stack).await == 3).then_some(())
    })
    .await;
    progresses(&stack, &rounds, "reports applied by three replicas").await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "scaling to three took {:?}",
        started.elapsed()
    );

    // Kill one: its partitions move to the other two within seconds.
    let killed = Instant::now();
    r3.kill().unwrap();
    r3.wait().unwrap();
    wait_for(Duration::from_secs(15), "two members", || async {
        (members(&stack).await == 2).then_some(())
    })
    .await;
    progresses(&stack, &rounds, "reports applied by two replicas").await;
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "recovering from the kill took {:?}",
        killed.elapsed()
    );

    stop.store(true, Ordering::SeqCst);
    let refused = load.await.unwrap();
    assert!(refused.is_empty(), "reports refused: {refused:?}");
    let sent = rounds.load(Ordering::SeqCst);
    assert!(
        sent >= 3,
        "the load ran through the changes ({sent} rounds)"
    );
    let applied = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        (lowest_applied(&stack).await >= sent).then_some(())
    })
    .await;
    if applied.is_none() {
        panic!(
            "timed out waiting for every report applied ({sent} rounds): {}",
            diagnose(&stack, sent).await
        );
    }
    let client = stack.db.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT id, reported_version, last_seq, reported FROM devices",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let (id, version, last_seq): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            (version, last_seq),
            (sent, sent),
            "{id}: each of its {sent} reports applied exactly once"
        );
        let reported: serde_json::Value = row.get(3);
        assert_eq!(reported["round"], json!(sent), "{id}: the last report wins");
        for round in 1..=sent {
            assert_eq!(
                reported[format!("r{round}")],
                json!(round),
                "{id}: report {round} is in the reported state"
            );
        }
    }

    for child in [&mut r1, &mut r2] {
        let _ = child.kill();
        let _ = child.wait();
    }
    requestor.stop().await;
}
