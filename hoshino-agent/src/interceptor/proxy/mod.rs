//! The terminating metadata proxy for `divert` rules with an `http` section: the agent is the
//! client's TCP peer (smoltcp on the divert TUN), judges each request strictly and sends the
//! server a request it rebuilt itself. No client packet is forwarded.
//!
//! - [`canonical`]: the one strict request-target checker.
//! - [`request`]: request framing (httparse) and the rebuilt request.
//! - [`response`]: the server's response, read strictly, and what the client gets.
//! - [`conversation`]: one connection's requests and verdicts (sans-IO, time passed in).
//! - [`admission`]: the bound on connections, in all and per uid.
//! - [`audit`]: one audit record per judged request (`hoshino::audit`).
//! - [`stack`]: smoltcp over a packet queue, the connections' sockets (driven by the divert
//!   loop).
//! - [`upstream`]: the agent's own marked connection to the server (I/O).

pub mod admission;
pub mod audit;
pub mod canonical;
pub mod conversation;
pub mod request;
pub mod response;
pub mod stack;
pub mod upstream;

pub use super::divert::counters::DivertStats as ProxyStats;
pub use conversation::DivertRule;
pub use stack::{Answer, Polled, ProxyStack};
