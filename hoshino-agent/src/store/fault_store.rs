//! A fault-injecting `Store` wrapper for tests and the simulation: a latency distribution per
//! request, a fraction of 503 SlowDown answers, connection resets (for a PUT, sometimes after
//! the write landed, as a lost response does) and stalled GET bodies (held for the body
//! timeout, then failed as the S3 store fails them). Decisions come from one seeded generator,
//! so a run under a paused tokio clock is deterministic.
//!
//! Every error it injects is retryable; wrap it in `retry::RetryingStore` to get the
//! production retry loop on top.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::store::retry::SeededRng;
use crate::store::{Listing, Lookup, S3Error, Store};

/// Per-request latency: `base + uniform(0, jitter)`, plus `tail` with probability `tail_p`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub base: Duration,
    pub jitter: Duration,
    pub tail: Duration,
    pub tail_p: f64,
}

impl Latency {
    pub const ZERO: Latency = Latency::fixed(Duration::ZERO);

    pub const fn fixed(base: Duration) -> Latency {
        Latency {
            base,
            jitter: Duration::ZERO,
            tail: Duration::ZERO,
            tail_p: 0.0,
        }
    }

    /// A local S3-compatible server: ~0.5 ms.
    pub fn loopback() -> Latency {
        Latency {
            base: Duration::from_micros(400),
            jitter: Duration::from_micros(200),
            tail: Duration::ZERO,
            tail_p: 0.0,
        }
    }

    /// S3 Express One Zone in the same zone: ~5 ms.
    pub fn express() -> Latency {
        Latency {
            base: Duration::from_millis(4),
            jitter: Duration::from_millis(2),
            tail: Duration::from_millis(10),
            tail_p: 0.01,
        }
    }

    /// S3 Standard: 20-30 ms with a tail.
    pub fn standard() -> Latency {
        Latency {
            base: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            tail: Duration::from_millis(60),
            tail_p: 0.02,
        }
    }

    /// The largest latency this model produces.
    /// The median of a request's added latency (the tail is rarer than half).
    pub fn median(&self) -> Duration {
        self.base + self.jitter / 2
    }

    pub fn max(&self) -> Duration {
        self.base + self.jitter + self.tail
    }

    fn sample(&self, rng: &mut SeededRng) -> Duration {
        let mut d = self.base + self.jitter.mul_f64(rng.next_f64());
        if rng.next_f64() < self.tail_p {
            d += self.tail;
        }
        d
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    pub latency: Latency,
    /// Fraction of requests answered 503 SlowDown (nothing happens in the bucket).
    pub slow_down: f64,
    /// Fraction of requests whose connection resets; a PUT or delete that resets has landed
    /// half of the time (the response was lost), so its retry repeats a done write.
    pub reset: f64,
    /// Fraction of GETs whose body stalls for `stall` and then fails.
    pub stalled_get: f64,
    pub stall: Duration,
}

impl Faults {
    /// Latency only.
    pub fn none(latency: Latency) -> Faults {
        Faults {
            latency,
            slow_down: 0.0,
            reset: 0.0,
            stalled_get: 0.0,
            stall: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    SlowDown,
    /// Reset before the request reached the bucket.
    ResetBefore,
    /// Reset after the bucket acted on it.
    ResetAfter,
    Stall,
}

/// Counts of what was injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub slow_downs: u64,
    pub resets: u64,
    pub stalls: u64,
}

#[derive(Debug)]
struct State {
    rng: SeededRng,
    injected: Injected,
}

#[derive(Debug, Clone)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Faults,
    state: Arc<Mutex<State>>,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S, faults: Faults, seed: u64) -> FaultyStore<S> {
        FaultyStore {
            inner,
            faults,
            state: Arc::new(Mutex::new(State {
                rng: SeededRng::new(seed),
                injected: Injected::default(),
            })),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn injected(&self) -> Injected {
        self.state
            .lock()
            .map_or(Injected::default(), |s| s.injected)
    }

    /// This request's latency and fate, decided up front so the generator is used in request
    /// order (deterministic under one thread).
    fn decide(&self, is_get: bool, writes: bool) -> (Duration, Fate) {
        let Ok(mut st) = self.state.lock() else {
            return (self.faults.latency.base, Fate::Ok);
        };
        let latency = self.faults.latency.sample(&mut st.rng);
        let roll = st.rng.next_f64();
        let f = &self.faults;
        let fate = if roll < f.slow_down {
            st.injected.slow_downs += 1;
            Fate::SlowDown
        } else if roll < f.slow_down + f.reset {
            st.injected.resets += 1;
            if writes && st.rng.next_f64() < 0.5 {
                Fate::ResetAfter
            } else {
                Fate::ResetBefore
            }
        } else if is_get && roll < f.slow_down + f.reset + f.stalled_get {
            st.injected.stalls += 1;
            Fate::Stall
        } else {
            Fate::Ok
        };
        (latency, fate)
    }

    /// Runs `call` against the inner store with the decided latency and fault.
    async fn run<T>(
        &self,
        op: &'static str,
        key: &str,
        is_get: bool,
        writes: bool,
        call: impl Future<Output = Result<T, S3Error>>,
    ) -> Result<T, S3Error> {
        let (latency, fate) = self.decide(is_get, writes);
        let err = |message: &str, status: Option<u16>, code: Option<&str>| S3Error::Request {
            op,
            key: key.to_string(),
            message: message.to_string(),
            code: code.map(String::from),
            status,
            retryable: true,
        };
        tokio::time::sleep(latency).await;
        match fate {
            Fate::Ok => call.await,
            Fate::SlowDown => Err(err("SlowDown: injected", Some(503), Some("SlowDown"))),
            Fate::ResetBefore => Err(err("connection reset (injected)", None, None)),
            Fate::ResetAfter => {
                // The bucket acted; only the answer is lost.
                let _ = call.await;
                Err(err(
                    "connection reset after the request (injected)",
                    None,
                    None,
                ))
            }
            Fate::Stall => {
                tokio::time::sleep(self.faults.stall).await;
                Err(err("reading the body: stalled (injected)", None, None))
            }
        }
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.run("put", key, false, true, self.inner.put(key, body))
            .await
    }

    async fn get(&self, key: &str, limit: usize, lookup: Lookup) -> Result<Option<Bytes>, S3Error> {
        self.run("get", key, true, false, self.inner.get(key, limit, lookup))
            .await
    }

    async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        self.run("get", key, true, false, self.inner.get_tagged(key, limit))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        self.run("head", key, false, false, self.inner.head(key))
            .await
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        self.run(
            "list",
            prefix,
            false,
            false,
            self.inner.list(prefix, continuation),
        )
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        self.run(
            "delete_objects",
            first,
            false,
            true,
            self.inner.delete_many(keys),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::S3Op;
    use crate::store::memory_store::MemoryStore;

    fn faulty(seed: u64) -> FaultyStore<MemoryStore> {
        let faults = Faults {
            latency: Latency::standard(),
            slow_down: 0.2,
            reset: 0.2,
            stalled_get: 0.2,
            stall: Duration::from_millis(50),
        };
        FaultyStore::new(MemoryStore::default(), faults, seed)
    }

    async fn outcomes(store: &FaultyStore<MemoryStore>) -> Vec<bool> {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(store.get(&format!("k{i}"), 10, Lookup::Probe).await.is_ok());
        }
        v
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_injects_the_same_faults() {
        let (a, b) = (faulty(7), faulty(7));
        let (ra, rb) = (outcomes(&a).await, outcomes(&b).await);
        assert_eq!(ra, rb);
        assert_eq!(a.injected(), b.injected());
        assert!(ra.iter().any(|ok| !ok) && ra.iter().any(|ok| *ok));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_takes_the_modelled_latency_in_virtual_time() {
        let store = FaultyStore::new(
            MemoryStore::default(),
            Faults::none(Latency::fixed(Duration::from_millis(25))),
            1,
        );
        let t0 = tokio::time::Instant::now();
        store.put("k", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(25));
        assert_eq!(store.inner().requests(S3Op::Put), 1);
    }
}
