//! The directory record: what one node says about itself under `v2/nodes/<node id>`. Sans-IO.
//! One checked parser (layout in `docs/DESIGN.md` "Directory and names", big-endian):
//! - v1, without a network key: `HSN1`, version 1, 3 zero bytes, node id (8), then the body.
//! - v2, with a network key: `HSN1`, version 2, 3 zero bytes, node id (8), a random 24-byte
//!   nonce, the body encrypted with XChaCha20-Poly1305, the 16-byte tag. The 40-byte clear
//!   header is the associated data; the key is derived from the network key as the bundles' is,
//!   under the label `hoshino directory v2 xchacha20-poly1305 key`.
//!
//! Body: address (16), start time and refreshed-at (unix ms, 8 each), name length (1) and name,
//! agent version length (1) and version, and nothing after. As with bundles, a node with a key
//! accepts only v2 and a node without one only v1.

use std::net::Ipv6Addr;

use crate::node_addr::{NodeAddr, NodeId};
use crate::wire::bundle::NetworkKey;
use crate::wire::seal::{self, NONCE_LEN, OpenError, TAG_LEN};

use super::name::{NameError, NodeName};

pub const MAGIC: &[u8; 4] = b"HSN1";
pub const VERSION_PLAIN: u8 = 1;
pub const VERSION_AEAD: u8 = 2;
/// Records larger than this are not read (a real one is under 200 bytes).
pub const MAX_RECORD_BYTES: usize = 512;
/// Longest agent version string a record carries.
pub const MAX_AGENT_VERSION_LEN: usize = 64;
const FIELDS_LEN: usize = 16;
const AEAD_HEADER_LEN: usize = FIELDS_LEN + NONCE_LEN;
/// address, started_at, refreshed_at.
const BODY_FIXED_LEN: usize = 16 + 8 + 8;

/// Milliseconds since the Unix epoch: records carry wall-clock time, since they are read by other
/// hosts.
pub type UnixMillis = u64;

/// One node's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: NodeId,
    pub name: NodeName,
    pub addr: Ipv6Addr,
    pub agent_version: String,
    pub started_at: UnixMillis,
    pub refreshed_at: UnixMillis,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum RecordError {
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    Oversized(usize),
    #[error("truncated: {needed} bytes needed at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("bad magic {0:02x?}, expected \"HSN1\"")]
    BadMagic([u8; 4]),
    #[error("unsupported record version {0}, expected 1 (plain) or 2 (AEAD)")]
    BadVersion(u8),
    #[error("nonzero reserved bytes")]
    BadReserved,
    #[error("AEAD tag does not verify (wrong network key, or the record was altered)")]
    BadMac,
    #[error("record is plaintext (v1) but this node requires the network key (v2)")]
    Unauthenticated,
    #[error("record is encrypted (v2) but this node has no network key to open it")]
    NoKey,
    #[error("record names node {record} but is stored under node {key}'s key")]
    NodeMismatch { record: NodeId, key: NodeId },
    #[error("address {addr} does not end in node id {node}")]
    AddressMismatch { addr: Ipv6Addr, node: NodeId },
    #[error("name: {0}")]
    BadName(#[from] NameError),
    #[error("agent version is not 1..={MAX_AGENT_VERSION_LEN} printable ASCII characters")]
    BadAgentVersion,
    #[error("refreshed-at {refreshed} is before the start time {started}")]
    BadTimes { started: u64, refreshed: u64 },
    #[error("{0} trailing bytes after the agent version")]
    TrailingBytes(usize),
}

impl From<OpenError> for RecordError {
    fn from(e: OpenError) -> RecordError {
        match e {
            OpenError::Truncated {
                offset,
                needed,
                available,
            } => RecordError::Truncated {
                offset,
                needed,
                available,
            },
            OpenError::BadMac => RecordError::BadMac,
        }
    }
}

impl RecordError {
    /// Stable label for counting rejected records.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::Oversized(_) => "oversized",
            RecordError::Truncated { .. } => "truncated",
            RecordError::BadMagic(_) => "bad_magic",
            RecordError::BadVersion(_) => "bad_version",
            RecordError::BadReserved => "bad_flags",
            RecordError::BadMac => "bad_mac",
            RecordError::Unauthenticated => "unauthenticated",
            RecordError::NoKey => "no_key",
            RecordError::NodeMismatch { .. } => "node_mismatch",
            RecordError::AddressMismatch { .. } => "address_mismatch",
            RecordError::BadName(_) => "bad_name",
            RecordError::BadAgentVersion => "bad_agent_version",
            RecordError::BadTimes { .. } => "bad_times",
            RecordError::TrailingBytes(_) => "length_mismatch",
        }
    }
}

fn valid_agent_version(v: &str) -> bool {
    (1..=MAX_AGENT_VERSION_LEN).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic())
}

/// This build's version, as records carry it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

impl NodeRecord {
    /// This agent's record, started (and refreshed) at `now`.
    pub fn new(addr: NodeAddr, name: NodeName, now: UnixMillis) -> NodeRecord {
        NodeRecord {
            node: addr.id,
            name,
            addr: addr.ip(),
            agent_version: AGENT_VERSION.to_string(),
            started_at: now,
            refreshed_at: now,
        }
    }

    /// v2 (sealed) with a key, v1 (plain) without. Fails only for an agent version the parser
    /// would refuse (the name is valid by construction).
    pub fn encode(&self, key: Option<&NetworkKey>) -> Result<Vec<u8>, RecordError> {
        if !valid_agent_version(&self.agent_version) {
            return Err(RecordError::BadAgentVersion);
        }
        let mut out = Vec::with_capacity(AEAD_HEADER_LEN + 128 + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(if key.is_some() {
            VERSION_AEAD
        } else {
            VERSION_PLAIN
        });
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.node.0.to_be_bytes());
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&self.addr.octets());
        body.extend_from_slice(&self.started_at.to_be_bytes());
        body.extend_from_slice(&self.refreshed_at.to_be_bytes());
        for field in [self.name.as_str(), self.agent_version.as_str()] {
            // Both are at most 64 bytes (checked above and by `NodeName`).
            body.push(field.len() as u8);
            body.extend_from_slice(field.as_bytes());
        }
        match key {
            None => out.extend_from_slice(&body),
            Some(key) => {
                // Room for the nonce, which `seal` draws and writes.
                out.resize(AEAD_HEADER_LEN, 0);
                let tag = seal::seal(key.directory_cipher(), &mut out, &mut body)
                    .map_err(|_| RecordError::BadMac)?;
                out.extend_from_slice(&body);
                out.extend_from_slice(&tag);
            }
        }
        Ok(out)
    }

    /// The one checked parser. `key_node` is the node id of the key the object was stored under:
    /// IAM lets only that node write it, so a record naming anyone else is refused.
    pub fn decode(
        input: &[u8],
        key_node: NodeId,
        key: Option<&NetworkKey>,
    ) -> Result<NodeRecord, RecordError> {
        if input.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Oversized(input.len()));
        }
        let fields = take(input, 0, FIELDS_LEN)?;
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&fields[0..4]);
        if &magic != MAGIC {
            return Err(RecordError::BadMagic(magic));
        }
        let version = fields[4];
        if version != VERSION_PLAIN && version != VERSION_AEAD {
            return Err(RecordError::BadVersion(version));
        }
        if fields[5..8] != [0; 3] {
            return Err(RecordError::BadReserved);
        }
        let node = NodeId(be_u64(&fields[8..16]));
        let body = match (version, key) {
            (VERSION_PLAIN, None) => input[FIELDS_LEN..].to_vec(),
            (VERSION_PLAIN, Some(_)) => return Err(RecordError::Unauthenticated),
            (_, None) => return Err(RecordError::NoKey),
            (_, Some(key)) => seal::open(key.directory_cipher(), input, AEAD_HEADER_LEN, 0)?,
        };
        if node != key_node {
            return Err(RecordError::NodeMismatch {
                record: node,
                key: key_node,
            });
        }
        parse_body(&body, node)
    }
}

#[cfg(test)]
impl NodeRecord {
    /// The record the directory's and the name responder's unit tests build on: node `node` at
    /// `fd00::<node>`, agent version 0.1.0, started at 0.
    pub(crate) fn sample(node: u64, name: &str, refreshed_at: UnixMillis) -> NodeRecord {
        NodeRecord {
            node: NodeId(node),
            name: name.parse().expect("name"),
            addr: Ipv6Addr::from((0xfd00u128 << 112) | u128::from(node)),
            agent_version: "0.1.0".into(),
            started_at: 0,
            refreshed_at,
        }
    }
}

fn parse_body(body: &[u8], node: NodeId) -> Result<NodeRecord, RecordError> {
    let fixed = take(body, 0, BODY_FIXED_LEN)?;
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&fixed[0..16]);
    let addr = Ipv6Addr::from(octets);
    if u128::from(addr) as u64 != node.0 {
        return Err(RecordError::AddressMismatch { addr, node });
    }
    let started_at = be_u64(&fixed[16..24]);
    let refreshed_at = be_u64(&fixed[24..32]);
    if refreshed_at < started_at {
        return Err(RecordError::BadTimes {
            started: started_at,
            refreshed: refreshed_at,
        });
    }
    let mut offset = BODY_FIXED_LEN;
    let string = |offset: &mut usize| -> Result<&[u8], RecordError> {
        let len = take(body, *offset, 1)?[0] as usize;
        let bytes = take(body, *offset + 1, len)?;
        *offset += 1 + len;
        Ok(bytes)
    };
    let name = string(&mut offset)?;
    let name = std::str::from_utf8(name)
        .map_err(|_| NameError::Invalid(String::from_utf8_lossy(name).into_owned()))?
        .parse::<NodeName>()?;
    let agent_version = string(&mut offset)?;
    let agent_version = std::str::from_utf8(agent_version)
        .ok()
        .filter(|v| valid_agent_version(v))
        .ok_or(RecordError::BadAgentVersion)?
        .to_string();
    if offset != body.len() {
        return Err(RecordError::TrailingBytes(body.len() - offset));
    }
    Ok(NodeRecord {
        node,
        name,
        addr,
        agent_version,
        started_at,
        refreshed_at,
    })
}

fn take(input: &[u8], offset: usize, n: usize) -> Result<&[u8], RecordError> {
    offset
        .checked_add(n)
        .and_then(|end| input.get(offset..end))
        .ok_or(RecordError::Truncated {
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

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: NodeId = NodeId(0x1111_2222_3333_4444);

    fn record() -> NodeRecord {
        NodeRecord {
            node: NODE,
            name: "builder".parse().expect("valid name"),
            addr: "fd68:6f73:6869:6e6f:1111:2222:3333:4444"
                .parse()
                .expect("address"),
            agent_version: "0.1.0".into(),
            started_at: 1_700_000_000_000,
            refreshed_at: 1_700_000_360_000,
        }
    }

    fn key(byte: u8) -> NetworkKey {
        NetworkKey::new(&[byte; 32]).expect("32-byte key")
    }

    #[test]
    fn plain_record_round_trips() {
        let bytes = record().encode(None).expect("encodes");
        assert_eq!(NodeRecord::decode(&bytes, NODE, None), Ok(record()));
    }

    #[test]
    fn sealed_record_round_trips_and_hides_the_name() {
        let k = key(7);
        let bytes = record().encode(Some(&k)).expect("encodes");
        assert!(!bytes.windows(7).any(|w| w == b"builder"));
        assert_eq!(NodeRecord::decode(&bytes, NODE, Some(&k)), Ok(record()));
    }

    #[test]
    fn record_sealed_with_another_key_fails_the_check() {
        let bytes = record().encode(Some(&key(7))).expect("encodes");
        assert_eq!(
            NodeRecord::decode(&bytes, NODE, Some(&key(8))),
            Err(RecordError::BadMac)
        );
    }

    #[test]
    fn any_flipped_byte_of_a_sealed_record_fails_the_check() {
        let k = key(7);
        let bytes = record().encode(Some(&k)).expect("encodes");
        for i in 0..bytes.len() {
            let mut forged = bytes.clone();
            forged[i] ^= 0x01;
            assert!(
                NodeRecord::decode(&forged, NODE, Some(&k)).is_err(),
                "byte {i} flipped and still accepted"
            );
        }
    }

    #[test]
    fn plain_record_is_refused_by_a_node_with_a_key_and_sealed_one_without() {
        let plain = record().encode(None).expect("encodes");
        assert_eq!(
            NodeRecord::decode(&plain, NODE, Some(&key(7))),
            Err(RecordError::Unauthenticated)
        );
        let sealed = record().encode(Some(&key(7))).expect("encodes");
        assert_eq!(
            NodeRecord::decode(&sealed, NODE, None),
            Err(RecordError::NoKey)
        );
    }

    #[test]
    fn record_under_another_nodes_key_is_refused() {
        let bytes = record().encode(None).expect("encodes");
        let other = NodeId(0x5555_6666_7777_8888);
        assert_eq!(
            NodeRecord::decode(&bytes, other, None),
            Err(RecordError::NodeMismatch {
                record: NODE,
                key: other
            })
        );
    }

    #[test]
    fn address_not_ending_in_the_node_id_is_refused() {
        let mut r = record();
        r.addr = "fd68:6f73:6869:6e6f::1".parse().expect("address");
        let bytes = r.encode(None).expect("encodes");
        assert!(matches!(
            NodeRecord::decode(&bytes, NODE, None),
            Err(RecordError::AddressMismatch { .. })
        ));
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        let bytes = record().encode(None).expect("encodes");
        for len in 0..bytes.len() {
            assert!(
                NodeRecord::decode(&bytes[..len], NODE, None).is_err(),
                "truncated to {len} and accepted"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            NodeRecord::decode(&long, NODE, None),
            Err(RecordError::TrailingBytes(1))
        );
    }

    #[test]
    fn header_garbage_is_refused_with_its_reason() {
        let bytes = record().encode(None).expect("encodes");
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(
            NodeRecord::decode(&bad, NODE, None).map_err(|e| e.reason()),
            Err("bad_magic")
        );
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(
            NodeRecord::decode(&bad, NODE, None),
            Err(RecordError::BadVersion(9))
        );
        let mut bad = bytes.clone();
        bad[6] = 1;
        assert_eq!(
            NodeRecord::decode(&bad, NODE, None),
            Err(RecordError::BadReserved)
        );
        assert_eq!(
            NodeRecord::decode(&vec![0; MAX_RECORD_BYTES + 1], NODE, None),
            Err(RecordError::Oversized(MAX_RECORD_BYTES + 1))
        );
    }

    #[test]
    fn invalid_name_or_version_in_the_body_is_refused() {
        let bytes = record().encode(None).expect("encodes");
        // The name starts after the header, the fixed body and its length byte.
        let name_at = FIELDS_LEN + BODY_FIXED_LEN + 1;
        let mut bad = bytes.clone();
        bad[name_at] = b'B';
        assert!(matches!(
            NodeRecord::decode(&bad, NODE, None),
            Err(RecordError::BadName(_))
        ));
        let version_at = name_at + "builder".len() + 1;
        let mut bad = bytes.clone();
        bad[version_at] = b' ';
        assert_eq!(
            NodeRecord::decode(&bad, NODE, None),
            Err(RecordError::BadAgentVersion)
        );
    }

    #[test]
    fn refreshed_before_start_is_refused() {
        let mut r = record();
        r.refreshed_at = r.started_at - 1;
        let bytes = r.encode(None).expect("encodes");
        assert!(matches!(
            NodeRecord::decode(&bytes, NODE, None),
            Err(RecordError::BadTimes { .. })
        ));
    }
}
