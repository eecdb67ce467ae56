//! The HTTP endpoints every service exposes on `http.listen`:
//!
//! - `/healthz`: the process is alive (always 200 while it serves).
//! - `/readyz`: NATS connected, PostgreSQL answering, topology present; 503 with the failing
//!   checks otherwise. Kubernetes stops routing and scaling decisions on it.
//! - `/metrics`: Prometheus text format.
//!
//! Services can mount more routes (the audit search API) by passing a router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::shutdown::Shutdown;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One dependency `/readyz` checks.
pub trait ReadinessCheck: Send + Sync + 'static {
    /// Short name shown when the check fails.
    fn name(&self) -> &'static str;
    /// `Ok` when the dependency is usable.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// NATS is connected.
#[derive(Debug, Clone)]
pub struct NatsReady(pub async_nats::Client);

impl ReadinessCheck for NatsReady {
    fn name(&self) -> &'static str {
        "nats"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.0.connection_state() {
                async_nats::connection::State::Connected => Ok(()),
                state => Err(format!("{state}")),
            }
        })
    }
}

/// PostgreSQL answers a query.
#[derive(Clone)]
pub struct PostgresReady(pub deadpool_postgres::Pool);

impl std::fmt::Debug for PostgresReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresReady")
    }
}

impl ReadinessCheck for PostgresReady {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let client = self.0.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

/// The streams a service needs exist.
#[derive(Debug, Clone)]
pub struct StreamsReady {
    pub js: jetstream::Context,
    pub streams: Vec<&'static str>,
}

impl ReadinessCheck for StreamsReady {
    fn name(&self) -> &'static str {
        "topology"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for stream in &self.streams {
                self.js
                    .get_stream_no_info(*stream)
                    .await
                    .map_err(|e| format!("{stream}: {e}"))?;
            }
            Ok(())
        })
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    checks: Arc<Vec<Box<dyn ReadinessCheck>>>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut failures = Vec::new();
    for check in state.checks.iter() {
        match tokio::time::timeout(CHECK_TIMEOUT, check.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => failures.push(format!("{}: {reason}", check.name())),
            Err(_) => failures.push(format!("{}: timed out", check.name())),
        }
    }
    if failures.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failures.join("\n")),
        )
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}

/// A running HTTP server.
#[derive(Debug)]
pub struct HttpServer {
    /// The address it listens on (useful with port 0).
    pub local_addr: SocketAddr,
    /// Ends when the server stopped after shutdown.
    pub task: JoinHandle<()>,
}

/// Serves health, readiness, metrics and `extra` routes on `listen` until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
    checks: Vec<Box<dyn ReadinessCheck>>,
    extra: Router,
    shutdown: Shutdown,
) -> std::io::Result<HttpServer> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let state = AppState {
        registry,
        checks: Arc::new(checks),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(extra);
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "http server failed");
        }
    });
    tracing::info!(%local_addr, "http listening");
    Ok(HttpServer { local_addr, task })
}
