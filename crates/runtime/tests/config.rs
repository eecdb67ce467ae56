//! Configuration layering (default < file < environment) and one-line errors naming the
//! setting, with the environment given as data (no process environment is touched).

use std::io::Write;
use std::time::Duration;

use devsync_runtime::config::{self, CommonSettings, ConfigSources, LogFormat};

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

#[test]
fn defaults_apply_without_file_or_environment() {
    let settings: CommonSettings = config::load(&ConfigSources::from_pairs(
        None,
        Vec::<(String, String)>::new(),
    ))
    .unwrap();
    assert_eq!(settings, CommonSettings::default());
    assert_eq!(settings.topology.partitions.get(), 16);
}

#[test]
fn file_overrides_defaults_and_environment_overrides_file() {
    let toml = file(
        r#"
        [nats]
        url = "nats://file:4222"
        [log]
        format = "json"
        level = "debug"
        [topology]
        partitions = 16
        ack_wait = "45s"
        "#,
    );
    let sources = ConfigSources::from_pairs(
        Some(toml.path()),
        [
            ("DEVSYNC_NATS__URL", "nats://env:4222"),
            ("DEVSYNC_TOPOLOGY__ACK_WAIT", "1m"),
            ("DEVSYNC_DATABASE__POOL_SIZE", "3"),
            ("DEVSYNC_DATABASE__URL", "postgres://u:secret@db/devsync"),
            ("UNRELATED", "ignored"),
        ],
    );
    let settings: CommonSettings = config::load(&sources).unwrap();
    assert_eq!(settings.nats.url, "nats://env:4222", "env beats file");
    assert_eq!(settings.log.format, LogFormat::Json, "file beats default");
    assert_eq!(settings.log.level, "debug");
    assert_eq!(settings.topology.partitions.get(), 16);
    assert_eq!(settings.topology.ack_wait, Duration::from_secs(60));
    assert_eq!(settings.database.pool_size, 3);
    assert!(
        !format!("{settings:?}").contains("secret"),
        "secrets never appear in debug output"
    );
}

#[test]
fn conventional_aliases_are_below_devsync_variables() {
    let sources = ConfigSources::from_pairs(
        None,
        [
            ("DATABASE_URL", "postgres://alias/db"),
            ("NATS_URL", "nats://alias:4222"),
            ("DEVSYNC_NATS__URL", "nats://devsync:4222"),
        ],
    );
    let settings: CommonSettings = config::load(&sources).unwrap();
    assert_eq!(settings.database.url.expose(), "postgres://alias/db");
    assert_eq!(settings.nats.url, "nats://devsync:4222");
}

#[test]
fn a_bad_value_gets_one_line_naming_the_setting() {
    let sources = ConfigSources::from_pairs(None, [("DEVSYNC_TOPOLOGY__PARTITIONS", "lots")]);
    let err = config::load::<CommonSettings>(&sources)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("setting topology.partitions (DEVSYNC_TOPOLOGY__PARTITIONS):"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    let sources = ConfigSources::from_pairs(None, [("DEVSYNC_TOPOLOGY__PARTITIONS", "0")]);
    let err = config::load::<CommonSettings>(&sources)
        .unwrap_err()
        .to_string();
    assert!(err.contains("between 1 and 1024"), "{err}");

    let sources = ConfigSources::from_pairs(None, [("DEVSYNC_DATABASE__URL", "mysql://x")]);
    let err = config::load::<CommonSettings>(&sources)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "setting database.url (DEVSYNC_DATABASE__URL): must start with postgres:// or postgresql://"
    );

    let toml = file("[worker]\nbatch_size = \"many\"\n");
    let err = config::load::<CommonSettings>(&ConfigSources::from_pairs(
        Some(toml.path()),
        Vec::<(String, String)>::new(),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("setting worker.batch_size"), "{err}");

    let missing = ConfigSources::from_pairs(
        Some(std::path::Path::new("/nonexistent/devsync.toml")),
        Vec::<(String, String)>::new(),
    );
    let err = config::load::<CommonSettings>(&missing)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "config file /nonexistent/devsync.toml: no such file");
}

#[test]
fn numbers_and_durations_from_the_environment_are_typed() {
    let sources = ConfigSources::from_pairs(
        None,
        [
            ("DEVSYNC_TOPOLOGY__PARTITIONS", "4"),
            ("DEVSYNC_TOPOLOGY__PIN_TIMEOUT", "2s"),
            ("DEVSYNC_WORKER__PULL_EXPIRES", "1s"),
            ("DEVSYNC_TOPOLOGY__DECLARE_ON_START", "false"),
        ],
    );
    let settings: CommonSettings = config::load(&sources).unwrap();
    assert_eq!(settings.topology.partitions.get(), 4);
    assert_eq!(settings.topology.pin_timeout, Duration::from_secs(2));
    assert!(!settings.topology.declare_on_start);
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Section {
    share: f64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct ServiceSettings {
    #[serde(flatten)]
    common: CommonSettings,
    svc: Section,
}

impl config::Settings for ServiceSettings {
    fn validate(&self) -> Result<(), config::ConfigError> {
        self.common.validate()
    }
    fn common(&self) -> &CommonSettings {
        &self.common
    }
    fn extract(figment: &figment::Figment) -> Result<Self, figment::Error> {
        Ok(Self {
            common: figment.extract_lossy()?,
            svc: config::section(figment, "svc")?,
        })
    }
}

#[test]
fn service_sections_load_typed_values_from_the_environment() {
    let sources = ConfigSources::from_pairs(
        None,
        [
            ("DEVSYNC_TOPOLOGY__PARTITIONS", "4"),
            ("DEVSYNC_SVC__SHARE", "0.5"),
        ],
    );
    let settings: ServiceSettings = config::load(&sources).unwrap();
    assert_eq!(settings.common.topology.partitions.get(), 4);
    assert_eq!(settings.svc.share, 0.5);
}

#[test]
fn a_service_runs_on_the_worker_threads_it_is_configured_with() {
    let load = |value: &str| {
        config::load::<CommonSettings>(&ConfigSources::from_pairs(
            None,
            [("DEVSYNC_RUNTIME__WORKER_THREADS", value)],
        ))
    };
    let workers = |settings: &CommonSettings| {
        let runtime = settings.runtime.build().unwrap();
        runtime.metrics().num_workers()
    };
    assert_eq!(
        workers(&CommonSettings::default()),
        1,
        "one thread by default"
    );
    assert_eq!(workers(&load("3").unwrap()), 3);
    let per_cpu = std::thread::available_parallelism().unwrap().get();
    assert_eq!(workers(&load("0").unwrap()), per_cpu, "0: one per CPU");

    let err = load("1000").unwrap_err().to_string();
    assert!(
        err.starts_with("setting runtime.worker_threads (DEVSYNC_RUNTIME__WORKER_THREADS):"),
        "{err}"
    );
    assert!(err.contains("at most 256"), "{err}");
    let err = load("many").unwrap_err().to_string();
    assert!(err.contains("runtime.worker_threads"), "{err}");
}
