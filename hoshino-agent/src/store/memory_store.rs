//! An in-memory bucket: the `Store` the simulation and unit tests run against. It counts every
//! request by operation (what a bucket would bill), lists in key order with continuation
//! tokens, and gives each write a fresh ETag. It never fails; `fault_store` adds failures.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::metrics::S3Op;
use crate::store::{Listed, Listing, Lookup, MAX_DELETE_BATCH, S3Error, Store};

/// Keys per LIST page, as S3 returns at most.
pub const DEFAULT_PAGE_SIZE: usize = 1000;

#[derive(Debug)]
struct Object {
    body: Bytes,
    etag: String,
}

#[derive(Debug, Default)]
struct Bucket {
    objects: BTreeMap<String, Object>,
    writes: u64,
}

#[derive(Debug)]
struct Shared {
    bucket: Mutex<Bucket>,
    requests: [AtomicU64; S3Op::ALL.len()],
    page_size: usize,
}

/// Cloning shares the bucket.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_page_size(DEFAULT_PAGE_SIZE)
    }
}

impl MemoryStore {
    /// A bucket whose LIST pages hold at most `page_size` keys (small pages exercise paging).
    pub fn with_page_size(page_size: usize) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Shared {
                bucket: Mutex::new(Bucket::default()),
                requests: Default::default(),
                page_size: page_size.max(1),
            }),
        }
    }

    /// Requests of one operation served so far.
    pub fn requests(&self, op: S3Op) -> u64 {
        self.shared
            .requests
            .get(op.index())
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Requests of every operation served so far.
    pub fn total_requests(&self) -> u64 {
        S3Op::ALL.iter().map(|op| self.requests(*op)).sum()
    }

    /// Keys stored under `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.bucket()
            .objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn count(&self, op: S3Op) {
        if let Some(c) = self.shared.requests.get(op.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    // A poisoned lock only means another test thread panicked; the map itself is consistent.
    fn bucket(&self) -> MutexGuard<'_, Bucket> {
        self.shared
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn too_large(key: &str, size: usize, limit: usize) -> S3Error {
    S3Error::TooLarge {
        key: key.to_string(),
        size: size as u64,
        limit,
    }
}

impl Store for MemoryStore {
    fn bucket(&self) -> &str {
        "memory"
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.count(S3Op::Put);
        let mut b = self.bucket();
        b.writes += 1;
        let etag = format!("\"{:x}\"", b.writes);
        b.objects.insert(key.to_string(), Object { body, etag });
        Ok(())
    }

    async fn get(
        &self,
        key: &str,
        limit: usize,
        _lookup: Lookup,
    ) -> Result<Option<Bytes>, S3Error> {
        self.count(S3Op::Get);
        match self.bucket().objects.get(key) {
            None => Ok(None),
            Some(o) if o.body.len() > limit => Err(too_large(key, o.body.len(), limit)),
            Some(o) => Ok(Some(o.body.clone())),
        }
    }

    async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        self.count(S3Op::Get);
        match self.bucket().objects.get(key) {
            None => Ok(None),
            Some(o) if o.body.len() > limit => Err(too_large(key, o.body.len(), limit)),
            Some(o) => Ok(Some((o.etag.clone(), o.body.clone()))),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        self.count(S3Op::Head);
        Ok(self.bucket().objects.get(key).map(|o| o.etag.clone()))
    }

    /// The continuation token is the last key of the previous page.
    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        self.count(S3Op::List);
        let b = self.bucket();
        let start = match continuation {
            Some(after) => Bound::Excluded(after.to_string()),
            None => Bound::Included(prefix.to_string()),
        };
        let mut objects: Vec<Listed> = b
            .objects
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(self.shared.page_size + 1)
            .map(|(k, o)| Listed {
                key: k.clone(),
                size: o.body.len() as u64,
            })
            .collect();
        let truncated = objects.len() > self.shared.page_size;
        objects.truncate(self.shared.page_size);
        let next = truncated
            .then(|| objects.last().map(|o| o.key.clone()))
            .flatten();
        Ok(Listing {
            objects,
            truncated,
            next,
        })
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.count(S3Op::DeleteObjects);
        let mut b = self.bucket();
        for k in keys.iter().take(MAX_DELETE_BATCH) {
            b.objects.remove(k);
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_pages_in_key_order_until_the_last_page() {
        let store = MemoryStore::with_page_size(2);
        for k in ["p/c", "p/a", "q/x", "p/b"] {
            store.put(k, Bytes::from_static(b"x")).await.unwrap();
        }
        let first = store.list("p/", None).await.unwrap();
        let keys: Vec<_> = first.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["p/a", "p/b"]);
        assert!(first.truncated);
        let second = store.list("p/", first.next.as_deref()).await.unwrap();
        let keys: Vec<_> = second.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["p/c"]);
        assert!(!second.truncated && second.next.is_none());
        assert_eq!(store.requests(S3Op::List), 2);
    }

    #[tokio::test]
    async fn a_get_over_the_limit_is_too_large_and_a_missing_key_is_none() {
        let store = MemoryStore::default();
        store.put("k", Bytes::from(vec![0u8; 10])).await.unwrap();
        assert!(matches!(
            store.get("k", 9, Lookup::Known).await,
            Err(S3Error::TooLarge {
                size: 10,
                limit: 9,
                ..
            })
        ));
        assert_eq!(store.get("nope", 9, Lookup::Probe).await.unwrap(), None);
    }

    #[tokio::test]
    async fn every_write_changes_the_etag_and_delete_removes() {
        let store = MemoryStore::default();
        store.put("bell", Bytes::from_static(b"a")).await.unwrap();
        let first = store.head("bell").await.unwrap();
        store.put("bell", Bytes::from_static(b"a")).await.unwrap();
        let second = store.head("bell").await.unwrap();
        assert!(first.is_some() && first != second);
        store.delete_many(&["bell".to_string()]).await.unwrap();
        assert_eq!(store.head("bell").await.unwrap(), None);
    }
}
