//! IP prefixes as written in a policy file (`10.0.0.0/8`, `fd00:ec2::254/128`, or a bare address).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An IPv4 or IPv6 prefix whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpPrefix {
    V4(Ipv4Prefix),
    V6(Ipv6Prefix),
}

/// An IPv4 prefix (an `ipnet` network), its host bits always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Prefix(Ipv4Net);

/// An IPv6 prefix (an `ipnet` network), its host bits always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Prefix(Ipv6Net);

/// Why a prefix string was rejected; the message completes "expected an IP prefix, ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("`{0}` is not an IPv4 or IPv6 address")]
    BadAddress(String),
    #[error("`{0}` is not a prefix length")]
    BadLength(String),
    #[error("prefix length {len} is longer than {max} bits for `{addr}`")]
    LengthTooLong { addr: String, len: u8, max: u8 },
    #[error("`{given}` has host bits set; did you mean `{suggested}`?")]
    HostBitsSet { given: String, suggested: String },
}

impl Ipv4Prefix {
    /// Builds a prefix, clearing host bits; `len` is clamped to 32.
    pub fn new_truncating(addr: Ipv4Addr, len: u8) -> Self {
        // In range after the clamp, so `new` cannot fail; the fallback is the whole space.
        Self(Ipv4Net::new(addr, len.min(32)).unwrap_or_default().trunc())
    }
    pub fn addr(&self) -> Ipv4Addr {
        self.0.network()
    }
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }
    /// True if every address of `other` is inside `self`.
    pub fn covers(&self, other: &Ipv4Prefix) -> bool {
        self.0.contains(&other.0)
    }
    /// The prefix of length `len` (<= self.len) containing this one.
    pub fn ancestor(&self, len: u8) -> Self {
        Self::new_truncating(self.addr(), len.min(self.prefix_len()))
    }
}

impl Ipv6Prefix {
    /// Builds a prefix, clearing host bits; `len` is clamped to 128.
    pub fn new_truncating(addr: Ipv6Addr, len: u8) -> Self {
        Self(Ipv6Net::new(addr, len.min(128)).unwrap_or_default().trunc())
    }
    pub fn addr(&self) -> Ipv6Addr {
        self.0.network()
    }
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }
    pub fn covers(&self, other: &Ipv6Prefix) -> bool {
        self.0.contains(&other.0)
    }
    pub fn ancestor(&self, len: u8) -> Self {
        Self::new_truncating(self.addr(), len.min(self.prefix_len()))
    }
}

impl IpPrefix {
    /// Parses `ADDR/LEN` or a bare `ADDR` (a host prefix). Host bits must be zero so that a typo
    /// such as `10.1.2.3/8` is caught instead of silently widening the rule: `ipnet` parses,
    /// and the network must equal its own truncation.
    pub fn parse(text: &str) -> Result<Self, PrefixError> {
        let text = text.trim();
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a.trim(), Some(l.trim())),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| PrefixError::BadAddress(addr_text.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // ipnet accepts what `u8::from_str` does (`+8`); a policy length is plain digits.
        let len = match len_text {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .map_err(|_| PrefixError::BadLength(l.to_string()))?,
            Some(l) => return Err(PrefixError::BadLength(l.to_string())),
        };
        let net = IpNet::new(addr, len).map_err(|_| PrefixError::LengthTooLong {
            addr: addr_text.to_string(),
            len,
            max,
        })?;
        if net.trunc() != net {
            return Err(PrefixError::HostBitsSet {
                given: text.to_string(),
                suggested: net.trunc().to_string(),
            });
        }
        Ok(match net {
            IpNet::V4(v4) => IpPrefix::V4(Ipv4Prefix(v4)),
            IpNet::V6(v6) => IpPrefix::V6(Ipv6Prefix(v6)),
        })
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            IpPrefix::V4(p) => IpAddr::V4(p.addr()),
            IpPrefix::V6(p) => IpAddr::V6(p.addr()),
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match self {
            IpPrefix::V4(p) => p.prefix_len(),
            IpPrefix::V6(p) => p.prefix_len(),
        }
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpPrefix::V4(p) => p.fmt(f),
            IpPrefix::V6(p) => p.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_are_host_prefixes() {
        assert_eq!(
            IpPrefix::parse("169.254.169.254").unwrap().to_string(),
            "169.254.169.254/32"
        );
        assert_eq!(
            IpPrefix::parse("fd00:ec2::254").unwrap().to_string(),
            "fd00:ec2::254/128"
        );
    }

    #[test]
    fn host_bits_set_suggests_the_network() {
        let err = IpPrefix::parse("10.1.2.3/8").unwrap_err();
        assert_eq!(
            err,
            PrefixError::HostBitsSet {
                given: "10.1.2.3/8".into(),
                suggested: "10.0.0.0/8".into()
            }
        );
        assert!(IpPrefix::parse("fd00:1::1/64").is_err());
    }

    #[test]
    fn malformed_prefixes_are_rejected() {
        assert!(matches!(
            IpPrefix::parse("10.0.0.0/33"),
            Err(PrefixError::LengthTooLong { .. })
        ));
        assert!(matches!(
            IpPrefix::parse("::/129"),
            Err(PrefixError::LengthTooLong { .. })
        ));
        assert!(matches!(
            IpPrefix::parse("10.0.0.0/"),
            Err(PrefixError::BadLength(_))
        ));
        assert!(matches!(
            IpPrefix::parse("10.0.0.0/+8"),
            Err(PrefixError::BadLength(_))
        ));
        assert!(matches!(
            IpPrefix::parse("10.0.0.0/1000"),
            Err(PrefixError::BadLength(_))
        ));
        assert!(matches!(
            IpPrefix::parse("10.0.0/8"),
            Err(PrefixError::BadAddress(_))
        ));
        assert!(matches!(
            IpPrefix::parse("metadata"),
            Err(PrefixError::BadAddress(_))
        ));
    }

    #[test]
    fn zero_length_prefix_covers_everything_of_its_family() {
        let any = Ipv4Prefix::new_truncating(Ipv4Addr::UNSPECIFIED, 0);
        let host = Ipv4Prefix::new_truncating(Ipv4Addr::new(192, 0, 2, 1), 32);
        assert!(any.covers(&host));
        assert!(!host.covers(&any));
        let v6 = Ipv6Prefix::new_truncating("fd00:231::".parse().unwrap(), 64);
        let inside = Ipv6Prefix::new_truncating("fd00:231::5".parse().unwrap(), 128);
        let outside = Ipv6Prefix::new_truncating("fd00:232::5".parse().unwrap(), 128);
        assert!(v6.covers(&inside));
        assert!(!v6.covers(&outside));
        assert_eq!(inside.ancestor(64), v6);
    }
}
