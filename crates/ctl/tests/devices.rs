//! `devsyncctl devices` as an operator runs it, against a real PostgreSQL database (the
//! commands need no NATS).

mod common;

use common::{ctl, ctl_stdin, describe, ok, refused};

use devsync_testkit::TestDb;
use serde_json::{Value, json};

/// Every device row, its desired history and its captured changes, as one JSON value.
async fn snapshot(db: &TestDb) -> Value {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT jsonb_build_object(
                'devices', (SELECT coalesce(jsonb_agg(to_jsonb(d) ORDER BY id), '[]') FROM devices d),
                'history', (SELECT coalesce(jsonb_agg(to_jsonb(h) ORDER BY device_id, version), '[]')
                            FROM desired_history h),
                'changes', (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY id), '[]')
                            FROM desired_changes c))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The device row as JSON.
async fn row(db: &TestDb, id: &str) -> Value {
    db.pool
        .get()
        .await
        .unwrap()
        .query_opt("SELECT to_jsonb(d) FROM devices d WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or(Value::Null)
}

/// (version, desired, source) of every desired_history row of `id`.
async fn history(db: &TestDb, id: &str) -> Vec<(i64, Value, String)> {
    db.pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT version, desired, source FROM desired_history WHERE device_id = $1 ORDER BY version",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn register_list_and_show_with_the_delta() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desired.json");
    std::fs::write(
        &file,
        r#"{"fw": "1.1", "net": {"ssid": "plant", "wifi": true}}"#,
    )
    .unwrap();

    let out = ok(ctl(
        &db,
        &[
            "devices",
            "register",
            "d1",
            "--label",
            "env=prod",
            "--label",
            "site=lyon",
            "--endpoint",
            "https://d1.example/hook",
            "--desired",
            &format!("@{}", file.display()),
        ],
    ));
    assert_eq!(
        out.trim(),
        "registered device d1 (enabled, desired version 1)"
    );
    let out = ok(ctl(
        &db,
        &[
            "devices",
            "register",
            "d2",
            "--disabled",
            "--label",
            "env=prod",
        ],
    ));
    assert_eq!(
        out.trim(),
        "registered device d2 (disabled, desired version 0)"
    );
    ok(ctl(
        &db,
        &["devices", "register", "d0", "--label", "env=dev"],
    ));

    let d1 = row(&db, "d1").await;
    assert_eq!(d1["labels"], json!({"env": "prod", "site": "lyon"}));
    assert_eq!(d1["http_endpoint"], "https://d1.example/hook");
    assert_eq!(
        d1["desired"],
        json!({"fw": "1.1", "net": {"ssid": "plant", "wifi": true}})
    );
    assert_eq!(d1["desired_version"], 1);
    assert_eq!(d1["enabled"], true);
    assert_eq!(row(&db, "d2").await["enabled"], false);
    assert_eq!(
        history(&db, "d1").await,
        vec![(
            1,
            json!({"fw": "1.1", "net": {"ssid": "plant", "wifi": true}}),
            "devsyncctl".into()
        )]
    );

    // The device reports an older firmware, same network.
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE devices SET reported = $1, reported_version = 4, last_seen = now()
             WHERE id = 'd1'",
            &[&json!({"fw": "1.0", "net": {"ssid": "plant", "wifi": true}, "temp": 21})],
        )
        .await
        .unwrap();

    // Table: every device, ordered by id.
    let table = ok(ctl(&db, &["devices", "list"]));
    let at = |id: &str| {
        table
            .find(&format!(" {id} "))
            .unwrap_or_else(|| panic!("{id} missing from:\n{table}"))
    };
    assert!(at("d0") < at("d1") && at("d1") < at("d2"), "{table}");
    for text in ["in sync", "env=prod, site=lyon", "never"] {
        assert!(table.contains(text), "{text} missing from:\n{table}");
    }
    assert!(!table.contains("(more"), "{table}");

    // Labels filter (containment), JSON lines.
    let lines = json_lines(&ok(ctl(
        &db,
        &["devices", "list", "--label", "env=prod", "--json"],
    )));
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["d1", "d2"]);
    assert_eq!(lines[0]["in_sync"], false);
    assert_eq!(lines[0]["desired_version"], 1);
    assert_eq!(lines[0]["reported_version"], 4);
    assert_eq!(lines[0]["applied_desired_version"], 0);
    assert!(lines[0]["last_seen"].is_string());
    assert_eq!(lines[1]["in_sync"], true);
    assert_eq!(lines[1]["enabled"], false);
    assert!(lines[1]["last_seen"].is_null());
    let lines = json_lines(&ok(ctl(
        &db,
        &[
            "devices",
            "list",
            "--label",
            "env=prod",
            "--label",
            "site=lyon",
            "--json",
        ],
    )));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], "d1");
    let none = ok(ctl(&db, &["devices", "list", "--label", "env=staging"]));
    assert_eq!(none.trim(), "no devices");

    // Limit.
    let lines = json_lines(&ok(ctl(
        &db,
        &["devices", "list", "--limit", "2", "--json"],
    )));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["id"], "d1");
    let table = ok(ctl(&db, &["devices", "list", "--limit", "2"]));
    assert!(
        table.contains("(more: raise --limit") && !table.contains(" d2 "),
        "{table}"
    );

    // Show: the delta is desired minus reported.
    let shown = ok(ctl(&db, &["devices", "show", "d1"]));
    for text in [
        "https://d1.example/hook",
        "env=prod, site=lyon",
        "delta (desired - reported):\n{\n  \"fw\": \"1.1\"\n}",
        "\"temp\": 21",
    ] {
        assert!(shown.contains(text), "{text:?} missing from:\n{shown}");
    }
    let shown: Value = serde_json::from_str(&ok(ctl(&db, &["devices", "show", "d1", "--json"])))
        .expect("one JSON object");
    assert_eq!(shown["delta"], json!({"fw": "1.1"}));
    assert_eq!(shown["in_sync"], false);
    assert_eq!(shown["desired_version"], 1);
    assert_eq!(shown["reported_version"], 4);
    assert_eq!(shown["applied_desired_version"], 0);
    assert_eq!(shown["http_endpoint"], "https://d1.example/hook");
    assert_eq!(shown["labels"], json!({"env": "prod", "site": "lyon"}));
    assert_eq!(shown["enabled"], true);
    assert!(shown["last_seen"].is_string());
    assert_eq!(
        shown["reported"],
        json!({"fw": "1.0", "net": {"ssid": "plant", "wifi": true}, "temp": 21})
    );

    let in_sync = ok(ctl(&db, &["devices", "show", "d2"]));
    assert!(
        in_sync.contains("delta (desired - reported): none, in sync"),
        "{in_sync}"
    );
}

#[tokio::test]
async fn labels_are_merged_and_removed() {
    let db = TestDb::create().await;
    ok(ctl(
        &db,
        &[
            "devices",
            "register",
            "d1",
            "--label",
            "env=prod",
            "--label",
            "site=lyon",
        ],
    ));
    let before = row(&db, "d1").await;

    let out = ok(ctl(
        &db,
        &["devices", "label", "d1", "env=staging", "tier=gold"],
    ));
    assert_eq!(
        out.trim(),
        "device d1 labels: env=staging, site=lyon, tier=gold"
    );
    assert_eq!(
        row(&db, "d1").await["labels"],
        json!({"env": "staging", "site": "lyon", "tier": "gold"})
    );

    let out = ok(ctl(
        &db,
        &[
            "devices", "label", "d1", "--remove", "site", "--remove", "absent", "zone=eu",
        ],
    ));
    assert_eq!(
        out.trim(),
        "device d1 labels: env=staging, tier=gold, zone=eu"
    );
    ok(ctl(
        &db,
        &[
            "devices", "label", "d1", "--remove", "tier", "--remove", "zone",
        ],
    ));
    let after = row(&db, "d1").await;
    assert_eq!(after["labels"], json!({"env": "staging"}));
    // Labels are not desired state: no version, no history.
    assert_eq!(after["desired_version"], before["desired_version"]);
    assert!(history(&db, "d1").await.is_empty());
}

#[tokio::test]
async fn disable_and_enable() {
    let db = TestDb::create().await;
    ok(ctl(&db, &["devices", "register", "d1"]));
    assert_eq!(
        ok(ctl(&db, &["devices", "disable", "d1"])).trim(),
        "device d1 disabled"
    );
    assert_eq!(row(&db, "d1").await["enabled"], false);
    assert_eq!(
        ok(ctl(&db, &["devices", "disable", "d1"])).trim(),
        "device d1 was already disabled"
    );
    assert_eq!(row(&db, "d1").await["enabled"], false);
    assert_eq!(
        ok(ctl(&db, &["devices", "enable", "d1"])).trim(),
        "device d1 enabled"
    );
    assert_eq!(row(&db, "d1").await["enabled"], true);
    assert_eq!(
        ok(ctl(&db, &["devices", "enable", "d1"])).trim(),
        "device d1 was already enabled"
    );
}

#[tokio::test]
async fn set_desired_replaces_and_merges_with_the_source_recorded() {
    let db = TestDb::create().await;
    ok(ctl(&db, &["devices", "register", "d1"]));
    assert_eq!(row(&db, "d1").await["desired_version"], 0);

    let out = ok(ctl(
        &db,
        &[
            "devices",
            "set-desired",
            "d1",
            r#"{"fw": "1.0", "net": {"ssid": "a", "wifi": true}}"#,
        ],
    ));
    assert_eq!(out.trim(), "device d1: desired version 1 (was 0)");

    let out = ok(ctl(
        &db,
        &[
            "devices",
            "set-desired",
            "d1",
            "--merge",
            r#"{"fw": "1.1", "net": {"ssid": "b"}, "mode": "eco"}"#,
        ],
    ));
    assert_eq!(out.trim(), "device d1: desired version 2 (was 1)");
    let d1 = row(&db, "d1").await;
    assert_eq!(
        d1["desired"],
        json!({"fw": "1.1", "net": {"ssid": "b", "wifi": true}, "mode": "eco"})
    );
    assert_eq!(d1["desired_version"], 2);

    // A merge patch from a file: null removes a field.
    let dir = tempfile::tempdir().unwrap();
    let patch = dir.path().join("patch.json");
    std::fs::write(&patch, r#"{"mode": null, "net": {"wifi": null}}"#).unwrap();
    let out = ok(ctl(
        &db,
        &[
            "devices",
            "set-desired",
            "d1",
            "--merge",
            &format!("@{}", patch.display()),
        ],
    ));
    assert_eq!(out.trim(), "device d1: desired version 3 (was 2)");
    assert_eq!(
        row(&db, "d1").await["desired"],
        json!({"fw": "1.1", "net": {"ssid": "b"}})
    );

    // Replacing from standard input drops what the new document does not name.
    let out = ok(ctl_stdin(
        &db,
        &["devices", "set-desired", "d1", "@-"],
        r#"{"fw": "2.0"}"#,
    ));
    assert_eq!(out.trim(), "device d1: desired version 4 (was 3)");
    assert_eq!(row(&db, "d1").await["desired"], json!({"fw": "2.0"}));

    // The same document again is no change: no new version, no history.
    let out = ok(ctl(
        &db,
        &["devices", "set-desired", "d1", r#"{"fw": "2.0"}"#],
    ));
    assert_eq!(out.trim(), "device d1: desired state unchanged (version 4)");
    let out = ok(ctl(
        &db,
        &[
            "devices",
            "set-desired",
            "d1",
            "--merge",
            r#"{"fw": "2.0"}"#,
        ],
    ));
    assert_eq!(out.trim(), "device d1: desired state unchanged (version 4)");
    assert_eq!(row(&db, "d1").await["desired_version"], 4);

    assert_eq!(
        history(&db, "d1").await,
        vec![
            (
                1,
                json!({"fw": "1.0", "net": {"ssid": "a", "wifi": true}}),
                "devsyncctl".into()
            ),
            (
                2,
                json!({"fw": "1.1", "net": {"ssid": "b", "wifi": true}, "mode": "eco"}),
                "devsyncctl".into()
            ),
            (
                3,
                json!({"fw": "1.1", "net": {"ssid": "b"}}),
                "devsyncctl".into()
            ),
            (4, json!({"fw": "2.0"}), "devsyncctl".into()),
        ]
    );
    // Captured for the requestor's relay, with the same source.
    let changes: Vec<(i64, String)> = db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT desired_version, source FROM desired_changes WHERE device_id = 'd1'
             ORDER BY txid, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        changes,
        (1..=4)
            .map(|v| (v, "devsyncctl".to_owned()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let db = TestDb::create().await;
    ok(ctl(
        &db,
        &[
            "devices",
            "register",
            "d1",
            "--label",
            "env=prod",
            "--desired",
            r#"{"fw": "1.0"}"#,
        ],
    ));
    let before = snapshot(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("@{}", dir.path().join("missing.json").display());
    let directory = format!("@{}", dir.path().display());
    let long_id = "x".repeat(129);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Ids.
        (vec!["register", "d1"], "device d1 already exists"),
        (
            vec!["register", "bad.id"],
            "device id \"bad.id\" contains '.'",
        ),
        (vec!["register", ""], "device id is empty"),
        (vec!["register", &long_id], "at most 128 are allowed"),
        (
            vec!["show", "no/such"],
            "device id \"no/such\" contains '/'",
        ),
        (
            vec!["label", "x y", "a=1"],
            "device id \"x y\" contains ' '",
        ),
        // Unknown devices.
        (vec!["show", "nope"], "device nope does not exist"),
        (vec!["label", "nope", "a=1"], "device nope does not exist"),
        (vec!["disable", "nope"], "device nope does not exist"),
        (vec!["enable", "nope"], "device nope does not exist"),
        (
            vec!["set-desired", "nope", "{}"],
            "device nope does not exist",
        ),
        (
            vec!["set-desired", "nope", "--merge", r#"{"a": 1}"#],
            "device nope does not exist",
        ),
        // Documents.
        (
            vec!["set-desired", "d1", "[1, 2]"],
            "desired state: a state document must be a JSON object, got an array",
        ),
        (
            vec!["set-desired", "d1", "null"],
            "a state document must be a JSON object, got null",
        ),
        (
            vec!["set-desired", "d1", "--merge", "\"fw\""],
            "merge patch: a state document must be a JSON object, got a string",
        ),
        (
            vec!["set-desired", "d1", "{\"fw\": "],
            "desired state: invalid JSON",
        ),
        (
            vec!["set-desired", "d1", &missing],
            "read desired state from",
        ),
        (
            vec!["set-desired", "d1", "--merge", &directory],
            "read merge patch from",
        ),
        (
            vec!["register", "d9", "--desired", "[1]"],
            "desired state: a state document must be a JSON object",
        ),
        (
            vec!["register", "d9", "--desired", &missing],
            "read desired state from",
        ),
        // Labels.
        (
            vec!["register", "d9", "--label", "novalue"],
            "label \"novalue\" is not KEY=VALUE",
        ),
        (
            vec!["register", "d9", "--label", "=v"],
            "label key is empty",
        ),
        (
            vec!["register", "d9", "--label", "a=1", "--label", "a=2"],
            "label \"a\" is given twice with different values",
        ),
        (
            vec!["list", "--label", "env"],
            "label \"env\" is not KEY=VALUE",
        ),
        (
            vec!["label", "d1", "novalue"],
            "label \"novalue\" is not KEY=VALUE",
        ),
        (vec!["label", "d1", "a b=c"], "contains ' '"),
        (
            vec!["label", "d1", "a=1", "--remove", "a"],
            "label \"a\" is both set and removed",
        ),
        (vec!["label", "d1", "--remove", ""], "label key is empty"),
        // Endpoints.
        (
            vec!["register", "d9", "--endpoint", "ftp://h/hook"],
            "endpoint \"ftp://h/hook\" is not an http:// or https:// URL",
        ),
        (
            vec!["register", "d9", "--endpoint", "h.example/hook"],
            "is not an http:// or https:// URL",
        ),
        (
            vec!["register", "d9", "--endpoint", "https://"],
            "has no host",
        ),
        (
            vec!["register", "d9", "--endpoint", "http://h:port/"],
            "has an invalid port",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["devices"];
        full.extend(&args);
        refused(ctl(&db, &full), needle);
        assert_eq!(snapshot(&db).await, before, "{args:?} changed the database");
    }
    assert_eq!(row(&db, "d9").await, Value::Null);
}

#[tokio::test]
async fn usage_errors_exit_2_like_clap() {
    let db = TestDb::create().await;
    ok(ctl(&db, &["devices", "register", "d1"]));
    let before = snapshot(&db).await;
    for args in [
        vec!["devices"],
        vec!["devices", "frobnicate"],
        vec!["devices", "register"],
        vec!["devices", "list", "--limit", "0"],
        vec!["devices", "list", "--limit", "many"],
        vec!["devices", "label", "d1"],
        vec!["devices", "set-desired", "d1"],
        vec!["devices", "disable", "d1", "--now"],
    ] {
        let output = ctl(&db, &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            describe(&output)
        );
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            err.contains("--help") && output.stdout.is_empty(),
            "{args:?}: {}",
            describe(&output)
        );
    }
    assert_eq!(snapshot(&db).await, before);
}
