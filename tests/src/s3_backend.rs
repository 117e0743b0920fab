//! The S3 server a testbed talks to: the s3s-fs binary or moto, started inside the hub namespace,
//! described to clients by an [`S3Endpoint`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::binaries::{self, BinaryError};
use crate::moto::{self, MotoError};
use crate::netns::Namespace;
use crate::process::Spawned;
use crate::s3_server::ServerConditions;
use crate::topology::HUB_IPV4;

pub const BUCKET: &str = "hoshino-test";
pub const REGION: &str = "us-east-1";
pub const ACCESS_KEY: &str = "hoshino";
pub const SECRET_KEY: &str = "hoshino-secret";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// `hoshino-s3-server` (s3s-fs over HTTP).
    S3sFs,
    /// moto's server, an independent implementation.
    Moto,
}

impl BackendKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::S3sFs => "s3s-fs",
            Self::Moto => "moto",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(transparent)]
    Moto(#[from] MotoError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting hoshino-s3-server in {ns}: {source}")]
    Spawn { ns: String, source: std::io::Error },
    #[error(
        "hoshino-s3-server did not announce its address within {timeout:?}; log {log}:\n{tail}"
    )]
    NotReady {
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("emulated latency and fault injection are only available with the s3s-fs server")]
    FaultsNeedS3sFs,
    #[error("only the s3s-fs server can be restarted in place")]
    RestartNeedsS3sFs,
    #[error("stopping the S3 server for a restart: {reason}")]
    Stop { reason: String },
    #[error("the restarted S3 server listens on {after}, not {before}")]
    MovedOnRestart { before: String, after: String },
}

/// What a client needs to reach the bucket (path-style addressing).
#[derive(Debug, Clone)]
pub struct S3Endpoint {
    pub url: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Endpoint {
    /// The standard AWS variables for a client process; nothing else from the host's AWS
    /// configuration leaks in.
    pub fn apply_env(&self, cmd: &mut Command) {
        for var in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", &self.region)
            .env("AWS_CONFIG_FILE", "/nonexistent/hoshino-aws-config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/hoshino-aws-credentials",
            )
            .env("AWS_EC2_METADATA_DISABLED", "true");
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BackendOptions {
    /// Fraction of requests answered with 503 SlowDown (s3s-fs only).
    pub fault_fraction: f64,
}

#[derive(Debug)]
pub struct S3Backend {
    pub kind: BackendKind,
    pub endpoint: S3Endpoint,
    pub log: PathBuf,
    process: Spawned,
}

impl S3Backend {
    /// Starts the server in `hub`; `dir` holds its data and log.
    pub fn start(
        kind: BackendKind,
        hub: &Namespace,
        dir: &Path,
        options: BackendOptions,
    ) -> Result<Self, BackendError> {
        let conditions = ServerConditions {
            slow_down_fraction: options.fault_fraction,
            ..ServerConditions::default()
        };
        Self::start_with(kind, hub, dir, &conditions)
    }

    /// Starts the server in `hub` with emulated latency and faults (s3s-fs only).
    pub fn start_with(
        kind: BackendKind,
        hub: &Namespace,
        dir: &Path,
        conditions: &ServerConditions,
    ) -> Result<Self, BackendError> {
        match kind {
            BackendKind::S3sFs => start_s3s_fs(hub, dir, &format!("{HUB_IPV4}:0"), conditions),
            BackendKind::Moto if !conditions.is_plain() => Err(BackendError::FaultsNeedS3sFs),
            BackendKind::Moto => {
                let (process, url, log) = moto::start(hub, dir, BUCKET)?;
                Ok(Self {
                    kind,
                    endpoint: endpoint(url),
                    log,
                    process,
                })
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops the s3s-fs server (SIGTERM), waits `down`, and starts it again on the same address
    /// and data directory, as a restarted S3 frontend would be: clients see refused connections
    /// in between, and every object PUT before the stop is still there.
    pub fn restart_s3s_fs(
        &mut self,
        hub: &Namespace,
        dir: &Path,
        conditions: &ServerConditions,
        down: Duration,
    ) -> Result<(), BackendError> {
        if self.kind != BackendKind::S3sFs {
            return Err(BackendError::RestartNeedsS3sFs);
        }
        let listen = self
            .endpoint
            .url
            .strip_prefix("http://")
            .unwrap_or(&self.endpoint.url)
            .to_owned();
        self.process
            .terminate(STOP_TIMEOUT)
            .map_err(|e| BackendError::Stop {
                reason: e.to_string(),
            })?;
        std::thread::sleep(down);
        let restarted = start_s3s_fs(hub, dir, &listen, conditions)?;
        if restarted.endpoint.url != self.endpoint.url {
            return Err(BackendError::MovedOnRestart {
                before: self.endpoint.url.clone(),
                after: restarted.endpoint.url,
            });
        }
        *self = restarted;
        Ok(())
    }
}

fn endpoint(url: String) -> S3Endpoint {
    S3Endpoint {
        url,
        bucket: BUCKET.to_owned(),
        region: REGION.to_owned(),
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
    }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |source| BackendError::Io { what, path, source }
}

/// Starts s3s-fs on `listen` (port 0 picks one); the log is appended to, so a restart keeps the
/// earlier run's lines.
fn start_s3s_fs(
    hub: &Namespace,
    dir: &Path,
    listen: &str,
    conditions: &ServerConditions,
) -> Result<S3Backend, BackendError> {
    let root = dir.join("s3s-root");
    let bucket_dir = root.join(BUCKET);
    std::fs::create_dir_all(&bucket_dir)
        .map_err(io_error("creating bucket directory", &bucket_dir))?;
    let log = dir.join("s3s-server.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_error("opening log", &log))?;
    let mut cmd = hub.command(binaries::s3_server()?);
    cmd.arg("--listen")
        .arg(listen)
        .arg("--root")
        .arg(&root)
        .arg("--access-key")
        .arg(ACCESS_KEY)
        .arg("--secret-key")
        .arg(SECRET_KEY)
        .args(conditions.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let mut child = cmd.spawn().map_err(|source| BackendError::Spawn {
        ns: hub.name().to_owned(),
        source,
    })?;
    let stdout = child.stdout.take();
    let process = Spawned::new("hoshino-s3-server", child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let addr = rx
        .recv_timeout(READY_TIMEOUT)
        .ok()
        .and_then(|line| line.strip_prefix("listening ").map(str::to_owned));
    match addr {
        Some(addr) => Ok(S3Backend {
            kind: BackendKind::S3sFs,
            endpoint: endpoint(format!("http://{addr}")),
            log,
            process,
        }),
        None => Err(BackendError::NotReady {
            timeout: READY_TIMEOUT,
            tail: crate::agent::tail(&log, 40),
            log,
        }),
    }
}
