//! Bundle codec v1: several IPv6 packets for one destination in one object, optionally
//! authenticated with HMAC-SHA256 under the network key. Layout (big-endian) in `docs/DESIGN.md`.
//!
//! Encoding writes packets straight into the object buffer (`BundleWriter`) so egress copies
//! each packet once; decoding is one checked parser returning borrowed packet slices.

use std::ops::Range;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::node_addr::NodeId;

pub const MAGIC: &[u8; 4] = b"HSB1";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
pub const MAC_LEN: usize = 32;
pub const FLAG_AUTHENTICATED: u8 = 0x01;
/// Upper bound on packets per bundle (the parser also checks it against the object's size).
pub const MAX_PACKETS: u32 = 65_536;
/// Objects larger than this are deleted unread.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
const IPV6_HEADER_LEN: usize = 40;
/// Network keys shorter than this are refused: a guessable key authenticates nothing.
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum BundleError {
    #[error("bundle of {0} bytes exceeds the {MAX_BUNDLE_BYTES}-byte limit")]
    Oversized(usize),
    #[error("bad magic {0:02x?}, expected \"HSB1\"")]
    BadMagic([u8; 4]),
    #[error("unsupported bundle version {0}")]
    BadVersion(u8),
    #[error("unknown flags {0:#04x} or nonzero reserved field")]
    BadFlags(u8),
    #[error("truncated: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("packet count {0} outside 1..={MAX_PACKETS}")]
    BadCount(u32),
    #[error("packet {index}: {reason}")]
    BadPacket { index: u32, reason: &'static str },
    #[error("{0} trailing bytes after the last packet")]
    TrailingBytes(usize),
    #[error("authentication tag does not verify")]
    BadMac,
    #[error("bundle is not authenticated but this node requires a network key")]
    Unauthenticated,
    #[error("bundle is authenticated but this node has no network key to verify it")]
    NoKey,
    #[error("header sender {header} differs from key sender {key}")]
    SenderMismatch { header: NodeId, key: NodeId },
    #[error("header destination {header} is not this node {us}")]
    WrongDestination { header: NodeId, us: NodeId },
}

impl BundleError {
    /// Stable label for `hoshino_bundles_rejected_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::Oversized(_) => "oversized",
            BundleError::BadMagic(_) => "bad_magic",
            BundleError::BadVersion(_) => "bad_version",
            BundleError::BadFlags(_) => "bad_flags",
            BundleError::Truncated { .. } => "truncated",
            BundleError::BadCount(_) => "bad_count",
            BundleError::BadPacket { .. } => "bad_packet",
            BundleError::TrailingBytes(_) => "length_mismatch",
            BundleError::BadMac => "bad_mac",
            BundleError::Unauthenticated => "unauthenticated",
            BundleError::NoKey => "no_key",
            BundleError::SenderMismatch { .. } => "sender_mismatch",
            BundleError::WrongDestination { .. } => "wrong_destination",
        }
    }
}

/// The shared secret of a network; bundles carry an HMAC-SHA256 under it when configured.
#[derive(Clone)]
pub struct NetworkKey(Vec<u8>);

impl NetworkKey {
    /// `None` when the key is shorter than `MIN_KEY_LEN`.
    pub fn new(bytes: &[u8]) -> Option<NetworkKey> {
        (bytes.len() >= MIN_KEY_LEN).then(|| NetworkKey(bytes.to_vec()))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC-SHA256 accepts any key length"),
        }
    }
}

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetworkKey({} bytes)", self.0.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundleHeader {
    pub sender: NodeId,
    pub dest: NodeId,
    pub session: u64,
    pub seq: u64,
}

/// Builds one bundle in place. The header is written at `finish`, when the sequence number is
/// known.
#[derive(Debug)]
pub struct BundleWriter {
    buf: Vec<u8>,
    count: u32,
}

impl BundleWriter {
    pub fn new() -> BundleWriter {
        Self::with_capacity(HEADER_LEN + 2048)
    }

    pub fn with_capacity(capacity: usize) -> BundleWriter {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN));
        buf.resize(HEADER_LEN, 0);
        BundleWriter { buf, count: 0 }
    }

    /// Bytes the bundle occupies so far (header + packets, without MAC).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn packet_count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes a packet of `len` adds.
    pub fn cost(len: usize) -> usize {
        4 + len
    }

    pub fn is_full(&self) -> bool {
        self.count >= MAX_PACKETS
    }

    /// Appends a packet. The caller checks `is_full` and the size budget; packets longer than
    /// `u32::MAX` cannot come from a TUN.
    pub fn push(&mut self, packet: &[u8]) {
        let len = u32::try_from(packet.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(packet);
        self.count += 1;
    }

    pub fn finish(mut self, header: &BundleHeader, key: Option<&NetworkKey>) -> Vec<u8> {
        let flags = if key.is_some() { FLAG_AUTHENTICATED } else { 0 };
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = flags;
        h[8..16].copy_from_slice(&header.sender.0.to_be_bytes());
        h[16..24].copy_from_slice(&header.dest.0.to_be_bytes());
        h[24..32].copy_from_slice(&header.session.to_be_bytes());
        h[32..40].copy_from_slice(&header.seq.to_be_bytes());
        h[40..44].copy_from_slice(&self.count.to_be_bytes());
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        if let Some(key) = key {
            let mut mac = key.mac();
            mac.update(&self.buf);
            let tag = mac.finalize().into_bytes();
            self.buf.extend_from_slice(&tag);
        }
        self.buf
    }
}

impl Default for BundleWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed bundle: the header and the byte ranges of its packets within the object.
#[derive(Debug, PartialEq, Eq)]
pub struct Bundle {
    pub header: BundleHeader,
    pub packets: Vec<Range<usize>>,
}

/// Reads `n` bytes at `offset`, or says how short the input is.
fn take(input: &[u8], offset: usize, n: usize) -> Result<&[u8], BundleError> {
    offset
        .checked_add(n)
        .and_then(|end| input.get(offset..end))
        .ok_or(BundleError::Truncated {
            offset,
            needed: n,
            available: input.len().saturating_sub(offset),
        })
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_be_bytes(a)
}

/// The one checked parser. `key` is this node's network key: when set, only authenticated
/// bundles are accepted; when unset, authenticated bundles are refused since they cannot be
/// verified.
pub fn decode(input: &[u8], key: Option<&NetworkKey>) -> Result<Bundle, BundleError> {
    if input.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Oversized(input.len()));
    }
    let head = take(input, 0, HEADER_LEN)?;
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&head[0..4]);
    if &magic != MAGIC {
        return Err(BundleError::BadMagic(magic));
    }
    if head[4] != VERSION {
        return Err(BundleError::BadVersion(head[4]));
    }
    let flags = head[5];
    if flags & !FLAG_AUTHENTICATED != 0 || head[6..8] != [0, 0] || head[44..48] != [0; 4] {
        return Err(BundleError::BadFlags(flags));
    }
    let body_end = if flags & FLAG_AUTHENTICATED != 0 {
        let key = key.ok_or(BundleError::NoKey)?;
        let body_end = input
            .len()
            .checked_sub(MAC_LEN)
            .filter(|&e| e >= HEADER_LEN)
            .ok_or(BundleError::Truncated {
                offset: HEADER_LEN,
                needed: MAC_LEN,
                available: input.len() - HEADER_LEN,
            })?;
        let mut mac = key.mac();
        mac.update(&input[..body_end]);
        mac.verify_slice(&input[body_end..])
            .map_err(|_| BundleError::BadMac)?;
        body_end
    } else {
        if key.is_some() {
            return Err(BundleError::Unauthenticated);
        }
        input.len()
    };
    let body = &input[..body_end];
    let header = BundleHeader {
        sender: NodeId(be_u64(&head[8..16])),
        dest: NodeId(be_u64(&head[16..24])),
        session: be_u64(&head[24..32]),
        seq: be_u64(&head[32..40]),
    };
    let count = be_u32(&head[40..44]);
    let max_fit = (body.len() - HEADER_LEN) / (4 + IPV6_HEADER_LEN);
    if count == 0 || count > MAX_PACKETS || count as usize > max_fit.max(1) {
        return Err(BundleError::BadCount(count));
    }
    let mut packets = Vec::with_capacity(count as usize);
    let mut offset = HEADER_LEN;
    for index in 0..count {
        let len = be_u32(take(body, offset, 4)?) as usize;
        offset += 4;
        let packet = take(body, offset, len)?;
        check_ipv6(packet).map_err(|reason| BundleError::BadPacket { index, reason })?;
        packets.push(offset..offset + len);
        offset += len;
    }
    if offset != body.len() {
        return Err(BundleError::TrailingBytes(body.len() - offset));
    }
    Ok(Bundle { header, packets })
}

/// A packet inside a bundle must be a complete IPv6 packet: its payload length field agrees with
/// the length prefix, so a receiver never writes a torn packet to its TUN.
fn check_ipv6(packet: &[u8]) -> Result<(), &'static str> {
    if packet.len() < IPV6_HEADER_LEN {
        return Err("shorter than an IPv6 header");
    }
    if packet[0] >> 4 != 6 {
        return Err("not IPv6");
    }
    let payload = u16::from_be_bytes([packet[4], packet[5]]) as usize;
    if payload + IPV6_HEADER_LEN != packet.len() {
        return Err("IPv6 payload length disagrees with the length prefix");
    }
    Ok(())
}

/// The IPv6 source and destination of a packet that passed `decode`'s checks.
pub fn ipv6_endpoints(packet: &[u8]) -> Option<(std::net::Ipv6Addr, std::net::Ipv6Addr)> {
    let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
    Some((src.into(), dst.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ipv6_packet(src: u128, dst: u128, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.to_be_bytes());
        p[24..40].copy_from_slice(&dst.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn header() -> BundleHeader {
        BundleHeader {
            sender: NodeId(0x1111),
            dest: NodeId(0x2222),
            session: 0xdead_beef,
            seq: 7,
        }
    }

    fn key() -> NetworkKey {
        NetworkKey::new(b"0123456789abcdef-network").unwrap()
    }

    fn encode(packets: &[Vec<u8>], key: Option<&NetworkKey>) -> Vec<u8> {
        let mut w = BundleWriter::new();
        for p in packets {
            w.push(p);
        }
        w.finish(&header(), key)
    }

    fn sample() -> Vec<Vec<u8>> {
        vec![
            ipv6_packet(1, 2, b"hello"),
            ipv6_packet(1, 2, b""),
            ipv6_packet(1, 2, &[7u8; 1500]),
        ]
    }

    #[test]
    fn round_trip_preserves_header_and_packets_in_order() {
        let packets = sample();
        let bytes = encode(&packets, None);
        let b = decode(&bytes, None).unwrap();
        assert_eq!(b.header, header());
        let got: Vec<&[u8]> = b.packets.iter().map(|r| &bytes[r.clone()]).collect();
        assert_eq!(
            got,
            packets.iter().map(|p| p.as_slice()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn authenticated_round_trip_verifies() {
        let bytes = encode(&sample(), Some(&key()));
        assert_eq!(bytes[5], FLAG_AUTHENTICATED);
        let b = decode(&bytes, Some(&key())).unwrap();
        assert_eq!(b.packets.len(), 3);
    }

    #[test]
    fn forged_bundle_with_wrong_key_is_rejected() {
        let other = NetworkKey::new(b"another-key-of-16+bytes").unwrap();
        let bytes = encode(&sample(), Some(&other));
        assert_eq!(decode(&bytes, Some(&key())), Err(BundleError::BadMac));
    }

    #[test]
    fn tampered_payload_fails_mac() {
        let mut bytes = encode(&sample(), Some(&key()));
        bytes[HEADER_LEN + 4 + 40] ^= 1;
        assert_eq!(decode(&bytes, Some(&key())), Err(BundleError::BadMac));
    }

    #[test]
    fn unauthenticated_bundle_is_rejected_when_key_is_configured() {
        let bytes = encode(&sample(), None);
        assert_eq!(
            decode(&bytes, Some(&key())),
            Err(BundleError::Unauthenticated)
        );
    }

    #[test]
    fn authenticated_bundle_without_local_key_is_rejected() {
        let bytes = encode(&sample(), Some(&key()));
        assert_eq!(decode(&bytes, None), Err(BundleError::NoKey));
    }

    #[test]
    fn short_network_key_is_refused() {
        assert!(NetworkKey::new(b"short").is_none());
    }

    #[test]
    fn bad_magic_version_and_flags_are_rejected() {
        let good = encode(&sample(), None);
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b, None), Err(BundleError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(decode(&b, None), Err(BundleError::BadVersion(2)));
        let mut b = good.clone();
        b[5] = 0x80;
        assert_eq!(decode(&b, None), Err(BundleError::BadFlags(0x80)));
        let mut b = good;
        b[7] = 1;
        assert!(matches!(decode(&b, None), Err(BundleError::BadFlags(_))));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for k in [None, Some(key())] {
            let bytes = encode(&sample(), k.as_ref());
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut], k.as_ref()).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn trailing_garbage_is_a_length_mismatch() {
        let mut bytes = encode(&sample(), None);
        bytes.push(0);
        assert_eq!(decode(&bytes, None), Err(BundleError::TrailingBytes(1)));
    }

    #[test]
    fn zero_and_huge_counts_are_rejected() {
        let mut bytes = encode(&sample(), None);
        bytes[40..44].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode(&bytes, None), Err(BundleError::BadCount(0)));
        bytes[40..44].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&bytes, None), Err(BundleError::BadCount(u32::MAX)));
    }

    #[test]
    fn packet_whose_ipv6_length_disagrees_is_rejected() {
        let mut p = ipv6_packet(1, 2, b"abc");
        p[5] = 9;
        let bytes = encode(&[p], None);
        assert!(matches!(
            decode(&bytes, None),
            Err(BundleError::BadPacket { index: 0, .. })
        ));
    }

    #[test]
    fn ipv4_packet_inside_bundle_is_rejected() {
        let mut p = ipv6_packet(1, 2, b"abc");
        p[0] = 0x45;
        let bytes = encode(&[p], None);
        assert!(matches!(
            decode(&bytes, None),
            Err(BundleError::BadPacket { .. })
        ));
    }

    #[test]
    fn oversized_input_is_rejected_before_parsing() {
        let bytes = vec![0u8; MAX_BUNDLE_BYTES + 1];
        assert_eq!(
            decode(&bytes, None),
            Err(BundleError::Oversized(MAX_BUNDLE_BYTES + 1))
        );
    }

    #[test]
    fn length_prefix_pointing_past_end_is_truncated() {
        let mut bytes = encode(&sample(), None);
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&bytes, None),
            Err(BundleError::Truncated { .. })
        ));
    }

    #[test]
    fn endpoints_are_read_from_the_packet() {
        let p = ipv6_packet(0xaa, 0xbb, b"x");
        let (s, d) = ipv6_endpoints(&p).unwrap();
        assert_eq!(u128::from(s), 0xaa);
        assert_eq!(u128::from(d), 0xbb);
        assert_eq!(ipv6_endpoints(&p[..20]), None);
    }

    /// A small xorshift generator keeps the fuzz test deterministic without a dependency.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let seed = encode(&sample(), None);
        let seed_auth = encode(&sample(), Some(&key()));
        for round in 0..20_000 {
            let mut bytes = match round % 3 {
                0 => {
                    let n = (xorshift(&mut s) % 256) as usize;
                    (0..n).map(|_| xorshift(&mut s) as u8).collect::<Vec<u8>>()
                }
                1 => seed.clone(),
                _ => seed_auth.clone(),
            };
            if round % 3 != 0 {
                for _ in 0..(1 + xorshift(&mut s) % 4) {
                    let len = bytes.len();
                    let i = (xorshift(&mut s) as usize) % len;
                    bytes[i] = xorshift(&mut s) as u8;
                }
                let cut = (xorshift(&mut s) as usize) % (bytes.len() + 1);
                bytes.truncate(cut.max(bytes.len() / 2));
            } else if bytes.len() >= 8 {
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4] = VERSION;
                bytes[5] = (xorshift(&mut s) % 2) as u8;
            }
            let k = key();
            let _ = decode(&bytes, None);
            let _ = decode(&bytes, Some(&k));
        }
    }
}
