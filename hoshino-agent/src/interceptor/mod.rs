//! The policy interceptor's kernel side: loading the embedded TC classifier, attaching it, filling
//! its maps from a compiled policy, and reading back per-rule counters and diverted flows.
//! Policy is decided in `policy/` (parse, compile); `from_policy` turns the compiled policy into
//! map contents and `classifier/` writes them, attaches, and reads back.
//!
//! Typical use (the `attach` command):
//! ```no_run
//! # use hoshino_agent::interceptor::*;
//! # fn run(policy: &hoshino_agent::policy::CompiledPolicy) -> Result<(), InterceptorError> {
//! let mut classifier = Classifier::load(&ClassifierOptions::default())?;
//! let logs = classifier.take_logger()?; // spawn `forward_logs(logs)` on tokio
//! classifier.install(policy)?;          // fills the inactive map set, then flips to it (SIGHUP: again)
//! classifier.attach("eth0", Direction::Egress)?;
//! let counters = classifier.rule_stats()?; // per rule name, summed over CPUs
//! classifier.detach()?; // also on drop
//! # drop(logs); Ok(()) }
//! ```
//!
//! `attach` uses [`Classifier::load_pinned`] instead: the link and maps are pinned in bpffs
//! (`pin.rs`), a pinned classifier is adopted or replaced in place, dropping it leaves it
//! attached (fail closed), and [`detach_pinned`] removes it. [`FlowTable`] is the flow map
//! through a handle of its own (sweep, removal).

mod classifier;
pub mod divert;
mod flow_table;
mod from_policy;
mod logs;
mod object;
mod pin;
pub mod proxy;
pub mod reload;
mod tcx_query;

pub use classifier::{
    Adoption, AttachMode, Attachment, Classifier, ClassifierEvents, ClassifierOptions, Direction,
    InterceptorError, RuleCounters, detach_pinned, flow_key,
};
pub use flow_table::{
    FLOW_IDLE_TIMEOUT, FLOW_SWEEP_EVERY, FlowTable, idle_flows, monotonic_now_ns,
};
pub use from_policy::set_tables;
pub use from_policy::{SetTables, TablesError};
pub use logs::{TracingLog, forward_logs};
pub use object::CLASSIFIER_OBJECT;
pub use pin::{DEFAULT_PIN_ROOT, PINNED_MAPS, PinDir, PinError, object_digest};
