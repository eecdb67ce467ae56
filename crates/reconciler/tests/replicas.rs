//! Several reconciler replicas: partitions split between them with no overlap, move when one
//! stops, and are shared with one that starts, while reports keep being applied once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{PARTITIONS, Stack};
use devsync_testkit::wait_for;
use devsync_types::Partition;
use serde_json::json;

fn all() -> BTreeSet<Partition> {
    (0..PARTITIONS).map(Partition).collect()
}

#[tokio::test]
async fn partitions_are_shared_moved_and_never_processed_twice() {
    let stack = Stack::start().await;
    let ids: Vec<String> = (0..40).map(|i| format!("dev-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    stack.register(&refs).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let a = stack.reconciler("rec-a").await;
    let b = stack.reconciler("rec-b").await;

    let split = wait_for(
        Duration::from_secs(15),
        "a and b split the partitions",
        || async {
            let (pa, pb) = (a.running.owned(), b.running.owned());
            (!pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && &pa | &pb == all())
                .then_some((pa, pb))
        },
    )
    .await;

    // Load while sampling: no partition may be handled by both at the same moment.
    let devices: Vec<_> = futures::future::join_all(ids.iter().map(|id| stack.device(id))).await;
    // Sample which partitions each replica is handling, every 2 ms while the load runs.
    let sampler = async {
        let mut overlaps = 0;
        let mut every = tokio::time::interval(Duration::from_millis(2));
        for _ in 0..200 {
            every.tick().await;
            if !a.running.active().is_disjoint(&b.running.active()) {
                overlaps += 1;
            }
        }
        overlaps
    };
    let load = async {
        for round in 1..=5 {
            let state = json!({"round": round});
            futures::future::join_all(devices.iter().map(|d| d.report(&state, true)))
                .await
                .into_iter()
                .for_each(|r| {
                    r.unwrap();
                });
        }
    };
    let (overlaps, ()) = tokio::join!(sampler, load);
    assert_eq!(
        overlaps, 0,
        "a partition was processed by both replicas at once"
    );
    for id in &ids {
        assert_eq!(stack.wait_reported(id, 5).await, json!({"round": 5}));
    }
    assert!(split.0.len() + split.1.len() == PARTITIONS as usize);

    // Stop a: b takes everything within seconds.
    let started = std::time::Instant::now();
    a.stop().await;
    wait_for(
        Duration::from_secs(10),
        "b owns every partition",
        || async { (b.running.owned() == all()).then_some(()) },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    for device in &devices {
        device.report(&json!({"round": 6}), true).await.unwrap();
    }
    for id in &ids {
        assert_eq!(stack.wait_reported(id, 6).await, json!({"round": 6}));
    }

    // Start c: it gets a share, b gives it up, nothing is owned twice.
    let c = stack.reconciler("rec-c").await;
    wait_for(Duration::from_secs(10), "c gets a share", || async {
        let (pb, pc) = (b.running.owned(), c.running.owned());
        (!pc.is_empty() && pb.is_disjoint(&pc) && &pb | &pc == all()).then_some(())
    })
    .await;
    for device in &devices {
        device.report(&json!({"round": 7}), true).await.unwrap();
    }
    for id in &ids {
        assert_eq!(stack.wait_reported(id, 7).await, json!({"round": 7}));
        let (_, version, last_seq, _) = stack.device_row(id).await;
        assert_eq!(
            (version, last_seq),
            (7, 7),
            "{id}: each report applied once"
        );
    }

    c.stop().await;
    b.stop().await;
    requestor.stop().await;
}
