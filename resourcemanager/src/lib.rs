//! The ResourceManager: TaskManager registry, heartbeats and the slot table.
//!
//! Layout:
//! - [`slots`]: the slot table, pure logic (allocation spread, release, expiry, rebuild from
//!   reports), unit-tested without a network.
//! - this file: the gRPC service and the leader scope. Every ResourceManager process serves
//!   gRPC; only the elected leader has a [`LeaderState`]. Standbys answer every call with a
//!   typed `NotLeader` error carrying the leader's address. Losing leadership drops the whole
//!   leader state (slot table, pending requests, event streams) rather than demoting in place;
//!   a new leader starts with an empty table and rebuilds it from the TaskManagers, which
//!   re-register when their heartbeat is answered with `known = false`.
//!
//! Failure detection: a TaskManager is lost when its heartbeats stop for `heartbeat.timeout`,
//! or sooner when `heartbeat.rpc-failure-threshold` consecutive calls to it (the leader's
//! `Ping` every `heartbeat.interval`, `AllocateSlot`, `FreeSlot`) could not reach it. Either way
//! its slots leave the table and the JobManagers are told on `WatchTaskManagers`.

pub mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keel_client::detector::{call_peer, lost_reason, RpcFailureDetector, RpcOutcome, Verdict};
use keel_client::{Channels, EpochFence};
use keel_config::Config;
use keel_ha::{HaServices, LeaderInfo, Leadership, Role};
use keel_proto::pb::resource_manager_server::{ResourceManager as RmApi, ResourceManagerServer};
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, task_manager_event, SlotAllocation, TaskManagerEvent};
use keel_proto::{KeelError, Result};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::slots::{Chosen, SlotTable};

/// How long a call from the ResourceManager to a TaskManager may take.
const TM_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the answer to a served slot request is kept for retries of the same request.
const SERVED_RETENTION: Duration = Duration::from_secs(600);

/// Everything only the leader has. Dropped as a whole when leadership is lost.
struct LeaderState {
    leadership: Leadership,
    table: Mutex<SlotTable>,
    changed: Notify,
    events: broadcast::Sender<TaskManagerEvent>,
    jobmanager_fence: EpochFence,
    /// Answers to served requests by request id, so a retried request gets the same slots.
    /// Entries are kept for [`SERVED_RETENTION`].
    served: Mutex<HashMap<String, (Instant, Vec<pb::AllocatedSlot>)>>,
    /// Consecutive calls that could not reach each TaskManager, by address.
    detector: Mutex<RpcFailureDetector>,
    /// The newest JobManager leader epoch seen and when it was first seen here (see
    /// `free_stale_allocations`).
    epoch_first_seen: Mutex<(u64, Instant)>,
    /// When this leadership began.
    since: Instant,
}

impl LeaderState {
    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp(&self) -> pb::LeaderStamp {
        pb::LeaderStamp { epoch: self.leadership.epoch, address: self.leadership.address.clone() }
    }

    fn detector(&self) -> std::sync::MutexGuard<'_, RpcFailureDetector> {
        self.detector.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One ResourceManager process (leader or standby).
pub struct ResourceManager {
    config: Config,
    address: String,
    leader_watch: watch::Receiver<Option<LeaderInfo>>,
    state: RwLock<Option<Arc<LeaderState>>>,
    channels: Channels,
}

impl ResourceManager {
    fn leader_state(&self) -> Result<Arc<LeaderState>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        match state {
            Some(st) if st.leadership.check().is_ok() => Ok(st),
            _ => {
                let leader = self
                    .leader_watch
                    .borrow()
                    .as_ref()
                    .map(|l| l.address.clone())
                    .filter(|a| *a != self.address);
                Err(KeelError::not_leader(Role::ResourceManager.as_str(), leader))
            }
        }
    }

    fn tm_client(&self, address: &str) -> Result<TaskManagerClient<tonic::transport::Channel>> {
        Ok(TaskManagerClient::new(self.channels.get(address)?))
    }

    /// Asks each chosen TaskManager to reserve its slot. All or nothing: on any failure the
    /// reservations that succeeded are undone.
    async fn confirm(&self, st: &LeaderState, chosen: &[Chosen], alloc: &SlotAllocation) -> Result<()> {
        let calls = chosen.iter().map(|c| {
            let allocation = SlotAllocation { allocation_id: c.allocation_id.clone(), ..alloc.clone() };
            let req = pb::AllocateSlotRequest {
                resourcemanager: Some(st.stamp()),
                index: c.index,
                allocation: Some(allocation),
            };
            async move {
                let mut client = self.tm_client(&c.address)?;
                let call = client.allocate_slot(req);
                let (result, outcome) = call_peer(&c.address, "AllocateSlot", TM_CALL_TIMEOUT, call).await;
                self.note_call(st, &c.address, outcome);
                result.map(|_| ())
            }
        });
        let results = futures::future::join_all(calls).await;
        if let Some(err) = results.iter().find_map(|r| r.as_ref().err()).cloned() {
            let now = Instant::now();
            let mut undo = Vec::new();
            for (c, r) in chosen.iter().zip(results.iter()) {
                st.table().free(&c.allocation_id, now);
                if r.is_ok() {
                    undo.push(c.clone());
                }
            }
            self.free_on_taskmanagers(st, &undo).await;
            return Err(err);
        }
        Ok(())
    }

    async fn free_on_taskmanagers(&self, st: &LeaderState, freed: &[Chosen]) {
        let calls = freed.iter().map(|c| {
            let req = pb::FreeSlotRequest {
                resourcemanager: Some(st.stamp()),
                allocation_id: c.allocation_id.clone(),
            };
            async move {
                let result = match self.tm_client(&c.address) {
                    Ok(mut client) => {
                        let call = client.free_slot(req);
                        let (result, outcome) = call_peer(&c.address, "FreeSlot", TM_CALL_TIMEOUT, call).await;
                        self.note_call(st, &c.address, outcome);
                        result.map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                if let Err(error) = result {
                    tracing::warn!(taskmanager_id = %c.taskmanager_id, allocation_id = %c.allocation_id, %error, "free slot on taskmanager failed");
                }
            }
        });
        futures::future::join_all(calls).await;
    }

    async fn request_slots(&self, req: pb::RequestSlotsRequest) -> Result<pb::RequestSlotsResponse> {
        let st = self.leader_state()?;
        let stamp = req.jobmanager.clone().unwrap_or_default();
        st.jobmanager_fence.check(stamp.epoch)?;
        if req.count == 0 {
            return Err(KeelError::InvalidArgument { reason: "slot request for 0 slots".into() });
        }
        if let Some((_, slots)) = st.served.lock().unwrap_or_else(|p| p.into_inner()).get(&req.request_id) {
            return Ok(pb::RequestSlotsResponse { slots: slots.clone() });
        }
        let timeout = if req.timeout_ms > 0 {
            Duration::from_millis(req.timeout_ms)
        } else {
            self.config.slot_request_timeout
        };
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let template = SlotAllocation {
            allocation_id: String::new(),
            job_id: req.job_id.clone(),
            version: req.version,
            jobmanager_epoch: stamp.epoch,
        };
        tracing::info!(job_id = %req.job_id, version = req.version, count = req.count, "slot request");
        loop {
            st.leadership.check()?;
            let notified = st.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let chosen = {
                let mut make = || SlotAllocation {
                    allocation_id: uuid::Uuid::new_v4().simple().to_string(),
                    ..template.clone()
                };
                st.table().allocate(req.count, &mut make, Instant::now())
            };
            if let Some(chosen) = chosen {
                st.leadership.check()?;
                match self.confirm(&st, &chosen, &template).await {
                    Ok(()) => {
                        let slots: Vec<pb::AllocatedSlot> = chosen
                            .iter()
                            .map(|c| pb::AllocatedSlot {
                                slot: Some(pb::SlotId {
                                    taskmanager_id: c.taskmanager_id.clone(),
                                    index: c.index,
                                }),
                                allocation_id: c.allocation_id.clone(),
                                taskmanager_address: c.address.clone(),
                            })
                            .collect();
                        tracing::info!(job_id = %req.job_id, version = req.version, count = req.count,
                            waited_ms = started.elapsed().as_millis() as u64, "slots allocated");
                        let mut served = st.served.lock().unwrap_or_else(|p| p.into_inner());
                        let now = Instant::now();
                        served.retain(|_, (at, _)| now.saturating_duration_since(*at) < SERVED_RETENTION);
                        served.insert(req.request_id.clone(), (now, slots.clone()));
                        return Ok(pb::RequestSlotsResponse { slots });
                    }
                    Err(error) => {
                        tracing::warn!(job_id = %req.job_id, %error, "taskmanager refused slot allocation; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let table = st.table();
                    return Err(KeelError::NotEnoughSlots {
                        job: req.job_id.clone(),
                        needed: req.count,
                        free: table.free_slots() as u32,
                        total: table.total_slots() as u32,
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                _ = st.leadership.lost().cancelled() => {
                    return Err(KeelError::not_leader(Role::ResourceManager.as_str(), None));
                }
            }
        }
    }

    /// Frees, on their TaskManagers, allocations this leader freed or lost that a TaskManager
    /// reported again (it missed the FreeSlot call: see [`slots::SlotTable::take_zombies`]).
    async fn free_zombies(&self, st: &LeaderState) {
        let zombies = st.table().take_zombies();
        if zombies.is_empty() {
            return;
        }
        for z in &zombies {
            tracing::info!(taskmanager_id = %z.taskmanager_id, slot = z.index, allocation_id = %z.allocation_id,
                "a taskmanager reported an allocation that was freed or lost here; freeing it there");
        }
        self.free_on_taskmanagers(st, &zombies).await;
    }

    /// Frees allocations made for a JobManager leader older than the newest one seen (see
    /// [`slots::SlotTable::allocations_below_epoch`]), here and on their TaskManagers.
    ///
    /// Not before twice `heartbeat.timeout` after the newer leader was first seen: that leader
    /// may adopt the tasks running in them (within its adoption window, `heartbeat.timeout`),
    /// which stamps the allocations with its epoch on the TaskManagers, and here with their
    /// next heartbeat.
    async fn free_stale_allocations(&self, st: &LeaderState) {
        let seen = st.jobmanager_fence.seen();
        {
            let mut first_seen = st.epoch_first_seen.lock().unwrap_or_else(|p| p.into_inner());
            if !stale_allocations_due(
                &mut first_seen,
                seen,
                Instant::now(),
                self.config.heartbeat_timeout * 2,
            ) {
                return;
            }
        }
        let stale = st.table().allocations_below_epoch(seen);
        if stale.is_empty() {
            return;
        }
        let now = Instant::now();
        let freed: Vec<Chosen> = stale.iter().filter_map(|id| st.table().free(id, now)).collect();
        tracing::info!(
            freed = freed.len(),
            jobmanager_epoch = seen,
            "freed slots allocated for an older jobmanager leader"
        );
        self.free_on_taskmanagers(st, &freed).await;
        st.changed.notify_waiters();
    }

    async fn release_slots(&self, req: pb::ReleaseSlotsRequest) -> Result<pb::ReleaseSlotsResponse> {
        let st = self.leader_state()?;
        st.jobmanager_fence.check(req.jobmanager.as_ref().map(|s| s.epoch).unwrap_or(0))?;
        let mut ids = req.allocation_ids.clone();
        if !req.job_id.is_empty() {
            ids.extend(st.table().allocations_of(&req.job_id, req.version));
        }
        let now = Instant::now();
        let freed: Vec<Chosen> = ids.iter().filter_map(|id| st.table().free(id, now)).collect();
        self.free_on_taskmanagers(&st, &freed).await;
        st.changed.notify_waiters();
        tracing::info!(job_id = %req.job_id, released = freed.len(), "slots released");
        Ok(pb::ReleaseSlotsResponse { released: freed.len() as u32 })
    }

    /// Records how a call to the TaskManager at `address` went; declares it lost when
    /// `heartbeat.rpc-failure-threshold` consecutive calls could not reach it.
    fn note_call(&self, st: &LeaderState, address: &str, outcome: RpcOutcome) {
        let verdict = st.detector().record(address, outcome);
        match verdict {
            Verdict::Reachable => {}
            Verdict::Failing { consecutive } => {
                tracing::info!(%address, consecutive, threshold = ?self.config.heartbeat_rpc_failure_threshold,
                    "a call could not reach the taskmanager");
            }
            Verdict::Lost { consecutive } => {
                let reason = lost_reason(consecutive, address);
                let ids: Vec<String> = st
                    .table()
                    .taskmanagers()
                    .filter(|tm| tm.address == address)
                    .map(|tm| tm.id.clone())
                    .collect();
                for id in ids {
                    let removed = st.table().remove(&id);
                    if let Some(lost) = removed {
                        self.lose(st, lost, &reason);
                    }
                }
            }
        }
    }

    /// Pings every registered TaskManager each `heartbeat.interval` (Flink's heartbeat
    /// requests), so that a dead one is found by `heartbeat.rpc-failure-threshold` refused
    /// connections, before its heartbeats time out. Off when the threshold is -1.
    async fn probe_taskmanagers(self: Arc<Self>, st: Arc<LeaderState>, shutdown: CancellationToken) {
        if self.config.heartbeat_rpc_failure_threshold.is_none() {
            return;
        }
        let period = self.config.heartbeat_interval;
        // After a ping that could not reach a TaskManager the next round comes this soon, so a
        // killed TaskManager is confirmed lost within a fraction of an interval of the first
        // refused ping instead of a whole interval later. A refused connection is conclusive (no
        // process listens), so waiting longer confirms nothing more; 25 ms at the default
        // interval (it was 100 ms: most of the time from kill -9 to the loss).
        let confirm = (period / 40).clamp(Duration::from_millis(10), Duration::from_millis(25));
        let mut next = tokio::time::Instant::now() + period;
        // One `WatchLiveness` stream per TaskManager address: when one breaks, ping at once.
        let mut watches = LivenessWatches::default();
        let (broken_tx, mut broken_rx) = mpsc::unbounded_channel::<String>();
        loop {
            // Enabled before the table is read, so that a registration right after the read
            // still wakes this loop (`notify_waiters` only wakes enabled waiters).
            let changed = st.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let targets: Vec<String> = st.table().taskmanagers().map(|tm| tm.address.clone()).collect();
            watches.0.retain(|address, handle| {
                let keep = targets.contains(address) && !handle.is_finished();
                if !keep {
                    handle.abort();
                }
                keep
            });
            for address in &targets {
                if !watches.0.contains_key(address) {
                    let watch = self.clone().watch_liveness(st.clone(), address.clone(), broken_tx.clone());
                    watches.0.insert(address.clone(), tokio::spawn(watch));
                }
            }
            let broke = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = st.leadership.lost().cancelled() => return,
                Some(address) = broken_rx.recv() => {
                    tracing::debug!(%address, "liveness stream broke; pinging now");
                    Some(address)
                }
                _ = tokio::time::sleep_until(next) => None,
                // A TaskManager that registered since the last round gets its watch now.
                _ = &mut changed => continue,
            };
            next = tokio::time::Instant::now() + period;
            let targets: Vec<String> = st.table().taskmanagers().map(|tm| tm.address.clone()).collect();
            let pings = targets.iter().map(|address| {
                let st = &st;
                let this = &self;
                async move {
                    let outcome = match this.tm_client(address) {
                        Ok(mut client) => {
                            let call = client.ping(pb::PingRequest { resourcemanager: Some(st.stamp()) });
                            call_peer(address, "Ping", period, call).await.1
                        }
                        Err(_) => RpcOutcome::Inconclusive,
                    };
                    (address, outcome)
                }
            });
            let outcomes = tokio::select! {
                _ = st.leadership.lost().cancelled() => return,
                o = futures::future::join_all(pings) => o,
            };
            if st.leadership.check().is_err() {
                return;
            }
            for (address, outcome) in outcomes {
                // A ping right after the stream broke may go out on the dying connection and be
                // cut short (canceled: inconclusive) instead of refused; it is tried again as
                // soon as a refused one, not a whole interval later.
                let cut_short = outcome == RpcOutcome::Inconclusive && broke.as_deref() == Some(address);
                if cut_short {
                    tracing::debug!(%address, "the ping after the liveness stream broke was cut short; pinging again soon");
                }
                if outcome == RpcOutcome::Unreachable || cut_short {
                    next = tokio::time::Instant::now() + confirm;
                }
                self.note_call(&st, address, outcome);
            }
        }
    }

    /// Holds the `WatchLiveness` stream of the TaskManager at `address` open and tells the
    /// prober when it breaks (the process died, or it is stopping). A stream that broke is
    /// opened again at most once per `heartbeat.interval`: the task lives at least that long
    /// after it opened.
    async fn watch_liveness(
        self: Arc<Self>,
        st: Arc<LeaderState>,
        address: String,
        broken: mpsc::UnboundedSender<String>,
    ) {
        let period = self.config.heartbeat_interval;
        // Until it opens (the TaskManager may not serve yet, or be unreachable: then the pings
        // decide), tried again every 200 ms at most; the prober aborts this task when the
        // TaskManager leaves the table.
        let (opened_at, mut stream) = loop {
            let opened_at = tokio::time::Instant::now();
            if let Ok(mut client) = self.tm_client(&address) {
                let open = client.watch_liveness(pb::PingRequest { resourcemanager: Some(st.stamp()) });
                if let Ok(Ok(response)) = tokio::time::timeout(period, open).await {
                    break (opened_at, response.into_inner());
                }
            }
            tokio::time::sleep_until(opened_at + period.min(Duration::from_millis(200))).await;
        };
        while let Ok(Some(_)) = stream.message().await {}
        if !st.leadership.lost().is_cancelled() {
            let _ = broken.send(address);
        }
        tokio::time::sleep_until(opened_at + period).await;
    }

    fn lose(&self, st: &LeaderState, lost: slots::Lost, reason: &str) {
        if let Err(error) = st.leadership.check() {
            tracing::info!(taskmanager_id = %lost.taskmanager_id, %error, "not telling a loss: no longer leader");
            return;
        }
        tracing::warn!(taskmanager_id = %lost.taskmanager_id, address = %lost.address,
            allocations = lost.allocations.len(), reason, "taskmanager lost");
        self.channels.forget(&lost.address);
        st.detector().forget(&lost.address);
        let _ = st.events.send(TaskManagerEvent {
            event: Some(task_manager_event::Event::Lost(pb::TaskManagerLost {
                taskmanager_id: lost.taskmanager_id,
                address: lost.address,
                reason: reason.to_string(),
                allocations: lost.allocations,
            })),
        });
        st.changed.notify_waiters();
    }

    /// Leader work besides answering calls: expiring TaskManagers that stopped heartbeating.
    async fn lead(&self, st: Arc<LeaderState>, shutdown: &CancellationToken) {
        let tick = (self.config.heartbeat_interval / 2).max(Duration::from_millis(50));
        let mut interval = tokio::time::interval(tick);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = st.leadership.lost().cancelled() => return,
                _ = interval.tick() => {
                    // A leader resumed after a pause past its lease must not declare anything
                    // lost: its heartbeat view is stale, and it is no leader any more.
                    if st.leadership.check().is_err() {
                        return;
                    }
                    let expired = st.table().expire(self.config.heartbeat_timeout, Instant::now());
                    for lost in expired {
                        let reason = format!("no heartbeat for {:?} (heartbeat.timeout)", self.config.heartbeat_timeout);
                        self.lose(&st, lost, &reason);
                    }
                }
            }
        }
    }

    /// One leadership: a fresh leader state (empty slot table, rebuilt from the TaskManagers'
    /// re-registrations) that lives until leadership is lost or shutdown.
    async fn lead_once(self: Arc<Self>, leadership: Leadership, shutdown: CancellationToken) {
        let (events, _) = broadcast::channel(1024);
        let st = Arc::new(LeaderState {
            leadership,
            table: Mutex::new(SlotTable::new()),
            changed: Notify::new(),
            events,
            jobmanager_fence: EpochFence::new(Role::JobManager),
            served: Mutex::new(HashMap::new()),
            detector: Mutex::new(RpcFailureDetector::new(self.config.heartbeat_rpc_failure_threshold)),
            epoch_first_seen: Mutex::new((0, Instant::now())),
            since: Instant::now(),
        });
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Some(st.clone());
        let prober = tokio::spawn(self.clone().probe_taskmanagers(st.clone(), shutdown.clone()));
        self.lead(st, &shutdown).await;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = None;
        prober.abort();
    }
}

/// The prober's open `WatchLiveness` streams by TaskManager address; aborted when the prober
/// stops (leadership lost, shutdown).
#[derive(Default)]
struct LivenessWatches(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for LivenessWatches {
    fn drop(&mut self) {
        for handle in self.0.values() {
            handle.abort();
        }
    }
}

struct RmService(Arc<ResourceManager>);

type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<TaskManagerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RmApi for RmService {
    async fn register_task_manager(
        &self,
        request: Request<pb::RegisterTaskManagerRequest>,
    ) -> std::result::Result<Response<pb::RegisterTaskManagerResponse>, Status> {
        let rm = &self.0;
        let st = rm.leader_state()?;
        let req = request.into_inner();
        if req.taskmanager_id.is_empty() || req.address.is_empty() {
            return Err(KeelError::InvalidArgument {
                reason: "taskmanager registration needs an id and an address".into(),
            }
            .into());
        }
        // A TaskManager restarted on the same address under a new id replaces the old one.
        let stale: Vec<String> = st
            .table()
            .taskmanagers()
            .filter(|tm| tm.address == req.address && tm.id != req.taskmanager_id)
            .map(|tm| tm.id.clone())
            .collect();
        for id in stale {
            if let Some(lost) = st.table().remove(&id) {
                rm.lose(&st, lost, "replaced by a new taskmanager on the same address");
            }
        }
        let known_before = st.table().get(&req.taskmanager_id).is_some();
        st.detector().forget(&req.address);
        st.table().register(
            &req.taskmanager_id,
            &req.address,
            req.num_slots,
            &req.slots,
            req.memory_rss_bytes,
            Instant::now(),
        );
        tracing::info!(taskmanager_id = %req.taskmanager_id, address = %req.address,
            slots = req.num_slots, reregistered = known_before, "taskmanager registered");
        let _ = st.events.send(TaskManagerEvent {
            event: Some(task_manager_event::Event::Registered(pb::TaskManagerRegistered {
                taskmanager_id: req.taskmanager_id,
                address: req.address,
                num_slots: req.num_slots,
            })),
        });
        st.changed.notify_waiters();
        rm.free_zombies(&st).await;
        rm.free_stale_allocations(&st).await;
        Ok(Response::new(pb::RegisterTaskManagerResponse { resourcemanager_epoch: st.leadership.epoch }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::TaskManagerHeartbeatRequest>,
    ) -> std::result::Result<Response<pb::TaskManagerHeartbeatResponse>, Status> {
        let st = self.0.leader_state()?;
        let req = request.into_inner();
        let (known, free_before, free_after) = {
            let mut table = st.table();
            let before = table.free_slots();
            let known =
                table.heartbeat(&req.taskmanager_id, &req.slots, req.memory_rss_bytes, Instant::now());
            (known, before, table.free_slots())
        };
        if free_after > free_before {
            st.changed.notify_waiters();
        }
        self.0.free_zombies(&st).await;
        self.0.free_stale_allocations(&st).await;
        Ok(Response::new(pb::TaskManagerHeartbeatResponse {
            known,
            resourcemanager_epoch: st.leadership.epoch,
        }))
    }

    async fn request_slots(
        &self,
        request: Request<pb::RequestSlotsRequest>,
    ) -> std::result::Result<Response<pb::RequestSlotsResponse>, Status> {
        Ok(Response::new(self.0.request_slots(request.into_inner()).await?))
    }

    async fn release_slots(
        &self,
        request: Request<pb::ReleaseSlotsRequest>,
    ) -> std::result::Result<Response<pb::ReleaseSlotsResponse>, Status> {
        Ok(Response::new(self.0.release_slots(request.into_inner()).await?))
    }

    type WatchTaskManagersStream = EventStream;

    async fn watch_task_managers(
        &self,
        request: Request<pb::WatchTaskManagersRequest>,
    ) -> std::result::Result<Response<Self::WatchTaskManagersStream>, Status> {
        let st = self.0.leader_state()?;
        let req = request.into_inner();
        st.jobmanager_fence.check(req.jobmanager.as_ref().map(|s| s.epoch).unwrap_or(0))?;
        let lost = st.leadership.lost().clone();
        let events = tokio_stream::wrappers::BroadcastStream::new(st.events.subscribe())
            .filter_map(|item| item.ok().map(Ok));
        // The stream ends with the leadership, so the JobManager re-subscribes to the new leader.
        let stream = futures::StreamExt::take_until(events, async move { lost.cancelled_owned().await });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn deregister_task_manager(
        &self,
        request: Request<pb::DeregisterTaskManagerRequest>,
    ) -> std::result::Result<Response<pb::DeregisterTaskManagerResponse>, Status> {
        let rm = &self.0;
        let st = rm.leader_state()?;
        let req = request.into_inner();
        // Only the registration at that address: a TaskManager restarted under the same id
        // elsewhere is not dropped by the old process leaving.
        let registered = st.table().get(&req.taskmanager_id).is_some_and(|tm| tm.address == req.address);
        let removed = if registered { st.table().remove(&req.taskmanager_id) } else { None };
        let known = removed.is_some();
        if let Some(lost) = removed {
            rm.lose(&st, lost, &format!("deregistered: {}", req.reason));
        }
        tracing::info!(taskmanager_id = %req.taskmanager_id, address = %req.address, known, reason = %req.reason,
            "taskmanager deregistered");
        Ok(Response::new(pb::DeregisterTaskManagerResponse { known }))
    }

    async fn cluster_overview(
        &self,
        _request: Request<pb::ClusterOverviewRequest>,
    ) -> std::result::Result<Response<pb::ClusterOverviewResponse>, Status> {
        let st = self.0.leader_state()?;
        let now = Instant::now();
        let table = st.table();
        let taskmanagers = table
            .taskmanagers()
            .map(|tm| pb::TaskManagerInfo {
                taskmanager_id: tm.id.clone(),
                address: tm.address.clone(),
                num_slots: tm.slots.len() as u32,
                free_slots: tm.free_slots() as u32,
                last_heartbeat_ms_ago: now.saturating_duration_since(tm.last_heartbeat).as_millis() as u64,
                memory_rss_bytes: tm.memory_rss_bytes,
                slots: tm
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| pb::SlotStatus {
                        index: i as u32,
                        allocation: s.allocation.clone(),
                        task_id: s.task_id.clone(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ClusterOverviewResponse {
            resourcemanager_epoch: st.leadership.epoch,
            resourcemanager_address: self.0.address.clone(),
            taskmanagers,
            slots_total: table.total_slots() as u32,
            slots_free: table.free_slots() as u32,
            pending_slot_requests: 0,
            leader_for_ms: now.saturating_duration_since(st.since).as_millis() as u64,
        }))
    }
}

/// Whether slots allocated for JobManager leaders older than `seen` (the newest epoch seen) may
/// be freed at `now`: only once `seen` has been the newest for `grace`. `first_seen` is the
/// newest epoch and when it was first seen; a newer one restarts the clock.
fn stale_allocations_due(first_seen: &mut (u64, Instant), seen: u64, now: Instant, grace: Duration) -> bool {
    if first_seen.0 != seen {
        *first_seen = (seen, now);
    }
    now.saturating_duration_since(first_seen.1) >= grace
}

/// Runs a ResourceManager process until `shutdown`: serves gRPC at once and campaigns for
/// leadership; prints `keel resourcemanager listening on <address>` when the port is bound.
pub async fn run(config: Config, ha: Arc<dyn HaServices>, shutdown: CancellationToken) -> Result<()> {
    let rpc = config.resourcemanager_rpc.clone();
    let (incoming, address) = keel_client::bind(&rpc.host, rpc.port).await?;
    println!("keel resourcemanager listening on {address}");
    tracing::info!(%address, ha = ha.backend_name(), "resourcemanager started");
    let rm = Arc::new(ResourceManager {
        leader_watch: ha.watch_leader(Role::ResourceManager, shutdown.clone()),
        config,
        address,
        state: RwLock::new(None),
        channels: Channels::default(),
    });
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ResourceManagerServer::new(RmService(rm.clone())))
            .serve_with_incoming_shutdown(incoming, async move { server_shutdown.cancelled().await }),
    );
    let address = rm.address.clone();
    keel_ha::run_for_leadership(ha, Role::ResourceManager, address, shutdown.clone(), |leadership| {
        rm.clone().lead_once(leadership, shutdown.clone())
    })
    .await;
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(KeelError::internal(format!("resourcemanager server: {e}"))),
        Err(e) => Err(KeelError::internal(format!("resourcemanager server task: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grace before an older JobManager leader's slots are freed: not before the newest
    /// epoch has been seen for the grace (the new leader may still adopt the tasks in them), and
    /// a leader newer still restarts the clock.
    #[test]
    fn older_leaders_slots_are_freed_only_after_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut first_seen = (0, t0);
        assert!(!stale_allocations_due(&mut first_seen, 5, t0, grace), "epoch 5 just seen");
        assert!(!stale_allocations_due(&mut first_seen, 5, t0 + Duration::from_millis(9_999), grace));
        assert!(stale_allocations_due(&mut first_seen, 5, t0 + grace, grace));
        let t1 = t0 + Duration::from_secs(12);
        assert!(!stale_allocations_due(&mut first_seen, 6, t1, grace), "a newer leader restarts the clock");
        assert!(!stale_allocations_due(&mut first_seen, 6, t1 + Duration::from_secs(9), grace));
        assert!(stale_allocations_due(&mut first_seen, 6, t1 + grace, grace));
    }
}
