//! 10,000 idle TCP connections to an agent's metrics port (the agent limited to 1,024
//! descriptors, systemd's default soft limit) leave `/metrics` answering, the agent's
//! descriptors bounded and the tunnel working. In namespaces the test creates; needs root.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use hoshino_tests::agent::METRICS_LISTEN;
use hoshino_tests::netns::Namespace;
use hoshino_tests::ping::ping;
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{NetOptions, TunnelNet};

const IDLE_CONNECTIONS: usize = 10_000;
const AGENT_FD_LIMIT: u64 = 1024;

/// Sets the soft and hard RLIMIT_NOFILE of process `pid` (prlimit(2)).
fn limit_descriptors(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit on a child this test started; `new` is a valid rlimit, old is not read.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.
fn raise_own_descriptor_limit() -> u64 {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers to a local rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut current), 0);
        current.rlim_cur = current.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &current), 0);
    }
    current.rlim_cur
}

/// Opens `count` TCP connections to `addr` from inside `ns` (a thread that entered it; the
/// sockets stay in that namespace) and returns them, never sending a byte.
fn idle_connections(ns: &Namespace, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        // SAFETY: plain setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        (0..count)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"))
            })
            .collect()
    })
    .join()
    .expect("connecting thread")
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
fn ten_thousand_idle_metrics_connections_leave_metrics_and_the_tunnel_working() {
    let own = raise_own_descriptor_limit();
    assert!(
        own > IDLE_CONNECTIONS as u64 + 100,
        "the test needs {IDLE_CONNECTIONS} descriptors, RLIMIT_NOFILE allows {own}"
    );
    let net = TunnelNet::start(BackendKind::S3sFs, 2, &NetOptions::default()).expect("two nodes");
    let agent = net.agent(1).expect("agent 1");
    limit_descriptors(agent.pid(), AGENT_FD_LIMIT);
    let node = net.node(1).expect("node 1");
    let peer = net.node(2).expect("node 2");
    let addr: SocketAddr = METRICS_LISTEN.parse().expect("metrics address");

    let idle = idle_connections(&node.ns, addr, IDLE_CONNECTIONS);
    assert_eq!(idle.len(), IDLE_CONNECTIONS);
    // Bounded well below the agent's 1,024: at most 64 kept connections, plus sockets accepted
    // and not yet displaced, plus the agent's own (S3 client, TUN, DNS, control socket).
    let fds = open_descriptors(agent.pid());
    assert!(
        fds < 512,
        "the agent holds {fds} descriptors with {IDLE_CONNECTIONS} idle connections open"
    );

    let metrics = agent
        .metrics()
        .unwrap_or_else(|e| panic!("/metrics answers: {e}\n{}", agent.log_tail(30)));
    assert!(metrics.has("hoshino_s3_requests_total"), "a full scrape");
    for (from, to) in [(node, peer), (peer, node)] {
        let report = ping(
            &from.ns,
            IpAddr::V6(to.tunnel_addr),
            3,
            Duration::from_millis(200),
            Duration::from_secs(60),
        )
        .expect("ping runs");
        assert!(
            report.unanswered(3).is_empty(),
            "ping n{} -> n{} through the tunnel: {report:?}\n{}",
            from.index,
            to.index,
            agent.log_tail(30)
        );
    }
    drop(idle);
}
