//! Two agents, each holding only its own node's IAM credentials, carry a ping end to end. The
//! server is moto in the testbed's hub namespace with IAM enforcement on; each node is an IAM user
//! whose policy is rendered from `terraform/modules/node/policy.json.tftpl`, the template Terraform
//! deploys (`tests/terraform/moto_nodes.py`). moto enforces the policy's actions and object ARNs but
//! not its `s3:prefix` condition (see `least_privilege.rs`). Needs root and a built
//! `hoshino-agent`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hoshino_tests::agent::Agent;
use hoshino_tests::ping::{PingReport, ping};
use hoshino_tests::s3_backend::{BackendKind, S3Endpoint};
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};
use hoshino_tests::{binaries, command};

const PING_COUNT: u32 = 5;
const PING_DEADLINE: Duration = Duration::from_secs(90);

/// node id -> (access key id, secret); IAM enforcement is on once this returns.
fn provision(net: &TunnelNet) -> Vec<(String, String, String)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("terraform/moto_nodes.py");
    let endpoint = net.endpoint();
    let mut cmd = net.bed.hub.command("python3");
    cmd.arg(&script).arg(&endpoint.url).arg(&endpoint.bucket);
    for node in &net.bed.nodes {
        cmd.arg(&node.node_id);
    }
    let out = command::run(&mut cmd).unwrap_or_else(|e| panic!("provisioning IAM on moto: {e}"));
    let keys: Vec<(String, String, String)> = out
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some((
                f.next()?.to_owned(),
                f.next()?.to_owned(),
                f.next()?.to_owned(),
            ))
        })
        .collect();
    assert_eq!(keys.len(), net.bed.nodes.len(), "one key per node: {out}");
    keys
}

/// The testbed's endpoint with `node_id`'s own access key instead of the shared one.
fn endpoint_as(net: &TunnelNet, keys: &[(String, String, String)], node_id: &str) -> S3Endpoint {
    let (_, access_key, secret_key) = keys
        .iter()
        .find(|(id, _, _)| id == node_id)
        .unwrap_or_else(|| panic!("no key for node {node_id}"));
    S3Endpoint {
        access_key: access_key.clone(),
        secret_key: secret_key.clone(),
        ..net.endpoint().clone()
    }
}

/// Starts node `index`'s agent with the credentials of `as_node` (normally itself).
fn start_agent(net: &mut TunnelNet, keys: &[(String, String, String)], index: u8, as_node: u8) {
    let as_id = net.node(as_node).expect("node").node_id.clone();
    let endpoint = endpoint_as(net, keys, &as_id);
    let node = net.node(index).expect("node");
    let agent = Agent::start(node, &endpoint, net.scratch(), &[])
        .unwrap_or_else(|e| panic!("starting agent n{index}: {e}"));
    net.agents.push(agent);
}

/// The keys in node `index`'s inbox, listed with that node's own credentials (the shared ones are
/// refused once IAM enforcement is on).
fn inbox_keys(net: &TunnelNet, keys: &[(String, String, String)], index: u8) -> Vec<String> {
    let node = net.node(index).expect("node");
    let endpoint = endpoint_as(net, keys, &node.node_id);
    let mut cmd = node
        .ns
        .command(binaries::s3_probe().expect("hoshino-s3-probe built"));
    cmd.args(["--endpoint-url", &endpoint.url])
        .args(["--bucket", &endpoint.bucket])
        .args(["--region", &endpoint.region])
        .args(["list", "--prefix", &format!("v2/inbox/{}/", node.node_id)]);
    endpoint.apply_env(&mut cmd);
    let out = command::run(&mut cmd).unwrap_or_else(|e| panic!("listing n{index}'s inbox: {e}"));
    out.lines().map(str::to_owned).collect()
}

fn ping_between(net: &TunnelNet, from: u8, to: u8, count: u32, deadline: Duration) -> PingReport {
    let target = IpAddr::V6(net.node(to).expect("node").tunnel_addr);
    ping(
        &net.node(from).expect("node").ns,
        target,
        count,
        Duration::from_millis(200),
        deadline,
    )
    .unwrap_or_else(|e| panic!("ping n{from} -> n{to}: {e}"))
}

#[test]
fn agents_holding_only_their_own_node_credentials_ping_each_other() {
    let mut net = TunnelNet::without_agents(BackendKind::Moto, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed with moto: {e}"));
    let keys = provision(&net);
    start_agent(&mut net, &keys, 1, 1);
    start_agent(&mut net, &keys, 2, 2);
    for agent in &mut net.agents {
        agent
            .wait_ready(AGENT_READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("agent not up: {e}"));
    }
    for (from, to) in [(1, 2), (2, 1)] {
        let report = ping_between(&net, from, to, PING_COUNT, PING_DEADLINE);
        // At least: with -c and -w, replies to requests that waited for a wake arrive together
        // and ping counts them all.
        assert!(
            report.received >= PING_COUNT,
            "n{from} -> n{to} with per-node credentials: {}\n{}",
            report.raw,
            net.agent_logs()
        );
    }
    for (index, agent) in net.agents.iter().enumerate() {
        let metrics = agent.metrics().unwrap_or_else(|e| panic!("metrics: {e}"));
        assert_eq!(
            metrics.sum_where("hoshino_s3_errors_total", &[("op", "put")]),
            0.0,
            "agent n{}: a PUT was refused under its own policy\n{}",
            index + 1,
            metrics.summary()
        );
    }
    // What was delivered is deleted under the node's own policy too (batched deletes may be
    // refused where single ones are allowed), within the 1 s batching delay and some slack.
    for index in [1, 2] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = inbox_keys(&net, &keys, index);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n{index}'s inbox still holds {} delivered objects under its own policy: {left:?}\n{}\n{}",
                left.len(),
                net.agent(index)
                    .ok()
                    .and_then(|a| a.metrics().ok())
                    .map(|m| m.summary())
                    .unwrap_or_default(),
                net.agent_logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn an_agent_holding_another_node_credentials_cannot_send_as_itself() {
    // n1 runs with n2's key: its bundle keys end in n1's id, which n2's policy does not allow, so
    // IAM refuses every PUT and nothing reaches n2.
    let mut net = TunnelNet::without_agents(BackendKind::Moto, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed with moto: {e}"));
    let keys = provision(&net);
    start_agent(&mut net, &keys, 1, 2);
    start_agent(&mut net, &keys, 2, 2);
    for agent in &mut net.agents {
        agent
            .wait_ready(AGENT_READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("agent not up: {e}"));
    }
    let report = ping_between(&net, 1, 2, 3, Duration::from_secs(10));
    assert_eq!(
        report.received,
        0,
        "a reply crossed: {}\n{}",
        report.raw,
        net.agent_logs()
    );
    let metrics = net
        .agent(1)
        .expect("agent")
        .metrics()
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    assert!(
        metrics.sum_where("hoshino_s3_errors_total", &[("op", "put")]) > 0.0,
        "n1's PUTs were not refused\n{}\n{}",
        metrics.summary(),
        net.agent_logs()
    );
}
