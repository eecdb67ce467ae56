//! `devsync-sim`: run a simulated fleet against a devsync installation.

use std::time::Duration;

use clap::Parser;
use devsync_sim::{Behaviour, Fleet};

/// Run simulated devices against devsync: they refresh on wake-up, apply and acknowledge
/// desired state, report sensor readings and check in, then sleep.
#[derive(Debug, Parser)]
#[command(name = "devsync-sim", version)]
struct Args {
    /// NATS URL the devices connect to.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Register the simulated devices in this database first (they must be registered).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Number of devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// NATS connections shared by the devices.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Reports per wake cycle.
    #[arg(long, default_value_t = 3)]
    reports_per_wake: u32,
    /// Sleep between wake cycles (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sleep: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.database_url {
        devsync_sim::register(url, args.devices).await?;
    }
    let fleet = Fleet::start(
        &args.nats_url,
        args.devices,
        args.connections,
        Behaviour {
            reports_per_wake: args.reports_per_wake,
            sleep: args.sleep,
            ..Behaviour::default()
        },
    )
    .await?;
    println!("{} simulated devices running; Ctrl-C to stop", fleet.size);
    tokio::signal::ctrl_c().await?;
    fleet.stop().await;
    Ok(())
}
