//! `hoshino-agent resolved`: registers the running tunnel's name responder with systemd-resolved,
//! from outside the agent, for an agent that cannot do it itself. systemd-resolved takes link
//! settings only from root (or whom polkit allows; `CAP_NET_ADMIN` does not count over D-Bus),
//! and dbus-daemon drops connections from `DynamicUser=` services (systemd issue 22737), so the
//! unit's unprivileged agent leaves it to this command, which the unit runs as root
//! (`ExecStartPost=-+`). It reads the same settings as `tunnel` (the same flags and `--config`
//! keys), waits for the TUN, registers, and exits; no revert is needed: the registration goes
//! with the TUN link when the agent exits.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use hoshino_agent::dns::resolved::{RESOLVED_RUNTIME_DIR, Registration};
use hoshino_agent::edge::netlink::Netlink;
use hoshino_agent::node_addr::NodeId;

use super::hosts::DomainArgs;
use super::tunnel::{DEFAULT_TUN_NAME, NodeArgs};
use super::{EXIT_RUNTIME, config_error};

#[derive(Debug, Clone, Args)]
pub struct ResolvedArgs {
    /// TUN interface name of the running tunnel.
    #[arg(long, env = "HOSHINO_TUN_NAME", default_value = DEFAULT_TUN_NAME)]
    pub tun_name: String,
    #[command(flatten)]
    pub node: NodeArgs,
    /// The network's bucket; without one no tunnel runs (`attach` without a tunnel), so there is
    /// nothing to register.
    #[arg(long, env = "HOSHINO_BUCKET")]
    pub bucket: Option<String>,
    /// Whether the tunnel answers names (`false`: nothing to register).
    #[arg(long, env = "HOSHINO_DNS", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub dns: bool,
    /// UDP port of the tunnel's name responder.
    #[arg(long, env = "HOSHINO_DNS_PORT", default_value_t = hoshino_agent::dns::DNS_PORT)]
    pub dns_port: u16,
    #[command(flatten)]
    pub domain: DomainArgs,
    /// How long to wait for the tunnel's TUN to appear.
    #[arg(long, env = "HOSHINO_TUN_WAIT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub tun_wait: Duration,
}

pub async fn run(args: &ResolvedArgs) -> ExitCode {
    if args.bucket.is_none() {
        tracing::info!("no --bucket: no tunnel runs, nothing to register");
        return ExitCode::SUCCESS;
    }
    if !args.dns {
        tracing::info!("--dns false: the tunnel serves no names, nothing to register");
        return ExitCode::SUCCESS;
    }
    if !Path::new(RESOLVED_RUNTIME_DIR).exists() {
        tracing::info!("systemd-resolved is not running: nothing to register");
        return ExitCode::SUCCESS;
    }
    let id = match NodeId::from_machine_id_file(&args.node.machine_id_file) {
        Ok(id) => id,
        Err(e) => return config_error(e),
    };
    let addr = hoshino_agent::node_addr::NodeAddr {
        prefix: args.node.prefix,
        id,
    }
    .ip();
    let Some(ifindex) = wait_for_link(&args.tun_name, args.tun_wait).await else {
        tracing::error!(
            "no link {} within {:?}: is the tunnel running?",
            args.tun_name,
            args.tun_wait
        );
        return ExitCode::from(EXIT_RUNTIME);
    };
    let (port, domain) = (args.dns_port, args.domain.dns_domain.clone());
    let registered =
        tokio::task::spawn_blocking(move || Registration::register(ifindex, addr, port, &domain))
            .await;
    match registered {
        Ok(Some(_)) => ExitCode::SUCCESS,
        // Logged by `register`.
        _ => ExitCode::from(EXIT_RUNTIME),
    }
}

/// The ifindex of `name` once the link exists, polled every 100 ms up to `wait`.
async fn wait_for_link(name: &str, wait: Duration) -> Option<u32> {
    let netlink = match Netlink::connect() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            return None;
        }
    };
    let deadline = Instant::now() + wait;
    loop {
        match netlink.link_index(name).await {
            Ok(Some(index)) => return Some(index),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
