//! The leader scope and its lead loop. [`JobManager`] is one JobManager process, leader or
//! standby: only while it leads does it have a [`LeaderState`]. One leadership
//! ([`JobManager::lead_once`]) recovers every job from the HA store and starts its driver, then
//! follows TaskManager losses (the ResourceManager's events and missed heartbeats) until
//! leadership ends, and waits for every driver to stop.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use keel_ha::{Leadership, Role};
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::{self, task_manager_event};
use keel_proto::{KeelError, Result, TaskStateExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::driver::Driver;
use crate::record::JobRecord;
use crate::state::{JobHandle, JobManagerCtx, LeaderState};

/// One JobManager process (leader or standby).
pub struct JobManager {
    pub(crate) ctx: Arc<JobManagerCtx>,
    pub(crate) state: RwLock<Option<Arc<LeaderState>>>,
}

impl JobManager {
    /// The leader scope, if this process leads; otherwise a typed `NotLeader` error naming
    /// the leader's address, if known.
    pub(crate) fn leader_state(&self) -> Result<Arc<LeaderState>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        match state {
            Some(st) if st.leadership.check().is_ok() => Ok(st),
            _ => {
                let leader = self
                    .ctx
                    .leader_watch
                    .borrow()
                    .as_ref()
                    .map(|l| l.address.clone())
                    .filter(|a| *a != self.ctx.address);
                Err(KeelError::not_leader(Role::JobManager.as_str(), leader))
            }
        }
    }

    /// Starts the driver of a job. `recovered`: the job comes from the HA store at the start of
    /// a leadership, so its tasks may still run and be adopted.
    pub(crate) fn spawn_driver(
        &self,
        st: &Arc<LeaderState>,
        record: JobRecord,
        recovered: bool,
    ) -> Arc<JobHandle> {
        let (tx, rx) = mpsc::unbounded_channel();
        let terminal = record.state.is_terminal();
        let handle = Arc::new(JobHandle::new(record, tx, recovered && !terminal));
        st.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(handle.job_id.clone(), handle.clone());
        if !terminal {
            let driver = Driver {
                ctx: self.ctx.clone(),
                st: st.clone(),
                job: handle.clone(),
                events: rx,
                preallocated: None,
                progress: None,
                checkpoints_dir: self.ctx.config.checkpointing.dir.clone(),
                recovered,
            };
            st.drivers.spawn(driver.run());
        }
        handle
    }

    /// The leader scope: recover jobs, follow TaskManager losses, until leadership ends.
    async fn lead(&self, st: Arc<LeaderState>, shutdown: &CancellationToken) {
        // Recover every job from the HA store.
        let records = loop {
            match self.ctx.jobs.list::<JobRecord>().await {
                Ok(r) => break r,
                Err(error) => {
                    tracing::warn!(%error, "cannot read jobs from the HA store; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = st.leadership.lost().cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let live = records.iter().filter(|r| !r.state.is_terminal()).count();
        tracing::info!(
            jobs = records.len(),
            live,
            epoch = st.leadership.epoch,
            "recovered jobs from the HA store"
        );
        for record in records {
            self.spawn_driver(&st, record, true);
        }
        st.jobs_loaded.store(true, std::sync::atomic::Ordering::SeqCst);

        let scope = st.leadership.lost().child_token();
        let watcher = tokio::spawn(watch_rm_events(self.ctx.clone(), st.clone(), scope.clone()));
        let tick = (self.ctx.config.heartbeat_interval / 2).max(Duration::from_millis(50));
        let mut interval = tokio::time::interval(tick);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = st.leadership.lost().cancelled() => break,
                _ = interval.tick() => self.expire_taskmanagers(&st),
            }
        }
        scope.cancel();
        let _ = watcher.await;
    }

    /// Declares lost the TaskManagers running our tasks that stopped heartbeating to us, in case
    /// the ResourceManager could not tell (for instance while it fails over itself).
    fn expire_taskmanagers(&self, st: &LeaderState) {
        // A leader resumed after a pause past its lease has a stale view: it acts on nothing.
        if st.leadership.check().is_err() {
            return;
        }
        let timeout = self.ctx.config.heartbeat_timeout;
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut tms = st.taskmanagers.lock().unwrap_or_else(|p| p.into_inner());
            let expired: Vec<String> = tms
                .iter()
                .filter(|(_, (seen, _))| now.saturating_duration_since(*seen) > timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                tms.remove(id);
            }
            expired
        };
        for id in expired {
            let busy = st
                .jobs()
                .iter()
                .any(|j| j.tasks().iter().any(|t| t.taskmanager_id == id && !t.state.is_terminal()));
            if busy {
                tracing::warn!(taskmanager_id = %id, "taskmanager stopped heartbeating to the jobmanager");
                st.dispatch_taskmanager_lost(
                    &id,
                    &format!("no heartbeat for {timeout:?} (heartbeat.timeout)"),
                );
            }
        }
    }

    /// One leadership: recover the jobs and lead until leadership is lost or shutdown; then wait
    /// for every driver to stop (they stop when leadership ends) before standing by again.
    pub(crate) async fn lead_once(self: Arc<Self>, leadership: Leadership, shutdown: CancellationToken) {
        let st = Arc::new(LeaderState::new(
            leadership.clone(),
            self.ctx.config.heartbeat_timeout,
            self.ctx.config.heartbeat_rpc_failure_threshold,
        ));
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Some(st.clone());
        self.lead(st.clone(), &shutdown).await;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = None;
        // Drivers end with the leadership; on shutdown the leadership is given up here so that
        // they stop before the lease is handed back.
        leadership.give_up();
        st.drivers.close();
        st.drivers.wait().await;
    }
}

/// Follows the ResourceManager's TaskManager events for the whole leader scope, re-subscribing
/// when the stream ends (for instance when the ResourceManager fails over).
async fn watch_rm_events(ctx: Arc<JobManagerCtx>, st: Arc<LeaderState>, scope: CancellationToken) {
    use tokio_stream::StreamExt;
    // A new ResourceManager leader means a new subscription at once: the old stream may hang
    // on a stopped process until HTTP/2 gives up.
    let mut rm_leader = ctx.rm.leader_watch();
    while !scope.is_cancelled() {
        if let Some(w) = rm_leader.as_mut() {
            w.borrow_and_update();
        }
        let req = pb::WatchTaskManagersRequest { jobmanager: Some(st.stamp()) };
        let stream = tokio::select! {
            _ = scope.cancelled() => return,
            r = ctx.rm.call(|ch| {
                let req = req.clone();
                async move { ResourceManagerClient::new(ch).watch_task_managers(req).await.map(|r| r.into_inner()) }
            }) => r,
        };
        match stream {
            Ok(mut stream) => loop {
                let item = tokio::select! {
                    _ = scope.cancelled() => return,
                    _ = async {
                        match rm_leader.as_mut() {
                            Some(w) => {
                                if w.changed().await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                            }
                            None => std::future::pending::<()>().await,
                        }
                    } => {
                        tracing::info!("resourcemanager leader changed; subscribing to the new one");
                        break;
                    }
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(pb::TaskManagerEvent { event: Some(task_manager_event::Event::Lost(lost)) })) => {
                        // A deposed leader acts on nothing.
                        if st.leadership.check().is_err() {
                            return;
                        }
                        st.dispatch_taskmanager_lost(&lost.taskmanager_id, &lost.reason);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(status)) => {
                        tracing::debug!(%status, "taskmanager event stream ended");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => tracing::debug!(%error, "cannot subscribe to taskmanager events"),
        }
        tokio::select! {
            _ = scope.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
