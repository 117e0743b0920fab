//! The agent's own connection to the server (I/O): a fresh TCP connection per request from the
//! host's address, marked with `--reinject-mark` so the classifier passes it, carrying only the
//! rebuilt request; the whole response is read (bounded) and parsed strictly.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::response::{
    MAX_RESPONSE_BODY, MAX_RESPONSE_HEAD, RelayedResponse, ResponseError, parse_response,
};

/// Limit on connecting, sending and reading the whole response.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not be asked or its answer relayed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {server} failed: {source}")]
    Connect {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("exchanging with {server} failed: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{server} did not answer within {FETCH_TIMEOUT:?}")]
    Timeout { server: SocketAddr },
    #[error("{server}: {source}")]
    Response {
        server: SocketAddr,
        #[source]
        source: ResponseError,
    },
}

/// Sends `request` to `server` over a new connection marked `mark` (0: unmarked, for tests
/// without a classifier) and returns the response.
pub async fn fetch(
    server: SocketAddr,
    mark: u32,
    request: Vec<u8>,
    head_request: bool,
) -> Result<RelayedResponse, UpstreamError> {
    match tokio::time::timeout(FETCH_TIMEOUT, exchange(server, mark, request)).await {
        Err(_) => Err(UpstreamError::Timeout { server }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(bytes)) => parse_response(&bytes, head_request)
            .map_err(|source| UpstreamError::Response { server, source }),
    }
}

async fn exchange(
    server: SocketAddr,
    mark: u32,
    request: Vec<u8>,
) -> Result<Vec<u8>, UpstreamError> {
    let connect = |source| UpstreamError::Connect { server, source };
    let socket = Socket::new(
        Domain::for_address(server),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(connect)?;
    // The mark makes the classifier pass this connection (CAP_NET_ADMIN, as for reinjection).
    if mark != 0 {
        socket.set_mark(mark).map_err(connect)?;
    }
    socket.set_nonblocking(true).map_err(connect)?;
    socket.set_tcp_nodelay(true).map_err(connect)?;
    match socket.connect(&SockAddr::from(server)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(connect(e)),
    }
    let std_stream: std::net::TcpStream = socket.into();
    let mut stream = tokio::net::TcpStream::from_std(std_stream).map_err(connect)?;
    stream.writable().await.map_err(connect)?;
    if let Some(e) = stream.take_error().map_err(connect)? {
        return Err(connect(e));
    }
    let io = |source| UpstreamError::Io { server, source };
    stream.write_all(&request).await.map_err(io)?;
    let limit = MAX_RESPONSE_HEAD + MAX_RESPONSE_BODY;
    let mut bytes = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&chunk[..n]);
        if bytes.len() > limit {
            return Err(UpstreamError::Response {
                server,
                source: ResponseError::BodyTooLarge,
            });
        }
    }
}
