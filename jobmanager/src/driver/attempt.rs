//! One attempt of the active version: deploy its tasks, run its checkpoint coordinator, watch
//! it until it ends, and hand a failure to the restart strategy.

use std::time::Instant;

use keel_config::RestartConfig;
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, Result, TaskStateExt};

use keel_client::detector::call_peer;

use super::{
    AfterFailure, AttemptEnd, Driver, HEALTH_POLL, NO_PERIODIC_CHECKPOINTS, RETRY_PAUSE, TM_CALL_TIMEOUT,
};
use crate::checkpoint::{AttemptTask, Settings};
use crate::coordinator::{self, AttemptCheckpointing, Kind, Restore};
use crate::events::{JobEvent, SideBySide};
use crate::record::{RestoredFrom, SideRecord, TaskRecord, VersionRecord};
use crate::restart::{self, Decision, FailureEntry, FailureKind, JitterRng, RestartEntry};
use crate::upgrade_phase::{Event as UpgradeEvent, Phase};

impl Driver {
    /// Hands a failure of `attempt` to the job's restart strategy. To restart: records the
    /// restart in the job record's history, marks the job restarting and waits the pause the
    /// strategy chose. Otherwise: records the failure and fails the job with the cause.
    pub(super) async fn on_failure(
        &mut self,
        attempt: u32,
        kind: FailureKind,
        cause: String,
        strategy: &RestartConfig,
        rng: &mut JitterRng,
    ) -> Result<AfterFailure> {
        let now = self.ctx.clock.now_ms();
        let job_id = self.job.job_id.clone();
        let decision =
            restart::on_failure(strategy, &mut self.job.record_mut().restart.state, kind, now, rng);
        match decision {
            Decision::Restart { delay, waived } => {
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                let restart = {
                    let mut r = self.job.record_mut();
                    r.restarts += 1;
                    let restart = r.restarts;
                    let entry = RestartEntry { at_ms: now, attempt, restart, cause: cause.clone(), delay_ms };
                    r.restart.push(entry);
                    restart
                };
                let waived_ms = waived.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
                tracing::warn!(%job_id, attempt, restart, delay_ms, ?waived_ms, kind = kind.as_str(),
                    strategy = strategy.strategy.as_str(), %cause, "restarting the job");
                let message = match waived {
                    Some(w) => format!(
                        "{cause} (restart {restart} at once: a lost taskmanager after a quiet period; \
                         the strategy's {} pause is waived)",
                        keel_config::format_duration(w)
                    ),
                    None => format!("{cause} (restart {restart} in {})", keel_config::format_duration(delay)),
                };
                self.set_state(JobState::Restarting, message).await?;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => Ok(AfterFailure::Restart),
                    _ = self.wait_for_cancel() => Ok(AfterFailure::Cancel),
                }
            }
            Decision::Fail { why } => {
                tracing::error!(%job_id, attempt, kind = kind.as_str(), strategy = strategy.strategy.as_str(), %cause, reason = %why,
                    "job failed: not restarted");
                self.end_upgrade("the job failed", &[]).await?;
                self.job.record_mut().restart.failure =
                    Some(FailureEntry { at_ms: now, attempt, cause: cause.clone(), why: why.clone() });
                self.set_state(JobState::Failed, format!("{cause} (not restarted: {why})")).await?;
                Ok(AfterFailure::Failed)
            }
        }
    }

    /// Marks the job restarting and waits [`RETRY_PAUSE`] after trouble that is not a failure of
    /// the job (not counted by the restart strategy). Returns true when the user asked to cancel
    /// meanwhile.
    pub(super) async fn retry_pause(&mut self, reason: String) -> Result<bool> {
        self.set_state(JobState::Restarting, format!("{reason} (retrying in {RETRY_PAUSE:?})")).await?;
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PAUSE) => Ok(false),
            _ = self.wait_for_cancel() => Ok(true),
        }
    }

    pub(super) async fn wait_for_cancel(&mut self) {
        loop {
            match self.events.recv().await {
                Some(JobEvent::Cancel) => return,
                Some(ev @ (JobEvent::Upgrade(_) | JobEvent::Savepoint { .. } | JobEvent::SideBySide(_))) => {
                    ev.refuse("the job is not running");
                    continue;
                }
                Some(_) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Records on the active version which checkpoint this attempt starts from, and shows a
    /// checkpoint the job completed under an earlier leader in its stats.
    pub(super) fn record_restore(&self, restore: Option<&Restore>) {
        let restored_from = restore.map(|r| RestoredFrom {
            job_id: r.pointer.job_id.clone(),
            checkpoint_id: r.pointer.checkpoint_id,
            metadata_path: r.pointer.metadata_path.clone(),
            restored_at_ms: self.ctx.clock.now_ms(),
        });
        if let Some(r) = restore {
            tracing::info!(job_id = %self.job.job_id, checkpoint_id = r.pointer.checkpoint_id,
                checkpoint_job_id = %r.pointer.job_id, path = %r.pointer.metadata_path,
                "restoring from checkpoint");
            if r.pointer.job_id == self.job.job_id {
                self.job.checkpoints().note_completed(r.pointer.stat());
            }
        }
        if let Some(v) = self.job.record_mut().active_mut() {
            v.restored_from = restored_from;
        }
    }

    /// Hands the attempt's tasks to the job's checkpoint tracker and, when checkpointing is
    /// enabled, starts the coordinator loop of the attempt.
    pub(super) fn start_checkpointing(
        &self,
        tasks: &[TaskRecord],
        config: &keel_config::CheckpointConfig,
        version: u32,
        attempt: u32,
    ) -> Option<(tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)> {
        // Without periodic checkpoints the coordinator still runs, for savepoints.
        let settings = Some(Settings {
            interval: config.interval.unwrap_or(NO_PERIODIC_CHECKPOINTS),
            timeout: config.timeout,
            min_pause: config.min_pause,
            num_retained: config.num_retained,
        });
        let attempt_tasks = tasks
            .iter()
            .map(|t| AttemptTask {
                task_id: t.task_id.clone(),
                subtask: t.subtask,
                address: t.taskmanager_address.clone(),
            })
            .collect();
        self.job.checkpoints().begin_attempt(version, attempt, attempt_tasks, settings, Instant::now());
        let settings = settings?;
        tracing::info!(job_id = %self.job.job_id, version, attempt, interval_ms = ?config.interval.map(|i| i.as_millis()),
            dir = %config.dir.display(), "checkpoint coordinator started");
        let scope = self.st.leadership.lost().child_token();
        let cfg = AttemptCheckpointing {
            dir: config.dir.clone(),
            num_retained: settings.num_retained,
            job_name: self.job.record().name,
        };
        let handle = tokio::spawn(coordinator::run(
            self.ctx.clone(),
            self.st.clone(),
            self.job.clone(),
            cfg,
            scope.clone(),
        ));
        Some((scope, handle))
    }

    /// Stops the attempt's coordinator loop (a completion in progress finishes first) and
    /// abandons a pending checkpoint.
    pub(super) async fn stop_checkpointing(
        &self,
        coordinator: Option<(tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)>,
        why: &str,
    ) {
        if let Some((scope, handle)) = coordinator {
            scope.cancel();
            if let Err(error) = handle.await {
                tracing::error!(job_id = %self.job.job_id, %error, "checkpoint coordinator panicked");
            }
        }
        if let Some(id) = self.job.checkpoints().end_attempt(why, Instant::now()) {
            tracing::info!(job_id = %self.job.job_id, checkpoint_id = id, reason = %why, "pending checkpoint abandoned");
        }
    }

    pub(super) async fn deploy(
        &self,
        tasks: &[TaskRecord],
        spec_yaml: &str,
        parallelism: u32,
        restore: Option<&Restore>,
        checkpoints_dir: &std::path::Path,
    ) -> std::result::Result<(), String> {
        let calls = tasks.iter().map(|t| {
            let req = pb::DeployTaskRequest {
                jobmanager: Some(self.st.stamp()),
                allocation_id: t.allocation_id.clone(),
                slot_index: t.slot_index,
                task_id: t.task_id.clone(),
                job_id: self.job.job_id.clone(),
                version: t.version,
                subtask: t.subtask,
                parallelism,
                attempt: t.attempt,
                spec_yaml: spec_yaml.to_string(),
                restore_state: restore
                    .and_then(|r| r.states.get(t.subtask as usize).cloned())
                    .unwrap_or_default(),
                checkpoints_dir: checkpoints_dir.display().to_string(),
            };
            let address = t.taskmanager_address.clone();
            async move {
                self.st.leadership.check().map_err(|e| e.to_string())?;
                let channel = self.ctx.channels.get(&address).map_err(|e| e.to_string())?;
                let mut client = TaskManagerClient::new(channel);
                let call = client.deploy_task(req);
                let (result, outcome) = call_peer(&address, "DeployTask", TM_CALL_TIMEOUT, call).await;
                self.st.note_taskmanager_call(&address, outcome);
                result.map(|_| ()).map_err(|e| format!("deploying {} to {address} failed: {e}", t.task_id))
            }
        });
        let results = futures::future::join_all(calls).await;
        match results.into_iter().find_map(|r| r.err()) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Follows the attempt until it finishes, fails or is canceled.
    pub(super) async fn watch_attempt(&mut self) -> Result<AttemptEnd> {
        // Already running when the watch starts again after a refused upgrade or stop, or when
        // the tasks were adopted from an earlier leader.
        let mut running_recorded = self.job.record().state == JobState::Running
            && self.job.tasks().iter().all(|t| matches!(t.state, TaskState::Running | TaskState::Finished));
        if running_recorded && matches!(self.upgrade().map(|u| u.phase), Some(Phase::RollingBack { .. })) {
            // A rollback whose old version already ran under the leader before.
            self.advance(UpgradeEvent::OldVersionRuns { now_ms: self.ctx.clock.now_ms() }, &[]).await?;
        }
        loop {
            let event = if self.in_gate() {
                // An upgraded version on probation: look at its health between events.
                if let Err(why) = self.check_health(running_recorded).await? {
                    return Ok(AttemptEnd::Unhealthy(why));
                }
                tokio::select! {
                    ev = self.events.recv() => ev,
                    _ = tokio::time::sleep(HEALTH_POLL) => continue,
                }
            } else {
                self.events.recv().await
            };
            let Some(event) = event else {
                return Ok(AttemptEnd::Failed(FailureKind::Other, "job event channel closed".into()));
            };
            match event {
                JobEvent::Cancel => return Ok(AttemptEnd::Cancel),
                JobEvent::Upgrade(req) => {
                    if let Some(u) = self.upgrade() {
                        req.progress.fail(format!(
                            "the upgrade to version {} is in phase {}; try again once it is done",
                            u.to_version,
                            u.phase.name()
                        ));
                        continue;
                    }
                    if running_recorded {
                        return Ok(AttemptEnd::Upgrade(req));
                    }
                    req.progress.fail("the job is not running yet; try again when it runs");
                }
                JobEvent::Savepoint { reply, stop: true } => {
                    if running_recorded {
                        return Ok(AttemptEnd::Stop(reply));
                    }
                    let _ = reply.send(Err(KeelError::precondition("the job is not running yet")));
                }
                JobEvent::SideBySide(side) => {
                    let recorded = self.record_side_by_side(&side).await;
                    let _ = side.reply.send(recorded);
                }
                JobEvent::Savepoint { reply, stop: false } => {
                    if !running_recorded {
                        let _ = reply.send(Err(KeelError::precondition("the job is not running yet")));
                        continue;
                    }
                    let (ctx, st, job) = (self.ctx.clone(), self.st.clone(), self.job.clone());
                    let dir = self.checkpoints_dir.clone();
                    let timeout = self.ctx.config.checkpointing.timeout;
                    tokio::spawn(async move {
                        let result =
                            match coordinator::savepoint(&ctx, &st, &job, Kind::Savepoint, timeout).await {
                                Ok(done) => {
                                    coordinator::keep_savepoint(&dir, &job.job_id, &done).await.map(|path| {
                                        pb::TriggerSavepointResponse {
                                            job_id: job.job_id.clone(),
                                            savepoint_id: done.checkpoint_id,
                                            path,
                                        }
                                    })
                                }
                                // The job keeps running: only the savepoint failed.
                                Err(reason) => {
                                    Err(KeelError::precondition(format!("{reason}; the job keeps running")))
                                }
                            };
                        let _ = reply.send(result);
                    });
                }
                JobEvent::TaskManagerLost { taskmanager_id, reason } => {
                    let affected = self
                        .job
                        .tasks()
                        .iter()
                        .any(|t| t.taskmanager_id == taskmanager_id && !t.state.is_terminal());
                    if affected {
                        return Ok(AttemptEnd::Failed(
                            FailureKind::TaskManagerLost,
                            format!("taskmanager {taskmanager_id} lost: {reason}"),
                        ));
                    }
                }
                JobEvent::TaskState { task_id, state, failure, taskmanager_stopping } => {
                    let (all_running, all_finished, failed) = {
                        let mut tasks = self.job.tasks_mut();
                        let Some(t) = tasks.iter_mut().find(|t| t.task_id == task_id) else {
                            continue;
                        };
                        if t.state.is_terminal() {
                            continue;
                        }
                        t.state = state;
                        if !failure.is_empty() {
                            t.failure = failure.clone();
                        }
                        (
                            tasks
                                .iter()
                                .all(|t| t.state == TaskState::Running || t.state == TaskState::Finished),
                            tasks.iter().all(|t| t.state == TaskState::Finished),
                            matches!(state, TaskState::Failed | TaskState::Canceled),
                        )
                    };
                    if failed {
                        // A task canceled by its TaskManager's shutdown: the TaskManager is going
                        // away, which the restart strategy treats as a lost TaskManager.
                        if state == TaskState::Canceled && taskmanager_stopping {
                            let cause = format!("task {task_id} canceled: its taskmanager is shutting down");
                            return Ok(AttemptEnd::Failed(FailureKind::TaskManagerLost, cause));
                        }
                        let why = if failure.is_empty() { state.name().to_string() } else { failure };
                        let cause = format!("task {task_id} {}: {why}", state.name());
                        return Ok(AttemptEnd::Failed(FailureKind::Task, cause));
                    }
                    if all_finished {
                        return Ok(AttemptEnd::Finished);
                    }
                    if all_running && !running_recorded {
                        running_recorded = true;
                        self.set_state(JobState::Running, "").await?;
                        match self.upgrade().map(|u| u.phase) {
                            Some(Phase::Switched { .. }) => {
                                self.report(format!("version {} runs", self.job.record().active_version))
                            }
                            Some(Phase::RollingBack { .. }) => {
                                self.advance(
                                    UpgradeEvent::OldVersionRuns { now_ms: self.ctx.clock.now_ms() },
                                    &[],
                                )
                                .await?;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    /// Records a version that runs side by side as a job of its own (one fenced write).
    pub(super) async fn record_side_by_side(&self, side: &SideBySide) -> Result<()> {
        {
            let mut r = self.job.record_mut();
            if let Some(other) = &r.side {
                return Err(KeelError::precondition(format!(
                    "job {} already runs version {} side by side (job {})",
                    r.name, other.version, other.job_name
                )));
            }
            if r.versions.iter().any(|v| v.version == side.version) {
                return Err(KeelError::precondition(format!(
                    "version {} was taken by another upgrade meanwhile",
                    side.version
                )));
            }
            r.versions.push(VersionRecord {
                version: side.version,
                spec_yaml: side.spec_yaml.clone(),
                state: JobState::Running,
                created_at_ms: self.ctx.clock.now_ms(),
                parallelism: side.parallelism,
                restored_from: None,
                ended_with: None,
                start_fresh: false,
            });
            r.side = Some(SideRecord {
                version: side.version,
                job_id: side.job_id.clone(),
                job_name: side.job_name.clone(),
            });
        }
        tracing::info!(job_id = %self.job.job_id, version = side.version, side_job = %side.job_name,
            "side-by-side version recorded");
        self.persist().await
    }
}
