//! Deterministic two-node simulation in virtual time: two nodes' real egress and ingress loops
//! over one in-memory bucket (`MemoryStore`), each node behind a latency model (and, in one
//! test, injected faults) and the production retry loop, with channels for TUNs. The runtime
//! is current-thread with paused, auto-advancing time, so seconds of tunnel traffic run in
//! well under a second of wall time and every latency figure is exact virtual time.
//!
//! Packets carry a sequence number; the receiving host checks in-order delivery without
//! duplicates or loss. Bulk transfers are window-limited by ACK-like packets sent back
//! through the tunnel, as TCP would be.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hoshino_agent::edge::packet_io::{ChannelTun, HostEnds};
use hoshino_agent::metrics::{Metrics, S3Op};
use hoshino_agent::node_addr::{NetworkPrefix, NodeAddr, NodeId};
use hoshino_agent::store::fault_store::{Faults, FaultyStore, Latency};
use hoshino_agent::store::memory_store::MemoryStore;
use hoshino_agent::store::retry::{RetryPolicy, RetryingStore};
use hoshino_agent::tunnel::bundler::{Bundler, BundlerConfig};
use hoshino_agent::tunnel::cursor::CursorFile;
use hoshino_agent::tunnel::egress::{Egress, HEARD_CHANNEL};
use hoshino_agent::tunnel::heartbeat::HeartbeatConfig;
use hoshino_agent::tunnel::ingress::{DEFAULT_BUDGET_BYTES, Ingress};
use hoshino_agent::wire::mailbox::inbox_prefix;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

type SimStore = RetryingStore<FaultyStore<MemoryStore>>;

const A: NodeId = NodeId(0xa);
const B: NodeId = NodeId(0xb);
const GIB: f64 = (1u64 << 30) as f64;

/// A fresh state directory (for the delivery cursor) per test.
fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hoshino-sim-{name}-{}-{}",
        std::process::id(),
        ulid::Ulid::new()
    ));
    std::fs::create_dir_all(&dir).expect("creating the state dir");
    dir
}

fn addr(id: NodeId) -> NodeAddr {
    NodeAddr {
        prefix: NetworkPrefix::default(),
        id,
    }
}

/// An IPv6 packet from `src` to `dst` carrying `seq` (and `kind`: 0 data, 1 ack) padded to
/// `len` bytes.
fn packet(src: NodeId, dst: NodeId, kind: u8, seq: u64, len: usize) -> Vec<u8> {
    let len = len.max(40 + 9);
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = 59; // no next header
    p[7] = 64;
    p[8..24].copy_from_slice(&addr(src).ip().octets());
    p[24..40].copy_from_slice(&addr(dst).ip().octets());
    p[40] = kind;
    p[41..49].copy_from_slice(&seq.to_be_bytes());
    p
}

/// `(kind, seq)` of a packet built by `packet`.
fn parse(p: &[u8]) -> (u8, u64) {
    let seq = p
        .get(41..49)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(u64::MAX, u64::from_be_bytes);
    (p.get(40).copied().unwrap_or(u8::MAX), seq)
}

struct Node {
    store: SimStore,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    host: HostEnds,
}

impl Node {
    fn start(id: NodeId, bucket: &MemoryStore, faults: Faults, seed: u64, dir: &Path) -> Node {
        let me = addr(id);
        let metrics = Arc::new(Metrics::default());
        let store: SimStore = RetryingStore::new(
            FaultyStore::new(bucket.clone(), faults, seed),
            metrics.clone(),
            RetryPolicy::default(),
            seed ^ 0x5eed,
        );
        let (tun, host) = ChannelTun::new();
        let tun = Arc::new(tun);
        let cursor_file = CursorFile::new(dir, id);
        let cursor = cursor_file.load().expect("loading the cursor");
        let (shutdown, rx) = watch::channel(false);
        let sent = Arc::new(tokio::sync::Notify::new());
        let (heard_tx, heard_rx) = tokio::sync::mpsc::channel(HEARD_CHANNEL);
        let egress = Egress {
            tun: tun.clone(),
            store: store.clone(),
            me,
            metrics: metrics.clone(),
            bundler: Bundler::new(BundlerConfig::default(), id, seed, None),
            sent: sent.clone(),
            heard: heard_rx,
        };
        let ingress = Ingress {
            tun,
            store: store.clone(),
            me,
            metrics: metrics.clone(),
            key: None,
            heartbeat: HeartbeatConfig::default(),
            sent,
            heard: heard_tx,
            cursor,
            cursor_file,
            budget_bytes: DEFAULT_BUDGET_BYTES,
        };
        let tasks = vec![
            tokio::spawn(egress.run(rx.clone())),
            tokio::spawn(ingress.run(rx)),
        ];
        Node {
            store,
            metrics,
            shutdown,
            tasks,
            host,
        }
    }

    /// A crash: the loops are dropped where they stand (no drain), only the cursor file stays.
    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    fn requests(&self) -> u64 {
        S3Op::ALL
            .iter()
            .map(|op| self.metrics.s3_requests(*op))
            .sum()
    }
}

/// What the receiving host saw.
#[derive(Debug, Default)]
struct Received {
    /// Data seqs in delivery order.
    seqs: Vec<u64>,
}

impl Received {
    fn assert_in_order_without_duplicates(&self) {
        let mut sorted = self.seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            self.seqs.len(),
            "a packet was delivered twice"
        );
        assert!(
            self.seqs.windows(2).all(|w| w[0] < w[1]),
            "packets were delivered out of order"
        );
    }

    fn assert_complete(&self, total: u64) {
        self.assert_in_order_without_duplicates();
        let expected: Vec<u64> = (0..total).collect();
        assert_eq!(self.seqs.len() as u64, total, "packets were lost");
        assert_eq!(self.seqs, expected);
    }
}

#[derive(Debug, Clone, Copy)]
struct Bulk {
    packets: u64,
    packet_len: usize,
    /// Packets in flight before the sender waits for an ACK.
    window: u64,
    /// The receiver ACKs every this many packets.
    ack_every: u64,
}

impl Bulk {
    fn bytes(&self) -> u64 {
        self.packets * self.packet_len as u64
    }
}

/// Sends `bulk` from `a` to `b` (acks flow back `b` -> `a`) and returns what `b`'s host got.
/// `restart` kills `b` after that many packets and starts it again from its cursor.
async fn transfer(
    a: &mut Node,
    b: &mut Node,
    bulk: Bulk,
    restart: Option<(u64, &dyn Fn() -> Node)>,
) -> Received {
    let mut received = Received::default();
    let mut next = 0u64;
    let mut acked = 0u64;
    let mut restarted = false;
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.seqs.last().is_none_or(|s| s + 1 < bulk.packets) {
        assert!(
            Instant::now() < deadline,
            "transfer stalled at {next} sent, {acked} acked"
        );
        while next < bulk.packets && next < acked + bulk.window {
            let p = packet(A, B, 0, next, bulk.packet_len);
            a.host.send.send(p).expect("node a's TUN is gone");
            next += 1;
        }
        if let Some((at, start)) = restart
            && !restarted
            && received.seqs.len() as u64 >= at
        {
            restarted = true;
            let mut old = std::mem::replace(b, start());
            old.kill();
            // What the dead node had already written to its TUN reached the host: its TUN
            // writer drains the bundles handed to it before the crash.
            tokio::time::sleep(Duration::from_millis(10)).await;
            while let Ok(p) = old.host.delivered.try_recv() {
                received.seqs.push(parse(&p).1);
            }
        }
        tokio::select! {
            Some(p) = b.host.delivered.recv() => {
                let (kind, seq) = parse(&p);
                assert_eq!(kind, 0, "node b got a packet it was not sent");
                received.seqs.push(seq);
                if (seq + 1) % bulk.ack_every == 0 || seq + 1 == bulk.packets {
                    let ack = packet(B, A, 1, seq + 1, 64);
                    b.host.send.send(ack).expect("node b's TUN is gone");
                }
            }
            Some(p) = a.host.delivered.recv() => {
                let (kind, upto) = parse(&p);
                assert_eq!(kind, 1, "node a got a packet it was not sent");
                acked = acked.max(upto);
            }
            // After a restart lost packets, a timed-out window goes on (TCP would retransmit;
            // here the sender just moves on so the transfer ends).
            _ = tokio::time::sleep(Duration::from_secs(5)), if restarted => {
                acked = next;
                if next >= bulk.packets { break; }
            }
        }
    }
    received
}

fn nodes(bucket: &MemoryStore, faults: Faults, name: &str) -> (Node, Node, PathBuf, PathBuf) {
    let (da, db) = (
        state_dir(&format!("{name}-a")),
        state_dir(&format!("{name}-b")),
    );
    let a = Node::start(A, bucket, faults, 1, &da);
    let b = Node::start(B, bucket, faults, 2, &db);
    (a, b, da, db)
}

const BULK: Bulk = Bulk {
    packets: 65_536,
    packet_len: 16 * 1024,
    window: 1024,
    ack_every: 64,
};

async fn bulk_requests_per_gib(latency: Latency, name: &str) -> f64 {
    let bucket = MemoryStore::default();
    let (mut a, mut b, _, _) = nodes(&bucket, Faults::none(latency), name);
    let t0 = Instant::now();
    let (r0, s0) = (a.requests() + b.requests(), bucket.total_requests());
    let got = transfer(&mut a, &mut b, BULK, None).await;
    let took = t0.elapsed();
    let (r1, s1) = (a.requests() + b.requests(), bucket.total_requests());
    got.assert_complete(BULK.packets);
    let per_gib = (r1 - r0) as f64 * GIB / BULK.bytes() as f64;
    let mib_s = BULK.bytes() as f64 / (1 << 20) as f64 / took.as_secs_f64();
    println!(
        "{name}: {} MiB in {took:?} virtual ({mib_s:.0} MiB/s), {} attempts ({} reached the bucket), {per_gib:.0} requests/GiB",
        BULK.bytes() >> 20,
        r1 - r0,
        s1 - s0
    );
    let by_op: Vec<String> = S3Op::ALL
        .iter()
        .map(|op| {
            let n = a.metrics.s3_requests(*op) + b.metrics.s3_requests(*op);
            format!("{} {n}", op.as_str())
        })
        .collect();
    println!("{name}: by operation (both nodes): {}", by_op.join(", "));
    for (node, n) in [("a (data sender)", &a), ("b (ack sender)", &b)] {
        let ops: Vec<String> = S3Op::ALL
            .iter()
            .map(|op| format!("{} {}", op.as_str(), n.metrics.s3_requests(*op)))
            .collect();
        println!("{name}: node {node}: {}", ops.join(", "));
    }
    a.stop().await;
    b.stop().await;
    per_gib
}

/// Issue 7's target is at most 1,000 requests per GiB with ACK-like reverse traffic. The
/// simulation (16 MiB window, an ACK per 1 MiB) measures about 890 (express) and 880 (standard)
/// with the reply-clocked bundler, 8 MiB bundles and the inbox's probe rules: ~260 PUTs (data
/// bundles of ~8 MiB and the ACK bundles they draw), a GET per bundle and ~330 probe misses. The
/// testbed's real TCP (BBR, 4 MiB send buffers) moves far less per round trip and costs more; see
/// README, "Measured".
const REQUESTS_PER_GIB_TARGET: f64 = 1000.0;

fn check_requests_per_gib(name: &str, per_gib: f64) {
    assert!(
        per_gib <= REQUESTS_PER_GIB_TARGET,
        "{name}: {per_gib:.0} requests per GiB, above the {REQUESTS_PER_GIB_TARGET} target"
    );
}

#[tokio::test(start_paused = true)]
async fn bulk_transfer_with_acks_costs_at_most_1000_requests_per_gib_on_standard() {
    let per_gib = bulk_requests_per_gib(Latency::standard(), "standard").await;
    check_requests_per_gib("standard", per_gib);
}

#[tokio::test(start_paused = true)]
async fn bulk_transfer_with_acks_costs_at_most_1000_requests_per_gib_on_express() {
    let per_gib = bulk_requests_per_gib(Latency::express(), "express").await;
    check_requests_per_gib("express", per_gib);
}

/// One-way latency of lone packets between two awake nodes, against PUT + GET of the model.
async fn lone_packet_latency(latency: Latency, name: &str) -> (Duration, Duration) {
    let bucket = MemoryStore::default();
    let (a, mut b, _, _) = nodes(&bucket, Faults::none(latency), name);
    let mut worst = Duration::ZERO;
    let mut all = Vec::new();
    for seq in 0..20u64 {
        // Spaced like an interactive session: the receiver stays active, not hot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        a.host
            .send
            .send(packet(A, B, 0, seq, 100))
            .expect("TUN gone");
        let p = b.host.delivered.recv().await.expect("node b stopped");
        assert_eq!(parse(&p), (0, seq));
        // The first packet finds an idle receiver (doorbell); measure the awake ones.
        if seq > 0 {
            let took = sent.elapsed();
            worst = worst.max(took);
            all.push(took);
        }
    }
    all.sort();
    let median = all[all.len() / 2];
    let put_get = 2 * latency.max();
    println!(
        "{name}: lone packet one-way median {median:?}, worst {worst:?}, PUT+GET (worst case of the model) {put_get:?}"
    );
    a.stop().await;
    b.stop().await;
    (worst, put_get)
}

/// The bound: a probe's spacing after misses (at most `MAX_GAP`), plus PUT and GET each up to
/// twice (a probe that was already in flight when the PUT landed misses, the next one hits). A
/// lone packet to an idle destination leaves at once: no bundling delay.
fn latency_bound(put_get: Duration) -> Duration {
    hoshino_agent::tunnel::probe::MAX_GAP + put_get * 2
}

#[tokio::test(start_paused = true)]
async fn a_lone_packet_arrives_within_twice_put_plus_get_plus_bundling_on_every_profile() {
    for (name, latency) in [
        ("loopback", Latency::loopback()),
        ("express", Latency::express()),
        ("standard", Latency::standard()),
    ] {
        let (worst, put_get) = lone_packet_latency(latency, name).await;
        assert!(
            worst <= latency_bound(put_get),
            "{name}: {worst:?} > bound {:?}",
            latency_bound(put_get)
        );
    }
}

/// Ping-like request/response between two awake nodes: the RTT median against the floor
/// 2 x (PUT + GET) of the model's medians.
async fn ping_rtt(latency: Latency, name: &str) -> (f64, Duration) {
    let bucket = MemoryStore::default();
    let (mut a, mut b, _, _) = nodes(&bucket, Faults::none(latency), name);
    let mut rtts = Vec::new();
    for seq in 0..40u64 {
        // Spaced like `ping -i 0.2` (and the bench's pings): no bulk traffic, no cadence.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = Instant::now();
        a.host
            .send
            .send(packet(A, B, 0, seq, 100))
            .expect("TUN gone");
        let p = b.host.delivered.recv().await.expect("node b stopped");
        assert_eq!(parse(&p), (0, seq));
        b.host
            .send
            .send(packet(B, A, 1, seq, 100))
            .expect("TUN gone");
        let p = a.host.delivered.recv().await.expect("node a stopped");
        assert_eq!(parse(&p), (1, seq));
        // The first request finds an idle receiver (doorbell); measure the awake ones.
        if seq > 1 {
            rtts.push(sent.elapsed());
        }
    }
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    let floor = latency.median() * 4;
    let ratio = median.as_secs_f64() / floor.as_secs_f64();
    println!("{name}: ping RTT median {median:?}, floor 2 x (PUT + GET) {floor:?}: {ratio:.2}x");
    a.stop().await;
    b.stop().await;
    (ratio, median)
}

/// Issue 7's target is a ping RTT within 1.3x of 2 x (PUT + GET). A reply is found by the eager
/// probes the request's PUT starts (two in flight, half a GET apart), and the request by those
/// the previous reply started. At loopback (a sub-millisecond store) the eager window (16
/// misses) is shorter than the ping interval, so the request waits for a backed-off probe: up
/// to `MAX_GAP` per direction; that is the bound there, and the ratio is printed.
#[tokio::test(start_paused = true)]
async fn ping_rtt_stays_close_to_twice_put_plus_get() {
    for (name, latency) in [
        ("express", Latency::express()),
        ("standard", Latency::standard()),
    ] {
        let (ratio, _) = ping_rtt(latency, name).await;
        assert!(ratio <= 1.3, "{name}: ping RTT {ratio:.2}x the floor");
    }
    let latency = Latency::loopback();
    let (_, median) = ping_rtt(latency, "loopback").await;
    let bound = latency.max() * 4 + hoshino_agent::tunnel::probe::MAX_GAP * 2;
    assert!(median <= bound, "loopback: ping RTT {median:?} > {bound:?}");
}

#[tokio::test(start_paused = true)]
async fn a_receiver_restarted_mid_transfer_delivers_nothing_twice() {
    let bucket = MemoryStore::default();
    let faults = Faults::none(Latency::express());
    let (mut a, mut b, _, db) = nodes(&bucket, faults, "restart");
    let bulk = Bulk {
        packets: 4096,
        ..BULK
    };
    let start_b = || Node::start(B, &bucket, faults, 3, &db);
    let got = transfer(&mut a, &mut b, bulk, Some((1500, &start_b))).await;
    // Across both lives of node b: each packet at most once, in order.
    got.assert_in_order_without_duplicates();
    let lost = bulk.packets - got.seqs.len() as u64;
    println!(
        "restart: {} of {} packets delivered, {lost} lost in the crash, 0 twice",
        got.seqs.len(),
        bulk.packets
    );
    assert!(
        got.seqs.len() as u64 > 1500,
        "nothing arrived after the restart"
    );
    // Bundles the first life delivered but had not deleted are below the cursor now: the
    // second life deletes them without delivering them (checked above), so the inbox empties.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = bucket.keys(&inbox_prefix(B));
    assert!(left.is_empty(), "left in node b's inbox: {left:?}");
    println!(
        "restart: the second life found {} bundles below its cursor (deleted, not delivered)",
        b.metrics
            .duplicate_bundles
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_503s_resets_and_stalled_gets_nothing_is_lost_or_duplicated() {
    let bucket = MemoryStore::default();
    let faults = Faults {
        latency: Latency::express(),
        slow_down: 0.05,
        reset: 0.02,
        stalled_get: 0.01,
        // Below the reorder buffer's 1 s gap timeout (a longer stall is, by design, a skip).
        stall: Duration::from_millis(300),
    };
    let (mut a, mut b, _, _) = nodes(&bucket, faults, "faults");
    let bulk = Bulk {
        packets: 16_384,
        ..BULK
    };
    let got = transfer(&mut a, &mut b, bulk, None).await;
    got.assert_complete(bulk.packets);
    let (ia, ib) = (a.store.inner().injected(), b.store.inner().injected());
    println!(
        "faults: {} packets delivered in order, {} attempts; injected {} SlowDown, {} resets, {} stalled GETs",
        got.seqs.len(),
        a.requests() + b.requests(),
        ia.slow_downs + ib.slow_downs,
        ia.resets + ib.resets,
        ia.stalls + ib.stalls
    );
    assert!(ia.slow_downs + ib.slow_downs > 0 && ia.stalls + ib.stalls > 0);
    a.stop().await;
    b.stop().await;
}
