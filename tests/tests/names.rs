//! End-to-end: nodes by name. Three agents on the s3s-fs testbed publish their directory
//! records; `peers` and `hosts` read them from any node without an agent of their own; each
//! agent answers `dig AAAA <name>.hoshino.internal @<its tunnel address>` for its peers through
//! the tunnel (NXDOMAIN for unknown names, REFUSED for other domains), and a ping by the resolved
//! name gets its reply. Needs root, `dig`, and a built `hoshino-agent`.
//!
//! Timeouts are generous limits for a loaded 2-core machine, never measurements.

use std::net::{IpAddr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use hoshino_tests::binaries;
use hoshino_tests::command;
use hoshino_tests::ping::ping;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

const DEADLINE: Duration = Duration::from_secs(90);

fn start(nodes: u8) -> TunnelNet {
    TunnelNet::start(BackendKind::S3sFs, nodes, &NetOptions::default())
        .unwrap_or_else(|e| panic!("starting {nodes} nodes: {e}"))
}

fn addr(net: &TunnelNet, index: u8) -> Ipv6Addr {
    net.node(index).expect("node").tunnel_addr
}

/// `hoshino-agent <sub> <args>` in node `index`'s namespace with the testbed's S3 settings.
fn agent_command(net: &TunnelNet, index: u8, sub: &str, args: &[&str]) -> Command {
    agent_command_at(net, index, sub, &net.endpoint().url, args)
}

fn agent_command_at(net: &TunnelNet, index: u8, sub: &str, url: &str, args: &[&str]) -> Command {
    let endpoint = net.endpoint();
    let mut cmd = net
        .node(index)
        .expect("node")
        .ns
        .command(binaries::agent().expect("hoshino-agent built"));
    cmd.arg(sub)
        .args(["--bucket", &endpoint.bucket])
        .args(["--endpoint-url", url])
        .args(["--region", &endpoint.region])
        .arg("--path-style")
        .args(["--s3-max-attempts", "2"])
        .args(args);
    endpoint.apply_env(&mut cmd);
    cmd
}

fn peers_json(net: &TunnelNet, index: u8) -> serde_json::Value {
    let out =
        command::run(&mut agent_command(net, index, "peers", &["--json"])).expect("peers --json");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("peers --json is not JSON ({e}):\n{out}"))
}

/// Waits until node `index`'s `peers --json` lists `n` nodes (each agent publishes at start).
fn wait_for_nodes(net: &TunnelNet, index: u8, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let json = peers_json(net, index);
        if json["nodes"].as_array().map_or(0, Vec::len) == n {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "directory never had {n} nodes: {json}\n{}",
            net.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `dig` from node `from` asking the responder on node `server`'s tunnel address.
fn dig(net: &TunnelNet, from: u8, server: u8, name: &str, extra: &[&str]) -> String {
    let mut cmd = net.command_in(from, "dig").expect("node");
    cmd.arg(format!("@{}", addr(net, server)))
        .args(["AAAA", name])
        .args(["+time=5", "+tries=3"])
        .args(extra);
    command::run(&mut cmd).unwrap_or_else(|e| panic!("dig {name}: {e}\n{}", net.agent_logs()))
}

/// Asks until the answer is an address: the responder's directory copy may predate a peer's
/// first record, and a miss makes it re-read within 30 s.
fn resolve(net: &TunnelNet, from: u8, server: u8, name: &str) -> Ipv6Addr {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = dig(net, from, server, name, &["+short"]);
        if let Some(a) = out.lines().find_map(|l| l.trim().parse::<Ipv6Addr>().ok()) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never resolved: {out:?}\n{}",
            net.agent_logs()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn every_node_is_in_every_nodes_peers_and_hosts_with_its_address() {
    let net = start(3);
    for from in 1..=3u8 {
        let json = wait_for_nodes(&net, from, 3);
        for (i, node) in json["nodes"].as_array().expect("nodes").iter().enumerate() {
            let index = i as u8 + 1;
            assert_eq!(node["name"], format!("n{index}"), "{json}");
            assert_eq!(node["address"], addr(&net, index).to_string(), "{json}");
            assert_eq!(node["agent_version"], env!("CARGO_PKG_VERSION"));
            assert_eq!(node["stale"], false);
            assert_eq!(node["name_collides"], false);
        }
        assert!(
            json["rejected"].as_array().is_some_and(Vec::is_empty),
            "{json}"
        );
    }
    let table = command::run(&mut agent_command(&net, 2, "peers", &[])).expect("peers");
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0]
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        ["NAME", "ADDRESS", "VERSION", "LAST SEEN", "STALE"],
        "{table}"
    );
    for index in 1..=3u8 {
        let row = lines[usize::from(index)];
        assert!(row.starts_with(&format!("n{index} ")), "{table}");
        assert!(row.contains(&addr(&net, index).to_string()), "{table}");
        assert!(row.contains(" ago") && row.ends_with("no"), "{table}");
    }
    let hosts = command::run(&mut agent_command(&net, 3, "hosts", &[])).expect("hosts");
    for index in 1..=3u8 {
        let line = format!("{}\tn{index}.hoshino.internal n{index}", addr(&net, index));
        assert!(hosts.lines().any(|l| l == line), "no `{line}` in:\n{hosts}");
    }
}

#[test]
fn a_peer_resolves_names_through_the_tunnel_and_pings_by_name() {
    let net = start(3);
    // n3 asks n1's responder (the query and the answer cross the bucket).
    for index in 1..=3u8 {
        assert_eq!(
            resolve(&net, 3, 1, &format!("n{index}.hoshino.internal")),
            addr(&net, index)
        );
    }
    let to = resolve(&net, 3, 1, "n2.hoshino.internal");
    let report = ping(
        &net.node(3).expect("node").ns,
        IpAddr::V6(to),
        1,
        Duration::from_millis(200),
        DEADLINE,
    )
    .expect("ping runs");
    assert!(
        report.unanswered(1).is_empty(),
        "ping n2 by name: {}\n{}",
        report.raw,
        net.agent_logs()
    );

    // status on n3: its ping to n2 and its DNS exchange with n1 show up per peer.
    let state_dir = net.scratch().join("state-n3");
    let state_dir = state_dir.to_string_lossy();
    let mut cmd = net
        .command_in(3, &binaries::agent().expect("agent").to_string_lossy())
        .expect("node");
    cmd.args(["status", "--json", "--state-dir", &state_dir]);
    let out = command::run(&mut cmd).expect("status --json");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status is JSON");
    assert_eq!(status["name"], "n3", "{status}");
    assert_eq!(status["address"], addr(&net, 3).to_string());
    assert_eq!(status["tunnel"], "up", "{status}");
    assert_eq!(status["mode"], "active", "{status}");
    assert!(
        status["s3_requests_total"].as_u64().is_some_and(|n| n > 0),
        "{status}"
    );
    assert!(
        status["estimated_dollars"]
            .as_f64()
            .is_some_and(|d| d > 0.0),
        "{status}"
    );
    for peer in [1u8, 2] {
        let entry = status["peers"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p["address"] == addr(&net, peer).to_string())
            })
            .unwrap_or_else(|| panic!("n{peer} not among status peers: {status}"));
        for field in [
            "sent_packets",
            "received_packets",
            "sent_bytes",
            "received_bytes",
        ] {
            assert!(
                entry[field].as_u64().is_some_and(|n| n >= 1),
                "n{peer} {field}: {status}"
            );
        }
        assert!(entry["last_heard_unix_ms"].as_u64().is_some(), "{status}");
    }
    let mut cmd = net
        .command_in(3, &binaries::agent().expect("agent").to_string_lossy())
        .expect("node");
    cmd.args(["status", "--state-dir", &state_dir]);
    let text = command::run(&mut cmd).expect("status");
    for label in ["name:      n3", "tunnel:    up", "s3:", "last error:"] {
        assert!(text.contains(label), "no `{label}` in:\n{text}");
    }
    let header = text
        .lines()
        .find(|l| l.starts_with("PEER"))
        .unwrap_or_else(|| panic!("{text}"));
    let columns: Vec<&str> = header
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns,
        [
            "PEER",
            "SENT PKTS",
            "SENT BYTES",
            "RECV PKTS",
            "RECV BYTES",
            "LAST HEARD"
        ]
    );

    let unknown = dig(&net, 3, 1, "nosuch.hoshino.internal", &[]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    let other = dig(&net, 3, 1, "example.com", &[]);
    assert!(other.contains("status: REFUSED"), "{other}");
    assert!(!other.contains("ANSWER SECTION"), "{other}");
    let ttl = dig(&net, 2, 1, "n3.hoshino.internal", &["+noall", "+answer"]);
    let fields: Vec<&str> = ttl.split_whitespace().collect();
    assert_eq!(fields.get(1), Some(&"30"), "TTL of the answer: {ttl}");
}

#[test]
fn peers_fails_clearly_when_the_bucket_is_unreachable() {
    let net =
        TunnelNet::without_agents(BackendKind::S3sFs, 1, &NetOptions::default()).expect("testbed");
    let mut cmd = agent_command_at(
        &net,
        1,
        "peers",
        "http://[::1]:9",
        &["--s3-timeout", "2s", "--s3-attempt-timeout", "1s"],
    );
    let out = cmd.output().expect("peers runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the directory in bucket") && stderr.contains("http://[::1]:9"),
        "{stderr}"
    );
}

#[test]
fn status_fails_clearly_when_no_agent_runs() {
    let dir = std::env::temp_dir().join(format!("hoshino-no-agent-{}", std::process::id()));
    let out = Command::new(binaries::agent().expect("agent"))
        .args(["status", "--state-dir"])
        .arg(&dir)
        .output()
        .expect("status runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no agent is running with state directory"),
        "{stderr}"
    );
}
