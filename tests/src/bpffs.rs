//! Pin directories for the agents the testbed starts. `ip netns exec` remounts `/sys` in a
//! mount namespace of its own, so pins under `/sys/fs/bpf` made there would vanish with the
//! agent; the testbed mounts one bpffs outside `/sys` (in the host mount namespace, shared by
//! every `ip netns exec` child) and gives each test a directory in it, removed on drop.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the testbed's bpffs is mounted.
pub const TEST_BPFFS: &str = "/run/hoshino-tests/bpffs";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("preparing the test bpffs at {TEST_BPFFS}: {0}")]
    Io(#[from] std::io::Error),
    #[error("mount -t bpf bpf {TEST_BPFFS} failed: {0}")]
    Mount(String),
}

/// A test's own pin root (`--pin-dir`) in the testbed's bpffs; removed (with every pin in it,
/// which detaches a pinned classifier) on drop.
#[derive(Debug)]
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    /// A fresh, unique pin root named after `tag`.
    pub fn create(tag: &str) -> Result<Self, BpffsError> {
        ensure_mounted()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(TEST_BPFFS).join(format!("{}-{n}-{tag}", std::process::id()));
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether anything is pinned under this root.
    pub fn has_pins(&self) -> bool {
        std::fs::read_dir(&self.path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid out argument; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = stat.f_type as i64;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Mounts the testbed's bpffs once; a lock keeps parallel test processes from stacking two
/// mounts (pins in the lower one would disappear from view).
fn ensure_mounted() -> Result<(), BpffsError> {
    let dir = Path::new(TEST_BPFFS);
    std::fs::create_dir_all(dir)?;
    let lock = std::fs::File::create(dir.with_extension("lock"))?;
    // SAFETY: flock on a file we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if is_bpffs(dir) {
        return Ok(());
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", TEST_BPFFS])
        .output()?;
    if !out.status.success() {
        return Err(BpffsError::Mount(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
