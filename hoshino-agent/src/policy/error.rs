//! Policy errors, located as `FILE:LINE:COL` in the policy text.

use std::ops::Range;

use super::prefix::PrefixError;

/// What is wrong at a location of the policy text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// TOML syntax, wrong value types, unknown or missing keys (message from the TOML parser).
    #[error("{0}")]
    Syntax(String),
    #[error("unknown verdict `{0}`, expected one of pass, drop, tunnel, divert")]
    UnknownVerdict(String),
    #[error("unknown family `{0}`, expected ipv4 or ipv6")]
    UnknownFamily(String),
    #[error("`{prefix}` is not an {family} prefix, but the rule says `family = \"{family}\"`")]
    PrefixOfOtherFamily { prefix: String, family: String },
    #[error("unknown protocol `{0}`, expected tcp, udp, icmp, icmpv6, or a number 0-255")]
    UnknownProtocol(String),
    #[error("protocol number {0} is out of range, expected 0-255")]
    ProtocolOutOfRange(i64),
    #[error("unknown http action `{0}`, expected one of allow, reset, forbid")]
    UnknownHttpAction(String),
    #[error("unknown divert action `{0}`, expected one of reinject, drop")]
    UnknownPacketAction(String),
    #[error("bad prefix: {0}")]
    BadPrefix(PrefixError),
    #[error("port {0} is out of range, expected a port 0-65535 or a range \"LO-HI\"")]
    PortOutOfRange(String),
    #[error("uid {0} is out of range, expected a uid 0-4294967295 or a range \"LO-HI\"")]
    UidOutOfRange(String),
    #[error("`{0}` is not a range, expected a number or \"LO-HI\" with LO <= HI")]
    BadRange(String),
    #[error("duplicate rule name `{name}` (first used on line {first_line})")]
    DuplicateRuleName { name: String, first_line: usize },
    #[error(
        "rule name must be 1-{max} characters of letters, digits, `-`, `_` or `.`, got `{name}`"
    )]
    BadRuleName { name: String, max: usize },
    #[error("`dport` needs `protocol` to be tcp, udp, sctp (132) or udplite (136){0}")]
    PortWithoutPortProtocol(String),
    #[error("an `http` section needs `protocol = \"tcp\"` and a `dport`")]
    HttpNeedsTcp,
    #[error("`{key}` is only valid with `action = \"divert\"`, this rule's action is `{action}`")]
    OnlyForDivert { key: &'static str, action: String },
    #[error("a divert rule takes either an `http` section or `then`, not both")]
    HttpAndThen,
    #[error("http path prefix `{path}` is not a canonical path: {reason}")]
    BadHttpPath { path: String, reason: String },
    #[error("`{0}` is not an HTTP method, expected upper-case letters such as GET, HEAD or PUT")]
    BadHttpMethod(String),
    #[error("the tunnel carries IPv6 only; `{0}` is an IPv4 prefix")]
    TunnelNeedsIpv6(String),
    #[error("the tunnel carries IPv6 only; this rule says `family = \"ipv4\"`")]
    TunnelOnIpv4Family,
    #[error("too many rules: the classifier holds at most {max}")]
    TooManyRules { max: usize },
    #[error("too many {table} prefixes: the classifier's map holds at most {max}")]
    TooManyPrefixes { table: &'static str, max: usize },
}

/// A policy that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read policy file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {problem}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        problem: Problem,
    },
}

impl PolicyError {
    /// Locates `problem` at byte offset `span.start` of `text`.
    pub fn at(path: &str, text: &str, span: Range<usize>, problem: Problem) -> Self {
        let (line, col) = line_col(text, span.start);
        PolicyError::Invalid {
            path: path.to_string(),
            line,
            col,
            problem,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside a
/// character clamp to the nearest preceding boundary.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_lines_and_columns() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 5), (2, 3));
        assert_eq!(line_col(text, 8), (3, 1));
        assert_eq!(line_col(text, 1000), (3, 2));
    }
}
