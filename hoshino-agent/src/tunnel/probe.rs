//! When a stream's next key may be probed again after a miss. Sans-IO (time is passed in).
//!
//! A probe that misses is a request too. Without a bound, a hot stream probed on every 5 ms tick
//! would pay up to 200 misses per second whenever the sender pauses, and its requests per GiB
//! would be dominated by misses. So consecutive misses of a stream space its probes out, doubling
//! from `MIN_GAP` to `MAX_GAP`; a hit, a doorbell naming the stream, or a PUT of ours (a reply
//! is likely) makes it eager again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::tunnel::reorder::StreamId;

/// Gap after the first miss.
pub const MIN_GAP: Duration = Duration::from_millis(5);
/// Largest gap between probes of a stream that keeps missing (while the receiver is active):
/// at most 50 misses per second per stream, and at most 20 ms (10 on average) added to the
/// latency of a packet that ends a pause.
pub const MAX_GAP: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug)]
struct Backoff {
    gap: Duration,
    not_before: Instant,
}

#[derive(Debug, Default)]
pub struct ProbeSchedule {
    streams: HashMap<StreamId, Backoff>,
}

impl ProbeSchedule {
    /// Whether `stream` may be probed at `now`.
    pub fn may_probe(&self, stream: StreamId, now: Instant) -> bool {
        self.streams
            .get(&stream)
            .is_none_or(|b| now >= b.not_before)
    }

    /// A probe of `stream` found nothing at `now`.
    pub fn missed(&mut self, stream: StreamId, now: Instant) {
        let gap = match self.streams.get(&stream) {
            Some(b) => (b.gap * 2).min(MAX_GAP),
            None => MIN_GAP,
        };
        self.streams.insert(
            stream,
            Backoff {
                gap,
                not_before: now + gap,
            },
        );
    }

    /// A bundle of `stream` was found, or something names it: probe eagerly again.
    pub fn hit(&mut self, stream: StreamId) {
        self.streams.remove(&stream);
    }

    /// We sent something (a reply is likely): every stream is eager again.
    pub fn hurry(&mut self) {
        self.streams.clear();
    }

    /// Forgets streams no longer probed.
    pub fn retain(&mut self, mut keep: impl FnMut(&StreamId) -> bool) {
        self.streams.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_addr::NodeId;

    const S: StreamId = StreamId {
        sender: NodeId(1),
        session: 2,
    };
    const OTHER: StreamId = StreamId {
        sender: NodeId(3),
        session: 2,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn consecutive_misses_space_probes_out_up_to_the_maximum() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        assert!(p.may_probe(S, t));
        let mut now = t;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            p.missed(S, now);
            let mut next = now;
            while !p.may_probe(S, next) {
                next += ms(1);
            }
            gaps.push((next - now).as_millis());
            now = next;
        }
        assert_eq!(gaps, [5, 10, 20, 20, 20, 20, 20, 20]);
        assert!(p.may_probe(OTHER, t), "streams are independent");
    }

    #[test]
    fn a_hit_or_a_send_makes_probing_eager_again() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        for i in 0..5 {
            p.missed(S, t + ms(i));
        }
        assert!(!p.may_probe(S, t + ms(5)));
        p.hit(S);
        assert!(p.may_probe(S, t + ms(5)));
        p.missed(S, t + ms(5));
        p.missed(OTHER, t + ms(5));
        p.hurry();
        assert!(p.may_probe(S, t + ms(5)) && p.may_probe(OTHER, t + ms(5)));
    }
}
