//! What happens to a job, as its driver ([`crate::driver`]) receives it: task reports and lost
//! TaskManagers from the leader scope, and the user's requests from the gRPC service. Every
//! job handle (`state::JobHandle`) holds the sending end of its driver's queue.

use keel_proto::pb::{self, TaskState};
use keel_proto::{KeelError, Result};
use tokio::sync::oneshot;

use crate::upgrade::UpgradeRequest;

/// One thing that happens to a job, for its driver.
#[derive(Debug)]
pub enum JobEvent {
    /// A task changed state (from the TaskManager's report or heartbeat). `taskmanager_stopping`:
    /// it was canceled because its TaskManager is shutting down.
    TaskState { task_id: String, state: TaskState, failure: String, taskmanager_stopping: bool },
    /// A TaskManager running tasks of this job was lost.
    TaskManagerLost { taskmanager_id: String, reason: String },
    /// The user asked to cancel the job.
    Cancel,
    /// A new version replaces the active one (`keel upgrade`, `keel rescale`).
    Upgrade(Box<UpgradeRequest>),
    /// A savepoint of the running version (`keel savepoint`); with `stop`, the job then
    /// finishes (`keel stop`).
    Savepoint { reply: oneshot::Sender<Result<pb::TriggerSavepointResponse>>, stop: bool },
    /// A version now runs side by side with the active one, as a job of its own
    /// (`keel upgrade --mode side-by-side`): the driver records it in the job record.
    SideBySide(Box<SideBySide>),
}

/// A side-by-side version to record: its number in this job, its spec, and the job that runs
/// it. `reply` says whether it was recorded.
#[derive(Debug)]
pub struct SideBySide {
    pub version: u32,
    pub spec_yaml: String,
    pub parallelism: u32,
    pub job_id: String,
    pub job_name: String,
    pub reply: oneshot::Sender<Result<()>>,
}

impl JobEvent {
    /// Answers a request that arrives while the job cannot take it (not running).
    pub(crate) fn refuse(self, why: &str) {
        match self {
            JobEvent::Upgrade(req) => req.progress.fail(why),
            JobEvent::Savepoint { reply, .. } => {
                let _ = reply.send(Err(KeelError::precondition(why.to_string())));
            }
            JobEvent::SideBySide(side) => {
                let _ = side.reply.send(Err(KeelError::precondition(why.to_string())));
            }
            _ => {}
        }
    }
}
