//! Adoption: a new leader takes over the running tasks of the job's last attempt instead of
//! restarting them.

use std::time::{Duration, Instant};

use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, TaskState};
use keel_proto::JobState;

use keel_client::detector::call_peer;

use super::{Adopted, Driver, ADOPT_CALL_TIMEOUT};
use crate::record::{task_id, Placement, TaskRecord};

impl Driver {
    /// Adoption (a new leader, a job recovered from the HA store): when the job was running, the
    /// tasks of its last attempt that still run on their TaskManagers are taken over instead of
    /// restarted. The TaskManagers report them in their heartbeats (kept during the adoption
    /// window, see [`LeaderState`]); each is then asked to adopt them (`AdoptTasks`), which
    /// stamps the tasks and their slots with this leader's epoch. Only all or nothing: with a
    /// task missing, ended or not adoptable, the adopted ones are canceled and the job restarts
    /// from its latest checkpoint as before. A checkpoint the earlier leader had in flight is
    /// abandoned: its id is never used again (the id counter is in the HA store), and the next
    /// completed checkpoint subsumes it (exactly-once sinks commit what it had pre-committed).
    pub(super) async fn adopt(&self) -> Option<Adopted> {
        let (version, parallelism, attempt) = {
            let r = self.job.record();
            let v = r.active()?;
            if r.state != JobState::Running || r.cancel_requested || r.attempts == 0 {
                return None;
            }
            (v.version, v.parallelism, r.attempts)
        };
        let job_id = self.job.job_id.clone();
        let ids: Vec<String> = (0..parallelism).map(|i| task_id(&job_id, version, i, attempt)).collect();
        let started = tokio::time::Instant::now();
        // Heartbeats come every heartbeat.interval; up to three of them, within the adoption
        // window.
        let wait = (self.ctx.config.heartbeat_interval * 3)
            .min(self.st.adopt_until.saturating_duration_since(Instant::now()));
        let mut next_look = started;
        let found = loop {
            if let Some(found) = self.st.orphans_of(&ids) {
                break found;
            }
            if started.elapsed() >= wait {
                tracing::info!(%job_id, version, attempt, waited_ms = started.elapsed().as_millis() as u64,
                    "not every task of the running attempt was reported; restarting the job instead of adopting");
                return None;
            }
            // Every TaskManager that holds a slot of this version has reported (or there is
            // none): the missing tasks are gone, and waiting longer only delays the restart.
            if tokio::time::Instant::now() >= next_look {
                next_look = tokio::time::Instant::now() + Duration::from_millis(250);
                if let Some(holders) = self.slot_holders(version).await {
                    if self.st.reported_by(&holders) && self.st.orphans_of(&ids).is_none() {
                        tracing::info!(%job_id, version, attempt, taskmanagers = ?holders,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "every taskmanager holding the job's slots has reported and a task of the running attempt is missing; restarting the job instead of adopting");
                        return None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut by_address: std::collections::BTreeMap<String, (String, Vec<String>)> =
            std::collections::BTreeMap::new();
        for (id, o) in &found {
            by_address
                .entry(o.address.clone())
                .or_insert_with(|| (o.taskmanager_id.clone(), Vec::new()))
                .1
                .push(id.clone());
        }
        let calls = by_address.into_iter().map(|(address, (taskmanager_id, task_ids))| {
            let req =
                pb::AdoptTasksRequest { jobmanager: Some(self.st.stamp()), job_id: job_id.clone(), task_ids };
            async move {
                let result = async {
                    let mut client = TaskManagerClient::new(self.ctx.channels.get(&address)?);
                    let call = client.adopt_tasks(req);
                    let (result, outcome) = call_peer(&address, "AdoptTasks", ADOPT_CALL_TIMEOUT, call).await;
                    self.st.note_taskmanager_call(&address, outcome);
                    result
                }
                .await;
                (address, taskmanager_id, result)
            }
        });
        let mut tasks: Vec<TaskRecord> = Vec::new();
        for (address, taskmanager_id, result) in futures::future::join_all(calls).await {
            match result {
                Ok(response) => {
                    for a in response.adopted {
                        let Some(subtask) = ids.iter().position(|id| *id == a.task_id) else { continue };
                        let state = TaskState::try_from(a.state).unwrap_or(TaskState::Unspecified);
                        let at = Placement {
                            taskmanager_id: taskmanager_id.clone(),
                            taskmanager_address: address.clone(),
                            slot_index: a.slot_index,
                            allocation_id: a.allocation_id,
                        };
                        tasks.push(TaskRecord::placed(&job_id, version, subtask as u32, attempt, state, at));
                    }
                }
                Err(error) => tracing::warn!(%job_id, %address, %error, "cannot adopt tasks"),
            }
        }
        tasks.sort_by_key(|t| t.subtask);
        let complete = tasks.len() == ids.len() && tasks.iter().all(|t| t.state == TaskState::Running);
        if !complete {
            tracing::warn!(%job_id, version, attempt, adopted = tasks.len(), needed = ids.len(),
                "could not adopt every task of the running attempt; restarting the job");
            // Every task that was reported, adopted or not (an answer may have been lost while
            // the TaskManager still adopted): none of them may run on beside the restart.
            let reported: Vec<TaskRecord> = found
                .iter()
                .map(|(id, o)| {
                    let subtask = ids.iter().position(|i| i == id).unwrap_or_default() as u32;
                    let at = Placement {
                        taskmanager_id: o.taskmanager_id.clone(),
                        taskmanager_address: o.address.clone(),
                        ..Placement::default()
                    };
                    TaskRecord::placed(&job_id, version, subtask, attempt, TaskState::Running, at)
                })
                .collect();
            self.cancel_tasks(&reported).await;
            return None;
        }
        // Known from now on: a report made before the adoption (older epoch) is not answered
        // with a cancel.
        *self.job.tasks_mut() = tasks.clone();
        for t in &tasks {
            self.st.saw_taskmanager(&t.taskmanager_id, &t.taskmanager_address);
        }
        tracing::info!(%job_id, version, attempt, tasks = tasks.len(), took_ms = started.elapsed().as_millis() as u64,
            epoch = self.st.leadership.epoch, "adopted the running tasks of an earlier leader");
        self.job.record_mut().status_message = format!(
            "tasks of attempt {attempt} adopted by jobmanager leader epoch {}",
            self.st.leadership.epoch
        );
        Some(Adopted { attempt, tasks })
    }

    /// The TaskManagers that hold a slot allocated to `version` of this job, as the
    /// ResourceManager leader sees them; `None` when it cannot say for sure (unreachable, or
    /// leading for less than `heartbeat.timeout`: its table, rebuilt from registrations, may
    /// still miss a live TaskManager).
    pub(super) async fn slot_holders(&self, version: u32) -> Option<Vec<String>> {
        let call = self.ctx.rm.call(|ch| async move {
            ResourceManagerClient::new(ch).cluster_overview(pb::ClusterOverviewRequest {}).await
        });
        let overview = tokio::time::timeout(Duration::from_millis(500), call).await.ok()?.ok()?.into_inner();
        if Duration::from_millis(overview.leader_for_ms) < self.ctx.config.heartbeat_timeout {
            return None;
        }
        let holders = overview
            .taskmanagers
            .into_iter()
            .filter(|tm| {
                tm.slots.iter().any(|s| {
                    s.allocation.as_ref().is_some_and(|a| a.job_id == self.job.job_id && a.version == version)
                })
            })
            .map(|tm| tm.taskmanager_id)
            .collect();
        Some(holders)
    }
}
