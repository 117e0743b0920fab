//! The control socket: a unix socket `<state dir>/control.sock`, mode 0600 (owner only). A
//! client connects and reads one JSON `StatusReport`; the agent closes the connection.

use std::collections::VecDeque;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::directory::unix_millis_now;
use crate::metrics::Metrics;

use super::activity::Activity;
use super::report::{Identity, StatusReport, s3_requests_total};

pub const SOCKET_NAME: &str = "control.sock";
/// The request rate is averaged over this window.
const RATE_WINDOW: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// A report is a few KiB; a client that does not read it within this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error(
        "no agent is running with state directory {dir} (no control socket at {path}: {reason})"
    )]
    NotRunning {
        dir: PathBuf,
        path: PathBuf,
        reason: String,
    },
    #[error("the agent's control socket {path} failed: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

/// Binds `<state_dir>/control.sock` with mode 0600. A leftover socket file (from an agent that
/// died) is replaced; any other file there is an error.
pub fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = socket_path(state_dir);
    let err = |reason: String| ControlError::Bind {
        path: path.clone(),
        reason,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| err(e.to_string()))?;
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(err("a file that is not a socket is in the way".into()));
        }
        std::fs::remove_file(&path).map_err(|e| err(e.to_string()))?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

pub struct ControlServer {
    pub listener: UnixListener,
    pub path: PathBuf,
    pub me: Identity,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
}

impl ControlServer {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
        samples.push_back((Instant::now(), s3_requests_total(&self.metrics)));
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            let accepted = tokio::select! {
                _ = tick.tick() => {
                    samples.push_back((Instant::now(), s3_requests_total(&self.metrics)));
                    while samples.len() > (RATE_WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 1 {
                        samples.pop_front();
                    }
                    continue;
                }
                accepted = self.listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let rate = rate(&samples, s3_requests_total(&self.metrics));
            let report = StatusReport::build(
                &self.me,
                &self.metrics,
                self.activity.snapshot(),
                rate,
                unix_millis_now(),
            );
            let Ok(body) = serde_json::to_vec(&report) else {
                continue;
            };
            // One client at a time is plenty for a status command; a stuck one is cut off.
            let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rate(samples: &VecDeque<(Instant, u64)>, total: u64) -> f64 {
    let Some((since, first)) = samples.front() else {
        return 0.0;
    };
    let secs = since.elapsed().as_secs_f64();
    if secs < 0.5 {
        return 0.0;
    }
    total.saturating_sub(*first) as f64 / secs
}

/// Asks the agent whose state directory is `state_dir`.
pub async fn query(state_dir: &Path) -> Result<StatusReport, ControlError> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|e| ControlError::NotRunning {
            dir: state_dir.to_path_buf(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let protocol = |reason: String| ControlError::Protocol {
        path: path.clone(),
        reason,
    };
    let mut body = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        (&mut stream).take(1 << 20).read_to_end(&mut body),
    )
    .await
    .map_err(|_| protocol("no answer within 5 s".into()))?
    .map_err(|e| protocol(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| protocol(format!("not a status report: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_addr::{NetworkPrefix, NodeAddr, NodeId};

    #[tokio::test]
    async fn a_client_reads_the_report_through_an_owner_only_socket() {
        let dir = std::env::temp_dir().join(format!("hoshino-control-{}", std::process::id()));
        let listener = bind(&dir).expect("bind");
        let mode = std::fs::metadata(socket_path(&dir))
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (stop, rx) = watch::channel(false);
        let activity = Arc::new(Activity::default());
        activity.sent(NodeId(2), 80, unix_millis_now());
        let server = tokio::spawn(
            ControlServer {
                listener,
                path: socket_path(&dir),
                me: Identity {
                    name: "n1".into(),
                    addr: NodeAddr {
                        prefix: NetworkPrefix::default(),
                        id: NodeId(1),
                    },
                    started_at_unix_ms: unix_millis_now(),
                },
                metrics: Arc::new(Metrics::default()),
                activity,
            }
            .run(rx),
        );
        let report = query(&dir).await.expect("status");
        assert_eq!(report.name, "n1");
        assert_eq!(report.peers[0].sent_bytes, 80);
        let _ = stop.send(true);
        server.await.expect("server stops");
        assert!(!socket_path(&dir).exists(), "the socket is removed on exit");
        assert!(matches!(
            query(&dir).await,
            Err(ControlError::NotRunning { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
