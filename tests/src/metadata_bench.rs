//! The metadata-proxy latency figure of `hoshino-bench`: the time of a GET of an allowed path on
//! a fake metadata server, by a non-root user, without and with `hoshino-agent attach` on the
//! client's interface. Two throwaway namespaces joined by a veth pair; the metadata address
//! exists only in the server's namespace. Generic over what `attach` does to the request (judge
//! in the kernel, reinject, or terminate and rebuild): only the client's view is timed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::binaries;
use crate::command;
use crate::netns::Namespace;
use crate::process::Spawned;
use crate::scratch::ScratchDir;

const CLIENT_V4: &str = "10.233.0.2";
const SERVER_V4: &str = "10.233.0.1";
const IMDS_V4: &str = "169.254.169.254";
/// Allowed for every user by `examples/policies/metadata.toml`.
pub const ALLOWED_PATH: &str = "/latest/meta-data/instance-id";
/// An unprivileged uid: root is judged in the kernel, others go through the proxy.
const UID: u32 = 65534;
const READY_LINE: &str = "interceptor attached";

#[derive(Debug, thiserror::Error)]
pub enum MetadataBenchError {
    #[error("setting up the metadata namespaces: {0}")]
    Setup(String),
    #[error("GET {url} as uid {UID} failed ({mode}): {detail}")]
    Fetch {
        url: String,
        mode: &'static str,
        detail: String,
    },
    #[error("hoshino-agent attach did not log `{READY_LINE}` within 30 s; log {log}:\n{tail}")]
    AttachNotReady { log: PathBuf, tail: String },
}

/// Request times in milliseconds, as curl measures them (`time_total`, process start excluded).
#[derive(Debug, Clone)]
pub struct ProxyLatency {
    pub direct_ms: Vec<f64>,
    pub attached_ms: Vec<f64>,
}

impl ProxyLatency {
    pub fn p50(v: &[f64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn setup(what: &str) -> impl FnOnce(crate::netns::NetnsError) -> MetadataBenchError + '_ {
    move |e| MetadataBenchError::Setup(format!("{what}: {e}"))
}

/// Measures `samples` GETs without, then with, the agent attached with `policy`.
pub fn measure(policy: &Path, samples: usize) -> Result<ProxyLatency, MetadataBenchError> {
    let scratch =
        ScratchDir::create("imds-bench").map_err(|e| MetadataBenchError::Setup(e.to_string()))?;
    let client = Namespace::create("mbc").map_err(setup("client namespace"))?;
    let imds = Namespace::create("mbs").map_err(setup("metadata namespace"))?;
    client
        .ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            imds.name(),
        ])
        .map_err(setup("veth pair"))?;
    for (ns, v4) in [(&client, CLIENT_V4), (&imds, SERVER_V4)] {
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])
            .map_err(setup("address"))?;
        ns.ip(&["link", "set", "eth0", "up"])
            .map_err(setup("link up"))?;
    }
    imds.ip(&["addr", "add", &format!("{IMDS_V4}/32"), "dev", "lo"])
        .map_err(setup("metadata address"))?;
    client
        .ip(&["route", "add", &format!("{IMDS_V4}/32"), "via", SERVER_V4])
        .map_err(setup("metadata route"))?;
    let root = scratch.path().join("www");
    let file = root.join(ALLOWED_PATH.trim_start_matches('/'));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(file.parent().unwrap_or(&root))?;
        std::fs::write(&file, "i-0123456789abcdef0")
    };
    write().map_err(|e| MetadataBenchError::Setup(format!("fixture {}: {e}", file.display())))?;
    let log = File::create(scratch.path().join("imds.log"))
        .map_err(|e| MetadataBenchError::Setup(format!("server log: {e}")))?;
    let err = log
        .try_clone()
        .map_err(|e| MetadataBenchError::Setup(format!("server log: {e}")))?;
    let child = imds
        .command("python3")
        .args([
            "-m",
            "http.server",
            "80",
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| MetadataBenchError::Setup(format!("python3 -m http.server: {e}")))?;
    let _server = Spawned::new("fake imds", child);
    let url = format!("http://{IMDS_V4}{ALLOWED_PATH}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch_ms(&client, &url).is_err() {
        if Instant::now() > deadline {
            return Err(MetadataBenchError::Setup(
                "fake metadata server did not answer within 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let direct_ms = timed(&client, &url, samples, "direct")?;
    let pins = crate::bpffs::PinRoot::create("bench-imds")
        .map_err(|e| MetadataBenchError::Setup(format!("test bpffs: {e}")))?;
    let agent = attach(&client, scratch.path(), policy, pins.path())?;
    let attached_ms = timed(&client, &url, samples, "attached");
    drop(agent);
    Ok(ProxyLatency {
        direct_ms,
        attached_ms: attached_ms?,
    })
}

fn timed(
    ns: &Namespace,
    url: &str,
    samples: usize,
    mode: &'static str,
) -> Result<Vec<f64>, MetadataBenchError> {
    // One warm-up request: the first one pays for ARP and the server's imports.
    fetch_ms(ns, url).map_err(|detail| MetadataBenchError::Fetch {
        url: url.to_owned(),
        mode,
        detail,
    })?;
    (0..samples)
        .map(|_| {
            fetch_ms(ns, url).map_err(|detail| MetadataBenchError::Fetch {
                url: url.to_owned(),
                mode,
                detail,
            })
        })
        .collect()
}

/// One GET as `UID` over a fresh connection; curl's own `time_total` in ms.
fn fetch_ms(ns: &Namespace, url: &str) -> Result<f64, String> {
    let mut cmd = ns.command("setpriv");
    cmd.args([
        &format!("--reuid={UID}"),
        &format!("--regid={UID}"),
        "--clear-groups",
        "curl",
        "-sS",
        "-f",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total}",
        url,
    ]);
    let out = command::output(&mut cmd).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .map(|s| s * 1000.0)
        .map_err(|e| format!("curl -w output: {e}"))
}

fn attach(
    ns: &Namespace,
    dir: &Path,
    policy: &Path,
    pins: &Path,
) -> Result<Spawned, MetadataBenchError> {
    let log = dir.join("agent-attach.log");
    let setup_err = |e: std::io::Error| MetadataBenchError::Setup(format!("agent log: {e}"));
    let out = File::create(&log).map_err(setup_err)?;
    let err = out.try_clone().map_err(setup_err)?;
    let agent = binaries::agent().map_err(|e| MetadataBenchError::Setup(e.to_string()))?;
    let child = ns
        .command(agent)
        .args(["attach", "--interface", "eth0", "--policy"])
        .arg(policy)
        // The classifier goes with the agent: the bench leaves nothing pinned.
        .arg("--detach-on-exit")
        .arg("--pin-dir")
        .arg(pins)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| MetadataBenchError::Setup(format!("starting hoshino-agent attach: {e}")))?;
    let process = Spawned::new("hoshino-agent attach", child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(READY_LINE)) {
            return Ok(process);
        }
        if Instant::now() > deadline {
            return Err(MetadataBenchError::AttachNotReady {
                tail: crate::agent::tail(&log, 30),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
