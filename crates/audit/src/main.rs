//! `devsync-audit`: see the crate docs.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as in every devsync service and the bench (why: README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// devsync audit: consumes DEVSYNC_AUDIT, stores every event once in PostgreSQL (partitioned by
/// day, hash-chained, append-only) and serves searches over HTTP (/v1/audit,
/// /v1/devices/<id>/timeline) and NATS (devsync.api.audit.search).
///
/// Settings: defaults < TOML file (--config or DEVSYNC_CONFIG) < DEVSYNC_* variables; see the
/// README's configuration reference. DEVSYNC_AUDIT_RETENTION (e.g. 30d) sets the retention.
#[derive(Debug, Parser)]
#[command(name = "devsync-audit", version)]
struct Args {
    #[command(flatten)]
    service: devsync_runtime::service::ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    devsync_runtime::service::main("devsync-audit", args.service.config, devsync_audit::run)
}
