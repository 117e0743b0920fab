//! TUN creation with tun-rs. Addresses, MTU, link state and routes are `netlink.rs`'s job, so
//! tun-rs is only asked for a plain layer-3 device without packet information.

use std::io;
use std::sync::Arc;

use tun_rs::{AsyncDevice, DeviceBuilder};

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(
        "creating TUN device `{name}` was refused: the agent needs CAP_NET_ADMIN (run as root or grant it, e.g. AmbientCapabilities=CAP_NET_ADMIN)"
    )]
    PermissionDenied { name: String },
    #[error("creating TUN device `{name}` failed: {source} (is /dev/net/tun present?)")]
    Create { name: String, source: io::Error },
    #[error("TUN device `{name}`: cannot read its interface index: {source}")]
    Index { name: String, source: io::Error },
    #[error("TUN name `{0}` is invalid: 1 to 15 characters, no '/' or whitespace")]
    BadName(String),
}

/// An open TUN device; the kernel removes the interface when the last handle closes.
#[derive(Clone)]
pub struct TunDevice {
    pub device: Arc<AsyncDevice>,
    pub name: String,
    pub ifindex: u32,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TunDevice({} #{})", self.name, self.ifindex)
    }
}

pub fn valid_tun_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Creates the TUN named `name` (must run inside a tokio runtime).
pub fn create(name: &str) -> Result<TunDevice, TunError> {
    if !valid_tun_name(name) {
        return Err(TunError::BadName(name.to_string()));
    }
    let device = DeviceBuilder::new()
        .name(name)
        .packet_information(false)
        .inherit_enable_state()
        .build_async()
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TunError::PermissionDenied {
                name: name.to_string(),
            },
            _ => TunError::Create {
                name: name.to_string(),
                source,
            },
        })?;
    let ifindex = device.if_index().map_err(|source| TunError::Index {
        name: name.to_string(),
        source,
    })?;
    Ok(TunDevice {
        device: Arc::new(device),
        name: name.to_string(),
        ifindex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_names_follow_kernel_rules() {
        assert!(valid_tun_name("hoshino0"));
        assert!(!valid_tun_name(""));
        assert!(!valid_tun_name("a/b"));
        assert!(!valid_tun_name("sixteen-chars-xx"));
        assert!(!valid_tun_name("a b"));
    }
}
