//! The name responder: AAAA answers for `<name>.<domain>` from the node directory, on the tunnel
//! address. `answer` decides (sans-IO, hickory-proto messages); `server` is the UDP socket.

pub mod answer;
pub mod resolved;
pub mod server;

/// Default DNS port on the tunnel address.
pub const DNS_PORT: u16 = 53;
