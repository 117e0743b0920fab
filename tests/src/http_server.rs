//! `python3 -m http.server` inside a namespace: the web server the end-to-end tests and the demo
//! download from across the tunnel.

use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Stdio;

use crate::netns::Namespace;
use crate::process::Spawned;

/// Serves `dir` on `[bind]:port` inside `ns`, with its output discarded; stopped when the
/// returned guard drops.
pub fn serve_directory(
    ns: &Namespace,
    bind: Ipv6Addr,
    port: u16,
    dir: &Path,
) -> std::io::Result<Spawned> {
    let mut cmd = ns.command("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        &bind.to_string(),
        "--directory",
    ])
    .arg(dir)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    Ok(Spawned::new("http.server", cmd.spawn()?))
}
