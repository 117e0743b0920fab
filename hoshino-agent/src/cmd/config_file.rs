//! The `--config` file as clap defaults. Every key is the long name of a flag (`bucket`,
//! `heartbeat-min`, `interface`); before parsing, its value becomes that flag's default in every
//! subcommand that has the flag. Precedence is then clap's own: flag > `HOSHINO_*` environment
//! variable > file > built-in default, and each setting is declared once, as a clap argument,
//! with one parser for all three sources.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, Command};
use toml::Spanned;

use super::CliError;

/// Flags that are not settings: what they do happens before or instead of reading a file.
const NOT_SETTINGS: [&str; 3] = ["config", "help", "version"];

/// One `key = value` of the file, its value as the text a flag would take.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    value: String,
    line: usize,
}

/// A parsed `--config` file: keys with their values and lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    path: PathBuf,
    settings: BTreeMap<String, Setting>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::ConfigUnreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        ConfigFile::parse(&text, path)
    }

    /// Parses TOML text of flat `key = value` lines (strings, integers, booleans); `path` names
    /// the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, CliError> {
        let line_of = |offset: usize| text.get(..offset).unwrap_or(text).matches('\n').count() + 1;
        let invalid = |line, message: String| CliError::ConfigInvalid {
            path: path.to_path_buf(),
            line,
            message,
        };
        let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
            toml::from_str(text).map_err(|e| {
                let line = e.span().map_or(1, |s| line_of(s.start));
                invalid(line, e.message().trim().to_string())
            })?;
        let mut settings = BTreeMap::new();
        for (key, value) in table {
            let line = line_of(key.span().start);
            let text = match value.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(invalid(
                        line,
                        format!(
                            "`{}`: expected a string, an integer or a boolean, found {}",
                            key.get_ref(),
                            other.type_str()
                        ),
                    ));
                }
            };
            settings.insert(key.into_inner(), Setting { value: text, line });
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            settings,
        })
    }

    /// `command` with every setting of the file as the default of the flags it names, after
    /// checking that each key is a flag of some subcommand and each value parses as that flag's
    /// value (errors name the file and line).
    pub fn apply(&self, command: Command) -> Result<Command, CliError> {
        let mut known = Vec::new();
        long_names(&command, &mut known);
        for (key, setting) in &self.settings {
            if NOT_SETTINGS.contains(&key.as_str()) || !known.contains(key) {
                known.sort();
                known.dedup();
                return Err(CliError::ConfigInvalid {
                    path: self.path.clone(),
                    line: setting.line,
                    message: format!(
                        "unknown key `{key}`, expected one of {}",
                        known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        self.inject(command)
    }

    fn inject(&self, mut command: Command) -> Result<Command, CliError> {
        let named: Vec<(String, String)> = command
            .get_arguments()
            .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_string())))
            .collect();
        for (id, long) in named {
            let Some(setting) = self.settings.get(&long) else {
                continue;
            };
            if let Some(arg) = command.get_arguments().find(|a| a.get_id() == id.as_str()) {
                self.check(arg, &long, setting)?;
            }
            let value = setting.value.clone();
            // A required flag the file sets is satisfied by the file (clap does not count
            // defaults as present).
            command = command.mut_arg(id, move |a| a.default_value(value).required(false));
        }
        let subcommands: Vec<String> = command
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        for name in subcommands {
            let mut failed = None;
            command = command.mut_subcommand(name, |sub| {
                let fallback = sub.clone();
                self.inject(sub).unwrap_or_else(|e| {
                    failed = Some(e);
                    fallback
                })
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(command)
    }

    /// Parses `setting` with `arg`'s own value parser, as a default (no environment), so a bad
    /// value is reported with the file's line rather than later as a usage error.
    fn check(&self, arg: &Arg, long: &str, setting: &Setting) -> Result<(), CliError> {
        let probe = arg
            .clone()
            .env(None)
            .required(false)
            .global(false)
            .default_value(setting.value.clone());
        Command::new("config-file")
            .arg(probe)
            .try_get_matches_from([OsString::from("config-file")])
            .map(drop)
            .map_err(|e| {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid value").trim();
                CliError::ConfigInvalid {
                    path: self.path.clone(),
                    line: setting.line,
                    message: format!("`{long}`: {}", first.trim_start_matches("error: ")),
                }
            })
    }
}

/// Every long flag name of `command` and its subcommands, except those that are not settings.
fn long_names(command: &Command, out: &mut Vec<String>) {
    out.extend(
        command
            .get_arguments()
            .filter_map(Arg::get_long)
            .filter(|l| !NOT_SETTINGS.contains(l))
            .map(str::to_owned),
    );
    for sub in command.get_subcommands() {
        long_names(sub, out);
    }
}
