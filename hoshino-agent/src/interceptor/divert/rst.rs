//! TCP resets for a refused request: one to the client (written into the divert TUN, so the
//! local socket fails at once) and one to the server (reinjected, so it frees the connection).

use std::net::IpAddr;

use etherparse::{PacketBuilder, TcpHeader};

use super::segment::FlowTuple;

/// Hop limit of generated packets.
const HOP_LIMIT: u8 = 64;

/// Why a reset could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RstError {
    #[error("flow {0:?} mixes IPv4 and IPv6 addresses")]
    MixedFamilies(FlowTuple),
    #[error("cannot serialize reset for flow {flow:?}: {reason}")]
    Build { flow: FlowTuple, reason: String },
}

/// A reset from the server to the client. `seq` must be the client's next expected sequence
/// number (the ACK number of its latest segment), which Linux requires exactly (RFC 5961);
/// `ack` acknowledges what the client sent.
pub fn reset_to_client(flow: &FlowTuple, seq: u32, ack: u32) -> Result<Vec<u8>, RstError> {
    let mut header = TcpHeader::new(flow.dst_port, flow.src_port, seq, 0);
    header.rst = true;
    header.ack = true;
    header.acknowledgment_number = ack;
    build(flow, flow.dst, flow.src, header)
}

/// A reset from the client to the server; `seq` must be the server's next expected sequence
/// number (the first client byte the server has not received).
pub fn reset_to_server(flow: &FlowTuple, seq: u32) -> Result<Vec<u8>, RstError> {
    let mut header = TcpHeader::new(flow.src_port, flow.dst_port, seq, 0);
    header.rst = true;
    build(flow, flow.src, flow.dst, header)
}

fn build(
    flow: &FlowTuple,
    src: IpAddr,
    dst: IpAddr,
    header: TcpHeader,
) -> Result<Vec<u8>, RstError> {
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), HOP_LIMIT),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), HOP_LIMIT),
        _ => return Err(RstError::MixedFamilies(*flow)),
    }
    .tcp_header(header);
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).map_err(|e| RstError::Build {
        flow: *flow,
        reason: e.to_string(),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn flow(src: &str, dst: &str) -> FlowTuple {
        FlowTuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 6,
            src_port: 40000,
            dst_port: 80,
        }
    }

    /// Parses a generated packet and checks its IP and TCP checksums against etherparse's own
    /// computation.
    fn check(packet: &[u8]) -> (IpAddr, IpAddr, etherparse::TcpHeader) {
        let sliced = SlicedPacket::from_ip(packet).expect("generated packet parses");
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            panic!("not TCP")
        };
        match &sliced.net {
            Some(NetSlice::Ipv4(v4)) => {
                let h = v4.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let sum = tcp.calc_checksum_ipv4(h.source, h.destination).unwrap();
                assert_eq!(tcp.checksum(), sum);
                (
                    IpAddr::V4(h.source.into()),
                    IpAddr::V4(h.destination.into()),
                    tcp.to_header(),
                )
            }
            Some(NetSlice::Ipv6(v6)) => {
                let h = v6.header().to_header();
                let sum = tcp.calc_checksum_ipv6(h.source, h.destination).unwrap();
                assert_eq!(tcp.checksum(), sum);
                (
                    IpAddr::V6(h.source.into()),
                    IpAddr::V6(h.destination.into()),
                    tcp.to_header(),
                )
            }
            _ => panic!("not IP"),
        }
    }

    #[test]
    fn client_reset_comes_from_the_server_with_the_clients_expected_seq() {
        let f = flow("10.0.0.2", "169.254.169.254");
        let packet = reset_to_client(&f, 7000, 1234).unwrap();
        let (src, dst, tcp) = check(&packet);
        assert_eq!((src, dst), (f.dst, f.src));
        assert_eq!((tcp.source_port, tcp.destination_port), (80, 40000));
        assert!(tcp.rst && tcp.ack && !tcp.syn && !tcp.fin);
        assert_eq!(
            (tcp.sequence_number, tcp.acknowledgment_number),
            (7000, 1234)
        );
    }

    #[test]
    fn server_reset_comes_from_the_client_over_ipv6() {
        let f = flow("fd00:1::2", "fd00:ec2::254");
        let packet = reset_to_server(&f, 99).unwrap();
        let (src, dst, tcp) = check(&packet);
        assert_eq!((src, dst), (f.src, f.dst));
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 80));
        assert!(tcp.rst && !tcp.ack);
        assert_eq!(tcp.sequence_number, 99);
    }

    #[test]
    fn mixed_family_flow_is_an_error_not_a_panic() {
        let f = flow("10.0.0.2", "fd00:ec2::254");
        assert!(matches!(
            reset_to_client(&f, 1, 1),
            Err(RstError::MixedFamilies(_))
        ));
    }
}
