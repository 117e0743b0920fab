//! The policy language: a TOML file of ordered, named rules (see README.md, "Policy files"), parsed with
//! locations for every error and compiled into the classifier's map contents. Sans-IO except
//! for [`load`], which reads the file.

pub mod compile;
pub mod error;
pub mod model;
pub mod parse;
pub mod prefix;
pub mod table;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use compile::{CompiledPolicy, PrefixTable, compile};
pub use error::{PolicyError, Problem};
pub use model::{
    DivertPolicy, Family, HttpAction, HttpPolicy, HttpQuestion, HttpRequestRule, PacketAction,
    Policy, Protocol, Rule, Verdict,
};
pub use parse::parse_policy;
pub use prefix::{IpPrefix, Ipv4Prefix, Ipv6Prefix};

/// Parses and compiles policy text; `path` names it in errors.
pub fn compile_text(path: &str, text: &str) -> Result<CompiledPolicy, PolicyError> {
    compile(parse_policy(path, text)?, path, text)
}

/// Reads, parses and compiles the policy file at `path`.
pub fn load(path: &Path) -> Result<CompiledPolicy, PolicyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: shown.clone(),
        source,
    })?;
    compile_text(&shown, &text)
}
