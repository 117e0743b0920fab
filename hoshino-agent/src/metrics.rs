//! Counters, gauges and histograms on atomics, rendered in the Prometheus text format.
//! Sans-IO: the HTTP listener is `metrics_http.rs`.

use std::fmt::Write;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// An S3 operation, the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Op {
    Put,
    Get,
    List,
    Head,
    Delete,
    /// One DeleteObjects request (up to 1,000 keys), billed as a POST.
    DeleteObjects,
}

impl S3Op {
    pub const ALL: [S3Op; 6] = [
        S3Op::Put,
        S3Op::Get,
        S3Op::List,
        S3Op::Head,
        S3Op::Delete,
        S3Op::DeleteObjects,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            S3Op::Put => "put",
            S3Op::Get => "get",
            S3Op::List => "list",
            S3Op::Head => "head",
            S3Op::Delete => "delete",
            S3Op::DeleteObjects => "delete_objects",
        }
    }

    /// AWS S3 Standard list price per request, in dollars: PUT/LIST $0.005 per 1,000,
    /// GET/HEAD $0.0004 per 1,000, DELETE free, DeleteObjects (a POST) $0.005 per 1,000.
    pub fn price_dollars(self) -> f64 {
        match self {
            S3Op::Put | S3Op::List | S3Op::DeleteObjects => 0.005 / 1000.0,
            S3Op::Get | S3Op::Head => 0.0004 / 1000.0,
            S3Op::Delete => 0.0,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a packet that was ours to carry was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    EgressBufferFull,
    PutFailed,
    TunWriteFailed,
    SpoofedSource,
    WrongDestination,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::EgressBufferFull,
        DropReason::PutFailed,
        DropReason::TunWriteFailed,
        DropReason::SpoofedSource,
        DropReason::WrongDestination,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::EgressBufferFull => "egress_buffer_full",
            DropReason::PutFailed => "put_failed",
            DropReason::TunWriteFailed => "tun_write_failed",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::WrongDestination => "wrong_destination",
        }
    }
}

/// Why a packet read from the TUN was not ours to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    NotIpv6,
    Malformed,
    OutsidePrefix,
    ToSelf,
    ForeignSource,
}

impl IgnoreReason {
    pub const ALL: [IgnoreReason; 5] = [
        IgnoreReason::NotIpv6,
        IgnoreReason::Malformed,
        IgnoreReason::OutsidePrefix,
        IgnoreReason::ToSelf,
        IgnoreReason::ForeignSource,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::NotIpv6 => "not_ipv6",
            IgnoreReason::Malformed => "malformed",
            IgnoreReason::OutsidePrefix => "outside_prefix",
            IgnoreReason::ToSelf => "to_self",
            IgnoreReason::ForeignSource => "foreign_source",
        }
    }
}

/// Bundle rejection reasons: `BundleError::reason()` plus `bad_key` (an unparsable key).
pub const REJECT_REASONS: [&str; 15] = [
    "oversized",
    "bad_magic",
    "bad_version",
    "bad_flags",
    "truncated",
    "bad_count",
    "bad_packet",
    "length_mismatch",
    "bad_mac",
    "unauthenticated",
    "no_key",
    "sender_mismatch",
    "wrong_destination",
    "bad_key",
    // The header's session/seq differ from the key's (a bundle replayed under another key).
    "key_mismatch",
];

/// Upper bounds (seconds) of the S3 latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b)
            && let Some(b) = self.buckets.get(i)
        {
            b.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// A kernel-side rule counter snapshot, filled by the interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub egress_packets: AtomicU64,
    pub egress_bytes: AtomicU64,
    pub ingress_packets: AtomicU64,
    pub ingress_bytes: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    ignored: [AtomicU64; IgnoreReason::ALL.len()],
    rejected: [AtomicU64; REJECT_REASONS.len()],
    s3_requests: [AtomicU64; S3Op::ALL.len()],
    s3_errors: [AtomicU64; S3Op::ALL.len()],
    s3_latency: [Histogram; S3Op::ALL.len()],
    heartbeat_interval_micros: AtomicU64,
    heartbeat_idle: AtomicU64,
    pub reorder_skipped: AtomicU64,
    pub duplicate_bundles: AtomicU64,
    pub bells_rung: AtomicU64,
    pub egress_buffer_bytes: AtomicU64,
    rules: RwLock<Vec<RuleCounter>>,
    /// The divert path's counters (the metadata proxy's among them).
    pub divert: std::sync::Arc<crate::interceptor::divert::counters::DivertStats>,
    classifier_flow_table_full: AtomicU64,
    classifier_no_redirect_target: AtomicU64,
    classifier_uid_flow_cap: AtomicU64,
}

impl Metrics {
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if let Some(c) = self.dropped.get(reason as usize) {
            c.fetch_add(n, Relaxed);
        }
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped
            .get(reason as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    pub fn ignored(&self, reason: IgnoreReason) {
        if let Some(c) = self.ignored.get(reason as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn ignored_count(&self, reason: IgnoreReason) -> u64 {
        self.ignored
            .get(reason as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Counts a rejected bundle; unknown reasons land on the last known label rather than vanish.
    pub fn rejected(&self, reason: &str) {
        let i = REJECT_REASONS.iter().position(|r| *r == reason);
        if let Some(c) = i.and_then(|i| self.rejected.get(i)) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn rejected_count(&self, reason: &str) -> u64 {
        REJECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.rejected.get(i))
            .map_or(0, |c| c.load(Relaxed))
    }

    pub fn s3_request(&self, op: S3Op, took: Duration, ok: bool) {
        let i = op.index();
        if let Some(c) = self.s3_requests.get(i) {
            c.fetch_add(1, Relaxed);
        }
        if !ok && let Some(c) = self.s3_errors.get(i) {
            c.fetch_add(1, Relaxed);
        }
        if let Some(h) = self.s3_latency.get(i) {
            h.observe(took);
        }
    }

    pub fn s3_requests(&self, op: S3Op) -> u64 {
        self.s3_requests
            .get(op.index())
            .map_or(0, |c| c.load(Relaxed))
    }

    pub fn set_heartbeat(&self, interval: Duration, idle: bool) {
        self.heartbeat_interval_micros.store(
            u64::try_from(interval.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        self.heartbeat_idle.store(u64::from(idle), Relaxed);
    }

    /// Dollars spent on requests so far at AWS list prices.
    pub fn estimated_cost_dollars(&self) -> f64 {
        S3Op::ALL
            .iter()
            .map(|op| self.s3_requests(*op) as f64 * op.price_dollars())
            .sum()
    }

    /// Replaces the per-rule counters (a snapshot read from the classifier's maps).
    pub fn set_rule_counters(&self, rules: Vec<RuleCounter>) {
        if let Ok(mut r) = self.rules.write() {
            *r = rules;
        }
    }

    /// Sets the classifier's own drop counters (snapshots summed over CPUs from its maps).
    pub fn set_classifier_drops(
        &self,
        flow_table_full: u64,
        no_redirect_target: u64,
        uid_flow_cap: u64,
    ) {
        self.classifier_flow_table_full
            .store(flow_table_full, Relaxed);
        self.classifier_no_redirect_target
            .store(no_redirect_target, Relaxed);
        self.classifier_uid_flow_cap.store(uid_flow_cap, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        c(
            &mut out,
            "hoshino_egress_packets_total",
            "Packets read from the TUN and sent into S3.",
            self.egress_packets.load(Relaxed),
        );
        c(
            &mut out,
            "hoshino_egress_bytes_total",
            "Bytes of packets sent into S3.",
            self.egress_bytes.load(Relaxed),
        );
        c(
            &mut out,
            "hoshino_ingress_packets_total",
            "Packets received from S3 and written to the TUN.",
            self.ingress_packets.load(Relaxed),
        );
        c(
            &mut out,
            "hoshino_ingress_bytes_total",
            "Bytes of packets received from S3 and written to the TUN.",
            self.ingress_bytes.load(Relaxed),
        );
        let labeled = |out: &mut String,
                       name: &str,
                       help: &str,
                       label: &str,
                       rows: &mut dyn Iterator<Item = (&str, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, v) in rows {
                let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
            }
        };
        labeled(
            &mut out,
            "hoshino_dropped_packets_total",
            "Packets lost, by reason.",
            "reason",
            &mut DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.dropped_count(*r))),
        );
        labeled(
            &mut out,
            "hoshino_ignored_packets_total",
            "Packets read from the TUN that are not carried (not IPv6, outside the prefix, ...).",
            "reason",
            &mut IgnoreReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.ignored_count(*r))),
        );
        labeled(
            &mut out,
            "hoshino_bundles_rejected_total",
            "Objects in the inbox that were rejected and deleted, by reason.",
            "reason",
            &mut REJECT_REASONS.iter().map(|r| (*r, self.rejected_count(r))),
        );
        labeled(
            &mut out,
            "hoshino_s3_requests_total",
            "S3 requests made, by operation.",
            "op",
            &mut S3Op::ALL.iter().map(|o| (o.as_str(), self.s3_requests(*o))),
        );
        labeled(
            &mut out,
            "hoshino_s3_errors_total",
            "S3 requests that failed after retries, by operation.",
            "op",
            &mut S3Op::ALL.iter().map(|o| {
                (
                    o.as_str(),
                    self.s3_errors.get(o.index()).map_or(0, |c| c.load(Relaxed)),
                )
            }),
        );
        let name = "hoshino_s3_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} S3 request latency including retries, by operation.\n# TYPE {name} histogram"
        );
        for op in S3Op::ALL {
            let Some(h) = self.s3_latency.get(op.index()) else {
                continue;
            };
            let mut cumulative = 0;
            for (bound, b) in LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
                cumulative += b.load(Relaxed);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{op=\"{}\",le=\"{bound}\"}} {cumulative}",
                    op.as_str()
                );
            }
            let count = h.count.load(Relaxed);
            let sum = h.sum_micros.load(Relaxed) as f64 / 1e6;
            let op = op.as_str();
            let _ = writeln!(out, "{name}_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{op=\"{op}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{op=\"{op}\"}} {count}");
        }
        let g = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        g(
            &mut out,
            "hoshino_heartbeat_interval_seconds",
            "Current inbox polling interval (the bell interval when idle).",
            (self.heartbeat_interval_micros.load(Relaxed) as f64 / 1e6).to_string(),
        );
        g(
            &mut out,
            "hoshino_heartbeat_idle",
            "1 when only the doorbell is polled.",
            self.heartbeat_idle.load(Relaxed).to_string(),
        );
        g(
            &mut out,
            "hoshino_egress_buffer_bytes",
            "Bytes held in open, sealed and in-flight bundles.",
            self.egress_buffer_bytes.load(Relaxed).to_string(),
        );
        let name = "hoshino_estimated_cost_dollars_total";
        let _ = writeln!(
            out,
            "# HELP {name} S3 request cost at AWS list prices ($0.005/1000 PUT and LIST, $0.0004/1000 GET and HEAD, DELETE free).\n# TYPE {name} counter\n{name} {}",
            self.estimated_cost_dollars()
        );
        c(
            &mut out,
            "hoshino_reorder_skipped_total",
            "Bundle sequence numbers skipped after the gap timeout.",
            self.reorder_skipped.load(Relaxed),
        );
        c(
            &mut out,
            "hoshino_duplicate_bundles_total",
            "Bundles dropped as already delivered.",
            self.duplicate_bundles.load(Relaxed),
        );
        c(
            &mut out,
            "hoshino_bells_rung_total",
            "Doorbell PUTs made to wake idle receivers.",
            self.bells_rung.load(Relaxed),
        );
        let name = "hoshino_classifier_drops_total";
        let _ = writeln!(
            out,
            "# HELP {name} Packets the classifier dropped besides drop rules: a new divert flow refused by the full flow table or the per-uid cap, or a redirect without a target.\n# TYPE {name} counter\n{name}{{reason=\"flow_table_full\"}} {}\n{name}{{reason=\"no_redirect_target\"}} {}\n{name}{{reason=\"uid_flow_cap\"}} {}",
            self.classifier_flow_table_full.load(Relaxed),
            self.classifier_no_redirect_target.load(Relaxed),
            self.classifier_uid_flow_cap.load(Relaxed),
        );
        let rules = self.rules.read().map(|r| r.clone()).unwrap_or_default();
        for (name, help, pick) in [
            (
                "hoshino_rule_packets_total",
                "Packets matched per policy rule (from the classifier).",
                (|r: &RuleCounter| r.packets) as fn(&RuleCounter) -> u64,
            ),
            (
                "hoshino_rule_bytes_total",
                "Bytes matched per policy rule (from the classifier).",
                |r: &RuleCounter| r.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for r in &rules {
                let rule = escape_label(&r.rule);
                let _ = writeln!(out, "{name}{{rule=\"{rule}\"}} {}", pick(r));
            }
        }
        self.divert.render(&mut out);
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_help_and_type_for_every_design_metric() {
        let m = Metrics::default();
        let text = m.render();
        for name in [
            "hoshino_egress_packets_total",
            "hoshino_egress_bytes_total",
            "hoshino_ingress_packets_total",
            "hoshino_ingress_bytes_total",
            "hoshino_dropped_packets_total",
            "hoshino_ignored_packets_total",
            "hoshino_s3_requests_total",
            "hoshino_s3_errors_total",
            "hoshino_s3_request_duration_seconds",
            "hoshino_heartbeat_interval_seconds",
            "hoshino_heartbeat_idle",
            "hoshino_bundles_rejected_total",
            "hoshino_classifier_drops_total",
            "hoshino_estimated_cost_dollars_total",
            "hoshino_rule_packets_total",
            "hoshino_rule_bytes_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }

    #[test]
    fn cost_uses_aws_list_prices() {
        let m = Metrics::default();
        for _ in 0..1000 {
            m.s3_request(S3Op::Put, Duration::ZERO, true);
            m.s3_request(S3Op::Head, Duration::ZERO, true);
            m.s3_request(S3Op::Delete, Duration::ZERO, true);
        }
        let cost = m.estimated_cost_dollars();
        assert!((cost - 0.0054).abs() < 1e-9, "{cost}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.s3_request(S3Op::Get, Duration::from_millis(3), true);
        m.s3_request(S3Op::Get, Duration::from_millis(40), false);
        m.s3_request(S3Op::Get, Duration::from_secs(100), false);
        let text = m.render();
        assert!(
            text.contains("hoshino_s3_request_duration_seconds_bucket{op=\"get\",le=\"0.005\"} 1")
        );
        assert!(
            text.contains("hoshino_s3_request_duration_seconds_bucket{op=\"get\",le=\"0.05\"} 2")
        );
        assert!(
            text.contains("hoshino_s3_request_duration_seconds_bucket{op=\"get\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("hoshino_s3_errors_total{op=\"get\"} 2"));
        assert!(text.contains("hoshino_s3_requests_total{op=\"get\"} 3"));
    }

    #[test]
    fn labeled_counters_render_per_reason() {
        let m = Metrics::default();
        m.dropped(DropReason::EgressBufferFull, 3);
        m.ignored(IgnoreReason::NotIpv6);
        m.rejected("bad_mac");
        m.rejected("not-a-reason");
        let text = m.render();
        assert!(text.contains("hoshino_dropped_packets_total{reason=\"egress_buffer_full\"} 3"));
        assert!(text.contains("hoshino_ignored_packets_total{reason=\"not_ipv6\"} 1"));
        assert!(text.contains("hoshino_bundles_rejected_total{reason=\"bad_mac\"} 1"));
    }

    #[test]
    fn every_bundle_error_reason_has_a_label() {
        use crate::node_addr::NodeId;
        use crate::wire::bundle::BundleError;
        for e in [
            BundleError::Oversized(0),
            BundleError::BadMagic([0; 4]),
            BundleError::BadVersion(0),
            BundleError::BadFlags(0),
            BundleError::Truncated {
                offset: 0,
                needed: 0,
                available: 0,
            },
            BundleError::BadCount(0),
            BundleError::BadPacket {
                index: 0,
                reason: "",
            },
            BundleError::TrailingBytes(0),
            BundleError::BadMac,
            BundleError::Unauthenticated,
            BundleError::NoKey,
            BundleError::SenderMismatch {
                header: NodeId(0),
                key: NodeId(1),
            },
            BundleError::WrongDestination {
                header: NodeId(0),
                us: NodeId(1),
            },
        ] {
            assert!(REJECT_REASONS.contains(&e.reason()), "{}", e.reason());
        }
    }

    #[test]
    fn heartbeat_gauges_render_in_seconds() {
        let m = Metrics::default();
        m.set_heartbeat(Duration::from_millis(5), true);
        let text = m.render();
        assert!(text.contains("hoshino_heartbeat_interval_seconds 0.005"));
        assert!(text.contains("hoshino_heartbeat_idle 1"));
    }

    #[test]
    fn rule_labels_are_escaped() {
        let m = Metrics::default();
        m.set_rule_counters(vec![RuleCounter {
            rule: "a\"b".into(),
            packets: 2,
            bytes: 3,
        }]);
        let text = m.render();
        assert!(text.contains("hoshino_rule_packets_total{rule=\"a\\\"b\"} 2"));
    }
}
