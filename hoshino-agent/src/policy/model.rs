//! The validated policy: what a policy file means, independent of TOML and of the kernel maps.

use std::fmt;
use std::ops::Range;

use super::prefix::IpPrefix;

/// What happens to a packet that matches a rule (or no rule, for the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Continue as if never inspected.
    Pass,
    /// Discard in the kernel.
    Drop,
    /// Redirect to the tunnel TUN and carry it over S3.
    Tunnel,
    /// Redirect to the agent, which reinjects, drops, or resets per the rule's divert policy.
    Divert,
}

impl Verdict {
    pub const NAMES: &'static str = "pass, drop, tunnel, divert";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pass" => Some(Self::Pass),
            "drop" => Some(Self::Drop),
            "tunnel" => Some(Self::Tunnel),
            "divert" => Some(Self::Divert),
            _ => None,
        }
    }

    /// The kernel encoding.
    pub fn to_kernel(self) -> hoshino_common::Verdict {
        match self {
            Self::Pass => hoshino_common::Verdict::Pass,
            Self::Drop => hoshino_common::Verdict::Drop,
            Self::Tunnel => hoshino_common::Verdict::Tunnel,
            Self::Divert => hoshino_common::Verdict::Divert,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Tunnel => "tunnel",
            Self::Divert => "divert",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The address family a rule is restricted to (`family = "ipv4"`), for rules that name no
/// prefix of that family but must not match the other one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const NAMES: &'static str = "ipv4, ipv6";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ipv4" => Some(Self::Ipv4),
            "ipv6" => Some(Self::Ipv6),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IP protocol number, with names for the common ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);
    pub const NAMES: &'static str = "tcp, udp, icmp, icmpv6, or a number 0-255";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::TCP),
            "udp" => Some(Self::UDP),
            "icmp" => Some(Self::ICMP),
            "icmpv6" => Some(Self::ICMPV6),
            _ => None,
        }
    }

    pub const SCTP: Protocol = Protocol(132);
    pub const UDPLITE: Protocol = Protocol(136);

    /// Protocols whose header starts with 16-bit source and destination ports (the ones the
    /// classifier reads ports of).
    pub fn has_ports(&self) -> bool {
        [Self::TCP, Self::UDP, Self::SCTP, Self::UDPLITE].contains(self)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TCP => f.write_str("tcp"),
            Self::UDP => f.write_str("udp"),
            Self::ICMP => f.write_str("icmp"),
            Self::ICMPV6 => f.write_str("icmpv6"),
            Protocol(n) => write!(f, "{n}"),
        }
    }
}

/// An inclusive range `lo..=hi` with `lo <= hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InclusiveRange<T> {
    pub lo: T,
    pub hi: T,
}

impl<T: PartialOrd + Copy> InclusiveRange<T> {
    pub fn contains(&self, value: T) -> bool {
        self.lo <= value && value <= self.hi
    }
}

impl<T: fmt::Display + PartialEq> fmt::Display for InclusiveRange<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

pub type PortRange = InclusiveRange<u16>;
pub type UidRange = InclusiveRange<u32>;

/// A value together with the byte range of the policy text it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// What the agent does with an HTTP request on a diverted flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpAction {
    /// Send the rebuilt request to the server and relay its response.
    Allow,
    /// Refuse: reset the client's connection at once.
    Reset,
    /// Refuse: answer `403 Forbidden` and close the connection.
    Forbid,
}

impl HttpAction {
    pub const NAMES: &'static str = "allow, reset, forbid";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "allow" => Some(Self::Allow),
            "reset" => Some(Self::Reset),
            "forbid" => Some(Self::Forbid),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Reset => "reset",
            Self::Forbid => "forbid",
        }
    }
}

impl fmt::Display for HttpAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Methods a request entry matches when it names none.
pub const DEFAULT_HTTP_METHODS: [&str; 2] = ["GET", "HEAD"];

/// One `[[rule.http.request]]` entry: first match wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequestRule {
    /// A canonical path (see `interceptor::proxy::canonical`); matched as a byte prefix of the
    /// request's canonical path.
    pub path_prefix: String,
    pub uid: Option<UidRange>,
    /// Upper-case method names; empty means [`DEFAULT_HTTP_METHODS`].
    pub methods: Vec<String>,
    /// Whether a request with a `?query` matches (queries are refused by default).
    pub query: bool,
    pub action: HttpAction,
}

impl HttpRequestRule {
    fn matches_method(&self, method: &str) -> bool {
        if self.methods.is_empty() {
            DEFAULT_HTTP_METHODS.contains(&method)
        } else {
            self.methods.iter().any(|m| m == method)
        }
    }

    /// The methods as shown by `policy check`.
    pub fn methods_text(&self) -> String {
        if self.methods.is_empty() {
            DEFAULT_HTTP_METHODS.join(",")
        } else {
            self.methods.join(",")
        }
    }
}

/// One request as the policy sees it: method, canonical path, whether it has a query, and the
/// sending socket's uid (None if the kernel could not tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpQuestion<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub has_query: bool,
    pub uid: Option<u32>,
}

/// Per-request decisions for a diverted HTTP flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    pub requests: Vec<HttpRequestRule>,
    pub default: HttpAction,
}

impl HttpPolicy {
    /// The action for a request with this path (canonical, without its query) sent by a socket
    /// owned by `uid` (None if the kernel could not tell) with the default methods and no query.
    pub fn decide(&self, path: &str, uid: Option<u32>) -> HttpAction {
        self.judge(&HttpQuestion {
            method: "GET",
            path,
            has_query: false,
            uid,
        })
        .0
    }

    /// The action for a request and the index of the entry that decided (None: the default).
    pub fn judge(&self, q: &HttpQuestion<'_>) -> (HttpAction, Option<usize>) {
        self.requests
            .iter()
            .position(|r| {
                q.path.starts_with(&r.path_prefix)
                    && r.matches_method(q.method)
                    && (r.query || !q.has_query)
                    && match (r.uid, q.uid) {
                        (None, _) => true,
                        (Some(range), Some(uid)) => range.contains(uid),
                        (Some(_), None) => false,
                    }
            })
            .map_or((self.default, None), |i| (self.requests[i].action, Some(i)))
    }

    /// Whether any entry lets a query through (the canonical checker then accepts one).
    pub fn allows_queries(&self) -> bool {
        self.requests.iter().any(|r| r.query)
    }
}

/// What the agent does with a diverted packet of a rule without an `http` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketAction {
    Reinject,
    Drop,
}

impl PacketAction {
    pub const NAMES: &'static str = "reinject, drop";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "reinject" => Some(Self::Reinject),
            "drop" => Some(Self::Drop),
            _ => None,
        }
    }
}

impl fmt::Display for PacketAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reinject => "reinject",
            Self::Drop => "drop",
        })
    }
}

/// How a `divert` rule's packets are handled in the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DivertPolicy {
    Http(HttpPolicy),
    Packets(PacketAction),
}

/// One named rule. Empty `dst`/`src` lists match any address of either family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: Located<String>,
    pub dst: Vec<Located<IpPrefix>>,
    pub src: Vec<Located<IpPrefix>>,
    /// An explicit family restriction; prefixes of one family imply it without this.
    pub family: Option<Family>,
    pub protocol: Option<Protocol>,
    pub dport: Option<PortRange>,
    pub uid: Option<UidRange>,
    pub verdict: Verdict,
    /// Present exactly when `verdict` is `Divert`.
    pub divert: Option<DivertPolicy>,
}

/// A validated policy: rules in file order (first match wins) and the default verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Verdict,
    pub rules: Vec<Rule>,
}
