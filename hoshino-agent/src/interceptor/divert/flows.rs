//! Per-flow decisions for diverted HTTP connections (sans-IO; time is passed in).
//!
//! Client segments arrive here instead of leaving the host. Handshake and pure ACK/FIN segments
//! are reinjected at once. Data segments are held until every request line that starts in them
//! has been judged by the rule's [`HttpPolicy`]; then they are reinjected unchanged, in sequence
//! order. A refused request drops everything held, resets the client (a RST written into the
//! divert TUN with the exact sequence number the client expects) and resets the server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::policy::{HttpAction, HttpPolicy};

use super::http_stream::{RequestStream, StreamEvent};
use super::rst::{reset_to_client, reset_to_server};
use super::segment::{FlowTuple, Segment, TcpFields};

/// Most flows tracked at once; the least recently seen is forgotten first.
pub const MAX_FLOWS: usize = 4096;
/// Most payload bytes held per flow while a request line is incomplete or a gap is unfilled.
pub const MAX_HELD_BYTES: usize = 32 * 1024;
/// A flow not seen for this long is forgotten.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A refused flow is remembered this long, so its stragglers are dropped, not reinjected.
pub const DENIED_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do with packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send on unchanged, as if never intercepted (raw socket carrying the reinject mark).
    Reinject(Vec<u8>),
    /// Write into the divert TUN: delivered to the local client as if from the server.
    Deliver(Vec<u8>),
}

/// A judged request, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub flow: FlowTuple,
    pub uid: Option<u32>,
    pub method: String,
    pub path: String,
    pub action: HttpAction,
    /// Set when the request could not be read and the policy's default applied.
    pub unreadable: Option<String>,
}

/// The result of one packet: effects in order, decisions taken, packets dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub effects: Vec<Effect>,
    pub decisions: Vec<Decision>,
    pub dropped: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Inspecting,
    /// The stream cannot be followed and the policy's default allows: no more inspection.
    Passing,
    Denied,
}

#[derive(Debug)]
struct Held {
    seq: u32,
    end: u32,
    /// Whether its bytes were fed to the stream (false: it lies beyond a gap).
    fed: bool,
    packet: Vec<u8>,
}

#[derive(Debug)]
struct HttpFlow {
    stage: Stage,
    /// Sequence number of stream offset 0 (first byte after the SYN).
    base_seq: u32,
    /// Next in-order client sequence number; None until the first segment.
    next_seq: Option<u32>,
    /// The client's latest ACK number: what it expects from the server next.
    client_expects: Option<u32>,
    /// Client bytes before this sequence number were reinjected: the server's next expected.
    released: u32,
    stream: RequestStream,
    held: Vec<Held>,
    held_bytes: usize,
    last_seen: Instant,
}

/// `a < b` in TCP sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

impl HttpFlow {
    fn new(now: Instant) -> Self {
        Self {
            stage: Stage::Inspecting,
            base_seq: 0,
            next_seq: None,
            client_expects: None,
            released: 0,
            stream: RequestStream::new(),
            held: Vec::new(),
            held_bytes: 0,
            last_seen: now,
        }
    }

    /// First client sequence number that has not been released to the server.
    fn release_boundary(&self) -> u32 {
        let next = self.next_seq.unwrap_or(self.base_seq);
        match self.stream.undecided_from() {
            // Stream offsets are relative to base_seq; sequence numbers wrap at 2^32.
            Some(offset) => self.base_seq.wrapping_add(offset as u32),
            None => next,
        }
    }

    /// Reinjects held segments that lie wholly before the release boundary, in sequence order.
    fn release(&mut self, out: &mut Outcome, everything: bool) {
        let boundary = self.release_boundary();
        let mut ready: Vec<Held> = Vec::new();
        let mut kept = Vec::new();
        for h in self.held.drain(..) {
            if everything || (h.fed && seq_le(h.end, boundary)) {
                ready.push(h);
            } else {
                kept.push(h);
            }
        }
        self.held = kept;
        ready.sort_by(|a, b| {
            if a.seq == b.seq {
                std::cmp::Ordering::Equal
            } else if seq_lt(a.seq, b.seq) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        for h in ready {
            if seq_lt(self.released, h.end) {
                self.released = h.end;
            }
            self.held_bytes = self.held_bytes.saturating_sub(h.packet.len());
            out.effects.push(Effect::Reinject(h.packet));
        }
    }

    /// Refuses the connection: drop what is held, reset both ends.
    fn deny(&mut self, flow: &FlowTuple, out: &mut Outcome) {
        let server_next = self.released;
        out.dropped += self.held.len();
        self.held.clear();
        self.held_bytes = 0;
        self.stage = Stage::Denied;
        let client_next = self.next_seq.unwrap_or(server_next);
        if let Some(expects) = self.client_expects
            && let Ok(rst) = reset_to_client(flow, expects, client_next)
        {
            out.effects.push(Effect::Deliver(rst));
        }
        if let Ok(rst) = reset_to_server(flow, server_next) {
            out.effects.push(Effect::Reinject(rst));
        }
    }

    /// Feeds held, unfed segments that the in-order stream has reached.
    fn feed_contiguous(&mut self, events: &mut Vec<StreamEvent>) {
        loop {
            let Some(next) = self.next_seq else { return };
            let Some(h) = self.held.iter_mut().find(|h| !h.fed && seq_le(h.seq, next)) else {
                return;
            };
            h.fed = true;
            if seq_lt(next, h.end) {
                let skip = next.wrapping_sub(h.seq) as usize;
                if let Ok(seg) = Segment::parse(&h.packet) {
                    let payload = seg.payload(&h.packet);
                    events.extend(self.stream.push(payload.get(skip..).unwrap_or(&[])));
                }
                self.next_seq = Some(h.end);
            }
        }
    }
}

/// All diverted HTTP flows.
#[derive(Debug, Default)]
pub struct HttpFlows {
    flows: HashMap<FlowTuple, HttpFlow>,
}

impl HttpFlows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Flows currently tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Forgets flows idle past their timeout.
    pub fn expire(&mut self, now: Instant) {
        self.flows.retain(|_, f| {
            let timeout = if f.stage == Stage::Denied {
                DENIED_TIMEOUT
            } else {
                IDLE_TIMEOUT
            };
            now.saturating_duration_since(f.last_seen) < timeout
        });
    }

    /// Handles one diverted client packet of a flow governed by `policy`; `uid` is the sending
    /// socket's owner as the classifier saw it.
    pub fn handle(
        &mut self,
        packet: Vec<u8>,
        segment: &Segment,
        policy: &HttpPolicy,
        uid: Option<u32>,
        now: Instant,
    ) -> Outcome {
        let mut out = Outcome::default();
        let Some(tcp) = segment.tcp else {
            // A non-first fragment or a non-TCP packet: nothing to read, the default decides.
            match policy.default {
                HttpAction::Allow => out.effects.push(Effect::Reinject(packet)),
                HttpAction::Reset => out.dropped += 1,
            }
            return out;
        };
        if !self.flows.contains_key(&segment.flow) && self.flows.len() >= MAX_FLOWS {
            self.evict_oldest();
        }
        let flow = self
            .flows
            .entry(segment.flow)
            .or_insert_with(|| HttpFlow::new(now));
        flow.last_seen = now;
        if tcp.ack_flag {
            flow.client_expects = Some(tcp.ack);
        }
        match flow.stage {
            Stage::Passing => out.effects.push(Effect::Reinject(packet)),
            Stage::Denied => out.dropped += 1,
            Stage::Inspecting => inspect(
                flow,
                &segment.flow,
                packet,
                segment,
                &tcp,
                policy,
                uid,
                &mut out,
            ),
        }
        if tcp.rst && flow.stage != Stage::Denied {
            self.flows.remove(&segment.flow);
        }
        out
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .flows
            .iter()
            .min_by_key(|(_, f)| f.last_seen)
            .map(|(k, _)| *k)
        {
            self.flows.remove(&oldest);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn inspect(
    flow: &mut HttpFlow,
    tuple: &FlowTuple,
    packet: Vec<u8>,
    segment: &Segment,
    tcp: &TcpFields,
    policy: &HttpPolicy,
    uid: Option<u32>,
    out: &mut Outcome,
) {
    if tcp.syn {
        flow.base_seq = tcp.seq.wrapping_add(1);
        flow.next_seq = Some(flow.base_seq);
        flow.released = flow.base_seq;
        out.effects.push(Effect::Reinject(packet));
        return;
    }
    if flow.next_seq.is_none() {
        // Joined mid-connection (the SYN was sent before the policy was installed): inspect
        // from here on.
        flow.base_seq = tcp.seq;
        flow.next_seq = Some(tcp.seq);
        flow.released = tcp.seq;
    }
    let next = flow.next_seq.unwrap_or(tcp.seq);
    if tcp.payload_len == 0 {
        out.effects.push(Effect::Reinject(packet));
        return;
    }
    let end = tcp.seq.wrapping_add(tcp.payload_len as u32);
    if seq_le(end, next) {
        // A retransmission of bytes already seen: pass it if those bytes were released, else
        // the held copy will go out with the decision.
        if seq_le(end, flow.released) {
            out.effects.push(Effect::Reinject(packet));
        } else {
            out.dropped += 1;
        }
        return;
    }
    let mut events = Vec::new();
    flow.held_bytes += packet.len();
    if seq_lt(next, tcp.seq) {
        flow.held.push(Held {
            seq: tcp.seq,
            end,
            fed: false,
            packet,
        });
    } else {
        let skip = next.wrapping_sub(tcp.seq) as usize;
        events.extend(
            flow.stream
                .push(segment.payload(&packet).get(skip..).unwrap_or(&[])),
        );
        flow.next_seq = Some(end);
        flow.held.push(Held {
            seq: tcp.seq,
            end,
            fed: true,
            packet,
        });
        flow.feed_contiguous(&mut events);
    }
    for event in events {
        let decision = match event {
            StreamEvent::Request { method, path, .. } => {
                let action = policy.decide(&path, uid);
                Decision {
                    flow: *tuple,
                    uid,
                    method,
                    path,
                    action,
                    unreadable: None,
                }
            }
            StreamEvent::Unframeable(why) => Decision {
                flow: *tuple,
                uid,
                method: String::new(),
                path: String::new(),
                action: policy.default,
                unreadable: Some(why),
            },
        };
        let (action, unreadable) = (decision.action, decision.unreadable.is_some());
        out.decisions.push(decision);
        if action == HttpAction::Reset {
            flow.deny(tuple, out);
            return;
        }
        if unreadable {
            flow.stage = Stage::Passing;
            flow.release(out, true);
            return;
        }
    }
    if flow.held_bytes > MAX_HELD_BYTES {
        out.decisions.push(Decision {
            flow: *tuple,
            uid,
            method: String::new(),
            path: String::new(),
            action: policy.default,
            unreadable: Some(format!(
                "more than {MAX_HELD_BYTES} bytes held without a decision"
            )),
        });
        match policy.default {
            HttpAction::Reset => flow.deny(tuple, out),
            HttpAction::Allow => {
                flow.stage = Stage::Passing;
                flow.release(out, true);
            }
        }
        return;
    }
    flow.release(out, false);
}
