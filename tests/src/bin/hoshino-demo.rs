//! `hoshino-demo` (run by `cargo xtask demo`): a local S3 server and two nodes in network namespaces; node 1 pings node 2
//! and fetches a page from it over HTTP, all through the bucket. Prints RTTs and both nodes'
//! metrics, then removes everything it created.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use hoshino_tests::command;
use hoshino_tests::http_server::serve_directory;
use hoshino_tests::ping::ping;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

use hoshino_tests::signals::survive_interrupt;

#[derive(Debug, clap::Parser)]
#[command(name = "hoshino-demo")]
struct Args {
    /// S3 server: s3s-fs (in-process implementation) or moto.
    #[arg(long, default_value = "s3s-fs", value_parser = ["s3s-fs", "moto"])]
    server: String,
    /// Echo requests to send.
    #[arg(long, default_value_t = 5)]
    pings: u32,
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    survive_interrupt();
    let kind = if args.server == "moto" {
        BackendKind::Moto
    } else {
        BackendKind::S3sFs
    };

    println!(
        "Starting a {} S3 server and two Hoshino nodes in network namespaces...",
        kind.label()
    );
    let net =
        TunnelNet::start(kind, 2, &NetOptions::default()).context("starting the demo network")?;
    println!(
        "  S3 endpoint  {} bucket {}",
        net.endpoint().url,
        net.endpoint().bucket
    );
    for node in &net.bed.nodes {
        println!(
            "  node {}  namespace {}  address {}",
            node.index,
            node.ns.name(),
            node.tunnel_addr
        );
    }
    let n1 = net.node(1)?;
    let n2 = net.node(2)?;

    println!("\nping node 1 -> node 2 ({} echo requests)", args.pings);
    let report = ping(
        &n1.ns,
        IpAddr::V6(n2.tunnel_addr),
        args.pings,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )?;
    for (i, rtt) in report.rtts_ms.iter().enumerate() {
        println!("  reply {}: {rtt:.1} ms", i + 1);
    }
    println!(
        "  {} sent, {} received",
        report.transmitted, report.received
    );

    println!("\nHTTP GET from node 1 to node 2");
    let www = net.scratch().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(
        www.join("index.html"),
        format!(
            "<h1>Hello from node 2 ({}), carried through an S3 bucket</h1>\n",
            n2.tunnel_addr
        ),
    )?;
    let _server = serve_directory(&n2.ns, n2.tunnel_addr, 8080, &www)
        .context("starting python3 http.server")?;
    let url = format!("http://[{}]:8080/", n2.tunnel_addr);
    let start = Instant::now();
    let page = command::run(
        n1.ns
            .command("curl")
            .args([
                "-g",
                "-sS",
                "--fail",
                "--retry",
                "20",
                "--retry-all-errors",
                "--retry-delay",
                "1",
            ])
            .args(["--max-time", "60", &url]),
    )
    .context("fetching the page across the tunnel")?;
    println!(
        "  GET {url} -> {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    println!("  {}", page.trim());

    for (i, agent) in net.agents.iter().enumerate() {
        println!("\nmetrics of node {}", i + 1);
        match agent.metrics() {
            Ok(m) => print!("{}", indent(&m.summary())),
            Err(e) => println!("  (unavailable: {e})"),
        }
    }
    println!("\nCleaning up (agents stopped, namespaces deleted).");
    let ok = report.unanswered(args.pings).is_empty();
    drop(net);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn indent(text: &str) -> String {
    text.lines()
        .filter(|l| !l.ends_with(" 0"))
        .map(|l| format!("  {l}\n"))
        .collect()
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hoshino-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
