//! Running a command to completion and turning failure into an error that says what ran.

use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A printable form of a command, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd`, requires exit status 0, and returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let output = output(cmd)?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command: describe(cmd),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd` and returns its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output, CommandError> {
    cmd.output().map_err(|source| CommandError::Spawn {
        command: describe(cmd),
        source,
    })
}
