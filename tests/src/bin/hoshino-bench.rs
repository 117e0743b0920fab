//! `hoshino-bench` (run by `cargo xtask bench`): for each emulated S3 latency profile, one run
//! against the testbed's s3s-fs server in a namespace, printing the figures MISSION.md sets targets
//! for: the S3 floor, ping RTT through the tunnel and its ratio to the floor, the first HTTP GET
//! over a fresh TCP connection and its ratio to the RTT, bulk TCP against the raw PUT->GET
//! pipeline of the same server, S3 requests and dollars per GiB carried, idle requests per
//! node-hour and dollars per node-day, wake latency, agent RSS (idle, and with an opt-in inbox
//! backlog); then the metadata-proxy latency and the classifier overhead.
//!
//! The latency profiles are emulated by the test server itself (this kernel has no netem):
//! `loopback` (none), `express` (~5 ms per request, S3 Express One Zone's "single-digit
//! millisecond" access) and `standard` (20-30 ms with a tail, from AWS's published S3 Standard
//! first-byte figures of roughly 100-200 ms at the envelope); the figures and their sources are
//! in `hoshino_tests::s3_server::LatencyProfile`.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddrV6};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hoshino_tests::agent::Agent;
use hoshino_tests::binaries;
use hoshino_tests::command;
use hoshino_tests::metadata_bench::{self, ProxyLatency};
use hoshino_tests::metrics::Metrics;
use hoshino_tests::ping::ping;
use hoshino_tests::process::Spawned;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::s3_server::{LatencyProfile, ServerConditions};
use hoshino_tests::signals::survive_interrupt;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};

/// AWS S3 Standard list prices (us-east-1), USD per request: PUT, COPY, POST, LIST; GET, HEAD
/// and the rest; DELETE is free.
const PRICE_PUT_LIST: f64 = 0.005 / 1000.0;
const PRICE_GET_HEAD: f64 = 0.0004 / 1000.0;
/// The seed polls LIST twice a second: 172,800 LISTs per node-day.
const SEED_DOLLARS_PER_NODE_DAY: f64 = 0.86;
/// A NAT gateway's data processing charge, USD per GB.
const NAT_DOLLARS_PER_GB: f64 = 0.045;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, clap::Parser)]
#[command(name = "hoshino-bench")]
struct Args {
    /// Loopback profile only, fewer samples, 64 MiB bulk, no classifier: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Latency profiles to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "loopback,express,standard"
    )]
    profiles: Vec<LatencyProfile>,
    /// Small-object PUT/GET samples for the S3 floor.
    #[arg(long, default_value_t = 50)]
    floor_samples: usize,
    /// Echo requests through the tunnel.
    #[arg(long, default_value_t = 100)]
    pings: u32,
    /// Milliseconds between echo requests (`ping -i`; ping's own default is 1000).
    #[arg(long, default_value_t = 50)]
    ping_interval_ms: u64,
    /// Echo requests of a second ping, one a second as `ping` sends them by default (0: none).
    #[arg(long, default_value_t = 20)]
    sparse_pings: u32,
    /// First HTTP GETs over fresh TCP connections through the tunnel.
    #[arg(long, default_value_t = 5)]
    http_samples: usize,
    /// MiB sent in the bulk TCP transfer (requests per GiB are read over it: keep >= 1024).
    #[arg(long, default_value_t = 1024)]
    bulk_mib: u64,
    /// TCP flows of the second bulk transfer (a node's traffic is rarely one flow; one flow's
    /// window bounds how few requests can carry it). 0 skips it.
    #[arg(long, default_value_t = 8)]
    multi_flows: u32,
    /// MiB sent over `multi_flows` flows together.
    #[arg(long, default_value_t = 1024)]
    multi_mib: u64,
    /// Object size of the raw PUT->GET pipeline: the agent's maximum bundle size
    /// (`--bundle-max-bytes`'s default).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    raw_object_bytes: usize,
    /// Objects in flight in the raw pipeline: the agent's PUT concurrency per destination.
    #[arg(long, default_value_t = 4)]
    raw_concurrency: usize,
    /// MiB moved by the raw pipeline.
    #[arg(long, default_value_t = 256)]
    raw_mib: usize,
    /// Seconds of idle measured (scaled to a node-hour).
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Wakes measured (first ping with both agents idle); each after both went idle again, about
    /// 12 s apart, at phases spread over the 1 s idle poll (one sample lies anywhere between the
    /// fixed cost of the requests and 1 s more).
    #[arg(long, default_value_t = 3)]
    wake_samples: usize,
    /// Also measure RSS while node 2 drains an inbox backlog (writes objects x MiB: 16 GiB by
    /// default), on the first profile.
    #[arg(long)]
    backlog: bool,
    #[arg(long, default_value_t = 1000)]
    backlog_objects: u64,
    #[arg(long, default_value_t = 16)]
    backlog_object_mib: usize,
    /// TCP congestion control of the bulk flows (e.g. `cubic`, the default of Debian and Amazon
    /// Linux); by default the host's (`net.ipv4.tcp_congestion_control`), which a new namespace
    /// inherits.
    #[arg(long)]
    congestion: Option<String>,
    /// Extra flags for every agent (e.g. `--agent-arg=--bundle-max-bytes=4194304`).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Allowed metadata GETs timed without and with `attach`.
    #[arg(long, default_value_t = 50)]
    metadata_samples: usize,
    /// Skip the metadata-proxy latency.
    #[arg(long)]
    skip_metadata: bool,
    /// Only the classifier figures (no S3 server, no tunnel).
    #[arg(long)]
    classifier_only: bool,
    /// Skip the classifier figures.
    #[arg(long, conflicts_with = "classifier_only")]
    skip_classifier: bool,
    /// Interleaved rounds of the classifier comparison.
    #[arg(long, default_value_t = 5)]
    classifier_rounds: u32,
    /// Seconds per iperf3 run in the classifier comparison.
    #[arg(long, default_value_t = 4)]
    classifier_seconds: u32,
}

impl Args {
    /// `--quick` shrinks everything that takes time.
    fn apply_quick(&mut self) {
        if self.quick {
            self.profiles = vec![LatencyProfile::Loopback];
            self.floor_samples = self.floor_samples.min(20);
            self.pings = self.pings.min(30);
            self.sparse_pings = self.sparse_pings.min(5);
            self.http_samples = self.http_samples.min(3);
            self.bulk_mib = self.bulk_mib.min(64);
            self.multi_mib = self.multi_mib.min(64);
            self.raw_mib = self.raw_mib.min(64);
            self.idle_seconds = self.idle_seconds.min(10);
            self.wake_samples = self.wake_samples.min(1);
            self.metadata_samples = self.metadata_samples.min(20);
            self.skip_classifier = true;
        }
    }
}

/// Everything measured for one profile; `None` where a step failed (its error was printed).
#[derive(Debug, Default)]
struct ProfileFigures {
    floor_rtt_ms: Option<f64>,
    ping_p50_ms: Option<f64>,
    sparse_ping_p50_ms: Option<f64>,
    http_first_ms: Option<f64>,
    bulk_ratio: Option<f64>,
    requests_per_gib: Option<f64>,
    dollars_per_gib: Option<f64>,
    multi_requests_per_gib: Option<f64>,
    multi_dollars_per_gib: Option<f64>,
    idle_dollars_per_day: Option<f64>,
    wake_ms: Option<f64>,
    wake_max_ms: Option<f64>,
    rss_idle_mib: Option<f64>,
    rss_backlog_mib: Option<f64>,
}

fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    survive_interrupt();
    args.apply_quick();
    if args.classifier_only {
        classifier_figures(&args)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "hoshino bench ({} build, s3s-fs server in a namespace, 2 nodes, profiles {})",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        args.profiles
            .iter()
            .map(|p| p.label())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut all = vec![];
    for (i, profile) in args.profiles.iter().enumerate() {
        let backlog = args.backlog && i == 0;
        let figures = profile_figures(&args, *profile, backlog)
            .with_context(|| format!("profile {}", profile.label()))?;
        all.push((*profile, figures));
    }
    let proxy = if args.skip_metadata {
        None
    } else {
        metadata_figures(&args)
    };
    summary(&all, proxy.as_ref());
    if !args.skip_classifier {
        classifier_figures(&args)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a step's failure and carries on, so one failed figure does not hide the others.
fn step<T>(what: &str, r: anyhow::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            println!("  {what}: FAILED: {e:#}");
            None
        }
    }
}

fn profile_figures(
    args: &Args,
    profile: LatencyProfile,
    backlog: bool,
) -> anyhow::Result<ProfileFigures> {
    let model = profile.model();
    println!(
        "\n=== profile {} (added per request: {:?} + U(0, {:?}); {:.0} % of requests {:?} + U(0, {:?}) more) ===",
        profile.label(),
        model.base,
        model.jitter,
        model.tail_fraction * 100.0,
        model.tail_base,
        model.tail_jitter
    );
    let options = NetOptions {
        server: ServerConditions {
            latency: profile,
            ..ServerConditions::default()
        },
        agent_args: args.agent_args.clone(),
        ..NetOptions::default()
    };
    let mut net =
        TunnelNet::start(BackendKind::S3sFs, 2, &options).context("starting the bench network")?;
    let mut f = ProfileFigures::default();
    let congestion = match &args.congestion {
        Some(cc) => cc.clone(),
        None => std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
    };
    println!("TCP congestion control of the bulk flows: {congestion}");

    let floor = s3_floor(&net, args.floor_samples)?;
    let floor_rtt = 2.0 * (floor.put_p50_ms + floor.get_p50_ms);
    f.floor_rtt_ms = Some(floor_rtt);
    println!(
        "S3 floor (aws-sdk-s3 from node 1, 128-byte object, {} samples)",
        args.floor_samples
    );
    println!(
        "  PUT p50 {:.2} ms  p99 {:.2} ms;  GET p50 {:.2} ms  p99 {:.2} ms",
        floor.put_p50_ms, floor.put_p99_ms, floor.get_p50_ms, floor.get_p99_ms
    );
    println!("  floor RTT = 2 x (PUT p50 + GET p50) = {floor_rtt:.2} ms");

    let interval = Duration::from_millis(args.ping_interval_ms);
    if let Some((p50, p99)) = step("ping", ping_rtt(&net, args.pings, interval)) {
        println!(
            "Ping through the tunnel ({} echo requests, {} ms apart)",
            args.pings, args.ping_interval_ms
        );
        println!(
            "  RTT p50 {p50:.2} ms  p99 {p99:.2} ms;  p50 / floor = {:.2}x  (target <= 1.3x)",
            p50 / floor_rtt
        );
        f.ping_p50_ms = Some(p50);
    }
    if args.sparse_pings > 0
        && let Some((p50, p99)) = step(
            "ping once a second",
            ping_rtt(&net, args.sparse_pings, Duration::from_secs(1)),
        )
    {
        println!(
            "Ping once a second, as `ping` sends by default ({} echo requests)",
            args.sparse_pings
        );
        println!(
            "  RTT p50 {p50:.2} ms  p99 {p99:.2} ms;  p50 / floor = {:.2}x  (target <= 1.3x)",
            p50 / floor_rtt
        );
        f.sparse_ping_p50_ms = Some(p50);
    }

    if let Some(times) = step("HTTP GET", first_http_gets(&net, args.http_samples)) {
        let first = times.first().copied().unwrap_or(f64::NAN);
        let p50 = median(&times);
        println!(
            "First small HTTP GET over a fresh TCP connection ({} connections, 1 KiB)",
            times.len()
        );
        print!("  first {first:.2} ms  median {p50:.2} ms");
        if let Some(rtt) = f.ping_p50_ms {
            println!("  median / RTT = {:.2}x  (target <= 4x)", p50 / rtt);
        } else {
            println!();
        }
        f.http_first_ms = Some(p50);
    }

    let raw = step("raw pipeline", raw_throughput(&net, args));
    if let Some(raw) = raw {
        println!(
            "Raw S3 PUT->GET pipeline ({} KiB objects, {} in flight): {:.1} MiB/s",
            args.raw_object_bytes / 1024,
            args.raw_concurrency,
            raw / MIB
        );
    }
    let before = snapshot(&net)?;
    let tunnel = step(
        "bulk TCP",
        bulk_tcp(&net, args.bulk_mib, 1, args.congestion.as_deref()),
    );
    let after = snapshot(&net)?;
    if let Some(tunnel) = tunnel {
        println!(
            "Bulk TCP through the tunnel ({} MiB, one flow, default buffers, node 1 -> node 2): {:.1} MiB/s",
            args.bulk_mib,
            tunnel / MIB
        );
        if let Some(raw) = raw {
            println!("  tunnel / raw = {:.2}x  (target >= 0.5x)", tunnel / raw);
            f.bulk_ratio = Some(tunnel / raw);
        }
        if let Some(rtt) = f.ping_p50_ms {
            // One flow moves at most its window per RTT; Linux's default maximum receive
            // window (tcp_rmem max 6 MiB, half of it usable with the default tcp_adv_win_scale)
            // bounds it there.
            println!(
                "  one flow's window/RTT bound at this RTT: ~{:.1} MiB/s for a 3 MiB window",
                3.0 / (rtt / 1000.0)
            );
        }
    }
    if let Some((requests, dollars)) = carried_cost(&before, &after) {
        f.requests_per_gib = Some(requests);
        f.dollars_per_gib = Some(dollars);
    }

    if args.multi_flows > 0 {
        let before = snapshot(&net)?;
        let tunnel = step(
            "bulk TCP, several flows",
            bulk_tcp(
                &net,
                args.multi_mib,
                args.multi_flows,
                args.congestion.as_deref(),
            ),
        );
        let after = snapshot(&net)?;
        if let Some(tunnel) = tunnel {
            println!(
                "Bulk TCP through the tunnel ({} MiB over {} flows at once, node 1 -> node 2): {:.1} MiB/s",
                args.multi_mib,
                args.multi_flows,
                tunnel / MIB
            );
            if let Some(raw) = raw {
                println!("  tunnel / raw = {:.2}x", tunnel / raw);
            }
        }
        if let Some((requests, dollars)) = carried_cost(&before, &after) {
            f.multi_requests_per_gib = Some(requests);
            f.multi_dollars_per_gib = Some(dollars);
        }
    }

    if let Some(idle) = step(
        "idle",
        idle_cost(&net, Duration::from_secs(args.idle_seconds)),
    ) {
        println!(
            "Idle ({} s measured after both agents went idle, scaled)",
            args.idle_seconds
        );
        println!(
            "  S3 requests per node-hour: {:.0}  (PUT/LIST {:.0}, GET/HEAD {:.0}, DELETE {:.0})",
            idle.total_per_hour,
            idle.put_list_per_hour,
            idle.get_head_per_hour,
            idle.delete_per_hour
        );
        println!(
            "  $ per node-day at AWS list prices: ${:.4}  (seed: ${SEED_DOLLARS_PER_NODE_DAY}; target <= $0.035)",
            idle.dollars_per_day
        );
        f.idle_dollars_per_day = Some(idle.dollars_per_day);
        for (i, agent) in net.agents.iter().enumerate() {
            match agent.rss_bytes() {
                Some(rss) => {
                    println!(
                        "  agent {} idle RSS: {:.1} MiB  (target < 32 MiB)",
                        i + 1,
                        rss as f64 / MIB
                    );
                    let mib = rss as f64 / MIB;
                    f.rss_idle_mib = Some(f.rss_idle_mib.map_or(mib, |m: f64| m.max(mib)));
                }
                None => println!("  agent {} idle RSS: unavailable", i + 1),
            }
        }
        if let Some(mut wakes) = step("wake", wake_latency(&net, args.wake_samples))
            && !wakes.is_empty()
        {
            let each: Vec<String> = wakes.iter().map(|w| format!("{w:.0}")).collect();
            wakes.sort_by(f64::total_cmp);
            let (median, max) = (wakes[wakes.len() / 2], wakes[wakes.len() - 1]);
            println!(
                "  wake: first ping from idle answered after {} ms: median {median:.0}, max {max:.0}  (target <= 1000 ms)",
                each.join(", ")
            );
            f.wake_ms = Some(median);
            f.wake_max_ms = Some(max);
        }
    }

    if backlog && let Some(peak) = step("backlog", backlog_rss(&mut net, args)) {
        println!(
            "  agent 2 peak RSS while draining {} x {} MiB: {:.1} MiB  (target <= 64 MiB)",
            args.backlog_objects,
            args.backlog_object_mib,
            peak / MIB
        );
        f.rss_backlog_mib = Some(peak / MIB);
    }
    Ok(f)
}

/// Prints the S3 requests and dollars per GiB egressed between two snapshots; returns both.
fn carried_cost(before: &Snapshot, after: &Snapshot) -> Option<(f64, f64)> {
    let carried = after.egress_bytes - before.egress_bytes;
    if carried <= 0.0 {
        return None;
    }
    let gib = carried / GIB;
    let (cost, lines) = cost_per_gib(before, after, gib);
    let requests = after.requests - before.requests;
    println!(
        "S3 requests per GiB carried (both nodes, {:.2} GiB egressed{}):",
        gib,
        if gib < 1.0 {
            "; less than 1 GiB: raise --bulk-mib / --multi-mib"
        } else {
            ""
        }
    );
    for l in lines {
        println!("  {l}");
    }
    for (i, (b, a)) in before.per_node.iter().zip(&after.per_node).enumerate() {
        let puts = a.puts - b.puts;
        println!(
            "  node {}: {:.0} requests per GiB, of them {:.0} PUTs (bundles of {:.0} kB on average)",
            i + 1,
            (a.requests - b.requests) / gib,
            puts / gib,
            if puts > 0.0 {
                (a.egress_bytes - b.egress_bytes) / puts / 1000.0
            } else {
                0.0
            }
        );
    }
    println!(
        "  total {:.0} per GiB (target <= 1000);  ${cost:.4} per GiB at AWS list prices (target <= $0.002; NAT gateway ${NAT_DOLLARS_PER_GB}/GB)",
        requests / gib
    );
    Some((requests / gib, cost))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summary(all: &[(LatencyProfile, ProfileFigures)], proxy: Option<&ProxyLatency>) {
    let show =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    println!(
        "\n=== summary (targets: ping <= 1.3x floor, HTTP <= 4x RTT, bulk >= 0.5x raw, <= 1000 req/GiB, <= $0.002/GiB, idle <= $0.035/day, wake <= 1 s, RSS < 32 / 64 MiB) ==="
    );
    println!(
        "{:<9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>7} {:>7} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}",
        "profile",
        "floor ms",
        "ping ms",
        "ping/f",
        "1s/f",
        "http ms",
        "http/p",
        "bulk/r",
        "req/GiB",
        "$/GiB",
        "req/GiB*",
        "$/GiB*",
        "idle $/day",
        "wake ms",
        "wake max",
        "RSS MiB",
        "backlog"
    );
    for (p, f) in all {
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        println!(
            "{:<9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>7} {:>7} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}",
            p.label(),
            show(f.floor_rtt_ms, 2),
            show(f.ping_p50_ms, 2),
            show(ratio(f.ping_p50_ms, f.floor_rtt_ms), 2),
            show(ratio(f.sparse_ping_p50_ms, f.floor_rtt_ms), 2),
            show(f.http_first_ms, 2),
            show(ratio(f.http_first_ms, f.ping_p50_ms), 2),
            show(f.bulk_ratio, 2),
            show(f.requests_per_gib, 0),
            show(f.dollars_per_gib, 4),
            show(f.multi_requests_per_gib, 0),
            show(f.multi_dollars_per_gib, 4),
            show(f.idle_dollars_per_day, 4),
            show(f.wake_ms, 0),
            show(f.wake_max_ms, 0),
            show(f.rss_idle_mib, 1),
            show(f.rss_backlog_mib, 1),
        );
    }
    println!(
        "(1s/f: the ping once a second; req/GiB and $/GiB: the one-flow transfer; * the several-flows transfer)"
    );
    if let Some(p) = proxy {
        let (d, a) = (
            ProxyLatency::p50(&p.direct_ms),
            ProxyLatency::p50(&p.attached_ms),
        );
        println!(
            "metadata proxy: allowed GET p50 {d:.2} ms direct, {a:.2} ms through attach: {:.2}x, +{:.2} ms  (target: a few ms at most)",
            a / d,
            a - d
        );
    }
}

fn metadata_figures(args: &Args) -> Option<ProxyLatency> {
    let policy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/metadata.toml");
    println!(
        "\n=== metadata proxy ({} GETs of {} as uid 65534, fresh connection each) ===",
        args.metadata_samples,
        metadata_bench::ALLOWED_PATH
    );
    let r = metadata_bench::measure(&policy, args.metadata_samples).map_err(anyhow::Error::from);
    step("metadata proxy", r)
}

struct Floor {
    put_p50_ms: f64,
    put_p99_ms: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
}

/// `key value` lines printed by the probes.
fn field(out: &str, key: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("no `{key}` in probe output:\n{out}"))
}

fn s3_floor(net: &TunnelNet, samples: usize) -> anyhow::Result<Floor> {
    let out = net.s3_probe(
        1,
        &["floor", "--samples", &samples.to_string(), "--size", "128"],
    )?;
    Ok(Floor {
        put_p50_ms: field(&out, "put_p50_ms")?,
        put_p99_ms: field(&out, "put_p99_ms")?,
        get_p50_ms: field(&out, "get_p50_ms")?,
        get_p99_ms: field(&out, "get_p99_ms")?,
    })
}

fn ping_rtt(net: &TunnelNet, count: u32, interval: Duration) -> anyhow::Result<(f64, f64)> {
    let from = &net.node(1)?.ns;
    let to = IpAddr::V6(net.node(2)?.tunnel_addr);
    // Warm-up: wakes both receivers out of idle mode.
    ping(
        from,
        to,
        3,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )?;
    let report = ping(
        from,
        to,
        count,
        interval,
        Duration::from_secs(120).max(interval * (count + 30)),
    )?;
    if report.received < count {
        println!(
            "  note: {} of {} replies",
            report.received, report.transmitted
        );
    }
    match (report.percentile_ms(0.5), report.percentile_ms(0.99)) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("no ping replies through the tunnel:\n{}", report.raw),
    }
}

/// Bytes per second of a PUT -> GET pipeline with aws-sdk-s3 from node 1, objects of the
/// maximum bundle size, as many in flight as the agent PUTs per destination.
fn raw_throughput(net: &TunnelNet, args: &Args) -> anyhow::Result<f64> {
    let objects =
        (args.raw_mib * 1024 * 1024 / args.raw_object_bytes.max(1)).max(args.raw_concurrency);
    let out = net.s3_probe(
        1,
        &[
            "throughput",
            "--object-bytes",
            &args.raw_object_bytes.to_string(),
            "--objects",
            &objects.to_string(),
            "--concurrency",
            &args.raw_concurrency.to_string(),
        ],
    )?;
    Ok(bytes_field(&out)? / seconds(&out)?)
}

/// `bytes N seconds S` -> S.
fn seconds(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "seconds")
                .nth(1)?
                .parse()
                .ok()
        })
        .with_context(|| format!("no seconds in output:\n{out}"))
}

fn bytes_field(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("bytes ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no bytes in output:\n{out}"))
}

/// Bytes per second of one TCP stream from node 1 to node 2, timed at the receiver.
fn bulk_tcp(
    net: &TunnelNet,
    mib: u64,
    flows: u32,
    congestion: Option<&str>,
) -> anyhow::Result<f64> {
    let probe = binaries::netprobe()?;
    let probe = probe.to_string_lossy().into_owned();
    let to = SocketAddrV6::new(net.node(2)?.tunnel_addr, 9200, 0, 0);
    let mut recv = net.command_in(2, &probe)?;
    recv.args([
        "tcp-recv",
        "--listen",
        &to.to_string(),
        "--flows",
        &flows.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = recv.spawn().context("starting tcp-recv")?;
    let stdout = child.stdout.take().context("tcp-recv stdout")?;
    let _receiver = Spawned::new("tcp-recv", child);
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(l)) if l == "listening" => {}
        other => bail!("tcp-recv did not start: {other:?}"),
    }
    let bytes = mib * 1024 * 1024;
    let started = Instant::now();
    let mut send = net.command_in(1, &probe)?;
    send.args([
        "tcp-send",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--flows",
        &flows.to_string(),
    ]);
    if let Some(cc) = congestion {
        send.args(["--congestion", cc]);
    }
    command::run(&mut send).context("tcp-send through the tunnel")?;
    let result = lines
        .next()
        .transpose()?
        .with_context(|| format!("tcp-recv gave no result after {:?}", started.elapsed()))?;
    let received = bytes_field(&result)?;
    anyhow::ensure!(
        received as u64 == bytes,
        "received {received} of {bytes} bytes"
    );
    Ok(received / seconds(&result)?)
}

/// First small HTTP GETs from node 1 to a server on node 2's tunnel address, each on a fresh
/// connection, as curl times them (connect + request + response, process start excluded).
fn first_http_gets(net: &TunnelNet, samples: usize) -> anyhow::Result<Vec<f64>> {
    let addr = net.node(2)?.tunnel_addr;
    let root = net.scratch().join("http-root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("small"), vec![b'h'; 1024])?;
    let mut server = net.command_in(2, "python3")?;
    server
        .args([
            "-m",
            "http.server",
            "8080",
            "--bind",
            &addr.to_string(),
            "--directory",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = Spawned::new(
        "http server",
        server.spawn().context("python3 -m http.server")?,
    );
    // Wait until it listens (a LISTEN socket in node 2), without sending traffic through the
    // tunnel that would warm it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ss = command::run(net.command_in(2, "ss")?.args(["-ltnH", "sport = :8080"]))
            .unwrap_or_default();
        if !ss.trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("HTTP server on node 2 did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://[{addr}]:8080/small");
    let mut times = vec![];
    for _ in 0..samples {
        let out = command::run(net.command_in(1, "curl")?.args([
            "-sS",
            "-g",
            "-f",
            "-m",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
            &url,
        ]))
        .context("curl through the tunnel")?;
        times.push(out.trim().parse::<f64>().context("curl -w output")? * 1000.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(times)
}

/// Times from one echo request to its reply when both agents are idle, `samples` times (the
/// agents are idle on entry; each later sample waits until they are again).
///
/// Sample `i` is sent `i / samples` of a second after idle was seen: the first idle poll comes
/// 1 s after a node goes idle, and the bench sees idle within half a second, so pinging at once
/// would always hit the second half of the poll interval. Spread over the interval, the median
/// is the typical wake and the largest the worst.
fn wake_latency(net: &TunnelNet, samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut wakes = Vec::with_capacity(samples);
    for i in 0..samples {
        if i > 0 {
            wait_until_idle(net)?;
        }
        std::thread::sleep(Duration::from_secs(1) * i as u32 / samples.max(1) as u32);
        let report = ping(
            &net.node(1)?.ns,
            IpAddr::V6(net.node(2)?.tunnel_addr),
            1,
            Duration::from_millis(200),
            Duration::from_secs(30),
        )?;
        wakes.push(
            report
                .percentile_ms(0.5)
                .with_context(|| format!("no reply from idle:\n{}", report.raw))?,
        );
    }
    Ok(wakes)
}

/// Stops node 2's agent, writes the backlog into its inbox, restarts it and samples its RSS until
/// the inbox is drained (or 15 minutes pass). Returns the peak RSS in bytes.
fn backlog_rss(net: &mut TunnelNet, args: &Args) -> anyhow::Result<f64> {
    let (sender, dest) = (net.node(1)?.node_id.clone(), net.node(2)?.node_id.clone());
    let (src, dst) = (net.node(1)?.tunnel_addr, net.node(2)?.tunnel_addr);
    net.agent_mut(2)?.stop(Duration::from_secs(10))?;
    println!(
        "Backlog: writing {} x {} MiB into node 2's inbox with its agent stopped",
        args.backlog_objects, args.backlog_object_mib
    );
    let bytes = (args.backlog_object_mib * 1024 * 1024).saturating_sub(65_536);
    net.s3_probe(
        1,
        &[
            "backlog",
            "--dest-node",
            &dest,
            "--sender-node",
            &sender,
            "--src-addr",
            &src.to_string(),
            "--dst-addr",
            &dst.to_string(),
            "--objects",
            &args.backlog_objects.to_string(),
            "--object-bytes",
            &bytes.to_string(),
        ],
    )?;
    let extra: Vec<&str> = args.agent_args.iter().map(String::as_str).collect();
    let agent = Agent::start_ready(
        net.node(2)?,
        net.endpoint(),
        net.scratch(),
        &extra,
        AGENT_READY_TIMEOUT,
    )?;
    net.agents[1] = agent;
    let inbox = format!("v2/inbox/{dest}/");
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut peak = 0u64;
    let mut last_list = Instant::now();
    loop {
        peak = peak.max(net.agents[1].rss_bytes().unwrap_or(0));
        if last_list.elapsed() > Duration::from_secs(5) {
            last_list = Instant::now();
            if net
                .list_keys(1, &inbox)
                .map(|k| k.is_empty())
                .unwrap_or(false)
            {
                break;
            }
        }
        if Instant::now() > deadline {
            println!("  note: the inbox was not drained within 15 minutes");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(peak as f64)
}
struct Snapshot {
    requests: f64,
    egress_bytes: f64,
    per_op: Vec<(String, f64)>,
    per_node: Vec<NodeCount>,
}

/// One node's S3 requests, bundle PUTs and egressed bytes.
struct NodeCount {
    requests: f64,
    puts: f64,
    egress_bytes: f64,
}

fn snapshot(net: &TunnelNet) -> anyhow::Result<Snapshot> {
    let all: Vec<Metrics> = net
        .agents
        .iter()
        .map(|a| a.metrics())
        .collect::<Result<_, _>>()?;
    // Every `op` label the agents report, so new operations (e.g. batched deletes) show up.
    let mut ops: Vec<String> = all
        .iter()
        .flat_map(|m| m.samples.iter())
        .filter(|s| s.name == "hoshino_s3_requests_total")
        .filter_map(|s| {
            s.labels
                .iter()
                .find(|(k, _)| k == "op")
                .map(|(_, v)| v.clone())
        })
        .collect();
    ops.sort();
    ops.dedup();
    let per_op = ops
        .into_iter()
        .map(|op| {
            let n = all
                .iter()
                .map(|m| m.sum_where("hoshino_s3_requests_total", &[("op", &op)]))
                .sum();
            (op, n)
        })
        .collect();
    Ok(Snapshot {
        requests: all.iter().map(|m| m.sum("hoshino_s3_requests_total")).sum(),
        egress_bytes: all
            .iter()
            .map(|m| m.sum("hoshino_egress_bytes_total"))
            .sum(),
        per_op,
        per_node: all
            .iter()
            .map(|m| NodeCount {
                requests: m.sum("hoshino_s3_requests_total"),
                puts: m.sum_where("hoshino_s3_requests_total", &[("op", "put")]),
                egress_bytes: m.sum("hoshino_egress_bytes_total"),
            })
            .collect(),
    })
}

struct IdleCost {
    total_per_hour: f64,
    put_list_per_hour: f64,
    get_head_per_hour: f64,
    delete_per_hour: f64,
    dollars_per_day: f64,
}

/// Waits until both agents report idle mode (or 60 s pass: then says so and goes on).
fn wait_until_idle(net: &TunnelNet) -> anyhow::Result<()> {
    // Idle mode starts IDLE_AFTER (10 s) after the last find; allow for slow machines.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let idle = net
            .agents
            .iter()
            .map(|a| a.metrics().map(|m| m.sum("hoshino_heartbeat_idle")))
            .collect::<Result<Vec<_>, _>>()?;
        if idle.iter().all(|v| *v >= 1.0) {
            break;
        }
        if Instant::now() > deadline {
            println!(
                "  note: agents did not report hoshino_heartbeat_idle=1 within 60 s; measuring anyway"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn idle_cost(net: &TunnelNet, window: Duration) -> anyhow::Result<IdleCost> {
    wait_until_idle(net)?;
    let before = snapshot(net)?;
    std::thread::sleep(window);
    let after = snapshot(net)?;
    let nodes = net.agents.len().max(1) as f64;
    let scale = 3600.0 / window.as_secs_f64() / nodes;
    let delta = |op: &str| {
        let get = |s: &Snapshot| {
            s.per_op
                .iter()
                .find(|(o, _)| o == op)
                .map_or(0.0, |(_, n)| *n)
        };
        (get(&after) - get(&before)) * scale
    };
    let ops: Vec<&str> = after.per_op.iter().map(|(o, _)| o.as_str()).collect();
    let sum = |tier: PriceTier| -> f64 {
        ops.iter()
            .filter(|o| PriceTier::of(o) == tier)
            .map(|o| delta(o))
            .sum()
    };
    let put_list = sum(PriceTier::PutList);
    let get_head = sum(PriceTier::GetHead);
    let delete = sum(PriceTier::Free);
    Ok(IdleCost {
        total_per_hour: put_list + get_head + delete,
        put_list_per_hour: put_list,
        get_head_per_hour: get_head,
        delete_per_hour: delete,
        dollars_per_day: 24.0 * (put_list * PRICE_PUT_LIST + get_head * PRICE_GET_HEAD),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PriceTier {
    PutList,
    GetHead,
    Free,
}

impl PriceTier {
    /// AWS bills PUT, COPY, POST and LIST at the first tier, DELETE (single or batched) not at
    /// all, and GET, HEAD and the rest at the second.
    fn of(op: &str) -> PriceTier {
        let op = op.to_ascii_lowercase();
        if op.contains("delete") {
            PriceTier::Free
        } else if op.contains("put")
            || op.contains("list")
            || op.contains("post")
            || op.contains("copy")
        {
            PriceTier::PutList
        } else {
            PriceTier::GetHead
        }
    }

    fn price(self) -> f64 {
        match self {
            PriceTier::PutList => PRICE_PUT_LIST,
            PriceTier::GetHead => PRICE_GET_HEAD,
            PriceTier::Free => 0.0,
        }
    }
}

/// Dollars per GiB and one line per operation: requests per GiB and their price.
fn cost_per_gib(before: &Snapshot, after: &Snapshot, gib: f64) -> (f64, Vec<String>) {
    let mut dollars = 0.0;
    let mut lines = vec![];
    for (op, n) in &after.per_op {
        let was = before
            .per_op
            .iter()
            .find(|(o, _)| o == op)
            .map_or(0.0, |(_, n)| *n);
        let per_gib = (n - was) / gib;
        let tier = PriceTier::of(op);
        dollars += per_gib * tier.price();
        lines.push(format!(
            "{op:<14} {per_gib:>10.0} per GiB  ${:.5} per GiB",
            per_gib * tier.price()
        ));
    }
    (dollars, lines)
}

/// The classifier against no program and nftables (`hoshino_tests::classifier_bench`).
fn classifier_figures(args: &Args) -> anyhow::Result<()> {
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies/prefixes-1000.toml");
    hoshino_tests::classifier_bench::run(&policy, args.classifier_rounds, args.classifier_seconds)
        .context("classifier benchmark")?
        .print();
    Ok(())
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hoshino-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
