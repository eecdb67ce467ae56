//! Running the built `devsyncctl` against a test database, and checking its answers: shared
//! by the command tests.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use devsync_testkit::TestDb;

pub fn command(db: &TestDb, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_devsyncctl"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVSYNC_DATABASE__URL", &db.url);
    command
}

pub fn ctl(db: &TestDb, args: &[&str]) -> Output {
    command(db, args).output().expect("run devsyncctl")
}

/// Runs `args` with `input` on standard input.
pub fn ctl_stdin(db: &TestDb, args: &[&str], input: &str) -> Output {
    let mut child = command(db, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run devsyncctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for devsyncctl")
}

pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The standard output of a run that must succeed.
pub fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a run was refused with exit status 1 and one line on stderr containing `needle`.
pub fn refused(output: Output, needle: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{}", describe(&output));
    assert!(
        err.starts_with("devsyncctl: ") && err.contains(needle),
        "expected {needle:?} in: {err}"
    );
    assert!(output.stdout.is_empty(), "{}", describe(&output));
}
