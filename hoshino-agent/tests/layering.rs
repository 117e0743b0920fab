//! The layout as a contract: only the binary's command layer (`src/cmd/`, `src/main.rs`) knows
//! clap and process concerns, and the classifier stays split by job (aya's shape: one file per
//! program concern and per map kind, none of them a second module in disguise).

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every library source file: all of `src/` except the binary (`main.rs`, `cmd/`).
fn library_files() -> Vec<PathBuf> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.retain(|f| f != &root.join("main.rs") && !f.starts_with(root.join("cmd")));
    assert!(files.len() > 20, "found the library: {files:?}");
    files
}

#[test]
fn only_the_command_layer_knows_clap_and_exit_codes() {
    for file in library_files() {
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for forbidden in [
                "clap::",
                "use clap",
                "std::process::exit",
                "ExitCode",
                "crate::cmd",
            ] {
                assert!(
                    !code.contains(forbidden),
                    "{}:{}: `{forbidden}` belongs in src/cmd/: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}

#[test]
fn the_classifier_is_split_into_files_of_one_job_each() {
    let dir = src().join("interceptor/classifier");
    for name in [
        "mod.rs",
        "load.rs",
        "attach.rs",
        "link_layer.rs",
        "config.rs",
        "policy_maps.rs",
        "counters.rs",
        "flows.rs",
    ] {
        let path = dir.join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let lines = text.lines().count();
        assert!(lines <= 400, "{}: {lines} lines", path.display());
    }
    assert!(
        !src().join("interceptor/tables.rs").exists(),
        "one policy compiler: policy/compile.rs"
    );
    let link_layer = std::fs::read_to_string(dir.join("link_layer.rs")).expect("link_layer.rs");
    assert!(
        !link_layer.contains("ioctl") && !link_layer.contains("unsafe"),
        "the link type comes from rtnetlink"
    );
}
