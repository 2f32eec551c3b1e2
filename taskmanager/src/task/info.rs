//! Who a task is (a leaf: the task's metrics label their series with it).

/// Who a task is and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub task_id: String,
    pub job_id: String,
    /// The job's name (from its spec), a label of the task's metrics.
    pub job_name: String,
    pub version: u32,
    pub subtask: u32,
    pub parallelism: u32,
    pub attempt: u32,
    pub slot_index: u32,
    pub allocation_id: String,
    /// Epoch of the JobManager leader that deployed the task.
    pub jobmanager_epoch: u64,
    /// Address of that JobManager, the fallback for reports.
    pub jobmanager_address: String,
}
