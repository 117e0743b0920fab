//! Loading the embedded classifier object into the kernel, plain or with its maps pinned in
//! bpffs (adopting or replacing what an earlier agent pinned).

use std::io;

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{
        ProgramError, SchedClassifier,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use hoshino_common::Config;

use super::{
    Classifier, ClassifierOptions, Direction, InterceptorError, MAP_CONFIG, PROGRAM, map_err,
    program_err,
};
use crate::interceptor::{
    object::CLASSIFIER_OBJECT,
    pin::{PINNED_MAPS, PinDir, object_digest},
};

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

/// Pin state of a classifier loaded with [`Classifier::load_pinned`].
#[derive(Debug)]
pub(super) struct Pins {
    pub(super) dir: PinDir,
    pub(super) adoption: Adoption,
    /// The link found pinned at load, until [`Classifier::attach`] swaps the program into it.
    pub(super) found_link: Option<FdLink>,
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
}

/// Refuses a pinned link that is not attached at `direction` of `interface` in this network
/// namespace: swapping our program into it would change someone else's attachment (the same pin
/// path used from another namespace, or for another interface).
pub(super) fn check_attached_here(
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
        Direction::Egress => crate::interceptor::tcx_query::BPF_TCX_EGRESS,
        Direction::Ingress => crate::interceptor::tcx_query::BPF_TCX_INGRESS,
    };
    // Ids only: aya's `query_tcx` also opens each program by id, which needs CAP_SYS_ADMIN.
    let attached = crate::interceptor::tcx_query::attached_program_ids(interface, attach_type)
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
