//! Real dependencies as child processes: a JetStream-enabled `nats-server` and a private
//! PostgreSQL cluster. Used by the test kit (a server per test) and by `devsyncctl up` (the local
//! stack). Both are stopped when their handle is dropped.
//!
//! Binaries are found, in order: an explicit environment variable (`DEVSYNC_NATS_SERVER`,
//! `DEVSYNC_PG_BINDIR`), the project-local `.tools/bin` that `just setup` fills, then the usual
//! system places. An old nats-server (Debian ships 2.9) is refused with a clear message:
//! devsync needs 2.12 or newer (priority groups, message TTLs).

pub mod nats;
pub mod postgres;

pub use nats::{NatsOptions, NatsServer};
pub use postgres::{PostgresCluster, PostgresOptions};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Starting or stopping a dependency failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{what} not found: {hint}")]
    NotFound { what: &'static str, hint: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what} did not become ready within {secs}s; see {log}")]
    Timeout {
        what: &'static str,
        secs: u64,
        log: String,
    },
}

impl LocalError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The workspace root this crate was built in (for `.tools/bin`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Polls `ready` every 20 ms until it returns `Some` or `timeout` passes.
pub(crate) fn poll<T>(timeout: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for local use).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether `port` on 127.0.0.1 can be bound now.
pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}
