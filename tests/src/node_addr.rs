//! The node address the agent must derive (DESIGN.md "Node address"), computed independently
//! here so the tests check the agent rather than trust it.

use std::net::Ipv6Addr;

/// `fd68:6f73:6869:6e6f::/64`, the bytes of "hoshino".
pub const DEFAULT_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd68, 0x6f73, 0x6869, 0x6e6f, 0, 0, 0, 0);

#[derive(Debug, thiserror::Error)]
#[error("machine-id {0:?} is not 32 hex digits with a non-zero first half")]
pub struct MachineIdError(String);

/// The 16-hex-digit node id: the first half of a machine-id.
pub fn node_id(machine_id: &str) -> Result<String, MachineIdError> {
    let id = machine_id.trim_end_matches('\n');
    let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let half = id.get(..16).filter(|_| valid);
    match half {
        Some(h) if u64::from_str_radix(h, 16).is_ok_and(|v| v != 0) => Ok(h.to_ascii_lowercase()),
        _ => Err(MachineIdError(machine_id.to_owned())),
    }
}

/// Prefix (upper 64 bits) + node id (lower 64 bits).
pub fn node_address(prefix: Ipv6Addr, machine_id: &str) -> Result<Ipv6Addr, MachineIdError> {
    let id = node_id(machine_id)?;
    let iid = u64::from_str_radix(&id, 16).map_err(|_| MachineIdError(machine_id.to_owned()))?;
    let upper = u128::from(prefix) & !u128::from(u64::MAX);
    Ok(Ipv6Addr::from(upper | u128::from(iid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_is_prefix_plus_first_half_of_machine_id() {
        let addr = node_address(DEFAULT_PREFIX, "0123456789abcdef0000000000000000\n").ok();
        assert_eq!(
            addr,
            Some("fd68:6f73:6869:6e6f:123:4567:89ab:cdef".parse().unwrap())
        );
    }

    #[test]
    fn zero_identifier_is_rejected() {
        assert!(node_address(DEFAULT_PREFIX, "00000000000000001111111111111111").is_err());
    }
}
