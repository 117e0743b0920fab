//! One client request, framed strictly with httparse, and the request the agent rebuilds from
//! it. Only a fixed set of headers survives; everything about framing that two parsers could
//! read differently (bodies, duplicate or conflicting framing headers, `Expect`, obs-fold,
//! oversized heads) is a refusal, never an interpretation.

use std::net::{IpAddr, SocketAddr};

use super::canonical::{CanonicalTarget, TargetError, canonical_target};

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 32;
/// Longest value kept for the token, the TTL and the user agent.
const MAX_TOKEN: usize = 512;
const MAX_TTL_DIGITS: usize = 5;
const MAX_USER_AGENT: usize = 256;

/// Why a request was refused before the policy was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a well-formed HTTP/1.x request: {0}")]
    Malformed(String),
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("the request has a body (`{0}`); the policy allows none")]
    Body(&'static str),
    #[error("duplicate `{0}` header")]
    DuplicateHeader(&'static str),
    #[error("`Expect` is not supported")]
    Expect,
    #[error("header `{0}` has a value that is not visible ASCII or is too long")]
    BadHeaderValue(&'static str),
}

impl RequestError {
    /// The refusal reason label (metrics, audit).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::HeadTooLarge => "head_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::Target(t) => t.reason(),
            Self::Body(_) => "body",
            Self::DuplicateHeader(_) => "duplicate_header",
            Self::Expect => "expect",
            Self::BadHeaderValue(_) => "bad_header_value",
        }
    }
}

/// A request that passed framing and the canonical-target check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    pub method: String,
    pub target: CanonicalTarget,
    /// `X-aws-ec2-metadata-token`.
    pub token: Option<String>,
    /// `X-aws-ec2-metadata-token-ttl-seconds`.
    pub token_ttl: Option<String>,
    pub user_agent: Option<String>,
    /// Whether the client wants the connection kept after the response (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).
    pub keep_alive: bool,
}

/// The result of trying to frame one request at the head of the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// Not a complete head yet.
    Partial,
    /// A request and the number of bytes it took.
    Request(ClientRequest, usize),
}

/// Frames the request at the start of `bytes`. `allow_query` lets a `?query` through the
/// canonical check (the policy still decides per entry).
pub fn frame_request(bytes: &[u8], allow_query: bool) -> Result<Framed, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(bytes).map_err(|e| match e {
        httparse::Error::TooManyHeaders => RequestError::TooManyHeaders,
        other => RequestError::Malformed(other.to_string()),
    });
    let len = match status {
        Ok(httparse::Status::Partial) | Err(RequestError::TooManyHeaders)
            if bytes.len() > MAX_HEAD =>
        {
            return Err(RequestError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Framed::Partial),
        Ok(httparse::Status::Complete(len)) => len,
        Err(e) => return Err(e),
    };
    if len > MAX_HEAD {
        return Err(RequestError::HeadTooLarge);
    }
    // httparse accepts a bare LF as a line end; a server that does not could see different
    // lines, so only CRLF heads are accepted.
    if bytes[..len]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
    {
        return Err(RequestError::Malformed("bare LF line ending".into()));
    }
    let method = request
        .method
        .ok_or_else(|| RequestError::Malformed("no method".into()))?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(RequestError::Malformed(format!(
            "method `{}` is not upper-case letters",
            method.escape_debug()
        )));
    }
    let target = request
        .path
        .ok_or_else(|| RequestError::Malformed("no target".into()))?;
    let target = canonical_target(target.as_bytes(), allow_query)?;
    let version = request
        .version
        .ok_or_else(|| RequestError::Malformed("no version".into()))?;

    let mut token = None;
    let mut token_ttl = None;
    let mut user_agent = None;
    let mut host_seen = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut content_length_seen = false;
    for h in request.headers.iter() {
        let name = h.name;
        let value = h.value;
        // Every value, kept or not, must be visible ASCII with spaces or tabs: other bytes
        // are read differently by different parsers.
        if !value
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
        {
            return Err(RequestError::BadHeaderValue(known_name(name)));
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| RequestError::BadHeaderValue(known_name(name)))?
            .trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if content_length_seen {
                return Err(RequestError::DuplicateHeader("Content-Length"));
            }
            content_length_seen = true;
            if text != "0" {
                return Err(RequestError::Body("Content-Length"));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::Body("Transfer-Encoding"));
        } else if name.eq_ignore_ascii_case("expect") {
            return Err(RequestError::Expect);
        } else if name.eq_ignore_ascii_case("host") {
            if host_seen {
                return Err(RequestError::DuplicateHeader("Host"));
            }
            host_seen = true;
        } else if name.eq_ignore_ascii_case("x-aws-ec2-metadata-token") {
            if token.is_some() {
                return Err(RequestError::DuplicateHeader("X-aws-ec2-metadata-token"));
            }
            if text.is_empty() || text.len() > MAX_TOKEN || text.contains([' ', '\t']) {
                return Err(RequestError::BadHeaderValue("X-aws-ec2-metadata-token"));
            }
            token = Some(text.to_string());
        } else if name.eq_ignore_ascii_case("x-aws-ec2-metadata-token-ttl-seconds") {
            if token_ttl.is_some() {
                return Err(RequestError::DuplicateHeader(
                    "X-aws-ec2-metadata-token-ttl-seconds",
                ));
            }
            if text.is_empty()
                || text.len() > MAX_TTL_DIGITS
                || !text.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(RequestError::BadHeaderValue(
                    "X-aws-ec2-metadata-token-ttl-seconds",
                ));
            }
            token_ttl = Some(text.to_string());
        } else if name.eq_ignore_ascii_case("user-agent") {
            if user_agent.is_some() {
                return Err(RequestError::DuplicateHeader("User-Agent"));
            }
            if text.len() > MAX_USER_AGENT {
                return Err(RequestError::BadHeaderValue("User-Agent"));
            }
            user_agent = Some(text.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            for option in text.split(',').map(|o| o.trim_matches([' ', '\t'])) {
                connection_close |= option.eq_ignore_ascii_case("close");
                connection_keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
        // Any other header is dropped: the rebuilt request carries only the fixed set.
    }
    let keep_alive = !connection_close && (version == 1 || connection_keep_alive);
    Ok(Framed::Request(
        ClientRequest {
            method: method.to_string(),
            target,
            token,
            token_ttl,
            user_agent,
            keep_alive,
        },
        len,
    ))
}

/// A header name we report in errors, without echoing arbitrary client bytes.
fn known_name(name: &str) -> &'static str {
    for known in [
        "Content-Length",
        "Transfer-Encoding",
        "Host",
        "X-aws-ec2-metadata-token",
        "X-aws-ec2-metadata-token-ttl-seconds",
        "User-Agent",
        "Connection",
    ] {
        if name.eq_ignore_ascii_case(known) {
            return known;
        }
    }
    "other"
}

/// The request the agent sends to `server` in place of the client's: method, canonical target,
/// Host, the IMDSv2 token headers, User-Agent; one request per upstream connection.
pub fn rebuild_request(request: &ClientRequest, server: SocketAddr) -> Vec<u8> {
    let host = match (server.ip(), server.port()) {
        (IpAddr::V4(a), 80) => a.to_string(),
        (IpAddr::V6(a), 80) => format!("[{a}]"),
        (IpAddr::V4(a), p) => format!("{a}:{p}"),
        (IpAddr::V6(a), p) => format!("[{a}]:{p}"),
    };
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\n",
        request.method, request.target
    );
    if let Some(token) = &request.token {
        out.push_str(&format!("X-aws-ec2-metadata-token: {token}\r\n"));
    }
    if let Some(ttl) = &request.token_ttl {
        out.push_str(&format!("X-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"));
    }
    if let Some(agent) = &request.user_agent {
        out.push_str(&format!("User-Agent: {agent}\r\n"));
    }
    // Methods that usually carry a body say explicitly that this one has none.
    if matches!(request.method.as_str(), "PUT" | "POST" | "PATCH") {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Result<Framed, RequestError> {
        frame_request(text.as_bytes(), false)
    }

    fn request(text: &str) -> (ClientRequest, usize) {
        match frame(text) {
            Ok(Framed::Request(r, n)) => (r, n),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_plain_get_is_framed_with_its_length() {
        let text = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\nGET /next";
        let (r, n) = request(text);
        assert_eq!(n, text.len() - "GET /next".len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.target.path, "/latest/meta-data/instance-id");
        assert_eq!(r.user_agent.as_deref(), Some("curl/8"));
        assert!(r.keep_alive);
    }

    #[test]
    fn an_incomplete_head_waits_for_more_bytes() {
        assert_eq!(
            frame("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n"),
            Ok(Framed::Partial)
        );
        assert_eq!(frame("GE"), Ok(Framed::Partial));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(
            !request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!request("GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn token_headers_are_kept_and_checked() {
        let (r, _) = request(
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
        );
        assert_eq!(r.token_ttl.as_deref(), Some("21600"));
        let (r, _) = request("GET / HTTP/1.1\r\nx-aws-ec2-metadata-token: AQAE-abc==\r\n\r\n");
        assert_eq!(r.token.as_deref(), Some("AQAE-abc=="));
        assert_eq!(
            frame("PUT / HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 1e9\r\n\r\n"),
            Err(RequestError::BadHeaderValue(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ))
        );
        assert_eq!(
            frame(
                "GET / HTTP/1.1\r\nX-aws-ec2-metadata-token: a\r\nX-aws-ec2-metadata-token: b\r\n\r\n"
            ),
            Err(RequestError::DuplicateHeader("X-aws-ec2-metadata-token"))
        );
    }

    #[test]
    fn bodies_and_framing_tricks_are_refused() {
        use RequestError::*;
        for (text, want) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                Body("Content-Length"),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
                DuplicateHeader("Content-Length"),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
                Body("Content-Length"),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Body("Content-Length"),
            ),
            (
                "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                Body("Transfer-Encoding"),
            ),
            (
                "GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
                Body("Transfer-Encoding"),
            ),
            ("PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", Expect),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                DuplicateHeader("Host"),
            ),
        ] {
            assert_eq!(frame_request(text.as_bytes(), false), Err(want), "{text:?}");
        }
        // Raw non-UTF-8 bytes.
        assert_eq!(
            frame_request(b"GET / HTTP/1.1\r\nUser-Agent: a\xffb\r\n\r\n", false),
            Err(BadHeaderValue("User-Agent"))
        );
        assert_eq!(
            frame_request(b"GET / HTTP/1.1\r\nX-Other: \xc0\xae\r\n\r\n", false),
            Err(BadHeaderValue("other"))
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for text in [
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03",
        ] {
            let got = frame(text);
            assert!(
                matches!(got, Err(RequestError::Malformed(_))),
                "{text:?}: {got:?}"
            );
        }
    }

    #[test]
    fn oversized_heads_are_refused_even_when_incomplete() {
        let big = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(frame(&big), Err(RequestError::HeadTooLarge));
        let many: String = (0..40).map(|i| format!("X-{i}: a\r\n")).collect();
        assert_eq!(
            frame(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(RequestError::TooManyHeaders)
        );
    }

    #[test]
    fn non_canonical_targets_are_refused_before_the_policy() {
        assert_eq!(
            frame("GET /latest/meta-data/placement/../iam/ HTTP/1.1\r\n\r\n"),
            Err(RequestError::Target(TargetError::DotSegment))
        );
        assert_eq!(
            frame("GET http://169.254.169.254/latest/ HTTP/1.1\r\n\r\n"),
            Err(RequestError::Target(TargetError::NotOriginForm))
        );
    }

    #[test]
    fn the_rebuilt_request_has_only_the_fixed_headers() {
        let (r, _) = request(
            "GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: evil\r\nX-aws-ec2-metadata-token: T0k\r\nUser-Agent: ua\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: keep-alive\r\n\r\n",
        );
        let v4: SocketAddr = "169.254.169.254:80".parse().expect("addr");
        assert_eq!(
            String::from_utf8(rebuild_request(&r, v4)).expect("ascii"),
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: T0k\r\nUser-Agent: ua\r\nConnection: close\r\n\r\n"
        );
        let (r, _) = request(
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        let v6: SocketAddr = "[fd00:ec2::254]:8080".parse().expect("addr");
        assert_eq!(
            String::from_utf8(rebuild_request(&r, v6)).expect("ascii"),
            "PUT /latest/api/token HTTP/1.1\r\nHost: [fd00:ec2::254]:8080\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
}
