//! The classifier's maps; layout and meaning are documented in `hoshino-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use hoshino_common::{
    Config, EVENT_SLOTS, FLOW_CAPACITY, FlowKey, FlowValue, LPM_CAPACITY, LpmV4, LpmV6, MAP_SETS,
    MAX_RULES, Rule, RuleSet, RuleStats, STATS_SLOTS, SetMeta, UID_FLOWS_CAPACITY,
};

#[map(name = "HOSHINO_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "HOSHINO_SETS")]
pub static SETS: Array<SetMeta> = Array::with_max_entries(MAP_SETS, 0);

#[map(name = "HOSHINO_RULES")]
pub static RULES: Array<Rule> = Array::with_max_entries(MAP_SETS * MAX_RULES, 0);

#[map(name = "HOSHINO_DST_V4")]
pub static DST_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::with_max_entries(LPM_CAPACITY, 0);

#[map(name = "HOSHINO_SRC_V4")]
pub static SRC_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::with_max_entries(LPM_CAPACITY, 0);

#[map(name = "HOSHINO_DST_V6")]
pub static DST_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::with_max_entries(LPM_CAPACITY, 0);

#[map(name = "HOSHINO_SRC_V6")]
pub static SRC_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::with_max_entries(LPM_CAPACITY, 0);

#[map(name = "HOSHINO_STATS")]
pub static STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAP_SETS * STATS_SLOTS, 0);

// A plain hash, not an LRU: when full, new flows are refused rather than live ones evicted.
#[map(name = "HOSHINO_FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(FLOW_CAPACITY, 0);

#[map(name = "HOSHINO_UID_FLOWS")]
pub static UID_FLOWS: HashMap<u32, u32> = HashMap::with_max_entries(UID_FLOWS_CAPACITY, 0);

#[map(name = "HOSHINO_EVENTS")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_SLOTS, 0);
