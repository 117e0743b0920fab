//! The name responder's socket: UDP on the tunnel address, port 53 by default. Each datagram is
//! answered from the latest directory copy (`directory::refresh`); a miss asks for an early
//! re-read. Answers are a few dozen bytes, so UDP alone serves them (no TCP fallback needed).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};

use crate::directory::name::DnsDomain;
use crate::directory::table::Directory;

use super::answer::{Outcome, respond};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot listen for DNS on {addr}: {reason} (port 53 needs CAP_NET_BIND_SERVICE; or set --dns false)"
    )]
    Bind { addr: SocketAddr, reason: String },
}

pub async fn bind(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    UdpSocket::bind(addr).await.map_err(|e| DnsError::Bind {
        addr,
        reason: e.to_string(),
    })
}

pub struct Responder {
    pub socket: UdpSocket,
    pub domain: DnsDomain,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub wanted: Arc<Notify>,
}

impl Responder {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // The largest UDP DNS message (EDNS); classic queries are under 512 bytes.
        let mut buf = vec![0u8; 4096];
        loop {
            let (len, peer) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("DNS receive failed: {e}");
                        continue;
                    }
                },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let directory = self.directory.borrow().clone();
            let Some((answer, outcome)) = respond(&buf[..len], &directory, &self.domain) else {
                tracing::debug!(%peer, len, "DNS datagram dropped: not a query");
                continue;
            };
            if outcome == Outcome::NxDomain {
                self.wanted.notify_one();
            }
            tracing::debug!(%peer, ?outcome, "DNS query answered");
            if let Err(e) = self.socket.send_to(&answer, peer).await {
                tracing::debug!(%peer, "DNS answer not sent: {e}");
            }
        }
    }
}
