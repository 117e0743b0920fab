//! Audit records: one per judged request, as a tracing event on the `hoshino::audit` target
//! (JSON with `--log-format json`). Records of garbage (not HTTP at all) are rate-limited, so
//! a flood of junk cannot flood the log; the suppressed count is reported with the next one.

use std::time::{Duration, Instant};

use super::conversation::Judgement;

/// The tracing target of audit records.
pub const AUDIT_TARGET: &str = "hoshino::audit";
/// Garbage records let through per window.
const GARBAGE_PER_WINDOW: u32 = 10;
const GARBAGE_WINDOW: Duration = Duration::from_secs(10);

/// A fixed-window limiter for garbage records (sans-IO).
#[derive(Debug, Default)]
pub struct GarbageLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl GarbageLimiter {
    /// Whether a garbage record may be written now; when it may, also how many were
    /// suppressed since the last one written.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= GARBAGE_WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= GARBAGE_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Writes the audit record of `j` (through `limiter` when it is garbage).
pub fn record(j: &Judgement, limiter: &mut GarbageLimiter, now: Instant) {
    let suppressed = if j.garbage {
        match limiter.admit(now) {
            Some(n) => n,
            None => return,
        }
    } else {
        0
    };
    let entry = j
        .entry
        .map_or_else(|| "default".to_string(), |e| e.to_string());
    tracing::info!(
        target: AUDIT_TARGET,
        uid = j.uid,
        method = %j.method.as_deref().unwrap_or("-"),
        path = %j.target.as_deref().unwrap_or("-"),
        refused = %j.refused_because.unwrap_or("-"),
        rule = %j.rule,
        entry = %entry,
        verdict = %j.action,
        suppressed,
        "HTTP request judged"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_records_are_limited_per_window_and_the_rest_counted() {
        let mut l = GarbageLimiter::default();
        let t0 = Instant::now();
        for _ in 0..GARBAGE_PER_WINDOW {
            assert_eq!(l.admit(t0), Some(0));
        }
        assert_eq!(l.admit(t0), None);
        assert_eq!(l.admit(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.admit(t0 + GARBAGE_WINDOW), Some(2));
        assert_eq!(l.admit(t0 + GARBAGE_WINDOW), Some(0));
    }
}
