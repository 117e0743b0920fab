//! The divert TUN (where the classifier redirects `divert` packets, and where resets for the
//! local client are written) and the raw sockets that reinject allowed packets.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Why the divert device or the reinjection sockets failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create divert TUN `{name}` (needs CAP_NET_ADMIN and /dev/net/tun): {source}")]
    CreateTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("divert TUN `{name}` has no interface index: {source}")]
    Ifindex {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set {path} to {value}: {source}")]
    Sysctl {
        path: String,
        value: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot open raw {family} socket for reinjection (needs CAP_NET_RAW): {source}")]
    RawSocket {
        family: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot set SO_MARK {mark:#x} on the reinjection socket (needs CAP_NET_ADMIN): {source}"
    )]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("packet of {len} bytes is not IPv4 or IPv6")]
    NotIp { len: usize },
    #[error("reinjecting {len} bytes to {dst} failed: {source}")]
    Send {
        dst: IpAddr,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// The divert TUN: IP packets without a packet-information header.
pub struct DivertTun {
    device: tun_rs::AsyncDevice,
    name: String,
    ifindex: u32,
}

impl DivertTun {
    /// Creates the TUN, brings it up and sets the sysctls that let resets written into it reach
    /// the local client: reverse-path filtering off (the server's address routes out of the
    /// real interface, not this one) and local sources accepted. Only this device's settings
    /// change.
    pub fn create(name: &str) -> Result<Self, DeviceError> {
        let create = |source| DeviceError::CreateTun {
            name: name.to_string(),
            source,
        };
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(65535)
            .enable(true)
            .build_async()
            .map_err(create)?;
        let name = device.name().map_err(create)?;
        let ifindex = device.if_index().map_err(|source| DeviceError::Ifindex {
            name: name.clone(),
            source,
        })?;
        for (path, value) in [
            (format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0"),
            (format!("/proc/sys/net/ipv4/conf/{name}/accept_local"), "1"),
            (format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "0"),
        ] {
            std::fs::write(&path, value).map_err(|source| DeviceError::Sysctl {
                path: path.clone(),
                value,
                source,
            })?;
        }
        Ok(Self {
            device,
            name,
            ifindex,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Reads one diverted packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.recv(buf).await
    }

    /// Delivers a packet to the local stack as if it arrived on this device.
    pub async fn deliver(&self, packet: &[u8]) -> io::Result<usize> {
        self.device.send(packet).await
    }
}

/// Raw IPv4/IPv6 sockets that send complete IP packets (header included) carrying the
/// reinject mark, so the classifier lets them pass and nothing loops.
pub struct Reinjector {
    v4: Socket,
    v6: Socket,
}

impl Reinjector {
    pub fn new(mark: u32) -> Result<Self, DeviceError> {
        let open = |domain, family| {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .map_err(|source| DeviceError::RawSocket { family, source })?;
            socket
                .set_mark(mark)
                .map_err(|source| DeviceError::Mark { mark, source })?;
            socket
                .set_nonblocking(true)
                .map_err(|source| DeviceError::RawSocket { family, source })?;
            Ok::<_, DeviceError>(socket)
        };
        let v4 = open(Domain::IPV4, "IPv4")?;
        // IPPROTO_RAW implies IP_HDRINCL for IPv4; IPv6 needs it said.
        v4.set_header_included_v4(true)
            .map_err(|source| DeviceError::RawSocket {
                family: "IPv4",
                source,
            })?;
        let v6 = open(Domain::IPV6, "IPv6")?;
        v6.set_header_included_v6(true)
            .map_err(|source| DeviceError::RawSocket {
                family: "IPv6",
                source,
            })?;
        Ok(Self { v4, v6 })
    }

    /// Sends `packet` (a complete IP packet) towards its destination address.
    pub fn send(&self, packet: &[u8]) -> Result<(), DeviceError> {
        let not_ip = || DeviceError::NotIp { len: packet.len() };
        let version = packet.first().map(|b| b >> 4).ok_or_else(not_ip)?;
        let (socket, dst) = match version {
            4 => {
                let b: [u8; 4] = packet
                    .get(16..20)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(not_ip)?;
                (&self.v4, IpAddr::from(b))
            }
            6 => {
                let b: [u8; 16] = packet
                    .get(24..40)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(not_ip)?;
                (&self.v6, IpAddr::from(b))
            }
            _ => return Err(not_ip()),
        };
        socket
            .send_to(packet, &SockAddr::from(SocketAddr::new(dst, 0)))
            .map(|_| ())
            .map_err(|source| DeviceError::Send {
                dst,
                len: packet.len(),
                source,
            })
    }
}
