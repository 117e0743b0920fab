//! `hoshino-agent tunnel`: the tunnel's flags (each the flag, its `HOSHINO_*` variable and its
//! config-file key at once; defaults from the library's own `Default`s), their resolution into a
//! `TunnelConfig`, and the command itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use hoshino_agent::directory::name::{NameError, NodeName};
use hoshino_agent::edge::s3::S3Settings;
use hoshino_agent::node_addr::NetworkPrefix;
use hoshino_agent::tunnel::bundler::BundlerConfig;
use hoshino_agent::tunnel::heartbeat::HeartbeatConfig;
use hoshino_agent::tunnel::{self, DEFAULT_MTU, DnsConfig, TunnelConfig};

use super::{CliError, EXIT_CONFIG, EXIT_RUNTIME};

pub const DEFAULT_TUN_NAME: &str = "hoshino0";
pub const DEFAULT_MACHINE_ID_FILE: &str = "/etc/machine-id";
/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hoshino";

/// A duration flag's default, from the library's defaults (printed as `5ms`, `1s`).
fn duration(d: std::time::Duration) -> humantime::Duration {
    d.into()
}

fn s3_defaults() -> S3Settings {
    S3Settings::new(String::new())
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The network's IPv6 /64 (the bytes of "hoshino" by default).
    #[arg(long, env = "HOSHINO_PREFIX", value_name = "PREFIX/64", default_value_t = NetworkPrefix::default())]
    pub prefix: NetworkPrefix,
    /// File whose first 16 hex digits are this node's interface id.
    #[arg(long, env = "HOSHINO_MACHINE_ID_FILE", value_name = "FILE", default_value = DEFAULT_MACHINE_ID_FILE)]
    pub machine_id_file: PathBuf,
}

/// Where the network is (its bucket) and its key: shared by `tunnel`, `attach`, `peers` and
/// `hosts`.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// Bucket shared by the network's nodes (required).
    #[arg(long, env = "HOSHINO_BUCKET", help_heading = "S3")]
    pub bucket: Option<String>,
    /// S3 endpoint URL for non-AWS servers (MinIO, Garage, R2...) [default: AWS_ENDPOINT_URL, else AWS].
    #[arg(
        long,
        env = "HOSHINO_ENDPOINT_URL",
        help_heading = "S3",
        value_name = "URL"
    )]
    pub endpoint_url: Option<String>,
    /// Region [default: the AWS chain's (AWS_REGION, profile), else us-east-1].
    #[arg(long, env = "HOSHINO_REGION", help_heading = "S3")]
    pub region: Option<String>,
    /// Address the bucket as URL path instead of host name (most non-AWS servers).
    #[arg(long, env = "HOSHINO_PATH_STYLE", help_heading = "S3", num_args = 0..=1,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub path_style: bool,
    /// Per-attempt S3 timeout.
    #[arg(long, env = "HOSHINO_S3_ATTEMPT_TIMEOUT", help_heading = "S3", value_name = "DURATION",
          default_value_t = duration(s3_defaults().attempt_timeout))]
    pub s3_attempt_timeout: humantime::Duration,
    /// Whole S3 call timeout including retries.
    #[arg(long, env = "HOSHINO_S3_TIMEOUT", help_heading = "S3", value_name = "DURATION",
          default_value_t = duration(s3_defaults().operation_timeout))]
    pub s3_timeout: humantime::Duration,
    /// Attempts per S3 call (each counted, as billed); 5xx, SlowDown, timeouts and resets are
    /// retried with backoff from 25 ms to 1 s, riding out ~6.5 s of outage.
    #[arg(long, env = "HOSHINO_S3_MAX_ATTEMPTS", help_heading = "S3",
          default_value_t = s3_defaults().max_attempts)]
    pub s3_max_attempts: u32,
    /// File holding the network key (16+ bytes): bundles are then encrypted and authenticated
    /// (format v2, XChaCha20-Poly1305) and plaintext ones rejected [default: none, plaintext].
    /// It must be owned by root or the agent's user and private (`chmod 600`).
    #[arg(
        long,
        env = "HOSHINO_NETWORK_KEY_FILE",
        help_heading = "Node",
        value_name = "FILE"
    )]
    pub network_key_file: Option<PathBuf>,
}

/// The agent's state directory: shared by `tunnel` and `status`.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Directory for the delivery cursor `cursor-<node id>` (exactly-once delivery across
    /// restarts) and the control socket `control.sock` (for `status`).
    #[arg(long, env = "HOSHINO_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TunnelArgs {
    #[command(flatten)]
    pub s3: S3Args,

    /// TUN interface name.
    #[arg(long, env = "HOSHINO_TUN_NAME", help_heading = "Node", default_value = DEFAULT_TUN_NAME)]
    pub tun_name: String,
    /// TUN MTU.
    #[arg(long, env = "HOSHINO_MTU", help_heading = "Node", default_value_t = DEFAULT_MTU)]
    pub mtu: u32,
    #[command(flatten, next_help_heading = "Node")]
    pub node: NodeArgs,
    /// This node's name in the directory and in DNS (one DNS label) [default: the short host
    /// name, lowercased].
    #[arg(long, env = "HOSHINO_NAME", help_heading = "Node")]
    pub name: Option<String>,
    /// Answer AAAA queries for `<name>.<dns-domain>` on the tunnel address.
    #[arg(long, env = "HOSHINO_DNS", help_heading = "Names", num_args = 0..=1,
          default_value_t = true, default_missing_value = "true", value_name = "BOOL")]
    pub dns: bool,
    /// UDP port of the name responder on the tunnel address.
    #[arg(long, env = "HOSHINO_DNS_PORT", help_heading = "Names", default_value_t = hoshino_agent::dns::DNS_PORT)]
    pub dns_port: u16,
    #[command(flatten, next_help_heading = "Names")]
    pub domain: super::hosts::DomainArgs,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].
    #[arg(
        long,
        env = "HOSHINO_METRICS_LISTEN",
        help_heading = "Node",
        value_name = "ADDR:PORT"
    )]
    pub metrics_listen: Option<SocketAddr>,

    /// Fastest inbox poll interval, used while objects arrive.
    #[arg(long, env = "HOSHINO_HEARTBEAT_MIN", help_heading = "Polling", value_name = "DURATION",
          default_value_t = duration(HeartbeatConfig::default().min))]
    pub heartbeat_min: humantime::Duration,
    /// Slowest inbox poll interval while active.
    #[arg(long, env = "HOSHINO_HEARTBEAT_MAX", help_heading = "Polling", value_name = "DURATION",
          default_value_t = duration(HeartbeatConfig::default().max))]
    pub heartbeat_max: humantime::Duration,
    /// How long polling stays at the minimum after the last find.
    #[arg(long, env = "HOSHINO_HEARTBEAT_LINGER", help_heading = "Polling", value_name = "DURATION",
          default_value_t = duration(HeartbeatConfig::default().linger))]
    pub heartbeat_linger: humantime::Duration,
    /// Doorbell read (GET) interval when idle (10 s without a find).
    #[arg(long, env = "HOSHINO_IDLE_POLL", help_heading = "Polling", value_name = "DURATION",
          default_value_t = duration(HeartbeatConfig::default().idle_poll))]
    pub idle_poll: humantime::Duration,

    /// Flush a destination's bundle at this size.
    #[arg(long, env = "HOSHINO_BUNDLE_MAX_BYTES", help_heading = "Bundling", value_name = "BYTES",
          default_value_t = BundlerConfig::default().max_bytes)]
    pub bundle_max_bytes: usize,
    /// While a PUT to its destination is in flight, flush a bundle anyway when its oldest
    /// packet is this old (without one, a bundle leaves at once).
    #[arg(long, env = "HOSHINO_BUNDLE_MAX_AGE", help_heading = "Bundling", value_name = "DURATION",
          default_value_t = duration(BundlerConfig::default().max_age))]
    pub bundle_max_age: humantime::Duration,
    /// Bytes per second to and from a destination (together) above which it is under load.
    /// Under load a bundle that is not full waits for the destination's next bundle to be
    /// delivered here and then for a pause in its own input (`--bundle-gather`), so one bundle
    /// per round trip carries a TCP window each way; below it a packet to a quiet destination
    /// leaves at once. 0: never under load.
    #[arg(long, env = "HOSHINO_BUNDLE_LOAD_RATE", help_heading = "Bundling", value_name = "BYTES",
          default_value_t = BundlerConfig::default().load_rate)]
    pub bundle_load_rate: u64,
    /// Under load, after a reply from its destination arrived, a bundle leaves once no packet
    /// came for this long, or for 4 of its usual packet spacings if longer (at most 10 ms; BBR
    /// paces segments apart), and at the latest `--bundle-reply-hold` PUT latencies after the
    /// reply.
    #[arg(long, env = "HOSHINO_BUNDLE_GATHER", help_heading = "Bundling", value_name = "DURATION",
          default_value_t = duration(BundlerConfig::default().gather))]
    pub bundle_gather: humantime::Duration,
    /// Under load with no reply heard, a bundle leaves this many PUT latencies (EWMA) after our
    /// last PUT to its destination ended (within 2-250 ms).
    #[arg(long, env = "HOSHINO_BUNDLE_REPLY_WAIT", help_heading = "Bundling", value_name = "PUTS",
          default_value_t = BundlerConfig::default().reply_wait)]
    pub bundle_reply_wait: u32,
    /// Under load, PUT latencies (EWMA) after a reply from its destination that a bundle whose
    /// input never pauses (many flows, a paced one) keeps filling (within 2-250 ms). More makes
    /// larger bundles of many flows; every millisecond is added to a paced flow's round trip.
    #[arg(long, env = "HOSHINO_BUNDLE_REPLY_HOLD", help_heading = "Bundling", value_name = "PUTS",
          default_value_t = BundlerConfig::default().reply_hold)]
    pub bundle_reply_hold: u32,
    /// Under load, the least time between two bundles to a destination that are not full (0:
    /// off). Fewer PUTs per GiB where the round trip is shorter than the pace, at the price of
    /// throughput and of up to this much latency under load: a knob for cost over speed.
    #[arg(long, env = "HOSHINO_BUNDLE_PACE", help_heading = "Bundling", value_name = "DURATION",
          default_value_t = duration(BundlerConfig::default().pace))]
    pub bundle_pace: humantime::Duration,
    /// PUTs per destination the age rule may have in flight; full bundles always leave.
    #[arg(long, env = "HOSHINO_PUTS_PER_DEST", help_heading = "Bundling",
          default_value_t = BundlerConfig::default().puts_per_dest)]
    pub puts_per_dest: usize,
    /// Most PUTs in flight in total.
    #[arg(long, env = "HOSHINO_PUTS_IN_FLIGHT", help_heading = "Bundling",
          default_value_t = BundlerConfig::default().puts_in_flight)]
    pub puts_in_flight: usize,
    /// Bytes of packets buffered for egress before new ones are dropped.
    #[arg(long, env = "HOSHINO_EGRESS_BUFFER_BYTES", help_heading = "Bundling", value_name = "BYTES",
          default_value_t = BundlerConfig::default().buffer_bytes)]
    pub egress_buffer_bytes: usize,

    #[command(flatten, next_help_heading = "Node")]
    pub state: StateArgs,
    /// Byte budget over inbox GETs in flight plus bundles held for reordering; objects beyond it
    /// wait in the bucket (at least 16777216).
    #[arg(long, env = "HOSHINO_INGRESS_BUDGET_BYTES", help_heading = "Polling", value_name = "BYTES",
          default_value_t = tunnel::ingress::DEFAULT_BUDGET_BYTES)]
    pub ingress_budget_bytes: usize,
}

impl S3Args {
    /// Whether a bucket is set (by flag, environment or file).
    pub fn has_bucket(&self) -> bool {
        self.bucket.as_deref().is_some_and(|b| !b.is_empty())
    }

    /// The S3 settings; what is left unset falls back to `AWS_ENDPOINT_URL` and the AWS chain's
    /// region.
    pub fn resolve(&self) -> Result<S3Settings, CliError> {
        let bucket = self
            .bucket
            .clone()
            .filter(|b| !b.is_empty())
            .ok_or(CliError::MissingBucket)?;
        let mut s3 = S3Settings::new(bucket);
        s3.endpoint_url = self
            .endpoint_url
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|u| !u.is_empty());
        s3.region = self.region.clone();
        s3.path_style = self.path_style;
        s3.attempt_timeout = self.s3_attempt_timeout.into();
        s3.operation_timeout = self.s3_timeout.into();
        s3.max_attempts = self.s3_max_attempts;
        Ok(s3)
    }
}

impl TunnelArgs {
    /// `--name`, checked; `None` leaves the default to the tunnel (see `TunnelConfig::name`).
    pub fn node_name(&self) -> Result<Option<NodeName>, CliError> {
        self.name
            .as_deref()
            .map(|name| {
                name.parse()
                    .map_err(|e: NameError| CliError::BadName(e.to_string()))
            })
            .transpose()
    }

    /// Whether a bucket is set (by flag, environment or file): `attach` starts a tunnel then.
    pub fn has_bucket(&self) -> bool {
        self.s3.has_bucket()
    }

    /// The tunnel's configuration. Floors are checked by `TunnelConfig::validate` when it
    /// starts.
    pub fn resolve(&self) -> Result<TunnelConfig, CliError> {
        let s3 = self.s3.resolve()?;
        Ok(TunnelConfig {
            s3,
            name: self.node_name()?,
            dns: self.dns.then(|| DnsConfig {
                domain: self.domain.dns_domain.clone(),
                port: self.dns_port,
            }),
            tun_name: self.tun_name.clone(),
            mtu: self.mtu,
            prefix: self.node.prefix,
            machine_id_file: self.node.machine_id_file.clone(),
            metrics_listen: self.metrics_listen,
            network_key_file: self.s3.network_key_file.clone(),
            heartbeat: HeartbeatConfig {
                min: self.heartbeat_min.into(),
                max: self.heartbeat_max.into(),
                linger: self.heartbeat_linger.into(),
                idle_poll: self.idle_poll.into(),
                ..HeartbeatConfig::default()
            },
            bundler: BundlerConfig {
                max_bytes: self.bundle_max_bytes,
                load_rate: self.bundle_load_rate,
                gather: self.bundle_gather.into(),
                reply_wait: self.bundle_reply_wait,
                reply_hold: self.bundle_reply_hold,
                pace: self.bundle_pace.into(),
                max_age: self.bundle_max_age.into(),
                puts_per_dest: self.puts_per_dest,
                puts_in_flight: self.puts_in_flight,
                buffer_bytes: self.egress_buffer_bytes,
            },
            state_dir: self.state.state_dir.clone(),
            ingress_budget_bytes: self.ingress_budget_bytes,
        })
    }
}

/// Runs the tunnel until SIGINT/SIGTERM.
pub async fn run(args: &TunnelArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => return super::config_error(e),
    };
    match tunnel::run(config, super::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(if e.is_config_error() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            })
        }
    }
}
