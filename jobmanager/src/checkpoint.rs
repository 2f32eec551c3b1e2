//! The checkpoint coordinator's decisions: pure logic, no I/O, tested without a network.
//!
//! One [`CheckpointTracker`] per job lives in the leader. For each attempt of the job it knows
//! the attempt's tasks and settings; it decides when the next checkpoint is due (interval,
//! min-pause, at most one pending), collects the acknowledgements of the pending checkpoint,
//! rejects the ones that do not belong to it, times it out, abandons it when the attempt ends,
//! and keeps the stats of the last [`HISTORY`] checkpoints for `keel status`.
//!
//! The I/O around it (the HA counter, the trigger and notify calls, the metadata file, the
//! fenced HA pointer, retention) is in [`crate::coordinator`]. The file formats it writes are
//! [`CheckpointMetadata`] (with the tasks' [`TaskSnapshot`]s; both in `keel-state`, the one home
//! of checkpoint state, shared with the TaskManager) and [`CheckpointPointer`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use keel_proto::{KeelError, Result};
pub use keel_state::{CheckpointMetadata, SubtaskMetadata, TaskSnapshot};
use serde::{Deserialize, Serialize};

/// How many recent checkpoints a job's stats keep.
pub const HISTORY: usize = 10;

/// The checkpointing settings of one attempt (checkpointing enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    pub timeout: Duration,
    pub min_pause: Duration,
    pub num_retained: u32,
}

/// A task of the attempt being checkpointed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptTask {
    pub task_id: String,
    pub subtask: u32,
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointState {
    InProgress,
    Completed,
    Failed,
}

impl CheckpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointState::InProgress => "in_progress",
            CheckpointState::Completed => "completed",
            CheckpointState::Failed => "failed",
        }
    }
}

/// What `keel status` shows about one checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointStat {
    pub checkpoint_id: u64,
    pub state: CheckpointState,
    pub trigger_time_ms: u64,
    pub duration_ms: u64,
    pub size_bytes: u64,
    pub failure: String,
    pub version: u32,
    pub attempt: u32,
    pub acknowledged: u32,
    pub total_tasks: u32,
    pub metadata_path: String,
}

/// The acknowledged state of one subtask.
#[derive(Debug, Clone, PartialEq)]
pub struct SubtaskAck {
    pub subtask: u32,
    pub task_id: String,
    pub state_size: u64,
    /// The task's state, as its state handle (JSON) says.
    pub state: TaskSnapshot,
}

/// A checkpoint every task has acknowledged, ready to be made durable.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyCheckpoint {
    pub checkpoint_id: u64,
    pub version: u32,
    pub attempt: u32,
    pub trigger_time_ms: u64,
    pub triggered_at: Instant,
    /// By subtask, one per task of the attempt.
    pub subtasks: Vec<SubtaskAck>,
}

impl ReadyCheckpoint {
    pub fn total_size(&self) -> u64 {
        self.subtasks.iter().map(|s| s.state_size).sum()
    }
}

/// What an accepted acknowledgement led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Recorded; `acknowledged` of `total` tasks have acknowledged.
    Pending { acknowledged: u32, total: u32 },
    /// The last acknowledgement: the checkpoint is ready to complete ([`CheckpointTracker::take_ready`]).
    AllAcknowledged,
    /// The same task acknowledged this checkpoint before (a retried call).
    Duplicate,
}

/// What the coordinator loop should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing until woken: no attempt, checkpointing off, or a checkpoint being completed.
    Idle,
    /// Trigger a new checkpoint at this instant (now, if it is in the past).
    TriggerAt(Instant),
    /// A checkpoint is pending; it times out at this instant.
    AwaitAcks { checkpoint_id: u64, deadline: Instant },
    /// Every task acknowledged: complete the checkpoint now.
    Complete,
}

#[derive(Debug)]
struct Attempt {
    version: u32,
    attempt: u32,
    tasks: Vec<AttemptTask>,
    settings: Option<Settings>,
    began_at: Instant,
}

#[derive(Debug)]
struct Pending {
    checkpoint_id: u64,
    trigger_time_ms: u64,
    triggered_at: Instant,
    deadline: Instant,
    acks: BTreeMap<u32, SubtaskAck>,
    /// Every task acknowledged; the coordinator is making it durable.
    completing: bool,
}

/// The checkpoint coordinator state of one job. See the module documentation.
#[derive(Debug)]
pub struct CheckpointTracker {
    job_id: String,
    attempt: Option<Attempt>,
    pending: Option<Pending>,
    ready: Option<ReadyCheckpoint>,
    last_trigger: Option<Instant>,
    last_end: Option<Instant>,
    history: VecDeque<CheckpointStat>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl CheckpointTracker {
    pub fn new(job_id: impl Into<String>) -> Self {
        CheckpointTracker {
            job_id: job_id.into(),
            attempt: None,
            pending: None,
            ready: None,
            last_trigger: None,
            last_end: None,
            history: VecDeque::new(),
        }
    }

    fn rejected(&self, checkpoint_id: u64, reason: impl Into<String>) -> KeelError {
        KeelError::CheckpointRejected { job_id: self.job_id.clone(), checkpoint_id, reason: reason.into() }
    }

    /// A new attempt of the job starts with these tasks; `settings` is `None` when checkpointing
    /// is off for it. A checkpoint still pending from an earlier attempt is abandoned. The first
    /// checkpoint is due one interval from `now`.
    pub fn begin_attempt(
        &mut self,
        version: u32,
        attempt: u32,
        tasks: Vec<AttemptTask>,
        settings: Option<Settings>,
        now: Instant,
    ) {
        self.abandon(&format!("attempt {attempt} started"), now);
        self.attempt = Some(Attempt { version, attempt, tasks, settings, began_at: now });
        self.last_trigger = None;
        self.last_end = None;
    }

    /// The attempt ended: a pending checkpoint is abandoned (failed with `reason`); its id is
    /// returned. Acknowledgements for it are rejected from now on.
    pub fn end_attempt(&mut self, reason: &str, now: Instant) -> Option<u64> {
        let abandoned = self.abandon(reason, now);
        self.attempt = None;
        abandoned
    }

    fn abandon(&mut self, reason: &str, now: Instant) -> Option<u64> {
        let id = self.pending.as_ref().map(|p| p.checkpoint_id)?;
        self.fail(id, &format!("abandoned: {reason}"), now);
        Some(id)
    }

    pub fn settings(&self) -> Option<Settings> {
        self.attempt.as_ref().and_then(|a| a.settings)
    }

    /// The tasks of the current attempt.
    pub fn tasks(&self) -> Vec<AttemptTask> {
        self.attempt.as_ref().map(|a| a.tasks.clone()).unwrap_or_default()
    }

    pub fn pending_id(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.checkpoint_id)
    }

    /// What to do next. A new checkpoint is due one interval after the previous trigger (or
    /// the start of the attempt) and not before `min_pause` after the previous checkpoint
    /// ended; never while one is pending.
    pub fn next(&self) -> Next {
        let Some(attempt) = &self.attempt else { return Next::Idle };
        let Some(settings) = attempt.settings else { return Next::Idle };
        if self.ready.is_some() {
            return Next::Complete;
        }
        if let Some(p) = &self.pending {
            if p.completing {
                return Next::Idle;
            }
            return Next::AwaitAcks { checkpoint_id: p.checkpoint_id, deadline: p.deadline };
        }
        let by_interval = self.last_trigger.unwrap_or(attempt.began_at) + settings.interval;
        let at = match self.last_end {
            Some(end) => by_interval.max(end + settings.min_pause),
            None => by_interval,
        };
        Next::TriggerAt(at)
    }

    /// Starts checkpoint `checkpoint_id` (taken from the job's counter) at `now`.
    pub fn trigger(&mut self, checkpoint_id: u64, now: Instant, now_ms: u64) -> Result<()> {
        let (settings, version, attempt, total) = match &self.attempt {
            Some(a) => match a.settings {
                Some(s) => (s, a.version, a.attempt, a.tasks.len() as u32),
                None => return Err(self.rejected(checkpoint_id, "checkpointing is not enabled for the job")),
            },
            None => return Err(self.rejected(checkpoint_id, "the job has no running attempt")),
        };
        if let Some(p) = &self.pending {
            return Err(KeelError::precondition(format!(
                "checkpoint {} of job {} is still pending; at most one at a time",
                p.checkpoint_id, self.job_id
            )));
        }
        self.pending = Some(Pending {
            checkpoint_id,
            trigger_time_ms: now_ms,
            triggered_at: now,
            deadline: now + settings.timeout,
            acks: BTreeMap::new(),
            completing: false,
        });
        self.last_trigger = Some(now);
        self.push_stat(CheckpointStat {
            checkpoint_id,
            state: CheckpointState::InProgress,
            trigger_time_ms: now_ms,
            duration_ms: 0,
            size_bytes: 0,
            failure: String::new(),
            version,
            attempt,
            acknowledged: 0,
            total_tasks: total,
            metadata_path: String::new(),
        });
        Ok(())
    }

    /// Records a task's acknowledgement. Refused with `CheckpointRejected` when the checkpoint
    /// is not the pending one (unknown, expired, failed, abandoned) or the task is not one of the
    /// current attempt (a leftover of an older attempt). A state handle that is not a task
    /// snapshot of that subtask fails the checkpoint.
    pub fn acknowledge(
        &mut self,
        task_id: &str,
        version: u32,
        checkpoint_id: u64,
        state_handle: &[u8],
        state_size: u64,
        now: Instant,
    ) -> Result<AckOutcome> {
        let Some(attempt) = &self.attempt else {
            return Err(self.rejected(checkpoint_id, "the job has no running attempt"));
        };
        if attempt.settings.is_none() {
            return Err(self.rejected(checkpoint_id, "checkpointing is not enabled for the job"));
        }
        let Some(task) = attempt.tasks.iter().find(|t| t.task_id == task_id) else {
            return Err(self.rejected(
                checkpoint_id,
                format!(
                    "task {task_id} is not a task of the job's current attempt {} (a leftover of an \
                     older attempt?)",
                    attempt.attempt
                ),
            ));
        };
        if version != attempt.version {
            return Err(self.rejected(
                checkpoint_id,
                format!(
                    "task {task_id} reports version {version}; the running version is {}",
                    attempt.version
                ),
            ));
        }
        let subtask = task.subtask;
        let total = attempt.tasks.len() as u32;
        let pending_id = self.pending.as_ref().map(|p| p.checkpoint_id);
        match pending_id {
            Some(id) if id == checkpoint_id => {}
            Some(id) if checkpoint_id < id => {
                return Err(
                    self.rejected(checkpoint_id, format!("superseded: checkpoint {id} is pending now"))
                );
            }
            _ => {
                let why = match self.history.iter().find(|s| s.checkpoint_id == checkpoint_id) {
                    Some(s) if s.state == CheckpointState::Failed => {
                        format!("it already failed: {}", s.failure)
                    }
                    Some(_) => "it is already complete".to_string(),
                    None => "no such checkpoint is pending".to_string(),
                };
                return Err(self.rejected(checkpoint_id, why));
            }
        }
        let state = match TaskSnapshot::from_json(state_handle) {
            Ok(s) if s.subtask == subtask && s.parallelism == total => s,
            Ok(s) => {
                let reason = format!(
                    "task {task_id} (subtask {subtask} of {total}) sent the state of subtask {} of {}",
                    s.subtask, s.parallelism
                );
                self.fail(checkpoint_id, &reason, now);
                return Err(self.rejected(checkpoint_id, reason));
            }
            Err(e) => {
                let reason =
                    format!("task {task_id} sent a state handle that is not JSON of a task snapshot: {e}");
                self.fail(checkpoint_id, &reason, now);
                return Err(self.rejected(checkpoint_id, reason));
            }
        };
        // An acknowledgement after the deadline is late even when the coordinator loop has not
        // expired the checkpoint yet: the timeout holds however fast the tasks are (a savepoint
        // with a 1 ms timeout completed once a barrier passed the sinks within a few ms).
        if self.expire(now).is_some() {
            let why = match self.history.iter().find(|s| s.checkpoint_id == checkpoint_id) {
                Some(s) => format!("it already failed: {}", s.failure),
                None => "it timed out".to_string(),
            };
            return Err(self.rejected(checkpoint_id, why));
        }
        let Some(pending) = self.pending.as_mut() else {
            return Err(self.rejected(checkpoint_id, "no such checkpoint is pending"));
        };
        if pending.acks.contains_key(&subtask) {
            return Ok(AckOutcome::Duplicate);
        }
        pending.acks.insert(subtask, SubtaskAck { subtask, task_id: task_id.to_string(), state_size, state });
        let acknowledged = pending.acks.len() as u32;
        let size: u64 = pending.acks.values().map(|a| a.state_size).sum();
        if let Some(stat) = self.history.iter_mut().rev().find(|s| s.checkpoint_id == checkpoint_id) {
            stat.acknowledged = acknowledged;
            stat.size_bytes = size;
        }
        if acknowledged < total {
            return Ok(AckOutcome::Pending { acknowledged, total });
        }
        pending.completing = true;
        self.ready = Some(ReadyCheckpoint {
            checkpoint_id,
            version: attempt_version(&self.attempt),
            attempt: self.attempt.as_ref().map(|a| a.attempt).unwrap_or(0),
            trigger_time_ms: pending.trigger_time_ms,
            triggered_at: pending.triggered_at,
            subtasks: pending.acks.values().cloned().collect(),
        });
        Ok(AckOutcome::AllAcknowledged)
    }

    /// The checkpoint every task acknowledged, for the coordinator to make durable.
    pub fn take_ready(&mut self) -> Option<ReadyCheckpoint> {
        self.ready.take()
    }

    /// Fails the pending checkpoint when its deadline has passed (and it is not being
    /// completed); returns its id.
    pub fn expire(&mut self, now: Instant) -> Option<u64> {
        let (id, timeout) = match (&self.pending, self.settings()) {
            (Some(p), Some(s)) if !p.completing && now >= p.deadline => (p.checkpoint_id, s.timeout),
            _ => return None,
        };
        self.fail(
            id,
            &format!("timed out after {timeout:?} (execution.checkpointing.timeout) before every task acknowledged"),
            now,
        );
        Some(id)
    }

    /// Fails checkpoint `checkpoint_id` if it is the pending one (a declined trigger, a failed
    /// completion, a timeout, an abandoned attempt).
    pub fn fail(&mut self, checkpoint_id: u64, reason: &str, now: Instant) {
        if self.pending.as_ref().map(|p| p.checkpoint_id) != Some(checkpoint_id) {
            return;
        }
        if let Some(p) = self.pending.take() {
            if let Some(stat) = self.history.iter_mut().rev().find(|s| s.checkpoint_id == checkpoint_id) {
                stat.state = CheckpointState::Failed;
                stat.failure = reason.to_string();
                stat.duration_ms = millis(now.saturating_duration_since(p.triggered_at));
            }
        }
        if self.ready.as_ref().map(|r| r.checkpoint_id) == Some(checkpoint_id) {
            self.ready = None;
        }
        self.last_end = Some(now);
    }

    /// Checkpoint `checkpoint_id` is complete: its metadata is at `metadata_path` and the HA
    /// pointer names it.
    pub fn complete(&mut self, checkpoint_id: u64, metadata_path: &str, now: Instant) {
        if self.pending.as_ref().map(|p| p.checkpoint_id) != Some(checkpoint_id) {
            return;
        }
        if let Some(p) = self.pending.take() {
            if let Some(stat) = self.history.iter_mut().rev().find(|s| s.checkpoint_id == checkpoint_id) {
                stat.state = CheckpointState::Completed;
                stat.duration_ms = millis(now.saturating_duration_since(p.triggered_at));
                stat.metadata_path = metadata_path.to_string();
                stat.acknowledged = p.acks.len() as u32;
                stat.size_bytes = p.acks.values().map(|a| a.state_size).sum();
            }
        }
        self.last_end = Some(now);
    }

    /// Adds a checkpoint completed before this leader (read from the HA pointer), so status
    /// shows it after a failover.
    pub fn note_completed(&mut self, stat: CheckpointStat) {
        if self.history.iter().any(|s| s.checkpoint_id == stat.checkpoint_id) {
            return;
        }
        self.push_stat(stat);
    }

    fn push_stat(&mut self, stat: CheckpointStat) {
        self.history.push_back(stat);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// The recent checkpoints, oldest first; an in-progress one with its duration so far.
    pub fn stats(&self, now: Instant) -> Vec<CheckpointStat> {
        self.history
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if s.state == CheckpointState::InProgress {
                    if let Some(p) = self.pending.as_ref().filter(|p| p.checkpoint_id == s.checkpoint_id) {
                        s.duration_ms = millis(now.saturating_duration_since(p.triggered_at));
                    }
                }
                s
            })
            .collect()
    }
}

fn attempt_version(attempt: &Option<Attempt>) -> u32 {
    attempt.as_ref().map(|a| a.version).unwrap_or(0)
}

/// Which checkpoint directories to delete once `latest` is complete. `on_disk` lists the
/// `chk-<id>` directories of the job with whether each holds a `_metadata` file. Kept: the
/// `num_retained` newest complete checkpoints up to `latest` (always including `latest`) and
/// anything newer than `latest`; deleted: older complete ones, and incomplete ones older than
/// `latest` (left by a failed completion or a deposed leader).
pub fn checkpoints_to_delete(on_disk: &[(u64, bool)], latest: u64, num_retained: u32) -> Vec<u64> {
    let mut complete: Vec<u64> =
        on_disk.iter().filter(|(id, has_meta)| *has_meta && *id <= latest).map(|(id, _)| *id).collect();
    if !complete.contains(&latest) {
        complete.push(latest);
    }
    complete.sort_unstable_by(|a, b| b.cmp(a));
    let keep: Vec<u64> = complete.iter().take(num_retained.max(1) as usize).copied().collect();
    let mut delete: Vec<u64> = on_disk
        .iter()
        .filter(|(id, has_meta)| *id < latest && (!*has_meta || !keep.contains(id)))
        .map(|(id, _)| *id)
        .collect();
    delete.sort_unstable();
    delete.dedup();
    delete
}

/// The HA pointer to a job's latest completed checkpoint (`checkpoints/<job_id>`). For a job
/// submitted with `--restore`, it names the earlier job's checkpoint until the job completes
/// one of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPointer {
    /// The job that took the checkpoint.
    pub job_id: String,
    pub checkpoint_id: u64,
    pub metadata_path: String,
    pub version: u32,
    pub attempt: u32,
    pub trigger_time_ms: u64,
    pub duration_ms: u64,
    pub size_bytes: u64,
    pub completed_at_ms: u64,
    /// Epoch of the JobManager leader that completed it.
    pub epoch: u64,
}

impl CheckpointPointer {
    /// A pointer to the savepoint or checkpoint whose metadata file at `path` says `metadata`
    /// (a savepoint named by the user, the newest kept savepoint, a promoted version's).
    pub fn of_metadata(metadata: &CheckpointMetadata, path: &std::path::Path) -> CheckpointPointer {
        CheckpointPointer {
            job_id: metadata.job_id.clone(),
            checkpoint_id: metadata.checkpoint_id,
            metadata_path: path.display().to_string(),
            version: metadata.version,
            attempt: metadata.attempt,
            trigger_time_ms: metadata.trigger_time_ms,
            duration_ms: metadata.duration_ms,
            size_bytes: metadata.total_size_bytes,
            completed_at_ms: metadata.completed_at_ms,
            epoch: 0,
        }
    }

    pub fn stat(&self) -> CheckpointStat {
        CheckpointStat {
            checkpoint_id: self.checkpoint_id,
            state: CheckpointState::Completed,
            trigger_time_ms: self.trigger_time_ms,
            duration_ms: self.duration_ms,
            size_bytes: self.size_bytes,
            failure: String::new(),
            version: self.version,
            attempt: self.attempt,
            acknowledged: 0,
            total_tasks: 0,
            metadata_path: self.metadata_path.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn settings() -> Settings {
        Settings { interval: SECOND, timeout: 10 * SECOND, min_pause: Duration::ZERO, num_retained: 1 }
    }

    fn tasks(n: u32, attempt: u32) -> Vec<AttemptTask> {
        (0..n)
            .map(|i| AttemptTask {
                task_id: format!("j/v1/{i}#{attempt}"),
                subtask: i,
                address: "tm:1".into(),
            })
            .collect()
    }

    /// The state handle of subtask `subtask` of `parallelism` (a datagen source at `next`).
    fn handle(subtask: u32, parallelism: u32, next: i64) -> Vec<u8> {
        format!(
            "{{\"subtask\":{subtask},\"parallelism\":{parallelism},\"sources\":{{\"g\":{{\"connector\":\"datagen\",\"splits\":[{{\"next\":{next},\"step\":{parallelism}}}]}}}}}}"
        )
        .into_bytes()
    }

    fn tracker(n: u32, s: Settings, t0: Instant) -> CheckpointTracker {
        let mut t = CheckpointTracker::new("j");
        t.begin_attempt(1, 1, tasks(n, 1), Some(s), t0);
        t
    }

    fn rejected(r: Result<AckOutcome>) -> String {
        match r {
            Err(KeelError::CheckpointRejected { reason, .. }) => reason,
            other => panic!("expected CheckpointRejected, got {other:?}"),
        }
    }

    /// The first checkpoint is due one interval after the attempt began; none is due while
    /// checkpointing is off or no attempt runs.
    #[test]
    fn first_trigger_one_interval_after_the_attempt_began() {
        let t0 = Instant::now();
        let t = tracker(2, settings(), t0);
        assert_eq!(t.next(), Next::TriggerAt(t0 + SECOND));
        let mut off = CheckpointTracker::new("j");
        assert_eq!(off.next(), Next::Idle);
        off.begin_attempt(1, 1, tasks(1, 1), None, t0);
        assert_eq!(off.next(), Next::Idle);
        assert!(off.trigger(1, t0, 0).is_err());
    }

    /// A checkpoint completes when every task acknowledged it, once; partial and duplicate
    /// acknowledgements do not complete it, and the stats show its progress and result.
    #[test]
    fn completes_when_every_task_acknowledged() {
        let t0 = Instant::now();
        let mut t = tracker(2, settings(), t0);
        t.trigger(1, t0 + SECOND, 1000).expect("trigger");
        assert_eq!(t.next(), Next::AwaitAcks { checkpoint_id: 1, deadline: t0 + 11 * SECOND });
        assert_eq!(
            t.acknowledge("j/v1/1#1", 1, 1, &handle(1, 2, 11), 20, t0).expect("ack"),
            AckOutcome::Pending { acknowledged: 1, total: 2 }
        );
        assert_eq!(
            t.acknowledge("j/v1/1#1", 1, 1, &handle(1, 2, 11), 20, t0).expect("dup"),
            AckOutcome::Duplicate
        );
        assert!(t.take_ready().is_none());
        assert_eq!(
            t.acknowledge("j/v1/0#1", 1, 1, &handle(0, 2, 10), 22, t0).expect("ack"),
            AckOutcome::AllAcknowledged
        );
        assert_eq!(t.next(), Next::Complete);
        let ready = t.take_ready().expect("ready");
        assert_eq!(ready.checkpoint_id, 1);
        assert_eq!(ready.subtasks.iter().map(|s| s.subtask).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(ready.total_size(), 42);
        // While it is being completed, nothing else is triggered and it does not time out.
        assert_eq!(t.next(), Next::Idle);
        assert_eq!(t.expire(t0 + 100 * SECOND), None);
        t.complete(1, "/c/j/chk-1/_metadata", t0 + SECOND + Duration::from_millis(250));
        let stats = t.stats(t0 + 2 * SECOND);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].state, CheckpointState::Completed);
        assert_eq!(stats[0].duration_ms, 250);
        assert_eq!(stats[0].size_bytes, 42);
        assert_eq!(stats[0].metadata_path, "/c/j/chk-1/_metadata");
        // The next one is due one interval after the previous trigger.
        assert_eq!(t.next(), Next::TriggerAt(t0 + 2 * SECOND));
    }

    /// At most one checkpoint is pending: a second trigger is refused.
    #[test]
    fn at_most_one_pending() {
        let t0 = Instant::now();
        let mut t = tracker(1, settings(), t0);
        t.trigger(1, t0, 0).expect("first");
        assert!(t.trigger(2, t0, 0).is_err());
        assert_eq!(t.pending_id(), Some(1));
    }

    /// min-pause counts from the end of the previous checkpoint: a checkpoint that took longer
    /// than the interval pushes the next trigger to its end plus the pause.
    #[test]
    fn min_pause_delays_the_next_trigger() {
        let t0 = Instant::now();
        let s = Settings { min_pause: 3 * SECOND, ..settings() };
        let mut t = tracker(1, s, t0);
        t.trigger(1, t0 + SECOND, 0).expect("trigger");
        t.acknowledge("j/v1/0#1", 1, 1, &handle(0, 1, 1), 1, t0).expect("ack");
        t.take_ready();
        t.complete(1, "m", t0 + 2 * SECOND);
        assert_eq!(t.next(), Next::TriggerAt(t0 + 5 * SECOND));
        // Without a pause, the interval alone decides.
        let mut t = tracker(1, settings(), t0);
        t.trigger(1, t0 + SECOND, 0).expect("trigger");
        t.fail(1, "declined", t0 + Duration::from_millis(1200));
        assert_eq!(t.next(), Next::TriggerAt(t0 + 2 * SECOND));
    }

    /// A checkpoint not acknowledged by every task before its deadline fails; a late
    /// acknowledgement for it is rejected with a typed error that says why.
    #[test]
    fn times_out_and_rejects_late_acks() {
        let t0 = Instant::now();
        let mut t = tracker(2, settings(), t0);
        t.trigger(1, t0, 0).expect("trigger");
        t.acknowledge("j/v1/0#1", 1, 1, &handle(0, 2, 1), 1, t0).expect("ack");
        assert_eq!(t.expire(t0 + 9 * SECOND), None);
        assert_eq!(t.expire(t0 + 10 * SECOND), Some(1));
        let stats = t.stats(t0 + 10 * SECOND);
        assert_eq!(stats[0].state, CheckpointState::Failed);
        assert!(stats[0].failure.contains("timed out"), "{}", stats[0].failure);
        let reason = rejected(t.acknowledge("j/v1/1#1", 1, 1, &handle(1, 2, 1), 1, t0));
        assert!(reason.contains("already failed"), "{reason}");
        // The next one is due at once: the interval has passed and there is no pause.
        assert_eq!(t.next(), Next::TriggerAt(t0 + 10 * SECOND));
    }

    /// An acknowledgement that arrives after the deadline, before anything expired the
    /// checkpoint, fails it as timed out instead of completing it.
    #[test]
    fn an_ack_after_the_deadline_times_the_checkpoint_out() {
        let t0 = Instant::now();
        let mut t = tracker(1, settings(), t0);
        t.trigger(1, t0, 0).expect("trigger");
        let reason = rejected(t.acknowledge("j/v1/0#1", 1, 1, &handle(0, 1, 1), 1, t0 + 10 * SECOND));
        assert!(reason.contains("timed out"), "{reason}");
        assert_eq!(t.take_ready().map(|r| r.checkpoint_id), None);
        let stats = t.stats(t0 + 10 * SECOND);
        assert_eq!(stats[0].state, CheckpointState::Failed);
        // Just before the deadline it completes.
        t.trigger(2, t0 + 10 * SECOND, 0).expect("trigger");
        let outcome = t.acknowledge("j/v1/0#1", 1, 2, &handle(0, 1, 2), 1, t0 + 19 * SECOND).expect("ack");
        assert_eq!(outcome, AckOutcome::AllAcknowledged);
    }

    /// When the attempt ends, its pending checkpoint is abandoned: it fails, nothing is ready,
    /// and acknowledgements from the old attempt's tasks are rejected, also after a new attempt
    /// began.
    #[test]
    fn attempt_end_abandons_the_pending_checkpoint() {
        let t0 = Instant::now();
        let mut t = tracker(2, settings(), t0);
        t.trigger(1, t0, 0).expect("trigger");
        t.acknowledge("j/v1/0#1", 1, 1, &handle(0, 2, 1), 1, t0).expect("ack");
        assert_eq!(t.end_attempt("task failed", t0 + SECOND), Some(1));
        assert_eq!(t.next(), Next::Idle);
        assert!(t.take_ready().is_none());
        let stats = t.stats(t0);
        assert_eq!(stats[0].state, CheckpointState::Failed);
        assert!(stats[0].failure.contains("abandoned: task failed"), "{}", stats[0].failure);
        rejected(t.acknowledge("j/v1/1#1", 1, 1, &handle(1, 2, 1), 1, t0));

        t.begin_attempt(1, 2, tasks(2, 2), Some(settings()), t0 + 2 * SECOND);
        t.trigger(2, t0 + 3 * SECOND, 0).expect("trigger");
        let reason = rejected(t.acknowledge("j/v1/1#1", 1, 2, &handle(1, 2, 1), 1, t0));
        assert!(reason.contains("not a task of the job's current attempt"), "{reason}");
    }

    /// Acknowledgements for an unknown checkpoint, an older one, or a wrong version are rejected
    /// without touching the pending one; a state handle that is not JSON fails the checkpoint,
    /// and so does the state of another subtask.
    #[test]
    fn rejects_what_does_not_belong_to_the_pending_checkpoint() {
        let t0 = Instant::now();
        let mut t = tracker(2, settings(), t0);
        rejected(t.acknowledge("j/v1/0#1", 1, 5, &handle(0, 2, 1), 1, t0));
        t.trigger(5, t0, 0).expect("trigger");
        assert!(rejected(t.acknowledge("j/v1/0#1", 1, 4, &handle(0, 2, 1), 1, t0)).contains("superseded"));
        assert!(
            rejected(t.acknowledge("j/v1/0#1", 1, 6, &handle(0, 2, 1), 1, t0)).contains("no such checkpoint")
        );
        assert!(rejected(t.acknowledge("j/v1/0#1", 2, 5, &handle(0, 2, 1), 1, t0)).contains("version"));
        assert_eq!(t.pending_id(), Some(5));
        assert!(rejected(t.acknowledge("j/v1/0#1", 1, 5, b"not json", 8, t0)).contains("not JSON"));
        assert_eq!(t.pending_id(), None);
        assert_eq!(t.stats(t0)[0].state, CheckpointState::Failed);
        t.trigger(7, t0, 0).expect("trigger");
        let reason = rejected(t.acknowledge("j/v1/0#1", 1, 7, &handle(1, 2, 1), 1, t0));
        assert!(reason.contains("sent the state of subtask 1 of 2"), "{reason}");
        assert_eq!(t.pending_id(), None);
    }

    /// The stats keep the latest checkpoints only.
    #[test]
    fn history_is_bounded() {
        let t0 = Instant::now();
        let mut t = tracker(1, settings(), t0);
        for id in 1..=(HISTORY as u64 + 5) {
            t.trigger(id, t0, 0).expect("trigger");
            t.fail(id, "declined", t0);
        }
        let stats = t.stats(t0);
        assert_eq!(stats.len(), HISTORY);
        assert_eq!(stats.first().map(|s| s.checkpoint_id), Some(6));
        assert_eq!(stats.last().map(|s| s.checkpoint_id), Some(HISTORY as u64 + 5));
    }

    /// Retention keeps the newest `num_retained` complete checkpoints (always the latest),
    /// deletes older complete and incomplete ones, and never touches anything newer.
    #[test]
    fn retention_keeps_the_newest_complete_checkpoints() {
        let on_disk = [(1, true), (2, true), (3, false), (4, true), (5, true), (6, false)];
        assert_eq!(checkpoints_to_delete(&on_disk, 5, 1), vec![1, 2, 3, 4]);
        assert_eq!(checkpoints_to_delete(&on_disk, 5, 2), vec![1, 2, 3]);
        assert_eq!(checkpoints_to_delete(&on_disk, 5, 10), vec![3]);
        // The latest is kept even if the listing raced with its creation.
        assert_eq!(checkpoints_to_delete(&[(1, true), (2, true)], 3, 1), vec![1, 2]);
        assert_eq!(checkpoints_to_delete(&[], 1, 1), Vec::<u64>::new());
    }

    /// A checkpoint's metadata gives every subtask its own state back at the same parallelism
    /// (sink state included), and redistributes a datagen and a kafka source over another
    /// parallelism: every new subtask gets its splits, none is refused.
    #[test]
    fn metadata_gives_restore_states_at_any_parallelism() -> Result<()> {
        let state = |subtask: u32, next: i64, partition: i32| -> Result<TaskSnapshot> {
            Ok(TaskSnapshot::from_json(format!(
                "{{\"subtask\":{subtask},\"parallelism\":2,\"sources\":{{\"g\":{{\"connector\":\"datagen\",\"next_sequence\":{next}}},\
                 \"in\":{{\"connector\":\"kafka\",\"offsets\":[[\"t\",{partition},5]]}}}},\
                 \"sinks\":{{\"out\":{{\"connector\":\"kafka\",\"transactional_id\":\"p-{subtask}\",\"segments\":[]}}}}}}"
            ).as_bytes())?)
        };
        let meta = CheckpointMetadata {
            format: 1,
            epoch: 1,
            checkpoint_id: 3,
            job_id: "j".into(),
            job_name: "n".into(),
            version: 1,
            attempt: 1,
            parallelism: 2,
            trigger_time_ms: 0,
            completed_at_ms: 0,
            duration_ms: 0,
            total_size_bytes: 0,
            subtasks: vec![
                SubtaskMetadata { subtask: 1, task_id: "b".into(), state_size: 1, state: state(1, 41, 1)? },
                SubtaskMetadata { subtask: 0, task_id: "a".into(), state_size: 1, state: state(0, 40, 0)? },
            ],
        };
        let same = meta.restore_states(2)?;
        assert_eq!(TaskSnapshot::from_json(&same[0])?, state(0, 40, 0)?);
        assert_eq!(TaskSnapshot::from_json(&same[1])?, state(1, 41, 1)?);
        for p in [1u32, 3] {
            let states = meta.restore_states(p)?;
            assert_eq!(states.len(), p as usize);
            for (i, s) in states.iter().enumerate() {
                let s = TaskSnapshot::from_json(s)?;
                assert_eq!((s.subtask, s.parallelism), (i as u32, p));
                assert!(s.sources.contains_key("g") && s.sources.contains_key("in"), "{s:?}");
                assert!(s.sinks.is_empty(), "a rescale drops sink state: {s:?}");
            }
        }
        let mut twice = meta.clone();
        twice.subtasks[0].subtask = 0;
        assert!(twice.restore_states(2).is_err());
        Ok(())
    }
}
