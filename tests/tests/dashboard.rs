//! The Grafana dashboard (`deploy/grafana/hoshino-dashboard.json`) queries only metrics a live
//! agent exposes: one agent on the s3s-fs testbed, its `/metrics` text, every `hoshino_*` name in
//! the dashboard's queries looked up among the exposition's `# TYPE` families (a histogram family
//! also provides `_bucket`, `_sum` and `_count`). Per-rule series exist only on an `attach`
//! agent that published a policy: `interceptor_tunnel.rs` checks every name against one; here a
//! tunnel-only agent must expose all the others. Needs root and a built `hoshino-agent`.

mod dashboard_support;

use dashboard_support::{exposed, queried};
use hoshino_tests::agent::METRICS_LISTEN;
use hoshino_tests::command;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

/// Per-rule series exist only once `attach` has published a policy's counters (an empty family
/// renders nothing).
fn attach_only(name: &str) -> bool {
    name.starts_with("hoshino_rule_")
}

#[test]
fn every_metric_the_dashboard_queries_exists_in_a_live_agents_exposition() {
    let net = TunnelNet::start(BackendKind::S3sFs, 1, &NetOptions::default()).expect("one node");
    let node = net.node(1).expect("node");
    let mut curl = node.ns.command("curl");
    curl.args(["-sS", "--fail", "--max-time", "5"])
        .arg(format!("http://{METRICS_LISTEN}/metrics"));
    let text = command::run(&mut curl).expect("metrics endpoint answers");
    let exposed = exposed(&text);

    let used = queried();
    assert!(!used.is_empty(), "the dashboard queries no hoshino_ metric");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !attach_only(n) && !exposed.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\nexposed: {exposed:?}"
    );

    // The panels: traffic per direction, S3 requests by operation and errors, latency
    // histogram, estimated cost, heartbeat mode, per-rule classifier counters.
    for needed in [
        "hoshino_egress_bytes_total",
        "hoshino_ingress_bytes_total",
        "hoshino_s3_requests_total",
        "hoshino_s3_errors_total",
        "hoshino_s3_request_duration_seconds_bucket",
        "hoshino_estimated_cost_dollars_total",
        "hoshino_heartbeat_idle",
        "hoshino_rule_packets_total",
    ] {
        assert!(used.contains(needed), "no panel queries {needed}");
    }
}
