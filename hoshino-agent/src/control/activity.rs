//! What `status` reports beyond the metrics, gathered without touching the data path's code:
//! `CountingTun` wraps the TUN the loops read and write (per-peer packets and bytes, last heard),
//! `NotingStore` wraps the bucket (the last S3 error, whether the last call succeeded).
//!
//! "Sent" counts packets the TUN handed to the tunnel for a peer (before bundling; a bundle
//! that is later given up is counted by `hoshino_packets_dropped_total`); "received" counts
//! packets written to the TUN from a peer.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::directory::unix_millis_now;
use crate::edge::packet_io::PacketIo;
use crate::node_addr::{NetworkPrefix, NodeId};
use crate::store::{Listing, Lookup, S3Error, Store};
use crate::wire::bundle::ipv6_endpoints;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
    /// When the last packet from this peer was delivered (unix ms).
    pub last_heard_unix_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3ErrorNote {
    pub at_unix_ms: u64,
    pub message: String,
}

#[derive(Debug, Default)]
struct State {
    peers: BTreeMap<NodeId, PeerCounters>,
    last_s3_error: Option<S3ErrorNote>,
    last_s3_ok_unix_ms: Option<u64>,
    last_packet_unix_ms: Option<u64>,
}

/// Shared by the wrappers and the control socket.
#[derive(Debug, Default)]
pub struct Activity {
    state: Mutex<State>,
}

/// A copy for a report.
#[derive(Clone, Debug, Default)]
pub struct ActivitySnapshot {
    pub peers: BTreeMap<NodeId, PeerCounters>,
    pub last_s3_error: Option<S3ErrorNote>,
    pub last_s3_ok_unix_ms: Option<u64>,
    pub last_packet_unix_ms: Option<u64>,
}

impl Activity {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn sent(&self, peer: NodeId, bytes: usize, now: u64) {
        let mut s = self.state();
        s.last_packet_unix_ms = Some(now);
        let c = s.peers.entry(peer).or_default();
        c.sent_packets += 1;
        c.sent_bytes += bytes as u64;
    }

    pub fn received(&self, peer: NodeId, bytes: usize, now: u64) {
        let mut s = self.state();
        s.last_packet_unix_ms = Some(now);
        let c = s.peers.entry(peer).or_default();
        c.received_packets += 1;
        c.received_bytes += bytes as u64;
        c.last_heard_unix_ms = Some(now);
    }

    pub fn s3_result<T>(&self, r: &Result<T, S3Error>, now: u64) {
        let mut s = self.state();
        match r {
            Ok(_) => s.last_s3_ok_unix_ms = Some(now),
            Err(e) => {
                s.last_s3_error = Some(S3ErrorNote {
                    at_unix_ms: now,
                    message: e.to_string(),
                })
            }
        }
    }

    pub fn snapshot(&self) -> ActivitySnapshot {
        let s = self.state();
        ActivitySnapshot {
            peers: s.peers.clone(),
            last_s3_error: s.last_s3_error.clone(),
            last_s3_ok_unix_ms: s.last_s3_ok_unix_ms,
            last_packet_unix_ms: s.last_packet_unix_ms,
        }
    }
}

/// The TUN, counting per peer.
pub struct CountingTun<T> {
    pub inner: Arc<T>,
    pub prefix: NetworkPrefix,
    pub activity: Arc<Activity>,
}

impl<T: PacketIo> CountingTun<T> {
    fn count_sent(&self, packet: &[u8]) {
        if let Some((_, dst)) = ipv6_endpoints(packet)
            && let Some(peer) = self.prefix.node_of(&dst)
        {
            self.activity.sent(peer, packet.len(), unix_millis_now());
        }
    }
}

impl<T: PacketIo> PacketIo for CountingTun<T> {
    async fn recv<'a>(&'a self, buf: &'a mut [u8]) -> io::Result<usize> {
        let n = self.inner.recv(buf).await?;
        self.count_sent(buf.get(..n).unwrap_or_default());
        Ok(n)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.try_recv(buf)?;
        self.count_sent(buf.get(..n).unwrap_or_default());
        Ok(n)
    }

    async fn send<'a>(&'a self, packet: &'a [u8]) -> io::Result<usize> {
        let r = self.inner.send(packet).await;
        if r.is_ok()
            && let Some((src, _)) = ipv6_endpoints(packet)
            && let Some(peer) = self.prefix.node_of(&src)
        {
            self.activity
                .received(peer, packet.len(), unix_millis_now());
        }
        r
    }
}

/// The bucket, noting the last error and the last success of any call.
#[derive(Clone)]
pub struct NotingStore<S> {
    pub inner: S,
    pub activity: Arc<Activity>,
}

impl<S: Store> NotingStore<S> {
    fn note<T>(&self, r: Result<T, S3Error>) -> Result<T, S3Error> {
        self.activity.s3_result(&r, unix_millis_now());
        r
    }
}

impl<S: Store> Store for NotingStore<S> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.note(self.inner.put(key, body).await)
    }

    async fn get(&self, key: &str, limit: usize, lookup: Lookup) -> Result<Option<Bytes>, S3Error> {
        self.note(self.inner.get(key, limit, lookup).await)
    }

    async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        self.note(self.inner.get_tagged(key, limit).await)
    }

    async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        self.note(self.inner.head(key).await)
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        self.note(self.inner.list(prefix, continuation).await)
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        self.note(self.inner.delete_many(keys).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::packet_io::ChannelTun;

    fn packet(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = 59;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    #[test]
    fn errors_and_successes_are_noted() {
        let a = Activity::default();
        a.s3_result::<()>(&Ok(()), 5);
        a.s3_result::<()>(
            &Err(S3Error::TooLarge {
                key: "k".into(),
                size: 2,
                limit: 1,
            }),
            7,
        );
        let s = a.snapshot();
        assert_eq!(s.last_s3_ok_unix_ms, Some(5));
        assert_eq!(s.last_s3_error.map(|e| e.at_unix_ms), Some(7));
    }

    #[tokio::test]
    async fn packets_through_the_tun_are_counted_per_peer_each_way() {
        let prefix = NetworkPrefix::default();
        let (me, peer) = (prefix.addr_of(NodeId(1)), prefix.addr_of(NodeId(2)));
        let (tun, host) = ChannelTun::new();
        let activity = Arc::new(Activity::default());
        let counting = CountingTun {
            inner: Arc::new(tun),
            prefix,
            activity: activity.clone(),
        };
        host.send.send(packet(me, peer, 10)).expect("inject");
        let mut buf = vec![0u8; 2048];
        let n = counting.recv(&mut buf).await.expect("recv");
        assert_eq!(n, 50);
        counting.send(&packet(peer, me, 20)).await.expect("send");
        counting.send(&packet(peer, me, 20)).await.expect("send");
        let c = activity.snapshot().peers[&NodeId(2)].clone();
        assert_eq!((c.sent_packets, c.sent_bytes), (1, 50));
        assert_eq!((c.received_packets, c.received_bytes), (2, 120));
        assert!(c.last_heard_unix_ms.is_some());
    }
}
