//! The database-to-device path, end to end: an administrator's SQL edit is relayed by the
//! requestor, reconciled, and delivered by the fan-out (KV last value, notification,
//! webhook), under the push policies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use devsync_device::push_document;
use devsync_stack::Stack;
use devsync_testkit::wait_for;
use devsync_types::{names, subjects};
use futures::StreamExt as _;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// The audit chain of a device report that leads to a push the device acknowledges (the
/// requestor that accepted the report and the ack is named in their outcome events).
const CHAIN: [&str; 4] = [
    "report.applied",
    "push.requested",
    "push.delivered",
    "ack.recorded",
];

/// A webhook endpoint on loopback that answers `status` and records every call.
#[derive(Clone)]
struct Endpoint {
    url: String,
    calls: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl Endpoint {
    async fn start(status: StatusCode) -> Self {
        let calls: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
        let recorded = calls.clone();
        let app = Router::new().route(
            "/hook",
            post(move |body: axum::Json<Value>| {
                let recorded = recorded.clone();
                async move {
                    recorded.lock().unwrap().push((Instant::now(), body.0));
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, calls }
    }

    fn calls(&self) -> Vec<(Instant, Value)> {
        self.calls.lock().unwrap().clone()
    }
}

async fn metric(addr: std::net::SocketAddr, line_start: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_sql_edit_reaches_the_device_also_when_made_while_the_requestor_was_down() {
    let stack = Stack::start().await;
    stack.register(&["d-1"]).await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let fanout = stack.fanout(stack.fanout_settings("fanout-1")).await;
    let device = stack.device("d-1").await;
    let mut pushes = Box::pin(device.pushes().await.unwrap());

    stack
        .sql(r#"UPDATE devices SET desired = '{"fw": "2.0", "led": "on"}' WHERE id = 'd-1'"#)
        .await;
    let push = tokio::time::timeout(DEADLINE, pushes.next())
        .await
        .expect("a notification arrives")
        .unwrap();
    assert_eq!(push.desired_version, 1);
    assert_eq!(
        push_document(&push),
        Some(json!({"fw": "2.0", "led": "on"}))
    );
    let stored = device.last_desired().await.unwrap().expect("kv last value");
    assert_eq!(stored.desired_version, 1);

    // While no requestor runs, the change waits in the database...
    requestor.stop().await;
    stack
        .sql(r#"UPDATE devices SET desired = desired || '{"fw": "2.1"}' WHERE id = 'd-1'"#)
        .await;
    let waiting: i64 = stack.scalar("SELECT count(*) FROM desired_changes").await;
    assert_eq!(waiting, 1, "the change is captured, not yet relayed");
    // ...and is relayed once one is back.
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let push = tokio::time::timeout(DEADLINE, pushes.next())
        .await
        .expect("the change made while the requestor was down arrives")
        .unwrap();
    assert_eq!(push.desired_version, 2);
    assert_eq!(push_document(&push).unwrap()["fw"], "2.1");
    wait_for(DEADLINE, "kv holds version 2", || async {
        let held = device.last_desired().await.unwrap()?;
        (held.desired_version == 2).then_some(())
    })
    .await;
    // The relay commits its cursor after publishing: it reaches the second change.
    wait_for(DEADLINE, "the relay's cursor persisted", || async {
        let cursor: i64 = stack
            .scalar("SELECT last_id FROM relay_cursors WHERE name = 'desired_changes'")
            .await;
        (cursor == 2).then_some(())
    })
    .await;

    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn webhooks_are_retried_with_backoff_and_a_dead_endpoint_opens_its_circuit() {
    let stack = Stack::start().await;
    let good = Endpoint::start(StatusCode::NO_CONTENT).await;
    let bad = Endpoint::start(StatusCode::SERVICE_UNAVAILABLE).await;
    stack.register(&["good-1", "bad-1"]).await;
    stack
        .sql(&format!(
            "UPDATE devices SET http_endpoint = '{}' WHERE id = 'good-1';
             UPDATE devices SET http_endpoint = '{}' WHERE id = 'bad-1';",
            good.url, bad.url
        ))
        .await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let mut settings = stack.fanout_settings("fanout-1");
    settings.fanout.breaker_failures = 2;
    settings.fanout.breaker_open = Duration::from_secs(3);
    settings.fanout.webhook_attempts = 5;
    let fanout = stack.fanout(settings).await;

    stack
        .sql(r#"UPDATE devices SET desired = '{"mode": "eco"}' WHERE id IN ('bad-1', 'good-1')"#)
        .await;

    // The healthy endpoint is served at once, whatever the dead one does.
    let call = wait_for(DEADLINE, "the healthy endpoint's webhook", || async {
        good.calls().first().map(|(_, body)| body.clone())
    })
    .await;
    assert_eq!(call["device_id"], "good-1");
    assert_eq!(call["desired_version"], 1);
    assert_eq!(call["desired"], json!({"mode": "eco"}));

    // The dead endpoint: retried, then its circuit opens, then the task is dead-lettered after
    // its attempts, some of which were refused by the open circuit without a call.
    wait_for(DEADLINE, "the webhook dead-lettered", || async {
        let dead = stack.stored(names::STREAM_DLQ).await;
        dead.iter()
            .any(|(subject, _)| subject == &subjects::dlq(names::STREAM_FANOUT))
            .then_some(())
    })
    .await;
    let calls = bad.calls();
    assert!(
        calls.len() >= 2,
        "the failing endpoint was retried: {} calls",
        calls.len()
    );
    assert!(
        calls.len() < 5,
        "the open circuit spared the endpoint some calls: {} calls for 5 attempts",
        calls.len()
    );
    let gap = calls[1].0 - calls[0].0;
    assert!(
        gap >= Duration::from_millis(50),
        "retries wait for a backoff, not at once: {gap:?}"
    );
    let opened = metric(fanout.running.http_addr, "devsync_webhook_circuits_opened").await;
    assert!(opened >= 1.0, "the circuit opened ({opened})");
    assert_eq!(
        good.calls().len(),
        1,
        "the healthy endpoint got exactly one call"
    );

    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn push_active_skips_sleeping_devices_which_pull_on_wake_up_and_pull_only_sends_nothing() {
    let stack = Stack::start().await;
    stack.register(&["awake-1", "asleep-1"]).await;
    stack
        .sql("UPDATE devices SET last_seen = now() WHERE id = 'awake-1'")
        .await;
    stack.declare().await;
    let config = stack.js.get_key_value(names::KV_CONFIG).await.unwrap();
    config
        .put(names::CONFIG_PUSH_POLICY, "push-active".into())
        .await
        .unwrap();
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let fanout = stack.fanout(stack.fanout_settings("fanout-1")).await;
    let awake = stack.device("awake-1").await;
    let asleep = stack.device("asleep-1").await;
    let addr = fanout.running.http_addr;

    stack
        .sql(r#"UPDATE devices SET desired = '{"interval": 30}' WHERE id IN ('awake-1', 'asleep-1')"#)
        .await;
    wait_for(DEADLINE, "the awake device's kv value", || async {
        awake.last_desired().await.unwrap()
    })
    .await;
    wait_for(DEADLINE, "the sleeping device skipped", || async {
        (metric(addr, "devsync_fanout_deliveries_total{result=\"skipped\"").await >= 1.0)
            .then_some(())
    })
    .await;
    assert!(
        asleep.last_desired().await.unwrap().is_none(),
        "nothing was written for the sleeping device"
    );
    // On wake-up it pulls the change.
    match asleep.refresh(0).await.unwrap() {
        devsync_device::Refresh::Full { version, document }
        | devsync_device::Refresh::Delta {
            version,
            patch: document,
        } => {
            assert_eq!(version, 1);
            assert_eq!(document, json!({"interval": 30}));
        }
        other => panic!("expected the change, got {other:?}"),
    }

    // pull-only: nothing is written, not even for the awake device.
    config
        .put(names::CONFIG_PUSH_POLICY, "pull-only".into())
        .await
        .unwrap();
    let skipped = || metric(addr, "devsync_fanout_deliveries_total{result=\"skipped\"");
    let edit = r#"UPDATE devices SET desired = desired || jsonb_build_object('n', random()) WHERE id = 'awake-1'"#;
    // The watch is asynchronous: edit until an edit is skipped, then once more, so the last
    // edit certainly met the new policy.
    let before = skipped().await;
    wait_for(DEADLINE, "the policy change applied", || async {
        stack.sql(edit).await;
        let now = skipped().await;
        (now > before).then_some(())
    })
    .await;
    let before = skipped().await;
    stack.sql(edit).await;
    wait_for(DEADLINE, "the last edit skipped", || async {
        (skipped().await > before).then_some(())
    })
    .await;
    let held = awake.last_desired().await.unwrap().unwrap();
    let version: i64 = stack
        .scalar("SELECT desired_version FROM devices WHERE id = 'awake-1'")
        .await;
    assert!(
        (held.desired_version as i64) < version,
        "pull-only wrote nothing: kv at {} while the database is at {version}",
        held.desired_version
    );

    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
}

#[tokio::test]
async fn one_request_id_leads_from_the_device_report_through_the_fanout_to_the_device_ack() {
    // Trace ids exist where the services install their OpenTelemetry layer, as `main` does.
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = devsync_runtime::telemetry::tracer_provider(
        "test",
        &devsync_runtime::ConfigSources::default(),
    )
    .unwrap();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))),
    )
    .unwrap();
    let stack = Stack::start().await;
    stack.register(&["t-1"]).await;
    // The device has a desired state it does not run yet (not relayed: only the report acts).
    stack
        .sql(
            r#"UPDATE devices SET desired = '{"mode": "eco"}' WHERE id = 't-1';
               DELETE FROM desired_changes;"#,
        )
        .await;
    let audit = stack.audit().await;
    let requestor = stack.requestor(stack.requestor_settings()).await;
    let reconciler = stack.reconciler("reconciler-1").await;
    let fanout = stack.fanout(stack.fanout_settings("fanout-1")).await;
    let device = stack.device("t-1").await;
    let mut pushes = Box::pin(device.pushes().await.unwrap());

    // A report that leaves a delta: the reconciler asks the fan-out to push...
    device
        .report(&json!({"mode": "normal"}), true)
        .await
        .unwrap();
    let request = "report:t-1:1";
    // ...and the device acknowledges the push it receives.
    let push = tokio::time::timeout(DEADLINE, pushes.next())
        .await
        .expect("the push arrives")
        .unwrap();
    assert_eq!(push.request_id, request, "the push names its cause");
    device.ack_push(&push, true, "").await.unwrap();

    let chain = wait_for(DEADLINE, "the chain up to the device's ack", || async {
        let rows = stack
            .db
            .pool
            .get()
            .await
            .unwrap()
            .query(
                "SELECT worker_id, stage, action, trace_id, details->>'accepted_by'
                 FROM audit_events WHERE request_id = $1 ORDER BY at, stage",
                &[&request],
            )
            .await
            .unwrap();
        let chain: Vec<(String, String, String, Option<String>)> = rows
            .iter()
            .map(|r| {
                // The requestor that accepted a report or an ack is named in its outcome.
                let worker = match r.get::<_, Option<String>>(4) {
                    Some(accepted_by) => {
                        format!("{} (accepted by {accepted_by})", r.get::<_, String>(0))
                    }
                    None => r.get(0),
                };
                (worker, r.get(1), r.get(2), r.get(3))
            })
            .collect();
        // Events arrive from three services in any order: wait for the whole chain.
        let has = |wanted: &str| chain.iter().any(|(_, _, action, _)| action == wanted);
        CHAIN.iter().all(|action| has(action)).then_some(chain)
    })
    .await;
    let workers: Vec<&str> = chain.iter().map(|(w, _, _, _)| w.as_str()).collect();
    for service in ["accepted by requestor/", "reconciler/", "fanout/"] {
        assert!(
            workers.iter().any(|w| w.contains(service)),
            "{service} is in the chain: {chain:?}"
        );
    }
    let actions: Vec<&str> = chain.iter().map(|(_, _, a, _)| a.as_str()).collect();
    assert_eq!(
        actions.len(),
        CHAIN.len(),
        "each link once, nothing else: {actions:?}"
    );
    // One trace from the report to the delivery (the acknowledgement is the device's own
    // message, with its own trace).
    let traces: std::collections::BTreeSet<&str> = chain
        .iter()
        .filter(|(_, _, action, _)| !action.starts_with("ack."))
        .filter_map(|(_, _, _, t)| t.as_deref())
        .collect();
    assert_eq!(traces.len(), 1, "one trace across the hops: {chain:?}");
    assert!(
        chain.iter().all(|(_, _, _, t)| t.is_some()),
        "every event carries a trace id: {chain:?}"
    );

    fanout.stop().await;
    reconciler.stop().await;
    requestor.stop().await;
    audit.stop().await;
}
