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
pub mod events;
mod leader;
pub mod record;
pub mod restart;
mod state;
mod status;
pub mod upgrade;

pub use leader::JobManager;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use keel_client::{Channels, LeaderClient};
use keel_config::Config;
use keel_ha::{CheckpointPointerStore, HaServices, JobStore, Role};
use keel_proto::pb::job_manager_server::{JobManager as JmApi, JobManagerServer};
use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, Result, TaskStateExt};
use keel_spec::JobSpec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::checkpoint::CheckpointPointer;
use crate::events::JobEvent;
use crate::record::{now_ms, JobRecord, RestoredFrom, VersionRecord};
use crate::state::{JobHandle, JobManagerCtx, LeaderState};

impl JobManager {
    /// The checkpoint a job submitted with `--restore` starts from: the latest completed
    /// checkpoint of the most recent earlier job named `name`. Its metadata is read now, so a
    /// missing file or another parallelism is refused at submission.
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
        let mut missing: Vec<String> = metadata
            .subtasks
            .iter()
            .filter_map(|s| s.state.get("sources").and_then(|m| m.as_object()))
            .flat_map(|m| m.keys().cloned())
            .filter(|name| !spec.sources.iter().any(|s| &s.name == name))
            .collect();
        missing.sort();
        missing.dedup();
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
        Ok(Response::new(status::details(&self.0.ctx.config, &job)))
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
