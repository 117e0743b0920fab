//! The mailbox key schedule and protocol constants.
//!
//! - bundle: `v1/inbox/<dest:16hex>/<ulid:26>.<src:16hex>`
//! - doorbell: `v1/bell/<dest:16hex>`
//!
//! Keys from one sender sort in send order because ULIDs come from a monotonic generator.
//! The sender id in the key lets IAM restrict a node to `v1/inbox/*/*.<self>` and lets the
//! receiver reject a bundle whose header names another sender.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ulid::Ulid;

use crate::node_addr::NodeId;

/// A sender skips the doorbell when its previous successful PUT to the same destination started
/// less than this before the current PUT completed.
pub const RING_WINDOW: Duration = Duration::from_secs(5);
/// A receiver stays in active (LIST) mode this long after it last found an object.
/// Must exceed `RING_WINDOW`: see `docs/DESIGN.md` for why no object is stranded.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);
const _: () = assert!(IDLE_AFTER.as_millis() > RING_WINDOW.as_millis());

pub const KEY_VERSION: &str = "v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MailboxError {
    #[error("key `{key}` is not in inbox `{prefix}`")]
    OutsideInbox { key: String, prefix: String },
    #[error("key `{key}`: expected `<ulid>.<sender>` after the inbox prefix")]
    Malformed { key: String },
    #[error("key `{key}`: invalid ULID")]
    BadUlid { key: String },
    #[error("key `{key}`: invalid sender id")]
    BadSender { key: String },
}

/// `v1/inbox/<dest>/`: what a node LISTs.
pub fn inbox_prefix(dest: NodeId) -> String {
    format!("{KEY_VERSION}/inbox/{dest}/")
}

pub fn bundle_key(dest: NodeId, ulid: Ulid, sender: NodeId) -> String {
    format!("{KEY_VERSION}/inbox/{dest}/{ulid}.{sender}")
}

pub fn bell_key(dest: NodeId) -> String {
    format!("{KEY_VERSION}/bell/{dest}")
}

/// A parsed bundle key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxKey {
    pub ulid: Ulid,
    pub sender: NodeId,
}

/// Parses a key listed under `inbox_prefix(us)`.
pub fn parse_inbox_key(key: &str, us: NodeId) -> Result<InboxKey, MailboxError> {
    let prefix = inbox_prefix(us);
    let rest = key
        .strip_prefix(prefix.as_str())
        .ok_or_else(|| MailboxError::OutsideInbox {
            key: key.to_string(),
            prefix: prefix.clone(),
        })?;
    let (ulid, sender) = rest
        .split_once('.')
        .ok_or_else(|| MailboxError::Malformed {
            key: key.to_string(),
        })?;
    if ulid.len() != 26 {
        return Err(MailboxError::BadUlid {
            key: key.to_string(),
        });
    }
    // Only the canonical spelling: one object must have one key, so a second spelling of the
    // same ULID cannot slip past duplicate suppression.
    let ulid = Ulid::from_string(ulid)
        .ok()
        .filter(|u| u.to_string() == ulid)
        .ok_or_else(|| MailboxError::BadUlid {
            key: key.to_string(),
        })?;
    let sender = sender.parse().map_err(|_| MailboxError::BadSender {
        key: key.to_string(),
    })?;
    Ok(InboxKey { ulid, sender })
}

/// Decides, per destination, whether a completed PUT must ring the doorbell.
#[derive(Debug, Default)]
pub struct BellSchedule {
    last_success_start: HashMap<NodeId, Instant>,
}

impl BellSchedule {
    /// Records a successful PUT to `dest` that started at `started` and completed at `now`;
    /// returns true when the sender must ring `dest`'s bell.
    pub fn put_succeeded(&mut self, dest: NodeId, started: Instant, now: Instant) -> bool {
        let ring = match self.last_success_start.get(&dest) {
            Some(prev) => now.saturating_duration_since(*prev) >= RING_WINDOW,
            None => true,
        };
        let entry = self.last_success_start.entry(dest).or_insert(started);
        if started > *entry {
            *entry = started;
        }
        ring
    }

    /// Forgets destinations silent for longer than `RING_WINDOW` (their next PUT rings anyway),
    /// keeping the map bounded by recently active destinations.
    pub fn prune(&mut self, now: Instant) {
        self.last_success_start
            .retain(|_, s| now.saturating_duration_since(*s) < RING_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: NodeId = NodeId(0x0123_4567_89ab_cdef);
    const THEM: NodeId = NodeId(0x00ff);

    #[test]
    fn bundle_key_round_trips_through_the_parser() {
        let ulid = Ulid::from_parts(1_700_000_000_000, 42);
        let key = bundle_key(US, ulid, THEM);
        assert_eq!(
            key,
            format!("v1/inbox/0123456789abcdef/{ulid}.00000000000000ff")
        );
        assert_eq!(
            parse_inbox_key(&key, US),
            Ok(InboxKey { ulid, sender: THEM })
        );
    }

    #[test]
    fn keys_of_one_sender_sort_in_ulid_order() {
        let mut generator = ulid::Generator::new();
        let keys: Vec<String> = (0..100)
            .map(|_| bundle_key(US, generator.generate().unwrap(), THEM))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn bell_key_names_the_destination() {
        assert_eq!(bell_key(US), "v1/bell/0123456789abcdef");
        assert_eq!(inbox_prefix(US), "v1/inbox/0123456789abcdef/");
    }

    #[test]
    fn keys_outside_our_inbox_or_malformed_are_errors() {
        let ulid = Ulid::from_parts(1, 1);
        assert!(matches!(
            parse_inbox_key(&bundle_key(THEM, ulid, US), US),
            Err(MailboxError::OutsideInbox { .. })
        ));
        let p = inbox_prefix(US);
        for bad in [
            format!("{p}nodot"),
            format!("{p}{ulid}.xyz"),
            format!("{p}{ulid}.00000000000000FF"),
            format!("{p}short.00000000000000ff"),
            format!("{p}ZZZZZZZZZZZZZZZZZZZZZZZZZZ.00000000000000ff"),
            format!("{p}{ulid}.00000000000000ff/extra"),
            format!("{p}é{ulid}.00000000000000ff"),
        ] {
            assert!(parse_inbox_key(&bad, US).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_put_to_a_destination_rings() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        assert!(s.put_succeeded(THEM, t, t + Duration::from_millis(30)));
    }

    #[test]
    fn put_completing_within_ring_window_of_previous_start_does_not_ring() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        assert!(s.put_succeeded(THEM, t, t + Duration::from_millis(30)));
        let t2 = t + Duration::from_secs(4);
        assert!(!s.put_succeeded(THEM, t2, t2 + Duration::from_millis(30)));
    }

    #[test]
    fn put_completing_ring_window_after_previous_start_rings() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        s.put_succeeded(THEM, t, t);
        let t2 = t + Duration::from_millis(4_990);
        // Started inside the window but completed after it: the receiver may have gone idle.
        assert!(s.put_succeeded(THEM, t2, t2 + Duration::from_millis(20)));
    }

    #[test]
    fn destinations_are_scheduled_independently() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        s.put_succeeded(THEM, t, t);
        assert!(s.put_succeeded(NodeId(7), t, t));
    }

    #[test]
    fn out_of_order_completion_keeps_latest_start() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        s.put_succeeded(THEM, t + Duration::from_secs(3), t + Duration::from_secs(3));
        s.put_succeeded(THEM, t, t + Duration::from_secs(4));
        // Latest recorded start is t+3, so a completion at t+7 is inside the window.
        assert!(!s.put_succeeded(THEM, t + Duration::from_secs(7), t + Duration::from_secs(7)));
    }

    #[test]
    fn prune_forgets_quiet_destinations() {
        let mut s = BellSchedule::default();
        let t = Instant::now();
        s.put_succeeded(THEM, t, t);
        s.prune(t + RING_WINDOW);
        assert!(s.put_succeeded(THEM, t + RING_WINDOW, t + RING_WINDOW));
    }
}
