//! `cargo xtask <command>`: the project's developer commands. Each command lives in its own
//! module; this file only dispatches.

mod bench;
mod build_ebpf;
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
    /// Builds the eBPF classifier from source with the pinned nightly toolchain.
    BuildEbpf,
    /// Lints, builds and runs the whole test suite (what scripts/test.sh and CI run).
    Test(test::Args),
    /// Two nodes in network namespaces ping and fetch a page through a local S3 server.
    Demo(demo::Args),
    /// Measures the tunnel against the S3 floor of a local server, and the classifier against
    /// no program and nftables, and prints the figures.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run().map(|()| ExitCode::SUCCESS),
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
