//! The S3 edge: client construction from the standard AWS chain plus flags, retry and timeout
//! policy, and the five calls the mailbox needs, each timed and counted in the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::metrics::{Metrics, S3Op};

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Per attempt; a stuck request is abandoned and retried after this.
    pub attempt_timeout: Duration,
    /// Whole call including retries.
    pub operation_timeout: Duration,
    pub max_attempts: u32,
}

impl S3Settings {
    pub fn new(bucket: impl Into<String>) -> S3Settings {
        S3Settings {
            bucket: bucket.into(),
            endpoint_url: None,
            region: None,
            path_style: false,
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 {op} `{key}` failed: {message}")]
    Request {
        op: &'static str,
        key: String,
        message: String,
        /// The service's error code (`AccessDenied`, `NoSuchBucket`, ...), when it sent one.
        code: Option<String>,
    },
    #[error("S3 GET `{key}`: object of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        key: String,
        size: u64,
        limit: usize,
    },
}

impl S3Error {
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Request { code, .. } => code.as_deref(),
            S3Error::TooLarge { .. } => None,
        }
    }
}

fn request_error<E, R>(op: S3Op, key: &str, e: SdkError<E, R>) -> S3Error
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = e
        .as_service_error()
        .and_then(|s| s.code())
        .map(String::from);
    let message = match (&code, e.as_service_error().and_then(|s| s.message())) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.clone(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    S3Error::Request {
        op: op.as_str(),
        key: key.to_string(),
        message,
        code,
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub objects: Vec<Listed>,
    /// More keys exist beyond this page.
    pub truncated: bool,
}

/// The bucket, as the mailbox uses it.
#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    bucket: String,
    metrics: Arc<Metrics>,
}

/// Builds a client from the standard AWS chain (env, profile, instance role) and the flags.
pub async fn client(settings: &S3Settings) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if shared.region().is_none() && settings.region.is_none() {
        // S3-compatible servers mostly ignore the region, but signing needs one.
        builder = builder.region(Region::new("us-east-1"));
    }
    Client::from_conf(configure(builder, settings).build())
}

/// Applies the flags and Hoshino's retry/timeout/checksum policy to a config builder.
pub fn configure(
    mut builder: aws_sdk_s3::config::Builder,
    settings: &S3Settings,
) -> aws_sdk_s3::config::Builder {
    if let Some(url) = &settings.endpoint_url {
        builder = builder.endpoint_url(url.clone());
    }
    builder
        .force_path_style(settings.path_style)
        // Default checksums (CRC32 trailers) break several non-AWS servers.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        // Standard mode retries 5xx, throttling (SlowDown) and timeouts with jittered
        // exponential backoff; the first retry comes fast because packets are waiting.
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(settings.max_attempts.max(1))
                .with_initial_backoff(Duration::from_millis(25))
                .with_max_backoff(Duration::from_secs(2)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(settings.attempt_timeout)
                .operation_timeout(settings.operation_timeout)
                .build(),
        )
        // Bundles are small and quick; the stalled-stream grace period only delays errors.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
}

/// Whether an HTTP status on a GET/HEAD of one of our own keys means "no such object".
///
/// AWS answers 403, not 404, for a missing key when the caller may not `s3:ListBucket` that key;
/// the least-privilege node policy grants ListBucket only with an `s3:prefix` condition, which a
/// GET never satisfies. Treating that 403 as an error would make an unrung doorbell look "changed"
/// on every idle poll and wake the node into LIST mode for ever. Credentials that are wrong
/// altogether still surface: the LIST that starts every active period fails loudly.
fn absent_status(status: u16) -> bool {
    status == 404 || status == 403
}

impl Store {
    pub fn new(client: Client, bucket: impl Into<String>, metrics: Arc<Metrics>) -> Store {
        Store {
            client,
            bucket: bucket.into(),
            metrics,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn record(&self, op: S3Op, started: Instant, ok: bool) {
        self.metrics.s3_request(op, started.elapsed(), ok);
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let started = Instant::now();
        let r = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await;
        self.record(S3Op::Put, started, r.is_ok());
        r.map(|_| ()).map_err(|e| request_error(S3Op::Put, key, e))
    }

    /// The object's bytes, `None` if it no longer exists, an error if it is over `limit`.
    pub async fn get(&self, key: &str, limit: usize) -> Result<Option<Bytes>, S3Error> {
        let started = Instant::now();
        let r = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.raw_response()
                        .is_some_and(|r| absent_status(r.status().as_u16()));
                self.record(S3Op::Get, started, missing);
                return if missing {
                    Ok(None)
                } else {
                    Err(request_error(S3Op::Get, key, e))
                };
            }
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        if size > limit as u64 {
            self.record(S3Op::Get, started, true);
            return Err(S3Error::TooLarge {
                key: key.to_string(),
                size,
                limit,
            });
        }
        let body = out.body.collect().await;
        self.record(S3Op::Get, started, body.is_ok());
        match body {
            Ok(b) => {
                let bytes = b.into_bytes();
                if bytes.len() > limit {
                    return Err(S3Error::TooLarge {
                        key: key.to_string(),
                        size: bytes.len() as u64,
                        limit,
                    });
                }
                Ok(Some(bytes))
            }
            Err(e) => Err(S3Error::Request {
                op: "get",
                key: key.to_string(),
                message: format!("reading the body: {e}"),
                code: None,
            }),
        }
    }

    /// One page (up to 1000 keys) under `prefix`, after `start_after` if given, sorted by key
    /// client side (S3 Express One Zone lists unordered).
    pub async fn list(&self, prefix: &str, start_after: Option<&str>) -> Result<Listing, S3Error> {
        let started = Instant::now();
        let r = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(start_after.map(String::from))
            .send()
            .await;
        self.record(S3Op::List, started, r.is_ok());
        let out = r.map_err(|e| request_error(S3Op::List, prefix, e))?;
        let mut objects: Vec<Listed> = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing {
            objects,
            truncated: out.is_truncated().unwrap_or(false),
        })
    }

    /// The object's ETag, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        let started = Instant::now();
        let r = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        match r {
            Ok(out) => {
                self.record(S3Op::Head, started, true);
                Ok(Some(out.e_tag().unwrap_or_default().to_string()))
            }
            Err(e) => {
                let missing = e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response()
                        .is_some_and(|r| absent_status(r.status().as_u16()));
                self.record(S3Op::Head, started, missing);
                if missing {
                    Ok(None)
                } else {
                    Err(request_error(S3Op::Head, key, e))
                }
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let started = Instant::now();
        let r = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        self.record(S3Op::Delete, started, r.is_ok());
        r.map(|_| ())
            .map_err(|e| request_error(S3Op::Delete, key, e))
    }
}
