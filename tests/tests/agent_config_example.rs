//! `deploy/agent.toml.example` is a configuration the agent accepts, including every setting it
//! shows commented out: the agent rejects unknown keys and wrong types (exit code 2, file:line), so
//! a renamed flag would break this test rather than an operator's start-up. Needs a built
//! `hoshino-agent`; runs no tunnel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hoshino_tests::binaries;
use hoshino_tests::scratch::ScratchDir;

const MACHINE_ID: &str = "0123456789abcdef0123456789abcdef";
const ADDRESS: &str = "fd68:6f73:6869:6e6f:123:4567:89ab:cdef";

fn example() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml.example");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `hoshino-agent --config <file with text> addr`: loads and checks the whole file, prints the
/// node's address (from the file's prefix).
fn addr_with_config(scratch: &ScratchDir, name: &str, text: &str) -> (Output, PathBuf) {
    let config = scratch.path().join(name);
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    let machine_id = scratch.path().join("machine-id");
    std::fs::write(&machine_id, format!("{MACHINE_ID}\n"))
        .unwrap_or_else(|e| panic!("{}: {e}", machine_id.display()));
    let agent = binaries::agent().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .arg("addr")
        .arg("--machine-id-file")
        .arg(&machine_id)
        .env("NO_COLOR", "1")
        .env_remove("HOSHINO_PREFIX")
        .env_remove("HOSHINO_LOG_FORMAT")
        .output()
        .unwrap_or_else(|e| panic!("running hoshino-agent: {e}"));
    (out, config)
}

fn assert_accepted(out: &Output, config: &Path) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} rejected ({}): {stderr}",
        config.display(),
        out.status
    );
    assert_eq!(stdout.trim(), ADDRESS, "address from {}", config.display());
}

/// The example with every `# key = value` line made active.
fn all_settings_active(text: &str) -> String {
    text.lines()
        .map(|line| {
            let rest = line.strip_prefix("# ").unwrap_or(line);
            let is_setting = line.starts_with("# ")
                && rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                });
            if is_setting { rest } else { line }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_is_accepted_by_the_agent() {
    let scratch = ScratchDir::create("config-example").unwrap_or_else(|e| panic!("{e}"));
    let (out, config) = addr_with_config(&scratch, "agent.toml", &example());
    assert_accepted(&out, &config);
}

#[test]
fn every_setting_the_example_shows_commented_out_is_a_real_key() {
    let scratch = ScratchDir::create("config-example-all").unwrap_or_else(|e| panic!("{e}"));
    let text = all_settings_active(&example());
    let active = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .count();
    assert!(
        active >= 20,
        "expected every flag in the example, found {active} settings:\n{text}"
    );
    let (out, config) = addr_with_config(&scratch, "agent-all.toml", &text);
    assert_accepted(&out, &config);
}

#[test]
fn a_misspelt_key_is_a_configuration_error_naming_file_and_line() {
    let scratch = ScratchDir::create("config-example-bad").unwrap_or_else(|e| panic!("{e}"));
    let mut text = example();
    text.push_str("\ntunel-name = \"hoshino1\"\n");
    let line = text.lines().count();
    let (out, config) = addr_with_config(&scratch, "agent-bad.toml", &text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status for a bad key: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:{line}:", config.display())),
        "error does not name {}:{line}: {stderr}",
        config.display()
    );
}
