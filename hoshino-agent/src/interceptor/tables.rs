//! The contents of one classifier map set ([`SetTables`]), and a compiler from a plain list of
//! rules ([`PolicySpec`]) to it (sans-IO).
//!
//! Policy files go through `policy::compile` and `super::from_policy`; a [`PolicySpec`] is the
//! programmatic way (tests, tools). Either way the kernel gets one [`Rule`] per rule, the `any`
//! masks, and per (family, direction) LPM entries whose [`RuleSet`] already contains the rules of
//! every ancestor prefix, because an LPM lookup only returns the longest matching entry.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    str::FromStr,
};

use hoshino_common::{
    FAMILY_ANY, FAMILY_V4, FAMILY_V6, LPM_ENTRIES_PER_SET, MAX_RULES, RULE_MATCH_PORT,
    RULE_MATCH_PROTO, RULE_MATCH_UID, Rule, RuleSet, SetMeta, Verdict,
};

/// Why a policy does not fit the classifier's maps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TablesError {
    #[error("{count} rules, but the classifier holds at most {MAX_RULES}")]
    TooManyRules { count: usize },
    #[error(
        "{count} {family} {direction} prefixes after merging, but one trie holds at most {LPM_ENTRIES_PER_SET}"
    )]
    TooManyPrefixes {
        family: &'static str,
        direction: &'static str,
        count: usize,
    },
    #[error("{rules} kernel rules but {names} rule names")]
    NameCountMismatch { rules: usize, names: usize },
    #[error("prefix length {len} is longer than {max} for {addr}")]
    PrefixTooLong { addr: IpAddr, len: u8, max: u8 },
    #[error("`{input}` is not a prefix (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8 or fd00::/8)")]
    BadPrefix { input: String },
    #[error("rule `{rule}`: empty {what} range {start}..={end}")]
    EmptyRange {
        rule: String,
        what: &'static str,
        start: u32,
        end: u32,
    },
}

/// An address prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// `addr/len`, host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, TablesError> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if len > max {
            return Err(TablesError::PrefixTooLong { addr, len, max });
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), len))),
        };
        Ok(Self { addr, len })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a default route (`/0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = TablesError;

    /// `ADDRESS/LENGTH`; a bare address is a host prefix (/32 or /128).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = || TablesError::BadPrefix {
            input: input.to_owned(),
        };
        let (addr, len) = match input.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                (addr, len.parse::<u8>().map_err(|_| bad())?)
            }
            None => {
                let addr: IpAddr = input.parse().map_err(|_| bad())?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        Self::new(addr, len)
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        l => addr & (u32::MAX << (32 - u32::from(l.min(32)))),
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => addr & (u128::MAX << (128 - u32::from(l.min(128)))),
    }
}

/// Address family restriction of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Any,
    V4,
    V6,
}

/// One rule of a compiled policy, in priority order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Unique name, used as the `rule` label of the per-rule metrics.
    pub name: String,
    pub verdict: Verdict,
    /// Destination prefixes (either family); empty means any destination.
    pub dst: Vec<Prefix>,
    /// Source prefixes; empty means any source.
    pub src: Vec<Prefix>,
    /// Restricts the rule to one family (prefixes of one family already imply it).
    pub family: Family,
    /// IP protocol number (next header for IPv6 after extension headers).
    pub proto: Option<u8>,
    /// Destination ports, inclusive. Only TCP, UDP, SCTP and UDP-Lite packets have ports, and
    /// non-first fragments never match a rule with ports.
    pub dst_ports: Option<RangeInclusive<u16>>,
    /// Sending socket uids, inclusive (65534 also means "no full socket", see `hoshino-common`).
    pub uids: Option<RangeInclusive<u32>>,
}

impl RuleSpec {
    /// A rule matching everything with `verdict`; set the fields that constrain it.
    pub fn new(name: impl Into<String>, verdict: Verdict) -> Self {
        Self {
            name: name.into(),
            verdict,
            dst: Vec::new(),
            src: Vec::new(),
            family: Family::Any,
            proto: None,
            dst_ports: None,
            uids: None,
        }
    }
}

/// What the policy compiler hands to the interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// First match wins.
    pub rules: Vec<RuleSpec>,
    /// For packets no rule matches.
    pub default_verdict: Verdict,
}

/// The contents of one map set, with set-independent LPM entries (`(prefix, rules)`), plus the
/// rule names for the per-rule metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetTables {
    /// `rule_names[i]` names rule `i`.
    pub rule_names: Vec<String>,
    pub meta: SetMeta,
    pub rules: Vec<Rule>,
    pub dst_v4: Vec<(Prefix, RuleSet)>,
    pub src_v4: Vec<(Prefix, RuleSet)>,
    pub dst_v6: Vec<(Prefix, RuleSet)>,
    pub src_v6: Vec<(Prefix, RuleSet)>,
}

/// Compiles `policy` into map contents.
pub fn build_tables(policy: &PolicySpec) -> Result<SetTables, TablesError> {
    let count = policy.rules.len();
    if count > MAX_RULES as usize {
        return Err(TablesError::TooManyRules { count });
    }
    let mut meta = SetMeta {
        rule_count: count as u32,
        default_verdict: policy.default_verdict as u8,
        ..SetMeta::default()
    };
    let mut rules = Vec::with_capacity(count);
    let mut dst: [BTreeMap<Prefix, RuleSet>; 2] = Default::default();
    let mut src: [BTreeMap<Prefix, RuleSet>; 2] = Default::default();
    for (index, rule) in policy.rules.iter().enumerate() {
        let index = index as u32;
        rules.push(kernel_rule(rule)?);
        if rule.dst.is_empty() {
            meta.any_dst.insert(index);
        }
        if rule.src.is_empty() {
            meta.any_src.insert(index);
        }
        for prefix in &rule.dst {
            dst[family_slot(prefix)]
                .entry(*prefix)
                .or_default()
                .insert(index);
        }
        for prefix in &rule.src {
            src[family_slot(prefix)]
                .entry(*prefix)
                .or_default()
                .insert(index);
        }
    }
    let [dst_v4, dst_v6] = dst;
    let [src_v4, src_v6] = src;
    Ok(SetTables {
        rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
        meta,
        rules,
        dst_v4: fold_ancestors(dst_v4, "IPv4", "destination")?,
        src_v4: fold_ancestors(src_v4, "IPv4", "source")?,
        dst_v6: fold_ancestors(dst_v6, "IPv6", "destination")?,
        src_v6: fold_ancestors(src_v6, "IPv6", "source")?,
    })
}

fn family_slot(prefix: &Prefix) -> usize {
    match prefix.addr {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) => 1,
    }
}

fn kernel_rule(rule: &RuleSpec) -> Result<Rule, TablesError> {
    let mut out = Rule {
        verdict: rule.verdict as u8,
        family: match rule.family {
            Family::Any => FAMILY_ANY,
            Family::V4 => FAMILY_V4,
            Family::V6 => FAMILY_V6,
        },
        ..Rule::default()
    };
    if let Some(proto) = rule.proto {
        out.flags |= hoshino_common::RULE_MATCH_PROTO;
        out.proto = proto;
    }
    if let Some(ports) = &rule.dst_ports {
        if ports.is_empty() {
            return Err(TablesError::EmptyRange {
                rule: rule.name.clone(),
                what: "port",
                start: u32::from(*ports.start()),
                end: u32::from(*ports.end()),
            });
        }
        out.flags |= RULE_MATCH_PORT;
        out.port_min = *ports.start();
        out.port_max = *ports.end();
    }
    if let Some(uids) = &rule.uids {
        if uids.is_empty() {
            return Err(TablesError::EmptyRange {
                rule: rule.name.clone(),
                what: "uid",
                start: *uids.start(),
                end: *uids.end(),
            });
        }
        out.flags |= RULE_MATCH_UID;
        out.uid_min = *uids.start();
        out.uid_max = *uids.end();
    }
    debug_assert!(out.flags & !(RULE_MATCH_PROTO | RULE_MATCH_PORT | RULE_MATCH_UID) == 0);
    Ok(out)
}

/// Adds to each entry the rules of every shorter entry that contains it.
fn fold_ancestors(
    entries: BTreeMap<Prefix, RuleSet>,
    family: &'static str,
    direction: &'static str,
) -> Result<Vec<(Prefix, RuleSet)>, TablesError> {
    if entries.len() > LPM_ENTRIES_PER_SET as usize {
        return Err(TablesError::TooManyPrefixes {
            family,
            direction,
            count: entries.len(),
        });
    }
    let lookup: HashMap<Prefix, RuleSet> = entries.iter().map(|(p, s)| (*p, *s)).collect();
    Ok(entries
        .iter()
        .map(|(prefix, own)| {
            let folded = (0..prefix.len)
                .filter_map(|len| Prefix::new(prefix.addr, len).ok())
                .filter_map(|ancestor| lookup.get(&ancestor))
                .fold(*own, |acc, rules| acc.union(rules));
            (*prefix, folded)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_clears_host_bits_and_rejects_overlong_lengths() {
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("fd00:1::1/16").to_string(), "fd00::/16");
        assert_eq!(p("1.2.3.4").len(), 32);
        assert!(matches!(
            "10.0.0.0/33".parse::<Prefix>(),
            Err(TablesError::PrefixTooLong { .. })
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Prefix>(),
            Err(TablesError::BadPrefix { .. })
        ));
    }

    #[test]
    fn longer_prefixes_inherit_the_rules_of_their_ancestors() {
        let mut wide = RuleSpec::new("wide", Verdict::Drop);
        wide.dst = vec![p("10.0.0.0/8")];
        let mut narrow = RuleSpec::new("narrow", Verdict::Pass);
        narrow.dst = vec![p("10.1.0.0/16"), p("fd00::/8")];
        let any = RuleSpec::new("any", Verdict::Tunnel);
        let policy = PolicySpec {
            rules: vec![narrow, wide, any],
            default_verdict: Verdict::Pass,
        };
        let tables = build_tables(&policy).unwrap();
        let get = |prefix: &str| {
            tables
                .dst_v4
                .iter()
                .find(|(q, _)| *q == p(prefix))
                .map(|(_, s)| *s)
                .unwrap()
        };
        assert!(get("10.1.0.0/16").contains(0) && get("10.1.0.0/16").contains(1));
        assert!(!get("10.0.0.0/8").contains(0) && get("10.0.0.0/8").contains(1));
        assert!(tables.meta.any_dst.contains(2) && !tables.meta.any_dst.contains(0));
        assert_eq!(tables.meta.any_src.words[0], 0b111);
        assert_eq!(tables.dst_v6.len(), 1);
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let policy = PolicySpec {
            rules: (0..=MAX_RULES)
                .map(|i| RuleSpec::new(format!("r{i}"), Verdict::Pass))
                .collect(),
            default_verdict: Verdict::Pass,
        };
        assert_eq!(
            build_tables(&policy),
            Err(TablesError::TooManyRules {
                count: MAX_RULES as usize + 1
            })
        );
    }

    #[test]
    fn empty_port_range_is_an_error() {
        let mut rule = RuleSpec::new("r", Verdict::Pass);
        #[allow(clippy::reversed_empty_ranges)]
        {
            rule.dst_ports = Some(90..=80);
        }
        let policy = PolicySpec {
            rules: vec![rule],
            default_verdict: Verdict::Pass,
        };
        assert!(matches!(
            build_tables(&policy),
            Err(TablesError::EmptyRange { what: "port", .. })
        ));
    }
}
