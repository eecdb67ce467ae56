//! The requestor's cached device registry against a real PostgreSQL: answers are cached
//! (positive and negative), expire after the TTL, concurrent misses agree, misses of many
//! devices read together each get their own device's answer, and registration changes the
//! database notifies are forgotten at once.

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

#[tokio::test]
async fn registration_changes_are_forgotten_as_the_database_notifies_them() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    client
        .batch_execute("INSERT INTO devices (id) VALUES ('note-1'), ('note-3'), ('warm-up')")
        .await
        .unwrap();
    // A TTL far longer than the test: only notifications can change an answer.
    let registry = Registry::new(db.pool.clone(), 1000, Duration::from_secs(3600));
    let shutdown = devsync_runtime::Shutdown::new();
    let listener = registry.listen(db.url.clone(), shutdown.clone());
    let id = |s: &str| DeviceId::parse(s).unwrap();
    let sees = |device: DeviceId, expected: Registration| {
        let registry = registry.clone();
        async move {
            wait_for(
                Duration::from_secs(10),
                "a change seen long before the TTL",
                || async { (registry.lookup(&device).await.unwrap() == expected).then_some(()) },
            )
            .await
        }
    };
    // Once a first change is seen the listener is listening (a new connection forgets
    // everything, which alone could explain the first one).
    let warm_up = id("warm-up");
    assert_eq!(
        registry.lookup(&warm_up).await.unwrap(),
        Registration::Enabled
    );
    sql(
        &client,
        "UPDATE devices SET enabled = false WHERE id = 'warm-up'",
    )
    .await;
    sees(warm_up, Registration::Disabled).await;

    let (one, two, three, bulk) = (id("note-1"), id("note-2"), id("note-3"), id("bulk-7"));
    let cached = [
        (&one, Registration::Enabled),
        (&two, Registration::Unknown),
        (&three, Registration::Enabled),
        (&bulk, Registration::Unknown),
    ];
    for (device, expected) in cached {
        assert_eq!(registry.lookup(device).await.unwrap(), expected, "{device}");
    }
    // One statement per kind of change: disable, register, delete, and a bulk registration
    // (over 100 devices: one notification that forgets everything).
    sql(
        &client,
        "UPDATE devices SET enabled = false WHERE id = 'note-1';
         INSERT INTO devices (id) VALUES ('note-2');
         DELETE FROM devices WHERE id = 'note-3';
         INSERT INTO devices (id) SELECT 'bulk-' || i FROM generate_series(1, 150) AS i;",
    )
    .await;
    sees(one.clone(), Registration::Disabled).await;
    sees(two.clone(), Registration::Enabled).await;
    sees(three, Registration::Unknown).await;
    sees(bulk, Registration::Enabled).await;

    // Enabling again is seen as well.
    sql(
        &client,
        "UPDATE devices SET enabled = true WHERE id = 'note-1'",
    )
    .await;
    sees(one, Registration::Enabled).await;
    shutdown.cancel();
    listener.await.unwrap();
}

async fn sql(client: &deadpool_postgres::Object, statements: &str) {
    client.batch_execute(statements).await.unwrap();
}
