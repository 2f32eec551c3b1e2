//! The checkpoint coordinator's I/O, one loop per running attempt of a job with checkpointing
//! enabled. The decisions are made by the job's [`CheckpointTracker`](crate::checkpoint); this
//! module carries them out:
//!
//! 1. trigger: take the next id from the fenced HA counter `checkpoint-ids/<job_id>` and send
//!    `TriggerCheckpoint` (stamped with the leader's epoch) to every task of the attempt; a task
//!    that refuses fails the checkpoint;
//! 2. acknowledgements arrive through the gRPC handler, which records them in the tracker and
//!    wakes this loop when the last one is in;
//! 3. complete ([`finalize`]): write `<dir>/<job_id>/chk-<id>/_metadata` (temporary file,
//!    fsync, rename), check leadership, move the HA pointer `checkpoints/<job_id>` with a fenced
//!    write, and only then send `NotifyCheckpointComplete` to every task;
//! 4. retention: delete the checkpoint directories beyond `state.checkpoints.num-retained`.
//!
//! A checkpoint not complete within the timeout fails; ending the attempt (the driver cancels
//! the loop's scope) abandons a pending one. Restoring reads the pointer and the metadata file
//! ([`load_restore`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_client::detector::call_peer;
use keel_ha::{CheckpointPointerStore, Counter, Leadership};
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, TaskState};
use keel_proto::{KeelError, Result};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{
    checkpoints_to_delete, AttemptTask, CheckpointMetadata, CheckpointPointer, CheckpointState, Next,
    ReadyCheckpoint, SubtaskMetadata,
};
use crate::record::now_ms;
use crate::state::{JobHandle, JobManagerCtx, LeaderState};

/// How long a trigger or notify call to a TaskManager may take.
const TM_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the loop looks again while the attempt's tasks are not all running yet.
const NOT_RUNNING_POLL: Duration = Duration::from_millis(100);
/// How often a savepoint's requester looks at its progress.
const SAVEPOINT_POLL: Duration = Duration::from_millis(10);
/// Pause after the checkpoint id could not be taken from the HA store.
const COUNTER_RETRY: Duration = Duration::from_secs(1);
/// The name of the metadata file in a checkpoint directory.
pub const METADATA_FILE: &str = "_metadata";

/// `<dir>/<job_id>`: the checkpoints of one job.
pub fn job_dir(dir: &Path, job_id: &str) -> PathBuf {
    dir.join(job_id)
}

/// `<dir>/<job_id>/chk-<id>/_metadata`.
pub fn metadata_path(dir: &Path, job_id: &str, checkpoint_id: u64) -> PathBuf {
    job_dir(dir, job_id).join(format!("chk-{checkpoint_id}")).join(METADATA_FILE)
}

/// The HA counter the ids of a job's checkpoints come from.
pub fn counter_name(job_id: &str) -> String {
    format!("checkpoint-ids/{job_id}")
}

/// What the coordinator of one attempt needs besides the job.
pub(crate) struct AttemptCheckpointing {
    pub dir: PathBuf,
    pub num_retained: u32,
    pub job_name: String,
}

/// Runs the coordinator of the job's current attempt until `scope` is cancelled. A completion
/// in progress is finished before the loop looks at `scope` again, so a checkpoint is either
/// complete (pointer moved) or failed when this returns.
pub(crate) async fn run(
    ctx: Arc<JobManagerCtx>,
    st: Arc<LeaderState>,
    job: Arc<JobHandle>,
    cfg: AttemptCheckpointing,
    scope: CancellationToken,
) {
    let counter = Counter::new(ctx.ha.clone(), &counter_name(&job.job_id));
    let epoch = st.leadership.epoch;
    loop {
        if scope.is_cancelled() {
            return;
        }
        let next = job.checkpoints().next();
        match next {
            Next::Idle => {
                tokio::select! {
                    biased;
                    _ = scope.cancelled() => return,
                    _ = job.checkpoint_wake.notified() => {}
                }
            }
            Next::AwaitAcks { checkpoint_id, deadline } => {
                tokio::select! {
                    biased;
                    _ = scope.cancelled() => return,
                    _ = job.checkpoint_wake.notified() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        if job.checkpoints().expire(Instant::now()).is_some() {
                            tracing::warn!(job_id = %job.job_id, checkpoint_id, epoch, "checkpoint timed out");
                        }
                    }
                }
            }
            Next::Complete => {
                let ready = job.checkpoints().take_ready();
                if let Some(ready) = ready {
                    complete(&ctx, &st, &job, &cfg, ready).await;
                }
            }
            Next::TriggerAt(at) => {
                tokio::select! {
                    biased;
                    _ = scope.cancelled() => return,
                    // A savepoint was triggered by its requester: look again.
                    _ = job.checkpoint_wake.notified() => continue,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                if !all_running(&job) {
                    tokio::select! {
                        biased;
                        _ = scope.cancelled() => return,
                        _ = tokio::time::sleep(NOT_RUNNING_POLL) => {}
                    }
                    continue;
                }
                if let Err(error) = trigger(&ctx, &st, &job, &counter, Kind::Checkpoint).await {
                    let pending = job.checkpoints().pending_id();
                    if pending.is_some() {
                        // Refused because a savepoint's requester triggered while this trigger
                        // took its id from the HA counter (at most one checkpoint is pending).
                        // Only this loop completes that savepoint: it waits for its acks now,
                        // not after the COUNTER_RETRY pause (an upgrade's drain savepoint
                        // completed 1 s late, and the output paused that much longer).
                        tracing::debug!(job_id = %job.job_id, epoch, %error, ?pending,
                            "a checkpoint is already pending; no periodic trigger now");
                        continue;
                    }
                    tracing::warn!(job_id = %job.job_id, epoch, %error, "cannot trigger a checkpoint");
                    tokio::select! {
                        biased;
                        _ = scope.cancelled() => return,
                        _ = tokio::time::sleep(COUNTER_RETRY) => {}
                    }
                }
            }
        }
    }
}

/// True when every task of the attempt runs (checkpoints are taken of running tasks only).
fn all_running(job: &JobHandle) -> bool {
    let tasks = job.tasks();
    !tasks.is_empty() && tasks.iter().all(|t| t.state == TaskState::Running)
}

/// What a trigger asks of the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Checkpoint,
    Savepoint,
    /// A savepoint after which the tasks stop (an upgrade's drain).
    Drain,
}

/// Takes the next checkpoint id and sends the trigger to every task. A task that refuses fails
/// the checkpoint. The error is for an id that could not be taken; the id is returned (also
/// for a checkpoint that failed at once: its state in the tracker says so).
async fn trigger(
    ctx: &JobManagerCtx,
    st: &LeaderState,
    job: &JobHandle,
    counter: &Counter,
    kind: Kind,
) -> Result<u64> {
    let checkpoint_id = counter.next(&st.leadership).await?;
    let now = Instant::now();
    let timestamp_ms = ctx.clock.now_ms();
    let tasks: Vec<AttemptTask> = {
        let mut tracker = job.checkpoints();
        tracker.trigger(checkpoint_id, now, timestamp_ms)?;
        tracker.tasks()
    };
    tracing::info!(job_id = %job.job_id, checkpoint_id, epoch = st.leadership.epoch, tasks = tasks.len(), "checkpoint triggered");
    let calls = tasks.iter().map(|t| {
        let req = pb::TriggerCheckpointRequest {
            jobmanager: Some(st.stamp()),
            task_id: t.task_id.clone(),
            checkpoint_id,
            timestamp_ms,
            is_savepoint: kind != Kind::Checkpoint,
            drain: kind == Kind::Drain,
        };
        async move {
            let result = async {
                let mut client = TaskManagerClient::new(ctx.channels.get(&t.address)?);
                let call = client.trigger_checkpoint(req);
                let (result, outcome) =
                    call_peer(&t.address, "TriggerCheckpoint", TM_CALL_TIMEOUT, call).await;
                st.note_taskmanager_call(&t.address, outcome);
                result.map(|_| ())
            }
            .await;
            result.map_err(|e| format!("task {} declined: {e}", t.task_id))
        }
    });
    let results = futures::future::join_all(calls).await;
    if let Some(reason) = results.into_iter().find_map(|r| r.err()) {
        tracing::warn!(job_id = %job.job_id, checkpoint_id, %reason, "checkpoint trigger failed");
        job.checkpoints().fail(checkpoint_id, &format!("trigger failed: {reason}"), Instant::now());
        job.checkpoint_wake.notify_one();
    }
    Ok(checkpoint_id)
}

/// How a savepoint ended.
#[derive(Debug, Clone)]
pub(crate) struct SavepointDone {
    pub checkpoint_id: u64,
    /// The checkpoint's metadata (`chk-<id>/_metadata`; the job's HA pointer names it).
    pub metadata_path: String,
}

/// Triggers a savepoint (or, with [`Kind::Drain`], a stop-with-savepoint) of the job's running
/// attempt as soon as no checkpoint is pending, and waits until the attempt's coordinator
/// completed or failed it, for at most `timeout`. The coordinator loop of the attempt must be
/// running. The error says why it failed.
pub(crate) async fn savepoint(
    ctx: &JobManagerCtx,
    st: &LeaderState,
    job: &JobHandle,
    kind: Kind,
    timeout: Duration,
) -> std::result::Result<SavepointDone, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let counter = Counter::new(ctx.ha.clone(), &counter_name(&job.job_id));
    // Wait for a pending checkpoint to end; then trigger (the coordinator loop may trigger a
    // periodic one in between: then wait again).
    let checkpoint_id = loop {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no savepoint could be triggered within {timeout:?}"));
        }
        if !all_running(job) {
            return Err("the job's tasks are not all running".into());
        }
        if job.checkpoints().pending_id().is_none() {
            match trigger(ctx, st, job, &counter, kind).await {
                Ok(id) => {
                    job.checkpoint_wake.notify_one();
                    break id;
                }
                Err(KeelError::FailedPrecondition { .. }) => {}
                Err(e) => return Err(format!("cannot trigger a savepoint: {e}")),
            }
        }
        tokio::time::sleep(SAVEPOINT_POLL).await;
    };
    tracing::info!(job_id = %job.job_id, checkpoint_id, ?kind, "savepoint triggered");
    loop {
        let stat =
            job.checkpoints().stats(Instant::now()).into_iter().find(|c| c.checkpoint_id == checkpoint_id);
        match stat {
            Some(c) if c.state == CheckpointState::Completed => {
                return Ok(SavepointDone { checkpoint_id, metadata_path: c.metadata_path })
            }
            Some(c) if c.state == CheckpointState::Failed => {
                return Err(format!("savepoint {checkpoint_id} failed: {}", c.failure))
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("savepoint {checkpoint_id} did not complete within {timeout:?}"));
        }
        tokio::time::sleep(SAVEPOINT_POLL).await;
    }
}

/// The newest savepoint kept for the job (`<dir>/<job_id>/savepoints/sp-<id>/_metadata`), as
/// a pointer a new attempt can restore from.
pub(crate) async fn latest_savepoint(dir: &Path, job_id: &str) -> Option<CheckpointPointer> {
    let root = job_dir(dir, job_id).join("savepoints");
    let newest = std::fs::read_dir(&root)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("sp-")?.parse::<u64>().ok())
        .max()?;
    let path = root.join(format!("sp-{newest}")).join(METADATA_FILE);
    let metadata = read_metadata(&path).await.ok()?;
    Some(CheckpointPointer::of_metadata(&metadata, &path))
}

/// Copies a completed savepoint's metadata to `<dir>/<job_id>/savepoints/sp-<id>/_metadata`,
/// out of the reach of checkpoint retention: kept until the user deletes it. Returns its path.
pub(crate) async fn keep_savepoint(dir: &Path, job_id: &str, done: &SavepointDone) -> Result<String> {
    let target = job_dir(dir, job_id)
        .join("savepoints")
        .join(format!("sp-{}", done.checkpoint_id))
        .join(METADATA_FILE);
    let metadata = read_metadata(Path::new(&done.metadata_path)).await.map_err(KeelError::internal)?;
    write_metadata(&target, &metadata).await?;
    Ok(target.display().to_string())
}

/// Makes a checkpoint every task acknowledged durable, tells the tasks, applies retention,
/// and records the outcome in the tracker.
async fn complete(
    ctx: &JobManagerCtx,
    st: &LeaderState,
    job: &JobHandle,
    cfg: &AttemptCheckpointing,
    ready: ReadyCheckpoint,
) {
    let checkpoint_id = ready.checkpoint_id;
    let epoch = st.leadership.epoch;
    let tasks = job.checkpoints().tasks();
    let notify = |id: u64| notify_tasks(ctx, st, tasks, id);
    let result =
        finalize(&st.leadership, &ctx.pointers, &cfg.dir, &job.job_id, &cfg.job_name, &ready, notify).await;
    match result {
        Ok(pointer) => {
            job.checkpoints().complete(checkpoint_id, &pointer.metadata_path, Instant::now());
            tracing::info!(
                job_id = %job.job_id,
                version = ready.version,
                checkpoint_id,
                epoch,
                size_bytes = pointer.size_bytes,
                duration_ms = pointer.duration_ms,
                "checkpoint completed"
            );
            apply_retention(&cfg.dir, &job.job_id, checkpoint_id, cfg.num_retained).await;
        }
        Err(error) => {
            tracing::warn!(job_id = %job.job_id, checkpoint_id, epoch, %error, "checkpoint could not be completed");
            job.checkpoints().fail(checkpoint_id, &format!("completion failed: {error}"), Instant::now());
        }
    }
}

/// Completes a checkpoint every task acknowledged: writes its metadata file, then (still
/// leader) moves the job's HA pointer with a fenced write, then calls `notify`. A leader that
/// lost its leadership refuses before the metadata is written, again before the pointer moves,
/// and the pointer write itself is conditional on leadership in the HA store: a deposed leader
/// never moves the pointer and never notifies the tasks.
pub(crate) async fn finalize<N, F>(
    leadership: &Leadership,
    pointers: &CheckpointPointerStore,
    dir: &Path,
    job_id: &str,
    job_name: &str,
    ready: &ReadyCheckpoint,
    notify: N,
) -> Result<CheckpointPointer>
where
    N: FnOnce(u64) -> F,
    F: Future<Output = ()>,
{
    leadership.check()?;
    let completed_at_ms = now_ms();
    let duration_ms = u64::try_from(ready.triggered_at.elapsed().as_millis()).unwrap_or(u64::MAX);
    let metadata = CheckpointMetadata {
        format: 1,
        epoch: leadership.epoch,
        checkpoint_id: ready.checkpoint_id,
        job_id: job_id.to_string(),
        job_name: job_name.to_string(),
        version: ready.version,
        attempt: ready.attempt,
        parallelism: ready.subtasks.len() as u32,
        trigger_time_ms: ready.trigger_time_ms,
        completed_at_ms,
        duration_ms,
        total_size_bytes: ready.total_size(),
        subtasks: ready
            .subtasks
            .iter()
            .map(|s| SubtaskMetadata {
                subtask: s.subtask,
                task_id: s.task_id.clone(),
                state_size: s.state_size,
                state: s.state.clone(),
            })
            .collect(),
    };
    let path = metadata_path(dir, job_id, ready.checkpoint_id);
    write_metadata(&path, &metadata).await?;
    // A deposed leader must not complete a checkpoint.
    leadership.check()?;
    let pointer = CheckpointPointer {
        job_id: job_id.to_string(),
        checkpoint_id: ready.checkpoint_id,
        metadata_path: path.display().to_string(),
        version: ready.version,
        attempt: ready.attempt,
        trigger_time_ms: ready.trigger_time_ms,
        duration_ms,
        size_bytes: metadata.total_size_bytes,
        completed_at_ms,
        epoch: leadership.epoch,
    };
    pointers.set(leadership, job_id, &pointer).await?;
    notify(ready.checkpoint_id).await;
    Ok(pointer)
}

/// Tells every task that checkpoint `checkpoint_id` is complete (best effort: a task that
/// cannot be told commits at a later checkpoint or is restarted from this one).
async fn notify_tasks(ctx: &JobManagerCtx, st: &LeaderState, tasks: Vec<AttemptTask>, checkpoint_id: u64) {
    let calls = tasks.iter().map(|t| {
        let req = pb::NotifyCheckpointCompleteRequest {
            jobmanager: Some(st.stamp()),
            task_id: t.task_id.clone(),
            checkpoint_id,
        };
        async move {
            let result = async {
                let mut client = TaskManagerClient::new(ctx.channels.get(&t.address)?);
                let call = client.notify_checkpoint_complete(req);
                let (result, outcome) =
                    call_peer(&t.address, "NotifyCheckpointComplete", TM_CALL_TIMEOUT, call).await;
                st.note_taskmanager_call(&t.address, outcome);
                result.map(|_| ())
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(task_id = %t.task_id, checkpoint_id, %error, "cannot notify a task of a completed checkpoint");
            }
        }
    });
    futures::future::join_all(calls).await;
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> KeelError {
    KeelError::internal(format!("checkpoint storage: cannot {what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("fsync directory", dir, &e))
}

/// Writes a metadata file atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory and of its parent (the new `chk-<id>` entry).
async fn write_metadata(path: &Path, metadata: &CheckpointMetadata) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(metadata)
        .map_err(|e| KeelError::internal(format!("cannot encode checkpoint metadata: {e}")))?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::Write;
        let dir = path
            .parent()
            .ok_or_else(|| KeelError::internal(format!("{} has no parent directory", path.display())))?;
        std::fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, &e))?;
        let tmp = dir.join(format!(".{METADATA_FILE}.tmp.{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error("write", &path, &e));
        }
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| KeelError::internal(format!("writing checkpoint metadata panicked: {e}")))?
}

/// Reads a checkpoint's metadata file; the error names the path and the reason.
pub(crate) async fn read_metadata(path: &Path) -> std::result::Result<CheckpointMetadata, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("checkpoint metadata {} cannot be read: {e}", path.display()))?;
        serde_json::from_slice::<CheckpointMetadata>(&bytes)
            .map_err(|e| format!("checkpoint metadata {} is not valid: {e}", path.display()))
    })
    .await
    .map_err(|e| format!("reading checkpoint metadata panicked: {e}"))?
}

/// Deletes the job's checkpoint directories beyond `num_retained` (see
/// [`checkpoints_to_delete`]). Failures are logged: a directory left behind is deleted at the
/// next completion.
pub(crate) async fn apply_retention(dir: &Path, job_id: &str, latest: u64, num_retained: u32) {
    let root = job_dir(dir, job_id);
    let job_id = job_id.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let mut on_disk = Vec::new();
        let entries = std::fs::read_dir(&root).map_err(|e| io_error("list", &root, &e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_prefix("chk-")).and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            on_disk.push((id, entry.path().join(METADATA_FILE).is_file()));
        }
        for id in checkpoints_to_delete(&on_disk, latest, num_retained) {
            let path = root.join(format!("chk-{id}"));
            match std::fs::remove_dir_all(&path) {
                Ok(()) => tracing::debug!(%job_id, checkpoint_id = id, "checkpoint deleted (retention)"),
                Err(e) => tracing::warn!(%job_id, checkpoint_id = id, error = %e, path = %path.display(), "cannot delete checkpoint"),
            }
        }
        Ok::<(), KeelError>(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "checkpoint retention failed"),
        Err(error) => tracing::warn!(%error, "checkpoint retention panicked"),
    }
}

/// Where an attempt restores from: the pointer and one restore state per subtask.
#[derive(Debug, Clone)]
pub(crate) struct Restore {
    pub pointer: CheckpointPointer,
    pub states: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) enum RestoreError {
    /// The HA store could not be read; worth another try.
    Ha(KeelError),
    /// The checkpoint the pointer names cannot be used (missing, unreadable or inconsistent
    /// metadata): the job fails with this message rather than silently starting fresh.
    Unusable(String),
}

/// Reads the checkpoint the job's HA pointer names, if any, for an attempt of `parallelism`
/// subtasks.
pub(crate) async fn load_restore(
    pointers: &CheckpointPointerStore,
    job_id: &str,
    parallelism: u32,
) -> std::result::Result<Option<Restore>, RestoreError> {
    let pointer: Option<CheckpointPointer> = pointers.get(job_id).await.map_err(RestoreError::Ha)?;
    let Some(pointer) = pointer else { return Ok(None) };
    let states = load_states(&pointer, parallelism).await.map_err(RestoreError::Unusable)?;
    Ok(Some(Restore { pointer, states }))
}

/// The restore states of the checkpoint `pointer` names; the error says what is wrong with it.
pub(crate) async fn load_states(
    pointer: &CheckpointPointer,
    parallelism: u32,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let path = Path::new(&pointer.metadata_path);
    let metadata = read_metadata(path).await?;
    if metadata.checkpoint_id != pointer.checkpoint_id || metadata.job_id != pointer.job_id {
        return Err(format!(
            "checkpoint metadata {} is checkpoint {} of job {}, but the HA pointer names checkpoint {} of job {}",
            path.display(),
            metadata.checkpoint_id,
            metadata.job_id,
            pointer.checkpoint_id,
            pointer.job_id
        ));
    }
    metadata
        .restore_states(parallelism)
        .map_err(|reason| format!("checkpoint metadata {}: {reason}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{SubtaskAck, TaskSnapshot};
    use keel_ha::{HaServices, Role};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn ready(checkpoint_id: u64) -> ReadyCheckpoint {
        ReadyCheckpoint {
            checkpoint_id,
            version: 1,
            attempt: 1,
            trigger_time_ms: 1,
            triggered_at: Instant::now(),
            subtasks: (0..2)
                .map(|i| SubtaskAck {
                    subtask: i,
                    task_id: format!("j/v1/{i}#1"),
                    state_size: 10,
                    state: TaskSnapshot::empty(i, 2),
                })
                .collect(),
        }
    }

    async fn leader(dir: &Path) -> (Arc<dyn HaServices>, Leadership) {
        let ha: Arc<dyn HaServices> =
            Arc::new(keel_ha::local::LocalHaServices::open(&dir.join("ha"), "c").expect("open local HA"));
        let l = ha.campaign(Role::JobManager, "127.0.0.1:1", &CancellationToken::new()).await.expect("win");
        (ha, l)
    }

    /// A leader completes a checkpoint: the metadata file holds every subtask's state, the HA
    /// pointer names it, the tasks are notified, and the states read back for a restore, at the
    /// same parallelism and (redistributed) at another.
    #[tokio::test]
    async fn leader_completes_and_restores() -> Result<()> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ha, l) = leader(tmp.path()).await;
        let pointers = CheckpointPointerStore::new(ha);
        let dir = tmp.path().join("chk");
        let notified = AtomicBool::new(false);
        let pointer = finalize(&l, &pointers, &dir, "j", "job", &ready(4), |_| async {
            notified.store(true, Ordering::SeqCst);
        })
        .await
        .expect("complete");
        assert!(notified.load(Ordering::SeqCst));
        assert_eq!(pointer.checkpoint_id, 4);
        assert_eq!(Path::new(&pointer.metadata_path), metadata_path(&dir, "j", 4));
        let stored: Option<CheckpointPointer> = pointers.get("j").await.expect("read pointer");
        assert_eq!(stored, Some(pointer));
        let restore = load_restore(&pointers, "j", 2).await.expect("restore").expect("a checkpoint");
        let own: Vec<Vec<u8>> =
            (0..2).map(|i| TaskSnapshot::empty(i, 2).to_json()).collect::<std::result::Result<_, _>>()?;
        assert_eq!(restore.states, own);
        // Another parallelism: the states are redistributed over it.
        let rescaled = load_restore(&pointers, "j", 3).await.expect("restore").expect("a checkpoint");
        let three: Vec<Vec<u8>> =
            (0..3).map(|i| TaskSnapshot::empty(i, 3).to_json()).collect::<std::result::Result<_, _>>()?;
        assert_eq!(rescaled.states, three);
        Ok(())
    }

    /// A deposed leader cannot complete a checkpoint: with its leadership token cancelled, the
    /// completion path refuses with `LeadershipLost`, the HA pointer does not move, no metadata
    /// is written and no task is notified.
    #[tokio::test]
    async fn deposed_leader_cannot_complete_a_checkpoint() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ha, l) = leader(tmp.path()).await;
        let pointers = CheckpointPointerStore::new(ha);
        let dir = tmp.path().join("chk");
        finalize(&l, &pointers, &dir, "j", "job", &ready(1), |_| async {}).await.expect("complete 1");

        l.give_up();
        let notified = AtomicBool::new(false);
        let err = finalize(&l, &pointers, &dir, "j", "job", &ready(2), |_| async {
            notified.store(true, Ordering::SeqCst);
        })
        .await
        .expect_err("a deposed leader must not complete a checkpoint");
        assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
        assert!(!notified.load(Ordering::SeqCst), "no task may be notified");
        let stored: Option<CheckpointPointer> = pointers.get("j").await.expect("read pointer");
        assert_eq!(stored.map(|p| p.checkpoint_id), Some(1), "the pointer must not move");
        assert!(!metadata_path(&dir, "j", 2).exists(), "no metadata for the refused checkpoint");
    }

    /// The HA store itself refuses the pointer write of a leader that was replaced, even when
    /// the process has not noticed yet (its token is still valid).
    #[tokio::test]
    async fn replaced_leader_pointer_write_is_refused_by_the_store() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ha, l) = leader(tmp.path()).await;
        let pointers = CheckpointPointerStore::new(ha);
        // Another leadership took office: the epoch file moved on.
        let epoch_file = tmp.path().join("ha").join("c").join("epochs").join("jobmanager");
        std::fs::write(&epoch_file, format!("{}", l.epoch + 1)).expect("bump epoch");
        let notified = AtomicBool::new(false);
        let err = finalize(&l, &pointers, &tmp.path().join("chk"), "j", "job", &ready(1), |_| async {
            notified.store(true, Ordering::SeqCst);
        })
        .await
        .expect_err("refused");
        assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
        assert!(!notified.load(Ordering::SeqCst));
        let stored: Option<CheckpointPointer> = pointers.get("j").await.expect("read pointer");
        assert_eq!(stored, None);
    }

    /// A leader on the in-memory HA backend, for the fault switches.
    async fn memory_leader() -> Result<(keel_ha::memory::MemoryHaServices, Leadership)> {
        let ha = keel_ha::memory::MemoryHaServices::new();
        let l = ha.campaign(Role::JobManager, "127.0.0.1:1", &CancellationToken::new()).await?;
        Ok((ha, l))
    }

    /// The HA store failing the pointer write (an injected `Unavailable`): the completion fails,
    /// no task is notified (their transactions stay open, to be committed by a later
    /// checkpoint), and the pointer does not move; the next checkpoint completes normally.
    #[tokio::test]
    async fn a_failed_pointer_write_completes_nothing() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| KeelError::internal(e.to_string()))?;
        let (ha, l) = memory_leader().await?;
        let pointers = CheckpointPointerStore::new(Arc::new(ha.clone()));
        let dir = tmp.path().join("chk");
        ha.fail_next_writes(1);
        let notified = AtomicBool::new(false);
        let failed = finalize(&l, &pointers, &dir, "j", "job", &ready(1), |_| async {
            notified.store(true, Ordering::SeqCst);
        })
        .await;
        assert!(matches!(failed, Err(KeelError::Unavailable { .. })), "{failed:?}");
        assert!(!notified.load(Ordering::SeqCst), "no task may be notified");
        assert_eq!(pointers.get("j").await?.map(|p: CheckpointPointer| p.checkpoint_id), None);
        let pointer = finalize(&l, &pointers, &dir, "j", "job", &ready(2), |_| async {}).await?;
        assert_eq!(pointers.get("j").await?, Some(pointer));
        Ok(())
    }

    /// A leader whose lease ended in the store without it noticing (its token has not fired):
    /// the store's fence refuses the pointer write, so no task is notified and the pointer
    /// stays where the previous checkpoint put it.
    #[tokio::test]
    async fn a_lease_lost_unnoticed_cannot_move_the_pointer() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| KeelError::internal(e.to_string()))?;
        let (ha, l) = memory_leader().await?;
        let pointers = CheckpointPointerStore::new(Arc::new(ha.clone()));
        let dir = tmp.path().join("chk");
        finalize(&l, &pointers, &dir, "j", "job", &ready(1), |_| async {}).await?;
        ha.lose_lease_unnoticed(Role::JobManager);
        assert!(!l.lost().is_cancelled(), "the holder was not told");
        let notified = AtomicBool::new(false);
        let refused = finalize(&l, &pointers, &dir, "j", "job", &ready(2), |_| async {
            notified.store(true, Ordering::SeqCst);
        })
        .await;
        assert!(matches!(refused, Err(KeelError::LeadershipLost { .. })), "{refused:?}");
        assert!(!notified.load(Ordering::SeqCst), "no task may be notified");
        assert_eq!(pointers.get("j").await?.map(|p: CheckpointPointer| p.checkpoint_id), Some(1));
        Ok(())
    }

    /// A pointer naming a metadata file that is gone is an unusable checkpoint whose message
    /// names the path, not a fresh start.
    #[tokio::test]
    async fn missing_metadata_is_reported_with_its_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ha, l) = leader(tmp.path()).await;
        let pointers = CheckpointPointerStore::new(ha);
        let dir = tmp.path().join("chk");
        let pointer =
            finalize(&l, &pointers, &dir, "j", "job", &ready(1), |_| async {}).await.expect("complete");
        std::fs::remove_file(&pointer.metadata_path).expect("remove");
        match load_restore(&pointers, "j", 2).await {
            Err(RestoreError::Unusable(reason)) => {
                assert!(reason.contains(&pointer.metadata_path), "{reason}")
            }
            other => panic!("expected an unusable checkpoint, got {other:?}"),
        }
    }

    /// Retention on disk keeps the newest `num_retained` checkpoints.
    #[tokio::test]
    async fn retention_deletes_older_checkpoint_directories() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ha, l) = leader(tmp.path()).await;
        let pointers = CheckpointPointerStore::new(ha);
        let dir = tmp.path().join("chk");
        for id in 1..=4 {
            finalize(&l, &pointers, &dir, "j", "job", &ready(id), |_| async {}).await.expect("complete");
        }
        apply_retention(&dir, "j", 4, 2).await;
        let mut left: Vec<String> = std::fs::read_dir(job_dir(&dir, "j"))
            .expect("list")
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .collect();
        left.sort();
        assert_eq!(left, vec!["chk-3".to_string(), "chk-4".to_string()]);
    }
}
