//! Bad input and floods at the front door: each bad message gets its clear error and leaves an
//! audit (and, when undecodable, a DLQ) trace, and nothing else is lost or blocked.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Stack;
use devsync_device::DeviceError;
use devsync_proto::Message as _;
use devsync_proto::v1::{
    AuditEvent, DeadLetter, DesiredAck, DeviceReport, ErrorReply, RefreshRequest, error_reply::Code,
};
use devsync_testkit::wait_for;
use devsync_types::{names, subjects};
use serde_json::json;

/// Sends raw bytes on `subject` and decodes the error reply.
async fn refused(stack: &Stack, subject: &str, payload: Bytes) -> ErrorReply {
    let client = stack.nats.client().await;
    let reply = client.request(subject.to_owned(), payload).await.unwrap();
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::STATUS_HEADER))
        .map(|v| v.as_str().to_owned());
    assert_eq!(status.as_deref(), Some(subjects::STATUS_ERROR), "{subject}");
    ErrorReply::decode(reply.payload).unwrap()
}

fn report(device: &str, sequence: u64, state: &str) -> Bytes {
    DeviceReport {
        device_id: device.into(),
        sequence,
        reported: Some(devsync_proto::v1::Payload {
            body: Some(devsync_proto::v1::payload::Body::InlineJson(
                state.as_bytes().to_vec().into(),
            )),
        }),
        full: true,
        sent_at: None,
    }
    .encode_to_vec()
    .into()
}

/// A refresh from the subject's device that applied nothing yet.
fn refresh_request() -> Bytes {
    RefreshRequest {
        device_id: String::new(),
        since_version: 0,
        sequence: 1,
    }
    .encode_to_vec()
    .into()
}

#[tokio::test]
async fn every_bad_message_gets_a_clear_error_and_a_trace() {
    let stack = Stack::start().await;
    stack.register(&["good", "off"]).await;
    stack
        .sql("UPDATE devices SET enabled = false WHERE id = 'off'")
        .await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("r1").await;

    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0x01, 0x02]);
    let good_report = "devsync.in.good.report";
    let cases: Vec<(&str, Bytes, Code, &str)> = vec![
        (
            good_report,
            garbage.clone(),
            Code::Undecodable,
            "not a valid report message",
        ),
        (
            good_report,
            Bytes::from(vec![b'x'; 300 * 1024]),
            Code::TooLarge,
            "at most 262144",
        ),
        (
            "devsync.in.good.reboot",
            report("good", 1, "{}"),
            Code::UnknownKind,
            "\"reboot\"",
        ),
        (
            good_report,
            report("someone-else", 1, "{}"),
            Code::WrongIdentity,
            "someone-else",
        ),
        (
            "devsync.in.stranger.report",
            report("", 1, "{}"),
            Code::UnknownDevice,
            "not registered",
        ),
        (
            "devsync.in.off.report",
            report("", 1, "{}"),
            Code::UnknownDevice,
            "disabled",
        ),
        // A refresh is answered on the refresh runtime, whose query checks the registration.
        (
            "devsync.in.stranger.refresh",
            refresh_request(),
            Code::UnknownDevice,
            "not registered",
        ),
        (
            "devsync.in.off.refresh",
            refresh_request(),
            Code::UnknownDevice,
            "disabled",
        ),
        (
            good_report,
            report("", 1, "[1, 2]"),
            Code::Invalid,
            "must be a JSON object",
        ),
        (good_report, report("", 1, "{oops"), Code::Invalid, ""),
        (good_report, report("", 0, "{}"), Code::Invalid, ""),
        // What PostgreSQL cannot store is refused at the door, not retried until
        // dead-lettered.
        (
            good_report,
            report("", 1, r#"{"name": "a\u0000b"}"#),
            Code::Invalid,
            "u0000",
        ),
        (
            "devsync.in.good.ack",
            DesiredAck {
                desired_version: 1,
                sequence: 1,
                success: false,
                error: "bad\0byte".into(),
                ..Default::default()
            }
            .encode_to_vec()
            .into(),
            Code::Invalid,
            "NUL",
        ),
    ];
    for (subject, payload, code, says) in cases {
        let reply = refused(&stack, subject, payload).await;
        assert_eq!(reply.code(), code, "{subject}: {}", reply.message);
        assert!(reply.message.contains(says), "{subject}: {}", reply.message);
    }

    // The next good message goes through.
    let device = stack.device("good").await;
    device.report(&json!({"ok": true}), true).await.unwrap();
    assert_eq!(stack.wait_reported("good", 1).await, json!({"ok": true}));

    // Each service's database connections name its worker (an operator's pg_stat_activity).
    for name in ["requestor/%", "requestor/%-refresh", "reconciler/%"] {
        let connections = stack
            .scalar(&format!(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE '{name}'"
            ))
            .await;
        assert!(connections > 0, "no connection named {name}");
    }

    // Every refusal was audited; the undecodable one was dead-lettered with its bytes.
    let refusals = wait_for(Duration::from_secs(10), "refusal audit events", || async {
        let events: Vec<AuditEvent> = stack
            .stored(names::STREAM_AUDIT)
            .await
            .into_iter()
            .flat_map(|(_, p)| devsync_runtime::audit::decode(&p).unwrap_or_default())
            .filter(|e| e.action == "message.refused")
            .collect();
        (events.len() >= 13).then_some(events)
    })
    .await;
    assert_eq!(refusals.len(), 13);
    assert!(
        refusals
            .iter()
            .all(|e| e.worker_id.starts_with("requestor/"))
    );
    let letters: Vec<DeadLetter> = stack
        .stored(names::STREAM_DLQ)
        .await
        .into_iter()
        .filter_map(|(_, p)| DeadLetter::decode(p).ok())
        .collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].original, garbage);
    assert_eq!(letters[0].subject, "devsync.in.good.report");

    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn a_flooding_device_is_throttled_while_others_flow() {
    let stack = Stack::start().await;
    stack.register(&["flood", "calm"]).await;
    let mut settings = stack.requestor_settings();
    settings.requestor.rate_per_device = 10;
    settings.requestor.burst_per_device = 10;
    let requestor = stack.requestor(settings).await;
    let reconciler = stack.reconciler("r1").await;

    // 200 reports as fast as possible from one device, without retrying refusals.
    let client = stack.nats.client().await;
    let mut flood = Vec::new();
    for sequence in 1..=200u64 {
        flood.push(client.request(
            "devsync.in.flood.report".to_owned(),
            report("flood", sequence, &format!("{{\"n\": {sequence}}}")),
        ));
    }
    let calm = stack.device("calm").await;
    for n in 1..=5 {
        calm.report(&json!({"n": n}), true).await.unwrap();
    }
    let mut limited = 0;
    let mut accepted = 0;
    for reply in futures::future::join_all(flood).await {
        let reply = reply.unwrap();
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::STATUS_HEADER))
            .map(|v| v.as_str().to_owned());
        if status.as_deref() == Some(subjects::STATUS_ERROR) {
            let error = ErrorReply::decode(reply.payload).unwrap();
            assert_eq!(error.code(), Code::RateLimited);
            assert!(error.retry_after_ms > 0);
            limited += 1;
        } else {
            accepted += 1;
        }
    }
    assert!(limited >= 150, "most of the flood was refused: {limited}");
    assert!(accepted >= 10, "the burst was accepted: {accepted}");
    // The calm device lost nothing.
    assert_eq!(stack.wait_reported("calm", 5).await, json!({"n": 5}));

    // The device client itself backs off on RATE_LIMITED and eventually gets through.
    let patient = stack.device("flood").await;
    let outcome = patient.report(&json!({"n": 0}), true).await;
    assert!(
        !matches!(outcome, Err(DeviceError::Refused { .. })),
        "{outcome:?}"
    );

    reconciler.stop().await;
    requestor.stop().await;
}

/// The fuzzing seed corpus (`fuzz/corpus/ingress`, format: first byte picks the kind) through
/// a real requestor: every message is answered, what the decoder checks refuse is refused by
/// the service with the same code and audited, and the requestor keeps serving.
#[tokio::test]
async fn the_fuzz_corpus_is_answered_refused_as_the_checks_say_and_audited() {
    const KINDS: [&str; 5] = ["report", "ack", "checkin", "refresh", "firmware"];
    let stack = Stack::start().await;
    stack.register(&["fuzz-device"]).await;
    let mut settings = stack.requestor_settings();
    settings.requestor.rate_per_device = 1000;
    settings.requestor.burst_per_device = 1000;
    let requestor = stack.requestor(settings).await;
    let client = stack.nats.client().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ingress");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "the seed corpus is there: {}",
        dir.display()
    );
    let mut refusals = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let Some((&selector, payload)) = data.split_first() else {
            continue;
        };
        let device = devsync_types::DeviceId::parse("fuzz-device").unwrap();
        let subject = subjects::ingress_token(&device, KINDS[usize::from(selector) % 5]);
        let expected = devsync_requestor::ingress::check_message(&subject, payload, 256 * 1024);
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject.clone(), Bytes::copy_from_slice(payload)),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: no answer", file.display()))
        .unwrap();
        let status = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::STATUS_HEADER))
            .map(|v| v.as_str().to_owned());
        match expected {
            Ok(()) => assert_eq!(
                status.as_deref(),
                Some(subjects::STATUS_OK),
                "{}: accepted",
                file.display()
            ),
            Err((code, _)) => {
                refusals += 1;
                assert_eq!(
                    status.as_deref(),
                    Some(subjects::STATUS_ERROR),
                    "{}",
                    file.display()
                );
                let error = ErrorReply::decode(reply.payload).unwrap();
                assert_eq!(error.code(), code, "{}: {}", file.display(), error.message);
                assert!(!error.message.is_empty());
            }
        }
    }
    assert!(
        refusals >= 10,
        "the corpus holds bad input ({refusals} refusals)"
    );
    let audited = wait_for(Duration::from_secs(10), "every refusal audited", || async {
        let count = stack
            .stored(names::STREAM_AUDIT)
            .await
            .into_iter()
            .flat_map(|(_, p)| devsync_runtime::audit::decode(&p).unwrap_or_default())
            .filter(|e| e.action == "message.refused")
            .count();
        (count >= refusals).then_some(count)
    })
    .await;
    assert_eq!(audited, refusals);
    // Still serving.
    let device = stack.device("fuzz-device").await;
    device.check_in(0).await.unwrap();
    requestor.stop().await;
}
