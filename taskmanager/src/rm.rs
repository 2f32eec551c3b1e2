//! Following the ResourceManager leader: register with the full slot report when starting and
//! whenever the leader changes, heartbeat with the slot report every interval, and register
//! again when the leader no longer knows this TaskManager. Failures are logged and retried;
//! they never stop the TaskManager.

use std::sync::Arc;
use std::time::Duration;

use keel_client::LeaderClient;
use keel_ha::LeaderInfo;
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::{DeregisterTaskManagerRequest, RegisterTaskManagerRequest, TaskManagerHeartbeatRequest};
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::failure_log::FailureLog;
use crate::shared::Shared;

/// Resident memory of this process in bytes, from `/proc/self/status` (0 when unknown).
pub fn memory_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Waits for the next change of the leader watch; never returns when there is no watch.
async fn leader_changed(watch: &mut Option<watch::Receiver<Option<LeaderInfo>>>) {
    let alive = match watch.as_mut() {
        Some(rx) => rx.changed().await.is_ok(),
        None => false,
    };
    if !alive {
        *watch = None;
        std::future::pending::<()>().await;
    }
}

enum Outcome {
    Registered(u64),
    Known(u64),
    Unknown,
}

async fn register(shared: &Shared, client: &LeaderClient) -> Result<Outcome> {
    let request = RegisterTaskManagerRequest {
        taskmanager_id: shared.id.clone(),
        address: shared.address.clone(),
        num_slots: shared.num_slots,
        slots: shared.slot_report(),
        memory_rss_bytes: memory_rss_bytes(),
    };
    let response = client
        .call(|channel| {
            let request = request.clone();
            async move { ResourceManagerClient::new(channel).register_task_manager(request).await }
        })
        .await?;
    Ok(Outcome::Registered(response.into_inner().resourcemanager_epoch))
}

async fn heartbeat(shared: &Shared, client: &LeaderClient) -> Result<Outcome> {
    let request = TaskManagerHeartbeatRequest {
        taskmanager_id: shared.id.clone(),
        slots: shared.slot_report(),
        memory_rss_bytes: memory_rss_bytes(),
    };
    let response = client
        .call(|channel| {
            let request = request.clone();
            async move { ResourceManagerClient::new(channel).heartbeat(request).await }
        })
        .await?
        .into_inner();
    Ok(if response.known { Outcome::Known(response.resourcemanager_epoch) } else { Outcome::Unknown })
}

/// How long a TaskManager that shuts down tries to deregister before it goes on stopping.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Tells the ResourceManager leader that this TaskManager leaves (at shutdown, before its tasks
/// are canceled), so that it is dropped from the slot table and its jobs are told at once.
/// Bounded by [`DEREGISTER_TIMEOUT`]; failure is logged (the leader then finds out by its
/// pings or `heartbeat.timeout`).
pub async fn deregister(shared: &Shared, client: &LeaderClient, reason: &str) {
    let request = DeregisterTaskManagerRequest {
        taskmanager_id: shared.id.clone(),
        address: shared.address.clone(),
        reason: reason.to_string(),
    };
    let call = client.call(|channel| {
        let request = request.clone();
        async move { ResourceManagerClient::new(channel).deregister_task_manager(request).await }
    });
    match tokio::time::timeout(DEREGISTER_TIMEOUT, call).await {
        Ok(Ok(response)) => {
            tracing::info!(known = response.into_inner().known, "deregistered from the resourcemanager")
        }
        Ok(Err(error)) => tracing::warn!(%error, "cannot deregister from the resourcemanager"),
        Err(_) => {
            tracing::warn!(timeout = ?DEREGISTER_TIMEOUT, "deregistering from the resourcemanager timed out")
        }
    }
}

/// The registration and heartbeat loop, until `stop`, or until the TaskManager starts shutting
/// down (it deregisters then: a heartbeat after that would register it again).
pub async fn run(shared: Arc<Shared>, client: LeaderClient, stop: CancellationToken) {
    let mut watch = client.leader_watch();
    let mut ticker = tokio::time::interval(shared.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The leader we registered with, as the HA services named it then.
    let mut registered: Option<Option<LeaderInfo>> = None;
    let mut failures = FailureLog::default();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = shared.stopping.cancelled() => return,
            _ = leader_changed(&mut watch) => {}
            _ = ticker.tick() => {}
        }
        let leader = client.known_leader();
        if let Some(with) = &registered {
            if *with != leader {
                tracing::info!(
                    leader = leader.as_ref().map(|l| l.address.as_str()).unwrap_or("none"),
                    epoch = leader.as_ref().map(|l| l.epoch).unwrap_or(0),
                    "resourcemanager leader changed; registering again"
                );
                registered = None;
            }
        }
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let call = async {
                if registered.is_some() {
                    heartbeat(&shared, &client).await
                } else {
                    register(&shared, &client).await
                }
            };
            let outcome = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                r = call => r,
            };
            match outcome {
                Ok(Outcome::Unknown) if attempt < 2 => {
                    tracing::info!("resourcemanager does not know this taskmanager; registering again");
                    registered = None;
                }
                Ok(Outcome::Unknown) => {
                    registered = None;
                    break Ok(());
                }
                Ok(Outcome::Registered(epoch)) => {
                    if let Err(e) = observe(&shared, epoch) {
                        break Err(e);
                    }
                    tracing::info!(
                        resourcemanager = leader.as_ref().map(|l| l.address.as_str()).unwrap_or("unknown"),
                        epoch,
                        "registered with resourcemanager"
                    );
                    registered = Some(leader.clone());
                    break Ok(());
                }
                Ok(Outcome::Known(epoch)) => break observe(&shared, epoch),
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => failures.success("resourcemanager reachable again"),
            Err(e) => {
                if matches!(e, KeelError::StaleEpoch { .. }) {
                    // A deposed leader answered: find the new one and register there.
                    registered = None;
                }
                let address = leader.as_ref().map(|l| l.address.as_str()).unwrap_or("unknown");
                failures.failure(|| {
                    tracing::warn!(error = %e, resourcemanager = address, "cannot reach resourcemanager; retrying")
                });
            }
        }
    }
}

/// Remembers the epoch a ResourceManager answered with; an epoch lower than one already seen
/// means a deposed leader answered.
fn observe(shared: &Shared, epoch: u64) -> Result<()> {
    if epoch == 0 {
        return Ok(());
    }
    shared.rm_fence.observe(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_proc() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(memory_rss_bytes() > 0);
        }
    }
}
