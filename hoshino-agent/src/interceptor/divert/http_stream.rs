//! The client-to-server byte stream of an HTTP/1.x connection, framed just enough to find every
//! request line: request line, headers (for `Content-Length` / `Transfer-Encoding`), body.
//! Sans-IO: bytes in, events out. Bounded: no line may exceed [`MAX_LINE`] bytes.

/// Longest request line or header line kept while waiting for its end.
pub const MAX_LINE: usize = 8192;
/// Most header lines one request may have.
pub const MAX_HEADERS: usize = 128;

/// Something the stream learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A complete request line; `path` is the normalized path (dot segments resolved, percent
    /// escapes decoded) plus the query, and `raw_target` what the client sent.
    Request {
        method: String,
        path: String,
        raw_target: String,
    },
    /// The stream cannot be followed (not HTTP/1.x, a line too long, a body framing we do not
    /// track); nothing after this point is inspected.
    Unframeable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    RequestLine,
    Headers { content_length: u64, headers: usize },
    Body { remaining: u64 },
    Stopped,
}

/// The request framing of one connection.
#[derive(Debug, Clone)]
pub struct RequestStream {
    state: State,
    /// Bytes of the current, incomplete line.
    line: Vec<u8>,
    /// Bytes consumed so far (stream offset of the next byte).
    consumed: u64,
    /// Stream offset where the current request line began.
    line_start: u64,
}

impl Default for RequestStream {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestStream {
    pub fn new() -> Self {
        Self {
            state: State::RequestLine,
            line: Vec::new(),
            consumed: 0,
            line_start: 0,
        }
    }

    /// Stream offset of the first byte of a request line that has started but not ended (or of
    /// the next byte if the stream sits between requests), i.e. the first byte that must not be
    /// released before a decision. None while inside headers or a body, or once stopped.
    pub fn undecided_from(&self) -> Option<u64> {
        match self.state {
            State::RequestLine => Some(self.line_start),
            _ => None,
        }
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Feeds in-order stream bytes; returns events in stream order. After `Unframeable` the
    /// stream stops and ignores further input.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            match self.state {
                State::Stopped => return events,
                State::Body { remaining } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    self.advance(take);
                    bytes = bytes.get(take..).unwrap_or(&[]);
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 {
                        self.line_start = self.consumed;
                        State::RequestLine
                    } else {
                        State::Body { remaining }
                    };
                }
                State::RequestLine | State::Headers { .. } => {
                    let newline = bytes.iter().position(|b| *b == b'\n');
                    let take = newline.map_or(bytes.len(), |i| i + 1);
                    let (chunk, rest) = bytes.split_at(take);
                    bytes = rest;
                    if self.line.len() + chunk.len() > MAX_LINE {
                        self.advance(chunk.len());
                        events.push(self.stop(format!("a line longer than {MAX_LINE} bytes")));
                        return events;
                    }
                    self.line.extend_from_slice(chunk);
                    self.advance(chunk.len());
                    if newline.is_some() {
                        let line = std::mem::take(&mut self.line);
                        if let Some(event) = self.end_of_line(&line) {
                            let stop = matches!(event, StreamEvent::Unframeable(_));
                            events.push(event);
                            if stop {
                                return events;
                            }
                        }
                    }
                }
            }
        }
        events
    }

    fn advance(&mut self, n: usize) {
        self.consumed = self.consumed.saturating_add(n as u64);
    }

    fn stop(&mut self, why: String) -> StreamEvent {
        self.state = State::Stopped;
        self.line.clear();
        StreamEvent::Unframeable(why)
    }

    fn end_of_line(&mut self, line: &[u8]) -> Option<StreamEvent> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self.state.clone() {
            State::RequestLine => {
                // RFC 9112 2.2: ignore empty lines before a request line.
                if line.is_empty() {
                    self.line_start = self.consumed;
                    return None;
                }
                match parse_request_line(line) {
                    Ok(event) => {
                        self.state = State::Headers {
                            content_length: 0,
                            headers: 0,
                        };
                        Some(event)
                    }
                    Err(why) => Some(self.stop(why)),
                }
            }
            State::Headers {
                content_length,
                headers,
            } => {
                if line.is_empty() {
                    self.state = if content_length == 0 {
                        self.line_start = self.consumed;
                        State::RequestLine
                    } else {
                        State::Body {
                            remaining: content_length,
                        }
                    };
                    return None;
                }
                if headers + 1 > MAX_HEADERS {
                    return Some(self.stop(format!("more than {MAX_HEADERS} header lines")));
                }
                let Some((name, value)) = split_header(line) else {
                    return Some(self.stop("a header line without `:`".to_string()));
                };
                let mut content_length = content_length;
                if name.eq_ignore_ascii_case("content-length") {
                    match value.parse::<u64>() {
                        Ok(n) => content_length = n,
                        Err(_) => {
                            return Some(self.stop(format!("Content-Length `{value}`")));
                        }
                    }
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    // Chunked bodies could hide a second request from a naive reader; they are
                    // not followed.
                    return Some(self.stop(format!("Transfer-Encoding `{value}`")));
                }
                self.state = State::Headers {
                    content_length,
                    headers: headers + 1,
                };
                None
            }
            State::Body { .. } | State::Stopped => None,
        }
    }
}

fn split_header(line: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(line).ok()?;
    let (name, value) = text.split_once(':')?;
    if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    Some((name.to_string(), value.trim().to_string()))
}

fn parse_request_line(line: &[u8]) -> Result<StreamEvent, String> {
    let text =
        std::str::from_utf8(line).map_err(|_| "a request line that is not UTF-8".to_string())?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "not an HTTP/1.x request line: `{}`",
            truncate(text)
        ));
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1.x request line: `{}`",
            truncate(text)
        ));
    }
    let path = normalize_target(target)
        .ok_or_else(|| format!("request target `{}` cannot be normalized", truncate(target)))?;
    Ok(StreamEvent::Request {
        method: method.to_string(),
        path,
        raw_target: target.to_string(),
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The path a server would serve for `target`: absolute-form reduced to its path, percent
/// escapes decoded, dot segments removed (RFC 3986 5.2.4), query kept verbatim. So that
/// `/latest/meta-data/instance-id/../iam/` is judged as `/latest/meta-data/iam/`. Returns None
/// for targets that decode to something a path cannot be (control characters, invalid escapes,
/// non-UTF-8).
pub fn normalize_target(target: &str) -> Option<String> {
    if target == "*" {
        return Some("*".to_string());
    }
    let target = match target.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => {
            rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/")
        }
        Some(_) => return None,
        None => target,
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(path)?;
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::from("/");
    path.push_str(&out.join("/"));
    if trailing_slash && !path.ends_with('/') {
        path.push('/');
    }
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    Some(path)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> StreamEvent {
        StreamEvent::Request {
            method: "GET".into(),
            path: path.into(),
            raw_target: path.into(),
        }
    }

    #[test]
    fn request_line_split_over_pushes_is_found_once_complete() {
        let mut s = RequestStream::new();
        assert!(s.push(b"GET /latest/me").is_empty());
        assert_eq!(s.undecided_from(), Some(0));
        assert!(s.push(b"ta-data/instance-id HTT").is_empty());
        let events = s.push(b"P/1.1\r\nHost: 169.254.169.254\r\n\r\n");
        assert_eq!(events, vec![request("/latest/meta-data/instance-id")]);
        assert_eq!(s.undecided_from(), Some(s.consumed()));
    }

    #[test]
    fn every_request_of_a_keep_alive_connection_is_seen() {
        let mut s = RequestStream::new();
        let events = s.push(
            b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /latest/meta-data/iam/ HTTP/1.1\r\n\r\n",
        );
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], StreamEvent::Request { method, .. } if method == "PUT"));
        assert_eq!(events[1], request("/latest/meta-data/iam/"));
    }

    #[test]
    fn body_bytes_that_look_like_a_request_are_not_requests() {
        let mut s = RequestStream::new();
        let body = b"GET /latest/meta-data/iam/ HTTP/1.1\r\n";
        let head = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        let mut events = s.push(head.as_bytes());
        events.extend(s.push(body));
        assert_eq!(events.len(), 1);
        assert_eq!(s.undecided_from(), Some(s.consumed()));
    }

    #[test]
    fn chunked_bodies_and_garbage_stop_the_stream() {
        let mut s = RequestStream::new();
        let events = s.push(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(events.last(), Some(StreamEvent::Unframeable(_))));
        assert!(s.push(b"GET /x HTTP/1.1\r\n\r\n").is_empty());
        assert_eq!(s.undecided_from(), None);

        let mut s = RequestStream::new();
        assert!(matches!(
            s.push(b"\x16\x03\x01\x02\x00\n").as_slice(),
            [StreamEvent::Unframeable(_)]
        ));
    }

    #[test]
    fn overlong_request_line_stops_the_stream_without_unbounded_buffering() {
        let mut s = RequestStream::new();
        let mut events = s.push(b"GET /");
        for _ in 0..(MAX_LINE / 1000 + 1) {
            events.extend(s.push(&[b'a'; 1000]));
        }
        assert!(matches!(events.as_slice(), [StreamEvent::Unframeable(_)]));
        assert!(s.line.capacity() <= MAX_LINE + 1000);
    }

    #[test]
    fn targets_are_normalized_before_matching() {
        assert_eq!(
            normalize_target("/latest/meta-data/instance-id/../iam/").as_deref(),
            Some("/latest/meta-data/iam/")
        );
        assert_eq!(
            normalize_target("/latest/meta-data/%69am/info").as_deref(),
            Some("/latest/meta-data/iam/info")
        );
        assert_eq!(normalize_target("/a/./b/.").as_deref(), Some("/a/b/"));
        assert_eq!(normalize_target("/../../etc").as_deref(), Some("/etc"));
        assert_eq!(
            normalize_target("http://169.254.169.254/latest/x?y=../z").as_deref(),
            Some("/latest/x?y=../z")
        );
        assert_eq!(normalize_target("/a%2"), None);
        assert_eq!(normalize_target("/a%0d%0a"), None);
        assert_eq!(normalize_target("relative"), None);
        assert_eq!(normalize_target("https://host/"), None);
    }
}
