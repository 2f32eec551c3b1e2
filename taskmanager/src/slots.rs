//! The slot table: which allocation owns each slot and which task runs in it. Pure logic, no
//! I/O; the gRPC service holds it under a lock.

use keel_proto::pb::{SlotAllocation, SlotStatus};
use keel_proto::{KeelError, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slot {
    pub allocation: Option<SlotAllocation>,
    /// The task running in the slot (not yet terminal), if any.
    pub task_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SlotTable {
    taskmanager_id: String,
    slots: Vec<Slot>,
}

/// What [`SlotTable::allocate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocated {
    /// The slot was free and is now allocated.
    Newly,
    /// The slot already was allocated to the same allocation (a retried request).
    Already,
}

fn owner(a: &SlotAllocation) -> String {
    format!("allocation {} (job {} version {})", a.allocation_id, a.job_id, a.version)
}

impl SlotTable {
    pub fn new(taskmanager_id: impl Into<String>, num_slots: u32) -> Self {
        SlotTable { taskmanager_id: taskmanager_id.into(), slots: vec![Slot::default(); num_slots as usize] }
    }

    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, index: u32) -> Option<&Slot> {
        self.slots.get(index as usize)
    }

    fn slot_mut(&mut self, index: u32) -> Result<&mut Slot> {
        let len = self.slots.len();
        self.slots.get_mut(index as usize).ok_or_else(|| KeelError::InvalidArgument {
            reason: format!(
                "slot index {index} is out of range: taskmanager {} has {len} slots",
                self.taskmanager_id
            ),
        })
    }

    /// Allocates slot `index` to `allocation`. Idempotent for the same allocation id; a slot
    /// owned by another allocation is a `FailedPrecondition` naming the owner.
    pub fn allocate(&mut self, index: u32, allocation: SlotAllocation) -> Result<Allocated> {
        let tm = self.taskmanager_id.clone();
        let slot = self.slot_mut(index)?;
        match &slot.allocation {
            None => {
                slot.allocation = Some(allocation);
                Ok(Allocated::Newly)
            }
            Some(current) if current.allocation_id == allocation.allocation_id => Ok(Allocated::Already),
            Some(current) => Err(KeelError::FailedPrecondition {
                reason: format!(
                    "slot {index} of taskmanager {tm} is already allocated to {}; cannot allocate it to {}",
                    owner(current),
                    owner(&allocation)
                ),
            }),
        }
    }

    /// Frees the slot allocated to `allocation_id`. Returns its index and the task running in
    /// it, or `None` when no slot has that allocation.
    pub fn free(&mut self, allocation_id: &str) -> Option<(u32, Option<String>)> {
        let (index, slot) = self
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.allocation.as_ref().is_some_and(|a| a.allocation_id == allocation_id))?;
        slot.allocation = None;
        Some((index as u32, slot.task_id.take()))
    }

    /// Stamps the allocation `allocation_id` with a newer JobManager leader's epoch (that leader
    /// adopted the task running in it). False when no slot has that allocation.
    pub fn restamp(&mut self, allocation_id: &str, jobmanager_epoch: u64) -> bool {
        let slot = self
            .slots
            .iter_mut()
            .filter_map(|s| s.allocation.as_mut())
            .find(|a| a.allocation_id == allocation_id);
        match slot {
            Some(a) => {
                a.jobmanager_epoch = a.jobmanager_epoch.max(jobmanager_epoch);
                true
            }
            None => false,
        }
    }

    /// Checks that a task of `job_id` may be deployed into slot `index` under `allocation_id`.
    pub fn check_deploy(&self, index: u32, allocation_id: &str, job_id: &str) -> Result<()> {
        let tm = &self.taskmanager_id;
        let slot = self.slots.get(index as usize).ok_or_else(|| KeelError::InvalidArgument {
            reason: format!(
                "slot index {index} is out of range: taskmanager {tm} has {} slots",
                self.slots.len()
            ),
        })?;
        match &slot.allocation {
            None => Err(KeelError::FailedPrecondition {
                reason: format!(
                    "slot {index} of taskmanager {tm} is not allocated to allocation {allocation_id}: the slot is free"
                ),
            }),
            Some(a) if a.allocation_id != allocation_id => Err(KeelError::FailedPrecondition {
                reason: format!(
                    "slot {index} of taskmanager {tm} is not allocated to allocation {allocation_id}: it belongs to {}",
                    owner(a)
                ),
            }),
            Some(a) if !a.job_id.is_empty() && !job_id.is_empty() && a.job_id != job_id => {
                Err(KeelError::FailedPrecondition {
                    reason: format!(
                        "slot {index} of taskmanager {tm} is allocated to job {}, not to job {job_id}",
                        a.job_id
                    ),
                })
            }
            Some(_) => Ok(()),
        }
    }

    pub fn set_task(&mut self, index: u32, task_id: &str) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.task_id = Some(task_id.to_string());
        }
    }

    /// Clears the task of slot `index` if it still is `task_id`.
    pub fn clear_task(&mut self, index: u32, task_id: &str) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            if slot.task_id.as_deref() == Some(task_id) {
                slot.task_id = None;
            }
        }
    }

    /// The slot report sent to the ResourceManager.
    pub fn report(&self) -> Vec<SlotStatus> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotStatus {
                index: i as u32,
                allocation: s.allocation.clone(),
                task_id: s.task_id.clone().unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, job: &str) -> SlotAllocation {
        SlotAllocation { allocation_id: id.into(), job_id: job.into(), version: 1, jobmanager_epoch: 1 }
    }

    /// Allocating is idempotent per allocation id; another allocation gets an error naming the
    /// slot, the TaskManager and the current owner; out-of-range indices are invalid arguments.
    #[test]
    fn allocate_is_idempotent_and_names_the_owner_on_conflict() {
        let mut t = SlotTable::new("tm-a", 2);
        assert_eq!(t.allocate(0, alloc("a1", "j")), Ok(Allocated::Newly));
        assert_eq!(t.allocate(0, alloc("a1", "j")), Ok(Allocated::Already));
        match t.allocate(0, alloc("a2", "k")) {
            Err(KeelError::FailedPrecondition { reason }) => {
                assert!(reason.contains("slot 0"), "{reason}");
                assert!(reason.contains("tm-a"), "{reason}");
                assert!(reason.contains("a1"), "{reason}");
            }
            other => panic!("expected FailedPrecondition, got {other:?}"),
        }
        assert!(matches!(t.allocate(2, alloc("a3", "j")), Err(KeelError::InvalidArgument { .. })));
    }

    /// Freeing returns the slot and its task; an unknown allocation frees nothing.
    #[test]
    fn free_returns_the_task_and_clears_the_slot() {
        let mut t = SlotTable::new("tm-a", 2);
        t.allocate(1, alloc("a1", "j")).expect("allocate");
        t.set_task(1, "j/1/0#0");
        assert_eq!(t.report()[1].task_id, "j/1/0#0");
        assert_eq!(t.free("nope"), None);
        assert_eq!(t.free("a1"), Some((1, Some("j/1/0#0".into()))));
        assert_eq!(t.report()[1], SlotStatus { index: 1, allocation: None, task_id: String::new() });
    }

    /// Deploying needs the slot to be allocated to the deploying allocation (and job).
    #[test]
    fn deploy_needs_the_right_allocation() {
        let mut t = SlotTable::new("tm-a", 1);
        let err = t.check_deploy(0, "a1", "j").expect_err("free slot");
        assert!(err.to_string().contains("not allocated to allocation a1"), "{err}");
        t.allocate(0, alloc("a2", "j")).expect("allocate");
        let err = t.check_deploy(0, "a1", "j").expect_err("other allocation");
        assert!(err.to_string().contains("belongs to allocation a2"), "{err}");
        t.check_deploy(0, "a2", "j").expect("right allocation");
        assert!(t.check_deploy(0, "a2", "other").is_err());
        assert!(matches!(t.check_deploy(3, "a2", "j"), Err(KeelError::InvalidArgument { .. })));
    }
}
