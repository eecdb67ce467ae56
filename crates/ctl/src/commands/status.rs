//! `devsyncctl status`: what is queued where.

use std::collections::BTreeMap;

use anyhow::Context;
use async_nats::jetstream;
use devsync_runtime::CommonSettings;
use devsync_types::names;
use futures::StreamExt;

use crate::cli::StatusArgs;
use crate::output::table;

#[derive(Default)]
struct ConsumerRow {
    consumers: usize,
    pending: u64,
    ack_pending: usize,
    redelivered: usize,
    waiting: usize,
}

/// Prints the streams table and the consumers table.
pub async fn run(settings: &CommonSettings, args: &StatusArgs) -> anyhow::Result<()> {
    let client = devsync_runtime::nats::connect(&settings.nats, "devsyncctl").await?;
    let js = jetstream::new(client);
    let mut streams = table([
        "stream",
        "messages",
        "bytes",
        "first seq",
        "last seq",
        "consumers",
    ]);
    let mut consumers: BTreeMap<(String, String), ConsumerRow> = BTreeMap::new();
    for name in names::ALL_STREAMS {
        let mut stream = match js.get_stream(name).await {
            Ok(stream) => stream,
            Err(error) => {
                streams.add_row([name.to_owned(), format!("missing ({error})")]);
                continue;
            }
        };
        let info = stream
            .info()
            .await
            .with_context(|| format!("info {name}"))?;
        let state = &info.state;
        streams.add_row([
            name.to_owned(),
            state.messages.to_string(),
            state.bytes.to_string(),
            state.first_sequence.to_string(),
            state.last_sequence.to_string(),
            state.consumer_count.to_string(),
        ]);
        let mut list = stream.consumers();
        while let Some(info) = list.next().await {
            let info = info.with_context(|| format!("consumers of {name}"))?;
            let key = if !args.all && info.name.starts_with("reconcile-") {
                let lane = info.name.split('-').nth(1).unwrap_or("?");
                format!("reconcile-{lane}-*")
            } else {
                info.name.clone()
            };
            let row = consumers.entry((name.to_owned(), key)).or_default();
            row.consumers += 1;
            row.pending += info.num_pending;
            row.ack_pending += info.num_ack_pending;
            row.redelivered += info.num_redelivered;
            row.waiting += info.num_waiting;
        }
    }
    println!("{streams}");
    let mut table = table([
        "stream",
        "consumer",
        "pending",
        "ack pending",
        "redelivered",
        "waiting pulls",
    ]);
    for ((stream, consumer), row) in consumers {
        let consumer = if row.consumers > 1 {
            format!("{consumer} ({})", row.consumers)
        } else {
            consumer
        };
        table.add_row([
            stream,
            consumer,
            row.pending.to_string(),
            row.ack_pending.to_string(),
            row.redelivered.to_string(),
            row.waiting.to_string(),
        ]);
    }
    println!("{table}");
    Ok(())
}
