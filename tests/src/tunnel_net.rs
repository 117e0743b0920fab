//! A whole Hoshino network for a test, the demo or the bench: a testbed, an S3 server in its hub
//! and one agent per node. Dropping it stops the agents, the server and deletes the namespaces.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::agent::{Agent, AgentError};
use crate::binaries::{self, BinaryError};
use crate::command::{self, CommandError};
use crate::s3_backend::{BackendError, BackendKind, BackendOptions, S3Backend, S3Endpoint};
use crate::s3_server::ServerConditions;
use crate::topology::{Node, Testbed, TopologyError};

/// Generous: the first agent start on a cold machine also waits for the S3 server.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines of each agent that `agent_logs` shows.
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum TunnelNetError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("S3 server ({kind}): {source}")]
    Backend {
        kind: &'static str,
        source: BackendError,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error("no node {0} in this testbed")]
    NoNode(u8),
    #[error("S3 probe from node {node}: {source}")]
    Probe { node: u8, source: CommandError },
}

#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    pub backend: BackendOptions,
    /// Flags appended to every agent's command line.
    pub agent_args: Vec<String>,
    /// Latency and faults of the s3s-fs server; `backend.fault_fraction`, when set, overrides
    /// its SlowDown fraction.
    pub server: ServerConditions,
}

/// Field order is drop order: agents before the server, the server before the namespaces.
#[derive(Debug)]
pub struct TunnelNet {
    pub agents: Vec<Agent>,
    pub backend: S3Backend,
    pub bed: Testbed,
    /// What the server was started with, so a restart emulates the same S3.
    server_conditions: ServerConditions,
}

impl TunnelNet {
    /// A testbed with `nodes` nodes and a server of `kind`, without agents.
    pub fn without_agents(
        kind: BackendKind,
        nodes: u8,
        options: &NetOptions,
    ) -> Result<Self, TunnelNetError> {
        let bed = Testbed::new(nodes)?;
        let mut conditions = options.server.clone();
        if options.backend.fault_fraction > 0.0 {
            conditions.slow_down_fraction = options.backend.fault_fraction;
        }
        let backend = S3Backend::start_with(kind, &bed.hub, bed.scratch.path(), &conditions)
            .map_err(|source| TunnelNetError::Backend {
                kind: kind.label(),
                source,
            })?;
        Ok(Self {
            agents: Vec::new(),
            backend,
            bed,
            server_conditions: conditions,
        })
    }

    /// Starts an agent on every node that has none yet (a testbed made `without_agents`), all at
    /// once, then waits until each is ready.
    pub fn start_agents(&mut self, extra: &[&str]) -> Result<(), TunnelNetError> {
        for node in self.bed.nodes.iter().skip(self.agents.len()) {
            let agent = Agent::start(node, &self.backend.endpoint, self.bed.scratch.path(), extra)?;
            self.agents.push(agent);
        }
        for agent in &mut self.agents {
            agent.wait_ready(AGENT_READY_TIMEOUT)?;
        }
        Ok(())
    }

    /// Stops the S3 server, keeps it down for `down`, and starts it again on the same address
    /// and data directory (s3s-fs only).
    pub fn restart_s3_server(&mut self, down: Duration) -> Result<(), TunnelNetError> {
        let conditions = self.server_conditions.clone();
        self.restart_s3_server_with(conditions, down)
    }

    /// As `restart_s3_server`, emulating `conditions` from now on (e.g. a fault rule that names
    /// node ids, which exist only once the testbed does).
    pub fn restart_s3_server_with(
        &mut self,
        conditions: ServerConditions,
        down: Duration,
    ) -> Result<(), TunnelNetError> {
        self.server_conditions = conditions;
        let kind = self.backend.kind;
        self.backend
            .restart_s3s_fs(
                &self.bed.hub,
                self.bed.scratch.path(),
                &self.server_conditions,
                down,
            )
            .map_err(|source| TunnelNetError::Backend {
                kind: kind.label(),
                source,
            })
    }

    /// Everything up, every agent ready.
    pub fn start(
        kind: BackendKind,
        nodes: u8,
        options: &NetOptions,
    ) -> Result<Self, TunnelNetError> {
        let mut net = Self::without_agents(kind, nodes, options)?;
        let extra: Vec<&str> = options.agent_args.iter().map(String::as_str).collect();
        net.start_agents(&extra)?;
        Ok(net)
    }

    /// Starts node `index`'s agent again (after it was stopped or killed), with the same
    /// state directory, and waits until it is ready.
    pub fn restart_agent(&mut self, index: u8, extra: &[&str]) -> Result<(), TunnelNetError> {
        let node = self.bed.node(index).ok_or(TunnelNetError::NoNode(index))?;
        let agent = Agent::start_ready(
            node,
            &self.backend.endpoint,
            self.bed.scratch.path(),
            extra,
            AGENT_READY_TIMEOUT,
        )?;
        let slot = self
            .agents
            .get_mut(usize::from(index).wrapping_sub(1))
            .ok_or(TunnelNetError::NoNode(index))?;
        *slot = agent;
        Ok(())
    }

    pub fn node(&self, index: u8) -> Result<&Node, TunnelNetError> {
        self.bed.node(index).ok_or(TunnelNetError::NoNode(index))
    }

    /// The agent of node `index` (agents are started in node order).
    pub fn agent(&self, index: u8) -> Result<&Agent, TunnelNetError> {
        self.agents
            .get(usize::from(index).wrapping_sub(1))
            .ok_or(TunnelNetError::NoNode(index))
    }

    pub fn agent_mut(&mut self, index: u8) -> Result<&mut Agent, TunnelNetError> {
        self.agents
            .get_mut(usize::from(index).wrapping_sub(1))
            .ok_or(TunnelNetError::NoNode(index))
    }

    pub fn endpoint(&self) -> &S3Endpoint {
        &self.backend.endpoint
    }

    pub fn scratch(&self) -> &Path {
        self.bed.scratch.path()
    }

    /// Runs `hoshino-s3-probe <args>` inside node `index`'s namespace; returns stdout.
    pub fn s3_probe(&self, index: u8, args: &[&str]) -> Result<String, TunnelNetError> {
        let node = self.node(index)?;
        let endpoint = self.endpoint();
        let mut cmd = node.ns.command(binaries::s3_probe()?);
        cmd.args(["--endpoint-url", &endpoint.url])
            .args(["--bucket", &endpoint.bucket])
            .args(["--region", &endpoint.region])
            .args(args);
        endpoint.apply_env(&mut cmd);
        command::run(&mut cmd).map_err(|source| TunnelNetError::Probe {
            node: index,
            source,
        })
    }

    /// PUTs `body` under `key` from node `index`.
    pub fn put_object(&self, index: u8, key: &str, body: &[u8]) -> Result<(), TunnelNetError> {
        let file: PathBuf = self.scratch().join(format!(
            "object-{}",
            key.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        std::fs::write(&file, body).map_err(|e| TunnelNetError::Probe {
            node: index,
            source: CommandError::Spawn {
                command: format!("write {}", file.display()),
                source: e,
            },
        })?;
        let file_arg = file.to_string_lossy().into_owned();
        self.s3_probe(index, &["put", "--key", key, "--file", &file_arg])?;
        let _ = std::fs::remove_file(&file);
        Ok(())
    }

    /// Keys under `prefix`, listed from node `index`.
    pub fn list_keys(&self, index: u8, prefix: &str) -> Result<Vec<String>, TunnelNetError> {
        let out = self.s3_probe(index, &["list", "--prefix", prefix])?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// A command inside node `index`'s namespace.
    pub fn command_in(&self, index: u8, program: &str) -> Result<Command, TunnelNetError> {
        Ok(self.node(index)?.ns.command(program))
    }

    /// The end of every agent's log, headed by its node: for assertion messages.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent n{} ---\n{}\n", i + 1, a.log_tail(LOG_TAIL_LINES)))
            .collect()
    }

    /// As `agent_logs`, each followed by a summary of the agent's metrics (or why it has none).
    pub fn agent_logs_and_metrics(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let summary = a
                    .metrics()
                    .map(|m| m.summary())
                    .unwrap_or_else(|e| e.to_string());
                format!(
                    "--- agent n{} ---\n{}\n--- metrics ---\n{summary}\n",
                    i + 1,
                    a.log_tail(LOG_TAIL_LINES)
                )
            })
            .collect()
    }
}
