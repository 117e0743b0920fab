//! The metadata proxy's cost: sequential HTTP GETs of an allowed metadata path by a non-root
//! user, each on a fresh connection, directly (no program) and through `hoshino-agent attach`
//! with `examples/policies/metadata.toml` (terminated, judged, rebuilt, relayed). Two
//! namespaces joined by a veth pair; the fake metadata address exists only in the server's.
//! Rounds alternate the two configurations and the medians are reported.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::binaries;
use crate::command;
use crate::netns::Namespace;
use crate::process::Spawned;
use crate::scratch::ScratchDir;

const CLIENT: &str = "10.234.0.2";
const SERVER: &str = "10.234.0.1";
const IMDS: &str = "169.254.169.254";
const PATH: &str = "/latest/meta-data/instance-id";

/// Median request times in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct MetadataFigures {
    pub requests: usize,
    pub direct_us: f64,
    pub proxied_us: f64,
}

impl MetadataFigures {
    pub fn print(&self) {
        println!(
            "\nMetadata proxy: GET {PATH} by uid 1000 on a fresh connection, {} per run, median of runs",
            self.requests
        );
        println!("  direct (no program)       {:.2} ms", self.direct_us / 1e3);
        println!(
            "  through the agent         {:.2} ms",
            self.proxied_us / 1e3
        );
        println!(
            "  through / direct = {:.2}x, +{:.2} ms  (target: at most a few ms slower)",
            self.proxied_us / self.direct_us,
            (self.proxied_us - self.direct_us) / 1e3
        );
    }
}

struct Bed {
    server: Option<Spawned>,
    client: Namespace,
    _imds: Namespace,
    scratch: ScratchDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.server.take();
    }
}

impl Bed {
    fn new() -> anyhow::Result<Self> {
        let scratch = ScratchDir::create("mdbench")?;
        let client = Namespace::create("mbc")?;
        let imds = Namespace::create("mbs")?;
        client.ip(&[
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
        ])?;
        for (ns, addr) in [(&client, CLIENT), (&imds, SERVER)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        imds.ip(&["addr", "add", &format!("{IMDS}/32"), "dev", "lo"])?;
        client.ip(&["route", "add", &format!("{IMDS}/32"), "via", SERVER])?;
        let root = scratch.path().join("www");
        let file = root.join(PATH.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().context("a parent")?)?;
        std::fs::write(&file, "i-0123456789abcdef0")?;
        let child = imds
            .command("python3")
            .args(["-m", "http.server", "80", "--bind", IMDS, "--directory"])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the metadata server")?;
        let bed = Self {
            server: Some(Spawned::new("metadata server", child)),
            client,
            _imds: imds,
            scratch,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bed.probe(1).is_err() {
            if Instant::now() > deadline {
                bail!("metadata server did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(bed)
    }

    /// Median microseconds of `count` requests by uid 1000.
    fn probe(&self, count: usize) -> anyhow::Result<f64> {
        let out = command::run(
            self.client
                .command("setpriv")
                .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
                .arg(binaries::netprobe()?)
                .args([
                    "http-get",
                    "--to",
                    &format!("{IMDS}:80"),
                    "--path",
                    PATH,
                    "--count",
                    &count.to_string(),
                ]),
        )?;
        out.lines()
            .find_map(|l| l.strip_prefix("median_us "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no median in netprobe output:\n{out}"))
    }
}

/// Runs `rounds` alternating rounds of `count` requests each.
pub fn run(policy: &Path, rounds: u32, count: usize) -> anyhow::Result<MetadataFigures> {
    let bed = Bed::new()?;
    let agent_bin = binaries::agent()?;
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        direct.push(bed.probe(count)?);
        let log_path = bed.scratch.path().join(format!("agent-{round}.log"));
        let log = File::create(&log_path)?;
        let child = bed
            .client
            .command(&agent_bin)
            .args(["attach", "--interface", "eth0", "--policy"])
            .arg(policy)
            .env(
                "RUST_LOG",
                "warn,hoshino_agent::interceptor::attach_cmd=info,hoshino::audit=info",
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting hoshino-agent attach")?;
        let mut agent = Spawned::new("hoshino-agent attach", child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("interceptor attached")
        {
            if agent.try_status().is_some() || Instant::now() > deadline {
                bail!(
                    "agent did not attach:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let through = bed.probe(count);
        agent.terminate(Duration::from_secs(10))?;
        proxied.push(through?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(MetadataFigures {
        requests: count,
        direct_us: median(&mut direct),
        proxied_us: median(&mut proxied),
    })
}
