//! The classifier attached with TCX to a veth in network namespaces this test creates: real
//! traffic is dropped or passed by rule (including by the sending user), and a SIGKILLed
//! attaching process leaves no filter or link behind. Needs root.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::UdpSocket,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use hoshino_agent::interceptor::{
    Adoption, AttachMode, Classifier, ClassifierOptions, Direction, detach_pinned,
};
use hoshino_agent::policy::{CompiledPolicy, compile_text};

const ADDR_A: &str = "10.77.0.1";
const ADDR_B: &str = "10.77.0.2";
const ADDR6_A: &str = "fd77::1";
const ADDR6_B: &str = "fd77::2";
const UDP_PORT: u16 = 5555;
const CHILD_ENV: &str = "HOSHINO_TEST_ATTACH_CHILD";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair (`va` in A, `vb` in B); deleted on drop, even on panic.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let pair = Self {
            a: format!("hs-{pid}-{n}-clsa"),
            b: format!("hs-{pid}-{n}-clsb"),
        };
        must(&["ip", "netns", "add", &pair.a]);
        must(&["ip", "netns", "add", &pair.b]);
        must(&[
            "ip", "-n", &pair.a, "link", "add", "va", "type", "veth", "peer", "name", "vb",
            "netns", &pair.b,
        ]);
        for (ns, dev, v4, v6) in [
            (&pair.a, "va", ADDR_A, ADDR6_A),
            (&pair.b, "vb", ADDR_B, ADDR6_B),
        ] {
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn ping(&self, addr: &str) -> bool {
        sh(&["ip", "netns", "exec", &self.a, "ping", "-c1", "-W1", addr])
            .status
            .success()
    }

    /// Sends one UDP datagram from namespace A to B's `port` as `uid` (via setpriv + bash).
    fn send_udp_as(&self, uid: u32, port: u16, payload: &str) {
        let script = format!("echo {payload} > /dev/udp/{ADDR_B}/{port}");
        must(&[
            "ip",
            "netns",
            "exec",
            &self.a,
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "bash",
            "-c",
            &script,
        ]);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

/// Collects UDP payloads arriving at B's `port` until [`UdpReceiver::finish`].
struct UdpReceiver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<Vec<String>>,
}

impl UdpReceiver {
    fn spawn(ns: &str, port: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = format!("/var/run/netns/{ns}");
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                enter_netns(&path);
                let socket = UdpSocket::bind((ADDR_B, port)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                bound_tx.send(()).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        got.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
                    }
                }
                got
            })
        };
        bound_rx.recv().unwrap();
        Self { stop, thread }
    }

    /// Waits a moment for datagrams in flight, then returns what arrived.
    fn finish(self) -> Vec<String> {
        thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: plain setns on a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// The test policy through the production compiler, as an operator's policy file goes.
fn test_policy() -> CompiledPolicy {
    let text = format!(
        r#"
default = "pass"
[[rule]]
name = "icmp-to-b"
dst = ["{ADDR_B}"]
protocol = "icmp"
action = "drop"
[[rule]]
name = "udp-root"
protocol = "udp"
dport = {UDP_PORT}
uid = 0
action = "pass"
[[rule]]
name = "udp-others"
protocol = "udp"
dport = {UDP_PORT}
action = "drop"
"#
    );
    compile_text("attach-test.toml", &text).unwrap_or_else(|e| panic!("{e}"))
}

/// TCX programs attached at egress of `dev` in namespace `ns`.
fn tcx_programs(ns: &str, dev: &'static str) -> usize {
    in_netns(ns, move || {
        SchedClassifier::query_tcx(dev, TcAttachType::Egress)
            .map(|(_, programs)| programs.len())
            .unwrap_or_else(|e| panic!("query_tcx {dev}: {e}"))
    })
}

fn tc_filters(ns: &str, dev: &str) -> String {
    let out = sh(&["tc", "-n", ns, "filter", "show", "dev", dev, "egress"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tcx_attached_classifier_drops_and_passes_real_traffic_by_rule_and_user() {
    let pair = Pair::new();
    let receiver = UdpReceiver::spawn(&pair.b, UDP_PORT);
    assert!(pair.ping(ADDR_B), "baseline ping must work");

    let a = pair.a.clone();
    let (mode, stats) = {
        let path = format!("/var/run/netns/{a}");
        let (to_test, from_main) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = thread::spawn(move || {
            enter_netns(&path);
            let mut classifier = Classifier::load(&ClassifierOptions::default()).unwrap();
            classifier.install(&test_policy()).unwrap();
            let mode = classifier.attach("va", Direction::Egress).unwrap();
            ready_tx.send(mode).unwrap();
            from_main.recv().unwrap();
            let stats = classifier.rule_stats().unwrap();
            classifier.detach().unwrap();
            stats
        });
        let mode = ready_rx.recv().unwrap();
        assert!(!pair.ping(ADDR_B), "ICMP to B must be dropped");
        assert!(pair.ping(ADDR6_B), "ICMPv6 to B falls to the default pass");
        pair.send_udp_as(0, UDP_PORT, "from-root");
        pair.send_udp_as(1000, UDP_PORT, "from-user");
        to_test.send(()).unwrap();
        (mode, worker.join().unwrap())
    };
    assert_eq!(mode, AttachMode::Tcx);
    let got = receiver.finish();
    assert_eq!(got, ["from-root"], "only root's datagram may arrive");
    let count = |name: &str| {
        stats
            .iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.packets)
    };
    assert!(count("icmp-to-b") >= 1, "{stats:?}");
    assert_eq!(count("udp-root"), 1, "{stats:?}");
    assert_eq!(count("udp-others"), 1, "{stats:?}");
    assert!(count("default") >= 1, "{stats:?}");
    assert!(pair.ping(ADDR_B), "after detach ICMP passes again");
    assert_eq!(tcx_programs(&pair.a, "va"), 0);
}

#[test]
fn sigkilled_attaching_process_leaves_no_filter_or_link() {
    let pair = Pair::new();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "attach_and_wait_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &pair.a)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "child never attached");
        match lines.next() {
            Some(Ok(line)) if line.contains("ATTACHED") => break,
            Some(Ok(_)) => {}
            other => {
                let _ = child.kill();
                panic!("child ended before attaching: {other:?}");
            }
        }
    }
    assert_eq!(tcx_programs(&pair.a, "va"), 1);
    assert!(!pair.ping(ADDR_B), "the child's classifier drops ICMP");

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The kernel releases the link when the last fd closes; that is synchronous with exit, but
    // allow a moment for the process teardown.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcx_programs(&pair.a, "va") != 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tcx_programs(&pair.a, "va"),
        0,
        "a TCX link survived kill -9"
    );
    assert_eq!(
        tc_filters(&pair.a, "va"),
        "",
        "a tc filter survived kill -9"
    );
    assert!(pair.ping(ADDR_B), "traffic flows again after kill -9");
}

const TUNNEL_PORT: u16 = 6666;
const REINJECT_MARK: u32 = 0x4853;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates TUN `name` (IFF_TUN | IFF_NO_PI) in the calling thread's namespace.
fn open_tun(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: a zeroed ifreq is valid; the name is short and NUL-terminated by the zeroing.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: valid fd and ifreq for TUNSETIFF.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file
}

/// Reads packets from `tun` until one is an IPv4 UDP datagram to `port`, or `timeout` passes.
fn read_udp_from_tun(tun: &mut File, port: u16, timeout: Duration) -> Vec<Vec<u8>> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let mut found = Vec::new();
    while Instant::now() < deadline {
        let mut pollfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 200) };
        if ready <= 0 {
            continue;
        }
        let mut buf = vec![0u8; 2048];
        let n = tun.read(&mut buf).expect("read tun");
        buf.truncate(n);
        let is_match = buf.first().is_some_and(|b| b >> 4 == 4)
            && buf.get(9) == Some(&17)
            && buf.get(22..24) == Some(&port.to_be_bytes()[..]);
        if is_match {
            found.push(buf);
        }
    }
    found
}

#[test]
fn divert_verdict_redirects_into_a_tun_records_uids_and_reinjected_packets_bypass() {
    let pair = Pair::new();
    let receiver = UdpReceiver::spawn(&pair.b, TUNNEL_PORT);
    let a = pair.a.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = thread::spawn(move || {
        enter_netns(&format!("/var/run/netns/{a}"));
        let mut tun = open_tun("hst0");
        must(&["ip", "-n", &a, "link", "set", "hst0", "up"]);
        let tun_ifindex = unsafe { libc::if_nametoindex(c"hst0".as_ptr()) };
        assert_ne!(tun_ifindex, 0);
        let mut classifier = Classifier::load(&ClassifierOptions {
            tunnel_ifindex: 0,
            divert_ifindex: tun_ifindex,
            reinject_mark: REINJECT_MARK,
            log_verdicts: true,
        })
        .unwrap();
        let to_tun = format!(
            "[[rule]]\nname = \"to-tun\"\ndst = [\"{ADDR_B}\"]\nprotocol = \"udp\"\ndport = {TUNNEL_PORT}\naction = \"divert\"\n"
        );
        classifier
            .install(&compile_text("to-tun.toml", &to_tun).unwrap_or_else(|e| panic!("{e}")))
            .unwrap();
        classifier.attach("va", Direction::Egress).unwrap();

        // Root's datagram from this thread, a marked (reinjected) one, then uid 1000's.
        let socket = UdpSocket::bind((ADDR_A, 0)).unwrap();
        socket.send_to(b"root", (ADDR_B, TUNNEL_PORT)).unwrap();
        let marked = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        marked.set_mark(REINJECT_MARK).unwrap();
        let dst: std::net::SocketAddr =
            (ADDR_B.parse::<std::net::IpAddr>().unwrap(), TUNNEL_PORT).into();
        marked.send_to(b"reinjected", &dst.into()).unwrap();
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let packets = read_udp_from_tun(&mut tun, TUNNEL_PORT, Duration::from_secs(2));
        let flows = classifier.flows().unwrap();
        let stats = classifier.rule_stats().unwrap();
        (packets, flows, stats)
    });
    ready_rx.recv().unwrap();
    pair.send_udp_as(1000, TUNNEL_PORT, "user");
    go_tx.send(()).unwrap();
    let (packets, flows, stats) = worker.join().unwrap();

    let received = receiver.finish();
    assert_eq!(
        packets.len(),
        2,
        "root's and uid 1000's datagrams reach the TUN"
    );
    assert!(
        packets
            .iter()
            .all(|p| p.get(16..20) == Some(&[10, 77, 0, 2][..]))
    );
    let mut uids: Vec<u32> = flows
        .iter()
        .filter(|(k, _)| k.dst_port == TUNNEL_PORT)
        .map(|(_, v)| v.uid)
        .collect();
    uids.sort_unstable();
    assert_eq!(uids, [0, 1000]);
    assert_eq!(stats.first().map(|r| r.packets), Some(2), "{stats:?}");
    assert_eq!(
        received,
        ["reinjected"],
        "only the marked datagram continues to B"
    );
}

/// Helper process for `sigkilled_attaching_process_leaves_no_filter_or_link`: attaches in the namespace named by `CHILD_ENV`, prints
/// ATTACHED and waits to be killed. Does nothing when run without it.
#[test]
#[ignore = "helper process of sigkilled_attaching_process_leaves_no_filter_or_link"]
fn attach_and_wait_child() {
    let Ok(ns) = std::env::var(CHILD_ENV) else {
        return;
    };
    enter_netns(&format!("/var/run/netns/{ns}"));
    let mut classifier = Classifier::load(&ClassifierOptions::default()).unwrap();
    classifier.install(&test_policy()).unwrap();
    assert_eq!(
        classifier.attach("va", Direction::Egress).unwrap(),
        AttachMode::Tcx
    );
    println!("ATTACHED");
    thread::sleep(Duration::from_secs(120));
    drop(classifier);
}

/// The path for kernels without TCX: a clsact filter classifies the same traffic, shows up in
/// `tc filter show`, and is gone after detach (a netlink filter would otherwise outlive us).
#[test]
fn clsact_filter_classifies_real_traffic_and_is_removed_on_detach() {
    let pair = Pair::new();
    assert!(pair.ping(ADDR_B), "baseline ping must work");
    let a = pair.a.clone();
    let path = format!("/var/run/netns/{a}");
    let (to_test, from_main) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = thread::spawn(move || {
        enter_netns(&path);
        let mut classifier = Classifier::load(&ClassifierOptions::default()).unwrap();
        classifier.install(&test_policy()).unwrap();
        let mode = classifier.attach_clsact("va", Direction::Egress).unwrap();
        ready_tx.send(mode).unwrap();
        from_main.recv().unwrap();
        classifier.detach().unwrap();
        // The qdisc was added by this classifier, so it is ours to remove (as `attach` does).
        assert_eq!(classifier.created_clsact(), ["va"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let netlink = hoshino_agent::edge::netlink::Netlink::connect().unwrap();
            let ifindex = netlink.link_index("va").await.unwrap().unwrap();
            netlink.remove_clsact("va", ifindex).await.unwrap();
        });
    });
    let mode = ready_rx.recv().unwrap();
    assert_eq!(mode, AttachMode::Netlink);
    assert_eq!(tcx_programs(&pair.a, "va"), 0, "no TCX link on this path");
    assert!(
        tc_filters(&pair.a, "va").contains("bpf"),
        "a clsact bpf filter is installed"
    );
    assert!(
        !pair.ping(ADDR_B),
        "ICMP to B must be dropped by the filter"
    );
    assert!(pair.ping(ADDR6_B), "ICMPv6 to B falls to the default pass");
    to_test.send(()).unwrap();
    worker.join().unwrap();
    assert!(
        !tc_filters(&pair.a, "va").contains("bpf"),
        "detach removes the filter"
    );
    let qdiscs = sh(&["tc", "-n", &pair.a, "qdisc", "show", "dev", "va"]);
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        !qdiscs.contains("clsact"),
        "the qdisc we added is gone: {qdiscs}"
    );
    assert!(pair.ping(ADDR_B), "after detach ICMP passes again");
}

const PINNED_CHILD_ENV: &str = "HOSHINO_TEST_PINNED_CHILD";

/// A pin root of this test under /sys/fs/bpf (the library mounts bpffs there if needed),
/// removed on drop.
struct PinRoot(std::path::PathBuf);

impl PinRoot {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/hoshino-test-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pinned_attachment_outlives_a_sigkilled_process_is_adopted_and_detached() {
    let pair = Pair::new();
    let root = PinRoot::new();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "attach_pinned_and_wait_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &pair.a)
        .env(PINNED_CHILD_ENV, &root.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("ATTACHED") => break,
            Some(Ok(_)) => {}
            other => {
                let _ = child.kill();
                panic!("child ended before attaching: {other:?}");
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(
        tcx_programs(&pair.a, "va"),
        1,
        "still attached after kill -9"
    );
    assert!(root.0.join("va/link").exists());
    assert!(!pair.ping(ADDR_B), "its in-kernel drop rule keeps working");

    let a = pair.a.clone();
    let dir = root.0.clone();
    let adoption = in_netns(&pair.a, move || {
        let mut classifier =
            Classifier::load_pinned(&ClassifierOptions::default(), &dir, "va", Direction::Egress)
                .unwrap();
        let adoption = classifier.adoption();
        classifier.install(&test_policy()).unwrap();
        classifier.attach("va", Direction::Egress).unwrap();
        let programs = tcx_programs(&a, "va");
        drop(classifier); // a pinned classifier stays attached when dropped
        (adoption, programs, tcx_programs(&a, "va"))
    });
    assert_eq!(adoption.0, Some(Adoption::Adopted));
    assert_eq!(
        adoption.1, 1,
        "adopted: swapped into the link, no second program"
    );
    assert_eq!(
        adoption.2, 1,
        "dropping a pinned classifier leaves it attached"
    );

    let dir = root.0.clone();
    let removed = in_netns(&pair.a, move || detach_pinned(&dir, "va").unwrap());
    assert!(removed);
    assert_eq!(tcx_programs(&pair.a, "va"), 0);
    assert!(!root.0.join("va").exists(), "no pins left");
    assert!(pair.ping(ADDR_B), "traffic flows after detach");
}

/// Helper process: attaches pinned in the namespace named by `CHILD_ENV` under the pin root
/// `PINNED_CHILD_ENV`, prints ATTACHED and waits to be killed.
#[test]
#[ignore = "helper process of a_pinned_attachment_outlives_a_sigkilled_process_is_adopted_and_detached"]
fn attach_pinned_and_wait_child() {
    let (Ok(ns), Ok(root)) = (std::env::var(CHILD_ENV), std::env::var(PINNED_CHILD_ENV)) else {
        return;
    };
    enter_netns(&format!("/var/run/netns/{ns}"));
    let mut classifier = Classifier::load_pinned(
        &ClassifierOptions::default(),
        std::path::Path::new(&root),
        "va",
        Direction::Egress,
    )
    .unwrap();
    assert_eq!(classifier.adoption(), Some(Adoption::Fresh));
    classifier.install(&test_policy()).unwrap();
    assert_eq!(
        classifier.attach("va", Direction::Egress).unwrap(),
        AttachMode::Tcx
    );
    println!("ATTACHED");
    thread::sleep(Duration::from_secs(120));
    drop(classifier);
}

/// On kernels without TCX a crashed agent leaves its clsact filter behind (it outlives the
/// process); the next attach removes it, so no dead agent's maps judge packets.
#[test]
fn a_clsact_filter_left_by_a_crashed_agent_is_removed_at_the_next_attach() {
    let pair = Pair::new();
    let a = pair.a.clone();
    in_netns(&pair.a, move || {
        let mut crashed = Classifier::load(&ClassifierOptions::default()).unwrap();
        crashed.install(&test_policy()).unwrap();
        crashed.attach_clsact("va", Direction::Egress).unwrap();
        // Like a crash: no detach runs, the netlink filter stays in the kernel.
        std::mem::forget(crashed);
        assert!(tc_filters(&a, "va").contains("bpf"), "the leftover filter");
    });
    assert!(!pair.ping(ADDR_B), "the leftover filter still drops ICMP");
    let a = pair.a.clone();
    let filters = in_netns(&pair.a, move || {
        let mut classifier = Classifier::load(&ClassifierOptions::default()).unwrap();
        let pass_all = compile_text("pass.toml", "default = \"pass\"\n").unwrap();
        classifier.install(&pass_all).unwrap();
        assert_eq!(
            classifier.attach("va", Direction::Egress).unwrap(),
            AttachMode::Tcx
        );
        let filters = tc_filters(&a, "va");
        classifier.detach().unwrap();
        filters
    });
    assert!(!filters.contains("bpf"), "removed at attach: {filters}");
    assert!(pair.ping(ADDR_B));
}

/// A TUN has no link-layer header: the classifier must read its packets from the IP header (the
/// link type comes from rtnetlink). Were the TUN taken for Ethernet, the IPv4 header would be
/// read 14 bytes late and the rule would not match.
#[test]
fn on_a_tun_the_classifier_reads_packets_from_their_ip_header() {
    let pair = Pair::new();
    let stats = in_netns(&pair.a, move || {
        let _tun = tun_rs::DeviceBuilder::new()
            .name("hl3")
            .ipv4("10.78.0.1", 24u8, None)
            .mtu(1500)
            .enable(true)
            .build_sync()
            .unwrap_or_else(|e| panic!("creating a TUN: {e}"));
        let text = "[[rule]]\nname = \"to-tun-peer\"\ndst = [\"10.78.0.2\"]\nprotocol = \"udp\"\naction = \"drop\"\n";
        let mut classifier = Classifier::load(&ClassifierOptions::default()).unwrap();
        classifier
            .install(&compile_text("l3.toml", text).unwrap())
            .unwrap();
        classifier.attach("hl3", Direction::Egress).unwrap();
        let socket = UdpSocket::bind(("10.78.0.1", 0)).unwrap();
        // The verdict is observed in the counters; a drop may or may not surface as an error.
        let _ = socket.send_to(b"l3", ("10.78.0.2", 9));
        let stats = classifier.rule_stats().unwrap();
        classifier.detach().unwrap();
        stats
    });
    let by_name: Vec<(String, u64)> = stats.into_iter().map(|r| (r.name, r.packets)).collect();
    assert_eq!(
        by_name,
        [("to-tun-peer".to_string(), 1), ("default".to_string(), 0)]
    );
}
