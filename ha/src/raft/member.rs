//! A Raft member as a process role (`keel ha-member`): the gRPC service other members and the
//! HA clients call, and the transport that carries Raft messages to the other members.
//!
//! Transport: one task per peer takes the Ready loop's messages for that peer from a bounded
//! queue and sends them in one `Raft` call, each message encoded with raft-rs's own prost (0.11)
//! types. A peer that does not answer is reported unreachable to raft-rs (which then probes it
//! instead of streaming to it); a full queue drops messages, which Raft tolerates (it sends
//! again). Members do not authenticate each other: run them on a private network, as etcd
//! without TLS (docs/fencing.md).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use keel_proto::pb;
use keel_proto::pb::ha_member_client::HaMemberClient;
use keel_proto::pb::ha_member_server::{HaMember, HaMemberServer};
use keel_proto::{KeelError, Result};
use prost011::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::machine::{Command, Query, Reply};
use super::node::{Input, LeaderTable, MemberSettings, Node, NodeHandle, Outbox};
use crate::clock::Clock;

/// Batches of messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 256;
/// How long a `Raft` call to a peer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a proposal or read may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connected gRPC client of the member at `address`.
pub fn client(address: &str) -> Result<HaMemberClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| KeelError::InvalidArgument { reason: format!("raft member address {address}: {e}") })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    Ok(HaMemberClient::new(endpoint.connect_lazy()))
}

/// A test seam: while set, the member neither sends nor takes Raft messages, as a member cut off
/// from the other members by a network partition (clients still reach it).
#[derive(Debug, Clone, Default)]
pub struct Isolation(Arc<std::sync::atomic::AtomicBool>);

impl Isolation {
    pub fn set(&self, cut_off: bool) {
        self.0.store(cut_off, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The Ready loop's outbox: a queue per peer, drained by that peer's task.
struct PeerQueues {
    peers: HashMap<u64, mpsc::Sender<Vec<Message>>>,
    node: NodeHandle,
    isolation: Isolation,
}

impl Outbox for PeerQueues {
    fn send(&mut self, messages: Vec<Message>) {
        if self.isolation.is_set() {
            return;
        }
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            let Some(queue) = self.peers.get(&to) else { continue };
            let snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            if queue.try_send(batch).is_err() {
                self.node.report(Input::Unreachable(to));
                if snapshot {
                    self.node.report(Input::SnapshotSent { to, delivered: false });
                }
            }
        }
    }
}

async fn peer_loop(
    from: u64,
    to: u64,
    address: String,
    mut queue: mpsc::Receiver<Vec<Message>>,
    node: NodeHandle,
) {
    let mut client = match client(&address) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(member = from, peer = to, %address, error = %e, "cannot reach raft peer");
            return;
        }
    };
    while let Some(mut batch) = queue.recv().await {
        while let Ok(more) = queue.try_recv() {
            batch.extend(more);
        }
        let snapshot = batch.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let messages = batch.iter().map(|m| m.encode_to_vec()).collect();
        let call = client.raft(pb::RaftMessages { from, messages });
        let delivered = match tokio::time::timeout(PEER_TIMEOUT, call).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => {
                tracing::debug!(member = from, peer = to, %address, error = %status.message(), "raft peer did not take messages");
                false
            }
            Err(_) => {
                tracing::debug!(member = from, peer = to, %address, "raft peer did not answer in time");
                false
            }
        };
        if !delivered {
            node.report(Input::Unreachable(to));
        }
        if snapshot {
            node.report(Input::SnapshotSent { to, delivered });
        }
    }
}

/// The `HaMember` gRPC service of one member.
#[derive(Clone)]
pub struct MemberService {
    node: NodeHandle,
    leaders: watch::Receiver<LeaderTable>,
    isolation: Isolation,
}

fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> std::result::Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::from(KeelError::InvalidArgument { reason: format!("unreadable {what}: {e}") }))
}

fn reply(r: Result<Reply>) -> std::result::Result<Response<pb::HaReply>, Status> {
    let r = r?;
    let bytes = serde_json::to_vec(&r).map_err(|e| Status::from(KeelError::internal(e)))?;
    Ok(Response::new(pb::HaReply { reply: bytes }))
}

impl MemberService {
    fn reachable(&self) -> std::result::Result<(), Status> {
        if self.isolation.is_set() {
            return Err(KeelError::unavailable(&self.node.address, "cut off (test isolation)").into());
        }
        Ok(())
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(KeelError::unavailable(
                &self.node.address,
                format!("no answer from the raft group within {REQUEST_TIMEOUT:?}; the outcome is unknown"),
            )),
        }
    }
}

type LeaderStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::HaLeaderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl HaMember for MemberService {
    async fn raft(
        &self,
        request: Request<pb::RaftMessages>,
    ) -> std::result::Result<Response<pb::RaftMessagesAck>, Status> {
        self.reachable()?;
        let request = request.into_inner();
        let mut messages = Vec::with_capacity(request.messages.len());
        for bytes in &request.messages {
            let m = Message::decode(bytes.as_slice()).map_err(|e| {
                Status::from(KeelError::InvalidArgument {
                    reason: format!("unreadable raft message from member {}: {e}", request.from),
                })
            })?;
            messages.push(m);
        }
        self.node.deliver(messages)?;
        Ok(Response::new(pb::RaftMessagesAck {}))
    }

    async fn propose(
        &self,
        request: Request<pb::HaProposeRequest>,
    ) -> std::result::Result<Response<pb::HaReply>, Status> {
        let command: Command = decode_json(&request.into_inner().command, "command")?;
        reply(self.bounded(self.node.propose(command)).await)
    }

    async fn read(
        &self,
        request: Request<pb::HaReadRequest>,
    ) -> std::result::Result<Response<pb::HaReply>, Status> {
        let query: Query = decode_json(&request.into_inner().query, "query")?;
        reply(self.bounded(self.node.read(query)).await)
    }

    type WatchLeaderStream = LeaderStream;

    async fn watch_leader(
        &self,
        request: Request<pb::HaWatchLeaderRequest>,
    ) -> std::result::Result<Response<Self::WatchLeaderStream>, Status> {
        let leader = request.into_inner().leader;
        let mut rx = self.leaders.clone();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<Option<crate::LeaderInfo>> = None;
            loop {
                let current = rx.borrow_and_update().get(&leader).cloned();
                if last.as_ref() != Some(&current) {
                    let event = pb::HaLeaderEvent {
                        address: current.as_ref().map(|l| l.address.clone()),
                        epoch: current.as_ref().map(|l| l.epoch).unwrap_or(0),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn member_status(
        &self,
        _request: Request<pb::HaMemberStatusRequest>,
    ) -> std::result::Result<Response<pb::HaMemberStatusResponse>, Status> {
        let s = self.node.status().await?;
        Ok(Response::new(pb::HaMemberStatusResponse {
            id: s.id,
            raft_leader: s.raft_leader,
            term: s.term,
            state: s.state.to_string(),
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            disk_bytes: s.disk_bytes,
        }))
    }
}

/// A stream fed by a task through a channel (the task ends when the client goes away).
fn async_stream<F, Fut>(f: F) -> LeaderStream
where
    F: FnOnce(mpsc::Sender<std::result::Result<pb::HaLeaderEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running member: its Ready loop thread, its peer tasks and its service.
pub struct Member {
    pub service: MemberService,
    pub node: NodeHandle,
    /// Test seam: cuts the member off (see [`Isolation`]).
    pub isolation: Isolation,
    /// Test seam: freezes the member's Ready loop (see [`Node::freeze_switch`]).
    pub frozen: Arc<std::sync::atomic::AtomicBool>,
    /// How the Ready loop ended, once it has.
    done: tokio::sync::oneshot::Receiver<Result<()>>,
}

impl Member {
    /// Opens the member's storage and starts its Ready loop and transport. `address` is the
    /// member's own address (for errors and `NOT_LEADER` hints).
    pub fn start(settings: MemberSettings, clock: Arc<dyn Clock>) -> Result<Member> {
        let (node, leaders) = Node::open(&settings, clock)?;
        let frozen = node.freeze_switch();
        let (tx, rx) = std::sync::mpsc::channel();
        let address = settings.members.get(&settings.id).cloned().unwrap_or_default();
        let handle = NodeHandle { tx, address };
        let mut peers = HashMap::new();
        for (&id, address) in &settings.members {
            if id == settings.id {
                continue;
            }
            let (qtx, qrx) = mpsc::channel(PEER_QUEUE);
            peers.insert(id, qtx);
            tokio::spawn(peer_loop(settings.id, id, address.clone(), qrx, handle.clone()));
        }
        let isolation = Isolation::default();
        let outbox = PeerQueues { peers, node: handle.clone(), isolation: isolation.clone() };
        let id = settings.id;
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("raft-member-{id}"))
            .spawn(move || {
                let r = node.run(rx, outbox);
                if let Err(e) = &r {
                    tracing::error!(member = id, error = %e, "raft member stopped");
                }
                let _ = done_tx.send(r);
            })
            .map_err(|e| KeelError::internal(format!("cannot start the raft thread: {e}")))?;
        Ok(Member {
            service: MemberService { node: handle.clone(), leaders, isolation: isolation.clone() },
            node: handle,
            isolation,
            frozen,
            done,
        })
    }

    pub fn server(&self) -> HaMemberServer<MemberService> {
        HaMemberServer::new(self.service.clone())
    }

    /// Waits until the Ready loop ends (after [`Member::stop`], or a storage failure) and
    /// returns how it ended.
    pub async fn stopped(&mut self) -> Result<()> {
        match (&mut self.done).await {
            Ok(r) => r,
            Err(_) => Err(KeelError::internal("the raft thread ended without a word")),
        }
    }

    /// Asks the Ready loop to stop; what is on disk stays.
    pub fn stop(&self) {
        self.node.report(Input::Stop);
    }
}

/// Runs a member process until `shutdown`: serves `HaMember` on `incoming`.
pub async fn run(
    settings: MemberSettings,
    incoming: tokio_stream::wrappers::TcpListenerStream,
    shutdown: CancellationToken,
) -> Result<()> {
    let id = settings.id;
    let mut member = Member::start(settings, crate::clock::system())?;
    tracing::info!(member = id, "raft member started");
    let server_shutdown = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(member.server())
        .serve_with_incoming_shutdown(incoming, async move { server_shutdown.cancelled().await });
    let server = tokio::spawn(server);
    // A member whose storage fails stops: the process ends with the error.
    let ended = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = member.stopped() => Some(r),
    };
    shutdown.cancel();
    let served = match server.await {
        Ok(r) => r.map_err(|e| KeelError::internal(format!("raft member server: {e}"))),
        Err(e) => Err(KeelError::internal(format!("raft member server task: {e}"))),
    };
    match ended {
        Some(r) => r?,
        None => {
            member.stop();
            member.stopped().await?;
        }
    }
    served
}
