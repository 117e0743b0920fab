//! A network namespace owned by the test: created with `ip netns add`, deleted on drop (even on
//! panic), with every process still inside it killed first so the namespace really goes away.

use std::ffi::OsStr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::command::{self, CommandError};

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("creating network namespace {name}: {source}")]
    Create { name: String, source: CommandError },
    #[error("in network namespace {name}: {source}")]
    Exec { name: String, source: CommandError },
}

#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `hs-<pid>-<n>-<tag>`: the pid and a process-wide counter keep parallel tests and
    /// parallel test binaries apart.
    pub fn create(tag: &str) -> Result<Self, NetnsError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("hs-{}-{n}-{tag}", std::process::id());
        command::run(Command::new("ip").args(["netns", "add", &name])).map_err(|source| {
            NetnsError::Create {
                name: name.clone(),
                source,
            }
        })?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the program's pid).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace, requires success, returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, NetnsError> {
        command::run(self.command(program).args(args)).map_err(|source| self.exec_error(source))
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        command::run(Command::new("ip").args(["-n", &self.name]).args(args))
            .map_err(|source| self.exec_error(source))
    }

    fn exec_error(&self, source: CommandError) -> NetnsError {
        NetnsError::Exec {
            name: self.name.clone(),
            source,
        }
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        command::run(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|out| {
                out.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Only processes inside this namespace, which the testbed started there.
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from this namespace's process list.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = command::run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}
