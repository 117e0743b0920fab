//! Per-destination batching of egress packets into bundles, and when to flush them. Sans-IO.
//!
//! The bundler is self-clocking, as Nagle's algorithm is: an open bundle per destination
//! collects packets, and is sealed and handed out for a PUT when
//! - its destination has no PUT in flight (a lone packet to a quiet destination leaves at once),
//! - it reached `max_bytes` (or `MAX_PACKETS`): full bundles are PUT concurrently, so a fast
//!   sender is not held to one PUT at a time,
//! - or its oldest packet is `max_age` old and its destination has fewer than `puts_per_dest`
//!   PUTs in flight (a safety net for a PUT that hangs in its retries).
//!
//! Under load the bundler clocks itself on the peer's replies, so that one bundle per round trip
//! carries a whole TCP window each way. A destination is under load while the bytes we send it
//! plus the bytes it sends us exceed `load_rate` (an exponentially weighted rate over
//! `LOAD_WINDOW`); then a bundle that is not full leaves only
//! - once its input has paused after the first bundle heard from that destination since our
//!   last PUT to it (what the peer's bundle releases, the ACKs it draws or the data its ACKs let
//!   out, is written by the local stack by then), but no later than `reply_hold` PUT latencies
//!   after that reply (many flows, or a paced one, never pause: their bundles grow meanwhile).
//!   One PUT latency: a BBR flow paces its window over the round trip, so every millisecond
//!   held here is added to its RTT, and BBR, which keeps about two of its least RTTs in flight,
//!   answers with a lower rate. Held four PUT latencies, one such flow moved a third less and
//!   paid more per GiB (smaller windows per round trip), while eight flows gained nothing.
//!   A pause is `PAUSE_SPACINGS` of the bundle's usual packet spacing without a packet (at least
//!   `gather`, at most `PAUSE_MAX`): BBR paces segments milliseconds apart, and taking each gap
//!   for the end of a burst split eight flows' data into 2 MB bundles instead of 5 MB.
//!   A bundle heard that its sender sealed full (the header's `more` flag) is not the reply:
//!   another follows at once, and one answer to the whole burst is enough. Or
//! - when nothing was heard, `reply_wait` PUT latencies after our last PUT to it ended (a one-way
//!   stream, or a reply that got lost),
//!
//! and, with a `pace` set (off by default), no sooner than `pace` after the previous bundle to it.
//! Full bundles are not paced. A pace bounds each direction to one PUT that is not full per
//! `pace`, so requests per GiB fall as 1 / (rate x pace) on a store faster than the pace; it
//! costs throughput (README, "Measured"), so it is a knob for cost over speed.
//!
//! Why: a window-limited flow sends its window when the ACKs arrive and then waits. Sent at once,
//! the first packets of each burst left in a bundle of their own and the rest in the next, and
//! the bursts split again on every pass until about one bundle per PUT latency circulated each
//! way (four to six per round trip, each drawing its own GET and probe misses). Sent on the
//! reply, one burst circulates, as large as the window; it waits only `gather` at each end, as
//! the flow would have waited for the ACKs anyway.
//!
//! Fewer than `puts_in_flight` PUTs run in total. Bytes held (open, sealed and in flight) are
//! bounded by `buffer_bytes`; a packet that does not fit is refused and the caller counts it.
//!
//! Every address of the tunnel's /64 is a destination, and each new one costs a PUT and a bell
//! PUT, so what a local user spraying addresses can make the agent hold and spend is bounded:
//! - new streams open at most `NEW_STREAMS_PER_SECOND` (bursts of `NEW_STREAMS_BURST`); a packet
//!   that would open one more is refused;
//! - at most `MAX_DESTINATIONS` have a stream: at the limit the least recently active quarter of
//!   those with nothing open, sealed or in flight is forgotten, and any such destination is
//!   forgotten after `FORGET_AFTER` without traffic either way.
//!
//! A forgotten destination's next packet opens a new stream (another session, from seq 0, whose
//! first PUT rings the bell), so no (session, seq) is ever used twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::node_addr::NodeId;
use crate::wire::bundle::{BundleHeader, BundleWriter, HEADER_LEN, MAC_LEN, NetworkKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundlerConfig {
    pub max_bytes: usize,
    /// Bytes per second to and from a destination above which it is under load (0: never).
    pub load_rate: u64,
    /// Under load, how long a bundle stays open after a reply from its destination arrived.
    pub gather: Duration,
    /// Under load with no reply heard, PUT latencies after our last PUT before a bundle leaves.
    pub reply_wait: u32,
    /// Under load, PUT latencies after a reply that a bundle whose input never pauses may keep
    /// filling.
    pub reply_hold: u32,
    /// Under load, the least time between two bundles to a destination, unless full.
    pub pace: Duration,
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
            max_bytes: 8 * 1024 * 1024,
            // 8 Mbit/s: far above interactive traffic (a ping every 50 ms is 2.5 kB/s), which
            // keeps leaving at once, and below what any bulk flow moves.
            load_rate: 1024 * 1024,
            // The local stack answers a written bundle within microseconds; one millisecond also
            // covers a sender refilling its socket buffer.
            gather: Duration::from_millis(1),
            // A reply takes the peer's GET and PUT plus our GET (about three PUT latencies) after
            // our PUT ended; four leaves room for a probe's wait.
            reply_wait: 4,
            // Testbed, express latency, 4 alternating runs: one BBR flow moved 23-25 MiB/s at
            // 3,557-3,692 requests per GiB with 1, 15-19 MiB/s at 5,390-5,824 with 4; eight
            // flows did not differ beyond their run-to-run spread (README, "Measured").
            reply_hold: 1,
            // Off by default: in the testbed a 100 ms pace cut PUTs per GiB under load, but also
            // multi-flow throughput by about half (README, "Measured"). A knob for cost over speed.
            pace: Duration::ZERO,
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
    #[error("new destinations arrive faster than {per_second} per second")]
    NewDestinationsTooFast { per_second: u32 },
    #[error("all {limit} destinations with a stream have bundles held")]
    TooManyDestinations { limit: usize },
}

/// A finished bundle ready for its PUT.
#[derive(Debug)]
pub struct Sealed {
    pub dest: NodeId,
    /// The stream's session and the bundle's seq in it (both go into its key).
    pub session: u64,
    pub seq: u64,
    pub packets: u32,
    /// Sum of the packets' lengths (what the egress byte counter counts).
    pub packet_bytes: u64,
    pub body: Vec<u8>,
    /// One of its packets may draw an answer (see `Bundler::push_packet`).
    pub expects_answer: bool,
}

#[derive(Debug)]
struct Open {
    writer: BundleWriter,
    oldest: Instant,
    newest: Instant,
    /// EWMA of the time between its packets: a paced sender's gaps are not a pause.
    spacing: Duration,
    expects_answer: bool,
}

/// This node's stream to one destination.
#[derive(Clone, Copy, Debug)]
struct Stream {
    session: u64,
    next_seq: u64,
}

#[derive(Debug)]
pub struct Bundler {
    config: BundlerConfig,
    sender: NodeId,
    session: u64,
    /// Streams opened so far (each takes the next session derived from `session`).
    streams_opened: u64,
    key: Option<NetworkKey>,
    open: HashMap<NodeId, Open>,
    sealed: VecDeque<Sealed>,
    streams: HashMap<NodeId, Stream>,
    last_prune: Option<Instant>,
    /// Token bucket of new streams, as of `new_streams_at`.
    new_streams: f64,
    new_streams_at: Option<Instant>,
    in_flight_per_dest: HashMap<NodeId, usize>,
    in_flight: usize,
    buffered: usize,
    pace: HashMap<NodeId, Pace>,
}

/// Time constant of the load meter.
pub const LOAD_WINDOW: Duration = Duration::from_millis(250);
/// Destinations with a stream at once (see the module doc).
pub const MAX_DESTINATIONS: usize = 4096;
/// New streams opened per second at most, after a burst (see the module doc): a node talking to
/// a fleet for the first time reaches 1,000 peers within 25 s.
pub const NEW_STREAMS_PER_SECOND: u32 = 32;
pub const NEW_STREAMS_BURST: u32 = 256;
/// A destination idle this long, with nothing held for it, is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Quiet destinations are looked for at most this often (and whenever the streams are full).
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Under load, a bundle's input has paused when no packet came for this many of its usual
/// spacings (at least `gather`, at most `PAUSE_MAX`): BBR paces a flow's segments a few ms apart.
const PAUSE_SPACINGS: u32 = 4;
const PAUSE_MAX: Duration = Duration::from_millis(10);
/// Bounds of the wait for a reply under load.
const REPLY_WAIT_MIN: Duration = Duration::from_millis(2);
const REPLY_WAIT_MAX: Duration = Duration::from_millis(250);

/// Per destination: the traffic exchanged with it, how long its PUTs take (EWMA), when our
/// last PUT to it started and ended, and when we last heard from it.
#[derive(Clone, Copy, Debug)]
struct Pace {
    /// Bytes to and from the destination, decayed with `LOAD_WINDOW` to `load_at`.
    load_bytes: f64,
    load_at: Instant,
    latency: Option<Duration>,
    last_sealed: Option<Instant>,
    last_done: Option<Instant>,
    /// The first bundle heard from it since `last_sealed`.
    heard: Option<Instant>,
}

impl Pace {
    fn new(now: Instant) -> Pace {
        Pace {
            load_bytes: 0.0,
            load_at: now,
            latency: None,
            last_sealed: None,
            last_done: None,
            heard: None,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.load_at).as_secs_f64();
        self.load_bytes * (-dt / LOAD_WINDOW.as_secs_f64()).exp()
    }

    fn add_load(&mut self, bytes: usize, now: Instant) {
        self.load_bytes = self.decayed(now) + bytes as f64;
        self.load_at = now.max(self.load_at);
    }

    /// The latest traffic either way, seal or PUT completion.
    fn last_active(&self) -> Instant {
        [self.last_sealed, self.last_done]
            .into_iter()
            .flatten()
            .fold(self.load_at, Instant::max)
    }

    /// Bytes per second exchanged lately.
    fn rate(&self, now: Instant) -> f64 {
        self.decayed(now) / LOAD_WINDOW.as_secs_f64()
    }
}

/// The session of the `n`th stream a bundler opens (from 0): `base`, the agent's random id, for
/// the first, then `base` mixed with `n` (SplitMix64's finalizer), so streams opened again after
/// being forgotten get sessions of their own, as distinct and unpredictable as `base`.
fn session_number(base: u64, n: u64) -> u64 {
    if n == 0 {
        return base;
    }
    let mut z = base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
            streams_opened: 0,
            key,
            open: HashMap::new(),
            sealed: VecDeque::new(),
            streams: HashMap::new(),
            last_prune: None,
            new_streams: f64::from(NEW_STREAMS_BURST),
            new_streams_at: None,
            in_flight_per_dest: HashMap::new(),
            in_flight: 0,
            buffered: 0,
            pace: HashMap::new(),
        }
    }

    /// A PUT to `dest` succeeded after `took`, at `now`.
    pub fn put_succeeded(&mut self, dest: NodeId, took: Duration, now: Instant) {
        let p = self.pace.entry(dest).or_insert_with(|| Pace::new(now));
        p.latency = Some(match p.latency {
            // Weight 1/4: follows a change of the store's latency within a few PUTs.
            Some(l) => (l * 3 + took) / 4,
            None => took,
        });
        p.last_done = Some(now);
    }

    /// A bundle of `bytes` from `peer` was delivered to the local stack at `now`: a reply to
    /// what we sent it, and load between us. A bundle its sender sealed full (`more`) is
    /// followed by another at once, so the reply is taken from the last of them: one answer to
    /// a burst of full bundles, not one each.
    pub fn heard(&mut self, peer: NodeId, bytes: usize, more: bool, now: Instant) {
        let p = self.pace.entry(peer).or_insert_with(|| Pace::new(now));
        p.add_load(bytes, now);
        if p.heard.is_none() && !more {
            p.heard = Some(now);
        }
    }

    /// Whether `dest` is under load at `now`.
    pub fn under_load(&self, dest: &NodeId, now: Instant) -> bool {
        self.config.load_rate > 0
            && self
                .pace
                .get(dest)
                .is_some_and(|p| p.rate(now) >= self.config.load_rate as f64)
    }

    /// Under load, when an open bundle to `dest` may leave (with no PUT to `dest` in flight);
    /// `None`: not under load, at once.
    fn release_at(&self, dest: &NodeId, open: &Open, now: Instant) -> Option<Instant> {
        if !self.under_load(dest, now) {
            return None;
        }
        let p = self.pace.get(dest)?;
        let gather = self.config.gather;
        let latencies = |n: u32| {
            p.latency
                .map(|l| (l * n).clamp(REPLY_WAIT_MIN, REPLY_WAIT_MAX))
        };
        let wait = latencies(self.config.reply_wait);
        let hold = latencies(self.config.reply_hold);
        // Once its input has paused after `t`: a window-limited flow's burst has ended then,
        // while a flow that is not (many flows, a paced sender) keeps filling the bundle, up to
        // `hold` after `t`.
        let quiet = |t: Instant| {
            let from = t.max(open.oldest);
            let pause = (open.spacing * PAUSE_SPACINGS).clamp(gather, PAUSE_MAX.max(gather));
            let paused = from.max(open.newest) + pause;
            paused.min(from + hold.unwrap_or(gather).max(gather))
        };
        let reply = match (p.heard, p.last_done, wait) {
            (Some(heard), _, _) => quiet(heard),
            (None, Some(done), Some(wait)) => (done + wait).max(open.oldest + gather),
            // Nothing sent to it yet (or no PUT ended): the first bundle needs no reply.
            _ => quiet(open.oldest),
        };
        Some(match p.last_sealed {
            Some(sealed) => reply.max(sealed + self.config.pace),
            None => reply,
        })
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds a packet for `dest` that may draw an answer.
    pub fn push(&mut self, dest: NodeId, packet: &[u8], now: Instant) -> Result<(), BundlerError> {
        self.push_packet(dest, packet, now, true)
    }

    /// Adds a packet for `dest`; `answered`: it may draw an answer (anything but an ICMPv6 echo
    /// reply), so the PUT of its bundle makes the receive side expect one.
    pub fn push_packet(
        &mut self,
        dest: NodeId,
        packet: &[u8],
        now: Instant,
        answered: bool,
    ) -> Result<(), BundlerError> {
        let new_stream = !self.streams.contains_key(&dest);
        if new_stream {
            self.admit_stream(now)?;
        }
        let cost = BundleWriter::cost(packet.len());
        let needs_seal = self
            .open
            .get(&dest)
            .is_some_and(|o| o.writer.is_full() || o.writer.len() + cost > self.config.max_bytes);
        if needs_seal {
            self.seal(dest, Some(now), true);
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
        if new_stream {
            // Counted from now, so unsealed bundles to new addresses cannot pass the limit.
            self.stream(dest);
        }
        let capacity = (HEADER_LEN + self.mac_len() + cost).max(4096);
        let open = self.open.entry(dest).or_insert_with(|| Open {
            writer: BundleWriter::with_capacity(capacity),
            oldest: now,
            newest: now,
            spacing: Duration::ZERO,
            expects_answer: false,
        });
        open.expects_answer |= answered;
        let gap = now.saturating_duration_since(open.newest);
        if gap < PAUSE_MAX {
            // Weight 1/8: a few packets' jitter does not make a pause (and a pause is none of
            // the spacing).
            open.spacing = (open.spacing * 7 + gap) / 8;
        }
        open.newest = open.newest.max(now);
        open.writer.push(packet);
        self.pace
            .entry(dest)
            .or_insert_with(|| Pace::new(now))
            .add_load(packet.len(), now);
        if open.writer.len() >= self.config.max_bytes || open.writer.is_full() {
            self.seal(dest, Some(now), true);
        }
        Ok(())
    }

    fn mac_len(&self) -> usize {
        if self.key.is_some() { MAC_LEN } else { 0 }
    }

    /// Seals `dest`'s open bundle; from `now` on, a reply to it is awaited under load. `full`:
    /// sealed for its size, with more to come at once (the header says so).
    fn seal(&mut self, dest: NodeId, now: Option<Instant>, full: bool) {
        let Some(open) = self.open.remove(&dest) else {
            return;
        };
        if let Some(now) = now {
            let p = self.pace.entry(dest).or_insert_with(|| Pace::new(now));
            p.last_sealed = Some(now);
            p.heard = None;
        }
        let stream = self.stream(dest);
        let (session, seq) = (stream.session, stream.next_seq);
        stream.next_seq += 1;
        let header = BundleHeader {
            sender: self.sender,
            dest,
            session,
            seq,
            more: full,
        };
        let packets = open.writer.packet_count();
        let packet_bytes = (open.writer.len() - HEADER_LEN - 4 * packets as usize) as u64;
        let expects_answer = open.expects_answer;
        let body = open.writer.finish(&header, self.key.as_ref());
        self.sealed.push_back(Sealed {
            dest,
            session: header.session,
            seq: header.seq,
            packets,
            packet_bytes,
            body,
            expects_answer,
        });
    }

    /// `dest`'s stream, opened (in the next session) if it has none.
    fn stream(&mut self, dest: NodeId) -> &mut Stream {
        let base = self.session;
        let opened = &mut self.streams_opened;
        self.streams.entry(dest).or_insert_with(|| {
            let session = session_number(base, *opened);
            *opened += 1;
            Stream {
                session,
                next_seq: 0,
            }
        })
    }

    /// Makes room for one more stream at `now`, or says why there is none.
    fn admit_stream(&mut self, now: Instant) -> Result<(), BundlerError> {
        let elapsed = self
            .new_streams_at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.new_streams = (self.new_streams + elapsed * f64::from(NEW_STREAMS_PER_SECOND))
            .min(f64::from(NEW_STREAMS_BURST));
        self.new_streams_at = Some(self.new_streams_at.map_or(now, |at| at.max(now)));
        if self.new_streams < 1.0 {
            return Err(BundlerError::NewDestinationsTooFast {
                per_second: NEW_STREAMS_PER_SECOND,
            });
        }
        if self.streams.len() >= MAX_DESTINATIONS {
            self.prune(now);
        }
        if self.streams.len() >= MAX_DESTINATIONS {
            self.evict(MAX_DESTINATIONS / 4);
        }
        if self.streams.len() >= MAX_DESTINATIONS {
            return Err(BundlerError::TooManyDestinations {
                limit: MAX_DESTINATIONS,
            });
        }
        self.new_streams -= 1.0;
        Ok(())
    }

    /// Destinations with nothing open, sealed or in flight.
    fn idle_destinations(&self) -> Vec<NodeId> {
        let held: HashSet<NodeId> = self
            .sealed
            .iter()
            .map(|s| s.dest)
            .chain(self.open.keys().copied())
            .chain(self.in_flight_per_dest.keys().copied())
            .collect();
        self.streams
            .keys()
            .chain(self.pace.keys())
            .filter(|d| !held.contains(d))
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }

    /// Forgets up to `n` of the least recently active destinations that hold nothing (a batch,
    /// so that a spray of new addresses costs one sort per `n` of them, not one scan each).
    fn evict(&mut self, n: usize) {
        let mut idle: Vec<(Option<Instant>, NodeId)> = self
            .idle_destinations()
            .into_iter()
            .filter(|d| self.streams.contains_key(d))
            .map(|d| (self.pace.get(&d).map(Pace::last_active), d))
            .collect();
        idle.sort_unstable();
        for (_, dest) in idle.into_iter().take(n) {
            self.streams.remove(&dest);
            self.pace.remove(&dest);
        }
    }

    /// Destinations with a stream (see `MAX_DESTINATIONS`).
    pub fn destinations(&self) -> usize {
        self.streams.len()
    }

    /// Forgets every destination with nothing open, sealed or in flight and no traffic either
    /// way for `FORGET_AFTER`: its stream and its pace.
    fn prune(&mut self, now: Instant) {
        self.last_prune = Some(now);
        for dest in self.idle_destinations() {
            let quiet = self
                .pace
                .get(&dest)
                .is_none_or(|p| now.saturating_duration_since(p.last_active()) >= FORGET_AFTER);
            if quiet {
                self.streams.remove(&dest);
                self.pace.remove(&dest);
            }
        }
    }

    /// An empty bundle (`count == 0`) for `seq` of `dest`'s stream in `session`: the explicit
    /// "skip" a sender publishes under a key whose PUT it gave up, so the receiver moves past it
    /// at once instead of waiting for its gap timeout.
    pub fn skip_marker(&self, dest: NodeId, session: u64, seq: u64) -> Vec<u8> {
        let header = BundleHeader {
            sender: self.sender,
            dest,
            session,
            seq,
            more: false,
        };
        BundleWriter::new().finish(&header, self.key.as_ref())
    }

    /// The next bundle to PUT, if the flush rules and the in-flight limit allow one now. The
    /// caller must report its completion with `put_done`.
    pub fn next_put(&mut self, now: Instant) -> Option<Sealed> {
        if self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
        {
            self.prune(now);
        }
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
                    self.release_at(dest, open, now).is_none_or(|t| now >= t)
                })
                .min_by_key(|(_, open)| open.oldest)
                .map(|(dest, _)| *dest);
            self.seal(ready?, Some(now), false);
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
                // With nothing in flight the bundle is only held by the load rule (otherwise
                // `next_put` has taken it already).
                self.release_at(dest, o, now)
            })
            .min()
    }

    /// Seals every open bundle (shutdown: send what we have).
    pub fn seal_all(&mut self) {
        let dests: Vec<NodeId> = self.open.keys().copied().collect();
        for d in dests {
            self.seal(d, None, false);
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

    /// Puts `bytes` to `D1` in one bundle at `t` and ends its PUT after `took`: `D1` is under
    /// load from then on (for `LOAD_WINDOW` or so).
    fn load_d1(b: &mut Bundler, t: Instant, bytes: usize, took: Duration) {
        for _ in 0..bytes / 50_000 {
            b.push(D1, &pkt(50_000), t).unwrap();
        }
        // Under load the first bundle gathers for a moment too.
        let gather = b.config.gather;
        let s = match b.next_put(t) {
            Some(s) => s,
            None => b.next_put(t + gather).unwrap(),
        };
        b.put_done(D1, s.body.len());
        b.put_succeeded(D1, took, t + took);
    }

    /// The reply rule alone, without the pace.
    fn unpaced() -> BundlerConfig {
        BundlerConfig {
            pace: Duration::ZERO,
            ..BundlerConfig::default()
        }
    }

    #[test]
    fn under_load_a_bundle_waits_for_the_destinations_reply_and_then_gathers_for_a_moment() {
        let mut b = bundler(unpaced());
        let t = Instant::now();
        let ms = Duration::from_millis;
        load_d1(&mut b, t, 1_000_000, ms(20));
        assert!(b.under_load(&D1, t + ms(20)));
        b.push(D1, &pkt(10), t + ms(21)).unwrap();
        assert!(b.next_put(t + ms(30)).is_none(), "no reply yet");
        // Without a reply it would leave reply_wait (4) PUT latencies after the last PUT ended.
        assert_eq!(b.next_deadline(t + ms(30)), Some(t + ms(20 + 80)));
        // The destination's bundle arrives: what the stack sends in answer joins for `gather`.
        b.heard(D1, 5_000, false, t + ms(50));
        assert_eq!(b.next_deadline(t + ms(50)), Some(t + ms(51)));
        b.push(D1, &pkt(10), t + ms(50)).unwrap();
        assert!(b.next_put(t + ms(50)).is_none());
        let s = b.next_put(t + ms(51)).unwrap();
        assert_eq!(s.packets, 2);
        // A reply heard before our last PUT does not release the next bundle.
        b.push(D1, &pkt(10), t + ms(52)).unwrap();
        b.put_done(D1, s.body.len());
        b.put_succeeded(D1, ms(20), t + ms(71));
        assert!(b.next_put(t + ms(80)).is_none());
    }

    #[test]
    fn under_load_a_bundle_still_filling_after_the_reply_leaves_when_its_input_pauses() {
        let mut b = bundler(unpaced());
        let t = Instant::now();
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        load_d1(&mut b, t, 1_000_000, ms(10));
        b.heard(D1, 5_000, false, t + ms(20));
        // Packets every half millisecond after the reply (many flows, or a paced one): the
        // bundle keeps gathering while they come (within the hold, one 10 ms PUT latency).
        let mut at = t + ms(20);
        for _ in 0..16 {
            b.push(D1, &pkt(1_000), at).unwrap();
            at += us(500);
            assert!(b.next_put(at).is_none(), "still filling at {:?}", at - t);
        }
        // They pause: it leaves a few of their spacings (and at least `gather`) after the last.
        let last = at - us(500);
        assert!(b.next_put(last + ms(1) - us(1)).is_none());
        assert_eq!(b.next_put(last + ms(2)).map(|s| s.packets), Some(16));
        // A flow that never pauses is held at most `reply_hold` PUT latencies after the reply.
        b.put_done(D1, 0);
        b.heard(D1, 5_000, false, last + ms(2));
        let mut at = last + ms(2);
        let mut sealed = None;
        while sealed.is_none() && at < last + ms(100) {
            b.push(D1, &pkt(1_000), at).unwrap();
            at += us(500);
            sealed = b.next_put(at);
        }
        assert_eq!(at, last + ms(2 + 10), "1 x 10 ms after the reply");
    }

    #[test]
    fn bundles_sealed_full_say_so_and_a_burst_of_them_draws_one_answer() {
        let cfg = BundlerConfig {
            max_bytes: 200_000,
            ..unpaced()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        let ms = Duration::from_millis;
        for _ in 0..5 {
            b.push(D2, &pkt(50_000), t).unwrap();
        }
        let full = b.next_put(t).unwrap();
        assert!(decode(&full.body, None).unwrap().header.more, "sealed full");
        let rest = b.next_put(t + ms(100)).unwrap();
        assert!(!decode(&rest.body, None).unwrap().header.more);
        // The answering side: under load, full bundles heard do not release our answer; the
        // last of the burst (not full) does.
        let mut b = bundler(unpaced());
        load_d1(&mut b, t, 1_000_000, ms(10));
        b.push(D1, &pkt(10), t + ms(11)).unwrap();
        b.heard(D1, 200_000, true, t + ms(12));
        b.heard(D1, 200_000, true, t + ms(14));
        assert!(b.next_put(t + ms(20)).is_none());
        b.heard(D1, 30_000, false, t + ms(21));
        assert_eq!(b.next_put(t + ms(22)).map(|s| s.packets), Some(1));
    }

    #[test]
    fn under_load_without_a_reply_a_bundle_leaves_reply_wait_put_latencies_after_the_last_put() {
        let mut b = bundler(unpaced());
        let t = Instant::now();
        let ms = Duration::from_millis;
        load_d1(&mut b, t, 1_000_000, ms(10));
        b.push(D1, &pkt(10), t + ms(12)).unwrap();
        assert!(b.next_put(t + ms(49)).is_none());
        assert_eq!(b.next_put(t + ms(50)).map(|s| s.packets), Some(1));
    }

    #[test]
    fn under_load_bundles_to_a_destination_are_a_pace_apart_unless_full() {
        let cfg = BundlerConfig {
            max_bytes: 2_000_000,
            pace: Duration::from_millis(100),
            ..BundlerConfig::default()
        };
        let mut b = bundler(cfg);
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Sealed at t + 1 ms (the first bundle under load gathers).
        load_d1(&mut b, t, 1_000_000, ms(10));
        b.push(D1, &pkt(10), t + ms(20)).unwrap();
        // The reply comes early: the bundle still waits for the pace.
        b.heard(D1, 5_000, false, t + ms(30));
        assert!(b.next_put(t + ms(100)).is_none());
        assert_eq!(b.next_deadline(t + ms(100)), Some(t + ms(101)));
        // What fills a bundle meanwhile leaves at once.
        for _ in 0..40 {
            b.push(D1, &pkt(50_000), t + ms(50)).unwrap();
        }
        let full = b.next_put(t + ms(50)).expect("a full bundle is not paced");
        assert!(full.body.len() > 1_900_000);
        b.put_done(D1, full.body.len());
        b.put_succeeded(D1, ms(10), t + ms(60));
        // The rest waits a pace after that seal, and for a reply.
        b.heard(D1, 5_000, false, t + ms(70));
        assert!(b.next_put(t + ms(149)).is_none());
        assert!(b.next_put(t + ms(150)).is_some());
    }

    #[test]
    fn interactive_traffic_is_not_load_and_leaves_at_once_even_right_after_a_put() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        // A ping every 50 ms, each PUT taking 40: the next leaves while the last just ended.
        for i in 0..20 {
            let at = t + ms(50 * i);
            b.heard(D1, 200, false, at);
            b.push(D1, &pkt(64), at).unwrap();
            let s = b.next_put(at).expect("a ping leaves at once");
            b.put_done(D1, s.body.len());
            b.put_succeeded(D1, ms(40), at + ms(40));
        }
        assert!(!b.under_load(&D1, t + ms(1000)));
    }

    #[test]
    fn load_fades_within_a_few_load_windows_of_quiet() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let ms = Duration::from_millis;
        load_d1(&mut b, t, 2_000_000, ms(10));
        assert!(b.under_load(&D1, t + ms(10)));
        assert!(!b.under_load(&D2, t + ms(10)), "load is per destination");
        let quiet = t + LOAD_WINDOW * 4;
        assert!(!b.under_load(&D1, quiet));
        b.push(D1, &pkt(10), quiet).unwrap();
        assert!(b.next_put(quiet).is_some());
    }

    #[test]
    fn a_zero_load_rate_turns_the_rule_off() {
        let mut b = bundler(BundlerConfig {
            load_rate: 0,
            ..BundlerConfig::default()
        });
        let t = Instant::now();
        let ms = Duration::from_millis;
        load_d1(&mut b, t, 2_000_000, ms(10));
        b.push(D1, &pkt(10), t + ms(11)).unwrap();
        assert!(b.next_put(t + ms(11)).is_some());
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

    /// Sends one packet to `dest` at `t` and completes its PUT; returns (session, seq).
    fn send_one(b: &mut Bundler, dest: NodeId, t: Instant) -> (u64, u64) {
        b.push(dest, &pkt(10), t).unwrap();
        let s = b.next_put(t).unwrap();
        assert_eq!(s.dest, dest);
        b.put_done(dest, s.body.len());
        b.put_succeeded(dest, Duration::from_millis(20), t);
        (s.session, s.seq)
    }

    /// Opens streams to `dests` as fast as the new-stream rate allows from `t`; returns their
    /// sessions and the time after the last.
    fn open_streams(
        b: &mut Bundler,
        dests: impl Iterator<Item = NodeId>,
        t: Instant,
    ) -> (Vec<u64>, Instant) {
        let step = Duration::from_secs(1) / NEW_STREAMS_PER_SECOND;
        let mut now = t;
        let sessions = dests
            .map(|d| {
                now += step;
                send_one(b, d, now).0
            })
            .collect();
        (sessions, now)
    }

    fn dest(i: usize) -> NodeId {
        NodeId(1_000 + i as u64)
    }

    #[test]
    fn new_streams_open_at_a_bounded_rate_and_a_refused_packet_holds_nothing() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        for i in 0..NEW_STREAMS_BURST as usize {
            send_one(&mut b, dest(i), t);
        }
        let sprayed = dest(NEW_STREAMS_BURST as usize);
        assert_eq!(
            b.push(sprayed, &pkt(10), t),
            Err(BundlerError::NewDestinationsTooFast {
                per_second: NEW_STREAMS_PER_SECOND
            })
        );
        assert_eq!(b.buffered_bytes(), 0);
        // Known destinations are not held to the rate.
        assert_eq!(send_one(&mut b, dest(0), t).1, 1);
        // A second later the bucket has refilled by the rate.
        let later = t + Duration::from_secs(1);
        for i in 0..NEW_STREAMS_PER_SECOND as usize {
            send_one(&mut b, dest(1_000 + i), later);
        }
        assert!(b.push(sprayed, &pkt(10), later).is_err());
    }

    #[test]
    fn destinations_are_bounded_and_a_forgotten_one_comes_back_in_a_new_session() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let (sessions, now) = open_streams(&mut b, (0..MAX_DESTINATIONS).map(dest), t);
        let distinct: HashSet<u64> = sessions.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            MAX_DESTINATIONS,
            "every stream has a session"
        );
        assert_eq!(b.destinations(), MAX_DESTINATIONS);
        // The newest destination talks again; then one address more: the least recently active
        // quarter is forgotten, not the new address refused.
        let newest = dest(MAX_DESTINATIONS - 1);
        assert_eq!(send_one(&mut b, newest, now).1, 1);
        let now = now + Duration::from_secs(1);
        assert_eq!(send_one(&mut b, dest(MAX_DESTINATIONS), now).1, 0);
        assert_eq!(
            b.destinations(),
            MAX_DESTINATIONS - MAX_DESTINATIONS / 4 + 1
        );
        assert_eq!(
            send_one(&mut b, newest, now),
            (sessions[MAX_DESTINATIONS - 1], 2)
        );
        // The oldest was forgotten: it starts over from seq 0 in a session no stream had.
        let (session, seq) = send_one(&mut b, dest(0), now);
        assert_eq!(seq, 0);
        assert!(!distinct.contains(&session));
        // And after FORGET_AFTER without traffic every quiet destination is forgotten.
        let later = now + FORGET_AFTER;
        send_one(&mut b, dest(0), later);
        assert_eq!(b.destinations(), 1);
    }

    #[test]
    fn a_destination_with_a_put_in_flight_is_not_forgotten() {
        let mut b = bundler(BundlerConfig::default());
        let t = Instant::now();
        let (session, _) = send_one(&mut b, D1, t);
        b.push(D1, &pkt(10), t).unwrap();
        let hanging = b.next_put(t).unwrap();
        assert_eq!((hanging.session, hanging.seq), (session, 1));
        let (_, now) = open_streams(&mut b, (0..MAX_DESTINATIONS - 1).map(dest), t);
        // D1 is the least recently active, and FORGET_AFTER has passed: still kept.
        let later = now.max(t + FORGET_AFTER * 2);
        send_one(&mut b, D2, later);
        assert_eq!(b.destinations(), 2, "D1 (in flight) and D2");
        b.put_done(D1, hanging.body.len());
        assert_eq!(send_one(&mut b, D1, later), (session, 2));
    }
}
