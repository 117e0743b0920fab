//! Hoshino's own retry loop around one S3 call, so every *attempt* (what AWS bills) is timed
//! and counted in the metrics: used inside `s3::S3Store`, and by `RetryingStore` to give any
//! other `Store` (a fault-injecting double) the same behaviour.
//!
//! Time is read through `tokio::time::Instant`, so under a paused runtime (the simulation)
//! backoff and timeouts run in virtual time.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::metrics::{Metrics, S3Op};
use crate::store::{Listing, Lookup, S3Error, Store};

/// Attempts per call: with backoff from 25 ms doubling to 1 s, 12 attempts ride out an outage of
/// about 6.5 s before a call fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 12;
const INITIAL_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Whole call, retries included.
    pub operation_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            operation_timeout: Duration::from_secs(30),
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `max_attempts` / the operation timeout
/// are spent, with jittered exponential backoff between attempts (`jitter` returns a value in
/// [0, 1)). Each attempt is timed and counted (an error counts as an error only if the attempt
/// failed).
pub async fn attempts<T, F, Fut>(
    policy: &RetryPolicy,
    metrics: &Metrics,
    op: S3Op,
    mut jitter: impl FnMut() -> f64,
    mut attempt: F,
) -> Result<T, S3Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S3Error>>,
{
    let call_started = Instant::now();
    let mut backoff = INITIAL_BACKOFF;
    let mut n = 0;
    let max_attempts = policy.max_attempts.max(1);
    loop {
        n += 1;
        let started = Instant::now();
        let r = attempt().await;
        metrics.s3_request(op, started.elapsed(), r.is_ok());
        match r {
            Err(e) if e.retryable() && n < max_attempts => {
                // Full jitter keeps many nodes from retrying in lockstep after an outage.
                let wait = backoff.mul_f64(0.5 + jitter() / 2.0);
                if call_started.elapsed() + wait >= policy.operation_timeout {
                    return Err(e);
                }
                tracing::debug!(error = %e, attempt = n, "S3 attempt failed; retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            r => return r,
        }
    }
}

/// A small seeded generator (SplitMix64): deterministic jitter and fault decisions in tests.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Any `Store` behind the same retry loop as `S3Store`, counting attempts into `metrics`; its
/// jitter is seeded, so a run over a deterministic store is deterministic.
#[derive(Clone)]
pub struct RetryingStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
    policy: RetryPolicy,
    rng: Arc<Mutex<SeededRng>>,
}

impl<S: Store> RetryingStore<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>, policy: RetryPolicy, seed: u64) -> Self {
        RetryingStore {
            inner,
            metrics,
            policy,
            rng: Arc::new(Mutex::new(SeededRng::new(seed))),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn jitter(&self) -> impl FnMut() -> f64 + '_ {
        || self.rng.lock().map_or(0.5, |mut r| r.next_f64())
    }
}

impl<S: Store> Store for RetryingStore<S> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::Put,
            self.jitter(),
            || self.inner.put(key, body.clone()),
        )
        .await
    }

    async fn get(&self, key: &str, limit: usize, lookup: Lookup) -> Result<Option<Bytes>, S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::Get,
            self.jitter(),
            || self.inner.get(key, limit, lookup),
        )
        .await
    }

    async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::Get,
            self.jitter(),
            || self.inner.get_tagged(key, limit),
        )
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::Head,
            self.jitter(),
            || self.inner.head(key),
        )
        .await
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::List,
            self.jitter(),
            || self.inner.list(prefix, continuation),
        )
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        attempts(
            &self.policy,
            &self.metrics,
            S3Op::DeleteObjects,
            self.jitter(),
            || self.inner.delete_many(keys),
        )
        .await
    }
}
