//! W3C trace context crosses a NATS hop: the trace id of the publishing span is the trace id
//! of the span the consuming worker handles the message in.

use std::sync::Arc;
use std::time::Duration;

use devsync_runtime::config::{ConfigSources, TopologySettings};
use devsync_runtime::retry::RetryPolicy;
use devsync_runtime::topology::Topology;
use devsync_runtime::worker::{self, Delivery, Handler, Outcome, WorkerMetrics, WorkerSpec};
use devsync_runtime::{Shutdown, telemetry};
use devsync_testkit::TestNats;
use devsync_types::{PartitionCount, names};
use opentelemetry::trace::TracerProvider as _;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing_subscriber::layer::SubscriberExt;

struct Capture(mpsc::UnboundedSender<Option<String>>);

impl Handler for Capture {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        batch
            .iter()
            .map(|delivery| {
                let _ = self.0.send(telemetry::trace_id(&delivery.span));
                Outcome::Ack
            })
            .collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn trace_id_set_on_publish_is_seen_by_the_consumer() {
    let provider = telemetry::tracer_provider("test", &ConfigSources::default()).unwrap();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let nats = TestNats::start();
    let js = nats.jetstream().await;
    Topology::new(TopologySettings {
        partitions: PartitionCount::new(1).unwrap(),
        ..TopologySettings::default()
    })
    .declare(&js)
    .await
    .unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(worker::run(
        js.clone(),
        WorkerSpec {
            stream: names::STREAM_AUDIT.into(),
            consumer: names::CONSUMER_AUDIT.into(),
            group: None,
            batch_size: 8,
            pull_expires: Duration::from_secs(1),
            retry: RetryPolicy {
                min: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
            linger: Duration::ZERO,
        },
        Arc::new(Capture(tx)),
        WorkerMetrics::register(&mut Registry::default()),
        shutdown.clone(),
    ));

    let span = tracing::info_span!("device report");
    let sent_trace = telemetry::trace_id(&span).expect("the publishing span has a trace id");
    let mut headers = async_nats::HeaderMap::new();
    telemetry::inject_from(&span, &mut headers);
    assert!(headers.get("traceparent").is_some());
    js.publish_with_headers("devsync.audit.test", headers, "event".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let received = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the consumer handled the message")
        .unwrap();
    assert_eq!(received.as_deref(), Some(sent_trace.as_str()));

    shutdown.cancel();
    task.await.unwrap();
}
