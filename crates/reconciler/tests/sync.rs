//! Devices to database and back, through the real requestor and reconciler.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::Stack;
use devsync_device::Refresh;
use devsync_proto::Message as _;
use devsync_proto::v1::{self as pb, DeviceReport, FanoutTask, SyncRequest};
use devsync_testkit::wait_for;
use devsync_types::convert::timestamp;
use devsync_types::{DeviceId, Lane, names, subjects};
use futures::StreamExt;
use serde_json::json;

/// The reconciler's audit actions about `device` (ingress records a device retry that
/// JetStream deduplicated under the same action name, `report.duplicate`).
async fn audit_actions(stack: &Stack, device: &str) -> Vec<String> {
    stack
        .stored(names::STREAM_AUDIT)
        .await
        .into_iter()
        .flat_map(|(_, payload)| devsync_runtime::audit::decode(&payload).unwrap_or_default())
        .filter(|e| e.device_id == device && e.worker_id.starts_with("reconciler/"))
        .map(|e| e.action)
        .collect()
}

#[tokio::test]
async fn a_report_is_applied_once_despite_retries_and_redeliveries() {
    let stack = Stack::start().await;
    stack.register(&["d1"]).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("r1").await;

    let device = stack.device("d1").await;
    let accepted = device.report(&json!({"temp": 20}), false).await.unwrap();
    assert_eq!(accepted.request_id, "report:d1:1");
    assert!(!accepted.duplicate);
    assert_eq!(stack.wait_reported("d1", 1).await, json!({"temp": 20}));

    // The device retries the same sequence (it did not see the answer): deduplicated.
    let retry = stack.device("d1").await;
    let again = retry.report(&json!({"temp": 20}), false).await.unwrap();
    assert!(again.duplicate, "same Nats-Msg-Id within the window");

    // A redelivery that JetStream did not deduplicate (different message id, same sequence)
    // is recognised by the database check.
    let report = DeviceReport {
        device_id: "d1".into(),
        sequence: 1,
        reported: Some(pb::Payload {
            body: Some(pb::payload::Body::InlineJson(
                b"{\"temp\": 99}".to_vec().into(),
            )),
        }),
        full: false,
        sent_at: None,
    };
    let request = SyncRequest {
        request_id: "report:d1:1".into(),
        device_id: "d1".into(),
        lane: pb::Lane::Rt as i32,
        received_at: Some(timestamp(Utc::now())),
        kind: Some(pb::sync_request::Kind::Report(report)),
        ..Default::default()
    };
    let d1 = DeviceId::parse("d1").unwrap();
    stack
        .js
        .publish(
            subjects::request(Lane::Rt, &d1),
            request.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the redelivery handled",
        || async {
            let actions = audit_actions(&stack, "d1").await;
            actions
                .contains(&"report.duplicate".to_string())
                .then_some(())
        },
    )
    .await;
    let (reported, version, last_seq, _) = stack.device_row("d1").await;
    assert_eq!((reported, version, last_seq), (json!({"temp": 20}), 1, 1));

    // A new sequence is applied as a merge patch.
    device.report(&json!({"hum": 40}), false).await.unwrap();
    assert_eq!(
        stack.wait_reported("d1", 2).await,
        json!({"temp": 20, "hum": 40})
    );
    let applied = audit_actions(&stack, "d1")
        .await
        .iter()
        .filter(|a| *a == "report.applied")
        .count();
    assert_eq!(applied, 2, "one audit event per applied report");

    reconciler.stop().await;
    requestor.stop().await;
}

async fn outbox_ids(stack: &Stack) -> Vec<i64> {
    let client = stack.db.pool.get().await.unwrap();
    client
        .query("SELECT id FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_published_outbox_row_goes_with_the_next_transaction_or_at_shutdown() {
    let stack = Stack::start().await;
    stack.register(&["d1"]).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    // No sweeper tick within the test: only transactions and the shutdown delete rows.
    let mut settings = stack.reconciler_settings("r1");
    settings.reconciler.outbox_sweep_every = Duration::from_secs(3600);
    settings.reconciler.outbox_age = Duration::from_secs(7200);
    let shutdown = devsync_runtime::Shutdown::new();
    let reconciler = devsync_reconciler::start(settings, shutdown.clone())
        .await
        .unwrap();
    let device = stack.device("d1").await;
    device.report(&json!({"temp": 20}), false).await.unwrap();
    stack.wait_reported("d1", 1).await;
    let first = outbox_ids(&stack).await;
    assert_eq!(
        first.len(),
        1,
        "the batch's row waits for the next transaction"
    );

    device.report(&json!({"temp": 21}), false).await.unwrap();
    stack.wait_reported("d1", 2).await;
    let second = outbox_ids(&stack).await;
    assert_eq!(
        second.len(),
        1,
        "the first row went with the second batch's insert"
    );
    assert_ne!(second, first);

    shutdown.cancel();
    reconciler.wait().await.unwrap();
    assert!(
        outbox_ids(&stack).await.is_empty(),
        "the last row deleted at shutdown"
    );
    requestor.stop().await;
}

/// Publishes a device report straight into `DEVSYNC_REQ`, as the requestor would, with its own
/// request id: what a redelivery looks like to the reconciler.
async fn raw_report(stack: &Stack, device: &str, sequence: u64, state: serde_json::Value) {
    let report = DeviceReport {
        device_id: device.into(),
        sequence,
        reported: Some(pb::Payload {
            body: Some(pb::payload::Body::InlineJson(
                serde_json::to_vec(&state).unwrap().into(),
            )),
        }),
        full: false,
        sent_at: None,
    };
    let request = SyncRequest {
        request_id: format!("report:{device}:{sequence}"),
        device_id: device.into(),
        lane: pb::Lane::Rt as i32,
        received_at: Some(timestamp(Utc::now())),
        kind: Some(pb::sync_request::Kind::Report(report)),
        ..Default::default()
    };
    let id = DeviceId::parse(device).unwrap();
    stack
        .js
        .publish(
            subjects::request(Lane::Rt, &id),
            request.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_report_arriving_after_a_later_one_still_lands_where_nothing_newer_wrote() {
    let stack = Stack::start().await;
    stack.register(&["d1"]).await;
    stack.declare().await;
    let reconciler = stack.reconciler("r1").await;

    raw_report(
        &stack,
        "d1",
        1,
        json!({"temp": 20, "fan": "auto", "led": "on"}),
    )
    .await;
    stack.wait_reported("d1", 1).await;
    // Report 3 overtakes report 2 (as after a worker died holding 2).
    raw_report(&stack, "d1", 3, json!({"temp": 30, "led": null})).await;
    stack.wait_reported("d1", 2).await;
    raw_report(
        &stack,
        "d1",
        2,
        json!({"temp": 25, "hum": 40, "led": "off"}),
    )
    .await;
    let reported = stack.wait_reported("d1", 3).await;
    assert_eq!(
        reported,
        json!({"temp": 30, "fan": "auto", "hum": 40}),
        "2 adds hum; 3's temp and removal of led stay"
    );
    let (_, version, last_seq, _) = stack.device_row("d1").await;
    assert_eq!((version, last_seq), (3, 3));

    // Report 2 once more (a redelivery): nothing changes, and it is audited as a duplicate.
    raw_report(
        &stack,
        "d1",
        2,
        json!({"temp": 25, "hum": 40, "led": "off"}),
    )
    .await;
    wait_for(Duration::from_secs(10), "the duplicate audited", || async {
        audit_actions(&stack, "d1")
            .await
            .contains(&"report.duplicate".to_string())
            .then_some(())
    })
    .await;
    let (again, version, last_seq, _) = stack.device_row("d1").await;
    assert_eq!((again, version, last_seq), (reported, 3, 3));

    reconciler.stop().await;
}

#[tokio::test]
async fn a_waking_device_gets_only_what_changed() {
    let stack = Stack::start().await;
    stack.register(&["w1"]).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    stack
        .sql("UPDATE devices SET desired = '{\"fw\": \"1.0\", \"mode\": \"eco\", \"net\": {\"ssid\": \"a\"}}' WHERE id = 'w1'")
        .await;
    stack
        .sql("UPDATE devices SET desired = desired || '{\"fw\": \"1.1\"}' WHERE id = 'w1'")
        .await;
    stack
        .sql("UPDATE devices SET desired = '{\"fw\": \"1.2\", \"net\": {\"ssid\": \"b\"}}' WHERE id = 'w1'")
        .await;
    let device = stack.device("w1").await;

    assert_eq!(
        device.refresh(1).await.unwrap(),
        Refresh::Delta {
            version: 3,
            patch: json!({"fw": "1.2", "mode": null, "net": {"ssid": "b"}}),
        }
    );
    assert_eq!(
        device.refresh(2).await.unwrap(),
        Refresh::Delta {
            version: 3,
            patch: json!({"fw": "1.2", "mode": null, "net": {"ssid": "b"}}),
        }
    );
    assert_eq!(
        device.refresh(3).await.unwrap(),
        Refresh::UpToDate { version: 3 }
    );
    let full = json!({"fw": "1.2", "net": {"ssid": "b"}});
    assert_eq!(
        device.refresh(0).await.unwrap(),
        Refresh::Full {
            version: 3,
            document: full.clone()
        }
    );
    // History older than the window is pruned: a device that far behind gets everything.
    stack
        .sql("DELETE FROM desired_history WHERE device_id = 'w1' AND version = 1")
        .await;
    assert_eq!(
        device.refresh(1).await.unwrap(),
        Refresh::Full {
            version: 3,
            document: full
        }
    );
    requestor.stop().await;
}

#[tokio::test]
async fn a_large_reported_state_travels_through_the_object_store() {
    let stack = Stack::start().await;
    stack.register(&["big"]).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("r1").await;

    let blob: String = (0..20 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let state = json!({"log": blob, "n": 1});
    let device = stack.device("big").await;
    device.report(&state, true).await.unwrap();
    assert_eq!(stack.wait_reported("big", 1).await, state);

    let store = stack
        .js
        .get_object_store(names::OBJECT_BLOBS)
        .await
        .unwrap();
    let objects: Vec<_> = store.list().await.unwrap().collect().await;
    assert_eq!(objects.len(), 1, "the report was claim-checked");
    // The ack follows the commit (and the outputs' publish): wait for it.
    wait_for(Duration::from_secs(10), "the request acked", || async {
        stack
            .stored(names::STREAM_REQ)
            .await
            .is_empty()
            .then_some(())
    })
    .await;

    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn a_delta_is_pushed_and_convergence_runs_a_follow_up_stage() {
    let stack = Stack::start().await;
    stack.register(&["c1"]).await;
    stack
        .sql("UPDATE devices SET desired = '{\"fw\": \"2.0\"}' WHERE id = 'c1'")
        .await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("r1").await;
    let device = stack.device("c1").await;

    // Reported differs from desired: a push of desired version 1 is requested.
    device.report(&json!({"fw": "1.0"}), true).await.unwrap();
    let push = wait_for(Duration::from_secs(10), "a push task", || async {
        stack
            .stored(names::STREAM_FANOUT)
            .await
            .into_iter()
            .find_map(|(_, payload)| FanoutTask::decode(payload).ok())
    })
    .await;
    let push = push.push.unwrap();
    assert_eq!((push.device_id.as_str(), push.desired_version), ("c1", 1));
    assert!(push.full);

    // The device applies it, acks, and reports the new state: converged.
    device.ack(1, true, "").await.unwrap();
    device.report(&json!({"fw": "2.0"}), true).await.unwrap();
    wait_for(Duration::from_secs(10), "the converged stage", || async {
        let actions = audit_actions(&stack, "c1").await;
        actions
            .contains(&"stage.completed".to_string())
            .then_some(())
    })
    .await;
    let (_, _, _, applied) = stack.device_row("c1").await;
    assert_eq!(applied, 1);
    let pushes = stack.stored(names::STREAM_FANOUT).await.len();
    assert_eq!(pushes, 1, "one push per desired version");

    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn bulk_work_does_not_hold_back_real_time_work() {
    let stack = Stack::start().await;
    let ids: Vec<String> = (0..3000).map(|i| format!("b{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    stack.register(&refs).await;
    stack.register(&["rt1"]).await;
    // Bulk work: an admin change for each of 3000 devices, queued before any worker runs.
    stack
        .sql("UPDATE devices SET desired = '{\"mode\": \"eco\"}' WHERE id LIKE 'b%'")
        .await;
    stack.sql("DELETE FROM desired_changes").await;
    stack.declare().await;
    for id in &ids {
        let device = DeviceId::parse(id.clone()).unwrap();
        let request = SyncRequest {
            request_id: format!("admin:{id}:1"),
            device_id: id.clone(),
            lane: pb::Lane::Bulk as i32,
            received_at: Some(timestamp(Utc::now())),
            kind: Some(pb::sync_request::Kind::AdminChange(pb::AdminChange {
                outbox_id: 1,
                desired_version: 1,
                campaign_id: String::new(),
            })),
            ..Default::default()
        };
        stack
            .js
            .publish(
                subjects::request(Lane::Bulk, &device),
                request.encode_to_vec().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("r1").await;
    let device = stack.device("rt1").await;
    device.report(&json!({"x": 1}), true).await.unwrap();
    stack.wait_reported("rt1", 1).await;
    // The real-time report was applied while the bulk backlog was still being worked off.
    let left = stack.stream_messages(names::STREAM_REQ).await;
    assert!(left > 0, "the rt report waited for the whole bulk backlog");
    wait_for(
        Duration::from_secs(30),
        "the bulk backlog drained",
        || async { (stack.stream_messages(names::STREAM_REQ).await == 0).then_some(()) },
    )
    .await;
    let pushes = stack.stream_messages(names::STREAM_FANOUT).await;
    assert_eq!(pushes, 3000, "every bulk request produced its push");

    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn a_second_transaction_runs_beside_the_first_only_when_many_requests_wait() {
    let stack = Stack::start().await;
    stack.declare().await;
    let ids: Vec<String> = (0..3600).map(|i| format!("pl-{i:04}")).collect();
    stack
        .register(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let applied = |count: i64| {
        let stack = &stack;
        async move {
            wait_for(Duration::from_secs(60), "reports applied", || async {
                let n = stack
                    .scalar("SELECT count(*) FROM devices WHERE id LIKE 'pl-%' AND last_seq = 1")
                    .await;
                (n >= count).then_some(())
            })
            .await
        }
    };
    // A backlog: 3,000 reports wait before the reconciler starts (two rt slots, the default);
    // batches arrive faster than one transaction at a time applies them.
    for id in &ids[..3000] {
        raw_report(&stack, id, 1, json!({ "backlog": true })).await;
    }
    let mut settings = stack.reconciler_settings("pl-1");
    settings.reconciler.parallel_above = 20;
    let shutdown = devsync_runtime::Shutdown::new();
    let running = devsync_reconciler::start(settings, shutdown.clone())
        .await
        .unwrap();
    applied(3000).await;
    let beside = |page: &str| {
        metric_sum(
            page,
            "devsync_reconcile_transactions_beside_another_total",
            "",
        )
    };
    let after_backlog = beside(&metrics_page(running.http_addr).await);
    assert!(
        after_backlog > 0.0,
        "the backlog never used the second slot"
    );

    // A trickle: two reports of different partitions at once, every 20 ms. Each pair would
    // start two transactions; the second waits for the first and runs after it.
    let partitions = devsync_types::PartitionCount::new(devsync_stack::PARTITIONS).unwrap();
    let (mut first, mut second): (Vec<&String>, Vec<&String>) = (Vec::new(), Vec::new());
    for id in &ids[3000..] {
        let device = DeviceId::parse(id.as_str()).unwrap();
        if partitions.of(&device).0 == 0 {
            first.push(id);
        } else {
            second.push(id);
        }
    }
    let pairs: Vec<(&String, &String)> = first.into_iter().zip(second).take(100).collect();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for (a, b) in &pairs {
        pace.tick().await;
        futures::join!(
            raw_report(&stack, a, 1, json!({ "trickle": true })),
            raw_report(&stack, b, 1, json!({ "trickle": true }))
        );
    }
    assert_eq!(pairs.len(), 100);
    applied(3000 + 2 * pairs.len() as i64).await;
    let after_trickle = beside(&metrics_page(running.http_addr).await);
    assert_eq!(
        after_trickle, after_backlog,
        "transactions ran side by side with few requests waiting"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

/// Sums the samples of `metric` whose labels contain `label` ("" for every label set) in a
/// Prometheus text page.
fn metric_sum(page: &str, metric: &str, label: &str) -> f64 {
    page.lines()
        .filter(|line| line.starts_with(metric))
        .filter(|line| line[metric.len()..].starts_with(['{', ' ']))
        .filter(|line| line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The metrics page of a service running in-process.
async fn metrics_page(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The devices whose requests are in the dead-letter stream, one entry per dead letter.
async fn dead_lettered_devices(stack: &Stack) -> Vec<String> {
    stack
        .stored(names::STREAM_DLQ)
        .await
        .iter()
        .map(|(_, payload)| {
            let letter = pb::DeadLetter::decode(payload.clone()).unwrap();
            let (_, _, device) = subjects::parse_request(&letter.subject).unwrap();
            device.to_string()
        })
        .collect()
}

#[tokio::test]
async fn batches_of_several_partitions_share_a_transaction_and_keep_their_own_outcomes() {
    let stack = Stack::start().await;
    stack.declare().await;
    let ids: Vec<String> = (0..400).map(|i| format!("gc-{i:03}")).collect();
    stack
        .register(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    // Everything waits in the stream before the reconciler starts, so every partition has
    // batches at once; every tenth device also has a poison message behind its report.
    let mut poisoned = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        raw_report(&stack, id, 1, json!({ "n": i })).await;
        if i % 10 == 0 {
            let device = DeviceId::parse(id.as_str()).unwrap();
            stack
                .js
                .publish(
                    subjects::request(Lane::Rt, &device),
                    bytes::Bytes::from_static(b"\xff\xffnot a request"),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            poisoned.push(id.clone());
        }
    }
    // One transaction slot per lane and small batches: each partition's worker has several
    // batches in turn, and they queue for the slot and go together.
    let mut settings = stack.reconciler_settings("gc-1");
    settings.reconciler.transactions = 2;
    settings.common.worker.batch_size = 20;
    let shutdown = devsync_runtime::Shutdown::new();
    let running = devsync_reconciler::start(settings, shutdown.clone())
        .await
        .unwrap();

    wait_for(Duration::from_secs(30), "every report applied", || async {
        let applied = stack
            .scalar("SELECT count(*) FROM devices WHERE id LIKE 'gc-%' AND reported_version = 1")
            .await;
        (applied == 400).then_some(())
    })
    .await;
    // Each device got its own report, once.
    let wrong = stack
        .scalar(
            "SELECT count(*) FROM devices WHERE id LIKE 'gc-%'
             AND (reported->'n' IS DISTINCT FROM to_jsonb(substr(id, 4)::int) OR last_seq <> 1)",
        )
        .await;
    assert_eq!(wrong, 0);
    // Each poison message was dead-lettered, and only those.
    let mut dead = wait_for(Duration::from_secs(10), "poison dead-lettered", || async {
        let dead = dead_lettered_devices(&stack).await;
        (dead.len() >= poisoned.len()).then_some(dead)
    })
    .await;
    dead.sort();
    assert_eq!(dead, poisoned);
    // Each rejection is audited by the reconciler, naming the device and why.
    let mut rejected = wait_for(Duration::from_secs(10), "rejections audited", || async {
        let rejected: Vec<(String, String)> = stack
            .stored(names::STREAM_AUDIT)
            .await
            .into_iter()
            .flat_map(|(_, payload)| devsync_runtime::audit::decode(&payload).unwrap_or_default())
            .filter(|e| e.action == "request.rejected" && e.worker_id == "reconciler/gc-1")
            .map(|e| {
                (
                    e.device_id,
                    String::from_utf8_lossy(&e.details_json).into_owned(),
                )
            })
            .collect();
        (rejected.len() >= poisoned.len()).then_some(rejected)
    })
    .await;
    rejected.sort();
    assert_eq!(
        rejected.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        poisoned
    );
    assert!(
        rejected
            .iter()
            .all(|(_, details)| details.contains("not a sync request")
                && details.contains("\"dead_lettered\":true")),
        "{rejected:?}"
    );
    // And batches did share transactions.
    let page = metrics_page(running.http_addr).await;
    let transactions = metric_sum(&page, "devsync_reconcile_transaction_seconds_count", "");
    let batches = metric_sum(&page, "devsync_worker_batch_size_count", "");
    assert_eq!(
        metric_sum(&page, "devsync_reports_applied_total", ""),
        400.0
    );
    assert!(
        transactions < batches,
        "{transactions} transactions for {batches} batches"
    );
    shutdown.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn a_request_the_database_refuses_fails_only_its_own_batch() {
    let stack = Stack::start().await;
    let mut topology = stack.common("test").topology;
    topology.max_deliver = 3;
    devsync_runtime::topology::Topology::new(topology.clone())
        .declare(&stack.js)
        .await
        .unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("iso-{i:03}")).collect();
    stack
        .register(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    for id in &ids {
        raw_report(&stack, id, 1, json!({ "ok": true })).await;
    }
    // Batches of one request, two transaction slots: the refused device's batch is combined
    // with other partitions' batches again and again while it is retried.
    let mut settings = stack.reconciler_settings("iso-1");
    settings.reconciler.transactions = 2;
    settings.reconciler.failpoint = Some("refuse-device:iso-007".into());
    settings.common.worker.batch_size = 1;
    settings.common.topology = topology;
    let shutdown = devsync_runtime::Shutdown::new();
    let running = devsync_reconciler::start(settings, shutdown.clone())
        .await
        .unwrap();

    // Only the refused request is dead-lettered, after its deliveries ran out...
    wait_for(
        Duration::from_secs(30),
        "the refused request dead-lettered",
        || async { (!dead_lettered_devices(&stack).await.is_empty()).then_some(()) },
    )
    .await;
    // ...and every other device's report is applied.
    wait_for(
        Duration::from_secs(30),
        "every other report applied",
        || async {
            let applied = stack
                .scalar(
                    "SELECT count(*) FROM devices WHERE id LIKE 'iso-%' AND reported_version = 1",
                )
                .await;
            (applied == 199).then_some(())
        },
    )
    .await;
    assert_eq!(
        dead_lettered_devices(&stack).await,
        vec!["iso-007".to_owned()]
    );
    assert_eq!(
        stack
            .scalar("SELECT reported_version FROM devices WHERE id = 'iso-007'")
            .await,
        0
    );
    // No request that shared a transaction with it was retried: only its own first two
    // deliveries (the third was its last, dead-lettered).
    let page = metrics_page(running.http_addr).await;
    let retried = metric_sum(
        &page,
        "devsync_worker_messages_total",
        "outcome=\"retried\"",
    );
    assert_eq!(retried, 2.0);
    shutdown.cancel();
    running.wait().await.unwrap();
}
