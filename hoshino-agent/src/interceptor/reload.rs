//! SIGHUP: re-reading the policy file while diverted traffic keeps flowing.
//!
//! Parsing, compiling and filling the maps of a large policy (16,000 prefixes are tens of
//! thousands of map syscalls) takes long enough to matter, so none of it runs on an async
//! worker: the whole reload runs on a blocking thread (`spawn_blocking`). It holds the classifier
//! lock, which the per-packet divert path never takes (that path reads the flow map through its
//! own handle and the rule from [`PolicySets`] under a read lock). The new policy is recorded
//! for the inactive map set under a short write lock *before* the classifier flips to that set,
//! so a packet classified by the new set always finds its rule; packets of the old set still find
//! theirs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use hoshino_common::MAP_SETS;

use super::Classifier;
use super::divert::service::PolicySets;
use crate::policy::{self, CompiledPolicy, Verdict};

/// The first rule of `policy` with a `tunnel` verdict.
pub fn tunnel_rule(policy: &CompiledPolicy) -> Option<&str> {
    policy
        .policy
        .rules
        .iter()
        .find(|r| r.verdict == Verdict::Tunnel)
        .map(|r| r.name.value.as_str())
}

/// Why a reload kept the running policy.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(
        "{path}: rule `{rule}` tunnels packets, but the agent runs without a tunnel (--bucket)"
    )]
    TunnelWithoutBucket { path: String, rule: String },
    #[error(transparent)]
    Install(#[from] super::InterceptorError),
    #[error("the reload thread failed: {0}")]
    Thread(String),
}

/// What a reload needs: the policy file and the shared classifier state.
pub struct PolicyReload {
    pub path: PathBuf,
    pub tunnel_running: bool,
    pub classifier: Arc<Mutex<Classifier>>,
    pub policies: Arc<RwLock<PolicySets>>,
}

impl PolicyReload {
    /// Reloads off the async runtime; on any error the running policy stays and the error is
    /// logged.
    pub async fn run(self) {
        let path = self.path.clone();
        let done = tokio::task::spawn_blocking(move || self.reload_blocking()).await;
        match done.map_err(|e| ReloadError::Thread(e.to_string())) {
            Ok(Ok(compiled)) => tracing::info!(
                policy = %path.display(),
                rules = compiled.rules.len(),
                "policy reloaded"
            ),
            Ok(Err(e)) | Err(e) => {
                tracing::error!("policy reload failed, keeping the current policy: {e}")
            }
        }
    }

    /// The reload itself (blocking: file read, compile, map syscalls).
    pub fn reload_blocking(&self) -> Result<Arc<CompiledPolicy>, ReloadError> {
        let compiled = Arc::new(policy::load(&self.path)?);
        if let Some(rule) = tunnel_rule(&compiled)
            && !self.tunnel_running
        {
            return Err(ReloadError::TunnelWithoutBucket {
                path: self.path.display().to_string(),
                rule: rule.to_string(),
            });
        }
        let mut classifier = self.classifier.lock().unwrap_or_else(|p| p.into_inner());
        let next = (classifier.active_set() + 1) % MAP_SETS;
        let previous = {
            let mut sets = write(&self.policies);
            let previous = sets.policy(next);
            sets.set(next, compiled.clone());
            previous
        };
        if let Err(e) = classifier.install(&compiled) {
            // The set stays inactive; flows it recorded before still belong to its old policy.
            let mut sets = write(&self.policies);
            match previous {
                Some(p) => sets.set(next, p),
                None => sets.clear(next),
            }
            return Err(e.into());
        }
        Ok(compiled)
    }
}

fn write(policies: &RwLock<PolicySets>) -> std::sync::RwLockWriteGuard<'_, PolicySets> {
    policies.write().unwrap_or_else(|p| p.into_inner())
}
