//! The loaded classifier: attach/detach (optionally pinned in bpffs, adopting a pinned
//! attachment), map filling with an atomic set flip, counters, flows.

use std::{ffi::CString, io, net::IpAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
};
use aya_log::EbpfLogger;
use hoshino_common::{
    CONFIG_ENABLED, CONFIG_L3_INTERFACE, CONFIG_LOG_VERDICTS, Config, DEFAULT_SLOT,
    EVENT_FLOW_TABLE_FULL, EVENT_NO_REDIRECT_TARGET, EVENT_UID_FLOW_CAP, FAMILY_V4, FAMILY_V6,
    FlowKey, FlowValue, LPM_SET_BITS, LpmV4, LpmV6, MAP_SETS, MAX_RULES, Rule, RuleSet, RuleStats,
    STATS_SLOTS, SetMeta, rule_index, stats_index,
};

use super::{
    flow_table::FlowTable,
    from_policy::set_tables,
    logs::TracingLog,
    object::CLASSIFIER_OBJECT,
    pin::{PINNED_MAPS, PinDir, PinError, object_digest},
    tables::{PolicySpec, Prefix, SetTables, TablesError, build_tables},
};

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

/// Which side of the interface the classifier sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    fn tc(self) -> TcAttachType {
        match self {
            Self::Egress => TcAttachType::Egress,
            Self::Ingress => TcAttachType::Ingress,
        }
    }
}

/// How an attachment was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel >= 6.6): it dies with the agent's file descriptor, even on `kill -9`.
    Tcx,
    /// A clsact filter via netlink (older kernels): it outlives a crashed agent.
    Netlink,
}

/// One place the classifier is attached.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub direction: Direction,
    pub mode: AttachMode,
    link: AttachedLink,
}

#[derive(Debug)]
enum AttachedLink {
    /// Owned by the program object: detached when dropped (unless also pinned).
    Managed(SchedClassifierLinkId),
    /// Taken out of the program and pinned: stays attached after the agent exits.
    Pinned(PinnedLink),
}

/// What a pinned classifier found in its pin directory when it loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing was pinned: a new link is attached and pinned.
    Fresh,
    /// A link and maps pinned by the same classifier object: the maps are reused and this
    /// agent's (identical) program is swapped into the link atomically.
    Adopted,
    /// A link pinned by another classifier object (or an unfinished start): fresh maps, and the
    /// program is swapped into the pinned link atomically (no detach, no second program).
    Replaced,
}

/// The classifier's own drop counters (`HOSHINO_EVENTS`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassifierEvents {
    /// Divert packets of new flows dropped because the flow table was full.
    pub flow_table_full: u64,
    /// Tunnel/divert packets dropped because no redirect target was configured.
    pub no_redirect_target: u64,
    /// Divert packets of new flows dropped because their uid was at the per-uid cap.
    pub uid_flow_cap: u64,
}

/// Pin state of a classifier loaded with [`Classifier::load_pinned`].
#[derive(Debug)]
struct Pins {
    dir: PinDir,
    adoption: Adoption,
    /// The link found pinned at load, until [`Classifier::attach`] swaps the program into it.
    found_link: Option<FdLink>,
}

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

/// Packet and byte counters of one rule (or of the default verdict), summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounters {
    /// The rule's name; `default` for the default verdict.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
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
    /// Loads the embedded classifier into the kernel (not attached, passing everything until the
    /// first [`Classifier::install`]). Nothing is pinned: the attachment ends with the process.
    pub fn load(options: &ClassifierOptions) -> Result<Self, InterceptorError> {
        let ebpf =
            Ebpf::load(CLASSIFIER_OBJECT).map_err(|e| InterceptorError::Load(Box::new(e)))?;
        Self::with_object(ebpf, options, None)
    }

    /// Loads the classifier for `direction` of `interface` with its maps pinned in
    /// `<root>/<interface>/`, adopting what a previous agent pinned there (see [`Adoption`]).
    /// [`Classifier::attach`] (same interface and direction) then swaps this program into a
    /// pinned link atomically or attaches and pins a new one; the attachment outlives the
    /// process (fail closed: diverted traffic is dropped while no agent runs) until
    /// [`Classifier::detach`] or [`detach_pinned`].
    pub fn load_pinned(
        options: &ClassifierOptions,
        root: &std::path::Path,
        interface: &str,
        direction: Direction,
    ) -> Result<Self, InterceptorError> {
        let dir = PinDir::new(root, interface)?;
        dir.ensure()?;
        let found_link = match PinnedLink::from_pin(dir.link()) {
            Ok(link) => Some(FdLink::from(link)),
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(InterceptorError::Link {
                    path: dir.link().display().to_string(),
                    source: Box::new(source),
                });
            }
        };
        if let Some(found) = &found_link {
            check_attached_here(found, &dir, interface, direction)?;
        }
        let same_object = found_link.is_some() && dir.recorded_digest()? == Some(object_digest());
        let adoption = match (&found_link, same_object) {
            (None, _) => Adoption::Fresh,
            (Some(_), true) => Adoption::Adopted,
            (Some(_), false) => Adoption::Replaced,
        };
        if adoption != Adoption::Adopted {
            // Maps of another object (or of no live link) are never reused; a running old
            // program keeps its own maps until the link is swapped.
            dir.remove_maps()?;
        }
        let pin_paths: Vec<(&str, std::path::PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, dir.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader
            .load(CLASSIFIER_OBJECT)
            .map_err(|e| InterceptorError::Load(Box::new(e)))?;
        let pins = Pins {
            dir,
            adoption,
            found_link,
        };
        Self::with_object(ebpf, options, Some(pins))
    }

    fn with_object(
        mut ebpf: Ebpf,
        options: &ClassifierOptions,
        pins: Option<Pins>,
    ) -> Result<Self, InterceptorError> {
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| program_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        let adopted = pins
            .as_ref()
            .is_some_and(|p| p.adoption == Adoption::Adopted);
        let mut classifier = Self {
            ebpf,
            config: Config::default(),
            rule_names: Vec::new(),
            attachments: Vec::new(),
            pins,
            created_clsact: Vec::new(),
        };
        if adopted {
            // Keep the running policy (active set, enabled) until `install` flips to ours.
            let map: Array<_, Config> = classifier.map(MAP_CONFIG)?;
            classifier.config = map.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
            // The previous agent's flows died with it (the proxy held their state).
            let cleared = classifier.flow_table()?.clear()?;
            tracing::debug!(cleared, "cleared the adopted flow table");
        }
        classifier.configure(options)?;
        Ok(classifier)
    }

    /// What [`Classifier::load_pinned`] found; `None` for an unpinned classifier.
    pub fn adoption(&self) -> Option<Adoption> {
        self.pins.as_ref().map(|p| p.adoption)
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref().map(|p| &p.dir)
    }

    /// Takes the classifier's log ring buffer; pass it to [`super::forward_logs`]. Call once.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<TracingLog>, InterceptorError> {
        EbpfLogger::init_with_logger(&mut self.ebpf, TracingLog)
            .map_err(|e| InterceptorError::Logger(Box::new(e)))
    }

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

    fn write_config(&mut self, config: Config) -> Result<(), InterceptorError> {
        let mut map: Array<_, Config> = self.map_mut(MAP_CONFIG)?;
        map.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        self.config = config;
        Ok(())
    }

    /// Attaches at `direction` of `interface`: TCX if the kernel has it, else a clsact filter.
    /// A pinned classifier swaps its program into the link found pinned (atomically: packets
    /// see the old or the new program, never none), or pins the new TCX link. A clsact filter
    /// named like ours (left by a crashed agent) is removed first.
    pub fn attach(
        &mut self,
        interface: &str,
        direction: Direction,
    ) -> Result<AttachMode, InterceptorError> {
        self.prepare_interface(interface)?;
        remove_stale_filters(interface, direction);
        if let Some(found) = self.pins.as_mut().and_then(|p| p.found_link.take()) {
            return self.swap_into_pinned_link(interface, direction, found);
        }
        let program = self.program()?;
        match program.attach_with_options(
            interface,
            direction.tc(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        ) {
            Ok(link) => {
                let link = match &self.pins {
                    Some(pins) => {
                        let path = pins.dir.link();
                        let owned = self.program()?.take_link(link).map_err(program_err)?;
                        let fd =
                            FdLink::try_from(owned).map_err(|source| InterceptorError::Link {
                                path: path.display().to_string(),
                                source: Box::new(source),
                            })?;
                        let pinned = fd.pin(&path).map_err(|source| InterceptorError::PinLink {
                            path: path.display().to_string(),
                            source: Box::new(source),
                        })?;
                        AttachedLink::Pinned(pinned)
                    }
                    None => AttachedLink::Managed(link),
                };
                self.record(interface, direction, AttachMode::Tcx, link);
                self.finish_pinning()?;
                Ok(AttachMode::Tcx)
            }
            Err(tcx) => {
                tracing::info!(interface, error = %tcx, "TCX attach failed; falling back to a clsact filter");
                self.attach_netlink_after(interface, direction, Some(tcx))
            }
        }
    }

    fn swap_into_pinned_link(
        &mut self,
        interface: &str,
        direction: Direction,
        found: FdLink,
    ) -> Result<AttachMode, InterceptorError> {
        let path = self
            .pins
            .as_ref()
            .map(|p| p.dir.link().display().to_string())
            .unwrap_or_default();
        let link_err = |source| InterceptorError::Link {
            path: path.clone(),
            source: Box::new(source),
        };
        if let Some(pins) = &self.pins {
            check_attached_here(&found, &pins.dir, interface, direction)?;
        }
        let link = SchedClassifierLink::try_from(found).map_err(link_err)?;
        let id = self.program()?.attach_to_link(link).map_err(program_err)?;
        self.record(
            interface,
            direction,
            AttachMode::Tcx,
            AttachedLink::Managed(id),
        );
        self.finish_pinning()?;
        Ok(AttachMode::Tcx)
    }

    /// Records the object digest once the link runs this object's program with the pinned maps.
    fn finish_pinning(&mut self) -> Result<(), InterceptorError> {
        if let Some(pins) = &self.pins
            && pins.adoption != Adoption::Adopted
        {
            pins.dir.record_digest()?;
        }
        Ok(())
    }

    /// Attaches as a clsact (netlink) filter, the path for kernels without TCX. Unlike a TCX link,
    /// such a filter outlives the process, so `detach` (or drop) must run.
    pub fn attach_clsact(
        &mut self,
        interface: &str,
        direction: Direction,
    ) -> Result<AttachMode, InterceptorError> {
        self.prepare_interface(interface)?;
        self.attach_netlink_after(interface, direction, None)
    }

    fn prepare_interface(&mut self, interface: &str) -> Result<(), InterceptorError> {
        let l3 = !has_ethernet_header(interface)?;
        let mut config = self.config;
        config.flags =
            (config.flags & !CONFIG_L3_INTERFACE) | if l3 { CONFIG_L3_INTERFACE } else { 0 };
        self.write_config(config)
    }

    fn attach_netlink_after(
        &mut self,
        interface: &str,
        direction: Direction,
        tcx: Option<ProgramError>,
    ) -> Result<AttachMode, InterceptorError> {
        // An existing clsact qdisc (someone else's filters) is fine to share; one we add is
        // ours to remove on exit.
        if tc::qdisc_add_clsact(interface).is_ok() {
            self.created_clsact.push(interface.to_owned());
        }
        let program = self.program()?;
        let link = program
            .attach_with_options(
                interface,
                direction.tc(),
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|netlink| match tcx {
                Some(tcx) => InterceptorError::Attach {
                    interface: interface.to_owned(),
                    direction,
                    tcx: Box::new(tcx),
                    netlink: Box::new(netlink),
                },
                None => program_err(netlink),
            })?;
        self.record(
            interface,
            direction,
            AttachMode::Netlink,
            AttachedLink::Managed(link),
        );
        Ok(AttachMode::Netlink)
    }

    fn record(
        &mut self,
        interface: &str,
        direction: Direction,
        mode: AttachMode,
        link: AttachedLink,
    ) {
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            direction,
            mode,
            link,
        });
    }

    /// Where the classifier is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Interfaces on which this classifier added the clsact qdisc (remove it after detaching).
    pub fn created_clsact(&self) -> &[String] {
        &self.created_clsact
    }

    /// Whether the attachment outlives this process (a pinned TCX link).
    pub fn is_pinned(&self) -> bool {
        self.attachments
            .iter()
            .any(|a| a.mode == AttachMode::Tcx && self.pins.is_some())
    }

    /// Detaches from every interface and removes the pins, if any. Dropping an unpinned
    /// classifier detaches it too; dropping a pinned one leaves it attached (fail closed).
    pub fn detach(&mut self) -> Result<(), InterceptorError> {
        let attachments = std::mem::take(&mut self.attachments);
        let mut first_error = None;
        if let Some(pins) = &self.pins
            && let Err(e) = pins.dir.remove_all()
        {
            first_error.get_or_insert(e.into());
        }
        let program = self.program()?;
        for attachment in attachments {
            match attachment.link {
                AttachedLink::Managed(id) => {
                    if let Err(e) = program.detach(id) {
                        first_error.get_or_insert(program_err(e));
                    }
                }
                // Unpinned above; closing the last fd detaches it.
                AttachedLink::Pinned(link) => drop(link),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes a compiled policy file the classifier's policy, without detaching.
    pub fn install(
        &mut self,
        policy: &crate::policy::CompiledPolicy,
    ) -> Result<(), InterceptorError> {
        self.install_tables(&set_tables(policy)?)
    }

    /// Makes a [`PolicySpec`] the classifier's policy, without detaching.
    pub fn install_spec(&mut self, policy: &PolicySpec) -> Result<(), InterceptorError> {
        self.install_tables(&build_tables(policy)?)
    }

    /// Fills the inactive map set with `tables`, then flips the config map to it: packets see
    /// either the old or the new policy, never a mix. On error the previous policy stays active.
    pub fn install_tables(&mut self, tables: &SetTables) -> Result<(), InterceptorError> {
        if tables.rules.len() > MAX_RULES as usize {
            return Err(TablesError::TooManyRules {
                count: tables.rules.len(),
            }
            .into());
        }
        if tables.rule_names.len() != tables.rules.len() {
            return Err(TablesError::NameCountMismatch {
                rules: tables.rules.len(),
                names: tables.rule_names.len(),
            }
            .into());
        }
        let set = (self.config.active_set + 1) % MAP_SETS;
        self.fill_set(set, tables)?;
        let mut config = self.config;
        config.active_set = set;
        config.flags |= CONFIG_ENABLED;
        self.write_config(config)?;
        self.rule_names = tables.rule_names.clone();
        Ok(())
    }

    /// The map set the classifier uses now.
    pub fn active_set(&self) -> u32 {
        self.config.active_set
    }

    fn fill_set(&mut self, set: u32, tables: &SetTables) -> Result<(), InterceptorError> {
        let set_byte = set as u8;
        fill_trie::<LpmV4>(
            self.map_mut(MAP_DST_V4)?,
            MAP_DST_V4,
            set_byte,
            &tables.dst_v4,
        )?;
        fill_trie::<LpmV4>(
            self.map_mut(MAP_SRC_V4)?,
            MAP_SRC_V4,
            set_byte,
            &tables.src_v4,
        )?;
        fill_trie::<LpmV6>(
            self.map_mut(MAP_DST_V6)?,
            MAP_DST_V6,
            set_byte,
            &tables.dst_v6,
        )?;
        fill_trie::<LpmV6>(
            self.map_mut(MAP_SRC_V6)?,
            MAP_SRC_V6,
            set_byte,
            &tables.src_v6,
        )?;

        let mut rules: Array<_, Rule> = self.map_mut(MAP_RULES)?;
        for index in 0..MAX_RULES {
            let rule = tables
                .rules
                .get(index as usize)
                .copied()
                .unwrap_or_default();
            rules
                .set(rule_index(set, index), rule, 0)
                .map_err(map_err(MAP_RULES))?;
        }

        let cpus = aya::util::nr_cpus().map_err(|(_, e)| InterceptorError::Cpus(e))?;
        let mut stats: PerCpuArray<_, RuleStats> = self.map_mut(MAP_STATS)?;
        for slot in 0..STATS_SLOTS {
            let zero = PerCpuValues::try_from(vec![RuleStats::default(); cpus])
                .map_err(|e| InterceptorError::Cpus(io::Error::other(e)))?;
            stats
                .set(stats_index(set, slot), zero, 0)
                .map_err(map_err(MAP_STATS))?;
        }

        let mut meta: Array<_, SetMeta> = self.map_mut(MAP_SETS_META)?;
        meta.set(set, tables.meta, 0)
            .map_err(map_err(MAP_SETS_META))?;
        Ok(())
    }

    /// Per-rule counters of the active policy, in rule order, then `default`.
    pub fn rule_stats(&self) -> Result<Vec<RuleCounters>, InterceptorError> {
        let stats: PerCpuArray<_, RuleStats> = self.map(MAP_STATS)?;
        let set = self.config.active_set;
        let slots = self
            .rule_names
            .iter()
            .enumerate()
            .map(|(i, name)| (i as u32, name.as_str()))
            .chain(std::iter::once((DEFAULT_SLOT, "default")));
        let mut out = Vec::with_capacity(self.rule_names.len() + 1);
        for (slot, name) in slots {
            let values = stats
                .get(&stats_index(set, slot), 0)
                .map_err(map_err(MAP_STATS))?;
            let (packets, bytes) = values.iter().fold((0u64, 0u64), |(p, b), v| {
                (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
            });
            out.push(RuleCounters {
                name: name.to_owned(),
                packets,
                bytes,
            });
        }
        Ok(out)
    }

    /// Every flow the classifier recorded for `tunnel`/`divert` verdicts.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, InterceptorError> {
        let flows: HashMap<_, FlowKey, FlowValue> = self.map(MAP_FLOWS)?;
        flows
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_FLOWS))
    }

    /// The recorded flow with this 5-tuple (see [`flow_key`]), if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, InterceptorError> {
        let flows: HashMap<_, FlowKey, FlowValue> = self.map(MAP_FLOWS)?;
        match flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_FLOWS)(e)),
        }
    }

    /// The classifier's own drop counters, summed over CPUs.
    pub fn events(&self) -> Result<ClassifierEvents, InterceptorError> {
        let events: PerCpuArray<_, u64> = self.map(MAP_EVENTS)?;
        let sum = |slot: u32| -> Result<u64, InterceptorError> {
            let values = events.get(&slot, 0).map_err(map_err(MAP_EVENTS))?;
            Ok(values.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
        };
        Ok(ClassifierEvents {
            flow_table_full: sum(EVENT_FLOW_TABLE_FULL)?,
            no_redirect_target: sum(EVENT_NO_REDIRECT_TARGET)?,
            uid_flow_cap: sum(EVENT_UID_FLOW_CAP)?,
        })
    }

    /// An independent handle on the flow map (for the sweep, and removal by the divert proxy)
    /// that does not borrow the classifier.
    pub fn flow_table(&self) -> Result<FlowTable, InterceptorError> {
        FlowTable::from_fds(
            self.hash_map_fd(MAP_FLOWS)?,
            self.hash_map_fd(MAP_UID_FLOWS)?,
        )
    }

    /// A duplicate of a map's descriptor: opening it again by id (BPF_MAP_GET_FD_BY_ID) would
    /// need CAP_SYS_ADMIN, which the systemd unit does not grant.
    fn hash_map_fd(&self, name: &'static str) -> Result<std::os::fd::OwnedFd, InterceptorError> {
        use std::os::fd::AsFd;
        match self.ebpf.map(name) {
            Some(Map::HashMap(data)) => {
                data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
                    map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    }))
                })
            }
            Some(_) => Err(map_err(name)(MapError::InvalidMapType { map_type: 0 })),
            None => Err(InterceptorError::MissingMap(name)),
        }
    }

    /// Caps the divert flows recorded per socket uid (0 = no cap); see `hoshino-common`.
    pub fn set_flows_per_uid(&mut self, cap: u32) -> Result<(), InterceptorError> {
        let mut config = self.config;
        config.flows_per_uid = cap;
        self.write_config(config)
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

/// Refuses a pinned link that is not attached at `direction` of `interface` in this network
/// namespace: swapping our program into it would change someone else's attachment (the same pin
/// path used from another namespace, or for another interface).
fn check_attached_here(
    link: &FdLink,
    dir: &PinDir,
    interface: &str,
    direction: Direction,
) -> Result<(), InterceptorError> {
    let path = dir.link().display().to_string();
    let program_id = link
        .info()
        .map_err(|source| InterceptorError::Link {
            path: path.clone(),
            source: Box::new(source),
        })?
        .program_id();
    let attach_type = match direction {
        Direction::Egress => super::tcx_query::BPF_TCX_EGRESS,
        Direction::Ingress => super::tcx_query::BPF_TCX_INGRESS,
    };
    // Ids only: aya's `query_tcx` also opens each program by id, which needs CAP_SYS_ADMIN.
    let attached = super::tcx_query::attached_program_ids(interface, attach_type)
        .map(|ids| ids.contains(&program_id))
        .unwrap_or(false);
    if attached {
        Ok(())
    } else {
        Err(InterceptorError::PinnedElsewhere {
            path,
            interface: interface.to_owned(),
        })
    }
}

/// Removes clsact filters carrying our program's name at `direction` of `interface`: left by a
/// crashed agent on a kernel without TCX, they would judge packets with a dead agent's maps.
fn remove_stale_filters(interface: &str, direction: Direction) {
    match tc::qdisc_detach_program(interface, direction.tc(), PROGRAM) {
        Ok(()) => tracing::info!(
            interface,
            "removed a clsact filter left by an earlier agent"
        ),
        Err(e) => tracing::debug!(interface, error = %e, "no stale clsact filter removed"),
    }
}

/// Removes what an agent pinned for `interface` under `root` (the link, so the program
/// detaches, the maps and the directory) and any clsact filter of ours on its egress. Returns
/// whether anything was removed. For `hoshino-agent detach`.
pub fn detach_pinned(root: &std::path::Path, interface: &str) -> Result<bool, InterceptorError> {
    let dir = PinDir::new(root, interface)?;
    let mut removed = false;
    if let Ok(link) = PinnedLink::from_pin(dir.link()) {
        let fd = FdLink::from(link);
        if check_attached_here(&fd, &dir, interface, Direction::Egress).is_err() {
            tracing::warn!(
                link = %dir.link().display(),
                interface,
                "the pinned link is not attached to this interface here (its interface may be gone); removing the pin anyway"
            );
        }
    }
    removed |= dir.remove_all()?;
    if tc::qdisc_detach_program(interface, TcAttachType::Egress, PROGRAM).is_ok() {
        removed = true;
    }
    Ok(removed)
}

/// LPM key data of one family: the set byte followed by the address bytes.
trait LpmData: aya::Pod {
    fn key(set: u8, prefix: &Prefix) -> Option<Self>;
    fn set_of(&self) -> u8;
}

impl LpmData for LpmV4 {
    fn key(set: u8, prefix: &Prefix) -> Option<Self> {
        let IpAddr::V4(addr) = prefix.addr() else {
            return None;
        };
        let mut data = [0u8; 5];
        data[0] = set;
        data[1..].copy_from_slice(&addr.octets());
        Some(data)
    }

    fn set_of(&self) -> u8 {
        self[0]
    }
}

impl LpmData for LpmV6 {
    fn key(set: u8, prefix: &Prefix) -> Option<Self> {
        let IpAddr::V6(addr) = prefix.addr() else {
            return None;
        };
        let mut data = [0u8; 17];
        data[0] = set;
        data[1..].copy_from_slice(&addr.octets());
        Some(data)
    }

    fn set_of(&self) -> u8 {
        self[0]
    }
}

/// Replaces map set `set`'s entries in one trie with `entries`.
fn fill_trie<K: LpmData>(
    mut trie: LpmTrie<&mut MapData, K, RuleSet>,
    name: &'static str,
    set: u8,
    entries: &[(Prefix, RuleSet)],
) -> Result<(), InterceptorError> {
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|key| key.data().set_of() == set)
        .collect();
    for key in &stale {
        match trie.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    for (prefix, rules) in entries {
        let Some(data) = K::key(set, prefix) else {
            continue;
        };
        let key = Key::new(LPM_SET_BITS + u32::from(prefix.len()), data);
        trie.insert(&key, rules, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// The flow map key for a 5-tuple as the classifier sees it leaving the interface.
pub fn flow_key(src: IpAddr, dst: IpAddr, proto: u8, src_port: u16, dst_port: u16) -> FlowKey {
    let mut key = FlowKey {
        src_port,
        dst_port,
        proto,
        ..FlowKey::default()
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            key.family = FAMILY_V4;
            key.src[..4].copy_from_slice(&s.octets());
            key.dst[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            key.family = FAMILY_V6;
            key.src = to_v6_octets(s);
            key.dst = to_v6_octets(d);
        }
    }
    key
}

fn to_v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Whether `interface` carries Ethernet headers (TC sees the packet from its MAC header), asked
/// with `SIOCGIFHWADDR` in the calling thread's network namespace.
fn has_ethernet_header(interface: &str) -> Result<bool, InterceptorError> {
    let no_interface = |source: io::Error| InterceptorError::NoInterface {
        interface: interface.to_owned(),
        source,
    };
    let name = CString::new(interface)
        .map_err(|e| no_interface(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let bytes = name.as_bytes_with_nul();
    // SAFETY: a zeroed ifreq is a valid argument; the name fits (checked below).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.len() > req.ifr_name.len() {
        return Err(no_interface(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        )));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(no_interface(io::Error::last_os_error()));
    }
    // SAFETY: fd is a valid socket and req a valid ifreq for SIOCGIFHWADDR.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(no_interface(err));
    }
    // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    // Loopback uses an all-zero Ethernet header too.
    Ok(family == libc::ARPHRD_ETHER || family == libc::ARPHRD_LOOPBACK)
}
