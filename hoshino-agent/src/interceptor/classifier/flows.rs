//! The flow map the classifier records divert flows in: reading entries, and handles of its own
//! for the sweep and the divert proxy.

use std::net::IpAddr;

use aya::maps::{HashMap, Map, MapError};
use hoshino_common::{FAMILY_V4, FAMILY_V6, FlowKey, FlowValue};

use super::{Classifier, InterceptorError, MAP_FLOWS, MAP_UID_FLOWS, map_err};
use crate::interceptor::flow_table::FlowTable;

impl Classifier {
    /// Every flow the classifier recorded for `tunnel`/`divert` verdicts.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, InterceptorError> {
        let flows: HashMap<_, FlowKey, FlowValue> = self.map(MAP_FLOWS)?;
        flows
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_FLOWS))
    }

    /// The recorded flow with this 5-tuple (see [`flow_key`]), if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, InterceptorError> {
        let flows: HashMap<_, FlowKey, FlowValue> = self.map(MAP_FLOWS)?;
        match flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_FLOWS)(e)),
        }
    }

    /// An independent handle on the flow map (for the sweep, and removal by the divert proxy)
    /// that does not borrow the classifier.
    pub fn flow_table(&self) -> Result<FlowTable, InterceptorError> {
        FlowTable::from_fds(
            self.hash_map_fd(MAP_FLOWS)?,
            self.hash_map_fd(MAP_UID_FLOWS)?,
        )
    }

    /// A duplicate of a map's descriptor: opening it again by id (BPF_MAP_GET_FD_BY_ID) would
    /// need CAP_SYS_ADMIN, which the systemd unit does not grant.
    fn hash_map_fd(&self, name: &'static str) -> Result<std::os::fd::OwnedFd, InterceptorError> {
        use std::os::fd::AsFd;
        match self.ebpf.map(name) {
            Some(Map::HashMap(data)) => {
                data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
                    map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    }))
                })
            }
            Some(_) => Err(map_err(name)(MapError::InvalidMapType { map_type: 0 })),
            None => Err(InterceptorError::MissingMap(name)),
        }
    }
}

/// The flow map key for a 5-tuple as the classifier sees it leaving the interface.
pub fn flow_key(src: IpAddr, dst: IpAddr, proto: u8, src_port: u16, dst_port: u16) -> FlowKey {
    let mut key = FlowKey {
        src_port,
        dst_port,
        proto,
        ..FlowKey::default()
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            key.family = FAMILY_V4;
            key.src[..4].copy_from_slice(&s.octets());
            key.dst[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            key.family = FAMILY_V6;
            key.src = to_v6_octets(s);
            key.dst = to_v6_octets(d);
        }
    }
    key
}

fn to_v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}
