//! `devsync-reconciler`: see the crate docs.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as in every devsync service and the bench (why: README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// devsync reconciler: owns partitions of the request stream (shared with the other replicas
/// through the devsync-members KV bucket), applies each batch to PostgreSQL in one transaction,
/// and publishes the resulting pushes, audit events and follow-up stages.
///
/// Settings: defaults < TOML file (--config or DEVSYNC_CONFIG) < DEVSYNC_* variables; see the
/// README's configuration reference.
#[derive(Debug, Parser)]
#[command(name = "devsync-reconciler", version)]
struct Args {
    #[command(flatten)]
    service: devsync_runtime::service::ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    devsync_runtime::service::main(
        "devsync-reconciler",
        args.service.config,
        devsync_reconciler::run,
    )
}
