//! Connecting to NATS: credentials, timeouts and reconnect behaviour in one place.

use async_nats::{Client, ConnectOptions, Event};

use crate::config::NatsSettings;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("nats credentials file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to nats at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
}

/// Connects as `name` (shown in the server's connection list). After the first connection the
/// client reconnects forever with backoff; connection events are logged.
pub async fn connect(settings: &NatsSettings, name: &str) -> Result<Client, ConnectError> {
    connect_with(settings, name, ConnectOptions::new()).await
}

/// Like [`connect`], starting from caller-provided options (e.g. a custom inbox prefix).
pub async fn connect_with(
    settings: &NatsSettings,
    name: &str,
    options: ConnectOptions,
) -> Result<Client, ConnectError> {
    let mut options =
        match &settings.creds_file {
            Some(path) => options.credentials_file(path).await.map_err(|source| {
                ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                }
            })?,
            None => options,
        };
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    let options = options
        .name(name)
        .connection_timeout(settings.connect_timeout)
        .request_timeout(Some(settings.request_timeout))
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("nats connected"),
                Event::Disconnected => tracing::warn!("nats disconnected"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "nats slow consumer"),
                other => tracing::info!(event = %other, "nats event"),
            }
        });
    // One URL, or a comma-separated list of seeds (a cluster); the client learns the rest of
    // the cluster from the servers.
    let seeds: Vec<&str> = settings.url.split(',').map(str::trim).collect();
    options
        .connect(seeds)
        .await
        .map_err(|source| ConnectError::Connect {
            url: settings.url.clone(),
            source,
        })
}
