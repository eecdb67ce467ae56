//! Real dependencies for tests, never mocks.
//!
//! - [`TestNats`]: a fresh `nats-server` with JetStream on a random loopback port and a
//!   temporary store, killed and removed on drop.
//! - [`TestDb`]: a fresh PostgreSQL database with every migration applied, dropped on drop. The
//!   server is `DEVSYNC_TEST_DATABASE_URL` or `DATABASE_URL` when set (`just test` sets the
//!   former to a private cluster it starts and stops); otherwise a private cluster under
//!   `target/devsync-testkit` is started once and shared by later test processes.
//! - [`wait_for`]: polls a condition until a deadline, instead of sleeping.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use devsync_localstack::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions};
use tokio_postgres::NoTls;

/// Names the admin URL of the PostgreSQL server tests create their databases on.
pub const ENV_TEST_DATABASE_URL: &str = "DEVSYNC_TEST_DATABASE_URL";

/// Installs a test log subscriber once; silent unless `DEVSYNC_TEST_LOG` is set (e.g. `debug`).
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("DEVSYNC_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// A nats-server for one test.
#[derive(Debug)]
pub struct TestNats {
    server: NatsServer,
    _dir: tempfile::TempDir,
}

impl TestNats {
    /// Starts a server with JetStream on a random port.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server with a config file (accounts, permissions).
    pub fn start_with_config(config: Option<PathBuf>) -> Self {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("devsync-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let mut options = NatsOptions::in_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        options.config = config;
        let server = NatsServer::start(options).unwrap_or_else(|e| panic!("{e}"));
        Self { server, _dir: dir }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.server.url().to_owned()
    }

    /// The monitoring endpoint.
    pub fn monitor_url(&self) -> String {
        self.server.monitor_url().to_owned()
    }

    /// A plain client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.server.url())
            .await
            .expect("connect to test nats-server")
    }

    /// A JetStream context.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// The server process, to kill or restart it.
    pub fn server_mut(&mut self) -> &mut NatsServer {
        &mut self.server
    }
}

/// A PostgreSQL database for one test, with migrations applied; dropped on drop.
pub struct TestDb {
    /// URL of the test database.
    pub url: String,
    /// A pool on it.
    pub pool: Pool,
    admin_url: String,
    name: String,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb").field("name", &self.name).finish()
    }
}

impl TestDb {
    /// Creates a fresh database and applies every migration.
    pub async fn create() -> Self {
        Self::create_empty(true).await
    }

    /// Creates a fresh database; with `migrate` false it stays empty (migration tests).
    pub async fn create_empty(migrate: bool) -> Self {
        init_tracing();
        let admin_url = admin_url();
        let name = format!("devsync_test_{}", uuid::Uuid::now_v7().simple());
        let (client, connection) = tokio_postgres::connect(&admin_url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test postgres {admin_url}: {e}"));
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = driver.await;
        let url = devsync_store::with_database(&admin_url, &name);
        if migrate {
            devsync_store::migrate(&url)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let pool = devsync_store::pool(&url, 8).expect("test pool");
        Self {
            url,
            pool,
            admin_url,
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn admin_url() -> String {
    for var in [ENV_TEST_DATABASE_URL, "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var)
            && !url.is_empty()
        {
            return url;
        }
    }
    shared_cluster_url()
}

/// Starts (once, across test processes) a private cluster under `target/devsync-testkit`.
fn shared_cluster_url() -> String {
    let root = devsync_localstack::workspace_root().join("target/devsync-testkit");
    std::fs::create_dir_all(&root).expect("create target/devsync-testkit");
    let lock = std::fs::File::create(root.join("lock")).expect("create lock file");
    lock.lock().expect("lock target/devsync-testkit");
    let port_file = root.join("port");
    if let Some(port) = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    {
        return format!("postgres://postgres@127.0.0.1:{port}/postgres");
    }
    let cluster = PostgresCluster::start(PostgresOptions {
        dir: root.join("pg"),
        port: None,
        ephemeral: true,
        settings: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let url = cluster.url("postgres");
    std::fs::write(&port_file, cluster.port().to_string()).expect("write port file");
    cluster.leave_running();
    url
}

/// Polls `check` every 20 ms until it returns `Some`, or returns `None` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
