//! Talking to the JobManager leader: task state reports, checkpoint acknowledgements and the
//! periodic heartbeat listing every task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_client::LeaderClient;
use keel_proto::pb::job_manager_client::JobManagerClient;
use keel_proto::pb::{AcknowledgeCheckpointRequest, JobManagerHeartbeatRequest};
use keel_proto::TaskStateExt;
use tokio::sync::mpsc;

use crate::failure_log::FailureLog;
use crate::shared::Shared;
use crate::task::{Ack, Task};

/// How long one checkpoint acknowledgement is retried; the coordinator times the checkpoint
/// out anyway after that.
const ACK_RETRY: Duration = Duration::from_secs(10);
const MAX_REPORT_BACKOFF: Duration = Duration::from_secs(2);

/// Reports every state change of `task` to the JobManager leader (`UpdateTaskState`). A report
/// is retried until it is delivered or superseded by a newer state; the terminal state is
/// retried until delivered, until the task is forgotten or the shutdown drain ends. A
/// JobManager that does not know the task (`known = false`) gets it canceled.
pub async fn report_states(shared: Arc<Shared>, task: Arc<Task>, client: LeaderClient) {
    let mut states = task.subscribe();
    let mut failures = FailureLog::default();
    'states: loop {
        let status = states.borrow_and_update().clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let update = task.update(&shared.id);
            let result = client
                .call(|channel| {
                    let update = update.clone();
                    async move { JobManagerClient::new(channel).update_task_state(update).await }
                })
                .await;
            match result {
                Ok(response) => {
                    failures.success("task state delivered to the jobmanager");
                    tracing::debug!(state = status.state.name(), "task state reported");
                    if !response.into_inner().known {
                        task.cancel("the jobmanager does not know the task");
                    }
                    break;
                }
                Err(e) => {
                    let leader = client.known_leader().map(|l| l.address);
                    failures.failure(|| {
                        tracing::warn!(
                            error = %e,
                            jobmanager = leader.as_deref().unwrap_or("unknown"),
                            state = status.state.name(),
                            "cannot report task state to the jobmanager; retrying"
                        )
                    });
                    tokio::select! {
                        biased;
                        _ = shared.reporters_stop.cancelled() => return,
                        _ = task.forgotten().cancelled() => return,
                        changed = states.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            // Superseded by a newer state: report that one instead.
                            continue 'states;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_REPORT_BACKOFF);
                }
            }
        }
        if status.state.is_terminal() {
            return;
        }
        tokio::select! {
            biased;
            _ = shared.reporters_stop.cancelled() => return,
            _ = task.forgotten().cancelled() => return,
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the checkpoint acknowledgements of `task`, in order, until its chain stops.
pub async fn send_acks(
    shared: Arc<Shared>,
    task: Arc<Task>,
    client: LeaderClient,
    mut acks: mpsc::UnboundedReceiver<Ack>,
) {
    let client = client.with_retry_for(ACK_RETRY);
    loop {
        let ack = tokio::select! {
            biased;
            _ = shared.reporters_stop.cancelled() => return,
            ack = acks.recv() => match ack {
                Some(ack) => ack,
                None => return,
            },
        };
        let request = AcknowledgeCheckpointRequest {
            task_id: task.info.task_id.clone(),
            job_id: task.info.job_id.clone(),
            version: task.info.version,
            checkpoint_id: ack.checkpoint_id,
            state_size: ack.state.len() as u64,
            state_handle: ack.state,
        };
        let result = tokio::select! {
            biased;
            _ = shared.reporters_stop.cancelled() => return,
            r = client.call(|channel| {
                let request = request.clone();
                async move { JobManagerClient::new(channel).acknowledge_checkpoint(request).await }
            }) => r,
        };
        match result {
            Ok(_) => tracing::info!(
                checkpoint_id = request.checkpoint_id,
                state_size = request.state_size,
                "checkpoint acknowledged"
            ),
            Err(e) => tracing::warn!(
                checkpoint_id = request.checkpoint_id,
                error = %e,
                jobmanager = client.known_leader().map(|l| l.address).as_deref().unwrap_or("unknown"),
                "cannot acknowledge checkpoint to the jobmanager"
            ),
        }
    }
}

/// The cut-off: a TaskManager that no JobManager leader has answered for `heartbeat.timeout`
/// cancels every task it runs. The leader declares it lost after the same time without its
/// heartbeats (which it received no earlier than this TaskManager's last answered one) and
/// deploys its tasks elsewhere only after its restart strategy's pause, so the old attempt
/// stops first and two attempts never write at once. Checked four times a heartbeat interval
/// (at most every 250 ms), on its own: not in the heartbeat loop, whose call may hang.
pub async fn cut_off_watchdog(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let tick = (shared.heartbeat_interval / 4).min(Duration::from_millis(250));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let silent = shared.since_jm_contact();
        if silent <= shared.cut_off_after {
            continue;
        }
        let running = shared
            .lock()
            .tasks
            .values()
            .any(|t| !t.state().is_terminal() && !t.cancel_token().is_cancelled());
        if running {
            tracing::warn!(
                cut_off_for_ms = silent.as_millis() as u64,
                "no jobmanager leader heard from for heartbeat.timeout: canceling every task"
            );
            shared.cancel_all("cut off from the jobmanager for longer than heartbeat.timeout");
        }
        shared.note_jm_contact();
    }
}

/// Every heartbeat interval: forgets long-terminal tasks, sends the JobManager leader the list
/// of tasks, and cancels the ones it does not know.
pub async fn heartbeat_loop(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut ticker = tokio::time::interval(shared.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = FailureLog::default();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        shared.forget_old_tasks(Instant::now());
        let tasks = shared.task_updates();
        if tasks.is_empty() {
            shared.note_jm_contact();
            continue;
        }
        let client = shared.jm_client(None);
        let request = JobManagerHeartbeatRequest {
            taskmanager_id: shared.id.clone(),
            address: shared.address.clone(),
            tasks,
        };
        // Bounded: a call to a JobManager that a partition cut off gets no answer and no error
        // (its packets are dropped) until the HTTP/2 keep-alive gives up, and this loop must
        // come round to the cut-off check above meanwhile.
        let call = client.call(|channel| {
            let request = request.clone();
            async move { JobManagerClient::new(channel).task_manager_heartbeat(request).await }
        });
        let timeout = shared.heartbeat_interval.max(Duration::from_millis(100));
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(timeout, call) => r.unwrap_or_else(|_| {
                Err(keel_proto::KeelError::unavailable(
                    client.known_leader().map(|l| l.address).as_deref().unwrap_or("the jobmanager leader"),
                    format!("heartbeat not answered within {timeout:?}"),
                ))
            }),
        };
        match result {
            Ok(response) => {
                shared.note_jm_contact();
                failures.success("jobmanager heartbeat delivered again");
                for task_id in response.into_inner().cancel_task_ids {
                    shared.cancel_task(&task_id, "the jobmanager does not know the task");
                }
            }
            Err(e) => {
                let leader = client.known_leader().map(|l| l.address);
                failures.failure(|| {
                    tracing::warn!(
                        error = %e,
                        jobmanager = leader.as_deref().unwrap_or("unknown"),
                        "cannot send heartbeat to the jobmanager; retrying"
                    )
                });
            }
        }
    }
}
