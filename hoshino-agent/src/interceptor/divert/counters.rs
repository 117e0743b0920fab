//! Counters of the divert path (plain divert and the terminating proxy), registered into the
//! agent's scrape by `metrics.rs`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::ReasonLabels;

/// Refusal reasons (the `reason` label); each refusal counts under exactly one.
pub const REFUSAL_REASONS: [&str; 21] = [
    "target_not_origin_form",
    "target_too_long",
    "target_fragment",
    "target_query",
    "target_empty_segment",
    "target_dot_segment",
    "target_forbidden_byte",
    "target_bad_percent",
    "target_needless_percent",
    "malformed",
    "head_too_large",
    "too_many_headers",
    "body",
    "duplicate_header",
    "expect",
    "bad_header_value",
    "table_full",
    "uid_cap",
    "timeout",
    "tuple_mismatch",
    "other",
];

#[derive(Debug, Default)]
pub struct DivertStats {
    /// Packets read from the divert TUN.
    pub packets: AtomicU64,
    /// Plain-divert packets reinjected or dropped.
    pub reinjected: AtomicU64,
    pub dropped: AtomicU64,
    /// Packets without a flow entry or rule (dropped: fail closed).
    pub unknown_flow: AtomicU64,
    pub malformed: AtomicU64,
    /// Connections the proxy terminated.
    pub connections: AtomicU64,
    /// Judged requests, by verdict.
    pub allowed: AtomicU64,
    pub reset: AtomicU64,
    pub forbidden: AtomicU64,
    /// Connections the proxy reset (refused requests).
    pub resets: AtomicU64,
    /// Forwarded requests the server did not answer usably (the client got a 502).
    pub upstream_errors: AtomicU64,
    /// I/O errors on the TUN or the reinjection sockets.
    pub errors: AtomicU64,
    refusals: [AtomicU64; REFUSAL_REASONS.len()],
}

impl DivertStats {
    /// Counts a refusal; an unknown reason counts as `other`.
    pub fn refused(&self, reason: &str) {
        let i = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSAL_REASONS.len() - 1);
        if let Some(c) = self.refusals.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn refusals(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refusals.get(i))
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Registers the counters for one scrape (values read now; see `metrics.rs`).
    pub fn register(&self, r: &mut Registry) {
        for (name, help, v) in [
            (
                "hoshino_divert_packets",
                "Packets read from the divert TUN",
                &self.packets,
            ),
            (
                "hoshino_divert_reinjected",
                "Packets of plain divert rules reinjected",
                &self.reinjected,
            ),
            (
                "hoshino_divert_dropped",
                "Packets of plain divert rules dropped",
                &self.dropped,
            ),
            (
                "hoshino_divert_unknown_flow",
                "Diverted packets without a flow entry or divert rule (dropped)",
                &self.unknown_flow,
            ),
            (
                "hoshino_divert_malformed",
                "Diverted packets that did not parse (dropped)",
                &self.malformed,
            ),
            (
                "hoshino_divert_connections",
                "Connections the metadata proxy terminated",
                &self.connections,
            ),
            (
                "hoshino_divert_resets",
                "Connections the metadata proxy reset on a refused request",
                &self.resets,
            ),
            (
                "hoshino_divert_upstream_errors",
                "Allowed requests the server did not answer usably (502 to the client)",
                &self.upstream_errors,
            ),
            (
                "hoshino_divert_errors",
                "I/O errors on the divert TUN or the reinjection sockets",
                &self.errors,
            ),
        ] {
            r.register(name, help, ConstCounter::new(v.load(Relaxed)));
        }
        let requests: Family<VerdictLabels, Counter> = Family::default();
        for (verdict, v) in [
            ("allow", &self.allowed),
            ("reset", &self.reset),
            ("forbid", &self.forbidden),
        ] {
            requests
                .get_or_create(&VerdictLabels { verdict })
                .inc_by(v.load(Relaxed));
        }
        r.register(
            "hoshino_divert_requests",
            "HTTP requests judged by the metadata proxy, by verdict",
            requests,
        );
        let refusals: Family<ReasonLabels, Counter> = Family::default();
        for (reason, v) in REFUSAL_REASONS.iter().zip(self.refusals.iter()) {
            refusals
                .get_or_create(&ReasonLabels {
                    reason: (*reason).to_string(),
                })
                .inc_by(v.load(Relaxed));
        }
        r.register(
            "hoshino_divert_refusals",
            "Requests and connections refused before the policy was asked, by reason",
            refusals,
        );
    }
}

/// `{verdict}` of `hoshino_divert_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_under_their_reason_and_render() {
        let s = DivertStats::default();
        s.refused("target_dot_segment");
        s.refused("no-such-reason");
        s.allowed.fetch_add(2, Relaxed);
        assert_eq!(s.refusals("target_dot_segment"), 1);
        assert_eq!(s.refusals("other"), 1);
        let m = crate::metrics::Metrics::default();
        m.divert.refused("target_dot_segment");
        m.divert.refused("no-such-reason");
        m.divert.allowed.fetch_add(2, Relaxed);
        let text = m.render();
        assert!(
            text.contains("hoshino_divert_refusals_total{reason=\"target_dot_segment\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hoshino_divert_requests_total{verdict=\"allow\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hoshino_divert_connections_total counter"),
            "{text}"
        );
    }
}
