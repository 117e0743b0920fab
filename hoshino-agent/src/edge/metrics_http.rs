//! The `/metrics` listener: hyper HTTP/1.1, one request per connection, Prometheus text format.
//!
//! Bounded so that the listener can never take the descriptors the S3 client needs: at most
//! [`MAX_CONNECTIONS`] connections are open at once, each must send its request head within
//! [`HEADER_READ_TIMEOUT`] and is done within [`CONNECTION_TIMEOUT`]. When all slots are taken a
//! new connection displaces the oldest one instead of waiting: ten thousand idle connections
//! cost at most `MAX_CONNECTIONS` descriptors, and a scraper that connects now is served now (a
//! real scrape takes milliseconds, so it is rarely the oldest).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::metrics::Metrics;
use crate::supervisor::LoopFault;

/// Connections open at once; beyond it the oldest is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request head within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of a connection, answer included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive accept errors (e.g. EMFILE) after which the listener counts as failed.
const MAX_ACCEPT_ERRORS: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum MetricsHttpError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr`; the returned listener is served by `serve`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsHttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsHttpError::Bind { addr, source })
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: VecDeque<(u64, AbortHandle)>,
}

impl Slots {
    /// Makes room for one more connection: aborts the oldest while full.
    fn make_room(&mut self, max: usize) {
        while self.open.len() >= max {
            match self.open.pop_front() {
                Some((_, oldest)) => oldest.abort(),
                None => break,
            }
        }
    }

    fn remove(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

/// Removes a connection's slot when its task ends, however it ends.
struct SlotGuard {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        lock(&self.slots).remove(self.id);
    }
}

fn lock(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves until `shutdown` turns true. Fails (for the supervisor) only if accepting keeps
/// failing: a listener that cannot accept is a dead metrics endpoint.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LoopFault> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut errors = 0u32;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                errors = 0;
                stream
            }
            Err(source) => {
                errors += 1;
                if errors >= MAX_ACCEPT_ERRORS {
                    return Err(LoopFault::MetricsListener { addr, source });
                }
                tracing::debug!(error = %source, "accepting a metrics connection");
                // EMFILE and friends: the queue does not shrink by retrying at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Held until the task's handle is recorded, so a connection that ends at once cannot
        // remove its slot before it is there.
        let mut open = lock(&slots);
        open.make_room(MAX_CONNECTIONS);
        open.next_id += 1;
        let id = open.next_id;
        let guard = SlotGuard {
            slots: slots.clone(),
            id,
        };
        let metrics = metrics.clone();
        let handle = connections.spawn(async move {
            let _guard = guard;
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection timed out"),
            }
        });
        open.open.push_back((id, handle));
        drop(open);
    }
    connections.abort_all();
    Ok(())
}

/// The answer to a request (pure, so it is testable without sockets).
pub fn respond<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "hoshino-agent: see /metrics\n".to_string(),
        ),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[test]
    fn get_metrics_returns_prometheus_text() {
        let m = Metrics::default();
        let r = respond(&get("/metrics"), &m);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[hyper::header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let m = Metrics::default();
        assert_eq!(respond(&get("/nope"), &m).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/metrics").body(()).expect("request");
        assert_eq!(respond(&post, &m).status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    async fn scrape(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("answer");
        body
    }

    #[tokio::test]
    async fn serves_over_tcp_on_loopback() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(Metrics::default()), stopped));
        let body = scrape(addr).await;
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
        assert!(body.contains("# TYPE hoshino_s3_requests_total counter"));
        stop.send(true).unwrap();
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_bound_do_not_keep_a_scraper_out() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Metrics::default()), stopped));
        let mut idle = Vec::new();
        for _ in 0..(MAX_CONNECTIONS * 4) {
            idle.push(TcpStream::connect(addr).await.expect("idle connect"));
        }
        let body = tokio::time::timeout(Duration::from_secs(2), scrape(addr))
            .await
            .expect("answered before any idle connection timed out");
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
        // The oldest idle connections were closed to make room.
        let mut first = idle.remove(0);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), first.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the oldest idle connection was closed: {read:?}"
        );
    }
}
