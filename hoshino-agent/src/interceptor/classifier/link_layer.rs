//! Whether an interface carries Ethernet headers (TC then sees packets from their MAC header),
//! asked over rtnetlink: a link get returns the link-layer type (`ARPHRD_*`).

use std::io;

use futures::TryStreamExt;
use netlink_packet_route::link::LinkLayerType;

use super::InterceptorError;

/// True for Ethernet and loopback links (loopback frames carry an all-zero Ethernet header);
/// false for L3 devices such as TUN, WireGuard or GRE.
pub(super) fn has_ethernet_header(interface: &str) -> Result<bool, InterceptorError> {
    let layer = link_layer(interface)?;
    Ok(matches!(
        layer,
        LinkLayerType::Ether | LinkLayerType::Loopback
    ))
}

/// The link-layer type of `interface` in the calling thread's network namespace.
///
/// rtnetlink is async, while attaching is a plain call made both from the agent's runtime and
/// from threads without one (tests that `setns` into a namespace). A scoped thread with its own
/// current-thread runtime serves both without blocking a runtime worker, and it is in the
/// caller's network namespace: a new thread starts in the namespace of the thread creating it.
fn link_layer(interface: &str) -> Result<LinkLayerType, InterceptorError> {
    let failed = |source: io::Error| InterceptorError::NoInterface {
        interface: interface.to_owned(),
        source,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(failed)?;
                runtime.block_on(query(interface))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(failed(io::Error::other(
                    "the rtnetlink query thread panicked",
                )))
            })
    })
}

async fn query(interface: &str) -> Result<LinkLayerType, InterceptorError> {
    let failed = |source: io::Error| InterceptorError::NoInterface {
        interface: interface.to_owned(),
        source,
    };
    let (connection, handle, _) = rtnetlink::new_connection().map_err(failed)?;
    let driver = tokio::spawn(connection);
    let found = handle
        .link()
        .get()
        .match_name(interface.to_owned())
        .execute()
        .try_next()
        .await;
    driver.abort();
    match found {
        Ok(Some(link)) => Ok(link.header.link_layer_type),
        Ok(None) => Err(failed(io::Error::from_raw_os_error(libc::ENODEV))),
        Err(rtnetlink::Error::NetlinkError(message)) => Err(failed(io::Error::from_raw_os_error(
            message.raw_code().saturating_neg(),
        ))),
        Err(other) => Err(failed(io::Error::other(other.to_string()))),
    }
}
