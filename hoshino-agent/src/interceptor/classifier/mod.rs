//! The loaded classifier, split as aya splits programs and maps:
//! - `load`: the embedded object into the kernel, plain or pinned in bpffs (adopting a pinned
//!   attachment); `attach`: TCX link or clsact filter, detach, stale filters; `link_layer`:
//!   whether the interface has Ethernet headers (rtnetlink).
//! - one file per map kind: `config` (redirect targets, switches), `policy_maps` (rules, LPM
//!   tries, set metadata: a policy fills the inactive set, then one flip), `counters` (per-rule
//!   and drop counters), `flows` (the divert flow map).

mod attach;
mod config;
mod counters;
mod flows;
mod link_layer;
mod load;
mod policy_maps;

use std::io;

use aya::{
    Ebpf,
    maps::MapError,
    programs::{ProgramError, SchedClassifier, links::LinkError},
};
use aya_log::EbpfLogger;
use hoshino_common::Config;

pub use attach::{AttachMode, Attachment, Direction, detach_pinned};
pub use config::ClassifierOptions;
pub use counters::{ClassifierEvents, RuleCounters};
pub use flows::flow_key;
pub use load::Adoption;
use load::Pins;

use super::{from_policy::TablesError, logs::TracingLog, pin::PinError};

const PROGRAM: &str = "hoshino";
const MAP_CONFIG: &str = "HOSHINO_CONFIG";
const MAP_SETS_META: &str = "HOSHINO_SETS";
const MAP_RULES: &str = "HOSHINO_RULES";
const MAP_DST_V4: &str = "HOSHINO_DST_V4";
const MAP_SRC_V4: &str = "HOSHINO_SRC_V4";
const MAP_DST_V6: &str = "HOSHINO_DST_V6";
const MAP_SRC_V6: &str = "HOSHINO_SRC_V6";
const MAP_STATS: &str = "HOSHINO_STATS";
const MAP_FLOWS: &str = "HOSHINO_FLOWS";
const MAP_EVENTS: &str = "HOSHINO_EVENTS";
const MAP_UID_FLOWS: &str = "HOSHINO_UID_FLOWS";

/// Why the classifier could not be loaded, attached, filled or read.
#[derive(Debug, thiserror::Error)]
pub enum InterceptorError {
    #[error(
        "loading the classifier object into the kernel failed (needs CAP_BPF and CAP_NET_ADMIN, or root): {0}"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("classifier program `{PROGRAM}`: {0}")]
    Program(#[source] Box<ProgramError>),
    #[error("the classifier object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("classifier map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("no network interface `{interface}` in this namespace: {source}")]
    NoInterface {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "attaching to {interface} ({direction:?}) failed with TCX ({tcx}) and with clsact/netlink: {netlink}"
    )]
    Attach {
        interface: String,
        direction: Direction,
        tcx: Box<ProgramError>,
        netlink: Box<ProgramError>,
    },
    #[error("the policy does not fit the classifier: {0}")]
    Tables(#[from] TablesError),
    #[error("counting CPUs for the per-CPU counters failed: {0}")]
    Cpus(#[source] io::Error),
    #[error("the classifier's log ring buffer: {0}")]
    Logger(#[source] Box<aya_log::Error>),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("the pinned link {path}: {source}")]
    Link {
        path: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error(
        "the link pinned at {path} is not attached to {interface} in this network namespace; \
         it belongs to another attachment (choose another --pin-dir, or remove it with \
         `hoshino-agent detach`)"
    )]
    PinnedElsewhere { path: String, interface: String },
    #[error("pinning the classifier at {path}: {source}")]
    PinLink {
        path: String,
        #[source]
        source: Box<aya::pin::PinError>,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> InterceptorError {
    move |source| InterceptorError::Map {
        map,
        source: Box::new(source),
    }
}

fn program_err(err: ProgramError) -> InterceptorError {
    InterceptorError::Program(Box::new(err))
}

/// The loaded TC classifier.
pub struct Classifier {
    ebpf: Ebpf,
    config: Config,
    rule_names: Vec<String>,
    attachments: Vec<Attachment>,
    pins: Option<Pins>,
    created_clsact: Vec<String>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("config", &self.config)
            .field("rule_names", &self.rule_names)
            .field("attachments", &self.attachments)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Takes the classifier's log ring buffer; pass it to [`super::forward_logs`]. Call once.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<TracingLog>, InterceptorError> {
        EbpfLogger::init_with_logger(&mut self.ebpf, TracingLog)
            .map_err(|e| InterceptorError::Logger(Box::new(e)))
    }

    /// The classifier program, e.g. for `BPF_PROG_TEST_RUN` (`aya::programs::TestRun`).
    pub fn program(&mut self) -> Result<&mut SchedClassifier, InterceptorError> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| program_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_err)
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, InterceptorError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(InterceptorError::MissingMap(name))?;
        T::try_from(map).map_err(map_err(name))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, InterceptorError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or(InterceptorError::MissingMap(name))?;
        T::try_from(map).map_err(map_err(name))
    }
}
