//! The I/O edges the tunnel and the interceptor stand on: S3, the TUN device, netlink, the metrics
//! listener and the loops' clock.

pub mod clock;
pub mod metrics_http;
pub mod netlink;
pub mod packet_io;
pub mod s3;
pub mod tun_device;
