//! In-order delivery per (sender, session), and once-only delivery per key. Sans-IO.
//!
//! A stream starts expecting seq 0 (each agent start is a new session whose first bundle is seq
//! 0), so a bundle overtaken by a later one at session start is still delivered in order. A
//! receiver that joins a session late (it restarted) sees the hole below the first seq it gets
//! skipped after `GAP_TIMEOUT`, once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::node_addr::NodeId;

/// A hole in a stream older than this is skipped.
pub const GAP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct ReorderConfig {
    pub gap_timeout: Duration,
    /// Bundles held behind a hole, per stream; beyond it the hole is skipped at once.
    pub max_held_per_stream: usize,
    /// Streams tracked; beyond it the least recently seen idle stream is forgotten.
    pub max_streams: usize,
    /// A stream with nothing held is forgotten after this long without a bundle.
    pub stream_idle: Duration,
}

impl Default for ReorderConfig {
    fn default() -> Self {
        ReorderConfig {
            gap_timeout: GAP_TIMEOUT,
            max_held_per_stream: 1024,
            max_streams: 4096,
            stream_idle: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId {
    pub sender: NodeId,
    pub session: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Delivered (with any held successors) into the output.
    Delivered,
    /// Waiting for a lower seq.
    Held,
    /// Already delivered or already held: dropped.
    Duplicate,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReorderStats {
    pub duplicates: u64,
    /// Sequence numbers given up on (holes skipped).
    pub skipped: u64,
}

#[derive(Debug)]
struct Stream<T> {
    next: u64,
    held: BTreeMap<u64, T>,
    gap_since: Option<Instant>,
    last_seen: Instant,
}

impl<T> Stream<T> {
    fn drain(&mut self, out: &mut Vec<T>) {
        while let Some(item) = self.held.remove(&self.next) {
            out.push(item);
            self.next = self.next.wrapping_add(1);
        }
    }

    /// Gives up on the hole below the lowest held seq; returns how many seqs were skipped.
    fn skip_hole(&mut self, out: &mut Vec<T>) -> u64 {
        let Some((&first, _)) = self.held.first_key_value() else {
            return 0;
        };
        let skipped = first.saturating_sub(self.next);
        self.next = first;
        self.drain(out);
        skipped
    }
}

#[derive(Debug)]
pub struct Reorder<T> {
    config: ReorderConfig,
    streams: HashMap<StreamId, Stream<T>>,
    stats: ReorderStats,
}

impl<T> Reorder<T> {
    pub fn new(config: ReorderConfig) -> Reorder<T> {
        Reorder {
            config,
            streams: HashMap::new(),
            stats: ReorderStats::default(),
        }
    }

    /// Offers bundle `seq` of `id`; whatever becomes deliverable is appended to `out` in order.
    pub fn offer(
        &mut self,
        id: StreamId,
        seq: u64,
        item: T,
        now: Instant,
        out: &mut Vec<T>,
    ) -> Offer {
        if !self.streams.contains_key(&id) && self.streams.len() >= self.config.max_streams {
            self.evict_one();
        }
        let stream = self.streams.entry(id).or_insert_with(|| Stream {
            next: 0,
            held: BTreeMap::new(),
            gap_since: None,
            last_seen: now,
        });
        stream.last_seen = now;
        if seq < stream.next || stream.held.contains_key(&seq) {
            self.stats.duplicates += 1;
            return Offer::Duplicate;
        }
        if seq == stream.next {
            out.push(item);
            stream.next = stream.next.wrapping_add(1);
            stream.drain(out);
            stream.gap_since = (!stream.held.is_empty()).then_some(now);
            Offer::Delivered
        } else {
            stream.held.insert(seq, item);
            stream.gap_since.get_or_insert(now);
            if stream.held.len() > self.config.max_held_per_stream {
                self.stats.skipped += stream.skip_hole(out);
                stream.gap_since = (!stream.held.is_empty()).then_some(now);
                return Offer::Delivered;
            }
            Offer::Held
        }
    }

    /// Starts tracking `id` at `next` if it is not tracked yet: a restarted receiver resumes a
    /// stream at its delivery cursor instead of waiting for seqs it delivered before.
    pub fn resume(&mut self, id: StreamId, next: u64, now: Instant) {
        if self.streams.contains_key(&id) {
            return;
        }
        if self.streams.len() >= self.config.max_streams {
            self.evict_one();
        }
        self.streams.insert(
            id,
            Stream {
                next,
                held: BTreeMap::new(),
                gap_since: None,
                last_seen: now,
            },
        );
    }

    /// The seq each tracked stream expects next (the key a receiver can probe for).
    pub fn expected(&self) -> impl Iterator<Item = (StreamId, u64)> + '_ {
        self.streams.iter().map(|(id, s)| (*id, s.next))
    }

    /// Skips holes older than the gap timeout and forgets idle streams.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let timeout = self.config.gap_timeout;
        for stream in self.streams.values_mut() {
            if let Some(since) = stream.gap_since
                && now.saturating_duration_since(since) >= timeout
            {
                self.stats.skipped += stream.skip_hole(out);
                stream.gap_since = (!stream.held.is_empty()).then_some(now);
            }
        }
        let idle = self.config.stream_idle;
        self.streams
            .retain(|_, s| !s.held.is_empty() || now.saturating_duration_since(s.last_seen) < idle);
    }

    /// When `expire` next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|s| s.gap_since)
            .min()
            .map(|t| t + self.config.gap_timeout)
    }

    pub fn take_stats(&mut self) -> ReorderStats {
        std::mem::take(&mut self.stats)
    }

    pub fn held(&self) -> usize {
        self.streams.values().map(|s| s.held.len()).sum()
    }

    fn evict_one(&mut self) {
        let victim = self
            .streams
            .iter()
            .filter(|(_, s)| s.held.is_empty())
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(id, _)| *id);
        if let Some(id) = victim {
            self.streams.remove(&id);
        }
    }
}

/// Keys already taken from the inbox (delivered, held or rejected). A key stays here until a
/// LIST no longer shows it, so a slow or failed DELETE never causes a second delivery.
#[derive(Debug, Default)]
pub struct SeenKeys {
    /// Key -> when it was taken, or last scheduled for deletion.
    keys: HashMap<String, Instant>,
}

impl SeenKeys {
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    pub fn insert(&mut self, key: String, now: Instant) {
        self.keys.entry(key).or_insert(now);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keeps only keys a complete LIST still shows.
    pub fn retain_listed(&mut self, listed: &HashSet<&str>) {
        self.keys.retain(|k, _| listed.contains(k.as_str()));
    }

    /// True when `key` was taken more than `after` ago and is still listed: its DELETE failed
    /// and should be retried. Resets the clock so it is retried at most once per `after`.
    pub fn needs_redelete(&mut self, key: &str, now: Instant, after: Duration) -> bool {
        match self.keys.get_mut(key) {
            Some(t) if now.saturating_duration_since(*t) >= after => {
                *t = now;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_stream_delivers_from_its_cursor_without_waiting() {
        let t = Instant::now();
        let id = StreamId {
            sender: NodeId(1),
            session: 1,
        };
        let mut r = Reorder::new(ReorderConfig::default());
        r.resume(id, 57, t);
        let mut out = Vec::new();
        assert_eq!(r.offer(id, 56, "old", t, &mut out), Offer::Duplicate);
        assert_eq!(r.offer(id, 57, "next", t, &mut out), Offer::Delivered);
        assert_eq!(out, vec!["next"]);
        assert_eq!(r.expected().collect::<Vec<_>>(), vec![(id, 58)]);
        r.resume(id, 0, t);
        assert_eq!(r.expected().next(), Some((id, 58)), "resume never rewinds");
    }

    const A: StreamId = StreamId {
        sender: NodeId(1),
        session: 9,
    };
    const B: StreamId = StreamId {
        sender: NodeId(2),
        session: 9,
    };

    fn setup() -> (Reorder<u64>, Instant, Vec<u64>) {
        (
            Reorder::new(ReorderConfig::default()),
            Instant::now(),
            vec![],
        )
    }

    #[test]
    fn in_order_bundles_are_delivered_at_once() {
        let (mut r, t, mut out) = setup();
        for s in 0..3 {
            assert_eq!(r.offer(A, s, s, t, &mut out), Offer::Delivered);
        }
        assert_eq!(out, [0, 1, 2]);
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn overtaken_first_bundle_of_a_session_is_still_delivered_in_order() {
        let (mut r, t, mut out) = setup();
        assert_eq!(r.offer(A, 1, 1, t, &mut out), Offer::Held);
        assert!(out.is_empty());
        assert_eq!(r.offer(A, 0, 0, t, &mut out), Offer::Delivered);
        assert_eq!(out, [0, 1]);
    }

    #[test]
    fn gap_is_held_then_filled() {
        let (mut r, t, mut out) = setup();
        r.offer(A, 0, 0, t, &mut out);
        r.offer(A, 2, 2, t, &mut out);
        r.offer(A, 3, 3, t, &mut out);
        assert_eq!(out, [0]);
        r.offer(A, 1, 1, t, &mut out);
        assert_eq!(out, [0, 1, 2, 3]);
    }

    #[test]
    fn hole_older_than_gap_timeout_is_skipped_and_counted() {
        let (mut r, t, mut out) = setup();
        r.offer(A, 0, 0, t, &mut out);
        r.offer(A, 3, 3, t, &mut out);
        assert_eq!(r.next_deadline(), Some(t + GAP_TIMEOUT));
        r.expire(t + GAP_TIMEOUT - Duration::from_millis(1), &mut out);
        assert_eq!(out, [0]);
        r.expire(t + GAP_TIMEOUT, &mut out);
        assert_eq!(out, [0, 3]);
        assert_eq!(r.take_stats().skipped, 2);
        // Late arrivals of skipped seqs are duplicates now.
        assert_eq!(r.offer(A, 1, 1, t, &mut out), Offer::Duplicate);
    }

    #[test]
    fn late_joined_session_waits_one_gap_timeout() {
        let (mut r, t, mut out) = setup();
        assert_eq!(r.offer(A, 5000, 5000, t, &mut out), Offer::Held);
        r.expire(t + GAP_TIMEOUT, &mut out);
        assert_eq!(out, [5000]);
        r.offer(A, 5001, 5001, t + GAP_TIMEOUT, &mut out);
        assert_eq!(out, [5000, 5001]);
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let (mut r, t, mut out) = setup();
        r.offer(A, 0, 0, t, &mut out);
        assert_eq!(r.offer(A, 0, 0, t, &mut out), Offer::Duplicate);
        r.offer(A, 2, 2, t, &mut out);
        assert_eq!(r.offer(A, 2, 2, t, &mut out), Offer::Duplicate);
        assert_eq!(out, [0]);
        assert_eq!(r.take_stats().duplicates, 2);
    }

    #[test]
    fn streams_are_independent() {
        let (mut r, t, mut out) = setup();
        r.offer(A, 1, 1, t, &mut out);
        r.offer(B, 0, 100, t, &mut out);
        assert_eq!(out, [100]);
        let other_session = StreamId {
            sender: NodeId(1),
            session: 10,
        };
        r.offer(other_session, 0, 200, t, &mut out);
        assert_eq!(out, [100, 200]);
    }

    #[test]
    fn held_bundles_are_bounded_per_stream() {
        let mut r = Reorder::new(ReorderConfig {
            max_held_per_stream: 4,
            ..ReorderConfig::default()
        });
        let t = Instant::now();
        let mut out = vec![];
        for s in 10..14 {
            assert_eq!(r.offer(A, s, s, t, &mut out), Offer::Held);
        }
        assert_eq!(r.offer(A, 14, 14, t, &mut out), Offer::Delivered);
        assert_eq!(out, [10, 11, 12, 13, 14]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn stream_count_is_bounded() {
        let mut r = Reorder::new(ReorderConfig {
            max_streams: 2,
            ..ReorderConfig::default()
        });
        let t = Instant::now();
        let mut out = vec![];
        for n in 0..10u64 {
            let id = StreamId {
                sender: NodeId(n),
                session: 0,
            };
            r.offer(id, 0, n, t + Duration::from_millis(n), &mut out);
        }
        assert!(r.streams.len() <= 2);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn idle_streams_are_forgotten() {
        let (mut r, t, mut out) = setup();
        r.offer(A, 0, 0, t, &mut out);
        r.expire(t + Duration::from_secs(601), &mut out);
        assert!(r.streams.is_empty());
    }

    #[test]
    fn seen_keys_are_kept_until_a_list_no_longer_shows_them() {
        let mut seen = SeenKeys::default();
        let t = Instant::now();
        seen.insert("a".into(), t);
        seen.insert("b".into(), t);
        let listed: HashSet<&str> = ["b", "c"].into_iter().collect();
        seen.retain_listed(&listed);
        assert!(!seen.contains("a"));
        assert!(seen.contains("b"));
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn lingering_seen_key_is_redeleted_at_most_once_per_interval() {
        let mut seen = SeenKeys::default();
        let t = Instant::now();
        let every = Duration::from_secs(30);
        seen.insert("k".into(), t);
        assert!(!seen.needs_redelete("k", t + Duration::from_secs(29), every));
        assert!(seen.needs_redelete("k", t + every, every));
        assert!(!seen.needs_redelete("k", t + every + Duration::from_secs(1), every));
        assert!(!seen.needs_redelete("unknown", t + every * 9, every));
    }
}
