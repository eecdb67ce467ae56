//! `devsync-fanout`: see the crate docs.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as in every devsync service and the bench (why: README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// devsync fan-out: consumes DEVSYNC_FANOUT and delivers new desired state to devices — the
/// devsync-desired KV bucket plus a notification on devsync.out.<device>.desired, and webhooks
/// to registered HTTP endpoints (timeouts, jittered retries, a circuit breaker per endpoint) —
/// under the push policy of the task, its campaign, or the global one in devsync-config.
///
/// Settings: defaults < TOML file (--config or DEVSYNC_CONFIG) < DEVSYNC_* variables; see the
/// README's configuration reference.
#[derive(Debug, Parser)]
#[command(name = "devsync-fanout", version)]
struct Args {
    #[command(flatten)]
    service: devsync_runtime::service::ServiceArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    devsync_runtime::service::main("devsync-fanout", args.service.config, devsync_fanout::run)
}
