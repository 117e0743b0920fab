//! `hoshino-agent detach --interface IF`: removes what `attach` left in the kernel for an
//! interface: the pinned TCX link (so the classifier detaches), its pinned maps and pin
//! directory, and a clsact filter of ours (left by a crashed agent on a kernel without TCX).

use std::path::PathBuf;

use clap::Args;

use hoshino_agent::interceptor::{DEFAULT_PIN_ROOT, InterceptorError, detach_pinned};

/// `hoshino-agent detach --interface IF [--pin-dir DIR]`.
#[derive(Debug, Clone, Args)]
pub struct DetachArgs {
    /// Interface the classifier was attached to.
    #[arg(long, env = "HOSHINO_INTERFACE")]
    pub interface: String,
    /// bpffs directory the classifier was pinned under (`attach --pin-dir`).
    #[arg(long, env = "HOSHINO_PIN_DIR", value_name = "DIR", default_value = DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
}

/// Removes the attachment; `Ok(false)` when nothing was there (also a success: the state the
/// operator asked for holds).
pub fn run(args: &DetachArgs) -> Result<bool, InterceptorError> {
    let removed = detach_pinned(&args.pin_dir, &args.interface)?;
    if removed {
        tracing::info!(interface = %args.interface, pin_dir = %args.pin_dir.display(), "interceptor detached");
    } else {
        tracing::info!(interface = %args.interface, pin_dir = %args.pin_dir.display(), "nothing attached: no pins and no clsact filter of ours");
    }
    Ok(removed)
}
