//! The task that keeps one etcd leadership alive: keep-alives, a watch on the leader key, and
//! the deadline. What to do after each keep-alive is decided in [`crate::election`].

use etcd_client::EventType;
use keel_proto::{KeelError, Result};

use super::conn::{describe, header_revision, is_lease_not_found, Conn};
use crate::election::{
    self, leader_key_change, Backoff, BeforeSend, KeepAlive, KeepAliveAction, KeepAliveOutcome, LeaderKey,
};
use crate::Leadership;

/// Keeps one leadership alive: keep-alives, and a watch on the leader key.
pub(super) struct Keeper {
    pub(super) conn: Conn,
    pub(super) key: String,
    pub(super) lease: i64,
    /// What to do after each keep-alive ([`crate::election`]).
    pub(super) rules: KeepAlive,
    pub(super) leadership: Leadership,
}

impl Keeper {
    pub(super) async fn run(self) {
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
        election::watch_deadline(&self.leadership).await
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
