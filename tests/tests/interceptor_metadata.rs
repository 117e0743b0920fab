//! `examples/policies/metadata.toml` attached to a client namespace's interface, against a fake
//! metadata server that exists only in a peer namespace: root reaches everything, other users
//! get only the allowed paths and are reset at once on the rest, other traffic is untouched.
//! Needs root (namespaces, BPF).

mod interceptor_support;

use std::time::Duration;

use interceptor_support::*;

fn imds_url(v6: bool, path: &str) -> String {
    if v6 {
        format!("http://[{IMDS_V6}]{path}")
    } else {
        format!("http://{IMDS_V4}{path}")
    }
}

const IAM: &str = "/latest/meta-data/iam/security-credentials/";

#[test]
fn root_fetches_iam_credentials_over_ipv4_and_ipv6() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for v6 in [false, true] {
        let f = bed.fetch(None, &imds_url(v6, IAM));
        assert!(f.ok(), "root, v6={v6}: {f:?}");
        assert_eq!(f.body, CREDENTIALS);
    }
}

#[test]
fn other_users_get_instance_id_but_are_reset_on_iam_within_a_second() {
    let bed = MetadataBed::new();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for uid in [65534, 1000] {
        for v6 in [false, true] {
            let f = bed.fetch(Some(uid), &imds_url(v6, "/latest/meta-data/instance-id"));
            assert!(
                f.ok(),
                "uid {uid} v6={v6} instance-id: {f:?}\n{}",
                agent.log_text()
            );
            assert_eq!(f.body, INSTANCE_ID);

            let f = bed.fetch(
                Some(uid),
                &imds_url(v6, "/latest/meta-data/placement/availability-zone"),
            );
            assert!(f.ok(), "uid {uid} v6={v6} placement: {f:?}");

            for path in [
                "/latest/meta-data/iam/",
                IAM,
                "/latest/meta-data/instance-id/../iam/info",
            ] {
                let f = bed.fetch(Some(uid), &imds_url(v6, path));
                assert_eq!(f.code, 56, "uid {uid} v6={v6} {path} must be reset: {f:?}");
                assert!(f.stderr.contains("reset"), "{f:?}");
                assert!(
                    f.elapsed < Duration::from_secs(1),
                    "reset took {:?}",
                    f.elapsed
                );
                assert!(!f.body.contains(CREDENTIALS));
            }
        }
    }
    let log = agent.log_text();
    assert!(log.contains("HTTP request judged"), "{log}");
    assert!(log.contains("verdict=reset"), "{log}");
    // The allowed requests went through the agent too (judged, then rebuilt and sent).
    assert!(log.contains("path=/latest/meta-data/instance-id"), "{log}");
    assert!(log.contains("verdict=allow"), "{log}");
    bed.assert_server_saw_no_iam();
}

#[test]
fn other_paths_are_refused_by_the_http_default() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let f = bed.fetch(Some(1000), &imds_url(false, "/latest/user-data"));
    assert_eq!(f.code, 56, "{f:?}");
}

#[test]
fn traffic_to_other_addresses_is_unaffected() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for url in [
        format!("http://{SERVER_V4}{IAM}"),
        format!("http://[{SERVER_V6}]{IAM}"),
    ] {
        let f = bed.fetch(Some(1000), &url);
        assert!(f.ok(), "{url}: {f:?}");
        assert_eq!(f.body, CREDENTIALS);
    }
    bed.client
        .run("ping", &["-c", "1", "-W", "2", SERVER_V4])
        .expect("ping v4");
    bed.client
        .run("ping", &["-6", "-c", "1", "-W", "2", SERVER_V6])
        .expect("ping v6");
}

#[test]
fn non_root_cannot_reach_other_metadata_ports() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    // Port 8080 has no listener: root gets "connection refused" (the RST from the server), a
    // dropped user times out.
    let root = bed.fetch(None, &format!("http://{IMDS_V4}:8080/"));
    assert_eq!(root.code, 7, "{root:?}");
    let mut cmd = bed.client.command("setpriv");
    cmd.args([
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "curl",
        "-sS",
        "-m",
        "2",
    ])
    .arg(format!("http://{IMDS_V4}:8080/"));
    let out = hoshino_tests::command::output(&mut cmd).expect("curl runs");
    assert_eq!(out.status.code(), Some(28), "dropped SYNs time out");
}

#[test]
fn rule_counters_are_exported_with_rule_names() {
    let bed = MetadataBed::new();
    let listen = format!("127.0.0.1:{METRICS_PORT}");
    let _agent = bed.attach(
        &example_policy("metadata.toml"),
        &["--metrics-listen", &listen],
    );
    assert!(bed.fetch(None, &imds_url(false, IAM)).ok());
    assert!(
        bed.fetch(
            Some(1000),
            &imds_url(false, "/latest/meta-data/instance-id")
        )
        .ok()
    );
    std::thread::sleep(Duration::from_millis(1500)); // counters are copied every second
    let text = bed
        .client
        .run(
            "curl",
            &["-sS", "-m", "2", &format!("http://{listen}/metrics")],
        )
        .expect("metrics endpoint");
    let value = |rule: &str| -> u64 {
        let prefix = format!("hoshino_rule_packets_total{{rule=\"{rule}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter for rule {rule}:\n{text}"))
    };
    assert!(value("imds-root") > 0);
    assert!(value("imds-users") > 0);
    assert!(
        text.contains("hoshino_rule_bytes_total{rule=\"imds-users\"}"),
        "{text}"
    );
    // The proxy's own counters: one terminated connection, one allowed request.
    assert!(
        text.contains("hoshino_divert_connections_total 1"),
        "{text}"
    );
    assert!(
        text.contains("hoshino_divert_requests_total{verdict=\"allow\"} 1"),
        "{text}"
    );
}

#[test]
fn each_request_on_a_kept_alive_connection_is_judged() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    // One curl, one connection: the first request is allowed, the second is refused and the
    // connection reset, even though the connection itself was already allowed.
    let mut cmd = bed.client.command("setpriv");
    cmd.args([
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "curl",
        "-sS",
        "-m",
        "5",
    ])
    .arg(imds_url(false, "/latest/meta-data/instance-id"))
    .arg(imds_url(false, IAM));
    let out = hoshino_tests::command::output(&mut cmd).expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, INSTANCE_ID, "{stderr}");
    assert_eq!(out.status.code(), Some(56), "{stderr}");
    assert!(!stdout.contains(CREDENTIALS));
}

#[test]
fn a_request_head_spanning_several_segments_is_reassembled() {
    let bed = MetadataBed::new();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    // A 4,000-byte header makes the head longer than one segment (MSS 1,448 here); the
    // header itself is dropped from the rebuilt request.
    let pad = format!("X-Pad: {}", "a".repeat(4000));
    let fetch = |v6: bool, path: &str| {
        let mut cmd = bed.client.command("setpriv");
        cmd.args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "5",
            "-H",
            &pad,
        ])
        .arg(imds_url(v6, path));
        hoshino_tests::command::output(&mut cmd).expect("curl runs")
    };
    let out = fetch(false, "/latest/meta-data/instance-id");
    assert!(out.status.success(), "{out:?}\n{}", agent.log_text());
    assert_eq!(String::from_utf8_lossy(&out.stdout), INSTANCE_ID);
    let out = fetch(true, "/latest/meta-data/iam/info");
    assert_eq!(out.status.code(), Some(56), "{out:?}");
    bed.assert_server_saw_no_iam();
}

/// The classifier's aya-log records reach the agent's own log (target `hoshino_ebpf`) at debug
/// level when verdict logging is on.
#[test]
fn classifier_log_records_appear_in_the_agent_log_at_debug_level() {
    let bed = MetadataBed::new();
    let mut agent = AttachedAgent::start_configured(
        &bed.client,
        bed.scratch.path(),
        "eth0",
        &example_policy("metadata.toml"),
        &["--log-verdicts"],
        |cmd| {
            cmd.env("RUST_LOG", "info,hoshino_ebpf=debug");
        },
    );
    let f = bed.fetch(None, &imds_url(false, "/latest/meta-data/instance-id"));
    assert!(f.ok(), "root fetch: {f:?}");
    agent.wait_for_log("hoshino_ebpf", 1, Duration::from_secs(10));
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("hoshino_ebpf") && l.contains("verdict"))
        .unwrap_or_else(|| panic!("no classifier verdict record in the agent log:\n{log}"));
    assert!(line.contains("DEBUG"), "logged at debug level: {line}");
}
