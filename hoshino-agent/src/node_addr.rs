//! Node addressing: the network's ULA /64 plus a 64-bit interface identifier taken from the
//! first 16 hex digits of the machine-id.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The documented default network prefix: `fd68:6f73:6869:6e6f::/64`, the bytes of "hoshino".
pub const DEFAULT_PREFIX: &str = "fd68:6f73:6869:6e6f::/64";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeAddrError {
    #[error("cannot read machine-id file {path}: {reason}")]
    MachineIdUnreadable { path: PathBuf, reason: String },
    #[error("machine-id file {path} is malformed: {reason} (expected exactly 32 hex digits)")]
    MachineIdMalformed { path: PathBuf, reason: String },
    #[error(
        "machine-id file {path} starts with 16 zero digits: the all-zero interface id is the subnet-router anycast address"
    )]
    MachineIdZero { path: PathBuf },
    #[error("invalid network prefix `{input}`: {reason}")]
    PrefixMalformed { input: String, reason: String },
    #[error("invalid node id `{input}`: expected 16 hex digits")]
    NodeIdMalformed { input: String },
}

/// A node's 64-bit interface identifier; in keys it is written as 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl NodeId {
    /// Parses the contents of a machine-id file (32 hex digits, optionally one trailing newline).
    /// `path` only names the file in errors.
    pub fn from_machine_id(text: &str, path: &Path) -> Result<NodeId, NodeAddrError> {
        let malformed = |reason: String| NodeAddrError::MachineIdMalformed {
            path: path.to_path_buf(),
            reason,
        };
        let digits = text.strip_suffix('\n').unwrap_or(text);
        if digits.len() != 32 {
            return Err(malformed(format!("{} characters", digits.len())));
        }
        if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(malformed(format!("non-hex character {bad:?}")));
        }
        let high = digits
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| malformed("unparsable digits".into()))?;
        if high == 0 {
            return Err(NodeAddrError::MachineIdZero {
                path: path.to_path_buf(),
            });
        }
        Ok(NodeId(high))
    }

    pub fn from_machine_id_file(path: &Path) -> Result<NodeId, NodeAddrError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| NodeAddrError::MachineIdUnreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        NodeId::from_machine_id(&text, path)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = NodeAddrError;
    /// Accepts exactly 16 lowercase hex digits, the only spelling keys use.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(NodeAddrError::NodeIdMalformed {
                input: s.to_string(),
            });
        }
        u64::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| NodeAddrError::NodeIdMalformed {
                input: s.to_string(),
            })
    }
}

/// An IPv6 /64: the upper 64 bits of the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkPrefix(u64);

impl NetworkPrefix {
    pub fn contains(&self, addr: &Ipv6Addr) -> bool {
        (u128::from(*addr) >> 64) as u64 == self.0
    }

    /// The node id of an address inside this prefix.
    pub fn node_of(&self, addr: &Ipv6Addr) -> Option<NodeId> {
        self.contains(addr)
            .then(|| NodeId(u128::from(*addr) as u64))
    }

    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.0) << 64)
    }

    pub fn addr_of(&self, node: NodeId) -> Ipv6Addr {
        Ipv6Addr::from((u128::from(self.0) << 64) | u128::from(node.0))
    }
}

impl Default for NetworkPrefix {
    fn default() -> Self {
        NetworkPrefix(0xfd68_6f73_6869_6e6f)
    }
}

impl fmt::Display for NetworkPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.network())
    }
}

impl FromStr for NetworkPrefix {
    type Err = NodeAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| NodeAddrError::PrefixMalformed {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let net: ipnet::Ipv6Net = s
            .trim()
            .parse()
            .map_err(|_| err("expected an IPv6 ADDRESS/64"))?;
        if net.prefix_len() != 64 {
            return Err(err("only /64 prefixes are supported"));
        }
        if net.trunc() != net {
            return Err(err("host bits (the lower 64) must be zero"));
        }
        let bits = u128::from(net.network());
        Ok(NetworkPrefix((bits >> 64) as u64))
    }
}

/// A node's address: prefix + id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    pub prefix: NetworkPrefix,
    pub id: NodeId,
}

impl NodeAddr {
    pub fn ip(&self) -> Ipv6Addr {
        self.prefix.addr_of(self.id)
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MID: &str = "0123456789abcdef0123456789abcdef\n";

    fn p() -> &'static Path {
        Path::new("/etc/machine-id")
    }

    #[test]
    fn address_is_prefix_plus_first_64_bits_of_machine_id() {
        let id = NodeId::from_machine_id(MID, p()).unwrap();
        let addr = NodeAddr {
            prefix: NetworkPrefix::default(),
            id,
        };
        assert_eq!(addr.to_string(), "fd68:6f73:6869:6e6f:123:4567:89ab:cdef");
        assert_eq!(id.to_string(), "0123456789abcdef");
    }

    #[test]
    fn default_prefix_constant_matches_default_value() {
        assert_eq!(
            DEFAULT_PREFIX.parse::<NetworkPrefix>().unwrap(),
            NetworkPrefix::default()
        );
        assert_eq!(NetworkPrefix::default().to_string(), DEFAULT_PREFIX);
    }

    #[test]
    fn machine_id_without_newline_is_accepted() {
        assert!(NodeId::from_machine_id(MID.trim_end(), p()).is_ok());
    }

    #[test]
    fn uppercase_machine_id_is_accepted_and_printed_lowercase() {
        let id = NodeId::from_machine_id("ABCDEF0123456789ABCDEF0123456789", p()).unwrap();
        assert_eq!(id.to_string(), "abcdef0123456789");
    }

    #[test]
    fn short_machine_id_is_rejected_naming_the_file() {
        let err = NodeId::from_machine_id("0123", p()).unwrap_err();
        assert!(err.to_string().contains("/etc/machine-id"), "{err}");
        assert!(matches!(err, NodeAddrError::MachineIdMalformed { .. }));
    }

    #[test]
    fn non_hex_machine_id_is_rejected() {
        let err = NodeId::from_machine_id("0123456789abcdeg0123456789abcdef", p()).unwrap_err();
        assert!(err.to_string().contains("'g'"), "{err}");
    }

    #[test]
    fn multibyte_machine_id_does_not_panic() {
        let text = "é".repeat(16);
        assert!(NodeId::from_machine_id(&text, p()).is_err());
    }

    #[test]
    fn two_newlines_are_rejected() {
        assert!(NodeId::from_machine_id("0123456789abcdef0123456789abcdef\n\n", p()).is_err());
    }

    #[test]
    fn all_zero_interface_id_is_rejected() {
        let err = NodeId::from_machine_id("0000000000000000ffffffffffffffff", p()).unwrap_err();
        assert!(matches!(err, NodeAddrError::MachineIdZero { .. }));
    }

    #[test]
    fn missing_machine_id_file_names_the_file() {
        let err = NodeId::from_machine_id_file(Path::new("/nonexistent/hoshino-mid")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/hoshino-mid"),
            "{err}"
        );
    }

    #[test]
    fn prefix_with_host_bits_is_rejected() {
        assert!("fd00::1/64".parse::<NetworkPrefix>().is_err());
        assert!("fd00::/48".parse::<NetworkPrefix>().is_err());
        assert!("fd00::".parse::<NetworkPrefix>().is_err());
        assert!("nonsense/64".parse::<NetworkPrefix>().is_err());
    }

    #[test]
    fn prefix_membership_and_node_extraction() {
        let prefix: NetworkPrefix = "fd00:1:2:3::/64".parse().unwrap();
        let inside: Ipv6Addr = "fd00:1:2:3::42".parse().unwrap();
        let outside: Ipv6Addr = "fd00:1:2:4::42".parse().unwrap();
        assert_eq!(prefix.node_of(&inside), Some(NodeId(0x42)));
        assert_eq!(prefix.node_of(&outside), None);
    }

    #[test]
    fn node_id_parses_only_16_lowercase_hex() {
        assert_eq!("00000000000000ff".parse::<NodeId>().unwrap(), NodeId(255));
        assert!("00000000000000FF".parse::<NodeId>().is_err());
        assert!("ff".parse::<NodeId>().is_err());
        assert!("+000000000000000".parse::<NodeId>().is_err());
    }
}
