//! `cargo xtask build-ebpf`: builds the TC classifier exactly as `hoshino-agent/build.rs` does
//! (aya-build, the nightly pinned in `scripts/versions.env`, `-Z build-std=core`, bpf-linker) and
//! prints the object's path and size.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Builds `hoshino-ebpf` into `<target dir>/xtask-ebpf/hoshino`.
pub fn run() -> anyhow::Result<()> {
    let root = crate::cargo::workspace_root();
    let toolchain = pinned_toolchain(&root)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target_dir.join("xtask-ebpf");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ebpf_dir = root.join("hoshino-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .with_context(|| format!("{} is not UTF-8", ebpf_dir.display()))?;
    let endian = if cfg!(target_endian = "little") {
        "little"
    } else {
        "big"
    };
    // aya-build reads what cargo gives a build script; provide the same for the host.
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("OUT_DIR", &out_dir);
        std::env::set_var("CARGO_CFG_TARGET_ENDIAN", endian);
        std::env::set_var("CARGO_CFG_TARGET_ARCH", std::env::consts::ARCH);
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hoshino-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context("building hoshino-ebpf")?;
    let object = out_dir.join("hoshino");
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build produced no {}", object.display()))?
        .len();
    println!("{} ({size} bytes)", object.display());
    Ok(())
}

/// `EBPF_TOOLCHAIN` from `scripts/versions.env`.
fn pinned_toolchain(root: &Path) -> anyhow::Result<String> {
    let path = root.join("scripts/versions.env");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    match text
        .lines()
        .find_map(|line| line.trim().strip_prefix("EBPF_TOOLCHAIN="))
    {
        Some(toolchain) if !toolchain.is_empty() => Ok(toolchain.to_owned()),
        _ => bail!("{} has no EBPF_TOOLCHAIN=", path.display()),
    }
}
