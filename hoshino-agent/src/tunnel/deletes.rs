//! Batched deletes: keys to delete wait here until 1,000 have gathered (one DeleteObjects
//! request) or the oldest has waited `max_delay` (1 s). Sans-IO: the ingress performs the batches.
//!
//! Exactly-once does not depend on a delete succeeding (the delivery cursor does that); deletes
//! only keep the inbox small, so a failed batch is simply queued again later by the LIST that
//! still sees the keys.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::edge::s3::MAX_DELETE_BATCH;

/// Default bound on how long a key waits before its batch is sent.
/// DeleteObjects is billed as a POST ($0.005/1,000, while DELETE is free), so batches are
/// made large: at most one per second per node while traffic flows.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Batches in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Keys queued at most; beyond it a key is dropped from the queue (it stays in the bucket, is
/// listed again and queued again once the queue has drained).
pub const MAX_QUEUED: usize = 64 * MAX_DELETE_BATCH;

#[derive(Debug)]
pub struct DeleteQueue {
    max_delay: Duration,
    queue: VecDeque<(String, Instant)>,
    queued: HashSet<String>,
    in_flight: usize,
}

impl Default for DeleteQueue {
    fn default() -> Self {
        DeleteQueue::new(MAX_DELAY)
    }
}

impl DeleteQueue {
    pub fn new(max_delay: Duration) -> DeleteQueue {
        DeleteQueue {
            max_delay,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: 0,
        }
    }

    /// Queues `key` (once; a key already queued is not queued twice). Returns false if the
    /// queue is full.
    pub fn push(&mut self, key: String, now: Instant) -> bool {
        if self.queued.contains(&key) {
            return true;
        }
        if self.queue.len() >= MAX_QUEUED {
            return false;
        }
        self.queued.insert(key.clone());
        self.queue.push_back((key, now));
        true
    }

    /// The next batch to send now, if one is due and a slot is free. The caller reports its end
    /// with `batch_done`.
    pub fn next_batch(&mut self, now: Instant) -> Option<Vec<String>> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        let (_, oldest) = self.queue.front()?;
        let due = self.queue.len() >= MAX_DELETE_BATCH
            || now.saturating_duration_since(*oldest) >= self.max_delay;
        if !due {
            return None;
        }
        let n = self.queue.len().min(MAX_DELETE_BATCH);
        let batch: Vec<String> = self.queue.drain(..n).map(|(k, _)| k).collect();
        for k in &batch {
            self.queued.remove(k);
        }
        self.in_flight += 1;
        Some(batch)
    }

    pub fn batch_done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// When the oldest queued key's batch falls due.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        self.queue.front().map(|(_, t)| *t + self.max_delay)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lone_key_waits_at_most_the_delay() {
        let t = Instant::now();
        let mut q = DeleteQueue::new(ms(200));
        q.push("a".into(), t);
        assert_eq!(q.next_batch(t + ms(199)), None);
        assert_eq!(q.next_deadline(), Some(t + ms(200)));
        assert_eq!(q.next_batch(t + ms(200)), Some(vec!["a".to_string()]));
        assert_eq!(q.next_batch(t + ms(400)), None, "nothing left");
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_holds_at_most_a_thousand_keys() {
        let t = Instant::now();
        let mut q = DeleteQueue::new(ms(200));
        for i in 0..2500 {
            q.push(format!("k{i}"), t);
        }
        let first = q.next_batch(t).expect("full batch due");
        assert_eq!(first.len(), 1000);
        assert_eq!(q.next_batch(t).map(|b| b.len()), Some(1000));
        assert_eq!(q.next_batch(t), None, "500 left: not full, not old");
        assert_eq!(q.next_batch(t + ms(200)).map(|b| b.len()), Some(500));
    }

    #[test]
    fn a_key_is_queued_once() {
        let t = Instant::now();
        let mut q = DeleteQueue::new(ms(0));
        q.push("a".into(), t);
        q.push("a".into(), t);
        assert_eq!(q.next_batch(t), Some(vec!["a".to_string()]));
    }

    #[test]
    fn batches_in_flight_are_bounded() {
        let t = Instant::now();
        let mut q = DeleteQueue::new(ms(0));
        for i in 0..(MAX_IN_FLIGHT + 1) * MAX_DELETE_BATCH {
            q.push(format!("k{i}"), t);
        }
        for _ in 0..MAX_IN_FLIGHT {
            assert!(q.next_batch(t).is_some());
        }
        assert_eq!(q.next_batch(t), None);
        assert_eq!(q.next_deadline(), None);
        q.batch_done();
        assert!(q.next_batch(t).is_some());
    }
}
