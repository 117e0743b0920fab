//! `hoshino-s3-server`: s3s-fs over HTTP for the testbed. Prints `listening <addr>` on stdout
//! once it accepts connections.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hoshino_tests::s3_server::{BoundServer, ServerConfig};

#[derive(Debug, Parser)]
#[command(about = "s3s-fs over HTTP with static credentials and optional fault injection")]
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
    /// Fraction of requests (0..=1) answered with 503 SlowDown instead of being served.
    #[arg(long, default_value_t = 0.0)]
    fault_fraction: f64,
    #[arg(long, default_value_t = 0x5eed)]
    fault_seed: u64,
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
        fault_fraction: args.fault_fraction,
        fault_seed: args.fault_seed,
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
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
    let faults = server.injected_faults();
    tokio::select! {
        _ = server.serve() => ExitCode::from(1),
        _ = terminated() => {
            eprintln!("hoshino-s3-server: stopping; {} faults injected", faults.injected());
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
