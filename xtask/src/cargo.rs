//! Running cargo from xtask: the same cargo binary, at the workspace root.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// The workspace root (xtask's manifest lives one level below it).
///
/// `cargo run` sets `CARGO_MANIFEST_DIR` for the process, and that wins over the directory baked
/// in at compile time: checkouts sharing one target directory (CI's clones, worktrees) can get
/// an xtask binary that cargo judged fresh but was built from another checkout.
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `cargo <args>` at the workspace root, with the cargo that runs us.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).args(args);
    cmd
}

/// The target directory cargo builds into (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the agent and the testbed's binaries in `profile`. The testbed finds them next to its
/// own executable (or where `HOSHINO_AGENT_BIN` etc. say).
///
/// Debug builds use `--all-targets`, the invocation `cargo xtask test` uses: one feature
/// resolution, so the demo reuses the test suite's artifacts instead of building a second set.
pub fn build_testbed_binaries(profile: &str) -> anyhow::Result<()> {
    let args: &[&str] = if profile == "release" {
        &["build", "--release", "--bins"]
    } else {
        &["build", "--all-targets"]
    };
    let status = cargo(args).status()?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed with {status}",
        args.join(" ")
    );
    Ok(())
}

/// Runs `<target>/<profile>/<name> args` and returns its exit code.
pub fn run_testbed_binary(profile: &str, name: &str, args: &[String]) -> anyhow::Result<ExitCode> {
    let path = target_dir().join(profile).join(name);
    crate::signals::survive_interrupt();
    let status = Command::new(&path)
        .args(args)
        .status()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", path.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
