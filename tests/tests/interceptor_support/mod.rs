//! Shared pieces of the interceptor end-to-end tests: a client namespace wired to a namespace
//! holding a fake instance-metadata HTTP server (at 169.254.169.254 and fd00:ec2::254, which
//! exist only inside these namespaces), and an `attach` agent process.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hoshino_tests::agent::METRICS_LISTEN;
use hoshino_tests::binaries;
use hoshino_tests::bpffs::PinRoot;
use hoshino_tests::command;
use hoshino_tests::netns::Namespace;
use hoshino_tests::process::Spawned;
use hoshino_tests::scratch::ScratchDir;
use hoshino_tests::topology::Node;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, TunnelNet};

pub const CLIENT_V4: &str = "10.232.0.2";
pub const SERVER_V4: &str = "10.232.0.1";
pub const CLIENT_V6: &str = "fd00:232::2";
pub const SERVER_V6: &str = "fd00:232::1";
pub const IMDS_V4: &str = "169.254.169.254";
pub const IMDS_V6: &str = "fd00:ec2::254";
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";
pub const CREDENTIALS: &str = "hoshino-test-role";
pub const METRICS_PORT: u16 = 9464;
/// The "container" namespace and the host side of its link (see [`MetadataBed::add_container`]).
pub const CTR_V4: &str = "10.233.0.2";
pub const CTR_HOST_V4: &str = "10.233.0.1";
pub const CTR_V6: &str = "fd00:233::2";
pub const CTR_HOST_V6: &str = "fd00:233::1";

/// The repository root (examples live there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn example_policy(name: &str) -> PathBuf {
    repo_root().join("examples/policies").join(name)
}

/// Client and fake metadata server, joined by a veth pair (`eth0` on both sides). Field order
/// is drop order: the server process, then the namespaces, then the scratch directory.
pub struct MetadataBed {
    server: Spawned,
    pub client: Namespace,
    pub imds: Namespace,
    pub scratch: ScratchDir,
    log_path: PathBuf,
    /// The agents' `--pin-dir` (shared by every agent of this bed, so a restart adopts).
    pub pins: PinRoot,
}

/// A file next to this module (the fake server and the raw client).
pub fn support_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interceptor_support")
        .join(name)
}

/// What `raw_client.py` saw.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub reset: bool,
    pub timeout: bool,
    pub data: String,
    pub elapsed: Duration,
}

impl RawAnswer {
    /// The server's answer was relayed: an HTTP status line came back.
    pub fn status(&self) -> Option<u16> {
        self.data
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
    }
}

/// What a `curl` run returned.
#[derive(Debug)]
pub struct Fetch {
    /// curl's exit code (0 ok, 7 refused, 28 timeout, 52 empty reply, 56 reset).
    pub code: i32,
    pub body: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Fetch {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

impl MetadataBed {
    pub fn new() -> Self {
        let scratch = ScratchDir::create("imds").expect("scratch dir");
        let client = Namespace::create("mdc").expect("client namespace");
        let imds = Namespace::create("mds").expect("metadata namespace");
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
            .expect("veth pair");
        for (ns, v4, v6) in [
            (&client, CLIENT_V4, CLIENT_V6),
            (&imds, SERVER_V4, SERVER_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])
                .expect("v4 address");
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])
                .expect("v6 address");
            ns.ip(&["link", "set", "eth0", "up"]).expect("link up");
        }
        imds.ip(&["addr", "add", &format!("{IMDS_V4}/32"), "dev", "lo"])
            .expect("imds v4");
        imds.ip(&[
            "addr",
            "add",
            &format!("{IMDS_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ])
        .expect("imds v6");
        client
            .ip(&["route", "add", &format!("{IMDS_V4}/32"), "via", SERVER_V4])
            .expect("route v4");
        client
            .ip(&[
                "-6",
                "route",
                "add",
                &format!("{IMDS_V6}/128"),
                "via",
                SERVER_V6,
            ])
            .expect("route v6");

        let log_path = scratch.path().join("imds-requests.log");
        std::fs::write(&log_path, "").expect("request log");
        let out = File::create(scratch.path().join("imds-server.log")).expect("server log");
        let child = imds
            .command("python3")
            .arg(support_file("fake_imds.py"))
            .arg("80")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("start the fake metadata server");
        let bed = Self {
            server: Spawned::new("fake imds", child),
            client,
            imds,
            scratch,
            log_path,
            pins: PinRoot::create("imds").expect("test bpffs"),
        };
        bed.wait_for_server();
        // The readiness probe is not part of any test.
        std::fs::write(&bed.log_path, "").expect("clear the request log");
        bed
    }

    fn wait_for_server(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = command::output(self.imds.command("curl").args([
                "-sS",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "http://[::1]/latest/",
            ]))
            .expect("curl runs");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fake metadata server did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `curl URL` in the client namespace as `uid` (root if None), 5 s limit.
    pub fn fetch(&self, uid: Option<u32>, url: &str) -> Fetch {
        self.curl_in(&self.client, uid, &[url])
    }

    /// `curl -sS -g -m 5 ARGS` in `ns` as `uid` (root if None).
    pub fn curl_in(&self, ns: &Namespace, uid: Option<u32>, args: &[&str]) -> Fetch {
        let mut cmd = match uid {
            None => ns.command("curl"),
            Some(uid) => {
                let mut c = ns.command("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "curl",
                ]);
                c
            }
        };
        cmd.args(["-sS", "-g", "-m", "5"]).args(args);
        let start = Instant::now();
        let out = command::output(&mut cmd).expect("curl runs");
        Fetch {
            code: out.status.code().unwrap_or(-1),
            body: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        }
    }

    /// A "container": a third namespace routed through the client namespace (the host) and
    /// masqueraded there onto its `eth0`, for IPv4 and IPv6, as Docker's default bridge does.
    pub fn add_container(&self) -> Namespace {
        let ctr = Namespace::create("mdk").expect("container namespace");
        self.client
            .ip(&[
                "link",
                "add",
                "ctr0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ctr.name(),
            ])
            .expect("container veth");
        for (ns, dev, v4, v6) in [
            (&self.client, "ctr0", CTR_HOST_V4, CTR_HOST_V6),
            (&ctr, "eth0", CTR_V4, CTR_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])
                .expect("v4");
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])
                .expect("v6");
            ns.ip(&["link", "set", dev, "up"]).expect("up");
        }
        ctr.ip(&["route", "add", "default", "via", CTR_HOST_V4])
            .expect("v4 default");
        ctr.ip(&["-6", "route", "add", "default", "via", CTR_HOST_V6])
            .expect("v6 default");
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            self.client
                .run("sysctl", &["-qw", key])
                .expect("forwarding");
        }
        let rules = self.scratch.path().join("masquerade.nft");
        std::fs::write(
            &rules,
            "table ip hoshino_test_nat {\n chain post {\n  type nat hook postrouting priority 100;\n  oifname \"eth0\" masquerade\n }\n}\n\
             table ip6 hoshino_test_nat {\n chain post {\n  type nat hook postrouting priority 100;\n  oifname \"eth0\" masquerade\n }\n}\n",
        )
        .expect("nft rules");
        let out =
            command::output(self.client.command("nft").arg("-f").arg(&rules)).expect("nft runs");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ctr
    }

    /// Request lines the fake metadata server received, in order.
    pub fn server_log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Asserts that the server never received a request for an `iam/` path (however spelt:
    /// the test requests are the only ones that mention `iam` at all).
    pub fn assert_server_saw_no_iam(&self) {
        let log = self.server_log();
        let bad: Vec<&String> = log
            .iter()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("iam") || l.contains("%69") || l.contains("%61") || l.contains("%6d")
            })
            .collect();
        assert!(
            bad.is_empty(),
            "the server received refused requests: {bad:?}\nfull log: {log:?}"
        );
    }

    /// Runs `raw_client.py` in `ns` as `uid` (root if None) with the JSON request `spec`.
    pub fn raw_in(&self, ns: &Namespace, uid: Option<u32>, spec: &serde_json::Value) -> RawAnswer {
        let script = support_file("raw_client.py");
        // The system interpreter: a per-user one (pyenv under /root) is not readable by
        // other users.
        let python = "/usr/bin/python3";
        let mut cmd = match uid {
            None => ns.command(python),
            Some(uid) => {
                let mut c = ns.command("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    python,
                ]);
                c
            }
        };
        cmd.arg(script).arg(spec.to_string());
        let out = command::output(&mut cmd).expect("raw client runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "raw client output {text:?} ({e}); stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        RawAnswer {
            reset: v["reset"].as_bool().unwrap_or(false),
            timeout: v["timeout"].as_bool().unwrap_or(false),
            data: v["data"].as_str().unwrap_or_default().to_string(),
            elapsed: Duration::from_secs_f64(v["elapsed"].as_f64().unwrap_or(0.0)),
        }
    }

    /// [`Self::raw_in`] in the client namespace.
    pub fn raw(&self, uid: Option<u32>, spec: &serde_json::Value) -> RawAnswer {
        self.raw_in(&self.client, uid, spec)
    }

    /// A copy of `policy` in the scratch directory (so a test may rewrite it).
    pub fn policy_copy(&self, policy: &Path, name: &str) -> PathBuf {
        let dest = self.scratch.path().join(name);
        std::fs::copy(policy, &dest).expect("copy policy");
        dest
    }

    /// Starts `hoshino-agent attach` on the client's `eth0` (pinned under [`Self::pins`]) and
    /// waits until it is attached.
    pub fn attach(&self, policy: &Path, extra: &[&str]) -> AttachedAgent {
        let pin_dir = self.pins.path().display().to_string();
        let mut args = vec!["--pin-dir", pin_dir.as_str()];
        args.extend_from_slice(extra);
        AttachedAgent::start(&self.client, self.scratch.path(), "eth0", policy, &args)
    }

    /// `hoshino-agent detach --interface eth0` in the client namespace, with this bed's pins.
    pub fn detach(&self) -> std::process::Output {
        command::output(
            self.client
                .command(binaries::agent().expect("hoshino-agent binary"))
                .args(["detach", "--interface", "eth0", "--pin-dir"])
                .arg(self.pins.path()),
        )
        .expect("hoshino-agent detach runs")
    }

    /// How many TCX programs are attached at the client's `eth0` egress (what `bpftool net`
    /// would list; read with aya's TCX query from a thread inside the namespace).
    pub fn egress_tcx_programs(&self) -> usize {
        let path = format!("/var/run/netns/{}", self.client.name());
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: plain setns on a valid namespace fd; affects only this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            aya::programs::SchedClassifier::query_tcx("eth0", aya::programs::TcAttachType::Egress)
                .map(|(_, programs)| programs.len())
                .expect("query TCX")
        })
        .join()
        .expect("query thread")
    }

    /// The pin directory of the client's `eth0`.
    pub fn pin_dir(&self) -> PathBuf {
        self.pins.path().join("eth0")
    }

    /// The client's clsact filters on eth0 egress (a TCX link shows up in the tests as
    /// behaviour: a diverted request being reset).
    pub fn egress_filters(&self) -> String {
        command::output(Command::new("tc").args([
            "-n",
            self.client.name(),
            "filter",
            "show",
            "dev",
            "eth0",
            "egress",
        ]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
    }

    /// The client's qdiscs on eth0 (`tc qdisc show`).
    pub fn qdiscs(&self) -> String {
        command::output(Command::new("tc").args([
            "-n",
            self.client.name(),
            "qdisc",
            "show",
            "dev",
            "eth0",
        ]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
    }

    /// Links in the client namespace (`ip -o link`), to see the divert TUN come and go.
    pub fn client_links(&self) -> String {
        self.client.ip(&["-o", "link"]).unwrap_or_default()
    }
}

/// An `attach` agent process with its log file.
pub struct AttachedAgent {
    process: Spawned,
    log: PathBuf,
    /// A pin root of this agent's own when the caller gave no `--pin-dir` (removed after the
    /// process is gone, so nothing stays attached).
    own_pins: Option<PinRoot>,
}

pub const READY_LINE: &str = "interceptor attached";

static AGENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl AttachedAgent {
    pub fn start(
        ns: &Namespace,
        dir: &Path,
        interface: &str,
        policy: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_configured(ns, dir, interface, policy, extra, |_| {})
    }

    /// Like [`Self::start`], with a hook to adjust the command (environment for S3).
    pub fn start_configured(
        ns: &Namespace,
        dir: &Path,
        interface: &str,
        policy: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("agent-attach-{n}.log"));
        let out = File::create(&log).expect("agent log");
        let err = out.try_clone().expect("agent log fd");
        let mut cmd = ns.command(binaries::agent().expect("hoshino-agent binary"));
        let own_pins = if extra.contains(&"--pin-dir") {
            None
        } else {
            Some(PinRoot::create("agent").expect("test bpffs"))
        };
        cmd.arg("attach")
            .args(["--interface", interface])
            .arg("--policy")
            .arg(policy)
            .args(extra);
        if let Some(pins) = &own_pins {
            cmd.arg("--pin-dir").arg(pins.path());
        }
        cmd.env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("HOSHINO_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        configure(&mut cmd);
        let child = cmd.spawn().expect("start hoshino-agent attach");
        let mut agent = Self {
            process: Spawned::new("hoshino-agent attach", child),
            log,
            own_pins,
        };
        agent.wait_for_log(READY_LINE, 1, Duration::from_secs(30));
        agent
    }

    /// An `attach` agent on `node` (its `eth0`) that also runs the tunnel through `net`'s S3
    /// server, judging by `policy`; returns once the tunnel is up.
    pub fn start_tunneled(net: &TunnelNet, node: &Node, policy: &Path) -> Self {
        let endpoint = net.endpoint();
        let machine_id = node.machine_id_file.display().to_string();
        let mut agent = Self::start_configured(
            &node.ns,
            net.scratch(),
            "eth0",
            policy,
            &[
                "--bucket",
                &endpoint.bucket,
                "--endpoint-url",
                &endpoint.url,
                "--region",
                &endpoint.region,
                "--path-style",
                "--machine-id-file",
                &machine_id,
                "--metrics-listen",
                METRICS_LISTEN,
            ],
            |cmd| endpoint.apply_env(cmd),
        );
        agent.wait_for_log("tunnel up", 1, AGENT_READY_TIMEOUT);
        agent
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` appears at least `count` times in the log.
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= count {
                return;
            }
            if let Some(status) = self.process.try_status() {
                panic!("agent exited with {status} before logging `{needle}`:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "agent did not log `{needle}` within {timeout:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this test started and still owns.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, signal);
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.process
            .terminate(Duration::from_secs(10))
            .expect("agent exits on SIGTERM")
    }

    /// Waits for the process to exit (after a signal sent with [`Self::signal`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
