//! Forwards the classifier's aya-log records to `tracing` (target `hoshino_ebpf`).

use std::io;

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// A `log::Log` that re-emits records as `tracing` events.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "hoshino_ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "hoshino_ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "hoshino_ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "hoshino_ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "hoshino_ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Reads the classifier's log ring buffer whenever it has records, until an I/O error.
/// Run it as a tokio task; dropping the task stops forwarding.
pub async fn forward_logs(logger: EbpfLogger<TracingLog>) -> io::Result<()> {
    // SAFETY: the fd is the logger's ring buffer map, owned by the logger, which the AsyncFd owns
    // until it is dropped; it never changes.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
