//! The etcd HA backend: leases and transactions, for clusters of several machines.
//!
//! Key space, all under `/keel/<cluster_id>/`:
//!
//! | key | value |
//! | --- | --- |
//! | `leader/<role>` | the leader's [`LeaderInfo`] as JSON, attached to the leader's lease |
//! | `meta/<key>` | metadata, one etcd key per HA key |
//!
//! Election: a candidate creates the leader key with a transaction
//! `if create_revision(key) == 0 then put(key, info, lease)`. The winner's epoch is the
//! revision of that transaction, which is the key's `create_revision`: etcd revisions only
//! grow, so every new leadership has a greater epoch than all before it. Readers always take the
//! epoch from the key's `create_revision`, never from the value. A loser watches the key and
//! tries again once it is deleted (resign, or lease expiry when the leader died).
//!
//! Leadership lifetime: a background task per leadership sends keep-alives every TTL/10 and
//! extends the [`Leadership`] deadline to `sent_at + TTL - margin` after every answered
//! keep-alive ([`crate::lease_deadline`]; the server's lease cannot expire before `sent_at +
//! TTL`, since it counts from when it *received* the keep-alive). It re-opens the keep-alive
//! stream when the etcd member it talks to goes away, and gives leadership up when the lease is
//! gone, when the deadline passes, or when the leader key disappears or is re-created by
//! someone else (it watches the key). The deadline is also checked by
//! [`Leadership::check`] itself, so a leader resumed after a pause refuses to act before this
//! task runs again.
//!
//! Fencing: every leader-only write is a transaction guarded by
//! `create_revision(leader key) == epoch`.
//!
//! Layout: this file holds the campaign, the reads and the fenced writes; `conn` the client
//! and which requests are sent again; `keeper` the task that keeps a leadership; the decisions
//! of the campaign and the keep-alive (what to do next, given what etcd answered, the TTL and
//! the clock) are in `crate::election`, without I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod conn;
mod keeper;

use self::conn::{describe, header_revision, is_unreachable, Conn, Retry};
use self::keeper::Keeper;
use crate::clock::Clock;
use crate::election::{self, Backoff, Campaign, CampaignAction, KeepAlive, StepOutcome};
use crate::keys::{validate_cluster_id, validate_key, validate_prefix};
use crate::{lease_deadline, HaServices, LeaderInfo, Leadership, Role};

/// HTTP/2 keep-alive pings while a stream is open, to notice a member that vanished without
/// closing its connections. etcd refuses pings more often than every 5 s by default.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between the attempts to reach a member when connecting.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// A standby re-reads the leader key at least this often even when its watch is silent.
const VACANCY_RECHECK: Duration = Duration::from_secs(10);
/// How many times `increment` retries when another writer changed the counter in between.
const MAX_INCREMENT_ATTEMPTS: usize = 100;

/// HA services on etcd. See the module documentation for the key space and the protocol.
pub struct EtcdHaServices {
    conn: Conn,
    prefix: String,
    lease_ttl: Duration,
    held: Arc<Mutex<HashMap<Role, Held>>>,
    /// The lease clock keep-alives are timed with and deadlines read on.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for EtcdHaServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdHaServices")
            .field("endpoints", &self.conn.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// A leadership this backend holds.
struct Held {
    epoch: u64,
    lease: i64,
    token: CancellationToken,
    task: JoinHandle<()>,
}

fn encode_leader(address: &str, epoch: u64) -> Result<Vec<u8>> {
    serde_json::to_vec(&LeaderInfo { address: address.to_string(), epoch })
        .map_err(|e| KeelError::internal(format!("cannot encode leader record: {e}")))
}

/// The leader published in `kv`; the epoch is the key's `create_revision`.
fn leader_from_kv(kv: &KeyValue) -> Result<LeaderInfo> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let info: LeaderInfo = serde_json::from_slice(kv.value())
        .map_err(|e| KeelError::ha(format!("leader record {key} in etcd is not readable: {e}")))?;
    let epoch = u64::try_from(kv.create_revision()).map_err(|_| {
        KeelError::ha(format!("leader record {key} has create revision {}", kv.create_revision()))
    })?;
    Ok(LeaderInfo { address: info.address, epoch })
}

fn parse_counter(key: &str, bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| KeelError::ha(format!("counter {key} in etcd is not a decimal number")))
}

pub use crate::election::keep_alive_interval;

/// Revokes a freshly granted lease unless disarmed: a campaign step abandoned half-way (error,
/// shutdown, dropped future) must not leave a leader key nobody keeps alive.
struct LeaseGuard {
    conn: Conn,
    lease: Option<i64>,
}

impl LeaseGuard {
    fn disarm(&mut self) {
        self.lease = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let conn = self.conn.clone();
                rt.spawn(async move {
                    if let Err(e) = conn.revoke(lease).await {
                        tracing::debug!(lease, error = %e, "cannot revoke unused lease");
                    }
                });
            }
        }
    }
}

enum Step {
    Won(Leadership),
    /// Somebody else leads; the leader key existed at `revision`.
    Taken {
        revision: i64,
    },
}

impl EtcdHaServices {
    /// Connects to etcd and checks that a member answers. Fails within `connect_timeout` with
    /// `KeelError::Unavailable` naming the endpoints when none can be reached.
    pub async fn connect(
        endpoints: &[String],
        cluster_id: &str,
        lease_ttl: Duration,
        connect_timeout: Duration,
    ) -> Result<Self> {
        validate_cluster_id(cluster_id)?;
        if endpoints.is_empty() {
            return Err(KeelError::InvalidArgument { reason: "no etcd endpoints given".into() });
        }
        if lease_ttl < Duration::from_millis(100) {
            return Err(KeelError::InvalidArgument {
                reason: format!("etcd lease TTL {lease_ttl:?} is too short"),
            });
        }
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_keep_alive(HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT)
            // A member cut off from its cluster refuses requests and ends watches at once
            // instead of serving stale data.
            .with_require_leader(true);
        // The latest reason a member did not answer, for the error when none does in time.
        let last_error: Mutex<Option<String>> = Mutex::new(None);
        let connecting = async {
            let mut client = Client::connect(endpoints, Some(options)).await?;
            // The client connects lazily: only a real request proves that a member answers.
            // The client spreads requests over the endpoints, and one sent to a member that is
            // down fails at once: ask again until some member answers.
            loop {
                match client.status().await {
                    Ok(_) => return Ok::<_, etcd_client::Error>(client),
                    Err(e) if is_unreachable(&e) => {
                        tracing::debug!(endpoints = %joined, error = %describe(&e), "etcd member did not answer, asking again");
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(describe(&e));
                        tokio::time::sleep(CONNECT_RETRY).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let client = match tokio::time::timeout(connect_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)))) => {
                return Err(KeelError::InvalidArgument {
                    reason: format!("etcd endpoints {joined}: {}", describe(&e)),
                })
            }
            Ok(Err(e)) => return Err(KeelError::unavailable(joined, describe(&e))),
            Err(_) => {
                let last = last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
                let reason = match last {
                    Some(e) => {
                        format!("no etcd member answered within {connect_timeout:?} (last error: {e})")
                    }
                    None => format!("no etcd member answered within {connect_timeout:?}"),
                };
                return Err(KeelError::unavailable(joined, reason));
            }
        };
        tracing::info!(endpoints = %joined, cluster_id, "connected to etcd");
        Ok(EtcdHaServices {
            conn: Conn {
                client,
                endpoints: joined.into(),
                request_timeout: connect_timeout.max(Duration::from_secs(5)),
            },
            prefix: format!("/keel/{cluster_id}/"),
            lease_ttl,
            held: Arc::new(Mutex::new(HashMap::new())),
            clock: crate::clock::system(),
        })
    }

    /// Sets the timeout of each etcd request (default: the connect timeout, at least 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.conn.request_timeout = timeout;
        self
    }

    /// Times keep-alives and reads lease deadlines on `clock` (default: the system clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The etcd key that holds the leader of `role`.
    pub fn leader_key(&self, role: Role) -> String {
        format!("{}leader/{}", self.prefix, role.as_str())
    }

    fn meta_key(&self, key: &str) -> String {
        format!("{}meta/{key}", self.prefix)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Role, Held>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Test hook: stops the keep-alives (and the leader-key watch) of this backend's leadership
    /// of `role` without revoking the lease or cancelling the leadership, which is what a
    /// paused or partitioned leader looks like from the outside. Returns whether there was one.
    #[doc(hidden)]
    pub fn stop_keep_alive_for_tests(&self, role: Role) -> bool {
        match self.held().remove(&role) {
            Some(h) => {
                h.task.abort();
                true
            }
            None => false,
        }
    }

    fn fence(&self, leadership: &Leadership) -> Result<Compare> {
        let epoch = i64::try_from(leadership.epoch).map_err(|_| self.lost(leadership))?;
        Ok(Compare::create_revision(self.leader_key(leadership.role), CompareOp::Equal, epoch))
    }

    fn lost(&self, leadership: &Leadership) -> KeelError {
        leadership.give_up();
        KeelError::LeadershipLost {
            reason: format!("leader key of {} no longer has epoch {}", leadership.role, leadership.epoch),
        }
    }

    /// One attempt: read the key; if free, grant a lease and create the key with it.
    async fn campaign_step(&self, role: Role, key: &str, address: &str) -> Result<Step> {
        let current = self.conn.get(key, None).await?;
        if !current.kvs().is_empty() {
            return Ok(Step::Taken { revision: header_revision(current.header())? });
        }
        // The lease cannot expire in etcd before `sent + TTL`: it counts from when etcd
        // received the grant.
        let sent = self.clock.lease_now();
        let grant = self.conn.grant(election::ttl_secs(self.lease_ttl)).await?;
        let lease = grant.id();
        let mut guard = LeaseGuard { conn: self.conn.clone(), lease: Some(lease) };
        // The deadline we keep is never longer than what we asked for or what etcd granted.
        let Some(ttl) = election::granted_ttl(self.lease_ttl, grant.ttl()) else {
            return Err(KeelError::ha(format!("etcd granted lease {lease:x} with TTL {}", grant.ttl())));
        };

        let create = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key,
                encode_leader(address, 0)?,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let created = self.conn.txn("campaign", Retry::IfNotSent, create).await?;
        let revision = header_revision(created.header())?;
        if !created.succeeded() {
            return Ok(Step::Taken { revision });
        }
        let epoch = u64::try_from(revision)
            .map_err(|_| KeelError::ha(format!("etcd answered with revision {revision}")))?;
        // Publish the epoch in the value too (readers take it from create_revision anyway).
        let publish =
            Txn::new().when(vec![Compare::create_revision(key, CompareOp::Equal, revision)]).and_then(vec![
                TxnOp::put(key, encode_leader(address, epoch)?, Some(PutOptions::new().with_lease(lease))),
            ]);
        let published = self.conn.txn("publish leader", Retry::Idempotent, publish).await?;
        if !published.succeeded() {
            // The key vanished already (the lease expired while we were slow): start over.
            return Ok(Step::Taken { revision: header_revision(published.header())? });
        }

        let token = CancellationToken::new();
        let leadership = Leadership::with_deadline(
            role,
            epoch,
            address.to_string(),
            token.clone(),
            lease_deadline(sent, ttl),
        )
        .on_clock(self.clock.clone());
        let keeper = Keeper {
            conn: self.conn.clone(),
            key: key.to_string(),
            lease,
            rules: KeepAlive::new(lease, ttl),
            leadership: leadership.clone(),
        };
        let task = tokio::spawn(keeper.run());
        guard.disarm();
        if let Some(old) = self.held().insert(role, Held { epoch, lease, token, task }) {
            old.token.cancel();
        }
        tracing::info!(role = %role, epoch, lease = format_args!("{lease:x}"), address, "etcd leadership won");
        Ok(Step::Won(leadership))
    }

    /// Waits until the leader key, which existed at `revision`, is deleted (or the watch gives
    /// up, or a while passed: the caller then reads the key again).
    async fn wait_for_vacancy(&self, key: &str, revision: i64) -> Result<()> {
        let mut stream = self.conn.watch(key, revision + 1).await?;
        let recheck = tokio::time::sleep(VACANCY_RECHECK);
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                _ = &mut recheck => return Ok(()),
                message = stream.message() => match message {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            // Compacted or refused: read the key again, after a pause.
                            return Err(KeelError::ha(format!(
                                "watch cancelled by etcd: {}",
                                resp.cancel_reason()
                            )));
                        }
                        if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            return Ok(());
                        }
                    }
                    Ok(None) => {
                        return Err(KeelError::unavailable(
                            self.conn.endpoints.to_string(),
                            "etcd watch on the leader key ended",
                        ))
                    }
                    Err(e) => return Err(self.conn.error("watch leader key", &e)),
                },
            }
        }
    }
}

fn publish(tx: &watch::Sender<Option<LeaderInfo>>, role: Role, kv: Option<&KeyValue>) {
    let current = match kv.map(leader_from_kv).transpose() {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(role = %role, error = %e, "unreadable leader record");
            None
        }
    };
    tx.send_if_modified(|v| {
        if *v != current {
            *v = current;
            true
        } else {
            false
        }
    });
}

/// Reads the leader key, then follows it with a watch; returns only on an error or the end
/// of the watch (the caller re-subscribes).
async fn follow_leader(
    conn: &Conn,
    key: &str,
    role: Role,
    tx: &watch::Sender<Option<LeaderInfo>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let current = conn.get(key, None).await?;
    publish(tx, role, current.kvs().first());
    let revision = header_revision(current.header())?;
    let mut stream = conn.watch(key, revision + 1).await?;
    backoff.reset();
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    return Err(KeelError::ha(format!("watch cancelled by etcd: {}", resp.cancel_reason())));
                }
                for event in resp.events() {
                    match event.event_type() {
                        EventType::Put => publish(tx, role, event.kv()),
                        EventType::Delete => publish(tx, role, None),
                    }
                }
            }
            Ok(None) => return Err(KeelError::unavailable(conn.endpoints.to_string(), "etcd watch ended")),
            Err(e) => return Err(conn.error("watch leader key", &e)),
        }
    }
}

#[async_trait]
impl HaServices for EtcdHaServices {
    fn backend_name(&self) -> &'static str {
        "etcd"
    }

    async fn campaign(&self, role: Role, address: &str, shutdown: &CancellationToken) -> Result<Leadership> {
        let cancelled = || KeelError::Cancelled { reason: format!("campaign for {role} leadership stopped") };
        let key = self.leader_key(role);
        let mut rules = Campaign::new();
        loop {
            if shutdown.is_cancelled() {
                return Err(cancelled());
            }
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(cancelled()),
                step = self.campaign_step(role, &key, address) => step,
            };
            let (outcome, won, error) = match step {
                Ok(Step::Won(leadership)) => (StepOutcome::Won, Some(leadership), None),
                Ok(Step::Taken { revision }) => (StepOutcome::Taken { revision }, None, None),
                Err(e @ KeelError::Unavailable { .. }) => {
                    tracing::warn!(role = %role, error = %e, "campaign step failed, retrying");
                    (StepOutcome::Unavailable, None, None)
                }
                Err(e) => (StepOutcome::Failed, None, Some(e)),
            };
            let mut action = rules.after_step(outcome);
            if let CampaignAction::WatchForVacancy { revision } = action {
                tracing::debug!(role = %role, revision, "leader key taken, waiting for it to go");
                let waited = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Err(cancelled()),
                    waited = self.wait_for_vacancy(&key, revision) => waited,
                };
                if let Err(e) = &waited {
                    tracing::debug!(role = %role, error = %e, "leader key watch interrupted");
                }
                action = rules.after_wait(waited.is_ok());
            }
            match action {
                CampaignAction::Lead => match won {
                    Some(leadership) => return Ok(leadership),
                    None => return Err(KeelError::internal("campaign: won without a leadership")),
                },
                CampaignAction::Fail => {
                    return Err(
                        error.unwrap_or_else(|| KeelError::internal("campaign failed without an error"))
                    )
                }
                CampaignAction::TryNow | CampaignAction::WatchForVacancy { .. } => {}
                CampaignAction::RetryAfter(pause) => {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(cancelled()),
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        leadership.give_up();
        let held = {
            let mut held = self.held();
            match held.get(&leadership.role) {
                Some(h) if h.epoch == leadership.epoch => held.remove(&leadership.role),
                _ => None,
            }
        };
        let Some(held) = held else {
            // Not (any longer) ours to keep alive; still make sure the key of this epoch goes.
            let delete = Txn::new()
                .when(vec![self.fence(leadership)?])
                .and_then(vec![TxnOp::delete(self.leader_key(leadership.role), None)]);
            self.conn.txn("resign", Retry::Idempotent, delete).await?;
            return Ok(());
        };
        held.token.cancel();
        // Revoking the lease deletes the leader key: a standby wins at once.
        // (`revoke` retries on its own while members are unreachable, up to the request
        // timeout; if it still fails, the key goes when the lease expires.)
        self.conn.revoke(held.lease).await?;
        tracing::info!(role = %leadership.role, epoch = leadership.epoch, "etcd leadership resigned");
        Ok(())
    }

    async fn leader(&self, role: Role) -> Result<Option<LeaderInfo>> {
        let current = self.conn.get(&self.leader_key(role), None).await?;
        current.kvs().first().map(leader_from_kv).transpose()
    }

    fn watch_leader(&self, role: Role, shutdown: CancellationToken) -> watch::Receiver<Option<LeaderInfo>> {
        let (tx, rx) = watch::channel(None);
        let conn = self.conn.clone();
        let key = self.leader_key(role);
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                let result = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = follow_leader(&conn, &key, role, &tx, &mut backoff) => r,
                };
                if let Err(e) = result {
                    tracing::info!(role = %role, error = %e, "leader watch interrupted, re-subscribing");
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next()) => {}
                }
            }
        });
        rx
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_key(key)?;
        let resp = self.conn.get(&self.meta_key(key), None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        validate_prefix(prefix)?;
        let root = self.meta_key("");
        let resp = self.conn.get(&self.meta_key(prefix), Some(GetOptions::new().with_prefix())).await?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let full = std::str::from_utf8(kv.key())
                .map_err(|_| KeelError::ha("etcd holds a metadata key that is not utf-8"))?;
            let Some(key) = full.strip_prefix(&root) else {
                continue;
            };
            out.push((key.to_string(), kv.value().to_vec()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn put(&self, leadership: &Leadership, key: &str, value: Vec<u8>) -> Result<()> {
        validate_key(key)?;
        leadership.check()?;
        let txn = Txn::new().when(vec![self.fence(leadership)?]).and_then(vec![TxnOp::put(
            self.meta_key(key),
            value,
            None,
        )]);
        if self.conn.txn("fenced put", Retry::Idempotent, txn).await?.succeeded() {
            Ok(())
        } else {
            Err(self.lost(leadership))
        }
    }

    async fn delete(&self, leadership: &Leadership, key: &str) -> Result<()> {
        validate_key(key)?;
        leadership.check()?;
        let txn = Txn::new()
            .when(vec![self.fence(leadership)?])
            .and_then(vec![TxnOp::delete(self.meta_key(key), None)]);
        if self.conn.txn("fenced delete", Retry::Idempotent, txn).await?.succeeded() {
            Ok(())
        } else {
            Err(self.lost(leadership))
        }
    }

    async fn increment(&self, leadership: &Leadership, key: &str) -> Result<u64> {
        validate_key(key)?;
        let counter = self.meta_key(key);
        let leader_key = self.leader_key(leadership.role);
        let epoch = i64::try_from(leadership.epoch).map_err(|_| self.lost(leadership))?;
        for _ in 0..MAX_INCREMENT_ATTEMPTS {
            leadership.check()?;
            let current = self.conn.get(&counter, None).await?;
            let (value, mod_revision) = match current.kvs().first() {
                None => (0, 0),
                Some(kv) => (parse_counter(key, kv.value())?, kv.mod_revision()),
            };
            let next =
                value.checked_add(1).ok_or_else(|| KeelError::ha(format!("counter {key} overflowed")))?;
            let txn = Txn::new()
                .when(vec![
                    self.fence(leadership)?,
                    Compare::mod_revision(counter.as_str(), CompareOp::Equal, mod_revision),
                ])
                .and_then(vec![TxnOp::put(counter.as_str(), next.to_string(), None)])
                .or_else(vec![TxnOp::get(leader_key.as_str(), None)]);
            let resp = self.conn.txn("fenced increment", Retry::IfNotSent, txn).await?;
            if resp.succeeded() {
                return Ok(next);
            }
            let still_leader = resp.op_responses().iter().any(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()) == Some(epoch),
                _ => false,
            });
            if !still_leader {
                return Err(self.lost(leadership));
            }
            // Another writer changed the counter in between: read it again.
        }
        Err(KeelError::ha(format!(
            "counter {key}: gave up after {MAX_INCREMENT_ATTEMPTS} conflicting increments"
        )))
    }
}
