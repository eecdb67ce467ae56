//! The audit service against real NATS and PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use devsync_proto::Message as _;
use devsync_proto::v1 as pb;
use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, Secret};
use devsync_store::audit::{self as store, Query};
use devsync_testkit::{TestDb, TestNats, wait_for};
use devsync_types::{
    AuditOutcome, AuditRecord, DeviceId, PartitionCount, RequestId, ServiceName, WorkerId,
};
use serde_json::{Value, json};

fn common(nats: &TestNats, db: &TestDb, instance: &str) -> CommonSettings {
    let mut common = CommonSettings {
        instance: Some(instance.to_owned()),
        ..CommonSettings::default()
    };
    common.nats.url = nats.url();
    common.database.url = Secret::new(db.url.clone());
    common.database.pool_size = 4;
    common.http.listen = "127.0.0.1:0".parse().unwrap();
    common.topology.partitions = PartitionCount::new(4).unwrap();
    common.topology.member_ttl = Duration::from_secs(2);
    common.topology.pin_timeout = Duration::from_secs(2);
    common.worker.pull_expires = Duration::from_secs(1);
    common.worker.retry_min_delay = Duration::from_millis(100);
    common.worker.retry_max_delay = Duration::from_secs(1);
    common
}

async fn audit_service(
    nats: &TestNats,
    db: &TestDb,
    instance: &str,
) -> (devsync_audit::Running, Shutdown) {
    let shutdown = Shutdown::new();
    let running = devsync_audit::start(
        devsync_audit::Settings {
            common: common(nats, db, instance),
            audit: devsync_audit::AuditSettings {
                // Small batches, so two replicas both get a share of a few hundred messages.
                batch_size: 10,
                ..Default::default()
            },
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    (running, shutdown)
}

fn record(
    device: &str,
    worker: &str,
    request: &str,
    action: &str,
    at: DateTime<Utc>,
) -> AuditRecord {
    AuditRecord {
        event_id: format!("{request}/test/{action}"),
        at,
        device_id: Some(DeviceId::parse(device).unwrap()),
        worker_id: worker.parse().unwrap(),
        request_id: Some(RequestId::parse(request).unwrap()),
        stage: "test".into(),
        action: action.into(),
        outcome: AuditOutcome::Ok,
        details: json!({"n": 1}),
        trace_id: None,
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn count(db: &TestDb) -> i64 {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_pipelines_events_are_stored_once_and_found_by_device_worker_and_request() {
    let nats = TestNats::start();
    let db = TestDb::create().await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO devices (id) VALUES ('a1'), ('a2')")
        .await
        .unwrap();
    let shutdown = Shutdown::new();
    let requestor = devsync_requestor::start(
        devsync_requestor::Settings {
            common: common(&nats, &db, "req-1"),
            requestor: Default::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let reconciler = devsync_reconciler::start(
        devsync_reconciler::Settings {
            common: common(&nats, &db, "rec-1"),
            reconciler: Default::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (audit, audit_shutdown) = audit_service(&nats, &db, "audit-1").await;

    for id in ["a1", "a2"] {
        let device = DeviceId::parse(id).unwrap();
        let client = nats.client().await;
        let device = devsync_device::Device::with_client(client, device, 0);
        for n in 1..=3 {
            device.report(&json!({"n": n}), true).await.unwrap();
        }
    }
    let (_, page) = wait_for(
        Duration::from_secs(20),
        "six applied reports audited",
        || async {
            let (status, page) = get(audit.http_addr, "/v1/audit?stage=reconcile&limit=1000").await;
            let applied = page["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["action"] == "report.applied")
                .count();
            (applied == 6).then_some((status, page))
        },
    )
    .await;
    let events = page["events"].as_array().unwrap();
    let times: Vec<&str> = events.iter().map(|e| e["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "time order");

    // By device: only a1's events, with the reconciler named as the worker.
    let (status, page) = get(audit.http_addr, "/v1/devices/a1/timeline").await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().unwrap();
    assert!(events.iter().all(|e| e["device_id"] == "a1"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["action"] == "report.applied")
            .count(),
        3
    );
    assert!(events.iter().any(|e| e["worker_id"] == "reconciler/rec-1"));

    // By request id: one report's outcome, naming the worker that accepted it (the requestor)
    // beside the one that applied it (the reconciler) and its place in the request stream.
    let events = wait_for(Duration::from_secs(20), "the report's chain", || async {
        let (_, page) = get(
            audit.http_addr,
            "/v1/audit?request=report:a2:2&worker=reconciler/rec-1",
        )
        .await;
        let events = page["events"].as_array().unwrap().clone();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    let applied = &events[0];
    assert_eq!(applied["device_id"], "a2");
    assert_eq!(applied["action"], "report.applied", "{applied:?}");
    assert_eq!(applied["worker_id"], "reconciler/rec-1");
    assert_eq!(applied["details"]["accepted_by"], "requestor/req-1");
    assert!(
        applied["details"]["stream_sequence"].as_u64().unwrap() > 0,
        "{applied:?}"
    );

    // A device's retry of a stored report is recorded by the ingress that answered it.
    let retrying =
        devsync_device::Device::with_client(nats.client().await, DeviceId::parse("a2").unwrap(), 1);
    let answer = retrying.report(&json!({"n": 2}), true).await.unwrap();
    assert!(answer.duplicate, "sequence 2 of a2 is stored already");
    let events = wait_for(Duration::from_secs(20), "the retry's event", || async {
        let (_, page) = get(audit.http_addr, "/v1/audit?request=report:a2:2").await;
        let events = page["events"].as_array().unwrap().clone();
        (events.len() >= 2).then_some(events)
    })
    .await;
    let retry = events
        .iter()
        .find(|e| e["action"] == "report.duplicate")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(retry["worker_id"], "requestor/req-1");
    assert_eq!(retry["stage"], "ingress");
    assert_eq!(retry["outcome"], "skipped", "{retry:?}");

    // By worker.
    let (_, page) = get(
        audit.http_addr,
        "/v1/audit?worker=reconciler/rec-1&limit=1000",
    )
    .await;
    assert!(page["events"].as_array().unwrap().len() >= 6);
    let (_, page) = get(audit.http_addr, "/v1/audit?worker=reconciler/nobody").await;
    assert!(page["events"].as_array().unwrap().is_empty());

    // A redelivered batch (same events, a new message id) is stored once.
    let before = count(&db).await;
    let auditor = devsync_runtime::audit::Auditor::new(
        WorkerId::new(ServiceName::Reconciler, "rec-1").unwrap(),
    );
    let stored = store::search(
        &db.pool.get().await.unwrap(),
        &Query {
            device: Some(DeviceId::parse("a1").unwrap()),
            limit: 1000,
            ..Query::default()
        },
    )
    .await
    .unwrap();
    let mut message = auditor.message(&stored.events).remove(0);
    message.msg_id.push_str(":again");
    devsync_runtime::publish::publish_all(&nats.jetstream().await, [message])
        .await
        .unwrap();
    let js = nats.jetstream().await;
    wait_for(
        Duration::from_secs(10),
        "the redelivery consumed",
        || async {
            let mut stream = js.get_stream("DEVSYNC_AUDIT").await.unwrap();
            (stream.info().await.unwrap().state.messages == 0).then_some(())
        },
    )
    .await;
    assert_eq!(count(&db).await, before, "nothing stored twice");

    // The chain verifies.
    let reports = store::verify(&db.pool.get().await.unwrap(), None)
        .await
        .unwrap();
    assert!(!reports.is_empty());
    assert!(reports.iter().all(|r| r.problems.is_empty()), "{reports:?}");

    shutdown.cancel();
    audit_shutdown.cancel();
    requestor.wait().await.unwrap();
    reconciler.wait().await.unwrap();
    audit.wait().await.unwrap();
}

#[tokio::test]
async fn search_pages_through_exactly_the_right_rows_and_refuses_bad_parameters() {
    let nats = TestNats::start();
    let db = TestDb::create().await;
    let now = Utc::now();
    let mut records = Vec::new();
    for i in 0..10 {
        let at = now - chrono::Duration::minutes(60 - i);
        records.push(record(
            "p1",
            "reconciler/r1",
            &format!("req-{i}"),
            "step",
            at,
        ));
        records.push(record("p2", "fanout/f1", &format!("other-{i}"), "step", at));
    }
    store::insert(&mut db.pool.get().await.unwrap(), &records)
        .await
        .unwrap();
    let (audit, shutdown) = audit_service(&nats, &db, "audit-1").await;

    let mut seen = Vec::new();
    let mut path = "/v1/audit?device=p1&limit=3&since=2h".to_owned();
    loop {
        let (status, page) = get(audit.http_addr, &path).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 3);
        seen.extend(
            events
                .iter()
                .map(|e| e["request_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/audit?device=p1&limit=3&since=2h&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("req-{i}")).collect();
    assert_eq!(seen, expected, "every row once, in time order");

    // A time range.
    let since =
        (now - chrono::Duration::minutes(55)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let until =
        (now - chrono::Duration::minutes(52)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, page) = get(
        audit.http_addr,
        &format!("/v1/audit?worker=fanout/f1&since={since}&until={until}"),
    )
    .await;
    let ids: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["other-5", "other-6", "other-7"]);

    for (path, needle) in [
        ("/v1/audit?limit=5000", "parameter limit"),
        ("/v1/audit?device=bad.id", "parameter device"),
        ("/v1/audit?since=soon", "parameter since"),
        ("/v1/audit?outcome=great", "parameter outcome"),
        ("/v1/audit?cursor=zzz", "parameter cursor"),
        ("/v1/audit?colour=red", "unknown parameter colour"),
    ] {
        let (status, body) = get(audit.http_addr, path).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }

    // The same search over NATS.
    let client = nats.client().await;
    let request: BTreeMap<&str, &str> =
        [("device", "p2"), ("limit", "1000"), ("since", "2h")].into();
    let reply = client
        .request(
            "devsync.api.audit.search",
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap();
    let page: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 10);
    let reply = client
        .request(
            "devsync.api.audit.search",
            b"{\"limit\": \"0\"}".to_vec().into(),
        )
        .await
        .unwrap();
    let error = reply.headers.unwrap();
    assert_eq!(
        error.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );

    shutdown.cancel();
    audit.wait().await.unwrap();
}

#[tokio::test]
async fn a_device_search_uses_an_index() {
    let db = TestDb::create().await;
    // Noon of a day already begun, so the 5.5 hours of events below fall in one day's
    // partition whenever the test runs (just after midnight UTC they spanned two).
    let now = (Utc::now() - chrono::Duration::hours(12))
        .date_naive()
        .and_hms_opt(12, 0, 0)
        .expect("noon")
        .and_utc();
    let records: Vec<AuditRecord> = (0..20_000)
        .map(|i| {
            record(
                &format!("dev-{}", i % 500),
                "reconciler/r1",
                &format!("r-{i}"),
                "x",
                now - chrono::Duration::seconds(i),
            )
        })
        .collect();
    for chunk in records.chunks(5000) {
        store::insert(&mut db.pool.get().await.unwrap(), chunk)
            .await
            .unwrap();
    }
    let client = db.pool.get().await.unwrap();
    client.batch_execute("ANALYZE audit_events").await.unwrap();
    let query = Query {
        device: Some(DeviceId::parse("dev-7").unwrap()),
        since: Some(now - chrono::Duration::hours(1)),
        limit: 100,
        ..Query::default()
    };
    let plan = store::explain(&client, &query).await.unwrap();
    // The partition holding the rows is read through the (device, time) index; empty
    // partitions of days ahead cost nothing either way.
    let today = format!("audit_events_{}", now.format("%Y%m%d"));
    assert!(!plan.contains(&format!("Seq Scan on {today}")), "{plan}");
    assert!(
        plan.contains(&format!("{today}_device_id_at_idx")),
        "{plan}"
    );
    let page = store::search(&client, &query).await.unwrap();
    // dev-7 has an event every 500 s; 8 of them fall in the last hour.
    assert_eq!(page.events.len(), 8);
}

#[tokio::test]
async fn retention_drops_old_days_and_verify_detects_tampering() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    let now = Utc::now();
    let old = now - chrono::Duration::days(40);
    client
        .execute(
            "SELECT devsync_audit_ensure_partitions($1, 2)",
            &[&old.date_naive()],
        )
        .await
        .unwrap();
    drop(client);
    store::insert(
        &mut db.pool.get().await.unwrap(),
        &[
            record("t1", "reconciler/r1", "old-1", "x", old),
            record("t1", "reconciler/r1", "new-1", "x", now),
            record("t1", "reconciler/r1", "new-2", "y", now),
        ],
    )
    .await
    .unwrap();
    let client = db.pool.get().await.unwrap();
    let (_, dropped) = store::maintain(&client, Duration::from_secs(30 * 24 * 3600), 2)
        .await
        .unwrap();
    assert!(dropped >= 1);
    let remaining: Vec<String> = client
        .query(
            "SELECT request_id FROM audit_events ORDER BY request_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(remaining, vec!["new-1", "new-2"]);

    let reports = store::verify(&client, None).await.unwrap();
    assert!(reports.iter().all(|r| r.problems.is_empty()), "{reports:?}");

    // The service's path cannot change a row.
    let err = client
        .execute(
            "UPDATE audit_events SET outcome = 'failed' WHERE request_id = 'new-1'",
            &[],
        )
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("append-only"), "{err:?}");
    // Someone with superuser rights does it anyway: verify notices.
    client
        .batch_execute(
            "SET session_replication_role = replica;
             UPDATE audit_events SET details = '{\"n\": 2}' WHERE request_id = 'new-1';
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    let reports = store::verify(&client, Some(now.date_naive()))
        .await
        .unwrap();
    assert_eq!(reports.len(), 1);
    assert!(
        reports[0]
            .problems
            .iter()
            .any(|p| p.contains("altered or removed")),
        "{reports:?}"
    );
}

#[tokio::test]
async fn two_replicas_share_the_load_without_duplicates() {
    let nats = TestNats::start();
    let db = TestDb::create().await;
    let (a, stop_a) = audit_service(&nats, &db, "audit-a").await;
    let (b, stop_b) = audit_service(&nats, &db, "audit-b").await;
    let js = nats.jetstream().await;
    let auditor =
        devsync_runtime::audit::Auditor::new(WorkerId::new(ServiceName::Requestor, "r").unwrap());
    let now = Utc::now();
    let mut messages = Vec::new();
    for batch in 0..200 {
        let records: Vec<AuditRecord> = (0..10)
            .map(|i| record("s1", "requestor/r", &format!("b{batch}-{i}"), "x", now))
            .collect();
        let message = auditor.message(&records).remove(0);
        messages.push(message.clone());
        // Every batch twice (a publisher retry that missed the dedupe window).
        let mut again = message;
        again.msg_id.push_str(":retry");
        messages.push(again);
    }
    devsync_runtime::publish::publish_all(&js, messages)
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "2000 events stored", || async {
        (count(&db).await == 2000).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(10), "the stream drained", || async {
        let mut stream = js.get_stream("DEVSYNC_AUDIT").await.unwrap();
        (stream.info().await.unwrap().state.messages == 0).then_some(())
    })
    .await;
    assert_eq!(count(&db).await, 2000);
    let stored = |addr| async move {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with("devsync_audit_events_stored_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (sa, sb) = (stored(a.http_addr).await, stored(b.http_addr).await);
    assert_eq!(sa + sb, 2000.0);
    assert!(sa > 0.0 && sb > 0.0, "both replicas worked: {sa} / {sb}");
    let reports = store::verify(&db.pool.get().await.unwrap(), None)
        .await
        .unwrap();
    assert!(reports.iter().all(|r| r.problems.is_empty()), "{reports:?}");

    stop_a.cancel();
    stop_b.cancel();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
    let _ = pb::AuditBatch::default().encode_to_vec();
}

#[tokio::test]
async fn the_same_action_happening_twice_in_a_day_is_two_events_and_the_chain_verifies() {
    let db = TestDb::create().await;
    let now = Utc::now();
    let later = now + chrono::Duration::milliseconds(5);
    // A device replays a message after the deduplication window: the reconciler records the
    // same action for the same request again, later.
    let duplicate_at = |at| record("t1", "reconciler/r1", "report:t1:1", "report.duplicate", at);
    store::insert(&mut db.pool.get().await.unwrap(), &[duplicate_at(now)])
        .await
        .unwrap();
    let stored = store::insert(
        &mut db.pool.get().await.unwrap(),
        // The first one published again (an outbox re-publish) is not stored twice.
        &[duplicate_at(later), duplicate_at(now)],
    )
    .await
    .unwrap();
    assert_eq!(stored, 1, "only the later occurrence is new");
    let client = db.pool.get().await.unwrap();
    let reports = store::verify(&client, None).await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!((reports[0].links, reports[0].events), (2, 2));
    assert!(reports[0].problems.is_empty(), "{reports:?}");
}
