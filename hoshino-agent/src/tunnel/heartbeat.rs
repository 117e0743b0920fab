//! The adaptive poll schedule of the ingress loop. Sans-IO: the caller passes `Instant`s.
//!
//! Semantics:
//! - **Active** mode: the inbox is LISTed every `interval`.
//!   - A LIST that found objects sets `interval = min` and records the find time.
//!   - While less than `linger` has passed since the last find, the interval stays `min`.
//!   - After that, each empty LIST doubles the interval, clamped to `max`.
//!   - A failed poll counts as an empty one (back off rather than hammer a failing server).
//! - After `IDLE_AFTER` (10 s) without a find (counted from the last find or the last wake, the
//!   later of the two), the schedule enters **idle** mode: the only request is a read (GET) of
//!   the node's doorbell every `idle_poll` (1 s).
//! - A doorbell whose ETag changed (or that appeared) returns to active mode with an immediate
//!   LIST at interval `min`. A wake that finds nothing does not count as a find, so it does not
//!   linger at `min`: the interval backs off from `min` and the node idles again after
//!   `IDLE_AFTER`.
//!
//! The node starts active, as if woken at start, so it drains its inbox at once.

use std::time::{Duration, Instant};

use crate::wire::mailbox::IDLE_AFTER;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    pub min: Duration,
    pub max: Duration,
    pub linger: Duration,
    pub idle_poll: Duration,
    pub idle_after: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            min: Duration::from_millis(5),
            max: Duration::from_secs(1),
            linger: Duration::from_secs(2),
            idle_poll: Duration::from_secs(1),
            idle_after: IDLE_AFTER,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    #[error(
        "--heartbeat-min {min:?} must be at least {MIN_HEARTBEAT:?} and at most --heartbeat-max {max:?}"
    )]
    MinMax { min: Duration, max: Duration },
    #[error("--idle-poll {0:?} must be at least {MIN_IDLE_POLL:?}")]
    IdlePoll(Duration),
    #[error("heartbeat intervals must be at most {MAX_INTERVAL:?}")]
    TooLong,
}

/// Upper bound for every configured interval, so `Instant` arithmetic cannot overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Floor of `--heartbeat-min`: below it a typo (`1us`) would turn the active tick into a
/// request storm (every tick may probe every stream) without making delivery any faster, since one
/// S3 round trip takes longer than a millisecond.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(1);
/// Floor of `--idle-poll`: the idle cost is one bell read per interval ($0.035 per node-day at
/// 1 s); 100 ms already costs ten times that.
pub const MIN_IDLE_POLL: Duration = Duration::from_millis(100);

impl HeartbeatConfig {
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        if self.min < MIN_HEARTBEAT || self.min > self.max {
            return Err(HeartbeatError::MinMax {
                min: self.min,
                max: self.max,
            });
        }
        if self.idle_poll < MIN_IDLE_POLL {
            return Err(HeartbeatError::IdlePoll(self.idle_poll));
        }
        if [self.max, self.linger, self.idle_poll, self.idle_after]
            .iter()
            .any(|d| *d > MAX_INTERVAL)
        {
            return Err(HeartbeatError::TooLong);
        }
        Ok(())
    }
}

/// What the ingress loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// LIST the inbox.
    List,
    /// Read the doorbell.
    Bell,
}

#[derive(Debug)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    interval: Duration,
    idle: bool,
    last_find: Option<Instant>,
    last_wake: Instant,
    next_at: Instant,
}

impl Heartbeat {
    pub fn new(config: HeartbeatConfig, now: Instant) -> Heartbeat {
        Heartbeat {
            config,
            interval: config.min,
            idle: false,
            last_find: None,
            last_wake: now,
            next_at: now,
        }
    }

    /// The next poll and when it is due.
    pub fn next(&self) -> (Poll, Instant) {
        let kind = if self.idle { Poll::Bell } else { Poll::List };
        (kind, self.next_at)
    }

    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// The current polling interval (idle: the bell interval).
    pub fn interval(&self) -> Duration {
        if self.idle {
            self.config.idle_poll
        } else {
            self.interval
        }
    }

    /// A LIST completed at `now`; `found` says whether it found new objects.
    pub fn list_done(&mut self, now: Instant, found: bool) {
        if found {
            self.last_find = Some(now);
            self.interval = self.config.min;
        } else {
            let lingering = self
                .last_find
                .is_some_and(|f| now.saturating_duration_since(f) < self.config.linger);
            if !lingering {
                self.interval = (self.interval * 2).min(self.config.max);
            }
        }
        let active_since = match self.last_find {
            Some(f) if f > self.last_wake => f,
            _ => self.last_wake,
        };
        if now.saturating_duration_since(active_since) >= self.config.idle_after {
            self.idle = true;
            self.next_at = now + self.config.idle_poll;
        } else {
            self.next_at = now + self.interval;
        }
    }

    /// An idle doorbell read completed at `now`; `changed` says whether its ETag differs from the last
    /// one seen.
    pub fn bell_done(&mut self, now: Instant, changed: bool) {
        if changed {
            self.wake(now);
        } else {
            self.next_at = now + self.config.idle_poll;
        }
    }

    /// We sent something, so a reply is likely: an idle node wakes; an active one whose
    /// interval has backed off returns to `min`, so a quiet-but-active node answers as fast as
    /// an idle one.
    pub fn hurry(&mut self, now: Instant) {
        if self.idle {
            self.wake(now);
            return;
        }
        self.interval = self.config.min;
        let soon = now + self.config.min;
        if soon < self.next_at {
            self.next_at = soon;
        }
    }

    /// Returns to active mode with an immediate LIST (a bell change, or the caller knows
    /// something arrived).
    pub fn wake(&mut self, now: Instant) {
        self.idle = false;
        self.interval = self.config.min;
        self.last_wake = now;
        self.next_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_brings_a_backed_off_active_node_back_to_the_minimum_interval() {
        let t = Instant::now();
        let c = HeartbeatConfig::default();
        let mut h = Heartbeat::new(c, t);
        let mut now = t;
        for _ in 0..8 {
            now += h.interval();
            h.list_done(now, false);
        }
        assert!(!h.is_idle());
        assert!(h.interval() > c.min);
        h.hurry(now);
        assert_eq!(h.interval(), c.min);
        assert_eq!(h.next().1, now + c.min);
    }

    #[test]
    fn sending_wakes_an_idle_node_at_once() {
        let t = Instant::now();
        let c = HeartbeatConfig::default();
        let mut h = Heartbeat::new(c, t);
        let later = t + c.idle_after + Duration::from_secs(1);
        h.list_done(later, false);
        assert!(h.is_idle());
        h.hurry(later);
        assert!(!h.is_idle());
        assert_eq!(h.next().1, later);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn setup() -> (Heartbeat, Instant) {
        let t0 = Instant::now();
        (Heartbeat::new(HeartbeatConfig::default(), t0), t0)
    }

    #[test]
    fn starts_active_with_an_immediate_list() {
        let (hb, t0) = setup();
        assert_eq!(hb.next(), (Poll::List, t0));
        assert!(!hb.is_idle());
    }

    #[test]
    fn finding_objects_polls_at_min() {
        let (mut hb, t0) = setup();
        hb.list_done(t0, true);
        assert_eq!(hb.next(), (Poll::List, t0 + ms(5)));
    }

    #[test]
    fn stays_at_min_during_linger_then_doubles_up_to_max() {
        let (mut hb, t0) = setup();
        hb.list_done(t0, true);
        let mut now = t0 + ms(1_999);
        hb.list_done(now, false);
        assert_eq!(hb.interval(), ms(5), "still lingering");
        let mut seen = vec![];
        for _ in 0..10 {
            now += hb.interval();
            hb.list_done(now, false);
            seen.push(hb.interval().as_millis());
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }

    #[test]
    fn empty_polls_back_off_from_the_start_without_lingering() {
        let (mut hb, t0) = setup();
        hb.list_done(t0, false);
        assert_eq!(hb.interval(), ms(10));
    }

    #[test]
    fn goes_idle_after_idle_after_without_a_find_and_heads_the_bell() {
        let (mut hb, t0) = setup();
        hb.list_done(t0, true);
        hb.list_done(t0 + ms(9_999), false);
        assert!(!hb.is_idle());
        let t = t0 + IDLE_AFTER;
        hb.list_done(t, false);
        assert!(hb.is_idle());
        assert_eq!(hb.next(), (Poll::Bell, t + Duration::from_secs(1)));
    }

    #[test]
    fn unchanged_bell_keeps_idle_at_idle_poll() {
        let (mut hb, t0) = setup();
        hb.list_done(t0 + IDLE_AFTER, false);
        let t = t0 + Duration::from_secs(11);
        hb.bell_done(t, false);
        assert_eq!(hb.next(), (Poll::Bell, t + Duration::from_secs(1)));
        assert_eq!(hb.interval(), Duration::from_secs(1));
    }

    #[test]
    fn changed_bell_wakes_with_an_immediate_list_at_min() {
        let (mut hb, t0) = setup();
        hb.list_done(t0 + IDLE_AFTER, false);
        let t = t0 + Duration::from_secs(30);
        hb.bell_done(t, true);
        assert!(!hb.is_idle());
        assert_eq!(hb.next(), (Poll::List, t));
        assert_eq!(hb.interval(), ms(5));
    }

    #[test]
    fn fruitless_wake_backs_off_and_idles_again_after_idle_after() {
        let (mut hb, t0) = setup();
        hb.list_done(t0 + IDLE_AFTER, false);
        let wake = t0 + Duration::from_secs(30);
        hb.bell_done(wake, true);
        hb.list_done(wake, false);
        assert_eq!(hb.interval(), ms(10), "no linger without a find");
        hb.list_done(wake + ms(9_000), false);
        assert!(!hb.is_idle());
        hb.list_done(wake + IDLE_AFTER, false);
        assert!(hb.is_idle());
    }

    #[test]
    fn idle_lists_per_wake_are_few() {
        // Cost guard: a spurious wake costs at most ~20 LISTs before idling again.
        let (mut hb, t0) = setup();
        hb.wake(t0);
        let mut lists = 0;
        let mut now = t0;
        while !hb.is_idle() {
            hb.list_done(now, false);
            lists += 1;
            now = hb.next().1;
        }
        assert!(lists <= 20, "{lists} LISTs");
    }

    #[test]
    fn config_validation_rejects_inverted_bounds() {
        let c = HeartbeatConfig {
            min: ms(10),
            max: ms(5),
            ..HeartbeatConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(HeartbeatConfig::default().validate().is_ok());
        let huge = HeartbeatConfig {
            idle_poll: Duration::from_secs(u64::MAX / 4),
            ..HeartbeatConfig::default()
        };
        assert_eq!(huge.validate(), Err(HeartbeatError::TooLong));
    }

    #[test]
    fn intervals_below_their_floor_are_refused() {
        let storm = HeartbeatConfig {
            min: Duration::from_micros(1),
            ..HeartbeatConfig::default()
        };
        assert!(matches!(
            storm.validate(),
            Err(HeartbeatError::MinMax { .. })
        ));
        let at_floor = HeartbeatConfig {
            min: MIN_HEARTBEAT,
            idle_poll: MIN_IDLE_POLL,
            ..HeartbeatConfig::default()
        };
        assert_eq!(at_floor.validate(), Ok(()));
        let idle_storm = HeartbeatConfig {
            idle_poll: Duration::from_micros(1),
            ..HeartbeatConfig::default()
        };
        assert_eq!(
            idle_storm.validate(),
            Err(HeartbeatError::IdlePoll(Duration::from_micros(1)))
        );
    }
}
