//! moto's S3 server in the hub namespace: started, waited for, and given the test bucket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::command;
use crate::netns::Namespace;
use crate::process::Spawned;
use crate::topology::HUB_IPV4;

/// Inside the hub namespace nothing else listens, so a fixed port is free.
pub const PORT: u16 = 5000;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("creating moto log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting moto (python3 -m moto.server) in {ns}: {source}")]
    Spawn { ns: String, source: std::io::Error },
    #[error("moto did not answer on {url} within {timeout:?}; log {log}:\n{tail}")]
    NotReady {
        url: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("creating bucket {bucket} on moto: {source}")]
    Bucket {
        bucket: String,
        source: command::CommandError,
    },
}

/// Starts moto in `hub`, waits until it serves, creates `bucket`. Returns the process, its URL and
/// its log path.
pub fn start(
    hub: &Namespace,
    dir: &Path,
    bucket: &str,
) -> Result<(Spawned, String, PathBuf), MotoError> {
    let log = dir.join("moto.log");
    let out = std::fs::File::create(&log).map_err(|source| MotoError::Log {
        path: log.clone(),
        source,
    })?;
    let err = out.try_clone().map_err(|source| MotoError::Log {
        path: log.clone(),
        source,
    })?;
    let mut cmd = hub.command("python3");
    cmd.args([
        "-m",
        "moto.server",
        "-H",
        &HUB_IPV4.to_string(),
        "-p",
        &PORT.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    let child = cmd.spawn().map_err(|source| MotoError::Spawn {
        ns: hub.name().to_owned(),
        source,
    })?;
    let mut process = Spawned::new("moto", child);
    let url = format!("http://{HUB_IPV4}:{PORT}");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let probe = command::output(
            hub.command("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                ])
                .arg(format!("{url}/moto-api/")),
        );
        let answered = probe.is_ok_and(|o| o.stdout.first().is_some_and(|c| *c != b'0'));
        if answered {
            break;
        }
        if Instant::now() > deadline || process.try_status().is_some() {
            return Err(MotoError::NotReady {
                url,
                timeout: READY_TIMEOUT,
                tail: crate::agent::tail(&log, 40),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // moto does not check signatures unless asked to, so a plain PUT creates the bucket.
    command::run(hub.command("curl").args([
        "-sS",
        "--fail",
        "-X",
        "PUT",
        &format!("{url}/{bucket}"),
    ]))
    .map_err(|source| MotoError::Bucket {
        bucket: bucket.to_owned(),
        source,
    })?;
    Ok((process, url, log))
}
