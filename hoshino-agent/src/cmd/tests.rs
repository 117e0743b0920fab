//! The command line as a specification: one declaration per setting, its precedence, the
//! config file's errors.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::CommandFactory;
use hoshino_agent::node_addr::NetworkPrefix;
use hoshino_agent::tunnel::bundler::BundlerConfig;
use hoshino_agent::tunnel::heartbeat::HeartbeatConfig;

use super::*;

/// A config file with `text` in a fresh temporary directory.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> TempConfig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hoshino-cmd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).expect("config file");
        TempConfig(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn p() -> &'static Path {
    Path::new("hoshino.toml")
}

fn tunnel_args(args: &[&str]) -> tunnel::TunnelArgs {
    let all = ["hoshino-agent", "tunnel"].iter().chain(args);
    match parse(all.copied()) {
        Ok(Cli {
            command: Command::Tunnel(t),
            ..
        }) => t,
        Ok(other) => panic!("not a tunnel command: {other:?}"),
        Err(ParseError::Usage(e)) => panic!("{e}"),
        Err(ParseError::Config(e)) => panic!("{e}"),
    }
}

fn config_error(args: &[&str]) -> CliError {
    match parse(args.iter().copied()) {
        Err(ParseError::Config(e)) => e,
        Err(ParseError::Usage(e)) => panic!("a usage error, not a config error: {e}"),
        Ok(cli) => panic!("accepted: {cli:?}"),
    }
}

#[test]
fn clap_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn every_flag_is_also_its_hoshino_environment_variable() {
    fn check(command: &clap::Command, path: &str) {
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            let expected = format!("HOSHINO_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "{path} --{long}"
            );
        }
        for sub in command.get_subcommands() {
            check(sub, &format!("{path} {}", sub.get_name()));
        }
    }
    check(&Cli::command(), "hoshino-agent");
}

#[test]
fn durations_parse_with_humantime_units() {
    let t = tunnel_args(&[
        "--heartbeat-min",
        "250us",
        "--heartbeat-max",
        "1.5s",
        "--s3-timeout",
        "2m",
    ]);
    assert_eq!(Duration::from(t.heartbeat_min), Duration::from_micros(250));
    assert_eq!(Duration::from(t.heartbeat_max), Duration::from_millis(1500));
    assert_eq!(Duration::from(t.s3.s3_timeout), Duration::from_secs(120));
    for bad in ["fast", "5 parsecs", "20"] {
        let all = ["hoshino-agent", "tunnel", "--idle-poll", bad];
        assert!(
            matches!(parse(all), Err(ParseError::Usage(_))),
            "`{bad}` accepted as a duration"
        );
    }
}

#[test]
fn unknown_config_key_is_an_error_with_file_and_line() {
    let err = ConfigFile::parse("bucket = \"b\"\n\nbukket = \"x\"\n", p())
        .unwrap()
        .apply(Cli::command())
        .unwrap_err();
    let CliError::ConfigInvalid { line, message, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*line, 3);
    assert!(message.contains("bukket"), "{message}");
    assert!(message.contains("`bucket`"), "lists the keys: {message}");
    assert!(err.to_string().starts_with("hoshino.toml:3:"), "{err}");
}

#[test]
fn a_bad_value_in_the_file_names_its_line_and_key() {
    let err = ConfigFile::parse("bucket = \"b\"\nmtu = \"big\"\n", p())
        .unwrap()
        .apply(Cli::command())
        .unwrap_err();
    assert!(
        matches!(&err, CliError::ConfigInvalid { line: 2, message, .. } if message.contains("`mtu`")),
        "{err:?}"
    );
    let err = ConfigFile::parse("idle-poll = \"soon\"\n", p())
        .unwrap()
        .apply(Cli::command())
        .unwrap_err();
    assert!(
        err.to_string().starts_with("hoshino.toml:1: `idle-poll`"),
        "{err}"
    );
    let err = ConfigFile::parse("mtu = [1500]\n", p()).unwrap_err();
    assert!(
        matches!(&err, CliError::ConfigInvalid { line: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn the_config_key_itself_cannot_be_set_in_the_file() {
    let err = ConfigFile::parse("config = \"/etc/other.toml\"\n", p())
        .unwrap()
        .apply(Cli::command())
        .unwrap_err();
    assert!(
        matches!(err, CliError::ConfigInvalid { line: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let c = tunnel_args(&["--bucket", "b"]).resolve().unwrap();
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
    let file = TempConfig::new(
        "bucket = \"from-file\"\nmtu = 9000\nheartbeat-min = \"10ms\"\npath-style = true\nmetrics-listen = \"127.0.0.1:9100\"\n",
    );
    let t = tunnel_args(&["--config", file.arg(), "--mtu", "1500"]);
    let c = t.resolve().unwrap();
    assert_eq!(c.s3.bucket, "from-file");
    assert_eq!(c.mtu, 1500);
    assert_eq!(c.heartbeat.min, Duration::from_millis(10));
    assert_eq!(c.heartbeat.max, HeartbeatConfig::default().max);
    assert!(c.s3.path_style);
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
}

#[test]
fn resolved_reads_the_tunnels_link_port_and_domain_from_the_same_file() {
    let file = TempConfig::new(
        "bucket = \"b\"\ntun-name = \"hs1\"\ndns-port = 5300\ndns-domain = \"net.internal\"\nprefix = \"fd00:1::/64\"\n",
    );
    let cli = parse(["hoshino-agent", "--config", file.arg(), "resolved"]).unwrap();
    let Command::Resolved(r) = cli.command else {
        panic!("{cli:?}")
    };
    assert_eq!(r.bucket.as_deref(), Some("b"));
    assert_eq!(r.tun_name, "hs1");
    assert_eq!(r.dns_port, 5300);
    assert_eq!(r.domain.dns_domain.to_string(), "net.internal");
    assert_eq!(r.node.prefix, "fd00:1::/64".parse().unwrap());
    assert!(r.dns);
    assert_eq!(r.tun_wait, Duration::from_secs(30));
}

#[test]
fn one_file_serves_every_subcommand_each_taking_its_own_keys() {
    let file = TempConfig::new(
        "bucket = \"b\"\ninterface = \"eth1\"\npolicy = \"/etc/hoshino/policy.toml\"\nprefix = \"fd00:1::/64\"\nlog-verdicts = true\n",
    );
    let attach = parse(["hoshino-agent", "--config", file.arg(), "attach"]).unwrap();
    let Command::Attach(a) = attach.command else {
        panic!("{attach:?}")
    };
    assert_eq!(a.interface, "eth1");
    assert_eq!(a.policy, PathBuf::from("/etc/hoshino/policy.toml"));
    assert!(a.log_verdicts);
    assert!(a.tunnel.has_bucket());
    let detach = parse(["hoshino-agent", "--config", file.arg(), "detach"]).unwrap();
    assert!(matches!(&detach.command, Command::Detach(d) if d.interface == "eth1"));
    let addr = parse(["hoshino-agent", "addr", "--config", file.arg()]).unwrap();
    let Command::Addr(addr) = addr.command else {
        panic!()
    };
    assert_eq!(addr.node.prefix, "fd00:1::/64".parse().unwrap());
}

#[test]
fn an_unreadable_config_file_is_a_configuration_error() {
    let err = config_error(&[
        "hoshino-agent",
        "--config",
        "/nonexistent/agent.toml",
        "addr",
    ]);
    assert!(matches!(err, CliError::ConfigUnreadable { .. }), "{err:?}");
}

#[test]
fn missing_bucket_is_a_configuration_error() {
    let err = tunnel_args(&[]).resolve().unwrap_err();
    assert_eq!(err, CliError::MissingBucket);
}

#[test]
fn path_style_flag_without_value_means_true() {
    assert!(
        tunnel_args(&["--bucket", "b", "--path-style"])
            .s3
            .path_style
    );
    assert!(
        !tunnel_args(&["--bucket", "b", "--path-style", "false"])
            .s3
            .path_style
    );
}

#[test]
fn worker_threads_default_to_two_and_refuse_zero() {
    let cli = parse(["hoshino-agent", "addr"]).unwrap();
    assert_eq!(cli.worker_threads.get(), DEFAULT_WORKER_THREADS);
    let cli = parse(["hoshino-agent", "--worker-threads", "4", "addr"]).unwrap();
    assert_eq!(cli.worker_threads.get(), 4);
    assert!(matches!(
        parse(["hoshino-agent", "--worker-threads", "0", "addr"]),
        Err(ParseError::Usage(_))
    ));
}

#[test]
fn every_tunnel_file_key_is_accepted() {
    let file = TempConfig::new(
        r#"
log-format = "json"
worker-threads = 3
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
state-dir = "/tmp/state"
ingress-budget-bytes = 33554432
"#,
    );
    let cli = parse(["hoshino-agent", "--config", file.arg(), "tunnel"]).unwrap();
    assert_eq!(cli.log_format, LogFormat::Json);
    assert_eq!(cli.worker_threads.get(), 3);
    let Command::Tunnel(t) = cli.command else {
        panic!()
    };
    let c = t.resolve().unwrap();
    assert_eq!(c.tun_name, "hs0");
    assert_eq!(c.s3.max_attempts, 3);
    assert_eq!(c.bundler.max_bytes, 1_048_576);
    assert_eq!(c.state_dir, PathBuf::from("/tmp/state"));
}
