//! Command-line and configuration-file definitions, and their resolution into a `TunnelConfig`.
//!
//! Precedence per setting: command-line flag > environment variable > `--config` file > default.
//! Clap merges flags and environment (every tunnel flag reads `HOSHINO_<NAME>`); the file fills
//! what both left unset; `resolve` applies the defaults.
//!
//! Extending: a subcommand taking the tunnel's flags embeds `#[command(flatten)] tunnel:
//! TunnelArgs` and calls `tunnel.resolve(&file)`; new file keys go in `ConfigFile`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use hoshino_agent::edge::s3::S3Settings;
use hoshino_agent::node_addr::{DEFAULT_PREFIX, NetworkPrefix};
use hoshino_agent::tunnel::bundler::BundlerConfig;
use hoshino_agent::tunnel::heartbeat::HeartbeatConfig;
use hoshino_agent::tunnel::{DEFAULT_MTU, TunnelConfig};

pub mod attach;
pub mod detach;
pub mod policy;

pub const DEFAULT_TUN_NAME: &str = "hoshino0";
pub const DEFAULT_MACHINE_ID_FILE: &str = "/etc/machine-id";

#[derive(Debug, Parser)]
#[command(
    name = "hoshino-agent",
    version,
    about = "Hoshino: IPv6 between hosts through any S3-compatible object store.",
    long_about = "Hoshino: IPv6 between hosts through any S3-compatible object store.\n\n\
        Settings come from flags, then HOSHINO_* environment variables, then the --config file, \
        then defaults. AWS credentials come from the standard AWS chain (environment, profile, \
        instance role).\n\nExit codes: 0 success, 2 usage or configuration error, 1 runtime fault."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, env = "HOSHINO_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// TOML file holding any of the flags (keys are flag names without `--`, e.g.
    /// `bucket = "net"`, `heartbeat-min = "5ms"`). Flags and environment variables override it.
    #[arg(long, env = "HOSHINO_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing would only obscure it
pub enum Command {
    /// Run the tunnel: create the TUN, carry IPv6 packets to other nodes through the bucket.
    Tunnel(TunnelArgs),
    /// Print this node's tunnel address and exit.
    Addr(AddrArgs),
    /// Attach the policy classifier to an interface; tunnel and divert what the policy says.
    Attach(attach::AttachArgs),
    /// Remove the classifier `attach` left pinned on an interface (link, maps, pins).
    Detach(detach::DetachArgs),
    /// Policy file tools.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// The network's IPv6 /64 [default: fd68:6f73:6869:6e6f::/64, the bytes of "hoshino"].
    #[arg(long, env = "HOSHINO_PREFIX", value_name = "PREFIX/64")]
    pub prefix: Option<String>,
    /// File whose first 16 hex digits are this node's interface id [default: /etc/machine-id].
    #[arg(long, env = "HOSHINO_MACHINE_ID_FILE", value_name = "FILE")]
    pub machine_id_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct AddrArgs {
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Debug, Clone, Default, Args)]
pub struct TunnelArgs {
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
    /// Address the bucket as URL path instead of host name (most non-AWS servers) [default: false].
    #[arg(long, env = "HOSHINO_PATH_STYLE", help_heading = "S3", num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    pub path_style: Option<bool>,
    /// Per-attempt S3 timeout [default: 10s].
    #[arg(long, env = "HOSHINO_S3_ATTEMPT_TIMEOUT", help_heading = "S3", value_parser = parse_duration, value_name = "DURATION")]
    pub s3_attempt_timeout: Option<Duration>,
    /// Whole S3 call timeout including retries [default: 30s].
    #[arg(long, env = "HOSHINO_S3_TIMEOUT", help_heading = "S3", value_parser = parse_duration, value_name = "DURATION")]
    pub s3_timeout: Option<Duration>,
    /// Attempts per S3 call (each counted, as billed); 5xx, SlowDown, timeouts and resets are
    /// retried with backoff from 25 ms to 1 s, riding out ~6.5 s of outage [default: 12].
    #[arg(long, env = "HOSHINO_S3_MAX_ATTEMPTS", help_heading = "S3")]
    pub s3_max_attempts: Option<u32>,

    /// TUN interface name [default: hoshino0].
    #[arg(long, env = "HOSHINO_TUN_NAME", help_heading = "Node")]
    pub tun_name: Option<String>,
    /// TUN MTU [default: 53049].
    #[arg(long, env = "HOSHINO_MTU", help_heading = "Node")]
    pub mtu: Option<u32>,
    #[command(flatten, next_help_heading = "Node")]
    pub node: NodeArgs,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].
    #[arg(
        long,
        env = "HOSHINO_METRICS_LISTEN",
        help_heading = "Node",
        value_name = "ADDR:PORT"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the network key (16+ bytes): bundles are then encrypted and authenticated
    /// (format v2, XChaCha20-Poly1305) and plaintext ones rejected [default: none, plaintext].
    #[arg(
        long,
        env = "HOSHINO_NETWORK_KEY_FILE",
        help_heading = "Node",
        value_name = "FILE"
    )]
    pub network_key_file: Option<PathBuf>,

    /// Fastest inbox poll interval, used while objects arrive [default: 5ms].
    #[arg(long, env = "HOSHINO_HEARTBEAT_MIN", help_heading = "Polling", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_min: Option<Duration>,
    /// Slowest inbox poll interval while active [default: 1s].
    #[arg(long, env = "HOSHINO_HEARTBEAT_MAX", help_heading = "Polling", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_max: Option<Duration>,
    /// How long polling stays at the minimum after the last find [default: 2s].
    #[arg(long, env = "HOSHINO_HEARTBEAT_LINGER", help_heading = "Polling", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_linger: Option<Duration>,
    /// Doorbell HEAD interval when idle (10 s without a find) [default: 1s].
    #[arg(long, env = "HOSHINO_IDLE_POLL", help_heading = "Polling", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_poll: Option<Duration>,

    /// Flush a destination's bundle at this size [default: 4194304].
    #[arg(
        long,
        env = "HOSHINO_BUNDLE_MAX_BYTES",
        help_heading = "Bundling",
        value_name = "BYTES"
    )]
    pub bundle_max_bytes: Option<usize>,
    /// Flush a bundle when its oldest packet is this old [default: 20ms].
    #[arg(long, env = "HOSHINO_BUNDLE_MAX_AGE", help_heading = "Bundling", value_parser = parse_duration, value_name = "DURATION")]
    pub bundle_max_age: Option<Duration>,
    /// Flush at once while a destination has fewer PUTs than this in flight [default: 4].
    #[arg(long, env = "HOSHINO_PUTS_PER_DEST", help_heading = "Bundling")]
    pub puts_per_dest: Option<usize>,
    /// Most PUTs in flight in total [default: 32].
    #[arg(long, env = "HOSHINO_PUTS_IN_FLIGHT", help_heading = "Bundling")]
    pub puts_in_flight: Option<usize>,
    /// Bytes of packets buffered for egress before new ones are dropped [default: 67108864].
    #[arg(
        long,
        env = "HOSHINO_EGRESS_BUFFER_BYTES",
        help_heading = "Bundling",
        value_name = "BYTES"
    )]
    pub egress_buffer_bytes: Option<usize>,

    /// Directory for the delivery cursor `cursor-<node id>` (exactly-once delivery across
    /// restarts) [default: /var/lib/hoshino].
    #[arg(
        long,
        env = "HOSHINO_STATE_DIR",
        help_heading = "Node",
        value_name = "DIR"
    )]
    pub state_dir: Option<PathBuf>,
    /// Byte budget over inbox GETs in flight plus bundles held for reordering; objects beyond it
    /// wait in the bucket [default: 33554432, at least 16777216].
    #[arg(
        long,
        env = "HOSHINO_INGRESS_BUDGET_BYTES",
        help_heading = "Polling",
        value_name = "BYTES"
    )]
    pub ingress_budget_bytes: Option<usize>,
}

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hoshino";

/// The `--config` file: every flag by its long name. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub log_format: Option<LogFormat>,
    pub bucket: Option<String>,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub s3_attempt_timeout: Option<String>,
    pub s3_timeout: Option<String>,
    pub s3_max_attempts: Option<u32>,
    pub tun_name: Option<String>,
    pub mtu: Option<u32>,
    pub prefix: Option<String>,
    pub machine_id_file: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub network_key_file: Option<PathBuf>,
    pub heartbeat_min: Option<String>,
    pub heartbeat_max: Option<String>,
    pub heartbeat_linger: Option<String>,
    pub idle_poll: Option<String>,
    pub bundle_max_bytes: Option<usize>,
    pub bundle_max_age: Option<String>,
    pub puts_per_dest: Option<usize>,
    pub puts_in_flight: Option<usize>,
    pub egress_buffer_bytes: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub ingress_budget_bytes: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("cannot read config file {path}: {reason}")]
    ConfigUnreadable { path: PathBuf, reason: String },
    #[error("{path}:{line}: {message}")]
    ConfigInvalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{source_name}: `{key}`: {message}")]
    BadValue {
        source_name: String,
        key: &'static str,
        message: String,
    },
    #[error("--bucket (HOSHINO_BUCKET, or `bucket` in the config file) is required")]
    MissingBucket,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::ConfigUnreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        ConfigFile::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, CliError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text.get(..s.start).unwrap_or(text).matches('\n').count() + 1)
                .unwrap_or(1);
            CliError::ConfigInvalid {
                path: path.to_path_buf(),
                line,
                message: e.message().trim().to_string(),
            }
        })
    }
}

/// Parses `250ms`, `1s`, `1.5s`, `2m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 5ms, 1s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "us" => value / 1e6,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use us, ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

fn file_duration(
    v: &Option<String>,
    key: &'static str,
    path: &Path,
) -> Result<Option<Duration>, CliError> {
    v.as_deref()
        .map(|s| {
            parse_duration(s).map_err(|message| CliError::BadValue {
                source_name: path.display().to_string(),
                key,
                message,
            })
        })
        .transpose()
}

impl NodeArgs {
    pub fn prefix(&self, file: &ConfigFile) -> Result<NetworkPrefix, CliError> {
        let raw = self
            .prefix
            .clone()
            .or_else(|| file.prefix.clone())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        raw.parse().map_err(
            |e: hoshino_agent::node_addr::NodeAddrError| CliError::BadValue {
                source_name: "settings".into(),
                key: "prefix",
                message: e.to_string(),
            },
        )
    }

    pub fn machine_id_file(&self, file: &ConfigFile) -> PathBuf {
        self.machine_id_file
            .clone()
            .or_else(|| file.machine_id_file.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MACHINE_ID_FILE))
    }
}

impl TunnelArgs {
    /// Merges with the config file (`path` names it in errors) and applies defaults.
    pub fn resolve(&self, file: &ConfigFile, path: &Path) -> Result<TunnelConfig, CliError> {
        let bucket = self
            .bucket
            .clone()
            .or_else(|| file.bucket.clone())
            .filter(|b| !b.is_empty())
            .ok_or(CliError::MissingBucket)?;
        let mut s3 = S3Settings::new(bucket);
        s3.endpoint_url = self
            .endpoint_url
            .clone()
            .or_else(|| file.endpoint_url.clone())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|u| !u.is_empty());
        s3.region = self.region.clone().or_else(|| file.region.clone());
        s3.path_style = self.path_style.or(file.path_style).unwrap_or(false);
        let d = |flag: Option<Duration>,
                 v: &Option<String>,
                 key|
         -> Result<Option<Duration>, CliError> {
            Ok(flag.or(file_duration(v, key, path)?))
        };
        if let Some(t) = d(
            self.s3_attempt_timeout,
            &file.s3_attempt_timeout,
            "s3-attempt-timeout",
        )? {
            s3.attempt_timeout = t;
        }
        if let Some(t) = d(self.s3_timeout, &file.s3_timeout, "s3-timeout")? {
            s3.operation_timeout = t;
        }
        if let Some(n) = self.s3_max_attempts.or(file.s3_max_attempts) {
            s3.max_attempts = n;
        }
        let metrics_listen = match (&self.metrics_listen, &file.metrics_listen) {
            (Some(a), _) => Some(*a),
            (None, Some(s)) => Some(s.parse().map_err(|_| CliError::BadValue {
                source_name: path.display().to_string(),
                key: "metrics-listen",
                message: format!("`{s}` is not ADDR:PORT"),
            })?),
            (None, None) => None,
        };
        let hb_default = HeartbeatConfig::default();
        let heartbeat = HeartbeatConfig {
            min: d(self.heartbeat_min, &file.heartbeat_min, "heartbeat-min")?
                .unwrap_or(hb_default.min),
            max: d(self.heartbeat_max, &file.heartbeat_max, "heartbeat-max")?
                .unwrap_or(hb_default.max),
            linger: d(
                self.heartbeat_linger,
                &file.heartbeat_linger,
                "heartbeat-linger",
            )?
            .unwrap_or(hb_default.linger),
            idle_poll: d(self.idle_poll, &file.idle_poll, "idle-poll")?
                .unwrap_or(hb_default.idle_poll),
            idle_after: hb_default.idle_after,
        };
        let bd = BundlerConfig::default();
        let bundler = BundlerConfig {
            max_bytes: self
                .bundle_max_bytes
                .or(file.bundle_max_bytes)
                .unwrap_or(bd.max_bytes),
            max_age: d(self.bundle_max_age, &file.bundle_max_age, "bundle-max-age")?
                .unwrap_or(bd.max_age),
            puts_per_dest: self
                .puts_per_dest
                .or(file.puts_per_dest)
                .unwrap_or(bd.puts_per_dest),
            puts_in_flight: self
                .puts_in_flight
                .or(file.puts_in_flight)
                .unwrap_or(bd.puts_in_flight),
            buffer_bytes: self
                .egress_buffer_bytes
                .or(file.egress_buffer_bytes)
                .unwrap_or(bd.buffer_bytes),
        };
        Ok(TunnelConfig {
            s3,
            tun_name: self
                .tun_name
                .clone()
                .or_else(|| file.tun_name.clone())
                .unwrap_or_else(|| DEFAULT_TUN_NAME.to_string()),
            mtu: self.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU),
            prefix: self.node.prefix(file)?,
            machine_id_file: self.node.machine_id_file(file),
            metrics_listen,
            network_key_file: self
                .network_key_file
                .clone()
                .or_else(|| file.network_key_file.clone()),
            heartbeat,
            bundler,
            state_dir: self
                .state_dir
                .clone()
                .or_else(|| file.state_dir.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            ingress_budget_bytes: self
                .ingress_budget_bytes
                .or(file.ingress_budget_bytes)
                .unwrap_or(hoshino_agent::tunnel::ingress::DEFAULT_BUDGET_BYTES),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn p() -> &'static Path {
        Path::new("hoshino.toml")
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_millis(20)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1e400s").is_err());
    }

    #[test]
    fn unknown_config_key_is_an_error_with_file_and_line() {
        let err = ConfigFile::parse("bucket = \"b\"\n\nbukket = \"x\"\n", p()).unwrap_err();
        let CliError::ConfigInvalid { line, message, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*line, 3);
        assert!(message.contains("bukket"), "{message}");
        assert!(err.to_string().starts_with("hoshino.toml:3:"), "{err}");
    }

    #[test]
    fn wrong_type_in_config_names_the_line() {
        let err = ConfigFile::parse("mtu = \"big\"\n", p()).unwrap_err();
        assert!(
            matches!(err, CliError::ConfigInvalid { line: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let args = TunnelArgs {
            bucket: Some("b".into()),
            ..TunnelArgs::default()
        };
        let c = args.resolve(&ConfigFile::default(), p()).unwrap();
        assert_eq!(c.tun_name, "hoshino0");
        assert_eq!(c.mtu, 53_049);
        assert_eq!(c.prefix, NetworkPrefix::default());
        assert_eq!(c.machine_id_file, PathBuf::from("/etc/machine-id"));
        assert_eq!(c.heartbeat, HeartbeatConfig::default());
        assert_eq!(c.bundler, BundlerConfig::default());
        assert!(!c.s3.path_style);
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file = ConfigFile::parse(
            "bucket = \"from-file\"\nmtu = 9000\nheartbeat-min = \"10ms\"\npath-style = true\nmetrics-listen = \"127.0.0.1:9100\"\n",
            p(),
        )
        .unwrap();
        let args = TunnelArgs {
            mtu: Some(1500),
            ..TunnelArgs::default()
        };
        let c = args.resolve(&file, p()).unwrap();
        assert_eq!(c.s3.bucket, "from-file");
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.heartbeat.min, Duration::from_millis(10));
        assert!(c.s3.path_style);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn missing_bucket_is_a_configuration_error() {
        let err = TunnelArgs::default()
            .resolve(&ConfigFile::default(), p())
            .unwrap_err();
        assert_eq!(err, CliError::MissingBucket);
    }

    #[test]
    fn bad_duration_in_file_names_the_key() {
        let file = ConfigFile::parse("bucket = \"b\"\nidle-poll = \"soon\"\n", p()).unwrap();
        let err = TunnelArgs::default().resolve(&file, p()).unwrap_err();
        assert!(err.to_string().contains("idle-poll"), "{err}");
    }

    #[test]
    fn path_style_flag_without_value_means_true() {
        let cli = Cli::try_parse_from(["hoshino-agent", "tunnel", "--bucket", "b", "--path-style"])
            .unwrap();
        let Command::Tunnel(t) = cli.command else {
            panic!()
        };
        assert_eq!(t.path_style, Some(true));
    }

    #[test]
    fn every_file_key_is_accepted() {
        let text = r#"
log-format = "json"
bucket = "b"
endpoint-url = "http://127.0.0.1:9000"
region = "r"
path-style = true
s3-attempt-timeout = "2s"
s3-timeout = "10s"
s3-max-attempts = 3
tun-name = "hs0"
mtu = 1500
prefix = "fd00:1::/64"
machine-id-file = "/tmp/mid"
metrics-listen = "127.0.0.1:0"
network-key-file = "/tmp/key"
heartbeat-min = "5ms"
heartbeat-max = "1s"
heartbeat-linger = "2s"
idle-poll = "1s"
bundle-max-bytes = 1048576
bundle-max-age = "20ms"
puts-per-dest = 4
puts-in-flight = 32
egress-buffer-bytes = 67108864
"#;
        let file = ConfigFile::parse(text, p()).unwrap();
        let c = TunnelArgs::default().resolve(&file, p()).unwrap();
        assert_eq!(c.tun_name, "hs0");
        assert_eq!(c.s3.max_attempts, 3);
        assert_eq!(file.log_format, Some(LogFormat::Json));
    }
}
