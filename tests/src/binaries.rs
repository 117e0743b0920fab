//! Where the binaries under test live: an environment variable wins, else the directory of the
//! running executable (`target/<profile>/`, or its parent when running from `deps/`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{name} not found at {path} (build it, or set {env})")]
    Missing {
        name: String,
        path: PathBuf,
        env: String,
    },
    #[error("cannot find the running executable: {0}")]
    CurrentExe(std::io::Error),
}

/// The agent: `HOSHINO_AGENT_BIN`, else `hoshino-agent` in the target directory.
pub fn agent() -> Result<PathBuf, BinaryError> {
    locate("hoshino-agent", "HOSHINO_AGENT_BIN")
}

pub fn s3_server() -> Result<PathBuf, BinaryError> {
    locate("hoshino-s3-server", "HOSHINO_S3_SERVER_BIN")
}

pub fn s3_probe() -> Result<PathBuf, BinaryError> {
    locate("hoshino-s3-probe", "HOSHINO_S3_PROBE_BIN")
}

pub fn netprobe() -> Result<PathBuf, BinaryError> {
    locate("hoshino-netprobe", "HOSHINO_NETPROBE_BIN")
}

fn locate(name: &str, env: &str) -> Result<PathBuf, BinaryError> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => target_dir()?.join(name),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(BinaryError::Missing {
            name: name.to_owned(),
            path,
            env: env.to_owned(),
        })
    }
}

fn target_dir() -> Result<PathBuf, BinaryError> {
    let exe = std::env::current_exe().map_err(BinaryError::CurrentExe)?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}
