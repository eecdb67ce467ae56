//! Migrations against a real PostgreSQL: they apply to an empty database, a second run applies
//! nothing, and the schema's triggers capture desired-state changes made with plain SQL.

use devsync_testkit::TestDb;
use serde_json::json;

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_are_idempotent() {
    let db = TestDb::create_empty(false).await;
    let applied = devsync_store::migrate(&db.url).await.unwrap();
    let known = devsync_store::known_migrations();
    assert_eq!(applied.len(), known.len());
    assert!(known.len() >= 3);

    let again = devsync_store::migrate(&db.url).await.unwrap();
    assert!(again.is_empty(), "second run applied {again:?}");

    let client = db.pool.get().await.unwrap();
    for table in [
        "devices",
        "desired_history",
        "desired_changes",
        "relay_cursors",
        "processed_requests",
        "outbox",
        "campaigns",
        "campaign_devices",
        "audit_events",
    ] {
        let row = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "table {table} exists");
    }
    let partitions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        partitions >= 7,
        "audit partitions created ahead: {partitions}"
    );

    // The outbox compresses with lz4 where the server has it (V15).
    let has_lz4 = client
        .batch_execute("CREATE TEMP TABLE lz4_probe (b bytea COMPRESSION lz4)")
        .await
        .is_ok();
    let compression: String = client
        .query_one(
            "SELECT attcompression::text FROM pg_attribute
             WHERE attrelid = 'outbox'::regclass AND attname = 'payload'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let expected = if has_lz4 { "l" } else { "" };
    assert_eq!(compression, expected, "outbox.payload compression");
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::create_empty(false).await;
    let (a, b) = tokio::join!(
        devsync_store::migrate(&db.url),
        devsync_store::migrate(&db.url)
    );
    let total = a.unwrap().len() + b.unwrap().len();
    assert_eq!(total, devsync_store::known_migrations().len());
}

#[tokio::test]
async fn plain_sql_changes_of_desired_state_are_versioned_and_captured() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO devices (id, desired) VALUES ('d1', $1), ('d2', '{}')",
            &[&json!({"fw": "1.0"})],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE devices SET desired = desired || '{\"fw\": \"1.1\"}' WHERE id = 'd1'",
            &[],
        )
        .await
        .unwrap();
    // A no-op update changes nothing.
    client
        .execute(
            "UPDATE devices SET labels = '{\"a\": \"b\"}' WHERE id = 'd1'",
            &[],
        )
        .await
        .unwrap();

    let row = client
        .query_one(
            "SELECT desired_version, desired FROM devices WHERE id = 'd1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, serde_json::Value>(1), json!({"fw": "1.1"}));

    let history = client
        .query(
            "SELECT version, desired, source FROM desired_history WHERE device_id = 'd1' ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        history[1].get::<_, serde_json::Value>(1),
        json!({"fw": "1.1"})
    );
    assert_eq!(history[1].get::<_, String>(2), "sql");

    let changes = client
        .query(
            "SELECT device_id, desired_version, bulk FROM desired_changes ORDER BY txid, id",
            &[],
        )
        .await
        .unwrap();
    let changes: Vec<(String, i64, bool)> = changes
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        changes,
        vec![("d1".into(), 1, false), ("d1".into(), 2, false)],
        "d2 had no desired state, the label edit changed nothing"
    );

    // One statement changing many devices goes to the bulk lane.
    client
        .execute(
            "INSERT INTO devices (id) SELECT 'bulk-' || g FROM generate_series(1, 150) g",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE devices SET desired = '{\"mode\": \"eco\"}' WHERE id LIKE 'bulk-%'",
            &[],
        )
        .await
        .unwrap();
    let bulk: i64 = client
        .query_one("SELECT count(*) FROM desired_changes WHERE bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bulk, 150);

    // Invalid input is refused by the schema with a clear error.
    let err = client
        .execute("INSERT INTO devices (id) VALUES ('bad.id')", &[])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("devices_id_check"), "{err:?}");
    let err = client
        .execute("UPDATE devices SET id = 'bad id' WHERE id = 'd1'", &[])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("devices_id_check"), "{err:?}");
    let err = client
        .execute("UPDATE devices SET desired = '[1]' WHERE id = 'd1'", &[])
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("devices_desired_check"),
        "{err:?}"
    );
}

#[tokio::test]
async fn deleting_a_device_or_campaign_removes_its_rows_and_versions_cannot_be_forged() {
    let db = TestDb::create().await;
    let client = db.pool.get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO devices (id, desired) VALUES ('d1', '{\"fw\": \"1\"}'), ('d2', '{\"fw\": \"1\"}');
             INSERT INTO campaigns (id, selector, patch) VALUES ('c1', '{}', '{}'), ('c2', '{}', '{}');
             INSERT INTO campaign_devices (campaign_id, device_id, wave, status) VALUES
                 ('c1', 'd1', 0, 'sent'), ('c1', 'd2', 0, 'sent'), ('c2', 'd1', 0, 'sent');",
        )
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    // Writing a version without changing the document changes nothing.
    client
        .execute(
            "UPDATE devices SET desired_version = 99 WHERE id = 'd1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        count("SELECT desired_version FROM devices WHERE id = 'd1'").await,
        1
    );

    // A statement may write the next version and its time with a change (as the campaign
    // driver does); a patch that changes nothing keeps version and time; a version that
    // skips ahead, or the next one without a new time, is corrected to the next one.
    let version_and_time = || {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT desired_version, desired_changed_at, \
                     (SELECT count(*) FROM desired_history WHERE device_id = 'd1') \
                     FROM devices WHERE id = 'd1'",
                    &[],
                )
                .await
                .unwrap();
            (
                row.get::<_, i64>(0),
                row.get::<_, chrono::DateTime<chrono::Utc>>(1),
                row.get::<_, i64>(2),
            )
        }
    };
    // What the campaign driver's statement does.
    const PATCH_FW_2: &str = "UPDATE devices SET desired = desired || '{\"fw\": \"2\"}',
        desired_version = desired_version + 1, desired_changed_at = now() WHERE id = 'd1'";
    let (_, first_time, first_history) = version_and_time().await;
    client.batch_execute(PATCH_FW_2).await.unwrap();
    let (version, second_time, history) = version_and_time().await;
    assert_eq!(version, 2);
    assert!(second_time > first_time);
    assert_eq!(history, first_history + 1, "the change is in the history");
    client.batch_execute(PATCH_FW_2).await.unwrap();
    assert_eq!(
        version_and_time().await,
        (2, second_time, history),
        "a patch that changes nothing changes neither version nor time"
    );
    client
        .batch_execute(
            "UPDATE devices SET desired = desired || '{\"fw\": \"3\"}', desired_version = 40,
                 desired_changed_at = now() WHERE id = 'd1'",
        )
        .await
        .unwrap();
    assert_eq!(version_and_time().await.0, 3, "a version cannot skip ahead");
    let (_, third_time, _) = version_and_time().await;
    client
        .batch_execute(
            "UPDATE devices SET desired = desired || '{\"fw\": \"4\"}',
                 desired_version = desired_version + 1 WHERE id = 'd1'",
        )
        .await
        .unwrap();
    let (version, fourth_time, _) = version_and_time().await;
    assert_eq!(version, 4);
    assert!(fourth_time > third_time, "a new version gets a new time");

    // A device with history cannot be renamed (it would orphan its rows).
    let error = client
        .execute("UPDATE devices SET id = 'd9' WHERE id = 'd2'", &[])
        .await
        .unwrap_err();
    let error = error.as_db_error().expect("a database error");
    assert!(error.message().contains("cannot be renamed"), "{error:?}");

    client
        .execute("DELETE FROM devices WHERE id = 'd1'", &[])
        .await
        .unwrap();
    assert_eq!(
        count("SELECT count(*) FROM campaign_devices WHERE device_id = 'd1'").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM desired_history WHERE device_id = 'd1'").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM desired_history WHERE device_id = 'd2'").await,
        1,
        "the other device keeps its history"
    );

    client
        .execute("DELETE FROM campaigns WHERE id = 'c1'", &[])
        .await
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM campaign_devices").await, 0);
}
