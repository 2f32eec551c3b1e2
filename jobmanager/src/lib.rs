//! The JobManager: jobs, versions, scheduling of tasks onto slots.
//!
//! Layout:
//! - [`record`]: the durable job record kept in the HA store and the live task table.
//! - [`driver`]: one task per job that schedules, deploys, watches, restarts and cancels it;
//!   each attempt is deployed from the job's latest completed checkpoint, if it has one.
//! - [`checkpoint`]: the checkpoint coordinator's decisions (pure: when to trigger, which
//!   acknowledgements count, timeouts, retention) and the metadata and pointer formats.
//! - [`restart`]: restart strategies (pure): whether and when a failed job restarts, and the
//!   restart history kept in the job record.
//! - [`coordinator`]: the checkpoint coordinator's I/O, one loop per running attempt: trigger,
//!   complete (metadata file, fenced HA pointer, notify), retention, and restore.
//! - this file: the gRPC service and the leader scope. Every JobManager process serves gRPC;
//!   only the elected leader has a [`LeaderState`]. Standbys answer with a typed `NotLeader`
//!   error carrying the leader's address. A new leader recovers every job from the HA store and
//!   brings each non-terminal one back to running; losing leadership drops the whole leader
//!   state (every driver stops) instead of demoting in place.
//!
//! Fencing: every request to the ResourceManager and the TaskManagers carries this leader's
//! epoch; every HA write is conditional on still holding leadership; task reports stamped with
//! an older leader's epoch are treated as unknown, so the TaskManager cancels those tasks.

pub mod checkpoint;
pub mod coordinator;
pub mod driver;
pub mod record;
pub mod restart;
pub mod upgrade;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use keel_client::detector::{lost_reason, RpcFailureDetector, RpcOutcome, Verdict};
use keel_client::{Channels, LeaderClient};
use keel_config::Config;
use keel_ha::{CheckpointPointerStore, HaServices, JobStore, LeaderInfo, Leadership, Role};
use keel_proto::pb::job_manager_server::{JobManager as JmApi, JobManagerServer};
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::{self, task_manager_event, TaskState};
use keel_proto::{JobState, KeelError, Result, TaskStateExt};
use keel_spec::JobSpec;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::checkpoint::{CheckpointPointer, CheckpointTracker};
use crate::driver::{Driver, JobEvent};
use crate::record::{now_ms, JobRecord, RestoredFrom, TaskRecord, VersionRecord};

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
    fn new(record: JobRecord, events: mpsc::UnboundedSender<JobEvent>, adopting: bool) -> JobHandle {
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

    fn reports(&self) -> MutexGuard<'_, HashMap<String, pb::TaskStateUpdate>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's checkpoint coordinator state.
    pub fn checkpoints(&self) -> MutexGuard<'_, CheckpointTracker> {
        self.checkpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, event: JobEvent) {
        // The driver is gone only when the job is terminal; then there is nothing to tell.
        let _ = self.events.send(event);
    }

    fn summary(&self) -> pb::JobSummary {
        let r = self.record();
        let tasks = self.tasks();
        pb::JobSummary {
            job_id: r.job_id.clone(),
            name: r.name.clone(),
            state: r.state.to_string(),
            active_version: r.active_version,
            parallelism: r.active().map(|v| v.parallelism).unwrap_or(0),
            created_at_ms: r.created_at_ms,
            tasks_running: tasks.iter().filter(|t| t.state == TaskState::Running).count() as u32,
            tasks_total: tasks.len() as u32,
        }
    }
}

/// Everything only the leader has.
pub(crate) struct LeaderState {
    pub leadership: Leadership,
    jobs: Mutex<BTreeMap<String, Arc<JobHandle>>>,
    /// TaskManagers this leader deployed to or heard from: id -> (last heard, address).
    taskmanagers: Mutex<HashMap<String, (Instant, String)>>,
    /// Consecutive calls (deploy, cancel, checkpoint) that could not reach each TaskManager,
    /// by address (`heartbeat.rpc-failure-threshold`).
    detector: Mutex<RpcFailureDetector>,
    /// The job drivers of this leadership; the scope waits for them before it ends.
    drivers: tokio_util::task::TaskTracker,
    /// Until then (the adoption window, `heartbeat.timeout` after the leadership began), a task
    /// this leader does not know is not canceled when a TaskManager reports it: it may be a task
    /// of an earlier leader that a job driver is about to adopt. Such reports are kept in
    /// `orphans` for the drivers.
    adopt_until: Instant,
    orphans: Mutex<HashMap<String, Orphan>>,
    /// TaskManagers whose heartbeat (the list of every task they run) this leader has handled:
    /// their orphans are all known (see [`LeaderState::reported_by`]).
    reported: Mutex<std::collections::HashSet<String>>,
    /// Set once every job of the HA store has its driver.
    jobs_loaded: std::sync::atomic::AtomicBool,
}

/// A running task of an earlier leader, as a TaskManager reported it.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    pub taskmanager_id: String,
    pub address: String,
}

impl LeaderState {
    /// A leadership's state, with an adoption window of `adopt_window` from now.
    fn new(
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
    fn may_adopt(&self, job_id: &str) -> bool {
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
    fn keep_orphan(&self, u: &pb::TaskStateUpdate, address: &str) -> bool {
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

    fn jobs(&self) -> Vec<Arc<JobHandle>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Finds a job by id, by unique id prefix, or by name (the live job of that name first,
    /// then the most recent one).
    fn resolve(&self, job: &str) -> Result<Arc<JobHandle>> {
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

    fn dispatch_taskmanager_lost(&self, taskmanager_id: &str, reason: &str) {
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

/// One JobManager process (leader or standby).
pub struct JobManager {
    ctx: Arc<JobManagerCtx>,
    state: RwLock<Option<Arc<LeaderState>>>,
}

impl JobManager {
    fn leader_state(&self) -> Result<Arc<LeaderState>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        match state {
            Some(st) if st.leadership.check().is_ok() => Ok(st),
            _ => {
                let leader = self
                    .ctx
                    .leader_watch
                    .borrow()
                    .as_ref()
                    .map(|l| l.address.clone())
                    .filter(|a| *a != self.ctx.address);
                Err(KeelError::not_leader(Role::JobManager.as_str(), leader))
            }
        }
    }

    /// Starts the driver of a job. `recovered`: the job comes from the HA store at the start of
    /// a leadership, so its tasks may still run and be adopted.
    fn spawn_driver(&self, st: &Arc<LeaderState>, record: JobRecord, recovered: bool) -> Arc<JobHandle> {
        let (tx, rx) = mpsc::unbounded_channel();
        let terminal = record.state.is_terminal();
        let handle = Arc::new(JobHandle::new(record, tx, recovered && !terminal));
        st.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(handle.job_id.clone(), handle.clone());
        if !terminal {
            let driver = Driver {
                ctx: self.ctx.clone(),
                st: st.clone(),
                job: handle.clone(),
                events: rx,
                preallocated: None,
                upgrade: None,
                checkpoints_dir: self.ctx.config.checkpointing.dir.clone(),
                recovered,
            };
            st.drivers.spawn(driver.run());
        }
        handle
    }

    /// The checkpoint a job submitted with `--restore` starts from: the latest completed
    /// checkpoint of the most recent earlier job named `name`. Its metadata is read now, so a
    /// missing or unreadable file is refused at submission (another parallelism is fine: the
    /// sources' splits are redistributed).
    async fn restore_source(
        &self,
        st: &LeaderState,
        name: &str,
        parallelism: u32,
    ) -> Result<CheckpointPointer> {
        let earlier = st
            .jobs()
            .into_iter()
            .map(|j| j.record())
            .filter(|r| r.name == name)
            .max_by_key(|r| r.created_at_ms)
            .ok_or_else(|| {
                KeelError::precondition(format!(
                    "cannot restore: there is no earlier job named {name:?} to restore from"
                ))
            })?;
        let pointer: CheckpointPointer = self.ctx.pointers.get(&earlier.job_id).await?.ok_or_else(|| {
            KeelError::precondition(format!(
                "cannot restore: the latest job named {name:?} (id {}, {}) has no completed checkpoint",
                earlier.job_id, earlier.state
            ))
        })?;
        coordinator::load_states(&pointer, parallelism)
            .await
            .map_err(|reason| KeelError::precondition(format!("cannot restore: {reason}")))?;
        Ok(pointer)
    }

    /// The savepoint (or checkpoint) `path` names (its `_metadata` file, or the directory holding
    /// it), for a job of `spec`: read now, so a missing file, a checkpoint that cannot be
    /// restored at the spec's parallelism, or state of sources the spec no longer has (unless
    /// `allow_non_restored_state`) is refused at submission.
    async fn savepoint_source(
        &self,
        path: &str,
        spec: &JobSpec,
        allow_non_restored_state: bool,
    ) -> Result<CheckpointPointer> {
        let mut file = std::path::PathBuf::from(path.trim());
        if file.is_dir() {
            file = file.join(coordinator::METADATA_FILE);
        }
        let metadata = coordinator::read_metadata(&file).await.map_err(|reason| {
            KeelError::precondition(format!("cannot start from the savepoint: {reason}"))
        })?;
        let missing: Vec<String> = metadata
            .source_names()
            .into_iter()
            .filter(|name| !spec.sources.iter().any(|s| &s.name == name))
            .collect();
        if !missing.is_empty() && !allow_non_restored_state {
            return Err(KeelError::invalid_spec(
                "sources",
                format!(
                    "the savepoint holds state of source(s) {} that the spec does not have; pass \
                     --allow-non-restored-state to drop it",
                    missing.join(", ")
                ),
            ));
        }
        let pointer = CheckpointPointer {
            job_id: metadata.job_id.clone(),
            checkpoint_id: metadata.checkpoint_id,
            metadata_path: file.display().to_string(),
            version: metadata.version,
            attempt: metadata.attempt,
            trigger_time_ms: metadata.trigger_time_ms,
            duration_ms: metadata.duration_ms,
            size_bytes: metadata.total_size_bytes,
            completed_at_ms: metadata.completed_at_ms,
            epoch: 0,
        };
        coordinator::load_states(&pointer, spec.parallelism).await.map_err(|reason| {
            KeelError::precondition(format!("cannot start from the savepoint: {reason}"))
        })?;
        Ok(pointer)
    }

    async fn submit(&self, req: pb::SubmitJobRequest) -> Result<pb::SubmitJobResponse> {
        let (spec_yaml, restore) = (req.spec_yaml, req.restore);
        let st = self.leader_state()?;
        let spec = JobSpec::parse(&spec_yaml)?;
        if let Some(existing) =
            st.jobs().into_iter().map(|j| j.record()).find(|r| r.name == spec.name && !r.state.is_terminal())
        {
            return Err(KeelError::AlreadyExists {
                what: format!(
                    "a live job named {:?} (id {}, {}); cancel it first or pick another name",
                    spec.name, existing.job_id, existing.state
                ),
            });
        }
        self.check_exactly_once(&st, &spec, None)?;
        self.check_transaction_timeouts(&spec).await?;
        if restore && !req.from_savepoint.is_empty() {
            return Err(KeelError::InvalidArgument {
                reason: "--restore and --from-savepoint exclude each other".into(),
            });
        }
        let restore_from = if restore {
            Some(self.restore_source(&st, &spec.name, spec.parallelism).await?)
        } else if !req.from_savepoint.trim().is_empty() {
            Some(self.savepoint_source(&req.from_savepoint, &spec, req.allow_non_restored_state).await?)
        } else {
            None
        };
        let now = now_ms();
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        let restored_from = restore_from.as_ref().map(|p| RestoredFrom {
            job_id: p.job_id.clone(),
            checkpoint_id: p.checkpoint_id,
            metadata_path: p.metadata_path.clone(),
            restored_at_ms: now,
        });
        let record = JobRecord {
            job_id: job_id.clone(),
            name: spec.name.clone(),
            state: JobState::Created,
            active_version: 1,
            versions: vec![VersionRecord {
                version: 1,
                spec_yaml,
                state: JobState::Created,
                created_at_ms: now,
                parallelism: spec.parallelism,
                restored_from: restored_from.clone(),
                ended_with: None,
                start_fresh: false,
            }],
            created_at_ms: now,
            attempts: 0,
            restarts: 0,
            status_message: String::new(),
            cancel_requested: false,
            restart: Default::default(),
            side: None,
        };
        if let Some(pointer) = &restore_from {
            // The new job's pointer names the earlier job's checkpoint, so every attempt of the
            // new job (and a new leader) starts from it until the job completes its own.
            self.ctx.pointers.set(&st.leadership, &job_id, pointer).await?;
        }
        // Durable before acknowledged: a leader that dies right after answering still leaves the
        // job for the next one.
        self.ctx.jobs.put(&st.leadership, &record.job_id, &record).await?;
        tracing::info!(job_id = %record.job_id, name = %record.name, version = 1,
            parallelism = spec.parallelism, epoch = st.leadership.epoch,
            restored_from_job = restore_from.as_ref().map(|p| p.job_id.as_str()).unwrap_or(""),
            checkpoint_id = restore_from.as_ref().map(|p| p.checkpoint_id).unwrap_or(0),
            "job submitted");
        let handle = self.spawn_driver(&st, record, false);
        Ok(pb::SubmitJobResponse {
            job_id: handle.job_id.clone(),
            name: spec.name,
            version: 1,
            restored_from: restored_from.map(|r| r.to_pb()),
        })
    }

    /// Exactly-once sinks commit at checkpoints, so the job must checkpoint; and no other live
    /// job may use one of their transactional-id prefixes (the two would fence each other's
    /// producers and commit each other's markers): not in its active version, nor in a version
    /// being deployed by an upgrade. `upgrading` is the job whose new version `spec` is (its own
    /// versions do not count: a handover stops the old one first, and a side-by-side version is
    /// checked against it by `upgrade::check_side_by_side`).
    fn check_exactly_once(&self, st: &LeaderState, spec: &JobSpec, upgrading: Option<&str>) -> Result<()> {
        let prefixes = spec.transactional_id_prefixes();
        let Some((field, _)) = prefixes.first() else {
            return Ok(());
        };
        let checkpointing = self
            .ctx
            .config
            .checkpointing
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        if checkpointing.interval.is_none() {
            return Err(KeelError::invalid_spec(
                field.replace("transactional-id-prefix", "delivery-guarantee"),
                "exactly-once commits its transactions when checkpoints complete, and checkpointing is \
                 off: set execution.checkpointing.interval (in the spec's config: or the cluster's)",
            ));
        }
        for job in st.jobs() {
            let r = job.record();
            if r.state.is_terminal() || Some(r.job_id.as_str()) == upgrading {
                continue;
            }
            let live = r.versions.iter().filter(|v| v.version == r.active_version || !v.state.is_terminal());
            for v in live {
                let Ok(other) = JobSpec::parse(&v.spec_yaml) else {
                    continue;
                };
                for (_, theirs) in other.transactional_id_prefixes() {
                    if let Some((field, prefix)) = prefixes.iter().find(|(_, p)| *p == theirs) {
                        return Err(KeelError::invalid_spec(
                            field,
                            format!(
                                "{prefix:?} is used by the running job {:?} (id {}, version {}); two jobs \
                                 writing with one prefix would fence each other's transactions: pick another \
                                 prefix, or cancel that job first",
                                r.name, r.job_id, v.version
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The `transaction.timeout.ms` of every exactly-once sink, against its brokers'
    /// `transaction.max.timeout.ms` (asked off the runtime) and against the checkpoint interval
    /// plus the failover budget (`heartbeat.timeout` and the restart strategy's longest delay).
    async fn check_transaction_timeouts(&self, spec: &JobSpec) -> Result<()> {
        if spec.transactional_id_prefixes().is_empty() {
            return Ok(());
        }
        let checkpointing = self
            .ctx
            .config
            .checkpointing
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        let Some(interval) = checkpointing.interval else {
            // Refused by check_exactly_once.
            return Ok(());
        };
        let restart = self
            .ctx
            .config
            .restart
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        let budget = self.ctx.config.heartbeat_timeout + longest_restart_delay(&restart);
        let spec = spec.clone();
        let unasked = tokio::task::spawn_blocking(move || {
            spec.check_transaction_timeouts(interval, budget, BROKER_CONFIG_TIMEOUT)
        })
        .await
        .map_err(|e| KeelError::internal(format!("checking transaction.timeout.ms panicked: {e}")))??;
        for (sink, error) in unasked {
            tracing::warn!(%sink, %error, "cannot read the brokers' transaction.max.timeout.ms; \
                transaction.timeout.ms checked against the checkpoint interval only");
        }
        Ok(())
    }

    /// The effective `execution.checkpointing.interval` of the job's active version (the
    /// cluster's, overridden by the spec's `config:`); zero when checkpointing is off.
    fn checkpoint_interval(&self, r: &JobRecord) -> Duration {
        r.active()
            .and_then(|v| JobSpec::parse(&v.spec_yaml).ok())
            .and_then(|spec| self.ctx.config.checkpointing.with_overrides(&spec.config).ok())
            .and_then(|c| c.interval)
            .unwrap_or_default()
    }

    fn details(&self, job: &JobHandle) -> pb::JobDetails {
        let r = job.record();
        let checkpoints = job.checkpoints().stats(Instant::now());
        let interval = self.checkpoint_interval(&r);
        let records = job.tasks();
        let tasks: Vec<pb::TaskDetails> = {
            let reports = job.reports();
            records.iter().map(|t| task_details(t, reports.get(&t.task_id))).collect()
        };
        let running: Vec<&pb::TaskDetails> = records
            .iter()
            .zip(&tasks)
            .filter(|(r, _)| r.state == TaskState::Running)
            .map(|(_, d)| d)
            .collect();
        let (throughput, warnings) = job_throughput(&running);
        pb::JobDetails {
            summary: Some(job.summary()),
            versions: r
                .versions
                .iter()
                .map(|v| pb::VersionDetails {
                    version: v.version,
                    state: v.state.to_string(),
                    created_at_ms: v.created_at_ms,
                    parallelism: v.parallelism,
                    spec_yaml: v.spec_yaml.clone(),
                    restored_from: v.restored_from.as_ref().map(RestoredFrom::to_pb),
                    ended_with: v.ended_with.as_ref().map(RestoredFrom::to_pb),
                })
                .collect(),
            tasks,
            throughput: Some(throughput),
            warnings,
            restart_strategy: restart::describe_for(&self.ctx.config.restart, &r),
            restart_history: r.restart.history.iter().map(restart::RestartEntry::to_pb).collect(),
            failure: r.restart.failure.as_ref().map(restart::FailureEntry::to_pb),
            status_message: r.status_message.clone(),
            restarts: r.restarts,
            checkpoints: checkpoints
                .into_iter()
                .map(|c| pb::CheckpointStats {
                    checkpoint_id: c.checkpoint_id,
                    state: c.state.as_str().to_string(),
                    trigger_time_ms: c.trigger_time_ms,
                    duration_ms: c.duration_ms,
                    size_bytes: c.size_bytes,
                    failure: c.failure,
                    version: c.version,
                    attempt: c.attempt,
                    acknowledged: c.acknowledged,
                    total_tasks: c.total_tasks,
                    metadata_path: c.metadata_path,
                })
                .collect(),
            restored_from: r.active().and_then(|v| v.restored_from.as_ref()).map(RestoredFrom::to_pb),
            checkpoint_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Applies a task report from a TaskManager. Returns false for a task this leader does not
    /// run (an older attempt, or deployed by an earlier leader): the TaskManager cancels it.
    fn apply_task_report(&self, st: &LeaderState, u: &pb::TaskStateUpdate) -> bool {
        let Some(job) = st.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(&u.job_id).cloned() else {
            return false;
        };
        let state = TaskState::try_from(u.state).unwrap_or(TaskState::Unspecified);
        let changed = {
            let mut tasks = job.tasks_mut();
            let Some(t) = tasks.iter_mut().find(|t| t.task_id == u.task_id) else {
                return false;
            };
            // A report stamped with an older epoch for a task this leader runs was made before
            // the task was adopted: the task is known (not to be canceled), the report stale.
            if u.jobmanager_epoch < st.leadership.epoch {
                return true;
            }
            t.records_in = t.records_in.max(u.records_in);
            t.records_out = t.records_out.max(u.records_out);
            let changed = t.state != state && !t.state.is_terminal();
            let mut reports = job.reports();
            reports.insert(u.task_id.clone(), u.clone());
            // Forget the reports of tasks the table no longer has (earlier attempts); only
            // when there are more reports than tasks, so a heartbeat stays linear.
            if reports.len() > tasks.len() {
                reports.retain(|id, _| tasks.iter().any(|t| t.task_id == *id));
            }
            changed
        };
        if changed && state != TaskState::Unspecified {
            job.send(JobEvent::TaskState {
                task_id: u.task_id.clone(),
                state,
                failure: u.failure.clone(),
                taskmanager_stopping: u.taskmanager_stopping,
            });
        }
        true
    }

    /// The leader scope: recover jobs, follow TaskManager losses, until leadership ends.
    async fn lead(&self, st: Arc<LeaderState>, shutdown: &CancellationToken) {
        // Recover every job from the HA store.
        let records = loop {
            match self.ctx.jobs.list::<JobRecord>().await {
                Ok(r) => break r,
                Err(error) => {
                    tracing::warn!(%error, "cannot read jobs from the HA store; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = st.leadership.lost().cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let live = records.iter().filter(|r| !r.state.is_terminal()).count();
        tracing::info!(
            jobs = records.len(),
            live,
            epoch = st.leadership.epoch,
            "recovered jobs from the HA store"
        );
        for record in records {
            self.spawn_driver(&st, record, true);
        }
        st.jobs_loaded.store(true, std::sync::atomic::Ordering::SeqCst);

        let scope = st.leadership.lost().child_token();
        let watcher = tokio::spawn(watch_rm_events(self.ctx.clone(), st.clone(), scope.clone()));
        let tick = (self.ctx.config.heartbeat_interval / 2).max(Duration::from_millis(50));
        let mut interval = tokio::time::interval(tick);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = st.leadership.lost().cancelled() => break,
                _ = interval.tick() => self.expire_taskmanagers(&st),
            }
        }
        scope.cancel();
        let _ = watcher.await;
    }

    /// Declares lost the TaskManagers running our tasks that stopped heartbeating to us, in case
    /// the ResourceManager could not tell (for instance while it fails over itself).
    fn expire_taskmanagers(&self, st: &LeaderState) {
        // A leader resumed after a pause past its lease has a stale view: it acts on nothing.
        if st.leadership.check().is_err() {
            return;
        }
        let timeout = self.ctx.config.heartbeat_timeout;
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut tms = st.taskmanagers.lock().unwrap_or_else(|p| p.into_inner());
            let expired: Vec<String> = tms
                .iter()
                .filter(|(_, (seen, _))| now.saturating_duration_since(*seen) > timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                tms.remove(id);
            }
            expired
        };
        for id in expired {
            let busy = st
                .jobs()
                .iter()
                .any(|j| j.tasks().iter().any(|t| t.taskmanager_id == id && !t.state.is_terminal()));
            if busy {
                tracing::warn!(taskmanager_id = %id, "taskmanager stopped heartbeating to the jobmanager");
                st.dispatch_taskmanager_lost(
                    &id,
                    &format!("no heartbeat for {timeout:?} (heartbeat.timeout)"),
                );
            }
        }
    }

    /// One leadership: recover the jobs and lead until leadership is lost or shutdown; then wait
    /// for every driver to stop (they stop when leadership ends) before standing by again.
    async fn lead_once(self: Arc<Self>, leadership: Leadership, shutdown: CancellationToken) {
        let st = Arc::new(LeaderState::new(
            leadership.clone(),
            self.ctx.config.heartbeat_timeout,
            self.ctx.config.heartbeat_rpc_failure_threshold,
        ));
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Some(st.clone());
        self.lead(st.clone(), &shutdown).await;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = None;
        // Drivers end with the leadership; on shutdown the leadership is given up here so that
        // they stop before the lease is handed back.
        leadership.give_up();
        st.drivers.close();
        st.drivers.wait().await;
    }
}

/// A task's details: its record, plus the throughput of its latest report while it runs.
fn task_details(t: &TaskRecord, report: Option<&pb::TaskStateUpdate>) -> pb::TaskDetails {
    let mut d = t.to_pb();
    if let (TaskState::Running, Some(u)) = (t.state, report) {
        d.records_in_per_second = u.records_in_per_second;
        d.records_out_per_second = u.records_out_per_second;
        d.bytes_in_per_second = u.bytes_in_per_second;
        d.bytes_out_per_second = u.bytes_out_per_second;
        d.pending_records = u.pending_records;
        d.current_emit_event_time_lag_ms = u.current_emit_event_time_lag_ms;
        d.source_partitions = u.source_partitions.clone();
    }
    d
}

/// A job's throughput from its running tasks' details (rates and pending records summed, the
/// largest lag), and its warnings (the Kafka sources' uneven spreads, each once).
fn job_throughput(running: &[&pb::TaskDetails]) -> (pb::JobThroughput, Vec<String>) {
    let mut t = pb::JobThroughput::default();
    let mut warnings: Vec<String> = Vec::new();
    for d in running {
        t.tasks_reporting += 1;
        t.records_in_per_second += d.records_in_per_second;
        t.records_out_per_second += d.records_out_per_second;
        t.bytes_in_per_second += d.bytes_in_per_second;
        t.bytes_out_per_second += d.bytes_out_per_second;
        if let Some(p) = d.pending_records {
            t.pending_records = Some(t.pending_records.unwrap_or(0).saturating_add(p));
        }
        if let Some(lag) = d.current_emit_event_time_lag_ms {
            t.max_emit_event_time_lag_ms = Some(t.max_emit_event_time_lag_ms.map_or(lag, |l| l.max(lag)));
        }
        for p in &d.source_partitions {
            if !p.spread_warning.is_empty() && !warnings.contains(&p.spread_warning) {
                warnings.push(p.spread_warning.clone());
            }
        }
    }
    (t, warnings)
}

/// Follows the ResourceManager's TaskManager events for the whole leader scope, re-subscribing
/// when the stream ends (for instance when the ResourceManager fails over).
async fn watch_rm_events(ctx: Arc<JobManagerCtx>, st: Arc<LeaderState>, scope: CancellationToken) {
    use tokio_stream::StreamExt;
    // A new ResourceManager leader means a new subscription at once: the old stream may hang
    // on a stopped process until HTTP/2 gives up.
    let mut rm_leader = ctx.rm.leader_watch();
    while !scope.is_cancelled() {
        if let Some(w) = rm_leader.as_mut() {
            w.borrow_and_update();
        }
        let req = pb::WatchTaskManagersRequest { jobmanager: Some(st.stamp()) };
        let stream = tokio::select! {
            _ = scope.cancelled() => return,
            r = ctx.rm.call(|ch| {
                let req = req.clone();
                async move { ResourceManagerClient::new(ch).watch_task_managers(req).await.map(|r| r.into_inner()) }
            }) => r,
        };
        match stream {
            Ok(mut stream) => loop {
                let item = tokio::select! {
                    _ = scope.cancelled() => return,
                    _ = async {
                        match rm_leader.as_mut() {
                            Some(w) => {
                                if w.changed().await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    } => {
                        tracing::info!("resourcemanager leader changed; subscribing to the new one");
                        break;
                    }
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(pb::TaskManagerEvent { event: Some(task_manager_event::Event::Lost(lost)) })) => {
                        // A deposed leader acts on nothing.
                        if st.leadership.check().is_err() {
                            return;
                        }
                        st.dispatch_taskmanager_lost(&lost.taskmanager_id, &lost.reason);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(status)) => {
                        tracing::debug!(%status, "taskmanager event stream ended");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => tracing::debug!(%error, "cannot subscribe to taskmanager events"),
        }
        tokio::select! {
            _ = scope.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

struct JmService(Arc<JobManager>);

impl JmService {
    /// `keel upgrade --mode side-by-side`: a savepoint of the running version, then the new
    /// version runs from it as a job of its own (`<name>.v<N>`), writing to its own topics with
    /// its own consumer groups, until `keel promote` or its cancellation.
    #[allow(clippy::result_large_err)]
    fn side_by_side(
        &self,
        job: Arc<JobHandle>,
        old: JobSpec,
        spec: JobSpec,
        spec_yaml: String,
        allow_non_restored_state: bool,
    ) -> std::result::Result<Response<<Self as JmApi>::UpgradeJobStream>, Status> {
        upgrade::check_side_by_side(&old, &spec)?;
        let r = job.record();
        if let Some(side) = &r.side {
            return Err(KeelError::precondition(format!(
                "job {} already runs version {} side by side (job {}); promote or cancel it first",
                r.name, side.version, side.job_name
            ))
            .into());
        }
        let version = r.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let side_name = format!("{}.v{version}", r.name);
        let side_yaml = upgrade::renamed_spec(&spec_yaml, &side_name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut progress = upgrade::Progress::new(tx, r.active_version);
        progress.to_version = version;
        progress.step(format!(
            "side by side: version {version} will run beside version {} as job {side_name}",
            r.active_version
        ));
        let jm = self.0.clone();
        tokio::spawn(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            job.send(JobEvent::Savepoint { reply, stop: false });
            let savepoint = match tokio::time::timeout(SAVEPOINT_WAIT, answer).await {
                Ok(Ok(Ok(s))) => s,
                Ok(Ok(Err(e))) => return progress.fail(format!("no savepoint of the running version: {e}")),
                _ => return progress.fail("no savepoint of the running version"),
            };
            progress.step(format!(
                "savepoint {} of the running version ({})",
                savepoint.savepoint_id, savepoint.path
            ));
            let submitted = jm
                .submit(pb::SubmitJobRequest {
                    spec_yaml: side_yaml,
                    restore: false,
                    from_savepoint: savepoint.path.clone(),
                    allow_non_restored_state,
                })
                .await;
            let submitted = match submitted {
                Ok(s) => s,
                Err(e) => return progress.fail(format!("the side-by-side version could not start: {e}")),
            };
            {
                let mut r = job.record_mut();
                r.versions.push(VersionRecord {
                    version,
                    spec_yaml: spec_yaml.clone(),
                    state: JobState::Running,
                    created_at_ms: now_ms(),
                    parallelism: spec.parallelism,
                    restored_from: None,
                    ended_with: None,
                    start_fresh: false,
                });
                r.side = Some(record::SideRecord {
                    version,
                    job_id: submitted.job_id.clone(),
                    job_name: side_name.clone(),
                });
            }
            let persisted = match jm.leader_state() {
                Ok(st) => jm.ctx.jobs.put(&st.leadership, &job.job_id, &job.record()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = persisted {
                return progress.fail(format!("cannot record the side-by-side version: {e}"));
            }
            progress.step(format!(
                "version {version} runs side by side as job {side_name} ({}); `keel promote {}` makes it the active version",
                submitted.job_id,
                job.record().name
            ));
            progress.done(None, savepoint.savepoint_id, &savepoint.path);
        });
        Ok(Response::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
    }

    /// `keel savepoint` (`stop` false) and `keel stop` (`stop` true).
    async fn savepoint(
        &self,
        request: Request<pb::TriggerSavepointRequest>,
        stop: bool,
    ) -> std::result::Result<Response<pb::TriggerSavepointResponse>, Status> {
        let st = self.0.leader_state()?;
        let job = st.resolve(&request.into_inner().job)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        job.send(JobEvent::Savepoint { reply, stop });
        match tokio::time::timeout(SAVEPOINT_WAIT, answer).await {
            Ok(Ok(result)) => Ok(Response::new(result?)),
            Ok(Err(_)) => Err(KeelError::precondition("the job ended before the savepoint was taken").into()),
            Err(_) => Err(KeelError::precondition(format!(
                "no savepoint within {SAVEPOINT_WAIT:?}; the job keeps running"
            ))
            .into()),
        }
    }
}
/// How long the submission check of `transaction.timeout.ms` waits for a sink's brokers.
const BROKER_CONFIG_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause the restart strategy puts before a restart.
fn longest_restart_delay(restart: &keel_config::RestartConfig) -> Duration {
    use keel_config::RestartStrategyType as T;
    match restart.strategy {
        T::None => Duration::ZERO,
        T::FixedDelay => restart.fixed_delay.delay,
        T::FailureRate => restart.failure_rate.delay,
        T::ExponentialDelay => {
            let e = &restart.exponential_delay;
            e.max_backoff.mul_f64(1.0 + e.jitter_factor.clamp(0.0, 1.0))
        }
    }
}

/// How long `keel savepoint` waits for the savepoint at most.
const SAVEPOINT_WAIT: Duration = Duration::from_secs(15 * 60);

#[tonic::async_trait]
impl JmApi for JmService {
    type UpgradeJobStream =
        tokio_stream::wrappers::UnboundedReceiverStream<std::result::Result<pb::UpgradeProgress, Status>>;

    async fn upgrade_job(
        &self,
        request: Request<pb::UpgradeJobRequest>,
    ) -> std::result::Result<Response<Self::UpgradeJobStream>, Status> {
        let st = self.0.leader_state()?;
        let req = request.into_inner();
        let job = st.resolve(&req.job)?;
        let r = job.record();
        if r.state != JobState::Running {
            return Err(KeelError::precondition(format!(
                "job {} is {}; only a running job can be upgraded",
                r.name, r.state
            ))
            .into());
        }
        let active = r.active().ok_or_else(|| KeelError::internal("the job has no active version"))?;
        let old = JobSpec::parse(&active.spec_yaml)?;
        let spec_yaml = if req.spec_yaml.trim().is_empty() {
            if req.parallelism == 0 {
                return Err(KeelError::InvalidArgument {
                    reason: "a rescale needs a parallelism of at least 1".into(),
                }
                .into());
            }
            if req.parallelism > old.max_parallelism {
                return Err(KeelError::invalid_spec(
                    "parallelism",
                    format!("{} is above the job's maxParallelism {}", req.parallelism, old.max_parallelism),
                )
                .into());
            }
            upgrade::rescaled_spec(&active.spec_yaml, req.parallelism)?
        } else {
            req.spec_yaml.clone()
        };
        let spec = JobSpec::parse(&spec_yaml)?;
        // Refused here, before anything changes (the driver checks again).
        upgrade::check(&old, &spec, req.allow_non_restored_state)?;
        // The new version's transactional-id prefixes against every other live job (also for
        // side by side, whose version runs as a job of its own: refused now, not after the
        // savepoint), and its transaction.timeout.ms.
        self.0.check_exactly_once(&st, &spec, Some(&r.job_id))?;
        self.0.check_transaction_timeouts(&spec).await?;
        if req.mode.trim() == "side-by-side" {
            return self.side_by_side(job, old, spec, spec_yaml, req.allow_non_restored_state);
        }
        let (mode, cancel_on_update) = upgrade::UpgradeMode::parse(&req.mode)?;
        let upgrade_strategy = if cancel_on_update {
            upgrade::UpgradeStrategy::Stateless
        } else {
            upgrade::UpgradeStrategy::parse(&req.upgrade_strategy)?
        };
        let restore_strategy = upgrade::RestoreStrategy::parse(&req.restore_strategy)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let progress = upgrade::Progress::new(tx, r.active_version);
        progress.step(format!(
            "upgrade of job {} requested: version {} (parallelism {}) -> new version (parallelism {})",
            r.name, r.active_version, old.parallelism, spec.parallelism
        ));
        job.send(JobEvent::Upgrade(Box::new(upgrade::UpgradeRequest {
            spec_yaml,
            spec,
            mode,
            upgrade_strategy,
            restore_strategy,
            restore_pointer: None,
            promote: None,
            allow_non_restored_state: req.allow_non_restored_state,
            progress,
        })));
        Ok(Response::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
    }

    type PromoteJobStream =
        tokio_stream::wrappers::UnboundedReceiverStream<std::result::Result<pb::UpgradeProgress, Status>>;

    async fn promote_job(
        &self,
        request: Request<pb::TriggerSavepointRequest>,
    ) -> std::result::Result<Response<Self::PromoteJobStream>, Status> {
        let st = self.0.leader_state()?;
        let job = st.resolve(&request.into_inner().job)?;
        let r = job.record();
        let side = r.side.clone().ok_or_else(|| {
            KeelError::precondition(format!("job {} has no side-by-side version to promote", r.name))
        })?;
        if r.state != JobState::Running {
            return Err(KeelError::precondition(format!(
                "job {} is {}; promote needs it running",
                r.name, r.state
            ))
            .into());
        }
        let side_job = st.resolve(&side.job_id)?;
        let spec_yaml = upgrade::renamed_spec(
            &side_job.record().active().map(|v| v.spec_yaml.clone()).unwrap_or_default(),
            &r.name,
        )?;
        let spec = JobSpec::parse(&spec_yaml)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut progress = upgrade::Progress::new(tx, r.active_version);
        progress.to_version = side.version;
        progress.step(format!(
            "promote: version {} (running side by side as job {}) replaces version {}",
            side.version, side.job_name, r.active_version
        ));
        tokio::spawn(async move {
            // 1. The side version stops at a savepoint: its output up to there is committed.
            let (reply, answer) = tokio::sync::oneshot::channel();
            side_job.send(JobEvent::Savepoint { reply, stop: true });
            let stopped = match tokio::time::timeout(SAVEPOINT_WAIT, answer).await {
                Ok(Ok(Ok(s))) => s,
                Ok(Ok(Err(e))) => return progress.fail(format!("the side version could not stop: {e}")),
                _ => return progress.fail("the side version did not stop"),
            };
            progress.step(format!(
                "side version stopped at savepoint {} ({})",
                stopped.savepoint_id, stopped.path
            ));
            let pointer = match coordinator::read_metadata(std::path::Path::new(&stopped.path)).await {
                Ok(m) => CheckpointPointer {
                    job_id: m.job_id.clone(),
                    checkpoint_id: m.checkpoint_id,
                    metadata_path: stopped.path.clone(),
                    version: m.version,
                    attempt: m.attempt,
                    trigger_time_ms: m.trigger_time_ms,
                    duration_ms: m.duration_ms,
                    size_bytes: m.total_size_bytes,
                    completed_at_ms: m.completed_at_ms,
                    epoch: 0,
                },
                Err(e) => return progress.fail(format!("cannot read the side version's savepoint: {e}")),
            };
            // 2. A handover of the job to the side version's spec, from that savepoint.
            job.send(JobEvent::Upgrade(Box::new(upgrade::UpgradeRequest {
                spec_yaml,
                spec,
                mode: upgrade::UpgradeMode::Handover,
                upgrade_strategy: upgrade::UpgradeStrategy::Stateful,
                restore_strategy: upgrade::RestoreStrategy::LatestState,
                restore_pointer: Some(pointer),
                promote: Some(side.version),
                allow_non_restored_state: true,
                progress,
            })));
        });
        Ok(Response::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)))
    }

    async fn stop_job(
        &self,
        request: Request<pb::TriggerSavepointRequest>,
    ) -> std::result::Result<Response<pb::TriggerSavepointResponse>, Status> {
        self.savepoint(request, true).await
    }

    async fn trigger_savepoint(
        &self,
        request: Request<pb::TriggerSavepointRequest>,
    ) -> std::result::Result<Response<pb::TriggerSavepointResponse>, Status> {
        self.savepoint(request, false).await
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> std::result::Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.0.submit(req).await?))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> std::result::Result<Response<pb::CancelJobResponse>, Status> {
        let st = self.0.leader_state()?;
        let job = st.resolve(&request.into_inner().job)?;
        let state = job.record().state;
        if !state.is_terminal() {
            job.record_mut().cancel_requested = true;
            job.send(JobEvent::Cancel);
            tracing::info!(job_id = %job.job_id, "job cancel requested");
        }
        let state = if state.is_terminal() { state } else { JobState::Canceling };
        Ok(Response::new(pb::CancelJobResponse { job_id: job.job_id.clone(), state: state.to_string() }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> std::result::Result<Response<pb::ListJobsResponse>, Status> {
        let st = self.0.leader_state()?;
        let mut jobs: Vec<pb::JobSummary> = st.jobs().iter().map(|j| j.summary()).collect();
        jobs.sort_by_key(|j| j.created_at_ms);
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn describe_job(
        &self,
        request: Request<pb::DescribeJobRequest>,
    ) -> std::result::Result<Response<pb::JobDetails>, Status> {
        let st = self.0.leader_state()?;
        let job = st.resolve(&request.into_inner().job)?;
        Ok(Response::new(self.0.details(&job)))
    }

    async fn update_task_state(
        &self,
        request: Request<pb::TaskStateUpdate>,
    ) -> std::result::Result<Response<pb::UpdateTaskStateResponse>, Status> {
        let st = self.0.leader_state()?;
        let u = request.into_inner();
        // During the adoption window an unknown task is not canceled: only heartbeats (which
        // carry the TaskManager's address) make it an orphan to adopt.
        let known = self.0.apply_task_report(&st, &u) || st.may_adopt(&u.job_id);
        if !known {
            tracing::info!(task_id = %u.task_id, reported_epoch = u.jobmanager_epoch, epoch = st.leadership.epoch, "report for an unknown task; telling the taskmanager to cancel it");
        }
        Ok(Response::new(pb::UpdateTaskStateResponse { known }))
    }

    async fn task_manager_heartbeat(
        &self,
        request: Request<pb::JobManagerHeartbeatRequest>,
    ) -> std::result::Result<Response<pb::JobManagerHeartbeatResponse>, Status> {
        let st = self.0.leader_state()?;
        let req = request.into_inner();
        st.saw_taskmanager(&req.taskmanager_id, &req.address);
        let cancel_task_ids = req
            .tasks
            .iter()
            .filter(|u| {
                let terminal = TaskState::try_from(u.state).map(|s| s.is_terminal()).unwrap_or(false);
                !self.0.apply_task_report(&st, u) && !terminal && !st.keep_orphan(u, &req.address)
            })
            .map(|u| u.task_id.clone())
            .collect();
        // After its orphans are kept: a driver waiting to adopt may now rely on them.
        st.reported.lock().unwrap_or_else(|p| p.into_inner()).insert(req.taskmanager_id.clone());
        Ok(Response::new(pb::JobManagerHeartbeatResponse { cancel_task_ids }))
    }

    async fn acknowledge_checkpoint(
        &self,
        request: Request<pb::AcknowledgeCheckpointRequest>,
    ) -> std::result::Result<Response<pb::AcknowledgeCheckpointResponse>, Status> {
        let st = self.0.leader_state()?;
        let req = request.into_inner();
        let job = st.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(&req.job_id).cloned();
        let Some(job) = job else {
            return Err(KeelError::CheckpointRejected {
                job_id: req.job_id.clone(),
                checkpoint_id: req.checkpoint_id,
                reason: "this jobmanager leader does not know the job".into(),
            }
            .into());
        };
        let outcome = job.checkpoints().acknowledge(
            &req.task_id,
            req.version,
            req.checkpoint_id,
            &req.state_handle,
            req.state_size,
            Instant::now(),
        );
        match outcome {
            Ok(outcome) => {
                tracing::debug!(job_id = %req.job_id, task_id = %req.task_id, checkpoint_id = req.checkpoint_id,
                    ?outcome, "checkpoint acknowledged");
                if outcome == checkpoint::AckOutcome::AllAcknowledged {
                    job.checkpoint_wake.notify_one();
                }
                Ok(Response::new(pb::AcknowledgeCheckpointResponse {}))
            }
            Err(error) => {
                tracing::info!(job_id = %req.job_id, task_id = %req.task_id, checkpoint_id = req.checkpoint_id,
                    epoch = st.leadership.epoch, %error, "checkpoint acknowledgement rejected");
                // A state handle that was not JSON failed the pending checkpoint: let the
                // coordinator move on.
                job.checkpoint_wake.notify_one();
                Err(error.into())
            }
        }
    }

    async fn leader_info(
        &self,
        _request: Request<pb::LeaderInfoRequest>,
    ) -> std::result::Result<Response<pb::LeaderInfoResponse>, Status> {
        let jm = &self.0;
        let own = jm.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        let resp = match own {
            Some(st) if st.leadership.is_valid() => pb::LeaderInfoResponse {
                is_leader: true,
                epoch: st.leadership.epoch,
                leader_address: jm.ctx.address.clone(),
                address: jm.ctx.address.clone(),
            },
            _ => {
                let leader = jm.ctx.leader_watch.borrow().clone();
                pb::LeaderInfoResponse {
                    is_leader: false,
                    epoch: leader.as_ref().map(|l| l.epoch).unwrap_or(0),
                    leader_address: leader.map(|l| l.address).unwrap_or_default(),
                    address: jm.ctx.address.clone(),
                }
            }
        };
        Ok(Response::new(resp))
    }
}

/// Runs a JobManager process until `shutdown`: serves gRPC at once and campaigns for
/// leadership; prints `keel jobmanager listening on <address>` when the port is bound.
pub async fn run(config: Config, ha: Arc<dyn HaServices>, shutdown: CancellationToken) -> Result<()> {
    let rpc = config.jobmanager_rpc.clone();
    let (incoming, address) = keel_client::bind(&rpc.host, rpc.port).await?;
    println!("keel jobmanager listening on {address}");
    tracing::info!(%address, ha = ha.backend_name(), "jobmanager started");
    let rm = LeaderClient::from_ha(Role::ResourceManager, &ha, shutdown.clone());
    let ctx = Arc::new(JobManagerCtx {
        leader_watch: ha.watch_leader(Role::JobManager, shutdown.clone()),
        jobs: JobStore::new(ha.clone()),
        pointers: CheckpointPointerStore::new(ha.clone()),
        ha: ha.clone(),
        rm,
        channels: Channels::default(),
        address,
        config,
    });
    let jm = Arc::new(JobManager { ctx, state: RwLock::new(None) });
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobManagerServer::new(JmService(jm.clone())))
            .serve_with_incoming_shutdown(incoming, async move { server_shutdown.cancelled().await }),
    );
    let address = jm.ctx.address.clone();
    keel_ha::run_for_leadership(ha, Role::JobManager, address, shutdown.clone(), |leadership| {
        jm.clone().lead_once(leadership, shutdown.clone())
    })
    .await;
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(KeelError::internal(format!("jobmanager server: {e}"))),
        Err(e) => Err(KeelError::internal(format!("jobmanager server task: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task_id: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            task_id: task_id.into(),
            version: 1,
            subtask: 0,
            attempt: 0,
            state,
            taskmanager_id: "tm".into(),
            taskmanager_address: "127.0.0.1:1".into(),
            slot_index: 0,
            allocation_id: "a".into(),
            failure: String::new(),
            records_in: 10,
            records_out: 9,
        }
    }

    fn report(rate: f64, pending: Option<i64>, lag: Option<i64>, warning: &str) -> pb::TaskStateUpdate {
        pb::TaskStateUpdate {
            records_in_per_second: rate,
            records_out_per_second: rate / 2.0,
            bytes_in_per_second: rate * 10.0,
            pending_records: pending,
            current_emit_event_time_lag_ms: lag,
            source_partitions: vec![pb::SourcePartitions {
                source: "in".into(),
                topic: "t".into(),
                partitions: 3,
                assigned: 2,
                spread_warning: warning.into(),
            }],
            ..Default::default()
        }
    }

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

    /// A running task shows its latest report; a task that is not running shows no rates.
    #[test]
    fn task_details_carry_the_latest_report_only_while_running() {
        let r = report(100.0, Some(7), Some(250), "");
        let d = task_details(&record("t0", TaskState::Running), Some(&r));
        assert_eq!((d.records_in_per_second, d.records_out_per_second), (100.0, 50.0));
        assert_eq!((d.pending_records, d.current_emit_event_time_lag_ms), (Some(7), Some(250)));
        assert_eq!(d.source_partitions.len(), 1);
        assert_eq!((d.records_in, d.records_out), (10, 9));
        let d = task_details(&record("t0", TaskState::Failed), Some(&r));
        assert_eq!((d.records_in_per_second, d.pending_records), (0.0, None));
        assert!(d.source_partitions.is_empty());
        let d = task_details(&record("t0", TaskState::Running), None);
        assert_eq!(d.records_in_per_second, 0.0);
    }

    /// Rates and pending records add up, the lag is the largest, unknown stays unknown, and a
    /// warning reported by several subtasks is listed once.
    #[test]
    fn job_throughput_sums_rates_and_takes_the_largest_lag() {
        let warning = "source in, topic t: 3 partitions over parallelism 2 is uneven";
        let a = task_details(
            &record("t0", TaskState::Running),
            Some(&report(100.0, Some(7), Some(250), warning)),
        );
        let b =
            task_details(&record("t1", TaskState::Running), Some(&report(50.0, None, Some(900), warning)));
        let (t, warnings) = job_throughput(&[&a, &b]);
        assert_eq!(t.tasks_reporting, 2);
        assert_eq!((t.records_in_per_second, t.records_out_per_second), (150.0, 75.0));
        assert_eq!(t.bytes_in_per_second, 1500.0);
        assert_eq!((t.pending_records, t.max_emit_event_time_lag_ms), (Some(7), Some(900)));
        assert_eq!(warnings, vec![warning.to_string()]);

        let c = task_details(&record("t2", TaskState::Running), Some(&report(1.0, None, None, "")));
        let (t, warnings) = job_throughput(&[&c]);
        assert_eq!((t.pending_records, t.max_emit_event_time_lag_ms), (None, None));
        assert!(warnings.is_empty());
        assert_eq!(job_throughput(&[]).0, pb::JobThroughput::default());
    }
}
