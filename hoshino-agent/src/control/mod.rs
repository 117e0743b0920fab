//! The running agent's local control socket, for `hoshino-agent status`: `activity` gathers
//! per-peer traffic and the last S3 error (wrappers around the TUN and the store), `report`
//! builds the status (sans-IO), `socket` serves and queries it.

pub mod activity;
pub mod report;
pub mod socket;
