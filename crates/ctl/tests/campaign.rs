//! `devsyncctl campaign` as an operator runs it, against a real PostgreSQL database (the
//! commands need no NATS; nothing drives the campaigns here, so their progress is written with
//! SQL the way the requestor's driver and the fan-out would).

mod common;

use common::{command, ctl, ctl_stdin, describe, ok, refused};

use std::process::{Output, Stdio};
use std::time::Duration;

use devsync_testkit::TestDb;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `devsyncctl campaign create ID ARGS...`.
fn create(db: &TestDb, id: &str, args: &[&str]) -> Output {
    let mut full = vec!["campaign", "create", id];
    full.extend(args);
    ctl(db, &full)
}

async fn sql(db: &TestDb, statement: &str) {
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(statement)
        .await
        .unwrap_or_else(|e| panic!("{e}: {statement}"));
}

/// Registers enabled devices `(id, labels)`.
async fn register(db: &TestDb, devices: &[(&str, Value)]) {
    let client = db.pool.get().await.unwrap();
    for (id, labels) in devices {
        client
            .execute(
                "INSERT INTO devices (id, labels) VALUES ($1, $2)",
                &[id, labels],
            )
            .await
            .unwrap();
    }
}

/// Adds `count` devices `<prefix>-<n>` to campaign `campaign` with `status`.
async fn campaign_devices(db: &TestDb, campaign: &str, prefix: &str, count: i32, status: &str) {
    let client = db.pool.get().await.unwrap();
    client
        .execute(
            "WITH d AS (
                 INSERT INTO devices (id) SELECT $2 || '-' || n FROM generate_series(1, $3) n
                 RETURNING id)
             INSERT INTO campaign_devices (campaign_id, device_id, wave, status)
             SELECT $1, id, 0, $4 FROM d",
            &[&campaign, &prefix, &count, &status],
        )
        .await
        .unwrap();
}

/// The campaign row as JSON (`null` when there is none).
async fn row(db: &TestDb, id: &str) -> Value {
    db.pool
        .get()
        .await
        .unwrap()
        .query_opt("SELECT to_jsonb(c) FROM campaigns c WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or(Value::Null)
}

/// Whether the stored abort criteria equal `expected` (as jsonb: 600 equals 600.0).
async fn abort_criteria_are(db: &TestDb, id: &str, expected: Value) -> bool {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT abort_criteria = $2 FROM campaigns WHERE id = $1",
            &[&id, &expected],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every campaign row, as one JSON value.
async fn snapshot(db: &TestDb) -> Value {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT jsonb_build_object(
                'campaigns', (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY id), '[]') FROM campaigns c),
                'devices', (SELECT count(*) FROM campaign_devices))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The cells of each table row (lines with cell separators), header included.
fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|line| line.starts_with('│'))
        .map(|line| {
            line.trim_matches('│')
                .split(['│', '┆'])
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The value next to `name` in a `status` table.
fn field(out: &str, name: &str) -> String {
    table_rows(out)
        .into_iter()
        .find(|cells| cells.first().map(String::as_str) == Some(name))
        .and_then(|cells| cells.get(1).cloned())
        .unwrap_or_else(|| panic!("no {name:?} in:\n{out}"))
}

const ALL_OPTIONS: [&str; 16] = [
    "--patch",
    r#"{"fw": "2.0", "old": null}"#,
    "--policy",
    "push-active",
    "--rate",
    "100/s",
    "--max-in-flight",
    "50",
    "--waves",
    "canary,10%,50%,100%",
    "--abort-if",
    "failure-ratio>0.05 or not-converged-after 10m",
    "--wave-wait",
    "30s",
    "--selector",
    "labels:env=prod,site=lyon",
];

#[tokio::test]
async fn create_with_each_selector_form() {
    let db = TestDb::create().await;
    register(
        &db,
        &[
            ("d1", json!({"env": "prod", "site": "lyon", "group": "g1"})),
            ("d2", json!({"env": "prod", "group": "g1"})),
            ("d3", json!({"env": "dev"})),
            ("d4", json!({"env": "prod", "site": "lyon"})),
        ],
    )
    .await;
    sql(&db, "UPDATE devices SET enabled = false WHERE id = 'd4'").await;

    // Labels, with every option.
    let out = ok(create(&db, "c-labels", &ALL_OPTIONS));
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap(),
        "created campaign c-labels (pending): devices labelled env=prod, site=lyon; \
         1 enabled device matches now"
    );
    assert_eq!(
        lines.next().unwrap(),
        "policy push-active, waves canary,10%,50%,100%, rate 100/s, max in flight 50, \
         wave wait 30s, abort if failure-ratio>0.05 or not-converged-after 10m"
    );
    let stored = row(&db, "c-labels").await;
    assert_eq!(
        stored["selector"],
        json!({"labels": {"env": "prod", "site": "lyon"}})
    );
    assert_eq!(stored["patch"], json!({"fw": "2.0", "old": null}));
    assert_eq!(stored["policy"], "push-active");
    assert_eq!(stored["rate_per_sec"], 100);
    assert_eq!(stored["max_in_flight"], 50);
    assert_eq!(stored["waves"], json!([1, 100, 500, 1000]));
    assert!(
        abort_criteria_are(
            &db,
            "c-labels",
            json!({"failure_ratio": 0.05, "not_converged_after_secs": 600})
        )
        .await,
        "{}",
        stored["abort_criteria"]
    );
    assert_eq!(stored["wave_wait_secs"], 30);
    assert_eq!(stored["state"], "pending");
    assert_eq!(stored["current_wave"], 0);
    assert_eq!(stored["expanded"], false);

    // A group, with the defaults: push, unlimited, one wave, no abort criteria, 5 minutes.
    let out = ok(create(
        &db,
        "c-group",
        &["--selector", "group:g1", "--patch", r#"{"fw": "2.1"}"#],
    ));
    assert!(
        out.starts_with(
            "created campaign c-group (pending): devices of group g1; 2 enabled devices match now\n\
             policy push, waves 100%, rate unlimited, max in flight unlimited, wave wait 5m, \
             abort if never"
        ),
        "{out}"
    );
    let stored = row(&db, "c-group").await;
    assert_eq!(stored["selector"], json!({"group": "g1"}));
    assert_eq!(stored["patch"], json!({"fw": "2.1"}));
    assert_eq!(stored["policy"], "push");
    assert_eq!(stored["rate_per_sec"], Value::Null);
    assert_eq!(stored["max_in_flight"], Value::Null);
    assert_eq!(stored["waves"], json!([1000]));
    assert_eq!(stored["abort_criteria"], json!({}));
    assert_eq!(stored["wave_wait_secs"], 300);

    // Ids inline (an unknown id is kept: it may be registered before the campaign starts; a
    // duplicate is dropped); plain rate; pull-only.
    let out = ok(create(
        &db,
        "c-ids",
        &[
            "--selector",
            "ids:d1,d3,ghost,d1",
            "--patch",
            r#"{"mode": "eco"}"#,
            "--rate",
            "250",
            "--policy",
            "pull-only",
        ],
    ));
    assert!(
        out.starts_with(
            "created campaign c-ids (pending): 3 devices by id (d1, d3, ghost); \
             2 enabled devices match now"
        ),
        "{out}"
    );
    let stored = row(&db, "c-ids").await;
    assert_eq!(stored["selector"], json!({"ids": ["d1", "d3", "ghost"]}));
    assert_eq!(stored["rate_per_sec"], 250);
    assert_eq!(stored["policy"], "pull-only");

    // Ids from a file (comments, blank lines, CRLF), the patch from a file, abort criteria
    // given twice with the other spellings.
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "# the canaries\r\nd2\r\n\r\n  d3  \r\nd4\r\n").unwrap();
    let patch = dir.path().join("patch.json");
    std::fs::write(&patch, r#"{"net": {"ssid": "plant"}}"#).unwrap();
    let out = ok(create(
        &db,
        "c-file",
        &[
            "--selector",
            &format!("ids:@{}", ids.display()),
            "--patch",
            &format!("@{}", patch.display()),
            "--abort-if",
            "failure-ratio > 5%",
            "--abort-if",
            "not-converged-after=10m",
            "--waves",
            "canary, 0.5%, 100%",
        ],
    ));
    assert!(
        out.starts_with(
            "created campaign c-file (pending): 3 devices by id (d2, d3, d4); \
             2 enabled devices match now"
        ),
        "{out}"
    );
    let stored = row(&db, "c-file").await;
    assert_eq!(stored["selector"], json!({"ids": ["d2", "d3", "d4"]}));
    assert_eq!(stored["patch"], json!({"net": {"ssid": "plant"}}));
    assert_eq!(stored["waves"], json!([1, 5, 1000]));
    assert!(
        abort_criteria_are(
            &db,
            "c-file",
            json!({"failure_ratio": 0.05, "not_converged_after_secs": 600})
        )
        .await
    );
    assert!(out.contains("abort if failure-ratio>0.05 or not-converged-after 10m"));

    // Ids from standard input, `not-converged-after >DURATION`.
    let out = ok(ctl_stdin(
        &db,
        &[
            "campaign",
            "create",
            "c-stdin",
            "--selector",
            "ids:@-",
            "--patch",
            r#"{"fw": "3"}"#,
            "--abort-if",
            "not-converged-after >90s",
        ],
        "d1\nd2\n",
    ));
    assert!(
        out.starts_with(
            "created campaign c-stdin (pending): 2 devices by id (d1, d2); \
             2 enabled devices match now"
        ),
        "{out}"
    );
    assert_eq!(
        row(&db, "c-stdin").await["selector"],
        json!({"ids": ["d1", "d2"]})
    );
    assert!(abort_criteria_are(&db, "c-stdin", json!({"not_converged_after_secs": 90})).await);

    // Every enabled device.
    let out = ok(create(
        &db,
        "c-all",
        &["--selector", "all", "--patch", r#"{"fw": "4"}"#],
    ));
    assert!(
        out.starts_with(
            "created campaign c-all (pending): all devices; 3 enabled devices match now"
        ),
        "{out}"
    );
    assert_eq!(row(&db, "c-all").await["selector"], json!({"labels": {}}));
}

#[tokio::test]
async fn status_and_list_show_the_counts() {
    let db = TestDb::create().await;
    assert_eq!(ok(ctl(&db, &["campaign", "list"])).trim(), "no campaigns");
    assert!(ok(ctl(&db, &["campaign", "list", "--json"])).is_empty());

    ok(create(&db, "c1", &ALL_OPTIONS));
    ok(create(
        &db,
        "c2",
        &[
            "--selector",
            "group:g1",
            "--patch",
            r#"{"fw": "2.1"}"#,
            "--policy",
            "pull-only",
        ],
    ));
    // c1 is older, running in its second wave, its targets counted, with devices in every status.
    sql(
        &db,
        "UPDATE campaigns SET state = 'running', current_wave = 1, expanded = true, targeted = 12,
             started_at = now() - interval '10 minutes', created_at = now() - interval '1 hour'
         WHERE id = 'c1'",
    )
    .await;
    for (prefix, count, status) in [
        ("p", 3, "pending"),
        ("s", 2, "sent"),
        ("a", 1, "acked"),
        ("c", 4, "converged"),
        ("f", 1, "failed"),
        ("k", 1, "skipped"),
    ] {
        campaign_devices(&db, "c1", prefix, count, status).await;
    }

    let out = ok(ctl(&db, &["campaign", "status", "c1"]));
    for (name, value) in [
        ("state", "running"),
        ("policy", "push-active"),
        ("targets", "devices labelled env=prod, site=lyon"),
        ("waves", "canary,10%,50%,100%"),
        ("wave", "2 of 4 (10%)"),
        ("rate", "100/s"),
        ("max in flight", "50"),
        ("abort if", "failure-ratio>0.05 or not-converged-after 10m"),
        ("targeted", "12 (selector counted)"),
        ("dispatched", "9 of 12 (75.0%)"),
        ("pending", "3"),
        ("sent", "2"),
        ("acked", "1"),
        ("converged", "4"),
        ("failed", "1"),
        ("skipped", "1"),
        ("finished (UTC)", "-"),
    ] {
        assert_eq!(field(&out, name), value, "{name} in:\n{out}");
    }
    assert_ne!(field(&out, "started (UTC)"), "not yet", "{out}");

    let status: Value =
        serde_json::from_str(&ok(ctl(&db, &["campaign", "status", "c1", "--json"])))
            .expect("one JSON object");
    assert_eq!(status["id"], "c1");
    assert_eq!(status["state"], "running");
    assert_eq!(status["policy"], "push-active");
    assert_eq!(status["wave"], 1);
    assert_eq!(status["waves"], json!([1, 100, 500, 1000]));
    assert_eq!(status["expanded"], true);
    for (name, count) in [
        ("targeted", 12),
        ("pending", 3),
        ("sent", 2),
        ("acked", 1),
        ("converged", 4),
        ("failed", 1),
        ("skipped", 1),
        ("dispatched", 9),
    ] {
        assert_eq!(status[name], count, "{name}: {status}");
    }
    assert_eq!(status["finished"], false);
    assert!(status["started_at"].is_string() && status["finished_at"].is_null());
    assert_eq!(
        status["selector"],
        json!({"labels": {"env": "prod", "site": "lyon"}})
    );

    // c2 was never started.
    let out = ok(ctl(&db, &["campaign", "status", "c2"]));
    assert_eq!(field(&out, "state"), "pending");
    assert_eq!(field(&out, "wave"), "1 of 1 (100%)");
    assert_eq!(
        field(&out, "targeted"),
        "0 so far (selector not counted yet)"
    );
    assert_eq!(field(&out, "dispatched"), "0 of 0");
    assert_eq!(field(&out, "started (UTC)"), "not yet");
    assert_eq!(field(&out, "abort if"), "never");
    assert_eq!(field(&out, "rate"), "unlimited");

    // The list: newest first.
    let out = ok(ctl(&db, &["campaign", "list"]));
    let rows = table_rows(&out);
    assert_eq!(
        rows[0],
        [
            "id",
            "state",
            "policy",
            "wave",
            "targeted",
            "dispatched",
            "converged",
            "failed",
            "created (UTC)"
        ],
        "{out}"
    );
    assert_eq!(rows.len(), 3, "{out}");
    assert_eq!(
        rows[1][..8],
        ["c2", "pending", "pull-only", "1/1", "0+", "0", "0", "0"],
        "{out}"
    );
    assert_eq!(
        rows[2][..8],
        ["c1", "running", "push-active", "2/4", "12", "9", "4", "1"],
        "{out}"
    );
    assert!(!out.contains("(more"), "{out}");

    let lines = json_lines(&ok(ctl(&db, &["campaign", "list", "--json"])));
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c2", "c1"]);
    assert_eq!(lines[1]["dispatched"], 9);
    assert_eq!(lines[1]["converged"], 4);
    assert_eq!(lines[1]["failed"], 1);
    assert_eq!(lines[1]["pending"], 3);
    assert_eq!(lines[0]["dispatched"], 0);
    assert_eq!(lines[0]["state"], "pending");

    let out = ok(ctl(&db, &["campaign", "list", "--limit", "1"]));
    assert!(
        out.contains(" c2 ") && !out.contains(" c1 ") && out.contains("(more: raise --limit)"),
        "{out}"
    );
    assert_eq!(
        json_lines(&ok(ctl(
            &db,
            &["campaign", "list", "--limit", "1", "--json"]
        )))
        .len(),
        1
    );

    // A stopped campaign shows why.
    sql(
        &db,
        "UPDATE campaigns SET state = 'aborted', state_reason = 'failure ratio 0.5 above 0.05',
             finished_at = now() WHERE id = 'c1'",
    )
    .await;
    let out = ok(ctl(&db, &["campaign", "status", "c1"]));
    assert_eq!(
        field(&out, "state"),
        "aborted (failure ratio 0.5 above 0.05)"
    );
    assert_ne!(field(&out, "finished (UTC)"), "-");
}

/// Runs `args` until it exits (at most 30 s: a watch that never ends fails the test).
async fn run_to_end(db: &TestDb, args: &[&str]) -> Output {
    let child = tokio::process::Command::from(command(db, args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run devsyncctl");
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not end"))
        .expect("wait for devsyncctl")
}

#[tokio::test]
async fn watch_a_finished_campaign_prints_the_counts_and_exits() {
    let db = TestDb::create().await;
    ok(create(
        &db,
        "c1",
        &["--selector", "all", "--patch", r#"{"fw": "2"}"#],
    ));
    sql(
        &db,
        "UPDATE campaigns SET state = 'completed', state_reason = 'every wave dispatched',
             expanded = true, targeted = 6, started_at = now(), finished_at = now()
         WHERE id = 'c1'",
    )
    .await;
    campaign_devices(&db, "c1", "c", 4, "converged").await;
    campaign_devices(&db, "c1", "f", 1, "failed").await;
    campaign_devices(&db, "c1", "k", 1, "skipped").await;

    // Not a terminal: one plain line per refresh, then the final status.
    let out = ok(run_to_end(&db, &["campaign", "status", "c1", "--watch"]).await);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.ends_with(
            "campaign c1: completed (every wave dispatched), wave 1/1: targeted 6, dispatched 6, \
             pending 0, sent 0, acked 0, converged 4, failed 1, skipped 1"
        ),
        "{out}"
    );
    assert_eq!(field(&out, "state"), "completed (every wave dispatched)");
    assert_eq!(field(&out, "dispatched"), "6 of 6 (100.0%)");
    assert_eq!(field(&out, "converged"), "4");
    assert_eq!(field(&out, "failed"), "1");
    assert_eq!(field(&out, "skipped"), "1");

    // JSON: one object per refresh, the last one finished.
    let out = ok(run_to_end(&db, &["campaign", "status", "c1", "--watch", "--json"]).await);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["finished"], true);
    assert_eq!(lines[0]["converged"], 4);
    assert_eq!(lines[0]["dispatched"], 6);

    // Expired counts as finished too.
    sql(
        &db,
        "UPDATE campaigns SET state = 'expired' WHERE id = 'c1'",
    )
    .await;
    let out = ok(run_to_end(&db, &["campaign", "status", "c1", "--watch"]).await);
    assert!(field(&out, "state").starts_with("expired"), "{out}");

    // An unknown campaign ends the watch with an error.
    let output = run_to_end(&db, &["campaign", "status", "nope", "--watch"]).await;
    refused(output, "campaign nope does not exist");
}

/// The next line of `lines` (`None` at the end); fails the test after 30 s.
async fn next_line(lines: &mut Lines) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("output in time")
        .expect("read output")
}

#[tokio::test]
async fn watch_follows_a_running_campaign_until_it_ends() {
    let db = TestDb::create().await;
    ok(create(
        &db,
        "c1",
        &["--selector", "all", "--patch", r#"{"fw": "2"}"#],
    ));
    sql(
        &db,
        "UPDATE campaigns SET state = 'running', targeted = 3, started_at = now() WHERE id = 'c1'",
    )
    .await;
    campaign_devices(&db, "c1", "s", 3, "sent").await;

    let mut child =
        tokio::process::Command::from(command(&db, &["campaign", "status", "c1", "--watch"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run devsyncctl");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Duration::from_secs(30);
    let mut seen = Vec::new();

    // It refreshes while the campaign runs.
    for _ in 0..2 {
        let line = next_line(&mut lines).await.expect("a refresh");
        assert!(
            line.contains(
                "campaign c1: running, wave 1/1: targeted 3+, dispatched 3, pending 0, sent 3"
            ),
            "{line}"
        );
        seen.push(line);
    }

    // The devices converge and the campaign completes: the watch prints the final status and
    // exits 0.
    sql(
        &db,
        "UPDATE campaign_devices SET status = 'converged' WHERE campaign_id = 'c1';
         UPDATE campaigns SET state = 'completed', state_reason = 'every wave dispatched',
             expanded = true, finished_at = now() WHERE id = 'c1'",
    )
    .await;
    while let Some(line) = next_line(&mut lines).await {
        seen.push(line);
    }
    let status = tokio::time::timeout(deadline, child.wait())
        .await
        .expect("exit in time")
        .unwrap();
    let out = seen.join("\n");
    assert!(status.success(), "{status:?}\n{out}");
    assert!(
        out.contains(
            "campaign c1: completed (every wave dispatched), wave 1/1: targeted 3, dispatched 3, \
             pending 0, sent 0, acked 0, converged 3"
        ),
        "{out}"
    );
    assert_eq!(field(&out, "converged"), "3");
    assert_ne!(field(&out, "finished (UTC)"), "-", "{out}");
}

#[tokio::test]
async fn pause_resume_abort_and_the_refused_transitions() {
    let db = TestDb::create().await;
    for id in ["c1", "c2", "c3"] {
        ok(create(
            &db,
            id,
            &["--selector", "all", "--patch", r#"{"fw": "2"}"#],
        ));
    }
    let campaign = |id| {
        let db = &db;
        async move { row(db, id).await }
    };

    assert_eq!(
        ok(ctl(&db, &["campaign", "pause", "c1"])).trim(),
        "campaign c1 paused"
    );
    let c1 = campaign("c1").await;
    assert_eq!(c1["state"], "paused");
    assert_eq!(c1["state_reason"], "paused by an operator");

    let before = snapshot(&db).await;
    refused(
        ctl(&db, &["campaign", "pause", "c1"]),
        "campaign c1 is paused",
    );
    assert_eq!(snapshot(&db).await, before);

    assert_eq!(
        ok(ctl(&db, &["campaign", "resume", "c1"])).trim(),
        "campaign c1 running"
    );
    assert_eq!(campaign("c1").await["state"], "running");
    let before = snapshot(&db).await;
    refused(
        ctl(&db, &["campaign", "resume", "c1"]),
        "campaign c1 is running; it can be running only when paused",
    );
    assert_eq!(snapshot(&db).await, before);

    // Running → paused → aborted.
    ok(ctl(&db, &["campaign", "pause", "c1"]));
    assert_eq!(
        ok(ctl(&db, &["campaign", "abort", "c1"])).trim(),
        "campaign c1 aborted"
    );
    let c1 = campaign("c1").await;
    assert_eq!(c1["state"], "aborted");
    assert_eq!(c1["state_reason"], "aborted by an operator");
    assert!(c1["finished_at"].is_string(), "{c1}");

    // A pending campaign can be aborted directly; a running one too.
    assert_eq!(
        ok(ctl(&db, &["campaign", "abort", "c2"])).trim(),
        "campaign c2 aborted"
    );
    sql(
        &db,
        "UPDATE campaigns SET state = 'running' WHERE id = 'c3'",
    )
    .await;
    assert_eq!(
        ok(ctl(&db, &["campaign", "abort", "c3"])).trim(),
        "campaign c3 aborted"
    );
    sql(
        &db,
        "UPDATE campaigns SET state = 'completed' WHERE id = 'c3'",
    )
    .await;

    // Finished campaigns refuse everything.
    let before = snapshot(&db).await;
    for (args, needle) in [
        (["campaign", "abort", "c1"], "campaign c1 is aborted"),
        (["campaign", "pause", "c1"], "campaign c1 is aborted"),
        (["campaign", "resume", "c1"], "campaign c1 is aborted"),
        (["campaign", "resume", "c2"], "campaign c2 is aborted"),
        (["campaign", "pause", "c3"], "campaign c3 is completed"),
        (["campaign", "abort", "c3"], "campaign c3 is completed"),
        (
            ["campaign", "pause", "nope"],
            "campaign nope does not exist",
        ),
        (
            ["campaign", "abort", "bad.id"],
            "campaign id \"bad.id\" contains '.'",
        ),
    ] {
        refused(ctl(&db, &args), needle);
        assert_eq!(snapshot(&db).await, before, "{args:?} changed the database");
    }
    let out = ok(ctl(&db, &["campaign", "status", "c1"]));
    assert_eq!(field(&out, "state"), "aborted (aborted by an operator)");
}

#[tokio::test]
async fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let db = TestDb::create().await;
    register(&db, &[("d1", json!({"env": "prod"}))]).await;
    ok(create(
        &db,
        "c1",
        &["--selector", "all", "--patch", r#"{"fw": "2"}"#],
    ));
    let before = snapshot(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let bad_ids = dir.path().join("bad-ids.txt");
    std::fs::write(&bad_ids, "d1\nd 2\n").unwrap();
    let no_ids = dir.path().join("no-ids.txt");
    std::fs::write(&no_ids, "# nobody\n\n").unwrap();
    let ids_missing = format!("ids:@{}", missing.display());
    let ids_bad = format!("ids:@{}", bad_ids.display());
    let ids_none = format!("ids:@{}", no_ids.display());
    let patch_missing = format!("@{}", missing.display());
    let long_id = "c".repeat(129);

    fn sel(selector: &str) -> Vec<&str> {
        vec!["--selector", selector, "--patch", r#"{"fw": "3"}"#]
    }
    fn patch(patch: &str) -> Vec<&str> {
        vec!["--selector", "all", "--patch", patch]
    }
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--selector", "all", "--patch", r#"{"fw": "3"}"#];
        args.extend(extra);
        args
    }
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        // Ids.
        ("bad.id", sel("all"), "campaign id \"bad.id\" contains '.'"),
        ("", sel("all"), "campaign id is empty"),
        (&long_id, sel("all"), "at most 128 are allowed"),
        ("c1", sel("group:g9"), "campaign c1 already exists"),
        // Selectors.
        (
            "c9",
            sel("everything"),
            "selector \"everything\" is not one of labels:",
        ),
        ("c9", sel("tags:a=b"), "unknown kind \"tags\""),
        ("c9", sel("labels:"), "no labels given (use `all`"),
        ("c9", sel("labels:env"), "label \"env\" is not KEY=VALUE"),
        ("c9", sel("labels:=x"), "the key is empty"),
        ("c9", sel("labels:a=1,a=2"), "label \"a\" is given twice"),
        ("c9", sel("labels:a b=1"), "label key \"a b\" contains ' '"),
        ("c9", sel("group:"), "the group name is empty"),
        ("c9", sel("ids:"), "device id is empty"),
        (
            "c9",
            sel("ids:d1,bad.id"),
            "device id \"bad.id\" contains '.'",
        ),
        ("c9", sel(&ids_missing), "read device ids from"),
        (
            "c9",
            sel(&ids_bad),
            "line 2: device id \"d 2\" contains ' '",
        ),
        ("c9", sel(&ids_none), "no device ids given"),
        // Patches.
        (
            "c9",
            patch("[1]"),
            "patch: a state document must be a JSON object, got an array",
        ),
        ("c9", patch("{}"), "patch is empty"),
        ("c9", patch("{\"fw\": "), "patch: invalid JSON"),
        ("c9", patch(&patch_missing), "read patch from"),
        // Waves.
        (
            "c9",
            with(&["--waves", "10%,50%"]),
            "--waves \"10%,50%\": the last wave must be 100%",
        ),
        ("c9", with(&["--waves", "50%,10%,100%"]), "must grow"),
        ("c9", with(&["--waves", "ten%,100%"]), "is not a number"),
        ("c9", with(&["--waves", "0%,100%"]), "between 0.1% and 100%"),
        // Abort criteria.
        (
            "c9",
            with(&["--abort-if", "bogus>1"]),
            "--abort-if \"bogus>1\": unknown condition",
        ),
        (
            "c9",
            with(&["--abort-if", "failure-ratio>0.05 or nope 10m"]),
            "--abort-if \"nope 10m\": unknown condition",
        ),
        (
            "c9",
            with(&["--abort-if", "failure-ratio>2"]),
            "failure ratio must be at least 0 and below 1",
        ),
        (
            "c9",
            with(&["--abort-if", "failure-ratio<0.1"]),
            "expected failure-ratio>RATIO",
        ),
        (
            "c9",
            with(&["--abort-if", "not-converged-after soon"]),
            "\"soon\" is not a duration",
        ),
        (
            "c9",
            with(&["--abort-if", "failure-ratio>0.05 or"]),
            "empty condition",
        ),
        (
            "c9",
            with(&[
                "--abort-if",
                "failure-ratio>0.05",
                "--abort-if",
                "failure-ratio>0.1",
            ]),
            "failure-ratio is given twice",
        ),
        // Rates, limits, policy, wave wait.
        (
            "c9",
            with(&["--rate", "0"]),
            "--rate \"0\": must be at least 1 device per second",
        ),
        ("c9", with(&["--rate", "0/s"]), "must be at least 1"),
        (
            "c9",
            with(&["--rate", "fast"]),
            "expected devices per second",
        ),
        (
            "c9",
            with(&["--max-in-flight", "0"]),
            "--max-in-flight \"0\": must be at least 1",
        ),
        (
            "c9",
            with(&["--policy", "sometimes"]),
            "push policy \"sometimes\" is not one of push, push-active, pull-only",
        ),
        ("c9", with(&["--wave-wait", "soon"]), "--wave-wait \"soon\""),
        (
            "c9",
            with(&["--wave-wait", "1500ms"]),
            "must be whole seconds",
        ),
    ];
    for (id, args, needle) in cases {
        refused(create(&db, id, &args), needle);
        assert_eq!(
            snapshot(&db).await,
            before,
            "{id} {args:?} changed the database"
        );
    }
    refused(
        ctl_stdin(
            &db,
            &[
                "campaign",
                "create",
                "c9",
                "--selector",
                "ids:@-",
                "--patch",
                "@-",
            ],
            "d1\n",
        ),
        "--selector and --patch cannot both read standard input",
    );
    for (args, needle) in [
        (vec!["status", "nope"], "campaign nope does not exist"),
        (
            vec!["status", "no/pe"],
            "campaign id \"no/pe\" contains '/'",
        ),
        (
            vec!["status", "nope", "--json"],
            "campaign nope does not exist",
        ),
    ] {
        let mut full = vec!["campaign"];
        full.extend(&args);
        refused(ctl(&db, &full), needle);
    }
    assert_eq!(snapshot(&db).await, before);
    assert_eq!(row(&db, "c9").await, Value::Null);
}

#[tokio::test]
async fn usage_errors_exit_2_like_clap() {
    let db = TestDb::create().await;
    for args in [
        vec!["campaign"],
        vec!["campaign", "frobnicate"],
        vec!["campaign", "create", "c1", "--patch", "{\"a\": 1}"],
        vec!["campaign", "create", "c1", "--selector", "all"],
        vec!["campaign", "list", "--limit", "0"],
        vec!["campaign", "status"],
        vec!["campaign", "pause"],
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
    assert_eq!(snapshot(&db).await, json!({"campaigns": [], "devices": 0}));
}
