//! `cargo xtask demo`: builds the workspace, then runs `hoshino-demo` (tests/src/bin), which
//! starts a local S3 server and two nodes in namespaces, pings, fetches a page over HTTP through
//! the tunnel, prints RTTs and metrics, and cleans up.

use std::process::ExitCode;

use crate::cargo::{build_testbed_binaries, run_testbed_binary};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run the release profile.
    #[arg(long)]
    release: bool,
    /// Passed to hoshino-demo (e.g. `-- --server moto --pings 10`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    demo_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = if args.release { "release" } else { "debug" };
    build_testbed_binaries(profile)?;
    run_testbed_binary(profile, "hoshino-demo", &args.demo_args)
}
