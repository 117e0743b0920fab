//! What Hoshino writes to the bucket: bundles and the keys they are written under. Sans-IO.

pub mod bundle;
pub mod mailbox;
pub mod seal;
