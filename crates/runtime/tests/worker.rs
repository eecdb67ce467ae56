//! The worker loop against a real nats-server: acks after success, naks with backoff on
//! transient errors, dead-letters poison at once and exhausted messages on their last
//! delivery, and the advisory sweeper rescues messages whose last delivery was never answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use devsync_proto::Message as _;
use devsync_proto::v1::DeadLetter;
use devsync_runtime::Shutdown;
use devsync_runtime::config::TopologySettings;
use devsync_runtime::dlq::AdvisorySweeper;
use devsync_runtime::retry::RetryPolicy;
use devsync_runtime::topology::Topology;
use devsync_runtime::worker::{self, Delivery, Handler, Outcome, WorkerMetrics, WorkerSpec};
use devsync_testkit::{TestNats, wait_for};
use devsync_types::{PartitionCount, names};
use futures::StreamExt;
use prometheus_client::registry::Registry;

/// Decides by payload: `ok`, `poison`, `flaky-N` (fails N times), `never` (always fails).
#[derive(Default)]
struct Scripted {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Handler for Scripted {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut attempts = self.attempts.lock().unwrap();
        batch
            .iter()
            .map(|delivery| {
                let payload = String::from_utf8_lossy(delivery.payload()).to_string();
                let seen = attempts.entry(payload.clone()).or_default();
                seen.push(Instant::now());
                match payload.as_str() {
                    "ok" => Outcome::Ack,
                    "poison" => Outcome::Reject("cannot decode: not a report".into()),
                    "never" => Outcome::Retry("database unavailable".into()),
                    p if p.starts_with("flaky-") => {
                        let failures: usize = p[6..].parse().unwrap();
                        if seen.len() > failures {
                            Outcome::Ack
                        } else {
                            Outcome::Retry("transient".into())
                        }
                    }
                    _ => Outcome::Reject("unknown script".into()),
                }
            })
            .collect()
    }
}

impl Scripted {
    fn attempts(&self, payload: &str) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .get(payload)
            .cloned()
            .unwrap_or_default()
    }
}

fn test_settings() -> TopologySettings {
    TopologySettings {
        partitions: PartitionCount::new(1).unwrap(),
        ack_wait: Duration::from_secs(2),
        max_deliver: 3,
        ..TopologySettings::default()
    }
}

const RETRY: RetryPolicy = RetryPolicy {
    min: Duration::from_millis(300),
    max: Duration::from_secs(2),
};

fn spec() -> WorkerSpec {
    WorkerSpec {
        stream: names::STREAM_FANOUT.into(),
        consumer: names::CONSUMER_FANOUT.into(),
        group: None,
        batch_size: 16,
        pull_expires: Duration::from_secs(1),
        retry: RETRY,
        linger: Duration::ZERO,
    }
}

async fn publish(js: &jetstream::Context, payload: &'static str) {
    js.publish("devsync.fanout.push.test", payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn dead_letters(js: &jetstream::Context) -> Vec<DeadLetter> {
    let mut stream = js.get_stream(names::STREAM_DLQ).await.unwrap();
    let count = stream.info().await.unwrap().state.messages;
    let mut letters = Vec::new();
    for sequence in 1..=count {
        let message = stream.get_raw_message(sequence).await.unwrap();
        letters.push(DeadLetter::decode(message.payload).unwrap());
    }
    letters
}

async fn pending(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test]
async fn outcomes_are_acked_retried_and_dead_lettered() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    Topology::new(test_settings()).declare(&js).await.unwrap();
    let handler = Arc::new(Scripted::default());
    let metrics = WorkerMetrics::register(&mut Registry::default());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(worker::run(
        js.clone(),
        spec(),
        handler.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    for payload in ["ok", "poison", "flaky-1", "never"] {
        publish(&js, payload).await;
    }

    // Everything settles: the stream (WorkQueue) empties, two dead letters exist.
    wait_for(Duration::from_secs(20), "all messages settled", || async {
        (pending(&js, names::STREAM_FANOUT).await == 0).then_some(())
    })
    .await;
    let letters = dead_letters(&js).await;
    assert_eq!(letters.len(), 2, "{letters:#?}");

    let poison = letters
        .iter()
        .find(|l| &l.original[..] == b"poison")
        .unwrap();
    assert_eq!(poison.error, "cannot decode: not a report");
    assert_eq!(poison.delivery_count, 1);
    assert_eq!(poison.stream, names::STREAM_FANOUT);
    assert_eq!(poison.subject, "devsync.fanout.push.test");
    assert_eq!(
        handler.attempts("poison").len(),
        1,
        "poison is never redelivered"
    );

    let exhausted = letters
        .iter()
        .find(|l| &l.original[..] == b"never")
        .unwrap();
    assert_eq!(exhausted.delivery_count, 3);
    assert!(
        exhausted
            .error
            .contains("last delivery (3) failed: database unavailable"),
        "{}",
        exhausted.error
    );
    assert_eq!(handler.attempts("never").len(), 3);

    // The transient failure came back after its backoff (>= min delay), then succeeded.
    let flaky = handler.attempts("flaky-1");
    assert_eq!(flaky.len(), 2);
    assert!(
        flaky[1] - flaky[0] >= RETRY.min,
        "{:?}",
        flaky[1] - flaky[0]
    );
    assert_eq!(handler.attempts("ok").len(), 1);

    let count = |outcome| metrics.count(names::STREAM_FANOUT, names::CONSUMER_FANOUT, outcome);
    assert_eq!(count("acked"), 2);
    assert_eq!(count("rejected"), 1);
    assert_eq!(count("dead_lettered"), 1);
    assert_eq!(count("retried"), 3);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("worker stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn unanswered_last_delivery_is_swept_to_the_dlq() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let settings = test_settings();
    Topology::new(settings.clone()).declare(&js).await.unwrap();
    let shutdown = Shutdown::new();
    let metrics = WorkerMetrics::register(&mut Registry::default());
    let sweeper = tokio::spawn(worker::run(
        js.clone(),
        WorkerSpec {
            stream: names::STREAM_ADVISORIES.into(),
            consumer: names::CONSUMER_DLQ_SWEEPER.into(),
            ..spec()
        },
        Arc::new(AdvisorySweeper::new(js.clone())),
        metrics,
        shutdown.clone(),
    ));

    publish(&js, "crashing").await;
    // A worker that dies while handling: it takes the message and never answers, each time.
    let consumer: PullConsumer = js
        .get_stream(names::STREAM_FANOUT)
        .await
        .unwrap()
        .get_consumer(names::CONSUMER_FANOUT)
        .await
        .unwrap();
    for _ in 0..settings.max_deliver {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let message = batch.next().await.expect("a delivery").unwrap();
        // Speed the test up: hand it back at once instead of waiting out ack_wait.
        message
            .ack_with(AckKind::Nak(Some(Duration::from_millis(10))))
            .await
            .unwrap();
    }

    // The server raises the advisory when it would deliver again, i.e. while someone pulls.
    let mut after = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    assert!(after.next().await.is_none(), "no fourth delivery");

    let letters = wait_for(Duration::from_secs(20), "the swept dead letter", || async {
        let letters = dead_letters(&js).await;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(&letters[0].original[..], b"crashing");
    assert_eq!(letters[0].delivery_count, 3);
    assert!(
        letters[0].error.contains("ran out of deliveries"),
        "{}",
        letters[0].error
    );
    wait_for(
        Duration::from_secs(10),
        "the stuck message deleted",
        || async { (pending(&js, names::STREAM_FANOUT).await == 0).then_some(()) },
    )
    .await;

    shutdown.cancel();
    sweeper.await.unwrap();
}

/// Records the size of every batch it is handed.
#[derive(Default)]
struct Sizes(Mutex<Vec<usize>>);

impl Handler for Sizes {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.0.lock().unwrap().push(batch.len());
        vec![Outcome::Ack; batch.len()]
    }
}

#[tokio::test]
async fn a_lingering_worker_hands_over_what_arrives_shortly_after_the_first_message_together() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    Topology::new(test_settings()).declare(&js).await.unwrap();
    let metrics = WorkerMetrics::register(&mut Registry::default());
    let run = |linger: Duration, handler: Arc<Sizes>, shutdown: &Shutdown| {
        tokio::spawn(worker::run(
            js.clone(),
            WorkerSpec { linger, ..spec() },
            handler,
            metrics.clone(),
            shutdown.clone(),
        ))
    };
    // Ten messages 5 ms apart: without lingering each is a batch of its own.
    let send_ten = || async {
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        for _ in 0..10 {
            pace.tick().await;
            publish(&js, "ok").await;
        }
    };
    let shutdown = Shutdown::new();
    let eager = Arc::new(Sizes::default());
    let worker = run(Duration::ZERO, eager.clone(), &shutdown);
    send_ten().await;
    wait_for(Duration::from_secs(10), "ten handled", || async {
        (eager.0.lock().unwrap().iter().sum::<usize>() == 10).then_some(())
    })
    .await;
    let eager_batches = eager.0.lock().unwrap().len();
    assert!(eager_batches > 1, "{eager_batches} batch without lingering");
    shutdown.cancel();
    worker.await.unwrap();

    let shutdown = Shutdown::new();
    let patient = Arc::new(Sizes::default());
    let worker = run(Duration::from_millis(500), patient.clone(), &shutdown);
    send_ten().await;
    wait_for(Duration::from_secs(10), "ten handled", || async {
        (patient.0.lock().unwrap().iter().sum::<usize>() == 10).then_some(())
    })
    .await;
    assert_eq!(*patient.0.lock().unwrap(), vec![10]);
    shutdown.cancel();
    worker.await.unwrap();
}
