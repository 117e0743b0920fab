//! Per-destination batching of egress packets into bundles, and when to flush them. Sans-IO.
//!
//! The bundler is self-clocking, as Nagle's algorithm is: an open bundle per destination
//! collects packets, and is sealed and handed out for a PUT when
//! - its destination has no PUT in flight (a lone packet to an idle destination leaves at once),
//! - it reached `max_bytes` (or `MAX_PACKETS`): full bundles are PUT concurrently, so a fast
//!   sender is not held to one PUT at a time,
//! - or its oldest packet is `max_age` old and its destination has fewer than `puts_per_dest`
//!   PUTs in flight (a safety net for a PUT that hangs in its retries).
//!
//! One refinement makes bulk traffic cheap: under load (the destination's last PUT ended less
//! than one PUT latency ago, an EWMA of successful PUTs) a bundle smaller than `min_fill_bytes`
//! waits until its oldest packet is one PUT latency old. A window-limited flow loses little by it
//! (a bundle far smaller than the window adds its fill time to the round trip once), while its
//! bundles, and the ACK bundles coming back, become several times fewer. A lone packet to a
//! quiet destination still leaves at once.
//!
//! So while a PUT is in flight the next bundle grows with the arrival rate for one PUT latency:
//! bundles are rate x PUT latency (up to `max_bytes`) without a rate estimate, and a direction
//! that carries only ACKs coalesces them into one PUT per PUT latency instead of one per burst.
//! Fewer than `puts_in_flight` PUTs run in total. Bytes held (open, sealed and in flight) are
//! bounded by `buffer_bytes`; a packet that does not fit is refused and the caller counts it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::node_addr::NodeId;
use crate::wire::bundle::{BundleHeader, BundleWriter, HEADER_LEN, MAC_LEN, NetworkKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundlerConfig {
    pub max_bytes: usize,
    pub min_fill_bytes: usize,
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
            // Small against a TCP window of a few MiB, large against an ACK burst.
            min_fill_bytes: 256 * 1024,
            // Above a PUT's usual latency (S3 Standard's p99 is well under 100 ms), so it fires
            // only when a PUT hangs in its retries.
            max_age: Duration::from_millis(100),
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

/// Per destination: how long its PUTs take (EWMA) and when the last one ended.
#[derive(Clone, Copy, Debug)]
struct Pace {
    latency: Duration,
    last_done: Instant,
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

    /// A PUT to `dest` succeeded after `took`, at `now`.
    pub fn put_succeeded(&mut self, dest: NodeId, took: Duration, now: Instant) {
        let latency = match self.pace.get(&dest) {
            // Weight 1/4: follows a change of the store's latency within a few PUTs.
            Some(p) => (p.latency * 3 + took) / 4,
            None => took,
        };
        self.pace.insert(
            dest,
            Pace {
                latency,
                last_done: now,
            },
        );
    }

    /// While `dest` is under load, how long a small bundle to it waits from its oldest packet
    /// (one PUT latency), and when the load ends (`None`: not under load).
    fn fill_wait(&self, dest: &NodeId, now: Instant) -> Option<(Duration, Instant)> {
        if self.config.min_fill_bytes == 0 {
            return None;
        }
        let p = self.pace.get(dest)?;
        let busy_until = p.last_done + p.latency;
        (now < busy_until).then_some((p.latency.min(self.config.max_age), busy_until))
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
                    let age = now.saturating_duration_since(open.oldest);
                    if in_flight > 0 {
                        return age >= self.config.max_age && in_flight < self.config.puts_per_dest;
                    }
                    match self.fill_wait(dest, now) {
                        Some((wait, _)) => {
                            open.writer.len() >= self.config.min_fill_bytes || age >= wait
                        }
                        None => true,
                    }
                })
                .min_by_key(|(_, open)| open.oldest)
                .map(|(dest, _)| *dest);
            self.seal(ready?);
        }
        let sealed = self.sealed.pop_front()?;
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
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.open
            .iter()
            .filter_map(|(dest, o)| {
                let in_flight = self.in_flight_per_dest.get(dest).copied().unwrap_or(0);
                if in_flight >= self.config.puts_per_dest {
                    return None;
                }
                if in_flight > 0 {
                    return Some(o.oldest + self.config.max_age);
                }
                // With nothing in flight the bundle is only held by the fill rule (otherwise
                // `next_put` has taken it already).
                self.fill_wait(dest, now)
                    .map(|(wait, busy_until)| (o.oldest + wait).min(busy_until))
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
    fn while_a_put_is_in_flight_packets_wait_for_it_and_leave_together() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        b.push(D1, &pkt(10), t).unwrap();
        let first = b.next_put(t).unwrap();
        // One PUT in flight: what arrives meanwhile (a burst of ACKs, say) shares one bundle,
        // which leaves as soon as the PUT ahead of it ends.
        for i in 0..5 {
            b.push(D1, &pkt(10), t + ms(i)).unwrap();
            assert!(b.next_put(t + ms(i + 1)).is_none());
        }
        b.put_done(D1, first.body.len());
        let second = b.next_put(t + ms(30)).unwrap();
        assert_eq!((second.seq, second.packets), (1, 5));
    }

    #[test]
    fn under_load_a_small_bundle_waits_one_put_latency_to_fill_and_a_quiet_destination_does_not() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        b.push(D1, &pkt(10), t).unwrap();
        let first = b.next_put(t).unwrap();
        b.put_done(D1, first.body.len());
        b.put_succeeded(D1, ms(20), t + ms(20));
        // Under load: the PUT ended just now. A small bundle waits up to one PUT latency.
        b.push(D1, &pkt(10), t + ms(21)).unwrap();
        assert!(b.next_put(t + ms(22)).is_none());
        assert_eq!(b.next_deadline(t + ms(22)), Some(t + ms(40)));
        // Filling to `min_fill_bytes` sends it at once.
        for _ in 0..30 {
            b.push(D1, &pkt(10_000), t + ms(23)).unwrap();
        }
        let second = b.next_put(t + ms(23)).unwrap();
        assert!(second.body.len() >= BundlerConfig::default().min_fill_bytes);
        b.put_done(D1, second.body.len());
        b.put_succeeded(D1, ms(20), t + ms(43));
        // Long after the last PUT, the destination is quiet: a lone packet leaves at once.
        b.push(D1, &pkt(10), t + ms(200)).unwrap();
        assert!(b.next_put(t + ms(200)).is_some());
    }

    #[test]
    fn an_unfilled_bundle_under_load_leaves_after_one_put_latency() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        b.push(D1, &pkt(10), t).unwrap();
        let first = b.next_put(t).unwrap();
        b.put_done(D1, first.body.len());
        b.put_succeeded(D1, ms(20), t + ms(20));
        b.push(D1, &pkt(10), t + ms(25)).unwrap();
        assert!(b.next_put(t + ms(39)).is_none());
        // The load ended (one PUT latency after the last PUT) before the packet aged.
        assert_eq!(b.next_put(t + ms(40)).map(|s| s.packets), Some(1));
    }

    #[test]
    fn full_bundles_are_put_concurrently_while_one_is_in_flight() {
        let cfg = BundlerConfig {
            max_bytes: 1000,
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        b.push(D1, &pkt(10), t).unwrap();
        assert!(b.next_put(t).is_some());
        // A fast sender: each bundle fills to the limit while the first PUT runs.
        for _ in 0..40 {
            b.push(D1, &pkt(100), t).unwrap();
        }
        let mut full = 0;
        while let Some(s) = b.next_put(t) {
            assert!(s.body.len() > 900, "only full bundles leave early");
            full += 1;
        }
        assert!(full >= 3, "{full} full bundles in flight");
        assert_eq!(b.in_flight(), full + 1);
    }

    #[test]
    fn a_hanging_put_holds_the_next_bundle_no_longer_than_max_age() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        b.push(D1, &pkt(10), t).unwrap();
        b.next_put(t).unwrap();
        b.push(D1, &pkt(10), t).unwrap();
        let max_age = BundlerConfig::default().max_age;
        assert_eq!(b.next_deadline(t), Some(t + max_age));
        assert!(b.next_put(t + max_age - Duration::from_millis(1)).is_none());
        assert!(b.next_put(t + max_age).is_some());
    }

    #[test]
    fn age_flushes_stop_at_puts_per_dest_in_flight() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let age = BundlerConfig::default().max_age;
        let mut puts = vec![];
        b.push(D1, &pkt(10), t).unwrap();
        puts.push(b.next_put(t).unwrap());
        // Each PUT hangs; every `max_age` another bundle leaves, up to `puts_per_dest`.
        for i in 1..4u32 {
            b.push(D1, &pkt(10), t + age * (i - 1)).unwrap();
            assert!(b.next_put(t + age * i - Duration::from_millis(1)).is_none());
            puts.push(b.next_put(t + age * i).unwrap());
        }
        b.push(D1, &pkt(10), t + age * 3).unwrap();
        assert!(b.next_put(t + age * 10).is_none(), "4 in flight");
        assert_eq!(b.next_deadline(t + age * 10), None);
        b.put_done(D1, puts[0].body.len());
        assert_eq!(b.next_put(t + age * 10).unwrap().packets, 1);
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
            max_age: Duration::from_millis(20),
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        for d in [D1, D2] {
            b.push(d, &pkt(1), t).unwrap();
            b.next_put(t).unwrap();
        }
        b.push(D1, &pkt(1), t).unwrap();
        b.push(D2, &pkt(1), t + Duration::from_millis(5)).unwrap();
        assert_eq!(b.next_deadline(t), Some(t + Duration::from_millis(20)));
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
            b.put_done(s.dest, s.body.len());
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
