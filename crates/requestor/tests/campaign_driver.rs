//! The campaign driver when two of them drive one campaign at once (a lease handover where the
//! old holder has not stopped yet): every device is still patched, recorded and handed to the
//! fan-out exactly once, though each driver skips the dispatched-check after its own cursor.

use std::time::Duration;

use devsync_requestor::campaigns::Driver;
use devsync_requestor::scheduler::SchedulerSettings;
use devsync_runtime::Shutdown;
use devsync_runtime::audit::Auditor;
use devsync_stack::Stack;
use devsync_store::campaigns::{self, AbortCriteria, NewCampaign, Selector};
use devsync_testkit::wait_for;
use devsync_types::{CampaignId, PushPolicy, ServiceName, WorkerId};
use serde_json::{Map, json};

#[tokio::test]
async fn two_drivers_racing_over_one_campaign_dispatch_each_device_once() {
    let stack = Stack::start().await;
    stack.declare().await;
    let devices = 6000_i64;
    stack
        .sql(&format!(
            "INSERT INTO devices (id, labels, last_seen)
             SELECT 'race-' || lpad(i::text, 5, '0'), '{{\"fleet\": \"race\"}}', now()
             FROM generate_series(0, {devices} - 1) AS i"
        ))
        .await;
    let mut labels = Map::new();
    labels.insert("fleet".into(), json!("race"));
    let campaign = NewCampaign {
        id: CampaignId::parse("race-1").unwrap(),
        selector: Selector::Labels(labels),
        patch: json!({"firmware": "2.0"}).as_object().unwrap().clone(),
        policy: PushPolicy::Push,
        rate_per_sec: None,
        max_in_flight: None,
        waves: vec![1000],
        abort: AbortCriteria::default(),
        wave_wait: Duration::ZERO,
    };
    campaigns::create(&stack.db.pool.get().await.unwrap(), &campaign)
        .await
        .unwrap();
    stack
        .sql("UPDATE campaigns SET state = 'running' WHERE id = 'race-1'")
        .await;

    // Small pages, so the two drivers interleave over many rounds.
    let settings = SchedulerSettings {
        campaign_tick: Duration::from_millis(10),
        campaign_page: 200,
        ..SchedulerSettings::default()
    };
    let shutdown = Shutdown::new();
    let published = devsync_runtime::outbox::Published::default();
    let drivers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|instance| {
            let auditor = Auditor::new(WorkerId::new(ServiceName::Requestor, instance).unwrap());
            let driver = Driver::new(
                stack.js.clone(),
                stack.db.pool.clone(),
                auditor,
                settings.clone(),
                "race-1".into(),
                published.clone(),
            );
            tokio::spawn(driver.run(shutdown.clone()))
        })
        .collect();
    wait_for(
        Duration::from_secs(60),
        "the campaign completed",
        || async {
            (stack
                .scalar(
                    "SELECT count(*) FROM campaigns WHERE id = 'race-1' AND state = 'completed'",
                )
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    shutdown.cancel();
    for driver in drivers {
        driver.await.unwrap();
    }

    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM campaign_devices WHERE campaign_id = 'race-1'")
            .await,
        devices,
        "one row per device"
    );
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM devices WHERE id LIKE 'race-%' AND desired_version = 1")
            .await,
        devices,
        "each device patched once"
    );
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM desired_history WHERE source = 'campaign:race-1'")
            .await,
        devices,
        "one history entry per device"
    );
    // Every device in exactly one batch handed to the fan-out.
    let mut handed = std::collections::HashMap::<String, usize>::new();
    for (_, payload) in stack.stored("DEVSYNC_FANOUT").await {
        let batch =
            <devsync_proto::v1::CampaignBatch as devsync_proto::Message>::decode(payload).unwrap();
        for id in batch.device_ids {
            *handed.entry(id).or_default() += 1;
        }
    }
    assert_eq!(handed.len() as i64, devices, "every device handed over");
    assert!(
        handed.values().all(|n| *n == 1),
        "no device handed over twice"
    );
    // Every batch's outbox row, once published, was listed for deletion: the drivers' later
    // transactions deleted all but the last ones, a flush (the sweeper's job) the rest.
    published.flush(&stack.db.pool).await.unwrap();
    assert_eq!(stack.scalar("SELECT count(*) FROM outbox").await, 0);
}
