//! The directory as read at one moment: every valid record with its staleness, the names two
//! node ids claim, and what was refused. Sans-IO: `now` is passed in.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use crate::node_addr::NodeId;

use super::STALE_AFTER;
use super::name::NodeName;
use super::record::{NodeRecord, UnixMillis};

/// One record and what the reader made of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub record: NodeRecord,
    /// Not refreshed for `STALE_AFTER`: kept and listed, still resolvable, marked.
    pub stale: bool,
    /// Another node id publishes the same name.
    pub collides: bool,
}

/// An object under `v2/nodes/` that was not taken into the directory, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: String,
    pub reason: String,
}

/// What a name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Address(Ipv6Addr),
    /// No record has this name.
    Unknown,
    /// Several node ids claim the name: none of them is answered (never a silent pick).
    Ambiguous(Vec<NodeId>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// Sorted by name, then node id.
    entries: Vec<Entry>,
    rejected: Vec<Rejected>,
}

impl Directory {
    pub fn new(records: Vec<NodeRecord>, rejected: Vec<Rejected>, now: UnixMillis) -> Directory {
        let mut by_name: BTreeMap<NodeName, usize> = BTreeMap::new();
        for r in &records {
            *by_name.entry(r.name.clone()).or_default() += 1;
        }
        let stale_ms = STALE_AFTER.as_millis() as u64;
        let mut entries: Vec<Entry> = records
            .into_iter()
            .map(|record| Entry {
                stale: now.saturating_sub(record.refreshed_at) > stale_ms,
                collides: by_name.get(&record.name).copied().unwrap_or(0) > 1,
                record,
            })
            .collect();
        entries
            .sort_by(|a, b| (&a.record.name, a.record.node).cmp(&(&b.record.name, b.record.node)));
        Directory { entries, rejected }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Names claimed by more than one node id, with those ids.
    pub fn collisions(&self) -> Vec<(NodeName, Vec<NodeId>)> {
        let mut out: BTreeMap<NodeName, Vec<NodeId>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.collides) {
            out.entry(e.record.name.clone())
                .or_default()
                .push(e.record.node);
        }
        out.into_iter().collect()
    }

    /// `name` is one label, compared case-insensitively as DNS does.
    pub fn resolve(&self, name: &str) -> Resolution {
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.record.name.as_str().eq_ignore_ascii_case(name))
            .collect();
        match matching.as_slice() {
            [] => Resolution::Unknown,
            [one] => Resolution::Address(one.record.addr),
            many => Resolution::Ambiguous(many.iter().map(|e| e.record.node).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn a_unique_name_resolves_to_its_address_in_any_case() {
        let d = Directory::new(
            vec![
                NodeRecord::sample(1, "web", 0),
                NodeRecord::sample(2, "db", 0),
            ],
            vec![],
            0,
        );
        assert_eq!(
            d.resolve("DB"),
            Resolution::Address(Ipv6Addr::from((0xfd00u128 << 112) | 2))
        );
        assert_eq!(d.resolve("cache"), Resolution::Unknown);
    }

    #[test]
    fn a_name_two_nodes_claim_resolves_to_neither_and_is_reported() {
        let d = Directory::new(
            vec![
                NodeRecord::sample(1, "web", 0),
                NodeRecord::sample(2, "web", 0),
                NodeRecord::sample(3, "db", 0),
            ],
            vec![],
            0,
        );
        assert_eq!(
            d.resolve("web"),
            Resolution::Ambiguous(vec![NodeId(1), NodeId(2)])
        );
        assert_eq!(
            d.collisions(),
            vec![("web".parse().expect("name"), vec![NodeId(1), NodeId(2)])]
        );
        let flagged: Vec<bool> = d.entries().iter().map(|e| e.collides).collect();
        // Sorted by name: db, web(1), web(2).
        assert_eq!(flagged, vec![false, true, true]);
    }

    #[test]
    fn a_record_not_refreshed_for_the_stale_time_is_marked_stale_not_dropped() {
        let stale_h = STALE_AFTER.as_millis() as u64 / HOUR;
        let now = 100 * HOUR;
        let d = Directory::new(
            vec![
                NodeRecord::sample(1, "fresh", now - HOUR),
                NodeRecord::sample(2, "old", now - (stale_h + 1) * HOUR),
            ],
            vec![],
            now,
        );
        let stale: Vec<(&str, bool)> = d
            .entries()
            .iter()
            .map(|e| (e.record.name.as_str(), e.stale))
            .collect();
        assert_eq!(stale, vec![("fresh", false), ("old", true)]);
        assert!(matches!(d.resolve("old"), Resolution::Address(_)));
    }
}
