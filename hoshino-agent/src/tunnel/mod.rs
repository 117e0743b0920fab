//! Wires the tunnel: node address, TUN, netlink configuration, S3 store, egress and ingress
//! loops, metrics endpoint; and takes it all down again on shutdown.
//!
//! Library API for other subcommands (e.g. `attach`): `Tunnel::start(config)` returns a running
//! tunnel exposing the TUN's name and index (to redirect traffic into it), the node address and
//! the shared `Metrics`; `Tunnel::ended()` resolves when one of its loops ends, fails or
//! panics, or its TUN fails (`supervisor.rs`); `Tunnel::stop()` removes everything from the
//! kernel. `run(config, shutdown)` does both around a shutdown future and returns an error when
//! a loop ended first.

pub mod bundler;
pub mod cursor;
pub mod deletes;
pub mod egress;
pub mod heartbeat;
pub mod inbox;
pub mod ingress;
pub mod outbox;
pub mod probe;
pub mod reorder;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::activity::{CountingTun, NotingStore};
use crate::directory::name::{DnsDomain, NodeName};
use crate::directory::publish::Publisher;
use crate::directory::record::NodeRecord;
use crate::edge::netlink::{LinkConfig, Netlink, NetlinkError};
use crate::edge::s3::{S3Settings, S3Store};
use crate::edge::tun_device::{self, TunError};
use crate::metrics::Metrics;
use crate::node_addr::{NetworkPrefix, NodeAddr, NodeAddrError, NodeId};
use crate::supervisor::{LoopEnded, Supervisor, WatchedTun};
use crate::tunnel::bundler::{Bundler, BundlerConfig};
use crate::tunnel::cursor::CursorFile;
use crate::tunnel::egress::Egress;
use crate::tunnel::heartbeat::HeartbeatConfig;
use crate::tunnel::ingress::Ingress;
use crate::wire::bundle::{MAX_BUNDLE_BYTES, NetworkKey};

/// Smallest MTU IPv6 allows.
pub const MIN_MTU: u32 = 1280;
/// Default TUN MTU (the seed's).
pub const DEFAULT_MTU: u32 = 53_049;

/// Everything the tunnel needs, resolved from flags, environment and config file.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub s3: S3Settings,
    /// This node's name in the directory (`directory/`); `None`: the host name's first label,
    /// or `node-<node id>` when that is not a DNS label (see `directory::name::default_name`).
    pub name: Option<NodeName>,
    /// The name responder on the tunnel address; `None`: off.
    pub dns: Option<DnsConfig>,
    pub tun_name: String,
    pub mtu: u32,
    pub prefix: NetworkPrefix,
    pub machine_id_file: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub network_key_file: Option<PathBuf>,
    pub heartbeat: HeartbeatConfig,
    pub bundler: BundlerConfig,
    /// Where the delivery cursor lives.
    pub state_dir: PathBuf,
    pub ingress_budget_bytes: usize,
}

/// Where and for which domain the name responder answers (`dns/`).
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub domain: DnsDomain,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    NodeAddr(#[from] NodeAddrError),
    #[error("cannot read network key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    MetricsHttp(#[from] crate::edge::metrics_http::MetricsHttpError),
    #[error(transparent)]
    Cursor(#[from] crate::tunnel::cursor::CursorError),
    #[error("tunnel stopped: {0}")]
    LoopEnded(#[from] LoopEnded),
}

impl TunnelError {
    /// Configuration problems (exit code 2) as opposed to runtime faults (exit code 1).
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            TunnelError::NodeAddr(_) | TunnelError::KeyFile { .. } | TunnelError::Config(_)
        ) || matches!(self, TunnelError::Tun(TunError::BadName(_)))
    }
}

/// Floor of `--s3-attempt-timeout`: an attempt cut shorter than an S3 round trip with its tail
/// fails every time and turns into a retry storm.
pub const MIN_S3_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
/// Ceiling of `--s3-max-attempts` (each attempt is billed).
pub const MAX_S3_ATTEMPTS: u32 = 100;
/// Floor of `--bundle-max-age`: below it every packet would leave in a PUT of its own.
pub const MIN_BUNDLE_MAX_AGE: Duration = Duration::from_millis(1);

impl TunnelConfig {
    pub fn validate(&self) -> Result<(), TunnelError> {
        if !(MIN_MTU..=65_535).contains(&self.mtu) {
            return Err(TunnelError::Config(format!(
                "--mtu {} outside {MIN_MTU}..=65535",
                self.mtu
            )));
        }
        if self.s3.bucket.is_empty() {
            return Err(TunnelError::Config("--bucket is required".into()));
        }
        if !tun_device::valid_tun_name(&self.tun_name) {
            return Err(TunError::BadName(self.tun_name.clone()).into());
        }
        self.heartbeat
            .validate()
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let b = &self.bundler;
        if b.max_bytes < 1024 || b.max_bytes + self.mtu as usize + 1024 > MAX_BUNDLE_BYTES {
            return Err(TunnelError::Config(format!(
                "--bundle-max-bytes {} must be at least 1024 and leave room for one MTU-sized packet below {MAX_BUNDLE_BYTES}",
                b.max_bytes
            )));
        }
        let s3 = &self.s3;
        if s3.attempt_timeout < MIN_S3_ATTEMPT_TIMEOUT {
            return Err(TunnelError::Config(format!(
                "--s3-attempt-timeout {:?} must be at least {MIN_S3_ATTEMPT_TIMEOUT:?} (one S3 round trip with a tail)",
                s3.attempt_timeout
            )));
        }
        if s3.operation_timeout < s3.attempt_timeout
            || s3.operation_timeout > crate::tunnel::heartbeat::MAX_INTERVAL
        {
            return Err(TunnelError::Config(format!(
                "--s3-timeout {:?} must be at least --s3-attempt-timeout {:?} and at most {:?}",
                s3.operation_timeout,
                s3.attempt_timeout,
                crate::tunnel::heartbeat::MAX_INTERVAL
            )));
        }
        if !(1..=MAX_S3_ATTEMPTS).contains(&s3.max_attempts) {
            return Err(TunnelError::Config(format!(
                "--s3-max-attempts {} must be between 1 and {MAX_S3_ATTEMPTS}",
                s3.max_attempts
            )));
        }
        if b.max_age < MIN_BUNDLE_MAX_AGE {
            return Err(TunnelError::Config(format!(
                "--bundle-max-age {:?} must be at least {MIN_BUNDLE_MAX_AGE:?}",
                b.max_age
            )));
        }
        if b.max_age > crate::tunnel::heartbeat::MAX_INTERVAL {
            return Err(TunnelError::Config(format!(
                "--bundle-max-age must be at most {:?}",
                crate::tunnel::heartbeat::MAX_INTERVAL
            )));
        }
        if self.ingress_budget_bytes < crate::tunnel::ingress::MIN_BUDGET_BYTES {
            return Err(TunnelError::Config(format!(
                "--ingress-budget-bytes {} must be at least {} (one bundle of the largest size)",
                self.ingress_budget_bytes,
                crate::tunnel::ingress::MIN_BUDGET_BYTES
            )));
        }
        if b.puts_in_flight == 0 {
            return Err(TunnelError::Config(
                "--puts-in-flight must be at least 1".into(),
            ));
        }
        if b.buffer_bytes < b.max_bytes {
            return Err(TunnelError::Config(format!(
                "--egress-buffer-bytes {} must be at least --bundle-max-bytes {}",
                b.buffer_bytes, b.max_bytes
            )));
        }
        Ok(())
    }

    pub fn node_addr(&self) -> Result<NodeAddr, TunnelError> {
        Ok(NodeAddr {
            prefix: self.prefix,
            id: NodeId::from_machine_id_file(&self.machine_id_file)?,
        })
    }

    /// The network key: see `load_network_key`.
    pub fn network_key(&self) -> Result<Option<NetworkKey>, TunnelError> {
        load_network_key(self.network_key_file.as_deref())
    }
}

/// The network key: the file's bytes, one trailing newline ignored; at least 16 bytes.
///
/// Whoever reads the key can decrypt and forge every bundle of the network, and whoever can
/// replace the file chooses the key. So, as OpenSSH does with a private key, the file must be
/// owned by root or by the user running the agent and must grant nothing to group or others
/// (checked on the opened file, so a swapped path cannot pass the check and be read after).
pub fn load_network_key(path: Option<&std::path::Path>) -> Result<Option<NetworkKey>, TunnelError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let Some(path) = path else {
        return Ok(None);
    };
    let err = |reason: String| TunnelError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    // Non-blocking, so a FIFO in its place is refused below instead of hanging the start.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    key_file_safety(meta.mode(), meta.uid(), euid).map_err(err)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    NetworkKey::new(bytes).map(Some).ok_or_else(|| {
        err(format!(
            "key is {} bytes, at least 16 required",
            bytes.len()
        ))
    })
}

/// Why a key file with `mode` owned by `owner` must not be used by a process running as `euid`.
fn key_file_safety(mode: u32, owner: u32, euid: u32) -> Result<(), String> {
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Err("not a regular file".to_owned());
    }
    if owner != 0 && owner != euid {
        return Err(format!(
            "owned by uid {owner}, neither root nor this process's uid {euid}: that user could \
             replace the key"
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:04o} lets group or others read or change it; run chmod 600 on it",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A running tunnel.
pub struct Tunnel {
    pub addr: NodeAddr,
    pub tun_name: String,
    pub ifindex: u32,
    pub metrics: Arc<Metrics>,
    /// Where the metrics endpoint actually listens (useful with port 0).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    loops: Supervisor,
    netlink: Netlink,
    link: LinkConfig,
    tun: Option<tun_device::TunDevice>,
}

impl Tunnel {
    /// Creates and configures the TUN and starts the loops. The `tunnel up` log line follows
    /// once the first inbox poll succeeds.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, TunnelError> {
        config.validate()?;
        let addr = config.node_addr()?;
        let key = config.network_key()?;
        // Before anything touches the kernel: an unreadable cursor is reported, not ignored
        // (ignoring it could deliver bundles twice).
        let cursor_file = CursorFile::new(&config.state_dir, addr.id);
        let cursor = cursor_file.load()?;
        let metrics = Arc::new(Metrics::default());
        let (shutdown, rx) = watch::channel(false);
        let mut loops = Supervisor::new();
        let metrics_addr = match config.metrics_listen {
            Some(listen) => {
                let listener = crate::edge::metrics_http::bind(listen).await?;
                let bound = listener.local_addr().ok();
                loops.spawn(
                    "metrics",
                    crate::edge::metrics_http::serve(listener, metrics.clone(), rx.clone()),
                );
                bound
            }
            None => None,
        };
        let tun = tun_device::create(&config.tun_name)?;
        let netlink = Netlink::connect()?;
        let link = LinkConfig {
            link: tun.name.clone(),
            ifindex: tun.ifindex,
            addr: addr.ip(),
            prefix: config.prefix,
            mtu: config.mtu,
        };
        if let Err(e) = netlink.configure(&link).await {
            let _ = netlink.remove(&link).await;
            let _ = shutdown.send(true);
            loops.stop(Duration::from_secs(1)).await;
            return Err(e.into());
        }
        tracing::info!(tun = %link.link, address = %addr, mtu = config.mtu, "TUN configured");
        let client = crate::edge::s3::client(&config.s3).await;
        // `status` sees per-peer traffic and the last S3 error through these two wrappers.
        let activity = Arc::new(crate::control::activity::Activity::default());
        let store = NotingStore {
            inner: S3Store::with_settings(client, &config.s3, metrics.clone()),
            activity: activity.clone(),
        };
        let session = rand_session();
        // Both loops use the TUN through one watch: a TUN deleted under the agent fails their
        // reads or writes, and the supervisor learns of it at once.
        let (device, tun_watch) = WatchedTun::new(tun.device.clone(), &tun.name, "tun");
        loops.watch_tun(tun_watch);
        let tun_io = Arc::new(CountingTun {
            inner: Arc::new(device),
            prefix: config.prefix,
            activity: activity.clone(),
        });
        let sent = Arc::new(tokio::sync::Notify::new());
        let (heard_tx, heard_rx) = tokio::sync::mpsc::channel(crate::tunnel::egress::HEARD_CHANNEL);
        let egress = Egress {
            tun: tun_io.clone(),
            store: store.clone(),
            me: addr,
            metrics: metrics.clone(),
            bundler: Bundler::new(config.bundler, addr.id, session, key.clone()),
            sent: sent.clone(),
            heard: heard_rx,
        };
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| crate::directory::name::default_name(addr.id));
        tracing::info!(%name, "directory name");
        let publisher = Publisher {
            store: store.clone(),
            record: NodeRecord::new(addr, name.clone(), crate::directory::unix_millis_now()),
            key: key.clone(),
        };
        match crate::control::socket::bind(&config.state_dir) {
            Ok(listener) => {
                let server = crate::control::socket::ControlServer {
                    listener,
                    path: crate::control::socket::socket_path(&config.state_dir),
                    me: crate::control::report::Identity {
                        name: name.to_string(),
                        addr,
                        started_at_unix_ms: crate::directory::unix_millis_now(),
                    },
                    metrics: metrics.clone(),
                    activity,
                };
                let control_rx = rx.clone();
                loops.spawn("control socket", async move {
                    server.run(control_rx).await;
                    Ok(())
                });
            }
            Err(e) => tracing::error!("{e}; `status` cannot reach this agent"),
        }
        if let Some(dns) = &config.dns {
            start_names(dns, addr, tun.ifindex, &store, key.clone(), &rx, &mut loops).await;
        }
        let ingress = Ingress {
            tun: tun_io,
            store,
            me: addr,
            metrics: metrics.clone(),
            key,
            heartbeat: config.heartbeat,
            sent,
            heard: heard_tx,
            cursor,
            cursor_file,
            budget_bytes: config.ingress_budget_bytes,
        };
        let egress_rx = rx.clone();
        loops.spawn("egress", async move {
            egress.run(egress_rx).await;
            Ok(())
        });
        let publisher_rx = rx.clone();
        loops.spawn("directory publisher", async move {
            publisher.run(publisher_rx).await;
            Ok(())
        });
        loops.spawn("ingress", async move {
            ingress.run(rx).await;
            Ok(())
        });
        Ok(Tunnel {
            addr,
            tun_name: link.link.clone(),
            ifindex: link.ifindex,
            metrics,
            metrics_addr,
            shutdown,
            loops,
            netlink,
            link,
            tun: Some(tun),
        })
    }

    /// Resolves when one of the tunnel's loops (egress, ingress, metrics listener) ended, failed
    /// or panicked, or its TUN failed (e.g. was deleted); the caller then stops the tunnel and
    /// exits with a runtime error. Cancel-safe.
    pub async fn ended(&mut self) -> LoopEnded {
        self.loops.ended().await
    }

    /// Stops the loops (letting in-flight PUTs finish briefly) and removes the route, the
    /// address and the TUN from the kernel.
    pub async fn stop(mut self) -> Result<(), TunnelError> {
        let _ = self.shutdown.send(true);
        let loops = std::mem::take(&mut self.loops);
        loops.stop(Duration::from_secs(5)).await;
        let removed = self.netlink.remove(&self.link).await;
        // Closing the last descriptor removes a non-persistent TUN even if the netlink delete
        // failed.
        self.tun.take();
        tracing::info!(tun = %self.link.link, "tunnel down; route, address and link removed");
        removed.map_err(Into::into)
    }
}

/// The directory refresher and the name responder on `[addr]:port`. A socket that cannot be bound
/// (no CAP_NET_BIND_SERVICE for port 53) is logged and leaves the tunnel without names rather
/// than without a tunnel.
async fn start_names(
    dns: &DnsConfig,
    addr: NodeAddr,
    ifindex: u32,
    store: &NotingStore<S3Store>,
    key: Option<NetworkKey>,
    shutdown: &watch::Receiver<bool>,
    loops: &mut Supervisor,
) {
    use crate::directory::refresh::Refresher;
    use crate::dns::server::{Responder, bind};
    let listen = SocketAddr::new(addr.ip().into(), dns.port);
    let socket = match bind(listen).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}; names are not served");
            return;
        }
    };
    tracing::info!(%listen, domain = %dns.domain, "name responder listening");
    let (directory, reader) =
        watch::channel(Arc::new(crate::directory::table::Directory::default()));
    let wanted = Arc::new(tokio::sync::Notify::new());
    let refresher = Refresher {
        store: store.clone(),
        key,
        directory,
        wanted: wanted.clone(),
    };
    let responder = Responder {
        socket,
        domain: dns.domain.clone(),
        directory: reader,
        wanted,
    };
    let refresher_rx = shutdown.clone();
    loops.spawn("directory refresher", async move {
        refresher.run(refresher_rx).await;
        Ok(())
    });
    let responder_rx = shutdown.clone();
    loops.spawn("name responder", async move {
        responder.run(responder_rx).await;
        Ok(())
    });
    let (domain, port) = (dns.domain.clone(), dns.port);
    let mut stop = shutdown.clone();
    // Registered in the background (busctl may take a moment), reverted at shutdown, before the
    // link goes away.
    loops.spawn("resolved registration", async move {
        let ip = addr.ip();
        let registration = tokio::task::spawn_blocking(move || {
            crate::dns::resolved::Registration::register(ifindex, ip, port, &domain)
        })
        .await
        .ok()
        .flatten();
        let _ = stop.wait_for(|s| *s).await;
        if let Some(r) = registration {
            let _ = tokio::task::spawn_blocking(move || r.revert()).await;
        }
        Ok(())
    });
}

/// Starts the tunnel, waits for `shutdown`, stops it.
pub async fn run(
    config: TunnelConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TunnelError> {
    let mut tunnel = Tunnel::start(config).await?;
    let ended = tokio::select! {
        () = shutdown => None,
        ended = tunnel.ended() => Some(ended),
    };
    match ended {
        None => tunnel.stop().await,
        Some(ended) => {
            tracing::error!("{ended}; removing the tunnel from the kernel and exiting");
            if let Err(e) = tunnel.stop().await {
                tracing::warn!(error = %e, "removing the tunnel");
            }
            Err(ended.into())
        }
    }
}

/// A random session id per agent start, so a restarted sender's bundles form a new stream.
fn rand_session() -> u64 {
    let u = ulid::Ulid::new();
    (u.0 as u64) ^ ((u.0 >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const REG: u32 = libc::S_IFREG;

    #[test]
    fn a_key_file_must_be_private_and_owned_by_root_or_the_agents_user() {
        assert_eq!(key_file_safety(REG | 0o600, 0, 0), Ok(()));
        assert_eq!(key_file_safety(REG | 0o400, 1000, 1000), Ok(()));
        assert_eq!(
            key_file_safety(REG | 0o600, 0, 1000),
            Ok(()),
            "root's file, read by a user"
        );
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602, 0o610] {
            let e = key_file_safety(REG | mode, 0, 0).unwrap_err();
            assert!(
                e.contains(&format!("{mode:04o}")) && e.contains("chmod 600"),
                "{e}"
            );
        }
        let e = key_file_safety(REG | 0o600, 1000, 0).unwrap_err();
        assert!(e.contains("uid 1000"), "{e}");
        let e = key_file_safety(libc::S_IFDIR | 0o700, 0, 0).unwrap_err();
        assert!(e.contains("regular"), "{e}");
        let e = key_file_safety(libc::S_IFIFO | 0o600, 0, 0).unwrap_err();
        assert!(e.contains("regular"), "{e}");
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_and_a_private_one_loads() {
        let dir = std::env::temp_dir().join(format!("hoshino-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("network.key");
        std::fs::write(&path, b"sixteen bytes or more\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = load_network_key(Some(&path));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = load_network_key(Some(&path));
        std::fs::write(&path, b"short\n").unwrap();
        let short = load_network_key(Some(&path));
        let fifo = dir.join("fifo.key");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let from_fifo = load_network_key(Some(&fifo));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(from_fifo, Err(TunnelError::KeyFile { ref reason, .. }) if reason.contains("regular")),
            "a FIFO is refused without blocking"
        );
        match refused {
            Err(TunnelError::KeyFile { reason, .. }) => {
                assert!(reason.contains("0644"), "{reason}")
            }
            other => panic!(
                "a 0644 key file was not refused: {:?}",
                other.map(|k| k.is_some())
            ),
        }
        assert!(matches!(loaded, Ok(Some(_))));
        assert!(
            matches!(short, Err(TunnelError::KeyFile { reason, .. }) if reason.contains("5 bytes"))
        );
    }
}
