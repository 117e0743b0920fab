//! The server's response, read strictly, and what the client gets back: status, a few kept
//! headers, the body with our own `Content-Length`. Also the agent's own answers (403, 502).

/// Largest response head accepted from the server.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest response body relayed (IMDS documents are small; user-data is at most 16 KiB).
pub const MAX_RESPONSE_BODY: usize = 256 * 1024;
const MAX_RESPONSE_HEADERS: usize = 64;

/// Response headers relayed to the client; the rest are dropped.
const KEPT_HEADERS: [&str; 6] = [
    "Content-Type",
    "Last-Modified",
    "ETag",
    "Date",
    "Server",
    "X-aws-ec2-metadata-token-ttl-seconds",
];

/// Why the server's response could not be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the server's response is not well-formed HTTP/1.x: {0}")]
    Malformed(String),
    #[error("the server closed the connection before a complete response head")]
    Truncated,
    #[error("the server's response head is larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("the server's response body is larger than {MAX_RESPONSE_BODY} bytes")]
    BodyTooLarge,
    #[error("the server's response is chunked or otherwise transfer-encoded")]
    TransferEncoded,
    #[error("the server's body ({got} bytes) is shorter than its Content-Length {want}")]
    ShortBody { got: usize, want: usize },
}

/// A response as relayed: status, reason, kept headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// The server's `Content-Length` (what a HEAD answer declares without a body).
    pub declared_length: Option<usize>,
}

/// Reads the whole server response from `bytes` (the server was asked for `Connection: close`,
/// so `bytes` is everything up to EOF). `head_request`: the response has no body.
pub fn parse_response(bytes: &[u8], head_request: bool) -> Result<RelayedResponse, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() > MAX_RESPONSE_HEAD => {
            return Err(ResponseError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Err(ResponseError::Truncated),
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    };
    if head_len > MAX_RESPONSE_HEAD {
        return Err(ResponseError::HeadTooLarge);
    }
    let status = response
        .code
        .ok_or_else(|| ResponseError::Malformed("no status".into()))?;
    let reason = response
        .reason
        .filter(|r| r.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .unwrap_or("")
        .to_string();
    let mut content_length = None;
    let mut kept = Vec::new();
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t'))
            .map(|v| v.trim_matches([' ', '\t']));
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ResponseError::TransferEncoded);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| ResponseError::Malformed("bad Content-Length".into()))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(ResponseError::Malformed(
                    "conflicting Content-Length".into(),
                ));
            }
            content_length = Some(n);
            continue;
        }
        if let (Some(name), Some(value)) = (
            KEPT_HEADERS.iter().find(|k| h.name.eq_ignore_ascii_case(k)),
            value,
        ) {
            kept.push((*name, value.to_string()));
        }
    }
    let rest = &bytes[head_len..];
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else {
        match content_length {
            Some(n) if n > MAX_RESPONSE_BODY => return Err(ResponseError::BodyTooLarge),
            Some(n) if rest.len() < n => {
                return Err(ResponseError::ShortBody {
                    got: rest.len(),
                    want: n,
                });
            }
            Some(n) => rest[..n].to_vec(),
            None if rest.len() > MAX_RESPONSE_BODY => return Err(ResponseError::BodyTooLarge),
            None => rest.to_vec(),
        }
    };
    Ok(RelayedResponse {
        status,
        reason,
        headers: kept,
        body,
        declared_length: content_length,
    })
}

/// The bytes the client receives for `response`; `head_request` sends the length without the
/// body; `keep_alive` says whether the connection stays open.
pub fn client_response(
    response: &RelayedResponse,
    head_request: bool,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let length = if head_request {
        response.declared_length.unwrap_or(0)
    } else {
        response.body.len()
    };
    out.push_str(&format!("Content-Length: {length}\r\n"));
    out.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut bytes = out.into_bytes();
    if !head_request {
        bytes.extend_from_slice(&response.body);
    }
    bytes
}

/// The agent's own answer with a short text body; the connection closes after it.
pub fn own_response(status: u16, reason: &str) -> Vec<u8> {
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_relayed_with_kept_headers_and_our_length() {
        let r = parse_response(
            b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nSet-Cookie: x\r\n\r\nhelloEXTRA",
            false,
        )
        .expect("parses");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
        assert_eq!(
            String::from_utf8(client_response(&r, false, true)).expect("ascii"),
            "HTTP/1.1 200 OK\r\nServer: SimpleHTTP\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
        );
        assert_eq!(
            String::from_utf8(client_response(&r, true, false)).expect("ascii"),
            "HTTP/1.1 200 OK\r\nServer: SimpleHTTP\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_body_without_length_runs_to_the_end() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nnope", false).expect("parses");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", true)
            .expect("HEAD has no body");
        assert!(r.body.is_empty());
        // A HEAD answer declares the length the GET would have.
        let text = String::from_utf8(client_response(&r, true, false)).expect("ascii");
        assert!(text.contains("Content-Length: 4\r\n"), "{text}");
    }

    #[test]
    fn unrelayable_responses_are_errors() {
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                false
            ),
            Err(ResponseError::TransferEncoded)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", false),
            Err(ResponseError::ShortBody { got: 2, want: 9 })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Err(ResponseError::Truncated)
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                false
            ),
            Err(ResponseError::Malformed(
                "conflicting Content-Length".into()
            ))
        );
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE_BODY + 1
        );
        assert_eq!(
            parse_response(huge.as_bytes(), false),
            Err(ResponseError::BodyTooLarge)
        );
    }

    #[test]
    fn own_responses_close_the_connection() {
        let text = String::from_utf8(own_response(403, "Forbidden")).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n403 Forbidden\n"), "{text}");
    }
}
