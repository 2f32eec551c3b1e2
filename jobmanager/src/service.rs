//! The JobManager's gRPC service ([`JmService`]): the CLI's requests (run, cancel, upgrade,
//! rescale, savepoint, stop, promote, list, status) and the TaskManagers' reports, heartbeats
//! and checkpoint acknowledgements. An RPC finds the leader scope (a standby answers with a
//! typed `NotLeader` error), validates, and hands an event to the job's driver; reads are
//! answered from the leader's job handles (see [`crate::status`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::pb::job_manager_server::JobManager as JmApi;
use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, TaskStateExt};
use keel_spec::JobSpec;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::checkpoint::{self, CheckpointPointer};
use crate::coordinator;
use crate::events::{JobEvent, SideBySide};
use crate::leader::JobManager;
use crate::state::{JobHandle, LeaderState};
use crate::status;
use crate::upgrade;

/// The JobManager's gRPC service (every process serves it; a standby answers `NotLeader`).
pub(crate) struct JmService(pub(crate) Arc<JobManager>);

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
            // The job's driver records the version (it is the only writer of the job record).
            let (reply, recorded) = tokio::sync::oneshot::channel();
            job.send(JobEvent::SideBySide(Box::new(SideBySide {
                version,
                spec_yaml: spec_yaml.clone(),
                parallelism: spec.parallelism,
                job_id: submitted.job_id.clone(),
                job_name: side_name.clone(),
                reply,
            })));
            let recorded = match recorded.await {
                Ok(r) => r,
                Err(_) => Err(KeelError::precondition("the job's driver stopped")),
            };
            if let Err(e) = recorded {
                return progress.fail(format!(
                    "cannot record the side-by-side version: {e}; job {side_name} ({}) runs on its own: \
                     cancel it with `keel cancel {side_name}`",
                    submitted.job_id
                ));
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
            let path = std::path::Path::new(&stopped.path);
            let pointer = match coordinator::read_metadata(path).await {
                Ok(m) => CheckpointPointer::of_metadata(&m, path),
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
        let known = apply_task_report(&st, &u) || st.may_adopt(&u.job_id);
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
                !apply_task_report(&st, u) && !terminal && !st.keep_orphan(u, &req.address)
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

/// Applies a task report from a TaskManager. Returns false for a task this leader does not
/// run (an older attempt, or deployed by an earlier leader): the TaskManager cancels it.
fn apply_task_report(st: &LeaderState, u: &pb::TaskStateUpdate) -> bool {
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
