//! The topology against a real nats-server: declared once, declared again without change,
//! settings as DESIGN.md says, drift corrected or reported, and the partition function agreeing
//! with the server's subject transform.

use std::time::Duration;

use async_nats::jetstream::consumer::PriorityPolicy;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use devsync_runtime::config::TopologySettings;
use devsync_runtime::topology::{Action, AssetKind, Topology};
use devsync_testkit::TestNats;
use devsync_types::{DeviceId, Lane, PartitionCount, names, subjects};

fn settings(partitions: u16) -> TopologySettings {
    TopologySettings {
        partitions: PartitionCount::new(partitions).unwrap(),
        ..TopologySettings::default()
    }
}

#[tokio::test]
async fn second_declaration_changes_nothing_and_assets_match_the_design() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let topology = Topology::new(settings(8));

    let first = topology.declare(&js).await.unwrap();
    let expected_assets = 5 + 4 + 2 * 8 + 3 + 1;
    assert_eq!(first.assets.len(), expected_assets);
    assert!(
        first.assets.iter().all(|a| a.action == Action::Created),
        "{first:#?}"
    );

    let second = topology.declare(&js).await.unwrap();
    assert!(!second.changed(), "{second:#?}");
    assert!(
        second.assets.iter().all(|a| a.action == Action::Unchanged),
        "{second:#?}"
    );
    assert_eq!(topology.verify(&js).await.unwrap().problems().count(), 0);

    // Settings from DESIGN.md, read back from the server.
    let mut req = js.get_stream(names::STREAM_REQ).await.unwrap();
    let info = req.info().await.unwrap().clone();
    assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
    assert_eq!(info.config.storage, StorageType::File);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert!(info.config.allow_message_ttl);
    let transform = info.config.subject_transform.clone().unwrap();
    assert_eq!(transform.source, "devsync.req.*.*");
    assert_eq!(
        transform.destination,
        subjects::request_transform_destination(PartitionCount::new(8).unwrap())
    );

    let fanout = js.get_stream(names::STREAM_FANOUT).await.unwrap();
    let config = &fanout.cached_info().config;
    assert_eq!(config.retention, RetentionPolicy::WorkQueue);
    assert_eq!(config.discard, DiscardPolicy::New);
    // Device ingress is a queue group: no stream may capture devsync.in.> and answer devices.
    let mut names = js.stream_names();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        let name = name.unwrap();
        let info = js.get_stream(&name).await.unwrap();
        assert!(
            !info
                .cached_info()
                .config
                .subjects
                .iter()
                .any(|s| s.starts_with("devsync.in")),
            "{name} captures device ingress"
        );
    }

    let dlq = js.get_stream(names::STREAM_DLQ).await.unwrap();
    assert_eq!(dlq.cached_info().config.retention, RetentionPolicy::Limits);

    for lane in Lane::ALL {
        for partition in PartitionCount::new(8).unwrap().all() {
            let name = names::reconcile_consumer(lane, partition);
            let consumer = req.consumer_info(&name).await.unwrap();
            assert_eq!(
                consumer.config.priority_policy,
                PriorityPolicy::PinnedClient
            );
            assert_eq!(
                consumer.config.priority_groups,
                vec![names::RECONCILE_GROUP]
            );
            assert_eq!(
                consumer.config.filter_subject,
                subjects::request_partition_filter(lane, partition)
            );
            assert!(
                consumer.config.backoff.is_empty(),
                "backoff would replace ack_wait"
            );
        }
    }
    for bucket in [names::KV_DESIRED, names::KV_MEMBERS, names::KV_CONFIG] {
        js.get_key_value(bucket).await.unwrap();
    }
    js.get_object_store(names::OBJECT_BLOBS).await.unwrap();
}

#[tokio::test]
async fn drift_is_corrected_where_possible_and_reported_otherwise() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let topology = Topology::new(settings(2));
    topology.declare(&js).await.unwrap();

    // Someone shortened the audit stream's max age by hand.
    let mut audit = js.get_stream(names::STREAM_AUDIT).await.unwrap();
    let mut config = audit.info().await.unwrap().config.clone();
    config.max_age = Duration::from_secs(3600);
    js.update_stream(config).await.unwrap();

    let verify = topology.verify(&js).await.unwrap();
    let drifted: Vec<_> = verify.problems().collect();
    assert_eq!(drifted.len(), 1, "{drifted:#?}");
    assert_eq!(drifted[0].name, names::STREAM_AUDIT);

    let report = topology.declare(&js).await.unwrap();
    let audit_report = report
        .assets
        .iter()
        .find(|a| a.kind == AssetKind::Stream && a.name == names::STREAM_AUDIT)
        .unwrap();
    match &audit_report.action {
        Action::Updated(diffs) => assert_eq!(diffs[0].field, "max_age"),
        other => panic!("expected an update, got {other:?}"),
    }
    let info = audit.info().await.unwrap();
    assert_eq!(info.config.max_age, TopologySettings::default().max_age);

    // A setting that cannot change in place (the partition count, via the transform, can; the
    // retention cannot) is reported, not destroyed.
    js.delete_stream(names::STREAM_DLQ).await.unwrap();
    let mut wrong = topology
        .streams()
        .into_iter()
        .find(|s| s.name == names::STREAM_DLQ)
        .unwrap();
    wrong.retention = RetentionPolicy::Interest;
    js.create_stream(wrong).await.unwrap();
    let report = topology.declare(&js).await.unwrap();
    let dlq = report
        .assets
        .iter()
        .find(|a| a.name == names::STREAM_DLQ)
        .unwrap();
    assert!(
        matches!(&dlq.action, Action::Drifted(d) if d.iter().any(|d| d.field == "retention")),
        "{dlq:?}"
    );
}

#[tokio::test]
async fn partition_function_matches_the_servers_transform() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let partitions = PartitionCount::new(16).unwrap();
    Topology::new(settings(16)).declare(&js).await.unwrap();

    let devices: Vec<DeviceId> = (0..200)
        .map(|i| DeviceId::parse(format!("device-{i}")).unwrap())
        .collect();
    for device in &devices {
        js.publish(subjects::request(Lane::Rt, device), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // WorkQueue streams allow no overlapping consumer; read the stored subjects directly.
    let stream = js.get_stream(names::STREAM_REQ).await.unwrap();
    let mut seen = 0;
    for sequence in 1..=devices.len() as u64 {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let (lane, partition, device) = subjects::parse_request(&message.subject).unwrap();
        assert_eq!(lane, Lane::Rt);
        assert_eq!(partition, partitions.of(&device), "device {device}");
        seen += 1;
    }
    assert_eq!(seen, devices.len());
}
