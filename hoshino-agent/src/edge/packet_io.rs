//! The TUN side of the tunnel as a small trait, so egress and ingress run over the kernel's
//! TUN (`tun_rs::AsyncDevice`) or over channels (`ChannelTun`, the simulation's TUN).

use std::future::Future;
use std::io;

use tokio::sync::{Mutex, mpsc};
use tun_rs::AsyncDevice;

/// Reads packets the host sends into the tunnel, writes packets the tunnel delivers.
pub trait PacketIo: Send + Sync + 'static {
    /// Waits for the next packet; returns its length in `buf`.
    fn recv<'a>(&'a self, buf: &'a mut [u8])
    -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// The next packet if one is ready now (`WouldBlock` otherwise).
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Hands one packet to the host.
    fn send<'a>(&'a self, packet: &'a [u8]) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl PacketIo for AsyncDevice {
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        AsyncDevice::recv(self, buf)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        AsyncDevice::try_recv(self, buf)
    }

    fn send<'a>(&'a self, packet: &'a [u8]) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        AsyncDevice::send(self, packet)
    }
}

/// A TUN made of two channels: what the host "sends" arrives on `recv`, what the tunnel
/// delivers goes out to `delivered`.
pub struct ChannelTun {
    from_host: Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    to_host: mpsc::UnboundedSender<Vec<u8>>,
}

/// The host's ends of a `ChannelTun`.
pub struct HostEnds {
    pub send: mpsc::UnboundedSender<Vec<u8>>,
    pub delivered: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl ChannelTun {
    pub fn new() -> (ChannelTun, HostEnds) {
        let (send, from_host) = mpsc::unbounded_channel();
        let (to_host, delivered) = mpsc::unbounded_channel();
        (
            ChannelTun {
                from_host: Mutex::new(from_host),
                to_host,
            },
            HostEnds { send, delivered },
        )
    }
}

fn copy_into(packet: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let dst = buf
        .get_mut(..packet.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "packet larger than buffer"))?;
    dst.copy_from_slice(packet);
    Ok(packet.len())
}

impl PacketIo for ChannelTun {
    async fn recv<'a>(&'a self, buf: &'a mut [u8]) -> io::Result<usize> {
        let packet = self.from_host.lock().await.recv().await;
        match packet {
            Some(p) => copy_into(&p, buf),
            // The host hung up: no more packets, ever (as a TUN that is gone).
            None => std::future::pending().await,
        }
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self
            .from_host
            .try_lock()
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        match rx.try_recv() {
            Ok(p) => copy_into(&p, buf),
            Err(_) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
        }
    }

    async fn send<'a>(&'a self, packet: &'a [u8]) -> io::Result<usize> {
        self.to_host
            .send(packet.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(packet.len())
    }
}
