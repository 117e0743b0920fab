//! Hoshino agent library: the sans-IO core and the I/O edges of the tunnel and interceptor.
//!
//! Sans-IO core (no clock, network or kernel; time is passed in): `node_addr`, `bundle`,
//! `mailbox` (the key schedule), `heartbeat`, `probe`, `reorder`, `cursor`, `deletes`, `bundler`,
//! `outbox` (the send side as a state machine: packets and PUT results in, PUT/ring actions out),
//! `metrics`, `policy`.
//! I/O edges: `tun_device`, `netlink`, `s3`, `metrics_http`, `egress`, `ingress`, `tunnel`,
//! `interceptor`. The edges the tunnel loops use are traits with doubles: `store::Store` (the
//! bucket: `s3::S3Store`, `memory_store`, `fault_store`, `retry::RetryingStore`) and
//! `packet_io::PacketIo` (the TUN, or channels); `clock` is the loops' (tokio, pausable) clock.

pub mod bundle;
pub mod bundler;
pub mod clock;
pub mod cursor;
pub mod deletes;
pub mod heartbeat;
pub mod mailbox;
pub mod memory_store;
pub mod metrics;
pub mod node_addr;
pub mod outbox;
pub mod policy;
pub mod probe;
pub mod reorder;

pub mod cli;
pub mod egress;
pub mod fault_store;
pub mod ingress;
pub mod interceptor;
pub mod metrics_http;
pub mod netlink;
pub mod packet_io;
pub mod retry;
pub mod s3;
pub mod store;
pub mod tun_device;
pub mod tunnel;
