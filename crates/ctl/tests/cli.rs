//! `devsyncctl` as a user runs it, against a real nats-server and PostgreSQL.

use std::process::{Command, Output};

use devsync_testkit::{TestDb, TestNats};

fn ctl(nats: &TestNats, db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devsyncctl"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVSYNC_NATS__URL", nats.url())
        .env("DEVSYNC_DATABASE__URL", &db.url)
        .env("DEVSYNC_TOPOLOGY__PARTITIONS", "4")
        .output()
        .expect("run devsyncctl")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn migrate_bootstrap_and_status() {
    let nats = TestNats::start();
    let db = TestDb::create_empty(false).await;

    let out = stdout(&ctl(&nats, &db, &["migrate"]));
    assert!(out.contains("applied V1 devices"), "{out}");
    let out = stdout(&ctl(&nats, &db, &["migrate"]));
    assert!(out.starts_with("schema is current"), "{out}");

    let out = stdout(&ctl(&nats, &db, &["bootstrap"]));
    let expected = 5 + 4 + 2 * 4 + 3 + 1;
    assert!(
        out.contains(&format!("topology: {expected} created, 0 unchanged")),
        "{out}"
    );
    assert!(out.contains("DEVSYNC_REQ/reconcile-rt-* (4)"), "{out}");
    let out = stdout(&ctl(&nats, &db, &["bootstrap"]));
    assert!(
        out.contains(&format!("topology: 0 created, {expected} unchanged")),
        "{out}"
    );

    let out = stdout(&ctl(&nats, &db, &["status"]));
    for name in [
        "DEVSYNC_REQ",
        "DEVSYNC_AUDIT",
        "DEVSYNC_DLQ",
        "reconcile-bulk-* (4)",
        "dlq-sweeper",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
}

#[tokio::test]
async fn a_bad_setting_exits_64_with_one_line() {
    let nats = TestNats::start();
    let db = TestDb::create_empty(false).await;
    let output = Command::new(env!("CARGO_BIN_EXE_devsyncctl"))
        .arg("status")
        .env("DEVSYNC_NATS__URL", nats.url())
        .env("DEVSYNC_DATABASE__URL", &db.url)
        .env("DEVSYNC_TOPOLOGY__REPLICAS", "nine")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("devsyncctl: setting topology.replicas (DEVSYNC_TOPOLOGY__REPLICAS)"),
        "{err}"
    );
}

#[tokio::test]
async fn audit_search_and_verify() {
    use devsync_types::{AuditOutcome, AuditRecord, DeviceId, RequestId};
    let nats = TestNats::start();
    let db = TestDb::create().await;
    // Within the last hour and within today (UTC), so the trail is one day whenever the test
    // runs (just after midnight the events spanned two days).
    let now = chrono::Utc::now();
    let today = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let first = (now - chrono::Duration::minutes(5)).max(today);
    let records: Vec<AuditRecord> = (0..5)
        .map(|i| AuditRecord {
            event_id: format!("e{i}"),
            at: first + chrono::Duration::seconds(i),
            device_id: Some(DeviceId::parse(if i % 2 == 0 { "even" } else { "odd" }).unwrap()),
            worker_id: "reconciler/r1".parse().unwrap(),
            request_id: Some(RequestId::parse(format!("req-{i}")).unwrap()),
            stage: "reconcile".into(),
            action: "report.applied".into(),
            outcome: AuditOutcome::Ok,
            details: serde_json::json!({"i": i}),
            trace_id: None,
        })
        .collect();
    devsync_store::audit::insert(&mut db.pool.get().await.unwrap(), &records)
        .await
        .unwrap();

    let out = stdout(&ctl(
        &nats,
        &db,
        &["audit", "--device", "even", "--since", "1h", "--json"],
    ));
    let requests: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(requests, vec!["req-0", "req-2", "req-4"]);
    let table = stdout(&ctl(&nats, &db, &["audit", "--worker", "reconciler/r1"]));
    assert!(
        table.contains("report.applied") && table.contains("odd"),
        "{table}"
    );

    let bad = ctl(&nats, &db, &["audit", "--device", "no.dots"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("parameter device"));

    let out = stdout(&ctl(&nats, &db, &["audit", "verify"]));
    assert!(out.contains("audit trail verified: 1 day(s)"), "{out}");
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM audit_events WHERE event_id = 'e3';
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    let tampered = ctl(&nats, &db, &["audit", "verify"]);
    assert!(!tampered.status.success());
    let text = String::from_utf8_lossy(&tampered.stdout);
    assert!(text.contains("altered or removed"), "{text}");
}

#[tokio::test]
async fn smoke_round_trip_through_the_running_services() {
    use devsync_runtime::config::{CommonSettings, Secret};
    let nats = TestNats::start();
    let db = TestDb::create().await;
    let common = |name: &str| {
        let mut c = CommonSettings {
            instance: Some(name.to_owned()),
            ..CommonSettings::default()
        };
        c.nats.url = nats.url();
        c.database.url = Secret::new(db.url.clone());
        c.database.pool_size = 4;
        c.http.listen = "127.0.0.1:0".parse().unwrap();
        c.topology.partitions = devsync_types::PartitionCount::new(4).unwrap();
        c
    };
    let shutdown = devsync_runtime::Shutdown::new();
    let requestor = devsync_requestor::start(
        devsync_requestor::Settings {
            common: common("req"),
            requestor: Default::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let reconciler = devsync_reconciler::start(
        devsync_reconciler::Settings {
            common: common("rec"),
            reconciler: Default::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let audit = devsync_audit::start(
        devsync_audit::Settings {
            common: common("aud"),
            audit: Default::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let output = tokio::task::spawn_blocking({
        let (url, db_url) = (nats.url(), db.url.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_devsyncctl"))
                .args(["smoke", "--timeout", "30s"])
                .env("DEVSYNC_NATS__URL", url)
                .env("DEVSYNC_DATABASE__URL", db_url)
                .env("DEVSYNC_TOPOLOGY__PARTITIONS", "4")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let out = stdout(&output);
    assert!(out.contains("smoke test passed"), "{out}");
    assert!(out.contains("actions found in the audit trail"), "{out}");
    shutdown.cancel();
    requestor.wait().await.unwrap();
    reconciler.wait().await.unwrap();
    audit.wait().await.unwrap();
}
