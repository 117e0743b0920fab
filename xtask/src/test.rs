//! `cargo xtask test`: format check, clippy, agent build, then every default member's tests.
//! All steps run even after a failure, so one report shows everything; the exit code is non-zero
//! if any step failed.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::cargo::cargo;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments passed to `cargo test` (after `--no-fail-fast`).
    #[arg(trailing_var_arg = true)]
    cargo_test_args: Vec<String>,
}

struct Step {
    name: &'static str,
    command: Command,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut test = cargo(&["test", "--no-fail-fast"]);
    test.args(&args.cargo_test_args);
    let steps = vec![
        Step {
            name: "format (cargo fmt --all --check)",
            command: cargo(&["fmt", "--all", "--check"]),
        },
        Step {
            name: "lint (cargo clippy --all-targets -- -D warnings)",
            command: cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]),
        },
        Step {
            // Every target, so the agent binary the end-to-end tests run is built with the same
            // features as the tests themselves (one set of artifacts, not two).
            name: "build (cargo build --all-targets: agent, testbed binaries, tests)",
            command: cargo(&["build", "--all-targets"]),
        },
        Step {
            name: "tests (cargo test: unit + end-to-end in namespaces)",
            command: test,
        },
    ];
    let mut results: Vec<(&str, bool, Duration)> = Vec::new();
    for mut step in steps {
        eprintln!("\n==> {}", step.name);
        let start = Instant::now();
        let ok = step.command.status().is_ok_and(|s| s.success());
        results.push((step.name, ok, start.elapsed()));
    }
    eprintln!("\n==> summary");
    for (name, ok, took) in &results {
        let verdict = if *ok { "ok  " } else { "FAIL" };
        eprintln!("  {verdict} {name} ({:.0} s)", took.as_secs_f64());
    }
    let failed = results.iter().filter(|(_, ok, _)| !ok).count();
    if failed == 0 {
        eprintln!("all {} steps passed", results.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{failed} of {} steps failed", results.len());
        Ok(ExitCode::FAILURE)
    }
}
