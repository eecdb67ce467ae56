//! A reconciler killed between the database commit and the ack (a real process abort at a
//! failpoint): after a restart the report is applied once and its outputs are published once
//! in effect.

mod common;

use std::time::Duration;

use common::Stack;
use devsync_proto::Message as _;
use devsync_proto::v1::{AuditEvent, FanoutTask};
use devsync_testkit::wait_for;
use devsync_types::names;
use serde_json::json;

async fn outbox_rows(stack: &Stack) -> i64 {
    stack.scalar("SELECT count(*) FROM outbox").await
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_loses_and_duplicates_nothing() {
    let stack = Stack::start().await;
    stack.register(&["k1"]).await;
    stack
        .sql("UPDATE devices SET desired = '{\"fw\": \"2\"}' WHERE id = 'k1'")
        .await;
    // Only the report travels in this test: drop the captured admin change before the relay
    // would send it.
    stack.sql("DELETE FROM desired_changes").await;
    let requestor = stack.requestor(stack.requestor_settings()).await;

    // The reconciler as a real process, set to abort right after its first commit.
    let child = stack.process(
        env!("CARGO_BIN_EXE_devsync-reconciler"),
        "crashing",
        &[
            ("DEVSYNC_TOPOLOGY__PIN_TIMEOUT", "2s"),
            ("DEVSYNC_TOPOLOGY__ACK_WAIT", "3s"),
            ("DEVSYNC_RECONCILER__FAILPOINT", "abort-after-commit"),
        ],
    );

    let device = stack.device("k1").await;
    device.report(&json!({"fw": "1"}), true).await.unwrap();
    let child = std::sync::Mutex::new(child);
    let status = wait_for(
        Duration::from_secs(20),
        "the reconciler to abort",
        || async { child.lock().unwrap().try_wait().unwrap() },
    )
    .await;
    assert!(!status.success(), "it aborted at the failpoint");

    // Committed, but nothing published and nothing acked.
    let (reported, version, _, _) = stack.device_row("k1").await;
    assert_eq!((reported, version), (json!({"fw": "1"}), 1));
    assert_eq!(
        outbox_rows(&stack).await,
        1,
        "the outputs wait in the outbox"
    );
    assert_eq!(stack.stream_messages(names::STREAM_FANOUT).await, 0);
    assert_eq!(
        stack.stream_messages(names::STREAM_REQ).await,
        1,
        "not acked"
    );

    // Restart: the outbox is published, the redelivered report changes nothing.
    let reconciler = stack.reconciler("recovered").await;
    wait_for(
        Duration::from_secs(30),
        "redelivery handled and outbox drained",
        || async {
            (outbox_rows(&stack).await == 0 && stack.stream_messages(names::STREAM_REQ).await == 0)
                .then_some(())
        },
    )
    .await;
    let (reported, version, last_seq, _) = stack.device_row("k1").await;
    assert_eq!((reported, version, last_seq), (json!({"fw": "1"}), 1, 1));

    let pushes: Vec<FanoutTask> = stack
        .stored(names::STREAM_FANOUT)
        .await
        .into_iter()
        .filter_map(|(_, p)| FanoutTask::decode(p).ok())
        .collect();
    assert_eq!(pushes.len(), 1, "the push was published exactly once");
    let events: Vec<AuditEvent> = stack
        .stored(names::STREAM_AUDIT)
        .await
        .into_iter()
        .flat_map(|(_, p)| devsync_runtime::audit::decode(&p).unwrap_or_default())
        // The reconcilers' events (a device retry JetStream deduplicated is audited by
        // ingress under the same action name).
        .filter(|e| e.device_id == "k1" && e.worker_id.starts_with("reconciler/"))
        .collect();
    let applied = events
        .iter()
        .filter(|e| e.action == "report.applied")
        .count();
    let duplicate = events
        .iter()
        .filter(|e| e.action == "report.duplicate")
        .count();
    assert_eq!(applied, 1);
    assert_eq!(duplicate, 1, "the redelivery was recognised");
    assert!(
        events
            .iter()
            .any(|e| e.action == "report.applied" && e.worker_id == "reconciler/crashing")
    );

    reconciler.stop().await;
    requestor.stop().await;
}
