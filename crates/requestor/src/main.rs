//! `devsync-requestor`: see the crate docs.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as in every devsync service and the bench (why: README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// devsync requestor: receives what devices publish on devsync.in.<device>.<kind>, validates
/// it and turns it into durable sync requests; answers refreshes; records check-ins; relays
/// desired-state changes made in the database; moves exhausted messages to the DLQ.
///
/// Settings: defaults < TOML file (--config or DEVSYNC_CONFIG) < DEVSYNC_* variables; see the
/// README's configuration reference.
#[derive(Debug, Parser)]
#[command(name = "devsync-requestor", version)]
struct Args {
    #[command(flatten)]
    service: devsync_runtime::service::ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    devsync_runtime::service::main(
        "devsync-requestor",
        args.service.config,
        devsync_requestor::run,
    )
}
