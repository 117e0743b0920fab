//! `cargo xtask bench`: builds the release profile, then runs `hoshino-bench` (tests/src/bin):
//! S3 floor, ping RTT, bulk TCP throughput, requests per GiB, idle cost and RSS in one run against
//! a local S3 server.

use std::process::ExitCode;

use crate::cargo::{build_testbed_binaries, run_testbed_binary};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measure debug binaries instead of release ones (faster to build, slower to run).
    #[arg(long)]
    debug: bool,
    /// Passed to hoshino-bench (e.g. `-- --idle-seconds 60 --bulk-mib 128`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    bench_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = if args.debug { "debug" } else { "release" };
    build_testbed_binaries(profile)?;
    run_testbed_binary(profile, "hoshino-bench", &args.bench_args)
}
