//! RPC clients that find a role's leader and follow it.
//!
//! Layout:
//! - [`channel`]: a lazily connected tonic channel to one address, with a connect timeout.
//! - [`LeaderClient`]: calls the leader of a role. It learns the leader from the HA services'
//!   leader watch (or from a static address list, for clients without HA access), follows
//!   `NotLeader` redirects to the address they carry, and retries while the cluster is between
//!   leaders, up to a deadline. A call in flight to a leader that the HA services replace is
//!   abandoned and sent to the new leader at once: a paused or cut-off leader never answers,
//!   and its connection would otherwise hold the call until the HTTP/2 keep-alive gives up
//!   (10 + 5 s). Its errors name the address that was tried.
//! - [`detector`]: failure detection by RPC outcome (`heartbeat.rpc-failure-threshold`): peers
//!   that consecutive calls could not reach are declared lost.

pub mod detector;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_ha::{HaServices, LeaderInfo, Role};
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily connected channel to `address` (`host:port`). Connection errors surface on the first
/// call as `Unavailable` statuses.
pub fn channel(address: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| KeelError::InvalidArgument { reason: format!("bad address {address:?}: {e}") })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_lazy())
}

/// Rebuilds the typed error of a failed call, with the transport cause when there is one.
pub fn status_error(status: &tonic::Status, address: &str) -> KeelError {
    let mut err = KeelError::from_status(status, address);
    if let KeelError::Unavailable { reason, .. } = &mut err {
        let chain = keel_proto::error_chain(status);
        if let Some(causes) = chain.strip_prefix(&status.to_string()) {
            reason.push_str(causes);
        }
    }
    err
}

/// Channels by address, shared by the clients of one process.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    pub fn get(&self, address: &str) -> Result<Channel> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = channel(address)?;
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets the channel to `address` (after the peer went away), so the next call reconnects.
    pub fn forget(&self, address: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(address);
    }
}

/// Calls the leader of one role, wherever it is.
#[derive(Clone)]
pub struct LeaderClient {
    role: Role,
    leader: Option<watch::Receiver<Option<LeaderInfo>>>,
    fallback: Vec<String>,
    redirect: Arc<Mutex<Option<String>>>,
    channels: Channels,
    retry_for: Duration,
}

impl LeaderClient {
    /// A client that learns the leader from the HA services. The watch runs until `shutdown`.
    pub fn from_ha(role: Role, ha: &Arc<dyn HaServices>, shutdown: CancellationToken) -> Self {
        LeaderClient {
            role,
            leader: Some(ha.watch_leader(role, shutdown)),
            fallback: Vec::new(),
            redirect: Arc::new(Mutex::new(None)),
            channels: Channels::default(),
            retry_for: Duration::from_secs(30),
        }
    }

    /// A client that learns the leader from `leader` (a leader watch such as
    /// [`HaServices::watch_leader`] returns).
    pub fn from_leader_watch(role: Role, leader: watch::Receiver<Option<LeaderInfo>>) -> Self {
        LeaderClient {
            role,
            leader: Some(leader),
            fallback: Vec::new(),
            redirect: Arc::new(Mutex::new(None)),
            channels: Channels::default(),
            retry_for: Duration::from_secs(30),
        }
    }

    /// A client for a fixed list of addresses (any of them may redirect to the leader).
    pub fn from_addresses(role: Role, addresses: Vec<String>) -> Self {
        LeaderClient {
            role,
            leader: None,
            fallback: addresses,
            redirect: Arc::new(Mutex::new(None)),
            channels: Channels::default(),
            retry_for: Duration::from_secs(30),
        }
    }

    /// Adds addresses to try when the HA services name no leader.
    pub fn with_fallback(mut self, addresses: Vec<String>) -> Self {
        self.fallback = addresses;
        self
    }

    /// How long a call keeps retrying while no leader answers (default 30 s).
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The leader as currently known (from the HA watch), if any.
    pub fn known_leader(&self) -> Option<LeaderInfo> {
        self.leader.as_ref().and_then(|w| w.borrow().clone())
    }

    /// A receiver of leader changes (None for a static client).
    pub fn leader_watch(&self) -> Option<watch::Receiver<Option<LeaderInfo>>> {
        self.leader.clone()
    }

    /// The addresses to try, in order: the leader the HA services name (the authority: a
    /// previous leader that answered last may since have been replaced and be cut off, and a
    /// call to it would hang until its timeout), then the last address that answered or that a
    /// `NotLeader` redirect named (the HA view may lag a moment behind a new election), then the
    /// configured fallback addresses.
    ///
    /// When the named leader answers `NotLeader` (it won a moment ago and does not serve yet),
    /// the round ends there and is tried again shortly: the addresses after it may include the
    /// previous leader, cut off, and a call to it would hang until the connect timeout. They are
    /// tried when the named leader cannot be reached (or is not named).
    fn candidates(&self) -> Vec<String> {
        let mut out = Vec::new();
        let named = self.known_leader();
        if let Some(info) = &named {
            out.push(info.address.clone());
        }
        if let Some(r) = self.redirect.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            if !out.contains(&r) {
                out.push(r);
            }
        }
        for a in &self.fallback {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Calls `f` against the leader. `f` gets a channel to it. Retries on `NotLeader`
    /// (following the address it carries) and on `Unavailable` until the retry deadline; other
    /// errors are returned at once. When the HA services name a new leader while a call is in
    /// flight to another address, that call is dropped (the server sees it cancelled) and `f`
    /// is called again against the new leader: the request must be safe to send twice, which
    /// the leaders' requests are (idempotent, or fenced by the leader's epoch so that a replaced
    /// leader cannot apply them).
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(50);
        let mut last_err: Option<KeelError> = None;
        loop {
            let candidates = self.candidates();
            if candidates.is_empty() {
                last_err = Some(KeelError::NotLeader { role: self.role.to_string(), leader: None });
            }
            let mut moved = false;
            for address in candidates {
                let channel = self.channels.get(&address)?;
                let result = tokio::select! {
                    r = f(channel) => r,
                    new = replaced(self.leader.clone(), &address) => {
                        tracing::info!(role = %self.role, from = %address, to = %new.address, epoch = new.epoch,
                            "leader replaced while a call was in flight; calling the new leader");
                        {
                            let mut r = self.redirect.lock().unwrap_or_else(|p| p.into_inner());
                            if r.as_deref() == Some(address.as_str()) {
                                *r = None;
                            }
                        }
                        // The connection may hang (a stopped process); the next call to that
                        // address connects afresh.
                        self.channels.forget(&address);
                        last_err = Some(KeelError::NotLeader { role: self.role.to_string(), leader: Some(new.address) });
                        moved = true;
                        break;
                    }
                };
                match result {
                    Ok(v) => {
                        // Remembered only when the HA services do not name this address: once
                        // they name another leader, the one that answered is no longer tried.
                        let named = self.known_leader().is_some_and(|l| l.address == address);
                        *self.redirect.lock().unwrap_or_else(|p| p.into_inner()) =
                            (!named).then(|| address.clone());
                        return Ok(v);
                    }
                    Err(status) => {
                        let err = status_error(&status, &address);
                        let named = self.known_leader().is_some_and(|l| l.address == address);
                        match &err {
                            KeelError::NotLeader { leader, .. }
                                if named && leader.as_deref().is_none_or(|l| l == address) =>
                            {
                                tracing::debug!(role = %self.role, %address, "the named leader does not serve yet; retrying it");
                                last_err = Some(err);
                                break;
                            }
                            KeelError::NotLeader { leader: Some(l), .. } if *l != address => {
                                tracing::debug!(role = %self.role, from = %address, to = %l, "following leader redirect");
                                *self.redirect.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
                            }
                            _ if err.is_retryable() => {
                                let mut r = self.redirect.lock().unwrap_or_else(|p| p.into_inner());
                                if r.as_deref() == Some(address.as_str()) {
                                    *r = None;
                                }
                            }
                            _ => return Err(err),
                        }
                        last_err = Some(err);
                    }
                }
            }
            if moved && tokio::time::Instant::now() < deadline {
                continue;
            }
            // A redirect learned in this round is tried at once.
            if let Some(KeelError::NotLeader { leader: Some(_), .. }) = &last_err {
                if tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    // Avoid spinning between two standbys that point at each other.
                    last_err = last_err.map(|e| match e {
                        KeelError::NotLeader { role, .. } => KeelError::NotLeader { role, leader: None },
                        e => e,
                    });
                    continue;
                }
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(last_err
                    .unwrap_or_else(|| KeelError::NotLeader { role: self.role.to_string(), leader: None }));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Resolves with the new leader when the HA services name a leader other than `address` and
/// other than the one they named when this was first polled (the start of a call to
/// `address`); never without a leader watch.
async fn replaced(watch: Option<watch::Receiver<Option<LeaderInfo>>>, address: &str) -> LeaderInfo {
    let Some(mut rx) = watch else { return std::future::pending().await };
    let initial = rx.borrow_and_update().clone();
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = rx.borrow_and_update().clone();
        if let Some(leader) = now {
            if leader.address != address && Some(&leader) != initial.as_ref() {
                return leader;
            }
        }
    }
}

/// Binds a listener for a gRPC server on `host:port` (port 0 picks a free one) and returns it
/// with the address to advertise (`host:actual_port`).
pub async fn bind(host: &str, port: u16) -> Result<(tokio_stream::wrappers::TcpListenerStream, String)> {
    let wanted = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&wanted)
        .await
        .map_err(|e| KeelError::unavailable(&wanted, format!("cannot listen: {e}")))?;
    let actual = listener
        .local_addr()
        .map_err(|e| KeelError::unavailable(&wanted, format!("cannot read bound address: {e}")))?;
    let advertised = format!("{host}:{}", actual.port());
    Ok((tokio_stream::wrappers::TcpListenerStream::new(listener), advertised))
}

/// Tracks the highest epoch seen from the leader of one role, and fences out lower ones.
#[derive(Debug)]
pub struct EpochFence {
    role: Role,
    seen: std::sync::atomic::AtomicU64,
}

impl EpochFence {
    pub fn new(role: Role) -> Self {
        EpochFence { role, seen: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Accepts `epoch` if it is at least the highest seen (and remembers it); otherwise a typed
    /// `StaleEpoch` error.
    pub fn check(&self, epoch: u64) -> Result<()> {
        let prev = self.seen.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        if epoch < prev {
            return Err(KeelError::StaleEpoch { role: self.role.to_string(), received: epoch, seen: prev });
        }
        Ok(())
    }

    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::pb::{job_manager_client::JobManagerClient, LeaderInfoRequest};

    /// A call in flight to a leader that never answers (a stopped process: the kernel accepts
    /// the connection, nothing reads it) is abandoned when the HA services name a new leader,
    /// and sent to the new leader at once; a leader named again at the same address (a new
    /// epoch of the same process) does not abandon the call.
    #[tokio::test]
    async fn call_in_flight_moves_to_the_new_leader_when_the_leader_is_replaced() {
        // The "stopped" leader: bound and listening, never accepting.
        let stopped = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stopped_addr = stopped.local_addr().expect("addr").to_string();
        // The new leader: accepts, and tells the test.
        let next = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let next_addr = next.local_addr().expect("addr").to_string();

        let (tx, rx) = watch::channel(Some(LeaderInfo { address: stopped_addr.clone(), epoch: 3 }));
        let client = LeaderClient::from_leader_watch(Role::JobManager, rx);
        let call = tokio::spawn(async move {
            client
                .call(|ch| async move { JobManagerClient::new(ch).leader_info(LeaderInfoRequest {}).await })
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!call.is_finished(), "the stopped leader cannot answer");

        // Same address, new epoch: the call stays where it is.
        tx.send_replace(Some(LeaderInfo { address: stopped_addr.clone(), epoch: 4 }));
        let early = tokio::time::timeout(Duration::from_millis(300), next.accept()).await;
        assert!(early.is_err(), "no call may reach another address while the leader is unchanged");

        tx.send_replace(Some(LeaderInfo { address: next_addr.clone(), epoch: 9 }));
        let accepted = tokio::time::timeout(Duration::from_secs(5), next.accept()).await;
        assert!(accepted.is_ok(), "the call must be sent to the new leader at once");
        call.abort();
        drop(stopped);
    }

    /// The address that answered last (the previous leader) is not tried before the leader the
    /// HA services name: if it was, a call to an old leader that is cut off (accepts nothing,
    /// refuses nothing) would hang until its timeout although the new leader is known.
    #[tokio::test]
    async fn the_leader_named_by_ha_is_called_before_the_address_that_answered_last() {
        let stopped = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stopped_addr = stopped.local_addr().expect("addr").to_string();
        let next = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let next_addr = next.local_addr().expect("addr").to_string();

        let (_tx, rx) = watch::channel(Some(LeaderInfo { address: next_addr.clone(), epoch: 5 }));
        let client = LeaderClient::from_leader_watch(Role::JobManager, rx);
        // The old leader answered the previous call.
        *client.redirect.lock().unwrap_or_else(|p| p.into_inner()) = Some(stopped_addr.clone());
        assert_eq!(client.candidates(), vec![next_addr.clone(), stopped_addr.clone()]);
        let call = tokio::spawn(async move {
            client
                .call(|ch| async move { JobManagerClient::new(ch).leader_info(LeaderInfoRequest {}).await })
                .await
        });
        let accepted = tokio::time::timeout(Duration::from_secs(5), next.accept()).await;
        assert!(accepted.is_ok(), "the call must go to the leader the HA services name first");
        call.abort();
        drop(stopped);
    }
}
