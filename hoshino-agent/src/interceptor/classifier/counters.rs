//! Reading the per-rule counters and the classifier's own drop counters (per-CPU, summed).

use aya::maps::PerCpuArray;
use hoshino_common::{
    DEFAULT_SLOT, EVENT_FLOW_TABLE_FULL, EVENT_NO_REDIRECT_TARGET, EVENT_UID_FLOW_CAP, RuleStats,
    stats_index,
};

use super::{Classifier, InterceptorError, MAP_EVENTS, MAP_STATS, map_err};

/// Packet and byte counters of one rule (or of the default verdict), summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounters {
    /// The rule's name; `default` for the default verdict.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The classifier's own drop counters (`HOSHINO_EVENTS`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassifierEvents {
    /// Divert packets of new flows dropped because the flow table was full.
    pub flow_table_full: u64,
    /// Tunnel/divert packets dropped because no redirect target was configured.
    pub no_redirect_target: u64,
    /// Divert packets of new flows dropped because their uid was at the per-uid cap.
    pub uid_flow_cap: u64,
}

impl Classifier {
    /// Per-rule counters of the active policy, in rule order, then `default`.
    pub fn rule_stats(&self) -> Result<Vec<RuleCounters>, InterceptorError> {
        let stats: PerCpuArray<_, RuleStats> = self.map(MAP_STATS)?;
        let set = self.config.active_set;
        let slots = self
            .rule_names
            .iter()
            .enumerate()
            .map(|(i, name)| (i as u32, name.as_str()))
            .chain(std::iter::once((DEFAULT_SLOT, "default")));
        let mut out = Vec::with_capacity(self.rule_names.len() + 1);
        for (slot, name) in slots {
            let values = stats
                .get(&stats_index(set, slot), 0)
                .map_err(map_err(MAP_STATS))?;
            let (packets, bytes) = values.iter().fold((0u64, 0u64), |(p, b), v| {
                (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
            });
            out.push(RuleCounters {
                name: name.to_owned(),
                packets,
                bytes,
            });
        }
        Ok(out)
    }

    /// The classifier's own drop counters, summed over CPUs.
    pub fn events(&self) -> Result<ClassifierEvents, InterceptorError> {
        let events: PerCpuArray<_, u64> = self.map(MAP_EVENTS)?;
        let sum = |slot: u32| -> Result<u64, InterceptorError> {
            let values = events.get(&slot, 0).map_err(map_err(MAP_EVENTS))?;
            Ok(values.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
        };
        Ok(ClassifierEvents {
            flow_table_full: sum(EVENT_FLOW_TABLE_FULL)?,
            no_redirect_target: sum(EVENT_NO_REDIRECT_TARGET)?,
            uid_flow_cap: sum(EVENT_UID_FLOW_CAP)?,
        })
    }
}
