//! The node directory in the bucket: each node's record under `v2/nodes/<node id:16hex>`.
//!
//! - `name`: node names (one DNS label). `record`: the sans-IO record codec. `table`: the
//!   directory as read at one moment (staleness, collisions, resolution), sans-IO.
//! - `read`: LIST + GET of every record through a `Store`. `publish`: the agent's own record,
//!   PUT at start and every `REFRESH_PERIOD`.
//!
//! IAM lets node X PUT only `v2/nodes/X` and GET/LIST all of `v2/nodes/`; the parser refuses a
//! record naming another node than its key, so no node can speak for another.

pub mod name;
pub mod publish;
pub mod read;
pub mod record;
pub mod refresh;
pub mod table;

use std::time::Duration;

use crate::node_addr::NodeId;
use crate::wire::mailbox::KEY_VERSION;

/// How often an agent re-PUTs its record: 4 PUTs a day, 120 a node-month, $0.0006 at AWS list
/// prices ($0.005 per 1,000 PUTs).
pub const REFRESH_PERIOD: Duration = Duration::from_secs(6 * 3600);
/// A record not refreshed for this long (four missed refreshes) is stale: listed and marked,
/// never deleted.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `v2/nodes/`: what readers LIST.
pub fn nodes_prefix() -> String {
    format!("{KEY_VERSION}/nodes/")
}

pub fn record_key(node: NodeId) -> String {
    format!("{KEY_VERSION}/nodes/{node}")
}

/// The node a record key belongs to: exactly `v2/nodes/<16 lowercase hex>`, nothing else (IAM's
/// `*` is not involved here, the node's own key is a literal ARN).
pub fn parse_record_key(key: &str) -> Option<NodeId> {
    key.strip_prefix(&nodes_prefix())?.parse().ok()
}

/// Wall-clock now in unix milliseconds (the edge of the directory's sans-IO parts).
pub fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_parse_back_and_nothing_else_does() {
        let node = NodeId(0x0123_4567_89ab_cdef);
        assert_eq!(record_key(node), "v2/nodes/0123456789abcdef");
        assert_eq!(parse_record_key(&record_key(node)), Some(node));
        for bad in [
            "v2/nodes/0123456789ABCDEF",
            "v2/nodes/0123456789abcdef/x",
            "v2/nodes/0123456789abcde",
            "v2/nodes/",
            "v1/nodes/0123456789abcdef",
        ] {
            assert_eq!(parse_record_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn refresh_costs_well_under_a_cent_per_node_month_and_stale_needs_several_misses() {
        let puts_per_month = (30 * 24 * 3600) / REFRESH_PERIOD.as_secs();
        let dollars = puts_per_month as f64 * 0.005 / 1000.0;
        assert!(dollars < 0.001, "{dollars}");
        assert!(STALE_AFTER >= 3 * REFRESH_PERIOD);
    }
}
