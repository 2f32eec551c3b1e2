//! HA services: leader election, leader discovery and fenced metadata, behind one interface.
//!
//! Layout:
//! - [`HaServices`]: the interface every role uses. Three real backends implement it:
//!   - [`etcd::EtcdHaServices`]: leases + transactions on etcd, for clusters of several machines;
//!   - [`raft::RaftHaServices`]: the same on Keel's own replicated store, a Raft group (tikv's
//!     raft-rs) of `keel ha-member` processes, for clusters of several machines without etcd;
//!   - [`local::LocalHaServices`]: a lock file per role held by the leader process (the kernel
//!     drops it when the process dies) and metadata as atomically replaced files, for one host.
//!
//!   A third, [`memory::MemoryHaServices`], keeps everything in memory and has fault switches
//!   (lose the lease, fail writes, delay watches): a test seam, selected in code only.
//! - [`clock`]: the [`Clock`] that lease deadlines (and other time-based decisions) read, so
//!   that tests can run them on a [`TestClock`] under paused tokio time.
//! - [`Leadership`]: what a won election hands to the leader: its epoch, a token that is
//!   cancelled the moment leadership is lost, and (etcd) a lease deadline on the local clock
//!   after which [`Leadership::check`] refuses even before anything else noticed (see
//!   [`leadership`] for the rule). Every leader-only write takes a `&Leadership` and is
//!   conditional on it still being current, in the store itself (an etcd transaction that
//!   compares the leader key; the lock file for the local backend).
//! - [`stores`]: the typed stores built on the key space: jobs, checkpoint pointers, counters.
//!
//! Epochs: every new leadership of a role gets an epoch strictly greater than every earlier one
//! (etcd: the revision at which the leader key was created; local: a counter file bumped under
//! the lock).

pub mod clock;
mod election;
pub mod etcd;
mod keys;
pub mod leadership;
pub mod linearizability;
pub mod local;
pub mod memory;
pub mod raft;
pub mod stores;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use clock::{Clock, SystemClock, TestClock};
pub use leadership::{lease_deadline, safety_margin, Leadership, LeaseInstant};
pub use stores::{CheckpointPointerStore, Counter, JobStore};

/// The roles that elect a leader. TaskManagers are all equal and do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    ResourceManager,
    JobManager,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ResourceManager => "resourcemanager",
            Role::JobManager => "jobmanager",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current leader of a role as published in the HA services.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderInfo {
    pub address: String,
    pub epoch: u64,
}

/// Leader election, discovery and fenced metadata. Keys are relative paths such as
/// `jobs/<id>`; each backend places them under its cluster id.
#[async_trait]
pub trait HaServices: Send + Sync + 'static {
    /// A short name of the backend for logs and `keel cluster` (`etcd`, `local`).
    fn backend_name(&self) -> &'static str;

    /// Campaigns for leadership of `role`, publishing `address` for discovery. Returns once this
    /// process is leader, or `Cancelled` when `shutdown` fires first.
    async fn campaign(&self, role: Role, address: &str, shutdown: &CancellationToken) -> Result<Leadership>;

    /// Gives leadership up so a standby can take over at once (best effort).
    async fn resign(&self, leadership: &Leadership) -> Result<()>;

    /// The current leader of `role`, read once.
    async fn leader(&self, role: Role) -> Result<Option<LeaderInfo>>;

    /// The current leader of `role`, kept up to date in the background until `shutdown`. The
    /// watch survives the loss of an etcd member (it re-subscribes).
    fn watch_leader(&self, role: Role, shutdown: CancellationToken) -> watch::Receiver<Option<LeaderInfo>>;

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Every key under `prefix`, with its value, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Writes `key`, only if `leadership` is still current.
    async fn put(&self, leadership: &Leadership, key: &str, value: Vec<u8>) -> Result<()>;

    /// Deletes `key`, only if `leadership` is still current.
    async fn delete(&self, leadership: &Leadership, key: &str) -> Result<()>;

    /// Atomically increments the counter at `key` (only if `leadership` is still current) and
    /// returns its new value; a missing counter starts at 0, so the first value is 1.
    async fn increment(&self, leadership: &Leadership, key: &str) -> Result<u64>;
}

/// Campaigns for `role` and runs `lead` for every leadership won, until `shutdown`.
///
/// `lead` gets the leadership and must return once it is lost (its `lost()` token fires) or on
/// shutdown; whatever it built for the leadership is dropped whole then, never demoted in
/// place. On shutdown the leadership is given up and resigned, so a standby takes over at once
/// instead of after the lease TTL. A failed campaign is logged and retried.
pub async fn run_for_leadership<F, Fut>(
    ha: Arc<dyn HaServices>,
    role: Role,
    address: String,
    shutdown: CancellationToken,
    mut lead: F,
) where
    F: FnMut(Leadership) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let leadership = match ha.campaign(role, &address, &shutdown).await {
            Ok(l) => l,
            Err(KeelError::Cancelled { .. }) => return,
            Err(error) => {
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::warn!(%role, %error, "campaign for leadership failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let epoch = leadership.epoch;
        tracing::info!(%role, epoch, %address, "became leader");
        lead(leadership.clone()).await;
        if shutdown.is_cancelled() {
            leadership.give_up();
            if let Err(error) = ha.resign(&leadership).await {
                tracing::warn!(%role, %error, "resign failed");
            }
            return;
        }
        tracing::warn!(%role, epoch, "lost leadership; back to standby");
    }
}

/// True when an error's chain of causes shows that a request never left this process: the TCP
/// connection to the server was refused (both gRPC clients, etcd's and the raft members', fail
/// fast on a server that is down, and only such a request may be sent again when sending it
/// twice could apply it twice).
pub(crate) fn refused_before_sending(mut cause: Option<&(dyn std::error::Error + 'static)>) -> bool {
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        if c.to_string().contains("tcp connect error") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Builds the HA services the configuration asks for. Fails with an error naming the etcd
/// endpoints (or the Raft members) when none can be reached within the connect timeout.
pub async fn connect(config: &keel_config::HaConfig) -> Result<Arc<dyn HaServices>> {
    match &config.backend {
        keel_config::HaBackend::Local { storage_dir } => {
            Ok(Arc::new(local::LocalHaServices::open(storage_dir, &config.cluster_id)?))
        }
        keel_config::HaBackend::Etcd { endpoints, lease_ttl, connect_timeout } => Ok(Arc::new(
            etcd::EtcdHaServices::connect(endpoints, &config.cluster_id, *lease_ttl, *connect_timeout)
                .await?,
        )),
        keel_config::HaBackend::Raft { members, lease_ttl, connect_timeout, .. } => {
            let addresses: Vec<String> = members.iter().map(|(_, a)| a.clone()).collect();
            Ok(Arc::new(
                raft::RaftHaServices::connect(&addresses, &config.cluster_id, *lease_ttl, *connect_timeout)
                    .await?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryHaServices;

    /// The lead loop on the in-memory backend: a lost lease ends `lead` (its token fires) and
    /// the process campaigns again and leads with a greater epoch; on shutdown the leadership
    /// is given up and resigned, so the role is vacant for a standby at once.
    #[tokio::test(start_paused = true)]
    async fn run_for_leadership_leads_again_after_a_loss_and_resigns_on_shutdown() -> Result<()> {
        let memory = MemoryHaServices::new();
        let ha: Arc<dyn HaServices> = Arc::new(memory.clone());
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let runner =
            tokio::spawn(run_for_leadership(ha.clone(), Role::JobManager, "a:1".into(), shutdown.clone(), {
                let shutdown = shutdown.clone();
                move |leadership: Leadership| {
                    let (tx, shutdown) = (tx.clone(), shutdown.clone());
                    async move {
                        let _ = tx.send(leadership.epoch);
                        tokio::select! {
                            _ = leadership.lost().cancelled() => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
            }));
        let closed = || KeelError::internal("the lead loop stopped");
        let first = rx.recv().await.ok_or_else(closed)?;
        assert_eq!(memory.lose_lease(Role::JobManager), Some(first));
        let second = rx.recv().await.ok_or_else(closed)?;
        assert!(second > first, "a new leadership, with a greater epoch");
        assert_eq!(ha.leader(Role::JobManager).await?.map(|l| l.epoch), Some(second));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), runner)
            .await
            .map_err(|_| KeelError::internal("the lead loop did not stop on shutdown"))?
            .map_err(|e| KeelError::internal(e.to_string()))?;
        assert_eq!(ha.leader(Role::JobManager).await?, None, "resigned on shutdown");
        Ok(())
    }
}
