//! `devsyncctl`: see the crate docs in `lib.rs`.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    devsync_ctl::main().await
}
