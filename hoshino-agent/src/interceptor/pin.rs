//! Where a classifier attachment is pinned in bpffs, so it outlives the agent (fail closed while
//! the agent is down) and a restarted agent can adopt it: `<root>/<interface>/` holds
//!
//! | pin | what |
//! |---|---|
//! | `link` | the TCX link (keeps the program attached after the agent exits) |
//! | `HOSHINO_*`, `AYA_LOGS` | the program's maps, by their names in the object |
//! | `object` | a one-entry array map with the SHA-256 of the classifier object that made them |
//!
//! The `object` digest tells an agent whether the pinned maps were made by the same classifier
//! object it embeds (then it adopts them) or by another one (then it makes fresh maps and swaps
//! its program into the pinned link atomically). It is written last, so a half-finished start
//! never looks adoptable.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapError};
use sha2::{Digest, Sha256};

use super::object::CLASSIFIER_OBJECT;

/// Default root of the pin directories.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/hoshino";
/// Where bpffs is mounted by convention; the agent mounts it there if nothing is.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Pin name of the link.
const LINK: &str = "link";
/// Pin name of the object digest map.
const OBJECT: &str = "object";

/// The maps of the classifier object that are pinned (every map it has).
pub const PINNED_MAPS: [&str; 12] = [
    "HOSHINO_CONFIG",
    "HOSHINO_SETS",
    "HOSHINO_RULES",
    "HOSHINO_DST_V4",
    "HOSHINO_SRC_V4",
    "HOSHINO_DST_V6",
    "HOSHINO_SRC_V6",
    "HOSHINO_STATS",
    "HOSHINO_FLOWS",
    "HOSHINO_UID_FLOWS",
    "HOSHINO_EVENTS",
    "AYA_LOGS",
];

/// Why a pin directory could not be prepared, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path} is not on a bpf filesystem (mount one there: mount -t bpf bpf {path})")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {BPFFS_MOUNT} failed (needs CAP_SYS_ADMIN): {0}")]
    Mount(#[source] io::Error),
    #[error(
        "no bpffs at {BPFFS_MOUNT}, and this process runs in a mount namespace of its own (e.g. \
         under `ip netns exec`, which remounts /sys, or a service with private mounts): a bpffs \
         mounted here would vanish with it, and the pins with it. Mount bpffs in the host \
         (mount -t bpf bpf /sys/fs/bpf, or a directory outside /sys for `ip netns exec`) and \
         point --pin-dir there"
    )]
    PrivateMountNamespace,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the interface name `{0}` cannot name a pin directory")]
    BadInterface(String),
    #[error("pinned object digest {path}: {source}")]
    Digest {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
}

/// The SHA-256 of the embedded classifier object.
pub fn object_digest() -> [u8; 32] {
    Sha256::digest(CLASSIFIER_OBJECT).into()
}

/// The pin directory of one interface's attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// `<root>/<interface>`.
    pub fn new(root: &Path, interface: &str) -> Result<Self, PinError> {
        if interface.is_empty()
            || interface == "."
            || interface == ".."
            || interface.contains('/')
            || interface.contains('\0')
        {
            return Err(PinError::BadInterface(interface.to_owned()));
        }
        Ok(Self {
            path: root.join(interface),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn link(&self) -> PathBuf {
        self.path.join(LINK)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Makes sure the directory exists on a bpf filesystem, mounting bpffs at `/sys/fs/bpf`
    /// when the directory lies under it and nothing is mounted there yet.
    pub fn ensure(&self) -> Result<(), PinError> {
        let anchor = existing_ancestor(&self.path);
        if !is_bpffs(&anchor)? {
            let conventional = Path::new(BPFFS_MOUNT);
            if self.path.starts_with(conventional) && anchor.starts_with(conventional) {
                if in_private_mount_namespace() {
                    return Err(PinError::PrivateMountNamespace);
                }
                mount_bpffs(conventional)?;
            } else {
                return Err(PinError::NotBpffs { path: anchor });
            }
        }
        std::fs::create_dir_all(&self.path).map_err(|source| PinError::Io {
            what: "creating the pin directory",
            path: self.path.clone(),
            source,
        })
    }

    /// Whether anything is pinned here.
    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// The digest recorded by the agent that made the pinned maps, if any.
    pub fn recorded_digest(&self) -> Result<Option<[u8; 32]>, PinError> {
        let path = self.path.join(OBJECT);
        if !path.exists() {
            return Ok(None);
        }
        let digest_err = |source| PinError::Digest {
            path: path.clone(),
            source: Box::new(source),
        };
        let data = MapData::from_pin(&path).map_err(digest_err)?;
        let array: Array<MapData, [u8; 32]> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(digest_err)?;
        match array.get(&0, 0) {
            Ok(digest) => Ok(Some(digest)),
            // A map of another shape: not ours to adopt.
            Err(_) => Ok(None),
        }
    }

    /// Records the embedded object's digest (after the maps it describes are pinned).
    pub fn record_digest(&self) -> Result<(), PinError> {
        let path = self.path.join(OBJECT);
        self.remove_pin(&path)?;
        let digest_err = |source| PinError::Digest {
            path: path.clone(),
            source: Box::new(source),
        };
        let mut array: Array<MapData, [u8; 32]> = Array::create(1, 0).map_err(digest_err)?;
        array.set(0, object_digest(), 0).map_err(digest_err)?;
        array.pin(&path).map_err(|e| PinError::Io {
            what: "pinning the object digest at",
            path: path.clone(),
            source: io::Error::other(e),
        })
    }

    /// Removes the map pins and the digest (the link pin stays): the maps live on while a
    /// program still uses them.
    pub fn remove_maps(&self) -> Result<(), PinError> {
        self.remove_pin(&self.path.join(OBJECT))?;
        for name in PINNED_MAPS {
            self.remove_pin(&self.map(name))?;
        }
        Ok(())
    }

    /// Removes every pin and the directory itself (unpinning the link detaches the program
    /// once no process holds it), then the root if it is left empty.
    pub fn remove_all(&self) -> Result<bool, PinError> {
        if !self.exists() {
            return Ok(false);
        }
        let entries = std::fs::read_dir(&self.path).map_err(|source| PinError::Io {
            what: "listing the pin directory",
            path: self.path.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| PinError::Io {
                what: "listing the pin directory",
                path: self.path.clone(),
                source,
            })?;
            self.remove_pin(&entry.path())?;
        }
        std::fs::remove_dir(&self.path).map_err(|source| PinError::Io {
            what: "removing the pin directory",
            path: self.path.clone(),
            source,
        })?;
        if let Some(root) = self.path.parent() {
            // Only if empty: other interfaces' pins stay.
            let _ = std::fs::remove_dir(root);
        }
        Ok(true)
    }

    fn remove_pin(&self, path: &Path) -> Result<(), PinError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinError::Io {
                what: "removing the pin",
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// `path` or its nearest ancestor that exists.
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let io_err = |source| PinError::Io {
        what: "statfs of",
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: a zeroed statfs is a valid out argument; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Whether this process's mount namespace differs from init's (pins in a bpffs mounted there
/// would not outlive it). Unknown (no access to init's) counts as no.
fn in_private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(ours), Ok(init)) => ours != init,
        _ => false,
    }
}

fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    std::fs::create_dir_all(at).map_err(PinError::Mount)?;
    let c_at = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| PinError::Mount(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: NUL-terminated strings that live for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_at.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount(io::Error::last_os_error()));
    }
    tracing::info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_directory_is_root_then_interface() {
        let dir = PinDir::new(Path::new("/sys/fs/bpf/hoshino"), "eth0").unwrap();
        assert_eq!(dir.path(), Path::new("/sys/fs/bpf/hoshino/eth0"));
        assert_eq!(dir.link(), Path::new("/sys/fs/bpf/hoshino/eth0/link"));
        assert_eq!(
            dir.map("HOSHINO_FLOWS"),
            Path::new("/sys/fs/bpf/hoshino/eth0/HOSHINO_FLOWS")
        );
    }

    #[test]
    fn interface_names_that_escape_the_root_are_refused() {
        for name in ["", ".", "..", "a/b", "a\0b"] {
            assert!(
                PinDir::new(Path::new("/sys/fs/bpf/hoshino"), name).is_err(),
                "{name:?}"
            );
        }
    }

    #[test]
    fn object_digest_is_stable_for_the_embedded_object() {
        assert_eq!(object_digest(), object_digest());
        assert_ne!(object_digest(), [0; 32]);
    }
}
