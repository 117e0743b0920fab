//! The divert loop: read a packet from the divert TUN; a packet of a connection the metadata
//! proxy terminates goes to its stack; otherwise the flow's rule and uid come from the
//! classifier's flow map, and the rule's divert policy decides: a SYN of an `http` rule opens a
//! proxy connection, a plain divert packet is reinjected or dropped. What the proxy writes for
//! its clients goes back into the TUN; ended connections' flow entries are deleted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hoshino_common::{FlowKey, FlowValue, MAP_SETS};
use tokio::sync::watch;

use super::counters::DivertStats;
use super::device::{DivertTun, Reinjector};
use super::{PacketOutcome, Segment, plain_divert};
use crate::interceptor::flow_key;
use crate::interceptor::proxy::admission::Admission;
use crate::interceptor::proxy::{DivertRule, ProxyStack};
use crate::policy::{CompiledPolicy, DivertPolicy, Rule};
use crate::supervisor::LoopFault;

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

    /// The policy map set `set` holds.
    pub fn policy(&self, set: u32) -> Option<Arc<CompiledPolicy>> {
        self.sets.get(set as usize)?.clone()
    }

    /// Forgets what map set `set` holds (e.g. a reload into it failed).
    pub fn clear(&mut self, set: u32) {
        if let Some(slot) = self.sets.get_mut(set as usize) {
            *slot = None;
        }
    }

    /// Rule `rule` of map set `set`.
    pub fn rule(&self, set: u32, rule: u32) -> Option<&Rule> {
        let policy = self.sets.get(set as usize)?.as_ref()?;
        policy.policy.rules.get(rule as usize)
    }

    /// The divert policy of rule `rule` in map set `set`.
    pub fn divert_policy(&self, set: u32, rule: u32) -> Option<&DivertPolicy> {
        self.rule(set, rule)?.divert.as_ref()
    }
}

/// Where the flow's rule and uid come from (the classifier's flow map).
pub trait FlowLookup: Send + Sync {
    fn lookup(&self, key: &FlowKey) -> Option<FlowValue>;
    /// Deletes the entry of a flow whose proxied connection ended (or was refused), so the
    /// kernel's bounded flow map holds live flows only.
    fn forget(&self, key: &FlowKey);
}

/// Largest packet read from the TUN.
const MAX_PACKET: usize = 65536;
/// Longest sleep between polls of the proxy (its connections' timeouts are checked then).
const MAX_POLL_DELAY: Duration = Duration::from_secs(1);

/// What the loop needs besides the TUN.
pub struct DivertContext {
    pub reinjector: Reinjector,
    /// `--reinject-mark`, also carried by the proxy's upstream connections.
    pub mark: u32,
    pub policies: Arc<RwLock<PolicySets>>,
    pub flows: Arc<dyn FlowLookup>,
    pub stats: Arc<DivertStats>,
}

/// Runs until `shutdown` turns true. A failed read of the divert TUN ends the loop with an
/// error (the device was deleted or broke; the supervisor stops the agent).
pub async fn run(
    tun: Arc<DivertTun>,
    cx: DivertContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LoopFault> {
    let (mut proxy, mut answers) = ProxyStack::new(
        cx.mark,
        Admission::default(),
        cx.stats.clone(),
        Instant::now(),
    );
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let delay = proxy
            .poll_delay(Instant::now())
            .map_or(MAX_POLL_DELAY, |d| d.min(MAX_POLL_DELAY));
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            Some(answer) = answers.recv() => proxy.answer(answer, Instant::now()),
            () = tokio::time::sleep(delay) => {}
            read = tun.recv(&mut buf) => match read {
                Ok(n) => {
                    let packet = buf.get(..n).unwrap_or(&[]).to_vec();
                    handle_packet(packet, &mut proxy, &cx);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                Err(source) => {
                    cx.stats.errors.fetch_add(1, Relaxed);
                    return Err(LoopFault::TunRead { tun: tun.name().to_string(), source });
                }
            },
        }
        let polled = proxy.poll(Instant::now());
        for packet in polled.packets {
            if let Err(e) = tun.deliver(&packet).await {
                tracing::warn!(error = %e, "writing into the divert TUN failed");
                cx.stats.errors.fetch_add(1, Relaxed);
            }
        }
        for key in polled.ended {
            cx.flows.forget(&key);
        }
    }
}

fn handle_packet(packet: Vec<u8>, proxy: &mut ProxyStack, cx: &DivertContext) {
    let stats = &cx.stats;
    stats.packets.fetch_add(1, Relaxed);
    let segment = match Segment::parse(&packet) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "dropping malformed diverted packet");
            stats.malformed.fetch_add(1, Relaxed);
            return;
        }
    };
    let f = segment.flow;
    let syn = segment.tcp.is_some_and(|t| t.syn && !t.ack_flag);
    if proxy.owns(&f) {
        if !(syn && proxy.is_finished(&f)) {
            proxy.push(packet);
            return;
        }
        // A SYN on a 4-tuple whose connection is over: a new connection, judged afresh.
        proxy.forget(&f);
    }
    let key = flow_key(f.src, f.dst, f.proto, f.src_port, f.dst_port);
    let Some(value) = cx.flows.lookup(&key) else {
        // The classifier records every flow it diverts before redirecting; a miss means the
        // entry is gone. Failing closed: the packet is dropped.
        tracing::debug!(flow = ?f, "diverted packet without a flow entry, dropped");
        stats.unknown_flow.fetch_add(1, Relaxed);
        return;
    };
    let rule = {
        let sets = cx.policies.read().unwrap_or_else(|p| p.into_inner());
        sets.rule(u32::from(value.set), value.rule)
            .and_then(|r| Some((r.name.value.clone(), r.divert.clone()?)))
    };
    let Some((name, divert)) = rule else {
        tracing::debug!(flow = ?f, rule = value.rule, set = value.set, "diverted packet of a rule that is not a divert rule, dropped");
        stats.unknown_flow.fetch_add(1, Relaxed);
        return;
    };
    match divert {
        DivertPolicy::Http(http) => {
            if syn {
                let rule = DivertRule {
                    name,
                    http: Arc::new(http),
                };
                if proxy.open(f, value.uid, rule, Instant::now()).is_err() {
                    // Refused: the SYN finds no socket and the stack answers with a reset.
                    cx.flows.forget(&key);
                }
            }
            // Anything else without a connection gets a reset from the stack.
            proxy.push(packet);
        }
        DivertPolicy::Packets(action) => match plain_divert(packet, action) {
            PacketOutcome::Reinject(p) => match cx.reinjector.send(&p) {
                Ok(()) => {
                    stats.reinjected.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reinjection failed");
                    stats.errors.fetch_add(1, Relaxed);
                }
            },
            PacketOutcome::Drop => {
                stats.dropped.fetch_add(1, Relaxed);
            }
        },
    }
}
