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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, KeyValue,
    LeaseGrantResponse, PutOptions, ResponseHeader, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
    WatchStream,
};
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::election::{
    self, deadline_check, leader_key_change, Backoff, BeforeSend, Campaign, CampaignAction, DeadlineCheck,
    KeepAlive, KeepAliveAction, KeepAliveOutcome, LeaderKey, StepOutcome, BACKOFF_MIN,
};
use crate::keys::{error_chain, validate_cluster_id, validate_key, validate_prefix};
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
/// The shortest time one attempt of an idempotent request gets before it is sent again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

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

/// The etcd client with the endpoint list (for error messages) and the per-request timeout.
#[derive(Clone)]
struct Conn {
    client: Client,
    endpoints: Arc<str>,
    request_timeout: Duration,
}

/// Formats an etcd client error with its causes (the client's own `Display` drops them).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::TransportError(t) => error_chain(t),
        etcd_client::Error::GRpcStatus(s) => {
            let head = format!("{:?}: {}", s.code(), s.message());
            match std::error::Error::source(s).map(error_chain) {
                // The message often repeats the start of the cause chain.
                Some(causes) if causes.starts_with(s.message()) => format!("{:?}: {causes}", s.code()),
                Some(causes) => format!("{head}: {causes}"),
                None => head,
            }
        }
        etcd_client::Error::IoError(io) => error_chain(io),
        other => other.to_string(),
    }
}

/// True when the error says etcd could not be reached or could not serve the request right now
/// (no connection, no raft leader, timeout): worth retrying elsewhere or later.
fn is_unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        _ => false,
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        _ => false,
    }
}

fn header_revision(header: Option<&ResponseHeader>) -> Result<i64> {
    header.map(|h| h.revision()).ok_or_else(|| KeelError::ha("etcd answered without a response header"))
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

/// Which failed requests [`Conn::call`] may send again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Sending the request twice has the same effect as once (reads, fenced puts and deletes,
    /// revokes): retried on any "unreachable" error, with a per-attempt timeout, so that a
    /// request stuck on a member that just lost its raft leader is sent again elsewhere.
    Idempotent,
    /// Retried only when the request certainly never left (no connection to the member the
    /// balancer picked); any other failure may have been applied and is returned.
    IfNotSent,
}

/// True when the request failed before it was sent: the connection to the picked member
/// could not be made (a dead member stays in the client's balancer and fails fast).
fn is_not_sent(e: &etcd_client::Error) -> bool {
    let source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        _ => None,
    };
    let mut cause = source;
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

impl Conn {
    fn error(&self, what: &str, e: &etcd_client::Error) -> KeelError {
        if is_unreachable(e) {
            KeelError::unavailable(self.endpoints.to_string(), format!("etcd {what}: {}", describe(e)))
        } else {
            KeelError::ha(format!("etcd {what} (endpoints {}): {}", self.endpoints, describe(e)))
        }
    }

    fn timed_out(&self, what: &str) -> KeelError {
        KeelError::unavailable(
            self.endpoints.to_string(),
            format!("etcd {what}: no answer within {:?}", self.request_timeout),
        )
    }

    /// Runs an etcd request (built anew by `request` for every attempt) until it succeeds,
    /// fails in a way `retry` does not cover, or the request timeout has passed.
    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, mut request: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timed_out(what));
            }
            let attempt_timeout = match retry {
                Retry::Idempotent => (self.request_timeout / 4).max(ATTEMPT_TIMEOUT).min(remaining),
                Retry::IfNotSent => remaining,
            };
            let e = match tokio::time::timeout(attempt_timeout, request()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) if retry == Retry::Idempotent && attempt_timeout < remaining => {
                    tracing::debug!(what, "etcd request unanswered, sending it again");
                    continue;
                }
                Err(_) => return Err(self.timed_out(what)),
            };
            let again = match retry {
                Retry::Idempotent => is_unreachable(&e),
                Retry::IfNotSent => is_not_sent(&e),
            };
            if !again || Instant::now() + pause >= deadline {
                return Err(self.error(what, &e));
            }
            tracing::debug!(what, error = %describe(&e), "etcd request failed, retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKOFF_MIN);
        }
    }

    async fn get(&self, key: &str, options: Option<GetOptions>) -> Result<GetResponse> {
        self.call("get", Retry::Idempotent, || {
            let mut c = self.client.clone();
            let (key, options) = (key.to_string(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    async fn txn(&self, what: &str, retry: Retry, txn: Txn) -> Result<TxnResponse> {
        self.call(what, retry, || {
            let mut c = self.client.clone();
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    async fn grant(&self, ttl_secs: i64) -> Result<LeaseGrantResponse> {
        self.call("lease grant", Retry::IfNotSent, || {
            let mut c = self.client.clone();
            async move { c.lease_grant(ttl_secs, None).await }
        })
        .await
    }

    /// Revokes a lease; a lease that is already gone counts as revoked.
    async fn revoke(&self, lease: i64) -> Result<()> {
        self.call("lease revoke", Retry::Idempotent, || {
            let mut c = self.client.clone();
            async move {
                match c.lease_revoke(lease).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_lease_not_found(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    /// Opens a watch on `key` from `start_revision`.
    async fn watch(&self, key: &str, start_revision: i64) -> Result<WatchStream> {
        self.call("watch", Retry::Idempotent, || {
            let mut c = self.client.clone();
            let key = key.to_string();
            let options = WatchOptions::new().with_start_revision(start_revision);
            async move { c.watch(key, Some(options)).await }
        })
        .await
    }
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

/// Keeps one leadership alive: keep-alives, and a watch on the leader key.
struct Keeper {
    conn: Conn,
    key: String,
    lease: i64,
    /// What to do after each keep-alive ([`crate::election`]).
    rules: KeepAlive,
    leadership: Leadership,
}

impl Keeper {
    async fn run(self) {
        let token = self.leadership.lost().clone();
        let reason = tokio::select! {
            biased;
            _ = token.cancelled() => None,
            r = self.deadline_watch() => Some(r),
            r = self.keep_alive_loop() => Some(r),
            r = self.watch_key_loop() => Some(r),
        };
        let (role, epoch) = (self.leadership.role, self.leadership.epoch);
        if let Some(reason) = reason {
            tracing::warn!(role = %role, epoch, reason, "etcd leadership lost");
            self.leadership.give_up();
        }
        // Best effort: deleting the key at once lets a standby take over without waiting for
        // the lease to expire.
        if let Err(e) = self.conn.revoke(self.lease).await {
            tracing::debug!(role = %role, epoch, error = %e, "cannot revoke leader lease");
        }
    }

    /// Returns when the leadership's deadline has passed unrenewed, so that leader work
    /// waiting on the `lost` token stops at the deadline even while the keep-alive loop is
    /// blocked on an unanswered request. (`Leadership::check` does not depend on this task:
    /// after a pause it refuses before this task had a chance to run.)
    async fn deadline_watch(&self) -> String {
        loop {
            match deadline_check(self.leadership.remaining()) {
                DeadlineCheck::Never => return std::future::pending().await,
                DeadlineCheck::Passed => {
                    return "the lease deadline passed without a successful keep-alive".into()
                }
                // The deadline may move while we sleep; look again when the old one is due.
                DeadlineCheck::LookAgainIn(pause) => tokio::time::sleep(pause).await,
            }
        }
    }

    /// Returns why the lease can no longer be kept.
    ///
    /// A keep-alive is due every [`keep_alive_interval`]; one unanswered within that interval
    /// (or a stream that fails or ends, even between keep-alives, as when its etcd member
    /// dies) reopens the stream after [`crate::election::KEEP_ALIVE_RETRY`], on whichever
    /// member answers, until the deadline passes. While etcd elects a new raft leader nothing
    /// is answered; a short interval leaves the rest of the lease to ride that out (see
    /// [`keep_alive_interval`]). What to do after each answer is decided by
    /// [`crate::election::KeepAlive`]; this loop only sends, waits and carries it out.
    async fn keep_alive_loop(&self) -> String {
        let interval = self.rules.interval();
        let (role, epoch) = (self.leadership.role, self.leadership.epoch);
        let mut pause = None;
        loop {
            if let Some(pause) = pause.take() {
                tokio::time::sleep(pause).await;
            }
            if let BeforeSend::GiveUp { reason } = self.before_send() {
                return reason;
            }
            // Opening the stream sends a keep-alive and waits for its answer.
            let sent = self.leadership.clock().lease_now();
            let mut client = self.conn.client.clone();
            let opened = tokio::time::timeout(interval, client.lease_keep_alive(self.lease)).await;
            let (outcome, pair) = match opened {
                Ok(Ok(pair)) => (KeepAliveOutcome::Opened, Some(pair)),
                Ok(Err(e)) if is_lease_not_found(&e) => (KeepAliveOutcome::LeaseNotFound, None),
                Ok(Err(e)) => {
                    tracing::debug!(role = %role, epoch, error = %describe(&e), "cannot open keep-alive stream");
                    (KeepAliveOutcome::Broken, None)
                }
                Err(_) => {
                    tracing::debug!(role = %role, epoch, "keep-alive stream did not open in time");
                    (KeepAliveOutcome::Broken, None)
                }
            };
            let mut next_in = match self.apply(sent, &outcome) {
                KeepAliveAction::GiveUp { reason } => return reason,
                KeepAliveAction::Extend { next_in, .. } => next_in,
                KeepAliveAction::Reopen { after } => {
                    pause = Some(after);
                    continue;
                }
            };
            let Some((mut keeper, mut stream)) = pair else {
                continue;
            };
            loop {
                // Idle until the next keep-alive is due. Nothing is outstanding meanwhile, so
                // anything the stream yields is its failure or end: reopen at once rather than
                // finding out at the next keep-alive.
                let due = tokio::time::sleep(next_in);
                tokio::pin!(due);
                let broken = loop {
                    tokio::select! {
                        _ = &mut due => break None,
                        message = stream.message() => match message {
                            Ok(Some(_)) => continue,
                            Ok(None) => break Some("ended".to_string()),
                            Err(e) => break Some(describe(&e)),
                        },
                    }
                };
                if let Some(why) = broken {
                    tracing::debug!(role = %role, epoch, why, "keep-alive stream lost between keep-alives, reopening");
                    pause = Some(election::KEEP_ALIVE_RETRY);
                    break;
                }
                if let BeforeSend::GiveUp { reason } = self.before_send() {
                    return reason;
                }
                let sent = self.leadership.clock().lease_now();
                let outcome = if keeper.keep_alive().await.is_err() {
                    KeepAliveOutcome::Broken
                } else {
                    match tokio::time::timeout(interval, stream.message()).await {
                        Ok(Ok(Some(resp))) => KeepAliveOutcome::Answered { ttl_secs: resp.ttl() },
                        Ok(Ok(None)) => {
                            tracing::debug!(role = %role, epoch, "keep-alive stream ended, reopening");
                            KeepAliveOutcome::Broken
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(role = %role, epoch, error = %describe(&e), "keep-alive failed, reopening");
                            KeepAliveOutcome::Broken
                        }
                        Err(_) => {
                            tracing::debug!(role = %role, epoch, "keep-alive unanswered, reopening");
                            KeepAliveOutcome::Broken
                        }
                    }
                };
                match self.apply(sent, &outcome) {
                    KeepAliveAction::GiveUp { reason } => return reason,
                    KeepAliveAction::Extend { next_in: next, .. } => next_in = next,
                    KeepAliveAction::Reopen { after } => {
                        pause = Some(after);
                        break;
                    }
                }
            }
        }
    }

    /// The keep-alive rule before a send, on the leadership's own clock.
    fn before_send(&self) -> BeforeSend {
        // `is_valid` also cancels the token once the deadline passed.
        let lost = !self.leadership.is_valid();
        self.rules.before_send(lost, self.leadership.deadline(), self.leadership.clock().lease_now())
    }

    /// The rule's answer to `outcome`, with its deadline extension already carried out.
    fn apply(&self, sent: crate::LeaseInstant, outcome: &KeepAliveOutcome) -> KeepAliveAction {
        let action = self.rules.after(sent, outcome);
        if let KeepAliveAction::Extend { deadline, .. } = &action {
            self.leadership.extend_until(*deadline);
        }
        action
    }

    /// Returns when the leader key is gone or belongs to another leadership; re-subscribes on
    /// any watch failure.
    async fn watch_key_loop(&self) -> String {
        let mut backoff = Backoff::new();
        loop {
            match self.watch_key_once(&mut backoff).await {
                Ok(reason) => return reason,
                Err(e) => {
                    tracing::debug!(role = %self.leadership.role, epoch = self.leadership.epoch, error = %e, "leader key watch interrupted");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    async fn watch_key_once(&self, backoff: &mut Backoff) -> Result<String> {
        let epoch = i64::try_from(self.leadership.epoch).unwrap_or(i64::MAX);
        let current = self.conn.get(&self.key, None).await?;
        let revision = header_revision(current.header())?;
        let seen = match current.kvs().first() {
            None => LeaderKey::Gone,
            Some(kv) => LeaderKey::Present { create_revision: kv.create_revision() },
        };
        if let Some(reason) = leader_key_change(&self.key, epoch, seen) {
            return Ok(reason);
        }
        let mut stream = self.conn.watch(&self.key, revision + 1).await?;
        backoff.reset();
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return Err(KeelError::ha(format!(
                            "watch cancelled by etcd: {}",
                            resp.cancel_reason()
                        )));
                    }
                    for event in resp.events() {
                        let seen = match event.event_type() {
                            EventType::Delete => LeaderKey::Deleted,
                            EventType::Put => LeaderKey::Present {
                                create_revision: event.kv().map(|kv| kv.create_revision()).unwrap_or(0),
                            },
                        };
                        if let Some(reason) = leader_key_change(&self.key, epoch, seen) {
                            return Ok(reason);
                        }
                    }
                }
                Ok(None) => {
                    return Err(KeelError::unavailable(self.conn.endpoints.to_string(), "etcd watch ended"))
                }
                Err(e) => return Err(self.conn.error("watch leader key", &e)),
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
