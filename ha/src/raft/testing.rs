//! Test support: a Raft group of in-process members on loopback ([`LocalGroup`]), for the crate's
//! own tests and `ha/tests/`. Not used by Keel's processes.
#![doc(hidden)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_proto::{KeelError, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::member::Member;
use super::node::{MemberSettings, MemberStatus, Timing};
use super::RaftHaServices;

/// Generous bound on anything the group waits for.
pub(crate) const LONG: Duration = Duration::from_secs(30);

pub(crate) fn err(e: impl std::fmt::Display) -> KeelError {
    KeelError::internal(e)
}

/// Polls `probe` every 20 ms until it gives a value, up to [`LONG`].
pub(crate) async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(err(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A member with its server, startable again from its directory on the same port.
pub struct Running {
    pub member: Member,
    server: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

/// Members of one Raft group in this process, each with its gRPC service on loopback and its data
/// under a directory of the caller's. Test support (the crate's tests, `ha/tests/`).
pub struct LocalGroup {
    settings: Vec<MemberSettings>,
    pub running: Vec<Option<Running>>,
}

impl LocalGroup {
    /// Starts `n` members (ids 1..=n) with their data under `dir`.
    pub async fn start(dir: &std::path::Path, n: usize, timing: Timing) -> Result<LocalGroup> {
        let mut listeners = Vec::new();
        let mut members = BTreeMap::new();
        for i in 0..n {
            let l = TcpListener::bind("127.0.0.1:0").await.map_err(err)?;
            let id = u64::try_from(i).map_err(err)? + 1;
            members.insert(id, l.local_addr().map_err(err)?.to_string());
            listeners.push(l);
        }
        let settings: Vec<MemberSettings> = members
            .keys()
            .map(|&id| MemberSettings {
                id,
                members: members.clone(),
                dir: dir.join(format!("raft-{id}")),
                timing,
            })
            .collect();
        let mut group = LocalGroup { settings, running: Vec::new() };
        for (i, l) in listeners.into_iter().enumerate() {
            let r = group.serve(i, l)?;
            group.running.push(Some(r));
        }
        Ok(group)
    }

    fn serve(&self, i: usize, listener: TcpListener) -> Result<Running> {
        let member = Member::start(self.settings[i].clone(), crate::clock::system())?;
        let stop = CancellationToken::new();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder().add_service(member.server());
        let until = stop.clone();
        let server = tokio::spawn(async move {
            let _ = server.serve_with_incoming_shutdown(incoming, until.cancelled_owned()).await;
        });
        Ok(Running { member, server, stop })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.settings[0].members.values().cloned().collect()
    }

    /// Stops member `i` (its server and its Ready loop); its directory stays.
    pub async fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut r) = self.running[i].take() {
            r.stop.cancel();
            r.server.abort();
            let _ = r.server.await;
            r.member.stop();
            r.member.stopped().await?;
        }
        Ok(())
    }

    /// Starts member `i` again from its directory, on its address.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let address = self.settings[i].members[&self.settings[i].id].clone();
        let listener = tokio::time::timeout(LONG, async {
            loop {
                match TcpListener::bind(&address).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .map_err(|_| err(format!("cannot listen on {address} again")))?;
        let r = self.serve(i, listener)?;
        self.running[i] = Some(r);
        Ok(())
    }

    pub fn freeze(&self, i: usize, frozen: bool) {
        if let Some(r) = &self.running[i] {
            r.member.frozen.store(frozen, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn isolate(&self, i: usize, cut_off: bool) {
        if let Some(r) = &self.running[i] {
            r.member.isolation.set(cut_off);
        }
    }

    pub async fn status(&self, i: usize) -> Option<MemberStatus> {
        match &self.running[i] {
            Some(r) => r.member.node.status().await.ok(),
            None => None,
        }
    }

    /// Waits until a running, not isolated member leads; returns it.
    pub async fn leader(&self) -> Result<usize> {
        wait_for("a raft leader", || async {
            for i in 0..self.running.len() {
                let cut_off = self.running[i].as_ref().is_none_or(|r| {
                    r.member.isolation.is_set() || r.member.frozen.load(std::sync::atomic::Ordering::SeqCst)
                });
                if cut_off {
                    continue;
                }
                if self.status(i).await.is_some_and(|s| s.state == "leader") {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    pub async fn client(&self, ttl: Duration) -> Result<RaftHaServices> {
        RaftHaServices::connect(&self.addresses(), "test", ttl, Duration::from_secs(10)).await
    }
}

impl Drop for LocalGroup {
    /// Stops every member's server and Ready loop (their threads would outlive the test).
    fn drop(&mut self) {
        for r in self.running.iter().flatten() {
            r.stop.cancel();
            r.server.abort();
            r.member.stop();
        }
    }
}
