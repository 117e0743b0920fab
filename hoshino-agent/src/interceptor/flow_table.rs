//! The classifier's flow map (`HOSHINO_FLOWS`, a plain hash; layout in `hoshino-common`) and its
//! per-uid counts (`HOSHINO_UID_FLOWS`) through handles of their own, so the periodic sweep does
//! not hold the classifier's lock (which the divert path takes per packet) while it walks up to
//! `FLOW_CAPACITY` entries.

use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, MapError};
use hoshino_common::{FlowKey, FlowValue};

use super::InterceptorError;

const MAP_FLOWS: &str = "HOSHINO_FLOWS";
const MAP_UID_FLOWS: &str = "HOSHINO_UID_FLOWS";

/// How long a diverted flow may go without a packet before the sweep removes its entry (the
/// divert proxy forgets idle flows after the same time).
pub const FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often `attach` sweeps the flow map.
pub const FLOW_SWEEP_EVERY: Duration = Duration::from_secs(30);

fn map_err(source: MapError) -> InterceptorError {
    InterceptorError::Map {
        map: MAP_FLOWS,
        source: Box::new(source),
    }
}

fn uid_map_err(source: MapError) -> InterceptorError {
    InterceptorError::Map {
        map: MAP_UID_FLOWS,
        source: Box::new(source),
    }
}

/// An independent handle on the flow map and the per-uid counts.
pub struct FlowTable {
    map: HashMap<MapData, FlowKey, FlowValue>,
    uids: HashMap<MapData, u32, u32>,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable").finish_non_exhaustive()
    }
}

impl FlowTable {
    /// The flow map and the per-uid counts from descriptors of their own (see
    /// `Classifier::flow_table`).
    pub(crate) fn from_fds(
        flows: std::os::fd::OwnedFd,
        uid_flows: std::os::fd::OwnedFd,
    ) -> Result<Self, InterceptorError> {
        let data = MapData::from_fd(flows).map_err(map_err)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err)?;
        let data = MapData::from_fd(uid_flows).map_err(uid_map_err)?;
        let uids = HashMap::try_from(Map::HashMap(data)).map_err(uid_map_err)?;
        Ok(Self { map, uids })
    }

    /// The recorded flow count of `uid` as the classifier sees it (for the per-uid cap).
    pub fn uid_count(&self, uid: u32) -> Result<u32, InterceptorError> {
        match self.uids.get(&uid, 0) {
            Ok(count) => Ok(count),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(uid_map_err(e)),
        }
    }

    /// Recomputes the per-uid counts from the flow map (removals do not decrement them).
    pub fn recount(&mut self) -> Result<(), InterceptorError> {
        let entries = self.entries()?;
        let counts = uid_counts(&entries);
        let stale: Vec<u32> = self
            .uids
            .keys()
            .filter_map(Result::ok)
            .filter(|uid| !counts.contains_key(uid))
            .collect();
        for uid in stale {
            match self.uids.remove(&uid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(uid_map_err(e)),
            }
        }
        for (uid, count) in counts {
            self.uids.insert(uid, count, 0).map_err(uid_map_err)?;
        }
        Ok(())
    }

    /// The entry of one 5-tuple, if recorded.
    pub fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>, InterceptorError> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Inserts or replaces an entry (tests use it to fill the table).
    pub fn insert(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), InterceptorError> {
        self.map.insert(key, value, 0).map_err(map_err)
    }

    /// Removes one entry; false if it was not there.
    pub fn remove(&mut self, key: &FlowKey) -> Result<bool, InterceptorError> {
        match self.map.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(map_err(e)),
        }
    }

    /// Removes the entry of a flow that has ended (the divert proxy closed its connection) and
    /// takes it off its uid's count, so a uid's short connections do not pile up against the
    /// per-uid cap until the next sweep. The decrement is a read-modify-write that can race the
    /// classifier's own increment; `recount` (every sweep) corrects any drift.
    pub fn forget(&mut self, key: &FlowKey) -> Result<bool, InterceptorError> {
        let Some(value) = self.get(key)? else {
            return Ok(false);
        };
        if !self.remove(key)? {
            return Ok(false);
        }
        match self.uids.get(&value.uid, 0) {
            Ok(count) if count > 1 => self
                .uids
                .insert(value.uid, count - 1, 0)
                .map_err(uid_map_err)?,
            Ok(_) => match self.uids.remove(&value.uid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(uid_map_err(e)),
            },
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(uid_map_err(e)),
        }
        Ok(true)
    }

    /// Every entry (a snapshot; the classifier keeps writing meanwhile).
    pub fn entries(&self) -> Result<Vec<(FlowKey, FlowValue)>, InterceptorError> {
        self.map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err)
    }

    /// Removes every entry (and the per-uid counts); returns how many flows were removed.
    pub fn clear(&mut self) -> Result<usize, InterceptorError> {
        let keys: Vec<FlowKey> = self.map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for key in &keys {
            if self.remove(key)? {
                removed += 1;
            }
        }
        self.recount()?;
        Ok(removed)
    }

    /// Removes the entries idle longer than `idle` at `now_ns` (CLOCK_MONOTONIC, the clock of
    /// `bpf_ktime_get_ns`), then recounts the per-uid counts; returns how many were removed.
    pub fn sweep(&mut self, now_ns: u64, idle: Duration) -> Result<usize, InterceptorError> {
        let entries = self.entries()?;
        let mut removed = 0;
        for key in idle_flows(&entries, now_ns, idle) {
            // Re-check: a packet may have refreshed the entry since the snapshot.
            if let Some(value) = self.get(&key)?
                && is_idle(&value, now_ns, idle)
                && self.remove(&key)?
            {
                removed += 1;
            }
        }
        self.recount()?;
        Ok(removed)
    }
}

/// Recorded flows per uid.
pub fn uid_counts(entries: &[(FlowKey, FlowValue)]) -> std::collections::HashMap<u32, u32> {
    let mut counts = std::collections::HashMap::new();
    for (_, value) in entries {
        *counts.entry(value.uid).or_insert(0u32) += 1;
    }
    counts
}

fn is_idle(value: &FlowValue, now_ns: u64, idle: Duration) -> bool {
    let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
    now_ns.saturating_sub(value.last_seen_ns) > idle_ns
}

/// The keys of `entries` whose last packet is more than `idle` before `now_ns`.
pub fn idle_flows(entries: &[(FlowKey, FlowValue)], now_ns: u64, idle: Duration) -> Vec<FlowKey> {
    entries
        .iter()
        .filter(|(_, value)| is_idle(value, now_ns, idle))
        .map(|(key, _)| *key)
        .collect()
}

/// Now on CLOCK_MONOTONIC in nanoseconds, the clock the classifier stamps flows with.
pub fn monotonic_now_ns() -> u64 {
    // SAFETY: a zeroed timespec is a valid out argument.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(port: u16, last_seen_ns: u64) -> (FlowKey, FlowValue) {
        (
            FlowKey {
                src_port: port,
                ..FlowKey::default()
            },
            FlowValue {
                last_seen_ns,
                ..FlowValue::default()
            },
        )
    }

    #[test]
    fn only_flows_idle_longer_than_the_timeout_are_swept() {
        let s = 1_000_000_000;
        let entries = [flow(1, 10 * s), flow(2, 690 * s), flow(3, 700 * s)];
        let ports = |idle: Duration| {
            idle_flows(&entries, 1000 * s, idle)
                .iter()
                .map(|k| k.src_port)
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(Duration::from_secs(320)), [1]);
        assert_eq!(
            ports(Duration::from_secs(300)),
            [1, 2],
            "exactly 300 s idle stays"
        );
        assert_eq!(ports(Duration::from_secs(299)), [1, 2, 3]);
    }

    #[test]
    fn uid_counts_count_flows_per_uid() {
        let mut entries = vec![flow(1, 0), flow(2, 0), flow(3, 0)];
        entries[2].1.uid = 1000;
        let counts = uid_counts(&entries);
        assert_eq!(counts.get(&0), Some(&2));
        assert_eq!(counts.get(&1000), Some(&1));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn a_flow_stamped_after_now_is_not_idle() {
        let entries = [flow(1, 2_000)];
        assert!(idle_flows(&entries, 1_000, Duration::ZERO).is_empty());
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(a > 0 && b >= a);
    }
}
