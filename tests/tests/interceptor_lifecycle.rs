//! The `attach` agent's life: a 1,000-prefix policy loads and decides, SIGHUP reloads without
//! detaching (a broken file keeps the old policy), the pinned classifier fails closed while the
//! agent is down (`kill -9` or SIGTERM) and is adopted by the next agent, and `detach` (or
//! `--detach-on-exit`) leaves nothing behind. In namespaces the tests create; needs root.

mod interceptor_support;

use std::time::Duration;

use interceptor_support::*;

const IAM: &str = "/latest/meta-data/iam/security-credentials/";

fn iam_as_user(bed: &MetadataBed) -> Fetch {
    bed.fetch(Some(1000), &format!("http://{IMDS_V4}{IAM}"))
}

#[test]
fn thousand_prefix_policy_loads_and_drops_only_listed_networks() {
    let bed = MetadataBed::new();
    // A listed network (198.18.5.0/24, 2001:db8:5::/64) behind the peer namespace.
    bed.imds
        .ip(&["addr", "add", "198.18.5.1/32", "dev", "lo"])
        .expect("addr");
    bed.imds
        .ip(&["addr", "add", "2001:db8:5::1/128", "dev", "lo", "nodad"])
        .expect("addr");
    bed.client
        .ip(&["route", "add", "198.18.5.0/24", "via", SERVER_V4])
        .expect("route");
    bed.client
        .ip(&["-6", "route", "add", "2001:db8:5::/64", "via", SERVER_V6])
        .expect("route");
    bed.client
        .run("ping", &["-c", "1", "-W", "2", "198.18.5.1"])
        .expect("reachable before");

    let agent = bed.attach(&example_policy("prefixes-1000.toml"), &[]);
    assert!(
        agent.log_text().contains("rules=10"),
        "{}",
        agent.log_text()
    );
    assert!(
        bed.client
            .run("ping", &["-c", "1", "-W", "1", "198.18.5.1"])
            .is_err(),
        "v4 dropped"
    );
    assert!(
        bed.client
            .run("ping", &["-6", "-c", "1", "-W", "1", "2001:db8:5::1"])
            .is_err(),
        "v6 dropped"
    );
    bed.client
        .run("ping", &["-c", "1", "-W", "2", SERVER_V4])
        .expect("unlisted v4 passes");
    bed.client
        .run("ping", &["-6", "-c", "1", "-W", "2", SERVER_V6])
        .expect("unlisted v6 passes");
}

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one() {
    let bed = MetadataBed::new();
    let policy = bed.policy_copy(&example_policy("metadata.toml"), "policy.toml");
    let mut agent = bed.attach(&policy, &[]);
    assert_eq!(iam_as_user(&bed).code, 56);

    let text = std::fs::read_to_string(&policy).expect("read policy");
    let line = 1 + text
        .lines()
        .position(|l| l == "action = \"divert\"")
        .expect("metadata.toml has a divert rule");
    std::fs::write(
        &policy,
        text.replacen("action = \"divert\"", "action = \"divret\"", 1),
    )
    .expect("break");
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(
        "policy reload failed, keeping the current policy",
        1,
        Duration::from_secs(10),
    );
    let log = agent.log_text();
    let shown = policy.display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("{shown}:{line}:10: unknown verdict `divret`"))),
        "the log names FILE:LINE:COL and the problem:\n{log}"
    );
    let f = iam_as_user(&bed);
    assert_eq!(f.code, 56, "old policy still resets: {f:?}");
    assert!(
        bed.fetch(
            Some(1000),
            &format!("http://{IMDS_V4}/latest/meta-data/instance-id")
        )
        .ok()
    );
}

#[test]
fn sighup_with_a_good_policy_replaces_it_without_detaching() {
    let bed = MetadataBed::new();
    let policy = bed.policy_copy(&example_policy("metadata.toml"), "policy.toml");
    let mut agent = bed.attach(&policy, &[]);
    assert_eq!(iam_as_user(&bed).code, 56);

    std::fs::write(
        &policy,
        "default = \"pass\"\n[[rule]]\nname = \"imds-all\"\ndst = [\"169.254.169.254\"]\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"allow\"\n",
    )
    .expect("rewrite");
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("policy reloaded", 1, Duration::from_secs(10));
    let f = iam_as_user(&bed);
    assert!(f.ok(), "new policy allows: {f:?}\n{}", agent.log_text());
    assert_eq!(
        agent.log_text().matches(READY_LINE).count(),
        1,
        "attached once"
    );
}

const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";

fn instance_id_as(bed: &MetadataBed, uid: Option<u32>) -> Fetch {
    bed.fetch(uid, &format!("http://{IMDS_V4}{INSTANCE_ID_PATH}"))
}

/// Request lines the fake metadata server logged for `path`.
fn server_requests(bed: &MetadataBed, path: &str) -> usize {
    std::fs::read_to_string(bed.scratch.path().join("imds-server.log"))
        .unwrap_or_default()
        .matches(&format!("GET {path} "))
        .count()
}

/// While no agent runs, a diverted connection gets nothing: its SYN is redirected to a TUN
/// that no longer exists and dropped, so the server never answers (curl times out, 28).
fn assert_fails_closed(bed: &MetadataBed) {
    let before = server_requests(bed, INSTANCE_ID_PATH);
    let f = instance_id_as(bed, Some(1000));
    assert_eq!(f.code, 28, "uid 1000 gets no answer at all: {f:?}");
    assert_eq!(
        server_requests(bed, INSTANCE_ID_PATH),
        before,
        "the server never saw the request"
    );
    let f = iam_as_user(bed);
    assert_eq!(f.code, 28, "uid 1000 cannot reach iam/: {f:?}");
    let root = bed.fetch(None, &format!("http://{IMDS_V4}{IAM}"));
    assert!(root.ok(), "root's traffic passes in the kernel: {root:?}");
    assert_eq!(root.body, CREDENTIALS);
}

#[test]
fn kill_9_fails_closed_and_a_restarted_agent_adopts_the_pinned_classifier() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &[]);
    assert!(
        agent.log_text().contains("adoption=Some(Fresh)"),
        "{}",
        agent.log_text()
    );
    let divert_tun = bed
        .client
        .ip(&["-o", "link", "show", "hoshinodv0"])
        .expect("divert TUN");
    assert!(
        divert_tun.contains("qlen 10000"),
        "queue sized for bursts: {divert_tun}"
    );
    assert_eq!(iam_as_user(&bed).code, 56);
    assert!(instance_id_as(&bed, Some(1000)).ok());
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    assert!(
        !bed.client_links().contains("hoshinodv0"),
        "the divert TUN went with the agent: {}",
        bed.client_links()
    );
    assert!(bed.pin_dir().join("link").exists(), "the link stays pinned");
    assert_eq!(
        bed.egress_tcx_programs(),
        1,
        "the classifier stays attached"
    );
    assert_fails_closed(&bed);

    let restarted = bed.attach(&example_policy("metadata.toml"), &[]);
    assert!(
        restarted.log_text().contains("adoption=Some(Adopted)"),
        "{}",
        restarted.log_text()
    );
    assert_eq!(
        bed.egress_tcx_programs(),
        1,
        "the restarted agent swapped its program into the pinned link: no second program"
    );
    let f = instance_id_as(&bed, Some(1000));
    assert!(f.ok(), "served again: {f:?}\n{}", restarted.log_text());
    assert_eq!(f.body, INSTANCE_ID);
    assert_eq!(iam_as_user(&bed).code, 56, "and judged again");
}

#[test]
fn a_pin_left_by_another_classifier_object_is_replaced_in_place() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &[]);
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    // Make the pins look like another build's: overwrite the recorded object digest.
    let digest = bed.pin_dir().join("object");
    let data = aya::maps::MapData::from_pin(&digest).expect("open the digest pin");
    let mut array: aya::maps::Array<_, [u8; 32]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("digest map");
    array.set(0, [0xee; 32], 0).expect("overwrite digest");
    drop(array);

    let restarted = bed.attach(&example_policy("metadata.toml"), &[]);
    assert!(
        restarted.log_text().contains("adoption=Some(Replaced)"),
        "{}",
        restarted.log_text()
    );
    assert_eq!(bed.egress_tcx_programs(), 1, "replaced, not added");
    assert!(instance_id_as(&bed, Some(1000)).ok());
    assert_eq!(iam_as_user(&bed).code, 56);
}

#[test]
fn sigterm_keeps_the_classifier_pinned_and_detach_removes_everything() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &[]);
    assert!(bed.client_links().contains("hoshinodv0"));
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert!(
        agent
            .log_text()
            .contains("interceptor left attached (pinned)"),
        "{}",
        agent.log_text()
    );
    assert!(
        !bed.client_links().contains("hoshinodv0"),
        "{}",
        bed.client_links()
    );
    assert_eq!(bed.egress_tcx_programs(), 1);
    assert_fails_closed(&bed);

    let out = bed.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bed.pin_dir().exists(), "no pins left");
    assert!(!bed.pins.has_pins(), "nothing under the pin root");
    assert_eq!(bed.egress_tcx_programs(), 0, "no TCX link left");
    assert_eq!(bed.egress_filters(), "", "no clsact filter left");
    assert!(
        !bed.qdiscs().contains("clsact"),
        "no clsact qdisc left: {}",
        bed.qdiscs()
    );
    let f = iam_as_user(&bed);
    assert!(f.ok(), "nothing intercepts after detach: {f:?}");
    let again = bed.detach();
    assert!(again.status.success(), "detach of nothing succeeds");
}

#[test]
fn detach_on_exit_removes_the_classifier_on_sigterm() {
    let bed = MetadataBed::new();
    let mut agent = bed.attach(&example_policy("metadata.toml"), &["--detach-on-exit"]);
    assert_eq!(iam_as_user(&bed).code, 56);
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert!(agent.log_text().contains("interceptor detached"));
    assert!(!bed.pin_dir().exists(), "no pins left");
    assert_eq!(bed.egress_tcx_programs(), 0);
    assert_eq!(bed.egress_filters(), "");
    let f = iam_as_user(&bed);
    assert!(f.ok(), "nothing intercepts after the agent left: {f:?}");
}

#[test]
fn divert_rules_without_http_reinject_or_drop_whole_flows() {
    let bed = MetadataBed::new();
    let policy = bed.scratch.path().join("divert.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nname = \"watch-v4\"\ndst = [\"{SERVER_V4}\"]\nprotocol = \"tcp\"\naction = \"divert\"\nthen = \"reinject\"\n\
             [[rule]]\nname = \"sink-v6\"\ndst = [\"{SERVER_V6}\"]\nprotocol = \"tcp\"\naction = \"divert\"\nthen = \"drop\"\n"
        ),
    )
    .expect("write policy");
    let _agent = bed.attach(&policy, &[]);
    // Every packet of this TCP connection goes through the agent and back out, marked.
    let f = bed.fetch(Some(1000), &format!("http://{SERVER_V4}{IAM}"));
    assert!(f.ok(), "reinjected flow works end to end: {f:?}");
    assert_eq!(f.body, CREDENTIALS);
    let mut cmd = bed.client.command("curl");
    cmd.args(["-sS", "-g", "-m", "2"])
        .arg(format!("http://[{SERVER_V6}]/"));
    let out = hoshino_tests::command::output(&mut cmd).expect("curl runs");
    assert_eq!(out.status.code(), Some(28), "dropped flow times out");
}

#[test]
fn a_pin_directory_of_another_namespace_is_refused_and_left_alone() {
    let first = MetadataBed::new();
    let _agent = first.attach(&example_policy("metadata.toml"), &[]);
    let second = MetadataBed::new();
    // The same --pin-dir from another namespace: the pinned link there is not this eth0's.
    let mut cmd = second.client.command("timeout");
    cmd.arg("20")
        .arg(hoshino_tests::binaries::agent().expect("hoshino-agent binary"))
        .args(["attach", "--interface", "eth0", "--policy"])
        .arg(example_policy("metadata.toml"))
        .arg("--pin-dir")
        .arg(first.pins.path());
    let out = hoshino_tests::command::output(&mut cmd).expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not attached to eth0 in this network namespace"),
        "{stderr}"
    );
    assert_eq!(second.egress_tcx_programs(), 0, "nothing attached here");
    assert_eq!(
        first.egress_tcx_programs(),
        1,
        "the other attachment is untouched"
    );
    assert_eq!(iam_as_user(&first).code, 56, "and still judges");
    assert!(instance_id_as(&first, Some(1000)).ok());
}
