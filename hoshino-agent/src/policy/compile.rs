//! [`Policy`] -> the classifier's map contents ([`CompiledPolicy`]), independent of map sets.
//!
//! Layout (see `hoshino-common`): rule `i` is bit `i` of a [`RuleSet`]; each LPM entry carries
//! the rules whose prefix list holds that prefix or any prefix covering it, because a trie lookup
//! only returns the longest match; rules without a prefix list go to the `any_*` sets.

use std::collections::{BTreeMap, HashMap};

use hoshino_common::{
    FAMILY_ANY, FAMILY_V4, FAMILY_V6, LPM_ENTRIES_PER_SET, MAX_RULES, RULE_MATCH_PORT,
    RULE_MATCH_PROTO, RULE_MATCH_UID, Rule as KernelRule, RuleSet,
};

use super::error::{PolicyError, Problem};
use super::model::{Family, Located, Policy, Verdict};
use super::prefix::{IpPrefix, Ipv4Prefix, Ipv6Prefix};

/// One LPM table's entries, sorted by prefix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixTable<P> {
    pub entries: Vec<(P, RuleSet)>,
}

/// Everything the classifier needs for one policy, plus the policy itself for the agent's side
/// (rule names for metrics, divert policies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub policy: Policy,
    pub default: Verdict,
    /// Kernel rules, index = rule number = bit in the rule sets.
    pub rules: Vec<KernelRule>,
    pub any_dst: RuleSet,
    pub any_src: RuleSet,
    pub dst_v4: PrefixTable<Ipv4Prefix>,
    pub dst_v6: PrefixTable<Ipv6Prefix>,
    pub src_v4: PrefixTable<Ipv4Prefix>,
    pub src_v6: PrefixTable<Ipv6Prefix>,
}

impl CompiledPolicy {
    /// The name of rule `index`, for metrics labels and logs.
    pub fn rule_name(&self, index: u32) -> Option<&str> {
        self.policy
            .rules
            .get(index as usize)
            .map(|r| r.name.value.as_str())
    }
}

/// Compiles a validated policy; `path` and `text` locate capacity errors.
pub fn compile(policy: Policy, path: &str, text: &str) -> Result<CompiledPolicy, PolicyError> {
    let err = |span: std::ops::Range<usize>, problem| PolicyError::at(path, text, span, problem);
    if let Some(extra) = policy.rules.get(MAX_RULES as usize) {
        return Err(err(
            extra.name.span.clone(),
            Problem::TooManyRules {
                max: MAX_RULES as usize,
            },
        ));
    }

    let mut rules = Vec::with_capacity(policy.rules.len());
    let mut any_dst = RuleSet::EMPTY;
    let mut any_src = RuleSet::EMPTY;
    let mut dst = DirectSets::default();
    let mut src = DirectSets::default();
    for (index, rule) in policy.rules.iter().enumerate() {
        let bit = u32::try_from(index).unwrap_or(u32::MAX);
        rules.push(kernel_rule(rule));
        if rule.dst.is_empty() {
            any_dst.insert(bit);
        }
        if rule.src.is_empty() {
            any_src.insert(bit);
        }
        dst.add(&rule.dst, bit);
        src.add(&rule.src, bit);
    }

    let limit = LPM_ENTRIES_PER_SET as usize;
    let too_many = |table: &'static str, span: &std::ops::Range<usize>| {
        err(span.clone(), Problem::TooManyPrefixes { table, max: limit })
    };
    if let Some(span) = dst.v4_overflow(limit) {
        return Err(too_many("IPv4 destination", &span));
    }
    if let Some(span) = dst.v6_overflow(limit) {
        return Err(too_many("IPv6 destination", &span));
    }
    if let Some(span) = src.v4_overflow(limit) {
        return Err(too_many("IPv4 source", &span));
    }
    if let Some(span) = src.v6_overflow(limit) {
        return Err(too_many("IPv6 source", &span));
    }

    Ok(CompiledPolicy {
        default: policy.default,
        rules,
        any_dst,
        any_src,
        dst_v4: fold(
            &dst.v4,
            |p: &Ipv4Prefix, l| p.ancestor(l),
            |p| p.prefix_len(),
        ),
        dst_v6: fold(
            &dst.v6,
            |p: &Ipv6Prefix, l| p.ancestor(l),
            |p| p.prefix_len(),
        ),
        src_v4: fold(
            &src.v4,
            |p: &Ipv4Prefix, l| p.ancestor(l),
            |p| p.prefix_len(),
        ),
        src_v6: fold(
            &src.v6,
            |p: &Ipv6Prefix, l| p.ancestor(l),
            |p| p.prefix_len(),
        ),
        policy,
    })
}

fn kernel_rule(rule: &super::model::Rule) -> KernelRule {
    let mut k = KernelRule {
        verdict: rule.verdict.to_kernel() as u8,
        ..KernelRule::default()
    };
    if let Some(p) = rule.protocol {
        k.flags |= RULE_MATCH_PROTO;
        k.proto = p.0;
    }
    if let Some(ports) = rule.dport {
        k.flags |= RULE_MATCH_PORT;
        k.port_min = ports.lo;
        k.port_max = ports.hi;
    }
    if let Some(uids) = rule.uid {
        k.flags |= RULE_MATCH_UID;
        k.uid_min = uids.lo;
        k.uid_max = uids.hi;
    }
    // A rule whose prefixes are all of one family cannot match the other family; saying so
    // lets the classifier skip it without consulting the tries.
    let all = rule.dst.iter().chain(rule.src.iter());
    let (mut v4, mut v6) = (false, false);
    for p in all {
        match p.value {
            IpPrefix::V4(_) => v4 = true,
            IpPrefix::V6(_) => v6 = true,
        }
    }
    k.family = match (rule.family, v4, v6) {
        (Some(Family::Ipv4), ..) | (None, true, false) => FAMILY_V4,
        (Some(Family::Ipv6), ..) | (None, false, true) => FAMILY_V6,
        _ => FAMILY_ANY,
    };
    k
}

/// The rules that name each prefix directly, before folding ancestors in.
#[derive(Default)]
struct DirectSets {
    v4: BTreeMap<Ipv4Prefix, RuleSet>,
    v6: BTreeMap<Ipv6Prefix, RuleSet>,
    /// Where each distinct prefix was first written, in order of first appearance: entry `n`
    /// is the prefix that made the table hold `n + 1` entries.
    v4_spans: Vec<std::ops::Range<usize>>,
    v6_spans: Vec<std::ops::Range<usize>>,
}

impl DirectSets {
    fn add(&mut self, prefixes: &[Located<IpPrefix>], bit: u32) {
        for p in prefixes {
            match p.value {
                IpPrefix::V4(v4) => {
                    let set = self.v4.entry(v4).or_insert_with(|| {
                        self.v4_spans.push(p.span.clone());
                        RuleSet::EMPTY
                    });
                    set.insert(bit);
                }
                IpPrefix::V6(v6) => {
                    let set = self.v6.entry(v6).or_insert_with(|| {
                        self.v6_spans.push(p.span.clone());
                        RuleSet::EMPTY
                    });
                    set.insert(bit);
                }
            }
        }
    }

    /// The span of the first distinct prefix beyond `limit`, if any.
    fn v4_overflow(&self, limit: usize) -> Option<std::ops::Range<usize>> {
        self.v4_spans.get(limit).cloned()
    }

    fn v6_overflow(&self, limit: usize) -> Option<std::ops::Range<usize>> {
        self.v6_spans.get(limit).cloned()
    }
}

/// Each prefix's set becomes the union of its own and its ancestors' sets. Walking the
/// (at most 33 or 129) ancestor lengths per prefix keeps this linear in the prefix count.
fn fold<P: Ord + Copy + std::hash::Hash>(
    direct: &BTreeMap<P, RuleSet>,
    ancestor: impl Fn(&P, u8) -> P,
    len: impl Fn(&P) -> u8,
) -> PrefixTable<P> {
    let lookup: HashMap<P, RuleSet> = direct.iter().map(|(p, s)| (*p, *s)).collect();
    let entries = direct
        .keys()
        .map(|p| {
            let folded = (0..len(p))
                .filter_map(|l| lookup.get(&ancestor(p, l)))
                .fold(
                    lookup.get(p).copied().unwrap_or(RuleSet::EMPTY),
                    |acc, s| acc.union(s),
                );
            (*p, folded)
        })
        .collect();
    PrefixTable { entries }
}
