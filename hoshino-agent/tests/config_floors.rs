//! A typo in an interval must not become a request storm: values below a documented floor are a
//! configuration error (exit 2, naming the flag) before anything touches the kernel or S3.

use std::process::Command;

/// Runs `hoshino-agent tunnel` with a valid base configuration plus `extra`.
fn tunnel_with(extra: &[&str]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("hoshino-floors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let machine_id = dir.join("machine-id");
    std::fs::write(&machine_id, "0123456789abcdef0123456789abcdef\n").expect("machine-id");
    // In a network namespace of its own: should a floor ever regress, the agent that starts
    // creates its TUN and routes there, not in the host's namespace.
    let out = Command::new("unshare")
        .args(["--net", "--", env!("CARGO_BIN_EXE_hoshino-agent")])
        .args(["tunnel", "--bucket", "floors", "--endpoint-url"])
        // Nothing listens there; validation must refuse the value before any request.
        .arg("http://127.0.0.1:9")
        .arg("--machine-id-file")
        .arg(&machine_id)
        .arg("--state-dir")
        .arg(&dir)
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("HOSHINO_CONFIG")
        .output()
        .expect("run hoshino-agent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn intervals_and_limits_below_their_floor_exit_2_naming_the_flag() {
    for (flag, value) in [
        ("--heartbeat-min", "1us"),
        ("--idle-poll", "1us"),
        ("--s3-attempt-timeout", "0ms"),
        ("--s3-max-attempts", "0"),
        ("--bundle-max-age", "1us"),
    ] {
        let (code, text) = tunnel_with(&[flag, value]);
        assert_eq!(code, Some(2), "{flag} {value} was accepted:\n{text}");
        assert!(text.contains(flag), "the error names {flag}:\n{text}");
    }
}

#[test]
fn an_s3_timeout_shorter_than_one_attempt_is_refused() {
    let (code, text) = tunnel_with(&["--s3-attempt-timeout", "2s", "--s3-timeout", "1s"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--s3-timeout"), "{text}");
}
