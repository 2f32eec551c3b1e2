//! Job and task states.

use crate::pb::TaskState;
use serde::{Deserialize, Serialize};

/// The state of a job (of its active version). Names follow Flink's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Created,
    Scheduled,
    Deploying,
    Running,
    Restarting,
    Finished,
    Failed,
    Canceling,
    Canceled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Scheduled => "scheduled",
            JobState::Deploying => "deploying",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
            JobState::Canceling => "canceling",
            JobState::Canceled => "canceled",
        }
    }

    /// A terminal job is never scheduled again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Finished | JobState::Failed | JobState::Canceled)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names and predicates for the generated [`TaskState`].
pub trait TaskStateExt {
    fn name(&self) -> &'static str;
    fn is_terminal(&self) -> bool;
}

impl TaskStateExt for TaskState {
    fn name(&self) -> &'static str {
        match *self {
            TaskState::Unspecified => "unspecified",
            TaskState::Created => "created",
            TaskState::Scheduled => "scheduled",
            TaskState::Deploying => "deploying",
            TaskState::Running => "running",
            TaskState::Finished => "finished",
            TaskState::Failed => "failed",
            TaskState::Canceling => "canceling",
            TaskState::Canceled => "canceled",
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed | TaskState::Canceled)
    }
}
