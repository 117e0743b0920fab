//! Shared by the tests that run things under a real systemd: Debian's systemd 252 booted as PID 1
//! of its own PID, mount, UTS, IPC and cgroup namespaces, inside a network namespace of the test.
//!
//! What stays on the host: nothing. Files for `/etc` go into an overlay upper directory, binaries
//! for `/usr/local/bin` are bind-mounted over an overlay, read-only layers (`Boot::layer`) are
//! overlays in the container's mount namespace only; `/run`, `/tmp`, `/var/lib` and `/var/log`
//! are its own tmpfs, except that the test's scratch directory keeps its path inside, so
//! processes in the container see the files the test prepared; its cgroups live in a cgroup2
//! subtree of the test's own, removed afterwards; its bpffs and pins go away with its mount
//! namespace. Needs root and systemd (`scripts/bootstrap.sh` installs it).

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hoshino_tests::command;
use hoshino_tests::process::Spawned;

/// cgroup2 is mounted here on this machine (hybrid hierarchy); elsewhere at /sys/fs/cgroup.
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
const SYSTEMD: &str = "/usr/lib/systemd/systemd";

fn cgroup2_root() -> PathBuf {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
        .expect("a cgroup2 hierarchy")
}

/// What a container is booted with; `start` boots it.
pub struct Boot {
    netns: String,
    /// The test's scratch directory: visible at the same path inside.
    scratch: PathBuf,
    /// Staging under `scratch`: overlay directories, the init script, the console log.
    root: PathBuf,
    local_bins: Vec<(String, PathBuf)>,
    layers: Vec<(PathBuf, PathBuf)>,
}

impl Boot {
    /// A container in network namespace `netns`, staged under `scratch`.
    pub fn new(netns: &str, scratch: &Path) -> Self {
        let root = scratch.join("systemd");
        for dir in ["etc-upper", "etc-work", "bin-upper", "bin-work"] {
            std::fs::create_dir_all(root.join(dir)).expect("staging directory");
        }
        Self {
            netns: netns.to_owned(),
            scratch: scratch.to_owned(),
            root,
            local_bins: Vec::new(),
            layers: Vec::new(),
        }
    }

    /// The container's `/etc` as the host writes it: files put here before and after boot are
    /// what the container reads (the overlay's upper directory).
    pub fn etc(&self) -> PathBuf {
        self.root.join("etc-upper")
    }

    /// Copies the host file `from` to `/etc/<to>` in the container.
    pub fn etc_file(&mut self, to: &str, from: &Path) -> &mut Self {
        let dest = self.etc().join(to);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).expect("etc directory");
        }
        std::fs::copy(from, &dest)
            .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), dest.display()));
        self
    }

    /// The host binary `from` as `/usr/local/bin/<name>` in the container.
    pub fn local_bin(&mut self, name: &str, from: &Path) -> &mut Self {
        std::fs::write(self.root.join("bin-upper").join(name), b"").expect("mount point");
        self.local_bins.push((name.to_owned(), from.to_owned()));
        self
    }

    /// The files under host directory `from` appear in container directory `onto`, over what
    /// is there (a read-only overlay; later layers go over earlier ones).
    pub fn layer(&mut self, from: &Path, onto: &str) -> &mut Self {
        assert!(from.is_dir(), "layer {} is not a directory", from.display());
        self.layers.push((from.to_owned(), PathBuf::from(onto)));
        self
    }

    fn init_script(&self) -> String {
        let r = self.root.display();
        let mut s = String::from("#!/bin/sh\nset -e\nmount --make-rprivate /\n");
        // Layers first: one over /usr must not hide the /usr/local/bin overlay below.
        for (from, onto) in &self.layers {
            s += &format!(
                "mount -t overlay overlay -o lowerdir={}:{o} {o}\n",
                from.display(),
                o = onto.display()
            );
        }
        s += &format!(
            "mount -t overlay overlay -o lowerdir=/etc,upperdir={r}/etc-upper,workdir={r}/etc-work /etc\n\
             mount -t overlay overlay -o lowerdir=/usr/local/bin,upperdir={r}/bin-upper,workdir={r}/bin-work /usr/local/bin\n"
        );
        for (name, from) in &self.local_bins {
            s += &format!("mount --bind {} /usr/local/bin/{name}\n", from.display());
        }
        s += &format!(
            r#"mount -t proc proc /proc
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
# The scratch directory (under /tmp, usually) survives the tmpfs mounts below at its own path.
mkdir /run/hoshino-scratch
mount --bind {scratch} /run/hoshino-scratch
for d in /tmp /var/lib /var/log; do mount -t tmpfs tmpfs $d; done
mkdir -p {scratch}
mount --move /run/hoshino-scratch {scratch}
rmdir /run/hoshino-scratch
# What a host's boot provides and a bare namespace lacks: bpffs (systemd mounts it at boot, not
# in a container) and udev's world-accessible /dev/net/tun (this machine has no udev: 0600).
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs -o mode=0755 tmpfs /dev/net
mknod -m 0666 /dev/net/tun c 10 200
exec env container=hoshino-test {SYSTEMD} --system --unit=basic.target --log-target=console
"#,
            scratch = self.scratch.display(),
        );
        s
    }

    /// Boots systemd and waits until it is running (or degraded).
    pub fn start(&self) -> Container {
        assert!(
            Path::new(SYSTEMD).exists(),
            "{SYSTEMD} is missing: scripts/bootstrap.sh installs systemd"
        );
        let inner = self.root.join("init.sh");
        std::fs::write(&inner, self.init_script()).expect("init script");
        let cgroup = cgroup2_root().join(format!(
            "hoshino-test-{}-{}",
            std::process::id(),
            self.netns
        ));
        std::fs::create_dir_all(&cgroup).expect("container cgroup");
        let console = self.root.join("console.log");
        let log = std::fs::File::create(&console).expect("console log");
        // The shell enters the cgroup first (through the host's /sys: `ip netns exec` mounts a
        // fresh sysfs without cgroup mounts); systemd's cgroup namespace is rooted there.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {cg}/cgroup.procs && exec ip netns exec {ns} unshare --mount --pid --fork --uts --ipc unshare --cgroup sh {inner}",
                cg = cgroup.display(),
                ns = self.netns,
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
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            child_of(launcher.pid()).filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            })
        });
        let container = Container {
            launcher,
            systemd,
            cgroup,
            etc: self.etc(),
        };
        wait_for(Duration::from_secs(60), "systemd running", || {
            let state = container.systemctl(&["is-system-running"]);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        container
    }
}

/// A systemd booted as PID 1 in its own namespaces, inside a network namespace of the test.
/// Dropping it powers it off (everything in its PID namespace ends with it).
pub struct Container {
    /// `ip netns exec ... unshare ...`: the parent of systemd.
    launcher: Spawned,
    /// systemd's pid as the host sees it.
    systemd: u32,
    cgroup: PathBuf,
    /// The overlay upper directory over `/etc`.
    pub etc: PathBuf,
}

impl Container {
    /// `cmd args` inside the container (its mount, pid and network namespaces); exit status and
    /// output, whatever the status.
    pub fn output(&self, cmd: &str, args: &[&str]) -> Output {
        let pid = self.systemd.to_string();
        command::output(
            Command::new("nsenter")
                .args(["-t", &pid, "-m", "-p", "-n", "--", cmd])
                .args(args),
        )
        .expect("nsenter runs")
    }

    /// As `output`; stdout.
    pub fn run(&self, cmd: &str, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.output(cmd, args).stdout).into_owned()
    }

    /// A command that execs `program` in the container's mount and network namespaces (it sees
    /// the container's `/run`, its D-Bus and its services) but stays in the host's PID
    /// namespace, so the child's pid is the program's and signals by pid reach it. For
    /// processes the test starts and stops itself.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.systemd.to_string(), "-m", "-n", "--"])
            .arg(program);
        cmd
    }

    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut all = vec!["--no-pager"];
        all.extend_from_slice(args);
        self.run("systemctl", &all)
    }

    pub fn main_pid(&self, unit: &str) -> Option<u32> {
        self.systemctl(&["show", "-p", "MainPID", "--value", unit])
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    /// The host pid of `unit`'s process whose pid in the container is `inner`: read from the
    /// unit's cgroup (host pids) and matched on the last `NSpid` field.
    pub fn host_pid(&self, unit: &str, inner: u32) -> Option<libc::pid_t> {
        let procs = self
            .cgroup
            .join("system.slice")
            .join(unit)
            .join("cgroup.procs");
        let text = std::fs::read_to_string(procs).ok()?;
        text.split_whitespace().find_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            let last: u32 = nspid.split_whitespace().last()?.parse().ok()?;
            (last == inner).then(|| pid.parse().ok()).flatten()
        })
    }

    pub fn journal(&self, unit: &str) -> String {
        self.run("journalctl", &["--no-pager", "-o", "cat", "-u", unit])
    }

    /// Waits up to 60 s until `needle` is in `unit`'s journal `count` times.
    pub fn wait_journal(&self, unit: &str, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.journal(unit).matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "`{needle}` x{count} not in {unit}'s journal within 60 s:\n{}\n{}",
                self.systemctl(&["status", unit]),
                self.journal(unit)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
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

/// Polls `probe` every 200 ms until it gives a value; panics naming `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `path` under the repository root.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Where `scripts/bootstrap.sh` unpacks Debian's systemd-resolved package (never installed on
/// the host: its maintainer scripts would take over the host's /etc/resolv.conf), one
/// directory per version.
pub const RESOLVED_CACHE: &str = "/var/cache/hoshino/systemd-resolved";

/// The unpacked systemd-resolved matching the installed systemd (the package depends on exactly
/// that version of libsystemd-shared); `HOSHINO_RESOLVED_ROOT` overrides.
pub fn resolved_root() -> PathBuf {
    if let Some(root) = std::env::var_os("HOSHINO_RESOLVED_ROOT") {
        return PathBuf::from(root);
    }
    let version = command::run(Command::new("dpkg-query").args(["-W", "-f=${Version}", "systemd"]))
        .unwrap_or_else(|e| panic!("which systemd is installed: {e}"));
    let root = Path::new(RESOLVED_CACHE).join(version.trim()).join("root");
    assert!(
        root.join("lib/systemd/systemd-resolved").exists(),
        "systemd-resolved {} is not unpacked at {}: run scripts/bootstrap.sh",
        version.trim(),
        root.display()
    );
    root
}
