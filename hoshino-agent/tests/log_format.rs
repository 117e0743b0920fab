//! `--log-format json` gives log shippers one JSON object per line, errors included.

use std::process::Command;

#[test]
fn json_log_format_writes_one_json_object_per_line_with_level_and_message() {
    let missing =
        std::env::temp_dir().join(format!("hoshino-no-machine-id-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_hoshino-agent"))
        .args(["--log-format", "json", "addr", "--machine-id-file"])
        .arg(&missing)
        .env("NO_COLOR", "1")
        .output()
        .expect("run hoshino-agent");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing machine-id is a configuration error"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error record in:\n{text}"));
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "not a JSON object: {line}"
    );
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
    assert!(
        line.contains(&*missing.to_string_lossy()),
        "the record names the file: {line}"
    );
}

#[test]
fn text_log_format_is_not_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_hoshino-agent"))
        .args([
            "--log-format",
            "text",
            "addr",
            "--machine-id-file",
            "/nonexistent/machine-id",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run hoshino-agent");
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ERROR"), "{text}");
    assert!(!text.trim_start().starts_with('{'), "{text}");
}
