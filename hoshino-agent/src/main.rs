//! `hoshino-agent`: exit code 0 on success, 2 for usage/configuration errors, 1 for runtime
//! faults.

use std::path::PathBuf;
use std::process::ExitCode;

mod cmd;

use clap::Parser;
use cmd::{Cli, Command, ConfigFile, LogFormat};
use hoshino_agent::node_addr::{NodeAddr, NodeId};
use hoshino_agent::tunnel;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("(none)"));
    let file = match &cli.config {
        Some(path) => match ConfigFile::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("hoshino-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => ConfigFile::default(),
    };
    init_logging(
        cli.log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    );
    match cli.command {
        Command::Addr(args) => {
            let prefix = match args.node.prefix(&file) {
                Ok(p) => p,
                Err(e) => return config_error(e),
            };
            let path = args.node.machine_id_file(&file);
            match NodeId::from_machine_id_file(&path) {
                Ok(id) => {
                    println!("{}", NodeAddr { prefix, id });
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Command::Policy(command) => match cmd::policy::run(&command) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Attach(args) => run_attach(args, &file, &config_path),
        Command::Detach(args) => match cmd::detach::run(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("hoshino-agent: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Command::Tunnel(args) => {
            let config = match args.resolve(&file, &config_path) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            run_tunnel(config)
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run_tunnel(config: tunnel::TunnelConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoshino-agent: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(tunnel::run(config, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(if e.is_config_error() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

fn run_attach(
    args: cmd::attach::AttachArgs,
    file: &ConfigFile,
    config_path: &std::path::Path,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoshino-agent: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let attach = cmd::attach::run(args, file, config_path, shutdown_signal());
    match runtime.block_on(attach) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hoshino-agent: {e}");
            ExitCode::from(if e.is_config_error() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the process still dies on the default action; wait forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HOSHINO_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
