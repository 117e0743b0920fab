//! Attacks on `examples/policies/metadata.toml` by ordinary users with ordinary sockets,
//! against a fake metadata server that logs every request line and resolves paths as loosely
//! as a server could. The agent terminates each connection and sends only requests it rebuilt:
//! no non-root client ever receives the credentials, and the server never sees an `iam/` path.
//! Needs root (namespaces, BPF).

mod interceptor_support;

use std::time::Duration;

use interceptor_support::*;
use serde_json::json;

const USER: Option<u32> = Some(1000);

fn request(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
}

/// Asserts that `answer` was a refusal by reset, with no credentials in it.
fn assert_reset(answer: &RawAnswer, what: &str) {
    assert!(answer.reset, "{what}: expected a reset, got {answer:?}");
    assert!(!answer.data.contains(CREDENTIALS), "{what}: {answer:?}");
    assert!(
        answer.elapsed < Duration::from_secs(1),
        "{what}: the reset took {:?}",
        answer.elapsed
    );
}

fn assert_instance_id(answer: &RawAnswer, what: &str) {
    assert_eq!(answer.status(), Some(200), "{what}: {answer:?}");
    assert!(answer.data.ends_with(INSTANCE_ID), "{what}: {answer:?}");
}

#[test]
fn path_normalisation_tricks_never_reach_the_server() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for host in [IMDS_V4, IMDS_V6] {
        for target in [
            "/latest/meta-data/placement/../iam/security-credentials/",
            "/latest/meta-data/placement/./../iam/info",
            "/latest/meta-data/placement//../iam/info",
            "//latest/meta-data/../meta-data/iam/info",
            "/latest/meta-data/placement/%2e%2e/iam/info",
            "/latest/meta-data/placement/%2E%2E/iam/info",
            "/latest/meta-data/placement/.%2e/iam/info",
            "/latest/meta-data/placement%2f..%2fiam/info",
            "/latest/meta-data/placement%2F..%2Fiam/info",
            "/latest/meta-data/placement/%252e%252e/iam/info",
            "/latest/meta-data/placement/%c0%ae%c0%ae/iam/info",
            "/latest/meta-data/placement/..;/iam/info",
            "/latest/meta-data/placement\\..\\iam\\info",
            "/latest/meta-data/instance-id#/../../meta-data/iam/info",
            "/latest/meta-data/instance-id?/../../meta-data/iam/info",
            "/latest/meta-data/%69am/info",
            "http://169.254.169.254/latest/meta-data/iam/info",
            "/latest/meta-data/placement/\u{0}/../../iam/info",
        ] {
            let a = bed.raw(
                USER,
                &json!({"host": host, "port": 80, "chunks": [request(target)]}),
            );
            assert_reset(&a, &format!("{host} {target:?}"));
        }
    }
    bed.assert_server_saw_no_iam();
    assert!(bed.server_log().is_empty(), "{:?}", bed.server_log());
}

#[test]
fn urgent_data_is_read_inline_and_judged() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    // A receiving Linux stack would drop the urgent byte; the agent's stack reads it inline
    // and judges the bytes it read, so the two readings cannot differ at the server.
    for (chunks, oob) in [
        (
            vec![
                "GET /latest/meta-data/placement/",
                ".",
                "./iam/info HTTP/1.1\r\nConnection: close\r\n\r\n",
            ],
            1,
        ),
        (
            vec![
                "GET /latest/meta-data/placement/X",
                "/../../iam/info HTTP/1.1\r\nConnection: close\r\n\r\n",
            ],
            0,
        ),
        (
            vec!["GET /latest/meta-data/iam/info HTTP/1.1\r\n", "X", "\r\n"],
            1,
        ),
    ] {
        let a = bed.raw(
            USER,
            &json!({"host": IMDS_V4, "port": 80, "chunks": chunks, "oob": oob, "delay": 0.05}),
        );
        assert_reset(&a, &format!("{chunks:?}"));
    }
    bed.assert_server_saw_no_iam();
}

#[test]
fn request_bodies_and_framing_tricks_are_refused_not_skipped() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let hidden =
        "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nConnection: close\r\n\r\n";
    let cases = [
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{hidden}"
        ),
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
        format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n{hidden}"),
        format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(9000)
        ),
    ];
    for case in &cases {
        let a = bed.raw(
            USER,
            &json!({"host": IMDS_V4, "port": 80, "chunks": [case]}),
        );
        assert_reset(&a, &case.chars().take(120).collect::<String>());
    }
    // Nothing of these reached the server: not even the allowed-looking first request.
    assert!(bed.server_log().is_empty(), "{:?}", bed.server_log());
}

#[test]
fn pipelined_requests_are_each_judged_and_the_allowed_answer_arrives_first() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let both = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n{}",
        request("/latest/meta-data/iam/info")
    );
    let a = bed.raw(
        USER,
        &json!({"host": IMDS_V4, "port": 80, "chunks": [both]}),
    );
    assert!(a.reset, "{a:?}");
    assert!(a.data.starts_with("HTTP/1.1 200 OK"), "{a:?}");
    assert!(a.data.contains(INSTANCE_ID), "{a:?}");
    assert!(!a.data.contains(CREDENTIALS), "{a:?}");
    assert_eq!(
        bed.server_log(),
        vec!["GET /latest/meta-data/instance-id HTTP/1.1".to_string()]
    );
}

#[test]
fn tcp_fast_open_data_is_judged_like_any_other() {
    let bed = MetadataBed::new();
    // Client TFO on, without a cookie, so the request really rides in the SYN.
    bed.client
        .run("sysctl", &["-qw", "net.ipv4.tcp_fastopen=5"])
        .expect("tcp_fastopen sysctl");
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for host in [IMDS_V4, IMDS_V6] {
        let a = bed.raw(
            USER,
            &json!({"host": host, "port": 80, "fastopen": true, "chunks": [request("/latest/meta-data/iam/info")]}),
        );
        assert_reset(&a, &format!("TFO {host} iam"));
        let a = bed.raw(
            USER,
            &json!({"host": host, "port": 80, "fastopen": true, "chunks": [request("/latest/meta-data/instance-id")]}),
        );
        assert_instance_id(&a, &format!("TFO {host} instance-id"));
    }
    bed.assert_server_saw_no_iam();
}

#[test]
fn a_request_written_in_many_small_segments_is_answered() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let text = request("/latest/meta-data/instance-id");
    let chunks: Vec<String> = text.chars().map(String::from).collect();
    assert!(chunks.len() > 60);
    let a = bed.raw(
        USER,
        &json!({"host": IMDS_V4, "port": 80, "chunks": chunks, "delay": 0.005, "timeout": 5}),
    );
    assert_instance_id(&a, "one byte per segment");
}

#[test]
fn a_port_reused_right_after_a_denied_request_is_served() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for host in [IMDS_V4, IMDS_V6] {
        let port = 45678;
        let a = bed.raw(
            USER,
            &json!({"host": host, "port": 80, "src_port": port, "chunks": [request("/latest/meta-data/iam/info")]}),
        );
        assert_reset(&a, "denied first");
        let a = bed.raw(
            USER,
            &json!({"host": host, "port": 80, "src_port": port, "chunks": [request("/latest/meta-data/instance-id")]}),
        );
        assert_instance_id(&a, &format!("{host}: same source port right after"));
        assert!(a.elapsed < Duration::from_secs(1), "{a:?}");
    }
    bed.assert_server_saw_no_iam();
}

#[test]
fn garbage_is_reset_and_its_log_lines_are_rate_limited() {
    let bed = MetadataBed::new();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for _ in 0..30 {
        let a = bed.raw(
            USER,
            &json!({"host": IMDS_V4, "port": 80, "chunks": ["\u{16}\u{3}\u{1}\u{0}\u{a5}\u{1}\u{0}\u{0}\u{a1}\u{3}\u{3}\r\n\r\n"]}),
        );
        assert!(a.reset, "{a:?}");
    }
    let log = agent.log_text();
    let records = log
        .lines()
        .filter(|l| l.contains("refused=malformed"))
        .count();
    assert!(
        (1..=10).contains(&records),
        "{records} garbage records:\n{log}"
    );
    assert!(bed.server_log().is_empty());
}

#[test]
fn one_user_holding_many_connections_is_capped_and_others_still_served() {
    let bed = MetadataBed::new();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    // uid 1000 opens 40 connections with unfinished heads and holds them; connections past
    // the per-uid cap (32) are reset at once. Meanwhile uid 1001 is served.
    let script = format!(
        "import socket, time, json\n\
         held, refused = [], 0\n\
         for i in range(40):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{IMDS_V4}', 80), timeout=2)\n\
         \x20       s.sendall(b'GET /latest/meta-data/instance-id HTTP/1.1\\r\\n')\n\
         \x20       held.append(s)\n\
         \x20   except (ConnectionRefusedError, ConnectionResetError):\n\
         \x20       refused += 1\n\
         time.sleep(0.5)\n\
         for s in held:\n\
         \x20   s.settimeout(0.2)\n\
         \x20   try:\n\
         \x20       if s.recv(1) == b'':\n\
         \x20           refused += 1\n\
         \x20   except ConnectionResetError:\n\
         \x20       refused += 1\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n\
         print(json.dumps({{'refused': refused}}))\n\
         import sys; sys.stdout.flush(); time.sleep(3)\n"
    );
    let path = bed.scratch.path().join("hold.py");
    std::fs::write(&path, script).expect("script");
    let mut holder = bed.client.command("setpriv");
    holder
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::piped());
    let child = holder.spawn().expect("holder runs");
    std::thread::sleep(Duration::from_millis(1500));
    let other = bed.fetch(
        Some(1001),
        &format!("http://{IMDS_V4}/latest/meta-data/instance-id"),
    );
    assert!(
        other.ok(),
        "another user is served while uid 1000 is capped: {other:?}"
    );
    let out = child.wait_with_output().expect("holder exits");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(v["refused"], 8, "{text}\n{}", agent.log_text());
}
