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

#[tokio::test]
async fn a_sweep_keeps_what_it_published_when_a_later_row_fails() {
    let nats = TestNats::start();
    let js = nats.jetstream().await;
    let mut outputs = js
        .create_stream(stream::Config {
            name: "OUTBOX_TEST".into(),
            subjects: vec!["outboxtest.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
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
