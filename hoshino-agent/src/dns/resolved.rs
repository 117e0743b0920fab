//! Registration with systemd-resolved, the way tailscaled does it: on the TUN link, the
//! responder as the link's DNS server, `~<domain>` as its routing-only domain (only names under
//! the domain go there), and the link never the default route for other names. Then, best
//! effort, what the responder does not speak is switched off on the link: LLMNR and mDNS (they
//! would multicast single-label lookups into the tunnel), DNSSEC (its answers are unsigned) and
//! DNS-over-TLS (it serves plain UDP); and resolved's cache is flushed, so a negative answer
//! cached before the agent ran does not hide a node's name. Spoken over D-Bus with `busctl`
//! (part of systemd, so present wherever resolved is); `RevertLink` on exit.
//!
//! `register_calls`, `tuning_calls` and `revert_call` are the sans-IO part (the busctl
//! arguments); `Registration` runs them. Nothing is done where resolved is not running
//! (`/run/systemd/resolve` absent), nor by a process that is not root: resolved would refuse it
//! (`cmd/resolved.rs` is the root side for the unprivileged unit). Proven against systemd-resolved 252 by
//! `tests/tests/systemd_resolved.rs`.

use std::net::Ipv6Addr;
use std::path::Path;

use crate::directory::name::DnsDomain;

const BUS_NAME: &str = "org.freedesktop.resolve1";
const OBJECT: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// Present while systemd-resolved runs.
pub const RESOLVED_RUNTIME_DIR: &str = "/run/systemd/resolve";
const AF_INET6: i32 = 10;
/// Per busctl call. The revert runs during shutdown, which gives all loops 5 s.
const BUSCTL_TIMEOUT: &str = "--timeout=2";

fn call(method: &str, signature: &str, args: Vec<String>) -> Vec<String> {
    let mut v = vec![
        "call".to_string(),
        BUS_NAME.to_string(),
        OBJECT.to_string(),
        MANAGER.to_string(),
        method.to_string(),
        signature.to_string(),
    ];
    v.extend(args);
    v
}

/// The busctl argument lists that register `[addr]:port` for `~domain` on link `ifindex`.
pub fn register_calls(
    ifindex: u32,
    addr: Ipv6Addr,
    port: u16,
    domain: &DnsDomain,
) -> Vec<Vec<String>> {
    let mut dns = vec![
        ifindex.to_string(),
        "1".into(),
        AF_INET6.to_string(),
        "16".into(),
    ];
    dns.extend(addr.octets().iter().map(|b| b.to_string()));
    dns.push(port.to_string());
    // No TLS server name.
    dns.push(String::new());
    vec![
        call("SetLinkDNSEx", "ia(iayqs)", dns),
        call(
            "SetLinkDomains",
            "ia(sb)",
            vec![
                ifindex.to_string(),
                "1".into(),
                domain.to_string(),
                "true".into(),
            ],
        ),
        call(
            "SetLinkDefaultRoute",
            "ib",
            vec![ifindex.to_string(), "false".into()],
        ),
    ]
}

/// Best-effort calls after `register_calls`: a failure is logged and the registration kept.
pub fn tuning_calls(ifindex: u32) -> Vec<Vec<String>> {
    let off = |method: &str| call(method, "is", vec![ifindex.to_string(), "no".into()]);
    vec![
        off("SetLinkLLMNR"),
        off("SetLinkMulticastDNS"),
        off("SetLinkDNSSEC"),
        off("SetLinkDNSOverTLS"),
        call("FlushCaches", "", Vec::new()),
    ]
}

pub fn revert_call(ifindex: u32) -> Vec<String> {
    call("RevertLink", "i", vec![ifindex.to_string()])
}

/// A registration made; `revert` undoes it.
#[derive(Debug)]
pub struct Registration {
    ifindex: u32,
}

fn busctl(args: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("busctl")
        .arg(BUSCTL_TIMEOUT)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run busctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

impl Registration {
    /// Registers when resolved runs and this process is root; `None` (logged) when resolved
    /// does not run or refuses, or when this process is not root.
    pub fn register(
        ifindex: u32,
        addr: Ipv6Addr,
        port: u16,
        domain: &DnsDomain,
    ) -> Option<Registration> {
        if !Path::new(RESOLVED_RUNTIME_DIR).exists() {
            tracing::info!(
                "systemd-resolved is not running: not registering {domain}; `hoshino-agent hosts` prints /etc/hosts lines instead"
            );
            return None;
        }
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // resolved asks polkit about every caller but root (CAP_NET_ADMIN does not count
            // over D-Bus), and dbus-daemon drops DynamicUser= callers (systemd issue 22737).
            tracing::info!(
                "not root: systemd-resolved takes link settings from root only; `hoshino-agent resolved` run as root registers {domain} (the systemd unit runs it in ExecStartPost)"
            );
            return None;
        }
        for args in register_calls(ifindex, addr, port, domain) {
            if let Err(e) = busctl(&args) {
                tracing::warn!(
                    "systemd-resolved registration failed ({} on link {ifindex}): {e}; {domain} is not resolved through it",
                    args[4]
                );
                let _ = busctl(&revert_call(ifindex));
                return None;
            }
        }
        for args in tuning_calls(ifindex) {
            if let Err(e) = busctl(&args) {
                tracing::warn!(
                    "systemd-resolved: {} on link {ifindex} failed: {e}; registration kept",
                    args[4]
                );
            }
        }
        tracing::info!(
            %domain, ifindex, server = %std::net::SocketAddrV6::new(addr, port, 0, 0),
            "registered with systemd-resolved for ~{domain}"
        );
        Some(Registration { ifindex })
    }

    pub fn revert(self) {
        match busctl(&revert_call(self.ifindex)) {
            Ok(()) => tracing::info!(
                ifindex = self.ifindex,
                "systemd-resolved registration reverted"
            ),
            Err(e) => tracing::warn!(
                "systemd-resolved revert on link {} failed: {e}",
                self.ifindex
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_sets_the_links_dns_server_routing_domain_and_no_default_route() {
        let calls = register_calls(
            7,
            "fd00::1".parse().expect("addr"),
            53,
            &DnsDomain::default(),
        );
        let methods: Vec<&str> = calls.iter().map(|c| c[4].as_str()).collect();
        assert_eq!(
            methods,
            ["SetLinkDNSEx", "SetLinkDomains", "SetLinkDefaultRoute"]
        );
        let dns = &calls[0][5..];
        assert_eq!(&dns[..5], ["ia(iayqs)", "7", "1", "10", "16"]);
        assert_eq!(dns[5], "253", "first address byte 0xfd");
        assert_eq!(&dns[21..], ["53", ""]);
        assert_eq!(
            &calls[1][5..],
            ["ia(sb)", "7", "1", "hoshino.internal", "true"]
        );
        assert_eq!(&calls[2][5..], ["ib", "7", "false"]);
        assert_eq!(&revert_call(7)[4..], ["RevertLink", "i", "7"]);
    }

    #[test]
    fn tuning_switches_off_what_the_responder_does_not_speak_and_flushes_the_cache() {
        let tuning = tuning_calls(7);
        let calls: Vec<Vec<&str>> = tuning
            .iter()
            .map(|c| c[4..].iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            calls,
            [
                vec!["SetLinkLLMNR", "is", "7", "no"],
                vec!["SetLinkMulticastDNS", "is", "7", "no"],
                vec!["SetLinkDNSSEC", "is", "7", "no"],
                vec!["SetLinkDNSOverTLS", "is", "7", "no"],
                vec!["FlushCaches", ""],
            ]
        );
    }
}
