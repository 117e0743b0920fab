//! `hoshino-agent attach`: the classifier on an interface, the tunnel for `tunnel` verdicts,
//! the divert loop for `divert` verdicts; SIGHUP reloads the policy. The classifier is pinned in
//! bpffs and stays attached when the agent exits, however it exits (fail closed: diverted and
//! tunnelled traffic is dropped until an agent adopts it again); `--detach-on-exit` removes it on
//! SIGINT/SIGTERM, `hoshino-agent detach` at any time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use clap::Args;
use hoshino_common::{FlowKey, FlowValue};
use tokio::sync::watch;

use super::tunnel::TunnelArgs;
use super::{CliError, EXIT_CONFIG, EXIT_RUNTIME};
use hoshino_agent::interceptor::divert::device::{DeviceError, DivertTun, Reinjector};
use hoshino_agent::interceptor::divert::service::{self, DivertContext, FlowLookup, PolicySets};
use hoshino_agent::interceptor::reload::{PolicyReload, tunnel_rule};
use hoshino_agent::interceptor::{
    Classifier, ClassifierOptions, DEFAULT_PIN_ROOT, Direction, FLOW_IDLE_TIMEOUT,
    FLOW_SWEEP_EVERY, FlowTable, InterceptorError, forward_logs, monotonic_now_ns,
};
use hoshino_agent::metrics::{Metrics, RuleCounter};
use hoshino_agent::policy::{self, CompiledPolicy, PolicyError};
use hoshino_agent::supervisor::{LoopEnded, Supervisor};
use hoshino_agent::tunnel::{Tunnel, TunnelError};

/// Default per-uid cap of recorded divert flows (a sixteenth of the table).
pub const DEFAULT_FLOWS_PER_UID: u32 = hoshino_common::FLOW_CAPACITY / 16;
/// Default name of the divert TUN.
pub const DEFAULT_DIVERT_TUN: &str = "hoshinodv0";
/// Default mark of reinjected packets ("hsno"); any nonzero value no one else uses works.
pub const DEFAULT_REINJECT_MARK: u32 = 0x6873_6e6f;
/// How often the kernel's per-rule counters are copied into the metrics.
const COUNTERS_EVERY: Duration = Duration::from_secs(1);
/// The divert TUN's transmit queue, in packets: the classifier redirects bursts into it faster
/// than the agent reads them (the kernel default, 500, overflowed); as for the tunnel TUN.
pub const DIVERT_TX_QUEUE_LEN: u32 = hoshino_agent::edge::netlink::TX_QUEUE_LEN;

/// `hoshino-agent attach --interface IF --policy FILE [TUNNEL FLAGS]`.
#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// Interface whose outgoing packets the classifier judges.
    #[arg(long, env = "HOSHINO_INTERFACE", help_heading = "Interceptor")]
    pub interface: String,
    /// Policy file (TOML, see README.md, "Policy files"); SIGHUP re-reads it.
    #[arg(
        long,
        env = "HOSHINO_POLICY",
        help_heading = "Interceptor",
        value_name = "FILE"
    )]
    pub policy: PathBuf,
    /// Name of the TUN that receives diverted packets.
    #[arg(long, env = "HOSHINO_DIVERT_TUN", help_heading = "Interceptor", default_value = DEFAULT_DIVERT_TUN)]
    pub divert_tun: String,
    /// Socket mark of reinjected packets, decimal or 0x hex; the classifier lets packets with it
    /// pass [default: 0x68736e6f, "hsno"].
    #[arg(long, env = "HOSHINO_REINJECT_MARK", help_heading = "Interceptor", default_value_t = DEFAULT_REINJECT_MARK, hide_default_value = true, value_parser = parse_mark)]
    pub reinject_mark: u32,
    /// Log the classifier's verdicts (aya-log, at debug level, rate limited).
    #[arg(long, env = "HOSHINO_LOG_VERDICTS", help_heading = "Interceptor")]
    pub log_verdicts: bool,
    /// bpffs directory under which the classifier is pinned, as `<DIR>/<interface>/` (bpffs is
    /// mounted at /sys/fs/bpf if nothing is).
    #[arg(long, env = "HOSHINO_PIN_DIR", help_heading = "Interceptor", value_name = "DIR", default_value = DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// On SIGINT/SIGTERM remove the pinned classifier (by default it stays attached, dropping
    /// diverted traffic until the next agent adopts it, so a restart never passes it unjudged).
    #[arg(long, env = "HOSHINO_DETACH_ON_EXIT", help_heading = "Interceptor")]
    pub detach_on_exit: bool,
    /// Divert flows the kernel records per socket uid at once (0 = no cap); a user's new flow
    /// beyond it is dropped, so one user cannot fill the 65,536-flow table for everyone.
    #[arg(long, env = "HOSHINO_FLOWS_PER_UID", help_heading = "Interceptor", value_name = "N", default_value_t = DEFAULT_FLOWS_PER_UID)]
    pub flows_per_uid: u32,
    /// The tunnel carrying `tunnel` verdicts; started when a bucket is configured.
    #[command(flatten)]
    pub tunnel: TunnelArgs,
}

/// A mark in decimal or `0x` hexadecimal.
fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("`{text}` is not a 32-bit mark (decimal or 0x hex): {e}"))
}

/// Why `attach` failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "{path}: rule `{rule}` tunnels packets, but no bucket is configured for the tunnel (--bucket)"
    )]
    TunnelWithoutBucket { path: String, rule: String },
    #[error("the reinject mark must not be 0 (0 is every unmarked packet's mark)")]
    ZeroMark,
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Interceptor(#[from] InterceptorError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(hoshino_agent::edge::netlink::NetlinkError),
    #[error("interceptor stopped: {0}")]
    LoopEnded(#[from] LoopEnded),
}

impl AttachError {
    /// Exit code 2 (configuration) rather than 1 (runtime).
    pub fn is_config_error(&self) -> bool {
        match self {
            Self::Policy(_) | Self::TunnelWithoutBucket { .. } | Self::ZeroMark | Self::Cli(_) => {
                true
            }
            Self::Tunnel(e) => e.is_config_error(),
            _ => false,
        }
    }
}

/// The divert path's view of the flow map: its own handle, so per-connection lookups never wait
/// for the classifier lock that a policy reload holds.
struct ClassifierFlows(Arc<Mutex<FlowTable>>);

impl FlowLookup for ClassifierFlows {
    fn lookup(&self, key: &FlowKey) -> Option<FlowValue> {
        let flows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        flows.get(key).ok().flatten()
    }

    fn forget(&self, key: &FlowKey) {
        let mut flows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = flows.forget(key) {
            tracing::debug!(error = %e, "deleting a flow entry");
        }
    }
}

/// Runs `attach` until SIGINT/SIGTERM, to its exit code.
pub async fn run_command(args: AttachArgs) -> ExitCode {
    match run(args, super::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("hoshino-agent: {e}");
            ExitCode::from(if e.is_config_error() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

/// Runs `attach` until `shutdown` resolves.
pub async fn run(args: AttachArgs, shutdown: impl Future<Output = ()>) -> Result<(), AttachError> {
    if args.reinject_mark == 0 {
        return Err(AttachError::ZeroMark);
    }
    let compiled = Arc::new(policy::load(&args.policy)?);
    let bucket_configured = args.tunnel.has_bucket();
    if let Some(rule) = tunnel_rule(&compiled)
        && !bucket_configured
    {
        return Err(AttachError::TunnelWithoutBucket {
            path: args.policy.display().to_string(),
            rule: rule.to_string(),
        });
    }
    let tunnel_config = if bucket_configured {
        Some(args.tunnel.resolve()?)
    } else {
        None
    };

    // The metrics listener of an agent without a tunnel (the tunnel serves its own).
    let mut listener_loop = Supervisor::new();
    let (listener_stop, listener_stopped) = watch::channel(false);
    let (mut tunnel, metrics) = match tunnel_config {
        Some(config) => {
            let tunnel = Tunnel::start(config).await?;
            let metrics = tunnel.metrics.clone();
            (Some(tunnel), metrics)
        }
        None => {
            let metrics = Arc::new(Metrics::default());
            if let Some(addr) = args.tunnel.metrics_listen {
                let listener = hoshino_agent::edge::metrics_http::bind(addr)
                    .await
                    .map_err(|e| AttachError::Metrics(e.to_string()))?;
                listener_loop.spawn(
                    "metrics",
                    hoshino_agent::edge::metrics_http::serve(
                        listener,
                        metrics.clone(),
                        listener_stopped,
                    ),
                );
            }
            (None, metrics)
        }
    };

    let tunnel_ifindex = tunnel.as_ref().map(|t| t.ifindex);
    // The tunnel's loops and the metrics listener end the interceptor too.
    let ended = async {
        let tunnel_ended = async {
            match tunnel.as_mut() {
                Some(t) => t.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = tunnel_ended => ended,
            ended = listener_loop.ended() => ended,
        }
    };
    let result = intercept(&args, compiled, tunnel_ifindex, &metrics, shutdown, ended).await;
    let _ = listener_stop.send(true);
    listener_loop.stop(Duration::from_secs(2)).await;
    if let Some(tunnel) = tunnel
        && let Err(e) = tunnel.stop().await
    {
        tracing::warn!(error = %e, "stopping the tunnel");
    }
    result
}

async fn intercept(
    args: &AttachArgs,
    compiled: Arc<CompiledPolicy>,
    tunnel_ifindex: Option<u32>,
    metrics: &Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    elsewhere_ended: impl Future<Output = LoopEnded>,
) -> Result<(), AttachError> {
    let divert_tun = Arc::new(DivertTun::create(&args.divert_tun)?);
    let netlink = hoshino_agent::edge::netlink::Netlink::connect().map_err(AttachError::Netlink)?;
    netlink
        .set_tx_queue_len(divert_tun.name(), divert_tun.ifindex(), DIVERT_TX_QUEUE_LEN)
        .await
        .map_err(AttachError::Netlink)?;
    let reinjector = Reinjector::new(args.reinject_mark)?;
    let options = ClassifierOptions {
        tunnel_ifindex: tunnel_ifindex.unwrap_or(0),
        divert_ifindex: divert_tun.ifindex(),
        reinject_mark: args.reinject_mark,
        log_verdicts: args.log_verdicts,
    };
    let mut classifier =
        Classifier::load_pinned(&options, &args.pin_dir, &args.interface, Direction::Egress)?;
    let adoption = classifier.adoption();
    classifier.set_flows_per_uid(args.flows_per_uid)?;
    let log_task = match classifier.take_logger() {
        Ok(logger) => Some(tokio::spawn(forward_logs(logger))),
        Err(e) => {
            tracing::warn!(error = %e, "classifier log records will not be shown");
            None
        }
    };
    classifier.install(&compiled)?;
    let mode = classifier.attach(&args.interface, Direction::Egress)?;
    let flow_table = Arc::new(Mutex::new(classifier.flow_table()?));
    let pinned = classifier.is_pinned();
    let policies = Arc::new(RwLock::new(PolicySets::default()));
    write_policies(&policies).set(classifier.active_set(), compiled.clone());
    let classifier = Arc::new(Mutex::new(classifier));
    tracing::info!(
        interface = %args.interface,
        mode = ?mode,
        adoption = ?adoption,
        pinned,
        policy = %args.policy.display(),
        rules = compiled.rules.len(),
        divert_tun = divert_tun.name(),
        "interceptor attached"
    );

    let (stop, stopped) = watch::channel(false);
    let mut loops = Supervisor::new();
    loops.spawn(
        "divert",
        service::run(
            divert_tun.clone(),
            DivertContext {
                reinjector,
                mark: args.reinject_mark,
                policies: policies.clone(),
                flows: Arc::new(ClassifierFlows(flow_table.clone())),
                stats: metrics.divert.clone(),
            },
            stopped,
        ),
    );

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(AttachError::Signal)?;
    let mut counters = tokio::time::interval(COUNTERS_EVERY);
    let mut sweep = tokio::time::interval(FLOW_SWEEP_EVERY);
    tokio::pin!(shutdown);
    tokio::pin!(elsewhere_ended);
    let ended = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            ended = &mut elsewhere_ended => break Some(ended),
            ended = loops.ended() => break Some(ended),
            _ = hangup.recv() => {
                let reload = PolicyReload {
                    path: args.policy.clone(),
                    tunnel_running: tunnel_ifindex.is_some(),
                    classifier: classifier.clone(),
                    policies: policies.clone(),
                };
                reload.run().await;
            }
            _ = counters.tick() => publish_counters(&classifier, metrics),
            _ = sweep.tick() => sweep_flows(&flow_table).await,
        }
    };
    let outcome = match ended {
        None => Ok(()),
        Some(ended) => {
            tracing::error!(
                "{ended}; removing the interceptor's state from the kernel and exiting"
            );
            Err(AttachError::LoopEnded(ended))
        }
    };

    let _ = stop.send(true);
    loops.stop(Duration::from_secs(5)).await;
    if let Some(task) = log_task {
        task.abort();
    }
    let created_clsact = {
        let mut classifier = classifier.lock().unwrap_or_else(|p| p.into_inner());
        if classifier.is_pinned() && !args.detach_on_exit {
            tracing::info!(
                interface = %args.interface,
                pin_dir = %args.pin_dir.display(),
                "interceptor left attached (pinned): diverted and tunnelled traffic is dropped until an agent adopts it; `hoshino-agent detach --interface {}` removes it",
                args.interface
            );
            return outcome;
        }
        classifier.detach()?;
        classifier.created_clsact().to_vec()
    };
    for interface in created_clsact {
        match netlink.link_index(&interface).await {
            Ok(Some(ifindex)) => {
                if let Err(e) = netlink.remove_clsact(&interface, ifindex).await {
                    tracing::warn!(interface, error = %e, "removing the clsact qdisc we added");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(interface, error = %e, "looking up the interface"),
        }
    }
    tracing::info!(interface = %args.interface, "interceptor detached");
    outcome
}

/// Removes flow entries idle longer than [`FLOW_IDLE_TIMEOUT`], off the async workers (the walk
/// is one syscall per entry).
async fn sweep_flows(table: &Arc<Mutex<FlowTable>>) {
    let table = table.clone();
    let swept = tokio::task::spawn_blocking(move || {
        let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
        table.sweep(monotonic_now_ns(), FLOW_IDLE_TIMEOUT)
    })
    .await;
    match swept {
        Ok(Ok(0)) => {}
        Ok(Ok(removed)) => tracing::debug!(removed, "swept idle flows"),
        Ok(Err(e)) => tracing::warn!(error = %e, "sweeping the flow table"),
        Err(e) => tracing::warn!(error = %e, "flow sweep task"),
    }
}

fn write_policies(policies: &RwLock<PolicySets>) -> std::sync::RwLockWriteGuard<'_, PolicySets> {
    policies.write().unwrap_or_else(|p| p.into_inner())
}

fn publish_counters(classifier: &Mutex<Classifier>, metrics: &Metrics) {
    // A reload fills maps under this lock for a while; the counters wait for the next tick
    // rather than block an async worker.
    let (stats, events) = {
        let classifier = match classifier.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        (classifier.rule_stats(), classifier.events())
    };
    match events {
        Ok(events) => metrics.set_classifier_drops(
            events.flow_table_full,
            events.no_redirect_target,
            events.uid_flow_cap,
        ),
        Err(e) => tracing::debug!(error = %e, "reading classifier events"),
    }
    match stats {
        Ok(rules) => metrics.set_rule_counters(
            rules
                .into_iter()
                .map(|r| RuleCounter {
                    rule: r.name,
                    packets: r.packets,
                    bytes: r.bytes,
                })
                .collect(),
        ),
        Err(e) => tracing::debug!(error = %e, "reading rule counters"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_in_decimal_and_hex() {
        assert_eq!(parse_mark("0x68736e6f"), Ok(DEFAULT_REINJECT_MARK));
        assert_eq!(parse_mark("42"), Ok(42));
        assert!(parse_mark("0x1_0000_0000").is_err());
        assert!(parse_mark("mark").is_err());
    }
}
