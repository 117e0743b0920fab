//! Hoshino agent library: the sans-IO core and the I/O edges of the tunnel.
//!
//! Sans-IO core (no clock, network or kernel; time is passed in): `node_addr`, `bundle`,
//! `mailbox`, `heartbeat`, `reorder`, `bundler`, `metrics`.
//! I/O edges: `tun_device`, `netlink`, `s3`, `metrics_http`, `egress`, `ingress`, `tunnel`.

pub mod bundle;
pub mod bundler;
pub mod heartbeat;
pub mod mailbox;
pub mod metrics;
pub mod node_addr;
pub mod reorder;

pub mod cli;
pub mod egress;
pub mod ingress;
pub mod metrics_http;
pub mod netlink;
pub mod s3;
pub mod tun_device;
pub mod tunnel;
