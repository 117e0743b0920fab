//! The agent's registration with a real systemd-resolved (Debian's 252, unpacked by
//! `scripts/bootstrap.sh`, never installed on the host) on a real system bus: node n1 boots
//! systemd with dbus and systemd-resolved in its namespace (`systemd_support`), its agent runs in
//! that container's mount namespace (it sees `/run/systemd/resolve` and the bus) and registers
//! its name responder on `hoshino0`; node n2 is an ordinary testbed agent. The tests read back
//! what resolved holds for the link over D-Bus, resolve n2's name through resolved (its D-Bus
//! API, its stub listener on 127.0.0.53 and glibc via `/etc/resolv.conf`), ping n2 by that name
//! through the tunnel, restart resolved, and after SIGTERM or SIGKILL find nothing left in
//! resolved for the link; a resolved that does not answer is logged and the tunnel runs; and the
//! deployed unit (unprivileged, DynamicUser) registers through its root `ExecStartPost`. Needs
//! root, systemd, dbus, dig and built `hoshino-agent` and testbed binaries; about 10 s for all
//! four (one container each, in parallel).
//!
//! Timeouts are generous limits for a loaded 2-core machine, never measurements.

mod systemd_support;

use std::net::Ipv6Addr;
use std::time::Duration;

use hoshino_tests::agent::{Agent, TUN_NAME};
use hoshino_tests::s3_backend::BackendKind;
use hoshino_tests::tunnel_net::{AGENT_READY_TIMEOUT, NetOptions, TunnelNet};
use serde_json::{Value, json};
use systemd_support::{Boot, Container, repo_file, resolved_root, wait_for};

const RESOLVED: &str = "systemd-resolved.service";
const UNIT: &str = "hoshino-agent.service";
const RESOLVE1: &str = "org.freedesktop.resolve1";
const MANAGER: [&str; 3] = [
    RESOLVE1,
    "/org/freedesktop/resolve1",
    "org.freedesktop.resolve1.Manager",
];
/// Not 53: resolved keeps the default port as 0, so only another port shows that the agent's
/// port reaches resolved.
const DNS_PORT: u16 = 5300;
const AF_INET6: u64 = 10;
const WAIT: Duration = Duration::from_secs(60);

/// `busctl --json=short <args>` in the container, parsed; `Err(stderr)` when busctl fails.
fn busctl(container: &Container, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["--json=short"];
    all.extend_from_slice(args);
    let out = container.output("busctl", &all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .map_err(|e| format!("busctl {args:?} printed no JSON ({e}): {text}"))
}

/// resolved's D-Bus object for link `ifindex`, or resolved's refusal.
fn link_object(container: &Container, ifindex: u64) -> Result<String, String> {
    let index = ifindex.to_string();
    let mut args = vec!["call"];
    args.extend_from_slice(&MANAGER);
    args.extend_from_slice(&["GetLink", "i", &index]);
    let reply = busctl(container, &args)?;
    reply["data"][0]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("GetLink replied {reply}"))
}

fn link_property(container: &Container, object: &str, property: &str) -> Value {
    busctl(
        container,
        &[
            "get-property",
            RESOLVE1,
            object,
            "org.freedesktop.resolve1.Link",
            property,
        ],
    )
    .unwrap_or_else(|e| panic!("{property} of {object}: {e}"))["data"]
        .clone()
}

fn ifindex(net: &TunnelNet, node: u8) -> u64 {
    let out = net
        .node(node)
        .expect("node")
        .ns
        .ip(&["-j", "link", "show", TUN_NAME])
        .expect("the TUN exists");
    let links: Value = serde_json::from_str(&out).expect("ip -j prints JSON");
    links[0]["ifindex"].as_u64().expect("an ifindex")
}

fn logs(agents: &[&Agent], container: &Container) -> String {
    let mut text: String = agents
        .iter()
        .map(|a| format!("--- {} ---\n{}\n", a.log_path().display(), a.log_tail(30)))
        .collect();
    text += &container.run("resolvectl", &["status", "--no-pager"]);
    text += &container.journal(RESOLVED);
    text
}

/// A testbed of `nodes` nodes whose node n1 runs systemd with dbus and systemd-resolved (started
/// and active). Field order is drop order: the container before the testbed's namespaces.
struct ResolvedBed {
    container: Container,
    net: TunnelNet,
}

impl ResolvedBed {
    fn start(nodes: u8) -> Self {
        Self::start_prepared(nodes, |_, _| ())
    }

    /// As `start`, with `prepare` adding to the container's files before it boots.
    fn start_prepared(nodes: u8, prepare: impl FnOnce(&mut Boot, &TunnelNet)) -> Self {
        let resolved = resolved_root();
        let net = TunnelNet::without_agents(BackendKind::S3sFs, nodes, &NetOptions::default())
            .unwrap_or_else(|e| panic!("testbed: {e}"));
        let n1 = net.node(1).expect("n1");
        let mut boot = Boot::new(n1.ns.name(), net.scratch());
        boot.layer(&resolved.join("usr"), "/usr")
            .layer(&resolved.join("lib/systemd"), "/usr/lib/systemd");
        // What a host whose resolver is systemd-resolved has, so glibc asks its stub listener.
        std::fs::write(boot.etc().join("resolv.conf"), "nameserver 127.0.0.53\n")
            .expect("resolv.conf");
        prepare(&mut boot, &net);
        let container = boot.start();
        container.systemctl(&["start", RESOLVED]);
        assert_eq!(
            container.systemctl(&["is-active", RESOLVED]).trim(),
            "active",
            "{}",
            container.journal(RESOLVED)
        );
        Self { container, net }
    }

    /// Starts n2's agent and waits until its directory record is in the bucket, so that n1's
    /// responder knows n2 from its first directory read.
    fn start_n2(&self) -> Agent {
        let n2 = self.net.node(2).expect("n2");
        let agent = Agent::start_ready(
            n2,
            self.net.endpoint(),
            self.net.scratch(),
            &[],
            AGENT_READY_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("agent n2: {e}"));
        wait_for(WAIT, "n2's directory record", || {
            self.net
                .list_keys(1, "v2/nodes/")
                .ok()
                .filter(|keys| keys.iter().any(|k| k.ends_with(&n2.node_id)))
        });
        agent
    }

    /// n1's agent in the container's mount namespace (it sees `/run/systemd/resolve` and the
    /// system bus), its responder on `DNS_PORT`, ready.
    fn start_n1(&self) -> Agent {
        let port = DNS_PORT.to_string();
        let mut agent = Agent::start_with(
            self.net.node(1).expect("n1"),
            self.net.endpoint(),
            self.net.scratch(),
            &["--dns-port", &port],
            |agent| self.container.command(agent),
        )
        .unwrap_or_else(|e| panic!("agent n1: {e}"));
        agent
            .wait_ready(AGENT_READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("agent n1: {e}"));
        agent
    }
}

/// What resolved holds for link `tun`, read back over D-Bus: the responder on `addr` and
/// `DNS_PORT` as its one DNS server, `~hoshino.internal` as its one domain, not the default
/// route, and what the responder does not speak switched off.
fn assert_registered(container: &Container, tun: u64, addr: Ipv6Addr) {
    let object = link_object(container, tun).unwrap_or_else(|e| panic!("link {tun}: {e}"));
    let status = container.run("resolvectl", &["status", TUN_NAME]);
    assert_eq!(
        link_property(container, &object, "DNSEx"),
        json!([[AF_INET6, addr.octets(), DNS_PORT, ""]]),
        "the responder on the tunnel address and its port is the link's one DNS server:\n{status}"
    );
    assert_eq!(
        link_property(container, &object, "Domains"),
        json!([["hoshino.internal", true]]),
        "hoshino.internal is the link's one domain, routing-only (~hoshino.internal):\n{status}"
    );
    assert_eq!(
        link_property(container, &object, "DefaultRoute"),
        json!(false),
        "other names never go to the link:\n{status}"
    );
    for property in ["LLMNR", "MulticastDNS", "DNSSEC", "DNSOverTLS"] {
        assert_eq!(
            link_property(container, &object, property),
            json!("no"),
            "{property} is off on the link:\n{status}"
        );
    }
    assert!(
        status.contains(&format!("DNS Servers: [{addr}]:{DNS_PORT}"))
            && status.contains("DNS Domain: ~hoshino.internal")
            && status.contains("-DefaultRoute"),
        "resolvectl status {TUN_NAME}:\n{status}"
    );
}

/// Waits until n1's agent logs its registration; a logged failure fails at once.
fn wait_registered(agent: &Agent, container: &Container) {
    wait_for(WAIT, "the agent's registration", || {
        let log = agent.log_text();
        assert!(
            !log.contains("registration failed"),
            "{}",
            logs(&[agent], container)
        );
        log.contains("registered with systemd-resolved")
            .then_some(())
    });
}

/// resolved forgot link `tun`: no object, and `~hoshino.internal` on no link.
fn assert_forgotten(container: &Container, tun: u64) {
    let gone = link_object(container, tun).expect_err("resolved still has the TUN link");
    assert!(gone.contains("not known"), "GetLink {tun}: {gone}");
    let domains = container.run("resolvectl", &["domain"]);
    assert!(!domains.contains("hoshino.internal"), "{domains}");
}

fn resolve_through_resolved(container: &Container, name: &str, want: &str) -> String {
    wait_for(WAIT, &format!("resolvectl query {name}"), || {
        let out = container.output("resolvectl", &["query", "--cache=no", "-6", name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains(want)).then_some(text)
    })
}

#[test]
fn the_agent_registers_its_responder_with_systemd_resolved_and_reverts_it_on_exit() {
    let bed = ResolvedBed::start(2);
    let (net, container) = (&bed.net, &bed.container);
    let (n1, n2) = (net.node(1).expect("n1"), net.node(2).expect("n2"));

    // n2 first, and its record in the bucket before n1 starts.
    let n2_agent = bed.start_n2();
    let mut n1_agent = bed.start_n1();
    wait_for(WAIT, "the agent's registration", || {
        let log = n1_agent.log_text();
        assert!(
            !log.contains("registration failed"),
            "{}",
            logs(&[&n1_agent], container)
        );
        log.contains("registered with systemd-resolved")
            .then_some(())
    });

    let tun = ifindex(net, 1);
    assert_registered(container, tun, n1.tunnel_addr);

    // n2's name through resolved: its D-Bus API, its stub listener, and glibc (getent, ping).
    let n2_addr = n2.tunnel_addr.to_string();
    let name = "n2.hoshino.internal";
    let query = resolve_through_resolved(container, name, &n2_addr);
    assert!(
        query.contains(&format!("{name}: {n2_addr}")) && query.contains("via protocol DNS"),
        "{query}"
    );
    let stub = container.run(
        "dig",
        &["@127.0.0.53", "AAAA", name, "+short", "+time=5", "+tries=2"],
    );
    assert_eq!(stub.trim(), n2_addr, "dig @127.0.0.53 AAAA {name}");
    let getent = container.run("getent", &["ahostsv6", name]);
    assert!(
        getent
            .lines()
            .next()
            .is_some_and(|l| l.starts_with(&n2_addr)),
        "getent ahostsv6 {name}: {getent:?}"
    );
    let ping = container.output("ping", &["-6", "-c", "1", "-W", "10", name]);
    assert!(
        ping.status.success(),
        "ping {name} through the tunnel: {}{}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr),
        logs(&[&n1_agent, &n2_agent], container)
    );

    // resolved keeps runtime link settings across its own restart (under
    // /run/systemd/resolve/netif), so the agent need not register again.
    container.systemctl(&["restart", RESOLVED]);
    assert_eq!(
        container.systemctl(&["is-active", RESOLVED]).trim(),
        "active"
    );
    assert_registered(container, tun, n1.tunnel_addr);
    resolve_through_resolved(container, name, &n2_addr);

    // SIGTERM: the registration is reverted while the link still exists, then the link goes.
    let exit = n1_agent
        .stop(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("stopping agent n1: {e}"));
    assert!(exit.success(), "agent n1 exited with {exit}");
    let log = n1_agent.log_text();
    assert!(
        log.contains("systemd-resolved registration reverted") && !log.contains("revert on link"),
        "{}",
        n1_agent.log_tail(30)
    );
    assert_forgotten(container, tun);
    let after = container.output("resolvectl", &["query", "--cache=no", "-6", name]);
    assert!(
        !after.status.success() && !String::from_utf8_lossy(&after.stdout).contains(&n2_addr),
        "{name} still resolves through resolved: {}",
        String::from_utf8_lossy(&after.stdout)
    );
}

#[test]
fn a_registration_resolved_does_not_take_is_logged_and_the_tunnel_runs_without_it() {
    let bed = ResolvedBed::start(1);
    // Stopped, resolved leaves its runtime directory (RuntimeDirectoryPreserve=yes), so the
    // agent tries, and the bus has no one to answer (the unit is not enabled for activation).
    bed.container.systemctl(&["stop", RESOLVED]);
    let runtime = bed
        .container
        .output("test", &["-d", "/run/systemd/resolve"]);
    assert!(runtime.status.success(), "/run/systemd/resolve is gone");
    let mut agent = bed.start_n1();
    let warning = wait_for(WAIT, "the registration's failure in the log", || {
        agent
            .log_text()
            .lines()
            .find(|l| l.contains("systemd-resolved registration failed"))
            .map(str::to_owned)
    });
    assert!(
        warning.contains("WARN") && warning.contains("SetLinkDNSEx on link"),
        "{warning}"
    );
    assert!(
        agent.exit_status().is_none(),
        "the tunnel runs on:\n{}",
        agent.log_tail(30)
    );
    let exit = agent
        .stop(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("stopping agent n1: {e}"));
    assert!(exit.success(), "agent n1 exited with {exit}");
    assert!(
        !agent.log_text().contains("reverted"),
        "nothing registered, nothing reverted:\n{}",
        agent.log_tail(30)
    );
}

#[test]
fn a_killed_agent_leaves_nothing_in_resolved_because_its_link_goes_with_it() {
    let bed = ResolvedBed::start(1);
    let mut agent = bed.start_n1();
    wait_registered(&agent, &bed.container);
    let tun = ifindex(&bed.net, 1);
    assert_registered(
        &bed.container,
        tun,
        bed.net.node(1).expect("n1").tunnel_addr,
    );
    agent
        .kill(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("killing agent n1: {e}"));
    // The kernel removes a TUN whose last descriptor closes; resolved follows over rtnetlink.
    wait_for(WAIT, "resolved to forget the link", || {
        link_object(&bed.container, tun).is_err().then_some(())
    });
    assert_forgotten(&bed.container, tun);
}

#[test]
fn the_deployed_unit_registers_as_root_in_exec_start_post_and_the_registration_goes_with_it() {
    let bed = ResolvedBed::start_prepared(2, |boot, net| {
        let agent = hoshino_tests::binaries::agent().expect("hoshino-agent binary");
        let endpoint = net.endpoint();
        let n1 = net.node(1).expect("n1");
        boot.etc_file(
            &format!("systemd/system/{UNIT}"),
            &repo_file(&format!("deploy/{UNIT}")),
        )
        .etc_file("hoshino/machine-id", &n1.machine_id_file)
        .local_bin("hoshino-agent", &agent);
        let etc = boot.etc();
        std::fs::write(
            etc.join("hoshino/agent.toml"),
            format!(
                "bucket = \"{}\"\nendpoint-url = \"{}\"\nregion = \"{}\"\npath-style = true\n\
                 machine-id-file = \"/etc/hoshino/machine-id\"\nname = \"n1\"\ndns-port = {DNS_PORT}\n\
                 log-format = \"text\"\n",
                endpoint.bucket, endpoint.url, endpoint.region
            ),
        )
        .expect("agent.toml");
        std::fs::write(
            etc.join("hoshino/agent.env"),
            format!(
                "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_EC2_METADATA_DISABLED=true\n",
                endpoint.access_key, endpoint.secret_key
            ),
        )
        .expect("agent.env");
    });
    let container = &bed.container;
    let _n2_agent = bed.start_n2();
    // Returns once ExecStartPost is done.
    container.systemctl(&["start", UNIT]);
    assert_eq!(
        container.systemctl(&["is-active", UNIT]).trim(),
        "active",
        "{}",
        container.journal(UNIT)
    );
    // The unprivileged agent leaves the registration to ExecStartPost, which makes it.
    container.wait_journal(
        UNIT,
        "not root: systemd-resolved takes link settings from root only",
        1,
    );
    container.wait_journal(UNIT, "registered with systemd-resolved", 1);
    let tun = ifindex(&bed.net, 1);
    assert_registered(container, tun, bed.net.node(1).expect("n1").tunnel_addr);
    let n2_addr = bed.net.node(2).expect("n2").tunnel_addr.to_string();
    resolve_through_resolved(container, "n2.hoshino.internal", &n2_addr);

    container.systemctl(&["stop", UNIT]);
    wait_for(WAIT, "resolved to forget the link", || {
        link_object(container, tun).is_err().then_some(())
    });
    assert_forgotten(container, tun);
}
