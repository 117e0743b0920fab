//! `deploy/hoshino-agent.service` with its `attach.conf` drop-in under a real systemd (Debian's
//! systemd 252 as PID 1 of its own PID, mount and cgroup namespaces, inside the test's network
//! namespace): the unit starts the agent, systemd restarts it after `kill -9`, and
//! `systemctl reload` makes it re-read the policy. Needs root, systemd (`scripts/bootstrap.sh`
//! installs it) and a built `hoshino-agent`; about 10 s.
//!
//! What stays on the host: nothing. The unit files, `/etc/hoshino` and the binary are overlaid
//! on `/etc` and `/usr/local/bin` in the container's mount namespace only; `/run`, `/tmp`,
//! `/var/lib` and `/var/log` are its own tmpfs; its cgroups live in a cgroup2 subtree of the
//! test's own, removed afterwards; its bpffs and pins go away with its mount namespace.

mod interceptor_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hoshino_tests::binaries;
use hoshino_tests::command;
use hoshino_tests::process::Spawned;
use interceptor_support::*;

const UNIT: &str = "hoshino-agent.service";
const IAM: &str = "/latest/meta-data/iam/security-credentials/";
/// cgroup2 is mounted here on this machine (hybrid hierarchy); elsewhere at /sys/fs/cgroup.
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

fn deploy_file(name: &str) -> PathBuf {
    repo_root().join("deploy").join(name)
}

fn cgroup2_root() -> PathBuf {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
        .expect("a cgroup2 hierarchy")
}

/// A systemd booted as PID 1 in its own namespaces, inside a network namespace of the test.
struct Container {
    /// `ip netns exec ... unshare ...`: the parent of systemd.
    launcher: Spawned,
    /// systemd's pid as the host sees it.
    systemd: u32,
    cgroup: PathBuf,
    /// The overlay upper directory over `/etc`.
    etc: PathBuf,
}

impl Container {
    fn boot(bed: &MetadataBed, policy: &Path) -> Self {
        let root = bed.scratch.path().join("systemd");
        let etc = root.join("etc-upper");
        for dir in [
            etc.join("hoshino"),
            etc.join("systemd/system/hoshino-agent.service.d"),
            root.join("etc-work"),
            root.join("bin-upper"),
            root.join("bin-work"),
        ] {
            std::fs::create_dir_all(&dir).expect("staging directory");
        }
        let copy = |from: PathBuf, to: PathBuf| {
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
        };
        copy(deploy_file(UNIT), etc.join("systemd/system").join(UNIT));
        copy(
            deploy_file("hoshino-agent.service.d/attach.conf"),
            etc.join("systemd/system/hoshino-agent.service.d/attach.conf"),
        );
        copy(policy.to_path_buf(), etc.join("hoshino/policy.toml"));
        // No bucket: `attach` without a tunnel (the policy has no tunnel rule).
        std::fs::write(etc.join("hoshino/agent.toml"), "log-format = \"text\"\n").expect("config");
        std::fs::write(root.join("bin-upper/hoshino-agent"), b"").expect("mount point");

        let agent = binaries::agent().expect("hoshino-agent binary");
        let inner = root.join("init.sh");
        std::fs::write(
            &inner,
            format!(
                r#"#!/bin/sh
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/etc,upperdir={r}/etc-upper,workdir={r}/etc-work /etc
mount -t overlay overlay -o lowerdir=/usr/local/bin,upperdir={r}/bin-upper,workdir={r}/bin-work /usr/local/bin
mount --bind {agent} /usr/local/bin/hoshino-agent
mount -t proc proc /proc
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for d in /run /tmp /var/lib /var/log; do mount -t tmpfs tmpfs $d; done
# What a host's boot provides and a bare namespace lacks: bpffs (systemd mounts it at boot, not
# in a container) and udev's world-accessible /dev/net/tun (this machine has no udev: 0600).
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs -o mode=0755 tmpfs /dev/net
mknod -m 0666 /dev/net/tun c 10 200
exec env container=hoshino-test /usr/lib/systemd/systemd --system --unit=basic.target --log-target=console
"#,
                r = root.display(),
                agent = agent.display(),
            ),
        )
        .expect("init script");

        let cgroup = cgroup2_root().join(format!("hoshino-test-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup).expect("container cgroup");
        let log = std::fs::File::create(root.join("console.log")).expect("console log");
        // The shell enters the cgroup first (through the host's /sys: `ip netns exec` mounts a
        // fresh sysfs without cgroup mounts); systemd's cgroup namespace is rooted there.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {cg}/cgroup.procs && exec ip netns exec {ns} unshare --mount --pid --fork --uts --ipc unshare --cgroup sh {inner}",
                cg = cgroup.display(),
                ns = bed.client.name(),
                inner = inner.display(),
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start the container");
        let mut launcher = Spawned::new("systemd container", child);
        let systemd = wait_for(Duration::from_secs(20), "systemd as pid 1", || {
            if let Some(status) = launcher.try_status() {
                panic!(
                    "the container exited with {status}:\n{}",
                    std::fs::read_to_string(root.join("console.log")).unwrap_or_default()
                );
            }
            child_of(launcher.pid()).filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            })
        });
        let container = Self {
            launcher,
            systemd,
            cgroup,
            etc,
        };
        wait_for(Duration::from_secs(60), "systemd running", || {
            let state = container.systemctl(&["is-system-running"]);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        container
    }

    /// `cmd args` inside the container (its mount and pid namespaces); stdout.
    fn run(&self, cmd: &str, args: &[&str]) -> String {
        let pid = self.systemd.to_string();
        let out = command::output(
            Command::new("nsenter")
                .args(["-t", &pid, "-m", "-p", "-n", "--", cmd])
                .args(args),
        )
        .expect("nsenter runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let mut all = vec!["--no-pager"];
        all.extend_from_slice(args);
        self.run("systemctl", &all)
    }

    fn main_pid(&self) -> Option<u32> {
        self.systemctl(&["show", "-p", "MainPID", "--value", UNIT])
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    /// The host pid of the unit's process whose pid in the container is `inner`: read from the
    /// unit's cgroup (host pids) and matched on the last `NSpid` field.
    fn host_pid(&self, inner: u32) -> Option<libc::pid_t> {
        let procs = self
            .cgroup
            .join("system.slice")
            .join(UNIT)
            .join("cgroup.procs");
        let text = std::fs::read_to_string(procs).ok()?;
        text.split_whitespace().find_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            let last: u32 = nspid.split_whitespace().last()?.parse().ok()?;
            (last == inner).then(|| pid.parse().ok()).flatten()
        })
    }

    fn journal(&self) -> String {
        self.run("journalctl", &["--no-pager", "-o", "cat", "-u", UNIT])
    }

    fn wait_journal(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.journal().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "`{needle}` x{count} not in the unit's journal within 60 s:\n{}\n{}",
                self.systemctl(&["status", UNIT]),
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.systemctl(&["stop", UNIT]);
        // SIGRTMIN+4: systemd in a container powers off.
        // SAFETY: kill(2) on the systemd this test started.
        unsafe {
            libc::kill(self.systemd as libc::pid_t, libc::SIGRTMIN() + 4);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.launcher.try_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.launcher.try_status().is_none() {
            // SAFETY: as above; killing PID 1 of the namespace ends every process in it.
            unsafe {
                libc::kill(self.systemd as libc::pid_t, libc::SIGKILL);
            }
            let _ = self.launcher.kill(Duration::from_secs(10));
        }
        remove_cgroup_tree(&self.cgroup);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The first child of `pid`, if any.
fn child_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_unit_starts_restarts_after_kill_9_and_reloads_the_policy_under_systemd() {
    let bed = MetadataBed::new();
    let container = Container::boot(&bed, &example_policy("metadata.toml"));
    container.systemctl(&["start", UNIT]);
    container.wait_journal("interceptor attached", 1);
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
    assert!(instance.ok(), "{instance:?}\n{}", container.journal());

    let first = container.main_pid().expect("a main pid");
    let host_pid = container
        .host_pid(first)
        .expect("the agent's pid on the host");
    // SAFETY: SIGKILL to the agent the unit started for this test (found in the unit's cgroup,
    // checked to be the unit's main pid in the container).
    unsafe {
        libc::kill(host_pid, libc::SIGKILL);
    }
    let second = wait_for(Duration::from_secs(30), "a restarted agent", || {
        container.main_pid().filter(|p| *p != first)
    });
    container.wait_journal("interceptor attached", 2);
    assert_ne!(second, first);
    assert_eq!(iam().code, 56, "the restarted agent judges again");

    std::fs::write(
        container.etc.join("hoshino/policy.toml"),
        "default = \"pass\"\n[[rule]]\nname = \"imds-all\"\ndst = [\"169.254.169.254\"]\nprotocol = \"tcp\"\ndport = 80\naction = \"divert\"\n[rule.http]\ndefault = \"allow\"\n",
    )
    .expect("new policy");
    container.systemctl(&["reload", UNIT]);
    container.wait_journal("policy reloaded", 1);
    let f = iam();
    assert!(
        f.ok(),
        "the reloaded policy allows: {f:?}\n{}",
        container.journal()
    );
    assert_eq!(
        container.main_pid(),
        Some(second),
        "reloaded, not restarted"
    );
}
