//! Egress, the send side's driver: packets read from the TUN are classified and handed to the
//! `Outbox` (sans-IO: batching per destination, predictable keys
//! `v2/inbox/<dest>/<session>-<seq>.<us>`, when to ring a doorbell, the skip marker that
//! replaces a PUT the store gave up on); this loop only performs the outbox's actions (PUT and
//! bell tasks, several at once) and counts them.

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use etherparse::Ipv6HeaderSlice;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::edge::clock;
use crate::edge::packet_io::PacketIo;
use crate::metrics::{DropReason, IgnoreReason, Metrics};
use crate::node_addr::{NodeAddr, NodeId};
use crate::store::{S3Error, Store};
use crate::tunnel::bundler::{Bundler, BundlerError};
use crate::tunnel::outbox::{Action, Outbox, Outcome, PutId};

/// Packets read per wake-up before the loop looks at flushes again.
const READ_BATCH: usize = 256;
/// Largest IPv6 packet a TUN can hand us (no jumbograms).
const READ_BUFFER: usize = 65_575;
/// On shutdown, in-flight PUTs get this long to finish.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Where an outgoing packet goes, or why it is not carried.
pub fn classify(packet: &[u8], me: &NodeAddr) -> Result<NodeId, IgnoreReason> {
    match packet.first().map(|b| b >> 4) {
        Some(6) => {}
        Some(_) => return Err(IgnoreReason::NotIpv6),
        None => return Err(IgnoreReason::Malformed),
    }
    let header = Ipv6HeaderSlice::from_slice(packet).map_err(|_| IgnoreReason::Malformed)?;
    // A packet whose length disagrees would make the receiver reject the whole bundle.
    if usize::from(header.payload_length()) + 40 != packet.len() {
        return Err(IgnoreReason::Malformed);
    }
    let dst: Ipv6Addr = header.destination_addr();
    let dest = me.prefix.node_of(&dst).ok_or(IgnoreReason::OutsidePrefix)?;
    if dest == me.id {
        return Err(IgnoreReason::ToSelf);
    }
    // Receivers drop packets whose source is not the sending node, so don't ship them.
    if header.source_addr() != me.ip() {
        return Err(IgnoreReason::ForeignSource);
    }
    Ok(dest)
}

/// Whether `packet` (an IPv6 packet `classify` accepted) may draw an answer from its
/// destination. An ICMPv6 echo reply ends its exchange, so a PUT of only echo replies does not
/// make the receive side look for a reply: for a ping that was a burst of probe GETs per echo
/// answered. ICMPv6 errors are not exempt: a Packet Too Big is followed by the sender's
/// retransmission. Anything else, extension headers included, is taken to draw one.
pub fn draws_answer(packet: &[u8]) -> bool {
    const ICMPV6: u8 = 58;
    const ECHO_REPLY: u8 = 129;
    !matches!(
        (packet.get(6), packet.get(40)),
        (Some(&ICMPV6), Some(&ECHO_REPLY))
    )
}

pub struct Egress<S, T> {
    pub tun: Arc<T>,
    pub store: S,
    pub me: NodeAddr,
    pub metrics: Arc<Metrics>,
    pub bundler: Bundler,
    /// Wakes an idle ingress: replies to what we send are likely.
    pub sent: Arc<tokio::sync::Notify>,
    /// Bundles the ingress delivered, per sender: the replies the bundler clocks itself on.
    pub heard: mpsc::Receiver<Heard>,
}

/// A bundle from `from` of `bytes` was written to the TUN (ingress -> egress).
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    pub from: NodeId,
    pub bytes: usize,
    /// Its sender sealed it full: another follows at once.
    pub more: bool,
}

/// Capacity of the ingress -> egress channel of `Heard`; when full a note is dropped (it is a
/// hint: a missed reply only makes the bundler wait `reply_wait`).
pub const HEARD_CHANNEL: usize = 1024;

/// A finished PUT, as reported to the outbox.
struct PutDone {
    id: PutId,
    result: Result<(), S3Error>,
}

impl<S: Store, T: PacketIo> Egress<S, T> {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Egress {
            tun,
            store,
            me,
            metrics,
            bundler,
            sent,
            mut heard,
        } = self;
        let mut driver = Driver {
            outbox: Outbox::new(bundler, me.id),
            store,
            me,
            metrics,
            sent,
            puts: JoinSet::new(),
            bells: JoinSet::new(),
        };
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let now = clock::now();
            driver.perform_due(now);
            let deadline = driver.outbox.next_deadline(now);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = driver.puts.join_next(), if !driver.puts.is_empty() => {
                    if let Ok(done) = done {
                        driver.put_finished(done);
                    }
                }
                Some(_) = driver.bells.join_next(), if !driver.bells.is_empty() => {}
                Some(h) = heard.recv() => driver.outbox.heard(h.from, h.bytes, h.more, clock::now()),
                r = tun.recv(&mut buf) => match r {
                    Ok(n) => {
                        driver.take_packet(buf.get(..n).unwrap_or_default());
                        for _ in 1..READ_BATCH {
                            match tun.try_recv(&mut buf) {
                                Ok(n) => driver.take_packet(buf.get(..n).unwrap_or_default()),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the TUN failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
        }
        driver.drain().await;
    }
}

/// Performs the outbox's actions: PUT and bell tasks, and the counters.
struct Driver<S> {
    outbox: Outbox,
    store: S,
    me: NodeAddr,
    metrics: Arc<Metrics>,
    sent: Arc<tokio::sync::Notify>,
    puts: JoinSet<PutDone>,
    bells: JoinSet<()>,
}

impl<S: Store> Driver<S> {
    fn perform_due(&mut self, now: Instant) {
        while let Some(action) = self.outbox.poll(now) {
            self.perform(action);
        }
        self.metrics
            .egress_buffer_bytes
            .store(self.outbox.buffered_bytes() as u64, Relaxed);
    }

    fn take_packet(&mut self, packet: &[u8]) {
        match classify(packet, &self.me) {
            Ok(dest) => {
                let answered = draws_answer(packet);
                let reason = match self.outbox.packet(dest, packet, clock::now(), answered) {
                    Ok(()) => return,
                    Err(BundlerError::BufferFull { .. }) => DropReason::EgressBufferFull,
                    Err(BundlerError::NewDestinationsTooFast { .. }) => {
                        DropReason::NewDestinationRate
                    }
                    Err(BundlerError::TooManyDestinations { .. }) => {
                        DropReason::TooManyDestinations
                    }
                };
                self.metrics.dropped(reason, 1);
            }
            Err(reason) => self.metrics.ignored(reason),
        }
    }

    fn perform(&mut self, action: Action) {
        let store = self.store.clone();
        match action {
            Action::Put { id, key, body } => {
                self.puts.spawn(async move {
                    let result = store.put(&key, body).await;
                    PutDone { id, result }
                });
            }
            Action::Ring { key, body } => {
                let metrics = self.metrics.clone();
                self.bells.spawn(async move {
                    match store.put(&key, body).await {
                        Ok(()) => {
                            metrics.bells_rung.fetch_add(1, Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "ringing the doorbell failed"),
                    }
                });
            }
        }
    }

    fn put_finished(&mut self, done: PutDone) {
        let ok = done.result.is_ok();
        match self.outbox.put_done(done.id, ok, clock::now()) {
            Some(Outcome::Sent {
                packets,
                packet_bytes,
                expects_answer,
            }) => {
                self.metrics
                    .egress_packets
                    .fetch_add(u64::from(packets), Relaxed);
                self.metrics.egress_bytes.fetch_add(packet_bytes, Relaxed);
                if expects_answer {
                    self.sent.notify_one();
                }
            }
            Some(Outcome::Dropped { packets }) => {
                if let Err(e) = &done.result {
                    tracing::warn!(error = %e, "skip marker PUT failed");
                }
                self.metrics
                    .dropped(DropReason::PutFailed, u64::from(packets));
            }
            None => {
                if let Err(e) = &done.result {
                    tracing::warn!(error = %e, "bundle PUT failed after retries; its packets are dropped");
                }
            }
        }
    }

    /// Sends what is buffered and waits briefly for in-flight PUTs, so a clean stop loses little.
    async fn drain(mut self) {
        self.outbox.seal_all();
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        loop {
            self.perform_due(clock::now());
            if self.puts.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, self.puts.join_next()).await {
                Ok(Some(Ok(done))) => self.put_finished(done),
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _ = tokio::time::timeout_at(deadline, async {
            while self.bells.join_next().await.is_some() {}
        })
        .await;
        self.puts.abort_all();
        self.bells.abort_all();
    }
}

pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_addr::NetworkPrefix;

    fn me() -> NodeAddr {
        NodeAddr {
            prefix: NetworkPrefix::default(),
            id: NodeId(1),
        }
    }

    fn packet(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = 59;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    #[test]
    fn only_icmpv6_echo_replies_draw_no_answer() {
        let m = me();
        let dst = m.prefix.addr_of(NodeId(0xbeef));
        let with = |next_header: u8, first: u8| {
            let mut p = packet(m.ip(), dst, 8);
            p[6] = next_header;
            p[40] = first;
            p
        };
        assert!(!draws_answer(&with(58, 129)), "echo reply");
        assert!(
            draws_answer(&with(58, 2)),
            "packet too big: a retransmission follows"
        );
        assert!(draws_answer(&with(58, 1)), "destination unreachable");
        assert!(draws_answer(&with(58, 128)), "echo request");
        assert!(draws_answer(&with(58, 135)), "neighbour solicitation");
        assert!(draws_answer(&with(6, 129)), "TCP");
        assert!(draws_answer(&with(17, 129)), "UDP");
        assert!(draws_answer(&with(0, 129)), "behind an extension header");
        assert!(draws_answer(&packet(m.ip(), dst, 0)), "no payload");
    }

    #[test]
    fn packet_to_another_node_goes_to_that_node() {
        let m = me();
        let dst = m.prefix.addr_of(NodeId(0xbeef));
        assert_eq!(classify(&packet(m.ip(), dst, 8), &m), Ok(NodeId(0xbeef)));
    }

    #[test]
    fn ipv4_and_garbage_are_ignored() {
        let m = me();
        assert_eq!(classify(&[0x45; 60], &m), Err(IgnoreReason::NotIpv6));
        assert_eq!(classify(&[], &m), Err(IgnoreReason::Malformed));
        assert_eq!(classify(&[0x60; 20], &m), Err(IgnoreReason::Malformed));
    }

    #[test]
    fn destinations_outside_the_prefix_or_self_are_ignored() {
        let m = me();
        let out: Ipv6Addr = "ff02::16".parse().unwrap();
        assert_eq!(
            classify(&packet(m.ip(), out, 0), &m),
            Err(IgnoreReason::OutsidePrefix)
        );
        assert_eq!(
            classify(&packet(m.ip(), m.ip(), 0), &m),
            Err(IgnoreReason::ToSelf)
        );
    }

    #[test]
    fn length_mismatch_is_malformed() {
        let m = me();
        let mut p = packet(m.ip(), m.prefix.addr_of(NodeId(2)), 8);
        p.push(0);
        assert_eq!(classify(&p, &m), Err(IgnoreReason::Malformed));
    }

    #[test]
    fn foreign_source_is_not_carried() {
        let m = me();
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let p = packet(src, m.prefix.addr_of(NodeId(2)), 0);
        assert_eq!(classify(&p, &m), Err(IgnoreReason::ForeignSource));
    }
}
