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
    let mut src_candidates = meta.any_src.words;
    let (dst, src) = lookup(set, pkt);
    if let Some(dst) = dst {
        or_into(&mut candidates, dst);
    }
    if let Some(src) = src {
        or_into(&mut src_candidates, src);
    }
    for word in 0..RULE_WORDS {
        candidates[word] &= src_candidates[word];
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

#[inline(always)]
fn or_into(words: &mut [u64; RULE_WORDS], set: &RuleSet) {
    for word in 0..RULE_WORDS {
        words[word] |= set.words[word];
    }
}

#[inline(always)]
fn lookup(set: u32, pkt: &Packet) -> (Option<&'static RuleSet>, Option<&'static RuleSet>) {
    match pkt.family {
        FAMILY_V4 => {
            let mut dst: LpmV4 = [0; 5];
            let mut src: LpmV4 = [0; 5];
            dst[0] = set as u8;
            src[0] = set as u8;
            dst[1..].copy_from_slice(&pkt.dst[..4]);
            src[1..].copy_from_slice(&pkt.src[..4]);
            (
                DST_V4.get(Key::new(LPM_SET_BITS + 32, dst)),
                SRC_V4.get(Key::new(LPM_SET_BITS + 32, src)),
            )
        }
        FAMILY_V6 => {
            let mut dst: LpmV6 = [0; 17];
            let mut src: LpmV6 = [0; 17];
            dst[0] = set as u8;
            src[0] = set as u8;
            dst[1..].copy_from_slice(&pkt.dst);
            src[1..].copy_from_slice(&pkt.src);
            (
                DST_V6.get(Key::new(LPM_SET_BITS + 128, dst)),
                SRC_V6.get(Key::new(LPM_SET_BITS + 128, src)),
            )
        }
        _ => (None, None),
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
