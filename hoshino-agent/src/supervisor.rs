//! Supervision of the agent's long-running loops (egress, ingress, divert, metrics listener).
//!
//! A loop that returns, fails or panics while the agent is meant to run leaves the agent
//! half-alive: a tunnel whose receiver died still takes packets and never answers. So every loop
//! runs under a [`Supervisor`]; the first loop to end, for any reason, is reported
//! ([`LoopEnded`]), and the command removes its kernel state and exits 1 (systemd restarts it).
//!
//! A TUN deleted under the agent (`ip link del hoshino0`) makes every read of its descriptor fail
//! (`EBADFD`), but the loops that read it were written to ride out a transient error. The
//! [`WatchedTun`] wrapper around the loops' `PacketIo` reports a failed read (or a write to a
//! device that is gone) as a fault of its own, which ends supervision the same way.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{Id, JoinSet};

use crate::edge::packet_io::PacketIo;

/// Why a supervised loop stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum LoopFault {
    #[error("reading the TUN {tun} failed: {source}")]
    TunRead { tun: String, source: io::Error },
    #[error("writing into the TUN {tun} failed, the device is gone: {source}")]
    TunGone { tun: String, source: io::Error },
    #[error("the metrics listener on {addr} failed: {source}")]
    MetricsListener {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// How a loop ended.
#[derive(Debug, thiserror::Error)]
pub enum EndReason {
    #[error("returned although the agent was not shutting down")]
    Returned,
    #[error(transparent)]
    Failed(LoopFault),
    #[error("panicked: {0}")]
    Panicked(String),
    #[error("was cancelled")]
    Cancelled,
}

/// The first loop that ended, and why.
#[derive(Debug, thiserror::Error)]
#[error("the {name} loop {reason}")]
pub struct LoopEnded {
    pub name: &'static str,
    pub reason: EndReason,
}

/// Named loops running as tokio tasks; the first to end is reported by [`Supervisor::ended`].
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<Result<(), LoopFault>>,
    names: HashMap<Id, &'static str>,
    watches: Vec<TunWatch>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` as the loop `name`.
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), LoopFault>> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Also ends supervision when the TUN behind `watch` fails.
    pub fn watch_tun(&mut self, watch: TunWatch) {
        self.watches.push(watch);
    }

    /// Number of loops still running.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits until a loop ends or a watched TUN fails. Never resolves if nothing is supervised
    /// (an agent without loops has nothing that can die under it).
    pub async fn ended(&mut self) -> LoopEnded {
        let watches = self.watches.clone();
        let tun_failed = async move {
            if watches.is_empty() {
                return std::future::pending().await;
            }
            let waits = watches.iter().map(|w| Box::pin(w.failed()));
            futures::future::select_all(waits).await.0
        };
        tokio::select! {
            fault = tun_failed => LoopEnded { name: fault.0, reason: EndReason::Failed(fault.1) },
            ended = next_end(&mut self.tasks, &mut self.names) => ended,
        }
    }

    /// Waits up to `grace` for every loop to finish (after the caller told them to stop), then
    /// aborts the rest.
    pub async fn stop(mut self, grace: Duration) {
        let all = async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::warn!(error = %e, "a loop panicked while stopping");
                }
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

async fn next_end(
    tasks: &mut JoinSet<Result<(), LoopFault>>,
    names: &mut HashMap<Id, &'static str>,
) -> LoopEnded {
    let Some(done) = tasks.join_next_with_id().await else {
        return std::future::pending().await;
    };
    match done {
        Ok((id, result)) => LoopEnded {
            name: names.remove(&id).unwrap_or("unnamed"),
            reason: match result {
                Ok(()) => EndReason::Returned,
                Err(fault) => EndReason::Failed(fault),
            },
        },
        Err(e) => LoopEnded {
            name: names.remove(&e.id()).unwrap_or("unnamed"),
            reason: if e.is_panic() {
                EndReason::Panicked(panic_text(e.into_panic()))
            } else {
                EndReason::Cancelled
            },
        },
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| (*s).to_string()),
    }
}

/// The failure a [`WatchedTun`] saw first.
#[derive(Clone)]
pub struct TunWatch {
    name: &'static str,
    fault: Arc<Mutex<Option<LoopFault>>>,
    notify: Arc<Notify>,
}

impl TunWatch {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            fault: Arc::new(Mutex::new(None)),
            notify: Arc::new(Notify::new()),
        }
    }

    fn report(&self, fault: LoopFault) {
        let mut slot = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(error = %fault, "TUN failure");
            *slot = Some(fault);
            self.notify.notify_waiters();
            // A waiter that registers after this still finds the fault in the slot.
            self.notify.notify_one();
        }
    }

    async fn failed(&self) -> (&'static str, LoopFault) {
        loop {
            let notified = self.notify.notified();
            if let Some(fault) = self.fault.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return (self.name, fault);
            }
            notified.await;
        }
    }
}

/// A `PacketIo` that reports its device's failure to a [`TunWatch`].
///
/// A failed read is always a fault: a TUN read either returns a packet or waits. A failed
/// write is a fault only when the device is gone (`EBADFD`, `ENODEV`, `ENXIO`, `EIO`); other
/// write errors stay per-packet drops, counted by the loop.
pub struct WatchedTun<T> {
    inner: Arc<T>,
    tun: String,
    watch: TunWatch,
}

impl<T: PacketIo> WatchedTun<T> {
    /// Wraps `inner` (the TUN named `tun`); `loop_name` names the fault in [`LoopEnded`].
    pub fn new(inner: Arc<T>, tun: &str, loop_name: &'static str) -> (Self, TunWatch) {
        let watch = TunWatch::new(loop_name);
        (
            Self {
                inner,
                tun: tun.to_string(),
                watch: watch.clone(),
            },
            watch,
        )
    }

    fn read_failed(&self, e: &io::Error) {
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            self.watch.report(LoopFault::TunRead {
                tun: self.tun.clone(),
                source: io::Error::new(e.kind(), e.to_string()),
            });
        }
    }
}

/// Errors that mean the device under the descriptor no longer exists.
pub fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::ENODEV | libc::ENXIO | libc::EIO)
    )
}

impl<T: PacketIo> PacketIo for WatchedTun<T> {
    async fn recv<'a>(&'a self, buf: &'a mut [u8]) -> io::Result<usize> {
        let read = self.inner.recv(buf).await;
        if let Err(e) = &read {
            self.read_failed(e);
        }
        read
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.try_recv(buf);
        if let Err(e) = &read {
            self.read_failed(e);
        }
        read
    }

    async fn send<'a>(&'a self, packet: &'a [u8]) -> io::Result<usize> {
        let sent = self.inner.send(packet).await;
        if let Err(e) = &sent
            && device_gone(e)
        {
            self.watch.report(LoopFault::TunGone {
                tun: self.tun.clone(),
                source: io::Error::new(e.kind(), e.to_string()),
            });
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_that_returns_ends_supervision_with_its_name() {
        let mut s = Supervisor::new();
        s.spawn("forever", std::future::pending());
        s.spawn("quitter", async { Ok(()) });
        let ended = s.ended().await;
        assert_eq!(ended.name, "quitter");
        assert!(matches!(ended.reason, EndReason::Returned), "{ended}");
        s.stop(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn a_panicking_loop_is_reported_with_its_message() {
        let mut s = Supervisor::new();
        s.spawn("forever", std::future::pending());
        s.spawn("divert", async { panic!("boom in divert") });
        let ended = s.ended().await;
        assert_eq!(ended.name, "divert");
        match ended.reason {
            EndReason::Panicked(text) => assert_eq!(text, "boom in divert"),
            other => panic!("expected a panic, got {other}"),
        }
    }

    #[tokio::test]
    async fn stop_aborts_loops_that_outlive_the_grace_period() {
        let mut s = Supervisor::new();
        s.spawn("stubborn", std::future::pending());
        assert_eq!(s.len(), 1);
        tokio::time::timeout(Duration::from_secs(5), s.stop(Duration::from_millis(10)))
            .await
            .expect("stop returns after the grace period");
    }

    #[tokio::test]
    async fn an_empty_supervisor_never_reports_an_end() {
        let mut s = Supervisor::new();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.ended())
                .await
                .is_err()
        );
    }

    #[test]
    fn gone_devices_are_told_apart_from_per_packet_errors() {
        assert!(device_gone(&io::Error::from_raw_os_error(libc::EBADFD)));
        assert!(device_gone(&io::Error::from_raw_os_error(libc::ENODEV)));
        assert!(!device_gone(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!device_gone(&io::Error::from_raw_os_error(libc::ENOBUFS)));
    }
}
