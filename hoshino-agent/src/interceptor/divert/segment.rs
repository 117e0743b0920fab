//! A diverted packet, parsed once with etherparse's checked slices: its flow and, for TCP, the
//! fields the stream view and the RST builder need.

use std::net::IpAddr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Why a diverted packet could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("not a well-formed IP packet ({len} bytes): {reason}")]
    Malformed { len: usize, reason: String },
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
}

/// A flow as the client sent it: (source, destination, protocol, ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// TCP header fields of a segment and where its payload sits in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFields {
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub fin: bool,
    pub rst: bool,
    /// Byte range of the payload within the packet.
    pub payload_start: usize,
    pub payload_len: usize,
}

impl TcpFields {
    /// Sequence space the segment occupies (payload, plus one each for SYN and FIN).
    pub fn seq_len(&self) -> u32 {
        let len = u32::try_from(self.payload_len).unwrap_or(u32::MAX);
        len.wrapping_add(u32::from(self.syn))
            .wrapping_add(u32::from(self.fin))
    }
}

/// A parsed diverted packet; `tcp` is None for other protocols and for non-first fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub flow: FlowTuple,
    pub tcp: Option<TcpFields>,
}

impl Segment {
    /// Parses an IP packet as read from the divert TUN.
    pub fn parse(packet: &[u8]) -> Result<Segment, SegmentError> {
        let sliced = SlicedPacket::from_ip(packet).map_err(|e| SegmentError::Malformed {
            len: packet.len(),
            reason: e.to_string(),
        })?;
        let (src, dst, proto) = match &sliced.net {
            Some(NetSlice::Ipv4(v4)) => (
                IpAddr::V4(v4.header().source_addr()),
                IpAddr::V4(v4.header().destination_addr()),
                v4.payload().ip_number.0,
            ),
            Some(NetSlice::Ipv6(v6)) => (
                IpAddr::V6(v6.header().source_addr()),
                IpAddr::V6(v6.header().destination_addr()),
                v6.payload().ip_number.0,
            ),
            _ => return Err(SegmentError::NotIp),
        };
        let mut flow = FlowTuple {
            src,
            dst,
            proto,
            src_port: 0,
            dst_port: 0,
        };
        let tcp = match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                flow.src_port = tcp.source_port();
                flow.dst_port = tcp.destination_port();
                let payload = tcp.payload();
                // The payload is a subslice of `packet`; its offset is the distance between
                // their starts.
                let payload_start =
                    (payload.as_ptr() as usize).saturating_sub(packet.as_ptr() as usize);
                Some(TcpFields {
                    seq: tcp.sequence_number(),
                    ack: tcp.acknowledgment_number(),
                    syn: tcp.syn(),
                    ack_flag: tcp.ack(),
                    fin: tcp.fin(),
                    rst: tcp.rst(),
                    payload_start,
                    payload_len: payload.len(),
                })
            }
            Some(TransportSlice::Udp(udp)) => {
                flow.src_port = udp.source_port();
                flow.dst_port = udp.destination_port();
                None
            }
            _ => None,
        };
        Ok(Segment { flow, tcp })
    }

    /// The TCP payload bytes of `packet` (the slice this segment was parsed from).
    pub fn payload<'p>(&self, packet: &'p [u8]) -> &'p [u8] {
        self.tcp
            .and_then(|t| packet.get(t.payload_start..t.payload_start.checked_add(t.payload_len)?))
            .unwrap_or(&[])
    }
}
