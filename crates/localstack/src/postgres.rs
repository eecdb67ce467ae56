//! A private PostgreSQL cluster (`initdb` + `pg_ctl`) in a directory of our own, on a loopback
//! port. `initdb` refuses to run as root, so as root the cluster runs as the `postgres` user
//! (or `nobody`) through `runuser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{LocalError, find_in_path, free_port};

/// Overrides where `initdb` and `pg_ctl` are.
pub const ENV_BINDIR: &str = "DEVSYNC_PG_BINDIR";

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Directory holding the data directory, socket and log; created if missing.
    pub dir: PathBuf,
    /// Port; `None` picks a free one.
    pub port: Option<u16>,
    /// Turns off fsync and friends: fast, and fine for tests and throwaway stacks.
    pub ephemeral: bool,
    /// More server settings, as `-c name=value`.
    pub settings: Vec<(String, String)>,
}

/// A running private cluster; stopped on drop unless [`PostgresCluster::leave_running`].
#[derive(Debug)]
pub struct PostgresCluster {
    bindir: PathBuf,
    data: PathBuf,
    run_as: Option<String>,
    port: u16,
    stop_on_drop: bool,
}

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> Result<PathBuf, LocalError> {
    if let Some(dir) = std::env::var_os(ENV_BINDIR) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(initdb) = find_in_path("initdb") {
        let resolved = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = resolved.parent()
            && dir.join("pg_ctl").is_file()
        {
            return Ok(dir.to_path_buf());
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().ok_or_else(|| LocalError::NotFound {
        what: "PostgreSQL server binaries (initdb, pg_ctl)",
        hint: format!(
            "install PostgreSQL 15+ (apt-get install postgresql) or set {ENV_BINDIR}, or give DATABASE_URL"
        ),
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl PostgresCluster {
    /// Initialises the cluster if needed, starts it and waits until it accepts connections.
    pub fn start(options: PostgresOptions) -> Result<Self, LocalError> {
        let bindir = find_bindir()?;
        let run_as = if is_root() {
            ["postgres", "nobody"]
                .into_iter()
                .find(|u| user_exists(u))
                .map(str::to_owned)
        } else {
            None
        };
        std::fs::create_dir_all(&options.dir).map_err(LocalError::io("create postgres dir"))?;
        if let Some(user) = &run_as {
            // The unprivileged user must own the directory and reach it.
            run(
                Command::new("chown").arg("-R").arg(user).arg(&options.dir),
                "chown",
            )?;
            let mut dir = options.dir.clone();
            while let Some(parent) = dir.parent() {
                if parent.as_os_str().is_empty() || parent == Path::new("/") {
                    break;
                }
                let _ = Command::new("chmod").arg("o+x").arg(parent).status();
                dir = parent.to_path_buf();
            }
        }
        let data = options.dir.join("data");
        let mut cluster = Self {
            bindir,
            data,
            run_as,
            port: 0,
            stop_on_drop: false,
        };
        if !cluster.data.join("PG_VERSION").is_file() {
            let mut initdb = cluster.command("initdb");
            initdb
                .arg("-D")
                .arg(&cluster.data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .args(["--locale=C"]);
            run(&mut initdb, "initdb")?;
        }
        let port = match options.port {
            Some(port) => port,
            None => free_port().map_err(LocalError::io("pick a port"))?,
        };
        let mut settings = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200",
            options.dir.display()
        );
        if options.ephemeral {
            settings.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        for (name, value) in &options.settings {
            settings.push_str(&format!(" -c {name}={value}"));
        }
        let log = options.dir.join("postgres.log");
        let mut start = cluster.command("pg_ctl");
        start
            .arg("-D")
            .arg(&cluster.data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(settings)
            .args(["-w", "-t", "60", "start"]);
        run(&mut start, "pg_ctl start").map_err(|e| LocalError::Failed {
            what: "postgres".into(),
            detail: format!("{e}; see {}", log.display()),
        })?;
        cluster.port = port;
        cluster.stop_on_drop = true;
        Ok(cluster)
    }

    fn command(&self, tool: &str) -> Command {
        let binary = self.bindir.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.arg("-u").arg(user).arg("--").arg(binary);
                command
            }
            None => Command::new(binary),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Do not stop the cluster when this handle is dropped.
    pub fn leave_running(mut self) {
        self.stop_on_drop = false;
    }

    /// Stops the cluster: `fast` waits for clients to go, otherwise an immediate shutdown.
    pub fn stop(&self, fast: bool) -> Result<(), LocalError> {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(&self.data).args([
            "-m",
            if fast { "fast" } else { "immediate" },
            "-w",
            "stop",
        ]);
        run(&mut stop, "pg_ctl stop").map(|_| ())
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if self.stop_on_drop
            && let Err(error) = self.stop(true)
        {
            tracing::warn!(%error, "cannot stop postgres");
        }
    }
}

fn run(command: &mut Command, what: &str) -> Result<Output, LocalError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(LocalError::io(what.to_owned()))?;
    if !output.status.success() {
        return Err(LocalError::Failed {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            ),
        });
    }
    Ok(output)
}
