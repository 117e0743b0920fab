//! Shared by the integration tests that need moto without a testbed: a moto server on a free
//! loopback port (no namespace needed, nothing leaves 127.0.0.1).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto server on a free loopback port, killed (by pid) on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free loopback port: {e}"));
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start python3 -m moto.server (scripts/bootstrap.sh installs moto): {e}"
                )
            });
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST /moto-api/reset-auth` with body `0`: from now on every request must be signed by a key
/// IAM issued and pass IAM policy evaluation.
#[allow(dead_code)] // not every test binary that includes this module enforces IAM itself
pub fn enforce_iam(endpoint: &str) {
    reset_auth(endpoint, "0");
}

/// `POST /moto-api/reset-auth` with body `inf`: IAM enforcement off again (any request passes).
#[allow(dead_code)]
pub fn relax_iam(endpoint: &str) {
    reset_auth(endpoint, "inf");
}

fn reset_auth(endpoint: &str, unauthenticated_requests: &str) {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "-X", "POST"])
        .args([
            "-H",
            "Content-Type: text/plain",
            "--data",
            unauthenticated_requests,
        ])
        .arg(format!("{endpoint}/moto-api/reset-auth"))
        .output()
        .unwrap_or_else(|e| panic!("running curl: {e}"));
    assert!(
        out.status.success(),
        "reset-auth {unauthenticated_requests} on {endpoint}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
