//! The loaded classifier: attach/detach, map filling with an atomic set flip, counters, flows.

use std::{ffi::CString, io, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};
use aya_log::EbpfLogger;
use hoshino_common::{
    CONFIG_ENABLED, CONFIG_L3_INTERFACE, CONFIG_LOG_VERDICTS, Config, DEFAULT_SLOT, FAMILY_V4,
    FAMILY_V6, FlowKey, FlowValue, LPM_SET_BITS, LpmV4, LpmV6, MAP_SETS, MAX_RULES, Rule, RuleSet,
    RuleStats, STATS_SLOTS, SetMeta, rule_index, stats_index,
};

use super::{
    from_policy::set_tables,
    logs::TracingLog,
    object::CLASSIFIER_OBJECT,
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
    link: SchedClassifierLinkId,
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
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("config", &self.config)
            .field("rule_names", &self.rule_names)
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Loads the embedded classifier into the kernel (not attached, passing everything until the
    /// first [`Classifier::install`]).
    pub fn load(options: &ClassifierOptions) -> Result<Self, InterceptorError> {
        let mut ebpf =
            Ebpf::load(CLASSIFIER_OBJECT).map_err(|e| InterceptorError::Load(Box::new(e)))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| program_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        let mut classifier = Self {
            ebpf,
            config: Config::default(),
            rule_names: Vec::new(),
            attachments: Vec::new(),
        };
        classifier.configure(options)?;
        Ok(classifier)
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
    pub fn attach(
        &mut self,
        interface: &str,
        direction: Direction,
    ) -> Result<AttachMode, InterceptorError> {
        self.prepare_interface(interface)?;
        let program = self.program()?;
        match program.attach_with_options(
            interface,
            direction.tc(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        ) {
            Ok(link) => {
                self.record(interface, direction, AttachMode::Tcx, link);
                Ok(AttachMode::Tcx)
            }
            Err(tcx) => {
                tracing::info!(interface, error = %tcx, "TCX attach failed; falling back to a clsact filter");
                self.attach_netlink_after(interface, direction, Some(tcx))
            }
        }
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
        // An existing clsact qdisc (someone else's filters) is fine to share.
        let _ = tc::qdisc_add_clsact(interface);
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
        self.record(interface, direction, AttachMode::Netlink, link);
        Ok(AttachMode::Netlink)
    }

    fn record(
        &mut self,
        interface: &str,
        direction: Direction,
        mode: AttachMode,
        link: SchedClassifierLinkId,
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

    /// Detaches from every interface (dropping the classifier does the same).
    pub fn detach(&mut self) -> Result<(), InterceptorError> {
        let attachments = std::mem::take(&mut self.attachments);
        let program = self.program()?;
        let mut first_error = None;
        for attachment in attachments {
            if let Err(e) = program.detach(attachment.link) {
                first_error.get_or_insert(program_err(e));
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

    /// Deletes the recorded flow with this 5-tuple (the proxy's connection on it ended); a
    /// missing entry is not an error.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), InterceptorError> {
        let mut flows: HashMap<_, FlowKey, FlowValue> = self.map_mut(MAP_FLOWS)?;
        match flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_FLOWS)(e)),
        }
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
