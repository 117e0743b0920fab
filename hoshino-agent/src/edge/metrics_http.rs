//! A tiny HTTP/1.1 server answering `GET /metrics` with the Prometheus text format.
//! One request per connection; requests are bounded in size and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Serves until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics)).await;
        });
    }
}

/// The response for a request head (pure, so it is testable without sockets).
pub fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    let (status, ctype, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (Some("GET"), Some("/")) => (
            "200 OK",
            "text/plain; charset=utf-8",
            "hoshino-agent: see /metrics\n".to_string(),
        ),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].contains(&b'\n') {
            break;
        }
    }
    let reply = respond(&buf[..n], metrics);
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_metrics_returns_prometheus_text() {
        let m = Metrics::default();
        let r =
            String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("hoshino_egress_packets_total 0"));
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let m = Metrics::default();
        assert!(respond(b"GET /nope HTTP/1.1\r\n\r\n", &m).starts_with(b"HTTP/1.1 404"));
        assert!(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m).starts_with(b"HTTP/1.1 405"));
        assert!(respond(b"\xff\xfe", &m).starts_with(b"HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn serves_over_tcp_on_loopback() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(Metrics::default())));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("# TYPE hoshino_s3_requests_total counter"));
        task.abort();
    }
}
