//! `devsyncctl up`: the local stack. Starts NATS (JetStream) and PostgreSQL as child processes
//! with their data in `.devsync/` (standard ports when free, other free ports otherwise), or
//! uses the servers named by `NATS_URL` / `DATABASE_URL`; migrates; declares the topology;
//! prints how to reach it; and keeps everything running until Ctrl-C, then stops what it
//! started.

use std::path::Path;

use anyhow::Context;
use devsync_localstack::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions, port_is_free};
use devsync_runtime::config::{ConfigSources, Secret};
use devsync_runtime::topology::Topology;
use devsync_runtime::{CommonSettings, shutdown};

use crate::cli::UpArgs;
use crate::commands::bootstrap::print_report;

/// What `up` started (stopped on drop) or found.
pub struct Stack {
    pub settings: CommonSettings,
    _nats: Option<NatsServer>,
    _postgres: Option<PostgresCluster>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("nats", &self.settings.nats.url)
            .finish()
    }
}

fn given(sources: &ConfigSources, names: [&str; 2]) -> bool {
    names
        .iter()
        .any(|name| sources.var(name).is_some_and(|v| !v.is_empty()))
}

/// Starts (or finds) NATS and PostgreSQL, migrates and bootstraps.
pub async fn start(
    mut settings: CommonSettings,
    sources: &ConfigSources,
    dir: &Path,
    fresh: bool,
) -> anyhow::Result<Stack> {
    if fresh && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;

    let nats = if given(sources, ["NATS_URL", "DEVSYNC_NATS__URL"]) {
        println!("nats:      using {}", settings.nats.url);
        None
    } else {
        let mut options = NatsOptions::in_dir(dir.join("nats"))?;
        options.port = port_is_free(4222).then_some(4222);
        let server = NatsServer::start(options).context("start nats-server")?;
        settings.nats.url = server.url().to_owned();
        println!(
            "nats:      started {} (monitoring {}), data in {}",
            server.url(),
            server.monitor_url(),
            dir.join("nats").display()
        );
        Some(server)
    };

    let postgres = if given(sources, ["DATABASE_URL", "DEVSYNC_DATABASE__URL"]) {
        println!("postgres:  using the server from DATABASE_URL");
        None
    } else {
        let cluster = PostgresCluster::start(PostgresOptions {
            dir: dir.join("postgres"),
            port: port_is_free(5432).then_some(5432),
            ephemeral: false,
        })
        .context("start postgres")?;
        settings.database.url = Secret::new(cluster.url("devsync"));
        println!(
            "postgres:  started {}, data in {}",
            cluster.url("devsync"),
            dir.join("postgres").display()
        );
        Some(cluster)
    };

    let url = settings.database.url.expose().to_owned();
    devsync_store::ensure_database(&url)
        .await
        .context("create database")?;
    let applied = devsync_store::migrate(&url).await.context("migrate")?;
    println!("migrate:   {} migration(s) applied", applied.len());

    let client = devsync_runtime::nats::connect(&settings.nats, "devsyncctl-up").await?;
    let js = async_nats::jetstream::new(client);
    let report = Topology::new(settings.topology.clone())
        .declare(&js)
        .await
        .context("declare topology")?;
    print_report(&report);
    Ok(Stack {
        settings,
        _nats: nats,
        _postgres: postgres,
    })
}

/// `devsyncctl up`.
pub async fn run(
    settings: CommonSettings,
    sources: &ConfigSources,
    args: UpArgs,
) -> anyhow::Result<()> {
    let stop = shutdown::on_signals();
    let stack = start(settings, sources, &args.dir, args.fresh).await?;
    let nats = &stack.settings.nats.url;
    let db = stack.settings.database.url.expose();
    println!();
    println!("devsync local stack is up. In another terminal:");
    println!("  export DEVSYNC_NATS__URL={nats} DEVSYNC_DATABASE__URL={db}");
    println!("  cargo run -q -p devsync-ctl -- status      # streams and consumers");
    println!("  psql {db}                                   # the source of truth");
    if args.no_wait {
        return Ok(());
    }
    println!();
    println!("press Ctrl-C to stop everything started here");
    stop.cancelled().await;
    println!("stopping");
    drop(stack);
    Ok(())
}
