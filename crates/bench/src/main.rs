//! `devsync-bench`: see the crate docs in `lib.rs`.

use clap::Parser;

/// jemalloc: under load glibc's malloc spent a large share of the services' CPU merging
/// freed chunks; with jemalloc the requestor and reconciler use ~15-20% less CPU and no more
/// memory (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devsync_bench::run(devsync_bench::Args::parse()).await
}
