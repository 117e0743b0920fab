//! Hoshino agent library: the sans-IO core and the I/O edges of the tunnel and interceptor.
//!
//! Where a packet goes, by module:
//! - `tunnel/`: the data path. The send side (`outbox`, `bundler`) and the receive side (`inbox`
//!   decisions, `reorder`, `cursor`, `deletes`, `probe`, `heartbeat`) are sans-IO state machines
//!   (time passed in); `egress` and `ingress` drive them against a `Store` and a `PacketIo`;
//!   `tunnel` (this module's root) wires it all and takes it down again.
//! - `wire/`: what is written to the bucket: the bundle codec (`bundle`), the key schedule
//!   (`mailbox`) and the AEAD envelope of bundles and directory records (`seal`). Sans-IO.
//! - `store/`: the bucket as a trait (`Store`) with its doubles (`memory_store`, `fault_store`) and
//!   the retry loop every request goes through (`retry`).
//! - `edge/`: the I/O edges: S3 (`s3`), the TUN (`tun_device`, `packet_io`), netlink, the metrics
//!   listener, the loops' clock.
//! - `policy/` (sans-IO parser and compiler) and `interceptor/` (the classifier, its maps, divert
//!   and the metadata proxy).
//! - `metrics`: every counter, rendered as Prometheus text. `node_addr`: addresses from
//!   machine-id.

pub mod control;
pub mod directory;
pub mod dns;
pub mod edge;
pub mod interceptor;
pub mod metrics;
pub mod node_addr;
pub mod policy;
pub mod store;
pub mod supervisor;
pub mod tunnel;
pub mod wire;
