//! Writes bundles (DESIGN.md "Bundle format v1") and IPv6/UDP packets from first principles, so
//! tests can put hand-made, malformed and forged objects into an inbox without using the agent's
//! own encoder.

use std::net::Ipv6Addr;

pub const MAGIC: &[u8; 4] = b"HSB1";
pub const HEADER_LEN: usize = 48;
/// Objects larger than this are deleted unread by the receiver.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct BundleHeader {
    pub sender: u64,
    pub dest: u64,
    pub session: u64,
    pub seq: u64,
}

/// The key of bundle `seq` of `sender`'s stream `session` in `dest`'s inbox (DESIGN.md "Mailbox
/// keys", layout v2): `v2/inbox/<dest>/<session>-<seq>.<sender>`, fixed-width lowercase hex.
pub fn bundle_key(dest: u64, session: u64, seq: u64, sender: u64) -> String {
    format!("v2/inbox/{dest:016x}/{session:016x}-{seq:016x}.{sender:016x}")
}

/// An unauthenticated v1 bundle holding `packets`.
pub fn encode_bundle(header: &BundleHeader, packets: &[Vec<u8>]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(HEADER_LEN + packets.iter().map(|p| p.len() + 4).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.push(1); // version
    out.push(0); // flags: not authenticated
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&header.sender.to_be_bytes());
    out.extend_from_slice(&header.dest.to_be_bytes());
    out.extend_from_slice(&header.session.to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    let count = u32::try_from(packets.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    for p in packets {
        let len = u32::try_from(p.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// An IPv6 packet carrying one UDP datagram, with a correct UDP checksum.
pub fn udp6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let checksum = udp6_checksum(src, dst, &udp);
    if let Some(slot) = udp.get_mut(6..8) {
        slot.copy_from_slice(&checksum.to_be_bytes());
    }

    let mut packet = Vec::with_capacity(40 + udp.len());
    packet.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class, no flow label
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.push(17); // next header: UDP
    packet.push(64); // hop limit
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(&udp);
    packet
}

fn udp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, udp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let hi = u32::from(chunk.first().copied().unwrap_or(0));
            let lo = u32::from(chunk.get(1).copied().unwrap_or(0));
            sum = sum.wrapping_add((hi << 8) | lo);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::try_from(udp.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let folded = !(sum as u16);
    // RFC 768: a computed zero is sent as all ones (zero means "no checksum", invalid in IPv6).
    if folded == 0 { 0xffff } else { folded }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_header_fields_sit_at_their_offsets() {
        let h = BundleHeader {
            sender: 1,
            dest: 2,
            session: 3,
            seq: 4,
        };
        let b = encode_bundle(&h, &[vec![0xaa; 3]]);
        assert_eq!(&b[0..4], MAGIC);
        assert_eq!(b[4], 1);
        assert_eq!(b[15], 1);
        assert_eq!(b[23], 2);
        assert_eq!(b[31], 3);
        assert_eq!(b[39], 4);
        assert_eq!(&b[40..44], &[0, 0, 0, 1]);
        assert_eq!(&b[48..52], &[0, 0, 0, 3]);
        assert_eq!(b.len(), HEADER_LEN + 4 + 3);
    }

    #[test]
    fn bundle_keys_are_fixed_width_lowercase_hex() {
        assert_eq!(
            bundle_key(0xab, 0xcd, 1, 0xef),
            "v2/inbox/00000000000000ab/00000000000000cd-0000000000000001.00000000000000ef"
        );
    }

    #[test]
    fn udp_checksum_verifies_to_zero() {
        let src: Ipv6Addr = "fd68::1".parse().unwrap();
        let dst: Ipv6Addr = "fd68::2".parse().unwrap();
        let p = udp6_packet(src, dst, 1000, 2000, b"hello");
        // Summing the pseudo-header and the datagram including its checksum gives 0xffff.
        let udp = &p[40..];
        let mut sum: u32 = 0;
        let mut words = Vec::new();
        words.extend_from_slice(&src.octets());
        words.extend_from_slice(&dst.octets());
        words.extend_from_slice(&(udp.len() as u32).to_be_bytes());
        words.extend_from_slice(&[0, 0, 0, 17]);
        words.extend_from_slice(udp);
        words.push(0);
        for c in words.chunks(2) {
            if c.len() == 2 {
                sum += u32::from(c[0]) << 8 | u32::from(c[1]);
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
