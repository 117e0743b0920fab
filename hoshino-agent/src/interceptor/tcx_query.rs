//! The ids of the programs attached by TCX at an interface, from one `BPF_PROG_QUERY`.
//!
//! aya's `SchedClassifier::query_tcx` also opens every program it lists
//! (`BPF_PROG_GET_FD_BY_ID`), which needs CAP_SYS_ADMIN; the systemd unit grants CAP_BPF and
//! CAP_NET_ADMIN only, and the query itself needs no more than CAP_NET_ADMIN. Comparing ids is all
//! the pinned-link check needs.

use std::ffi::CString;
use std::io;

/// `BPF_PROG_QUERY` (`enum bpf_cmd`).
const BPF_PROG_QUERY: libc::c_long = 16;
/// `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS` (`enum bpf_attach_type`).
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
/// More programs than anyone attaches at one hook.
const MAX_PROGRAMS: usize = 64;

/// The `query` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `revision`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached at `attach_type` ([`BPF_TCX_EGRESS`] or [`BPF_TCX_INGRESS`])
/// of `interface` in this network namespace.
pub fn attached_program_ids(interface: &str, attach_type: u32) -> io::Result<Vec<u32>> {
    let name =
        CString::new(interface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ids = [0u32; MAX_PROGRAMS];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGRAMS as u32,
        ..QueryAttr::default()
    };
    // SAFETY: `attr` is a properly laid out, zero-padded prefix of `union bpf_attr` whose size
    // is passed; `prog_ids` points to `prog_cnt` writable u32s that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr.prog_cnt as usize).min(MAX_PROGRAMS);
    Ok(ids.get(..count).unwrap_or_default().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_matches_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<QueryAttr>(), 64);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::offset_of!(QueryAttr, revision), 56);
    }

    #[test]
    fn an_unknown_interface_is_an_error() {
        assert!(attached_program_ids("hsnoexist0", BPF_TCX_EGRESS).is_err());
    }
}
