//! The agent's own record: PUT at start and every `REFRESH_PERIOD`; a failed PUT is retried
//! after `RETRY_AFTER`. A record only changes when the agent restarts (name, address, version and
//! start time are fixed for a run), so "on change" is "at start".

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::store::{S3Error, Store};
use crate::wire::bundle::NetworkKey;

use super::record::{NodeRecord, RecordError, UnixMillis};
use super::{REFRESH_PERIOD, record_key};

/// Wait after a failed PUT before the next try.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot encode the directory record: {0}")]
    Encode(#[from] RecordError),
    #[error("cannot publish the directory record: {0}")]
    Put(#[from] S3Error),
}

pub struct Publisher<S> {
    pub store: S,
    pub record: NodeRecord,
    pub key: Option<NetworkKey>,
}

impl<S: Store> Publisher<S> {
    /// PUTs the record with `refreshed_at = now`.
    pub async fn publish(&mut self, now: UnixMillis) -> Result<(), PublishError> {
        self.record.refreshed_at = now.max(self.record.started_at);
        let body = self.record.encode(self.key.as_ref())?;
        self.store
            .put(&record_key(self.record.node), Bytes::from(body))
            .await?;
        Ok(())
    }

    /// Publishes now and then every `REFRESH_PERIOD` until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = match self.publish(super::unix_millis_now()).await {
                Ok(()) => {
                    tracing::info!(
                        name = %self.record.name,
                        key = %record_key(self.record.node),
                        "directory record published"
                    );
                    REFRESH_PERIOD
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying in {RETRY_AFTER:?}");
                    RETRY_AFTER
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::read::read_directory;
    use crate::metrics::S3Op;
    use crate::store::memory_store::MemoryStore;

    fn publisher(store: MemoryStore) -> Publisher<MemoryStore> {
        Publisher {
            store,
            record: NodeRecord {
                started_at: 1_000,
                ..NodeRecord::sample(9, "edge", 1_000)
            },
            key: None,
        }
    }

    #[tokio::test]
    async fn a_published_record_reads_back_with_its_refresh_time() {
        let store = MemoryStore::default();
        let mut p = publisher(store.clone());
        p.publish(5_000).await.expect("publish");
        let d = read_directory(&store, None, 5_000).await.expect("read");
        assert_eq!(d.entries().len(), 1);
        assert_eq!(d.entries()[0].record.refreshed_at, 5_000);
        assert_eq!(d.entries()[0].record.started_at, 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_is_put_at_start_and_then_once_per_refresh_period() {
        let store = MemoryStore::default();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(publisher(store.clone()).run(rx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.requests(S3Op::Put), 1);
        tokio::time::sleep(REFRESH_PERIOD * 4).await;
        assert_eq!(store.requests(S3Op::Put), 5);
        let _ = stop.send(true);
        task.await.expect("publisher stops");
        assert_eq!(store.total_requests(), 5, "the publisher only PUTs");
    }
}
