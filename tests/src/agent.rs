//! A `hoshino-agent tunnel` process inside a node namespace: started with the testbed's S3
//! endpoint, waited for (`tunnel up` in its log), stopped with SIGTERM, scraped for metrics.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binaries::{self, BinaryError};
use crate::command;
use crate::metrics::Metrics;
use crate::process::{ProcessError, Spawned};
use crate::s3_backend::S3Endpoint;
use crate::topology::Node;

/// Inside each node namespace the metrics port is free, so every agent uses the same one.
pub const METRICS_LISTEN: &str = "127.0.0.1:9464";
pub const READY_LINE: &str = "tunnel up";
pub const TUN_NAME: &str = "hoshino0";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error("creating agent log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting hoshino-agent in {ns}: {source}")]
    Spawn { ns: String, source: std::io::Error },
    #[error("hoshino-agent in {ns} exited with {status} before `{READY_LINE}`; log {log}:\n{tail}")]
    Exited {
        ns: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("hoshino-agent in {ns} not up within {timeout:?}; log {log}:\n{tail}")]
    NotReady {
        ns: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("scraping metrics of the agent in {ns}: {source}")]
    Metrics {
        ns: String,
        source: command::CommandError,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

#[derive(Debug)]
pub struct Agent {
    process: Spawned,
    ns: String,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent in `node`'s namespace. `extra` args follow the testbed's own flags.
    pub fn start(
        node: &Node,
        endpoint: &S3Endpoint,
        log_dir: &Path,
        extra: &[&str],
    ) -> Result<Self, AgentError> {
        Self::start_with(node, endpoint, log_dir, extra, |agent| {
            node.ns.command(agent)
        })
    }

    /// As `start`, with the command that runs the agent binary made by `launch` (e.g. `nsenter`
    /// into a container inside `node`'s namespace); it must exec the binary, so that the child's
    /// pid is the agent's and SIGTERM reaches it.
    pub fn start_with(
        node: &Node,
        endpoint: &S3Endpoint,
        log_dir: &Path,
        extra: &[&str],
        launch: impl FnOnce(&Path) -> std::process::Command,
    ) -> Result<Self, AgentError> {
        let log = log_dir.join(format!("agent-n{}.log", node.index));
        let out = std::fs::File::create(&log).map_err(|source| AgentError::Log {
            path: log.clone(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| AgentError::Log {
            path: log.clone(),
            source,
        })?;
        let mut cmd = launch(&binaries::agent()?);
        cmd.arg("tunnel")
            .args(["--bucket", &endpoint.bucket])
            .args(["--endpoint-url", &endpoint.url])
            .args(["--region", &endpoint.region])
            .arg("--path-style")
            .arg("--machine-id-file")
            .arg(&node.machine_id_file)
            // Per node and per test, and kept across a restart of the same node's agent.
            .arg("--state-dir")
            .arg(log_dir.join(format!("state-n{}", node.index)))
            .args(["--metrics-listen", METRICS_LISTEN])
            .args(["--log-format", "text"])
            // Testbed nodes share the host's UTS namespace, so the host name would make every
            // node claim one name.
            .args(["--name", &format!("n{}", node.index)])
            .args(extra)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("HOSHINO_TEST_AGENT_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        endpoint.apply_env(&mut cmd);
        let child = cmd.spawn().map_err(|source| AgentError::Spawn {
            ns: node.ns.name().to_owned(),
            source,
        })?;
        Ok(Self {
            process: Spawned::new(format!("hoshino-agent n{}", node.index), child),
            ns: node.ns.name().to_owned(),
            log,
        })
    }

    /// Starts the agent and waits until it logs `tunnel up`.
    pub fn start_ready(
        node: &Node,
        endpoint: &S3Endpoint,
        log_dir: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let mut agent = Self::start(node, endpoint, log_dir, extra)?;
        agent.wait_ready(timeout)?;
        Ok(agent)
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(READY_LINE) {
                return Ok(());
            }
            if let Some(status) = self.process.try_status() {
                return Err(AgentError::Exited {
                    ns: self.ns.clone(),
                    status,
                    log: self.log.clone(),
                    tail: tail(&self.log, 40),
                });
            }
            if Instant::now() > deadline {
                return Err(AgentError::NotReady {
                    ns: self.ns.clone(),
                    timeout,
                    log: self.log.clone(),
                    tail: tail(&self.log, 40),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `None` while running.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.process.try_status()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGKILL by pid (no cleanup at all), then the exit status.
    pub fn kill(&mut self, timeout: Duration) -> Result<ExitStatus, AgentError> {
        Ok(self.process.kill(timeout)?)
    }

    /// The peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM by pid, then the exit status.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, AgentError> {
        Ok(self.process.terminate(timeout)?)
    }

    pub fn metrics(&self) -> Result<Metrics, AgentError> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
        ])
        .arg(format!("http://{METRICS_LISTEN}/metrics"));
        let text = command::run(&mut cmd).map_err(|source| AgentError::Metrics {
            ns: self.ns.clone(),
            source,
        })?;
        Ok(Metrics::parse(&text))
    }

    /// Resident set size from /proc, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
