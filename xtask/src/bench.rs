//! `cargo xtask bench`: builds the release profile, then runs `hoshino-bench` (tests/src/bin)
//! against the testbed's S3 server under each emulated latency profile (loopback, express,
//! standard): S3 floor, ping RTT, first HTTP GET, bulk TCP against the raw PUT->GET pipeline,
//! requests and dollars per GiB, idle cost, wake latency and RSS; then the metadata-proxy latency
//! and the classifier overhead. `cargo xtask bench -- --quick` is a loopback-only smoke run;
//! `-- --backlog` adds the RSS under a 1,000 x 16 MiB inbox backlog (writes 16 GiB).

use std::process::ExitCode;

use crate::cargo::{build_testbed_binaries, run_testbed_binary};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measure debug binaries instead of release ones (faster to build, slower to run).
    #[arg(long)]
    debug: bool,
    /// Passed to hoshino-bench (e.g. `-- --quick`, `-- --profiles express --bulk-mib 2048`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    bench_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = if args.debug { "debug" } else { "release" };
    build_testbed_binaries(profile)?;
    run_testbed_binary(profile, "hoshino-bench", &args.bench_args)
}
