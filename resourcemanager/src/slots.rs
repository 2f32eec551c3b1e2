//! The slot table: pure decision logic, no I/O, tested without a network.
//!
//! The table knows every registered TaskManager, its slots and who each slot is allocated to.
//! It is rebuilt from the TaskManagers' own reports when a new ResourceManager leader starts;
//! the TaskManagers are the source of truth for allocations, the table is a cache that also
//! holds allocations still on their way to a TaskManager.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_proto::pb::{SlotAllocation, SlotStatus};

/// How long the table remembers an allocation it freed or lost with its TaskManager (see
/// [`SlotTable::take_zombies`]).
pub const DEAD_MEMORY: Duration = Duration::from_secs(600);

/// How long an allocation the TaskManager has not confirmed yet is kept against a report that
/// says the slot is free (the AllocateSlot call may still be on its way).
pub const UNCONFIRMED_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub allocation: Option<SlotAllocation>,
    pub task_id: String,
    /// When the table (not a report) last changed this slot's allocation.
    pub changed_at: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct TaskManagerEntry {
    pub id: String,
    pub address: String,
    pub slots: Vec<Slot>,
    pub last_heartbeat: Instant,
    pub memory_rss_bytes: u64,
}

impl TaskManagerEntry {
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.allocation.is_none()).count()
    }
}

/// A slot chosen for an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub taskmanager_id: String,
    pub address: String,
    pub index: u32,
    pub allocation_id: String,
}

/// What the table knows about one lost TaskManager.
#[derive(Debug, Clone)]
pub struct Lost {
    pub taskmanager_id: String,
    pub address: String,
    pub allocations: Vec<SlotAllocation>,
}

#[derive(Debug, Default)]
pub struct SlotTable {
    taskmanagers: BTreeMap<String, TaskManagerEntry>,
    /// Allocations this table freed, or lost with their TaskManager, and when. Their jobs were
    /// told (released, or failed over), so a TaskManager that reports one again missed the
    /// FreeSlot call (it was cut off or paused then): the allocation is not taken back but
    /// freed on the TaskManager, or its slot would stay taken for good.
    dead: BTreeMap<String, Instant>,
    /// Dead allocations TaskManagers reported, to free on them.
    zombies: Vec<Chosen>,
}

fn slots_from_report(num_slots: u32, report: &[SlotStatus]) -> Vec<Slot> {
    let mut slots: Vec<Slot> =
        (0..num_slots).map(|_| Slot { allocation: None, task_id: String::new(), changed_at: None }).collect();
    for s in report {
        if let Some(slot) = slots.get_mut(s.index as usize) {
            slot.allocation = s.allocation.clone();
            slot.task_id = s.task_id.clone();
        }
    }
    slots
}

impl SlotTable {
    pub fn new() -> Self {
        SlotTable::default()
    }

    /// Registers (or re-registers) a TaskManager with its full slot report. Returns the
    /// allocations of the previous registration that the report no longer carries.
    pub fn register(
        &mut self,
        id: &str,
        address: &str,
        num_slots: u32,
        report: &[SlotStatus],
        memory_rss_bytes: u64,
        now: Instant,
    ) {
        self.forget_dead(now);
        let mut slots = slots_from_report(num_slots, report);
        for (index, slot) in slots.iter_mut().enumerate() {
            let dead = slot.allocation.as_ref().filter(|a| self.dead.contains_key(&a.allocation_id));
            if let Some(a) = dead {
                self.zombies.push(Chosen {
                    taskmanager_id: id.to_string(),
                    address: address.to_string(),
                    index: index as u32,
                    allocation_id: a.allocation_id.clone(),
                });
                slot.allocation = None;
                slot.task_id.clear();
            }
        }
        let entry = TaskManagerEntry {
            id: id.to_string(),
            address: address.to_string(),
            slots,
            last_heartbeat: now,
            memory_rss_bytes,
        };
        self.taskmanagers.insert(id.to_string(), entry);
    }

    /// Applies a heartbeat's slot report. Returns false when the TaskManager is not registered
    /// (it must register).
    pub fn heartbeat(
        &mut self,
        id: &str,
        report: &[SlotStatus],
        memory_rss_bytes: u64,
        now: Instant,
    ) -> bool {
        self.forget_dead(now);
        let Some(tm) = self.taskmanagers.get_mut(id) else {
            return false;
        };
        tm.last_heartbeat = now;
        tm.memory_rss_bytes = memory_rss_bytes;
        for (index, slot) in tm.slots.iter_mut().enumerate() {
            let reported = report.iter().find(|s| s.index as usize == index);
            let reported_alloc = reported.and_then(|s| s.allocation.clone());
            let recently_changed =
                slot.changed_at.is_some_and(|t| now.saturating_duration_since(t) < UNCONFIRMED_GRACE);
            let dead = reported_alloc
                .as_ref()
                .filter(|a| slot.allocation.is_none() && self.dead.contains_key(&a.allocation_id));
            if let Some(a) = dead {
                // Missed its FreeSlot: freed on the TaskManager by the caller, not taken back.
                self.zombies.push(Chosen {
                    taskmanager_id: tm.id.clone(),
                    address: tm.address.clone(),
                    index: index as u32,
                    allocation_id: a.allocation_id.clone(),
                });
            } else if reported_alloc == slot.allocation {
                slot.changed_at = None;
            } else if !recently_changed {
                // The TaskManager is the source of truth once our own change had time to land.
                slot.allocation = reported_alloc;
                slot.changed_at = None;
            }
            slot.task_id = reported.map(|s| s.task_id.clone()).unwrap_or_default();
        }
        true
    }

    /// Chooses `count` free slots for one allocation request, spread over TaskManagers: each
    /// slot goes to the TaskManager with the most free slots left (ties by id). Returns None
    /// (and changes nothing) when fewer than `count` slots are free.
    pub fn allocate(
        &mut self,
        count: u32,
        make_allocation: &mut dyn FnMut() -> SlotAllocation,
        now: Instant,
    ) -> Option<Vec<Chosen>> {
        if (self.free_slots() as u32) < count {
            return None;
        }
        let mut chosen = Vec::new();
        for _ in 0..count {
            let tm = self
                .taskmanagers
                .values_mut()
                .filter(|tm| tm.free_slots() > 0)
                .max_by(|a, b| a.free_slots().cmp(&b.free_slots()).then_with(|| b.id.cmp(&a.id)))?;
            let (index, slot) = tm.slots.iter_mut().enumerate().find(|(_, s)| s.allocation.is_none())?;
            let allocation = make_allocation();
            chosen.push(Chosen {
                taskmanager_id: tm.id.clone(),
                address: tm.address.clone(),
                index: index as u32,
                allocation_id: allocation.allocation_id.clone(),
            });
            slot.allocation = Some(allocation);
            slot.changed_at = Some(now);
        }
        Some(chosen)
    }

    /// Frees the slot holding `allocation_id`; returns where it was.
    pub fn free(&mut self, allocation_id: &str, now: Instant) -> Option<Chosen> {
        for tm in self.taskmanagers.values_mut() {
            for (index, slot) in tm.slots.iter_mut().enumerate() {
                if slot.allocation.as_ref().is_some_and(|a| a.allocation_id == allocation_id) {
                    self.dead.insert(allocation_id.to_string(), now);
                    slot.allocation = None;
                    slot.task_id.clear();
                    slot.changed_at = Some(now);
                    return Some(Chosen {
                        taskmanager_id: tm.id.clone(),
                        address: tm.address.clone(),
                        index: index as u32,
                        allocation_id: allocation_id.to_string(),
                    });
                }
            }
        }
        None
    }

    /// Allocation ids made for a JobManager leader older than `epoch` (0: none). Once a newer
    /// leader has been seen they are garbage: a new leader releases its jobs' slots and
    /// allocates its own, but a TaskManager that re-registers afterwards (after a quorum loss)
    /// reports the old ones again.
    pub fn allocations_below_epoch(&self, epoch: u64) -> Vec<String> {
        self.taskmanagers
            .values()
            .flat_map(|tm| tm.slots.iter())
            .filter_map(|s| s.allocation.as_ref())
            .filter(|a| a.jobmanager_epoch < epoch)
            .map(|a| a.allocation_id.clone())
            .collect()
    }

    /// Allocation ids of a job (of one version when `version` is non-zero).
    pub fn allocations_of(&self, job_id: &str, version: u32) -> Vec<String> {
        self.taskmanagers
            .values()
            .flat_map(|tm| tm.slots.iter())
            .filter_map(|s| s.allocation.as_ref())
            .filter(|a| a.job_id == job_id && (version == 0 || a.version == version))
            .map(|a| a.allocation_id.clone())
            .collect()
    }

    /// Removes TaskManagers whose last heartbeat is older than `timeout`.
    pub fn expire(&mut self, timeout: Duration, now: Instant) -> Vec<Lost> {
        let expired: Vec<String> = self
            .taskmanagers
            .values()
            .filter(|tm| now.saturating_duration_since(tm.last_heartbeat) > timeout)
            .map(|tm| tm.id.clone())
            .collect();
        expired.into_iter().filter_map(|id| self.remove(&id)).collect()
    }

    /// Removes a TaskManager, returning the allocations it carried (dead from now on: their
    /// jobs fail over).
    pub fn remove(&mut self, id: &str) -> Option<Lost> {
        let tm = self.taskmanagers.remove(id)?;
        let now = Instant::now();
        let allocations: Vec<SlotAllocation> = tm.slots.into_iter().filter_map(|s| s.allocation).collect();
        for a in &allocations {
            self.dead.insert(a.allocation_id.clone(), now);
        }
        Some(Lost { taskmanager_id: tm.id, address: tm.address, allocations })
    }

    /// Dead allocations (freed here, or lost with their TaskManager) that TaskManagers reported
    /// since the last call: the caller frees them on those TaskManagers.
    pub fn take_zombies(&mut self) -> Vec<Chosen> {
        std::mem::take(&mut self.zombies)
    }

    fn forget_dead(&mut self, now: Instant) {
        self.dead.retain(|_, at| now.saturating_duration_since(*at) < DEAD_MEMORY);
    }

    pub fn get(&self, id: &str) -> Option<&TaskManagerEntry> {
        self.taskmanagers.get(id)
    }

    pub fn taskmanagers(&self) -> impl Iterator<Item = &TaskManagerEntry> {
        self.taskmanagers.values()
    }

    pub fn total_slots(&self) -> usize {
        self.taskmanagers.values().map(|tm| tm.slots.len()).sum()
    }

    pub fn free_slots(&self) -> usize {
        self.taskmanagers.values().map(|tm| tm.free_slots()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_maker(job: &str) -> impl FnMut() -> SlotAllocation {
        let job = job.to_string();
        let mut n = 0;
        move || {
            n += 1;
            SlotAllocation {
                allocation_id: format!("{job}-a{n}"),
                job_id: job.clone(),
                version: 1,
                jobmanager_epoch: 1,
            }
        }
    }

    fn table_with(tms: &[(&str, u32)]) -> (SlotTable, Instant) {
        let now = Instant::now();
        let mut t = SlotTable::new();
        for (id, n) in tms {
            t.register(id, &format!("{id}:1"), *n, &[], 0, now);
        }
        (t, now)
    }

    /// An allocation freed here (or lost with its TaskManager) that a TaskManager reports again,
    /// because it missed the FreeSlot call while cut off or paused, is not taken back: the slot
    /// stays free and the allocation is handed to the caller to free on the TaskManager.
    #[test]
    fn a_dead_allocation_reported_again_is_freed_not_taken_back() {
        let (mut t, now) = table_with(&[("tm-a", 2), ("tm-b", 2)]);
        let chosen = t.allocate(2, &mut alloc_maker("j"), now).expect("two slots");
        let on_a = chosen.iter().find(|c| c.taskmanager_id == "tm-a").expect("one on tm-a").clone();
        let report = |c: &Chosen| SlotStatus {
            index: c.index,
            allocation: Some(SlotAllocation {
                allocation_id: c.allocation_id.clone(),
                job_id: "j".into(),
                version: 1,
                jobmanager_epoch: 1,
            }),
            task_id: "t".into(),
        };
        // Released by the job; tm-a never got the FreeSlot and keeps reporting it.
        t.free(&on_a.allocation_id, now);
        let later = now + UNCONFIRMED_GRACE * 2;
        assert!(t.heartbeat("tm-a", &[report(&on_a)], 0, later));
        assert_eq!(t.get("tm-a").map(TaskManagerEntry::free_slots), Some(2));
        assert_eq!(t.take_zombies(), vec![on_a.clone()]);
        assert!(t.take_zombies().is_empty(), "handed over once per report");
        // tm-b is lost with its allocation and registers again still carrying it.
        let on_b = chosen.iter().find(|c| c.taskmanager_id == "tm-b").expect("one on tm-b").clone();
        assert!(t.remove("tm-b").is_some());
        t.register("tm-b", "tm-b:1", 2, &[report(&on_b)], 0, later);
        assert_eq!(t.free_slots(), 4);
        assert_eq!(t.take_zombies(), vec![on_b]);
        // A new leader's table (nothing dead) takes a reported allocation over, as before.
        let mut fresh = SlotTable::new();
        fresh.register("tm-a", "tm-a:1", 2, &[report(&on_a)], 0, later);
        assert_eq!(fresh.free_slots(), 1);
        assert!(fresh.take_zombies().is_empty());
    }

    /// A job's slots are spread over TaskManagers rather than packed into the first one.
    #[test]
    fn allocation_spreads_over_taskmanagers() {
        let (mut t, now) = table_with(&[("tm-a", 4), ("tm-b", 4), ("tm-c", 4)]);
        let chosen = t.allocate(3, &mut alloc_maker("j"), now).expect("enough slots");
        let mut tms: Vec<_> = chosen.iter().map(|c| c.taskmanager_id.clone()).collect();
        tms.sort();
        assert_eq!(tms, vec!["tm-a", "tm-b", "tm-c"]);
        assert_eq!(t.free_slots(), 9);
    }

    /// A request that cannot be served entirely takes nothing (gang allocation).
    #[test]
    fn allocation_is_all_or_nothing() {
        let (mut t, now) = table_with(&[("tm-a", 2)]);
        assert!(t.allocate(3, &mut alloc_maker("j"), now).is_none());
        assert_eq!(t.free_slots(), 2);
    }

    /// Freed and lost slots come back; losing a TaskManager returns the allocations it held.
    #[test]
    fn free_and_loss_return_slots_and_name_owners() {
        let (mut t, now) = table_with(&[("tm-a", 1), ("tm-b", 1)]);
        let chosen = t.allocate(2, &mut alloc_maker("j"), now).expect("two slots");
        assert_eq!(t.free_slots(), 0);
        assert!(t.free(&chosen[0].allocation_id, now).is_some());
        assert_eq!(t.free_slots(), 1);
        let later = now + Duration::from_secs(10);
        t.heartbeat("tm-a", &[], 0, later);
        let lost = t.expire(Duration::from_secs(5), later);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].taskmanager_id, chosen[1].taskmanager_id);
        assert_eq!(lost[0].allocations[0].job_id, "j");
    }

    /// A new leader's table is rebuilt from reports: reported allocations are taken as they are.
    #[test]
    fn registration_rebuilds_allocations_from_the_report() {
        let now = Instant::now();
        let mut t = SlotTable::new();
        let report = vec![SlotStatus {
            index: 1,
            allocation: Some(SlotAllocation {
                allocation_id: "x".into(),
                job_id: "j".into(),
                version: 1,
                jobmanager_epoch: 1,
            }),
            task_id: "j/1/0#1".into(),
        }];
        t.register("tm-a", "a:1", 2, &report, 0, now);
        assert_eq!(t.free_slots(), 1);
        assert_eq!(t.allocations_of("j", 0), vec!["x".to_string()]);
    }

    /// An allocation that a new JobManager leader adopted reaches the table re-stamped with its
    /// epoch through the TaskManager's next heartbeat, and is then no longer an older leader's
    /// garbage; one nobody adopted still is.
    #[test]
    fn adopted_allocations_are_restamped_by_the_heartbeat() {
        let now = Instant::now();
        let mut t = SlotTable::new();
        let slot = |index: u32, id: &str, epoch: u64| SlotStatus {
            index,
            allocation: Some(SlotAllocation {
                allocation_id: id.into(),
                job_id: "j".into(),
                version: 1,
                jobmanager_epoch: epoch,
            }),
            task_id: format!("j/v1/{index}#1"),
        };
        t.register("tm-a", "a:1", 2, &[slot(0, "x", 4), slot(1, "y", 4)], 0, now);
        let mut stale = t.allocations_below_epoch(9);
        stale.sort();
        assert_eq!(stale, vec!["x".to_string(), "y".to_string()]);
        // Leader 9 adopted the task in slot 0 only.
        assert!(t.heartbeat("tm-a", &[slot(0, "x", 9), slot(1, "y", 4)], 0, now + Duration::from_secs(1)));
        assert_eq!(t.allocations_below_epoch(9), vec!["y".to_string()]);
    }

    /// An allocation not yet confirmed by the TaskManager survives a report that predates it,
    /// but a report still disagreeing after the grace period wins.
    #[test]
    fn unconfirmed_allocations_get_a_grace_period() {
        let (mut t, now) = table_with(&[("tm-a", 1)]);
        t.allocate(1, &mut alloc_maker("j"), now).expect("slot");
        t.heartbeat("tm-a", &[], 0, now + Duration::from_millis(100));
        assert_eq!(t.free_slots(), 0);
        t.heartbeat("tm-a", &[], 0, now + UNCONFIRMED_GRACE + Duration::from_secs(1));
        assert_eq!(t.free_slots(), 1);
    }
}
