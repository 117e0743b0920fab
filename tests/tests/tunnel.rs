//! End-to-end: two nodes in network namespaces carry IPv6 through a real S3 server over HTTP.
//! Every behaviour is proven against both servers (s3s-fs and moto). Needs root and a built
//! `hoshino-agent` (`HOSHINO_AGENT_BIN` or next to this test binary's target directory).
//!
//! Timeouts are generous limits for a loaded 2-core machine, never measurements.

use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use hoshino_tests::binaries;
use hoshino_tests::bundle_forge::{self, BundleHeader, MAX_BUNDLE_BYTES};
use hoshino_tests::command;
use hoshino_tests::http_server::serve_directory;
use hoshino_tests::node_addr::{self, DEFAULT_PREFIX};
use hoshino_tests::ping::ping;
use hoshino_tests::s3_backend::{BackendKind, BackendOptions};
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};
use hoshino_tests::udp_probe::{read_seqs, spawn_listening};
use sha2::{Digest, Sha256};

const PING_DEADLINE: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn start(kind: BackendKind) -> TunnelNet {
    start_with(kind, &NetOptions::default())
}

fn start_with(kind: BackendKind, options: &NetOptions) -> TunnelNet {
    match TunnelNet::start(kind, 2, options) {
        Ok(net) => net,
        Err(e) => panic!("starting two nodes on {}: {e}", kind.label()),
    }
}

fn addr(net: &TunnelNet, index: u8) -> Ipv6Addr {
    net.node(index).expect("node").tunnel_addr
}

fn assert_every_reply(net: &TunnelNet, from: u8, to: u8, count: u32) {
    let report = ping(
        &net.node(from).expect("node").ns,
        IpAddr::V6(addr(net, to)),
        count,
        Duration::from_millis(200),
        PING_DEADLINE,
    )
    .expect("ping runs");
    let unanswered = report.unanswered(count);
    assert!(
        unanswered.is_empty(),
        "n{from} -> n{to}: requests {unanswered:?} got no reply\n{}\n{}",
        report.raw,
        diagnostics(net)
    );
}

fn ping_between_derived_node_addresses_gets_every_reply(kind: BackendKind) {
    let net = start(kind);
    for node in &net.bed.nodes {
        let shown = node
            .ns
            .ip(&["-6", "addr", "show", "dev", "hoshino0"])
            .expect("TUN exists");
        assert!(
            shown.contains(&node.tunnel_addr.to_string()),
            "n{}: expected {} on hoshino0:\n{shown}",
            node.index,
            node.tunnel_addr
        );
    }
    assert_every_reply(&net, 1, 2, 10);
    assert_every_reply(&net, 2, 1, 5);
}

fn http_download_of_4mib_matches_its_checksum(kind: BackendKind) {
    let net = start(kind);
    let www = net.scratch().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    // Pseudo-random so compression or deduplication anywhere on the path cannot help.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let blob: Vec<u8> = (0..4 * 1024 * 1024 + 12_345)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(www.join("blob"), &blob).expect("write blob");
    let server_addr = addr(&net, 2);
    let _server = serve_directory(&net.node(2).expect("node 2").ns, server_addr, 8080, &www)
        .expect("spawn http.server");

    let out = net.scratch().join("downloaded");
    let mut curl = net.command_in(1, "curl").expect("node 1");
    curl.args([
        "-g",
        "-sS",
        "--fail",
        "--retry",
        "30",
        "--retry-all-errors",
        "--retry-delay",
        "1",
    ])
    .args(["--max-time", "120", "-o"])
    .arg(&out)
    .arg(format!("http://[{server_addr}]:8080/blob"));
    if let Err(e) = command::run(&mut curl) {
        panic!("download failed: {e}\n{}", diagnostics(&net));
    }
    let got = std::fs::read(&out).expect("read download");
    assert_eq!(got.len(), blob.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&blob));
}

fn thousand_udp_datagrams_arrive_complete_in_order_without_duplicates(kind: BackendKind) {
    let net = start(kind);
    let probe = binaries::netprobe().expect("hoshino-netprobe built");
    let to = SocketAddrV6::new(addr(&net, 2), 9000, 0, 0);
    let mut recv = net
        .command_in(2, probe.to_str().expect("utf-8 path"))
        .expect("node 2");
    recv.args(["udp-recv", "--listen", &to.to_string(), "--expect", "1000"])
        .args(["--timeout", "60", "--linger", "2"]);
    let (_receiver, mut reader) = spawn_listening(recv, "udp-recv");
    let mut send = net
        .command_in(1, probe.to_str().expect("utf-8 path"))
        .expect("node 1");
    send.args([
        "udp-send",
        "--to",
        &to.to_string(),
        "--count",
        "1000",
        "--size",
        "512",
    ]);
    command::run(&mut send).expect("udp-send");
    let seqs = read_seqs(&mut reader);
    let expected: Vec<u64> = (0..1000).collect();
    if seqs != expected {
        let missing: Vec<u64> = expected
            .iter()
            .copied()
            .filter(|s| !seqs.contains(s))
            .collect();
        panic!(
            "received {} datagrams; missing {:?}; first out-of-order at {:?}\n{}",
            seqs.len(),
            missing.iter().take(40).collect::<Vec<_>>(),
            seqs.windows(2).position(|w| w[0] >= w[1]),
            diagnostics(&net)
        );
    }
}

/// Agent logs, TUN counters and agent metrics of every node, for assertion messages.
fn diagnostics(net: &TunnelNet) -> String {
    let mut out = net.agent_logs();
    for node in &net.bed.nodes {
        let stats = node
            .ns
            .ip(&["-s", "link", "show", "dev", "hoshino0"])
            .unwrap_or_default();
        out.push_str(&format!("--- n{} hoshino0 ---\n{stats}", node.index));
    }
    for (i, agent) in net.agents.iter().enumerate() {
        let summary = agent
            .metrics()
            .map(|m| m.summary())
            .unwrap_or_else(|e| e.to_string());
        out.push_str(&format!("--- n{} metrics ---\n{summary}", i + 1));
    }
    out
}

fn sigterm_leaves_no_link_address_or_route(kind: BackendKind) {
    let mut net = start(kind);
    let node = net.node(2).expect("node 2");
    let tun_addr = node.tunnel_addr.to_string();
    let prefix = "fd68:6f73:6869:6e6f::/64";
    let before_link = node.ns.ip(&["-o", "link", "show"]).expect("links");
    let before_route = node.ns.ip(&["-6", "route", "show"]).expect("routes");
    assert!(before_link.contains("hoshino0"), "{before_link}");
    assert!(before_route.contains(prefix), "{before_route}");

    let status = net
        .agent_mut(2)
        .expect("agent")
        .stop(STOP_TIMEOUT)
        .expect("agent exits");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        diagnostics(&net)
    );

    let node = net.node(2).expect("node 2");
    let links = node.ns.ip(&["-o", "link", "show"]).expect("links");
    let addrs = node.ns.ip(&["-6", "addr", "show"]).expect("addrs");
    let routes = node.ns.ip(&["-6", "route", "show"]).expect("routes");
    assert!(!links.contains("hoshino0"), "link left behind:\n{links}");
    assert!(!addrs.contains(&tun_addr), "address left behind:\n{addrs}");
    assert!(
        !routes.contains("fd68:6f73:6869:6e6f"),
        "route left behind:\n{routes}"
    );
}

fn forged_and_malformed_objects_are_rejected_deleted_and_the_tunnel_survives(kind: BackendKind) {
    let net = start(kind);
    let a = net.node(1).expect("node 1");
    let b = net.node(2).expect("node 2");
    let a_id = u64::from_str_radix(&a.node_id, 16).expect("hex id");
    let b_id = u64::from_str_radix(&b.node_id, 16).expect("hex id");
    let stranger_id: u64 = 0x5742_4e47_4552_0001;
    let stranger_addr =
        node_addr::node_address(DEFAULT_PREFIX, &format!("{stranger_id:016x}{:016x}", 1))
            .expect("stranger address");
    let port = 9100;
    let probe = binaries::netprobe().expect("hoshino-netprobe built");
    let listen = SocketAddrV6::new(b.tunnel_addr, port, 0, 0);
    let mut recv = net
        .command_in(2, probe.to_str().expect("utf-8 path"))
        .expect("node 2");
    recv.args(["udp-recv", "--listen", &listen.to_string(), "--expect", "1"])
        .args(["--timeout", "60", "--linger", "2"]);
    let (_receiver, mut reader) = spawn_listening(recv, "udp-recv");

    let datagram = |src: Ipv6Addr, seq: u64| {
        bundle_forge::udp6_packet(src, b.tunnel_addr, 4000, port, &seq.to_be_bytes())
    };
    let bundle = |sender: u64, dest: u64, session: u64, packet: Vec<u8>| {
        bundle_forge::encode_bundle(
            &BundleHeader {
                sender,
                dest,
                session,
                seq: 0,
            },
            &[packet],
        )
    };
    let mut garbage_state = 0x1234_5678_u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            garbage_state = garbage_state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (garbage_state >> 33) as u8
        })
        .collect();
    let whole = bundle(a_id, b_id, 0xaaaa, datagram(a.tunnel_addr, 901));
    let truncated = whole
        .get(..whole.len() - 10)
        .expect("bundle longer than 10")
        .to_vec();
    let mut replayed = bundle(a_id, b_id, 0xffff, datagram(a.tunnel_addr, 905));
    // Header seq 7, put under the key of seq 0: key and header must agree.
    if let Some(seq) = replayed.get_mut(32..40) {
        seq.copy_from_slice(&7u64.to_be_bytes());
    }
    // Keys `v2/inbox/<b>/<session>-<seq>.<a>`: the session orders them; the valid control
    // (session 0xeeee) sorts after every forged object but the replayed one.
    let objects: Vec<(u64, &str, Vec<u8>)> = vec![
        (0x1, "garbage", garbage),
        (0x2, "truncated", truncated),
        (0x3, "oversized", vec![0u8; MAX_BUNDLE_BYTES + 1]),
        (
            0xbbbb,
            "header sender differs from key sender",
            bundle(stranger_id, b_id, 0xbbbb, datagram(a.tunnel_addr, 902)),
        ),
        (
            0xcccc,
            "destined to another node",
            bundle(a_id, stranger_id, 0xcccc, datagram(a.tunnel_addr, 903)),
        ),
        (
            0xdddd,
            "packet source spoofed",
            bundle(a_id, b_id, 0xdddd, datagram(stranger_addr, 904)),
        ),
        (
            0xeeee,
            "valid control",
            bundle(a_id, b_id, 0xeeee, datagram(a.tunnel_addr, 1)),
        ),
        (0xffff, "header seq differs from key seq", replayed),
    ];
    let inbox = format!("v2/inbox/{}/", b.node_id);
    for (session, what, body) in &objects {
        let key = bundle_forge::bundle_key(b_id, *session, 0, a_id);
        if let Err(e) = net.put_object(1, &key, body) {
            panic!("putting {what} object: {e}");
        }
    }
    // Keys the strict parser refuses (IAM's `*` also matches `/`, so node A can write these).
    for bad in [
        format!("{inbox}junk.{}", a.node_id),
        format!("{inbox}00000000000000aa-0000000000000000.{}/x", a.node_id),
        format!("{inbox}x/00000000000000aa-0000000000000000.{}", a.node_id),
    ] {
        let body = bundle(a_id, b_id, 0xabab, datagram(a.tunnel_addr, 906));
        net.put_object(1, &bad, &body)
            .unwrap_or_else(|e| panic!("putting {bad}: {e}"));
    }
    // Ring the doorbell as a sender does after its PUTs: on a loaded machine the uploads above
    // can outlast the receiver's active period, and an idle receiver only wakes on a ring.
    let control_key = bundle_forge::bundle_key(b_id, 0xeeee, 0, a_id);
    net.put_object(1, &format!("v2/bell/{}", b.node_id), control_key.as_bytes())
        .unwrap_or_else(|e| panic!("ringing the bell: {e}"));

    let seqs = read_seqs(&mut reader);
    assert_eq!(
        seqs,
        vec![1],
        "only the valid control datagram may arrive\n{}",
        diagnostics(&net)
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = net.list_keys(1, &inbox).expect("list inbox");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "objects not deleted: {left:?}\n{}",
            diagnostics(&net)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = net.agent(2).expect("agent 2").metrics().expect("metrics");
    let rejected = metrics.sum("hoshino_bundles_rejected_total");
    assert!(
        rejected >= 9.0,
        "expected garbage, truncated, oversized, sender, destination and seq mismatches and 3 bad keys counted; got {rejected}\n{}",
        diagnostics(&net)
    );
    let mut net = net;
    assert!(
        net.agent_mut(2).expect("agent 2").exit_status().is_none(),
        "agent died\n{}",
        diagnostics(&net)
    );
    assert_every_reply(&net, 1, 2, 3);
}

macro_rules! on_both_servers {
    ($($test:ident),* $(,)?) => {
        mod s3s_fs {
            $(#[test] fn $test() { super::$test(hoshino_tests::s3_backend::BackendKind::S3sFs) })*
        }
        mod moto {
            $(#[test] fn $test() { super::$test(hoshino_tests::s3_backend::BackendKind::Moto) })*
        }
    };
}

on_both_servers!(
    ping_between_derived_node_addresses_gets_every_reply,
    http_download_of_4mib_matches_its_checksum,
    thousand_udp_datagrams_arrive_complete_in_order_without_duplicates,
    sigterm_leaves_no_link_address_or_route,
    forged_and_malformed_objects_are_rejected_deleted_and_the_tunnel_survives,
);

/// DESIGN.md "Waking an idle receiver cheaply": once idle, a node makes no LIST (nor HEAD or
/// PUT) at all, only a doorbell GET per second, and a ping still wakes the peer and gets every
/// reply.
#[test]
fn idle_nodes_only_poll_the_doorbell_and_wake_when_pinged() {
    let net = start(BackendKind::S3sFs);
    // Traffic both ways first, so both bells have been rung and both nodes were active.
    assert_every_reply(&net, 1, 2, 3);
    let count = |op: &str| -> Vec<f64> {
        net.agents
            .iter()
            .map(|a| {
                a.metrics()
                    .expect("metrics")
                    .sum_where("hoshino_s3_requests_total", &[("op", op)])
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let idle: Vec<f64> = net
            .agents
            .iter()
            .map(|a| a.metrics().expect("metrics").sum("hoshino_heartbeat_idle"))
            .collect();
        if idle.iter().all(|v| *v >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents did not go idle: {idle:?}\n{}",
            net.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let others = || [count("list"), count("head"), count("put")];
    let (quiet, gets) = (others(), count("get"));
    std::thread::sleep(Duration::from_secs(4));
    let (quiet_after, gets_after) = (others(), count("get"));
    assert_eq!(
        quiet,
        quiet_after,
        "no LIST, HEAD or PUT while idle\n{}",
        net.agent_logs()
    );
    for (before, after) in gets.iter().zip(&gets_after) {
        assert!(
            after - before >= 2.0,
            "doorbell GETs while idle: {before} -> {after}"
        );
    }
    assert_every_reply(&net, 1, 2, 3);
}

/// Only our server injects faults: a fifth of all requests get 503 SlowDown.
#[test]
fn ping_gets_every_reply_despite_a_fifth_of_requests_slowed_down() {
    let options = NetOptions {
        backend: BackendOptions {
            fault_fraction: 0.2,
        },
        ..NetOptions::default()
    };
    let net = start_with(BackendKind::S3sFs, &options);
    assert_every_reply(&net, 1, 2, 10);
}

#[test]
fn addr_command_prints_prefix_plus_machine_id() {
    let dir = hoshino_tests::scratch::ScratchDir::create("addr").expect("scratch");
    let file = dir.path().join("machine-id");
    std::fs::write(&file, "0123456789abcdef0011223344556677\n").expect("write");
    let out = command::run(
        std::process::Command::new(binaries::agent().expect("agent built"))
            .args(["addr", "--prefix", "fd00:1:2:3::/64", "--machine-id-file"])
            .arg(&file),
    )
    .expect("addr succeeds");
    assert_eq!(out.trim(), "fd00:1:2:3:123:4567:89ab:cdef");
}

#[test]
fn addr_command_rejects_a_malformed_machine_id_with_exit_2() {
    let dir = hoshino_tests::scratch::ScratchDir::create("addr").expect("scratch");
    let file = dir.path().join("machine-id");
    std::fs::write(&file, "not-a-machine-id\n").expect("write");
    let out = command::output(
        std::process::Command::new(binaries::agent().expect("agent built"))
            .args(["addr", "--machine-id-file"])
            .arg(&file),
    )
    .expect("addr runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("machine-id") || stderr.contains("machine id"),
        "{stderr}"
    );
}
