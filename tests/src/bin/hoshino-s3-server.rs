//! `hoshino-s3-server`: s3s-fs over HTTP for the testbed, with emulated S3 latency and injected
//! faults (`hoshino_tests::s3_server`). Prints `listening <addr>` on stdout once it accepts
//! connections.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hoshino_tests::s3_server::{
    BoundServer, ForbidRule, KeyMatch, LatencyProfile, ServerConditions, ServerConfig, StallRule,
};

#[derive(Debug, Parser)]
#[command(
    about = "s3s-fs over HTTP with static credentials, emulated S3 latency and fault injection"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed when ready).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory holding the buckets (one subdirectory per bucket).
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value = "hoshino")]
    access_key: String,
    #[arg(long, default_value = "hoshino-secret")]
    secret_key: String,
    /// Latency added to every request: loopback (none), express (~5 ms), standard (20-30 ms
    /// with a tail).
    #[arg(long, value_enum, default_value_t = LatencyProfile::Loopback)]
    latency: LatencyProfile,
    /// Fraction of requests (0..=1) answered with 503 SlowDown instead of being served.
    #[arg(long, default_value_t = 0.0)]
    fault_fraction: f64,
    /// Fraction of requests (0..=1) answered with 500 InternalError.
    #[arg(long, default_value_t = 0.0)]
    error_fraction: f64,
    /// Fraction of requests (0..=1) whose connection is reset (RST) instead of answered.
    #[arg(long, default_value_t = 0.0)]
    reset_fraction: f64,
    /// Seed of the latency and fault draws (deterministic per request number).
    #[arg(long, default_value_t = 0x5eed)]
    fault_seed: u64,
    /// Stall the body of GETs whose key starts with this prefix ("" = every GET): headers go out
    /// at once, the body after --stall-ms.
    #[arg(long)]
    stall_get_prefix: Option<String>,
    /// Stall only GETs of mailbox keys sent by this node (keys ending in `.<16 hex>`).
    #[arg(long, requires = "stall_get_prefix")]
    stall_get_sender: Option<String>,
    /// How long a stalled GET body is held back, in milliseconds.
    #[arg(long, default_value_t = 3_600_000, requires = "stall_get_prefix")]
    stall_ms: u64,
    /// Stall only the first N matching GETs [default: all].
    #[arg(long, requires = "stall_get_prefix")]
    stall_count: Option<u64>,
    /// Answer GETs of keys starting with this prefix ("" = every key) with 403 AccessDenied.
    #[arg(long)]
    forbid_get_prefix: Option<String>,
    /// Forbid only GETs of mailbox keys sent by this node (keys ending in `.<16 hex>`).
    #[arg(long, requires = "forbid_get_prefix")]
    forbid_get_sender: Option<String>,
    /// Forbid only the first N matching GETs [default: all], then serve them.
    #[arg(long, requires = "forbid_get_prefix")]
    forbid_count: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let config = ServerConfig {
        listen: args.listen,
        root: args.root,
        access_key: args.access_key,
        secret_key: args.secret_key,
        conditions: ServerConditions {
            latency: args.latency,
            slow_down_fraction: args.fault_fraction,
            internal_error_fraction: args.error_fraction,
            reset_fraction: args.reset_fraction,
            stall: args.stall_get_prefix.map(|prefix| StallRule {
                keys: KeyMatch {
                    prefix,
                    sender: args.stall_get_sender,
                },
                duration: Duration::from_millis(args.stall_ms),
                count: args.stall_count,
            }),
            forbid: args.forbid_get_prefix.map(|prefix| ForbidRule {
                keys: KeyMatch {
                    prefix,
                    sender: args.forbid_get_sender,
                },
                count: args.forbid_count,
            }),
            seed: args.fault_seed,
        },
    };
    let server = match BoundServer::bind(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hoshino-s3-server: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(addr) = server.local_addr() else {
        eprintln!("hoshino-s3-server: listener has no local address");
        return ExitCode::from(1);
    };
    eprintln!(
        "hoshino-s3-server: latency {}, conditions {:?}",
        config.conditions.latency.label(),
        config.conditions
    );
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
    let counters = server.counters();
    tokio::select! {
        _ = server.serve() => ExitCode::from(1),
        _ = terminated() => {
            eprintln!("hoshino-s3-server: stopping; {counters}");
            ExitCode::SUCCESS
        }
    }
}

async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
