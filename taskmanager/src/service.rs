//! The TaskManager gRPC service. Every request from a leader is fenced: an epoch lower than the
//! highest seen from that role is rejected with `StaleEpoch`.

use std::sync::Arc;

use keel_proto::pb::task_manager_server::TaskManager;
use keel_proto::pb::{
    AdoptTasksRequest, AdoptTasksResponse, AllocateSlotRequest, AllocateSlotResponse, CancelTaskRequest,
    CancelTaskResponse, DeployTaskRequest, DeployTaskResponse, FreeSlotRequest, FreeSlotResponse,
    LeaderStamp, NotifyCheckpointCompleteRequest, NotifyCheckpointCompleteResponse, PingRequest,
    PingResponse, TriggerCheckpointRequest, TriggerCheckpointResponse,
};
use keel_proto::{KeelError, Result, TaskStateExt};
use tokio::sync::mpsc::error::TrySendError;
use tonic::{Request, Response, Status};

use crate::fence::EpochFence;
use crate::shared::Shared;
use crate::slots::Allocated;
use crate::task::{Control, Task};

pub struct TaskManagerService {
    shared: Arc<Shared>,
}

impl TaskManagerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        TaskManagerService { shared }
    }
}

fn fenced(fence: &EpochFence, stamp: Option<&LeaderStamp>, rpc: &str) -> Result<u64> {
    let stamp = stamp.ok_or_else(|| KeelError::InvalidArgument {
        reason: format!("{rpc} needs the leader stamp (epoch) of its sender"),
    })?;
    fence.observe(stamp.epoch)?;
    Ok(stamp.epoch)
}

impl TaskManagerService {
    fn allocate(&self, req: AllocateSlotRequest) -> Result<()> {
        let epoch = fenced(&self.shared.rm_fence, req.resourcemanager.as_ref(), "AllocateSlot")?;
        let allocation = req.allocation.ok_or_else(|| KeelError::InvalidArgument {
            reason: "AllocateSlot needs an allocation".into(),
        })?;
        if allocation.allocation_id.is_empty() {
            return Err(KeelError::InvalidArgument { reason: "AllocateSlot needs an allocation_id".into() });
        }
        let (allocation_id, job_id, version) =
            (allocation.allocation_id.clone(), allocation.job_id.clone(), allocation.version);
        let outcome = self.shared.lock().slots.allocate(req.index, allocation)?;
        if outcome == Allocated::Newly {
            tracing::info!(slot = req.index, %allocation_id, %job_id, version, epoch, "slot allocated");
        }
        Ok(())
    }

    fn free(&self, req: FreeSlotRequest) -> Result<bool> {
        let epoch = fenced(&self.shared.rm_fence, req.resourcemanager.as_ref(), "FreeSlot")?;
        let (freed, tasks) = {
            let mut table = self.shared.lock();
            match table.slots.free(&req.allocation_id) {
                None => (None, Vec::new()),
                Some((index, _)) => {
                    let tasks: Vec<Arc<Task>> = table
                        .tasks
                        .values()
                        .filter(|t| t.info.allocation_id == req.allocation_id && !t.state().is_terminal())
                        .cloned()
                        .collect();
                    (Some(index), tasks)
                }
            }
        };
        for t in tasks {
            t.cancel("its slot was freed");
        }
        match freed {
            Some(index) => {
                tracing::info!(slot = index, allocation_id = %req.allocation_id, epoch, "slot freed");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn task_for_checkpoint(
        &self,
        stamp: Option<&LeaderStamp>,
        task_id: &str,
        rpc: &str,
    ) -> Result<Arc<Task>> {
        fenced(&self.shared.jm_fence, stamp, rpc)?;
        self.shared.note_jm_contact();
        self.shared.find_task(task_id).ok_or_else(|| KeelError::FailedPrecondition {
            reason: format!("task {task_id} is not known on taskmanager {}", self.shared.id),
        })
    }

    fn trigger(&self, req: TriggerCheckpointRequest) -> Result<()> {
        if req.drain {
            self.shared.mark_draining(req.jobmanager.as_ref(), &req.task_id)?;
        }
        let task = self.task_for_checkpoint(req.jobmanager.as_ref(), &req.task_id, "TriggerCheckpoint")?;
        let state = task.state();
        if state.is_terminal() {
            return Err(KeelError::FailedPrecondition {
                reason: format!("task {} is {}; it takes no checkpoints", req.task_id, state.name()),
            });
        }
        let control = Control::TriggerCheckpoint {
            checkpoint_id: req.checkpoint_id,
            timestamp_ms: req.timestamp_ms,
            is_savepoint: req.is_savepoint,
            drain: req.drain,
        };
        match task.control().try_send(control) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(KeelError::FailedPrecondition {
                reason: format!("task {} has too many pending checkpoint requests", req.task_id),
            }),
            Err(TrySendError::Closed(_)) => Err(KeelError::FailedPrecondition {
                reason: format!("task {} no longer takes checkpoints: its sources have ended", req.task_id),
            }),
        }
    }

    fn notify(&self, req: NotifyCheckpointCompleteRequest) -> Result<()> {
        let task =
            self.task_for_checkpoint(req.jobmanager.as_ref(), &req.task_id, "NotifyCheckpointComplete")?;
        let control = Control::NotifyCheckpointComplete { checkpoint_id: req.checkpoint_id };
        match task.control().try_send(control) {
            Ok(()) => {}
            // Nothing of the task is left to commit.
            Err(TrySendError::Closed(_)) => {
                tracing::debug!(task_id = %req.task_id, checkpoint_id = req.checkpoint_id, "checkpoint complete for a stopped task");
            }
            Err(TrySendError::Full(_)) => {
                return Err(KeelError::FailedPrecondition {
                    reason: format!("task {} has too many pending checkpoint requests", req.task_id),
                })
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl TaskManager for TaskManagerService {
    async fn allocate_slot(
        &self,
        request: Request<AllocateSlotRequest>,
    ) -> Result<Response<AllocateSlotResponse>, Status> {
        self.allocate(request.into_inner())?;
        Ok(Response::new(AllocateSlotResponse {}))
    }

    async fn free_slot(
        &self,
        request: Request<FreeSlotRequest>,
    ) -> Result<Response<FreeSlotResponse>, Status> {
        let freed = self.free(request.into_inner())?;
        Ok(Response::new(FreeSlotResponse { freed }))
    }

    async fn deploy_task(
        &self,
        request: Request<DeployTaskRequest>,
    ) -> Result<Response<DeployTaskResponse>, Status> {
        let req = request.into_inner();
        let task_id = req.task_id.clone();
        if let Err(e) = crate::deploy::deploy(&self.shared, req) {
            tracing::warn!(%task_id, error = %e, "task deployment refused");
            return Err(e.into());
        }
        Ok(Response::new(DeployTaskResponse {}))
    }

    async fn cancel_task(
        &self,
        request: Request<CancelTaskRequest>,
    ) -> Result<Response<CancelTaskResponse>, Status> {
        let req = request.into_inner();
        fenced(&self.shared.jm_fence, req.jobmanager.as_ref(), "CancelTask")?;
        self.shared.note_jm_contact();
        let found = self.shared.cancel_task(&req.task_id, "canceled by the jobmanager");
        Ok(Response::new(CancelTaskResponse { found }))
    }

    async fn trigger_checkpoint(
        &self,
        request: Request<TriggerCheckpointRequest>,
    ) -> Result<Response<TriggerCheckpointResponse>, Status> {
        self.trigger(request.into_inner())?;
        Ok(Response::new(TriggerCheckpointResponse {}))
    }

    async fn notify_checkpoint_complete(
        &self,
        request: Request<NotifyCheckpointCompleteRequest>,
    ) -> Result<Response<NotifyCheckpointCompleteResponse>, Status> {
        self.notify(request.into_inner())?;
        Ok(Response::new(NotifyCheckpointCompleteResponse {}))
    }

    /// The ResourceManager's liveness probe: answered at once, not fenced (it changes nothing).
    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse { taskmanager_id: self.shared.id.clone() }))
    }

    async fn adopt_tasks(
        &self,
        request: Request<AdoptTasksRequest>,
    ) -> Result<Response<AdoptTasksResponse>, Status> {
        let adopted = self.shared.adopt(&request.into_inner())?;
        Ok(Response::new(AdoptTasksResponse { taskmanager_id: self.shared.id.clone(), adopted }))
    }

    type WatchLivenessStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<PingResponse, Status>> + Send + 'static>>;

    /// Sends nothing and ends when this TaskManager starts stopping (so that the server's
    /// graceful shutdown is not held up by it). Its only use is to break when the process dies.
    async fn watch_liveness(
        &self,
        _request: Request<PingRequest>,
    ) -> Result<Response<Self::WatchLivenessStream>, Status> {
        let stopping = self.shared.stopping.clone();
        let stream = futures::StreamExt::take_until(futures::stream::pending(), async move {
            stopping.cancelled_owned().await
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
