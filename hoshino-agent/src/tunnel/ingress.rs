//! Ingress: a pipelined receiver. The heartbeat sets the pace (active ticks, or a doorbell HEAD
//! per second when idle); on each active tick the receiver *probes* (GETs) the next key of every
//! stream it knows, and LISTs only to discover new streams (at start, on a doorbell change, and
//! at most every `LIST_EVERY` while active). GETs, LIST pages and deletes run as tasks beside
//! the loop, so one slow or failing GET delays neither other streams nor the next probe; one
//! byte budget covers GETs in flight plus bundles held for reordering, and objects beyond it
//! wait in the bucket. Delivered bundles go to the TUN writer task through a channel, after the
//! delivery cursor is persisted (exactly once across restarts, see `cursor`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::edge::clock;
use crate::edge::packet_io::PacketIo;
use crate::metrics::{DropReason, Metrics};
use crate::node_addr::{NodeAddr, NodeId};
use crate::store::{Listing, Lookup, S3Error, Store};
use crate::tunnel::cursor::{Cursor, CursorFile};
use crate::tunnel::deletes::DeleteQueue;
use crate::tunnel::egress::sleep_until;
use crate::tunnel::heartbeat::{Heartbeat, HeartbeatConfig, Poll};
use crate::tunnel::probe::ProbeSchedule;
use crate::tunnel::reorder::{Offer, Reorder, ReorderConfig, SeenKeys, StreamId};
use crate::wire::bundle::{self, BundleError, MAX_BUNDLE_BYTES, NetworkKey};
use crate::wire::mailbox::{BundleKey, bell_key, inbox_prefix, parse_bundle_key};

/// GETs in flight at once (probes and listed keys together).
const GET_CONCURRENCY: usize = 16;
/// While active, a LIST (to discover new streams) at most this often.
pub const LIST_EVERY: Duration = Duration::from_secs(1);
/// LIST pages followed in one round when earlier pages hold no new work.
const MAX_PAGES: usize = 20;
/// A stream is probed while it found a bundle within this long.
const PROBE_WHILE: Duration = crate::wire::mailbox::IDLE_AFTER;
/// A stream that found a bundle within this long is hot: it keeps `HOT_DEPTH` probes in flight.
const HOT_WITHIN: Duration = Duration::from_millis(250);
const HOT_DEPTH: u64 = 3;
/// While active, the bell is read this often (a GET-class request): a changed bell names a new
/// stream, found faster than by a LIST.
const BELL_EVERY_ACTIVE: Duration = Duration::from_millis(100);
/// A bell body is a bundle key (90 bytes); anything much larger is not a bell we wrote.
const BELL_MAX_BYTES: usize = 1024;
/// How long after a PUT of ours every known stream is probed (a reply is likely).
const EXPECT_REPLY: Duration = Duration::from_secs(2);
/// What a probe of a stream whose bundle size is not known yet reserves in the byte budget (and
/// at most reads); otherwise a probe reserves twice the stream's last bundle, at least
/// `MIN_PROBE_RESERVE`.
const PROBE_RESERVE: usize = 1024 * 1024;
const MIN_PROBE_RESERVE: usize = 64 * 1024;
/// A taken key still listed after this long had its DELETE fail; it is deleted again.
const REDELETE_AFTER: Duration = Duration::from_secs(30);
/// Repeated S3 failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Default byte budget over GETs in flight plus bundles held for reordering.
pub const DEFAULT_BUDGET_BYTES: usize = 32 * 1024 * 1024;
/// Floor: one bundle of the largest size must fit.
pub const MIN_BUDGET_BYTES: usize = MAX_BUNDLE_BYTES;

/// A bundle taken from the inbox, waiting for in-order delivery.
#[derive(Debug)]
pub struct Received {
    key: String,
    stream: StreamId,
    seq: u64,
    body: Bytes,
    packets: Vec<Range<usize>>,
}

pub struct Ingress<S, T> {
    pub tun: Arc<T>,
    pub store: S,
    pub me: NodeAddr,
    pub metrics: Arc<Metrics>,
    pub key: Option<NetworkKey>,
    pub heartbeat: HeartbeatConfig,
    /// Signalled by egress after each bundle PUT.
    pub sent: Arc<tokio::sync::Notify>,
    pub cursor: Cursor,
    pub cursor_file: CursorFile,
    pub budget_bytes: usize,
}

struct GetDone {
    key: String,
    parsed: BundleKey,
    lookup: Lookup,
    reserved: usize,
    result: Result<Option<Bytes>, S3Error>,
}

struct State {
    heartbeat: Heartbeat,
    reorder: Reorder<Received>,
    seen: SeenKeys,
    cursor: Cursor,
    deletes: DeleteQueue,
    delete_tasks: JoinSet<Result<Vec<String>, S3Error>>,
    gets: JoinSet<GetDone>,
    /// Keys with a GET in flight.
    getting: HashSet<String>,
    /// Listed keys waiting for budget, in key order.
    to_fetch: VecDeque<(String, BundleKey, u64)>,
    /// Bytes reserved by GETs in flight plus held by the reorder buffer.
    budget_used: usize,
    lists: JoinSet<Result<Listing, S3Error>>,
    list_pages: usize,
    /// Where the next LIST round continues (the previous one stopped early).
    resume_token: Option<String>,
    /// The current round started from `resume_token`, not from the first key.
    round_resumed: bool,
    /// Size of each stream's last bundle: what its next probe reserves (twice that).
    last_size: HashMap<StreamId, usize>,
    last_list: Option<Instant>,
    list_wanted: bool,
    /// Last time each stream found a bundle.
    last_hit: HashMap<StreamId, Instant>,
    /// Spaces out the probes of a stream that keeps missing.
    probes: ProbeSchedule,
    /// After we sent something, every known stream is probed until then: a reply is likely.
    expect_until: Option<Instant>,
    found: bool,
    bell_etag: Option<String>,
    /// Bell GETs (ETag + the hint naming the stream that rang).
    bells: JoinSet<Result<Option<(String, Bytes)>, S3Error>>,
    last_bell_check: Option<Instant>,
    up: bool,
    last_warn: Option<Instant>,
    tun_queue: mpsc::UnboundedSender<Vec<Received>>,
    /// Bytes handed to the TUN writer and not yet written: part of the budget.
    tun_backlog: Arc<AtomicUsize>,
}

impl State {
    fn budget_in_use(&self) -> usize {
        self.budget_used + self.tun_backlog.load(Relaxed)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<S: Store, T: PacketIo> Ingress<S, T> {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let now = clock::now();
        let (tun_queue, tun_rx) = mpsc::unbounded_channel();
        let tun_backlog = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_tun(
            self.tun.clone(),
            self.me,
            self.metrics.clone(),
            tun_rx,
            tun_backlog.clone(),
        ));
        let mut cursor = self.cursor.clone();
        cursor.prune(unix_now());
        let mut st = State {
            heartbeat: Heartbeat::new(self.heartbeat, now),
            reorder: Reorder::new(ReorderConfig::default()),
            seen: SeenKeys::default(),
            cursor,
            deletes: DeleteQueue::default(),
            delete_tasks: JoinSet::new(),
            gets: JoinSet::new(),
            getting: HashSet::new(),
            to_fetch: VecDeque::new(),
            budget_used: 0,
            lists: JoinSet::new(),
            list_pages: 0,
            resume_token: None,
            round_resumed: false,
            last_size: HashMap::new(),
            last_list: None,
            list_wanted: true,
            last_hit: HashMap::new(),
            probes: ProbeSchedule::default(),
            expect_until: None,
            found: false,
            bell_etag: None,
            bells: JoinSet::new(),
            last_bell_check: None,
            up: false,
            last_warn: None,
            tun_queue,
            tun_backlog,
        };
        // Baseline the doorbell before the first LIST, so a ring after that LIST is seen as a
        // change when the node goes idle.
        match self.store.head(&bell_key(self.me.id)).await {
            Ok(etag) => st.bell_etag = etag,
            Err(e) => self.warn(&mut st, &e),
        }
        let mut out = Vec::new();
        loop {
            let now = clock::now();
            st.reorder.expire(now, &mut out);
            self.deliver(&mut st, &mut out);
            self.spawn_deletes(&mut st, now);
            let (kind, due) = st.heartbeat.next();
            if now >= due {
                self.tick(&mut st, kind, now).await;
                continue;
            }
            self.spawn_gets(&mut st);
            // Deletes wait while a LIST is in flight (its completion wakes the loop).
            let deletes_due = st
                .lists
                .is_empty()
                .then(|| st.deletes.next_deadline())
                .flatten();
            let wake_at = [Some(due), st.reorder.next_deadline(), deletes_due]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = st.gets.join_next(), if !st.gets.is_empty() => {
                    if let Ok(done) = done {
                        self.get_done(&mut st, done, &mut out);
                    }
                }
                Some(bell) = st.bells.join_next(), if !st.bells.is_empty() => {
                    if let Ok(bell) = bell {
                        self.bell_read(&mut st, bell);
                    }
                }
                Some(listing) = st.lists.join_next(), if !st.lists.is_empty() => {
                    if let Ok(listing) = listing {
                        self.listed(&mut st, listing);
                    }
                }
                Some(r) = st.delete_tasks.join_next(), if !st.delete_tasks.is_empty() => {
                    st.deletes.batch_done();
                    match r {
                        Ok(Ok(failed)) if !failed.is_empty() => tracing::debug!(
                            failed = failed.len(),
                            "DeleteObjects left keys behind; a later LIST deletes them again"
                        ),
                        Ok(Err(e)) => self.warn(&mut st, &e),
                        _ => {}
                    }
                }
                _ = self.sent.notified() => {
                    // We just sent something: a reply is likely, so look now rather than at
                    // the backed-off interval (idle or not).
                    let now = clock::now();
                    st.heartbeat.hurry(now);
                    st.probes.hurry();
                    st.expect_until = Some(now + EXPECT_REPLY);
                }
                _ = sleep_until(wake_at) => {}
            }
        }
        self.finish(st, writer).await;
    }

    /// One heartbeat tick: probes and (when due) a LIST while active, the doorbell when idle.
    async fn tick(&self, st: &mut State, kind: Poll, now: Instant) {
        match kind {
            Poll::List => {
                let found = std::mem::take(&mut st.found);
                let list_due = st.list_wanted
                    || st
                        .last_list
                        .is_none_or(|t| now.saturating_duration_since(t) >= LIST_EVERY);
                if list_due {
                    self.start_list(st, now);
                }
                let bell_due = st
                    .last_bell_check
                    .is_none_or(|t| now.saturating_duration_since(t) >= BELL_EVERY_ACTIVE);
                if bell_due {
                    self.check_bell(st, now);
                }
                self.probe(st, now);
                let was_idle = st.heartbeat.is_idle();
                st.heartbeat.list_done(now, found);
                if !was_idle && st.heartbeat.is_idle() {
                    self.settle_into_idle(st).await;
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
                        self.warn(st, &e);
                        // Unknown state: look at the inbox rather than risk missing a ring.
                        true
                    }
                };
                if changed {
                    st.list_wanted = true;
                    // Read the hint: which stream rang, so it is probed at once.
                    self.check_bell(st, now);
                }
                st.heartbeat.bell_done(clock::now(), changed);
            }
        }
        self.metrics
            .set_heartbeat(st.heartbeat.interval(), st.heartbeat.is_idle());
    }

    /// Entering idle: baseline the doorbell, then LIST once more. Rings that came while we were
    /// active were answered by those LISTs and probes; without a fresh baseline the first idle
    /// HEAD would see them as new. A ring after the baseline still changes the ETag, and an
    /// object PUT before it is seen by the LIST that follows (whose findings wake the node), so
    /// nothing is stranded.
    async fn settle_into_idle(&self, st: &mut State) {
        match self.store.head(&bell_key(self.me.id)).await {
            Ok(etag) => st.bell_etag = etag,
            // Keep the old baseline: at worst the first idle HEAD wakes us once.
            Err(e) => self.warn(st, &e),
        }
        self.start_list(st, clock::now());
    }

    /// Starts a LIST round, continuing where the previous round stopped (a round follows at most
    /// `MAX_PAGES` pages), so that every key is seen within one pass however large the inbox.
    /// LIST and DeleteObjects never overlap: some servers (s3s-fs) fail a LIST whose walk races
    /// a delete; a LIST that cannot start now is wanted at the next tick.
    fn check_bell(&self, st: &mut State, now: Instant) {
        if !st.bells.is_empty() {
            return;
        }
        st.last_bell_check = Some(now);
        let store = self.store.clone();
        let key = bell_key(self.me.id);
        st.bells
            .spawn(async move { store.get_tagged(&key, BELL_MAX_BYTES).await });
    }

    /// A bell GET arrived. A changed bell means a sender started (again) talking to us: its body
    /// names the key it just wrote, so that stream is probed at once, without waiting for a
    /// LIST. The hint is only trusted for its shape: any node may ring any bell, but a probe is
    /// just a GET of a key that IAM lets only the named sender write.
    fn bell_read(&self, st: &mut State, bell: Result<Option<(String, Bytes)>, S3Error>) {
        let (etag, body) = match bell {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                self.warn(st, &e);
                return;
            }
        };
        if st.bell_etag.as_deref() == Some(etag.as_str()) {
            return;
        }
        st.bell_etag = Some(etag);
        st.list_wanted = true;
        let Some(hint) = std::str::from_utf8(&body)
            .ok()
            .and_then(|k| parse_bundle_key(k.trim(), self.me.id).ok())
        else {
            return;
        };
        let now = clock::now();
        let stream = StreamId {
            sender: hint.sender,
            session: hint.session,
        };
        st.reorder.resume(stream, st.cursor.next(stream), now);
        st.last_hit.insert(stream, now);
        st.probes.hit(stream);
        if st.heartbeat.is_idle() {
            st.heartbeat.wake(now);
        }
        let key = hint.to_key();
        if !st.getting.contains(&key)
            && !st.seen.contains(&key)
            && !st.cursor.delivered(stream, hint.seq)
        {
            self.spawn_get(st, key, hint, Lookup::Probe, PROBE_RESERVE);
        }
        self.probe(st, now);
    }

    fn start_list(&self, st: &mut State, now: Instant) {
        if !st.lists.is_empty() || !st.delete_tasks.is_empty() {
            st.list_wanted = true;
            return;
        }
        st.list_wanted = false;
        st.last_list = Some(now);
        st.list_pages = 0;
        let resume = st.resume_token.take();
        st.round_resumed = resume.is_some();
        self.spawn_list_page(st, resume);
    }

    fn spawn_list_page(&self, st: &mut State, continuation: Option<String>) {
        st.list_pages += 1;
        let store = self.store.clone();
        let prefix = inbox_prefix(self.me.id);
        st.lists
            .spawn(async move { store.list(&prefix, continuation.as_deref()).await });
    }

    /// A LIST page arrived: new keys are queued for GET, stale and garbage ones for deletion.
    fn listed(&self, st: &mut State, listing: Result<Listing, S3Error>) {
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                self.warn(st, &e);
                return;
            }
        };
        if !st.up {
            st.up = true;
            tracing::info!(address = %self.me, bucket = self.store.bucket(), "tunnel up");
        }
        let now = clock::now();
        if st.list_pages == 1 && !st.round_resumed && !listing.truncated {
            let listed: HashSet<&str> = listing.objects.iter().map(|o| o.key.as_str()).collect();
            st.seen.retain_listed(&listed);
        }
        let mut new_work = false;
        for obj in &listing.objects {
            if st.getting.contains(&obj.key) {
                continue;
            }
            if st.seen.contains(&obj.key) {
                if st.seen.needs_redelete(&obj.key, now, REDELETE_AFTER) {
                    st.deletes.push(obj.key.clone(), now);
                    new_work = true;
                }
                continue;
            }
            let parsed = match parse_bundle_key(&obj.key, self.me.id) {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(error = %e, "unparsable key in inbox");
                    self.reject(st, &obj.key, "bad_key");
                    new_work = true;
                    continue;
                }
            };
            if obj.size > MAX_BUNDLE_BYTES as u64 {
                self.reject(
                    st,
                    &obj.key,
                    BundleError::Oversized(obj.size as usize).reason(),
                );
                new_work = true;
                continue;
            }
            let stream = StreamId {
                sender: parsed.sender,
                session: parsed.session,
            };
            if st.cursor.delivered(stream, parsed.seq) {
                // Delivered before (by this process or before a restart): only delete it.
                self.metrics.duplicate_bundles.fetch_add(1, Relaxed);
                self.forget(st, obj.key.clone());
                new_work = true;
                continue;
            }
            if st.to_fetch.iter().any(|(k, _, _)| k == &obj.key) {
                continue;
            }
            st.to_fetch.push_back((obj.key.clone(), parsed, obj.size));
            new_work = true;
        }
        if new_work {
            st.found = true;
            // Findings while idle (the settling LIST) mean the node is not idle after all.
            if st.heartbeat.is_idle() {
                st.heartbeat.wake(now);
            }
        }
        // Follow pages while they hold no new fetches (so a backlog of stale objects cannot hide
        // new ones); otherwise handle this page's work first, the next round lists again.
        match listing.next {
            Some(token) if st.to_fetch.is_empty() && st.list_pages < MAX_PAGES => {
                self.spawn_list_page(st, Some(token));
            }
            Some(token) => {
                st.resume_token = Some(token);
                st.list_wanted = true;
            }
            None => {}
        }
    }

    /// Probes the next key(s) of every stream that found something recently.
    fn probe(&self, st: &mut State, now: Instant) {
        st.last_hit
            .retain(|_, t| now.saturating_duration_since(*t) < PROBE_WHILE);
        let expecting = st.expect_until.is_some_and(|t| now < t);
        let mut keys = Vec::new();
        st.last_size.retain(|id, _| st.last_hit.contains_key(id));
        let last_hit = &st.last_hit;
        st.probes.retain(|id| last_hit.contains_key(id));
        for (stream, next) in st.reorder.expected() {
            let hit = st.last_hit.get(&stream);
            if (hit.is_none() && !expecting) || !st.probes.may_probe(stream, now) {
                continue;
            }
            let depth = if hit.is_some_and(|h| now.saturating_duration_since(*h) < HOT_WITHIN) {
                HOT_DEPTH
            } else {
                1
            };
            for ahead in 0..depth {
                keys.push(BundleKey {
                    dest: self.me.id,
                    session: stream.session,
                    seq: next.wrapping_add(ahead),
                    sender: stream.sender,
                });
            }
        }
        for parsed in keys {
            let key = parsed.to_key();
            if st.getting.contains(&key) || st.seen.contains(&key) {
                continue;
            }
            let stream = StreamId {
                sender: parsed.sender,
                session: parsed.session,
            };
            // A probe may read at most what it reserved: a larger object answers "too large"
            // from its Content-Length without its body being read, and is then fetched as a
            // known key once the budget has room for its real size.
            let reserve = st
                .last_size
                .get(&stream)
                .map_or(PROBE_RESERVE, |n| n.saturating_mul(2))
                .clamp(MIN_PROBE_RESERVE, MAX_BUNDLE_BYTES);
            if st.gets.len() >= GET_CONCURRENCY || st.budget_in_use() + reserve > self.budget_bytes
            {
                break;
            }
            self.spawn_get(st, key, parsed, Lookup::Probe, reserve);
        }
    }

    /// Starts GETs of listed keys while the budget and the concurrency limit allow. With nothing
    /// in flight one GET always starts, so a bundle larger than the free budget cannot wedge.
    fn spawn_gets(&self, st: &mut State) {
        while let Some((_, _, size)) = st.to_fetch.front() {
            let size = usize::try_from(*size).unwrap_or(MAX_BUNDLE_BYTES);
            let used = st.budget_in_use();
            let fits = used + size <= self.budget_bytes || used == 0;
            if st.gets.len() >= GET_CONCURRENCY || !fits {
                break;
            }
            let Some((key, parsed, _)) = st.to_fetch.pop_front() else {
                break;
            };
            if st.getting.contains(&key) || st.seen.contains(&key) {
                continue;
            }
            self.spawn_get(st, key, parsed, Lookup::Known, size);
        }
    }

    fn spawn_get(
        &self,
        st: &mut State,
        key: String,
        parsed: BundleKey,
        lookup: Lookup,
        reserved: usize,
    ) {
        st.budget_used += reserved;
        st.getting.insert(key.clone());
        let store = self.store.clone();
        st.gets.spawn(async move {
            let limit = match lookup {
                Lookup::Probe => reserved,
                Lookup::Known => MAX_BUNDLE_BYTES,
            };
            let result = store.get(&key, limit, lookup).await;
            GetDone {
                key,
                parsed,
                lookup,
                reserved,
                result,
            }
        });
    }

    fn get_done(&self, st: &mut State, done: GetDone, out: &mut Vec<Received>) {
        st.budget_used = st.budget_used.saturating_sub(done.reserved);
        st.getting.remove(&done.key);
        let GetDone {
            key,
            parsed,
            lookup,
            ..
        } = done;
        let body = match done.result {
            Ok(Some(b)) => b,
            Ok(None) => {
                match lookup {
                    // Deleted meanwhile (by us earlier, or by the lifecycle rule).
                    Lookup::Known => st.seen.insert(key, clock::now()),
                    Lookup::Probe => st.probes.missed(
                        StreamId {
                            sender: parsed.sender,
                            session: parsed.session,
                        },
                        clock::now(),
                    ),
                }
                return;
            }
            Err(S3Error::TooLarge { size, .. })
                if lookup == Lookup::Probe && size <= MAX_BUNDLE_BYTES as u64 =>
            {
                // Exists, larger than the probe reserved: fetch it as a known key, first.
                st.found = true;
                st.to_fetch.push_front((key, parsed, size));
                return;
            }
            Err(S3Error::TooLarge { .. }) => {
                self.reject(st, &key, "oversized");
                return;
            }
            Err(e) => {
                // Counted as an S3 error per attempt; not marked seen, so the next LIST (or
                // probe) tries again: a 403 on a key that exists is a fault, not "gone".
                self.warn(st, &e);
                return;
            }
        };
        let stream = StreamId {
            sender: parsed.sender,
            session: parsed.session,
        };
        let now = clock::now();
        st.found = true;
        st.last_hit.insert(stream, now);
        st.probes.hit(stream);
        st.last_size.insert(stream, body.len());
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
                return;
            }
        };
        if b.header.session != parsed.session || b.header.seq != parsed.seq {
            // A bundle replayed under another key of the same sender: the key decides where
            // it sits in the stream, so both must agree.
            tracing::debug!(key, "bundle header session/seq differ from its key");
            self.reject(st, &key, "key_mismatch");
            return;
        }
        if st.cursor.delivered(stream, parsed.seq) {
            self.metrics.duplicate_bundles.fetch_add(1, Relaxed);
            self.forget(st, key);
            return;
        }
        st.seen.insert(key.clone(), now);
        st.reorder.resume(stream, st.cursor.next(stream), now);
        // With a network key the packets live in the decrypted plaintext, not in the object.
        let (body, packets) = b.into_parts(body);
        let len = body.len();
        let item = Received {
            key: key.clone(),
            stream,
            seq: parsed.seq,
            body,
            packets,
        };
        match st.reorder.offer(stream, parsed.seq, item, now, out) {
            Offer::Duplicate => self.forget(st, key),
            Offer::Delivered | Offer::Held => st.budget_used += len,
        }
        self.deliver(st, out);
    }

    /// Advances and persists the cursor for what the reorder buffer released, then hands the
    /// bundles to the TUN writer and queues their deletion.
    fn deliver(&self, st: &mut State, out: &mut Vec<Received>) {
        let stats = st.reorder.take_stats();
        self.metrics
            .reorder_skipped
            .fetch_add(stats.skipped, Relaxed);
        self.metrics
            .duplicate_bundles
            .fetch_add(stats.duplicates, Relaxed);
        if out.is_empty() {
            return;
        }
        let now_unix = unix_now();
        for r in out.iter() {
            st.cursor.advance(r.stream, r.seq, now_unix);
            st.budget_used = st.budget_used.saturating_sub(r.body.len());
        }
        if st.cursor.take_dirty()
            && let Err(e) = self.cursor_file.store(&st.cursor)
        {
            // Delivering anyway keeps the tunnel up; only a restart could now repeat these.
            tracing::warn!(error = %e, "persisting the delivery cursor failed");
        }
        let now = clock::now();
        for r in out.iter() {
            st.deletes.push(r.key.clone(), now);
        }
        let batch: Vec<Received> = std::mem::take(out);
        let bytes: usize = batch.iter().map(|r| r.body.len()).sum();
        // Unbounded channel, bounded by the byte budget: the backlog counts against it, so
        // GETs stop before the writer falls far behind.
        st.tun_backlog.fetch_add(bytes, Relaxed);
        if st.tun_queue.send(batch).is_err() {
            st.tun_backlog.fetch_sub(bytes, Relaxed);
            self.metrics.dropped(DropReason::TunWriteFailed, 1);
        }
    }

    fn spawn_deletes(&self, st: &mut State, now: Instant) {
        if !st.lists.is_empty() {
            return;
        }
        while let Some(batch) = st.deletes.next_batch(now) {
            let store = self.store.clone();
            st.delete_tasks
                .spawn(async move { store.delete_many(&batch).await });
        }
    }

    fn reject(&self, st: &mut State, key: &str, reason: &str) {
        self.metrics.rejected(reason);
        self.forget(st, key.to_string());
    }

    /// Marks `key` taken and queues its deletion.
    fn forget(&self, st: &mut State, key: String) {
        let now = clock::now();
        st.seen.insert(key.clone(), now);
        if !st.deletes.push(key, now) {
            tracing::debug!("delete queue full; the key is deleted after a later LIST");
        }
    }

    fn warn(&self, st: &mut State, e: &S3Error) {
        let now = clock::now();
        if st
            .last_warn
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
        {
            st.last_warn = Some(now);
            tracing::warn!(error = %e, "S3 request failed (retried with backoff; will keep polling)");
        }
    }

    /// Shutdown: stop fetching, flush queued deletes briefly, let the writer drain.
    async fn finish(&self, mut st: State, writer: tokio::task::JoinHandle<()>) {
        st.gets.abort_all();
        st.lists.abort_all();
        st.bells.abort_all();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let far = clock::now() + Duration::from_secs(3600);
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                self.spawn_deletes(&mut st, far);
                match st.delete_tasks.join_next().await {
                    Some(_) => st.deletes.batch_done(),
                    None if st.deletes.is_empty() => break,
                    None => {}
                }
            }
        })
        .await;
        st.delete_tasks.abort_all();
        drop(st.tun_queue);
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
    backlog: Arc<AtomicUsize>,
) {
    let my_ip = me.ip();
    while let Some(batch) = rx.recv().await {
        for r in batch {
            let _release = Release(&backlog, r.body.len());
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
        }
    }
}

/// Returns a bundle's bytes to the budget once it is written (or dropped).
struct Release<'a>(&'a AtomicUsize, usize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Relaxed);
    }
}
