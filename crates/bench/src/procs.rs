//! devsync services as separate processes (as deployed), with their resource use sampled from
//! `/proc` and their metrics scraped over HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// A running service process.
#[derive(Debug)]
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    pub http: String,
    ticks_per_second: f64,
}

/// Resource use of one service over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcStats {
    pub name: String,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// The directory of this executable: the service binaries are built next to it.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

impl ServiceProcess {
    /// Starts `binary` with `env`, its log in `log_dir`, HTTP on a free port.
    pub fn spawn(binary: &str, env: &[(String, String)], log_dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_as(binary, &format!("{binary}-bench"), env, log_dir)
    }

    /// Starts `binary` as `instance` (its worker id and log file name) with `env`, its log in
    /// `log_dir` (appended to, so a restarted instance keeps one log), HTTP on a free port.
    pub fn spawn_as(
        binary: &str,
        instance: &str,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let port = devsync_localstack::free_port()?;
        let http = format!("127.0.0.1:{port}");
        let log_name = if instance.ends_with("-bench") {
            format!("{binary}.log")
        } else {
            format!("{instance}.log")
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(log_name))?;
        let child = Command::new(bin_dir().join(binary))
            .envs(env.iter().cloned())
            .env("DEVSYNC_HTTP__LISTEN", &http)
            .env("DEVSYNC_INSTANCE", instance)
            .env("DEVSYNC_LOG__FORMAT", "json")
            .env("DEVSYNC_LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {} (build it first: cargo build --bins)", binary))?;
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        Ok(Self {
            name: binary.to_owned(),
            child,
            http,
            ticks_per_second: ticks,
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}/readyz", self.http);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited with {status}", self.name);
            }
            if let Ok(response) = reqwest::get(&url).await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        scrape(&self.http).await
    }

    /// Waits until this service's counter `name` reaches `target`, reading `/metrics` every
    /// `every`; fails after `timeout` (counted from `since`) with the last value read.
    pub async fn wait_for_counter(
        &self,
        name: &str,
        target: u64,
        since: Instant,
        timeout: Duration,
        every: Duration,
    ) -> anyhow::Result<()> {
        loop {
            let metrics = self.metrics().await.unwrap_or_default();
            let value = counter(&metrics, name).unwrap_or(0.0) as u64;
            if value >= target {
                return Ok(());
            }
            if since.elapsed() > timeout {
                anyhow::bail!(
                    "{}: {name} reached {value} of {target} within {timeout:?}",
                    self.name
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`), 0 when unreadable.
    fn status_kib(&self, field: &str) -> f64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| {
                l.strip_prefix(field)
                    .is_some_and(|rest| rest.starts_with(':'))
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    }

    /// The resident set size now, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_kib("VmRSS") / 1024.0
    }

    /// Peak RSS and CPU time so far.
    pub fn stats(&self) -> ProcStats {
        let pid = self.child.id();
        let peak_kib = self.status_kib("VmHWM");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces): utime is the 12th, stime 13th.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        ProcStats {
            name: self.name.clone(),
            peak_rss_mib: peak_kib / 1024.0,
            cpu_seconds: ticks / self.ticks_per_second,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM (graceful drain) and waits.
    pub fn stop(mut self) -> ProcStats {
        let stats = self.stats();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        stats
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Prometheus text of `/metrics` of the service serving HTTP on `http` (host:port).
pub async fn scrape(http: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{http}/metrics"))
        .await?
        .text()
        .await?)
}

/// The `q` quantile (0..1) of histogram `name` in a Prometheus text exposition: the upper
/// bound of the first bucket holding it (None when the histogram is empty or absent).
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    quantile(&buckets(text, name), q)
}

/// The `q` quantile of what histogram `name` recorded between two scrapes of one process.
pub fn histogram_quantile_between(before: &str, after: &str, name: &str, q: f64) -> Option<f64> {
    let before = buckets(before, name);
    let after: Vec<(f64, f64)> = buckets(after, name)
        .into_iter()
        .map(|(le, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, count - earlier)
        })
        .collect();
    quantile(&after, q)
}

/// Cumulative buckets `(le, count)` of histogram `name`, by bound.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

/// The value of counter `name` in `text`.
pub fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}
