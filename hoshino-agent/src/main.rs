//! `hoshino-agent`: parses the command line (and `--config` file), starts logging and the one
//! async runtime, and runs the command (`cmd/`), which picks the exit code: 0 on success, 2 for
//! usage/configuration errors, 1 for runtime faults.

use std::process::ExitCode;

mod cmd;

fn main() -> ExitCode {
    let cli = match cmd::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(cmd::ParseError::Usage(e)) => e.exit(),
        Err(cmd::ParseError::Config(e)) => {
            eprintln!("hoshino-agent: {e}");
            return ExitCode::from(cmd::EXIT_CONFIG);
        }
    };
    cmd::init_logging(cli.log_format);
    keep_large_buffers_mapped();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.get())
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hoshino-agent: cannot start the async runtime: {e}");
            return ExitCode::from(cmd::EXIT_RUNTIME);
        }
    };
    runtime.block_on(cmd::run(cli))
}

/// Bundle buffers are up to 16 MiB. glibc raises its mmap threshold each time it frees a mapped
/// chunk, so after the first such buffer every later one comes from the heap, whose freed space
/// fragments and stays resident: an agent draining a backlog of 16 MiB objects grew to twice its
/// byte budget. A fixed threshold keeps every buffer of 1 MiB or more mapped, returned on free.
fn keep_large_buffers_mapped() {
    // SAFETY: mallopt only changes allocator parameters and takes the allocator's own lock.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if ok != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay resident");
    }
}
