//! Scheduled sweeps run on one requestor replica at a time, once per period, and keep running
//! when the replica holding the lease is killed.

use std::process::Child;
use std::time::Duration;

use chrono::{DateTime, Utc};
use devsync_proto::Message as _;
use devsync_proto::v1::{SyncRequest, sync_request};
use devsync_stack::Stack;
use devsync_testkit::wait_for;
use devsync_types::names;

fn replica(stack: &Stack, instance: &str) -> Child {
    stack.process(
        env!("CARGO_BIN_EXE_devsync-requestor"),
        instance,
        &[
            ("DEVSYNC_TOPOLOGY__MEMBER_TTL", "2s"),
            ("DEVSYNC_REQUESTOR__SCHEDULER__SWEEP_EVERY", "1s"),
            ("DEVSYNC_REQUESTOR__SCHEDULER__DRIFT_AFTER", "1m"),
        ],
    )
}

/// (worker, started_at) of every drift sweep run, oldest first.
async fn runs(stack: &Stack) -> Vec<(String, DateTime<Utc>)> {
    stack
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT worker, started_at FROM sweep_runs WHERE sweep = 'drift' ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn assert_once_per_period(runs: &[(String, DateTime<Utc>)]) {
    for pair in runs.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= chrono::Duration::milliseconds(900),
            "two runs within one period: {pair:?}"
        );
    }
}

#[tokio::test]
async fn a_sweep_runs_once_per_period_on_one_replica_and_survives_the_holder_being_killed() {
    let stack = Stack::start().await;
    stack.declare().await;
    // One device has waited an hour for its desired version: the drift sweep re-pushes it.
    stack.register(&["drifting-1", "fine-1"]).await;
    stack
        .sql(
            r#"UPDATE devices SET desired = '{"mode": "b"}' WHERE id = 'drifting-1';
               UPDATE devices SET desired_changed_at = now() - interval '1 hour' WHERE id = 'drifting-1';
               DELETE FROM desired_changes;"#,
        )
        .await;
    let mut a = replica(&stack, "requestor-a");
    let mut b = replica(&stack, "requestor-b");

    let first = wait_for(Duration::from_secs(30), "three drift sweeps", || async {
        let runs = runs(&stack).await;
        (runs.len() >= 3).then_some(runs)
    })
    .await;
    assert_once_per_period(&first);
    let holder = first[0].0.clone();
    assert!(
        first.iter().all(|(worker, _)| worker == &holder),
        "one replica runs the sweeps: {first:?}"
    );
    let affected: i64 = stack
        .scalar("SELECT affected FROM sweep_runs WHERE sweep = 'drift' ORDER BY id LIMIT 1")
        .await;
    assert_eq!(
        affected, 1,
        "the drifting device, and only it, was re-pushed"
    );
    let requests = stack.stored(names::STREAM_REQ).await;
    let repush = requests
        .iter()
        .filter_map(|(_, payload)| SyncRequest::decode(payload.clone()).ok())
        .find(|request| matches!(request.kind, Some(sync_request::Kind::Schedule(_))))
        .expect("a scheduled re-push request");
    assert_eq!(repush.device_id, "drifting-1");

    // Kill the holder; the other replica takes over once the lease expires.
    let (holder_child, survivor) = if holder.ends_with("requestor-a") {
        (&mut a, "requestor-b")
    } else {
        (&mut b, "requestor-a")
    };
    holder_child.kill().unwrap();
    holder_child.wait().unwrap();
    let after = wait_for(
        Duration::from_secs(30),
        "sweeps by the surviving replica",
        || async {
            let runs = runs(&stack).await;
            let by_survivor = runs.iter().filter(|(w, _)| w.ends_with(survivor)).count();
            (by_survivor >= 2).then_some(runs)
        },
    )
    .await;
    assert_once_per_period(&after);

    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
}
