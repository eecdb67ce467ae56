//! A PostgreSQL `LISTEN` connection of its own, kept open until shutdown: the relay is woken
//! by it, the device registry forgets cached entries by it. Notifications are lost while the
//! connection is down, so every (re)connection is reported as [`Heard::Listening`] once the
//! `LISTEN` took effect, and the caller catches up on whatever it may have missed.

use std::time::Duration;

use devsync_runtime::Shutdown;
use futures::StreamExt as _;

/// What the listening connection reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard<'a> {
    /// `LISTEN` took effect on a new connection: notifications sent before it were missed.
    Listening,
    /// A notification on the channel, with its payload.
    Notification(&'a str),
}

/// Listens on `channel` of `database_url` until `shutdown`, calling `on` for what it hears;
/// reconnects a second after a failure.
pub async fn listen(
    database_url: String,
    channel: &'static str,
    shutdown: Shutdown,
    mut on: impl FnMut(Heard<'_>),
) {
    while !shutdown.is_cancelled() {
        match tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
                let statement = format!("LISTEN {channel}");
                let listening = client.batch_execute(&statement);
                // The connection must be driven while the LISTEN runs.
                let mut listening = std::pin::pin!(listening);
                let ready = loop {
                    tokio::select! {
                        result = &mut listening => break result.is_ok(),
                        message = messages.next() => if message.is_none() { break false },
                    }
                };
                if ready {
                    on(Heard::Listening);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = messages.next() => match message {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                    on(Heard::Notification(n.payload()));
                                }
                                Some(Ok(_)) => {}
                                Some(Err(error)) => {
                                    tracing::warn!(%error, channel, "listen connection failed");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, channel, "cannot open the listen connection"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
