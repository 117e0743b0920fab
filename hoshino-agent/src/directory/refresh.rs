//! Keeps a running agent's copy of the directory fresh for the name responder: a read every
//! `READ_PERIOD`, and sooner when the responder misses a name (`wanted`), at most once per
//! `MIN_READ_GAP`, so a node that just started resolves within seconds while a flood of unknown
//! names costs at most one read per gap.
//!
//! Cost while idle: 24 LISTs and 24 GETs per node a day ($0.00012 + $0.00001 per node at AWS
//! list prices, against the doorbell's $0.035); unknown names cost at most one more read per
//! 30 s while they are being asked for.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::store::Store;
use crate::wire::bundle::NetworkKey;

use super::read::read_directory;
use super::table::Directory;
use super::unix_millis_now;

pub const READ_PERIOD: Duration = Duration::from_secs(3600);
pub const MIN_READ_GAP: Duration = Duration::from_secs(30);
/// Wait after a failed read (the last good copy keeps answering meanwhile).
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

pub struct Refresher<S> {
    pub store: S,
    pub key: Option<NetworkKey>,
    pub directory: watch::Sender<Arc<Directory>>,
    /// Notified by the responder when a name was not found.
    pub wanted: Arc<Notify>,
}

impl<S: Store> Refresher<S> {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut reported_collisions = Vec::new();
        loop {
            let wait = match read_directory(&self.store, self.key.as_ref(), unix_millis_now()).await
            {
                Ok(d) => {
                    let collisions = d.collisions();
                    if collisions != reported_collisions {
                        for (name, nodes) in &collisions {
                            let ids: Vec<String> = nodes.iter().map(ToString::to_string).collect();
                            tracing::warn!(
                                %name,
                                nodes = %ids.join(","),
                                "name collision in the directory: the name resolves to none of them"
                            );
                        }
                        reported_collisions = collisions;
                    }
                    tracing::debug!(nodes = d.entries().len(), "directory read");
                    self.directory.send_replace(Arc::new(d));
                    READ_PERIOD
                }
                Err(e) => {
                    tracing::warn!("directory read failed: {e}; retrying in {RETRY_AFTER:?}");
                    RETRY_AFTER
                }
            };
            // The gap first: a miss right after a read does not trigger another.
            tokio::select! {
                _ = tokio::time::sleep(MIN_READ_GAP.min(wait)) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.saturating_sub(MIN_READ_GAP)) => {}
                _ = self.wanted.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::directory::record::NodeRecord;
    use crate::directory::record_key;
    use crate::metrics::S3Op;
    use crate::store::memory_store::MemoryStore;

    async fn publish(store: &MemoryStore, node: u64, name: &str) {
        let r = NodeRecord::sample(node, name, 0);
        store
            .put(
                &record_key(r.node),
                Bytes::from(r.encode(None).expect("encodes")),
            )
            .await
            .expect("put");
    }

    #[tokio::test(start_paused = true)]
    async fn reads_every_period_and_sooner_on_a_miss_but_not_more_than_once_per_gap() {
        let store = MemoryStore::default();
        publish(&store, 1, "a").await;
        let (tx, mut rx) = watch::channel(Arc::new(Directory::default()));
        let wanted = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(
            Refresher {
                store: store.clone(),
                key: None,
                directory: tx,
                wanted: wanted.clone(),
            }
            .run(stop_rx),
        );
        rx.changed().await.expect("first read");
        assert_eq!(rx.borrow().entries().len(), 1);
        assert_eq!(store.requests(S3Op::List), 1);

        publish(&store, 2, "b").await;
        // A miss within the gap waits for the gap's end.
        wanted.notify_one();
        tokio::time::sleep(MIN_READ_GAP / 2).await;
        assert_eq!(store.requests(S3Op::List), 1);
        rx.changed().await.expect("read after the miss");
        assert_eq!(rx.borrow().entries().len(), 2);
        assert_eq!(store.requests(S3Op::List), 2);

        // No miss: the next read comes one period later.
        tokio::time::sleep(READ_PERIOD - Duration::from_secs(1)).await;
        assert_eq!(store.requests(S3Op::List), 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(store.requests(S3Op::List), 3);
        let _ = stop.send(true);
        task.await.expect("stops");
    }
}
