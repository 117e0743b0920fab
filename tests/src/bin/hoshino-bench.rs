//! `hoshino-bench` (run by `cargo xtask bench`): one run against a local S3 server (s3s-fs) in the testbed, printing the
//! figures MISSION.md sets targets for: S3 floor, ping RTT through the tunnel and its ratio to the
//! floor, bulk TCP throughput and its ratio to raw PUT->GET throughput, S3 requests per GiB
//! carried, idle requests per node-hour and their price per node-day, and idle agent RSS.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddrV6};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hoshino_tests::binaries;
use hoshino_tests::command;
use hoshino_tests::metrics::Metrics;
use hoshino_tests::ping::ping;
use hoshino_tests::process::Spawned;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

use hoshino_tests::signals::survive_interrupt;

/// AWS S3 Standard list prices, USD per request.
const PRICE_PUT_LIST: f64 = 0.005 / 1000.0;
const PRICE_GET_HEAD: f64 = 0.0004 / 1000.0;
/// The seed polls LIST twice a second: 172,800 LISTs per node-day.
const SEED_DOLLARS_PER_NODE_DAY: f64 = 0.86;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, clap::Parser)]
#[command(name = "hoshino-bench")]
struct Args {
    /// Small-object PUT/GET samples for the S3 floor.
    #[arg(long, default_value_t = 50)]
    floor_samples: usize,
    /// Echo requests through the tunnel.
    #[arg(long, default_value_t = 100)]
    pings: u32,
    /// MiB sent in the bulk TCP transfer.
    #[arg(long, default_value_t = 64)]
    bulk_mib: u64,
    /// Seconds of idle measured (scaled to a node-hour).
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
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
    /// Alternating rounds of the metadata proxy comparison (0 skips it).
    #[arg(long, default_value_t = 5)]
    metadata_rounds: u32,
    /// Requests per round in the metadata proxy comparison.
    #[arg(long, default_value_t = 100)]
    metadata_requests: usize,
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    survive_interrupt();
    if args.classifier_only {
        classifier_figures(&args)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "hoshino bench ({} build, s3s-fs server in a namespace, 2 nodes)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let net = TunnelNet::start(BackendKind::S3sFs, 2, &NetOptions::default())
        .context("starting the bench network")?;

    let floor = s3_floor(&net, args.floor_samples)?;
    let floor_rtt = 2.0 * (floor.put_p50_ms + floor.get_p50_ms);
    println!(
        "\nS3 floor (aws-sdk-s3 from node 1, {}-byte object, {} samples)",
        128, args.floor_samples
    );
    println!(
        "  PUT p50 {:.2} ms  p99 {:.2} ms",
        floor.put_p50_ms, floor.put_p99_ms
    );
    println!(
        "  GET p50 {:.2} ms  p99 {:.2} ms",
        floor.get_p50_ms, floor.get_p99_ms
    );
    println!("  floor RTT = 2 x (PUT + GET) = {floor_rtt:.2} ms");

    let (p50, p99) = ping_rtt(&net, args.pings)?;
    println!(
        "\nPing through the tunnel ({} echo requests, 50 ms apart)",
        args.pings
    );
    println!("  RTT p50 {p50:.2} ms  p99 {p99:.2} ms");
    println!("  p50 / floor = {:.2}x  (target <= 1.5x)", p50 / floor_rtt);

    let raw = raw_throughput(&net)?;
    let before = snapshot(&net)?;
    let tunnel = bulk_tcp(&net, args.bulk_mib)?;
    let after = snapshot(&net)?;
    println!(
        "\nBulk TCP through the tunnel ({} MiB, node 1 -> node 2)",
        args.bulk_mib
    );
    println!("  tunnel  {:.1} MiB/s", tunnel / 1048576.0);
    println!(
        "  raw S3 PUT->GET (1 MiB objects, 4 at a time)  {:.1} MiB/s",
        raw / 1048576.0
    );
    println!("  tunnel / raw = {:.2}x  (target >= 0.5x)", tunnel / raw);
    let requests = after.requests - before.requests;
    let carried = after.egress_bytes - before.egress_bytes;
    if carried > 0.0 {
        println!(
            "  S3 requests per GiB carried: {:.0}  ({requests:.0} requests, both nodes, for {:.1} MiB egressed; target <= 5000)",
            requests / (carried / GIB),
            carried / 1048576.0
        );
    }

    let idle = idle_cost(&net, Duration::from_secs(args.idle_seconds))?;
    println!(
        "\nIdle ({} s measured after both agents went idle, scaled)",
        args.idle_seconds
    );
    println!(
        "  S3 requests per node-hour: {:.0}  (PUT/LIST {:.0}, GET/HEAD {:.0}, DELETE {:.0})",
        idle.total_per_hour, idle.put_list_per_hour, idle.get_head_per_hour, idle.delete_per_hour
    );
    println!(
        "  $ per node-day at AWS list prices: ${:.4}  (seed: ${SEED_DOLLARS_PER_NODE_DAY}; {:.1}x cheaper; target >= 10x)",
        idle.dollars_per_day,
        SEED_DOLLARS_PER_NODE_DAY / idle.dollars_per_day.max(f64::MIN_POSITIVE)
    );
    for (i, agent) in net.agents.iter().enumerate() {
        match agent.rss_bytes() {
            Some(rss) => println!(
                "  agent {} idle RSS: {:.1} MiB  (target < 32 MiB)",
                i + 1,
                rss as f64 / 1048576.0
            ),
            None => println!("  agent {} idle RSS: unavailable", i + 1),
        }
    }
    drop(net);
    if !args.skip_classifier {
        classifier_figures(&args)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The classifier against no program and nftables (`hoshino_tests::classifier_bench`).
fn classifier_figures(args: &Args) -> anyhow::Result<()> {
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies/prefixes-1000.toml");
    hoshino_tests::classifier_bench::run(&policy, args.classifier_rounds, args.classifier_seconds)
        .context("classifier benchmark")?
        .print();
    if args.metadata_rounds > 0 {
        let metadata = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/policies/metadata.toml");
        hoshino_tests::metadata_bench::run(&metadata, args.metadata_rounds, args.metadata_requests)
            .context("metadata proxy benchmark")?
            .print();
    }
    Ok(())
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

fn ping_rtt(net: &TunnelNet, count: u32) -> anyhow::Result<(f64, f64)> {
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
        Duration::from_millis(50),
        Duration::from_secs(120),
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

/// Bytes per second of PUT-then-GET with aws-sdk-s3, from node 1.
fn raw_throughput(net: &TunnelNet) -> anyhow::Result<f64> {
    let out = net.s3_probe(
        1,
        &[
            "throughput",
            "--object-bytes",
            "1048576",
            "--objects",
            "64",
            "--concurrency",
            "4",
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
fn bulk_tcp(net: &TunnelNet, mib: u64) -> anyhow::Result<f64> {
    let probe = binaries::netprobe()?;
    let probe = probe.to_string_lossy().into_owned();
    let to = SocketAddrV6::new(net.node(2)?.tunnel_addr, 9200, 0, 0);
    let mut recv = net.command_in(2, &probe)?;
    recv.args(["tcp-recv", "--listen", &to.to_string()])
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
    command::run(net.command_in(1, &probe)?.args([
        "tcp-send",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]))
    .context("tcp-send through the tunnel")?;
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

struct Snapshot {
    requests: f64,
    egress_bytes: f64,
    per_op: Vec<(String, f64)>,
}

fn snapshot(net: &TunnelNet) -> anyhow::Result<Snapshot> {
    let all: Vec<Metrics> = net
        .agents
        .iter()
        .map(|a| a.metrics())
        .collect::<Result<_, _>>()?;
    let per_op = ["put", "get", "list", "head", "delete"]
        .iter()
        .map(|op| {
            let n = all
                .iter()
                .map(|m| m.sum_where("hoshino_s3_requests_total", &[("op", op)]))
                .sum();
            ((*op).to_owned(), n)
        })
        .collect();
    Ok(Snapshot {
        requests: all.iter().map(|m| m.sum("hoshino_s3_requests_total")).sum(),
        egress_bytes: all
            .iter()
            .map(|m| m.sum("hoshino_egress_bytes_total"))
            .sum(),
        per_op,
    })
}

struct IdleCost {
    total_per_hour: f64,
    put_list_per_hour: f64,
    get_head_per_hour: f64,
    delete_per_hour: f64,
    dollars_per_day: f64,
}

fn idle_cost(net: &TunnelNet, window: Duration) -> anyhow::Result<IdleCost> {
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
    let put_list = delta("put") + delta("list");
    let get_head = delta("get") + delta("head");
    let delete = delta("delete");
    Ok(IdleCost {
        total_per_hour: put_list + get_head + delete,
        put_list_per_hour: put_list,
        get_head_per_hour: get_head,
        delete_per_hour: delete,
        dollars_per_day: 24.0 * (put_list * PRICE_PUT_LIST + get_head * PRICE_GET_HEAD),
    })
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
