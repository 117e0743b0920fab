//! The Grafana dashboard (`deploy/grafana/hoshino-dashboard.json`) queries only metrics a live
//! agent exposes: one agent on the s3s-fs testbed, its `/metrics` text, every `hoshino_*` name in
//! the dashboard's queries looked up among the exposition's `# TYPE` families (a histogram family
//! also provides `_bucket`, `_sum` and `_count`). Needs root and a built `hoshino-agent`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use hoshino_tests::agent::METRICS_LISTEN;
use hoshino_tests::command;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

fn dashboard() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/hoshino-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every string under a key `expr` or `query`, anywhere in the dashboard.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

/// `hoshino_...` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hoshino_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Series names the exposition declares, from its `# TYPE <name> <kind>` lines.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
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

    let mut exprs = Vec::new();
    queries(&dashboard(), &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(!used.is_empty(), "the dashboard queries no hoshino_ metric");
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
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
