//! `deploy/hoshino-agent.service` and its `attach.conf` drop-in: systemd accepts them
//! (`systemd-analyze verify`, which reports unknown keys and bad values), and the directives that
//! make the agent a least-privilege service are there with the intended values.

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALLED_BINARY: &str = "/usr/local/bin/hoshino-agent";

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `(section, key, value)` for every assignment, in file order (systemd semantics: a key may
/// repeat; an empty value resets the list).
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not `key=value`: {line}"));
        out.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    out
}

/// The values of `key` in `section` after systemd's list semantics (empty assignment resets).
fn values(directives: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    let mut acc: Vec<String> = Vec::new();
    for (s, k, v) in directives {
        if s == section && k == key {
            if v.is_empty() {
                acc.clear();
            } else {
                acc.push(v.clone());
            }
        }
    }
    acc
}

fn one(directives: &[(String, String, String)], section: &str, key: &str) -> String {
    let v = values(directives, section, key);
    assert_eq!(
        v.len(),
        1,
        "[{section}] {key}= set {} times: {v:?}",
        v.len()
    );
    v.into_iter().next().unwrap_or_default()
}

fn words(directives: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    let mut w: Vec<String> = values(directives, section, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect();
    w.sort();
    w
}

/// Copies the unit (and optionally the drop-in) into a scratch unit directory with the binary
/// path pointed at an existing executable (verify checks that ExecStart's file exists) and runs
/// `systemd-analyze verify` on it; any message on stderr is a failure.
fn verify(with_drop_in: bool) {
    let analyze = which("systemd-analyze").unwrap_or_else(|| {
        panic!("systemd-analyze not found (scripts/bootstrap.sh installs systemd)")
    });
    let scratch = std::env::temp_dir().join(format!(
        "hoshino-unit-{}-{}",
        std::process::id(),
        with_drop_in
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    let drop_in_dir = scratch.join("hoshino-agent.service.d");
    std::fs::create_dir_all(&drop_in_dir)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}", drop_in_dir.display()));
    let stand_in = which("true").unwrap_or_else(|| panic!("no `true` executable on PATH"));
    let stand_in = stand_in.to_string_lossy();
    let unit =
        read(&deploy_dir().join("hoshino-agent.service")).replace(INSTALLED_BINARY, &stand_in);
    std::fs::write(scratch.join("hoshino-agent.service"), unit)
        .unwrap_or_else(|e| panic!("write unit: {e}"));
    if with_drop_in {
        let conf = read(&deploy_dir().join("hoshino-agent.service.d/attach.conf"))
            .replace(INSTALLED_BINARY, &stand_in);
        std::fs::write(drop_in_dir.join("attach.conf"), conf)
            .unwrap_or_else(|e| panic!("write drop-in: {e}"));
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(scratch.join("hoshino-agent.service"))
        // The scratch directory first, then the defaults (the trailing colon), so the drop-in
        // directory beside the unit is read and network-online.target resolves.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", scratch.display()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze: {e}"));
    let _ = std::fs::remove_dir_all(&scratch);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify (drop-in: {with_drop_in}) failed ({}):\n{stderr}",
        out.status
    );
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    verify(false);
}

#[test]
fn unit_with_attach_drop_in_passes_systemd_analyze_verify() {
    verify(true);
}

#[test]
fn unit_runs_the_tunnel_unprivileged_with_only_net_admin_after_the_network_is_online() {
    let d = directives(&read(&deploy_dir().join("hoshino-agent.service")));
    assert!(words(&d, "Unit", "After").contains(&"network-online.target".to_owned()));
    assert!(words(&d, "Unit", "Wants").contains(&"network-online.target".to_owned()));
    let exec = one(&d, "Service", "ExecStart");
    assert_eq!(
        exec,
        format!("{INSTALLED_BINARY} --config /etc/hoshino/agent.toml tunnel")
    );
    assert_eq!(one(&d, "Service", "Restart"), "on-failure");
    assert_eq!(one(&d, "Service", "RestartPreventExitStatus"), "2");
    assert_eq!(
        words(&d, "Service", "AmbientCapabilities"),
        ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(
        words(&d, "Service", "CapabilityBoundingSet"),
        ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(one(&d, "Service", "DynamicUser"), "yes");
    assert!(
        values(&d, "Service", "User").is_empty(),
        "runs as a dynamic user, not a named one"
    );
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "/dev/net/tun rw"),
        ("EnvironmentFile", "-/etc/hoshino/agent.env"),
        // The default --state-dir, writable despite ProtectSystem=strict.
        ("StateDirectory", "hoshino"),
    ] {
        assert_eq!(one(&d, "Service", key), want, "[Service] {key}=");
    }
    assert_eq!(one(&d, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn attach_drop_in_adds_bpf_perfmon_and_raw_sockets_and_runs_attach_instead_of_tunnel() {
    let mut d = directives(&read(&deploy_dir().join("hoshino-agent.service")));
    d.extend(directives(&read(
        &deploy_dir().join("hoshino-agent.service.d/attach.conf"),
    )));
    let exec = one(&d, "Service", "ExecStart");
    assert!(
        exec.starts_with(&format!(
            "{INSTALLED_BINARY} --config /etc/hoshino/agent.toml attach --interface "
        )) && exec.ends_with(" --policy /etc/hoshino/policy.toml"),
        "drop-in ExecStart: {exec}"
    );
    let caps = [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_PERFMON",
    ];
    // The drop-in's lines add to the unit's; the union must still be exactly these five.
    let mut ambient = words(&d, "Service", "AmbientCapabilities");
    ambient.dedup();
    let mut bounding = words(&d, "Service", "CapabilityBoundingSet");
    bounding.dedup();
    assert_eq!(ambient, caps);
    assert_eq!(bounding, caps);
    assert!(words(&d, "Service", "SystemCallFilter").contains(&"bpf".to_owned()));
    assert_eq!(one(&d, "Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
}
