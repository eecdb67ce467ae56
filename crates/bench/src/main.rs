//! `devsync-bench`: see the crate docs in `lib.rs`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devsync_bench::run(devsync_bench::Args::parse()).await
}
