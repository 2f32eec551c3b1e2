//! The driver's side of an upgrade: the drain of the old version (and `keel stop`'s), the
//! switch, the health gate and the rollback. The decisions are made by the pure state machine
//! of [`crate::upgrade_phase`]; here its actions are carried out.

use std::time::{Duration, Instant};

use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, KeelError, Result, TaskStateExt};
use keel_spec::JobSpec;

use super::{DrainError, Drained, Driver, DRAIN_FINISH_WAIT, PAUSE_MEASURE_WAIT, UPGRADE_SLOT_WAIT};
use crate::checkpoint::CheckpointPointer;
use crate::coordinator::{self, Kind, SavepointDone};
use crate::events::JobEvent;
use crate::record::{JobRecord, RestoredFrom, TaskRecord, VersionRecord};
use crate::upgrade::{self, Progress, RestoreStrategy, UpgradeMode, UpgradeRequest, UpgradeStrategy};
use crate::upgrade_phase::{self, Action, Event as UpgradeEvent, Phase, SavepointRef, SlotRef, Upgrade};

impl Driver {
    /// Steps 1-3 of a handover (see [`crate::upgrade`]): checks, registers the new version,
    /// allocates its slots while the old version runs, and drains the old version with a
    /// stop-with-savepoint. The old attempt's checkpoint coordinator is running.
    pub(super) async fn drain(
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
                        created_at_ms: self.ctx.clock.now_ms(),
                        parallelism: new_parallelism,
                        restored_from: None,
                        ended_with: None,
                        start_fresh: req.restore_strategy == RestoreStrategy::None,
                    });
                    to
                }
            };
            r.upgrade = Some(Upgrade::registered(version, to, self.ctx.clock.now_ms()));
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
        let clock = self.ctx.clock.clone();
        let abort = move |why: String| UpgradeEvent::Aborted { why, now_ms: clock.now_ms() };

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
        // The job's HA pointer moves to a chosen savepoint only after the switch is recorded
        // (Action::SetPointer): before it, the old version is still the active one.
        let restore_pointer = chosen.as_ref().map(|(pointer, _)| pointer.clone());
        let (done, savepoint_path) = match chosen {
            Some((pointer, how)) => {
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
        Ok(Drained { savepoint, restore_pointer, last_output_ms })
    }

    /// [`Driver::advance`] inside a drain: a refused write means leadership is gone, which
    /// ends the drain as a failure of the attempt (the driver then stops).
    pub(super) async fn advance_in_drain(
        &mut self,
        event: UpgradeEvent,
        tasks: &[TaskRecord],
    ) -> std::result::Result<(), DrainError> {
        self.advance(event, tasks)
            .await
            .map_err(|e| DrainError::Failed(format!("cannot record the upgrade: {e}")))
    }

    /// `keel stop`: drains the running attempt with a savepoint, kept like `keel savepoint`'s.
    pub(super) async fn stop_with_savepoint(
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

    pub(super) fn note_ended_with(&self, version: u32, done: &SavepointDone, path: &str) {
        if let Some(v) = self.job.record_mut().versions.iter_mut().find(|v| v.version == version) {
            v.ended_with = Some(RestoredFrom {
                job_id: self.job.job_id.clone(),
                checkpoint_id: done.checkpoint_id,
                metadata_path: path.to_string(),
                restored_at_ms: self.ctx.clock.now_ms(),
            });
        }
    }

    /// After a drain savepoint completed: waits until the attempt's tasks finished (they do
    /// once told that the savepoint is complete); cancels those that did not within
    /// [`DRAIN_FINISH_WAIT`].
    pub(super) async fn wait_drained(&mut self) -> std::result::Result<(), DrainError> {
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
    pub(super) async fn switch(&mut self, d: Drained, tasks: &[TaskRecord], version: u32) -> Result<()> {
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
            restore_pointer: d.restore_pointer,
            old_slots,
            last_output_ms: d.last_output_ms,
            checkpoints,
            gate_ms: u64::try_from(self.ctx.config.upgrade_health_timeout.as_millis()).unwrap_or(u64::MAX),
            now_ms: self.ctx.clock.now_ms(),
        };
        self.advance(event, tasks).await
    }

    /// Ends the upgrade in progress, if any, because the job ended (`why`).
    pub(super) async fn end_upgrade(&mut self, why: &str, tasks: &[TaskRecord]) -> Result<()> {
        let Some(u) = self.upgrade() else { return Ok(()) };
        let event = match u.phase.before_switch() {
            true => UpgradeEvent::Aborted { why: why.to_string(), now_ms: self.ctx.clock.now_ms() },
            false => UpgradeEvent::JobEnded { why: why.to_string(), now_ms: self.ctx.clock.now_ms() },
        };
        self.advance(event, tasks).await
    }

    /// The job's upgrade, while it has not ended.
    pub(super) fn upgrade(&self) -> Option<Upgrade> {
        self.job.record().upgrade.filter(|u| !u.phase.is_terminal())
    }

    /// The new version of an upgrade is inside its health gate.
    pub(super) fn in_gate(&self) -> bool {
        matches!(self.upgrade().map(|u| u.phase), Some(Phase::Switched { .. }))
    }

    /// Hands `event` to the upgrade's state machine ([`upgrade_phase::transition`]): applies the
    /// record edits it returns and records the new phase with one fenced write, then carries
    /// out the other actions. `tasks`: the attempt running now (the new version's, in the gate).
    pub(super) async fn advance(&mut self, event: UpgradeEvent, tasks: &[TaskRecord]) -> Result<()> {
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
    pub(super) async fn carry_out(&mut self, action: Action, tasks: &[TaskRecord], before: &Upgrade) {
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
            Action::SetPointer(pointer) => {
                // Not over a checkpoint the new version completed itself since.
                let current: Option<CheckpointPointer> =
                    self.ctx.pointers.get(&self.job.job_id).await.ok().flatten();
                let own = current.is_some_and(|c| {
                    c.version == before.to_version && c.checkpoint_id > pointer.checkpoint_id
                });
                if !own {
                    if let Err(error) =
                        self.ctx.pointers.set(&self.st.leadership, &self.job.job_id, &pointer).await
                    {
                        tracing::warn!(job_id = %self.job.job_id, checkpoint_id = pointer.checkpoint_id, %error,
                            "cannot point the job at the chosen savepoint");
                    }
                }
            }
            Action::UseSlots(slots) => self.preallocated = Some(slots.iter().map(SlotRef::to_pb).collect()),
            Action::WatchGate { deadline_ms } => {
                tracing::info!(job_id = %self.job.job_id, to_version = before.to_version,
                    left_ms = deadline_ms.saturating_sub(self.ctx.clock.now_ms()), "health gate of the new version");
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
    pub(super) fn report(&self, step: String) {
        match &self.progress {
            Some(progress) => progress.step(step),
            None => tracing::info!(job_id = %self.job.job_id, %step, "upgrade"),
        }
    }

    /// The health gate of an upgraded version ([`upgrade_phase::gate`]): once it runs and (with
    /// periodic checkpoints) completed a checkpoint after the savepoint, the upgrade is done
    /// and the old version's slots go. `Ok(Err(why))` when the deadline passed first.
    pub(super) async fn check_health(&mut self, running: bool) -> Result<std::result::Result<(), String>> {
        let Some(u) = self.upgrade() else { return Ok(Ok(())) };
        let Phase::Switched { savepoint, .. } = &u.phase else { return Ok(Ok(())) };
        let after = savepoint.checkpoint_id;
        // A checkpoint of the new version itself: the history also holds the old version's,
        // some of them newer than a savepoint a restore strategy chose.
        let checkpointed = self.job.checkpoints().stats(Instant::now()).iter().any(|c| {
            c.checkpoint_id > after
                && c.version == u.to_version
                && c.state == crate::checkpoint::CheckpointState::Completed
        });
        let timeout = keel_config::format_duration(self.ctx.config.upgrade_health_timeout);
        match upgrade_phase::gate(&u, running, checkpointed, self.ctx.clock.now_ms(), &timeout) {
            Some(UpgradeEvent::Unhealthy { why }) => Ok(Err(why)),
            Some(event) => self.advance(event, &[]).await.map(Ok),
            None => Ok(Ok(())),
        }
    }

    /// Reports the upgrade done once a task of the new version reports its first output, with
    /// the pause since the old version's last.
    pub(super) fn measure_pause(
        &self,
        progress: Progress,
        last_output_ms: Option<u64>,
        savepoint: SavepointRef,
    ) {
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
