//! Interface configuration over rtnetlink: the node address (NODAD, so it is usable at once),
//! MTU, link up, and the route of the network /64 to the TUN; and their removal. Kernel state
//! that is not ours stays: a route to the /64 that already exists is neither replaced nor
//! removed, and a clsact qdisc is removed only by the one who added it.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressHeaderFlags;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::node_addr::NetworkPrefix;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error(
        "{step} on `{link}` was refused by the kernel: the agent needs CAP_NET_ADMIN (run as root or grant it)"
    )]
    PermissionDenied { step: &'static str, link: String },
    #[error("{step} on `{link}` failed: {source}")]
    Request {
        step: &'static str,
        link: String,
        source: rtnetlink::Error,
    },
    #[error("interface `{0}` not found")]
    NoLink(String),
}

fn classify(step: &'static str, link: &str, source: rtnetlink::Error) -> NetlinkError {
    if let rtnetlink::Error::NetlinkError(m) = &source
        && matches!(-m.raw_code(), libc::EPERM | libc::EACCES)
    {
        return NetlinkError::PermissionDenied {
            step,
            link: link.to_string(),
        };
    }
    NetlinkError::Request {
        step,
        link: link.to_string(),
        source,
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if -m.raw_code() == errno)
}

/// What was configured, so exactly that can be removed.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub link: String,
    pub ifindex: u32,
    pub addr: Ipv6Addr,
    pub prefix: NetworkPrefix,
    pub mtu: u32,
}

/// The TUN's transmit queue, in packets. The kernel default (500) overflows silently when an
/// application bursts faster than one S3 round trip lets the agent drain it (a 1,000-datagram UDP
/// burst lost its second half); the agent's own egress buffer is the real bound and counts drops.
pub const TX_QUEUE_LEN: u32 = 10_000;

pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    /// Whether `configure` added the /64 route (only then does `remove` delete it).
    route_ours: AtomicBool,
}

impl Netlink {
    /// Opens a netlink connection driven by a background task (inside a tokio runtime).
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        let task = tokio::spawn(conn);
        Ok(Netlink {
            handle,
            task,
            route_ours: AtomicBool::new(false),
        })
    }

    /// MTU, address with NODAD (a TUN has no neighbours to collide with, and DAD would delay the
    /// first packet by a second), link up, then the /64 route, created exclusively: if a route
    /// to the /64 exists already (an administrator's), it is kept and logged, not replaced.
    pub async fn configure(&self, c: &LinkConfig) -> Result<(), NetlinkError> {
        let link = c.link.as_str();
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(c.ifindex)
                    .mtu(c.mtu)
                    .txqueuelen(TX_QUEUE_LEN)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| classify("setting the MTU and queue length", link, e))?;
        let mut add = self
            .handle
            .address()
            .add(c.ifindex, IpAddr::V6(c.addr), 128);
        add.message_mut().header.flags = AddressHeaderFlags::Nodad;
        add.replace()
            .execute()
            .await
            .map_err(|e| classify("adding the node address", link, e))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(c.ifindex).up().build())
            .execute()
            .await
            .map_err(|e| classify("bringing the link up", link, e))?;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(c.prefix.network(), 64)
            .output_interface(c.ifindex)
            .build();
        // No `replace()`: NLM_F_EXCL, so an existing route of the same metric is an EEXIST.
        match self.handle.route().add(route).execute().await {
            Ok(()) => {
                self.route_ours.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) if is_errno(&e, libc::EEXIST) => {
                tracing::warn!(
                    prefix = %c.prefix,
                    tun = link,
                    "a route to the network /64 exists already; keeping it (the agent adds none and removes none)"
                );
                Ok(())
            }
            Err(e) => Err(classify("routing the network /64", link, e)),
        }
    }

    /// Whether `configure` added the /64 route itself.
    pub fn route_is_ours(&self) -> bool {
        self.route_ours.load(Ordering::SeqCst)
    }

    /// Sets a link's transmit queue length (packets).
    pub async fn set_tx_queue_len(
        &self,
        link: &str,
        ifindex: u32,
        len: u32,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).txqueuelen(len).build())
            .execute()
            .await
            .map_err(|e| classify("setting the queue length", link, e))
    }

    /// Removes the clsact qdisc of `ifindex` (with every filter in it); call only for a qdisc
    /// this process added. A qdisc already gone is fine.
    pub async fn remove_clsact(&self, link: &str, ifindex: u32) -> Result<(), NetlinkError> {
        let index = i32::try_from(ifindex).map_err(|_| NetlinkError::NoLink(link.to_string()))?;
        let mut del = self.handle.qdisc().del(index);
        let header = &mut del.message_mut().header;
        header.parent = rtnetlink::packet_route::tc::TcHandle::CLSACT;
        header.handle = rtnetlink::packet_route::tc::TcHandle {
            major: 0xffff,
            minor: 0,
        };
        match del.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) || is_errno(&e, libc::EINVAL) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(classify("removing the clsact qdisc", link, e)),
        }
    }

    /// Removes the route, the address and the link. Each step is attempted even if an earlier
    /// one failed (the link may already be gone, taking the others with it); the first real
    /// failure is returned.
    pub async fn remove(&self, c: &LinkConfig) -> Result<(), NetlinkError> {
        let link = c.link.as_str();
        let mut first: Option<NetlinkError> = None;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(c.prefix.network(), 64)
            .output_interface(c.ifindex)
            .build();
        // Only the route we added: an administrator's route to the /64 stays.
        if self.route_ours.swap(false, Ordering::SeqCst)
            && let Err(e) = self.handle.route().del(route).execute().await
            && !is_errno(&e, libc::ESRCH)
            && !is_errno(&e, libc::ENODEV)
        {
            first.get_or_insert(classify("removing the route", link, e));
        }
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(c.ifindex)
            .set_address_filter(IpAddr::V6(c.addr))
            .execute();
        loop {
            match addrs.try_next().await {
                Ok(Some(msg)) => {
                    if let Err(e) = self.handle.address().del(msg).execute().await
                        && !is_errno(&e, libc::EADDRNOTAVAIL)
                        && !is_errno(&e, libc::ENODEV)
                    {
                        first.get_or_insert(classify("removing the address", link, e));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if !is_errno(&e, libc::ENODEV) {
                        first.get_or_insert(classify("listing addresses", link, e));
                    }
                    break;
                }
            }
        }
        if let Err(e) = self.handle.link().del(c.ifindex).execute().await
            && !is_errno(&e, libc::ENODEV)
        {
            first.get_or_insert(classify("deleting the link", link, e));
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The index of interface `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(classify("looking up the link", name, e)),
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
