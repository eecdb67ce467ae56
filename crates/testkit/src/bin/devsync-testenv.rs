//! Runs a command with a private, throwaway PostgreSQL cluster: starts it, exports
//! `DEVSYNC_TEST_DATABASE_URL`, runs the command, stops the cluster, exits with the command's
//! status. `just test` wraps the test suite in it so tests never depend on a system server.
//! If `DEVSYNC_TEST_DATABASE_URL` or `DATABASE_URL` is already set, that server is used instead.

use std::process::{Command, ExitCode};

use devsync_localstack::{PostgresCluster, PostgresOptions, workspace_root};
use devsync_testkit::ENV_TEST_DATABASE_URL;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("usage: devsync-testenv <command> [args...]");
        return ExitCode::from(64);
    };
    let given = [ENV_TEST_DATABASE_URL, "DATABASE_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
    let mut cluster = None;
    let url = match given {
        Some(url) => url,
        None => {
            let dir =
                workspace_root().join(format!("target/devsync-testenv-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            match PostgresCluster::start(PostgresOptions {
                dir: dir.clone(),
                port: None,
                ephemeral: true,
                settings: Vec::new(),
            }) {
                Ok(started) => {
                    let url = started.url("postgres");
                    eprintln!("devsync-testenv: private postgres at {url}");
                    cluster = Some((started, dir));
                    url
                }
                Err(error) => {
                    eprintln!("devsync-testenv: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let status = Command::new(program)
        .args(rest)
        .env(ENV_TEST_DATABASE_URL, &url)
        .status();
    if let Some((started, dir)) = cluster {
        drop(started);
        let _ = std::fs::remove_dir_all(dir);
    }
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(error) => {
            eprintln!("devsync-testenv: cannot run {program}: {error}");
            ExitCode::FAILURE
        }
    }
}
