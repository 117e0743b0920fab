//! Hoshino agent library: the sans-IO core and the I/O edges of the tunnel and interceptor.
//!
//! Sans-IO core (no clock, network or kernel; time is passed in): `node_addr`, `bundle`,
//! `mailbox` (the key schedule), `heartbeat`, `probe`, `reorder`, `cursor`, `deletes`, `bundler`,
//! `metrics`, `policy`.
//! I/O edges: `tun_device`, `netlink`, `s3`, `metrics_http`, `egress`, `ingress`, `tunnel`,
//! `interceptor`.

pub mod bundle;
pub mod bundler;
pub mod cursor;
pub mod deletes;
pub mod heartbeat;
pub mod mailbox;
pub mod metrics;
pub mod node_addr;
pub mod policy;
pub mod probe;
pub mod reorder;

pub mod cli;
pub mod egress;
pub mod ingress;
pub mod interceptor;
pub mod metrics_http;
pub mod netlink;
pub mod s3;
pub mod tun_device;
pub mod tunnel;
