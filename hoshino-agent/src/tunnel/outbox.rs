//! The send side of the tunnel as a sans-IO state machine (as quinn-proto's connection): packets
//! and PUT completions go in with `now`, actions come out (PUT this body under this key, ring
//! this bell). It owns the `Bundler` (batching, pacing) and the `BellSchedule`, and decides the
//! skip marker after a PUT the store gave up on. `egress.rs` only performs the actions.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::node_addr::NodeId;
use crate::tunnel::bundler::{Bundler, BundlerError, Sealed};
use crate::wire::mailbox::{BellSchedule, BundleKey, bell_key};

/// Names one PUT the driver performs; its completion is reported with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PutId(u64);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// PUT `body` under `key`, then report `put_done(id, ok)`.
    Put { id: PutId, key: String, body: Bytes },
    /// PUT `body` (the key just written: a hint naming the stream) to a destination's bell;
    /// no completion is reported.
    Ring { key: String, body: Bytes },
}

/// What a finished PUT means for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bundle is in the destination's inbox; `expects_answer`: one of its packets may draw
    /// an answer, so the receive side should look for one.
    Sent {
        packets: u32,
        packet_bytes: u64,
        expects_answer: bool,
    },
    /// The bundle was given up; its skip marker was written (or tried) under the same key.
    Dropped { packets: u32 },
}

#[derive(Debug)]
struct InFlight {
    dest: NodeId,
    key: String,
    body_len: usize,
    packets: u32,
    packet_bytes: u64,
    started: Instant,
    /// The first bundle of its stream (seq 0): its receiver learns of the stream by the bell.
    opens_stream: bool,
    /// The skip marker to write if the bundle's PUT fails; `None` once it is being written.
    skip: Option<Bytes>,
    expects_answer: bool,
}

#[derive(Debug)]
pub struct Outbox {
    bundler: Bundler,
    bells: BellSchedule,
    me: NodeId,
    in_flight: HashMap<PutId, InFlight>,
    /// Actions decided on a completion, handed out by the next `poll`.
    queued: VecDeque<Action>,
    next_id: u64,
}

impl Outbox {
    pub fn new(bundler: Bundler, me: NodeId) -> Outbox {
        Outbox {
            bundler,
            bells: BellSchedule::default(),
            me,
            in_flight: HashMap::new(),
            queued: VecDeque::new(),
            next_id: 0,
        }
    }

    /// A bundle of `bytes` from `peer` was delivered to the local stack (see `Bundler::heard`).
    pub fn heard(&mut self, peer: NodeId, bytes: usize, more: bool, now: Instant) {
        self.bundler.heard(peer, bytes, more, now);
    }

    /// A packet for `dest` (already classified); `answered`: it may draw an answer.
    pub fn packet(
        &mut self,
        dest: NodeId,
        packet: &[u8],
        now: Instant,
        answered: bool,
    ) -> Result<(), BundlerError> {
        self.bundler.push_packet(dest, packet, now, answered)
    }

    /// The next action due at `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        if let Some(a) = self.queued.pop_front() {
            return Some(a);
        }
        let sealed = self.bundler.next_put(now)?;
        Some(self.start_put(sealed, now))
    }

    fn start_put(&mut self, s: Sealed, now: Instant) -> Action {
        let key = BundleKey {
            dest: s.dest,
            session: s.session,
            seq: s.seq,
            sender: self.me,
        }
        .to_key();
        let skip = Bytes::from(self.bundler.skip_marker(s.dest, s.session, s.seq));
        tracing::debug!(
            key,
            bytes = s.body.len(),
            packets = s.packets,
            "bundle sealed"
        );
        let id = PutId(self.next_id);
        self.next_id += 1;
        self.in_flight.insert(
            id,
            InFlight {
                dest: s.dest,
                key: key.clone(),
                body_len: s.body.len(),
                packets: s.packets,
                packet_bytes: s.packet_bytes,
                started: now,
                opens_stream: s.seq == 0,
                skip: Some(skip),
                expects_answer: s.expects_answer,
            },
        );
        Action::Put {
            id,
            key,
            body: Bytes::from(s.body),
        }
    }

    /// A PUT finished. A failed bundle PUT (the store's retries are spent) is followed by its
    /// skip marker under the same key, so the receiver moves on at once; if even that fails the
    /// receiver's gap timeout is the safety net. Returns `None` for an unknown id and while the
    /// skip marker is still to be written.
    pub fn put_done(&mut self, id: PutId, ok: bool, now: Instant) -> Option<Outcome> {
        let put = self.in_flight.get_mut(&id)?;
        if !ok && let Some(skip) = put.skip.take() {
            self.queued.push_back(Action::Put {
                id,
                key: put.key.clone(),
                body: skip,
            });
            return None;
        }
        let put = self.in_flight.remove(&id)?;
        tracing::debug!(
            key = put.key,
            bytes = put.body_len,
            ok,
            took_us = u64::try_from(now.saturating_duration_since(put.started).as_micros())
                .unwrap_or(u64::MAX),
            "bundle put done"
        );
        self.bundler.put_done(put.dest, put.body_len);
        if put.skip.is_none() {
            // This was the skip marker (whatever its result): the bundle is dropped.
            return Some(Outcome::Dropped {
                packets: put.packets,
            });
        }
        self.bells.prune(now);
        // A stream opened again after its destination was forgotten rings too, however recently
        // the old one rang: its receiver may be idle, and no probe knows the new session.
        let due = self.bells.put_succeeded(put.dest, put.started, now);
        if due || put.opens_stream {
            // Every ring names another seq, so the bell's ETag changes.
            self.queued.push_back(Action::Ring {
                key: bell_key(put.dest),
                body: Bytes::from(put.key),
            });
        }
        self.bundler
            .put_succeeded(put.dest, now.saturating_duration_since(put.started), now);
        Some(Outcome::Sent {
            packets: put.packets,
            packet_bytes: put.packet_bytes,
            expects_answer: put.expects_answer,
        })
    }

    /// When `poll` next has something without a new event (a bundle reaches its age).
    /// (The driver drains `poll` before it waits, so queued actions never need a deadline.)
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.bundler.next_deadline(now)
    }

    /// Shutdown: seal every open bundle so `poll` hands them all out, and let each
    /// destination's first bundle from here ring again, so its receiver finds the last
    /// bundles at once.
    pub fn seal_all(&mut self) {
        self.bundler.seal_all();
        self.bells = BellSchedule::default();
    }

    pub fn buffered_bytes(&self) -> usize {
        self.bundler.buffered_bytes()
    }

    pub fn puts_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::bundler::BundlerConfig;
    use crate::wire::bundle::decode;
    use crate::wire::mailbox::parse_bundle_key;
    use std::time::Duration;

    const ME: NodeId = NodeId(1);
    const DEST: NodeId = NodeId(2);
    const SESSION: u64 = 77;

    fn pkt(n: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + n];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(n as u16).to_be_bytes());
        p
    }

    fn outbox() -> Outbox {
        Outbox::new(
            Bundler::new(BundlerConfig::default(), ME, SESSION, None),
            ME,
        )
    }

    fn key(seq: u64) -> String {
        BundleKey {
            dest: DEST,
            session: SESSION,
            seq,
            sender: ME,
        }
        .to_key()
    }

    /// Pushes one packet and returns the PUT action it becomes.
    fn put_one(o: &mut Outbox, t: Instant) -> (PutId, String, Bytes) {
        o.packet(DEST, &pkt(10), t, true).unwrap();
        match o.poll(t) {
            Some(Action::Put { id, key, body }) => (id, key, body),
            other => panic!("expected a PUT, got {other:?}"),
        }
    }

    #[test]
    fn a_bundle_expects_an_answer_when_any_of_its_packets_draws_one() {
        let t = Instant::now();
        for (answered, expected) in [(&[false, false][..], false), (&[false, true, false], true)] {
            let mut o = outbox();
            for a in answered {
                o.packet(DEST, &pkt(10), t, *a).unwrap();
            }
            let Some(Action::Put { id, .. }) = o.poll(t) else {
                panic!("expected a PUT");
            };
            match o.put_done(id, true, t + Duration::from_millis(20)) {
                Some(Outcome::Sent { expects_answer, .. }) => {
                    assert_eq!(expects_answer, expected, "{answered:?}");
                }
                other => panic!("expected Sent, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_bundle_is_put_under_the_streams_predictable_key() {
        let mut o = outbox();
        let t = Instant::now();
        let (_, k0, body) = put_one(&mut o, t);
        assert_eq!(k0, key(0));
        assert_eq!(decode(&body, None).unwrap().header.seq, 0);
        assert_eq!(o.poll(t), None);
    }

    #[test]
    fn the_first_successful_put_rings_the_bell_naming_its_key_and_the_next_does_not() {
        let mut o = outbox();
        let t = Instant::now();
        let (id, k0, _) = put_one(&mut o, t);
        let done = t + Duration::from_millis(20);
        assert_eq!(
            o.put_done(id, true, done),
            Some(Outcome::Sent {
                packets: 1,
                packet_bytes: 50,
                expects_answer: true,
            })
        );
        assert_eq!(
            o.poll(done),
            Some(Action::Ring {
                key: bell_key(DEST),
                body: Bytes::from(k0)
            })
        );
        let later = done + Duration::from_secs(1);
        let (id, k1, _) = put_one(&mut o, later);
        assert_eq!(k1, key(1));
        assert!(matches!(
            o.put_done(id, true, later),
            Some(Outcome::Sent { .. })
        ));
        assert_eq!(o.poll(later), None, "rang again within the ring window");
    }

    /// Sends one packet to `dest` at `t` through its PUT; returns the key and whether it rang.
    fn send_to(o: &mut Outbox, dest: NodeId, t: Instant) -> (String, bool) {
        o.packet(dest, &pkt(10), t, true).unwrap();
        let Some(Action::Put { id, key, .. }) = o.poll(t) else {
            panic!("expected a PUT");
        };
        assert!(matches!(
            o.put_done(id, true, t),
            Some(Outcome::Sent { .. })
        ));
        let rang = match o.poll(t) {
            Some(Action::Ring { key: bell, body }) => {
                assert_eq!((bell, body), (bell_key(dest), Bytes::from(key.clone())));
                true
            }
            None => false,
            other => panic!("expected a ring or nothing, got {other:?}"),
        };
        (key, rang)
    }

    #[test]
    fn a_stream_opened_again_after_its_destination_was_forgotten_rings_at_once() {
        use crate::tunnel::bundler::{MAX_DESTINATIONS, NEW_STREAMS_PER_SECOND};
        let mut o = outbox();
        let t = Instant::now();
        let others: Vec<NodeId> = (0..MAX_DESTINATIONS as u64 - 1)
            .map(|i| NodeId(1_000 + i))
            .collect();
        let mut now = t;
        for d in &others {
            now += Duration::from_secs(1) / NEW_STREAMS_PER_SECOND;
            send_to(&mut o, *d, now);
        }
        let (first, rang) = send_to(&mut o, DEST, now);
        assert!(rang);
        // Every other destination talks after DEST, so DEST is the least recently active when
        // one address more needs a stream, and is forgotten.
        let now = now + Duration::from_millis(10);
        for d in &others {
            send_to(&mut o, *d, now);
        }
        send_to(&mut o, NodeId(99_999), now + Duration::from_millis(10));
        // DEST's next bundle opens a new stream: seq 0 of another session, rung although DEST's
        // bell rang 30 ms ago.
        let (key, rang) = send_to(&mut o, DEST, now + Duration::from_millis(20));
        let (old, new) = (
            parse_bundle_key(&first, DEST).unwrap(),
            parse_bundle_key(&key, DEST).unwrap(),
        );
        assert_eq!(new.seq, 0);
        assert_ne!(new.session, old.session);
        assert!(rang);
    }

    #[test]
    fn a_failed_put_is_followed_by_its_skip_marker_under_the_same_key_and_then_dropped() {
        let mut o = outbox();
        let t = Instant::now();
        let (id, k0, _) = put_one(&mut o, t);
        assert_eq!(o.put_done(id, false, t), None);
        let Some(Action::Put {
            id: skip_id,
            key,
            body,
        }) = o.poll(t)
        else {
            panic!("expected the skip marker's PUT");
        };
        assert_eq!((skip_id, key), (id, k0));
        let marker = decode(&body, None).unwrap();
        assert_eq!(marker.header.seq, 0);
        assert!(marker.is_skip());
        assert_eq!(
            o.put_done(id, false, t),
            Some(Outcome::Dropped { packets: 1 })
        );
        assert_eq!(o.poll(t), None, "a dropped bundle rings no bell");
        assert_eq!(o.puts_in_flight(), 0);
    }

    #[test]
    fn an_unknown_put_id_changes_nothing() {
        let mut o = outbox();
        assert_eq!(o.put_done(PutId(9), true, Instant::now()), None);
    }
}
