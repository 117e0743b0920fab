//! Per-destination batching of egress packets into bundles, and when to flush them. Sans-IO.
//!
//! An open bundle per destination collects packets; it is sealed and handed out for a PUT when
//! - it reached `max_bytes` (or `MAX_PACKETS`), or
//! - its destination has no PUT in flight (a lone packet to an idle destination leaves at once),
//! - or fewer than `puts_per_dest` PUTs in flight and the destination's pacing interval (its
//!   measured PUT latency / `puts_per_dest`) has passed since its last PUT started: under load
//!   PUTs are spread over a PUT latency, so each bundle grows with rate x PUT latency (up to
//!   `max_bytes`), and the reverse (ACK) direction coalesces the same way, or
//! - its oldest packet is `max_age` old,
//!
//! and fewer than `puts_in_flight` PUTs run in total. Bytes held (open, sealed and in flight) are
//! bounded by `buffer_bytes`; a packet that does not fit is refused and the caller counts it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::node_addr::NodeId;
use crate::wire::bundle::{BundleHeader, BundleWriter, HEADER_LEN, MAC_LEN, NetworkKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundlerConfig {
    pub max_bytes: usize,
    pub max_age: Duration,
    pub puts_per_dest: usize,
    pub puts_in_flight: usize,
    pub buffer_bytes: usize,
}

impl Default for BundlerConfig {
    fn default() -> Self {
        BundlerConfig {
            // Several MiB: under load bundles grow to this (rate x PUT latency); fewer, larger
            // PUTs are what makes a GiB cheap.
            max_bytes: 4 * 1024 * 1024,
            max_age: Duration::from_millis(20),
            puts_per_dest: 4,
            puts_in_flight: 32,
            buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundlerError {
    #[error("egress buffer full ({buffered} of {limit} bytes held)")]
    BufferFull { buffered: usize, limit: usize },
}

/// A finished bundle ready for its PUT.
#[derive(Debug)]
pub struct Sealed {
    pub dest: NodeId,
    pub seq: u64,
    pub packets: u32,
    /// Sum of the packets' lengths (what the egress byte counter counts).
    pub packet_bytes: u64,
    pub body: Vec<u8>,
}

#[derive(Debug)]
struct Open {
    writer: BundleWriter,
    oldest: Instant,
}

#[derive(Debug)]
pub struct Bundler {
    config: BundlerConfig,
    sender: NodeId,
    session: u64,
    key: Option<NetworkKey>,
    open: HashMap<NodeId, Open>,
    sealed: VecDeque<Sealed>,
    next_seq: HashMap<NodeId, u64>,
    in_flight_per_dest: HashMap<NodeId, usize>,
    in_flight: usize,
    buffered: usize,
    pace: HashMap<NodeId, Pace>,
}

/// Per destination: when its last PUT started and how long its PUTs take (EWMA).
#[derive(Clone, Copy, Debug)]
struct Pace {
    last_start: Instant,
    latency: Option<Duration>,
}

impl Bundler {
    pub fn new(
        config: BundlerConfig,
        sender: NodeId,
        session: u64,
        key: Option<NetworkKey>,
    ) -> Bundler {
        Bundler {
            config,
            sender,
            session,
            key,
            open: HashMap::new(),
            sealed: VecDeque::new(),
            next_seq: HashMap::new(),
            in_flight_per_dest: HashMap::new(),
            in_flight: 0,
            buffered: 0,
            pace: HashMap::new(),
        }
    }

    /// A PUT to `dest` succeeded after `took`: feeds the pacing interval.
    pub fn put_latency(&mut self, dest: NodeId, took: Duration, now: Instant) {
        let p = self.pace.entry(dest).or_insert(Pace {
            last_start: now,
            latency: None,
        });
        // EWMA with weight 1/4: follows a change of the store's latency within a few PUTs.
        p.latency = Some(match p.latency {
            Some(l) => (l * 3 + took) / 4,
            None => took,
        });
    }

    /// When the next PUT to `dest` may start early (before `max_age`), if pacing holds it back.
    fn paced_until(&self, dest: &NodeId) -> Option<Instant> {
        let p = self.pace.get(dest)?;
        let interval = p.latency? / u32::try_from(self.config.puts_per_dest.max(1)).unwrap_or(1);
        Some(p.last_start + interval)
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds a packet for `dest`.
    pub fn push(&mut self, dest: NodeId, packet: &[u8], now: Instant) -> Result<(), BundlerError> {
        let cost = BundleWriter::cost(packet.len());
        let needs_seal = self
            .open
            .get(&dest)
            .is_some_and(|o| o.writer.is_full() || o.writer.len() + cost > self.config.max_bytes);
        if needs_seal {
            self.seal(dest);
        }
        let fresh = !self.open.contains_key(&dest);
        let extra = cost
            + if fresh {
                HEADER_LEN + self.mac_len()
            } else {
                0
            };
        if self.buffered + extra > self.config.buffer_bytes {
            return Err(BundlerError::BufferFull {
                buffered: self.buffered,
                limit: self.config.buffer_bytes,
            });
        }
        self.buffered += extra;
        let capacity = (HEADER_LEN + self.mac_len() + cost).max(4096);
        let open = self.open.entry(dest).or_insert_with(|| Open {
            writer: BundleWriter::with_capacity(capacity),
            oldest: now,
        });
        open.writer.push(packet);
        if open.writer.len() >= self.config.max_bytes || open.writer.is_full() {
            self.seal(dest);
        }
        Ok(())
    }

    fn mac_len(&self) -> usize {
        if self.key.is_some() { MAC_LEN } else { 0 }
    }

    fn seal(&mut self, dest: NodeId) {
        let Some(open) = self.open.remove(&dest) else {
            return;
        };
        let seq = self.next_seq.entry(dest).or_insert(0);
        let header = BundleHeader {
            sender: self.sender,
            dest,
            session: self.session,
            seq: *seq,
        };
        *seq += 1;
        let packets = open.writer.packet_count();
        let packet_bytes = (open.writer.len() - HEADER_LEN - 4 * packets as usize) as u64;
        let body = open.writer.finish(&header, self.key.as_ref());
        self.sealed.push_back(Sealed {
            dest,
            seq: header.seq,
            packets,
            packet_bytes,
            body,
        });
    }

    /// The session this bundler numbers its bundles in.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// An empty bundle (`count == 0`) for `seq` of `dest`'s stream: the explicit "skip" a sender
    /// publishes under a key whose PUT it gave up, so the receiver moves past it at once
    /// instead of waiting for its gap timeout.
    pub fn skip_marker(&self, dest: NodeId, seq: u64) -> Vec<u8> {
        let header = BundleHeader {
            sender: self.sender,
            dest,
            session: self.session,
            seq,
        };
        BundleWriter::new().finish(&header, self.key.as_ref())
    }

    /// The next bundle to PUT, if the flush rules and the in-flight limit allow one now. The
    /// caller must report its completion with `put_done`.
    pub fn next_put(&mut self, now: Instant) -> Option<Sealed> {
        if self.in_flight >= self.config.puts_in_flight {
            return None;
        }
        if self.sealed.is_empty() {
            let ready = self
                .open
                .iter()
                .filter(|(dest, open)| {
                    let in_flight = self.in_flight_per_dest.get(dest).copied().unwrap_or(0);
                    let paced = self.paced_until(dest).is_none_or(|t| now >= t);
                    // `puts_per_dest == 0` leaves only the size and age rules.
                    (in_flight < self.config.puts_per_dest && (in_flight == 0 || paced))
                        || now.saturating_duration_since(open.oldest) >= self.config.max_age
                })
                .min_by_key(|(_, open)| open.oldest)
                .map(|(dest, _)| *dest);
            self.seal(ready?);
        }
        let sealed = self.sealed.pop_front()?;
        let p = self.pace.entry(sealed.dest).or_insert(Pace {
            last_start: now,
            latency: None,
        });
        p.last_start = now;
        self.in_flight += 1;
        *self.in_flight_per_dest.entry(sealed.dest).or_insert(0) += 1;
        Some(sealed)
    }

    /// A PUT handed out by `next_put` finished (successfully or not) and its `body_len` bytes are
    /// released.
    pub fn put_done(&mut self, dest: NodeId, body_len: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(n) = self.in_flight_per_dest.get_mut(&dest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight_per_dest.remove(&dest);
            }
        }
        self.buffered = self.buffered.saturating_sub(body_len);
    }

    /// When the oldest open bundle reaches `max_age` (the caller then calls `next_put`).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open
            .iter()
            .map(|(dest, o)| {
                let aged = o.oldest + self.config.max_age;
                let in_flight = self.in_flight_per_dest.get(dest).copied().unwrap_or(0);
                match self.paced_until(dest) {
                    Some(t) if in_flight < self.config.puts_per_dest => t.min(aged),
                    _ => aged,
                }
            })
            .min()
    }

    /// Seals every open bundle (shutdown: send what we have).
    pub fn seal_all(&mut self) {
        let dests: Vec<NodeId> = self.open.keys().copied().collect();
        for d in dests {
            self.seal(d);
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.open.is_empty() || !self.sealed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::bundle::decode;

    const ME: NodeId = NodeId(1);
    const D1: NodeId = NodeId(2);
    const D2: NodeId = NodeId(3);

    fn pkt(n: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + n];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(n as u16).to_be_bytes());
        p
    }

    fn bundler(config: BundlerConfig) -> Bundler {
        Bundler::new(config, ME, 77, None)
    }

    #[test]
    fn lone_packet_leaves_at_once() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        b.push(D1, &pkt(10), t).unwrap();
        let s = b.next_put(t).unwrap();
        assert_eq!((s.dest, s.seq, s.packets), (D1, 0, 1));
        let d = decode(&s.body, None).unwrap();
        assert_eq!(d.header.sender, ME);
        assert_eq!(d.header.session, 77);
    }

    #[test]
    fn puts_to_a_busy_destination_are_paced_over_the_measured_put_latency() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        b.put_latency(D1, ms(40), t);
        b.push(D1, &pkt(10), t).unwrap();
        let first = b.next_put(t).unwrap();
        // One PUT in flight: the next may start only a quarter of the PUT latency later, and
        // the packets arriving meanwhile share one bundle.
        for _ in 0..5 {
            b.push(D1, &pkt(10), t + ms(2)).unwrap();
            assert!(b.next_put(t + ms(2)).is_none());
        }
        assert_eq!(b.next_deadline(), Some(t + ms(10)));
        let second = b.next_put(t + ms(10)).unwrap();
        assert_eq!((second.seq, second.packets), (1, 5));
        b.put_done(D1, first.body.len());
        b.put_done(D1, second.body.len());
        // Idle again: a lone packet leaves at once whatever the pacing says.
        b.push(D1, &pkt(10), t + ms(11)).unwrap();
        assert!(b.next_put(t + ms(11)).is_some());
    }

    #[test]
    fn pacing_follows_the_put_latency() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        b.put_latency(D1, ms(40), t);
        b.put_latency(D1, ms(8), t);
        b.push(D1, &pkt(10), t).unwrap();
        b.next_put(t).unwrap();
        b.push(D1, &pkt(10), t).unwrap();
        // EWMA (3 x 40 + 8) / 4 = 32 ms, interval 8 ms.
        assert_eq!(b.next_deadline(), Some(t + ms(8)));
    }

    #[test]
    fn packets_accumulate_while_puts_per_dest_are_in_flight() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let mut puts = vec![];
        for _ in 0..4 {
            b.push(D1, &pkt(10), t).unwrap();
            puts.push(b.next_put(t).unwrap());
        }
        for _ in 0..10 {
            b.push(D1, &pkt(10), t).unwrap();
            assert!(b.next_put(t).is_none());
        }
        let s = b.next_put(t + Duration::from_millis(20)).unwrap();
        assert_eq!((s.seq, s.packets), (4, 10), "age flush");
        b.put_done(D1, puts[0].body.len());
        b.push(D1, &pkt(10), t).unwrap();
        // Still 4 in flight (3 old + the age-flushed one).
        assert!(b.next_put(t).is_none());
        b.put_done(D1, puts[1].body.len());
        assert_eq!(b.next_put(t).unwrap().packets, 1);
    }

    #[test]
    fn size_limit_seals_a_bundle() {
        let cfg = BundlerConfig {
            max_bytes: 1000,
            puts_per_dest: 0,
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        for _ in 0..5 {
            b.push(D1, &pkt(200), t).unwrap();
        }
        let s = b.next_put(t).unwrap();
        assert!(s.body.len() <= 1000, "{}", s.body.len());
        assert_eq!(s.packets, 3);
        assert!(
            b.next_put(t).is_none(),
            "rest is young and puts_per_dest is 0"
        );
    }

    #[test]
    fn age_deadline_is_oldest_packet_plus_max_age() {
        let cfg = BundlerConfig {
            puts_per_dest: 0,
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        b.push(D1, &pkt(1), t).unwrap();
        b.push(D2, &pkt(1), t + Duration::from_millis(5)).unwrap();
        assert_eq!(b.next_deadline(), Some(t + Duration::from_millis(20)));
        assert!(b.next_put(t + Duration::from_millis(19)).is_none());
        assert_eq!(b.next_put(t + Duration::from_millis(20)).unwrap().dest, D1);
    }

    #[test]
    fn global_in_flight_limit_holds_bundles_back() {
        let cfg = BundlerConfig {
            puts_in_flight: 1,
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        b.push(D1, &pkt(1), t).unwrap();
        b.push(D2, &pkt(1), t).unwrap();
        let first = b.next_put(t).unwrap();
        assert!(b.next_put(t + Duration::from_secs(1)).is_none());
        b.put_done(first.dest, first.body.len());
        assert!(b.next_put(t).is_some());
    }

    #[test]
    fn overflowing_the_buffer_refuses_packets() {
        let cfg = BundlerConfig {
            buffer_bytes: 500,
            puts_in_flight: 0,
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        let mut refused = 0;
        for _ in 0..10 {
            if b.push(D1, &pkt(100), t).is_err() {
                refused += 1;
            }
        }
        assert!(b.buffered_bytes() <= 500);
        assert_eq!(refused, 7);
    }

    #[test]
    fn buffer_is_released_when_puts_finish() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        b.push(D1, &pkt(100), t).unwrap();
        let s = b.next_put(t).unwrap();
        assert_eq!(b.buffered_bytes(), s.body.len());
        b.put_done(s.dest, s.body.len());
        assert_eq!(b.buffered_bytes(), 0);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn sequence_numbers_are_per_destination() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let mut seqs = vec![];
        for d in [D1, D2, D1] {
            b.push(d, &pkt(1), t).unwrap();
            let s = b.next_put(t).unwrap();
            seqs.push((s.dest, s.seq));
        }
        seqs.sort();
        assert_eq!(seqs, [(D1, 0), (D1, 1), (D2, 0)]);
    }

    #[test]
    fn authenticated_bundles_verify_under_the_key() {
        let key = NetworkKey::new(b"sixteen-byte-key!").unwrap();
        let mut b = Bundler::new(BundlerConfig::default(), ME, 1, Some(key.clone()));
        let t = Instant::now();
        b.push(D1, &pkt(3), t).unwrap();
        let s = b.next_put(t).unwrap();
        assert!(decode(&s.body, Some(&key)).is_ok());
        assert_eq!(b.buffered_bytes(), s.body.len());
    }
}
