//! Divert handling: packets the classifier redirected to the divert TUN.
//!
//! Rules with an `http` section are terminated by the metadata proxy ([`super::proxy`]); no
//! packet of theirs is forwarded. Plain `divert` rules are inspection without enforcement of
//! content: their packets are reinjected unchanged (or dropped, `then = "drop"`).
//!
//! - [`segment`]: one checked parse of a diverted packet (its flow and TCP flags).
//! - [`counters`]: the divert counters in the metrics.
//! - [`device`]: the divert TUN and the raw reinjection sockets (I/O).
//! - [`service`]: the loop tying them, the proxy and the classifier's flow map (I/O).

pub mod counters;
pub mod device;
pub mod segment;
pub mod service;

use crate::policy::PacketAction;

pub use segment::{FlowTuple, Segment, SegmentError};

/// What happens to a packet of a plain divert rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketOutcome {
    Reinject(Vec<u8>),
    Drop,
}

/// Handles one packet of a plain divert rule (no `http` section).
pub fn plain_divert(packet: Vec<u8>, action: PacketAction) -> PacketOutcome {
    match action {
        PacketAction::Reinject => PacketOutcome::Reinject(packet),
        PacketAction::Drop => PacketOutcome::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_rules_reinject_or_drop_without_inspection() {
        let packet = vec![0x45, 0, 0, 20];
        assert_eq!(
            plain_divert(packet.clone(), PacketAction::Reinject),
            PacketOutcome::Reinject(packet.clone())
        );
        assert_eq!(
            plain_divert(packet, PacketAction::Drop),
            PacketOutcome::Drop
        );
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert!(Segment::parse(&[]).is_err());
        assert!(Segment::parse(&[0x45, 0, 0]).is_err());
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [169, 254, 169, 254], 64)
            .tcp(40000, 80, 1, 64000)
            .write(&mut p, b"GET / HTTP/1.1\r\n\r\n")
            .expect("builds");
        p.truncate(30);
        assert!(Segment::parse(&p).is_err());
    }
}
