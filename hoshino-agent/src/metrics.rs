//! Where the agent's metrics are counted: typed `prometheus-client` families for everything with
//! labels (S3 requests, errors and latency by operation; drops, ignores and rejections by
//! reason), atomics for the plain counters the loops bump, and snapshots for values read from
//! the kernel (per-rule and classifier counters). `render` encodes them all in the Prometheus
//! text format (0.0.4). Sans-IO: the HTTP listener is `edge/metrics_http.rs`.

use std::fmt::Write;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// An S3 operation, the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    EgressBufferFull,
    PutFailed,
    TunWriteFailed,
    SpoofedSource,
    WrongDestination,
    /// A packet that would open a new stream faster than `NEW_STREAMS_PER_SECOND`.
    NewDestinationRate,
    /// A packet to one more destination while `MAX_DESTINATIONS` have bundles held.
    TooManyDestinations,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::EgressBufferFull,
        DropReason::PutFailed,
        DropReason::TunWriteFailed,
        DropReason::SpoofedSource,
        DropReason::WrongDestination,
        DropReason::NewDestinationRate,
        DropReason::TooManyDestinations,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::EgressBufferFull => "egress_buffer_full",
            DropReason::PutFailed => "put_failed",
            DropReason::TunWriteFailed => "tun_write_failed",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::WrongDestination => "wrong_destination",
            DropReason::NewDestinationRate => "new_destination_rate",
            DropReason::TooManyDestinations => "too_many_destinations",
        }
    }
}

/// Why a packet read from the TUN was not ours to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// Label values are the snake_case names the dashboards and tests read.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(S3Op, DropReason, IgnoreReason);

/// `{op}` of the S3 families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: S3Op,
}

/// `{reason}` of the dropped-packet family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
}

/// `{reason}` of the ignored-packet family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoreLabels {
    pub reason: IgnoreReason,
}

/// `{reason}` of string-valued reason families (bundle rejections: `BundleError::reason()`,
/// `bad_key`, `key_mismatch`; the classifier's drops).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Rejection reasons exported at 0 from the start. Only for that: a reason not listed here is
/// still counted, under its own label, when it first happens.
const COMMON_REJECT_REASONS: [&str; 4] = ["bad_key", "bad_mac", "sender_mismatch", "key_mismatch"];

/// `{rule}` of the per-rule families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

/// Upper bounds (seconds) of the S3 latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A kernel-side rule counter snapshot, filled by the interceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The classifier's own drop counters, a snapshot summed over CPUs.
#[derive(Clone, Copy, Debug, Default)]
struct ClassifierDrops {
    flow_table_full: u64,
    no_redirect_target: u64,
    uid_flow_cap: u64,
}

type LatencyFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    pub egress_packets: AtomicU64,
    pub egress_bytes: AtomicU64,
    pub ingress_packets: AtomicU64,
    pub ingress_bytes: AtomicU64,
    pub reorder_skipped: AtomicU64,
    pub duplicate_bundles: AtomicU64,
    pub bells_rung: AtomicU64,
    pub egress_buffer_bytes: AtomicU64,
    dropped: Family<DropLabels, Counter>,
    ignored: Family<IgnoreLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    s3_requests: Family<OpLabels, Counter>,
    s3_errors: Family<OpLabels, Counter>,
    s3_latency: LatencyFamily,
    heartbeat_interval: Gauge<f64, AtomicU64>,
    heartbeat_idle: Gauge,
    rules: RwLock<Vec<RuleCounter>>,
    classifier_drops: RwLock<ClassifierDrops>,
    /// The divert path's counters (the metadata proxy's among them).
    pub divert: std::sync::Arc<crate::interceptor::divert::counters::DivertStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            egress_packets: AtomicU64::new(0),
            egress_bytes: AtomicU64::new(0),
            ingress_packets: AtomicU64::new(0),
            ingress_bytes: AtomicU64::new(0),
            reorder_skipped: AtomicU64::new(0),
            duplicate_bundles: AtomicU64::new(0),
            bells_rung: AtomicU64::new(0),
            egress_buffer_bytes: AtomicU64::new(0),
            dropped: Family::default(),
            ignored: Family::default(),
            rejected: Family::default(),
            s3_requests: Family::default(),
            s3_errors: Family::default(),
            s3_latency: Family::new_with_constructor(latency_histogram),
            heartbeat_interval: Gauge::default(),
            heartbeat_idle: Gauge::default(),
            rules: RwLock::new(Vec::new()),
            classifier_drops: RwLock::new(ClassifierDrops::default()),
            divert: Default::default(),
        };
        // Every known label is exported from the start (at 0), so a dashboard's rate() has a
        // series before the first event.
        for op in S3Op::ALL {
            let labels = OpLabels { op };
            drop(m.s3_requests.get_or_create(&labels));
            drop(m.s3_errors.get_or_create(&labels));
            drop(m.s3_latency.get_or_create(&labels));
        }
        for reason in DropReason::ALL {
            drop(m.dropped.get_or_create(&DropLabels { reason }));
        }
        for reason in IgnoreReason::ALL {
            drop(m.ignored.get_or_create(&IgnoreLabels { reason }));
        }
        for reason in COMMON_REJECT_REASONS {
            drop(m.rejected.get_or_create(&reason_labels(reason)));
        }
        m
    }
}

impl Metrics {
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    pub fn ignored(&self, reason: IgnoreReason) {
        self.ignored.get_or_create(&IgnoreLabels { reason }).inc();
    }

    pub fn ignored_count(&self, reason: IgnoreReason) -> u64 {
        self.ignored.get_or_create(&IgnoreLabels { reason }).get()
    }

    /// Counts a rejected bundle under its reason (any reason: a new one is a new series, never
    /// lost).
    pub fn rejected(&self, reason: &str) {
        self.rejected.get_or_create(&reason_labels(reason)).inc();
    }

    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected.get_or_create(&reason_labels(reason)).get()
    }

    /// One S3 request attempt (as billed): counted, its latency observed, an error counted.
    pub fn s3_request(&self, op: S3Op, took: Duration, ok: bool) {
        let labels = OpLabels { op };
        self.s3_requests.get_or_create(&labels).inc();
        if !ok {
            self.s3_errors.get_or_create(&labels).inc();
        }
        self.s3_latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn s3_requests(&self, op: S3Op) -> u64 {
        self.s3_requests.get_or_create(&OpLabels { op }).get()
    }

    pub fn s3_errors(&self, op: S3Op) -> u64 {
        self.s3_errors.get_or_create(&OpLabels { op }).get()
    }

    pub fn set_heartbeat(&self, interval: Duration, idle: bool) {
        self.heartbeat_interval.set(interval.as_secs_f64());
        self.heartbeat_idle.set(i64::from(idle));
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
        if let Ok(mut d) = self.classifier_drops.write() {
            *d = ClassifierDrops {
                flow_table_full,
                no_redirect_target,
                uid_flow_cap,
            };
        }
    }

    /// Every metric in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        self.divert.register(&mut registry);
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            // Writing into a String cannot fail; keep what was encoded.
            tracing::warn!("encoding the metrics failed");
        }
        out
    }

    /// Registers every metric for one scrape: the families are shared (cheap clones), the
    /// atomics and kernel snapshots are read now. Names without `_total`: the encoder appends
    /// it to counters.
    fn register(&self, r: &mut Registry) {
        let plain = |a: &AtomicU64| ConstCounter::new(a.load(Relaxed));
        r.register(
            "hoshino_egress_packets",
            "Packets read from the TUN and sent into S3",
            plain(&self.egress_packets),
        );
        r.register(
            "hoshino_egress_bytes",
            "Bytes of packets sent into S3",
            plain(&self.egress_bytes),
        );
        r.register(
            "hoshino_ingress_packets",
            "Packets received from S3 and written to the TUN",
            plain(&self.ingress_packets),
        );
        r.register(
            "hoshino_ingress_bytes",
            "Bytes of packets received from S3 and written to the TUN",
            plain(&self.ingress_bytes),
        );
        r.register(
            "hoshino_dropped_packets",
            "Packets lost, by reason",
            self.dropped.clone(),
        );
        r.register(
            "hoshino_ignored_packets",
            "Packets read from the TUN that are not carried (not IPv6, outside the prefix, ...)",
            self.ignored.clone(),
        );
        r.register(
            "hoshino_bundles_rejected",
            "Objects in the inbox that were rejected and deleted, by reason",
            self.rejected.clone(),
        );
        r.register(
            "hoshino_s3_requests",
            "S3 request attempts made (each is billed), by operation",
            self.s3_requests.clone(),
        );
        r.register(
            "hoshino_s3_errors",
            "S3 request attempts that failed, by operation",
            self.s3_errors.clone(),
        );
        r.register(
            "hoshino_s3_request_duration_seconds",
            "S3 request attempt latency, by operation",
            self.s3_latency.clone(),
        );
        r.register(
            "hoshino_heartbeat_interval_seconds",
            "Current inbox polling interval (the bell interval when idle)",
            self.heartbeat_interval.clone(),
        );
        r.register(
            "hoshino_heartbeat_idle",
            "1 when only the doorbell is polled",
            self.heartbeat_idle.clone(),
        );
        r.register(
            "hoshino_egress_buffer_bytes",
            "Bytes held in open, sealed and in-flight bundles",
            ConstGauge::new(
                i64::try_from(self.egress_buffer_bytes.load(Relaxed)).unwrap_or(i64::MAX),
            ),
        );
        r.register(
            "hoshino_estimated_cost_dollars",
            "S3 request cost at AWS list prices ($0.005/1000 PUT, LIST and DeleteObjects, $0.0004/1000 GET and HEAD, DELETE free)",
            ConstCounter::new(self.estimated_cost_dollars()),
        );
        r.register(
            "hoshino_reorder_skipped",
            "Bundle sequence numbers skipped after the gap timeout",
            plain(&self.reorder_skipped),
        );
        r.register(
            "hoshino_duplicate_bundles",
            "Bundles dropped as already delivered",
            plain(&self.duplicate_bundles),
        );
        r.register(
            "hoshino_bells_rung",
            "Doorbell PUTs made to wake idle receivers",
            plain(&self.bells_rung),
        );
        let drops = self.classifier_drops.read().map(|d| *d).unwrap_or_default();
        let classifier: Family<ReasonLabels, Counter> = Family::default();
        for (reason, n) in [
            ("flow_table_full", drops.flow_table_full),
            ("no_redirect_target", drops.no_redirect_target),
            ("uid_flow_cap", drops.uid_flow_cap),
        ] {
            classifier.get_or_create(&reason_labels(reason)).inc_by(n);
        }
        r.register(
            "hoshino_classifier_drops",
            "Packets the classifier dropped besides drop rules: a new divert flow refused by the full flow table or the per-uid cap, or a redirect without a target",
            classifier,
        );
        let rules = self.rules.read().map(|r| r.clone()).unwrap_or_default();
        let (packets, bytes): (Family<RuleLabels, Counter>, Family<RuleLabels, Counter>) =
            (Family::default(), Family::default());
        for rule in &rules {
            let labels = RuleLabels {
                rule: rule.rule.clone(),
            };
            packets.get_or_create(&labels).inc_by(rule.packets);
            bytes.get_or_create(&labels).inc_by(rule.bytes);
        }
        r.register(
            "hoshino_rule_packets",
            "Packets matched per policy rule (from the classifier)",
            packets,
        );
        r.register(
            "hoshino_rule_bytes",
            "Bytes matched per policy rule (from the classifier)",
            bytes,
        );
    }
}

fn reason_labels(reason: &str) -> ReasonLabels {
    ReasonLabels {
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_help_and_type_for_every_design_metric() {
        let m = Metrics::default();
        // Per-rule series exist once the interceptor published a snapshot (a tunnel-only agent
        // has no rules, and an empty family renders nothing).
        m.set_rule_counters(vec![RuleCounter {
            rule: "default".into(),
            packets: 0,
            bytes: 0,
        }]);
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
    fn every_bundle_error_reason_is_counted_under_its_own_label() {
        use crate::node_addr::NodeId;
        use crate::wire::bundle::BundleError;
        let m = Metrics::default();
        let errors = [
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
        ];
        for e in &errors {
            m.rejected(e.reason());
        }
        let text = m.render();
        for e in &errors {
            let line = format!(
                "hoshino_bundles_rejected_total{{reason=\"{}\"}} 1",
                e.reason()
            );
            assert!(text.contains(&line), "{line}\n{text}");
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
