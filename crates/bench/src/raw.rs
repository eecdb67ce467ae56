//! The raw limits of this machine, measured with the same clients devsync uses.

use std::collections::VecDeque;
use std::time::Instant;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio_postgres::NoTls;

/// Raw throughputs, in messages (or rows) per second.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub jetstream_publish: f64,
    pub jetstream_consume: f64,
    pub core_publish: f64,
    pub postgres_upsert_rows: f64,
    pub messages: usize,
}

impl Limits {
    /// Prints the limits.
    pub fn print(&self) {
        println!(
            "raw limits: jetstream publish {:.0}/s, jetstream pull+ack {:.0}/s, core publish {:.0}/s, postgres upsert {:.0} rows/s",
            self.jetstream_publish,
            self.jetstream_consume,
            self.core_publish,
            self.postgres_upsert_rows
        );
    }
}

/// A 300-byte payload.
pub fn payload() -> Bytes {
    Bytes::from(vec![b'x'; 300])
}

/// Measures every raw limit.
pub async fn measure(
    nats_url: &str,
    database_url: &str,
    messages: usize,
) -> anyhow::Result<Limits> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client.clone());
    let (jetstream_publish, jetstream_consume) = jetstream_limits(&js, messages).await?;
    let core_publish = core_limit(nats_url, messages * 3).await?;
    let postgres_upsert_rows = postgres_limit(database_url, 200_000).await?;
    Ok(Limits {
        jetstream_publish,
        jetstream_consume,
        core_publish,
        postgres_upsert_rows,
        messages,
    })
}

async fn jetstream_limits(js: &jetstream::Context, messages: usize) -> anyhow::Result<(f64, f64)> {
    let _ = js.delete_stream("BENCH_RAW").await;
    let stream = js
        .create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let body = payload();
    let started = Instant::now();
    let mut window = VecDeque::new();
    for _ in 0..messages {
        window.push_back(js.publish("bench.raw", body.clone()).await?);
        if window.len() >= 4096
            && let Some(ack) = window.pop_front()
        {
            ack.await?;
        }
    }
    for ack in window {
        ack.await?;
    }
    let publish = messages as f64 / started.elapsed().as_secs_f64();

    let consumer: PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut stream_of = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?
        .take(messages);
    while let Some(message) = stream_of.next().await {
        message?.ack().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    let consume = messages as f64 / started.elapsed().as_secs_f64();
    js.delete_stream("BENCH_RAW").await?;
    Ok((publish, consume))
}

async fn core_limit(nats_url: &str, messages: usize) -> anyhow::Result<f64> {
    let publisher = async_nats::connect(nats_url).await?;
    let subscriber = async_nats::connect(nats_url).await?;
    let mut subscription = subscriber.subscribe("bench.core").await?;
    subscriber.flush().await?;
    let body = payload();
    let started = Instant::now();
    let receive = tokio::spawn(async move {
        let mut received = 0;
        while received < messages {
            if subscription.next().await.is_none() {
                break;
            }
            received += 1;
        }
        received
    });
    for _ in 0..messages {
        publisher.publish("bench.core", body.clone()).await?;
    }
    publisher.flush().await?;
    // The publish rate is the figure; a slow subscriber may be cut off, which is fine here.
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    receive.abort();
    Ok(rate)
}

async fn postgres_limit(database_url: &str, rows: usize) -> anyhow::Result<f64> {
    let (setup, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS bench_upsert;
             CREATE TABLE bench_upsert (id text PRIMARY KEY, doc jsonb NOT NULL, v bigint NOT NULL DEFAULT 0)",
        )
        .await?;
    let workers = 4;
    let batch = 500;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let url = database_url.to_owned();
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(connection);
            let statement = client
                .prepare(
                    "INSERT INTO bench_upsert (id, doc) SELECT * FROM unnest($1::text[], $2::jsonb[])
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, v = bench_upsert.v + 1",
                )
                .await?;
            let doc = serde_json::json!({"temperature": 21.5, "battery": 80, "fw": "1.2.3"});
            let mut done = 0;
            let mut round = 0;
            while done < rows / workers {
                let ids: Vec<String> = (0..batch)
                    .map(|i| format!("d{}-{}", worker, (round * batch + i) % 50_000))
                    .collect();
                let docs: Vec<&serde_json::Value> = (0..batch).map(|_| &doc).collect();
                client.execute(&statement, &[&ids, &docs]).await?;
                done += batch;
                round += 1;
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    setup.batch_execute("DROP TABLE bench_upsert").await?;
    Ok(rate)
}
