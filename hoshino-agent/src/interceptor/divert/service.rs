//! The divert loop: read a packet from the divert TUN, find its flow's rule and uid in the
//! classifier's flow map, let the [`Diverter`] decide, carry out the effects.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hoshino_common::{FlowKey, FlowValue, MAP_SETS};
use tokio::sync::watch;

use super::device::{DivertTun, Reinjector};
use super::{Diverter, Effect, Segment};
use crate::interceptor::flow_key;
use crate::policy::{CompiledPolicy, DivertPolicy, HttpAction};

/// The policy each classifier map set holds: a packet decided by the previous set just before
/// a reload still finds the rule that diverted it.
#[derive(Debug, Default)]
pub struct PolicySets {
    sets: [Option<Arc<CompiledPolicy>>; MAP_SETS as usize],
}

impl PolicySets {
    /// Records that map set `set` now holds `policy`.
    pub fn set(&mut self, set: u32, policy: Arc<CompiledPolicy>) {
        if let Some(slot) = self.sets.get_mut(set as usize) {
            *slot = Some(policy);
        }
    }

    /// The divert policy of rule `rule` in map set `set`.
    pub fn divert_policy(&self, set: u32, rule: u32) -> Option<&DivertPolicy> {
        let policy = self.sets.get(set as usize)?.as_ref()?;
        policy.policy.rules.get(rule as usize)?.divert.as_ref()
    }
}

/// Where the flow's rule and uid come from (the classifier's flow map).
pub trait FlowLookup: Send + Sync {
    fn lookup(&self, key: &FlowKey) -> Option<FlowValue>;
}

/// Counters of the divert path.
#[derive(Debug, Default)]
pub struct DivertStats {
    pub packets: AtomicU64,
    pub reinjected: AtomicU64,
    pub dropped: AtomicU64,
    pub resets: AtomicU64,
    pub requests_allowed: AtomicU64,
    pub requests_refused: AtomicU64,
    pub unknown_flow: AtomicU64,
    pub malformed: AtomicU64,
    pub errors: AtomicU64,
}

/// How often idle flows are forgotten.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// Largest packet read from the TUN.
const MAX_PACKET: usize = 65536;

/// Runs until `shutdown` turns true.
pub async fn run(
    tun: Arc<DivertTun>,
    reinjector: Reinjector,
    policies: Arc<RwLock<PolicySets>>,
    flows: Arc<dyn FlowLookup>,
    stats: Arc<DivertStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut diverter = Diverter::new();
    let mut buf = vec![0u8; MAX_PACKET];
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    loop {
        let n = tokio::select! {
            _ = shutdown.changed() => return,
            _ = expire.tick() => {
                diverter.expire(Instant::now());
                continue;
            }
            read = tun.recv(&mut buf) => match read {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(tun = tun.name(), error = %e, "reading the divert TUN failed");
                    stats.errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        stats.packets.fetch_add(1, Relaxed);
        let packet = buf.get(..n).unwrap_or(&[]).to_vec();
        let segment = match Segment::parse(&packet) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "dropping malformed diverted packet");
                stats.malformed.fetch_add(1, Relaxed);
                continue;
            }
        };
        let f = &segment.flow;
        let key = flow_key(f.src, f.dst, f.proto, f.src_port, f.dst_port);
        let Some(value) = flows.lookup(&key) else {
            // The classifier records every flow it diverts before redirecting; a miss means the
            // entry was evicted. Failing closed: the client retransmits and the next packet
            // is recorded again.
            tracing::debug!(flow = ?f, "diverted packet without a flow entry, dropped");
            stats.unknown_flow.fetch_add(1, Relaxed);
            continue;
        };
        let divert = {
            let sets = policies.read().unwrap_or_else(|p| p.into_inner());
            sets.divert_policy(u32::from(value.set), value.rule)
                .cloned()
        };
        let Some(divert) = divert else {
            tracing::debug!(flow = ?f, rule = value.rule, set = value.set, "diverted packet of a rule that is not a divert rule, dropped");
            stats.unknown_flow.fetch_add(1, Relaxed);
            continue;
        };
        let outcome = diverter.handle(packet, &segment, &divert, Some(value.uid), Instant::now());
        stats.dropped.fetch_add(outcome.dropped as u64, Relaxed);
        for d in &outcome.decisions {
            let allowed = d.action == HttpAction::Allow;
            let counter = if allowed {
                &stats.requests_allowed
            } else {
                &stats.requests_refused
            };
            counter.fetch_add(1, Relaxed);
            match &d.unreadable {
                Some(why) => tracing::info!(
                    src = %d.flow.src, dst = %d.flow.dst, dport = d.flow.dst_port, uid = ?d.uid,
                    action = %d.action, reason = %why, "unreadable HTTP stream, policy default applied"
                ),
                None => tracing::info!(
                    src = %d.flow.src, dst = %d.flow.dst, dport = d.flow.dst_port, uid = ?d.uid,
                    method = %d.method, path = %d.path, action = %d.action, "HTTP request judged"
                ),
            }
        }
        for effect in outcome.effects {
            match effect {
                Effect::Reinject(p) => match reinjector.send(&p) {
                    Ok(()) => {
                        stats.reinjected.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reinjection failed");
                        stats.errors.fetch_add(1, Relaxed);
                    }
                },
                Effect::Deliver(p) => match tun.deliver(&p).await {
                    Ok(_) => {
                        stats.resets.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "writing a reset into the divert TUN failed");
                        stats.errors.fetch_add(1, Relaxed);
                    }
                },
            }
        }
    }
}
