//! The classifier's config map: redirect targets, reinject mark, switches, the per-uid flow cap.

use aya::maps::Array;
use hoshino_common::{CONFIG_LOG_VERDICTS, Config};

use super::{Classifier, InterceptorError, MAP_CONFIG, map_err};

/// Redirect targets and switches the classifier reads from its config map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassifierOptions {
    /// ifindex of the tunnel TUN (`tunnel` verdicts); 0 drops them.
    pub tunnel_ifindex: u32,
    /// ifindex of the divert TUN (`divert` verdicts); 0 drops them.
    pub divert_ifindex: u32,
    /// Packets with this `skb->mark` pass untouched (0 = none).
    pub reinject_mark: u32,
    /// Emit aya-log debug records for verdicts (powers of two of each rule's per-CPU count).
    pub log_verdicts: bool,
}

impl Classifier {
    /// Rewrites redirect targets, reinject mark and logging (the active policy stays).
    pub fn configure(&mut self, options: &ClassifierOptions) -> Result<(), InterceptorError> {
        let mut config = self.config;
        config.tunnel_ifindex = options.tunnel_ifindex;
        config.divert_ifindex = options.divert_ifindex;
        config.reinject_mark = options.reinject_mark;
        config.flags = (config.flags & !CONFIG_LOG_VERDICTS)
            | if options.log_verdicts {
                CONFIG_LOG_VERDICTS
            } else {
                0
            };
        self.write_config(config)
    }

    pub(super) fn write_config(&mut self, config: Config) -> Result<(), InterceptorError> {
        let mut map: Array<_, Config> = self.map_mut(MAP_CONFIG)?;
        map.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        self.config = config;
        Ok(())
    }

    /// Caps the divert flows recorded per socket uid (0 = no cap); see `hoshino-common`.
    pub fn set_flows_per_uid(&mut self, cap: u32) -> Result<(), InterceptorError> {
        let mut config = self.config;
        config.flows_per_uid = cap;
        self.write_config(config)
    }
}
