//! The leader scope's shared state: what every part of a JobManager process shares
//! ([`JobManagerCtx`]), what only the elected leader has ([`LeaderState`]: its jobs, the
//! TaskManagers it heard from, the adoption window and its orphans), and one job as the leader
//! holds it ([`JobHandle`]: the job record, the live task table, the latest task reports, the
//! checkpoint tracker, and the sending end of the job driver's [`JobEvent`] queue).
//!
//! It imports neither the driver nor the gRPC service: both use it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_client::detector::{lost_reason, RpcFailureDetector, RpcOutcome, Verdict};
use keel_client::{Channels, LeaderClient};
use keel_config::Config;
use keel_ha::{CheckpointPointerStore, HaServices, JobStore, LeaderInfo, Leadership};
use keel_proto::pb;
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::{KeelError, Result, TaskStateExt};
use tokio::sync::{mpsc, watch, Notify};

use crate::checkpoint::CheckpointTracker;
use crate::events::JobEvent;
use crate::record::{JobRecord, TaskRecord};

/// What every part of a JobManager process shares, leader or not.
pub(crate) struct JobManagerCtx {
    pub config: Config,
    pub address: String,
    pub jobs: JobStore,
    pub ha: Arc<dyn HaServices>,
    /// `checkpoints/<job_id>`: each job's latest completed checkpoint.
    pub pointers: CheckpointPointerStore,
    pub rm: LeaderClient,
    pub channels: Channels,
    pub leader_watch: watch::Receiver<Option<LeaderInfo>>,
    /// The clock the driver and the checkpoint coordinator read wall-clock time from (health-gate
    /// deadlines, restart times, checkpoint timestamps); [`keel_ha::clock::system`] outside
    /// tests.
    pub clock: Arc<dyn keel_ha::clock::Clock>,
}

impl JobManagerCtx {
    pub async fn request_slots(&self, req: pb::RequestSlotsRequest) -> Result<Vec<pb::AllocatedSlot>> {
        self.rm
            .call(|ch| {
                let req = req.clone();
                async move {
                    ResourceManagerClient::new(ch).request_slots(req).await.map(|r| r.into_inner().slots)
                }
            })
            .await
    }

    pub async fn release_slots(&self, req: pb::ReleaseSlotsRequest) -> Result<u32> {
        self.rm
            .call(|ch| {
                let req = req.clone();
                async move {
                    ResourceManagerClient::new(ch).release_slots(req).await.map(|r| r.into_inner().released)
                }
            })
            .await
    }
}

/// A job known to the leader.
pub(crate) struct JobHandle {
    pub job_id: String,
    record: Mutex<JobRecord>,
    tasks: Mutex<Vec<TaskRecord>>,
    /// The latest report of each task in `tasks` (throughput, pending records, lag, Kafka
    /// partitions), by task id.
    reports: Mutex<HashMap<String, pb::TaskStateUpdate>>,
    events: mpsc::UnboundedSender<JobEvent>,
    checkpoints: Mutex<CheckpointTracker>,
    /// Wakes the checkpoint coordinator (the last acknowledgement of a checkpoint arrived).
    pub checkpoint_wake: Notify,
    /// The job's driver is trying to adopt the tasks of an earlier leader (see
    /// [`LeaderState::may_adopt`]).
    pub adopting: std::sync::atomic::AtomicBool,
}

impl JobHandle {
    pub(crate) fn new(
        record: JobRecord,
        events: mpsc::UnboundedSender<JobEvent>,
        adopting: bool,
    ) -> JobHandle {
        let job_id = record.job_id.clone();
        JobHandle {
            job_id: job_id.clone(),
            record: Mutex::new(record),
            tasks: Mutex::new(Vec::new()),
            reports: Mutex::new(HashMap::new()),
            events,
            checkpoints: Mutex::new(CheckpointTracker::new(job_id)),
            checkpoint_wake: Notify::new(),
            adopting: std::sync::atomic::AtomicBool::new(adopting),
        }
    }

    pub fn record(&self) -> JobRecord {
        self.record_mut().clone()
    }

    pub fn record_mut(&self) -> MutexGuard<'_, JobRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tasks(&self) -> Vec<TaskRecord> {
        self.tasks_mut().clone()
    }

    pub fn tasks_mut(&self) -> MutexGuard<'_, Vec<TaskRecord>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn reports(&self) -> MutexGuard<'_, HashMap<String, pb::TaskStateUpdate>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's checkpoint coordinator state.
    pub fn checkpoints(&self) -> MutexGuard<'_, CheckpointTracker> {
        self.checkpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn send(&self, event: JobEvent) {
        // The driver is gone only when the job is terminal; then there is nothing to tell.
        let _ = self.events.send(event);
    }
}

/// Everything only the leader has.
pub(crate) struct LeaderState {
    pub leadership: Leadership,
    pub(crate) jobs: Mutex<BTreeMap<String, Arc<JobHandle>>>,
    /// TaskManagers this leader deployed to or heard from: id -> (last heard, address).
    pub(crate) taskmanagers: Mutex<HashMap<String, (Instant, String)>>,
    /// Consecutive calls (deploy, cancel, checkpoint) that could not reach each TaskManager,
    /// by address (`heartbeat.rpc-failure-threshold`).
    detector: Mutex<RpcFailureDetector>,
    /// The job drivers of this leadership; the scope waits for them before it ends.
    pub(crate) drivers: tokio_util::task::TaskTracker,
    /// Until then (the adoption window, `heartbeat.timeout` after the leadership began), a task
    /// this leader does not know is not canceled when a TaskManager reports it: it may be a task
    /// of an earlier leader that a job driver is about to adopt. Such reports are kept in
    /// `orphans` for the drivers.
    pub(crate) adopt_until: Instant,
    orphans: Mutex<HashMap<String, Orphan>>,
    /// TaskManagers whose heartbeat (the list of every task they run) this leader has handled:
    /// their orphans are all known (see [`LeaderState::reported_by`]).
    pub(crate) reported: Mutex<std::collections::HashSet<String>>,
    /// Set once every job of the HA store has its driver.
    pub(crate) jobs_loaded: std::sync::atomic::AtomicBool,
}

/// A running task of an earlier leader, as a TaskManager reported it.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    pub taskmanager_id: String,
    pub address: String,
}

impl LeaderState {
    /// A leadership's state, with an adoption window of `adopt_window` from now.
    pub(crate) fn new(
        leadership: Leadership,
        adopt_window: Duration,
        rpc_failure_threshold: Option<u32>,
    ) -> LeaderState {
        LeaderState {
            leadership,
            jobs: Mutex::new(BTreeMap::new()),
            taskmanagers: Mutex::new(HashMap::new()),
            detector: Mutex::new(RpcFailureDetector::new(rpc_failure_threshold)),
            drivers: tokio_util::task::TaskTracker::new(),
            adopt_until: Instant::now() + adopt_window,
            orphans: Mutex::new(HashMap::new()),
            reported: Mutex::new(std::collections::HashSet::new()),
            jobs_loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn stamp(&self) -> pb::LeaderStamp {
        pb::LeaderStamp { epoch: self.leadership.epoch, address: self.leadership.address.clone() }
    }

    /// Whether a report of an unknown task of `job_id` is kept for adoption instead of canceling
    /// the task: within the adoption window, while the jobs are not loaded from the HA store
    /// yet, or while the job's driver is adopting.
    pub(crate) fn may_adopt(&self, job_id: &str) -> bool {
        if Instant::now() >= self.adopt_until {
            return false;
        }
        if !self.jobs_loaded.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let job = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(job_id).cloned();
        job.is_some_and(|j| j.adopting.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Keeps the report of a task this leader does not know, if it may be adopted (see
    /// [`LeaderState::may_adopt`]). False: the task should be canceled.
    pub(crate) fn keep_orphan(&self, u: &pb::TaskStateUpdate, address: &str) -> bool {
        if !self.may_adopt(&u.job_id) {
            return false;
        }
        let orphan = Orphan { taskmanager_id: u.taskmanager_id.clone(), address: address.to_string() };
        self.orphans.lock().unwrap_or_else(|p| p.into_inner()).insert(u.task_id.clone(), orphan);
        true
    }

    /// The orphan reports of these task ids, if all of them were reported.
    pub fn orphans_of(&self, task_ids: &[String]) -> Option<Vec<(String, Orphan)>> {
        let orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        task_ids.iter().map(|id| orphans.get(id).map(|o| (id.clone(), o.clone()))).collect()
    }

    /// Whether each of these TaskManagers has had a heartbeat handled by this leader.
    pub fn reported_by(&self, taskmanager_ids: &[String]) -> bool {
        let reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        taskmanager_ids.iter().all(|id| reported.contains(id))
    }

    pub fn saw_taskmanager(&self, id: &str, address: &str) {
        self.taskmanagers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (Instant::now(), address.to_string()));
    }

    pub(crate) fn jobs(&self) -> Vec<Arc<JobHandle>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Finds a job by id, by unique id prefix, or by name (the live job of that name first,
    /// then the most recent one).
    pub(crate) fn resolve(&self, job: &str) -> Result<Arc<JobHandle>> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get(job) {
            return Ok(j.clone());
        }
        let mut by_name: Vec<&Arc<JobHandle>> =
            jobs.values().filter(|j| j.record_mut().name == job).collect();
        by_name.sort_by_key(|j| {
            let r = j.record_mut();
            (!r.state.is_terminal(), r.created_at_ms)
        });
        if let Some(j) = by_name.last() {
            return Ok((*j).clone());
        }
        let by_prefix: Vec<&Arc<JobHandle>> =
            jobs.values().filter(|j| !job.is_empty() && j.job_id.starts_with(job)).collect();
        match by_prefix.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(KeelError::JobNotFound { job: job.to_string() }),
            _ => Err(KeelError::InvalidArgument {
                reason: format!(
                    "job id prefix {job:?} matches {} jobs; give more of the id",
                    by_prefix.len()
                ),
            }),
        }
    }

    /// Records how a call to the TaskManager at `address` went. When
    /// `heartbeat.rpc-failure-threshold` consecutive calls could not reach it, every job with
    /// tasks there is told that it is lost (the ResourceManager finds out on its own calls).
    pub fn note_taskmanager_call(&self, address: &str, outcome: RpcOutcome) {
        let verdict = self.detector.lock().unwrap_or_else(|p| p.into_inner()).record(address, outcome);
        let Verdict::Lost { consecutive } = verdict else {
            return;
        };
        let reason = lost_reason(consecutive, address);
        let mut ids: Vec<String> = {
            let mut tms = self.taskmanagers.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> =
                tms.iter().filter(|(_, (_, a))| a == address).map(|(id, _)| id.clone()).collect();
            tms.retain(|_, (_, a)| a != address);
            ids
        };
        for job in self.jobs() {
            for t in job.tasks().iter().filter(|t| t.taskmanager_address == address) {
                if !ids.contains(&t.taskmanager_id) {
                    ids.push(t.taskmanager_id.clone());
                }
            }
        }
        for id in ids {
            tracing::warn!(taskmanager_id = %id, %address, consecutive, "taskmanager unreachable; declaring it lost");
            self.dispatch_taskmanager_lost(&id, &reason);
        }
    }

    pub(crate) fn dispatch_taskmanager_lost(&self, taskmanager_id: &str, reason: &str) {
        for job in self.jobs() {
            if job.tasks().iter().any(|t| t.taskmanager_id == taskmanager_id && !t.state.is_terminal()) {
                job.send(JobEvent::TaskManagerLost {
                    taskmanager_id: taskmanager_id.to_string(),
                    reason: reason.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_ha::Role;
    use keel_proto::JobState;
    use tokio_util::sync::CancellationToken;

    fn orphan_report(task_id: &str, job_id: &str) -> pb::TaskStateUpdate {
        pb::TaskStateUpdate {
            task_id: task_id.into(),
            job_id: job_id.into(),
            taskmanager_id: "tm-1".into(),
            ..Default::default()
        }
    }

    /// The adoption window: a report of a task this leader does not know is kept (not
    /// canceled) while the jobs are not loaded yet; once they are, only for a job whose driver
    /// is adopting (not for an unknown job); and never after the window, so a task an earlier
    /// leader deployed and nobody adopted is canceled when it reports late.
    #[test]
    fn orphans_are_kept_only_within_the_adoption_window() {
        let leadership = Leadership::new(Role::JobManager, 7, "jm:1".into(), CancellationToken::new());
        let st = LeaderState::new(leadership.clone(), Duration::from_millis(300), Some(2));
        assert!(st.keep_orphan(&orphan_report("j/v1/0#1", "j"), "tm:1"), "jobs not loaded yet: kept");
        assert!(st.orphans_of(&["j/v1/0#1".to_string()]).is_some());
        assert!(st.orphans_of(&["j/v1/0#1".to_string(), "j/v1/1#1".to_string()]).is_none(), "one missing");
        let record = |job_id: &str| JobRecord {
            job_id: job_id.into(),
            name: job_id.into(),
            state: JobState::Running,
            active_version: 1,
            versions: Vec::new(),
            created_at_ms: 0,
            attempts: 1,
            restarts: 0,
            status_message: String::new(),
            cancel_requested: false,
            restart: Default::default(),
            side: None,
            upgrade: None,
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        for (job_id, adopting) in [("j", true), ("m", false)] {
            let handle = Arc::new(JobHandle::new(record(job_id), tx.clone(), adopting));
            st.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(job_id.into(), handle);
        }
        st.jobs_loaded.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(st.keep_orphan(&orphan_report("j/v1/1#1", "j"), "tm:1"), "a job being adopted");
        assert!(!st.keep_orphan(&orphan_report("m/v1/0#1", "m"), "tm:1"), "a job not being adopted");
        assert!(!st.keep_orphan(&orphan_report("k/v1/0#1", "k"), "tm:1"), "a job this leader does not run");
        assert!(st.orphans_of(&["k/v1/0#1".to_string()]).is_none());
        assert!(st.orphans_of(&["j/v1/0#1".to_string(), "j/v1/1#1".to_string()]).is_some());

        let late = LeaderState::new(leadership, Duration::ZERO, Some(2));
        assert!(!late.keep_orphan(&orphan_report("j/v1/0#1", "j"), "tm:1"), "after the window: canceled");
        assert!(!late.reported_by(&["tm-1".to_string()]));
        late.reported.lock().unwrap_or_else(|p| p.into_inner()).insert("tm-1".into());
        assert!(late.reported_by(&["tm-1".to_string()]) && late.reported_by(&[]));
        assert!(!late.reported_by(&["tm-1".to_string(), "tm-2".to_string()]));
    }
}
