//! `examples/policies/ula-tunnel.toml`: node 1 routes the Hoshino ULA out of its Ethernet
//! interface, and the classifier sends those packets into the tunnel instead, so a ping and an
//! HTTP download reach node 2 through the S3 server. Namespaces and S3 server are the testbed's;
//! needs root.

mod interceptor_support;

mod dashboard_support;

use std::time::Duration;

use hoshino_tests::agent::{Agent, METRICS_LISTEN};
use hoshino_tests::metrics::Metrics;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::topology::HUB_IPV6;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};
use interceptor_support::*;

const BLOB_BYTES: usize = 2 * 1024 * 1024;

#[test]
fn ping_and_http_download_cross_through_s3_by_tunnel_verdict() {
    let net = TunnelNet::without_agents(BackendKind::S3sFs, 2, &NetOptions::default())
        .expect("testbed with S3 server");
    let (n1, n2) = (net.node(1).expect("node 1"), net.node(2).expect("node 2"));
    let _peer = Agent::start_ready(n2, net.endpoint(), net.scratch(), &[], AGENT_READY_TIMEOUT)
        .expect("node 2 tunnel agent");
    let agent = AttachedAgent::start_tunneled(&net, n1, &example_policy("ula-tunnel.toml"));

    // The host's own routing sends node 2's address out of eth0 (towards the hub), from
    // node 1's tunnel address: without the classifier these packets would go to the hub.
    let (a1, a2) = (n1.tunnel_addr.to_string(), n2.tunnel_addr.to_string());
    n1.ns
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{a2}/128"),
            "via",
            &HUB_IPV6.to_string(),
            "dev",
            "eth0",
            "src",
            &a1,
        ])
        .expect("route via eth0");
    let route = n1.ns.ip(&["-6", "route", "get", &a2]).expect("route get");
    assert!(route.contains("dev eth0"), "{route}");

    n1.ns
        .run("ping", &["-6", "-c", "3", "-W", "10", &a2])
        .unwrap_or_else(|e| panic!("ping through S3: {e}\n{}", agent.log_text()));

    let www = net.scratch().join("www-n2");
    std::fs::create_dir_all(&www).expect("www dir");
    let blob: Vec<u8> = (0..BLOB_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("blob"), &blob).expect("write blob");
    let server = n2
        .ns
        .command("python3")
        .args(["-m", "http.server", "8080", "--bind", "::", "--directory"])
        .arg(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("HTTP server in node 2");
    let _server = hoshino_tests::process::Spawned::new("http server n2", server);
    let out_file = net.scratch().join("blob-downloaded");
    let url = format!("http://[{a2}]:8080/blob");
    let mut fetched = false;
    for _ in 0..50 {
        let status = n1
            .ns
            .command("curl")
            .args(["-sS", "-g", "--fail", "-m", "60", "-o"])
            .arg(&out_file)
            .arg(&url)
            .status()
            .expect("curl runs");
        if status.success() {
            fetched = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200)); // the server may still be starting
    }
    assert!(
        fetched,
        "HTTP download through S3 failed:\n{}",
        agent.log_text()
    );
    let got = std::fs::read(&out_file).expect("downloaded file");
    assert!(
        got == blob,
        "downloaded {} bytes, content differs",
        got.len()
    );

    let text = n1
        .ns
        .run(
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                &format!("http://{METRICS_LISTEN}/metrics"),
            ],
        )
        .expect("metrics");
    let metrics = Metrics::parse(&text);
    assert!(
        metrics.sum_where("hoshino_rule_packets_total", &[("rule", "hoshino-network")]) > 0.0,
        "the tunnel rule decided the packets:\n{text}"
    );
    assert!(metrics.sum("hoshino_egress_packets_total") > 0.0, "{text}");
    // The Grafana dashboard's every query, per-rule panels included, against this live `attach`
    // agent's exposition.
    let exposed = dashboard_support::exposed(&text);
    let missing: Vec<String> = dashboard_support::queried()
        .into_iter()
        .filter(|n| !exposed.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not exposed:\n{text}"
    );
}
