//! The bound on terminated connections: at most so many in all and per uid, so one user (or
//! every forwarded container, which share the no-socket uid) cannot starve the rest.

use std::collections::HashMap;

/// Default bound on connections in all: with at most 20 KiB of socket buffers and one answer
/// (at most 256 KiB) each, the proxy's memory stays bounded even when no client reads.
pub const MAX_CONNECTIONS: usize = 256;
/// Default bound on connections per uid.
pub const MAX_PER_UID: usize = 32;

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("the proxy already holds {0} connections")]
    Full(usize),
    #[error("uid {uid} already holds {count} connections")]
    UidCap { uid: u32, count: usize },
}

impl AdmissionError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Full(_) => "table_full",
            Self::UidCap { .. } => "uid_cap",
        }
    }
}

/// Counts connections per uid against the bounds.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_uid: usize,
    total: usize,
    per_uid: HashMap<u32, usize>,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(MAX_CONNECTIONS, MAX_PER_UID)
    }
}

impl Admission {
    pub fn new(max_total: usize, max_per_uid: usize) -> Self {
        Self {
            max_total,
            max_per_uid,
            total: 0,
            per_uid: HashMap::new(),
        }
    }

    /// Takes a slot for `uid`, or says why not.
    pub fn admit(&mut self, uid: u32) -> Result<(), AdmissionError> {
        if self.total >= self.max_total {
            return Err(AdmissionError::Full(self.total));
        }
        let count = self.per_uid.entry(uid).or_insert(0);
        if *count >= self.max_per_uid {
            return Err(AdmissionError::UidCap { uid, count: *count });
        }
        *count += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Self::admit`].
    pub fn release(&mut self, uid: u32) {
        if let Some(count) = self.per_uid.get_mut(&uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_uid.remove(&uid);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_cannot_take_every_slot() {
        let mut a = Admission::new(4, 2);
        assert_eq!(a.admit(1000), Ok(()));
        assert_eq!(a.admit(1000), Ok(()));
        assert_eq!(
            a.admit(1000),
            Err(AdmissionError::UidCap {
                uid: 1000,
                count: 2
            })
        );
        assert_eq!(a.admit(65534), Ok(()));
        assert_eq!(a.admit(1001), Ok(()));
        assert_eq!(a.admit(1002), Err(AdmissionError::Full(4)));
        a.release(1000);
        assert_eq!(a.total(), 3);
        assert_eq!(a.admit(1000), Ok(()));
    }

    #[test]
    fn releasing_an_unknown_uid_changes_nothing() {
        let mut a = Admission::new(4, 2);
        a.release(5);
        assert_eq!(a.total(), 0);
    }
}
