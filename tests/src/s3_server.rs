//! The in-process S3 server behind `hoshino-s3-server`: s3s-fs over HTTP/1.1 with static
//! credentials, and the conditions of a real S3 that this kernel cannot emulate with netem:
//! a per-request latency distribution (`LatencyProfile`) and injected faults (503 SlowDown,
//! 500 InternalError, connection resets, stalled GET bodies), so the agent's pipelining, retries
//! and timeouts are exercised against a real HTTP server.
//!
//! Every draw is deterministic for a seed: request `n` draws from `splitmix64(seed, n)`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{Body, HttpError, HttpResponse};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum S3ServerError {
    #[error("opening s3s-fs root {root}: {message}")]
    Root { root: PathBuf, message: String },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("fault fractions must each be within 0..=1 and sum to at most 1, got {0:?}")]
    FaultFraction([f64; 3]),
}

/// Emulated S3 latency, added to every request before it is answered (so it counts once per
/// request round trip, as first-byte latency does).
///
/// Figures, as published by AWS:
/// - S3 Express One Zone: "consistent single-digit millisecond data access", "up to 10x faster
///   than S3 Standard" (S3 User Guide, "S3 Express One Zone"). Hence `express`: ~5 ms, small
///   jitter.
/// - S3 Standard: small-object and first-byte-out latencies of "roughly 100-200 milliseconds"
///   as the envelope applications should plan for, with the advice to track and retry the
///   slowest requests of latency-sensitive applications since typical ones are much faster
///   (whitepaper "Best Practices Design Patterns: Optimizing Amazon S3 Performance", and the S3
///   User Guide's "Performance guidelines" / "Timeouts and retries"). 10x Express gives the
///   typical in-region small GET/PUT a few tens of ms. Hence `standard`: 20-30 ms uniform plus,
///   for 2 % of requests, a tail of 40-160 ms more, so p99 lands in AWS's 100-200 ms envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LatencyProfile {
    /// No added latency.
    #[default]
    Loopback,
    /// S3 Express One Zone: 4.5-5.5 ms per request.
    Express,
    /// S3 Standard: 20-30 ms per request, 2 % of requests 40-160 ms more.
    Standard,
}

impl LatencyProfile {
    pub const ALL: [LatencyProfile; 3] = [
        LatencyProfile::Loopback,
        LatencyProfile::Express,
        LatencyProfile::Standard,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LatencyProfile::Loopback => "loopback",
            LatencyProfile::Express => "express",
            LatencyProfile::Standard => "standard",
        }
    }

    pub fn model(self) -> LatencyModel {
        let ms = Duration::from_millis;
        match self {
            LatencyProfile::Loopback => LatencyModel::default(),
            LatencyProfile::Express => LatencyModel {
                base: Duration::from_micros(4_500),
                jitter: ms(1),
                tail_fraction: 0.0,
                tail_base: Duration::ZERO,
                tail_jitter: Duration::ZERO,
            },
            LatencyProfile::Standard => LatencyModel {
                base: ms(20),
                jitter: ms(10),
                tail_fraction: 0.02,
                tail_base: ms(40),
                tail_jitter: ms(120),
            },
        }
    }
}

/// `base + U(0, jitter)`, plus with probability `tail_fraction` `tail_base + U(0, tail_jitter)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencyModel {
    pub base: Duration,
    pub jitter: Duration,
    pub tail_fraction: f64,
    pub tail_base: Duration,
    pub tail_jitter: Duration,
}

impl LatencyModel {
    /// The least delay any request gets.
    pub fn minimum(&self) -> Duration {
        self.base
    }

    /// The delay of request `n` for `seed`.
    pub fn sample(&self, seed: u64, n: u64) -> Duration {
        let draw = |salt: u64| unit(splitmix64(seed ^ salt, n));
        let mut d = self.base + self.jitter.mul_f64(draw(0x1a7e));
        if self.tail_fraction > 0.0 && draw(0x7a11) < self.tail_fraction {
            d += self.tail_base + self.tail_jitter.mul_f64(draw(0x7a12));
        }
        d
    }
}

/// What an injected fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`, S3's throttling answer.
    SlowDown,
    /// `500 InternalError`.
    InternalError,
    /// The connection is dropped without an answer (a TCP RST: the server lingers 0).
    Reset,
}

/// Which requests fail, and how: fractions of all requests.
#[derive(Debug)]
pub struct FaultInjector {
    slow_down: f64,
    internal_error: f64,
    reset: f64,
    seed: u64,
    next: AtomicU64,
    injected: AtomicU64,
}

impl FaultInjector {
    pub fn new(
        slow_down: f64,
        internal_error: f64,
        reset: f64,
        seed: u64,
    ) -> Result<Self, S3ServerError> {
        let all = [slow_down, internal_error, reset];
        if all.iter().any(|f| !(0.0..=1.0).contains(f)) || all.iter().sum::<f64>() > 1.0 {
            return Err(S3ServerError::FaultFraction(all));
        }
        Ok(Self {
            slow_down,
            internal_error,
            reset,
            seed,
            next: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        })
    }

    /// The fault for the next request, if any.
    pub fn draw(&self) -> Option<Fault> {
        if self.slow_down + self.internal_error + self.reset == 0.0 {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let u = unit(splitmix64(self.seed, n));
        let fault = if u < self.slow_down {
            Some(Fault::SlowDown)
        } else if u < self.slow_down + self.internal_error {
            Some(Fault::InternalError)
        } else if u < self.slow_down + self.internal_error + self.reset {
            Some(Fault::Reset)
        } else {
            None
        };
        if fault.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

/// Which GETs a rule covers: keys starting with `prefix` ("" = every key) and, with `sender`,
/// only mailbox keys sent by that node (v2 keys end in `.<sender>`, 16 lowercase hex digits), so
/// a test can select one sender's traffic in an inbox that others write to as well.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyMatch {
    pub prefix: String,
    pub sender: Option<String>,
}

impl KeyMatch {
    /// `key` as sent in the request path (percent-encoded; mailbox keys need no encoding).
    pub fn matches(&self, key: &str) -> bool {
        !key.is_empty()
            && key.starts_with(&self.prefix)
            && self.sender.as_deref().is_none_or(|sender| {
                key.rsplit_once('.')
                    .is_some_and(|(stem, s)| s == sender && !stem.is_empty())
            })
    }

    fn push_args(&self, flag_prefix: &str, args: &mut Vec<String>) {
        args.push(format!("--{flag_prefix}-prefix={}", self.prefix));
        if let Some(sender) = &self.sender {
            args.push(format!("--{flag_prefix}-sender={sender}"));
        }
    }
}

/// Stalls the body of GETs of the keys `keys` covers: the status and headers go out at once,
/// the first body byte only after `duration`, as a slow or hung S3 GET does. At most `count` GETs
/// stall (then those keys are served normally), so a retry can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallRule {
    pub keys: KeyMatch,
    pub duration: Duration,
    pub count: Option<u64>,
}

/// Answers GETs of the keys `keys` covers with `403 AccessDenied` (as S3 does for an SSE-KMS
/// object the caller may not decrypt), at most `count` times, then serves them normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForbidRule {
    pub keys: KeyMatch,
    pub count: Option<u64>,
}

/// The conditions the server emulates; `Default` is a plain loopback server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerConditions {
    pub latency: LatencyProfile,
    /// Fraction of requests answered `503 SlowDown`.
    pub slow_down_fraction: f64,
    /// Fraction of requests answered `500 InternalError`.
    pub internal_error_fraction: f64,
    /// Fraction of requests whose connection is reset instead of answered.
    pub reset_fraction: f64,
    pub stall: Option<StallRule>,
    pub forbid: Option<ForbidRule>,
    pub seed: u64,
}

impl ServerConditions {
    /// The `hoshino-s3-server` flags that select these conditions.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--latency".to_owned(),
            self.latency.label().to_owned(),
            "--fault-fraction".to_owned(),
            self.slow_down_fraction.to_string(),
            "--error-fraction".to_owned(),
            self.internal_error_fraction.to_string(),
            "--reset-fraction".to_owned(),
            self.reset_fraction.to_string(),
            "--fault-seed".to_owned(),
            self.seed.to_string(),
        ];
        if let Some(stall) = &self.stall {
            stall.keys.push_args("stall-get", &mut args);
            args.push("--stall-ms".to_owned());
            args.push(stall.duration.as_millis().to_string());
            if let Some(count) = stall.count {
                args.push("--stall-count".to_owned());
                args.push(count.to_string());
            }
        }
        if let Some(forbid) = &self.forbid {
            forbid.keys.push_args("forbid-get", &mut args);
            if let Some(count) = forbid.count {
                args.push("--forbid-count".to_owned());
                args.push(count.to_string());
            }
        }
        args
    }

    /// Anything beyond what any S3 server does (moto cannot emulate these).
    pub fn is_plain(&self) -> bool {
        *self
            == ServerConditions {
                seed: self.seed,
                ..ServerConditions::default()
            }
    }
}

fn splitmix64(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A u64 as a uniform draw in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    pub conditions: ServerConditions,
}

/// Counters of what the server did to requests, printed when it stops.
#[derive(Debug, Default)]
pub struct ConditionStats {
    pub requests: AtomicU64,
    pub stalled: AtomicU64,
    pub forbidden: AtomicU64,
    pub delayed_micros: AtomicU64,
}

#[derive(Debug)]
struct Conditions {
    latency: LatencyModel,
    seed: u64,
    faults: FaultInjector,
    stall: Option<StallRule>,
    stalls_left: AtomicU64,
    forbid: Option<ForbidRule>,
    forbids_left: AtomicU64,
    stats: ConditionStats,
}

/// The key of a path-style GET (`/<bucket>/<key>`), as sent (percent-encoded).
fn get_key(req: &hyper::Request<Incoming>) -> Option<&str> {
    if req.method() != hyper::Method::GET {
        return None;
    }
    Some(req.uri().path().strip_prefix('/')?.split_once('/')?.1)
}

/// Takes one from `left` unless it is already zero.
fn take_one(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

impl Conditions {
    /// The stall for this request, if it is a GET the stall rule covers and stalls remain.
    fn stall_for(&self, req: &hyper::Request<Incoming>) -> Option<Duration> {
        let rule = self.stall.as_ref()?;
        if !get_key(req).is_some_and(|key| rule.keys.matches(key)) || !take_one(&self.stalls_left) {
            return None;
        }
        self.stats.stalled.fetch_add(1, Ordering::Relaxed);
        Some(rule.duration)
    }

    /// Whether this request is a GET the forbid rule covers while 403s remain.
    fn forbidden(&self, req: &hyper::Request<Incoming>) -> bool {
        let Some(rule) = self.forbid.as_ref() else {
            return false;
        };
        if !get_key(req).is_some_and(|key| rule.keys.matches(key)) || !take_one(&self.forbids_left)
        {
            return false;
        }
        self.stats.forbidden.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[derive(Clone)]
struct ConditionedService {
    inner: S3Service,
    conditions: Arc<Conditions>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for ConditionedService {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = ResponseFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let c = &self.conditions;
        let n = c.stats.requests.fetch_add(1, Ordering::Relaxed);
        let delay = c.latency.sample(c.seed, n);
        let fault = c.faults.draw();
        let forbidden = fault.is_none() && c.forbidden(&req);
        let stall = if fault.is_none() && !forbidden {
            c.stall_for(&req)
        } else {
            None
        };
        let delay_micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        c.stats
            .delayed_micros
            .fetch_add(delay_micros, Ordering::Relaxed);
        let inner = self.inner.clone();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let resource = req.uri().path().to_owned();
            match fault {
                Some(Fault::SlowDown) => {
                    return Ok(s3_error(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "SlowDown",
                        "Please reduce your request rate.",
                        &resource,
                    ));
                }
                Some(Fault::InternalError) => {
                    return Ok(s3_error(
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "We encountered an internal error. Please try again.",
                        &resource,
                    ));
                }
                // hyper closes the connection when the service fails; with linger 0 that close
                // is a RST.
                Some(Fault::Reset) => {
                    return Err(HttpError::new("connection reset injected".into()));
                }
                None => {}
            }
            if forbidden {
                return Ok(s3_error(
                    hyper::StatusCode::FORBIDDEN,
                    "AccessDenied",
                    "Access Denied",
                    &resource,
                ));
            }
            let resp = hyper::service::Service::call(&inner, req).await?;
            Ok(match stall {
                Some(d) => resp.map(|body| stalled(body, d)),
                None => resp,
            })
        })
    }
}

/// `body` with its first byte held back for `stall`.
fn stalled(body: Body, stall: Duration) -> Body {
    let wait = futures::stream::once(tokio::time::sleep(stall)).filter_map(|()| async { None });
    let frames = wait.chain(body.map(|chunk| chunk.map(Frame::data)));
    Body::http_body(http_body_util::StreamBody::new(frames))
}

fn s3_error(status: hyper::StatusCode, code: &str, message: &str, resource: &str) -> HttpResponse {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message} (injected by hoshino-s3-server)</Message>\
         <Resource>{resource}</Resource><RequestId>hoshino-fault</RequestId></Error>"
    );
    let mut resp = HttpResponse::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    resp
}

/// A bound server; `local_addr` is known before serving so the caller can announce it.
pub struct BoundServer {
    listener: TcpListener,
    service: ConditionedService,
    reset_on_close: bool,
}

impl BoundServer {
    pub async fn bind(config: &ServerConfig) -> Result<Self, S3ServerError> {
        let fs = s3s_fs::FileSystem::new(&config.root).map_err(|e| S3ServerError::Root {
            root: config.root.clone(),
            message: format!("{e:?}"),
        })?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(
            config.access_key.clone(),
            config.secret_key.clone(),
        ));
        let c = &config.conditions;
        let faults = FaultInjector::new(
            c.slow_down_fraction,
            c.internal_error_fraction,
            c.reset_fraction,
            c.seed,
        )?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| S3ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let stalls_left = c.stall.as_ref().and_then(|s| s.count).unwrap_or(u64::MAX);
        let forbids_left = c.forbid.as_ref().and_then(|f| f.count).unwrap_or(u64::MAX);
        Ok(Self {
            listener,
            service: ConditionedService {
                inner: builder.build(),
                conditions: Arc::new(Conditions {
                    latency: c.latency.model(),
                    seed: c.seed,
                    faults,
                    stall: c.stall.clone(),
                    stalls_left: AtomicU64::new(stalls_left),
                    forbid: c.forbid.clone(),
                    forbids_left: AtomicU64::new(forbids_left),
                    stats: ConditionStats::default(),
                }),
            },
            reset_on_close: c.reset_fraction > 0.0,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped. Accept errors (e.g. EMFILE) are logged and retried.
    pub async fn serve(self) -> Infallible {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let (socket, _) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            if self.reset_on_close {
                // So that dropping a connection for an injected reset sends RST, not FIN.
                let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            }
            let conn = http
                .serve_connection(TokioIo::new(socket), self.service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }

    /// What the conditions did so far; stays valid after `serve` takes the server.
    pub fn counters(&self) -> ServerCounters {
        ServerCounters(Arc::clone(&self.service.conditions))
    }
}

/// Live counters of a server's emulated conditions.
#[derive(Debug, Clone)]
pub struct ServerCounters(Arc<Conditions>);

impl ServerCounters {
    pub fn requests(&self) -> u64 {
        self.0.stats.requests.load(Ordering::Relaxed)
    }

    pub fn faults_injected(&self) -> u64 {
        self.0.faults.injected()
    }

    pub fn gets_stalled(&self) -> u64 {
        self.0.stats.stalled.load(Ordering::Relaxed)
    }

    pub fn gets_forbidden(&self) -> u64 {
        self.0.stats.forbidden.load(Ordering::Relaxed)
    }

    pub fn mean_added_latency(&self) -> Duration {
        let micros = self.0.stats.delayed_micros.load(Ordering::Relaxed);
        Duration::from_micros(micros / self.requests().max(1))
    }
}

impl std::fmt::Display for ServerCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {} faults injected, {} GETs stalled, {} GETs forbidden, {:?} mean added \
             latency",
            self.requests(),
            self.faults_injected(),
            self.gets_stalled(),
            self.gets_forbidden(),
            self.mean_added_latency()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_fraction_zero_never_fails() {
        let f = FaultInjector::new(0.0, 0.0, 0.0, 1).ok();
        assert!(f.is_some_and(|f| (0..10_000).all(|_| f.draw().is_none())));
    }

    #[test]
    fn fault_fractions_are_roughly_honoured_per_kind() {
        let Ok(f) = FaultInjector::new(0.2, 0.1, 0.05, 7) else {
            panic!("valid fractions");
        };
        let draws: Vec<Option<Fault>> = (0..20_000).map(|_| f.draw()).collect();
        let count = |k| draws.iter().filter(|d| **d == Some(k)).count();
        assert!((3_600..4_400).contains(&count(Fault::SlowDown)));
        assert!((1_700..2_300).contains(&count(Fault::InternalError)));
        assert!((800..1_200).contains(&count(Fault::Reset)));
        let all = draws.iter().filter(|d| d.is_some()).count();
        assert_eq!(f.injected(), all as u64);
    }

    #[test]
    fn fault_fractions_out_of_range_or_above_one_in_sum_are_rejected() {
        assert!(FaultInjector::new(1.5, 0.0, 0.0, 0).is_err());
        assert!(FaultInjector::new(0.6, 0.5, 0.0, 0).is_err());
        assert!(FaultInjector::new(-0.1, 0.0, 0.0, 0).is_err());
    }

    #[test]
    fn loopback_adds_no_latency() {
        let m = LatencyProfile::Loopback.model();
        assert!((0..1000).all(|n| m.sample(1, n).is_zero()));
    }

    fn percentile(mut v: Vec<Duration>, q: f64) -> Duration {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    }

    #[test]
    fn express_stays_near_five_milliseconds() {
        let m = LatencyProfile::Express.model();
        let v: Vec<Duration> = (0..10_000).map(|n| m.sample(3, n)).collect();
        assert!(v.iter().all(|d| (4_500..=5_500).contains(&d.as_micros())));
        let p50 = percentile(v, 0.5).as_micros();
        assert!((4_800..5_200).contains(&p50), "p50 {p50} us");
    }

    #[test]
    fn standard_is_twenty_to_thirty_milliseconds_with_a_tail() {
        let m = LatencyProfile::Standard.model();
        let v: Vec<Duration> = (0..20_000).map(|n| m.sample(5, n)).collect();
        assert!(v.iter().all(|d| *d >= Duration::from_millis(20)));
        let p50 = percentile(v.clone(), 0.5).as_millis();
        assert!((23..28).contains(&p50), "p50 {p50} ms");
        let p99 = percentile(v.clone(), 0.995).as_millis();
        assert!(p99 >= 60, "p99.5 {p99} ms: no tail");
        let tail = v.iter().filter(|d| d.as_millis() >= 60).count();
        assert!((200..600).contains(&tail), "{tail} of 20000 in the tail");
    }

    #[test]
    fn conditions_round_trip_through_the_server_flags() {
        let c = ServerConditions {
            latency: LatencyProfile::Standard,
            slow_down_fraction: 0.25,
            internal_error_fraction: 0.125,
            reset_fraction: 0.0625,
            stall: Some(StallRule {
                keys: KeyMatch {
                    prefix: "v2/inbox/".to_owned(),
                    sender: Some("00000000000000aa".to_owned()),
                },
                duration: Duration::from_millis(1500),
                count: Some(2),
            }),
            forbid: Some(ForbidRule {
                keys: KeyMatch {
                    prefix: "v2/inbox/b/".to_owned(),
                    sender: None,
                },
                count: Some(3),
            }),
            seed: 9,
        };
        let args = c.to_args();
        let expected = [
            "--latency",
            "standard",
            "--fault-fraction",
            "0.25",
            "--error-fraction",
            "0.125",
            "--reset-fraction",
            "0.0625",
            "--fault-seed",
            "9",
            "--stall-get-prefix=v2/inbox/",
            "--stall-get-sender=00000000000000aa",
            "--stall-ms",
            "1500",
            "--stall-count",
            "2",
            "--forbid-get-prefix=v2/inbox/b/",
            "--forbid-count",
            "3",
        ];
        assert_eq!(args, expected);
        assert!(!c.is_plain());
        assert!(ServerConditions::default().is_plain());
    }

    #[test]
    fn key_match_by_sender_selects_only_that_senders_mailbox_keys() {
        let a = "00000000000000aa";
        let m = KeyMatch {
            prefix: "v2/inbox/".to_owned(),
            sender: Some(a.to_owned()),
        };
        let key = |sender: &str| {
            format!("v2/inbox/00000000000000bb/0000000000000001-0000000000000002.{sender}")
        };
        assert!(m.matches(&key(a)));
        assert!(!m.matches(&key("00000000000000ab")));
        assert!(!m.matches(&format!("v2/bell/00000000000000bb.{a}x")));
        assert!(!m.matches(&format!("v2/other/x.{a}")));
        let any = KeyMatch::default();
        assert!(any.matches("v2/bell/x"));
        assert!(!any.matches(""));
    }
}
