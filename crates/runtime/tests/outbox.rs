//! The outbox sweeper against a real nats-server and PostgreSQL: a sweep that cannot publish
//! one row still deletes the rows it did publish, so they are not published again.

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
        outbox::insert(&tx, "test", subject, &[message(subject)])
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
        outbox::insert(&tx, "test", &subject, &[message(&subject)])
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
