//! The policy maps (rules, set metadata, the four LPM tries, per-rule stats) of one map set,
//! filled from [`SetTables`] and made active with one flip of the config map.

use std::io;

use aya::maps::{Array, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key};
use hoshino_common::{
    CONFIG_ENABLED, LPM_SET_BITS, LpmV4, LpmV6, MAP_SETS, MAX_RULES, Rule, RuleSet, RuleStats,
    STATS_SLOTS, SetMeta, rule_index, stats_index,
};

use super::{
    Classifier, InterceptorError, MAP_DST_V4, MAP_DST_V6, MAP_RULES, MAP_SETS_META, MAP_SRC_V4,
    MAP_SRC_V6, MAP_STATS, map_err,
};
use crate::interceptor::from_policy::{SetTables, TablesError, set_tables};
use crate::policy::{CompiledPolicy, Ipv4Prefix, Ipv6Prefix};

impl Classifier {
    /// Makes a compiled policy the classifier's policy, without detaching.
    pub fn install(&mut self, policy: &CompiledPolicy) -> Result<(), InterceptorError> {
        self.install_tables(&set_tables(policy)?)
    }

    /// Fills the inactive map set with `tables`, then flips the config map to it: packets see
    /// either the old or the new policy, never a mix. On error the previous policy stays active.
    pub fn install_tables(&mut self, tables: &SetTables) -> Result<(), InterceptorError> {
        if tables.rules.len() > MAX_RULES as usize {
            return Err(TablesError::TooManyRules {
                count: tables.rules.len(),
            }
            .into());
        }
        if tables.rule_names.len() != tables.rules.len() {
            return Err(TablesError::NameCountMismatch {
                rules: tables.rules.len(),
                names: tables.rule_names.len(),
            }
            .into());
        }
        let set = (self.config.active_set + 1) % MAP_SETS;
        self.fill_set(set, tables)?;
        let mut config = self.config;
        config.active_set = set;
        config.flags |= CONFIG_ENABLED;
        self.write_config(config)?;
        self.rule_names = tables.rule_names.clone();
        Ok(())
    }

    /// The map set the classifier uses now.
    pub fn active_set(&self) -> u32 {
        self.config.active_set
    }

    fn fill_set(&mut self, set: u32, tables: &SetTables) -> Result<(), InterceptorError> {
        let set_byte = set as u8;
        fill_trie::<Ipv4Prefix>(
            self.map_mut(MAP_DST_V4)?,
            MAP_DST_V4,
            set_byte,
            &tables.dst_v4,
        )?;
        fill_trie::<Ipv4Prefix>(
            self.map_mut(MAP_SRC_V4)?,
            MAP_SRC_V4,
            set_byte,
            &tables.src_v4,
        )?;
        fill_trie::<Ipv6Prefix>(
            self.map_mut(MAP_DST_V6)?,
            MAP_DST_V6,
            set_byte,
            &tables.dst_v6,
        )?;
        fill_trie::<Ipv6Prefix>(
            self.map_mut(MAP_SRC_V6)?,
            MAP_SRC_V6,
            set_byte,
            &tables.src_v6,
        )?;

        let mut rules: Array<_, Rule> = self.map_mut(MAP_RULES)?;
        for index in 0..MAX_RULES {
            let rule = tables
                .rules
                .get(index as usize)
                .copied()
                .unwrap_or_default();
            rules
                .set(rule_index(set, index), rule, 0)
                .map_err(map_err(MAP_RULES))?;
        }

        let cpus = aya::util::nr_cpus().map_err(|(_, e)| InterceptorError::Cpus(e))?;
        let mut stats: PerCpuArray<_, RuleStats> = self.map_mut(MAP_STATS)?;
        for slot in 0..STATS_SLOTS {
            let zero = PerCpuValues::try_from(vec![RuleStats::default(); cpus])
                .map_err(|e| InterceptorError::Cpus(io::Error::other(e)))?;
            stats
                .set(stats_index(set, slot), zero, 0)
                .map_err(map_err(MAP_STATS))?;
        }

        let mut meta: Array<_, SetMeta> = self.map_mut(MAP_SETS_META)?;
        meta.set(set, tables.meta, 0)
            .map_err(map_err(MAP_SETS_META))?;
        Ok(())
    }
}

/// A policy prefix as an LPM key of one map set: the set byte, then the address bytes; the
/// key's length counts the set byte's bits too.
trait LpmPrefix {
    type Data: aya::Pod;
    fn key(&self, set: u8) -> Key<Self::Data>;
    fn set_of(data: &Self::Data) -> u8;
}

impl LpmPrefix for Ipv4Prefix {
    type Data = LpmV4;

    fn key(&self, set: u8) -> Key<LpmV4> {
        let mut data = [0u8; 5];
        data[0] = set;
        data[1..].copy_from_slice(&self.addr().octets());
        Key::new(LPM_SET_BITS + u32::from(self.prefix_len()), data)
    }

    fn set_of(data: &LpmV4) -> u8 {
        data[0]
    }
}

impl LpmPrefix for Ipv6Prefix {
    type Data = LpmV6;

    fn key(&self, set: u8) -> Key<LpmV6> {
        let mut data = [0u8; 17];
        data[0] = set;
        data[1..].copy_from_slice(&self.addr().octets());
        Key::new(LPM_SET_BITS + u32::from(self.prefix_len()), data)
    }

    fn set_of(data: &LpmV6) -> u8 {
        data[0]
    }
}

/// Replaces map set `set`'s entries in one trie with `entries`.
fn fill_trie<P: LpmPrefix>(
    mut trie: LpmTrie<&mut MapData, P::Data, RuleSet>,
    name: &'static str,
    set: u8,
    entries: &[(P, RuleSet)],
) -> Result<(), InterceptorError> {
    let stale: Vec<Key<P::Data>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|key| P::set_of(&key.data()) == set)
        .collect();
    for key in &stale {
        match trie.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    for (prefix, rules) in entries {
        trie.insert(&prefix.key(set), rules, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}
