//! A TUN deleted under a running agent (`ip link del`) ends the agent with exit code 1 within a
//! few seconds, and nothing of the agent's stays in the kernel (link, address, route, divert
//! TUN; only the pinned classifier stays, by design). In namespaces the tests create; needs
//! root and a built `hoshino-agent`.

mod interceptor_support;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use hoshino_tests::agent::Agent;
use hoshino_tests::netns::Namespace;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};
use interceptor_support::*;

const PREFIX: &str = "fd68:6f73:6869:6e6f";
/// Generous for a loaded machine; the agent notices at its next read of the TUN.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

fn wait_exit(agent: &mut Agent) -> ExitStatus {
    let deadline = Instant::now() + EXIT_WITHIN;
    loop {
        if let Some(s) = agent.exit_status() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still runs {EXIT_WITHIN:?} after its TUN was deleted:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that no link, address or route of ours is left in `ns`.
fn assert_nothing_of_ours_left(ns: &Namespace, log: &str) {
    let links = ns.ip(&["-o", "link", "show"]).expect("links");
    let addrs = ns.ip(&["-6", "addr", "show"]).expect("addrs");
    let routes = ns.ip(&["-6", "route", "show"]).expect("routes");
    assert!(
        !links.contains("hoshino0"),
        "tunnel TUN left:\n{links}\n{log}"
    );
    assert!(
        !links.contains("hoshinodv0"),
        "divert TUN left:\n{links}\n{log}"
    );
    assert!(!addrs.contains(PREFIX), "address left:\n{addrs}\n{log}");
    assert!(!routes.contains(PREFIX), "route left:\n{routes}\n{log}");
}

#[test]
fn deleting_the_tun_under_a_running_tunnel_exits_1_and_leaves_nothing_in_the_kernel() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &NetOptions::default())
        .expect("testbed with one node");
    let node = net.node(1).expect("node 1");
    let mut agent = Agent::start_ready(
        node,
        net.endpoint(),
        net.scratch(),
        &[],
        AGENT_READY_TIMEOUT,
    )
    .expect("agent up");
    node.ns
        .ip(&["link", "del", "hoshino0"])
        .expect("delete the TUN under the agent");
    let status = wait_exit(&mut agent);
    let log = agent.log_text();
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(log.contains("hoshino0"), "the log names the TUN:\n{log}");
    assert!(log.contains("exiting"), "the log says why it exits:\n{log}");
    assert_nothing_of_ours_left(&node.ns, &log);
}

#[test]
fn deleting_the_divert_tun_under_a_running_attach_exits_1_and_keeps_only_the_pin() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &[]);
    bed.client
        .ip(&["link", "del", "hoshinodv0"])
        .expect("delete the divert TUN under the agent");
    let status = agent.wait_exit(EXIT_WITHIN);
    let log = agent.log_text();
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(
        log.contains("the divert loop"),
        "the log says which loop ended:\n{log}"
    );
    assert_nothing_of_ours_left(&bed.client, &log);
    // Fail closed: the pinned classifier keeps judging (and dropping diverted traffic).
    assert!(bed.pin_dir().join("link").exists(), "pin kept:\n{log}");
    assert_eq!(bed.egress_tcx_programs(), 1, "{log}");
    assert!(bed.detach().status.success());
}

#[test]
fn deleting_the_tunnel_tun_under_a_running_attach_exits_1_and_leaves_nothing_but_the_pin() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &NetOptions::default())
        .expect("testbed with S3 server");
    let n1 = net.node(1).expect("node 1");
    let mut agent = AttachedAgent::start_tunneled(&net, n1, &example_policy("ula-tunnel.toml"));
    n1.ns
        .ip(&["link", "del", "hoshino0"])
        .expect("delete the tunnel TUN under the agent");
    let status = agent.wait_exit(EXIT_WITHIN);
    let log = agent.log_text();
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(log.contains("hoshino0"), "the log names the TUN:\n{log}");
    assert_nothing_of_ours_left(&n1.ns, &log);
}
