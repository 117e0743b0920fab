//! Reads the whole directory: one LIST per 1,000 nodes, one GET per record.

use crate::store::{Lookup, S3Error, Store};
use crate::wire::bundle::NetworkKey;

use super::record::{MAX_RECORD_BYTES, NodeRecord, UnixMillis};
use super::table::{Directory, Rejected};
use super::{nodes_prefix, parse_record_key};

/// Every record under `v2/nodes/`; records that fail the parser (or the network key's check)
/// are left out and listed in `Directory::rejected`. An S3 failure of the LIST or of a GET fails
/// the read: a partial directory would make names vanish.
pub async fn read_directory<S: Store>(
    store: &S,
    key: Option<&NetworkKey>,
    now: UnixMillis,
) -> Result<Directory, S3Error> {
    let prefix = nodes_prefix();
    let mut keys = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let page = store.list(&prefix, continuation.as_deref()).await?;
        keys.extend(page.objects.into_iter().map(|o| o.key));
        match page.next {
            Some(next) if page.truncated => continuation = Some(next),
            _ => break,
        }
    }
    let mut records = Vec::new();
    let mut rejected = Vec::new();
    for object_key in keys {
        let Some(node) = parse_record_key(&object_key) else {
            rejected.push(Rejected {
                key: object_key,
                reason: "key is not v2/nodes/<16 lowercase hex>".into(),
            });
            continue;
        };
        let body = match store
            .get(&object_key, MAX_RECORD_BYTES, Lookup::Known)
            .await
        {
            Ok(Some(body)) => body,
            // Deleted between the LIST and the GET.
            Ok(None) => continue,
            Err(e @ S3Error::TooLarge { .. }) => {
                rejected.push(Rejected {
                    key: object_key,
                    reason: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        match NodeRecord::decode(&body, node, key) {
            Ok(r) => records.push(r),
            Err(e) => {
                tracing::warn!(key = %object_key, reason = e.reason(), "directory record ignored: {e}");
                rejected.push(Rejected {
                    key: object_key,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(Directory::new(records, rejected, now))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::directory::record_key;
    use crate::node_addr::NodeId;
    use crate::store::memory_store::MemoryStore;

    fn record(node: u64, name: &str) -> NodeRecord {
        NodeRecord {
            started_at: 5,
            ..NodeRecord::sample(node, name, 10)
        }
    }

    async fn put(store: &MemoryStore, key: &str, body: Vec<u8>) {
        store.put(key, Bytes::from(body)).await.expect("memory put");
    }

    #[tokio::test]
    async fn valid_records_are_read_and_forged_or_garbage_ones_ignored_and_counted() {
        let store = MemoryStore::with_page_size(2);
        let net = NetworkKey::new(&[1; 32]).expect("key");
        let other = NetworkKey::new(&[2; 32]).expect("key");
        for (n, name) in [(1, "a"), (2, "b"), (3, "c")] {
            let body = record(n, name).encode(Some(&net)).expect("encodes");
            put(&store, &record_key(NodeId(n)), body).await;
        }
        // Sealed with a key that is not the network's.
        put(
            &store,
            &record_key(NodeId(4)),
            record(4, "d").encode(Some(&other)).expect("encodes"),
        )
        .await;
        // Node 5's key holding node 1's record (a copy replayed under another key).
        put(
            &store,
            &record_key(NodeId(5)),
            record(1, "a").encode(Some(&net)).expect("encodes"),
        )
        .await;
        put(&store, "v2/nodes/garbage", b"x".to_vec()).await;
        put(
            &store,
            &record_key(NodeId(6)),
            vec![0; MAX_RECORD_BYTES + 1],
        )
        .await;

        let d = read_directory(&store, Some(&net), 10).await.expect("read");
        let names: Vec<&str> = d.entries().iter().map(|e| e.record.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
        let rejected: Vec<&str> = d.rejected().iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            rejected,
            vec![
                "v2/nodes/0000000000000004",
                "v2/nodes/0000000000000005",
                "v2/nodes/0000000000000006",
                "v2/nodes/garbage",
            ]
        );
    }

    #[tokio::test]
    async fn an_empty_bucket_is_an_empty_directory() {
        let d = read_directory(&MemoryStore::default(), None, 0)
            .await
            .expect("read");
        assert!(d.entries().is_empty() && d.rejected().is_empty());
    }
}
