//! `cargo xtask <command>`: the project's developer commands. Each command lives in its own
//! module; this file only dispatches.

mod bench;
mod cargo;
mod demo;
mod signals;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Hoshino developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lints, builds and runs the whole test suite (what scripts/test.sh and CI run).
    Test(test::Args),
    /// Two nodes in network namespaces ping and fetch a page through a local S3 server.
    Demo(demo::Args),
    /// Measures the tunnel against the S3 floor of a local server and prints the figures.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
