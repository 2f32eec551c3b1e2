//! Canceling tasks, the cancellation of a job, and giving slots back.

use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, TaskState};
use keel_proto::{JobState, Result, TaskStateExt};

use keel_client::detector::call_peer;

use super::{Driver, CANCEL_BUDGET, CANCEL_WAIT, TM_CALL_TIMEOUT};
use crate::events::JobEvent;
use crate::record::TaskRecord;

impl Driver {
    /// Cancels the tasks that have not ended. Waits for the answers at most [`CANCEL_BUDGET`]:
    /// a TaskManager that cannot be reached (partitioned, paused, just killed) must not hold up
    /// the restart or the switch that follows. The calls still pending go on in the background
    /// until their own timeout, so a TaskManager that comes back still hears the cancel; one
    /// that stays cut off cancels its tasks itself after `heartbeat.timeout` without a
    /// JobManager (see docs/fencing.md).
    pub(super) async fn cancel_tasks(&self, tasks: &[TaskRecord]) {
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

    pub(super) async fn finish_cancel(&mut self, tasks: &[TaskRecord]) -> Result<()> {
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
    pub(super) async fn release(&self, allocation_ids: Vec<String>, whole_job: bool) {
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
