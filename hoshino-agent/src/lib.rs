//! Hoshino agent library: the sans-IO core and the I/O edges of the tunnel and interceptor.
pub mod interceptor;
pub mod policy;
