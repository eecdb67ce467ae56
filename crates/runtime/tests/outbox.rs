//! The outbox against a real nats-server and PostgreSQL: a sweep that cannot publish one row
//! still deletes the rows it did publish, so they are not published again; published rows are
//! deleted by the next insert, or by the sweeper when no insert follows, and never swept.

use std::time::Duration;

use async_nats::jetstream::stream;
use devsync_runtime::outbox;
use devsync_runtime::publish::Outgoing;
use devsync_testkit::{TestDb, TestNats};

fn message(subject: &str) -> Outgoing {
    Outgoing {
        subject: subject.to_owned(),
        msg_id: format!("test:{subject}"),
        payload: bytes::Bytes::from_static(b"output"),
        headers: None,
    }
}

/// A stream capturing `prefix.>`, where the swept rows' messages land.
async fn outputs(js: &async_nats::jetstream::Context, name: &str, prefix: &str) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_sweep_keeps_what_it_published_when_a_later_row_fails() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let mut outputs = outputs(&js, "OUTBOX_TEST", "outboxtest").await;
    let db = TestDb::create().await;
    let mut client = db.pool.get().await.unwrap();
    // Oldest first: a row that publishes, then one whose subject no stream captures.
    for subject in ["outboxtest.a", "nostream.b"] {
        let tx = client.transaction().await.unwrap();
        outbox::insert(&tx, "test", subject, &[message(subject)], &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    let swept = outbox::sweep(&js, &db.pool, "test", Duration::ZERO).await;
    assert!(swept.is_err(), "{swept:?}");

    let left: Vec<String> = client
        .query("SELECT msg_id FROM outbox WHERE owner = 'test'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, vec!["nostream.b".to_owned()]);
    assert_eq!(outputs.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn the_sweeper_drains_a_backlog_of_rows_without_waiting_a_tick_per_claim() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let mut outputs = outputs(&js, "OUTBOX_BACKLOG", "outboxbacklog").await;
    let db = TestDb::create().await;
    let mut client = db.pool.get().await.unwrap();
    // What a few seconds of failed publishes leave behind: many more rows than one claim.
    let rows = 3 * outbox::SWEEP_ROWS + 7;
    let tx = client.transaction().await.unwrap();
    for n in 0..rows {
        let subject = format!("outboxbacklog.{n}");
        outbox::insert(&tx, "test", &subject, &[message(&subject)], &[])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    // The first tick comes at once, the second only after an hour.
    let shutdown = devsync_runtime::Shutdown::new();
    let sweeper = tokio::spawn(outbox::run(
        js.clone(),
        db.pool.clone(),
        "test",
        Duration::from_secs(3600),
        Duration::ZERO,
        outbox::Published::default(),
        shutdown.clone(),
    ));
    devsync_testkit::wait_for(Duration::from_secs(20), "the outbox drained", || async {
        let left: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE owner = 'test'", &[])
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    sweeper.await.unwrap();
    assert_eq!(
        outputs.info().await.unwrap().state.messages,
        rows as u64,
        "every row published once"
    );
}

/// Inserts one row of `owner`'s (deleting `published` with it) and commits; returns its id.
async fn insert_row(
    pool: &deadpool_postgres::Pool,
    owner: &str,
    subject: &str,
    published: &[i64],
) -> i64 {
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let id = outbox::insert(&tx, owner, subject, &[message(subject)], published)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

async fn row_ids(pool: &deadpool_postgres::Pool) -> Vec<i64> {
    let client = pool.get().await.unwrap();
    client
        .query("SELECT id FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn published_rows_go_with_the_next_insert_and_wait_again_when_it_fails() {
    let db = TestDb::create().await;
    let published = outbox::Published::default();
    let first = insert_row(&db.pool, "test", "outboxtest.first", &published.take()).await;
    let other = insert_row(&db.pool, "other", "outboxtest.other", &[]).await;
    published.push(first);

    let second = insert_row(&db.pool, "test", "outboxtest.second", &published.take()).await;
    assert_eq!(
        row_ids(&db.pool).await,
        vec![other, second],
        "the published row went with the insert"
    );
    assert!(
        published.take().is_empty(),
        "taken rows are no longer waiting"
    );

    // A transaction that does not commit gives the rows it took back; they are still there.
    published.push(second);
    let mut client = db.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert!(tx.batch_execute("SELECT 1/0").await.is_err(), "aborted");
    let lost = published
        .commit(tx, "test", "outboxtest.lost", &[message("outboxtest.lost")])
        .await;
    assert!(lost.is_err(), "{lost:?}");
    assert_eq!(row_ids(&db.pool).await, vec![other, second]);

    // A transaction with nothing to store leaves them waiting.
    let tx = client.transaction().await.unwrap();
    assert_eq!(
        published.commit(tx, "test", "none", &[]).await.unwrap(),
        None
    );
    assert_eq!(row_ids(&db.pool).await, vec![other, second]);

    // The next that stores a row deletes them with it.
    let tx = client.transaction().await.unwrap();
    let third = published
        .commit(
            tx,
            "test",
            "outboxtest.third",
            &[message("outboxtest.third")],
        )
        .await
        .unwrap()
        .expect("a row stored");
    assert_eq!(row_ids(&db.pool).await, vec![other, third]);

    // With no insert to follow, a flush deletes them.
    published.push(third);
    assert_eq!(published.flush(&db.pool).await.unwrap(), 1);
    assert_eq!(row_ids(&db.pool).await, vec![other]);
    assert_eq!(
        published.flush(&db.pool).await.unwrap(),
        0,
        "nothing waits twice"
    );
}

#[tokio::test]
async fn the_sweeper_deletes_published_rows_without_publishing_them_again() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let mut outputs = outputs(&js, "OUTBOX_PUBLISHED", "outboxpublished").await;
    let db = TestDb::create().await;
    let published = outbox::Published::default();
    // A row whose message its owner published, and nothing inserted after it.
    let id = insert_row(&db.pool, "test", "outboxpublished.a", &[]).await;
    // Under another message id than the row's, so a publish of the row would be stored too.
    let sent = Outgoing {
        msg_id: "owner:outboxpublished.a".into(),
        ..message("outboxpublished.a")
    };
    devsync_runtime::publish::publish_all(&js, [sent])
        .await
        .unwrap();
    published.push(id);

    let shutdown = devsync_runtime::Shutdown::new();
    let sweeper = tokio::spawn(outbox::run(
        js.clone(),
        db.pool.clone(),
        "test",
        Duration::from_millis(50),
        Duration::ZERO,
        published.clone(),
        shutdown.clone(),
    ));
    devsync_testkit::wait_for(
        Duration::from_secs(20),
        "the published row deleted",
        || async { row_ids(&db.pool).await.is_empty().then_some(()) },
    )
    .await;
    shutdown.cancel();
    sweeper.await.unwrap();
    // The sweeper's first tick deleted it before sweeping (every row is old enough to sweep
    // here), so it was not published again.
    assert_eq!(outputs.info().await.unwrap().state.messages, 1);
    assert!(published.take().is_empty());
}
