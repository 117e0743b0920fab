//! Builds the eBPF classifier (`hoshino-ebpf`) from this repository's source with the pinned
//! nightly and bpf-linker, so every `cargo build/test/clippy` of the agent embeds the code in the
//! repo. `AYA_BUILD_SKIP=1` skips it (the agent then fails to compile: nothing stale is embedded).

use std::path::PathBuf;

/// Must match `EBPF_TOOLCHAIN` in `scripts/versions.env` (checked below).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no parent", manifest_dir.display()))?;
    let versions = root.join("scripts/versions.env");
    let pinned = std::fs::read_to_string(&versions)?;
    if !pinned
        .lines()
        .any(|line| line.trim() == format!("EBPF_TOOLCHAIN={EBPF_TOOLCHAIN}"))
    {
        anyhow::bail!(
            "{} does not pin EBPF_TOOLCHAIN={EBPF_TOOLCHAIN}; update hoshino-agent/build.rs too",
            versions.display()
        );
    }
    println!("cargo:rerun-if-changed={}", versions.display());
    // The classifier's shared types: not a build-dependency (that would compile them for the
    // host build script), so changes are tracked by path.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("hoshino-common").display()
    );
    let ebpf_dir = root.join("hoshino-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    // aya-build relays the nested cargo's stderr as warnings; keep only real diagnostics.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hoshino-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
