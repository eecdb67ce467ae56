//! `devsync-bench`: see the crate docs in `lib.rs`.

use clap::Parser;

/// jemalloc, as in every devsync service and the bench (why: README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devsync_bench::run(devsync_bench::Args::parse()).await
}
