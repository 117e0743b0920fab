//! `hoshino-agent policy ...` subcommands.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use hoshino_agent::policy::error::PolicyError;

/// `hoshino-agent policy <COMMAND>`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file and print its compiled rules (exit 2 with FILE:LINE:COL if invalid).
    Check(PolicyCheckArgs),
}

/// `hoshino-agent policy check FILE`.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// The policy file (TOML).
    pub file: PathBuf,
}

/// Runs a policy subcommand; returns what to print on success, or the error to print (the
/// caller exits 2 for it, as for any configuration error).
pub fn run(command: &PolicyCommand) -> Result<String, PolicyError> {
    match command {
        PolicyCommand::Check(args) => {
            let compiled = hoshino_agent::policy::load(&args.file)?;
            Ok(format!(
                "{}: {} rules, valid\n{}",
                args.file.display(),
                compiled.rules.len(),
                hoshino_agent::policy::table::render(&compiled)
            ))
        }
    }
}
