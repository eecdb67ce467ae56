//! The requestor's cached device registry against a real PostgreSQL: answers are cached
//! (positive and negative), expire after the TTL, concurrent misses agree, and misses of many
//! devices read together each get their own device's answer.

use std::time::Duration;

use devsync_requestor::registry::{Registration, Registry};
use devsync_testkit::{TestDb, wait_for};
use devsync_types::DeviceId;

#[tokio::test]
async fn registrations_are_cached_until_the_ttl_and_then_reread() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    client
        .batch_execute("INSERT INTO devices (id) VALUES ('reg-1')")
        .await
        .unwrap();
    let registry = Registry::new(db.pool.clone(), 1000, Duration::from_millis(300));
    let known = DeviceId::parse("reg-1").unwrap();
    let stranger = DeviceId::parse("reg-2").unwrap();
    assert_eq!(
        registry.lookup(&known).await.unwrap(),
        Registration::Enabled
    );
    assert_eq!(
        registry.lookup(&stranger).await.unwrap(),
        Registration::Unknown
    );

    client
        .batch_execute(
            "UPDATE devices SET enabled = false WHERE id = 'reg-1';
             INSERT INTO devices (id) VALUES ('reg-2')",
        )
        .await
        .unwrap();
    // Cached answers hold until the TTL...
    assert_eq!(
        registry.lookup(&known).await.unwrap(),
        Registration::Enabled
    );
    assert_eq!(
        registry.lookup(&stranger).await.unwrap(),
        Registration::Unknown
    );
    // ...and are read again after it.
    wait_for(
        Duration::from_secs(5),
        "the change seen after the TTL",
        || async {
            let now = (
                registry.lookup(&known).await.unwrap(),
                registry.lookup(&stranger).await.unwrap(),
            );
            (now == (Registration::Disabled, Registration::Enabled)).then_some(())
        },
    )
    .await;

    // Many concurrent lookups of an uncached device agree.
    client
        .batch_execute("INSERT INTO devices (id) VALUES ('reg-3')")
        .await
        .unwrap();
    let third = DeviceId::parse("reg-3").unwrap();
    let answers = futures::future::join_all((0..50).map(|_| registry.lookup(&third))).await;
    assert!(
        answers
            .iter()
            .all(|a| *a.as_ref().unwrap() == Registration::Enabled)
    );
}

#[tokio::test]
async fn misses_of_many_devices_read_together_each_get_their_own_answer() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    // 600 enabled, 600 disabled, 600 never registered, all looked up at once.
    client
        .batch_execute(
            "INSERT INTO devices (id, enabled)
             SELECT 'many-' || i, i % 3 = 0 FROM generate_series(0, 1799) AS i WHERE i % 3 < 2",
        )
        .await
        .unwrap();
    let registry = Registry::new(db.pool.clone(), 10_000, Duration::from_secs(60));
    let devices: Vec<DeviceId> = (0..1800)
        .map(|i| DeviceId::parse(format!("many-{i}")).unwrap())
        .collect();
    let answers = futures::future::join_all(devices.iter().map(|d| registry.lookup(d))).await;
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = match i % 3 {
            0 => Registration::Enabled,
            1 => Registration::Disabled,
            _ => Registration::Unknown,
        };
        assert_eq!(answer.unwrap(), expected, "many-{i}");
    }
}
