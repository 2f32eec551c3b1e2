//! The state of one TaskManager shared by its gRPC service and its background loops: the slot
//! table, the tasks, the epoch fences, and the clients of the leaders. It starts nothing: a
//! deployment is started by [`crate::deploy`], which uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_client::LeaderClient;
use keel_ha::Role;
use keel_metrics::Registry;
use keel_proto::pb::{AdoptTasksRequest, AdoptedTask, SlotStatus, TaskStateUpdate};
use keel_proto::{KeelError, Result, TaskStateExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fence::EpochFence;
use crate::slots::SlotTable;
use crate::task::Task;

/// How long a task in a terminal state is still reported in heartbeats before it is forgotten.
pub const TERMINAL_RETENTION: Duration = Duration::from_secs(60);

pub struct Table {
    pub slots: SlotTable,
    /// By task id; terminal tasks stay for [`TERMINAL_RETENTION`].
    pub tasks: HashMap<String, Arc<Task>>,
}

pub struct Shared {
    pub id: String,
    pub address: String,
    pub num_slots: u32,
    pub heartbeat_interval: Duration,
    table: Mutex<Table>,
    pub rm_fence: EpochFence,
    pub jm_fence: EpochFence,
    /// The JobManager leader (from the HA services), retrying for one heartbeat interval.
    jm: LeaderClient,
    /// The address of the JobManager that deployed the latest task, tried when the HA services
    /// name no leader.
    last_jm_address: Mutex<Option<String>>,
    /// Task runners.
    pub tasks_tracker: TaskTracker,
    /// State reporters and checkpoint ackers.
    pub reporters: TaskTracker,
    /// Cancelled when shutdown begins: no new tasks.
    pub stopping: CancellationToken,
    /// Cancelled when reporters must give up (end of the shutdown drain).
    pub reporters_stop: CancellationToken,
    /// The metrics of the running tasks, served on `GET /metrics`.
    pub registry: Registry,
    /// A TaskManager whose heartbeats have not reached a JobManager leader for this long
    /// (`heartbeat.timeout`) is cut off: the leader has declared it lost and runs its tasks
    /// elsewhere, so it cancels them (their sinks stop writing).
    pub cut_off_after: Duration,
    /// The last time a JobManager leader was heard from: a heartbeat it answered, or a request
    /// of it that passed the epoch fence (deploy, cancel, checkpoint calls).
    last_jm_contact: Mutex<Instant>,
}

impl Shared {
    pub fn new(
        id: String,
        address: String,
        num_slots: u32,
        heartbeat_interval: Duration,
        jm: LeaderClient,
    ) -> Shared {
        Shared {
            table: Mutex::new(Table { slots: SlotTable::new(id.clone(), num_slots), tasks: HashMap::new() }),
            id,
            address,
            num_slots,
            heartbeat_interval,
            rm_fence: EpochFence::new(Role::ResourceManager),
            jm_fence: EpochFence::new(Role::JobManager),
            jm,
            last_jm_address: Mutex::new(None),
            cut_off_after: heartbeat_interval * 5,
            last_jm_contact: Mutex::new(Instant::now()),
            tasks_tracker: TaskTracker::new(),
            reporters: TaskTracker::new(),
            stopping: CancellationToken::new(),
            reporters_stop: CancellationToken::new(),
            registry: Registry::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client of the JobManager leader that falls back to `address` (or to the last deploying
    /// JobManager) when the HA services name no leader.
    pub fn jm_client(&self, address: Option<&str>) -> LeaderClient {
        let fallback = match address.filter(|a| !a.is_empty()) {
            Some(a) => Some(a.to_string()),
            None => self.last_jm_address.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        match fallback {
            Some(a) => self.jm.clone().with_fallback(vec![a]),
            None => self.jm.clone(),
        }
    }

    pub fn slot_report(&self) -> Vec<SlotStatus> {
        self.lock().slots.report()
    }

    pub fn find_task(&self, task_id: &str) -> Option<Arc<Task>> {
        self.lock().tasks.get(task_id).cloned()
    }

    /// A JobManager leader was heard from now.
    pub fn note_jm_contact(&self) {
        *self.last_jm_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long no JobManager leader has been heard from.
    pub fn since_jm_contact(&self) -> Duration {
        self.last_jm_contact.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// Every task as reported to the JobManager.
    pub fn task_updates(&self) -> Vec<TaskStateUpdate> {
        let tasks: Vec<Arc<Task>> = self.lock().tasks.values().cloned().collect();
        let mut updates: Vec<TaskStateUpdate> = tasks.iter().map(|t| t.update(&self.id)).collect();
        updates.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        updates
    }

    /// Cancels a task; false when it is unknown.
    pub fn cancel_task(&self, task_id: &str, reason: &str) -> bool {
        match self.find_task(task_id) {
            Some(task) => {
                task.cancel(reason);
                true
            }
            None => false,
        }
    }

    /// Cancels every task because the TaskManager is shutting down (see
    /// [`Task::cancel_for_shutdown`]).
    pub fn cancel_all_for_shutdown(&self, reason: &str) {
        let tasks: Vec<Arc<Task>> = self.lock().tasks.values().cloned().collect();
        for t in tasks {
            t.cancel_for_shutdown(reason);
        }
    }

    pub fn cancel_all(&self, reason: &str) {
        let tasks: Vec<Arc<Task>> = self.lock().tasks.values().cloned().collect();
        for t in tasks {
            t.cancel(reason);
        }
    }

    /// Forgets tasks that have been terminal for longer than [`TERMINAL_RETENTION`].
    pub fn forget_old_tasks(&self, now: Instant) {
        let mut table = self.lock();
        table.tasks.retain(|_, t| {
            let keep = t
                .terminal_since()
                .is_none_or(|since| now.saturating_duration_since(since) < TERMINAL_RETENTION);
            if !keep {
                tracing::debug!(task_id = %t.info.task_id, "forgetting task");
                t.forgotten().cancel();
            }
            keep
        });
    }

    /// A new JobManager leader adopts the named tasks of `job_id` that run here (see
    /// `AdoptTasks`): each is stamped with its epoch, as is its slot's allocation. Tasks that
    /// ended, are unknown here, or whose slot no longer holds their allocation are left out.
    pub fn adopt(&self, req: &AdoptTasksRequest) -> Result<Vec<AdoptedTask>> {
        let stamp = req.jobmanager.as_ref().ok_or_else(|| KeelError::InvalidArgument {
            reason: "AdoptTasks needs the jobmanager leader stamp".into(),
        })?;
        // Under the table lock, as is a drain's fence check and mark (`mark_draining`): a drain
        // of the earlier leader either marked its task before this adoption, or is refused by
        // the fence after it.
        let mut table = self.lock();
        self.jm_fence.observe(stamp.epoch)?;
        self.note_jm_contact();
        let mut adopted = Vec::new();
        for task_id in &req.task_ids {
            let Some(task) = table.tasks.get(task_id).cloned() else { continue };
            let state = task.state();
            if task.info.job_id != req.job_id
                || state.is_terminal()
                || task.cancel_token().is_cancelled()
                || task.is_draining()
            {
                continue;
            }
            if !table.slots.restamp(&task.info.allocation_id, stamp.epoch) {
                continue;
            }
            task.adopt(stamp.epoch);
            adopted.push(AdoptedTask {
                task_id: task_id.clone(),
                slot_index: task.info.slot_index,
                allocation_id: task.info.allocation_id.clone(),
                state: state as i32,
            });
        }
        drop(table);
        self.remember_jm_address(&stamp.address);
        tracing::info!(job_id = %req.job_id, epoch = stamp.epoch, asked = req.task_ids.len(), adopted = adopted.len(),
            "tasks adopted by a new jobmanager leader");
        Ok(adopted)
    }

    /// A drain trigger (`TriggerCheckpoint` with `drain`): checks the leader's epoch and marks
    /// the task draining, under the table lock (see [`Shared::adopt`]).
    pub fn mark_draining(&self, stamp: Option<&keel_proto::pb::LeaderStamp>, task_id: &str) -> Result<()> {
        let table = self.lock();
        let stamp = stamp.ok_or_else(|| KeelError::InvalidArgument {
            reason: "TriggerCheckpoint needs the leader stamp (epoch) of its sender".into(),
        })?;
        self.jm_fence.observe(stamp.epoch)?;
        if let Some(task) = table.tasks.get(task_id) {
            task.set_draining();
        }
        Ok(())
    }

    /// Remembers the address of the JobManager leader that deployed or adopted a task: the
    /// fallback of [`Shared::jm_client`] when the HA services name no leader.
    pub fn remember_jm_address(&self, address: &str) {
        if !address.is_empty() {
            *self.last_jm_address.lock().unwrap_or_else(|p| p.into_inner()) = Some(address.to_string());
        }
    }
}
