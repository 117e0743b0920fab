//! End-to-end proofs of the tunnel data path v2 under a network key and S3 faults, on the testbed
//! (s3s-fs in the hub namespace, agents in node namespaces): encrypted bundles round-trip and a
//! tampered one is rejected; a GET that hangs for one sender's keys does not hold up another
//! sender; a 403 on a key the receiver listed is counted and retried until delivered; an S3
//! server restarted mid-transfer loses nothing TCP cannot retransmit.
//!
//! Timeouts are generous limits for a loaded 2-core machine, never measurements.

use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hoshino_tests::bundle_forge::{self, BundleHeader};
use hoshino_tests::command;
use hoshino_tests::http_server::serve_directory;
use hoshino_tests::ping::{PingReport, ping};
use hoshino_tests::process::Spawned;
use hoshino_tests::s3_backend::{BUCKET, BackendKind};
use hoshino_tests::s3_server::{ForbidRule, KeyMatch, ServerConditions, StallRule};
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};
use sha2::{Digest, Sha256};

const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// A 16-byte ping fill pattern ("hoshino-marker!!"): if it shows in an object read raw from the
/// bucket, the packets were stored in the clear.
const MARKER_HEX: &str = "686f7368696e6f2d6d61726b65722121";
const MARKER: &[u8] = b"hoshino-marker!!";

fn addr(net: &TunnelNet, index: u8) -> Ipv6Addr {
    net.node(index).expect("node").tunnel_addr
}

fn node_id(net: &TunnelNet, index: u8) -> String {
    net.node(index).expect("node").node_id.clone()
}

fn ping_from(net: &TunnelNet, from: u8, to: u8, count: u32, deadline: Duration) -> PingReport {
    ping(
        &net.node(from).expect("node").ns,
        IpAddr::V6(addr(net, to)),
        count,
        Duration::from_millis(300),
        deadline,
    )
    .expect("ping runs")
}

fn assert_every_reply(net: &TunnelNet, from: u8, to: u8, count: u32) {
    let report = ping_from(net, from, to, count, Duration::from_secs(60));
    let unanswered = report.unanswered(count);
    assert!(
        unanswered.is_empty(),
        "n{from} -> n{to}: requests {unanswered:?} got no reply\n{}\n{}",
        report.raw,
        net.agent_logs_and_metrics()
    );
}

/// 4 MiB and a bit of pseudo-random bytes, so compression or deduplication cannot help.
fn blob() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..4 * 1024 * 1024 + 12_345)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `python3 -m http.server` on node `index`'s tunnel address, port 8080, serving `blob`.
fn serve_blob(net: &TunnelNet, index: u8, blob: &[u8]) -> Spawned {
    let www = net.scratch().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("blob"), blob).expect("write blob");
    std::fs::write(www.join("ready"), b"ready").expect("write ready");
    serve_directory(
        &net.node(index).expect("node").ns,
        addr(net, index),
        8080,
        &www,
    )
    .expect("spawn http.server")
}

/// curl on node `from` fetching the blob from node `server` into `out`; `extra` flags first.
fn curl(
    net: &TunnelNet,
    from: u8,
    server: u8,
    out: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = net.command_in(from, "curl").expect("node");
    cmd.args(["-g", "-sS", "--fail", "--max-time", "120"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(format!("http://[{}]:8080/blob", addr(net, server)));
    cmd
}

fn assert_same_bytes(out: &Path, blob: &[u8], net: &TunnelNet) {
    let got = std::fs::read(out).expect("read download");
    assert_eq!(
        got.len(),
        blob.len(),
        "download length\n{}",
        net.agent_logs_and_metrics()
    );
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(blob),
        "download checksum\n{}",
        net.agent_logs_and_metrics()
    );
}

/// The file s3s-fs keeps an object's bytes in (`<root>/<bucket>/<key>`).
fn object_file(net: &TunnelNet, key: &str) -> PathBuf {
    net.scratch().join("s3s-root").join(BUCKET).join(key)
}

fn wait_for<T>(
    within: Duration,
    what: &str,
    net: &TunnelNet,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {within:?}\n{}",
            net.agent_logs_and_metrics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn wait_inbox_empty(net: &TunnelNet, inbox: &str, within: Duration) {
    // s3s-fs fails a LIST whose directory walk races the agent's deletes: try again.
    wait_for(within, &format!("an empty {inbox}"), net, || {
        net.list_keys(1, inbox)
            .ok()
            .filter(Vec::is_empty)
            .map(|_| ())
    });
}

/// Two nodes sharing a network key: ping and a 4 MiB download cross the tunnel, every bundle in
/// the bucket is v2 and carries no plaintext packet bytes, and a bundle with one byte flipped is
/// rejected as `bad_mac` while the tunnel keeps working.
#[test]
fn network_key_encrypts_bundles_end_to_end_and_a_tampered_byte_is_rejected() {
    let mut net = TunnelNet::without_agents(BackendKind::S3sFs, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let key_file = net.scratch().join("network.key");
    std::fs::write(&key_file, b"a shared network key for the e2e test\n").expect("key file");
    // The agent refuses a key file that group or others may read.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let key_arg = key_file.to_str().expect("utf-8 path").to_owned();
    let key_args = ["--network-key-file", key_arg.as_str()];
    net.start_agents(&key_args)
        .unwrap_or_else(|e| panic!("agents: {e}"));
    assert_every_reply(&net, 1, 2, 5);

    // With the receiver down, marked pings wait in its inbox where they can be read raw.
    net.agent_mut(2)
        .expect("agent 2")
        .stop(STOP_TIMEOUT)
        .expect("agent 2 stops");
    let inbox = format!("v2/inbox/{}/", node_id(&net, 2));
    let mut marked = net.command_in(1, "ping").expect("node 1");
    marked
        .args([
            "-n", "-c", "3", "-i", "0.3", "-w", "3", "-s", "400", "-p", MARKER_HEX,
        ])
        .arg(addr(&net, 2).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Unanswered by design: its exit status says nothing here.
    let _ = marked.status().expect("run ping");
    // Bundles of at least one marked echo request (400 bytes of payload).
    let objects: Vec<(String, Vec<u8>)> = wait_for(
        Duration::from_secs(20),
        "the marked pings in the inbox",
        &net,
        || {
            let keys = net.list_keys(1, &inbox).ok()?;
            let objects: Vec<(String, Vec<u8>)> = keys
                .into_iter()
                .filter_map(|k| Some((k.clone(), std::fs::read(object_file(&net, &k)).ok()?)))
                .collect();
            objects
                .iter()
                .any(|(_, b)| b.len() > 400)
                .then_some(objects)
        },
    );
    for (key, body) in &objects {
        assert_eq!(body.get(..4), Some(&b"HSB1"[..]), "{key}: not a bundle");
        assert_eq!(body.get(4), Some(&2), "{key}: not bundle format v2");
        assert!(
            !body.windows(MARKER.len()).any(|w| w == MARKER),
            "{key}: the packet payload is readable in the bucket"
        );
    }

    // One flipped byte in the largest bundle's ciphertext.
    let (key, body) = objects
        .iter()
        .max_by_key(|(_, b)| b.len())
        .expect("at least one object");
    let mut tampered = body.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x01;
    net.put_object(1, key, &tampered)
        .unwrap_or_else(|e| panic!("re-putting {key} tampered: {e}"));
    net.restart_agent(2, &key_args)
        .unwrap_or_else(|e| panic!("restarting agent 2: {e}"));
    wait_for(Duration::from_secs(30), "a bad_mac rejection", &net, || {
        let m = net.agent(2).ok()?.metrics().ok()?;
        (m.sum_where("hoshino_bundles_rejected_total", &[("reason", "bad_mac")]) >= 1.0)
            .then_some(())
    });

    let blob = blob();
    let _server = serve_blob(&net, 2, &blob);
    let out = net.scratch().join("downloaded");
    let mut download = curl(
        &net,
        1,
        2,
        &out,
        &["--retry", "30", "--retry-all-errors", "--retry-delay", "1"],
    );
    if let Err(e) = command::run(&mut download) {
        panic!("download failed: {e}\n{}", net.agent_logs_and_metrics());
    }
    assert_same_bytes(&out, &blob, &net);
    let m = net.agent(2).expect("agent 2").metrics().expect("metrics");
    assert_eq!(
        m.sum_where("hoshino_bundles_rejected_total", &[("reason", "bad_mac")]),
        1.0,
        "only the tampered bundle is rejected\n{}",
        m.summary()
    );
}

/// Three nodes; every GET body of n1's bundles to n3 hangs for far longer than the test. n2's
/// pings to n3 are all answered while n1's, sent at the same time, are still held up.
#[test]
fn a_get_hanging_for_one_senders_keys_does_not_delay_another_sender() {
    let mut net = TunnelNet::without_agents(BackendKind::S3sFs, 3, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    // Node ids exist only with the testbed: the rule goes in with a restart before any agent.
    let stall = ServerConditions {
        stall: Some(StallRule {
            keys: KeyMatch {
                prefix: format!("v2/inbox/{}/", node_id(&net, 3)),
                sender: Some(node_id(&net, 1)),
            },
            duration: Duration::from_secs(600),
            count: None,
        }),
        ..ServerConditions::default()
    };
    net.restart_s3_server_with(stall, Duration::ZERO)
        .unwrap_or_else(|e| panic!("S3 server with the stall rule: {e}"));
    net.start_agents(&[])
        .unwrap_or_else(|e| panic!("agents: {e}"));
    let (stalled, free) = std::thread::scope(|s| {
        let stalled = s.spawn(|| ping_from(&net, 1, 3, 20, Duration::from_secs(12)));
        // n1's first bundle is being fetched (and hangs) before n2 starts.
        std::thread::sleep(Duration::from_secs(2));
        let free = ping_from(&net, 2, 3, 10, Duration::from_secs(8));
        (stalled.join().expect("n1 ping thread"), free)
    });
    assert!(
        free.unanswered(10).is_empty(),
        "n2 -> n3 while n1's GETs hang: {:?} unanswered\n{}\n{}",
        free.unanswered(10),
        free.raw,
        net.agent_logs_and_metrics()
    );
    assert_eq!(
        stalled.received, 0,
        "n1's pings were answered: the stall did not hold up its bundles\n{}",
        stalled.raw
    );
}

/// Bundles from n1 wait in n2's inbox; the server answers the first GETs of n1's keys with 403
/// AccessDenied. The receiver counts them as GET errors (a listed key that answers 403 is a fault,
/// not "gone") and delivers every packet once the fault is lifted.
#[test]
fn a_403_on_a_listed_key_is_counted_and_the_bundle_is_delivered_once_lifted() {
    let mut net = TunnelNet::without_agents(BackendKind::S3sFs, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let receiver = node_id(&net, 2);
    // Node ids exist only with the testbed: the rule goes in with a restart before any agent.
    let forbid = ServerConditions {
        forbid: Some(ForbidRule {
            keys: KeyMatch {
                prefix: format!("v2/inbox/{receiver}/"),
                sender: Some(node_id(&net, 1)),
            },
            count: Some(3),
        }),
        ..ServerConditions::default()
    };
    net.restart_s3_server_with(forbid, Duration::ZERO)
        .unwrap_or_else(|e| panic!("S3 server with the forbid rule: {e}"));
    let a_id = u64::from_str_radix(&node_id(&net, 1), 16).expect("hex id");
    let b_id = u64::from_str_radix(&node_id(&net, 2), 16).expect("hex id");
    const BUNDLES: u64 = 3;
    const PACKETS: u64 = 10;
    for seq in 0..BUNDLES {
        let packets: Vec<Vec<u8>> = (0..PACKETS)
            .map(|i| {
                bundle_forge::udp6_packet(
                    addr(&net, 1),
                    addr(&net, 2),
                    4000,
                    9,
                    &(seq * 100 + i).to_be_bytes(),
                )
            })
            .collect();
        let header = BundleHeader {
            sender: a_id,
            dest: b_id,
            session: 0x403,
            seq,
        };
        let key = bundle_forge::bundle_key(b_id, 0x403, seq, a_id);
        net.put_object(1, &key, &bundle_forge::encode_bundle(&header, &packets))
            .unwrap_or_else(|e| panic!("putting bundle {seq}: {e}"));
    }
    net.start_agents(&[])
        .unwrap_or_else(|e| panic!("agents: {e}"));
    let inbox = format!("v2/inbox/{receiver}/");
    wait_inbox_empty(&net, &inbox, Duration::from_secs(60));
    let m = net.agent(2).expect("agent 2").metrics().expect("metrics");
    assert!(
        m.sum_where("hoshino_s3_errors_total", &[("op", "get")]) >= 1.0,
        "the 403s are not counted as GET errors\n{}",
        m.summary()
    );
    assert_eq!(
        m.sum("hoshino_ingress_packets_total"),
        (BUNDLES * PACKETS) as f64,
        "every packet is delivered once the 403s stop\n{}",
        net.agent_logs_and_metrics()
    );
}

/// A rate-limited 4 MiB download is in flight when the S3 server is stopped for 3 s and started
/// again on the same address and data: the agents' retries and TCP's retransmissions carry it
/// through, and the bytes match.
#[test]
fn s3_server_restarted_mid_transfer_loses_nothing_tcp_cannot_retransmit() {
    let mut net = TunnelNet::start(BackendKind::S3sFs, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    assert_every_reply(&net, 1, 2, 3);
    let blob = blob();
    let _server = serve_blob(&net, 2, &blob);
    let out = net.scratch().join("downloaded");
    // The server is up and the path warm before the transfer under test starts.
    let mut ready = net.command_in(1, "curl").expect("node 1");
    ready
        .args(["-g", "-sS", "--fail", "--max-time", "60", "-o", "/dev/null"])
        .args(["--retry", "30", "--retry-all-errors", "--retry-delay", "1"])
        .arg(format!("http://[{}]:8080/ready", addr(&net, 2)));
    if let Err(e) = command::run(&mut ready) {
        panic!(
            "http.server not reachable: {e}\n{}",
            net.agent_logs_and_metrics()
        );
    }
    // No curl retries: a second attempt from scratch would hide a broken transfer.
    let mut cmd = curl(&net, 1, 2, &out, &["--limit-rate", "400K"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut download: Child = cmd.spawn().expect("spawn curl");
    let partial = wait_for(
        Duration::from_secs(30),
        "the download under way",
        &net,
        || {
            if let Ok(Some(status)) = download.try_wait() {
                panic!(
                    "curl ended ({status}) before the restart\n{}",
                    net.agent_logs_and_metrics()
                );
            }
            let len = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            (len >= 256 * 1024).then_some(len)
        },
    );
    net.restart_s3_server(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("restarting the S3 server: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = download.try_wait().expect("curl status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = download.kill();
            let _ = download.wait();
            panic!(
                "the download did not finish\n{}",
                net.agent_logs_and_metrics()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = download
        .stderr
        .take()
        .map(|mut e| {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        })
        .unwrap_or_default();
    assert!(
        status.success(),
        "curl {status} after the restart ({partial} bytes before it): {stderr}\n{}",
        net.agent_logs_and_metrics()
    );
    assert!(
        (partial as usize) < blob.len(),
        "the download was complete before the restart"
    );
    assert_same_bytes(&out, &blob, &net);
}

/// A local user (uid 1000, no privilege) sprays one datagram at each of 3,000 addresses of the
/// tunnel's /64. Every address is a destination and each new one would cost a PUT and a bell
/// PUT: the agent opens new streams at a bounded rate (32 per second after a burst of 256) and
/// counts the rest as dropped, and a peer the agent never talked to is still reached afterwards.
#[test]
fn a_local_user_spraying_tunnel_addresses_gets_a_bounded_number_of_puts() {
    let net = TunnelNet::start(BackendKind::S3sFs, 2, &NetOptions::default())
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let metrics = |index: u8| net.agent(index).expect("agent").metrics().expect("metrics");
    let puts = |index: u8| metrics(index).sum_where("hoshino_s3_requests_total", &[("op", "put")]);
    let before = puts(1);
    let seg = addr(&net, 1).segments();
    let prefix = format!("{:x}:{:x}:{:x}:{:x}", seg[0], seg[1], seg[2], seg[3]);
    let spray = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         for i in range(3000):\n    \
             s.sendto(b'x', ('{prefix}:5eed:%x:%x:%x' % (i >> 32, (i >> 16) & 0xffff, i & 0xffff), 9))\n"
    );
    let started = Instant::now();
    // The system's interpreter: a per-user one (pyenv under /root) is not for uid 1000 to run.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("python3");
    let mut cmd = net.command_in(1, "setpriv").expect("node 1");
    cmd.args(["--reuid=1000", "--regid=1000", "--clear-groups", python])
        .args(["-c", &spray]);
    command::run(&mut cmd).unwrap_or_else(|e| panic!("spraying: {e}"));
    let refused = wait_for(
        Duration::from_secs(30),
        "the agent counting the refused destinations",
        &net,
        || {
            let n = metrics(1).sum_where(
                "hoshino_dropped_packets_total",
                &[("reason", "new_destination_rate")],
            );
            (n >= 1_000.0).then_some(n)
        },
    );
    // Let what was admitted be PUT, then count: a bundle and a ring per admitted stream at most.
    std::thread::sleep(Duration::from_secs(3));
    let admitted = 256.0 + 32.0 * started.elapsed().as_secs_f64();
    let spent = puts(1) - before;
    assert!(
        spent <= 2.0 * admitted + 10.0,
        "{spent} PUTs for {admitted:.0} admitted streams ({refused} refused)\n{}",
        net.agent_logs_and_metrics()
    );
    // Each datagram opened a stream or was refused; at most `admitted` opened one.
    assert!(refused >= 3_000.0 - admitted, "{refused} refused");
    // Node 1 never talked to node 2 before: a new stream, admitted once the rate allows.
    assert_every_reply(&net, 1, 2, 3);
}
