//! The mailbox key schedule and protocol constants (key layout v2).
//!
//! - bundle: `v2/inbox/<dest:16hex>/<session:16hex>-<seq:16hex>.<src:16hex>`
//! - doorbell: `v2/bell/<dest:16hex>`
//!
//! Every field is lowercase hex of fixed width, so keys of one stream sort lexically in seq
//! order and a receiver knows the next key of a stream before it exists. IAM lets node X PUT
//! only `v2/inbox/*.X`; because IAM's `*` also matches `/`, the parser below is strict: exactly
//! this shape, and the sender is the 16 hex digits after the final `.`, so no key X can write
//! reads as sent by anyone else.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::node_addr::NodeId;

/// A sender skips the doorbell when its previous successful PUT to the same destination started
/// less than this before the current PUT completed.
pub const RING_WINDOW: Duration = Duration::from_secs(5);
/// A receiver stays in active (LIST) mode this long after it last found an object.
/// Must exceed `RING_WINDOW`: see `docs/DESIGN.md` for why no object is stranded.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);
const _: () = assert!(IDLE_AFTER.as_millis() > RING_WINDOW.as_millis());

pub const KEY_VERSION: &str = "v2";

/// Hex digits of every id in a key.
const HEX_WIDTH: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key `{key}` is not in inbox `{prefix}`")]
    OutsideInbox { key: String, prefix: String },
    #[error(
        "key `{key}`: expected `<session:16hex>-<seq:16hex>.<sender:16hex>` after the inbox prefix"
    )]
    Malformed { key: String },
}

/// `v2/inbox/<dest>/`: what a node LISTs.
pub fn inbox_prefix(dest: NodeId) -> String {
    format!("{KEY_VERSION}/inbox/{dest}/")
}

pub fn bell_key(dest: NodeId) -> String {
    format!("{KEY_VERSION}/bell/{dest}")
}

/// The parts of a bundle key; they must equal the bundle header's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BundleKey {
    pub dest: NodeId,
    pub session: u64,
    pub seq: u64,
    pub sender: NodeId,
}

impl BundleKey {
    pub fn to_key(&self) -> String {
        format!(
            "{KEY_VERSION}/inbox/{}/{:016x}-{:016x}.{}",
            self.dest, self.session, self.seq, self.sender
        )
    }

    /// The key the same stream uses for its next bundle.
    pub fn next(&self) -> BundleKey {
        BundleKey {
            seq: self.seq.wrapping_add(1),
            ..*self
        }
    }
}

/// Exactly 16 lowercase hex digits.
fn strict_hex(s: &str) -> Option<u64> {
    if s.len() != HEX_WIDTH
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Parses a key listed under `inbox_prefix(us)`; anything but the exact v2 shape is an error.
pub fn parse_bundle_key(key: &str, us: NodeId) -> Result<BundleKey, KeyError> {
    let prefix = inbox_prefix(us);
    let rest = key
        .strip_prefix(prefix.as_str())
        .ok_or_else(|| KeyError::OutsideInbox {
            key: key.to_string(),
            prefix: prefix.clone(),
        })?;
    let malformed = || KeyError::Malformed {
        key: key.to_string(),
    };
    // Fixed widths: `<16>-<16>.<16>`, 50 bytes, separators at fixed offsets. Checking the
    // length first keeps the slicing below on ASCII boundaries only after `is_ascii`.
    if rest.len() != 3 * HEX_WIDTH + 2 || !rest.is_ascii() {
        return Err(malformed());
    }
    let bytes = rest.as_bytes();
    if bytes.get(HEX_WIDTH) != Some(&b'-') || bytes.get(2 * HEX_WIDTH + 1) != Some(&b'.') {
        return Err(malformed());
    }
    let field = |from: usize| rest.get(from..from + HEX_WIDTH).and_then(strict_hex);
    let session = field(0).ok_or_else(malformed)?;
    let seq = field(HEX_WIDTH + 1).ok_or_else(malformed)?;
    let sender = field(2 * HEX_WIDTH + 2).ok_or_else(malformed)?;
    Ok(BundleKey {
        dest: us,
        session,
        seq,
        sender: NodeId(sender),
    })
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

    fn key(session: u64, seq: u64) -> BundleKey {
        BundleKey {
            dest: US,
            session,
            seq,
            sender: THEM,
        }
    }

    #[test]
    fn bundle_key_round_trips_through_the_parser() {
        let k = key(0xabc, 7);
        let s = k.to_key();
        assert_eq!(
            s,
            "v2/inbox/0123456789abcdef/0000000000000abc-0000000000000007.00000000000000ff"
        );
        assert_eq!(parse_bundle_key(&s, US), Ok(k));
    }

    #[test]
    fn keys_of_one_stream_sort_in_seq_order() {
        let keys: Vec<String> = [0u64, 1, 9, 10, 255, 256, 1 << 40, u64::MAX]
            .iter()
            .map(|&seq| key(5, seq).to_key())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn next_key_is_the_following_seq_of_the_same_stream() {
        assert_eq!(key(3, 41).next(), key(3, 42));
    }

    #[test]
    fn bell_key_and_inbox_prefix_name_the_destination() {
        assert_eq!(bell_key(US), "v2/bell/0123456789abcdef");
        assert_eq!(inbox_prefix(US), "v2/inbox/0123456789abcdef/");
    }

    #[test]
    fn keys_outside_our_inbox_are_errors() {
        let theirs = BundleKey {
            dest: THEM,
            ..key(1, 1)
        };
        assert!(matches!(
            parse_bundle_key(&theirs.to_key(), US),
            Err(KeyError::OutsideInbox { .. })
        ));
        assert!(matches!(
            parse_bundle_key("v1/inbox/0123456789abcdef/x", US),
            Err(KeyError::OutsideInbox { .. })
        ));
    }

    #[test]
    fn keys_of_any_other_shape_are_malformed() {
        let p = inbox_prefix(US);
        let s = "0000000000000001";
        let q = "0000000000000002";
        let a = "00000000000000ff";
        for bad in [
            String::new(),
            format!("{s}-{q}"),
            format!("{s}-{q}.{a}x"),
            format!("x{s}-{q}.{a}"),
            format!("{s}-{q}.{a}/"),
            format!("{s}.{q}.{a}"),
            format!("{s}-{q}-{a}"),
            format!("{s}-{q}.00000000000000FF"),
            format!("{s}-000000000000000G.{a}"),
            format!("000000000000001-{q}.0{a}"),
            format!("{s}-{q}.+0000000000000ff"),
            format!("{s}-{q}. 0000000000000ff"),
            format!("{s}-{q}.é00000000000000"),
            // IAM's `*` matches `/`: a key node A may write (it ends in `.A`) must never read as
            // sent by B, whatever A puts before the final `.A`.
            format!("{s}-{q}.{a}/x.00000000000000aa"),
            format!("sub/{s}-{q}.{a}"),
            format!("{s}-{q}.{a}.00000000000000aa"),
        ] {
            assert!(
                matches!(
                    parse_bundle_key(&format!("{p}{bad}"), US),
                    Err(KeyError::Malformed { .. })
                ),
                "{bad}"
            );
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
