//! When a stream's next key may be probed. Sans-IO (time is passed in).
//!
//! A probe that misses is a request too. Without a bound, a hot stream probed on every tick
//! would pay up to 200 misses per second whenever the sender pauses, and its requests per GiB
//! would be dominated by misses. So:
//! - consecutive misses of a stream space its probes out, doubling from `MIN_GAP` to `MAX_GAP`;
//! - a stream with a cadence (finds less than `CADENCE_WITHIN` apart, EWMA interval) that
//!   misses before its next bundle is due is probed again at three quarters of its interval
//!   after its last find, and every `MIN_GAP` from then until a quarter interval past the
//!   expected time;
//! - a find or a doorbell naming the stream makes it eager again, except that a stream we are
//!   caught up with (its last probe missed) whose cadence is slower than `PROBE_AHEAD_WITHIN` is
//!   next probed at three quarters of its interval after a find: its sender has nothing more yet,
//!   and an immediate probe would only miss (once `CADENCE_FINDS` finds in a row show the
//!   cadence: a request and its reply are no cadence);
//! - a PUT of ours (a reply is likely) makes every stream without a cadence (bundles found less
//!   than `CADENCE_WITHIN` apart) eager for its next `EAGER_MISSES` misses: each miss is probed
//!   again at once, so a reply is found within about one GET of landing (what a round trip's
//!   latency is made of), and a reply that never comes costs a bounded number of GETs.
//!   Streams with a cadence keep their pace: a sender busy talking to us (a bulk transfer's data
//!   or ACKs) is followed by finds, and hurrying it on every PUT of ours would only add misses;
//! - a stream whose finds come at a steady interval (`PERIOD_FINDS` in a row within
//!   `1 / PERIOD_TOLERANCE` of it, up to `PERIOD_WITHIN` apart: a ping, a keepalive, a poll) has
//!   a period, which predicts its next bundle more closely than a cadence: it is probed from
//!   `margin` before the predicted find (four times the period's jitter, at least
//!   `PERIOD_MARGIN_MIN`, at most a quarter period), each miss again `MIN_GAP` later until
//!   `margin` after it. Between windows the spacing stays at most `MAX_GAP` (so a packet off the period
//!   waits no longer than on any quiet stream) and never overshoots the next window's start. A
//!   `ping` (one a second) was otherwise found by that spacing: 1.5-2.0x the floor at express.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::tunnel::reorder::StreamId;

/// Gap after the first miss.
pub const MIN_GAP: Duration = Duration::from_millis(5);
/// Largest gap between probes of a stream that keeps missing (while the receiver is active):
/// at most 25 misses per second per stream, and at most 40 ms (20 on average) added to the
/// latency of a packet that ends a pause without a PUT of ours before it (a reply is found by
/// the eager probes that PUT starts).
pub const MAX_GAP: Duration = Duration::from_millis(40);
/// Misses re-probed at once after a PUT of ours (two probes are in flight then, staggered by
/// half a GET, so this covers about 8 GETs of waiting for a reply).
pub const EAGER_MISSES: u32 = 16;
/// A caught-up stream whose finds come at least this far apart is not probed again at once
/// after a find (its sender has nothing more yet); one with a faster cadence is.
pub const PROBE_AHEAD_WITHIN: Duration = Duration::from_millis(20);
/// Finds closer together than this form a stream's cadence.
pub const CADENCE_WITHIN: Duration = Duration::from_millis(250);
/// Finds in a row, each within `CADENCE_WITHIN` of the last, before a find is taken to predict
/// the next one: a request and its reply (a TCP handshake, an HTTP GET) are two or three finds
/// that predict nothing, and waiting on their "interval" delayed the next packet.
pub const CADENCE_FINDS: u32 = 4;
/// Finds at most this far apart can form a period (see the module doc); a stream quieter than
/// that goes idle soon anyway (`IDLE_AFTER`).
pub const PERIOD_WITHIN: Duration = Duration::from_millis(2500);
/// Intervals in a row that agree with the period before it predicts the next find.
pub const PERIOD_FINDS: u32 = 3;
/// An interval agrees with the period when within `1 / PERIOD_TOLERANCE` of it.
const PERIOD_TOLERANCE: u32 = 8;
/// Least margin around a period's predicted find (timer and GET jitter).
pub const PERIOD_MARGIN_MIN: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, Default)]
struct StreamProbe {
    /// Gap after the latest miss (zero: no miss since the last find).
    gap: Duration,
    not_before: Option<Instant>,
    last_find: Option<Instant>,
    /// EWMA of the time between finds, while they come closer than `CADENCE_WITHIN`.
    interval: Option<Duration>,
    /// Misses left that are probed again at once (after a PUT of ours).
    eager: u32,
    /// A probe missed since the last find: we are not behind the sender.
    caught_up: bool,
    /// Finds in a row within `CADENCE_WITHIN` of each other.
    run: u32,
    /// EWMA of the intervals between finds while they agree (see `PERIOD_TOLERANCE`).
    period: Option<Duration>,
    /// EWMA of how far each agreeing interval was from the period.
    period_jitter: Duration,
    /// Intervals in a row that agreed with the period.
    period_run: u32,
}

impl StreamProbe {
    /// A period's window around the predicted next find: `(start, end)`.
    fn period_window(&self) -> Option<(Instant, Instant)> {
        let period = self.period.filter(|_| self.period_run >= PERIOD_FINDS)?;
        let due = self.last_find? + period;
        let margin = (self.period_jitter * 4)
            .max(PERIOD_MARGIN_MIN)
            .min(period / 4);
        Some((due - margin, due + margin))
    }

    /// Takes the interval `d` between two finds into the period.
    fn track_period(&mut self, d: Duration) {
        match self.period {
            Some(p) if d.abs_diff(p) <= p / PERIOD_TOLERANCE && d < PERIOD_WITHIN => {
                self.period_jitter = (self.period_jitter * 3 + d.abs_diff(p)) / 4;
                self.period = Some((p * 3 + d) / 4);
                self.period_run = self.period_run.saturating_add(1);
            }
            _ => {
                // Bundles back to back are probed for at once anyway (`PROBE_AHEAD_WITHIN`).
                self.period = (PROBE_AHEAD_WITHIN..PERIOD_WITHIN)
                    .contains(&d)
                    .then_some(d);
                self.period_jitter = Duration::ZERO;
                self.period_run = 0;
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct ProbeSchedule {
    streams: HashMap<StreamId, StreamProbe>,
    /// We have sent something: a stream probed for the first time since (a first reply) starts
    /// eager.
    expecting: bool,
}

impl ProbeSchedule {
    /// Whether `stream` may be probed at `now`.
    pub fn may_probe(&self, stream: StreamId, now: Instant) -> bool {
        self.not_before(stream).is_none_or(|t| now >= t)
    }

    /// Whether `stream` is in its eager window after a PUT of ours (a reply is due).
    pub fn is_eager(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_some_and(|p| p.eager > 0)
    }

    /// When `stream` may be probed next (`None`: at once).
    pub fn not_before(&self, stream: StreamId) -> Option<Instant> {
        self.streams.get(&stream).and_then(|p| p.not_before)
    }

    /// A probe of `stream` found nothing at `now`.
    pub fn missed(&mut self, stream: StreamId, now: Instant) {
        let expecting = self.expecting;
        let p = self.streams.entry(stream).or_insert_with(|| StreamProbe {
            eager: if expecting { EAGER_MISSES } else { 0 },
            ..StreamProbe::default()
        });
        p.caught_up = true;
        if p.eager > 0 {
            p.eager -= 1;
            p.not_before = None;
            return;
        }
        if let Some((start, end)) = p.period_window()
            && now <= end
        {
            // In the window every `MIN_GAP`, as around a cadence's expected time: probed at once,
            // a store as fast as loopback (0.7 ms a GET) took ~28 misses per window.
            p.not_before = if now >= start {
                p.gap = Duration::ZERO;
                Some(now + MIN_GAP)
            } else {
                p.gap = if p.gap.is_zero() {
                    MIN_GAP
                } else {
                    (p.gap * 2).min(MAX_GAP)
                };
                Some((now + p.gap).min(start))
            };
            return;
        }
        // A stream with a cadence is not due before its last find + its interval: wait until
        // shortly before then, and from then on probe it closely (the gap restarts).
        if let (Some(last), Some(interval)) = (p.last_find, p.interval) {
            let due = last + interval - interval / 4;
            if now < due {
                p.gap = Duration::ZERO;
                p.not_before = Some(due);
                return;
            }
            if now < last + interval + interval / 4 {
                p.gap = Duration::ZERO;
                p.not_before = Some(now + MIN_GAP);
                return;
            }
        }
        p.gap = if p.gap.is_zero() {
            MIN_GAP
        } else {
            (p.gap * 2).min(MAX_GAP)
        };
        p.not_before = Some(now + p.gap);
    }

    /// A bundle of `stream` was found at `now`.
    pub fn hit(&mut self, stream: StreamId, now: Instant) {
        let p = self.streams.entry(stream).or_default();
        if let Some(prev) = p.last_find {
            let d = now.saturating_duration_since(prev);
            p.track_period(d);
            p.interval = (d < CADENCE_WITHIN).then(|| match p.interval {
                // Weight 1/4: follows a change of the sender's pace within a few bundles.
                Some(i) => (i * 3 + d) / 4,
                None => d,
            });
        }
        p.run = if p.interval.is_some() {
            p.run.saturating_add(1)
        } else {
            1
        };
        p.last_find = Some(now);
        p.gap = Duration::ZERO;
        p.eager = 0;
        // Caught up with a stream of slow cadence (its last probe missed: we are not behind),
        // its next bundle is an interval away and probing at once would only miss: probe at three
        // quarters of the interval, as after an early miss. Behind (found without a miss, a
        // backlog), probe at once.
        p.not_before = p
            .interval
            .filter(|i| p.caught_up && p.run >= CADENCE_FINDS && *i >= PROBE_AHEAD_WITHIN)
            .map(|i| now + i - i / 4);
        // A periodic stream we are caught up with is next probed at its window, or after
        // `MAX_GAP` when the window is further off (a packet off the period, a keystroke between
        // two pings, waits no longer than before). A short period is waited for as a cadence is.
        if p.caught_up
            && let (Some(period), Some((start, _))) = (p.period, p.period_window())
            && start > now
        {
            p.not_before = Some(if period < CADENCE_WITHIN {
                start
            } else {
                start.min(now + MAX_GAP)
            });
        }
        p.caught_up = false;
    }

    /// Something (a doorbell) names `stream`: probe it at once.
    pub fn named(&mut self, stream: StreamId, _now: Instant) {
        let p = self.streams.entry(stream).or_default();
        p.gap = Duration::ZERO;
        p.not_before = None;
    }

    /// We sent something (a reply is likely): every stream without a cadence is eager again.
    pub fn hurry(&mut self, now: Instant) {
        self.expecting = true;
        for p in self.streams.values_mut() {
            let has_cadence = p.interval.is_some()
                && p.last_find
                    .is_some_and(|t| now.saturating_duration_since(t) < CADENCE_WITHIN);
            if !has_cadence {
                p.gap = Duration::ZERO;
                p.not_before = None;
                p.eager = EAGER_MISSES;
            }
        }
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
        assert_eq!(gaps, [5, 10, 20, 40, 40, 40, 40, 40]);
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
        p.hit(S, t + ms(5));
        assert!(p.may_probe(S, t + ms(5)), "one find is no cadence");
        p.missed(S, t + ms(5));
        p.missed(OTHER, t + ms(5));
        p.hurry(t + ms(5));
        assert!(p.may_probe(S, t + ms(5)) && p.may_probe(OTHER, t + ms(5)));
    }

    #[test]
    fn a_caught_up_stream_of_slow_cadence_is_next_probed_at_three_quarters_of_its_interval() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        // Finds 100 ms apart, each after a miss: we are caught up with the sender.
        for i in 0..4 {
            p.missed(S, t + ms(100 * i + 90));
            p.hit(S, t + ms(100 * i + 100));
        }
        let last = t + ms(400);
        assert!(!p.may_probe(S, last), "the next bundle is an interval away");
        assert!(!p.may_probe(S, last + ms(74)));
        assert!(p.may_probe(S, last + ms(75)));
        // Found again without a miss: we were behind (a backlog), so probe at once.
        p.hit(S, last + ms(80));
        assert!(p.may_probe(S, last + ms(80)));
        // A fast cadence (bundles back to back) is probed at once even when caught up.
        for i in 0..8 {
            p.missed(OTHER, t + ms(10 * i + 5));
            p.hit(OTHER, t + ms(10 * i + 10));
        }
        assert!(p.may_probe(OTHER, t + ms(80)));
    }

    #[test]
    fn a_request_and_its_reply_are_no_cadence_to_wait_on() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        // A handshake: the SYN found after misses, the ACK 36 ms later (after misses too); the
        // request follows at once and must be probed for at once.
        p.missed(S, t);
        p.hit(S, t + ms(10));
        p.missed(S, t + ms(20));
        p.hit(S, t + ms(46));
        assert!(p.may_probe(S, t + ms(46)));
        p.missed(S, t + ms(60));
        p.hit(S, t + ms(90));
        assert!(p.may_probe(S, t + ms(90)), "three finds are no cadence yet");
        // The fourth in a row is.
        p.missed(S, t + ms(100));
        p.hit(S, t + ms(130));
        assert!(!p.may_probe(S, t + ms(130)));
    }

    #[test]
    fn after_a_put_of_ours_a_quiet_stream_is_probed_again_at_once_for_a_few_misses() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        p.hit(S, t);
        p.hurry(t + ms(1000));
        for i in 0..EAGER_MISSES {
            p.missed(S, t + ms(1000 + u64::from(i)));
            assert!(p.may_probe(S, t + ms(1000 + u64::from(i))), "miss {i}");
        }
        // Then the usual spacing: a reply that never comes costs a bounded number of GETs.
        p.missed(S, t + ms(1100));
        assert!(!p.may_probe(S, t + ms(1101)));
    }

    #[test]
    fn a_put_of_ours_does_not_hurry_a_stream_with_a_cadence() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        for i in 0..4 {
            p.hit(S, t + ms(30 * i));
        }
        p.missed(S, t + ms(95));
        p.hurry(t + ms(96));
        assert!(!p.may_probe(S, t + ms(97)), "its misses keep their spacing");
        p.named(S, t + ms(97));
        assert!(p.may_probe(S, t + ms(97)), "the doorbell still names it");
    }

    #[test]
    fn a_stream_with_a_cadence_that_misses_early_waits_until_its_next_bundle_is_due() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        // Intervals of 180 and 220 ms: a cadence of about 200 ms, too uneven for a period.
        let finds = [0, 180, 400, 580, 800];
        for at in finds {
            p.hit(S, t + ms(at));
        }
        let interval = [220, 180, 220]
            .into_iter()
            .fold(ms(180), |i, d| (i * 3 + ms(d)) / 4);
        let last = t + ms(800);
        // Probed at once after the find; it missed: the next bundle is due at ~200 ms.
        p.missed(S, last + ms(5));
        assert_eq!(p.not_before(S), Some(last + interval - interval / 4));
        // Around the expected time it is probed closely, without the doubling.
        for at in [150, 160, 170, 180, 190, 200, 210, 220, 230, 240] {
            p.missed(S, last + ms(at));
            assert_eq!(p.not_before(S), Some(last + ms(at) + MIN_GAP), "at {at}");
        }
        // Well past it, the usual doubling again.
        p.missed(S, last + ms(260));
        p.missed(S, last + ms(266));
        assert_eq!(p.not_before(S), Some(last + ms(276)));
    }

    /// Finds of `S` every `period` ms, `n` of them, each after a miss (we keep up with it).
    fn periodic(p: &mut ProbeSchedule, t: Instant, period: u64, n: u64) -> Instant {
        for i in 0..n {
            if i > 0 {
                p.missed(S, t + ms(period * i - 1));
            }
            p.hit(S, t + ms(period * i));
        }
        t + ms(period * (n - 1))
    }

    #[test]
    fn a_periodic_stream_is_probed_closely_around_its_next_bundle_and_at_most_max_gap_apart_between()
     {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        let last = periodic(&mut p, t, 1000, 5);
        // The window is PERIOD_MARGIN_MIN either side of last + 1 s (no jitter).
        assert_eq!(
            p.not_before(S),
            Some(last + MAX_GAP),
            "off-period packets still found"
        );
        let mut now = last + MAX_GAP;
        let mut probes = 0;
        while now < last + ms(990) {
            p.missed(S, now);
            probes += 1;
            let next = p.not_before(S).expect("spaced before the window");
            assert!(next - now <= MAX_GAP, "a gap of {:?}", next - now);
            now = next;
        }
        assert_eq!(now, last + ms(990), "no gap overshoots the window");
        assert!(probes <= 1000 / 40 + 4, "{probes} probes");
        // In the window every miss is probed again MIN_GAP later, without the doubling.
        for at in [990, 995, 1003, 1010] {
            p.missed(S, last + ms(at));
            assert_eq!(p.not_before(S), Some(last + ms(at) + MIN_GAP), "at {at}");
        }
        // Past it, the usual spacing.
        p.missed(S, last + ms(1011));
        assert_eq!(p.not_before(S), Some(last + ms(1011) + MIN_GAP));
        p.missed(S, last + ms(1016));
        assert_eq!(p.not_before(S), Some(last + ms(1026)));
    }

    #[test]
    fn a_short_period_is_waited_for_and_a_jittery_one_gets_a_wider_window() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        let last = periodic(&mut p, t, 50, 6);
        assert_eq!(
            p.not_before(S),
            Some(last + ms(40)),
            "nothing before the window"
        );
        p.missed(S, last + ms(40));
        assert_eq!(p.not_before(S), Some(last + ms(40) + MIN_GAP));
        // Intervals of 1000 +- 40 ms: the margin grows with the jitter (four times its EWMA).
        let mut q = ProbeSchedule::default();
        let mut at = 0;
        for (i, d) in [0, 1040, 960, 1040, 960, 1040].into_iter().enumerate() {
            at += d;
            if i > 0 {
                q.missed(S, t + ms(at - 1));
            }
            q.hit(S, t + ms(at));
        }
        let last = t + ms(at);
        let window = q.streams[&S].period_window().expect("a period");
        let due = last + q.streams[&S].period.expect("a period");
        assert!(due - window.0 > ms(60), "margin {:?}", due - window.0);
        assert!(due - window.0 <= ms(250), "at most a quarter period");
        // Intervals that disagree by more than an eighth are no period.
        let mut r = ProbeSchedule::default();
        for at in [0, 1000, 1300, 2300, 2500] {
            r.hit(S, t + ms(at));
        }
        assert!(r.streams[&S].period_window().is_none());
    }

    #[test]
    fn a_pause_longer_than_the_cadence_window_forgets_the_cadence() {
        let t = Instant::now();
        let mut p = ProbeSchedule::default();
        p.hit(S, t);
        p.hit(S, t + ms(40));
        p.hit(S, t + ms(2000));
        p.missed(S, t + ms(2001));
        p.hurry(t + ms(2002));
        assert!(p.may_probe(S, t + ms(2002)));
    }
}
