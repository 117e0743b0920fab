//! The in-process S3 server behind `hoshino-s3-server`: s3s-fs over HTTP/1.1 with static
//! credentials, and a fault injector that answers a fraction of requests with `503 SlowDown`
//! so the agent's retries are exercised against a real HTTP server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
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
    #[error("fault fraction must be within 0..=1, got {0}")]
    FaultFraction(f64),
}

/// Decides which requests fail. Deterministic for a seed: request `n` fails when
/// `splitmix64(seed + n)` falls below `fraction` of the u64 range.
#[derive(Debug)]
pub struct FaultInjector {
    threshold: u64,
    seed: u64,
    next: AtomicU64,
    injected: AtomicU64,
}

impl FaultInjector {
    pub fn new(fraction: f64, seed: u64) -> Result<Self, S3ServerError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(S3ServerError::FaultFraction(fraction));
        }
        // Saturating float-to-int conversion: 1.0 maps to u64::MAX.
        let threshold = (fraction * u64::MAX as f64) as u64;
        Ok(Self {
            threshold,
            seed,
            next: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        })
    }

    pub fn should_fail(&self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let fail = splitmix64(self.seed.wrapping_add(n)) < self.threshold;
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    pub fault_fraction: f64,
    pub fault_seed: u64,
}

#[derive(Clone)]
struct FaultyService {
    inner: S3Service,
    faults: Arc<FaultInjector>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for FaultyService {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = ResponseFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        if self.faults.should_fail() {
            let resource = req.uri().path().to_owned();
            return Box::pin(async move { Ok(slow_down(&resource)) });
        }
        hyper::service::Service::call(&self.inner, req)
    }
}

fn slow_down(resource: &str) -> HttpResponse {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
         <Message>Please reduce your request rate. (injected by hoshino-s3-server)</Message>\
         <Resource>{resource}</Resource><RequestId>hoshino-fault</RequestId></Error>"
    );
    let mut resp = HttpResponse::new(Body::from(body));
    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    resp
}

/// A bound server; `local_addr` is known before serving so the caller can announce it.
pub struct BoundServer {
    listener: TcpListener,
    service: FaultyService,
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
        let faults = Arc::new(FaultInjector::new(
            config.fault_fraction,
            config.fault_seed,
        )?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| S3ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            service: FaultyService {
                inner: builder.build(),
                faults,
            },
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
            let conn = http
                .serve_connection(TokioIo::new(socket), self.service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }

    pub fn injected_faults(&self) -> Arc<FaultInjector> {
        Arc::clone(&self.service.faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_fraction_zero_never_fails() {
        let f = FaultInjector::new(0.0, 1).ok();
        assert!(f.is_some_and(|f| (0..10_000).all(|_| !f.should_fail())));
    }

    #[test]
    fn fault_fraction_is_roughly_honoured() {
        let Ok(f) = FaultInjector::new(0.2, 7) else {
            panic!("0.2 is a valid fraction");
        };
        let failed = (0..10_000).filter(|_| f.should_fail()).count();
        assert!((1_500..2_500).contains(&failed), "{failed} of 10000 failed");
        assert_eq!(f.injected(), failed as u64);
    }

    #[test]
    fn fault_fraction_out_of_range_is_rejected() {
        assert!(FaultInjector::new(1.5, 0).is_err());
    }
}
