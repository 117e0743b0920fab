//! Egress: packets read from the TUN are classified, batched per destination by the `Bundler`,
//! and PUT into the destination's inbox under the stream's predictable key
//! (`v2/inbox/<dest>/<session>-<seq>.<us>`), several at once; after a PUT the `BellSchedule`
//! decides whether to ring the destination's doorbell. A PUT the store gave up on (its retries
//! ride out several seconds of outage) is replaced by a skip marker under the same key.

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use etherparse::Ipv6HeaderSlice;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bundler::{Bundler, Sealed};
use crate::clock;
use crate::mailbox::{BellSchedule, BundleKey, bell_key};
use crate::metrics::{DropReason, IgnoreReason, Metrics};
use crate::node_addr::{NodeAddr, NodeId};
use crate::packet_io::PacketIo;
use crate::store::Store;

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

pub struct Egress<S, T> {
    pub tun: Arc<T>,
    pub store: S,
    pub me: NodeAddr,
    pub metrics: Arc<Metrics>,
    pub bundler: Bundler,
    /// Wakes an idle ingress: replies to what we send are likely.
    pub sent: Arc<tokio::sync::Notify>,
}

struct PutDone {
    dest: NodeId,
    /// The bundle's key: a ring's body, so the receiver can probe this stream at once.
    key: String,
    body_len: usize,
    packets: u32,
    packet_bytes: u64,
    started: Instant,
    ok: bool,
}

impl<S: Store, T: PacketIo> Egress<S, T> {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = vec![0u8; READ_BUFFER];
        let mut puts: JoinSet<PutDone> = JoinSet::new();
        let mut bells: JoinSet<()> = JoinSet::new();
        let mut schedule = BellSchedule::default();
        loop {
            let now = clock::now();
            while let Some(sealed) = self.bundler.next_put(now) {
                self.spawn_put(&mut puts, sealed);
            }
            self.metrics
                .egress_buffer_bytes
                .store(self.bundler.buffered_bytes() as u64, Relaxed);
            let deadline = self.bundler.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = puts.join_next(), if !puts.is_empty() => {
                    if let Ok(done) = done {
                        self.put_finished(done, &mut schedule, &mut bells);
                    }
                }
                Some(_) = bells.join_next(), if !bells.is_empty() => {}
                r = self.tun.recv(&mut buf) => match r {
                    Ok(n) => {
                        self.take_packet(buf.get(..n).unwrap_or_default());
                        for _ in 1..READ_BATCH {
                            match self.tun.try_recv(&mut buf) {
                                Ok(n) => self.take_packet(buf.get(..n).unwrap_or_default()),
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
        self.drain(puts, bells).await;
    }

    fn take_packet(&mut self, packet: &[u8]) {
        match classify(packet, &self.me) {
            Ok(dest) => {
                if self.bundler.push(dest, packet, clock::now()).is_err() {
                    self.metrics.dropped(DropReason::EgressBufferFull, 1);
                }
            }
            Err(reason) => self.metrics.ignored(reason),
        }
    }

    fn spawn_put(&self, puts: &mut JoinSet<PutDone>, s: Sealed) {
        let key = BundleKey {
            dest: s.dest,
            session: self.bundler.session(),
            seq: s.seq,
            sender: self.me.id,
        }
        .to_key();
        let store = self.store.clone();
        let (dest, packets, packet_bytes, body_len) =
            (s.dest, s.packets, s.packet_bytes, s.body.len());
        let body = Bytes::from(s.body);
        let skip = Bytes::from(self.bundler.skip_marker(s.dest, s.seq));
        puts.spawn(async move {
            let started = clock::now();
            let r = store.put(&key, body).await;
            let key_done = key.clone();
            if let Err(e) = &r {
                tracing::warn!(error = %e, "bundle PUT failed after retries; its packets are dropped");
                // Under the same key, so the receiver moves on at once; if even this fails
                // the receiver's gap timeout is the safety net.
                if let Err(e) = store.put(&key, skip).await {
                    tracing::warn!(error = %e, "skip marker PUT failed");
                }
            }
            PutDone {
                dest,
                key: key_done,
                body_len,
                packets,
                packet_bytes,
                started,
                ok: r.is_ok(),
            }
        });
    }

    fn put_finished(&mut self, d: PutDone, schedule: &mut BellSchedule, bells: &mut JoinSet<()>) {
        self.bundler.put_done(d.dest, d.body_len);
        if !d.ok {
            self.metrics
                .dropped(DropReason::PutFailed, u64::from(d.packets));
            return;
        }
        self.metrics
            .egress_packets
            .fetch_add(u64::from(d.packets), Relaxed);
        self.metrics.egress_bytes.fetch_add(d.packet_bytes, Relaxed);
        self.sent.notify_one();
        let now = clock::now();
        self.bundler
            .put_latency(d.dest, now.saturating_duration_since(d.started), now);
        schedule.prune(now);
        if schedule.put_succeeded(d.dest, d.started, now) {
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            let key = bell_key(d.dest);
            bells.spawn(async move {
                // The key just written: a hint naming the new stream (the receiver trusts only
                // the key's shape; IAM makes sure only its sender could have written it). Every
                // ring names another seq, so the bell's ETag changes.
                let body = Bytes::from(d.key);
                match store.put(&key, body).await {
                    Ok(()) => {
                        metrics.bells_rung.fetch_add(1, Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "ringing the doorbell failed"),
                }
            });
        }
    }

    /// Sends what is buffered and waits briefly for in-flight PUTs, so a clean stop loses little.
    async fn drain(mut self, mut puts: JoinSet<PutDone>, mut bells: JoinSet<()>) {
        self.bundler.seal_all();
        let mut schedule = BellSchedule::default();
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        loop {
            while let Some(s) = self.bundler.next_put(clock::now()) {
                self.spawn_put(&mut puts, s);
            }
            if puts.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, puts.join_next()).await {
                Ok(Some(Ok(done))) => self.put_finished(done, &mut schedule, &mut bells),
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _ = tokio::time::timeout_at(deadline, async {
            while bells.join_next().await.is_some() {}
        })
        .await;
        puts.abort_all();
        bells.abort_all();
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
