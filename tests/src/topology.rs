//! The testbed network: a hub namespace with a bridge (`10.231.0.1/24`, `fd00:231::1/64`) where
//! the S3 server runs, and node namespaces attached to it by veth pairs (`10.231.0.1x/24`,
//! `fd00:231::1x/64`). Each node has its own machine-id file, so its own Hoshino address.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::netns::{Namespace, NetnsError};
use crate::node_addr::{self, MachineIdError};
use crate::scratch::{ScratchDir, ScratchError};

pub const HUB_IPV4: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
pub const HUB_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 0, 0, 0, 0, 0, 1);
const BRIDGE: &str = "br0";
/// Node indexes are 1..=9 so addresses stay `10.231.0.1x`.
pub const MAX_NODES: u8 = 9;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error("writing machine-id file {path}: {source}")]
    MachineId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Address(#[from] MachineIdError),
    #[error("a testbed holds 1..={MAX_NODES} nodes, asked for {0}")]
    NodeCount(u8),
}

#[derive(Debug)]
pub struct Node {
    pub ns: Namespace,
    pub index: u8,
    pub underlay_v4: Ipv4Addr,
    pub underlay_v6: Ipv6Addr,
    pub machine_id: String,
    pub machine_id_file: PathBuf,
    /// 16 lowercase hex digits: the name of this node in mailbox keys.
    pub node_id: String,
    /// The address the agent must put on its TUN (default prefix).
    pub tunnel_addr: Ipv6Addr,
}

/// Field order matters: nodes are deleted before the hub, the scratch directory last.
#[derive(Debug)]
pub struct Testbed {
    pub nodes: Vec<Node>,
    pub hub: Namespace,
    pub scratch: ScratchDir,
}

impl Testbed {
    pub fn new(node_count: u8) -> Result<Self, TopologyError> {
        if node_count == 0 || node_count > MAX_NODES {
            return Err(TopologyError::NodeCount(node_count));
        }
        let scratch = ScratchDir::create("testbed")?;
        let hub = Namespace::create("hub")?;
        hub.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        hub.ip(&["addr", "add", &format!("{HUB_IPV4}/24"), "dev", BRIDGE])?;
        // nodad: the address is usable at once instead of after duplicate detection.
        hub.ip(&[
            "addr",
            "add",
            &format!("{HUB_IPV6}/64"),
            "dev",
            BRIDGE,
            "nodad",
        ])?;
        hub.ip(&["link", "set", BRIDGE, "up"])?;
        let mut bed = Self {
            nodes: Vec::new(),
            hub,
            scratch,
        };
        for index in 1..=node_count {
            let node = bed.add_node(index)?;
            bed.nodes.push(node);
        }
        Ok(bed)
    }

    fn add_node(&self, index: u8) -> Result<Node, TopologyError> {
        let ns = Namespace::create(&format!("n{index}"))?;
        let hub_side = format!("v{index}");
        // Created from inside the hub so the host namespace never sees either end.
        self.hub.ip(&[
            "link",
            "add",
            &hub_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.hub
            .ip(&["link", "set", &hub_side, "master", BRIDGE, "up"])?;
        let underlay_v4 = Ipv4Addr::new(10, 231, 0, 10 + index);
        let underlay_v6 = Ipv6Addr::new(0xfd00, 0x231, 0, 0, 0, 0, 0, 0x10 + u16::from(index));
        ns.ip(&["addr", "add", &format!("{underlay_v4}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{underlay_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;

        let machine_id = fresh_machine_id(self.scratch.path().to_string_lossy().as_ref(), index);
        let machine_id_file = self.scratch.path().join(format!("machine-id-{index}"));
        std::fs::write(&machine_id_file, format!("{machine_id}\n")).map_err(|source| {
            TopologyError::MachineId {
                path: machine_id_file.clone(),
                source,
            }
        })?;
        let node_id = node_addr::node_id(&machine_id)?;
        let tunnel_addr = node_addr::node_address(node_addr::DEFAULT_PREFIX, &machine_id)?;
        Ok(Node {
            ns,
            index,
            underlay_v4,
            underlay_v6,
            machine_id,
            machine_id_file,
            node_id,
            tunnel_addr,
        })
    }

    pub fn node(&self, index: u8) -> Option<&Node> {
        self.nodes.iter().find(|n| n.index == index)
    }
}

/// 32 hex digits, distinct per testbed and node; the first half is never zero.
fn fresh_machine_id(salt: &str, index: u8) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut attempt = 0u32;
    loop {
        let digest = Sha256::new()
            .chain_update(salt.as_bytes())
            .chain_update([index])
            .chain_update(nanos.to_le_bytes())
            .chain_update(attempt.to_le_bytes())
            .finalize();
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        if node_addr::node_id(&hex).is_ok() {
            return hex;
        }
        attempt += 1;
    }
}
