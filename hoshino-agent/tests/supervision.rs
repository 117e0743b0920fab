//! The tunnel's supervisor over the real egress loop and a TUN double whose reads fail (as the
//! kernel's TUN does once `ip link del` removed it): supervision ends with an error naming the
//! TUN, instead of a loop that retries forever while the agent looks alive.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hoshino_agent::edge::packet_io::PacketIo;
use hoshino_agent::metrics::Metrics;
use hoshino_agent::node_addr::{NetworkPrefix, NodeAddr, NodeId};
use hoshino_agent::store::memory_store::MemoryStore;
use hoshino_agent::supervisor::{EndReason, LoopFault, Supervisor, WatchedTun};
use hoshino_agent::tunnel::bundler::{Bundler, BundlerConfig};
use hoshino_agent::tunnel::egress::Egress;
use tokio::sync::watch;

/// A TUN whose device is gone: every read fails with `EBADFD`.
struct DeletedTun;

impl PacketIo for DeletedTun {
    async fn recv<'a>(&'a self, _buf: &'a mut [u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }

    fn try_recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }

    async fn send<'a>(&'a self, _packet: &'a [u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }
}

fn egress<T: PacketIo>(tun: Arc<T>) -> Egress<MemoryStore, T> {
    let id = NodeId(0xa);
    Egress {
        tun,
        store: MemoryStore::default(),
        me: NodeAddr {
            prefix: NetworkPrefix::default(),
            id,
        },
        metrics: Arc::new(Metrics::default()),
        bundler: Bundler::new(BundlerConfig::default(), id, 1, None),
        sent: Arc::new(tokio::sync::Notify::new()),
        heard: tokio::sync::mpsc::channel(1).1,
    }
}

#[tokio::test]
async fn a_failing_tun_read_ends_the_tunnels_supervision_with_an_error() {
    let (tun, watch) = WatchedTun::new(Arc::new(DeletedTun), "hoshino0", "tun");
    let (stop, stopped) = watch::channel(false);
    let mut loops = Supervisor::new();
    loops.watch_tun(watch);
    let egress = egress(Arc::new(tun));
    loops.spawn("egress", async move {
        egress.run(stopped).await;
        Ok(())
    });
    let ended = tokio::time::timeout(Duration::from_secs(5), loops.ended())
        .await
        .expect("the supervisor notices the failed TUN");
    assert_eq!(ended.name, "tun");
    match &ended.reason {
        EndReason::Failed(LoopFault::TunRead { tun, source }) => {
            assert_eq!(tun, "hoshino0");
            assert!(source.to_string().contains("bad state"), "{source}");
        }
        other => panic!("expected a TUN read failure, got {other}"),
    }
    assert!(ended.to_string().contains("hoshino0"), "{ended}");
    let _ = stop.send(true);
    loops.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_panicking_loop_beside_a_healthy_egress_ends_supervision() {
    let (tun, _host) = hoshino_agent::edge::packet_io::ChannelTun::new();
    let (stop, stopped) = watch::channel(false);
    let mut loops = Supervisor::new();
    let egress = egress(Arc::new(tun));
    loops.spawn("egress", async move {
        egress.run(stopped).await;
        Ok(())
    });
    loops.spawn("ingress", async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        panic!("injected ingress failure");
    });
    let ended = tokio::time::timeout(Duration::from_secs(5), loops.ended())
        .await
        .expect("the supervisor notices the panic");
    assert_eq!(ended.name, "ingress");
    assert!(
        matches!(&ended.reason, EndReason::Panicked(m) if m == "injected ingress failure"),
        "{ended}"
    );
    let _ = stop.send(true);
    loops.stop(Duration::from_secs(5)).await;
}
