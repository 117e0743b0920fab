//! Attaching the loaded classifier: a TCX link (pinned or owned), or a clsact filter on kernels
//! without TCX; detaching; and removing what a crashed or earlier agent left attached.

use aya::programs::{
    LinkOrder, ProgramError, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
};
use hoshino_common::CONFIG_L3_INTERFACE;

use super::load::{Adoption, check_attached_here};
use super::{Classifier, InterceptorError, PROGRAM, link_layer, program_err};
use crate::interceptor::pin::PinDir;

/// Which side of the interface the classifier sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub(super) fn tc(self) -> TcAttachType {
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

impl Classifier {
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
        let l3 = !link_layer::has_ethernet_header(interface)?;
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
