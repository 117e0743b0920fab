//! The tunnel runs as an unprivileged user holding only CAP_NET_ADMIN (as the systemd unit runs
//! it), and without that capability it stops with an error naming it. `setpriv` drops root inside
//! a node namespace of the testbed; the S3 server is s3s-fs in the hub. Needs root and a built
//! `hoshino-agent`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hoshino_tests::agent::READY_LINE;
use hoshino_tests::binaries;
use hoshino_tests::ping::ping;
use hoshino_tests::process::Spawned;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::topology::Node;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};

const NOBODY: &str = "65534";
/// Distributions ship /dev/net/tun world-writable (0666): opening it needs no privilege, creating
/// an interface needs CAP_NET_ADMIN. Some machines (this CI's among them) have it 0600. Rather than
/// change the host's node, the agent's shell gives its own mount namespace (`ip netns exec` creates
/// one, as a slave of the host's, so nothing propagates back) a 0666 node of the same device.
const WITH_STANDARD_TUN_NODE: &str = "mount -t tmpfs -o mode=0755,size=64k hoshino-dev-net /dev/net \
    && mknod -m 0666 /dev/net/tun c 10 200 && exec \"$@\"";
const CAP_NET_ADMIN_MASK: u64 = 1 << 12;

/// `hoshino-agent tunnel` in `node`'s namespace as uid/gid 65534 with exactly `caps` (setpriv
/// names, e.g. `net_admin`) in every capability set.
fn start_as_nobody(net: &TunnelNet, node: &Node, caps: &[&str], log: &Path) -> Spawned {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let endpoint = net.endpoint();
    let agent = binaries::agent().unwrap_or_else(|e| panic!("{e}"));
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    // The delivery cursor must be writable by the unprivileged user.
    let state = log.with_extension("state");
    std::fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{}: {e}", state.display()));
    std::fs::set_permissions(
        &state,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", state.display()));
    let mut cmd = node.ns.command("sh");
    cmd.args(["-c", WITH_STANDARD_TUN_NODE, "sh", "setpriv"]);
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
        "--",
    ])
    .arg(agent)
    .arg("tunnel")
    .args(["--bucket", &endpoint.bucket])
    .args(["--endpoint-url", &endpoint.url])
    .args(["--region", &endpoint.region])
    .arg("--path-style")
    .arg("--machine-id-file")
    .arg(&node.machine_id_file)
    .arg("--state-dir")
    .arg(&state)
    .args(["--log-format", "text"])
    .env("NO_COLOR", "1")
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err);
    endpoint.apply_env(&mut cmd);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning setpriv: {e}"));
    Spawned::new(format!("unprivileged hoshino-agent n{}", node.index), child)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `Uid:` (real) and `CapEff:` of a running process.
fn uid_and_effective_caps(pid: u32) -> (String, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .to_owned()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let caps = u64::from_str_radix(&field("CapEff:"), 16)
        .unwrap_or_else(|e| panic!("CapEff of {pid}: {e}"));
    (uid, caps)
}

fn log_path(net: &TunnelNet, index: u8) -> PathBuf {
    net.scratch().join(format!("agent-nobody-n{index}.log"))
}

#[test]
fn tunnel_runs_as_nobody_holding_only_cap_net_admin() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let mut agents = Vec::new();
    for index in [1, 2] {
        let node = net.node(index).expect("node");
        agents.push(start_as_nobody(
            &net,
            node,
            &["net_admin"],
            &log_path(&net, index),
        ));
    }
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    for (i, agent) in agents.iter_mut().enumerate() {
        let log = log_path(&net, i as u8 + 1);
        while !read(&log).contains(READY_LINE) {
            if let Some(status) = agent.try_status() {
                panic!(
                    "unprivileged agent n{} exited with {status}:\n{}",
                    i + 1,
                    read(&log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent n{} not up:\n{}",
                i + 1,
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // sh execs setpriv, which execs the agent, so this pid is the agent itself.
        let (uid, caps) = uid_and_effective_caps(agent.pid());
        assert_eq!(uid, NOBODY, "agent n{} runs as uid {uid}", i + 1);
        assert_eq!(
            caps,
            CAP_NET_ADMIN_MASK,
            "agent n{} holds capabilities {caps:#x}",
            i + 1
        );
    }
    let report = ping(
        &net.node(1).expect("node").ns,
        IpAddr::V6(net.node(2).expect("node").tunnel_addr),
        3,
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("ping: {e}"));
    // With `-w`, ping keeps sending until 3 replies came; the replies to requests that waited
    // for the receiver to wake arrive together, so it may count more than 3.
    assert!(
        report.received >= 3,
        "ping between unprivileged agents: {}\n{}\n{}",
        report.raw,
        read(&log_path(&net, 1)),
        read(&log_path(&net, 2))
    );
    for agent in &mut agents {
        let status = agent
            .terminate(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("stopping: {e}"));
        assert!(
            status.success(),
            "unprivileged agent exited with {status} on SIGTERM"
        );
    }
}

#[test]
fn tunnel_without_cap_net_admin_fails_naming_the_capability() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let node = net.node(1).expect("node");
    let log = log_path(&net, 1);
    let mut agent = start_as_nobody(&net, node, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.try_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent without capabilities still running after 30 s:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = read(&log);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status {status} (runtime fault expected):\n{text}"
    );
    assert!(
        text.contains("CAP_NET_ADMIN"),
        "error does not name CAP_NET_ADMIN:\n{text}"
    );
    assert!(
        !text.contains(READY_LINE),
        "came up without CAP_NET_ADMIN:\n{text}"
    );
}
