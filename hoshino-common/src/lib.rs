//! Types shared between the eBPF classifier (`hoshino-ebpf`) and the agent (`hoshino-agent`).
//!
//! Every type here is `#[repr(C)]` plain old data with explicit padding, so the kernel side and the
//! user side agree byte for byte. The `user` feature adds `aya::Pod` impls.
//!
//! # Maps (names as in the object file) and their layout
//!
//! Two *map sets* (0 and 1) live side by side in the same maps, so a reload fills the inactive
//! set and then flips [`Config::active_set`] with one array write: the classifier never sees a
//! half-written policy and the program is never detached.
//!
//! | map | type | key | value | entries |
//! |---|---|---|---|---|
//! | `HOSHINO_CONFIG` | array | `u32` = 0 | [`Config`] | 1 |
//! | `HOSHINO_SETS` | array | set (0/1) | [`SetMeta`] | [`MAP_SETS`] |
//! | `HOSHINO_RULES` | array | `set * MAX_RULES + rule` | [`Rule`] | `MAP_SETS * MAX_RULES` |
//! | `HOSHINO_DST_V4`, `HOSHINO_SRC_V4` | LPM trie | [`LpmV4`] (`prefix_len`, data) | [`RuleSet`] | [`LPM_CAPACITY`] |
//! | `HOSHINO_DST_V6`, `HOSHINO_SRC_V6` | LPM trie | [`LpmV6`] | [`RuleSet`] | [`LPM_CAPACITY`] |
//! | `HOSHINO_STATS` | per-CPU array | [`stats_index`]`(set, slot)` | [`RuleStats`] | `MAP_SETS * STATS_SLOTS` |
//! | `HOSHINO_FLOWS` | hash (not LRU) | [`FlowKey`] | [`FlowValue`] | [`FLOW_CAPACITY`] |
//! | `HOSHINO_UID_FLOWS` | hash | socket uid `u32` | recorded flows `u32` | [`UID_FLOWS_CAPACITY`] |
//! | `HOSHINO_EVENTS` | per-CPU array | `EVENT_*` index | `u64` count | [`EVENT_SLOTS`] |
//!
//! ## LPM keys
//! The first data byte of an LPM key is the map set, followed by the address in network byte
//! order; `prefix_len` counts that byte too (`8 + prefix length`). A lookup uses
//! `prefix_len = 8 + 32` (v4) or `8 + 128` (v6), so a set never matches the other set's prefixes.
//!
//! ## Rule selection
//! A rule is a bit in a [`RuleSet`] (bit `i` of the set = rule `i`; rule 0 has the highest
//! priority). An LPM entry's value is the set of rules whose destination (or source) prefix list
//! contains that prefix *or one of its ancestors* (the compiler folds ancestors in, because a trie
//! lookup only returns the longest match). Rules with no destination (source) constraint are in
//! [`SetMeta::any_dst`] ([`SetMeta::any_src`]); the classifier ORs those in after the lookup, so
//! an entry does not need to carry them. For a packet:
//! `candidates = (dst_lookup | any_dst) & (src_lookup | any_src)`, then the lowest candidate whose
//! [`Rule`] also matches family, L4 protocol, destination port and socket uid wins. If none wins,
//! [`SetMeta::default_verdict`] applies and is counted in slot [`DEFAULT_SLOT`].
//!
//! ## Socket uid
//! The uid comes from `bpf_get_socket_uid`, which returns the socket owner's uid, or
//! [`UID_NO_SOCKET`] (65534, the overflow uid, same number as `nobody`) when the packet has no full
//! socket (forwarded traffic, kernel-generated RSTs, time-wait ACKs). A uid range therefore matches
//! socketless packets exactly when it contains 65534: a rule "uid 0" never matches them, and a
//! rule for "everyone but root" (`1..=u32::MAX`) does. That is the safe reading for a
//! metadata-protection policy: traffic whose owner is unknown is treated as unprivileged.
//!
//! ## Packets that cannot be parsed fully
//! Truncated or malformed L3/L4 headers, unknown EtherTypes and non-first fragments still go
//! through rule selection with what *was* parsed: a rule that requires a protocol, port or address
//! family the classifier did not establish never matches them. A packet with no parseable IP header
//! only matches rules that have no prefix, protocol and port constraint (the `any` masks).
//!
//! ## Flows
//! For `divert` verdicts only (tunnel traffic must not crowd out the flows that uid decisions
//! rest on) the classifier records the 5-tuple's socket uid, rule and map set in
//! `HOSHINO_FLOWS`, so the agent can decide per uid for diverted flows. The map is a plain hash,
//! not an LRU: a full table refuses a *new* flow (its packet is dropped and counted in
//! `HOSHINO_EVENTS[`[`EVENT_FLOW_TABLE_FULL`]`]`) instead of evicting a live one. A packet of a
//! recorded flow updates the entry in place (uid, rule, set, [`FlowValue::last_seen_ns`]); a TCP
//! SYN without ACK starts a new flow on that 4-tuple (the entry is rewritten and
//! [`FlowValue::started_ns`] reset). The agent removes entries: the divert proxy when it is done
//! with a flow, a periodic sweep of entries idle longer than the agent's idle timeout, and a clear
//! when an agent starts or adopts a pinned classifier (the previous agent's flows died with it).
//!
//! A per-uid cap ([`Config::flows_per_uid`]) keeps one user from filling the table for
//! everyone: `HOSHINO_UID_FLOWS` counts each uid's flows, incremented by the classifier when it
//! records a new flow (a new 4-tuple, or a SYN that moves a tuple to another uid), and
//! recomputed from `HOSHINO_FLOWS` by the agent's sweep (removals do not decrement it, so the
//! count may run high until the next sweep, never low for long). A new flow of a uid at the cap
//! is dropped and counted in `HOSHINO_EVENTS[`[`EVENT_UID_FLOW_CAP`]`]`.
//!
//! ## Events
//! `HOSHINO_EVENTS` counts per CPU what the classifier did besides rule verdicts, indexed by the
//! `EVENT_*` constants; the agent sums the CPUs and shows them as metrics.
#![no_std]

/// How many rules a policy may have (bits in a [`RuleSet`]).
pub const MAX_RULES: u32 = 256;
/// 64-bit words in a [`RuleSet`].
pub const RULE_WORDS: usize = (MAX_RULES / 64) as usize;
/// Map sets used for reloading without detaching.
pub const MAP_SETS: u32 = 2;
/// Per-set stats slots: one per rule, plus the default verdict.
pub const STATS_SLOTS: u32 = MAX_RULES + 1;
/// The stats slot that counts packets decided by the default verdict.
pub const DEFAULT_SLOT: u32 = MAX_RULES;
/// Capacity of each LPM trie, shared by both map sets (so a policy may use half of it).
pub const LPM_CAPACITY: u32 = 32_768;
/// Prefixes one policy may put into one trie (half of [`LPM_CAPACITY`], the other set's half).
pub const LPM_ENTRIES_PER_SET: u32 = LPM_CAPACITY / MAP_SETS;
/// Capacity of the flow map.
pub const FLOW_CAPACITY: u32 = 65_536;
/// Slots of `HOSHINO_EVENTS`.
pub const EVENT_SLOTS: u32 = 4;
/// `HOSHINO_EVENTS` slot: a divert packet of a new flow dropped because `HOSHINO_FLOWS` is full.
pub const EVENT_FLOW_TABLE_FULL: u32 = 0;
/// `HOSHINO_EVENTS` slot: a tunnel/divert packet dropped because its redirect target is 0.
pub const EVENT_NO_REDIRECT_TARGET: u32 = 1;
/// `HOSHINO_EVENTS` slot: a divert packet of a new flow dropped because its uid is at the cap.
pub const EVENT_UID_FLOW_CAP: u32 = 2;
/// Capacity of `HOSHINO_UID_FLOWS` (distinct uids with recorded flows); a uid that finds no room
/// there goes uncounted (admitted) until the agent's next recount.
pub const UID_FLOWS_CAPACITY: u32 = 8_192;
/// What `bpf_get_socket_uid` returns for a packet without a full socket.
pub const UID_NO_SOCKET: u32 = 65_534;

/// The index in `HOSHINO_STATS` of `slot` (a rule index or [`DEFAULT_SLOT`]) in map set `set`.
pub const fn stats_index(set: u32, slot: u32) -> u32 {
    set * STATS_SLOTS + slot
}

/// The index in `HOSHINO_RULES` of `rule` in map set `set`.
pub const fn rule_index(set: u32, rule: u32) -> u32 {
    set * MAX_RULES + rule
}

/// What happens to a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Continue unchanged (`TC_ACT_OK`).
    Pass = 0,
    /// Discard (`TC_ACT_SHOT`).
    Drop = 1,
    /// Redirect to the tunnel TUN: carried over S3.
    Tunnel = 2,
    /// Redirect to the divert TUN: the agent inspects it and reinjects or drops it.
    Divert = 3,
}

impl Verdict {
    /// The verdict encoded as `raw`, if any; the kernel side treats unknown values as `Pass`.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Pass),
            1 => Some(Self::Drop),
            2 => Some(Self::Tunnel),
            3 => Some(Self::Divert),
            _ => None,
        }
    }

    /// The lowercase name used in policy files and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Tunnel => "tunnel",
            Self::Divert => "divert",
        }
    }
}

/// Address family values in [`Rule::family`] and [`FlowKey::family`].
pub const FAMILY_ANY: u8 = 0;
/// IPv4.
pub const FAMILY_V4: u8 = 4;
/// IPv6.
pub const FAMILY_V6: u8 = 6;

/// [`Rule::flags`]: the rule requires [`Rule::proto`].
pub const RULE_MATCH_PROTO: u8 = 1 << 0;
/// [`Rule::flags`]: the rule requires a destination port in `port_min..=port_max` (implies a
/// first fragment or an unfragmented packet with a readable TCP/UDP/SCTP/UDP-Lite header).
pub const RULE_MATCH_PORT: u8 = 1 << 1;
/// [`Rule::flags`]: the rule requires a socket uid in `uid_min..=uid_max`.
pub const RULE_MATCH_UID: u8 = 1 << 2;

/// One rule's non-prefix conditions and its verdict. Prefix conditions live in the LPM tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    /// A [`Verdict`] as `u8`.
    pub verdict: u8,
    /// `RULE_MATCH_*` bits; a condition whose bit is clear is not checked.
    pub flags: u8,
    /// IP protocol number (next header for v6), e.g. 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6.
    pub proto: u8,
    /// [`FAMILY_ANY`], [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Destination port range, inclusive, host byte order.
    pub port_min: u16,
    /// See `port_min`.
    pub port_max: u16,
    /// Socket uid range, inclusive.
    pub uid_min: u32,
    /// See `uid_min`.
    pub uid_max: u32,
}

/// A set of rules: bit `i` (word `i / 64`, bit `i % 64`) is rule `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleSet {
    /// The bits.
    pub words: [u64; RULE_WORDS],
}

impl RuleSet {
    /// No rule.
    pub const EMPTY: Self = Self {
        words: [0; RULE_WORDS],
    };

    /// Adds `rule` (ignored if `rule >= MAX_RULES`).
    pub fn insert(&mut self, rule: u32) {
        if let Some(word) = self.words.get_mut((rule / 64) as usize) {
            *word |= 1 << (rule % 64);
        }
    }

    /// Whether `rule` is in the set.
    pub fn contains(&self, rule: u32) -> bool {
        self.words
            .get((rule / 64) as usize)
            .is_some_and(|word| word & (1 << (rule % 64)) != 0)
    }

    /// The union of both sets.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        let mut out = *self;
        for (a, b) in out.words.iter_mut().zip(other.words.iter()) {
            *a |= *b;
        }
        out
    }

    /// Whether no rule is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }
}

/// An IPv4 LPM key's data: `[set, a, b, c, d]`.
pub type LpmV4 = [u8; 5];
/// An IPv6 LPM key's data: `[set, 16 address bytes]`.
pub type LpmV6 = [u8; 17];
/// Bits of an LPM key's data taken by the set byte.
pub const LPM_SET_BITS: u32 = 8;

/// Per-set data that is not per rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetMeta {
    /// Rules without a destination prefix constraint.
    pub any_dst: RuleSet,
    /// Rules without a source prefix constraint.
    pub any_src: RuleSet,
    /// Number of rules in this set (`<= MAX_RULES`).
    pub rule_count: u32,
    /// The [`Verdict`] (as `u8`) for packets no rule matches.
    pub default_verdict: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

/// Global classifier configuration (`HOSHINO_CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// The map set in use (0 or 1). The agent flips it after filling the other set.
    pub active_set: u32,
    /// Where `tunnel` packets are redirected (egress of the tunnel TUN); 0 = not configured, the
    /// packet is dropped and counted.
    pub tunnel_ifindex: u32,
    /// Where `divert` packets are redirected (egress of the divert TUN); 0 = not configured, the
    /// packet is dropped and counted.
    pub divert_ifindex: u32,
    /// Packets whose `skb->mark` equals this pass untouched (the agent's reinjected packets).
    /// 0 disables the check (0 is every unmarked packet's mark).
    pub reinject_mark: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// At most this many recorded divert flows per socket uid (`HOSHINO_UID_FLOWS`); a new flow
    /// beyond it is refused like one in a full table. 0 = no per-uid cap.
    pub flows_per_uid: u32,
}

/// [`Config::flags`]: the classifier is enabled; while clear every packet passes uncounted
/// (the state between loading and the first filled set).
pub const CONFIG_ENABLED: u32 = 1 << 0;
/// [`Config::flags`]: emit aya-log debug messages for verdicts (rate limited per rule and CPU to
/// packet counts that are powers of two).
pub const CONFIG_LOG_VERDICTS: u32 = 1 << 1;

/// [`Config::flags`]: the interface has no Ethernet header (a TUN, WireGuard, ...): packets start
/// at the IP header and `skb->protocol` gives the family.
pub const CONFIG_L3_INTERFACE: u32 = 1 << 2;

/// Per-rule counters (one per CPU; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleStats {
    /// Packets this rule decided.
    pub packets: u64,
    /// Bytes of those packets (`skb->len`, L2 header included at TC).
    pub bytes: u64,
}

/// A flow's 5-tuple as the classifier saw it leaving the interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address, network byte order; IPv4 uses the first 4 bytes, the rest are 0.
    pub src: [u8; 16],
    /// Destination address, like `src`.
    pub dst: [u8; 16],
    /// Source port, host byte order (0 if the protocol has no ports or it was not readable).
    pub src_port: u16,
    /// Destination port, host byte order (0 as for `src_port`).
    pub dst_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

/// What the classifier recorded about a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// The sending socket's uid ([`UID_NO_SOCKET`] if none).
    pub uid: u32,
    /// The rule that matched.
    pub rule: u32,
    /// The [`Verdict`] as `u8`.
    pub verdict: u8,
    /// The map set that decided.
    pub set: u8,
    /// Zero.
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_ns` of the latest packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` of the packet that started the flow: its first recorded packet, or the
    /// latest SYN without ACK on this 4-tuple (a new connection reusing the tuple).
    pub started_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), Copy, has no padding holes (explicit `_pad` fields) and any
    // bit pattern is a valid value.
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::RuleSet {}
    unsafe impl aya::Pod for super::SetMeta {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RuleStats {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Rule>(), 16);
        assert_eq!(size_of::<RuleSet>(), 8 * RULE_WORDS);
        assert_eq!(size_of::<SetMeta>(), 2 * 8 * RULE_WORDS + 8);
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(size_of::<RuleStats>(), 16);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 32);
    }

    #[test]
    fn rule_set_bits_follow_rule_order() {
        let mut set = RuleSet::EMPTY;
        set.insert(0);
        set.insert(65);
        set.insert(MAX_RULES);
        assert!(set.contains(0) && set.contains(65) && !set.contains(64));
        assert_eq!(set.words[0], 1);
        assert_eq!(set.words[1], 2);
    }

    #[test]
    fn verdict_round_trips_through_raw() {
        for v in [
            Verdict::Pass,
            Verdict::Drop,
            Verdict::Tunnel,
            Verdict::Divert,
        ] {
            assert_eq!(Verdict::from_raw(v as u8), Some(v));
        }
        assert_eq!(Verdict::from_raw(4), None);
    }
}
