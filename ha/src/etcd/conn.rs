//! The etcd connection: the client, the endpoints named in errors, and requests sent again
//! when that is safe ([`Retry`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, GetOptions, GetResponse, LeaseGrantResponse, ResponseHeader, Txn, TxnResponse, WatchOptions,
    WatchStream,
};
use keel_proto::{KeelError, Result};

use crate::election::BACKOFF_MIN;
use crate::keys::error_chain;

/// The shortest time one attempt of an idempotent request gets before it is sent again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The etcd client with the endpoint list (for error messages) and the per-request timeout.
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) endpoints: Arc<str>,
    pub(super) request_timeout: Duration,
}

/// Formats an etcd client error with its causes (the client's own `Display` drops them).
pub(super) fn describe(e: &etcd_client::Error) -> String {
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
pub(super) fn is_unreachable(e: &etcd_client::Error) -> bool {
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

pub(super) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        _ => false,
    }
}

pub(super) fn header_revision(header: Option<&ResponseHeader>) -> Result<i64> {
    header.map(|h| h.revision()).ok_or_else(|| KeelError::ha("etcd answered without a response header"))
}

/// Which failed requests [`Conn::call`] may send again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
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
pub(super) fn is_not_sent(e: &etcd_client::Error) -> bool {
    let source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        _ => None,
    };
    crate::refused_before_sending(source)
}

impl Conn {
    pub(super) fn error(&self, what: &str, e: &etcd_client::Error) -> KeelError {
        if is_unreachable(e) {
            KeelError::unavailable(self.endpoints.to_string(), format!("etcd {what}: {}", describe(e)))
        } else {
            KeelError::ha(format!("etcd {what} (endpoints {}): {}", self.endpoints, describe(e)))
        }
    }

    pub(super) fn timed_out(&self, what: &str) -> KeelError {
        KeelError::unavailable(
            self.endpoints.to_string(),
            format!("etcd {what}: no answer within {:?}", self.request_timeout),
        )
    }

    /// Runs an etcd request (built anew by `request` for every attempt) until it succeeds,
    /// fails in a way `retry` does not cover, or the request timeout has passed.
    pub(super) async fn call<T, F, Fut>(&self, what: &str, retry: Retry, mut request: F) -> Result<T>
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

    pub(super) async fn get(&self, key: &str, options: Option<GetOptions>) -> Result<GetResponse> {
        self.call("get", Retry::Idempotent, || {
            let mut c = self.client.clone();
            let (key, options) = (key.to_string(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    pub(super) async fn txn(&self, what: &str, retry: Retry, txn: Txn) -> Result<TxnResponse> {
        self.call(what, retry, || {
            let mut c = self.client.clone();
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub(super) async fn grant(&self, ttl_secs: i64) -> Result<LeaseGrantResponse> {
        self.call("lease grant", Retry::IfNotSent, || {
            let mut c = self.client.clone();
            async move { c.lease_grant(ttl_secs, None).await }
        })
        .await
    }

    /// Revokes a lease; a lease that is already gone counts as revoked.
    pub(super) async fn revoke(&self, lease: i64) -> Result<()> {
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
    pub(super) async fn watch(&self, key: &str, start_revision: i64) -> Result<WatchStream> {
        self.call("watch", Retry::Idempotent, || {
            let mut c = self.client.clone();
            let key = key.to_string();
            let options = WatchOptions::new().with_start_revision(start_revision);
            async move { c.watch(key, Some(options)).await }
        })
        .await
    }
}
