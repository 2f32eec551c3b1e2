//! What the JobManager keeps about a job in the HA store, and the live task table.

use keel_proto::pb::{self, TaskState};
use keel_proto::JobState;
use serde::{Deserialize, Serialize};

use crate::restart::RestartRecord;
use crate::upgrade_phase::Upgrade;

/// One version of a job: every spec submitted for a job is a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u32,
    pub spec_yaml: String,
    pub state: JobState,
    pub created_at_ms: u64,
    pub parallelism: u32,
    /// The checkpoint the latest attempt of this version was deployed from (set at submission
    /// for `keel run --restore`, and whenever an attempt restores from the job's HA pointer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<RestoredFrom>,
    /// The savepoint this version was drained with when a newer version replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_with: Option<RestoredFrom>,
    /// Started without state (restore strategy `none`): checkpoints of earlier versions are not
    /// restored, only this version's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_fresh: bool,
}

/// A checkpoint an attempt restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredFrom {
    /// The job that took the checkpoint (an earlier job for `keel run --restore`).
    pub job_id: String,
    pub checkpoint_id: u64,
    pub metadata_path: String,
    pub restored_at_ms: u64,
}

impl RestoredFrom {
    pub fn to_pb(&self) -> pb::CheckpointRef {
        pb::CheckpointRef {
            job_id: self.job_id.clone(),
            checkpoint_id: self.checkpoint_id,
            metadata_path: self.metadata_path.clone(),
            restored_at_ms: self.restored_at_ms,
        }
    }
}

/// The durable record of a job (`jobs/<job_id>` in the HA store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub name: String,
    pub state: JobState,
    pub active_version: u32,
    pub versions: Vec<VersionRecord>,
    pub created_at_ms: u64,
    /// Attempts made to run the active version; task ids carry it, so attempts of different
    /// leaders never share an id.
    pub attempts: u32,
    /// Restarts after a failure over the job's life (not counting recoveries by a new leader);
    /// `restart.history` keeps the newest of them.
    pub restarts: u32,
    /// Why the job failed, or what it is waiting for.
    pub status_message: String,
    /// Set when the user asked to cancel, so a new leader finishes the cancellation.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The restart strategy's counters, the newest restarts (time, attempt, cause, delay) and,
    /// once the strategy gave up, the failure that ended the job.
    #[serde(default)]
    pub restart: RestartRecord,
    /// A version running side by side with the active one (`keel upgrade --mode side-by-side`),
    /// as a job of its own until `keel promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<SideRecord>,
    /// The latest upgrade and its phase (see [`crate::upgrade_phase`]); a new leader resumes
    /// it from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
}

/// A side-by-side version: its number in this job, and the job that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideRecord {
    pub version: u32,
    pub job_id: String,
    pub job_name: String,
}

impl JobRecord {
    pub fn active(&self) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == self.active_version)
    }

    pub fn active_mut(&mut self) -> Option<&mut VersionRecord> {
        let active = self.active_version;
        self.versions.iter_mut().find(|v| v.version == active)
    }

    /// Sets the job state and the active version's state together.
    pub fn set_state(&mut self, state: JobState) {
        self.state = state;
        if let Some(v) = self.active_mut() {
            v.state = state;
        }
    }
}

/// A task of the current attempt, as the JobManager tracks it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task_id: String,
    pub version: u32,
    pub subtask: u32,
    pub attempt: u32,
    pub state: TaskState,
    pub taskmanager_id: String,
    pub taskmanager_address: String,
    pub slot_index: u32,
    pub allocation_id: String,
    pub failure: String,
    pub records_in: u64,
    pub records_out: u64,
}

/// Where a task runs: its TaskManager and its slot there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub taskmanager_id: String,
    pub taskmanager_address: String,
    pub slot_index: u32,
    pub allocation_id: String,
}

impl TaskRecord {
    /// Subtask `subtask` of `attempt` of a job version, in `state` at `at`, with no failure and
    /// no counts yet.
    pub fn placed(
        job_id: &str,
        version: u32,
        subtask: u32,
        attempt: u32,
        state: TaskState,
        at: Placement,
    ) -> Self {
        TaskRecord {
            task_id: task_id(job_id, version, subtask, attempt),
            version,
            subtask,
            attempt,
            state,
            taskmanager_id: at.taskmanager_id,
            taskmanager_address: at.taskmanager_address,
            slot_index: at.slot_index,
            allocation_id: at.allocation_id,
            failure: String::new(),
            records_in: 0,
            records_out: 0,
        }
    }

    pub fn to_pb(&self) -> pb::TaskDetails {
        use keel_proto::TaskStateExt;
        pb::TaskDetails {
            task_id: self.task_id.clone(),
            version: self.version,
            subtask: self.subtask,
            attempt: self.attempt,
            state: self.state.name().to_string(),
            taskmanager_id: self.taskmanager_id.clone(),
            taskmanager_address: self.taskmanager_address.clone(),
            slot_index: self.slot_index,
            failure: self.failure.clone(),
            records_in: self.records_in,
            records_out: self.records_out,
            // Throughput comes from the latest task report (JobManager::details).
            ..Default::default()
        }
    }
}

/// The id of a task: readable, and unique across attempts and leaders.
pub fn task_id(job_id: &str, version: u32, subtask: u32, attempt: u32) -> String {
    format!("{job_id}/v{version}/{subtask}#{attempt}")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
