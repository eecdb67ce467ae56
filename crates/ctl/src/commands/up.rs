//! `devsyncctl up`: the local stack. Starts NATS (JetStream) and PostgreSQL as child processes
//! with their data in `.devsync/` (standard ports when free, other free ports otherwise), or
//! uses the servers named by `NATS_URL` / `DATABASE_URL`; migrates; declares the topology;
//! prints how to reach it; and keeps everything running until Ctrl-C, then stops what it
//! started.

use std::path::Path;

use anyhow::Context;
use devsync_localstack::{NatsOptions, NatsServer, PostgresCluster, PostgresOptions, port_is_free};
use devsync_proto::Message as _;
use devsync_runtime::config::{ConfigSources, Secret};
use devsync_runtime::topology::Topology;
use devsync_runtime::{CommonSettings, shutdown};
use devsync_types::{names, subjects};
use futures::StreamExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
            settings: Vec::new(),
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
    let nats = stack.settings.nats.url.clone();
    let db = stack.settings.database.url.expose().to_owned();
    let services = if args.no_services {
        None
    } else {
        Some(Services::start(&stack.settings, &args, stop.child_token()).await?)
    };
    println!();
    println!("devsync is up. In another terminal:");
    println!("  export DEVSYNC_NATS__URL={nats} DEVSYNC_DATABASE__URL={db}");
    println!("  cargo run -q -p devsync-ctl -- status");
    println!(
        "  psql {db} -c \"UPDATE devices SET desired = '{{\\\"mode\\\": \\\"eco\\\"}}' WHERE id = 'sim-000001'\""
    );
    println!(
        "  psql {db} -c \"SELECT id, desired_version, applied_desired_version, reported FROM devices WHERE id = 'sim-000001'\""
    );
    println!(
        "  cargo run -q -p devsync-ctl -- devices set-desired sim-000002 --merge '{{\"mode\": \"eco\"}}'"
    );
    println!("  cargo run -q -p devsync-ctl -- devices show sim-000002");
    println!(
        "  cargo run -q -p devsync-ctl -- campaign create eco-1 --selector labels:fleet=sim --patch '{{\"mode\": \"eco\"}}' --waves canary,10%,100% --rate 200"
    );
    println!("  cargo run -q -p devsync-ctl -- campaign status eco-1 --watch");
    println!("  cargo run -q -p devsync-ctl -- audit --device sim-000002 --since 10m");
    if args.no_wait {
        if let Some(services) = services {
            services.stop().await;
        }
        return Ok(());
    }
    println!();
    println!("press Ctrl-C to stop everything started here");
    if let Some(services) = &services {
        services.watch(&stack, &stop).await;
    } else {
        stop.cancelled().await;
    }
    println!("stopping");
    if let Some(services) = services {
        services.stop().await;
    }
    drop(stack);
    Ok(())
}

/// The services and the simulated fleet, run in this process.
struct Services {
    requestor: devsync_requestor::Running,
    reconciler: devsync_reconciler::Running,
    fanout: devsync_fanout::Running,
    audit: devsync_audit::Running,
    fleet: Option<devsync_sim::Fleet>,
    token: devsync_runtime::Shutdown,
}

impl Services {
    async fn start(
        settings: &CommonSettings,
        args: &UpArgs,
        token: devsync_runtime::Shutdown,
    ) -> anyhow::Result<Self> {
        let local = |name: &str| {
            let mut common = settings.clone();
            common.instance = Some(name.to_owned());
            common.http.listen = "127.0.0.1:0".parse().expect("valid address");
            common
        };
        let requestor = devsync_requestor::start(
            devsync_requestor::Settings {
                common: local("requestor-local"),
                requestor: Default::default(),
            },
            token.clone(),
        )
        .await
        .context("start requestor")?;
        let reconciler = devsync_reconciler::start(
            devsync_reconciler::Settings {
                common: local("reconciler-local"),
                reconciler: Default::default(),
            },
            token.clone(),
        )
        .await
        .context("start reconciler")?;
        let fanout = devsync_fanout::start(
            devsync_fanout::Settings {
                common: local("fanout-local"),
                fanout: Default::default(),
            },
            token.clone(),
        )
        .await
        .context("start fan-out")?;
        let audit = devsync_audit::start(
            devsync_audit::Settings {
                common: local("audit-local"),
                audit: Default::default(),
            },
            token.clone(),
        )
        .await
        .context("start audit")?;
        println!(
            "services:  requestor http://{}/metrics, reconciler http://{}/metrics, fan-out http://{}/metrics, audit http://{}/v1/audit",
            requestor.http_addr, reconciler.http_addr, fanout.http_addr, audit.http_addr
        );
        let fleet = if args.devices > 0 {
            devsync_sim::register(settings.database.url.expose(), args.devices).await?;
            let fleet = devsync_sim::Fleet::start(
                &settings.nats.url,
                args.devices,
                8,
                devsync_sim::Behaviour {
                    sleep: std::time::Duration::from_secs(args.device_sleep),
                    ..Default::default()
                },
            )
            .await?;
            println!(
                "devices:   {} simulated devices (sim-000000...)",
                fleet.size
            );
            Some(fleet)
        } else {
            None
        };
        Ok(Self {
            requestor,
            reconciler,
            fanout,
            audit,
            fleet,
            token,
        })
    }

    /// Prints a status line every two seconds until `stop`.
    async fn watch(&self, stack: &Stack, stop: &devsync_runtime::Shutdown) {
        let Ok(client) =
            devsync_runtime::nats::connect(&stack.settings.nats, "devsyncctl-watch").await
        else {
            stop.cancelled().await;
            return;
        };
        let js = async_nats::jetstream::new(client.clone());
        let pool = devsync_store::pool(stack.settings.database.url.expose(), 1).ok();
        // Pushes delivered over NATS: every desired-state notification to any device.
        let pushes = Arc::new(AtomicU64::new(0));
        if let Ok(mut notifications) = client.subscribe(subjects::DEVICE_DESIRED_ALL).await {
            let pushes = pushes.clone();
            tokio::spawn(async move {
                while notifications.next().await.is_some() {
                    pushes.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(2));
        let mut last_reports = 0u64;
        let mut last_pushes = 0u64;
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let mut depth = Vec::new();
            for stream in [names::STREAM_REQ, names::STREAM_FANOUT, names::STREAM_AUDIT] {
                let messages = match js.get_stream(stream).await {
                    Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                    Err(_) => 0,
                };
                depth.push(format!(
                    "{}={messages}",
                    stream.trim_start_matches("DEVSYNC_")
                ));
            }
            let converged = match &pool {
                Some(pool) => match pool.get().await {
                    Ok(client) => client
                        .query_one(
                            "SELECT count(*) FILTER (WHERE applied_desired_version = desired_version), count(*) FROM devices",
                            &[],
                        )
                        .await
                        .map(|r| format!("{}/{}", r.get::<_, i64>(0), r.get::<_, i64>(1)))
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                },
                None => String::new(),
            };
            let (awake, reports, errors, size) = match &self.fleet {
                Some(fleet) => (
                    fleet.counters.awake.load(Ordering::Relaxed),
                    fleet.counters.reports.load(Ordering::Relaxed),
                    fleet.counters.errors.load(Ordering::Relaxed),
                    fleet.size,
                ),
                None => (0, 0, 0, 0),
            };
            let rate = (reports - last_reports) / 2;
            last_reports = reports;
            let pushed = pushes.load(Ordering::Relaxed);
            let push_rate = (pushed - last_pushes) / 2;
            last_pushes = pushed;
            println!(
                "devices awake {awake}/{size} | reports/s {rate} | pushes/s {push_rate} | queued {} | converged {converged} | device errors {errors}",
                depth.join(" ")
            );
            if let Some(error) = last_dead_letter(&js).await
                && last_error.as_ref() != Some(&error)
            {
                println!("last error: {error}");
                last_error = Some(error);
            }
        }
    }

    async fn stop(self) {
        if let Some(fleet) = self.fleet {
            fleet.stop().await;
        }
        self.token.cancel();
        let _ = self.requestor.wait().await;
        let _ = self.reconciler.wait().await;
        let _ = self.fanout.wait().await;
        let _ = self.audit.wait().await;
    }
}

/// The newest dead letter, as "<stream> seq <n>: <error>", if there is one.
async fn last_dead_letter(js: &async_nats::jetstream::Context) -> Option<String> {
    let mut stream = js.get_stream(names::STREAM_DLQ).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    if last == 0 {
        return None;
    }
    let message = stream.get_raw_message(last).await.ok()?;
    let letter = devsync_proto::v1::DeadLetter::decode(message.payload).ok()?;
    Some(format!(
        "{} seq {}: {}",
        letter.stream, letter.stream_sequence, letter.error
    ))
}
