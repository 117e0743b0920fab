//! IMDSv2 through the terminating proxy, forwarded (NAT'd container) clients and raw-socket
//! segment tricks from container root, and the audit records. `examples/policies/metadata.toml` against the logging fake metadata server.
//! Needs root (namespaces, BPF, nft).

mod interceptor_support;

use std::time::Duration;

use interceptor_support::*;

fn url(v6: bool, path: &str) -> String {
    if v6 {
        format!("http://[{IMDS_V6}]{path}")
    } else {
        format!("http://{IMDS_V4}{path}")
    }
}

const TOKEN_PATH: &str = "/latest/api/token";

fn token(bed: &MetadataBed, uid: Option<u32>, v6: bool) -> Fetch {
    bed.curl_in(
        &bed.client,
        uid,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            &url(v6, TOKEN_PATH),
        ],
    )
}

#[test]
fn a_non_root_user_gets_a_token_and_reads_the_allowed_paths_with_it() {
    let bed = MetadataBed::new();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for v6 in [false, true] {
        let t = token(&bed, Some(1000), v6);
        assert!(t.ok(), "v6={v6} token: {t:?}\n{}", agent.log_text());
        assert!(t.body.starts_with("TOKEN-"), "{t:?}");
        let header = format!("X-aws-ec2-metadata-token: {}", t.body);
        let f = bed.curl_in(
            &bed.client,
            Some(1000),
            &["-H", &header, &url(v6, "/latest/meta-data/instance-id")],
        );
        assert!(f.ok(), "{f:?}");
        assert_eq!(f.body, INSTANCE_ID);
        // The token went through: a wrong one is refused by the server itself.
        let f = bed.curl_in(
            &bed.client,
            Some(1000),
            &[
                "-f",
                "-H",
                "X-aws-ec2-metadata-token: TOKEN-forged",
                &url(v6, "/latest/meta-data/instance-id"),
            ],
        );
        assert_eq!(f.code, 22, "401 from the server: {f:?}");
    }
}

#[test]
fn a_token_root_obtained_does_not_unlock_iam_for_a_non_root_user() {
    let bed = MetadataBed::new();
    let _agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let t = token(&bed, None, false);
    assert!(t.ok() && t.body.starts_with("TOKEN-"), "{t:?}");
    let header = format!("X-aws-ec2-metadata-token: {}", t.body);
    for path in [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/info",
    ] {
        let f = bed.curl_in(&bed.client, Some(1000), &["-H", &header, &url(false, path)]);
        assert_eq!(f.code, 56, "{path}: {f:?}");
        assert!(!f.body.contains(CREDENTIALS));
    }
    bed.assert_server_saw_no_iam();
    // The token itself is good: root reads the credentials with it.
    let f = bed.curl_in(
        &bed.client,
        None,
        &[
            "-H",
            &header,
            &url(false, "/latest/meta-data/iam/security-credentials/"),
        ],
    );
    assert!(f.ok(), "{f:?}");
    assert_eq!(f.body, CREDENTIALS);
}

#[test]
fn a_masqueraded_container_reads_allowed_paths_and_is_reset_on_the_rest() {
    let bed = MetadataBed::new();
    let ctr = bed.add_container();
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    for v6 in [false, true] {
        let f = bed.curl_in(&ctr, None, &[&url(v6, "/latest/meta-data/instance-id")]);
        assert!(f.ok(), "container v6={v6}: {f:?}\n{}", agent.log_text());
        assert_eq!(f.body, INSTANCE_ID);
        let f = bed.curl_in(
            &ctr,
            None,
            &[&url(v6, "/latest/meta-data/placement/availability-zone")],
        );
        assert!(f.ok(), "{f:?}");
        for path in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/user-data",
        ] {
            let f = bed.curl_in(&ctr, None, &[&url(v6, path)]);
            assert_eq!(f.code, 56, "container v6={v6} {path}: {f:?}");
            assert!(f.elapsed < Duration::from_secs(1), "{f:?}");
        }
        // Forwarded clients get no IMDSv2 token by default (see the example policy).
        let f = bed.curl_in(
            &ctr,
            None,
            &[
                "-X",
                "PUT",
                "-H",
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
                &url(v6, TOKEN_PATH),
            ],
        );
        assert_eq!(f.code, 56, "container token v6={v6}: {f:?}");
    }
    bed.assert_server_saw_no_iam();
    assert!(
        !bed.server_log().iter().any(|l| l.contains("token")),
        "{:?}",
        bed.server_log()
    );
    let log = agent.log_text();
    assert!(
        log.contains("uid=65534"),
        "forwarded clients are judged as the no-socket uid:\n{log}"
    );
}

#[test]
fn every_judged_request_gives_one_json_audit_record() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &["--log-format", "json"]);
    assert!(
        bed.fetch(Some(1000), &url(false, "/latest/meta-data/instance-id"))
            .ok()
    );
    assert_eq!(
        bed.fetch(Some(1000), &url(true, "/latest/meta-data/iam/info"))
            .code,
        56
    );
    let a = bed.raw(
        Some(1000),
        &serde_json::json!({"host": IMDS_V4, "port": 80, "chunks": ["GET /latest/meta-data/placement/../iam/info HTTP/1.1\r\n\r\n"]}),
    );
    assert!(a.reset, "{a:?}");
    agent.wait_for_log("hoshino::audit", 3, Duration::from_secs(5));
    let records: Vec<serde_json::Value> = agent
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "hoshino::audit")
        .collect();
    assert_eq!(records.len(), 3, "{records:#?}");
    let field = |i: usize, k: &str| records[i]["fields"][k].clone();
    assert_eq!(field(0, "uid"), 1000);
    assert_eq!(field(0, "method"), "GET");
    assert_eq!(field(0, "path"), "/latest/meta-data/instance-id");
    assert_eq!(field(0, "rule"), "imds-users");
    assert_eq!(field(0, "verdict"), "allow");
    assert_eq!(field(1, "path"), "/latest/meta-data/iam/info");
    assert_eq!(field(1, "verdict"), "reset");
    assert_eq!(field(1, "entry"), "0");
    assert_eq!(field(2, "path"), "-");
    assert_eq!(field(2, "refused"), "target_dot_segment");
    assert_eq!(field(2, "verdict"), "reset");
}

#[test]
fn raw_segment_tricks_from_container_root_never_reach_the_credentials() {
    let bed = MetadataBed::new();
    let ctr = bed.add_container();
    // The container's kernel knows nothing of the hand-made connections and would reset them;
    // only the script's own (marked) RSTs may leave.
    let rules = bed.scratch.path().join("no-kernel-rst.nft");
    std::fs::write(
        &rules,
        "table ip hoshino_test_raw {\n chain out {\n  type filter hook output priority 0;\n  meta mark != 0x77 tcp flags & rst == rst drop\n }\n}\n",
    )
    .expect("nft rules");
    let out =
        hoshino_tests::command::output(ctr.command("nft").arg("-f").arg(&rules)).expect("nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = bed.attach(&example_policy("metadata.toml"), &[]);
    let out = hoshino_tests::command::output(
        ctr.command("/usr/bin/python3")
            .arg(support_file("tcp_tricks.py"))
            .args([IMDS_V4, CTR_V4]),
    )
    .expect("tcp_tricks runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let results: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let results = results.as_object().expect("an object");
    assert_eq!(results.len(), 5, "{results:?}");
    for (name, r) in results {
        assert!(
            r.get("error").is_none(),
            "{name}: {r}\n{}",
            agent.log_text()
        );
        let data = r["data"].as_str().unwrap_or_default();
        assert!(!data.contains(CREDENTIALS), "{name}: {r}");
    }
    bed.assert_server_saw_no_iam();
    // The tricks reached the judge (they are not just lost packets).
    let judged = agent.log_text().matches("HTTP request judged").count();
    assert!(judged >= 3, "{}", agent.log_text());
}
