//! Typed configuration shared by every devsync program.
//!
//! Layers, lowest first: the settings' `Default`, an optional TOML file (`DEVSYNC_CONFIG` names
//! it), then `DEVSYNC_*` environment variables where `__` separates nesting levels
//! (`DEVSYNC_NATS__URL` is `nats.url`). The conventional `NATS_URL` and `DATABASE_URL` are
//! accepted too, below their `DEVSYNC_` spellings. The environment is passed in as data
//! ([`ConfigSources`]) so tests never touch the process environment.
//!
//! Loading validates the whole struct and fails with one line naming the bad setting, both as
//! a TOML key and as an environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devsync_types::{PartitionCount, ServiceName, WorkerId};
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of every devsync environment variable.
pub const ENV_PREFIX: &str = "DEVSYNC_";
/// Names the optional TOML configuration file.
pub const ENV_CONFIG_FILE: &str = "DEVSYNC_CONFIG";
/// Conventional aliases, applied below their `DEVSYNC_` spellings.
const ENV_ALIASES: [(&str, &str); 2] = [("NATS_URL", "nats.url"), ("DATABASE_URL", "database.url")];

/// A configuration that could not be loaded. Displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("setting {key} ({env}): {message}")]
    Value {
        key: String,
        env: String,
        message: String,
    },
}

impl ConfigError {
    /// A validation failure for the setting at `key` (dotted TOML path).
    pub fn invalid(key: &str, message: impl fmt::Display) -> Self {
        Self::Value {
            key: key.to_owned(),
            env: env_name(key),
            message: message.to_string(),
        }
    }
}

/// The environment variable that sets the dotted `key`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// Where settings come from, captured once so loading is a pure function of it.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; only relevant ones are read).
    pub env: Vec<(String, String)>,
}

impl ConfigSources {
    /// The process's environment, and the file named by `DEVSYNC_CONFIG` unless `file` is given.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = file.or_else(|| {
            env.iter()
                .find(|(k, _)| k == ENV_CONFIG_FILE)
                .map(|(_, v)| PathBuf::from(v))
        });
        Self { file, env }
    }

    /// Sources made of explicit pairs (for tests and embedding).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            file: file.map(Path::to_path_buf),
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    /// The value of one variable.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Feeds `DEVSYNC_*` variables to figment as strings; typed conversion happens on extraction.
struct EnvProvider(Vec<(String, String)>);

impl EnvProvider {
    fn new(sources: &ConfigSources) -> Self {
        let mut pairs = Vec::new();
        for (alias, key) in ENV_ALIASES {
            if let Some(value) = sources.var(alias) {
                pairs.push((key.to_owned(), value.to_owned()));
            }
        }
        for (name, value) in &sources.env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if name == ENV_CONFIG_FILE || rest.is_empty() {
                continue;
            }
            pairs.push((rest.to_ascii_lowercase().replace("__", "."), value.clone()));
        }
        Self(pairs)
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment")
            .interpolater(|_: &Profile, keys: &[&str]| env_name(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.0 {
            insert(&mut dict, key, Value::from(value.clone()));
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Inserts `value` at the dotted `key`, creating intermediate tables.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// A settings struct a program can load.
///
/// A service's settings are the common settings plus one section of its own (`[requestor]`,
/// `DEVSYNC_REQUESTOR__*`). Serialize them flattened (for the defaults layer) but extract them
/// with [`Settings::extract`] as `common` + [`section`], because serde's `flatten` would
/// bypass figment's typed conversion of environment strings.
pub trait Settings: DeserializeOwned + Serialize + Default {
    /// Checks relations and ranges serde cannot express. Names the bad key on failure.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Builds the settings from the merged layers.
    fn extract(figment: &Figment) -> Result<Self, figment::Error> {
        figment.extract_lossy()
    }

    /// The common part (logging, connections).
    fn common(&self) -> &CommonSettings;
}

/// Loads `S` from its defaults, the file and the environment, then validates it.
pub fn load<S: Settings>(sources: &ConfigSources) -> Result<S, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(S::default()));
    if let Some(path) = &sources.file {
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.clone(),
                message: "no such file".into(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(EnvProvider::new(sources));
    let settings = S::extract(&figment).map_err(|err| from_figment(err, sources))?;
    settings.validate()?;
    Ok(settings)
}

fn from_figment(err: figment::Error, sources: &ConfigSources) -> ConfigError {
    let err = err
        .into_iter()
        .next()
        .expect("a figment error has at least one entry");
    if err.path.is_empty()
        && let Some(path) = &sources.file
    {
        return ConfigError::File {
            path: path.clone(),
            message: err.kind.to_string(),
        };
    }
    let key = err.path.join(".");
    ConfigError::Value {
        env: env_name(&key),
        key,
        message: err.kind.to_string(),
    }
}

/// Extracts the section `key` of a service's settings (see [`Settings`]).
pub fn section<T: DeserializeOwned>(figment: &Figment, key: &str) -> Result<T, figment::Error> {
    figment.extract_inner_lossy(key)
}

/// A string that must never be logged (passwords, URLs with credentials).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    #[default]
    Pretty,
    /// One JSON object per line, for containers.
    Json,
}

/// NATS connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// A `.creds` file (JWT + nkey seed), for operator-mode deployments.
    pub creds_file: Option<PathBuf>,
    /// User name, for static-config deployments.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<Secret>,
    /// How long to wait for the first connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for a JetStream API answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            creds_file: None,
            user: None,
            password: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// PostgreSQL connection pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/dbname`.
    pub url: Secret,
    /// Maximum pooled connections.
    pub pool_size: usize,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/devsync"),
            pool_size: 8,
        }
    }
}

/// The health / metrics / API HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `info,devsync_runtime=debug`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// Storage of the JetStream assets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// File-backed (the default; survives restarts).
    #[default]
    File,
    /// In memory (tests and throwaway stacks only).
    Memory,
}

/// The JetStream topology's settings (see `topology`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopologySettings {
    /// Partitions of `DEVSYNC_REQ`; fixed once bootstrapped.
    pub partitions: PartitionCount,
    /// Stream replicas: 1 locally, 3 in a cluster.
    pub replicas: usize,
    /// File or memory storage.
    pub storage: StorageKind,
    /// How long unprocessed messages are kept (ingress, requests, fan-out, audit).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long dead letters are kept.
    #[serde(with = "humantime_serde")]
    pub dlq_max_age: Duration,
    /// How long claim-checked blobs are kept.
    #[serde(with = "humantime_serde")]
    pub blob_max_age: Duration,
    /// Publish deduplication window (`Nats-Msg-Id`).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Largest message the streams accept, in bytes.
    pub max_message_size: i32,
    /// How long a worker may hold a message before it is redelivered (progress acks extend it).
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// Unacknowledged messages a consumer may have out at once.
    pub max_ack_pending: i64,
    /// How long a reconcile partition stays pinned to a replica that stopped pulling.
    #[serde(with = "humantime_serde")]
    pub pin_timeout: Duration,
    /// Time to live of a reconciler's membership entry without a heartbeat.
    #[serde(with = "humantime_serde")]
    pub member_ttl: Duration,
    /// Services declare the topology at start (true), or only verify it (false: for
    /// least-privilege NATS users, where `devsyncctl bootstrap` declares it once).
    pub declare_on_start: bool,
}

impl Default for TopologySettings {
    fn default() -> Self {
        Self {
            partitions: PartitionCount::default(),
            replicas: 1,
            storage: StorageKind::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            blob_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            max_message_size: 1024 * 1024,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_ack_pending: 5000,
            pin_timeout: Duration::from_secs(6),
            member_ttl: Duration::from_secs(10),
            declare_on_start: true,
        }
    }
}

/// The worker loop's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Most messages handed to a handler at once.
    pub batch_size: usize,
    /// How long one pull request waits on the server for messages.
    #[serde(with = "humantime_serde")]
    pub pull_expires: Duration,
    /// First nak delay after a transient error.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Largest nak delay.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            batch_size: 256,
            pull_expires: Duration::from_secs(2),
            retry_min_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(60),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShutdownSettings {
    /// How long in-flight work may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(25),
        }
    }
}

/// The async runtime a service runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeSettings {
    /// Tokio worker threads; `0` for one per CPU the process may use. One by default: a
    /// service waits on NATS and PostgreSQL far more than it computes, and scales by
    /// replicas. With a thread per CPU the idle threads kept being woken to steal a task and
    /// parked again, about 10% of the reconciler's CPU at half the peak report rate.
    pub worker_threads: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self { worker_threads: 1 }
    }
}

/// Most worker threads a service may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

impl RuntimeSettings {
    /// Builds the multi-threaded runtime these settings describe.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if self.worker_threads > 0 {
            builder.worker_threads(self.worker_threads);
        }
        builder.enable_all().build()
    }
}

/// The settings every devsync program has. Services embed it with `#[serde(flatten)]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonSettings {
    /// This process's instance name (the pod name in Kubernetes); defaults to host name + pid.
    pub instance: Option<String>,
    pub nats: NatsSettings,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub topology: TopologySettings,
    pub worker: WorkerSettings,
    pub shutdown: ShutdownSettings,
    pub runtime: RuntimeSettings,
}

impl CommonSettings {
    /// The worker id this process acts as.
    pub fn worker_id(&self, service: ServiceName) -> WorkerId {
        let instance = self.instance.clone().unwrap_or_else(default_instance);
        WorkerId::new(service, sanitize(&instance)).unwrap_or_else(|_| {
            WorkerId::new(service, format!("pid-{}", std::process::id()))
                .expect("pid-N is a valid instance")
        })
    }

    /// Validates the common part; services call it from their own `validate`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::invalid(
                "runtime.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU)"),
            ));
        }
        if self.nats.url.trim().is_empty() {
            return Err(ConfigError::invalid("nats.url", "must not be empty"));
        }
        if self.nats.password.is_some() && self.nats.user.is_none() {
            return Err(ConfigError::invalid(
                "nats.user",
                "is required with nats.password",
            ));
        }
        if self.nats.creds_file.is_some() && self.nats.user.is_some() {
            return Err(ConfigError::invalid(
                "nats.creds_file",
                "use either a creds file or a user, not both",
            ));
        }
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.database.pool_size == 0 {
            return Err(ConfigError::invalid(
                "database.pool_size",
                "must be at least 1",
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::invalid(
                "log.level",
                format!("{:?} is not a valid filter directive", self.log.level),
            ));
        }
        let t = &self.topology;
        if !(1..=5).contains(&t.replicas) {
            return Err(ConfigError::invalid(
                "topology.replicas",
                "must be between 1 and 5",
            ));
        }
        if t.max_deliver < 2 {
            return Err(ConfigError::invalid(
                "topology.max_deliver",
                "must be at least 2",
            ));
        }
        if t.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "topology.ack_wait",
                "must be at least 1s",
            ));
        }
        if t.duplicate_window > t.max_age {
            return Err(ConfigError::invalid(
                "topology.duplicate_window",
                "must not exceed topology.max_age",
            ));
        }
        if !(1..=10_000).contains(&self.worker.batch_size) {
            return Err(ConfigError::invalid(
                "worker.batch_size",
                "must be between 1 and 10000",
            ));
        }
        if self.worker.pull_expires < Duration::from_secs(1)
            || self.worker.pull_expires >= t.ack_wait
        {
            return Err(ConfigError::invalid(
                "worker.pull_expires",
                "must be at least 1s and shorter than topology.ack_wait",
            ));
        }
        if self.worker.pull_expires * 2 > t.pin_timeout {
            return Err(ConfigError::invalid(
                "topology.pin_timeout",
                "must be at least twice worker.pull_expires, or pinned partitions flap",
            ));
        }
        if self.worker.retry_min_delay > self.worker.retry_max_delay {
            return Err(ConfigError::invalid(
                "worker.retry_min_delay",
                "must not exceed worker.retry_max_delay",
            ));
        }
        Ok(())
    }
}

impl Settings for CommonSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        CommonSettings::validate(self)
    }

    fn common(&self) -> &CommonSettings {
        self
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

/// Keeps only characters allowed in a worker instance.
fn sanitize(instance: &str) -> String {
    instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(devsync_types::ids::MAX_DEVICE_ID_LEN)
        .collect()
}
