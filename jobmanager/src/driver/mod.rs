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

//!
//! Layout: this file holds the driver and its attempt loop ([`Driver::drive`]); beside it,
//! one file per concern, each an `impl Driver` block:
//! - `attempt`: deploy an attempt, run its checkpoint coordinator, watch it, and hand a failure
//!   to the restart strategy;
//! - `handover`: the upgrade's actions: drain, switch, health gate, rollback (the decisions are
//!   [`crate::upgrade_phase`]'s);
//! - `adopt`: a new leader adopting the running tasks of the job's last attempt;
//! - `cancel`: canceling tasks and jobs, and giving slots back.

mod adopt;
mod attempt;
mod cancel;
mod handover;

use std::sync::Arc;
use std::time::Duration;

use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, Result};
use keel_spec::JobSpec;
use tokio::sync::{mpsc, oneshot};

use crate::coordinator::{self, RestoreError};
use crate::events::JobEvent;
use crate::record::{Placement, TaskRecord};
use crate::restart::{self, FailureKind, JitterRng};
use crate::state::{JobHandle, JobManagerCtx, LeaderState};
use crate::upgrade::{Progress, UpgradeRequest};
use crate::upgrade_phase::{self, Event as UpgradeEvent, Phase, SavepointRef};

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
    /// A savepoint a restore strategy chose instead of the drain's (set as the job's HA
    /// pointer after the switch).
    restore_pointer: Option<crate::checkpoint::CheckpointPointer>,
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
        // never ran: only the active version runs, so it is marked failed. (For a record written
        // before upgrades had a phase; otherwise the phase's `Recovered` transition does it.)
        let interrupted: Vec<u32> = {
            let mut r = self.job.record_mut();
            let active = r.active_version;
            let legacy = r.upgrade.is_none();
            r.versions
                .iter_mut()
                .filter(|v| legacy && v.version != active && v.state == JobState::Created)
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
            self.advance(UpgradeEvent::Recovered { slots_kept: false, now_ms: self.ctx.clock.now_ms() }, &[])
                .await?;
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
            let event =
                UpgradeEvent::Recovered { slots_kept: adopted.is_some(), now_ms: self.ctx.clock.now_ms() };
            self.advance(event, &[]).await?;
        }
        if self.job.record().cancel_requested {
            let tasks = adopted.map(|a| a.tasks).unwrap_or_default();
            return self.finish_cancel(&tasks).await;
        }
        let mut rng = JitterRng::from_entropy();
        loop {
            // A health gate whose deadline passed before the new version ran (no slots yet,
            // retries, a leader change): roll back now rather than deploy it.
            let timeout = keel_config::format_duration(self.ctx.config.upgrade_health_timeout);
            let overdue = self
                .upgrade()
                .and_then(|u| upgrade_phase::gate(&u, false, false, self.ctx.clock.now_ms(), &timeout));
            if let Some(UpgradeEvent::Unhealthy { why }) = overdue {
                self.advance(UpgradeEvent::Unhealthy { why }, &[]).await?;
            }
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
                        Err(err @ KeelError::NotEnoughSlots { .. }) if self.in_gate() => {
                            // The new version cannot even get its slots: roll back.
                            let why = format!("version {version} got no slots: {err}");
                            self.advance(UpgradeEvent::Unhealthy { why }, &[]).await?;
                            continue;
                        }
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
                                            now_ms: self.ctx.clock.now_ms(),
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
}
