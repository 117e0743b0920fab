//! One client connection's HTTP conversation (sans-IO, time passed in): bytes come in, a
//! request is framed and judged, the verdict says forward, reset or answer 403; after the
//! response the next request on a kept-alive connection is judged the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{ClientRequest, Framed, MAX_HEAD, RequestError, frame_request};
use crate::policy::{HttpAction, HttpPolicy, HttpQuestion};

/// A request head must be complete this long after its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection without a new request is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the server's answer (the upstream fetch has its own, shorter limit).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The rule a connection was diverted by, as the conversation needs it.
#[derive(Debug, Clone)]
pub struct DivertRule {
    pub name: String,
    pub http: Arc<HttpPolicy>,
}

/// How a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A TCP reset at once.
    Reset,
    /// `403 Forbidden`, then close.
    Forbid,
}

/// What was decided about one request: the audit record's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub uid: u32,
    pub rule: String,
    /// Method and canonical target, when the request could be framed.
    pub method: Option<String>,
    pub target: Option<String>,
    /// Why it was refused before the policy was asked (a reason label), if it was.
    pub refused_because: Option<&'static str>,
    /// The request entry of the policy that decided (None: the http default, or refused
    /// before the policy was asked).
    pub entry: Option<usize>,
    pub action: HttpAction,
    /// Not HTTP at all (its audit record is rate-limited).
    pub garbage: bool,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing until more bytes arrive (or the server answers).
    Wait,
    /// Send the rebuilt `request` to the server and relay its answer.
    Forward {
        request: ClientRequest,
        judgement: Judgement,
    },
    /// Refuse and end the connection.
    Refuse { how: Refusal, judgement: Judgement },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head; `since` is the first byte of it (or the end of the previous
    /// response, while the inbox is empty).
    Reading { since: Instant },
    /// Waiting for the server; the answer goes out before the next request is read.
    Forwarded { since: Instant, keep_alive: bool },
    /// Refused or finished: no further request is read.
    Done,
}

/// One client connection's conversation.
#[derive(Debug)]
pub struct Conversation {
    uid: u32,
    rule: DivertRule,
    inbox: Vec<u8>,
    phase: Phase,
}

impl Conversation {
    pub fn new(uid: u32, rule: DivertRule, now: Instant) -> Self {
        Self {
            uid,
            rule,
            inbox: Vec::new(),
            phase: Phase::Reading { since: now },
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// How many more bytes the conversation takes now: one more than a full head, so an
    /// oversized head is seen as such; nothing once done. Bytes not taken stay in the TCP
    /// receive buffer, whose window then closes (backpressure, not loss).
    pub fn room(&self) -> usize {
        match self.phase {
            Phase::Done => 0,
            _ => (MAX_HEAD + 1).saturating_sub(self.inbox.len()),
        }
    }

    /// Client bytes, in stream order.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.phase == Phase::Done {
            return;
        }
        if self.inbox.is_empty()
            && let Phase::Reading { since } = &mut self.phase
        {
            *since = now;
        }
        self.inbox.extend_from_slice(bytes);
    }

    /// Frames and judges the next request if one is complete.
    pub fn step(&mut self, now: Instant) -> Step {
        if !matches!(self.phase, Phase::Reading { .. }) || self.inbox.is_empty() {
            return Step::Wait;
        }
        let http = self.rule.http.clone();
        match frame_request(&self.inbox, http.allows_queries()) {
            Ok(Framed::Partial) => Step::Wait,
            Ok(Framed::Request(request, len)) => {
                self.inbox.drain(..len);
                let (action, entry) = http.judge(&HttpQuestion {
                    method: &request.method,
                    path: &request.target.path,
                    has_query: request.target.query.is_some(),
                    uid: Some(self.uid),
                });
                let judgement = Judgement {
                    uid: self.uid,
                    rule: self.rule.name.clone(),
                    method: Some(request.method.clone()),
                    target: Some(request.target.to_string()),
                    refused_because: None,
                    entry,
                    action,
                    garbage: false,
                };
                match action {
                    HttpAction::Allow => {
                        self.phase = Phase::Forwarded {
                            since: now,
                            keep_alive: request.keep_alive,
                        };
                        Step::Forward { request, judgement }
                    }
                    HttpAction::Reset => self.refuse(Refusal::Reset, judgement),
                    HttpAction::Forbid => self.refuse(Refusal::Forbid, judgement),
                }
            }
            Err(e) => {
                // A request that cannot be framed strictly gets the http default's kind of
                // refusal (never an allow: there is nothing safe to forward).
                let how = match http.default {
                    HttpAction::Forbid => Refusal::Forbid,
                    HttpAction::Allow | HttpAction::Reset => Refusal::Reset,
                };
                let garbage = matches!(
                    e,
                    RequestError::Malformed(_)
                        | RequestError::HeadTooLarge
                        | RequestError::TooManyHeaders
                );
                let judgement = Judgement {
                    uid: self.uid,
                    rule: self.rule.name.clone(),
                    method: None,
                    target: None,
                    refused_because: Some(e.reason()),
                    entry: None,
                    action: match how {
                        Refusal::Reset => HttpAction::Reset,
                        Refusal::Forbid => HttpAction::Forbid,
                    },
                    garbage,
                };
                self.refuse(how, judgement)
            }
        }
    }

    fn refuse(&mut self, how: Refusal, judgement: Judgement) -> Step {
        self.phase = Phase::Done;
        self.inbox.clear();
        Step::Refuse { how, judgement }
    }

    /// The server's answer (or our 502) has been queued for the client. Returns whether the
    /// connection stays open for another request.
    pub fn answered(&mut self, relayed: bool, now: Instant) -> bool {
        match self.phase {
            Phase::Forwarded { keep_alive, .. } if relayed && keep_alive => {
                self.phase = Phase::Reading { since: now };
                true
            }
            _ => {
                self.phase = Phase::Done;
                self.inbox.clear();
                false
            }
        }
    }

    /// Whether the client or the server took too long: a head not complete within
    /// [`REQUEST_TIMEOUT`], an idle kept-alive connection past [`IDLE_TIMEOUT`], or no answer
    /// within [`UPSTREAM_TIMEOUT`].
    pub fn expired(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Reading { since } => {
                let limit = if self.inbox.is_empty() {
                    IDLE_TIMEOUT
                } else {
                    REQUEST_TIMEOUT
                };
                now.saturating_duration_since(since) >= limit
            }
            Phase::Forwarded { since, .. } => {
                now.saturating_duration_since(since) >= UPSTREAM_TIMEOUT
            }
            Phase::Done => false,
        }
    }

    /// Whether the conversation is reading a request (not waiting for the server, not done).
    pub fn is_reading(&self) -> bool {
        matches!(self.phase, Phase::Reading { .. })
    }

    /// Whether the conversation is over (refused, or the last response was queued).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HttpRequestRule;

    fn rule(default: HttpAction) -> DivertRule {
        let entry = |path: &str, methods: &[&str], action| HttpRequestRule {
            path_prefix: path.into(),
            uid: None,
            methods: methods.iter().map(|m| m.to_string()).collect(),
            query: false,
            action,
        };
        DivertRule {
            name: "imds-users".into(),
            http: Arc::new(HttpPolicy {
                requests: vec![
                    entry("/latest/meta-data/iam/", &[], HttpAction::Reset),
                    entry("/latest/api/token", &["PUT"], HttpAction::Allow),
                    entry("/latest/meta-data/", &[], HttpAction::Allow),
                    entry("/latest/user-data", &[], HttpAction::Forbid),
                ],
                default,
            }),
        }
    }

    fn start() -> (Conversation, Instant) {
        let now = Instant::now();
        (Conversation::new(1000, rule(HttpAction::Reset), now), now)
    }

    #[test]
    fn an_allowed_request_is_forwarded_once_its_head_is_complete() {
        let (mut c, now) = start();
        c.receive(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n", now);
        assert_eq!(c.step(now), Step::Wait);
        c.receive(b"Host: x\r\n\r\n", now);
        match c.step(now) {
            Step::Forward { request, judgement } => {
                assert_eq!(request.target.path, "/latest/meta-data/instance-id");
                assert_eq!(judgement.entry, Some(2));
                assert_eq!(judgement.uid, 1000);
                assert_eq!(judgement.rule, "imds-users");
            }
            other => panic!("{other:?}"),
        }
        // While the server answers, nothing else is judged.
        c.receive(b"GET /latest/meta-data/iam/ HTTP/1.1\r\n\r\n", now);
        assert_eq!(c.step(now), Step::Wait);
    }

    #[test]
    fn each_request_on_a_kept_alive_connection_is_judged() {
        let (mut c, now) = start();
        c.receive(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\nGET /latest/meta-data/iam/info HTTP/1.1\r\n\r\n",
            now,
        );
        assert!(matches!(c.step(now), Step::Forward { .. }));
        assert!(c.answered(true, now));
        match c.step(now) {
            Step::Refuse { how, judgement } => {
                assert_eq!(how, Refusal::Reset);
                assert_eq!(
                    judgement.target.as_deref(),
                    Some("/latest/meta-data/iam/info")
                );
                assert_eq!(judgement.entry, Some(0));
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_done());
        assert_eq!(c.room(), 0);
    }

    #[test]
    fn a_forbid_entry_answers_403_and_the_token_needs_put() {
        let (mut c, now) = start();
        c.receive(b"GET /latest/user-data HTTP/1.1\r\n\r\n", now);
        assert!(matches!(
            c.step(now),
            Step::Refuse {
                how: Refusal::Forbid,
                ..
            }
        ));
        let (mut c, now) = start();
        c.receive(b"GET /latest/api/token HTTP/1.1\r\n\r\n", now);
        assert!(matches!(
            c.step(now),
            Step::Refuse {
                how: Refusal::Reset,
                ..
            }
        ));
        let (mut c, now) = start();
        c.receive(
            b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            now,
        );
        assert!(matches!(c.step(now), Step::Forward { .. }));
    }

    #[test]
    fn a_body_hiding_a_second_request_is_refused_before_anything_is_forwarded() {
        let (mut c, now) = start();
        c.receive(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nContent-Length: 40\r\n\r\nGET /latest/meta-data/iam/info HTTP/1.1\r\n\r\n",
            now,
        );
        match c.step(now) {
            Step::Refuse { judgement, .. } => {
                assert_eq!(judgement.refused_because, Some("body"));
                assert!(!judgement.garbage);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_refused_and_marked_as_garbage() {
        let (mut c, now) = start();
        c.receive(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", now);
        match c.step(now) {
            Step::Refuse { how, judgement } => {
                assert_eq!(how, Refusal::Reset);
                assert!(judgement.garbage);
                assert_eq!(judgement.refused_because, Some("malformed"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_connection_without_keep_alive_ends_after_its_response() {
        let (mut c, now) = start();
        c.receive(b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n", now);
        assert!(matches!(c.step(now), Step::Forward { .. }));
        assert!(!c.answered(true, now));
        assert!(c.is_done());
        // An upstream failure ends a kept-alive connection too.
        let (mut c, now) = start();
        c.receive(b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n", now);
        assert!(matches!(c.step(now), Step::Forward { .. }));
        assert!(!c.answered(false, now));
    }

    #[test]
    fn slow_heads_and_idle_connections_expire() {
        let (mut c, t0) = start();
        assert!(!c.expired(t0 + REQUEST_TIMEOUT));
        assert!(c.expired(t0 + IDLE_TIMEOUT));
        let t1 = t0 + Duration::from_secs(1);
        c.receive(b"GET /latest/meta-data/ HTT", t1);
        assert!(!c.expired(t1 + REQUEST_TIMEOUT - Duration::from_millis(1)));
        assert!(c.expired(t1 + REQUEST_TIMEOUT));
        c.receive(b"P/1.1\r\n\r\n", t1);
        assert!(matches!(c.step(t1), Step::Forward { .. }));
        assert!(!c.expired(t1 + REQUEST_TIMEOUT));
        assert!(c.expired(t1 + UPSTREAM_TIMEOUT));
    }

    #[test]
    fn room_is_bounded_by_the_head_limit() {
        let (mut c, now) = start();
        assert_eq!(c.room(), MAX_HEAD + 1);
        c.receive(&[b'a'; 100], now);
        assert_eq!(c.room(), MAX_HEAD + 1 - 100);
    }
}
