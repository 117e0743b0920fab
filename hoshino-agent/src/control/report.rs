//! The `status` report: what the running agent says about itself. Built sans-IO from the
//! metrics and the activity snapshot; carried as JSON over the control socket.

use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, S3Op};
use crate::wire::mailbox::IDLE_AFTER;

use super::activity::{ActivitySnapshot, S3ErrorNote};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub address: Ipv6Addr,
    pub agent_version: String,
    pub uptime_seconds: u64,
    /// `up` while the last S3 call succeeded (or none failed yet), `down` after a failure until
    /// the next success.
    pub tunnel: String,
    /// `active` when a packet crossed the TUN within the last 10 s (the inbox's own idle
    /// threshold), else `idle`.
    pub mode: String,
    pub peers: Vec<PeerStatus>,
    pub s3_requests_total: u64,
    /// Over the last minute (or since start, when younger).
    pub s3_requests_per_second: f64,
    pub estimated_dollars: f64,
    pub last_s3_error: Option<S3ErrorNote>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub address: Ipv6Addr,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
    pub last_heard_unix_ms: Option<u64>,
}

/// Who this agent is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub addr: crate::node_addr::NodeAddr,
    pub started_at_unix_ms: u64,
}

pub fn s3_requests_total(metrics: &Metrics) -> u64 {
    S3Op::ALL.iter().map(|op| metrics.s3_requests(*op)).sum()
}

impl StatusReport {
    pub fn build(
        me: &Identity,
        metrics: &Metrics,
        activity: ActivitySnapshot,
        s3_requests_per_second: f64,
        now_unix_ms: u64,
    ) -> StatusReport {
        let up = match (&activity.last_s3_error, activity.last_s3_ok_unix_ms) {
            (None, _) => true,
            (Some(e), Some(ok)) => ok >= e.at_unix_ms,
            (Some(_), None) => false,
        };
        let active = activity
            .last_packet_unix_ms
            .is_some_and(|t| now_unix_ms.saturating_sub(t) < IDLE_AFTER.as_millis() as u64);
        StatusReport {
            name: me.name.clone(),
            address: me.addr.ip(),
            agent_version: crate::directory::record::AGENT_VERSION.to_string(),
            uptime_seconds: now_unix_ms.saturating_sub(me.started_at_unix_ms) / 1000,
            tunnel: if up { "up" } else { "down" }.into(),
            mode: if active { "active" } else { "idle" }.into(),
            peers: activity
                .peers
                .into_iter()
                .map(|(node, c)| PeerStatus {
                    node_id: node.to_string(),
                    address: me.addr.prefix.addr_of(node),
                    sent_packets: c.sent_packets,
                    sent_bytes: c.sent_bytes,
                    received_packets: c.received_packets,
                    received_bytes: c.received_bytes,
                    last_heard_unix_ms: c.last_heard_unix_ms,
                })
                .collect(),
            s3_requests_total: s3_requests_total(metrics),
            s3_requests_per_second,
            estimated_dollars: metrics.estimated_cost_dollars(),
            last_s3_error: activity.last_s3_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::activity::Activity;
    use crate::node_addr::{NetworkPrefix, NodeAddr, NodeId};

    fn me() -> Identity {
        Identity {
            name: "n1".into(),
            addr: NodeAddr {
                prefix: NetworkPrefix::default(),
                id: NodeId(1),
            },
            started_at_unix_ms: 1_000,
        }
    }

    #[test]
    fn a_fresh_agent_is_up_and_idle_with_no_peers() {
        let r = StatusReport::build(
            &me(),
            &Metrics::default(),
            Activity::default().snapshot(),
            0.0,
            61_000,
        );
        assert_eq!((r.tunnel.as_str(), r.mode.as_str()), ("up", "idle"));
        assert_eq!(r.uptime_seconds, 60);
        assert!(r.peers.is_empty() && r.last_s3_error.is_none());
    }

    #[test]
    fn traffic_makes_it_active_and_a_failure_after_the_last_success_makes_it_down() {
        let a = Activity::default();
        a.received(NodeId(2), 100, 50_000);
        a.s3_result::<()>(&Ok(()), 40_000);
        a.s3_result::<()>(
            &Err(crate::store::S3Error::TooLarge {
                key: "k".into(),
                size: 2,
                limit: 1,
            }),
            45_000,
        );
        let r = StatusReport::build(&me(), &Metrics::default(), a.snapshot(), 1.5, 55_000);
        assert_eq!((r.tunnel.as_str(), r.mode.as_str()), ("down", "active"));
        assert_eq!(
            r.peers[0].address,
            NetworkPrefix::default().addr_of(NodeId(2))
        );
        assert_eq!(r.peers[0].received_bytes, 100);
        a.s3_result::<()>(&Ok(()), 46_000);
        let r = StatusReport::build(&me(), &Metrics::default(), a.snapshot(), 1.5, 70_000);
        assert_eq!((r.tunnel.as_str(), r.mode.as_str()), ("up", "idle"));
        assert!(r.last_s3_error.is_some(), "the last error stays reported");
    }
}
