//! The bucket as the tunnel uses it: exactly the S3 operations egress and ingress perform, as a
//! trait, so the loops run over the real S3 client (`s3::S3Store`), an in-memory bucket
//! (`memory_store::MemoryStore`) or a fault-injecting wrapper (`fault_store::FaultyStore`).
//!
//! Every method is one *call*: an implementation that talks to a real service retries inside
//! it (see `retry`), so a caller sees either the result or the error that ended the retries.

pub mod fault_store;
pub mod memory_store;
pub mod retry;

use std::future::Future;

use bytes::Bytes;

pub use crate::edge::s3::{Listed, Listing, Lookup, MAX_DELETE_BATCH, S3Error};

/// The S3 operations of the tunnel. Futures are `Send` so the loops can spawn them as tasks.
pub trait Store: Clone + Send + Sync + 'static {
    /// The bucket's name, for logs.
    fn bucket(&self) -> &str;

    /// PUT `body` under `key` (overwrites).
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<(), S3Error>> + Send;

    /// The object's bytes, `None` if it does not exist (see `Lookup` for how 403 reads),
    /// `S3Error::TooLarge` if it is over `limit` (judged from its size before the body is read).
    fn get(
        &self,
        key: &str,
        limit: usize,
        lookup: Lookup,
    ) -> impl Future<Output = Result<Option<Bytes>, S3Error>> + Send;

    /// A small object's ETag and bytes (at most `limit`), `None` if absent: the doorbell.
    fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Option<(String, Bytes)>, S3Error>> + Send;

    /// The object's ETag, `None` if absent: the idle doorbell check.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<String>, S3Error>> + Send;

    /// One page (up to 1000 keys, sorted) under `prefix`, continuing from `continuation`.
    fn list(
        &self,
        prefix: &str,
        continuation: Option<&str>,
    ) -> impl Future<Output = Result<Listing, S3Error>> + Send;

    /// One DeleteObjects request for up to `MAX_DELETE_BATCH` keys; returns the keys the
    /// server reported as not deleted.
    fn delete_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<String>, S3Error>> + Send;
}
