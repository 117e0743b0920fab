//! `hoshino-agent addr`: prints this node's tunnel address (network /64 + machine-id) and exits.

use std::process::ExitCode;

use clap::Args;
use hoshino_agent::node_addr::{NodeAddr, NodeId};

use super::tunnel::NodeArgs;

#[derive(Debug, Clone, Args)]
pub struct AddrArgs {
    #[command(flatten)]
    pub node: NodeArgs,
}

pub fn run(args: &AddrArgs) -> ExitCode {
    match NodeId::from_machine_id_file(&args.node.machine_id_file) {
        Ok(id) => {
            println!(
                "{}",
                NodeAddr {
                    prefix: args.node.prefix,
                    id
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::config_error(e),
    }
}
