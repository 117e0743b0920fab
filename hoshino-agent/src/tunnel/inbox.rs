//! The receive side as a state machine, without I/O (as `quinn-proto` is): which probe, LIST,
//! GET, bell read or DeleteObjects to start next, what to deliver and in which order. The
//! clock is passed in; `ingress` performs the actions and feeds their results back.
//!
//! - **Finding objects.** The heartbeat sets the pace (active ticks, or a doorbell GET per
//!   `--idle-poll` when idle, whose body names the stream that rang). On each active tick the inbox *probes* (GETs) the next key of
//!   every stream it knows, and LISTs only to discover new streams (at start, on a doorbell
//!   change, and at most every `LIST_EVERY` while active).
//! - **What a probe costs.** A probe that misses is a request too, so a stream is probed one
//!   key at a time unless its bundles are large (a sender limited by bundle size has more PUTs in
//!   flight), and after a hit its next probe waits half the stream's measured interval between
//!   bundles (`probe::ProbeSchedule`). After a PUT of ours every stream without a known cadence
//!   is probed at once: a reply is likely.
//! - **One byte budget** covers GETs in flight plus bundles held for reordering or waiting for
//!   the TUN writer; objects beyond it wait in the bucket. A GET never blocks another: the driver
//!   runs each as a task.
//! - **Exactly once across restarts.** Delivered bundles advance the delivery cursor; the driver
//!   persists it before the packets reach the TUN (`Action::Deliver`), and bundles at or below
//!   it are deleted unread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::node_addr::NodeId;
use crate::store::{Listing, Lookup, S3Error};
use crate::tunnel::cursor::Cursor;
use crate::tunnel::deletes::DeleteQueue;
use crate::tunnel::heartbeat::{Heartbeat, HeartbeatConfig, Poll};
use crate::tunnel::probe::ProbeSchedule;
use crate::tunnel::reorder::{Offer, Reorder, ReorderConfig, SeenKeys, StreamId};
use crate::wire::bundle::{self, BundleError, MAX_BUNDLE_BYTES, NetworkKey};
use crate::wire::mailbox::{BundleKey, parse_bundle_key};

/// GETs in flight at once (probes and listed keys together).
pub const GET_CONCURRENCY: usize = 16;
/// While active, a LIST (to discover new streams) at most this often. New streams normally
/// announce themselves by the bell; the LIST is the safety net (and finds what a lost ring did
/// not), so it may be rare: a LIST costs as much as 12.5 GETs.
pub const LIST_EVERY: Duration = Duration::from_secs(5);
/// LIST pages followed in one round when earlier pages hold no new work.
const MAX_PAGES: usize = 20;
/// A stream is probed while it found a bundle within this long.
const PROBE_WHILE: Duration = crate::wire::mailbox::IDLE_AFTER;
/// A stream that found a bundle within this long that its sender sealed full (`more`) keeps
/// `HOT_DEPTH` probes in flight: its sender is limited by bundle size, so it has several PUTs in
/// flight and the next keys are coming. (A size threshold instead probed a window-limited
/// flow's 1-2 MB bundles two deep, and the second probe nearly always missed.)
const HOT_WITHIN: Duration = crate::tunnel::probe::CADENCE_WITHIN;
const HOT_DEPTH: u64 = 2;
/// While active, the bell is read this often (a GET-class request): a changed bell names a new
/// stream, found faster than by a LIST.
const BELL_EVERY_ACTIVE: Duration = Duration::from_millis(500);
/// After a PUT of ours that starts an exchange (none in the last `EXPECT_REPLY`), while no
/// stream is hot, the bell is read this often, `FAST_BELL_READS` times: a peer that answers in a
/// stream we do not know yet (its first bundle to us, or its first after a restart) is found by
/// its ring within about a GET instead of up to `BELL_EVERY_ACTIVE` later. Bounded per exchange,
/// so a one-way flow that keeps PUTting pays for them once.
const BELL_EVERY_EXPECTING: Duration = Duration::from_millis(50);
const FAST_BELL_READS: u32 = 8;
/// A bell body is a bundle key (90 bytes); anything much larger is not a bell we wrote.
pub const BELL_MAX_BYTES: usize = 1024;
/// How long after a PUT of ours every known stream is probed (a reply is likely).
const EXPECT_REPLY: Duration = Duration::from_secs(2);
/// What a probe of a stream whose bundle size is not known yet reserves in the byte budget (and
/// at most reads); otherwise a probe reserves twice the stream's size peak (its largest recent
/// bundle, decaying by `1 / PEAK_DECAY_PER_FIND` per smaller find), at least `MIN_PROBE_RESERVE`.
const PROBE_RESERVE: usize = 1024 * 1024;
const MIN_PROBE_RESERVE: usize = 64 * 1024;
/// A stream's size peak loses this fraction per find that does not reach it.
const PEAK_DECAY_PER_FIND: usize = 8;
/// A taken key still listed after this long had its DELETE fail; it is deleted again.
const REDELETE_AFTER: Duration = Duration::from_secs(30);

/// Default byte budget over GETs in flight plus bundles held for reordering.
pub const DEFAULT_BUDGET_BYTES: usize = 32 * 1024 * 1024;
/// Floor: one bundle of the largest size must fit.
pub const MIN_BUDGET_BYTES: usize = MAX_BUNDLE_BYTES;

/// A bundle taken from the inbox, in delivery order.
#[derive(Debug)]
pub struct Received {
    pub key: String,
    pub stream: StreamId,
    pub seq: u64,
    pub body: Bytes,
    /// Where each packet lies in `body`.
    pub packets: Vec<Range<usize>>,
    /// Its sender sealed it full, with more at once (`BundleHeader::more`).
    pub more: bool,
}

/// Why a bell HEAD was asked for: its answer means different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadPurpose {
    /// At start, before the first LIST: only a baseline.
    Baseline,
    /// Entering idle: a fresh baseline, then one more LIST.
    Settle,
}

/// Why the bell is read (a GET: its ETag, and the key of the bundle that rang it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BellRead {
    /// The idle poll. A GET rather than a HEAD: the same price class, and a changed bell's body
    /// names the stream to probe, so waking costs no second read of it.
    Poll,
    /// While active: a changed bell names a new stream.
    Check,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// HEAD this node's bell; answer with `Inbox::bell_headed`.
    HeadBell(HeadPurpose),
    /// GET the bell (ETag and the hint it carries); answer with `Inbox::bell_read`.
    ReadBell(BellRead),
    /// One LIST page of the inbox; answer with `Inbox::listed`.
    List { continuation: Option<String> },
    /// GET `key` reading at most `limit` bytes; answer with `Inbox::got`, passing `get` back.
    Get(Get),
    /// DeleteObjects of these keys; answer with `Inbox::deleted`.
    Delete(Vec<String>),
    /// Persist `Inbox::cursor()` (when `cursor_changed`), then write these bundles' packets to
    /// the TUN, in this order. Their bytes stay in the budget until `Inbox::written`.
    Deliver {
        bundles: Vec<Received>,
        cursor_changed: bool,
    },
}

/// A GET the inbox asked for, handed back with its result.
#[derive(Debug, Clone)]
pub struct Get {
    pub key: String,
    pub parsed: BundleKey,
    pub lookup: Lookup,
    /// Bytes reserved in the budget; a probe reads at most this much.
    pub reserved: usize,
    /// When the inbox asked for it (its answer times the store's GET latency).
    pub started: Instant,
}

impl Get {
    pub fn limit(&self) -> usize {
        match self.lookup {
            Lookup::Probe => self.reserved,
            Lookup::Known => MAX_BUNDLE_BYTES,
        }
    }
}

/// Counts the driver adds to the metrics (`Inbox::take_counts`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Objects rejected (and deleted unread), by reason.
    pub rejected: Vec<&'static str>,
    /// Bundles found again after delivery (deleted unread).
    pub duplicates: u64,
    /// Sequence numbers given up after the gap timeout.
    pub skipped: u64,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    count: u8,
    latest: Instant,
}

pub struct Inbox {
    me: NodeId,
    key: Option<NetworkKey>,
    budget_bytes: usize,
    heartbeat: Heartbeat,
    reorder: Reorder<Received>,
    seen: SeenKeys,
    cursor: Cursor,
    deletes: DeleteQueue,
    deletes_in_flight: usize,
    /// Keys with GETs in flight: how many (an eager probe may have a twin) and when the latest
    /// started.
    getting: HashMap<String, InFlight>,
    /// EWMA of probe round trips: an eager stream's twin probe starts half of it after the first.
    probe_latency: Option<Duration>,
    gets_in_flight: usize,
    /// Listed keys waiting for budget, in key order.
    to_fetch: VecDeque<(String, BundleKey, u64)>,
    /// Bytes reserved by GETs in flight plus held by the reorder buffer and the TUN writer.
    budget_used: usize,
    listing: bool,
    list_pages: usize,
    /// Where the next LIST round continues (the previous one stopped early).
    resume_token: Option<String>,
    round_resumed: bool,
    /// Per stream, its largest recent bundle (see `PROBE_RESERVE`).
    size_peak: HashMap<StreamId, usize>,
    /// Streams whose latest bundle was sealed full.
    full_senders: HashSet<StreamId>,
    last_list: Option<Instant>,
    list_wanted: bool,
    last_hit: HashMap<StreamId, Instant>,
    probes: ProbeSchedule,
    expect_until: Option<Instant>,
    /// Bell reads left at `BELL_EVERY_EXPECTING` in this exchange.
    fast_bell_reads: u32,
    found: bool,
    bell_etag: Option<String>,
    /// An active-mode bell check is in flight.
    reading_bell: bool,
    /// A bell request the heartbeat waits on (baseline, settle, idle poll) is in flight.
    bell_pending: bool,
    /// The last idle poll found the bell larger than `BELL_MAX_BYTES`.
    bell_oversized: bool,
    last_bell_check: Option<Instant>,
    up: bool,
    /// Unix seconds at `epoch`: the cursor's entries are dated in wall time.
    unix_at_epoch: u64,
    epoch: Instant,
    last_advance: Instant,
    actions: VecDeque<Action>,
    out: Vec<Received>,
    counts: Counts,
}

impl Inbox {
    /// `unix_now` is the wall clock at `now`, in seconds (the cursor ages its entries by it).
    pub fn new(
        me: NodeId,
        key: Option<NetworkKey>,
        heartbeat: HeartbeatConfig,
        mut cursor: Cursor,
        budget_bytes: usize,
        now: Instant,
        unix_now: u64,
    ) -> Inbox {
        cursor.prune(unix_now);
        let mut inbox = Inbox {
            me,
            key,
            budget_bytes: budget_bytes.max(MIN_BUDGET_BYTES),
            heartbeat: Heartbeat::new(heartbeat, now),
            reorder: Reorder::new(ReorderConfig::default()),
            seen: SeenKeys::default(),
            cursor,
            deletes: DeleteQueue::default(),
            deletes_in_flight: 0,
            getting: HashMap::new(),
            probe_latency: None,
            gets_in_flight: 0,
            to_fetch: VecDeque::new(),
            budget_used: 0,
            listing: false,
            list_pages: 0,
            resume_token: None,
            round_resumed: false,
            size_peak: HashMap::new(),
            full_senders: HashSet::new(),
            last_list: None,
            list_wanted: true,
            last_hit: HashMap::new(),
            probes: ProbeSchedule::default(),
            expect_until: None,
            fast_bell_reads: 0,
            found: false,
            bell_etag: None,
            reading_bell: false,
            bell_pending: false,
            bell_oversized: false,
            last_bell_check: None,
            up: false,
            unix_at_epoch: unix_now,
            epoch: now,
            last_advance: now,
            actions: VecDeque::new(),
            out: Vec::new(),
            counts: Counts::default(),
        };
        // Baseline the doorbell before the first LIST, so a ring after that LIST is seen as a
        // change when the node goes idle.
        inbox.bell_pending = true;
        inbox
            .actions
            .push_back(Action::HeadBell(HeadPurpose::Baseline));
        inbox
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn is_idle(&self) -> bool {
        self.heartbeat.is_idle()
    }

    /// The heartbeat's current interval (for the metrics).
    pub fn interval(&self) -> Duration {
        self.heartbeat.interval()
    }

    /// Whether a LIST has answered yet (the tunnel is "up").
    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn budget_in_use(&self) -> usize {
        self.budget_used
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_at_epoch + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// The next thing to do, after the inbox has reacted to everything so far and to `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        if self.actions.is_empty() {
            self.advance(now);
        }
        self.actions.pop_front()
    }

    /// When `poll` next has something to do without any result arriving.
    pub fn next_deadline(&self) -> Option<Instant> {
        let tick = (!self.bell_pending).then(|| self.heartbeat.next().1);
        // Deletes wait while a LIST is in flight (its completion wakes the driver).
        let deletes = (!self.listing)
            .then(|| self.deletes.next_deadline())
            .flatten();
        let probe = self.probe_deadline();
        [tick, self.reorder.next_deadline(), deletes, probe]
            .into_iter()
            .flatten()
            .min()
    }

    fn advance(&mut self, now: Instant) {
        self.last_advance = now;
        self.reorder.expire(now, &mut self.out);
        self.deliver(now);
        self.start_deletes(now);
        if !self.bell_pending {
            let (kind, due) = self.heartbeat.next();
            if now >= due {
                self.tick(kind, now);
            }
        }
        // Known keys first: a probe must not take the budget an object already found needs
        // (held bundles may be waiting for exactly that one).
        self.start_gets(now);
        if !self.heartbeat.is_idle() && self.to_fetch.is_empty() {
            self.probe(now);
        }
    }

    /// One heartbeat tick: a LIST when due and the bell while active, the doorbell when idle.
    fn tick(&mut self, kind: Poll, now: Instant) {
        match kind {
            Poll::List => {
                let found = std::mem::take(&mut self.found);
                let list_due = self.list_wanted
                    || self
                        .last_list
                        .is_none_or(|t| now.saturating_duration_since(t) >= LIST_EVERY);
                if list_due {
                    self.start_list(now);
                }
                let fast = self.fast_bell_reads > 0
                    && self.expect_until.is_some_and(|t| now < t)
                    && !self
                        .last_hit
                        .values()
                        .any(|h| now.saturating_duration_since(*h) < HOT_WITHIN);
                let every = if fast {
                    BELL_EVERY_EXPECTING
                } else {
                    BELL_EVERY_ACTIVE
                };
                let bell_due = self
                    .last_bell_check
                    .is_none_or(|t| now.saturating_duration_since(t) >= every);
                if bell_due && !self.reading_bell {
                    if fast {
                        self.fast_bell_reads -= 1;
                    }
                    self.read_bell(now);
                }
                let was_idle = self.heartbeat.is_idle();
                self.heartbeat.list_done(now, found);
                if !was_idle && self.heartbeat.is_idle() {
                    // Entering idle: baseline the doorbell, then LIST once more. Rings that
                    // came while active were answered by those LISTs and probes; without a
                    // fresh baseline the first idle poll would see them as new. A ring after
                    // the baseline still changes the ETag, and an object PUT before it is seen
                    // by the LIST that follows, so nothing is stranded.
                    self.bell_pending = true;
                    self.actions
                        .push_back(Action::HeadBell(HeadPurpose::Settle));
                }
            }
            Poll::Bell => {
                self.bell_pending = true;
                self.last_bell_check = Some(now);
                self.actions.push_back(Action::ReadBell(BellRead::Poll));
            }
        }
    }

    /// A bell HEAD asked for by `Action::HeadBell(purpose)` answered: its ETag, `None` if there
    /// is no bell.
    pub fn bell_headed(
        &mut self,
        purpose: HeadPurpose,
        etag: Result<Option<String>, S3Error>,
        now: Instant,
    ) {
        self.bell_pending = false;
        // On error keep the old baseline: at worst the first idle poll wakes us once.
        if let Ok(etag) = etag {
            self.bell_etag = etag;
        }
        if purpose == HeadPurpose::Settle {
            self.start_list(now);
        }
    }

    fn read_bell(&mut self, now: Instant) {
        if self.reading_bell {
            return;
        }
        self.reading_bell = true;
        self.last_bell_check = Some(now);
        self.actions.push_back(Action::ReadBell(BellRead::Check));
    }

    /// A bell GET asked for by `Action::ReadBell(read)` answered: its ETag and body, `None` if
    /// there is no bell. A changed bell means a sender started (again) talking to us: its body
    /// names the key it just wrote, so that stream is probed at once. The idle poll also wakes
    /// the node on a change (or on an error: rather a LIST than a missed ring).
    /// The hint is only trusted for its shape: any node may ring any bell, but a probe is just
    /// a GET of a key that IAM lets only the named sender write.
    pub fn bell_read(
        &mut self,
        read: BellRead,
        bell: Result<Option<(String, Bytes)>, S3Error>,
        now: Instant,
    ) {
        let bell = match read {
            BellRead::Check => {
                self.reading_bell = false;
                match bell {
                    Ok(Some(bell)) if self.bell_etag.as_deref() != Some(bell.0.as_str()) => bell,
                    _ => return,
                }
            }
            BellRead::Poll => {
                self.bell_pending = false;
                let (changed, bell) = match bell {
                    Ok(None) => {
                        self.bell_oversized = false;
                        let changed = self.bell_etag.is_some();
                        self.bell_etag = None;
                        (changed, None)
                    }
                    Ok(Some(bell)) => {
                        self.bell_oversized = false;
                        (
                            self.bell_etag.as_deref() != Some(bell.0.as_str()),
                            Some(bell),
                        )
                    }
                    // Not a bell we wrote (any node may ring any bell): a change once, not on
                    // every poll, or one write of it would keep the node LISTing for good.
                    Err(S3Error::TooLarge { .. }) => {
                        (!std::mem::replace(&mut self.bell_oversized, true), None)
                    }
                    // The baseline stays: the next poll that reads the bell compares with it, so
                    // a transient error costs one wake, not two.
                    Err(_) => (true, None),
                };
                if !changed {
                    self.heartbeat.bell_done(now, false);
                    return;
                }
                self.list_wanted = true;
                self.heartbeat.bell_done(now, true);
                // Gone or unreadable: the LIST looks at the inbox.
                let Some(bell) = bell else {
                    return;
                };
                bell
            }
        };
        let (etag, body) = bell;
        self.bell_etag = Some(etag);
        self.list_wanted = true;
        let Some(hint) = std::str::from_utf8(&body)
            .ok()
            .and_then(|k| parse_bundle_key(k.trim(), self.me).ok())
        else {
            return;
        };
        let stream = StreamId {
            sender: hint.sender,
            session: hint.session,
        };
        self.reorder.resume(stream, self.cursor.next(stream), now);
        self.last_hit.insert(stream, now);
        self.probes.named(stream, now);
        if self.heartbeat.is_idle() {
            self.heartbeat.wake(now);
        }
        let key = hint.to_key();
        if !self.getting.contains_key(&key)
            && !self.seen.contains(&key)
            && !self.cursor.delivered(stream, hint.seq)
        {
            self.start_get(key, hint, Lookup::Probe, PROBE_RESERVE, now);
        }
    }

    /// We PUT something: a reply is likely, so look now rather than at the backed-off interval
    /// (idle or not).
    pub fn sent(&mut self, now: Instant) {
        self.heartbeat.hurry(now);
        self.probes.hurry(now);
        if self.expect_until.is_none_or(|t| now >= t) {
            self.fast_bell_reads = FAST_BELL_READS;
        }
        self.expect_until = Some(now + EXPECT_REPLY);
    }

    /// Starts a LIST round, continuing where the previous round stopped (a round follows at most
    /// `MAX_PAGES` pages), so that every key is seen within one pass however large the inbox.
    /// LIST and DeleteObjects never overlap: some servers (s3s-fs) fail a LIST whose walk races
    /// a delete; a LIST that cannot start now is wanted at the next tick.
    fn start_list(&mut self, now: Instant) {
        if self.listing || self.deletes_in_flight > 0 {
            self.list_wanted = true;
            return;
        }
        self.list_wanted = false;
        self.last_list = Some(now);
        self.list_pages = 0;
        let resume = self.resume_token.take();
        self.round_resumed = resume.is_some();
        self.list_page(resume);
    }

    fn list_page(&mut self, continuation: Option<String>) {
        self.listing = true;
        self.list_pages += 1;
        self.actions.push_back(Action::List { continuation });
    }

    /// A LIST page answered: new keys are queued for GET, stale and garbage ones for deletion.
    pub fn listed(&mut self, listing: Result<Listing, S3Error>, now: Instant) {
        self.listing = false;
        let Ok(listing) = listing else {
            return;
        };
        if !self.up {
            self.up = true;
            tracing::info!(address = %self.me, "tunnel up");
        }
        if self.list_pages == 1 && !self.round_resumed && !listing.truncated {
            let listed: HashSet<&str> = listing.objects.iter().map(|o| o.key.as_str()).collect();
            self.seen.retain_listed(&listed);
        }
        let mut new_work = false;
        for obj in &listing.objects {
            if self.getting.contains_key(&obj.key) {
                continue;
            }
            if self.seen.contains(&obj.key) {
                if self.seen.needs_redelete(&obj.key, now, REDELETE_AFTER) {
                    self.deletes.push(obj.key.clone(), now);
                    new_work = true;
                }
                continue;
            }
            let parsed = match parse_bundle_key(&obj.key, self.me) {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(error = %e, "unparsable key in inbox");
                    self.reject(&obj.key, "bad_key", now);
                    new_work = true;
                    continue;
                }
            };
            if obj.size > MAX_BUNDLE_BYTES as u64 {
                let reason = BundleError::Oversized(obj.size as usize).reason();
                self.reject(&obj.key, reason, now);
                new_work = true;
                continue;
            }
            let stream = StreamId {
                sender: parsed.sender,
                session: parsed.session,
            };
            if self.cursor.delivered(stream, parsed.seq) {
                // Delivered before (by this process or before a restart): only delete it.
                self.counts.duplicates += 1;
                self.forget(obj.key.clone(), now);
                new_work = true;
                continue;
            }
            if self.to_fetch.iter().any(|(k, _, _)| k == &obj.key) {
                continue;
            }
            self.to_fetch.push_back((obj.key.clone(), parsed, obj.size));
            new_work = true;
        }
        if new_work {
            self.found = true;
            // Findings while idle (the settling LIST) mean the node is not idle after all.
            if self.heartbeat.is_idle() {
                self.heartbeat.wake(now);
            }
        }
        // Follow pages while they hold no new fetches (so a backlog of stale objects cannot hide
        // new ones); otherwise handle this page's work first, the next round lists again.
        match listing.next {
            Some(token) if self.to_fetch.is_empty() && self.list_pages < MAX_PAGES => {
                self.list_page(Some(token));
            }
            Some(token) => {
                self.resume_token = Some(token);
                self.list_wanted = true;
            }
            None => {}
        }
    }

    /// The streams worth probing now and how deep.
    fn probe_targets(&self, now: Instant) -> Vec<(StreamId, u64, u64)> {
        let expecting = self.expect_until.is_some_and(|t| now < t);
        self.reorder
            .expected()
            .filter_map(|(stream, next)| {
                let hit = self.last_hit.get(&stream);
                if hit.is_none() && !expecting {
                    return None;
                }
                let hot = hit.is_some_and(|h| now.saturating_duration_since(*h) < HOT_WITHIN);
                let full = self.full_senders.contains(&stream);
                let depth = if hot && full { HOT_DEPTH } else { 1 };
                Some((stream, next, depth))
            })
            .collect()
    }

    /// When a backed-off stream may be probed again. Only future instants: a stream that may
    /// be probed now but was not is waiting for a GET or for budget, whose answer wakes the
    /// driver anyway.
    fn probe_deadline(&self) -> Option<Instant> {
        if self.heartbeat.is_idle() {
            return None;
        }
        let backed_off = self
            .reorder
            .expected()
            .filter(|(s, _)| self.last_hit.contains_key(s))
            .filter_map(|(s, _)| self.probes.not_before(s));
        let twins = self.reorder.expected().filter_map(|(stream, next)| {
            let latency = self.probe_latency?;
            if !self.probes.is_eager(stream) {
                return None;
            }
            let key = BundleKey {
                dest: self.me,
                session: stream.session,
                seq: next,
                sender: stream.sender,
            }
            .to_key();
            let f = self.getting.get(&key)?;
            (f.count == 1).then_some(f.latest + latency / 2)
        });
        backed_off
            .chain(twins)
            .filter(|t| *t > self.last_advance)
            .min()
    }

    /// Probes the next key(s) of every stream that found something recently.
    fn probe(&mut self, now: Instant) {
        self.last_hit
            .retain(|_, t| now.saturating_duration_since(*t) < PROBE_WHILE);
        let last_hit = &self.last_hit;
        self.size_peak.retain(|id, _| last_hit.contains_key(id));
        self.full_senders.retain(|id| last_hit.contains_key(id));
        self.probes.retain(|id| last_hit.contains_key(id));
        for (stream, next, depth) in self.probe_targets(now) {
            if !self.probes.may_probe(stream, now) {
                continue;
            }
            // A probe may read at most what it reserved: a larger object answers "too large"
            // from its Content-Length without its body being read, and is then fetched as a
            // known key once the budget has room for its real size.
            let reserve = self
                .size_peak
                .get(&stream)
                .map_or(PROBE_RESERVE, |n| n.saturating_mul(2))
                .clamp(MIN_PROBE_RESERVE, MAX_BUNDLE_BYTES);
            for ahead in 0..depth {
                let parsed = BundleKey {
                    dest: self.me,
                    session: stream.session,
                    seq: next.wrapping_add(ahead),
                    sender: stream.sender,
                };
                let key = parsed.to_key();
                if self.seen.contains(&key) {
                    continue;
                }
                if let Some(f) = self.getting.get(&key) {
                    // An eager stream (a reply is due) keeps a twin probe of its next key, half
                    // a GET after the first: a reply is then found within a quarter of a GET of
                    // landing on average instead of half.
                    let twin_due = self.probe_latency.is_some_and(|l| now >= f.latest + l / 2);
                    if !(ahead == 0 && f.count == 1 && self.probes.is_eager(stream) && twin_due) {
                        continue;
                    }
                }
                if self.gets_in_flight >= GET_CONCURRENCY
                    || self.budget_used + reserve > self.budget_bytes
                {
                    return;
                }
                self.start_get(key, parsed, Lookup::Probe, reserve, now);
            }
        }
    }

    /// Starts GETs of listed keys while the budget and the concurrency limit allow. With nothing
    /// in flight one GET always starts, so a bundle larger than the free budget cannot wedge.
    fn start_gets(&mut self, now: Instant) {
        while let Some((_, _, size)) = self.to_fetch.front() {
            let size = usize::try_from(*size).unwrap_or(MAX_BUNDLE_BYTES);
            let fits = self.budget_used + size <= self.budget_bytes || self.budget_used == 0;
            if self.gets_in_flight >= GET_CONCURRENCY || !fits {
                break;
            }
            let Some((key, parsed, _)) = self.to_fetch.pop_front() else {
                break;
            };
            if self.getting.contains_key(&key) || self.seen.contains(&key) {
                continue;
            }
            self.start_get(key, parsed, Lookup::Known, size, now);
        }
    }

    fn start_get(
        &mut self,
        key: String,
        parsed: BundleKey,
        lookup: Lookup,
        reserved: usize,
        now: Instant,
    ) {
        self.budget_used += reserved;
        self.gets_in_flight += 1;
        let f = self.getting.entry(key.clone()).or_insert(InFlight {
            count: 0,
            latest: now,
        });
        f.count += 1;
        f.latest = now;
        self.actions.push_back(Action::Get(Get {
            key,
            parsed,
            lookup,
            reserved,
            started: now,
        }));
    }

    /// A GET answered.
    pub fn got(&mut self, get: Get, result: Result<Option<Bytes>, S3Error>, now: Instant) {
        self.budget_used = self.budget_used.saturating_sub(get.reserved);
        self.gets_in_flight = self.gets_in_flight.saturating_sub(1);
        if let Some(f) = self.getting.get_mut(&get.key) {
            f.count = f.count.saturating_sub(1);
            if f.count == 0 {
                self.getting.remove(&get.key);
            }
        }
        if get.lookup == Lookup::Probe {
            let took = now.saturating_duration_since(get.started);
            self.probe_latency = Some(match self.probe_latency {
                Some(l) => (l * 3 + took) / 4,
                None => took,
            });
        }
        if self.seen.contains(&get.key) {
            // The twin of an eager probe that already found it.
            return;
        }
        let Get {
            key,
            parsed,
            lookup,
            ..
        } = get;
        let stream = StreamId {
            sender: parsed.sender,
            session: parsed.session,
        };
        let body = match result {
            Ok(Some(b)) => b,
            Ok(None) => {
                match lookup {
                    // Deleted meanwhile (by us earlier, or by the lifecycle rule).
                    Lookup::Known => self.seen.insert(key, now),
                    Lookup::Probe => self.probes.missed(stream, now),
                }
                return;
            }
            Err(S3Error::TooLarge { size, .. })
                if lookup == Lookup::Probe && size <= MAX_BUNDLE_BYTES as u64 =>
            {
                // Exists, larger than the probe reserved: fetch it as a known key, first.
                self.found = true;
                self.to_fetch.push_front((key, parsed, size));
                return;
            }
            Err(S3Error::TooLarge { .. }) => {
                self.reject(&key, "oversized", now);
                return;
            }
            Err(_) => {
                // Counted as an S3 error per attempt (by the store); not marked seen, so the
                // next LIST (or probe) tries again: a 403 on a key that exists is a fault, not
                // "gone".
                return;
            }
        };
        self.found = true;
        self.last_hit.insert(stream, now);
        self.probes.hit(stream, now);
        // A decaying peak, not the last size: a window-limited flow's bundles alternate a whole
        // window and its remainder (3 MB, then 0.2 MB), and twice the last size under-reserved
        // every full one. Its probe then answered "too large" and it was fetched again: one
        // GET more, a GET latency later, on a fresh connection (the unread body closes the old
        // one), for one data bundle in ten in testbed traces.
        let peak = self.size_peak.entry(stream).or_insert(0);
        *peak = body.len().max(*peak - *peak / PEAK_DECAY_PER_FIND);
        let decoded = bundle::decode(&body, self.key.as_ref()).and_then(|b| {
            if b.header.sender != parsed.sender {
                Err(BundleError::SenderMismatch {
                    header: b.header.sender,
                    key: parsed.sender,
                })
            } else if b.header.dest != self.me {
                Err(BundleError::WrongDestination {
                    header: b.header.dest,
                    us: self.me,
                })
            } else {
                Ok(b)
            }
        });
        let b = match decoded {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(key, error = %e, "rejected bundle");
                self.reject(&key, e.reason(), now);
                return;
            }
        };
        if b.header.session != parsed.session || b.header.seq != parsed.seq {
            // A bundle replayed under another key of the same sender: the key decides where
            // it sits in the stream, so both must agree.
            tracing::debug!(key, "bundle header session/seq differ from its key");
            self.reject(&key, "key_mismatch", now);
            return;
        }
        if self.cursor.delivered(stream, parsed.seq) {
            self.counts.duplicates += 1;
            self.forget(key, now);
            return;
        }
        self.seen.insert(key.clone(), now);
        self.reorder.resume(stream, self.cursor.next(stream), now);
        // With a network key the packets live in the decrypted plaintext, not in the object.
        let more = b.header.more;
        if more {
            self.full_senders.insert(stream);
        } else {
            self.full_senders.remove(&stream);
        }
        let (body, packets) = b.into_parts(body);
        let len = body.len();
        let item = Received {
            key: key.clone(),
            stream,
            seq: parsed.seq,
            body,
            packets,
            more,
        };
        match self
            .reorder
            .offer(stream, parsed.seq, item, now, &mut self.out)
        {
            Offer::Duplicate => self.forget(key, now),
            Offer::Delivered | Offer::Held => self.budget_used += len,
        }
        self.deliver(now);
    }

    /// Advances the cursor for what the reorder buffer released and hands the bundles out.
    fn deliver(&mut self, now: Instant) {
        let stats = self.reorder.take_stats();
        self.counts.skipped += stats.skipped;
        self.counts.duplicates += stats.duplicates;
        if self.out.is_empty() {
            return;
        }
        let unix = self.unix(now);
        for r in &self.out {
            self.cursor.advance(r.stream, r.seq, unix);
            self.deletes.push(r.key.clone(), now);
        }
        let bundles = std::mem::take(&mut self.out);
        self.actions.push_back(Action::Deliver {
            bundles,
            cursor_changed: self.cursor.take_dirty(),
        });
    }

    /// The driver wrote (or dropped) a delivered bundle of `bytes`: they leave the budget.
    pub fn written(&mut self, bytes: usize) {
        self.budget_used = self.budget_used.saturating_sub(bytes);
    }

    fn start_deletes(&mut self, now: Instant) {
        if self.listing {
            return;
        }
        while let Some(batch) = self.deletes.next_batch(now) {
            self.deletes_in_flight += 1;
            self.actions.push_back(Action::Delete(batch));
        }
    }

    /// A DeleteObjects answered: the keys it could not delete (a later LIST deletes them again).
    pub fn deleted(&mut self, result: Result<Vec<String>, S3Error>) {
        self.deletes_in_flight = self.deletes_in_flight.saturating_sub(1);
        self.deletes.batch_done();
        if let Ok(failed) = result
            && !failed.is_empty()
        {
            tracing::debug!(
                failed = failed.len(),
                "DeleteObjects left keys behind; a later LIST deletes them again"
            );
        }
    }

    /// Shutdown: every queued delete, regardless of its delay.
    pub fn drain_deletes(&mut self) -> Vec<Vec<String>> {
        let far = self.epoch + Duration::from_secs(10 * 365 * 24 * 3600);
        let mut batches = Vec::new();
        while let Some(batch) = self.deletes.next_batch(far) {
            batches.push(batch);
            self.deletes.batch_done();
        }
        batches
    }

    fn reject(&mut self, key: &str, reason: &'static str, now: Instant) {
        self.counts.rejected.push(reason);
        self.forget(key.to_string(), now);
    }

    /// Marks `key` taken and queues its deletion.
    fn forget(&mut self, key: String, now: Instant) {
        self.seen.insert(key.clone(), now);
        if !self.deletes.push(key, now) {
            tracing::debug!("delete queue full; the key is deleted after a later LIST");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Listed;
    use crate::wire::bundle::{BundleHeader, BundleWriter};

    const ME: NodeId = NodeId(0xb);
    const PEER: NodeId = NodeId(0xa);
    const OTHER: NodeId = NodeId(0xc);
    const SESSION: u64 = 7;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn key_of(sender: NodeId, seq: u64) -> BundleKey {
        BundleKey {
            dest: ME,
            session: SESSION,
            seq,
            sender,
        }
    }

    /// A bundle of `sender`'s stream at `seq` with one packet of `payload` bytes.
    fn bundle_of(sender: NodeId, seq: u64, payload: usize) -> Bytes {
        bundle_with(sender, seq, payload, false)
    }

    fn bundle_with(sender: NodeId, seq: u64, payload: usize, more: bool) -> Bytes {
        bundle_packets(sender, seq, payload, 1, more)
    }

    /// A bundle of `sender`'s stream at `seq` with `packets` packets of `payload` bytes each.
    fn bundle_packets(
        sender: NodeId,
        seq: u64,
        payload: usize,
        packets: usize,
        more: bool,
    ) -> Bytes {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        let mut w = BundleWriter::new();
        for _ in 0..packets {
            w.push(&p);
        }
        let header = BundleHeader {
            sender,
            dest: ME,
            session: SESSION,
            seq,
            more,
        };
        Bytes::from(w.finish(&header, None))
    }

    fn listing(keys: &[(String, u64)]) -> Listing {
        Listing {
            objects: keys
                .iter()
                .map(|(key, size)| Listed {
                    key: key.clone(),
                    size: *size,
                })
                .collect(),
            truncated: false,
            next: None,
        }
    }

    fn all(inbox: &mut Inbox, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| inbox.poll(now)).collect()
    }

    /// An inbox past its start: the bell baselined, the first LIST answered with `listed`.
    fn started(listed: Listing, cursor: Cursor) -> (Inbox, Instant, Vec<Action>) {
        let t = Instant::now();
        let mut inbox = Inbox::new(
            ME,
            None,
            HeartbeatConfig::default(),
            cursor,
            DEFAULT_BUDGET_BYTES,
            t,
            1_000_000,
        );
        let first = all(&mut inbox, t);
        assert!(
            matches!(first[..], [Action::HeadBell(HeadPurpose::Baseline)]),
            "{first:?}"
        );
        inbox.bell_headed(HeadPurpose::Baseline, Ok(None), t);
        let actions = all(&mut inbox, t);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::List { continuation: None })),
            "{actions:?}"
        );
        // The first tick also checks the bell: no bell yet.
        for a in actions {
            if let Action::ReadBell(r) = a {
                inbox.bell_read(r, Ok(None), t);
            }
        }
        inbox.listed(Ok(listed), t);
        let actions = all(&mut inbox, t);
        (inbox, t, actions)
    }

    fn gets(actions: &[Action]) -> Vec<Get> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Get(g) => Some(g.clone()),
                _ => None,
            })
            .collect()
    }

    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { bundles, .. } => Some(bundles.iter().map(|b| b.seq)),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn listed_keys_are_fetched_as_known_and_delivered_in_order_with_the_cursor_persisted() {
        let keys: Vec<(String, u64)> = (0..2)
            .map(|s| {
                (
                    key_of(PEER, s).to_key(),
                    bundle_of(PEER, s, 10).len() as u64,
                )
            })
            .collect();
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        let g = gets(&actions);
        assert_eq!(g.len(), 2);
        assert!(g.iter().all(|g| g.lookup == Lookup::Known));
        // The second answers first: held until the first arrives.
        inbox.got(g[1].clone(), Ok(Some(bundle_of(PEER, 1, 10))), t + ms(1));
        assert!(delivered(&all(&mut inbox, t + ms(1))).is_empty());
        inbox.got(g[0].clone(), Ok(Some(bundle_of(PEER, 0, 10))), t + ms(2));
        let actions = all(&mut inbox, t + ms(2));
        assert_eq!(delivered(&actions), [0, 1]);
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Deliver {
                cursor_changed: true,
                ..
            }
        )));
        let stream = StreamId {
            sender: PEER,
            session: SESSION,
        };
        assert!(inbox.cursor().delivered(stream, 1));
    }

    #[test]
    fn delivered_keys_are_deleted_in_one_batch_after_the_delay() {
        let keys: Vec<(String, u64)> = (0..3).map(|s| (key_of(PEER, s).to_key(), 100)).collect();
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        for (i, g) in gets(&actions).into_iter().enumerate() {
            inbox.got(g, Ok(Some(bundle_of(PEER, i as u64, 10))), t);
        }
        let soon = all(&mut inbox, t + ms(1));
        assert!(!soon.iter().any(|a| matches!(a, Action::Delete(_))));
        let later = all(&mut inbox, t + Duration::from_secs(2));
        let batches: Vec<&Vec<String>> = later
            .iter()
            .filter_map(|a| match a {
                Action::Delete(b) => Some(b),
                _ => None,
            })
            .collect();
        assert_eq!(batches.len(), 1, "{later:?}");
        assert_eq!(batches[0].len(), 3);
    }

    #[test]
    fn after_a_find_the_streams_next_key_is_probed_and_a_miss_spaces_the_next_probe() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        inbox.got(
            gets(&actions)[0].clone(),
            Ok(Some(bundle_of(PEER, 0, 10))),
            t,
        );
        let probes = gets(&all(&mut inbox, t));
        assert_eq!(
            probes.len(),
            1,
            "a small-bundle stream is probed one key ahead"
        );
        assert_eq!(probes[0].lookup, Lookup::Probe);
        assert_eq!(probes[0].key, key_of(PEER, 1).to_key());
        inbox.got(probes[0].clone(), Ok(None), t + ms(1));
        assert!(
            gets(&all(&mut inbox, t + ms(2))).is_empty(),
            "spaced after a miss"
        );
        let again = gets(&all(&mut inbox, t + ms(6)));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].key, key_of(PEER, 1).to_key());
    }

    #[test]
    fn a_probe_after_a_small_bundle_still_reserves_room_for_the_streams_recent_large_one() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, mut t, actions) = started(listing(&keys), Cursor::default());
        let large = bundle_packets(PEER, 0, 60_000, 50, false);
        assert!(large.len() > 2_900_000);
        inbox.got(gets(&actions)[0].clone(), Ok(Some(large.clone())), t);
        // A window, then its remainder: the next window must not be refused as "too large".
        let mut probe = gets(&all(&mut inbox, t));
        inbox.got(
            probe[0].clone(),
            Ok(Some(bundle_of(PEER, 1, 10))),
            t + ms(1),
        );
        t += ms(1);
        probe = gets(&all(&mut inbox, t));
        assert_eq!(probe[0].key, key_of(PEER, 2).to_key());
        assert!(
            probe[0].reserved >= large.len(),
            "reserves {} for a stream that just sent {}",
            probe[0].reserved,
            large.len()
        );
        // The peak decays: a stream that stays small stops reserving megabytes.
        for seq in 2..60 {
            assert_eq!(probe[0].key, key_of(PEER, seq).to_key());
            inbox.got(probe[0].clone(), Ok(Some(bundle_of(PEER, seq, 10))), t);
            t += ms(300);
            probe = gets(&all(&mut inbox, t));
        }
        assert!(
            probe[0].reserved <= MIN_PROBE_RESERVE,
            "{}",
            probe[0].reserved
        );
    }

    #[test]
    fn a_stream_whose_bundle_was_sealed_full_is_probed_two_keys_ahead() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        inbox.got(
            gets(&actions)[0].clone(),
            Ok(Some(bundle_with(PEER, 0, 1_000, true))),
            t,
        );
        let actions = all(&mut inbox, t);
        let more: Vec<bool> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { bundles, .. } => Some(bundles.iter().map(|b| b.more)),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(more, [true], "the egress learns that more follows");
        let probed: Vec<String> = gets(&actions).into_iter().map(|g| g.key).collect();
        assert_eq!(
            probed,
            [key_of(PEER, 1).to_key(), key_of(PEER, 2).to_key()],
            "its sender has more PUTs in flight"
        );
        // Its next bundle was not full: one key ahead again (however large it was).
        let g = gets(&actions);
        inbox.got(
            g[0].clone(),
            Ok(Some(bundle_with(PEER, 1, 60_000, false))),
            t + ms(1),
        );
        inbox.got(g[1].clone(), Ok(None), t + ms(1));
        let probed: Vec<String> = gets(&all(&mut inbox, t + ms(50)))
            .into_iter()
            .map(|g| g.key)
            .collect();
        assert_eq!(probed, [key_of(PEER, 2).to_key()]);
    }

    #[test]
    fn after_a_put_of_ours_a_quiet_streams_next_key_gets_a_twin_probe_half_a_get_later() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        inbox.got(
            gets(&actions)[0].clone(),
            Ok(Some(bundle_of(PEER, 0, 10))),
            t,
        );
        // One probe, answered after 10 ms: the probe latency.
        let first = gets(&all(&mut inbox, t));
        inbox.got(first[0].clone(), Ok(None), t + ms(10));
        // Long quiet, then we send: the stream is eager.
        let later = t + Duration::from_secs(1);
        inbox.sent(later);
        let probe = gets(&all(&mut inbox, later));
        assert_eq!(probe.len(), 1, "{probe:?}");
        assert!(gets(&all(&mut inbox, later + ms(4))).is_empty());
        assert_eq!(inbox.next_deadline(), Some(later + ms(5)));
        let twin = gets(&all(&mut inbox, later + ms(5)));
        assert_eq!(twin.len(), 1);
        assert_eq!(twin[0].key, probe[0].key);
        // The first finds it; the twin's answer is then dropped quietly.
        inbox.got(
            probe[0].clone(),
            Ok(Some(bundle_of(PEER, 1, 10))),
            later + ms(9),
        );
        assert_eq!(delivered(&all(&mut inbox, later + ms(9))), [1]);
        inbox.got(
            twin[0].clone(),
            Ok(Some(bundle_of(PEER, 1, 10))),
            later + ms(14),
        );
        let _ = all(&mut inbox, later + ms(14));
        assert_eq!(inbox.take_counts(), Counts::default());
    }

    #[test]
    fn a_backlog_is_fetched_only_within_the_byte_budget() {
        let big = 4 * 1024 * 1024u64;
        let keys: Vec<(String, u64)> = (0..50).map(|s| (key_of(PEER, s).to_key(), big)).collect();
        let (inbox, _, actions) = started(listing(&keys), Cursor::default());
        let g = gets(&actions);
        let reserved: usize = g.iter().map(|g| g.reserved).sum();
        assert!(reserved <= DEFAULT_BUDGET_BYTES, "{reserved}");
        assert_eq!(g.len(), DEFAULT_BUDGET_BYTES / big as usize);
        assert_eq!(inbox.budget_in_use(), reserved);
    }

    #[test]
    fn a_failed_get_of_a_known_key_is_not_taken_as_gone_and_the_next_list_fetches_it_again() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        let denied = S3Error::Request {
            op: "GET",
            key: keys[0].0.clone(),
            message: "AccessDenied".into(),
            code: Some("AccessDenied".into()),
            status: Some(403),
            retryable: false,
        };
        inbox.got(gets(&actions)[0].clone(), Err(denied), t);
        let _ = all(&mut inbox, t);
        inbox.listed(Ok(listing(&keys)), t + ms(1));
        let again = gets(&all(&mut inbox, t + ms(1)));
        assert!(
            again
                .iter()
                .any(|g| g.key == keys[0].0 && g.lookup == Lookup::Known),
            "{again:?}"
        );
    }

    #[test]
    fn objects_at_or_below_the_cursor_are_deleted_unread_and_counted() {
        let stream = StreamId {
            sender: PEER,
            session: SESSION,
        };
        let mut cursor = Cursor::default();
        cursor.advance(stream, 4, 1_000_000);
        let keys = vec![
            (key_of(PEER, 3).to_key(), 100),
            (key_of(PEER, 4).to_key(), 100),
            (key_of(PEER, 5).to_key(), 100),
        ];
        let (mut inbox, t, actions) = started(listing(&keys), cursor);
        let g = gets(&actions);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].key, keys[2].0);
        assert_eq!(inbox.take_counts().duplicates, 2);
        let later = all(&mut inbox, t + Duration::from_secs(2));
        let deleted: Vec<&String> = later
            .iter()
            .filter_map(|a| match a {
                Action::Delete(b) => Some(b.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(deleted, [&keys[0].0, &keys[1].0]);
    }

    #[test]
    fn garbage_and_forged_objects_are_rejected_and_deleted() {
        let forged = bundle_of(OTHER, 0, 10); // says OTHER, under PEER's key
        let keys = vec![
            ("v2/inbox/000000000000000b/garbage".to_string(), 10),
            (key_of(PEER, 0).to_key(), forged.len() as u64),
        ];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        let g = gets(&actions);
        assert_eq!(g.len(), 1);
        inbox.got(g[0].clone(), Ok(Some(forged)), t);
        let _ = all(&mut inbox, t);
        let mut rejected = inbox.take_counts().rejected;
        rejected.sort_unstable();
        assert_eq!(rejected, ["bad_key", "sender_mismatch"]);
        assert!(delivered(&all(&mut inbox, t + Duration::from_secs(2))).is_empty());
    }

    /// Answers every request with "nothing there" until the inbox goes idle; returns the time.
    fn idled(inbox: &mut Inbox, t: Instant) -> Instant {
        idled_with_bell(inbox, t, None)
    }

    /// As `idled`, with the bell (ETag and body) answered as `bell`.
    fn idled_with_bell(inbox: &mut Inbox, t: Instant, bell: Option<(String, Bytes)>) -> Instant {
        // Nothing found for longer than IDLE_AFTER: the inbox goes idle (settling HEAD + LIST).
        let mut now = t;
        let mut pending = true;
        while !inbox.is_idle() || pending {
            now += ms(100);
            let actions = all(inbox, now);
            // Settling answers with a LIST of its own: idle once that is answered too.
            pending = !actions.is_empty();
            for a in actions {
                match a {
                    Action::HeadBell(p) => {
                        inbox.bell_headed(p, Ok(bell.as_ref().map(|b| b.0.clone())), now)
                    }
                    Action::List { .. } => inbox.listed(Ok(listing(&[])), now),
                    Action::ReadBell(r) => inbox.bell_read(r, Ok(bell.clone()), now),
                    Action::Get(g) => inbox.got(g, Ok(None), now),
                    _ => {}
                }
            }
            assert!(now < t + Duration::from_secs(60), "never went idle");
        }
        now
    }

    /// Runs an idle inbox to its next bell poll, which must be its only action; returns when.
    fn next_idle_poll(inbox: &mut Inbox) -> Instant {
        let due = inbox.next_deadline().expect("an idle inbox polls its bell");
        let actions = all(inbox, due);
        assert!(
            matches!(actions[..], [Action::ReadBell(BellRead::Poll)]),
            "{actions:?}"
        );
        due
    }

    #[test]
    fn a_put_of_ours_makes_an_idle_inbox_look_at_once() {
        let keys = vec![(key_of(PEER, 0).to_key(), 100)];
        let (mut inbox, t, actions) = started(listing(&keys), Cursor::default());
        inbox.got(
            gets(&actions)[0].clone(),
            Ok(Some(bundle_of(PEER, 0, 10))),
            t,
        );
        let now = idled(&mut inbox, t);
        let deadline = inbox.next_deadline().expect("an idle inbox polls its bell");
        assert!(deadline > now + ms(100));
        // A reply to our PUT would come as the peer's next bundle: probed now, not at the poll.
        inbox.sent(now);
        assert!(!inbox.is_idle());
        let probed: Vec<String> = gets(&all(&mut inbox, now))
            .into_iter()
            .map(|g| g.key)
            .collect();
        assert_eq!(probed, [key_of(PEER, 1).to_key()]);
    }

    #[test]
    fn an_idle_inbox_polls_by_reading_its_bell_and_a_ring_is_probed_without_a_second_read() {
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        let idle = idled(&mut inbox, t);
        // Unchanged (still no bell): one GET per idle poll, nothing else.
        let due = next_idle_poll(&mut inbox);
        inbox.bell_read(BellRead::Poll, Ok(None), due);
        assert!(inbox.is_idle());
        assert!(all(&mut inbox, due).is_empty());
        assert!(inbox.next_deadline().expect("polls again") >= due + ms(900));
        assert!(due > idle);
        // A sender rang it after writing its bundle 0: the answer to that same poll wakes the
        // node and probes exactly that key, with no further bell request before it.
        let due = next_idle_poll(&mut inbox);
        let rung = key_of(PEER, 0).to_key();
        inbox.bell_read(
            BellRead::Poll,
            Ok(Some(("\"e1\"".to_string(), Bytes::from(rung.clone())))),
            due,
        );
        assert!(!inbox.is_idle());
        let actions = all(&mut inbox, due);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::ReadBell(_))),
            "{actions:?}"
        );
        let probed: Vec<String> = gets(&actions).into_iter().map(|g| g.key).collect();
        assert_eq!(probed, [rung]);
        assert!(
            actions.iter().any(|a| matches!(a, Action::List { .. })),
            "a ring also LISTs (new streams): {actions:?}"
        );
    }

    #[test]
    fn an_idle_poll_that_fails_wakes_the_inbox_rather_than_miss_a_ring() {
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        idled(&mut inbox, t);
        let due = next_idle_poll(&mut inbox);
        let unavailable = S3Error::Request {
            op: "GET",
            key: "bell".into(),
            message: "503 Service Unavailable".into(),
            code: Some("ServiceUnavailable".into()),
            status: Some(503),
            retryable: true,
        };
        inbox.bell_read(BellRead::Poll, Err(unavailable), due);
        assert!(!inbox.is_idle());
        let actions = all(&mut inbox, due);
        assert!(
            actions.iter().any(|a| matches!(a, Action::List { .. })),
            "{actions:?}"
        );
    }

    #[test]
    fn a_failed_idle_poll_keeps_the_bells_baseline_so_an_unchanged_bell_wakes_nothing_more() {
        let bell = Some(("\"e1\"".to_string(), Bytes::from_static(b"not a key")));
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        idled_with_bell(&mut inbox, t, bell.clone());
        let due = next_idle_poll(&mut inbox);
        let unavailable = S3Error::Request {
            op: "GET",
            key: "bell".into(),
            message: "connection reset".into(),
            code: None,
            status: None,
            retryable: true,
        };
        inbox.bell_read(BellRead::Poll, Err(unavailable), due);
        for a in all(&mut inbox, due) {
            if let Action::List { .. } = a {
                inbox.listed(Ok(listing(&[])), due);
            }
        }
        // Until the next periodic LIST (LIST_EVERY after the wake's), the only LIST would be one
        // wanted because the bell changed. The bell check reads the same bell as before the
        // error, so there is none.
        let mut now = due;
        let mut checked = false;
        while let Some(next) = inbox.next_deadline().filter(|d| *d < due + LIST_EVERY) {
            now = next.max(now + ms(1));
            for a in all(&mut inbox, now) {
                match a {
                    Action::ReadBell(BellRead::Check) => {
                        inbox.bell_read(BellRead::Check, Ok(bell.clone()), now);
                        checked = true;
                    }
                    Action::List { .. } => panic!("a LIST {:?} after the wake", now - due),
                    Action::Get(g) => inbox.got(g, Ok(None), now),
                    _ => {}
                }
            }
        }
        assert!(checked, "an active inbox checks its bell");
    }

    #[test]
    fn an_oversized_bell_wakes_an_idle_inbox_once_not_on_every_poll() {
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        let oversized = || S3Error::TooLarge {
            key: "bell".into(),
            size: 5_000,
            limit: BELL_MAX_BYTES,
        };
        idled(&mut inbox, t);
        let mut wakes = 0;
        for _ in 0..3 {
            let now = next_idle_poll(&mut inbox);
            inbox.bell_read(BellRead::Poll, Err(oversized()), now);
            if !inbox.is_idle() {
                wakes += 1;
                idled(&mut inbox, now);
            }
        }
        assert_eq!(wakes, 1);
    }

    /// Runs an active inbox with nothing in it from `from` to `until`, calling `sent` at each of
    /// `sends`, and returns when it checked its bell.
    fn bell_checks(
        inbox: &mut Inbox,
        from: Instant,
        until: Instant,
        sends: &[Instant],
    ) -> Vec<Instant> {
        let mut checks = Vec::new();
        let mut pending: Vec<Instant> = sends.to_vec();
        let mut now = from;
        while now < until {
            while pending.first().is_some_and(|s| *s <= now) {
                inbox.sent(pending.remove(0));
            }
            for a in all(inbox, now) {
                match a {
                    Action::ReadBell(r) => {
                        if r == BellRead::Check {
                            checks.push(now);
                        }
                        inbox.bell_read(r, Ok(None), now);
                    }
                    Action::List { .. } => inbox.listed(Ok(listing(&[])), now),
                    Action::HeadBell(p) => inbox.bell_headed(p, Ok(None), now),
                    Action::Get(g) => inbox.got(g, Ok(None), now),
                    _ => {}
                }
            }
            let next = [inbox.next_deadline(), pending.first().copied()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until);
            now = next.max(now + ms(1));
        }
        checks
    }

    #[test]
    fn a_put_that_starts_an_exchange_reads_the_bell_soon_so_a_reply_in_a_new_stream_is_found_fast()
    {
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        // The start read the bell at `t`; a PUT of ours 100 ms later starts an exchange.
        let sent = t + ms(100);
        let checks = bell_checks(&mut inbox, t + ms(1), sent + ms(450), &[sent]);
        let soon = checks
            .iter()
            .filter(|c| **c > sent && **c <= sent + ms(300))
            .count();
        assert!(
            soon >= 2,
            "bell checks after the PUT: {:?}",
            checks.iter().map(|c| *c - sent).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_one_way_flow_pays_for_fast_bell_reads_once_per_exchange() {
        let (mut inbox, t, _) = started(listing(&[]), Cursor::default());
        // A PUT every 100 ms for 4 s: one exchange, never a reply.
        let sends: Vec<Instant> = (1..=40).map(|i| t + ms(100 * i)).collect();
        let checks = bell_checks(&mut inbox, t + ms(1), t + ms(4_100), &sends);
        // FAST_BELL_READS, then one per BELL_EVERY_ACTIVE (8 in 4 s), and a spare.
        let most = FAST_BELL_READS as usize + 8 + 1;
        assert!(
            checks.len() <= most,
            "{} bell checks: {:?}",
            checks.len(),
            checks.iter().map(|c| *c - t).collect::<Vec<_>>()
        );
        assert!(
            checks.len() > 8,
            "the fast reads happened: {}",
            checks.len()
        );
    }
}
