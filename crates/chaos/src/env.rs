//! One scenario's world: its own nats-server and PostgreSQL cluster (so a fault in one
//! scenario cannot leak into the next), the devsync services as processes (as deployed, so
//! they can be killed with SIGKILL), and registered devices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use devsync_bench::procs::ServiceProcess;
use devsync_localstack::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions};

/// Settings every service of a scenario runs with. Shorter than the production defaults
/// (`ack_wait` 30 s, pin timeout 6 s, membership TTL 10 s) so a scenario recovers in seconds;
/// the README's reliability table names them.
pub const SERVICE_SETTINGS: &[(&str, &str)] = &[
    ("DEVSYNC_TOPOLOGY__ACK_WAIT", "5s"),
    ("DEVSYNC_TOPOLOGY__PIN_TIMEOUT", "2s"),
    ("DEVSYNC_TOPOLOGY__MEMBER_TTL", "3s"),
    ("DEVSYNC_WORKER__PULL_EXPIRES", "1s"),
    ("DEVSYNC_WORKER__RETRY_MAX_DELAY", "5s"),
    ("DEVSYNC_TOPOLOGY__MAX_DELIVER", "20"),
];

/// A scenario's dependencies and services.
pub struct Env {
    pub dir: PathBuf,
    /// One server, or the three nodes of a JetStream cluster (`n1`..`n3`).
    pub nats: Vec<NatsServer>,
    /// The client URL(s), comma-separated.
    pub nats_url: String,
    postgres: Option<PostgresCluster>,
    postgres_options: PostgresOptions,
    pub database_url: String,
    services: BTreeMap<String, ServiceProcess>,
    extra: Vec<(String, String)>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("dir", &self.dir)
            .field("database_url", &self.database_url)
            .finish_non_exhaustive()
    }
}

impl Env {
    /// Starts fresh NATS and PostgreSQL under `dir` (emptied first), migrates, and registers
    /// `devices` simulated devices.
    pub async fn start(dir: &Path, devices: usize) -> anyhow::Result<Self> {
        Self::start_with(dir, devices, 1, None).await
    }

    /// Like [`Env::start`] with `nodes` nats-servers: 1, or 3 forming a JetStream cluster
    /// (services then declare R3 streams); a single server may get a JetStream file storage
    /// limit in bytes.
    pub async fn start_with(
        dir: &Path,
        devices: usize,
        nodes: usize,
        max_file_store: Option<u64>,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let nats = if nodes == 1 {
            let mut options = NatsOptions::in_dir(dir.join("nats"))?;
            if let Some(limit) = max_file_store {
                std::fs::create_dir_all(dir.join("nats"))?;
                let config = dir.join("nats").join("limits.conf");
                std::fs::write(
                    &config,
                    format!("jetstream {{\n  max_file_store: {limit}\n}}\n"),
                )?;
                options.config = Some(config);
            }
            vec![NatsServer::start(options).context("nats-server")?]
        } else {
            start_cluster(&dir, nodes).await?
        };
        let nats_url = nats
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let postgres_options = PostgresOptions {
            dir: dir.join("postgres"),
            port: None,
            ephemeral: false,
            settings: Vec::new(),
        };
        let postgres = PostgresCluster::start(postgres_options.clone()).context("postgres")?;
        let postgres_options = PostgresOptions {
            port: Some(postgres.port()),
            ..postgres_options
        };
        let database_url = postgres.url("devsync");
        devsync_store::ensure_database(&database_url).await?;
        devsync_store::migrate(&database_url).await?;
        devsync_sim::register(&database_url, devices).await?;
        let mut extra = Vec::new();
        if nodes > 1 {
            extra.push(("DEVSYNC_TOPOLOGY__REPLICAS".to_owned(), "3".to_owned()));
        }
        Ok(Self {
            dir,
            nats,
            nats_url,
            postgres: Some(postgres),
            postgres_options,
            database_url,
            services: BTreeMap::new(),
            extra,
        })
    }

    /// Adds a setting for services started from now on.
    pub fn set(&mut self, key: &str, value: &str) {
        self.extra.push((key.to_owned(), value.to_owned()));
    }

    fn service_env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("DEVSYNC_NATS__URL".to_owned(), self.nats_url.clone()),
            (
                "DEVSYNC_DATABASE__URL".to_owned(),
                self.database_url.clone(),
            ),
        ];
        env.extend(
            SERVICE_SETTINGS
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env.extend(self.extra.iter().cloned());
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env
    }

    /// Starts `binary` as `instance` and waits until it is ready.
    pub async fn spawn(
        &mut self,
        binary: &str,
        instance: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        self.spawn_nowait(binary, instance, extra)?
            .wait_ready(Duration::from_secs(60))
            .await
            .with_context(|| format!("{instance} ready"))
    }

    /// Starts `binary` as `instance` without waiting (it may crash at once by design).
    pub fn spawn_nowait(
        &mut self,
        binary: &str,
        instance: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<&mut ServiceProcess> {
        let env = self.service_env(extra);
        let process = ServiceProcess::spawn_as(binary, instance, &env, &self.dir)?;
        self.services.insert(instance.to_owned(), process);
        Ok(self.services.get_mut(instance).expect("inserted just now"))
    }

    /// Whether `instance` is running.
    pub fn is_running(&mut self, instance: &str) -> bool {
        self.services
            .get_mut(instance)
            .is_some_and(ServiceProcess::is_running)
    }

    /// SIGKILLs `instance`.
    pub fn kill(&mut self, instance: &str) {
        if let Some(process) = self.services.get_mut(instance) {
            process.kill();
        }
    }

    /// Peak RSS (MiB) of `instance` so far.
    pub fn peak_rss_mib(&self, instance: &str) -> f64 {
        self.services
            .get(instance)
            .map_or(0.0, |p| p.stats().peak_rss_mib)
    }

    /// Current RSS (MiB) of `instance`.
    pub fn rss_mib(&self, instance: &str) -> f64 {
        self.services
            .get(instance)
            .map_or(0.0, ServiceProcess::rss_mib)
    }

    /// Immediate shutdown of PostgreSQL (no checkpoint: crash recovery on the next start).
    pub fn postgres_crash(&mut self) -> anyhow::Result<()> {
        if let Some(cluster) = self.postgres.take() {
            cluster.stop(false).context("pg_ctl stop -m immediate")?;
            cluster.leave_running();
        }
        Ok(())
    }

    /// Starts PostgreSQL again on the same port and data.
    pub fn postgres_start(&mut self) -> anyhow::Result<()> {
        if self.postgres.is_none() {
            self.postgres = Some(
                PostgresCluster::start(self.postgres_options.clone())
                    .context("restart postgres")?,
            );
        }
        Ok(())
    }

    /// A connection to the scenario's database.
    pub async fn db(&self) -> anyhow::Result<deadpool_postgres::Object> {
        let pool = devsync_store::pool(&self.database_url, 1)?;
        Ok(pool.get().await?)
    }

    /// Stops every service gracefully.
    pub fn stop_services(&mut self) {
        for process in std::mem::take(&mut self.services).into_values() {
            process.stop();
        }
    }
}

/// Connects to `url` (one URL or a comma-separated list).
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let seeds: Vec<&str> = url.split(',').collect();
    Ok(async_nats::connect(seeds).await?)
}

/// Starts a JetStream cluster of `nodes` servers named `n1`.. on loopback, and waits until
/// it has a meta leader (JetStream answers).
async fn start_cluster(dir: &Path, nodes: usize) -> anyhow::Result<Vec<NatsServer>> {
    let client_ports: Vec<u16> = (0..nodes)
        .map(|_| devsync_localstack::free_port())
        .collect::<Result<_, _>>()?;
    let cluster_ports: Vec<u16> = (0..nodes)
        .map(|_| devsync_localstack::free_port())
        .collect::<Result<_, _>>()?;
    let routes = cluster_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut servers = Vec::new();
    for i in 0..nodes {
        let node_dir = dir.join(format!("nats-n{}", i + 1));
        std::fs::create_dir_all(&node_dir)?;
        let config = node_dir.join("cluster.conf");
        std::fs::write(
            &config,
            format!(
                "server_name: n{}\ncluster {{\n  name: devsync\n  listen: 127.0.0.1:{}\n  routes: [{routes}]\n}}\n",
                i + 1,
                cluster_ports[i]
            ),
        )?;
        let mut options = NatsOptions::in_dir(&node_dir)?;
        options.port = Some(client_ports[i]);
        options.config = Some(config);
        servers.push(NatsServer::start(options).with_context(|| format!("nats node n{}", i + 1))?);
    }
    let url = servers[0].url().to_owned();
    let ready = devsync_testkit::poll_until(Duration::from_secs(60), || async {
        let client = async_nats::connect(&url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        js.query_account().await.ok()
    })
    .await;
    ready.context("the JetStream cluster has no meta leader after 60s")?;
    Ok(servers)
}
