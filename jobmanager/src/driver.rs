//! The driver of one job: scheduling, deployment, failure handling and cancellation.
//!
//! One tokio task per job, inside the leader scope. It owns the job's lifecycle and receives
//! everything that happens to the job as [`JobEvent`]s. Every state change is written to the HA
//! store with a fenced write before the driver acts on it, so a new leader continues from the
//! last state this one managed to record; if the write is refused, leadership is gone and the
//! driver stops without acting further.
//!
//! Every attempt starts from the checkpoint the job's HA pointer names, if any (the latest
//! completed one, or for `keel run --restore` an earlier job's); a pointer whose metadata cannot
//! be read fails the job with a message naming the file instead of starting fresh. While the
//! attempt runs, a checkpoint coordinator loop ([`crate::coordinator`]) runs beside it; it is
//! stopped, and a pending checkpoint abandoned, when the attempt ends.
//!
//! Failures: a failed or lost task, a failed deployment, and a slot request that timed out
//! (`NotEnoughSlots`) are failures of the attempt, each counted once by the job's restart
//! strategy ([`crate::restart`]) with its [`FailureKind`], which either restarts the job after a
//! pause (recorded in the restart history) or fails it. A lost TaskManager after a quiet period
//! restarts without the pause (`restart-strategy.taskmanager-loss.quiet-period`). Waiting for
//! slots is not a failure until the request times out (`slot.request.timeout`), so a job
//! waiting for a TaskManager does not use up its restarts.
//! Trouble of the cluster itself (the ResourceManager or the HA store cannot be reached) is
//! retried after [`RETRY_PAUSE`] without counting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, Result, TaskStateExt};
use keel_spec::JobSpec;
use tokio::sync::mpsc;

use keel_client::detector::call_peer;
use keel_config::RestartConfig;

use crate::checkpoint::{AttemptTask, Settings};
use crate::coordinator::{self, AttemptCheckpointing, Restore, RestoreError};
use crate::coordinator::{Kind, SavepointDone};
use crate::events::JobEvent;
use crate::record::{now_ms, task_id, JobRecord, Placement, RestoredFrom, TaskRecord, VersionRecord};
use crate::restart::{self, Decision, FailureEntry, FailureKind, RestartEntry, SplitMix64};
use crate::state::{JobHandle, JobManagerCtx, LeaderState};
use crate::upgrade::{self, Progress, RestoreStrategy, UpgradeMode, UpgradeRequest, UpgradeStrategy};
use crate::upgrade_phase::{self, Action, Event as UpgradeEvent, Phase, SavepointRef, SlotRef, Upgrade};
use tokio::sync::oneshot;

/// How long an `AdoptTasks` call to a TaskManager may take.
const ADOPT_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a deploy or cancel call to a TaskManager may take.
const TM_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the driver waits for the answers to cancel calls before it goes on (the calls
/// themselves continue until [`TM_CALL_TIMEOUT`]).
const CANCEL_BUDGET: Duration = Duration::from_secs(1);
/// How long canceled tasks get to report that they stopped.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// The pause before retrying after trouble that is not the job's own failure (the
/// ResourceManager or the HA store could not be reached); not counted by the restart strategy.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The longest an upgrade waits for slots for its new version before falling back to
/// stop-then-start.
const UPGRADE_SLOT_WAIT: Duration = Duration::from_secs(5);
/// How long drained tasks get to finish after their savepoint completed.
const DRAIN_FINISH_WAIT: Duration = Duration::from_secs(10);
/// How long an upgrade waits, once the new version is healthy, for its first output to
/// measure the pause (without input there is no output, and the pause is reported unknown).
const PAUSE_MEASURE_WAIT: Duration = Duration::from_secs(5);
/// How often the health gate of an upgraded version is looked at.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// The checkpoint interval of a job without periodic checkpoints: its coordinator only takes
/// savepoints.
const NO_PERIODIC_CHECKPOINTS: Duration = Duration::from_secs(365 * 24 * 3600);

/// The old version is drained and the new one is ready to take over.
struct Drained {
    savepoint: SavepointRef,
    /// When the old version wrote its last record (ms since the epoch), if known.
    last_output_ms: Option<u64>,
}

/// Why a drain did not happen.
enum DrainError {
    /// Refused before anything changed: the old version keeps running untouched.
    Refused,
    /// The old version's tasks may be stopped at the barrier: its attempt has failed.
    Failed(String),
    /// The user canceled meanwhile.
    Cancel,
}

/// How an attempt ended.
enum AttemptEnd {
    Finished,
    /// The attempt failed: what kind of failure (for the restart strategy) and why.
    Failed(FailureKind, String),
    Cancel,
    /// An upgrade asked to replace the running version (handled while the attempt runs).
    Upgrade(Box<UpgradeRequest>),
    /// The attempt's version was drained for an upgrade.
    Drained(Box<Drained>),
    /// `keel stop`: stop with a savepoint (handled while the attempt runs).
    Stop(oneshot::Sender<Result<pb::TriggerSavepointResponse>>),
    /// The job was stopped with this savepoint; `keel stop` is answered once the job is
    /// recorded finished.
    Stopped(pb::TriggerSavepointResponse, oneshot::Sender<Result<pb::TriggerSavepointResponse>>),
    /// An upgraded version was not healthy in time: roll back.
    Unhealthy(String),
}

/// What the driver does after the restart strategy has seen a failure.
enum AfterFailure {
    /// The pause is over: start the next attempt.
    Restart,
    /// The user canceled during the pause.
    Cancel,
    /// The strategy gave up: the job is failed.
    Failed,
}

pub(crate) struct Driver {
    pub ctx: Arc<JobManagerCtx>,
    pub st: Arc<LeaderState>,
    pub job: Arc<JobHandle>,
    pub events: mpsc::UnboundedReceiver<JobEvent>,
    /// Slots allocated for the next attempt (an upgrade's new version).
    pub preallocated: Option<Vec<pb::AllocatedSlot>>,
    /// Where the progress of the upgrade in progress goes (`keel upgrade`'s stream); none after
    /// a leader change (the client's stream went with the old leader). The upgrade's phase
    /// itself is in the job record.
    pub progress: Option<Progress>,
    /// The job's effective `state.checkpoints.dir` (for savepoints).
    pub checkpoints_dir: std::path::PathBuf,
    /// The job was recovered from the HA store by a new leader: its running tasks may be
    /// adopted instead of restarted (see [`Driver::adopt`]).
    pub recovered: bool,
}

/// Tasks of an earlier leader's attempt that this leader adopted.
struct Adopted {
    attempt: u32,
    tasks: Vec<TaskRecord>,
}

impl Driver {
    pub async fn run(mut self) {
        let job_id = self.job.job_id.clone();
        let lost = self.st.leadership.lost().clone();
        let result = tokio::select! {
            biased;
            _ = lost.cancelled() => Ok(()),
            r = self.drive() => r,
        };
        match result {
            Ok(()) => {}
            Err(KeelError::LeadershipLost { reason }) => {
                tracing::warn!(%job_id, %reason, "job driver stopped: leadership lost")
            }
            Err(error) => tracing::error!(%job_id, %error, "job driver stopped"),
        }
    }

    async fn persist(&self) -> Result<()> {
        let record = self.job.record();
        self.ctx.jobs.put(&self.st.leadership, &record.job_id, &record).await
    }

    async fn set_state(&self, state: JobState, message: impl Into<String>) -> Result<()> {
        let message = message.into();
        {
            let mut r = self.job.record_mut();
            r.set_state(state);
            r.status_message = message.clone();
        }
        tracing::info!(job_id = %self.job.job_id, state = %state, message = %message, epoch = self.st.leadership.epoch, "job state");
        self.persist().await
    }

    async fn drive(&mut self) -> Result<()> {
        // A version registered by an upgrade that a leader change interrupted before its switch
        // never ran: only the active version runs, so it is marked failed.
        let interrupted: Vec<u32> = {
            let mut r = self.job.record_mut();
            let active = r.active_version;
            r.versions
                .iter_mut()
                .filter(|v| v.version != active && v.state == JobState::Created)
                .map(|v| {
                    v.state = JobState::Failed;
                    v.version
                })
                .collect()
        };
        if !interrupted.is_empty() {
            tracing::warn!(job_id = %self.job.job_id, versions = ?interrupted, "upgrade interrupted before its switch; the pending version is dropped");
            self.persist().await?;
        }
        let recovered = std::mem::take(&mut self.recovered);
        // An upgrade a leader change interrupted before its switch is over: the old version,
        // still active, runs on (see crate::upgrade_phase).
        let before_switch = self.upgrade().is_some_and(|u| u.phase.before_switch());
        if recovered && before_switch {
            self.advance(UpgradeEvent::Recovered { slots_kept: false, now_ms: now_ms() }, &[]).await?;
        }
        // A new leader first tries to adopt the job's running tasks (not those of an upgrade it
        // interrupted: they may be draining). Otherwise whatever an earlier attempt or an
        // earlier leader left allocated for this job is given back first: the next attempt
        // starts from a clean slate.
        let mut adopted =
            if recovered && interrupted.is_empty() && !before_switch { self.adopt().await } else { None };
        self.job.adopting.store(false, std::sync::atomic::Ordering::SeqCst);
        if adopted.is_none() {
            self.release(Vec::new(), true).await;
        }
        // After the switch (in the health gate, or rolling back) the new leader resumes the
        // upgrade where it was; the gate keeps its recorded deadline.
        if recovered && self.upgrade().is_some() {
            let event = UpgradeEvent::Recovered { slots_kept: adopted.is_some(), now_ms: now_ms() };
            self.advance(event, &[]).await?;
        }
        if self.job.record().cancel_requested {
            let tasks = adopted.map(|a| a.tasks).unwrap_or_default();
            return self.finish_cancel(&tasks).await;
        }
        let mut rng = SplitMix64::from_entropy();
        loop {
            let (version, spec_yaml, parallelism) = {
                let r = self.job.record();
                let v = r
                    .active()
                    .ok_or_else(|| KeelError::internal(format!("job {} has no active version", r.job_id)))?;
                (v.version, v.spec_yaml.clone(), v.parallelism)
            };
            let adopt_now = adopted.take();
            let attempt = match &adopt_now {
                Some(a) => a.attempt,
                None => {
                    let attempt = {
                        let mut r = self.job.record_mut();
                        r.attempts += 1;
                        r.attempts
                    };
                    self.set_state(JobState::Scheduled, format!("waiting for {parallelism} slots")).await?;
                    attempt
                }
            };

            // Checkpointing settings and restart strategy (the cluster's, overridden by the
            // spec's `config:`).
            let settings = JobSpec::parse(&spec_yaml).and_then(|spec| {
                let checkpointing = self.ctx.config.checkpointing.with_overrides(&spec.config);
                let checkpointing = checkpointing
                    .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
                Ok((checkpointing, restart::for_spec(&self.ctx.config.restart, &spec)?))
            });
            let (checkpointing, strategy) = match settings {
                Ok(c) => {
                    self.checkpoints_dir = c.0.dir.clone();
                    c
                }
                Err(err) => {
                    self.set_state(JobState::Failed, err.to_string()).await?;
                    return Ok(());
                }
            };

            let is_adopted = adopt_now.is_some();
            let (tasks, restore) = match adopt_now {
                Some(a) => {
                    // The adopted tasks run on from where they are; the job's latest completed
                    // checkpoint still shows in its stats.
                    if let Ok(Some(r)) =
                        coordinator::load_restore(&self.ctx.pointers, &self.job.job_id, parallelism).await
                    {
                        if r.pointer.job_id == self.job.job_id {
                            self.job.checkpoints().note_completed(r.pointer.stat());
                        }
                    }
                    *self.job.tasks_mut() = a.tasks.clone();
                    (a.tasks, None)
                }
                None => {
                    // The checkpoint to restore from.
                    let restore = match coordinator::load_restore(
                        &self.ctx.pointers,
                        &self.job.job_id,
                        parallelism,
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(RestoreError::Unusable(reason)) => {
                            tracing::error!(job_id = %self.job.job_id, version, %reason, "cannot restore the job from its checkpoint");
                            self.set_state(
                                JobState::Failed,
                                format!("cannot restore from the latest checkpoint: {reason}"),
                            )
                            .await?;
                            return Ok(());
                        }
                        Err(RestoreError::Ha(err)) => {
                            tracing::warn!(job_id = %self.job.job_id, error = %err, "cannot read the checkpoint pointer; retrying");
                            if self.retry_pause(format!("cannot read the checkpoint pointer: {err}")).await? {
                                return self.finish_cancel(&[]).await;
                            }
                            continue;
                        }
                    };
                    // A version started without state (restore strategy `none`) restores only its own
                    // checkpoints, never those of the versions before it.
                    let start_fresh = self.job.record().active().is_some_and(|v| v.start_fresh);
                    let restore = restore.filter(|r| !(start_fresh && r.pointer.version < version));
                    self.record_restore(restore.as_ref());

                    // Slots.
                    let request = pb::RequestSlotsRequest {
                        jobmanager: Some(self.st.stamp()),
                        job_id: self.job.job_id.clone(),
                        version,
                        count: parallelism,
                        request_id: format!("{}/v{version}#{attempt}", self.job.job_id),
                        timeout_ms: self.ctx.config.slot_request_timeout.as_millis() as u64,
                    };
                    let ctx = self.ctx.clone();
                    let slots = match self.preallocated.take() {
                        Some(slots) => Ok(slots),
                        None => tokio::select! {
                            r = ctx.request_slots(request) => r,
                            _ = self.wait_for_cancel() => return self.finish_cancel(&[]).await,
                        },
                    };
                    let slots = match slots {
                        Ok(s) => s,
                        Err(err @ KeelError::NotEnoughSlots { .. }) => {
                            let cause = err.to_string();
                            match self
                                .on_failure(attempt, FailureKind::NoSlots, cause, &strategy, &mut rng)
                                .await?
                            {
                                AfterFailure::Restart => continue,
                                AfterFailure::Cancel => return self.finish_cancel(&[]).await,
                                AfterFailure::Failed => return Ok(()),
                            }
                        }
                        Err(err)
                            if matches!(
                                err,
                                KeelError::LeadershipLost { .. } | KeelError::StaleEpoch { .. }
                            ) =>
                        {
                            return Err(KeelError::LeadershipLost { reason: err.to_string() });
                        }
                        Err(err) => {
                            tracing::warn!(job_id = %self.job.job_id, error = %err, "slot request failed; retrying");
                            if self.retry_pause(format!("slot request failed: {err}")).await? {
                                return self.finish_cancel(&[]).await;
                            }
                            continue;
                        }
                    };

                    // Tasks.
                    let tasks: Vec<TaskRecord> = slots
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let slot = s.slot.clone().unwrap_or_default();
                            let at = Placement {
                                taskmanager_id: slot.taskmanager_id,
                                taskmanager_address: s.taskmanager_address.clone(),
                                slot_index: slot.index,
                                allocation_id: s.allocation_id.clone(),
                            };
                            TaskRecord::placed(
                                &self.job.job_id,
                                version,
                                i as u32,
                                attempt,
                                TaskState::Deploying,
                                at,
                            )
                        })
                        .collect();
                    for t in &tasks {
                        self.st.saw_taskmanager(&t.taskmanager_id, &t.taskmanager_address);
                    }
                    *self.job.tasks_mut() = tasks.clone();
                    self.set_state(JobState::Deploying, "").await?;
                    (tasks, restore)
                }
            };

            let deployed = match is_adopted {
                true => Ok(()),
                false => {
                    self.deploy(&tasks, &spec_yaml, parallelism, restore.as_ref(), &checkpointing.dir).await
                }
            };
            let end = match deployed {
                Err(reason) => AttemptEnd::Failed(FailureKind::Deploy, reason),
                Ok(()) => {
                    if let Some(Phase::Switched { savepoint, .. }) = self.upgrade().map(|u| u.phase) {
                        self.report(format!(
                            "version {version} deployed ({parallelism} tasks) from savepoint {}",
                            savepoint.checkpoint_id
                        ));
                    }
                    let coordinator = self.start_checkpointing(&tasks, &checkpointing, version, attempt);
                    let watched = loop {
                        match self.watch_attempt().await {
                            Ok(AttemptEnd::Upgrade(req)) => {
                                match self.drain(*req, &tasks, version, &spec_yaml, &checkpointing).await {
                                    Ok(d) => break Ok(AttemptEnd::Drained(Box::new(d))),
                                    Err(DrainError::Refused) => continue,
                                    Err(DrainError::Failed(reason)) => {
                                        break Ok(AttemptEnd::Failed(FailureKind::Other, reason))
                                    }
                                    Err(DrainError::Cancel) => {
                                        let event = UpgradeEvent::Aborted {
                                            why: "the job was canceled".into(),
                                            now_ms: now_ms(),
                                        };
                                        self.advance(event, &tasks).await?;
                                        break Ok(AttemptEnd::Cancel);
                                    }
                                }
                            }
                            Ok(AttemptEnd::Stop(reply)) => {
                                match self.stop_with_savepoint(version, &checkpointing).await {
                                    Ok(done) => break Ok(AttemptEnd::Stopped(done, reply)),
                                    Err(DrainError::Failed(reason)) => {
                                        let _ = reply.send(Err(KeelError::precondition(format!(
                                            "{reason}; the job continues from its latest checkpoint"
                                        ))));
                                        break Ok(AttemptEnd::Failed(FailureKind::Other, reason));
                                    }
                                    Err(DrainError::Cancel) => {
                                        let _ =
                                            reply.send(Err(KeelError::precondition("the job was canceled")));
                                        break Ok(AttemptEnd::Cancel);
                                    }
                                    Err(DrainError::Refused) => {
                                        let _ = reply
                                            .send(Err(KeelError::precondition("the job cannot stop now")));
                                        continue;
                                    }
                                }
                            }
                            other => break other,
                        }
                    };
                    let why = match &watched {
                        Ok(AttemptEnd::Finished) => "the attempt finished".to_string(),
                        Ok(AttemptEnd::Cancel) => "the job is being canceled".to_string(),
                        Ok(AttemptEnd::Failed(_, reason)) => format!("attempt {attempt} failed: {reason}"),
                        Ok(AttemptEnd::Upgrade(_)) | Ok(AttemptEnd::Drained(_)) => {
                            format!("version {version} was drained for an upgrade")
                        }
                        Ok(AttemptEnd::Stop(_)) | Ok(AttemptEnd::Stopped(..)) => {
                            "the job was stopped".to_string()
                        }
                        Ok(AttemptEnd::Unhealthy(why)) => format!("version {version} is not healthy: {why}"),
                        Err(e) => format!("attempt {attempt} ended: {e}"),
                    };
                    self.stop_checkpointing(coordinator, &why).await;
                    watched?
                }
            };
            // An upgraded version that fails or is not healthy in time before it passed its health
            // gate is rolled back to the version it replaced (not counted as a restart).
            let end = match end {
                AttemptEnd::Failed(_, why) | AttemptEnd::Unhealthy(why) if self.in_gate() => {
                    tracing::warn!(job_id = %self.job.job_id, version, %why, "rolling back an upgrade");
                    self.advance(UpgradeEvent::Unhealthy { why }, &tasks).await?;
                    continue;
                }
                AttemptEnd::Finished | AttemptEnd::Stopped(..) if self.upgrade().is_some() => {
                    self.end_upgrade("the job finished", &tasks).await?;
                    end
                }
                other => other,
            };
            match end {
                AttemptEnd::Unhealthy(why) => {
                    // Only reachable without an upgrade in progress: nothing to roll back to.
                    tracing::warn!(job_id = %self.job.job_id, %why, "health gate without an upgrade");
                }
                AttemptEnd::Upgrade(req) => {
                    req.progress.fail("the attempt ended before the upgrade could start");
                    self.cancel_tasks(&tasks).await;
                    self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), false).await;
                }
                AttemptEnd::Drained(d) => self.switch(*d, &tasks, version).await?,
                AttemptEnd::Stop(reply) => {
                    let _ = reply.send(Err(KeelError::precondition("the attempt ended before the stop")));
                    self.cancel_tasks(&tasks).await;
                    self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), false).await;
                }
                AttemptEnd::Stopped(done, reply) => {
                    self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), false).await;
                    let recorded = self
                        .set_state(
                            JobState::Finished,
                            format!("stopped with savepoint {} ({})", done.savepoint_id, done.path),
                        )
                        .await;
                    // Answered only now, so that `keel status` right after `keel stop` says
                    // finished (the answer came before the state was recorded: a race).
                    let _ = reply.send(match &recorded {
                        Ok(()) => Ok(done),
                        Err(e) => Err(KeelError::internal(format!(
                            "the job stopped with savepoint {}, but its state could not be recorded: {e}",
                            done.savepoint_id
                        ))),
                    });
                    recorded?;
                    return Ok(());
                }
                AttemptEnd::Finished => {
                    self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), false).await;
                    self.set_state(JobState::Finished, "").await?;
                    return Ok(());
                }
                AttemptEnd::Cancel => return self.finish_cancel(&tasks).await,
                AttemptEnd::Failed(kind, reason) => {
                    tracing::warn!(job_id = %self.job.job_id, attempt, kind = kind.as_str(), %reason, "job attempt failed");
                    self.cancel_tasks(&tasks).await;
                    self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), false).await;
                    match self.on_failure(attempt, kind, reason, &strategy, &mut rng).await? {
                        AfterFailure::Restart => {}
                        AfterFailure::Cancel => return self.finish_cancel(&[]).await,
                        AfterFailure::Failed => return Ok(()),
                    }
                }
            }
        }
    }

    /// Hands a failure of `attempt` to the job's restart strategy. To restart: records the
    /// restart in the job record's history, marks the job restarting and waits the pause the
    /// strategy chose. Otherwise: records the failure and fails the job with the cause.
    async fn on_failure(
        &mut self,
        attempt: u32,
        kind: FailureKind,
        cause: String,
        strategy: &RestartConfig,
        rng: &mut SplitMix64,
    ) -> Result<AfterFailure> {
        let now = now_ms();
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
    async fn retry_pause(&mut self, reason: String) -> Result<bool> {
        self.set_state(JobState::Restarting, format!("{reason} (retrying in {RETRY_PAUSE:?})")).await?;
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PAUSE) => Ok(false),
            _ = self.wait_for_cancel() => Ok(true),
        }
    }

    async fn wait_for_cancel(&mut self) {
        loop {
            match self.events.recv().await {
                Some(JobEvent::Cancel) => return,
                Some(ev @ (JobEvent::Upgrade(_) | JobEvent::Savepoint { .. })) => {
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
    fn record_restore(&self, restore: Option<&Restore>) {
        let restored_from = restore.map(|r| RestoredFrom {
            job_id: r.pointer.job_id.clone(),
            checkpoint_id: r.pointer.checkpoint_id,
            metadata_path: r.pointer.metadata_path.clone(),
            restored_at_ms: now_ms(),
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
    fn start_checkpointing(
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
    async fn stop_checkpointing(
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

    async fn deploy(
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
    async fn watch_attempt(&mut self) -> Result<AttemptEnd> {
        // Already running when the watch starts again after a refused upgrade or stop, or when
        // the tasks were adopted from an earlier leader.
        let mut running_recorded = self.job.record().state == JobState::Running
            && self.job.tasks().iter().all(|t| matches!(t.state, TaskState::Running | TaskState::Finished));
        if running_recorded && matches!(self.upgrade().map(|u| u.phase), Some(Phase::RollingBack { .. })) {
            // A rollback whose old version already ran under the leader before.
            self.advance(UpgradeEvent::OldVersionRuns { now_ms: now_ms() }, &[]).await?;
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
                                self.advance(UpgradeEvent::OldVersionRuns { now_ms: now_ms() }, &[]).await?;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    /// Steps 1-3 of a handover (see [`crate::upgrade`]): checks, registers the new version,
    /// allocates its slots while the old version runs, and drains the old version with a
    /// stop-with-savepoint. The old attempt's checkpoint coordinator is running.
    async fn drain(
        &mut self,
        req: UpgradeRequest,
        tasks: &[TaskRecord],
        version: u32,
        spec_yaml: &str,
        checkpointing: &keel_config::CheckpointConfig,
    ) -> std::result::Result<Drained, DrainError> {
        let mut progress = req.progress.clone();
        let old = match JobSpec::parse(spec_yaml) {
            Ok(s) => s,
            Err(e) => {
                progress.fail(format!("the active version's spec cannot be read: {e}"));
                return Err(DrainError::Refused);
            }
        };
        if let Err(e) = upgrade::check(&old, &req.spec, req.allow_non_restored_state) {
            progress.fail(e.to_string());
            return Err(DrainError::Refused);
        }
        let latest_savepoint = coordinator::latest_savepoint(&self.checkpoints_dir, &self.job.job_id).await;
        if req.restore_strategy == RestoreStrategy::LatestSavepoint
            && req.upgrade_strategy == UpgradeStrategy::Stateless
            && latest_savepoint.is_none()
        {
            progress.fail(format!(
                "restore strategy latest-savepoint: job {} has no savepoint (take one with `keel savepoint`)",
                self.job.job_id
            ));
            return Err(DrainError::Refused);
        }
        // Phase `registered`: the new version is recorded as pending.
        let new_parallelism = req.spec.parallelism;
        let to_version = {
            let mut r = self.job.record_mut();
            let to = match req.promote {
                Some(n) => {
                    if let Some(v) = r.versions.iter_mut().find(|v| v.version == n) {
                        v.state = JobState::Created;
                        v.spec_yaml = req.spec_yaml.clone();
                        v.parallelism = new_parallelism;
                    }
                    n
                }
                None => {
                    let to = r.versions.iter().map(|v| v.version).max().unwrap_or(version) + 1;
                    r.versions.push(VersionRecord {
                        version: to,
                        spec_yaml: req.spec_yaml.clone(),
                        state: JobState::Created,
                        created_at_ms: now_ms(),
                        parallelism: new_parallelism,
                        restored_from: None,
                        ended_with: None,
                        start_fresh: req.restore_strategy == RestoreStrategy::None,
                    });
                    to
                }
            };
            r.upgrade = Some(Upgrade::registered(version, to, now_ms()));
            to
        };
        progress.to_version = to_version;
        self.progress = Some(progress.clone());
        if let Err(e) = self.persist().await {
            self.progress = None;
            progress.fail(format!("cannot record version {to_version}: {e}"));
            return Err(DrainError::Refused);
        }
        progress.step(format!("registered version {to_version} (parallelism {new_parallelism}) as pending"));
        let abort = |why: String| UpgradeEvent::Aborted { why, now_ms: now_ms() };

        // Phase `slots-allocated`: the new version's slots, while the old one runs.
        match req.mode {
            UpgradeMode::StopStart => {
                progress.step(format!(
                    "stop-then-start: version {version} stops before version {to_version} starts"
                ));
            }
            UpgradeMode::Handover => {
                let request = pb::RequestSlotsRequest {
                    jobmanager: Some(self.st.stamp()),
                    job_id: self.job.job_id.clone(),
                    version: to_version,
                    count: new_parallelism,
                    request_id: format!("{}/v{to_version}#upgrade", self.job.job_id),
                    timeout_ms: u64::try_from(
                        self.ctx.config.slot_request_timeout.min(UPGRADE_SLOT_WAIT).as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                };
                match self.ctx.request_slots(request).await {
                    Ok(slots) => {
                        let slots = slots.iter().map(SlotRef::of).collect();
                        self.advance_in_drain(UpgradeEvent::SlotsAllocated(slots), tasks).await?;
                    }
                    Err(KeelError::NotEnoughSlots { needed, free, .. }) => {
                        progress.step(format!(
                            "not enough free slots to run both versions at once ({needed} needed, {free} free): \
                             falling back to stop-then-start"
                        ));
                    }
                    Err(e) => {
                        let why = format!("cannot allocate slots for version {to_version}: {e}");
                        self.advance_in_drain(abort(why), tasks).await?;
                        return Err(DrainError::Refused);
                    }
                }
            }
        }

        // Phase `draining`.
        self.advance_in_drain(UpgradeEvent::DrainStarted, tasks).await?;
        let (done, savepoint_path) = match req.upgrade_strategy {
            UpgradeStrategy::Stateful => {
                progress.step(format!("draining version {version}: its sources stop at a savepoint barrier"));
                let done = coordinator::savepoint(
                    &self.ctx,
                    &self.st,
                    &self.job,
                    Kind::Drain,
                    checkpointing.timeout,
                )
                .await;
                let done = match done {
                    Ok(done) => done,
                    Err(reason) => {
                        let why = format!(
                            "the drain savepoint failed: {reason}; version {version} stays active and \
                             continues from its latest checkpoint"
                        );
                        self.advance_in_drain(abort(why), tasks).await?;
                        return Err(DrainError::Failed(format!(
                            "the drain savepoint of an upgrade failed: {reason}"
                        )));
                    }
                };
                let path = match coordinator::keep_savepoint(&self.checkpoints_dir, &self.job.job_id, &done)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(job_id = %self.job.job_id, error = %e, "cannot keep the drain savepoint's copy");
                        done.metadata_path.clone()
                    }
                };
                progress.step(format!(
                    "savepoint {} complete: version {version} drained, its output committed",
                    done.checkpoint_id
                ));
                (done, path)
            }
            UpgradeStrategy::Stateless => {
                progress.step(format!("stateless: canceling version {version} at once (no savepoint)"));
                self.cancel_tasks(tasks).await;
                let pointer: Option<crate::checkpoint::CheckpointPointer> =
                    self.ctx.pointers.get(&self.job.job_id).await.ok().flatten();
                let done = SavepointDone {
                    checkpoint_id: pointer.as_ref().map_or(0, |p| p.checkpoint_id),
                    metadata_path: pointer.as_ref().map(|p| p.metadata_path.clone()).unwrap_or_default(),
                };
                let path = done.metadata_path.clone();
                (done, path)
            }
        };
        // Which state the new version starts from: the job's HA pointer names it.
        let chosen = match (&req.restore_pointer, req.restore_strategy) {
            (Some(pointer), _) => Some((pointer.clone(), "continues from its own savepoint")),
            (None, RestoreStrategy::LatestSavepoint) => {
                let latest = coordinator::latest_savepoint(&self.checkpoints_dir, &self.job.job_id).await;
                latest
                    .filter(|p| {
                        req.upgrade_strategy == UpgradeStrategy::Stateless
                            || p.checkpoint_id != done.checkpoint_id
                    })
                    .map(|p| (p, "starts from the latest savepoint"))
            }
            (None, _) => None,
        };
        let (done, savepoint_path) = match chosen {
            Some((pointer, how)) => {
                if let Err(e) = self.ctx.pointers.set(&self.st.leadership, &self.job.job_id, &pointer).await {
                    let why = format!("cannot point the job at savepoint {}: {e}", pointer.checkpoint_id);
                    self.advance_in_drain(abort(why), tasks).await?;
                    return Err(DrainError::Failed(format!("cannot set the job's savepoint pointer: {e}")));
                }
                progress.step(format!(
                    "version {to_version} {how} {} ({})",
                    pointer.checkpoint_id, pointer.metadata_path
                ));
                let done = SavepointDone {
                    checkpoint_id: pointer.checkpoint_id,
                    metadata_path: pointer.metadata_path.clone(),
                };
                (done, pointer.metadata_path)
            }
            None => {
                progress.step(match (req.restore_strategy, done.checkpoint_id) {
                    (RestoreStrategy::None, _) => {
                        format!("version {to_version} starts without state (restore strategy none)")
                    }
                    (RestoreStrategy::LatestSavepoint, id) => {
                        format!("version {to_version} starts from the latest savepoint {id}")
                    }
                    (_, 0) => {
                        format!("version {to_version} starts without state (the job has no checkpoint)")
                    }
                    (_, id) => format!("version {to_version} starts from the latest state: checkpoint {id}"),
                });
                (done, savepoint_path)
            }
        };
        if req.promote.is_some() {
            self.job.record_mut().side = None;
        }

        self.wait_drained().await?;
        let last_output_ms = {
            let reports = self.job.reports();
            tasks
                .iter()
                .filter_map(|t| reports.get(&t.task_id))
                .map(|r| r.last_output_ms)
                .filter(|m| *m > 0)
                .max()
        };
        self.note_ended_with(version, &done, &savepoint_path);
        let savepoint = SavepointRef { checkpoint_id: done.checkpoint_id, path: savepoint_path };
        Ok(Drained { savepoint, last_output_ms })
    }

    /// [`Driver::advance`] inside a drain: a refused write means leadership is gone, which
    /// ends the drain as a failure of the attempt (the driver then stops).
    async fn advance_in_drain(
        &mut self,
        event: UpgradeEvent,
        tasks: &[TaskRecord],
    ) -> std::result::Result<(), DrainError> {
        self.advance(event, tasks)
            .await
            .map_err(|e| DrainError::Failed(format!("cannot record the upgrade: {e}")))
    }

    /// `keel stop`: drains the running attempt with a savepoint, kept like `keel savepoint`'s.
    async fn stop_with_savepoint(
        &mut self,
        version: u32,
        checkpointing: &keel_config::CheckpointConfig,
    ) -> std::result::Result<pb::TriggerSavepointResponse, DrainError> {
        let done = coordinator::savepoint(&self.ctx, &self.st, &self.job, Kind::Drain, checkpointing.timeout)
            .await
            .map_err(|reason| DrainError::Failed(format!("the stop savepoint failed: {reason}")))?;
        let path = coordinator::keep_savepoint(&self.checkpoints_dir, &self.job.job_id, &done)
            .await
            .unwrap_or_else(|_| done.metadata_path.clone());
        self.wait_drained().await?;
        self.note_ended_with(version, &done, &path);
        Ok(pb::TriggerSavepointResponse {
            job_id: self.job.job_id.clone(),
            savepoint_id: done.checkpoint_id,
            path,
        })
    }

    fn note_ended_with(&self, version: u32, done: &SavepointDone, path: &str) {
        if let Some(v) = self.job.record_mut().versions.iter_mut().find(|v| v.version == version) {
            v.ended_with = Some(RestoredFrom {
                job_id: self.job.job_id.clone(),
                checkpoint_id: done.checkpoint_id,
                metadata_path: path.to_string(),
                restored_at_ms: now_ms(),
            });
        }
    }

    /// After a drain savepoint completed: waits until the attempt's tasks finished (they do
    /// once told that the savepoint is complete); cancels those that did not within
    /// [`DRAIN_FINISH_WAIT`].
    async fn wait_drained(&mut self) -> std::result::Result<(), DrainError> {
        let deadline = tokio::time::Instant::now() + DRAIN_FINISH_WAIT;
        while self.job.tasks().iter().any(|t| !t.state.is_terminal()) {
            let ev = tokio::select! {
                ev = self.events.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            match ev {
                Some(JobEvent::TaskState { task_id, state, failure, .. }) => {
                    if let Some(t) = self.job.tasks_mut().iter_mut().find(|t| t.task_id == task_id) {
                        t.state = state;
                        t.failure = failure;
                    }
                }
                Some(JobEvent::TaskManagerLost { taskmanager_id, .. }) => {
                    for t in self.job.tasks_mut().iter_mut().filter(|t| t.taskmanager_id == taskmanager_id) {
                        t.state = TaskState::Canceled;
                    }
                }
                Some(JobEvent::Cancel) => return Err(DrainError::Cancel),
                Some(ev) => ev.refuse("an upgrade is in progress"),
                None => break,
            }
        }
        let unfinished: Vec<TaskRecord> =
            self.job.tasks().into_iter().filter(|t| !t.state.is_terminal()).collect();
        if !unfinished.is_empty() {
            tracing::warn!(job_id = %self.job.job_id, tasks = unfinished.len(), "drained tasks did not finish; canceling them");
            self.cancel_tasks(&unfinished).await;
        }
        Ok(())
    }

    /// Step 4 of a handover: records the switch (one fenced write: the new version active, the
    /// old one finished, the upgrade in its health gate); the next attempt deploys the new
    /// version from the drain savepoint (the job's HA pointer) into the slots allocated for it.
    async fn switch(&mut self, d: Drained, tasks: &[TaskRecord], version: u32) -> Result<()> {
        let old_slots: Vec<SlotRef> = tasks
            .iter()
            .map(|t| SlotRef {
                taskmanager_id: t.taskmanager_id.clone(),
                taskmanager_address: t.taskmanager_address.clone(),
                index: t.slot_index,
                allocation_id: t.allocation_id.clone(),
            })
            .collect();
        let to_version = self.upgrade().map_or(version, |u| u.to_version);
        let checkpoints = JobSpec::parse(
            &self
                .job
                .record()
                .versions
                .iter()
                .find(|v| v.version == to_version)
                .map(|v| v.spec_yaml.clone())
                .unwrap_or_default(),
        )
        .ok()
        .and_then(|spec| self.ctx.config.checkpointing.with_overrides(&spec.config).ok())
        .is_some_and(|c| c.interval.is_some());
        let event = UpgradeEvent::Drained {
            savepoint: d.savepoint,
            old_slots,
            last_output_ms: d.last_output_ms,
            checkpoints,
            gate_ms: u64::try_from(self.ctx.config.upgrade_health_timeout.as_millis()).unwrap_or(u64::MAX),
            now_ms: now_ms(),
        };
        self.advance(event, tasks).await
    }

    /// Ends the upgrade in progress, if any, because the job ended (`why`).
    async fn end_upgrade(&mut self, why: &str, tasks: &[TaskRecord]) -> Result<()> {
        let Some(u) = self.upgrade() else { return Ok(()) };
        let event = match u.phase.before_switch() {
            true => UpgradeEvent::Aborted { why: why.to_string(), now_ms: now_ms() },
            false => UpgradeEvent::JobEnded { why: why.to_string(), now_ms: now_ms() },
        };
        self.advance(event, tasks).await
    }

    /// The job's upgrade, while it has not ended.
    fn upgrade(&self) -> Option<Upgrade> {
        self.job.record().upgrade.filter(|u| !u.phase.is_terminal())
    }

    /// The new version of an upgrade is inside its health gate.
    fn in_gate(&self) -> bool {
        matches!(self.upgrade().map(|u| u.phase), Some(Phase::Switched { .. }))
    }

    /// Hands `event` to the upgrade's state machine ([`upgrade_phase::transition`]): applies the
    /// record edits it returns and records the new phase with one fenced write, then carries
    /// out the other actions. `tasks`: the attempt running now (the new version's, in the gate).
    async fn advance(&mut self, event: UpgradeEvent, tasks: &[TaskRecord]) -> Result<()> {
        let Some(current) = self.job.record().upgrade else { return Ok(()) };
        let (next, actions) = match upgrade_phase::transition(&current, event) {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(job_id = %self.job.job_id, %error, "upgrade event ignored");
                return Ok(());
            }
        };
        if next == current && actions.is_empty() {
            return Ok(());
        }
        {
            let mut r = self.job.record_mut();
            for action in actions.iter().filter(|a| a.is_record_edit()) {
                apply_edit(&mut r, action, &next.phase);
            }
            r.upgrade = Some(next.clone());
        }
        tracing::info!(job_id = %self.job.job_id, from_version = next.from_version, to_version = next.to_version,
            phase = next.phase.name(), epoch = self.st.leadership.epoch, "upgrade phase");
        self.persist().await?;
        for action in actions.into_iter().filter(|a| !a.is_record_edit()) {
            self.carry_out(action, tasks, &current).await;
        }
        Ok(())
    }

    /// Carries out one effect of an upgrade transition (after its phase was recorded).
    /// `before`: the upgrade as it was before the transition.
    async fn carry_out(&mut self, action: Action, tasks: &[TaskRecord], before: &Upgrade) {
        match action {
            Action::Release(allocations) => self.release(allocations, false).await,
            Action::CancelAttempt => {
                self.cancel_tasks(tasks).await;
                let mut release: Vec<String> = tasks.iter().map(|t| t.allocation_id.clone()).collect();
                if let Some(pre) = self.preallocated.take() {
                    release.extend(pre.into_iter().map(|s| s.allocation_id));
                }
                self.release(release, false).await;
            }
            Action::UseSlots(slots) => self.preallocated = Some(slots.iter().map(SlotRef::to_pb).collect()),
            Action::WatchGate { deadline_ms } => {
                tracing::info!(job_id = %self.job.job_id, to_version = before.to_version,
                    left_ms = deadline_ms.saturating_sub(now_ms()), "health gate of the new version");
            }
            Action::Report(step) => self.report(step),
            Action::Complete => {
                if let Phase::Switched { savepoint, checkpoints, last_output_ms, .. } = &before.phase {
                    self.report(format!(
                        "version {} healthy (running{}); version {}'s slots released",
                        before.to_version,
                        if *checkpoints { ", first checkpoint completed" } else { "" },
                        before.from_version
                    ));
                    if let Some(progress) = self.progress.take() {
                        self.measure_pause(progress, *last_output_ms, savepoint.clone());
                    }
                }
            }
            Action::Fail(why) => match self.progress.take() {
                Some(progress) => progress.fail(why),
                None => {
                    tracing::warn!(job_id = %self.job.job_id, to_version = before.to_version, %why, "upgrade failed")
                }
            },
            Action::FailVersion(_) | Action::Switch { .. } | Action::Reactivate { .. } => {}
        }
    }

    /// A progress step of the upgrade in progress (logged when no client listens).
    fn report(&self, step: String) {
        match &self.progress {
            Some(progress) => progress.step(step),
            None => tracing::info!(job_id = %self.job.job_id, %step, "upgrade"),
        }
    }

    /// The health gate of an upgraded version ([`upgrade_phase::gate`]): once it runs and (with
    /// periodic checkpoints) completed a checkpoint after the savepoint, the upgrade is done
    /// and the old version's slots go. `Ok(Err(why))` when the deadline passed first.
    async fn check_health(&mut self, running: bool) -> Result<std::result::Result<(), String>> {
        let Some(u) = self.upgrade() else { return Ok(Ok(())) };
        let Phase::Switched { savepoint, .. } = &u.phase else { return Ok(Ok(())) };
        let after = savepoint.checkpoint_id;
        let checkpointed = self
            .job
            .checkpoints()
            .stats(Instant::now())
            .iter()
            .any(|c| c.checkpoint_id > after && c.state == crate::checkpoint::CheckpointState::Completed);
        let timeout = keel_config::format_duration(self.ctx.config.upgrade_health_timeout);
        match upgrade_phase::gate(&u, running, checkpointed, now_ms(), &timeout) {
            Some(UpgradeEvent::Unhealthy { why }) => Ok(Err(why)),
            Some(event) => self.advance(event, &[]).await.map(Ok),
            None => Ok(Ok(())),
        }
    }

    /// Reports the upgrade done once a task of the new version reports its first output, with
    /// the pause since the old version's last.
    fn measure_pause(&self, progress: Progress, last_output_ms: Option<u64>, savepoint: SavepointRef) {
        let job = self.job.clone();
        let new_tasks: Vec<String> = job.tasks().iter().map(|t| t.task_id.clone()).collect();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PAUSE_MEASURE_WAIT;
            let first = loop {
                let first = {
                    let reports = job.reports();
                    new_tasks
                        .iter()
                        .filter_map(|id| reports.get(id))
                        .map(|r| r.first_output_ms)
                        .filter(|m| *m > 0)
                        .min()
                };
                if first.is_some() || tokio::time::Instant::now() >= deadline {
                    break first;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let pause = match (last_output_ms, first) {
                (Some(last), Some(first)) => {
                    Some(i64::try_from(first).unwrap_or(i64::MAX) - i64::try_from(last).unwrap_or(0))
                }
                _ => None,
            };
            progress.done(pause, savepoint.checkpoint_id, &savepoint.path);
        });
    }

    /// Adoption (a new leader, a job recovered from the HA store): when the job was running, the
    /// tasks of its last attempt that still run on their TaskManagers are taken over instead of
    /// restarted. The TaskManagers report them in their heartbeats (kept during the adoption
    /// window, see [`LeaderState`]); each is then asked to adopt them (`AdoptTasks`), which
    /// stamps the tasks and their slots with this leader's epoch. Only all or nothing: with a
    /// task missing, ended or not adoptable, the adopted ones are canceled and the job restarts
    /// from its latest checkpoint as before. A checkpoint the earlier leader had in flight is
    /// abandoned: its id is never used again (the id counter is in the HA store), and the next
    /// completed checkpoint subsumes it (exactly-once sinks commit what it had pre-committed).
    async fn adopt(&self) -> Option<Adopted> {
        let (version, parallelism, attempt) = {
            let r = self.job.record();
            let v = r.active()?;
            if r.state != JobState::Running || r.cancel_requested || r.attempts == 0 {
                return None;
            }
            (v.version, v.parallelism, r.attempts)
        };
        let job_id = self.job.job_id.clone();
        let ids: Vec<String> = (0..parallelism).map(|i| task_id(&job_id, version, i, attempt)).collect();
        let started = tokio::time::Instant::now();
        // Heartbeats come every heartbeat.interval; up to three of them, within the adoption
        // window.
        let wait = (self.ctx.config.heartbeat_interval * 3)
            .min(self.st.adopt_until.saturating_duration_since(Instant::now()));
        let mut next_look = started;
        let found = loop {
            if let Some(found) = self.st.orphans_of(&ids) {
                break found;
            }
            if started.elapsed() >= wait {
                tracing::info!(%job_id, version, attempt, waited_ms = started.elapsed().as_millis() as u64,
                    "not every task of the running attempt was reported; restarting the job instead of adopting");
                return None;
            }
            // Every TaskManager that holds a slot of this version has reported (or there is
            // none): the missing tasks are gone, and waiting longer only delays the restart.
            if tokio::time::Instant::now() >= next_look {
                next_look = tokio::time::Instant::now() + Duration::from_millis(250);
                if let Some(holders) = self.slot_holders(version).await {
                    if self.st.reported_by(&holders) && self.st.orphans_of(&ids).is_none() {
                        tracing::info!(%job_id, version, attempt, taskmanagers = ?holders,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "every taskmanager holding the job's slots has reported and a task of the running attempt is missing; restarting the job instead of adopting");
                        return None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut by_address: std::collections::BTreeMap<String, (String, Vec<String>)> =
            std::collections::BTreeMap::new();
        for (id, o) in &found {
            by_address
                .entry(o.address.clone())
                .or_insert_with(|| (o.taskmanager_id.clone(), Vec::new()))
                .1
                .push(id.clone());
        }
        let calls = by_address.into_iter().map(|(address, (taskmanager_id, task_ids))| {
            let req =
                pb::AdoptTasksRequest { jobmanager: Some(self.st.stamp()), job_id: job_id.clone(), task_ids };
            async move {
                let result = async {
                    let mut client = TaskManagerClient::new(self.ctx.channels.get(&address)?);
                    let call = client.adopt_tasks(req);
                    let (result, outcome) = call_peer(&address, "AdoptTasks", ADOPT_CALL_TIMEOUT, call).await;
                    self.st.note_taskmanager_call(&address, outcome);
                    result
                }
                .await;
                (address, taskmanager_id, result)
            }
        });
        let mut tasks: Vec<TaskRecord> = Vec::new();
        for (address, taskmanager_id, result) in futures::future::join_all(calls).await {
            match result {
                Ok(response) => {
                    for a in response.adopted {
                        let Some(subtask) = ids.iter().position(|id| *id == a.task_id) else { continue };
                        let state = TaskState::try_from(a.state).unwrap_or(TaskState::Unspecified);
                        let at = Placement {
                            taskmanager_id: taskmanager_id.clone(),
                            taskmanager_address: address.clone(),
                            slot_index: a.slot_index,
                            allocation_id: a.allocation_id,
                        };
                        tasks.push(TaskRecord::placed(&job_id, version, subtask as u32, attempt, state, at));
                    }
                }
                Err(error) => tracing::warn!(%job_id, %address, %error, "cannot adopt tasks"),
            }
        }
        tasks.sort_by_key(|t| t.subtask);
        let complete = tasks.len() == ids.len() && tasks.iter().all(|t| t.state == TaskState::Running);
        if !complete {
            tracing::warn!(%job_id, version, attempt, adopted = tasks.len(), needed = ids.len(),
                "could not adopt every task of the running attempt; restarting the job");
            // Every task that was reported, adopted or not (an answer may have been lost while
            // the TaskManager still adopted): none of them may run on beside the restart.
            let reported: Vec<TaskRecord> = found
                .iter()
                .map(|(id, o)| {
                    let subtask = ids.iter().position(|i| i == id).unwrap_or_default() as u32;
                    let at = Placement {
                        taskmanager_id: o.taskmanager_id.clone(),
                        taskmanager_address: o.address.clone(),
                        ..Placement::default()
                    };
                    TaskRecord::placed(&job_id, version, subtask, attempt, TaskState::Running, at)
                })
                .collect();
            self.cancel_tasks(&reported).await;
            return None;
        }
        // Known from now on: a report made before the adoption (older epoch) is not answered
        // with a cancel.
        *self.job.tasks_mut() = tasks.clone();
        for t in &tasks {
            self.st.saw_taskmanager(&t.taskmanager_id, &t.taskmanager_address);
        }
        tracing::info!(%job_id, version, attempt, tasks = tasks.len(), took_ms = started.elapsed().as_millis() as u64,
            epoch = self.st.leadership.epoch, "adopted the running tasks of an earlier leader");
        self.job.record_mut().status_message = format!(
            "tasks of attempt {attempt} adopted by jobmanager leader epoch {}",
            self.st.leadership.epoch
        );
        Some(Adopted { attempt, tasks })
    }

    /// The TaskManagers that hold a slot allocated to `version` of this job, as the
    /// ResourceManager leader sees them; `None` when it cannot say for sure (unreachable, or
    /// leading for less than `heartbeat.timeout`: its table, rebuilt from registrations, may
    /// still miss a live TaskManager).
    async fn slot_holders(&self, version: u32) -> Option<Vec<String>> {
        let call = self.ctx.rm.call(|ch| async move {
            ResourceManagerClient::new(ch).cluster_overview(pb::ClusterOverviewRequest {}).await
        });
        let overview = tokio::time::timeout(Duration::from_millis(500), call).await.ok()?.ok()?.into_inner();
        if Duration::from_millis(overview.leader_for_ms) < self.ctx.config.heartbeat_timeout {
            return None;
        }
        let holders = overview
            .taskmanagers
            .into_iter()
            .filter(|tm| {
                tm.slots.iter().any(|s| {
                    s.allocation.as_ref().is_some_and(|a| a.job_id == self.job.job_id && a.version == version)
                })
            })
            .map(|tm| tm.taskmanager_id)
            .collect();
        Some(holders)
    }

    /// Cancels the tasks that have not ended. Waits for the answers at most [`CANCEL_BUDGET`]:
    /// a TaskManager that cannot be reached (partitioned, paused, just killed) must not hold up
    /// the restart or the switch that follows. The calls still pending go on in the background
    /// until their own timeout, so a TaskManager that comes back still hears the cancel; one
    /// that stays cut off cancels its tasks itself after `heartbeat.timeout` without a
    /// JobManager (see docs/fencing.md).
    async fn cancel_tasks(&self, tasks: &[TaskRecord]) {
        if self.st.leadership.check().is_err() {
            return;
        }
        let calls: Vec<_> = tasks
            .iter()
            .filter(|t| !t.state.is_terminal())
            .map(|t| {
                let req =
                    pb::CancelTaskRequest { jobmanager: Some(self.st.stamp()), task_id: t.task_id.clone() };
                let address = t.taskmanager_address.clone();
                let task_id = t.task_id.clone();
                let (ctx, st) = (self.ctx.clone(), self.st.clone());
                async move {
                    let result = async {
                        let mut client = TaskManagerClient::new(ctx.channels.get(&address)?);
                        let call = client.cancel_task(req);
                        let (result, outcome) =
                            call_peer(&address, "CancelTask", TM_CALL_TIMEOUT, call).await;
                        st.note_taskmanager_call(&address, outcome);
                        result.map(|_| ())
                    }
                    .await;
                    if let Err(error) = result {
                        tracing::warn!(%task_id, %address, %error, "cancel task failed");
                    }
                }
            })
            .collect();
        if calls.is_empty() {
            return;
        }
        let count = calls.len();
        let all = tokio::spawn(futures::future::join_all(calls));
        if tokio::time::timeout(CANCEL_BUDGET, all).await.is_err() {
            tracing::warn!(job_id = %self.job.job_id, tasks = count, budget_ms = CANCEL_BUDGET.as_millis() as u64,
                "cancel calls not answered in time; going on, the calls continue in the background");
        }
    }

    async fn finish_cancel(&mut self, tasks: &[TaskRecord]) -> Result<()> {
        self.end_upgrade("the job was canceled", tasks).await?;
        self.job.record_mut().cancel_requested = true;
        self.set_state(JobState::Canceling, "").await?;
        self.cancel_tasks(tasks).await;
        // Give the tasks a moment to report that they stopped; the slots are released either way
        // (releasing a slot cancels whatever still runs in it).
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        while self.job.tasks().iter().any(|t| !t.state.is_terminal()) {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(JobEvent::TaskState { task_id, state, .. }) => {
                        if let Some(t) = self.job.tasks_mut().iter_mut().find(|t| t.task_id == task_id) {
                            t.state = state;
                        }
                    }
                    Some(JobEvent::TaskManagerLost { taskmanager_id, .. }) => {
                        for t in self.job.tasks_mut().iter_mut().filter(|t| t.taskmanager_id == taskmanager_id) {
                            t.state = TaskState::Canceled;
                        }
                    }
                    Some(JobEvent::Cancel) => {}
                    Some(ev) => ev.refuse("the job is being canceled"),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.release(tasks.iter().map(|t| t.allocation_id.clone()).collect(), true).await;
        for t in self.job.tasks_mut().iter_mut().filter(|t| !t.state.is_terminal()) {
            t.state = TaskState::Canceled;
        }
        self.set_state(JobState::Canceled, "canceled by user").await
    }

    /// Releases slots at the ResourceManager: the given allocations, and with `whole_job` every
    /// slot the job holds. Failure is logged: the ResourceManager also frees slots of lost
    /// TaskManagers, and a later attempt releases the whole job first.
    async fn release(&self, allocation_ids: Vec<String>, whole_job: bool) {
        if allocation_ids.is_empty() && !whole_job {
            return;
        }
        let req = pb::ReleaseSlotsRequest {
            jobmanager: Some(self.st.stamp()),
            allocation_ids,
            job_id: if whole_job { self.job.job_id.clone() } else { String::new() },
            version: 0,
        };
        if let Err(error) = self.ctx.release_slots(req).await {
            tracing::warn!(job_id = %self.job.job_id, %error, "releasing slots failed");
        }
    }
}

/// Applies a record edit of an upgrade transition to the job record (written with the phase).
fn apply_edit(r: &mut JobRecord, action: &Action, phase: &Phase) {
    let set = |r: &mut JobRecord, version: u32, state: JobState| {
        if let Some(v) = r.versions.iter_mut().find(|v| v.version == version) {
            v.state = state;
        }
    };
    match action {
        Action::FailVersion(version) => {
            set(r, *version, JobState::Failed);
            if let Phase::Failed { why, .. } = phase {
                r.status_message = format!("upgrade to version {version} failed: {why}");
            }
        }
        Action::Switch { from, to } => {
            set(r, *from, JobState::Finished);
            r.active_version = *to;
            r.set_state(JobState::Scheduled);
            r.status_message = format!("version {to} replaces version {from}");
        }
        Action::Reactivate { old, failed } => {
            set(r, *failed, JobState::Failed);
            if let Some(v) = r.versions.iter_mut().find(|v| v.version == *old) {
                v.ended_with = None;
            }
            r.active_version = *old;
            r.set_state(JobState::Scheduled);
            let why = match phase {
                Phase::RollingBack { why, .. } => why.as_str(),
                _ => "",
            };
            r.status_message = format!("upgrade to version {failed} rolled back to version {old}: {why}");
        }
        _ => {}
    }
}
