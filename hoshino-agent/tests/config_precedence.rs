//! One declaration per setting serves the flag, its `HOSHINO_*` variable and its config-file key,
//! in that order of precedence, then the default. Runs `hoshino-agent addr` (which only reads
//! files and prints), so it needs no privileges and touches no network.

use std::path::PathBuf;
use std::process::Command;

const MACHINE_ID: &str = "0123456789abcdef0123456789abcdef";

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("hoshino-precedence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::write(dir.join("machine-id"), format!("{MACHINE_ID}\n")).expect("machine-id");
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "prefix = \"fd00:f11e::/64\"\nmachine-id-file = \"{}\"\n",
                dir.join("machine-id").display()
            ),
        )
        .expect("config file");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The address `addr` prints with the config file, `env` (HOSHINO_PREFIX) and `flag` (--prefix).
fn address(scratch: &Scratch, env: Option<&str>, flag: Option<&str>, file: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hoshino-agent"));
    command
        .env_remove("HOSHINO_PREFIX")
        .env_remove("HOSHINO_CONFIG")
        .env_remove("HOSHINO_MACHINE_ID_FILE");
    if file {
        command.arg("--config").arg(scratch.0.join("agent.toml"));
    } else {
        command.env("HOSHINO_MACHINE_ID_FILE", scratch.0.join("machine-id"));
    }
    command.arg("addr");
    if let Some(prefix) = env {
        command.env("HOSHINO_PREFIX", prefix);
    }
    if let Some(prefix) = flag {
        command.args(["--prefix", prefix]);
    }
    let out = command.output().expect("run hoshino-agent addr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_flag_beats_its_environment_variable_which_beats_the_file_which_beats_the_default() {
    let s = Scratch::new();
    let host = "123:4567:89ab:cdef";
    assert_eq!(
        address(&s, None, None, false),
        format!("fd68:6f73:6869:6e6f:{host}"),
        "default"
    );
    assert_eq!(
        address(&s, None, None, true),
        format!("fd00:f11e::{host}"),
        "file"
    );
    assert_eq!(
        address(&s, Some("fd00:e::/64"), None, true),
        format!("fd00:e::{host}"),
        "environment over file"
    );
    assert_eq!(
        address(&s, Some("fd00:e::/64"), Some("fd00:f1a6::/64"), true),
        format!("fd00:f1a6::{host}"),
        "flag over environment"
    );
}
