//! [`RaftHaServices`]: the HA services of a Keel process on the embedded Raft store, reached over
//! gRPC at the members named in `high-availability.raft.members`.
//!
//! Requests go to the member that last answered as the Raft leader; a member that is not the
//! leader answers `NOT_LEADER` with the leader's address, and the request goes there. A member
//! that cannot be reached is skipped. A request is sent again only when that cannot apply it
//! twice: reads, keep-alives, acquire (idempotent for its session), resign, put and delete
//! (as the etcd backend does); an increment only when it certainly never left.
//!
//! Election per role, as on etcd: a candidate reads the role's leader (linearizably); if there is
//! none it takes a session with the lease TTL and acquires the role with it. The epoch is the log
//! index of the acquire. A task keeps the session alive every TTL/10 and moves the
//! [`Leadership`]'s deadline to `sent + TTL - margin` after every acknowledged keep-alive
//! ([`crate::lease_deadline`]); see `machine` for why no member can end the session earlier. A
//! loser follows the leader through a member's watch until the role is vacant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use keel_proto::pb;
use keel_proto::pb::ha_member_client::HaMemberClient;
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::machine::{Command, Fence, Query, Reply};
use crate::clock::Clock;
use crate::election::{self, Backoff, KeepAlive, KeepAliveAction, KeepAliveOutcome};
use crate::keys::{validate_cluster_id, validate_key, validate_prefix};
use crate::{lease_deadline, HaServices, LeaderInfo, Leadership, Role};

/// A standby reads the role's leader again at least this often while it waits for a vacancy,
/// and a leader watch re-reads it this often (a member cut off from the group could show a
/// stale leader).
const RECHECK: Duration = Duration::from_secs(2);
/// How long one member may take to answer before the request goes to the next one (a member
/// that hangs, e.g. stopped with SIGSTOP, must not hold the request until its deadline); at most
/// half a request's budget, and a member that did not answer is not asked first next time.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// The most a keep-alive may take (see `Keeper::keep_alive_loop`).
const KEEP_ALIVE_BUDGET: Duration = Duration::from_secs(2);
/// The pause after a round in which no member answered as leader (an election is under way).
const NO_LEADER_PAUSE: Duration = Duration::from_millis(50);

/// Whether a request may be sent again after an unclear failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Applying it twice is the same as once.
    Idempotent,
    /// Only when it certainly never reached a member.
    IfNotSent,
}

/// What a request carries.
enum Request {
    Propose(Command),
    Read(Query),
}

/// HA services on the embedded Raft store. See the module documentation.
pub struct RaftHaServices {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<(String, HaMemberClient<Channel>)>,
    /// Every member address, for errors.
    addresses: String,
    /// `<cluster>/`: every key and leader this process uses is under it.
    prefix: String,
    lease_ttl: Duration,
    request_timeout: Duration,
    /// The member that last answered as leader.
    preferred: AtomicUsize,
    held: Mutex<HashMap<Role, Held>>,
    clock: Arc<dyn Clock>,
}

struct Held {
    epoch: u64,
    session: u64,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for RaftHaServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHaServices")
            .field("members", &self.inner.addresses)
            .field("prefix", &self.inner.prefix)
            .field("lease_ttl", &self.inner.lease_ttl)
            .finish()
    }
}

/// True when the call failed before the request left (no connection to the member).
fn is_not_sent(status: &tonic::Status) -> bool {
    crate::refused_before_sending(std::error::Error::source(status))
}

fn unexpected(what: &str, reply: &Reply) -> KeelError {
    KeelError::ha(format!("raft store answered {what} with {reply:?}"))
}

impl RaftHaServices {
    /// HA services on the members at `members` (addresses). Fails within `connect_timeout`
    /// with `Unavailable` naming the members when no Raft leader answers.
    pub async fn connect(
        members: &[String],
        cluster_id: &str,
        lease_ttl: Duration,
        connect_timeout: Duration,
    ) -> Result<Self> {
        validate_cluster_id(cluster_id)?;
        if members.is_empty() {
            return Err(KeelError::InvalidArgument { reason: "no raft members given".into() });
        }
        if lease_ttl < Duration::from_millis(500) {
            return Err(KeelError::InvalidArgument {
                reason: format!("raft lease TTL {lease_ttl:?} is too short"),
            });
        }
        let mut clients = Vec::with_capacity(members.len());
        for address in members {
            clients.push((address.clone(), super::member::client(address)?));
        }
        let ha = RaftHaServices {
            inner: Arc::new(Inner {
                members: clients,
                addresses: members.join(","),
                prefix: format!("{cluster_id}/"),
                lease_ttl,
                request_timeout: connect_timeout.max(Duration::from_secs(5)),
                preferred: AtomicUsize::new(0),
                held: Mutex::new(HashMap::new()),
                clock: crate::clock::system(),
            }),
        };
        // Proves that the group has a leader that answers: a linearizable read.
        let probe = ha.inner.send(
            "connect",
            Request::Read(Query::Leader { leader: ha.leader_key(Role::JobManager) }),
            Retry::Idempotent,
            connect_timeout,
        );
        match probe.await {
            Ok(_) => {}
            Err(e) => {
                return Err(KeelError::unavailable(
                    ha.inner.addresses.clone(),
                    format!("no raft member answered as leader within {connect_timeout:?} ({e})"),
                ))
            }
        }
        tracing::info!(members = %ha.inner.addresses, cluster_id, "connected to the raft HA store");
        Ok(ha)
    }

    /// Times keep-alives and reads lease deadlines on `clock` (default: the system clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.clock = clock;
        }
        self
    }

    /// `<cluster>/leader/<role>`, the machine's name of the role.
    pub fn leader_key(&self, role: Role) -> String {
        format!("{}leader/{}", self.inner.prefix, role.as_str())
    }

    fn meta_key(&self, key: &str) -> String {
        format!("{}meta/{key}", self.inner.prefix)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Role, Held>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, leadership: &Leadership, current: Option<u64>) -> KeelError {
        leadership.give_up();
        let now = match current {
            Some(e) => format!("epoch {e} leads it now"),
            None => "it is vacant".into(),
        };
        KeelError::LeadershipLost {
            reason: format!(
                "{} leadership with epoch {} is over in the raft store ({now})",
                leadership.role, leadership.epoch
            ),
        }
    }

    fn fence(&self, leadership: &Leadership) -> Fence {
        Fence { leader: self.leader_key(leadership.role), epoch: leadership.epoch }
    }

    async fn propose(&self, what: &str, command: Command, retry: Retry) -> Result<Reply> {
        self.inner.send(what, Request::Propose(command), retry, self.inner.request_timeout).await
    }

    async fn read(&self, what: &str, query: Query) -> Result<Reply> {
        self.inner.send(what, Request::Read(query), Retry::Idempotent, self.inner.request_timeout).await
    }

    /// A fenced write: refused locally once the leadership's deadline passed, and in the store
    /// unless the role is still led with its epoch.
    async fn fenced(
        &self,
        what: &str,
        leadership: &Leadership,
        command: Command,
        retry: Retry,
    ) -> Result<Reply> {
        leadership.check()?;
        match self.propose(what, command, retry).await? {
            Reply::Fenced { current } => Err(self.lost(leadership, current)),
            reply => Ok(reply),
        }
    }

    /// Waits until `leader` is vacant (as a member's watch shows it) or [`RECHECK`] passed.
    async fn wait_for_vacancy(&self, leader: &str) {
        let n = self.inner.members.len();
        let start = self.inner.preferred.load(Ordering::Relaxed);
        let wait = async {
            for i in 0..n {
                let (_, client) = &self.inner.members[(start + i) % n];
                let mut client = client.clone();
                let Ok(stream) =
                    client.watch_leader(pb::HaWatchLeaderRequest { leader: leader.to_string() }).await
                else {
                    continue;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(event)) = stream.message().await {
                    if event.address.is_none() {
                        return;
                    }
                }
            }
            tokio::time::sleep(RECHECK).await;
        };
        let _ = tokio::time::timeout(RECHECK, wait).await;
    }

    /// One campaign attempt: `Some(leadership)` if the role was vacant and is now ours.
    async fn campaign_step(&self, role: Role, address: &str) -> Result<Option<Leadership>> {
        let key = self.leader_key(role);
        match self.read("read leader", Query::Leader { leader: key.clone() }).await? {
            Reply::Leader { leader: Some(_) } => return Ok(None),
            Reply::Leader { leader: None } => {}
            other => return Err(unexpected("read leader", &other)),
        }
        let ttl = self.inner.lease_ttl;
        // No member can end the session before `sent + TTL` (see `machine`).
        let sent = self.inner.clock.lease_now();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let session =
            match self.propose("grant session", Command::Grant { ttl_ms }, Retry::Idempotent).await? {
                Reply::Session { id } => id,
                other => return Err(unexpected("grant", &other)),
            };
        let acquire = Command::Acquire { leader: key.clone(), session, address: address.to_string() };
        let epoch = match self.propose("acquire", acquire, Retry::Idempotent).await {
            Ok(Reply::Won { epoch }) => epoch,
            Ok(Reply::Taken { .. }) | Ok(Reply::NoSession { .. }) => {
                self.revoke(session).await;
                return Ok(None);
            }
            Ok(other) => {
                self.revoke(session).await;
                return Err(unexpected("acquire", &other));
            }
            Err(e) => {
                self.revoke(session).await;
                return Err(e);
            }
        };
        let token = CancellationToken::new();
        let leadership = Leadership::with_deadline(
            role,
            epoch,
            address.to_string(),
            token.clone(),
            lease_deadline(sent, ttl),
        )
        .on_clock(self.inner.clock.clone());
        let keeper = Keeper {
            inner: self.inner.clone(),
            session,
            rules: KeepAlive::new(i64::try_from(session).unwrap_or(i64::MAX), ttl),
            leadership: leadership.clone(),
        };
        let task = tokio::spawn(keeper.run());
        if let Some(old) = self.held().insert(role, Held { epoch, session, token, task }) {
            old.token.cancel();
        }
        tracing::info!(role = %role, epoch, session, address, "raft leadership won");
        Ok(Some(leadership))
    }

    async fn revoke(&self, session: u64) {
        if let Err(e) = self.propose("revoke session", Command::Revoke { session }, Retry::Idempotent).await {
            tracing::debug!(session, error = %e, "cannot revoke session; it ends with its TTL");
        }
    }

    /// Test hook: stops the keep-alives of this process's leadership of `role` without ending
    /// the session or the leadership, as a paused or cut-off leader looks from outside.
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
}

impl Inner {
    /// Sends `request` to the Raft leader, following `NOT_LEADER` hints and skipping members that
    /// cannot be reached, until `timeout`.
    async fn send(&self, what: &str, request: Request, retry: Retry, timeout: Duration) -> Result<Reply> {
        let n = self.members.len();
        let mut last: Option<KeelError> = None;
        // Each member gets at most half the budget (and at most ATTEMPT_TIMEOUT), so that a
        // member that hangs (stopped with SIGSTOP, say) leaves time to ask another one.
        let per_attempt = ATTEMPT_TIMEOUT.min(timeout / 2);
        let attempt = async {
            let mut i = self.preferred.load(Ordering::Relaxed) % n;
            // Members that failed during this call: their `NOT_LEADER` hints are not followed
            // back to them.
            let mut failed = vec![false; n];
            let mut misses = 0usize;
            loop {
                let (address, client) = &self.members[i];
                let mut client = client.clone();
                let call = async {
                    match &request {
                        Request::Propose(c) => {
                            let command = serde_json::to_vec(c).map_err(KeelError::internal)?;
                            Ok(client.propose(pb::HaProposeRequest { command }).await)
                        }
                        Request::Read(q) => {
                            let query = serde_json::to_vec(q).map_err(KeelError::internal)?;
                            Ok(client.read(pb::HaReadRequest { query }).await)
                        }
                    }
                };
                let result = match tokio::time::timeout(per_attempt, call).await {
                    Ok(r) => r?,
                    Err(_) => {
                        Err(tonic::Status::deadline_exceeded(format!("no answer within {per_attempt:?}")))
                    }
                };
                let error = match result {
                    Ok(resp) => {
                        self.preferred.store(i, Ordering::Relaxed);
                        let reply: Reply = serde_json::from_slice(&resp.into_inner().reply).map_err(|e| {
                            KeelError::ha(format!("raft member {address} answered {what} unreadably: {e}"))
                        })?;
                        return Ok(reply);
                    }
                    Err(status) => {
                        let not_sent = is_not_sent(&status);
                        let e = KeelError::from_status(&status, address);
                        match e {
                            KeelError::NotLeader { leader: Some(ref hint), .. } => {
                                match self.members.iter().position(|(a, _)| a == hint) {
                                    Some(j) if j != i && !failed[j] => {
                                        i = j;
                                        last = Some(e);
                                        continue;
                                    }
                                    _ => {}
                                }
                                e
                            }
                            KeelError::NotLeader { .. } => e,
                            KeelError::Unavailable { .. } if not_sent || retry == Retry::Idempotent => {
                                // Later requests start elsewhere too.
                                failed[i] = true;
                                self.preferred.store((i + 1) % n, Ordering::Relaxed);
                                e
                            }
                            other => {
                                self.preferred.store((i + 1) % n, Ordering::Relaxed);
                                return Err(other);
                            }
                        }
                    }
                };
                tracing::debug!(what, member = %address, error = %error, "raft member did not serve the request");
                last = Some(error);
                i = (i + 1) % n;
                misses += 1;
                if misses.is_multiple_of(n) {
                    failed.iter_mut().for_each(|f| *f = false);
                    tokio::time::sleep(NO_LEADER_PAUSE).await;
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(KeelError::unavailable(
                self.addresses.clone(),
                match last {
                    Some(e) => format!("no raft leader served {what} within {timeout:?} (last error: {e})"),
                    None => format!("no raft leader served {what} within {timeout:?}"),
                },
            )),
        }
    }
}

/// Keeps one leadership's session alive.
struct Keeper {
    inner: Arc<Inner>,
    session: u64,
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
        };
        if let Some(reason) = reason {
            tracing::warn!(role = %self.leadership.role, epoch = self.leadership.epoch, reason, "raft leadership lost");
            self.leadership.give_up();
        }
        // Best effort: ending the session at once lets a standby take over without waiting.
        let revoke = Request::Propose(Command::Revoke { session: self.session });
        if let Err(e) =
            self.inner.send("revoke session", revoke, Retry::Idempotent, self.inner.request_timeout).await
        {
            tracing::debug!(session = self.session, error = %e, "cannot revoke session");
        }
    }

    async fn deadline_watch(&self) -> String {
        election::watch_deadline(&self.leadership).await
    }

    async fn keep_alive_loop(&self) -> String {
        let interval = self.rules.interval();
        let mut next_in = interval;
        loop {
            tokio::time::sleep(next_in).await;
            let lost = !self.leadership.is_valid();
            let clock = self.leadership.clock().clone();
            if let election::BeforeSend::GiveUp { reason } =
                self.rules.before_send(lost, self.leadership.deadline(), clock.lease_now())
            {
                return reason;
            }
            let sent = clock.lease_now();
            let request = Request::Propose(Command::KeepAlive { session: self.session });
            // The keep-alive may take what is left of the lease (at most 2 s, at least an
            // interval): right after a Raft leader is lost, the new one must be elected and
            // commit before it answers, and a loaded machine slows both down. Each member gets
            // at most half of it, so a member that hangs does not take it all.
            let budget = self.leadership.remaining().unwrap_or(interval).clamp(interval, KEEP_ALIVE_BUDGET);
            let outcome = match self.inner.send("keep-alive", request, Retry::Idempotent, budget).await {
                Ok(Reply::Done) => KeepAliveOutcome::Opened,
                Ok(Reply::NoSession { .. }) => KeepAliveOutcome::LeaseNotFound,
                Ok(_) | Err(_) => KeepAliveOutcome::Broken,
            };
            match self.rules.after(sent, &outcome) {
                KeepAliveAction::GiveUp { reason } => return reason,
                KeepAliveAction::Extend { deadline, next_in: next } => {
                    self.leadership.extend_until(deadline);
                    next_in = next;
                }
                KeepAliveAction::Reopen { after } => next_in = after,
            }
        }
    }
}

/// Every member's view of the group (`MemberStatus`), each asked with `timeout`; a member that
/// does not answer gives its error. For `keel cluster`.
pub async fn member_statuses(
    members: &[(u64, String)],
    timeout: Duration,
) -> Vec<(u64, String, Result<pb::HaMemberStatusResponse>)> {
    let asks = members.iter().map(|(id, address)| async move {
        let status = async {
            let mut client = super::member::client(address)?;
            match tokio::time::timeout(timeout, client.member_status(pb::HaMemberStatusRequest {})).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(status)) => Err(KeelError::from_status(&status, address)),
                Err(_) => Err(KeelError::unavailable(address, format!("no answer within {timeout:?}"))),
            }
        };
        (*id, address.clone(), status.await)
    });
    futures::future::join_all(asks).await
}

fn leader_info(event: &pb::HaLeaderEvent) -> Option<LeaderInfo> {
    event.address.as_ref().map(|a| LeaderInfo { address: a.clone(), epoch: event.epoch })
}

#[async_trait]
impl HaServices for RaftHaServices {
    fn backend_name(&self) -> &'static str {
        "raft"
    }

    async fn campaign(&self, role: Role, address: &str, shutdown: &CancellationToken) -> Result<Leadership> {
        let cancelled = || KeelError::Cancelled { reason: format!("campaign for {role} leadership stopped") };
        let key = self.leader_key(role);
        let mut backoff = Backoff::new();
        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(cancelled()),
                step = self.campaign_step(role, address) => step,
            };
            match step {
                Ok(Some(leadership)) => return Ok(leadership),
                Ok(None) => {
                    backoff.reset();
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(cancelled()),
                        _ = self.wait_for_vacancy(&key) => {}
                    }
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(role = %role, error = %e, "campaign step failed, retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(cancelled()),
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
                Err(e) => return Err(e),
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
        let resign = Command::Resign { leader: self.leader_key(leadership.role), epoch: leadership.epoch };
        self.propose("resign", resign, Retry::Idempotent).await?;
        if let Some(held) = held {
            held.token.cancel();
            self.revoke(held.session).await;
        }
        tracing::info!(role = %leadership.role, epoch = leadership.epoch, "raft leadership resigned");
        Ok(())
    }

    async fn leader(&self, role: Role) -> Result<Option<LeaderInfo>> {
        match self.read("read leader", Query::Leader { leader: self.leader_key(role) }).await? {
            Reply::Leader { leader } => Ok(leader),
            other => Err(unexpected("read leader", &other)),
        }
    }

    fn watch_leader(&self, role: Role, shutdown: CancellationToken) -> watch::Receiver<Option<LeaderInfo>> {
        let (tx, rx) = watch::channel(None);
        let inner = self.inner.clone();
        let key = self.leader_key(role);
        tokio::spawn(async move {
            let publish = |current: Option<LeaderInfo>| {
                tx.send_if_modified(|v| {
                    let changed = *v != current;
                    *v = current;
                    changed
                });
            };
            let mut backoff = Backoff::new();
            let n = inner.members.len();
            let mut i = inner.preferred.load(Ordering::Relaxed);
            loop {
                // A linearizable read first (and every RECHECK): a member's watch shows what it
                // applied, which a member cut off from the group may not have.
                let read = inner.send(
                    "read leader",
                    Request::Read(Query::Leader { leader: key.clone() }),
                    Retry::Idempotent,
                    inner.request_timeout,
                );
                let read = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = read => r,
                };
                match read {
                    Ok(Reply::Leader { leader }) => publish(leader),
                    Ok(other) => {
                        tracing::warn!(role = %role, reply = ?other, "unexpected answer to a leader read")
                    }
                    Err(e) => tracing::debug!(role = %role, error = %e, "leader read failed"),
                }
                let (address, client) = &inner.members[i % n];
                let mut client = client.clone();
                let follow = async {
                    let stream = client.watch_leader(pb::HaWatchLeaderRequest { leader: key.clone() }).await;
                    let mut stream = match stream {
                        Ok(s) => s.into_inner(),
                        Err(e) => return Err(KeelError::from_status(&e, address)),
                    };
                    loop {
                        match stream.message().await {
                            Ok(Some(event)) => publish(leader_info(&event)),
                            Ok(None) => return Err(KeelError::unavailable(address, "leader watch ended")),
                            Err(e) => return Err(KeelError::from_status(&e, address)),
                        }
                    }
                };
                let result = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = follow => r,
                    _ = tokio::time::sleep(RECHECK) => Ok::<(), KeelError>(()),
                };
                if let Err(e) = result {
                    tracing::debug!(role = %role, member = %address, error = %e, "leader watch interrupted");
                    i += 1;
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                } else {
                    backoff.reset();
                }
            }
        });
        rx
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_key(key)?;
        match self.read("get", Query::Get { key: self.meta_key(key) }).await? {
            Reply::Value { value } => Ok(value),
            other => Err(unexpected("get", &other)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        validate_prefix(prefix)?;
        let root = self.meta_key("");
        match self.read("list", Query::List { prefix: self.meta_key(prefix) }).await? {
            Reply::List { entries } => Ok(entries
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(root.as_str()).map(|k| (k.to_string(), v)))
                .collect()),
            other => Err(unexpected("list", &other)),
        }
    }

    async fn put(&self, leadership: &Leadership, key: &str, value: Vec<u8>) -> Result<()> {
        validate_key(key)?;
        let command = Command::Put { fence: self.fence(leadership), key: self.meta_key(key), value };
        match self.fenced("fenced put", leadership, command, Retry::Idempotent).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("put", &other)),
        }
    }

    async fn delete(&self, leadership: &Leadership, key: &str) -> Result<()> {
        validate_key(key)?;
        let command = Command::Delete { fence: self.fence(leadership), key: self.meta_key(key) };
        match self.fenced("fenced delete", leadership, command, Retry::Idempotent).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("delete", &other)),
        }
    }

    async fn increment(&self, leadership: &Leadership, key: &str) -> Result<u64> {
        validate_key(key)?;
        let command = Command::Increment { fence: self.fence(leadership), key: self.meta_key(key) };
        match self.fenced("fenced increment", leadership, command, Retry::IfNotSent).await? {
            Reply::Counter { value } => Ok(value),
            Reply::NotACounter { key } => {
                Err(KeelError::ha(format!("counter {key} in the raft store is not a decimal number")))
            }
            other => Err(unexpected("increment", &other)),
        }
    }
}
