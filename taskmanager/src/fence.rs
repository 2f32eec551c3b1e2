//! Epoch fencing: the highest leader epoch seen per role.

use std::sync::atomic::{AtomicU64, Ordering};

use keel_ha::Role;
use keel_proto::{KeelError, Result};

/// The highest epoch seen from the leaders of one role. A request carrying a lower epoch comes
/// from a deposed leader and is rejected.
#[derive(Debug)]
pub struct EpochFence {
    role: Role,
    seen: AtomicU64,
}

impl EpochFence {
    pub fn new(role: Role) -> Self {
        EpochFence { role, seen: AtomicU64::new(0) }
    }

    /// The highest epoch seen so far (0 before the first).
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// Accepts `received` when it is at least the highest epoch seen (and remembers it), or
    /// fails with `StaleEpoch`.
    pub fn observe(&self, received: u64) -> Result<()> {
        let mut current = self.seen.load(Ordering::SeqCst);
        loop {
            if received < current {
                return Err(KeelError::StaleEpoch {
                    role: self.role.as_str().to_string(),
                    received,
                    seen: current,
                });
            }
            if received == current {
                return Ok(());
            }
            match self.seen.compare_exchange(current, received, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    tracing::info!(role = %self.role, epoch = received, previous = current, "new leader epoch seen");
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower epoch than one already seen is rejected with both epochs; equal and higher pass.
    #[test]
    fn lower_epochs_are_rejected_and_higher_ones_remembered() {
        let fence = EpochFence::new(Role::JobManager);
        assert_eq!(fence.seen(), 0);
        fence.observe(5).expect("first epoch");
        fence.observe(5).expect("same epoch");
        assert_eq!(
            fence.observe(3),
            Err(KeelError::StaleEpoch { role: "jobmanager".into(), received: 3, seen: 5 })
        );
        fence.observe(7).expect("higher epoch");
        assert_eq!(fence.seen(), 7);
        assert!(matches!(fence.observe(5), Err(KeelError::StaleEpoch { seen: 7, .. })));
    }
}
