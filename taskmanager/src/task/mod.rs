//! Tasks: one subtask of one job version, running in one slot.
//!
//! - [`Task`]: the shared handle of a task: its identity, state, counters and controls.
//! - [`chain`]: the operator chain a task runs (sources → bounded channel → sink thread): its
//!   plan, opening it, and the two loops that do its I/O.
//! - [`barrier`]: the checkpoint bookkeeping of the chain (barriers, alignment, acks, drain,
//!   commits, end, cancel) as pure state machines.
//! - [`batch`]: the envelope records travel in from source to sink, and where they are counted.
//! - [`datagen`], [`kafka`], [`sinks`]: the connectors.
//! - [`metrics`]: the task's metrics in the TaskManager's registry, and its throughput for the
//!   JobManager's reports. [`info`]: who a task is. [`threads`]: blocking work off the runtime.
//!
//! States: deploying → running → finished | failed | canceled, with canceling between a cancel
//! request and the end. [`can_transition`] is the one place that says which moves are legal; a
//! terminal state is never left.

pub mod barrier;
pub mod batch;
pub mod chain;
pub mod datagen;
pub mod info;
pub mod kafka;
pub mod metrics;
pub mod sinks;
pub mod threads;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keel_metrics::Registry;
use keel_proto::pb::{TaskState, TaskStateUpdate};
use keel_proto::TaskStateExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use batch::Counters;
pub use chain::{Ack, ChainEnd, ChainIo, ChainPlan, Control, SinkSnapshot, StateLocation, TaskSnapshot};
pub use info::TaskInfo;
pub use metrics::{TaskMetrics, Throughput};

/// Pending control requests (checkpoint triggers, notifications) a task buffers.
pub const CONTROL_CAPACITY: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    pub state: TaskState,
    /// Why the task failed (empty otherwise).
    pub failure: String,
}

/// Whether a task may move from `from` to `to`.
pub fn can_transition(from: TaskState, to: TaskState) -> bool {
    use TaskState::*;
    match from {
        Deploying => matches!(to, Running | Canceling | Failed | Canceled),
        Running => matches!(to, Finished | Failed | Canceling | Canceled),
        // A task that reaches its end while being canceled reports what really happened.
        Canceling => matches!(to, Canceled | Failed | Finished),
        _ => false,
    }
}

/// The shared handle of a task.
pub struct Task {
    pub info: TaskInfo,
    status: watch::Sender<TaskStatus>,
    pub counters: Arc<Counters>,
    cancel: CancellationToken,
    /// Cancelled when the task's chain has stopped (whatever its end).
    done: CancellationToken,
    /// Cancelled when the TaskManager forgets the task (a while after its end).
    forgotten: CancellationToken,
    control: mpsc::Sender<Control>,
    terminal_at: Mutex<Option<Instant>>,
    /// The latest throughput while running (see [`tick_until`]).
    throughput: Mutex<Throughput>,
    /// Epoch of the JobManager leader the task answers to: the deploying one, or a later leader
    /// that adopted it (`AdoptTasks`). Its reports carry it.
    leader_epoch: std::sync::atomic::AtomicU64,
    /// A drain (stop-with-savepoint, upgrade handover) was triggered: the sources stop at its
    /// barrier and the task finishes. Such a task is not adopted by a new leader.
    draining: std::sync::atomic::AtomicBool,
    /// Canceled because the TaskManager is shutting down (reported as `taskmanager_stopping`).
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("info", &self.info).field("status", &self.status()).finish()
    }
}

impl Task {
    /// A new task in state deploying, with the receiving end of its control channel.
    pub fn new(info: TaskInfo) -> (Arc<Task>, mpsc::Receiver<Control>) {
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (status, _) = watch::channel(TaskStatus { state: TaskState::Deploying, failure: String::new() });
        let task = Task {
            leader_epoch: std::sync::atomic::AtomicU64::new(info.jobmanager_epoch),
            draining: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            info,
            status,
            counters: Arc::new(Counters::default()),
            cancel: CancellationToken::new(),
            done: CancellationToken::new(),
            forgotten: CancellationToken::new(),
            control,
            terminal_at: Mutex::new(None),
            throughput: Mutex::new(Throughput::default()),
        };
        (Arc::new(task), control_rx)
    }

    pub fn status(&self) -> TaskStatus {
        self.status.borrow().clone()
    }

    /// The epoch of the JobManager leader the task answers to.
    pub fn leader_epoch(&self) -> u64 {
        self.leader_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A drain was triggered for the task.
    pub fn set_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A newer JobManager leader adopted the task: its reports carry `epoch` from now on.
    pub fn adopt(&self, epoch: u64) {
        self.leader_epoch.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn state(&self) -> TaskState {
        self.status.borrow().state
    }

    pub fn subscribe(&self) -> watch::Receiver<TaskStatus> {
        self.status.subscribe()
    }

    /// Moves to `to` if that is a legal transition; returns whether it moved.
    pub fn transition(&self, to: TaskState, failure: Option<String>) -> bool {
        let moved = self.status.send_if_modified(|s| {
            if !can_transition(s.state, to) {
                return false;
            }
            s.state = to;
            if let Some(f) = &failure {
                s.failure = f.clone();
            }
            true
        });
        if moved {
            if to.is_terminal() {
                *self.terminal_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            }
            match &failure {
                Some(f) => {
                    tracing::warn!(task_id = %self.info.task_id, state = to.name(), failure = %f, "task state changed")
                }
                None => tracing::info!(task_id = %self.info.task_id, state = to.name(), "task state changed"),
            }
        }
        moved
    }

    /// Asks the task to stop: canceling now, canceled once its chain has stopped.
    pub fn cancel(&self, reason: &str) {
        if !self.state().is_terminal() && !self.cancel.is_cancelled() {
            tracing::info!(task_id = %self.info.task_id, reason, "canceling task");
            self.transition(TaskState::Canceling, None);
        }
        self.cancel.cancel();
    }

    /// Cancels the task because its TaskManager is shutting down; its reports say so, so that
    /// the JobManager treats the failure as a lost TaskManager.
    pub fn cancel_for_shutdown(&self, reason: &str) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cancel(reason);
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn done(&self) -> &CancellationToken {
        &self.done
    }

    pub fn forgotten(&self) -> &CancellationToken {
        &self.forgotten
    }

    pub fn control(&self) -> &mpsc::Sender<Control> {
        &self.control
    }

    /// Since when the task is in a terminal state.
    pub fn terminal_since(&self) -> Option<Instant> {
        *self.terminal_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest throughput of the running task (zero before it runs and after it ended).
    pub fn throughput(&self) -> Throughput {
        self.throughput.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_throughput(&self, throughput: Throughput) {
        *self.throughput.lock().unwrap_or_else(|p| p.into_inner()) = throughput;
    }

    /// The task as reported to the JobManager.
    pub fn update(&self, taskmanager_id: &str) -> TaskStateUpdate {
        let status = self.status();
        let throughput = self.throughput();
        TaskStateUpdate {
            taskmanager_id: taskmanager_id.to_string(),
            task_id: self.info.task_id.clone(),
            job_id: self.info.job_id.clone(),
            version: self.info.version,
            subtask: self.info.subtask,
            attempt: self.info.attempt,
            state: status.state as i32,
            failure: status.failure,
            jobmanager_epoch: self.leader_epoch(),
            records_in: self.counters.records_in(),
            records_out: self.counters.records_out(),
            records_in_per_second: throughput.records_in_per_second,
            records_out_per_second: throughput.records_out_per_second,
            bytes_in_per_second: throughput.bytes_in_per_second,
            bytes_out_per_second: throughput.bytes_out_per_second,
            pending_records: throughput.pending_records,
            current_emit_event_time_lag_ms: throughput.emit_lag_ms,
            source_partitions: throughput.sources,
            first_output_ms: self.counters.first_output_ms.load(std::sync::atomic::Ordering::Relaxed),
            last_output_ms: self.counters.last_output_ms.load(std::sync::atomic::Ordering::Relaxed),
            taskmanager_stopping: self.stopping.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// Runs a deployed task to its end: waits for the tasks it replaces in its slot, opens its
/// chain, runs it, and records the terminal state. `acks` receives the checkpoint
/// acknowledgements of the chain. The task's metrics live in `registry` from the end of the
/// wait until the chain has stopped.
pub async fn run(
    task: Arc<Task>,
    plan: ChainPlan,
    control: mpsc::Receiver<Control>,
    predecessors: Vec<Arc<Task>>,
    acks: mpsc::UnboundedSender<Ack>,
    registry: Registry,
) {
    let end = run_inner(&task, plan, control, predecessors, acks, &registry).await;
    match end {
        Ok(ChainEnd::Finished) => {
            task.transition(TaskState::Finished, None);
        }
        Ok(ChainEnd::Canceled) => {
            task.transition(TaskState::Canceled, None);
        }
        Err(e) => {
            if !task.transition(TaskState::Failed, Some(e.to_string())) {
                tracing::warn!(task_id = %task.info.task_id, error = %e, "task failed after it had ended");
            }
        }
    }
    task.done.cancel();
}

async fn run_inner(
    task: &Arc<Task>,
    plan: ChainPlan,
    control: mpsc::Receiver<Control>,
    predecessors: Vec<Arc<Task>>,
    acks: mpsc::UnboundedSender<Ack>,
    registry: &Registry,
) -> keel_proto::Result<ChainEnd> {
    for p in predecessors {
        tracing::info!(previous_task = %p.info.task_id, "waiting for the previous task of the slot to stop");
        tokio::select! {
            _ = p.done.cancelled() => {}
            _ = task.cancel.cancelled() => return Ok(ChainEnd::Canceled),
        }
    }
    let metrics = Arc::new(TaskMetrics::register(registry, &task.info, &plan));
    let ticker_stop = CancellationToken::new();
    let ticker = tokio::spawn(tick_until(task.clone(), metrics.clone(), ticker_stop.clone()));
    let end = open_and_run(task, plan, control, acks, &metrics).await;
    ticker_stop.cancel();
    if let Err(e) = ticker.await {
        tracing::warn!(error = %e, "the task's metrics ticker panicked");
    }
    // The series go now, even if a stuck sink thread still holds the handles.
    metrics.close();
    task.set_throughput(Throughput::default());
    end
}

async fn open_and_run(
    task: &Arc<Task>,
    plan: ChainPlan,
    control: mpsc::Receiver<Control>,
    acks: mpsc::UnboundedSender<Ack>,
    metrics: &Arc<TaskMetrics>,
) -> keel_proto::Result<ChainEnd> {
    let chain = tokio::select! {
        r = plan.open(metrics) => r?,
        _ = task.cancel.cancelled() => return Ok(ChainEnd::Canceled),
    };
    if !task.transition(TaskState::Running, None) {
        // Canceled while opening.
        return Ok(ChainEnd::Canceled);
    }
    chain
        .run(ChainIo {
            cancel: task.cancel.clone(),
            control,
            acks,
            counters: task.counters.clone(),
            metrics: metrics.clone(),
        })
        .await
}

/// Every [`metrics::TICK`] until `stop`: copies the Kafka connector's metrics into the registry and
/// gives `task` its latest [`Throughput`].
pub async fn tick_until(task: Arc<Task>, metrics: Arc<TaskMetrics>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(metrics::TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        task.set_throughput(metrics.tick());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the documented moves are legal, and no terminal state is ever left.
    #[test]
    fn transitions_follow_the_state_machine() {
        use TaskState::*;
        assert!(can_transition(Deploying, Running));
        assert!(can_transition(Running, Finished));
        assert!(can_transition(Running, Canceling));
        assert!(can_transition(Canceling, Canceled));
        assert!(!can_transition(Running, Deploying));
        for terminal in [Finished, Failed, Canceled] {
            for to in [Deploying, Running, Finished, Failed, Canceling, Canceled] {
                assert!(!can_transition(terminal, to), "{terminal:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn a_terminal_task_stays_terminal() {
        let (task, _rx) = Task::new(TaskInfo {
            task_id: "j/1/0#0".into(),
            job_id: "j".into(),
            job_name: "jn".into(),
            version: 1,
            subtask: 0,
            parallelism: 1,
            attempt: 0,
            slot_index: 0,
            allocation_id: "a".into(),
            jobmanager_epoch: 1,
            jobmanager_address: "127.0.0.1:1".into(),
        });
        assert!(task.transition(TaskState::Running, None));
        assert!(task.transition(TaskState::Failed, Some("boom".into())));
        assert!(!task.transition(TaskState::Finished, None));
        task.cancel("test");
        assert_eq!(task.status(), TaskStatus { state: TaskState::Failed, failure: "boom".into() });
        assert!(task.terminal_since().is_some());
        let update = task.update("tm");
        assert_eq!(update.state, TaskState::Failed as i32);
        assert_eq!(update.failure, "boom");
    }
}
