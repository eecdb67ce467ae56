//! `devsync-chaos`: see the crate docs in `lib.rs`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = devsync_chaos::Args::parse();
    let rows = devsync_chaos::run(args).await?;
    if rows.iter().any(|row| !row.passed()) {
        anyhow::bail!("a scenario lost or duplicated something; see the table above");
    }
    Ok(())
}
