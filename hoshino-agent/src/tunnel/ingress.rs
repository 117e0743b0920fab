//! Ingress: the inbox's driver. `inbox::Inbox` decides (sans-IO) which probe, LIST, GET, bell
//! read and DeleteObjects come next and what is delivered; this loop performs each action as a
//! task beside it, so one slow or failing GET delays neither other streams nor the next probe,
//! and feeds the results back with the time they arrived. Delivered bundles go to the TUN
//! writer task through a channel, after the delivery cursor is persisted (exactly once across
//! restarts, see `cursor`); the writer returns their bytes to the inbox's budget.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::edge::clock;
use crate::edge::packet_io::PacketIo;
use crate::metrics::{DropReason, Metrics};
use crate::node_addr::{NodeAddr, NodeId};
use crate::store::{Listing, S3Error, Store};
use crate::tunnel::cursor::{Cursor, CursorFile};
use crate::tunnel::egress::{Heard, sleep_until};
use crate::tunnel::heartbeat::HeartbeatConfig;
use crate::tunnel::inbox::{Action, BELL_MAX_BYTES, BellRead, Get, HeadPurpose, Inbox, Received};
pub use crate::tunnel::inbox::{DEFAULT_BUDGET_BYTES, LIST_EVERY, MIN_BUDGET_BYTES};
use crate::wire::bundle::{self, NetworkKey};
use crate::wire::mailbox::{bell_key, inbox_prefix};

/// Repeated S3 failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// On shutdown, queued deletes get this long.
const DRAIN_DELETES: Duration = Duration::from_secs(2);

pub struct Ingress<S, T> {
    pub tun: Arc<T>,
    pub store: S,
    pub me: NodeAddr,
    pub metrics: Arc<Metrics>,
    pub key: Option<NetworkKey>,
    pub heartbeat: HeartbeatConfig,
    /// Signalled by egress after each bundle PUT.
    pub sent: Arc<tokio::sync::Notify>,
    /// Tells egress of each bundle written to the TUN, which may carry replies to ours.
    pub heard: mpsc::Sender<Heard>,
    pub cursor: Cursor,
    pub cursor_file: CursorFile,
    pub budget_bytes: usize,
}

/// A finished request, with what the inbox needs to take its answer.
enum Done {
    Head(HeadPurpose, Result<Option<String>, S3Error>),
    Bell(BellRead, Result<Option<(String, Bytes)>, S3Error>),
    List(Result<Listing, S3Error>),
    Get(Get, Result<Option<Bytes>, S3Error>),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Driver {
    requests: JoinSet<Done>,
    deletes: JoinSet<Result<Vec<String>, S3Error>>,
    tun_queue: mpsc::UnboundedSender<Vec<Received>>,
    last_warn: Option<Instant>,
    was_up: bool,
}

impl<S: Store, T: PacketIo> Ingress<S, T> {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut inbox = Inbox::new(
            self.me.id,
            self.key.clone(),
            self.heartbeat,
            self.cursor.clone(),
            self.budget_bytes,
            clock::now(),
            unix_now(),
        );
        let (tun_queue, tun_rx) = mpsc::unbounded_channel();
        let (written_tx, mut written) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_tun(
            self.tun.clone(),
            self.me,
            self.metrics.clone(),
            tun_rx,
            written_tx,
            self.heard.clone(),
        ));
        let mut d = Driver {
            requests: JoinSet::new(),
            deletes: JoinSet::new(),
            tun_queue,
            last_warn: None,
            was_up: false,
        };
        loop {
            let now = clock::now();
            while let Some(action) = inbox.poll(now) {
                self.perform(&mut d, &mut inbox, action);
            }
            self.account(&mut d, &mut inbox);
            let wake_at = inbox.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = d.requests.join_next(), if !d.requests.is_empty() => {
                    if let Ok(done) = done {
                        self.complete(&mut d, &mut inbox, done);
                    }
                }
                Some(r) = d.deletes.join_next(), if !d.deletes.is_empty() => {
                    // A panicked delete task is a delete that left its keys behind.
                    let r = r.unwrap_or_else(|_| Ok(Vec::new()));
                    if let Err(e) = &r {
                        self.warn(&mut d, e);
                    }
                    inbox.deleted(r);
                }
                Some(bytes) = written.recv() => inbox.written(bytes),
                _ = self.sent.notified() => inbox.sent(clock::now()),
                _ = sleep_until(wake_at) => {}
            }
        }
        self.finish(d, inbox, writer).await;
    }

    fn perform(&self, d: &mut Driver, inbox: &mut Inbox, action: Action) {
        let store = self.store.clone();
        match action {
            Action::HeadBell(purpose) => {
                let key = bell_key(self.me.id);
                d.requests
                    .spawn(async move { Done::Head(purpose, store.head(&key).await) });
            }
            Action::ReadBell(read) => {
                let key = bell_key(self.me.id);
                d.requests.spawn(async move {
                    Done::Bell(read, store.get_tagged(&key, BELL_MAX_BYTES).await)
                });
            }
            Action::List { continuation } => {
                let prefix = inbox_prefix(self.me.id);
                d.requests.spawn(async move {
                    Done::List(store.list(&prefix, continuation.as_deref()).await)
                });
            }
            Action::Get(get) => {
                tracing::debug!(key = get.key, "inbox get start");
                d.requests.spawn(async move {
                    let result = store.get(&get.key, get.limit(), get.lookup).await;
                    Done::Get(get, result)
                });
            }
            Action::Delete(batch) => {
                d.deletes
                    .spawn(async move { store.delete_many(&batch).await });
            }
            Action::Deliver {
                bundles,
                cursor_changed,
            } => {
                if cursor_changed && let Err(e) = self.cursor_file.store(inbox.cursor()) {
                    // Delivering anyway keeps the tunnel up; only a restart could now repeat
                    // these.
                    tracing::warn!(error = %e, "persisting the delivery cursor failed");
                }
                let bytes: usize = bundles.iter().map(|r| r.body.len()).sum();
                if d.tun_queue.send(bundles).is_err() {
                    inbox.written(bytes);
                    self.metrics.dropped(DropReason::TunWriteFailed, 1);
                }
            }
        }
    }

    fn complete(&self, d: &mut Driver, inbox: &mut Inbox, done: Done) {
        let now = clock::now();
        match done {
            Done::Head(purpose, r) => {
                if let Err(e) = &r {
                    self.warn(d, e);
                }
                inbox.bell_headed(purpose, r, now);
            }
            Done::Bell(read, r) => {
                if let Err(e) = &r {
                    self.warn(d, e);
                }
                inbox.bell_read(read, r, now);
            }
            Done::List(r) => {
                if let Err(e) = &r {
                    self.warn(d, e);
                }
                inbox.listed(r, now);
            }
            Done::Get(get, r) => {
                if let Err(e) = &r
                    && !matches!(e, S3Error::TooLarge { .. })
                {
                    self.warn(d, e);
                }
                tracing::debug!(
                    key = get.key,
                    result = match &r {
                        Ok(Some(body)) => body.len() as i64,
                        Ok(None) => -1,
                        Err(_) => -2,
                    },
                    "inbox get done"
                );
                inbox.got(get, r, now);
            }
        }
    }

    /// What the inbox counted goes to the metrics.
    fn account(&self, d: &mut Driver, inbox: &mut Inbox) {
        let counts = inbox.take_counts();
        for reason in counts.rejected {
            self.metrics.rejected(reason);
        }
        if counts.duplicates > 0 {
            self.metrics
                .duplicate_bundles
                .fetch_add(counts.duplicates, Relaxed);
        }
        if counts.skipped > 0 {
            self.metrics
                .reorder_skipped
                .fetch_add(counts.skipped, Relaxed);
        }
        self.metrics
            .set_heartbeat(inbox.interval(), inbox.is_idle());
        if !d.was_up && inbox.is_up() {
            d.was_up = true;
            tracing::info!(address = %self.me, bucket = self.store.bucket(), "tunnel up");
        }
    }

    fn warn(&self, d: &mut Driver, e: &S3Error) {
        let now = clock::now();
        if d.last_warn
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
        {
            d.last_warn = Some(now);
            tracing::warn!(error = %e, "S3 request failed (retried with backoff; will keep polling)");
        }
    }

    /// Shutdown: stop fetching, flush queued deletes briefly, let the writer drain.
    async fn finish(&self, mut d: Driver, mut inbox: Inbox, writer: tokio::task::JoinHandle<()>) {
        d.requests.abort_all();
        for batch in inbox.drain_deletes() {
            let store = self.store.clone();
            d.deletes
                .spawn(async move { store.delete_many(&batch).await });
        }
        let _ = tokio::time::timeout(DRAIN_DELETES, async {
            while d.deletes.join_next().await.is_some() {}
        })
        .await;
        d.deletes.abort_all();
        drop(d.tun_queue);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    }
}

/// Writes delivered bundles' packets to the TUN, dropping any whose addresses are not
/// sender -> us. Runs apart from the poll loop, so a slow TUN never delays a GET or probe.
async fn write_tun<T: PacketIo>(
    tun: Arc<T>,
    me: NodeAddr,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Vec<Received>>,
    written: mpsc::UnboundedSender<usize>,
    heard: mpsc::Sender<Heard>,
) {
    let my_ip = me.ip();
    while let Some(batch) = rx.recv().await {
        for r in batch {
            let _release = Release(&written, r.body.len());
            let sender: NodeId = r.stream.sender;
            let sender_ip = me.prefix.addr_of(sender);
            for range in &r.packets {
                let Some(packet) = r.body.get(range.clone()) else {
                    continue;
                };
                match bundle::ipv6_endpoints(packet) {
                    Some((src, _)) if src != sender_ip => {
                        metrics.dropped(DropReason::SpoofedSource, 1);
                        continue;
                    }
                    Some((_, dst)) if dst != my_ip => {
                        metrics.dropped(DropReason::WrongDestination, 1);
                        continue;
                    }
                    None => continue,
                    Some(_) => {}
                }
                match tun.send(packet).await {
                    Ok(_) => {
                        metrics.ingress_packets.fetch_add(1, Relaxed);
                        metrics
                            .ingress_bytes
                            .fetch_add(packet.len() as u64, Relaxed);
                    }
                    Err(_) => metrics.dropped(DropReason::TunWriteFailed, 1),
                }
            }
            // After the whole bundle: what the local stack sends in reply is in the TUN now.
            tracing::debug!(key = r.key, bytes = r.body.len(), "bundle written");
            let _ = heard.try_send(Heard {
                from: sender,
                bytes: r.body.len(),
                more: r.more,
            });
        }
    }
}

/// Returns a bundle's bytes to the inbox's budget once it is written (or dropped).
struct Release<'a>(&'a mpsc::UnboundedSender<usize>, usize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        // The loop may be gone at shutdown; then nobody needs the budget back.
        let _ = self.0.send(self.1);
    }
}
