//! First-match-wins rule selection: one LPM lookup per direction gives the candidate rules, then
//! the lowest candidate whose remaining conditions hold wins.

use aya_ebpf::maps::lpm_trie::Key;
use hoshino_common::{
    FAMILY_ANY, FAMILY_V4, FAMILY_V6, LPM_SET_BITS, LpmV4, LpmV6, RULE_MATCH_PORT,
    RULE_MATCH_PROTO, RULE_MATCH_UID, RULE_WORDS, RuleSet, SetMeta, rule_index,
};

use crate::{
    maps::{DST_V4, DST_V6, RULES, SRC_V4, SRC_V6},
    parse::Packet,
};

/// The winning rule's index and verdict, or `None` for the default verdict.
#[inline(always)]
pub fn select_rule(set: u32, meta: &SetMeta, pkt: &Packet, uid: u32) -> Option<(u32, u8)> {
    let mut candidates = meta.any_dst.words;
    if let Some(dst) = lookup(set, pkt, Direction::Dst) {
        or_into(&mut candidates, dst);
    }
    // Most packets match no destination: then the source trie cannot add anything.
    let mut needs_src = false;
    let mut any = 0u64;
    for word in 0..RULE_WORDS {
        any |= candidates[word];
        needs_src |= candidates[word] & !meta.any_src.words[word] != 0;
    }
    if any == 0 {
        return None;
    }
    if needs_src {
        let mut src_candidates = meta.any_src.words;
        if let Some(src) = lookup(set, pkt, Direction::Src) {
            or_into(&mut src_candidates, src);
        }
        for word in 0..RULE_WORDS {
            candidates[word] &= src_candidates[word];
        }
    }
    for word in 0..RULE_WORDS {
        let bits = candidates[word];
        if bits == 0 {
            continue;
        }
        for bit in 0..64u32 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            let rule = word as u32 * 64 + bit;
            if let Some(verdict) = rule_matches(set, rule, pkt, uid) {
                return Some((rule, verdict));
            }
        }
    }
    None
}

#[derive(Clone, Copy)]
enum Direction {
    Dst,
    Src,
}

#[inline(always)]
fn or_into(words: &mut [u64; RULE_WORDS], set: &RuleSet) {
    for word in 0..RULE_WORDS {
        words[word] |= set.words[word];
    }
}

#[inline(always)]
fn lookup(set: u32, pkt: &Packet, direction: Direction) -> Option<&'static RuleSet> {
    let addr = match direction {
        Direction::Dst => &pkt.dst,
        Direction::Src => &pkt.src,
    };
    match pkt.family {
        FAMILY_V4 => {
            let mut data: LpmV4 = [0; 5];
            data[0] = set as u8;
            data[1..].copy_from_slice(&addr[..4]);
            let key = Key::new(LPM_SET_BITS + 32, data);
            match direction {
                Direction::Dst => DST_V4.get(key),
                Direction::Src => SRC_V4.get(key),
            }
        }
        FAMILY_V6 => {
            let mut data: LpmV6 = [0; 17];
            data[0] = set as u8;
            data[1..].copy_from_slice(addr);
            let key = Key::new(LPM_SET_BITS + 128, data);
            match direction {
                Direction::Dst => DST_V6.get(key),
                Direction::Src => SRC_V6.get(key),
            }
        }
        _ => None,
    }
}

#[inline(always)]
fn rule_matches(set: u32, rule: u32, pkt: &Packet, uid: u32) -> Option<u8> {
    let r = RULES.get(rule_index(set, rule))?;
    if r.family != FAMILY_ANY && r.family != pkt.family {
        return None;
    }
    if r.flags & RULE_MATCH_PROTO != 0 && !(pkt.has_proto && pkt.proto == r.proto) {
        return None;
    }
    if r.flags & RULE_MATCH_PORT != 0
        && !(pkt.has_ports && r.port_min <= pkt.dst_port && pkt.dst_port <= r.port_max)
    {
        return None;
    }
    if r.flags & RULE_MATCH_UID != 0 && !(r.uid_min <= uid && uid <= r.uid_max) {
        return None;
    }
    Some(r.verdict)
}
