//! The command layer: the only code that knows clap and process concerns (exit codes, signals,
//! logging). One file per subcommand; the library (`hoshino_agent`) never imports this.
//!
//! Every setting is one clap argument: the flag, its `HOSHINO_<NAME>` variable, and its
//! `--config` file key (the flag's long name, see `config_file`). Precedence per setting:
//! flag > environment variable > file > default.
//!
//! Exit codes: 0 success, 2 usage or configuration error, 1 runtime fault.

use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

pub mod addr;
pub mod attach;
pub mod columns;
pub mod config_file;
pub mod detach;
pub mod hosts;
pub mod peers;
pub mod policy;
pub mod resolved;
pub mod status;
pub mod tunnel;

pub use config_file::ConfigFile;

/// A usage or configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// A fault while running.
pub const EXIT_RUNTIME: u8 = 1;

/// Default `--worker-threads`: two cover the tunnel's loops and the divert proxy; the S3 client
/// and the kernel do the heavy lifting.
pub const DEFAULT_WORKER_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(
    name = "hoshino-agent",
    version,
    about = "Hoshino: IPv6 between hosts through any S3-compatible object store.",
    long_about = "Hoshino: IPv6 between hosts through any S3-compatible object store.\n\n\
        Settings come from flags, then HOSHINO_* environment variables, then the --config file, \
        then defaults. AWS credentials come from the standard AWS chain (environment, profile, \
        instance role).\n\nExit codes: 0 success, 2 usage or configuration error, 1 runtime fault."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, env = "HOSHINO_LOG_FORMAT", global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// TOML file holding any of the flags (keys are flag names without `--`, e.g.
    /// `bucket = "net"`, `heartbeat-min = "5ms"`). Flags and environment variables override it.
    #[arg(long, env = "HOSHINO_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Async runtime worker threads.
    #[arg(long, env = "HOSHINO_WORKER_THREADS", global = true, value_name = "N",
          default_value_t = NonZeroUsize::new(DEFAULT_WORKER_THREADS).unwrap_or(NonZeroUsize::MIN))]
    pub worker_threads: NonZeroUsize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing would only obscure it
pub enum Command {
    /// Run the tunnel: create the TUN, carry IPv6 packets to other nodes through the bucket.
    Tunnel(tunnel::TunnelArgs),
    /// Print this node's tunnel address and exit.
    Addr(addr::AddrArgs),
    /// Attach the policy classifier to an interface; tunnel and divert what the policy says.
    Attach(attach::AttachArgs),
    /// Remove the classifier `attach` left pinned on an interface (link, maps, pins).
    Detach(detach::DetachArgs),
    /// List the nodes in the bucket's directory (no running agent needed).
    Peers(peers::PeersArgs),
    /// Print /etc/hosts lines for the nodes in the directory.
    Hosts(hosts::HostsArgs),
    /// Ask the running agent (control socket in the state directory) how it is doing.
    Status(status::StatusArgs),
    /// Register the running tunnel's name responder with systemd-resolved, as root, for an
    /// agent that is not (the systemd unit's `ExecStartPost`).
    Resolved(resolved::ResolvedArgs),
    /// Policy file tools.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("cannot read config file {path}: {reason}")]
    ConfigUnreadable { path: PathBuf, reason: String },
    #[error("{path}:{line}: {message}")]
    ConfigInvalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("--bucket (HOSHINO_BUCKET, or `bucket` in the config file) is required")]
    MissingBucket,
    #[error("--name: {0}")]
    BadName(String),
}

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    /// Usage errors, `--help` and `--version`: clap prints them and picks the exit code.
    Usage(clap::Error),
    /// The `--config` file is unreadable or invalid (exit 2).
    Config(CliError),
}

/// Parses `args` (with the program name first), the `--config` file's settings serving as the
/// flags' defaults.
pub fn parse<I, T>(args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    if let Some(path) = config_path(&args) {
        let file = ConfigFile::load(&path).map_err(ParseError::Config)?;
        command = file.apply(command).map_err(ParseError::Config)?;
    }
    let matches = command
        .try_get_matches_from(args)
        .map_err(ParseError::Usage)?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Usage)
}

/// `--config` as flag or environment variable, read with the same declaration before the file's
/// settings exist (a missing required flag the file would supply must not fail this first look).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()
        .and_then(|m| m.get_one::<PathBuf>("config").cloned())
}

/// Runs the parsed command to its exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Addr(args) => addr::run(&args),
        Command::Policy(command) => match policy::run(&command) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Attach(args) => attach::run_command(args).await,
        Command::Detach(args) => match detach::run(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("hoshino-agent: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Command::Tunnel(args) => tunnel::run(&args).await,
        Command::Peers(args) => peers::run(&args).await,
        Command::Hosts(args) => hosts::run(&args).await,
        Command::Status(args) => status::run(&args).await,
        Command::Resolved(args) => resolved::run(&args).await,
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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

/// Logs to stderr, filtered by `HOSHINO_LOG` (else `RUST_LOG`, else `info`).
pub fn init_logging(format: LogFormat) {
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

#[cfg(test)]
mod tests;
