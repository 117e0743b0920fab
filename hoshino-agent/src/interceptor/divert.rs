//! Divert handling: packets the classifier redirected to the divert TUN are judged here and
//! reinjected unchanged, dropped, or answered with resets.
//!
//! - [`segment`]: one checked parse of a diverted packet.
//! - [`http_stream`]: request framing of an HTTP/1.x client stream.
//! - [`flows`]: per-flow decisions for `http` divert rules (sans-IO).
//! - [`rst`]: TCP reset packets.
//! - [`device`]: the divert TUN and the raw reinjection sockets (I/O).
//! - [`service`]: the loop tying them to the classifier's flow map (I/O).

pub mod device;
pub mod flows;
pub mod http_stream;
pub mod rst;
pub mod segment;
pub mod service;

#[cfg(test)]
mod tests;

use std::time::Instant;

use crate::policy::{DivertPolicy, PacketAction};

pub use flows::{Decision, Effect, HttpFlows, Outcome};
pub use segment::{FlowTuple, Segment, SegmentError};

/// The sans-IO divert core: per-rule handling of diverted packets.
#[derive(Debug, Default)]
pub struct Diverter {
    http: HttpFlows,
}

impl Diverter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one diverted packet (already parsed into `segment`) under the divert policy of
    /// the rule that diverted it; `uid` is the sending socket's owner per the classifier.
    pub fn handle(
        &mut self,
        packet: Vec<u8>,
        segment: &Segment,
        divert: &DivertPolicy,
        uid: Option<u32>,
        now: Instant,
    ) -> Outcome {
        match divert {
            DivertPolicy::Packets(PacketAction::Reinject) => Outcome {
                effects: vec![Effect::Reinject(packet)],
                ..Outcome::default()
            },
            DivertPolicy::Packets(PacketAction::Drop) => Outcome {
                dropped: 1,
                ..Outcome::default()
            },
            DivertPolicy::Http(http) => self.http.handle(packet, segment, http, uid, now),
        }
    }

    /// Forgets idle flows; call periodically.
    pub fn expire(&mut self, now: Instant) {
        self.http.expire(now);
    }

    /// HTTP flows currently tracked.
    pub fn tracked_flows(&self) -> usize {
        self.http.len()
    }
}
