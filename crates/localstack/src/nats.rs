//! A `nats-server` child process with JetStream, on a random or given loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::{LocalError, find_in_path, poll, workspace_root};

/// Oldest nats-server devsync runs on.
pub const MIN_VERSION: (u32, u32) = (2, 12);
/// Overrides where the nats-server binary is.
pub const ENV_BINARY: &str = "DEVSYNC_NATS_SERVER";

/// How to start the server.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The binary.
    pub binary: PathBuf,
    /// JetStream storage and the ports file go here.
    pub dir: PathBuf,
    /// Client port; `None` picks a random free one.
    pub port: Option<u16>,
    /// An optional server config file (`-c`).
    pub config: Option<PathBuf>,
}

impl NatsOptions {
    /// Options for a server keeping its files in `dir`, with the binary found as documented.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self, LocalError> {
        Ok(Self {
            binary: find_binary()?,
            dir: dir.into(),
            port: None,
            config: None,
        })
    }
}

/// Finds a nats-server of at least [`MIN_VERSION`].
pub fn find_binary() -> Result<PathBuf, LocalError> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os(ENV_BINARY) {
        candidates.push(PathBuf::from(path));
    }
    candidates.push(workspace_root().join(".tools/bin/nats-server"));
    if let Some(path) = find_in_path("nats-server") {
        candidates.push(path);
    }
    let mut too_old = Vec::new();
    for candidate in candidates.into_iter().filter(|c| c.is_file()) {
        match version(&candidate) {
            Some(v) if v >= MIN_VERSION => return Ok(candidate),
            Some(v) => too_old.push(format!("{} is {}.{}", candidate.display(), v.0, v.1)),
            None => too_old.push(format!("{} has no readable version", candidate.display())),
        }
    }
    Err(LocalError::NotFound {
        what: "nats-server >= 2.12",
        hint: format!(
            "run `just setup` (installs it into .tools/bin) or set {ENV_BINARY}{}",
            if too_old.is_empty() {
                String::new()
            } else {
                format!(" ({})", too_old.join("; "))
            }
        ),
    })
}

fn version(binary: &Path) -> Option<(u32, u32)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[derive(Debug, Deserialize)]
struct PortsFile {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    monitoring: Vec<String>,
}

/// A running nats-server; killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    options: NatsOptions,
    url: String,
    monitor_url: String,
    port: u16,
}

impl NatsServer {
    /// Starts the server and waits until it accepts connections.
    pub fn start(options: NatsOptions) -> Result<Self, LocalError> {
        Self::spawn(options, None)
    }

    fn spawn(options: NatsOptions, fixed_port: Option<u16>) -> Result<Self, LocalError> {
        let store = options.dir.join("jetstream");
        let ports_dir = options.dir.join("ports");
        std::fs::create_dir_all(&store).map_err(LocalError::io("create nats store dir"))?;
        std::fs::create_dir_all(&ports_dir).map_err(LocalError::io("create nats ports dir"))?;
        for entry in std::fs::read_dir(&ports_dir).map_err(LocalError::io("read ports dir"))? {
            let _ = std::fs::remove_file(entry.map_err(LocalError::io("read ports dir"))?.path());
        }
        let log_path = options.dir.join("nats-server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(LocalError::io("open nats log"))?;
        let port = fixed_port.or(options.port);
        let mut command = Command::new(&options.binary);
        if let Some(config) = &options.config {
            command.arg("-c").arg(config);
        }
        command
            .args(["-a", "127.0.0.1", "-js", "-m", "-1"])
            .arg("-p")
            .arg(port.map_or("-1".to_owned(), |p| p.to_string()))
            .arg("-sd")
            .arg(&store)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = command.spawn().map_err(LocalError::io(format!(
            "start {}",
            options.binary.display()
        )))?;
        let ports = poll(Duration::from_secs(15), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let entry = std::fs::read_dir(&ports_dir).ok()?.flatten().next()?;
            let text = std::fs::read_to_string(entry.path()).ok()?;
            let ports: PortsFile = serde_json::from_str(&text).ok()?;
            (!ports.nats.is_empty()).then_some(Ok(ports))
        });
        let ports = match ports {
            Some(Ok(ports)) => ports,
            Some(Err(status)) => {
                return Err(LocalError::Failed {
                    what: "nats-server".into(),
                    detail: format!("exited with {status}; see {}", log_path.display()),
                });
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LocalError::Timeout {
                    what: "nats-server",
                    secs: 15,
                    log: log_path.display().to_string(),
                });
            }
        };
        let url = ports.nats[0].clone();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default();
        Ok(Self {
            child: Some(child),
            options,
            url,
            monitor_url: ports.monitoring.first().cloned().unwrap_or_default(),
            port,
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The monitoring endpoint (`/jsz`, `/varz`...).
    pub fn monitor_url(&self) -> &str {
        &self.monitor_url
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the server at once (SIGKILL), keeping its storage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.kill();
        let port = self.port;
        let restarted = Self::spawn(self.options.clone(), Some(port))?;
        *self = restarted;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
