//! The classifier object, built from `hoshino-ebpf/` by `build.rs` (see there) and embedded.

/// The ELF object of the TC classifier (program `hoshino`, maps `HOSHINO_*`).
pub static CLASSIFIER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hoshino"));
