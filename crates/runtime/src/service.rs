//! What every service does at start, written once: name itself, connect to NATS, make sure the
//! topology is declared, open the PostgreSQL pool, and serve health and metrics.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use axum::Router;
use deadpool_postgres::Pool;
use devsync_types::{ServiceName, WorkerId, names};
use prometheus_client::registry::Registry;

use crate::audit::Auditor;
use crate::config::{self, CommonSettings, ConfigSources, Settings};
use crate::health::{self, HttpServer, NatsReady, PostgresReady, ReadinessCheck, StreamsReady};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::topology::Topology;
use crate::worker::WorkerSpec;

/// The connections and identity of a running service.
#[derive(Clone)]
pub struct Service {
    /// The settings it runs with.
    pub settings: CommonSettings,
    /// Who it is in logs and the audit trail.
    pub worker_id: WorkerId,
    /// Core NATS.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// PostgreSQL.
    pub pool: Pool,
    /// The declared topology.
    pub topology: Topology,
    /// Makes this worker's audit events.
    pub auditor: Auditor,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Connects everything `service` needs and declares the topology.
    pub async fn start(settings: CommonSettings, service: ServiceName) -> anyhow::Result<Self> {
        let worker_id = settings.worker_id(service);
        let client = crate::nats::connect(&settings.nats, &worker_id.to_string()).await?;
        let js = jetstream::new(client.clone());
        let topology = Topology::new(settings.topology.clone());
        let report = if settings.topology.declare_on_start {
            topology.declare(&js).await
        } else {
            topology.verify(&js).await
        }
        .context("jetstream topology")?;
        for problem in report.problems() {
            tracing::warn!(kind = %problem.kind, name = %problem.name, action = ?problem.action, "topology differs from the declaration");
        }
        let pool = devsync_store::named_pool(
            settings.database.url.expose(),
            settings.database.pool_size,
            &worker_id.to_string(),
        )?;
        drop(pool.get().await.context("connect to postgres")?);
        tracing::info!(worker_id = %worker_id, "service connected");
        Ok(Self {
            auditor: Auditor::new(worker_id.clone()),
            settings,
            worker_id,
            client,
            js,
            pool,
            topology,
        })
    }

    /// A worker spec for `consumer` of `stream` with the configured batch and retry settings.
    pub fn worker_spec(&self, stream: &str, consumer: &str, group: Option<&str>) -> WorkerSpec {
        WorkerSpec {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            group: group.map(str::to_owned),
            batch_size: self.settings.worker.batch_size,
            pull_expires: self.settings.worker.pull_expires,
            retry: RetryPolicy::from_settings(&self.settings.worker),
            linger: Duration::ZERO,
        }
    }

    /// Serves `/healthz`, `/readyz` (NATS, PostgreSQL, the request stream) and `/metrics`,
    /// plus `extra` routes, until `shutdown`.
    pub async fn serve_http(
        &self,
        registry: Registry,
        extra: Router,
        shutdown: Shutdown,
    ) -> anyhow::Result<HttpServer> {
        let checks: Vec<Box<dyn ReadinessCheck>> = vec![
            Box::new(NatsReady(self.client.clone())),
            Box::new(PostgresReady(self.pool.clone())),
            Box::new(StreamsReady {
                js: self.js.clone(),
                streams: vec![names::STREAM_REQ, names::STREAM_AUDIT],
            }),
        ];
        health::serve(
            self.settings.http.listen,
            Arc::new(registry),
            checks,
            extra,
            shutdown,
        )
        .await
        .with_context(|| format!("listen on {}", self.settings.http.listen))
    }
}

/// A service started in-process (by its crate's `start`): where its HTTP endpoints listen,
/// and its task, which ends after shutdown once the service has drained.
#[derive(Debug)]
pub struct Running {
    /// Where `/healthz`, `/readyz`, `/metrics` (and the service's own routes) are served.
    pub http_addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// A running service serving HTTP on `http_addr`, whose work is `task`.
    pub fn new(
        http_addr: std::net::SocketAddr,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> Self {
        Self { http_addr, task }
    }

    /// Waits until the service has stopped (after shutdown) and drained.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("service task panicked")?
    }
}

/// The command-line arguments every service binary shares (flattened into its own `Args`,
/// which carries the binary's `--help` text).
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// TOML configuration file (overrides DEVSYNC_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Exit code for configuration errors (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// The whole `main` of a service binary: load settings (exit 64 with one line on a bad
/// setting), build the async runtime (`runtime.worker_threads`), start telemetry, run until
/// SIGTERM/SIGINT, flush telemetry, exit non-zero with a one-line reason on failure.
pub fn main<S, F, Fut>(binary: &str, config_file: Option<PathBuf>, run: F) -> ExitCode
where
    S: Settings,
    F: FnOnce(S, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let sources = ConfigSources::from_process(config_file);
    let settings: S = match config::load(&sources) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{binary}: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match settings.common().runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{binary}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match crate::telemetry::init(binary, &settings.common().log, &sources) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("{binary}: {error}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let result = run(settings, crate::shutdown::on_signals()).await;
        telemetry.shutdown();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{binary}: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}
