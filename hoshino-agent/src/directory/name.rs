//! Node names: one DNS label, so `<name>.<domain>` is a valid host name.

use std::fmt;
use std::str::FromStr;

use crate::node_addr::NodeId;

/// Longest DNS label (RFC 1035).
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum NameError {
    #[error(
        "node name {0:?} is not a DNS label: 1 to 63 of a-z, 0-9 and `-`, not starting or ending with `-`"
    )]
    Invalid(String),
    #[error(
        "domain {0:?} is not a DNS domain of lowercase labels (a-z, 0-9, `-`) of at most 189 characters"
    )]
    BadDomain(String),
}

/// A lowercase DNS label: 1..=63 of `a-z`, `0-9`, `-`, with no `-` at either end.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The default name: a host name's first label, lowercased (`Builder-1.example.com` ->
    /// `builder-1`). DNS names are case-insensitive; the directory stores one spelling.
    pub fn from_hostname(hostname: &str) -> Result<NodeName, NameError> {
        let first = hostname.trim().split('.').next().unwrap_or_default();
        first.to_ascii_lowercase().parse()
    }
}

/// The kernel's host name (of this UTS namespace).
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The name a node takes without `--name`: its host name's first label, lowercased; when the
/// host name is unreadable or no DNS label (`my_host`), `node-<node id>`, with a warning.
pub fn default_name(node: NodeId) -> NodeName {
    let fallback = || NodeName(format!("node-{node}"));
    match std::fs::read_to_string(HOSTNAME_FILE) {
        Ok(host) => NodeName::from_hostname(&host).unwrap_or_else(|e| {
            let name = fallback();
            tracing::warn!("{e} (the host name); using {name}, set --name to choose");
            name
        }),
        Err(e) => {
            let name = fallback();
            tracing::warn!("cannot read {HOSTNAME_FILE}: {e}; using {name}, set --name to choose");
            name
        }
    }
}

impl FromStr for NodeName {
    type Err = NameError;
    /// Strict: upper case is refused rather than folded, so what was asked for is what is
    /// published (use `from_hostname` to fold a host name).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=MAX_NAME_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(NodeName(s.to_string()))
        } else {
            Err(NameError::Invalid(s.to_string()))
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The default `--dns-domain` (`.internal` is reserved for private use).
pub const DEFAULT_DOMAIN: &str = "hoshino.internal";

/// The domain node names live under: one or more labels as `NodeName` spells them, without the
/// trailing dot, short enough that `<63-char name>.<domain>` stays within DNS's 253.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsDomain(String);

impl DnsDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<name>.<domain>`.
    pub fn fqdn(&self, name: &NodeName) -> String {
        format!("{name}.{}", self.0)
    }
}

impl Default for DnsDomain {
    fn default() -> Self {
        DnsDomain(DEFAULT_DOMAIN.to_string())
    }
}

impl FromStr for DnsDomain {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        let ok = trimmed.len() < 253 - MAX_NAME_LEN
            && trimmed
                .split('.')
                .all(|label| label.parse::<NodeName>().is_ok());
        if ok {
            Ok(DnsDomain(trimmed.to_string()))
        } else {
            Err(NameError::BadDomain(s.to_string()))
        }
    }
}

impl fmt::Display for DnsDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_dot_separated_labels_without_the_root_dot() {
        assert_eq!(
            "hoshino.internal."
                .parse::<DnsDomain>()
                .map(|d| d.to_string()),
            Ok("hoshino.internal".to_string())
        );
        for bad in ["", "a..b", "Hoshino.internal", ".internal", "a_b.internal"] {
            assert!(bad.parse::<DnsDomain>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_labels_are_names() {
        for ok in ["a", "builder", "web-1", "0", &"x".repeat(63)] {
            assert!(ok.parse::<NodeName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "-a",
            "a-",
            "Builder",
            "a.b",
            "a_b",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert_eq!(
                bad.parse::<NodeName>(),
                Err(NameError::Invalid(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hostname_gives_its_first_label_lowercased() {
        assert_eq!(
            NodeName::from_hostname("Builder-1.eu.example.com\n").map(|n| n.to_string()),
            Ok("builder-1".to_string())
        );
        assert!(NodeName::from_hostname("under_score").is_err());
    }
}
