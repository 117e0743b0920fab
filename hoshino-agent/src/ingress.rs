//! Ingress: the heartbeat decides when to LIST the inbox (active) or HEAD the doorbell (idle);
//! new objects are fetched, checked, put in order per sender, written to the TUN and deleted.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use crate::bundle::{self, BundleError, MAX_BUNDLE_BYTES, NetworkKey};
use crate::egress::sleep_until;
use crate::heartbeat::{Heartbeat, HeartbeatConfig, Poll};
use crate::mailbox::{bell_key, inbox_prefix, parse_inbox_key};
use crate::metrics::{DropReason, Metrics};
use crate::node_addr::NodeAddr;
use crate::reorder::{Offer, Reorder, ReorderConfig, SeenKeys, StreamId};
use crate::s3::{S3Error, Store};

/// Objects fetched at once during one poll.
const GET_CONCURRENCY: usize = 16;
/// DELETEs allowed in flight before the loop waits for some.
const MAX_DELETES: usize = 256;
/// LIST pages followed in one poll when earlier pages hold only already-taken keys.
const MAX_PAGES: usize = 10;
/// A taken key still listed after this long had its DELETE fail; it is deleted again.
const REDELETE_AFTER: Duration = Duration::from_secs(30);
/// Repeated S3 failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A bundle taken from the inbox, waiting for in-order delivery.
#[derive(Debug)]
pub struct Received {
    key: String,
    sender: crate::node_addr::NodeId,
    body: Bytes,
    packets: Vec<Range<usize>>,
}

pub struct Ingress {
    pub tun: Arc<AsyncDevice>,
    pub store: Store,
    pub me: NodeAddr,
    pub metrics: Arc<Metrics>,
    pub key: Option<NetworkKey>,
    pub heartbeat: HeartbeatConfig,
    /// Signalled by egress after each bundle PUT.
    pub sent: Arc<tokio::sync::Notify>,
}

struct State {
    heartbeat: Heartbeat,
    reorder: Reorder<Received>,
    seen: SeenKeys,
    deletes: JoinSet<()>,
    bell_etag: Option<String>,
    up: bool,
    last_warn: Option<Instant>,
}

impl Ingress {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let now = Instant::now();
        let mut st = State {
            heartbeat: Heartbeat::new(self.heartbeat, now),
            reorder: Reorder::new(ReorderConfig::default()),
            seen: SeenKeys::default(),
            deletes: JoinSet::new(),
            bell_etag: None,
            up: false,
            last_warn: None,
        };
        // Baseline the doorbell before the first LIST, so a ring after that LIST is seen as a
        // change when the node goes idle.
        match self.store.head(&bell_key(self.me.id)).await {
            Ok(etag) => st.bell_etag = etag,
            Err(e) => self.warn(&mut st, &e),
        }
        let mut out = Vec::new();
        loop {
            let (kind, due) = st.heartbeat.next();
            let wake_at = match st.reorder.next_deadline() {
                Some(gap) if gap < due => gap,
                _ => due,
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = sleep_until(Some(wake_at)) => {}
                _ = self.sent.notified() => {
                    // We just sent something: a reply is likely, so stop waiting for the bell.
                    if st.heartbeat.is_idle() {
                        st.heartbeat.wake(Instant::now());
                    }
                    continue;
                }
            }
            while st.deletes.try_join_next().is_some() {}
            let now = Instant::now();
            st.reorder.expire(now, &mut out);
            self.deliver(&mut st, &mut out).await;
            if now < due {
                continue;
            }
            match kind {
                Poll::List => {
                    let found = self.poll_inbox(&mut st).await;
                    st.heartbeat.list_done(Instant::now(), found);
                    if st.heartbeat.is_idle() {
                        self.settle_into_idle(&mut st).await;
                    }
                }
                Poll::Bell => {
                    let changed = match self.store.head(&bell_key(self.me.id)).await {
                        Ok(etag) => {
                            let changed = etag != st.bell_etag;
                            st.bell_etag = etag;
                            changed
                        }
                        Err(e) => {
                            self.warn(&mut st, &e);
                            // Unknown state: look at the inbox rather than risk missing a ring.
                            true
                        }
                    };
                    st.heartbeat.bell_done(Instant::now(), changed);
                }
            }
            self.metrics
                .set_heartbeat(st.heartbeat.interval(), st.heartbeat.is_idle());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while st.deletes.join_next().await.is_some() {}
        })
        .await;
        st.deletes.abort_all();
    }

    fn warn(&self, st: &mut State, e: &S3Error) {
        let now = Instant::now();
        if st
            .last_warn
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
        {
            st.last_warn = Some(now);
            tracing::warn!(error = %e, "S3 request failed (retried with backoff; will keep polling)");
        }
    }

    /// One LIST and the work it finds. Returns whether new objects were found.
    /// Entering idle: baseline the doorbell, then LIST once more. Rings that came while we were
    /// LISTing anyway were answered by those LISTs; without a fresh baseline the first idle HEAD
    /// would see them as new and wake the node for a whole active period (~17 LISTs) for nothing.
    /// A ring after the baseline still changes the ETag, and an object PUT before it is seen by
    /// the LIST that follows, so nothing is stranded.
    async fn settle_into_idle(&self, st: &mut State) {
        match self.store.head(&bell_key(self.me.id)).await {
            Ok(etag) => st.bell_etag = etag,
            // Keep the old baseline: at worst the first idle HEAD wakes us once.
            Err(e) => self.warn(st, &e),
        }
        if self.poll_inbox(st).await {
            let now = Instant::now();
            st.heartbeat.wake(now);
            st.heartbeat.list_done(now, true);
        }
    }

    async fn poll_inbox(&self, st: &mut State) -> bool {
        let prefix = inbox_prefix(self.me.id);
        let now = Instant::now();
        let mut start_after: Option<String> = None;
        let mut fetch = Vec::new();
        // Follow pages only while they hold nothing new, so a backlog of undeletable objects
        // cannot hide newer ones; new work on a page is handled before listing further.
        for page in 0..MAX_PAGES {
            let listing = match self.store.list(&prefix, start_after.as_deref()).await {
                Ok(l) => l,
                Err(e) => {
                    self.warn(st, &e);
                    return false;
                }
            };
            if !st.up {
                st.up = true;
                tracing::info!(address = %self.me, bucket = self.store.bucket(), "tunnel up");
            }
            if page == 0 && !listing.truncated {
                let listed: HashSet<&str> =
                    listing.objects.iter().map(|o| o.key.as_str()).collect();
                st.seen.retain_listed(&listed);
            }
            for obj in &listing.objects {
                if st.seen.contains(&obj.key) {
                    if st.seen.needs_redelete(&obj.key, now, REDELETE_AFTER) {
                        self.delete(st, obj.key.clone());
                    }
                    continue;
                }
                let parsed = match parse_inbox_key(&obj.key, self.me.id) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::debug!(error = %e, "unparsable key in inbox");
                        self.reject(st, &obj.key, "bad_key");
                        continue;
                    }
                };
                if obj.size > MAX_BUNDLE_BYTES as u64 {
                    self.reject(
                        st,
                        &obj.key,
                        BundleError::Oversized(obj.size as usize).reason(),
                    );
                    continue;
                }
                fetch.push((obj.key.clone(), parsed));
            }
            if !fetch.is_empty() || !listing.truncated {
                break;
            }
            start_after = listing.objects.last().map(|o| o.key.clone());
            if start_after.is_none() {
                break;
            }
        }
        let found = !fetch.is_empty();
        let store = &self.store;
        let mut results =
            futures::stream::iter(fetch.into_iter().map(|(key, parsed)| async move {
                let r = store.get(&key, MAX_BUNDLE_BYTES).await;
                (key, parsed, r)
            }))
            .buffered(GET_CONCURRENCY);
        let mut out = Vec::new();
        let mut pending = Vec::new();
        while let Some(item) = results.next().await {
            pending.push(item);
        }
        drop(results);
        for (key, parsed, r) in pending {
            let body = match r {
                Ok(Some(b)) => b,
                Ok(None) => {
                    // Deleted meanwhile (by us earlier, or by the lifecycle rule).
                    st.seen.insert(key, Instant::now());
                    continue;
                }
                Err(S3Error::TooLarge { .. }) => {
                    self.reject(st, &key, "oversized");
                    continue;
                }
                Err(e) => {
                    // Not marked seen: the next poll retries it.
                    self.warn(st, &e);
                    continue;
                }
            };
            let decoded = bundle::decode(&body, self.key.as_ref()).and_then(|b| {
                if b.header.sender != parsed.sender {
                    Err(BundleError::SenderMismatch {
                        header: b.header.sender,
                        key: parsed.sender,
                    })
                } else if b.header.dest != self.me.id {
                    Err(BundleError::WrongDestination {
                        header: b.header.dest,
                        us: self.me.id,
                    })
                } else {
                    Ok(b)
                }
            });
            let b = match decoded {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(key, error = %e, "rejected bundle");
                    self.reject(st, &key, e.reason());
                    continue;
                }
            };
            st.seen.insert(key.clone(), Instant::now());
            let stream = StreamId {
                sender: b.header.sender,
                session: b.header.session,
            };
            let item = Received {
                key: key.clone(),
                sender: b.header.sender,
                body,
                packets: b.packets,
            };
            if st
                .reorder
                .offer(stream, b.header.seq, item, Instant::now(), &mut out)
                == Offer::Duplicate
            {
                self.delete(st, key);
            }
        }
        self.deliver(st, &mut out).await;
        found
    }

    /// Writes delivered bundles' packets to the TUN, dropping any whose addresses are not
    /// sender -> us, then deletes the objects.
    async fn deliver(&self, st: &mut State, out: &mut Vec<Received>) {
        let stats = st.reorder.take_stats();
        self.metrics
            .reorder_skipped
            .fetch_add(stats.skipped, Relaxed);
        self.metrics
            .duplicate_bundles
            .fetch_add(stats.duplicates, Relaxed);
        let me = self.me.ip();
        for r in out.drain(..) {
            let sender_ip = self.me.prefix.addr_of(r.sender);
            for range in &r.packets {
                let Some(packet) = r.body.get(range.clone()) else {
                    continue;
                };
                match bundle::ipv6_endpoints(packet) {
                    Some((src, _)) if src != sender_ip => {
                        self.metrics.dropped(DropReason::SpoofedSource, 1);
                        continue;
                    }
                    Some((_, dst)) if dst != me => {
                        self.metrics.dropped(DropReason::WrongDestination, 1);
                        continue;
                    }
                    None => continue,
                    Some(_) => {}
                }
                match self.tun.send(packet).await {
                    Ok(_) => {
                        self.metrics.ingress_packets.fetch_add(1, Relaxed);
                        self.metrics
                            .ingress_bytes
                            .fetch_add(packet.len() as u64, Relaxed);
                    }
                    Err(_) => self.metrics.dropped(DropReason::TunWriteFailed, 1),
                }
            }
            self.delete(st, r.key);
        }
    }

    fn reject(&self, st: &mut State, key: &str, reason: &str) {
        self.metrics.rejected(reason);
        self.delete(st, key.to_string());
    }

    /// Deletes in the background and remembers the key as seen, so it is never taken twice.
    fn delete(&self, st: &mut State, key: String) {
        st.seen.insert(key.clone(), Instant::now());
        if st.deletes.len() >= MAX_DELETES {
            // Bounded: the object stays (seen, so never delivered twice) until the bucket's
            // lifecycle rule collects it.
            tracing::debug!(key, "DELETE backlog full; leaving the object for later");
            return;
        }
        let store = self.store.clone();
        st.deletes.spawn(async move {
            if let Err(e) = store.delete(&key).await {
                tracing::debug!(error = %e, "DELETE failed; lifecycle expiry will collect it");
            }
        });
    }
}
