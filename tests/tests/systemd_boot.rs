//! `deploy/hoshino-agent.service` with its `attach.conf` drop-in under a real systemd (Debian's
//! systemd 252 as PID 1 of its own PID, mount and cgroup namespaces, inside the test's network
//! namespace; `systemd_support`): the unit starts the agent, systemd restarts it after `kill -9`,
//! and `systemctl reload` makes it re-read the policy. Needs root, systemd
//! (`scripts/bootstrap.sh` installs it) and a built `hoshino-agent`; about 10 s.
//!
//! What stays on the host: nothing (see `systemd_support`). The unit files, `/etc/hoshino` and
//! the binary are overlaid on `/etc` and `/usr/local/bin` in the container's mount namespace only.

mod interceptor_support;
mod systemd_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hoshino_tests::binaries;
use interceptor_support::*;
use systemd_support::{Boot, Container, wait_for};

const UNIT: &str = "hoshino-agent.service";
const IAM: &str = "/latest/meta-data/iam/security-credentials/";

fn deploy_file(name: &str) -> PathBuf {
    repo_root().join("deploy").join(name)
}

/// The unit, its drop-in, `policy` and the agent in a booted container in the bed's client
/// namespace.
fn boot(bed: &MetadataBed, policy: &Path) -> Container {
    let mut boot = Boot::new(bed.client.name(), bed.scratch.path());
    boot.etc_file(&format!("systemd/system/{UNIT}"), &deploy_file(UNIT))
        .etc_file(
            "systemd/system/hoshino-agent.service.d/attach.conf",
            &deploy_file("hoshino-agent.service.d/attach.conf"),
        )
        .etc_file("hoshino/policy.toml", policy)
        .local_bin(
            "hoshino-agent",
            &binaries::agent().expect("hoshino-agent binary"),
        );
    // No bucket: `attach` without a tunnel (the policy has no tunnel rule).
    std::fs::write(
        boot.etc().join("hoshino/agent.toml"),
        "log-format = \"text\"\n",
    )
    .expect("config");
    boot.start()
}

#[test]
fn the_unit_starts_restarts_after_kill_9_and_reloads_the_policy_under_systemd() {
    let bed = MetadataBed::new();
    let container = boot(&bed, &example_policy("metadata.toml"));
    container.systemctl(&["start", UNIT]);
    container.wait_journal(UNIT, "interceptor attached", 1);
    assert_eq!(container.systemctl(&["is-active", UNIT]).trim(), "active");
    let iam = || bed.fetch(Some(1000), &format!("http://{IMDS_V4}{IAM}"));
    assert_eq!(
        iam().code,
        56,
        "the unit's agent resets a user's IAM request"
    );
    let instance = bed.fetch(
        Some(1000),
        &format!("http://{IMDS_V4}/latest/meta-data/instance-id"),
    );
    assert!(instance.ok(), "{instance:?}\n{}", container.journal(UNIT));

    let first = container.main_pid(UNIT).expect("a main pid");
    let host_pid = container
        .host_pid(UNIT, first)
        .expect("the agent's pid on the host");
    // SAFETY: SIGKILL to the agent the unit started for this test (found in the unit's cgroup,
    // checked to be the unit's main pid in the container).
    unsafe {
        libc::kill(host_pid, libc::SIGKILL);
    }
    let second = wait_for(Duration::from_secs(30), "a restarted agent", || {
        container.main_pid(UNIT).filter(|p| *p != first)
    });
    container.wait_journal(UNIT, "interceptor attached", 2);
    assert_ne!(second, first);
    assert_eq!(iam().code, 56, "the restarted agent judges again");

    std::fs::write(
        container.etc.join("hoshino/policy.toml"),
        "default = \"pass\"\n[[rule]]\nname = \"imds-all\"\ndst = [\"169.254.169.254\"]\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"allow\"\n",
    )
    .expect("new policy");
    container.systemctl(&["reload", UNIT]);
    container.wait_journal(UNIT, "policy reloaded", 1);
    let f = iam();
    assert!(
        f.ok(),
        "the reloaded policy allows: {f:?}\n{}",
        container.journal(UNIT)
    );
    assert_eq!(
        container.main_pid(UNIT),
        Some(second),
        "reloaded, not restarted"
    );
}
