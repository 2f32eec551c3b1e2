//! Starting a deployed task: the fence and slot checks, its chain plan, and the task with its
//! state reporter and checkpoint acker ([`crate::jm`]). Kept apart from [`crate::shared`] so
//! that the shared state does not import the JobManager loops, which import it.

use std::sync::Arc;

use keel_proto::pb::DeployTaskRequest;
use keel_proto::{KeelError, Result, TaskStateExt};
use keel_spec::JobSpec;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::jm;
use crate::shared::Shared;
use crate::task::{self, ChainPlan, StateLocation, Task, TaskInfo};

/// Deploys a task: checks the fence and the slot, plans its chain from the spec, and starts
/// it with its state reporter and checkpoint acker.
pub fn deploy(shared: &Arc<Shared>, req: DeployTaskRequest) -> Result<()> {
    if shared.stopping.is_cancelled() {
        return Err(KeelError::FailedPrecondition {
            reason: format!("taskmanager {} is shutting down", shared.id),
        });
    }
    let stamp = req.jobmanager.as_ref().ok_or_else(|| KeelError::InvalidArgument {
        reason: "DeployTask needs the jobmanager leader stamp".into(),
    })?;
    shared.jm_fence.observe(stamp.epoch)?;
    shared.note_jm_contact();
    if req.task_id.is_empty() {
        return Err(KeelError::InvalidArgument { reason: "DeployTask needs a task_id".into() });
    }
    let spec = JobSpec::parse(&req.spec_yaml)?;
    let parallelism = if req.parallelism == 0 { spec.parallelism } else { req.parallelism };
    let mut plan = ChainPlan::build(&spec, req.subtask, parallelism, &req.restore_state)?;
    plan.state = StateLocation::of_task(&req.checkpoints_dir, &req.job_id, req.attempt);
    let info = TaskInfo {
        task_id: req.task_id.clone(),
        job_id: req.job_id.clone(),
        job_name: spec.name.clone(),
        version: req.version,
        subtask: req.subtask,
        parallelism,
        attempt: req.attempt,
        slot_index: req.slot_index,
        allocation_id: req.allocation_id.clone(),
        jobmanager_epoch: stamp.epoch,
        jobmanager_address: stamp.address.clone(),
    };
    let span = tracing::info_span!(
        "task",
        task_id = %info.task_id,
        job_id = %info.job_id,
        version = info.version,
        subtask = info.subtask,
        attempt = info.attempt,
        epoch = info.jobmanager_epoch,
    );
    let (task, control_rx) = Task::new(info);
    let predecessors = {
        let mut table = shared.lock();
        table.slots.check_deploy(req.slot_index, &req.allocation_id, &req.job_id)?;
        if let Some(existing) = table.tasks.get(&req.task_id) {
            if !existing.state().is_terminal() {
                return Err(KeelError::AlreadyExists {
                    what: format!(
                        "task {} (on taskmanager {}, {})",
                        req.task_id,
                        shared.id,
                        existing.state().name()
                    ),
                });
            }
            existing.forgotten().cancel();
        }
        let predecessors: Vec<Arc<Task>> = table
            .tasks
            .values()
            .filter(|t| t.info.slot_index == req.slot_index && !t.done().is_cancelled())
            .cloned()
            .collect();
        table.tasks.insert(req.task_id.clone(), task.clone());
        table.slots.set_task(req.slot_index, &req.task_id);
        predecessors
    };
    for p in &predecessors {
        p.cancel(&format!("replaced by task {} in slot {}", req.task_id, req.slot_index));
    }
    shared.remember_jm_address(&stamp.address);

    let client = shared.jm_client(Some(&stamp.address));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    shared
        .reporters
        .spawn(jm::report_states(shared.clone(), task.clone(), client.clone()).instrument(span.clone()));
    shared
        .reporters
        .spawn(jm::send_acks(shared.clone(), task.clone(), client, ack_rx).instrument(span.clone()));
    let table_owner = shared.clone();
    let registry = shared.registry.clone();
    let slot_index = req.slot_index;
    span.in_scope(|| tracing::info!(slot = slot_index, allocation_id = %req.allocation_id, "task deployed"));
    shared.tasks_tracker.spawn(
        async move {
            task::run(task.clone(), plan, control_rx, predecessors, ack_tx, registry).await;
            table_owner.lock().slots.clear_task(slot_index, &task.info.task_id);
        }
        .instrument(span),
    );
    Ok(())
}
