//! The whole devsync stack in one test process: a real nats-server and a fresh PostgreSQL
//! database (from `devsync-testkit`), and any of the services started in-process on port 0
//! with settings tuned for fast tests. Integration tests of every service crate share it, so
//! the settings a test runs with are written once.

use std::time::Duration;

use async_nats::jetstream;
use devsync_device::Device;
use devsync_runtime::Shutdown;
use devsync_runtime::config::{CommonSettings, Secret};
use devsync_testkit::{TestDb, TestNats, wait_for};
use devsync_types::{DeviceId, PartitionCount};
use serde_json::Value;

pub const PARTITIONS: u16 = 4;

#[allow(missing_debug_implementations)]
pub struct Stack {
    pub nats: TestNats,
    pub db: TestDb,
    pub js: jetstream::Context,
}

impl Stack {
    pub async fn start() -> Self {
        let nats = TestNats::start();
        let db = TestDb::create().await;
        let js = nats.jetstream().await;
        Self { nats, db, js }
    }

    pub fn common(&self, instance: &str) -> CommonSettings {
        let mut common = CommonSettings {
            instance: Some(instance.to_owned()),
            ..CommonSettings::default()
        };
        common.nats.url = self.nats.url();
        common.database.url = Secret::new(self.db.url.clone());
        common.database.pool_size = 4;
        common.http.listen = "127.0.0.1:0".parse().unwrap();
        common.topology.partitions = PartitionCount::new(PARTITIONS).unwrap();
        common.topology.member_ttl = Duration::from_secs(2);
        common.topology.pin_timeout = Duration::from_secs(2);
        common.topology.ack_wait = Duration::from_secs(5);
        common.worker.pull_expires = Duration::from_secs(1);
        common.worker.retry_min_delay = Duration::from_millis(100);
        common.worker.retry_max_delay = Duration::from_secs(1);
        common.shutdown.drain_timeout = Duration::from_secs(5);
        common
    }

    /// Starts a service binary as its own process (the way it is deployed), pointed at this
    /// stack, as `instance`, with `env` on top of the shared test settings (HTTP on port 0,
    /// the test partition count, 1 s pulls, warn logs). Output is discarded, unless
    /// `DEVSYNC_TEST_PROCESS_LOGS` names a directory: then each process logs at info level to
    /// `<dir>/<instance>.log` (for finding out why a process test failed).
    pub fn process(
        &self,
        binary: &str,
        instance: &str,
        env: &[(&str, &str)],
    ) -> std::process::Child {
        let common = self.common(instance);
        let mut command = std::process::Command::new(binary);
        command
            .env("DEVSYNC_NATS__URL", &common.nats.url)
            .env("DEVSYNC_DATABASE__URL", common.database.url.expose())
            .env("DEVSYNC_INSTANCE", instance)
            .env("DEVSYNC_HTTP__LISTEN", "127.0.0.1:0")
            .env("DEVSYNC_TOPOLOGY__PARTITIONS", PARTITIONS.to_string())
            .env("DEVSYNC_WORKER__PULL_EXPIRES", "1s")
            .env("DEVSYNC_LOG__LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(dir) = std::env::var_os("DEVSYNC_TEST_PROCESS_LOGS") {
            let path = std::path::Path::new(&dir).join(format!("{instance}.log"));
            let file = std::fs::File::create(&path).expect("the process log file can be created");
            let errors = file
                .try_clone()
                .expect("the process log file can be shared");
            command
                .env("DEVSYNC_LOG__LEVEL", "info")
                .stdout(file)
                .stderr(errors);
        }
        command.spawn().expect("the service binary starts")
    }

    /// Declares the topology (services do it at start; tests that publish first need it).
    pub async fn declare(&self) {
        devsync_runtime::topology::Topology::new(self.common("test").topology)
            .declare(&self.js)
            .await
            .unwrap();
    }

    pub fn requestor_settings(&self) -> devsync_requestor::Settings {
        devsync_requestor::Settings {
            common: self.common("requestor-1"),
            requestor: Default::default(),
        }
    }

    pub fn reconciler_settings(&self, instance: &str) -> devsync_reconciler::Settings {
        devsync_reconciler::Settings {
            common: self.common(instance),
            reconciler: devsync_reconciler::ReconcilerSettings {
                outbox_sweep_every: Duration::from_millis(200),
                outbox_age: Duration::from_millis(500),
                ..Default::default()
            },
        }
    }

    pub fn fanout_settings(&self, instance: &str) -> devsync_fanout::Settings {
        devsync_fanout::Settings {
            common: self.common(instance),
            fanout: devsync_fanout::FanoutSettings {
                breaker_open: Duration::from_secs(2),
                webhook_timeout: Duration::from_secs(2),
                ..Default::default()
            },
        }
    }

    pub fn audit_settings(&self, instance: &str) -> devsync_audit::Settings {
        devsync_audit::Settings {
            common: self.common(instance),
            audit: Default::default(),
        }
    }

    pub async fn fanout(
        &self,
        settings: devsync_fanout::Settings,
    ) -> Service<devsync_fanout::Running> {
        let shutdown = Shutdown::new();
        let running = devsync_fanout::start(settings, shutdown.clone())
            .await
            .expect("fan-out starts");
        Service { running, shutdown }
    }

    pub async fn audit(&self) -> Service<devsync_audit::Running> {
        let shutdown = Shutdown::new();
        let running = devsync_audit::start(self.audit_settings("audit-1"), shutdown.clone())
            .await
            .expect("audit starts");
        Service { running, shutdown }
    }

    pub async fn requestor(
        &self,
        settings: devsync_requestor::Settings,
    ) -> Service<devsync_requestor::Running> {
        let shutdown = Shutdown::new();
        let running = devsync_requestor::start(settings, shutdown.clone())
            .await
            .expect("requestor starts");
        Service { running, shutdown }
    }

    pub async fn reconciler(&self, instance: &str) -> Service<devsync_reconciler::Running> {
        let shutdown = Shutdown::new();
        let running =
            devsync_reconciler::start(self.reconciler_settings(instance), shutdown.clone())
                .await
                .expect("reconciler starts");
        Service { running, shutdown }
    }

    pub async fn register(&self, devices: &[&str]) {
        let client = self.db.pool.get().await.unwrap();
        let ids: Vec<&str> = devices.to_vec();
        client
            .execute(
                "INSERT INTO devices (id) SELECT unnest($1::text[])",
                &[&ids],
            )
            .await
            .unwrap();
    }

    /// The single `int8` a query without parameters returns (a count, a minimum...).
    pub async fn scalar(&self, query: &str) -> i64 {
        self.db
            .pool
            .get()
            .await
            .unwrap()
            .query_one(query, &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn sql(&self, statement: &str) {
        self.db
            .pool
            .get()
            .await
            .unwrap()
            .batch_execute(statement)
            .await
            .unwrap();
    }

    pub async fn device(&self, id: &str) -> Device {
        let id = DeviceId::parse(id).unwrap();
        let client = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(devsync_types::subjects::device_inbox_prefix(&id))
            .connect(self.nats.url())
            .await
            .unwrap();
        Device::with_client(client, id, 0)
    }

    /// (reported, reported_version, last_seq, applied_desired_version)
    pub async fn device_row(&self, id: &str) -> (Value, i64, i64, i64) {
        let row = self
            .db
            .pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT reported, reported_version, last_seq, applied_desired_version FROM devices WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    pub async fn wait_reported(&self, id: &str, version: i64) -> Value {
        wait_for(
            Duration::from_secs(20),
            &format!("{id} at reported version {version}"),
            || async {
                let (reported, v, _, _) = self.device_row(id).await;
                (v >= version).then_some(reported)
            },
        )
        .await
    }

    pub async fn stream_messages(&self, stream: &str) -> u64 {
        self.js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// Every message currently stored in `stream`, as (subject, payload).
    pub async fn stored(&self, stream: &str) -> Vec<(String, bytes::Bytes)> {
        let mut handle = self.js.get_stream(stream).await.unwrap();
        let state = handle.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(message) = handle.get_raw_message(seq).await {
                out.push((message.subject.to_string(), message.payload));
            }
        }
        out
    }
}

/// A service started in-process, stopped with [`Service::stop`].
#[allow(missing_debug_implementations)]
pub struct Service<R> {
    pub running: R,
    pub shutdown: Shutdown,
}

/// A started service that can be waited for after shutdown.
pub trait Running {
    /// Waits until the service has drained and stopped.
    fn wait(self) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

impl Running for devsync_runtime::service::Running {
    async fn wait(self) -> anyhow::Result<()> {
        devsync_runtime::service::Running::wait(self).await
    }
}

impl Running for devsync_reconciler::Running {
    async fn wait(self) -> anyhow::Result<()> {
        devsync_reconciler::Running::wait(self).await
    }
}

impl<R: Running> Service<R> {
    /// Cancels the service and waits (at most 15 s) until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.running.wait())
            .await
            .expect("service stops in time")
            .expect("service stops cleanly");
    }
}
