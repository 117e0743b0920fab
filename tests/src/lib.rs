//! Testbed for Hoshino: network namespaces, S3 servers and agent processes, used by the
//! end-to-end tests in `tests/` and by `cargo xtask demo|bench`.
//!
//! Every server and agent runs inside a namespace the testbed creates; nothing here touches the
//! host namespace's network. Each guard removes what it created when dropped, even on panic.

pub mod agent;
pub mod binaries;
pub mod bpffs;
pub mod bundle_forge;
pub mod classifier_bench;
pub mod command;
pub mod http_server;
pub mod metadata_bench;
pub mod metrics;
pub mod moto;
pub mod netns;
pub mod node_addr;
pub mod ping;
pub mod process;
pub mod s3_backend;
pub mod s3_server;
pub mod scratch;
pub mod signals;
pub mod topology;
pub mod tunnel_net;
pub mod udp_probe;
