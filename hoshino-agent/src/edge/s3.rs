//! The S3 edge: client construction from the standard AWS chain plus flags, Hoshino's own retry
//! loop (so every *attempt*, as AWS bills them, is timed and counted in the metrics), and the
//! calls the mailbox needs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::{Bytes, BytesMut};

use crate::metrics::{Metrics, S3Op};

pub use crate::store::retry::DEFAULT_MAX_ATTEMPTS;
use crate::store::retry::RetryPolicy;

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
            max_attempts: DEFAULT_MAX_ATTEMPTS,
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
        /// HTTP status, when a response arrived.
        status: Option<u16>,
        /// 5xx, throttling, timeouts and transport errors: worth another attempt.
        retryable: bool,
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

    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Request { status, .. } => *status,
            S3Error::TooLarge { .. } => None,
        }
    }

    /// 5xx, throttling, timeouts and transport errors: worth another attempt.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            S3Error::Request {
                retryable: true,
                ..
            }
        )
    }
}

fn request_error<E>(op: S3Op, key: &str, e: SdkError<E, HttpResponse>) -> S3Error
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
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
    let status = e.raw_response().map(|r| r.status().as_u16());
    let retryable = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => {
            status.is_some_and(|s| s >= 500 || s == 429 || s == 408)
                || code.as_deref().is_some_and(|c| {
                    matches!(
                        c,
                        "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout"
                    )
                })
        }
    };
    S3Error::Request {
        op: op.as_str(),
        key: key.to_string(),
        message,
        code,
        status,
        retryable,
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
    /// The continuation token for the next page, when there is one.
    pub next: Option<String>,
}

/// The bucket over the AWS SDK: the production `Store`.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    /// Every GET body read is bounded by this, so a stalled body cannot hold a GET for ever.
    body_timeout: Duration,
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
        // `S3Store` retries itself (see `retry::attempts`), so that each attempt is counted as
        // the request AWS bills; the SDK makes exactly one.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(settings.attempt_timeout)
                .operation_timeout(settings.attempt_timeout)
                .build(),
        )
        // Bundles are small and quick; the stalled-stream grace period only delays errors.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
}

/// How a GET reads "access denied".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A probe of a key that may not exist yet (the next seq of a stream, the doorbell): 403
    /// reads as absent, see `absent_status`.
    Probe,
    /// A key a LIST showed to exist: only 404 is absent; a 403 is an error (counted, retried
    /// later), e.g. an SSE-KMS bucket without decrypt permission, never silently "gone".
    Known,
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

impl S3Store {
    pub fn new(client: Client, bucket: impl Into<String>, metrics: Arc<Metrics>) -> S3Store {
        S3Store::with_settings(client, &S3Settings::new(bucket), metrics)
    }

    pub fn with_settings(client: Client, settings: &S3Settings, metrics: Arc<Metrics>) -> S3Store {
        S3Store {
            client,
            bucket: settings.bucket.clone(),
            metrics,
            retry: RetryPolicy {
                max_attempts: settings.max_attempts.max(1),
                operation_timeout: settings.operation_timeout,
            },
            body_timeout: settings.attempt_timeout,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// One call through the shared retry loop (see `retry::attempts`), with `rand` jitter.
    async fn attempts<T, F, Fut>(&self, op: S3Op, attempt: F) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        crate::store::retry::attempts(&self.retry, &self.metrics, op, rand::random::<f64>, attempt)
            .await
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.attempts(S3Op::Put, || {
            let body = body.clone();
            async move {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| request_error(S3Op::Put, key, e))
            }
        })
        .await
    }

    /// The object's bytes, `None` if it does not exist (see `Lookup` for 403), an error if it is
    /// over `limit`.
    pub async fn get(
        &self,
        key: &str,
        limit: usize,
        lookup: Lookup,
    ) -> Result<Option<Bytes>, S3Error> {
        self.attempts(S3Op::Get, || self.get_once(key, limit, lookup))
            .await
    }

    async fn get_once(
        &self,
        key: &str,
        limit: usize,
        lookup: Lookup,
    ) -> Result<Option<Bytes>, S3Error> {
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
                let status = e.raw_response().map(|r| r.status().as_u16());
                let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || status == Some(404)
                    || (lookup == Lookup::Probe && status.is_some_and(absent_status));
                return if missing {
                    Ok(None)
                } else {
                    Err(request_error(S3Op::Get, key, e))
                };
            }
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        if size > limit as u64 {
            return Err(S3Error::TooLarge {
                key: key.to_string(),
                size,
                limit,
            });
        }
        let body_error = |message: String| S3Error::Request {
            op: "get",
            key: key.to_string(),
            message,
            code: None,
            status: None,
            retryable: true,
        };
        // Read into one buffer of the announced size (no second copy of a large body), and
        // bound the whole read: a stalled body fails this attempt instead of holding the GET.
        let mut body = out.body;
        let read = async {
            let mut buf = BytesMut::with_capacity(usize::try_from(size).unwrap_or(0).min(limit));
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| body_error(format!("reading the body: {e}")))?;
                if buf.len() + chunk.len() > limit {
                    return Err(S3Error::TooLarge {
                        key: key.to_string(),
                        size: (buf.len() + chunk.len()) as u64,
                        limit,
                    });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.freeze())
        };
        let bytes = match tokio::time::timeout(self.body_timeout, read).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(body_error(format!(
                    "reading the body: stalled for {:?}",
                    self.body_timeout
                )));
            }
        };
        if bytes.len() > limit {
            return Err(S3Error::TooLarge {
                key: key.to_string(),
                size: bytes.len() as u64,
                limit,
            });
        }
        Ok(Some(bytes))
    }

    /// One page (up to 1000 keys) under `prefix`, continuing from `continuation` (a token from
    /// the previous page). Keys are sorted client side: S3 Express One Zone lists unordered, and
    /// does not support StartAfter.
    pub async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        let out = self
            .attempts(S3Op::List, || async {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_continuation_token(continuation.map(String::from))
                    .send()
                    .await
                    .map_err(|e| request_error(S3Op::List, prefix, e))
            })
            .await?;
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
        let truncated = out.is_truncated().unwrap_or(false);
        Ok(Listing {
            objects,
            truncated,
            // A server that says "truncated" without a token cannot be paged further.
            next: out
                .next_continuation_token()
                .filter(|_| truncated)
                .map(String::from),
        })
    }

    /// A small object's ETag and bytes (at most `limit`), `None` if it does not exist (403 reads
    /// as absent, as for a probe): the doorbell.
    pub async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        self.attempts(S3Op::Get, || async {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    return if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                        || status.is_some_and(absent_status)
                    {
                        Ok(None)
                    } else {
                        Err(request_error(S3Op::Get, key, e))
                    };
                }
            };
            let etag = out.e_tag().unwrap_or_default().to_string();
            let body = tokio::time::timeout(self.body_timeout, out.body.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.into_bytes())
                .ok_or_else(|| S3Error::Request {
                    op: "get",
                    key: key.to_string(),
                    message: "reading the body failed or stalled".into(),
                    code: None,
                    status: None,
                    retryable: true,
                })?;
            if body.len() > limit {
                return Err(S3Error::TooLarge {
                    key: key.to_string(),
                    size: body.len() as u64,
                    limit,
                });
            }
            Ok(Some((etag, body)))
        })
        .await
    }

    /// The object's ETag, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        self.attempts(S3Op::Head, || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out.e_tag().unwrap_or_default().to_string())),
                Err(e) => {
                    let missing = e.as_service_error().is_some_and(|s| s.is_not_found())
                        || e.raw_response()
                            .is_some_and(|r| absent_status(r.status().as_u16()));
                    if missing {
                        Ok(None)
                    } else {
                        Err(request_error(S3Op::Head, key, e))
                    }
                }
            }
        })
        .await
    }

    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.attempts(S3Op::Delete, || async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| request_error(S3Op::Delete, key, e))
        })
        .await
    }

    /// Deletes up to `MAX_DELETE_BATCH` keys with one DeleteObjects request, then each key the
    /// batch could not delete with its own DELETE; returns the keys still not deleted (quiet mode
    /// lists only failures).
    pub async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let invalid = |message: String| S3Error::Request {
            op: S3Op::DeleteObjects.as_str(),
            key: first.to_string(),
            message,
            code: None,
            status: None,
            retryable: false,
        };
        let ids = keys
            .iter()
            .take(MAX_DELETE_BATCH)
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        let delete = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let batch = &keys[..keys.len().min(MAX_DELETE_BATCH)];
        let result = self
            .attempts(S3Op::DeleteObjects, || {
                let delete = delete.clone();
                async move {
                    self.client
                        .delete_objects()
                        .bucket(&self.bucket)
                        .delete(delete)
                        .send()
                        .await
                        .map_err(|e| request_error(S3Op::DeleteObjects, first, e))
                }
            })
            .await;
        // A key a batch could not delete may still be deletable alone: moto (and a policy
        // that grants s3:DeleteObject on the inbox's objects but nothing on the bucket ARN)
        // refuses DeleteObjects where DELETE is allowed. Without this fallback such keys stay
        // in the inbox for good, re-listed and re-batched forever.
        let refused: Vec<String> = match result {
            Ok(out) => out
                .errors()
                .iter()
                .filter_map(|e| e.key().map(String::from))
                .collect(),
            Err(e) if e.code() == Some("AccessDenied") => batch.to_vec(),
            Err(e) => return Err(e),
        };
        let mut left = Vec::new();
        for key in refused {
            if self.delete(&key).await.is_err() {
                left.push(key);
            }
        }
        Ok(left)
    }
}

/// DeleteObjects takes at most this many keys.
pub const MAX_DELETE_BATCH: usize = 1000;

impl crate::store::Store for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        S3Store::put(self, key, body).await
    }

    async fn get(&self, key: &str, limit: usize, lookup: Lookup) -> Result<Option<Bytes>, S3Error> {
        S3Store::get(self, key, limit, lookup).await
    }

    async fn get_tagged(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Option<(String, Bytes)>, S3Error> {
        S3Store::get_tagged(self, key, limit).await
    }

    async fn head(&self, key: &str) -> Result<Option<String>, S3Error> {
        S3Store::head(self, key).await
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<Listing, S3Error> {
        S3Store::list(self, prefix, continuation).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, S3Error> {
        S3Store::delete_many(self, keys).await
    }
}
