//! Graceful shutdown: SIGTERM or SIGINT cancel a token that every loop watches. Services stop
//! pulling new work when it is cancelled and finish (or hand back) what they hold, within
//! `shutdown.drain_timeout`.

use tokio_util::sync::CancellationToken;

/// Cancelled when the process should stop. Cheap to clone; children can be derived.
pub type Shutdown = CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. Must be called inside a Tokio runtime.
pub fn on_signals() -> Shutdown {
    let token = Shutdown::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
                        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the process");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        trigger.cancel();
    });
    token
}
