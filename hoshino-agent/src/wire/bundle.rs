//! Bundle codec: several IPv6 packets for one destination in one object. Two versions, one
//! checked parser (layouts, big-endian, in `docs/DESIGN.md` "Bundle format"):
//! - v1, without a network key: plaintext, header checks only.
//! - v2, with a network key: the packets are encrypted and authenticated with
//!   XChaCha20-Poly1305 under a key derived from the network key by HKDF-SHA256; the clear
//!   header (with its random 24-byte nonce) is the associated data, so someone who can read the
//!   bucket learns only sizes and timing, and no header field can be changed undetected.
//!
//! A node with a key accepts only v2; a node without one refuses v2 (`no_key`), since it cannot
//! verify it. Encoding writes packets straight into the object buffer (`BundleWriter`) and
//! encrypts them in place, so egress copies each packet once.

use std::ops::Range;

use bytes::Bytes;
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::KeyInit;
use hkdf::Hkdf;
use sha2::Sha256;

use crate::node_addr::NodeId;

use super::seal::{self, NONCE_LEN, OpenError, TAG_LEN};

pub const MAGIC: &[u8; 4] = b"HSB1";
/// Plaintext bundles, written and read only without a network key.
pub const VERSION_PLAIN: u8 = 1;
/// AEAD bundles, written and read only with a network key.
pub const VERSION_AEAD: u8 = 2;
/// The v1 header; `BundleWriter::len` counts it, so size budgets are the same for both versions.
pub const HEADER_LEN: usize = 48;
/// Bytes a network key adds to a bundle over `HEADER_LEN` + packets: the v2 nonce (24) and the
/// Poly1305 tag (16).
pub const MAC_LEN: usize = NONCE_LEN + TAG_LEN;
/// The fields shared by both versions: magic, version, flags, reserved, sender, dest, session, seq.
const FIELDS_LEN: usize = 40;
/// v2's clear header: the fields and the nonce. This is the associated data.
const AEAD_HEADER_LEN: usize = FIELDS_LEN + NONCE_LEN;
/// count (4) and reserved (4): in the clear after the v1 fields, encrypted in v2.
const COUNT_LEN: usize = 8;
/// The writer reserves room for the larger (v2) header so either version is finished in place.
const RESERVED: usize = AEAD_HEADER_LEN + COUNT_LEN;
/// Upper bound on packets per bundle (the parser also checks it against the object's size).
pub const MAX_PACKETS: u32 = 65_536;
/// Objects larger than this are deleted unread.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
const IPV6_HEADER_LEN: usize = 40;
/// Network keys shorter than this are refused: a guessable key authenticates nothing.
pub const MIN_KEY_LEN: usize = 16;
/// HKDF `info`: binds the derived key to this use, so the same key file used for anything else
/// (or a later format) yields an unrelated key.
const KDF_LABEL: &[u8] = b"hoshino bundle v2 xchacha20-poly1305 key";
/// HKDF `info` of the directory records' key.
const DIRECTORY_KDF_LABEL: &[u8] = b"hoshino directory v2 xchacha20-poly1305 key";

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum BundleError {
    #[error("bundle of {0} bytes exceeds the {MAX_BUNDLE_BYTES}-byte limit")]
    Oversized(usize),
    #[error("bad magic {0:02x?}, expected \"HSB1\"")]
    BadMagic([u8; 4]),
    #[error("unsupported bundle version {0}, expected 1 (plain) or 2 (AEAD)")]
    BadVersion(u8),
    #[error("nonzero flags {0:#04x} or reserved field")]
    BadFlags(u8),
    #[error("truncated: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("packet count {0} outside 0..={MAX_PACKETS} or larger than the bundle can hold")]
    BadCount(u32),
    #[error("packet {index}: {reason}")]
    BadPacket { index: u32, reason: &'static str },
    #[error("{0} trailing bytes after the last packet")]
    TrailingBytes(usize),
    #[error("AEAD tag does not verify (wrong network key, or the bundle was altered)")]
    BadMac,
    #[error("bundle is plaintext (v1) but this node requires the network key (v2)")]
    Unauthenticated,
    #[error("bundle is encrypted (v2) but this node has no network key to open it")]
    NoKey,
    #[error("header sender {header} differs from key sender {key}")]
    SenderMismatch { header: NodeId, key: NodeId },
    #[error("header destination {header} is not this node {us}")]
    WrongDestination { header: NodeId, us: NodeId },
}

impl From<OpenError> for BundleError {
    fn from(e: OpenError) -> BundleError {
        match e {
            OpenError::Truncated {
                offset,
                needed,
                available,
            } => BundleError::Truncated {
                offset,
                needed,
                available,
            },
            OpenError::BadMac => BundleError::BadMac,
        }
    }
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

/// The shared secret of a network. Only the AEAD key derived from it is kept.
#[derive(Clone)]
pub struct NetworkKey {
    aead: XChaCha20Poly1305,
    /// The directory's key (`directory::record`), derived from the same secret under its own
    /// label, so a bundle can never be passed off as a directory record or the reverse.
    directory: XChaCha20Poly1305,
    source_len: usize,
}

impl NetworkKey {
    /// `None` when the key is shorter than `MIN_KEY_LEN`.
    pub fn new(bytes: &[u8]) -> Option<NetworkKey> {
        if bytes.len() < MIN_KEY_LEN {
            return None;
        }
        // No salt: the key file is already a secret of full entropy or close to it; the label
        // does the domain separation.
        let hkdf = Hkdf::<Sha256>::new(None, bytes);
        let mut okm = [0u8; 32];
        hkdf.expand(KDF_LABEL, &mut okm).ok()?;
        let mut directory = [0u8; 32];
        hkdf.expand(DIRECTORY_KDF_LABEL, &mut directory).ok()?;
        Some(NetworkKey {
            aead: XChaCha20Poly1305::new(&okm.into()),
            directory: XChaCha20Poly1305::new(&directory.into()),
            source_len: bytes.len(),
        })
    }

    /// The cipher directory records are sealed with.
    pub(crate) fn directory_cipher(&self) -> &XChaCha20Poly1305 {
        &self.directory
    }
}

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetworkKey({} bytes)", self.source_len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundleHeader {
    pub sender: NodeId,
    pub dest: NodeId,
    pub session: u64,
    pub seq: u64,
    /// Sealed because it was full, with more to send at once (`FLAG_MORE`): a receiver can
    /// wait for the next bundle before answering, and probe ahead.
    pub more: bool,
}

/// The one flag bit defined: `BundleHeader::more`.
pub const FLAG_MORE: u8 = 0x01;

impl BundleHeader {
    fn write_fields(&self, version: u8, out: &mut [u8]) {
        out[0..4].copy_from_slice(MAGIC);
        out[4] = version;
        out[5] = if self.more { FLAG_MORE } else { 0 };
        out[6..8].fill(0);
        out[8..16].copy_from_slice(&self.sender.0.to_be_bytes());
        out[16..24].copy_from_slice(&self.dest.0.to_be_bytes());
        out[24..32].copy_from_slice(&self.session.to_be_bytes());
        out[32..40].copy_from_slice(&self.seq.to_be_bytes());
    }
}

/// Builds one bundle in place. The header is written at `finish`, when the sequence number is
/// known. A writer with no packets finishes to a valid empty bundle: an explicit skip marker
/// for its sequence number.
#[derive(Debug)]
pub struct BundleWriter {
    /// `RESERVED` bytes for the header, then the packet records.
    buf: Vec<u8>,
    count: u32,
}

impl BundleWriter {
    pub fn new() -> BundleWriter {
        Self::with_capacity(HEADER_LEN + 2048)
    }

    /// `capacity` counts as `len` does; the AEAD overhead is added to it.
    pub fn with_capacity(capacity: usize) -> BundleWriter {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_LEN) + MAC_LEN);
        buf.resize(RESERVED, 0);
        BundleWriter { buf, count: 0 }
    }

    /// Bytes the bundle occupies so far as v1 (header + packets); v2 adds `MAC_LEN`.
    pub fn len(&self) -> usize {
        self.buf.len() - RESERVED + HEADER_LEN
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

    /// v2 (encrypted) with a key, v1 (plaintext) without.
    pub fn finish(mut self, header: &BundleHeader, key: Option<&NetworkKey>) -> Vec<u8> {
        let count = self.count.to_be_bytes();
        match key {
            Some(key) => {
                let (head, body) = self.buf.split_at_mut(AEAD_HEADER_LEN);
                header.write_fields(VERSION_AEAD, &mut head[..FIELDS_LEN]);
                body[0..4].copy_from_slice(&count);
                body[4..8].fill(0);
                match seal::seal(&key.aead, head, body) {
                    Ok(tag) => self.buf.extend_from_slice(&tag),
                    // Only a buffer beyond the cipher's 256 GiB limit fails; a writer never
                    // holds one (the caller bounds bundles at MAX_BUNDLE_BYTES).
                    Err(_) => unreachable!("XChaCha20-Poly1305 encrypts any bundle-sized buffer"),
                }
                self.buf
            }
            None => {
                // The v1 header is the last HEADER_LEN bytes of the reservation; drop the rest.
                let start = RESERVED - HEADER_LEN;
                header.write_fields(VERSION_PLAIN, &mut self.buf[start..start + FIELDS_LEN]);
                self.buf[start + FIELDS_LEN..start + FIELDS_LEN + 4].copy_from_slice(&count);
                self.buf.drain(..start);
                self.buf
            }
        }
    }
}

impl Default for BundleWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed bundle: the header and the byte ranges of its packets. For v1 the ranges index the
/// object itself; for v2 they index the decrypted plaintext the bundle holds. Read packets with
/// `packet_slices` or `into_parts`, which pick the right buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Bundle {
    pub header: BundleHeader,
    pub packets: Vec<Range<usize>>,
    plaintext: Option<Vec<u8>>,
}

impl Bundle {
    /// The bytes `packets` index: the decrypted plaintext (v2) or `object` (v1).
    pub fn body<'a>(&'a self, object: &'a [u8]) -> &'a [u8] {
        self.plaintext.as_deref().unwrap_or(object)
    }

    /// The packets of this bundle, decoded from `object`.
    pub fn packet_slices<'a>(&'a self, object: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let body = self.body(object);
        self.packets.iter().filter_map(move |r| body.get(r.clone()))
    }

    /// The buffer `packets` index (`object` itself for v1, the plaintext for v2) and the ranges,
    /// for a caller that keeps the packets beyond the parse.
    pub fn into_parts(self, object: Bytes) -> (Bytes, Vec<Range<usize>>) {
        let body = self.plaintext.map_or(object, Bytes::from);
        (body, self.packets)
    }

    /// `true` for an explicit skip marker: a valid bundle that carries no packets.
    pub fn is_skip(&self) -> bool {
        self.packets.is_empty()
    }
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

/// The one checked parser. `key` is this node's network key: with it only v2 bundles are
/// accepted and opened; without it only v1.
pub fn decode(input: &[u8], key: Option<&NetworkKey>) -> Result<Bundle, BundleError> {
    if input.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Oversized(input.len()));
    }
    let fields = take(input, 0, FIELDS_LEN)?;
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&fields[0..4]);
    if &magic != MAGIC {
        return Err(BundleError::BadMagic(magic));
    }
    let version = fields[4];
    if version != VERSION_PLAIN && version != VERSION_AEAD {
        return Err(BundleError::BadVersion(version));
    }
    if fields[5] & !FLAG_MORE != 0 || fields[6..8] != [0, 0] {
        return Err(BundleError::BadFlags(fields[5]));
    }
    let header = BundleHeader {
        sender: NodeId(be_u64(&fields[8..16])),
        dest: NodeId(be_u64(&fields[16..24])),
        session: be_u64(&fields[24..32]),
        seq: be_u64(&fields[32..40]),
        more: fields[5] & FLAG_MORE != 0,
    };
    match (version, key) {
        (VERSION_PLAIN, None) => {
            let packets = parse_records(input, FIELDS_LEN)?;
            Ok(Bundle {
                header,
                packets,
                plaintext: None,
            })
        }
        (VERSION_PLAIN, Some(_)) => Err(BundleError::Unauthenticated),
        (_, None) => Err(BundleError::NoKey),
        (_, Some(key)) => {
            let plaintext = seal::open(&key.aead, input, AEAD_HEADER_LEN, COUNT_LEN)?;
            let packets = parse_records(&plaintext, 0)?;
            Ok(Bundle {
                header,
                packets,
                plaintext: Some(plaintext),
            })
        }
    }
}

/// Parses `count`, `reserved` and the packet records starting at `start` through the end of
/// `body`. The ranges index `body`.
fn parse_records(body: &[u8], start: usize) -> Result<Vec<Range<usize>>, BundleError> {
    let count_field = take(body, start, COUNT_LEN)?;
    let count = be_u32(&count_field[0..4]);
    if count_field[4..8] != [0; 4] {
        return Err(BundleError::BadFlags(0));
    }
    let mut offset = start + COUNT_LEN;
    let max_fit = (body.len() - offset) / (4 + IPV6_HEADER_LEN);
    if count > MAX_PACKETS || count as usize > max_fit {
        return Err(BundleError::BadCount(count));
    }
    let mut packets = Vec::with_capacity(count as usize);
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
    Ok(packets)
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
            more: false,
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

    #[test]
    fn the_more_flag_round_trips_in_both_versions_and_is_authenticated() {
        let full = BundleHeader {
            more: true,
            ..header()
        };
        for k in [None, Some(key())] {
            let mut w = BundleWriter::new();
            w.push(&ipv6_packet(1, 2, b"x"));
            let bytes = w.finish(&full, k.as_ref());
            assert_eq!(bytes[5], FLAG_MORE);
            assert!(decode(&bytes, k.as_ref()).unwrap().header.more);
            assert!(
                !decode(&encode(&sample(), k.as_ref()), k.as_ref())
                    .unwrap()
                    .header
                    .more
            );
            if k.is_some() {
                let mut cleared = bytes.clone();
                cleared[5] = 0;
                assert_eq!(decode(&cleared, k.as_ref()), Err(BundleError::BadMac));
            }
        }
    }

    fn sample() -> Vec<Vec<u8>> {
        vec![
            ipv6_packet(1, 2, b"hello"),
            ipv6_packet(1, 2, b""),
            ipv6_packet(1, 2, &[7u8; 1500]),
        ]
    }

    fn packets_of(bytes: &[u8], key: Option<&NetworkKey>) -> Vec<Vec<u8>> {
        let b = decode(bytes, key).unwrap();
        b.packet_slices(bytes).map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn plain_round_trip_preserves_header_and_packets_in_order() {
        let bytes = encode(&sample(), None);
        assert_eq!(bytes[4], VERSION_PLAIN);
        let b = decode(&bytes, None).unwrap();
        assert_eq!(b.header, header());
        assert_eq!(packets_of(&bytes, None), sample());
        // v1 ranges index the object itself.
        let got: Vec<&[u8]> = b.packets.iter().map(|r| &bytes[r.clone()]).collect();
        assert_eq!(got, sample().iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn plain_layout_is_unchanged_from_v1() {
        let bytes = encode(&[ipv6_packet(1, 2, b"x")], None);
        assert_eq!(&bytes[0..4], MAGIC);
        assert_eq!(bytes[4], 1);
        assert_eq!(&bytes[8..16], &0x1111u64.to_be_bytes());
        assert_eq!(&bytes[32..40], &7u64.to_be_bytes());
        assert_eq!(&bytes[40..44], &1u32.to_be_bytes());
        assert_eq!(&bytes[48..52], &41u32.to_be_bytes());
        assert_eq!(bytes.len(), HEADER_LEN + 4 + 41);
    }

    #[test]
    fn encrypted_round_trip_opens_under_the_same_key() {
        let bytes = encode(&sample(), Some(&key()));
        assert_eq!(bytes[4], VERSION_AEAD);
        let b = decode(&bytes, Some(&key())).unwrap();
        assert_eq!(b.header, header());
        assert_eq!(packets_of(&bytes, Some(&key())), sample());
        let (body, ranges) = b.into_parts(Bytes::from(bytes.clone()));
        let got: Vec<&[u8]> = ranges.iter().map(|r| &body[r.clone()]).collect();
        assert_eq!(got, sample().iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn encrypted_bundle_size_is_plain_size_plus_mac_len() {
        let mut w = BundleWriter::new();
        for p in sample() {
            w.push(&p);
        }
        let len = w.len();
        let plain = encode(&sample(), None);
        let sealed = w.finish(&header(), Some(&key()));
        assert_eq!(plain.len(), len);
        assert_eq!(sealed.len(), len + MAC_LEN);
    }

    #[test]
    fn encrypted_bundle_hides_the_packets() {
        let packets = vec![ipv6_packet(1, 2, b"a secret payload"); 3];
        let bytes = encode(&packets, Some(&key()));
        let needle = b"a secret payload";
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn two_encryptions_of_the_same_bundle_use_fresh_nonces() {
        let a = encode(&sample(), Some(&key()));
        let b = encode(&sample(), Some(&key()));
        assert_ne!(
            a[FIELDS_LEN..AEAD_HEADER_LEN],
            b[FIELDS_LEN..AEAD_HEADER_LEN]
        );
        assert_ne!(a[AEAD_HEADER_LEN..], b[AEAD_HEADER_LEN..]);
    }

    #[test]
    fn one_tampered_byte_anywhere_is_rejected() {
        let good = encode(&sample()[..1], Some(&key()));
        for i in 0..good.len() {
            let mut bytes = good.clone();
            bytes[i] ^= 0x01;
            let got = decode(&bytes, Some(&key()));
            assert!(got.is_err(), "flipping byte {i} was accepted");
            if i >= FIELDS_LEN || (8..FIELDS_LEN).contains(&i) {
                assert_eq!(got, Err(BundleError::BadMac), "byte {i}");
            }
        }
    }

    #[test]
    fn header_fields_are_bound_to_the_ciphertext() {
        let good = encode(&sample(), Some(&key()));
        for (name, at) in [("sender", 8), ("dest", 16), ("session", 24), ("seq", 32)] {
            let mut bytes = good.clone();
            bytes[at..at + 8].copy_from_slice(&0x4242u64.to_be_bytes());
            assert_eq!(
                decode(&bytes, Some(&key())),
                Err(BundleError::BadMac),
                "changed {name}"
            );
        }
    }

    #[test]
    fn bundle_sealed_under_another_key_is_rejected() {
        let other = NetworkKey::new(b"another-key-of-16+bytes").unwrap();
        let bytes = encode(&sample(), Some(&other));
        assert_eq!(decode(&bytes, Some(&key())), Err(BundleError::BadMac));
    }

    #[test]
    fn keys_differing_in_one_byte_derive_unrelated_aead_keys() {
        let a = NetworkKey::new(b"0123456789abcdef-network").unwrap();
        let b = NetworkKey::new(b"0123456789abcdef-networl").unwrap();
        let bytes = encode(&sample(), Some(&a));
        assert_eq!(decode(&bytes, Some(&b)), Err(BundleError::BadMac));
    }

    #[test]
    fn plain_bundle_is_rejected_when_a_key_is_configured() {
        let bytes = encode(&sample(), None);
        assert_eq!(
            decode(&bytes, Some(&key())),
            Err(BundleError::Unauthenticated)
        );
    }

    #[test]
    fn encrypted_bundle_without_local_key_is_rejected() {
        let bytes = encode(&sample(), Some(&key()));
        assert_eq!(decode(&bytes, None), Err(BundleError::NoKey));
        assert_eq!(BundleError::NoKey.reason(), "no_key");
    }

    #[test]
    fn empty_bundle_is_a_valid_skip_marker_in_both_versions() {
        for k in [None, Some(key())] {
            let bytes = BundleWriter::new().finish(&header(), k.as_ref());
            let b = decode(&bytes, k.as_ref()).unwrap();
            assert_eq!(b.header, header());
            assert!(b.is_skip());
        }
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
        b[4] = 3;
        assert_eq!(decode(&b, None), Err(BundleError::BadVersion(3)));
        let mut b = good.clone();
        b[5] = 0x80;
        assert_eq!(decode(&b, None), Err(BundleError::BadFlags(0x80)));
        let mut b = good.clone();
        b[5] = FLAG_MORE | 0x02;
        assert_eq!(decode(&b, None), Err(BundleError::BadFlags(0x03)));
        let mut b = good.clone();
        b[7] = 1;
        assert!(matches!(decode(&b, None), Err(BundleError::BadFlags(_))));
        let mut b = good;
        b[46] = 1;
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
    fn counts_the_bundle_cannot_hold_are_rejected() {
        let mut bytes = encode(&sample(), None);
        bytes[40..44].copy_from_slice(&4u32.to_be_bytes());
        assert!(decode(&bytes, None).is_err());
        bytes[40..44].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&bytes, None), Err(BundleError::BadCount(u32::MAX)));
        bytes[40..44].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            decode(&bytes, None),
            Err(BundleError::TrailingBytes(_))
        ));
    }

    #[test]
    fn packet_whose_ipv6_length_disagrees_is_rejected() {
        let mut p = ipv6_packet(1, 2, b"abc");
        p[5] = 9;
        for k in [None, Some(key())] {
            let bytes = encode(std::slice::from_ref(&p), k.as_ref());
            assert!(matches!(
                decode(&bytes, k.as_ref()),
                Err(BundleError::BadPacket { index: 0, .. })
            ));
        }
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
        for k in [None, Some(key())] {
            assert_eq!(
                decode(&bytes, k.as_ref()),
                Err(BundleError::Oversized(MAX_BUNDLE_BYTES + 1))
            );
        }
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

    #[test]
    fn network_key_debug_does_not_print_the_key() {
        let shown = format!("{:?}", key());
        assert_eq!(shown, "NetworkKey(24 bytes)");
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
        let k = key();
        let seed = encode(&sample(), None);
        let seed_sealed = encode(&sample(), Some(&k));
        for round in 0..20_000 {
            let mut bytes = match round % 3 {
                0 => {
                    let n = (xorshift(&mut s) % 256) as usize;
                    (0..n).map(|_| xorshift(&mut s) as u8).collect::<Vec<u8>>()
                }
                1 => seed.clone(),
                _ => seed_sealed.clone(),
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
                bytes[4] = 1 + (xorshift(&mut s) % 2) as u8;
                bytes[5] = (xorshift(&mut s) % 2) as u8;
            }
            let _ = decode(&bytes, None);
            if let Ok(b) = decode(&bytes, Some(&k)) {
                // Only an unmodified sealed bundle opens: a mutation that left the bytes
                // the same (a byte overwritten with its own value, a cut at the end).
                assert_eq!(bytes, seed_sealed, "round {round}: a forgery opened");
                assert_eq!(b.packets.len(), 3);
            }
        }
    }
}
