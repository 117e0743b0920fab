//! Kernel state that is not the agent's stays as it was: an administrator's route to the
//! network /64 survives the agent's start and stop. In namespaces the test creates; needs root.

use std::time::Duration;

use hoshino_tests::agent::Agent;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

const PREFIX: &str = "fd68:6f73:6869:6e6f::/64";

#[test]
fn an_existing_route_to_the_network_survives_start_and_stop_of_the_agent() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 1, &NetOptions::default())
        .expect("testbed with one node");
    let node = net.node(1).expect("node 1");
    node.ns
        .ip(&[
            "link", "add", "adm0", "type", "veth", "peer", "name", "adm1",
        ])
        .expect("an administrator's link");
    node.ns.ip(&["link", "set", "adm1", "up"]).expect("up");
    node.ns.ip(&["link", "set", "adm0", "up"]).expect("up");
    node.ns
        .ip(&["-6", "route", "add", PREFIX, "dev", "adm0"])
        .expect("the administrator's route");
    let route = || {
        node.ns
            .ip(&["-6", "route", "show", PREFIX])
            .expect("route show")
    };
    let before = route();
    assert!(before.contains("dev adm0"), "{before}");

    let mut agent = Agent::start_ready(
        node,
        &net.backend.endpoint,
        net.bed.scratch.path(),
        &[],
        Duration::from_secs(60),
    )
    .expect("agent up");
    let running = route();
    assert_eq!(running, before, "not replaced while running");
    assert!(
        agent
            .log_text()
            .contains("a route to the network /64 exists already"),
        "{}",
        agent.log_text()
    );

    let status = agent.stop(Duration::from_secs(20)).expect("agent exits");
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert_eq!(route(), before, "not removed on exit");
    let links = node.ns.ip(&["-o", "link", "show"]).expect("links");
    assert!(
        !links.contains("hoshino0"),
        "the TUN is still removed:\n{links}"
    );
}
