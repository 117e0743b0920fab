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
