//! The one error type of Keel's services, and its mapping to and from `tonic::Status`.
//!
//! A [`KeelError`] is sent as a `tonic::Status` whose code says the broad class (so that generic
//! gRPC tooling still understands it) and whose details carry the error itself as JSON. The
//! receiving side rebuilds the very same variant with [`KeelError::from_status`], so a "not leader"
//! error still carries the leader's address and a stale-epoch error still carries both epochs.

use serde::{Deserialize, Serialize};

pub type Result<T, E = KeelError> = std::result::Result<T, E>;

/// Every error kind a Keel service can return over RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeelError {
    /// The call reached a standby. `leader` is the current leader's address when known.
    #[error("this {role} is not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { role: String, leader: Option<String> },

    /// A leader's request carried an epoch lower than one the receiver has already seen: the
    /// sender was deposed.
    #[error("stale {role} epoch {received}: the receiver has already seen epoch {seen}")]
    StaleEpoch { role: String, received: u64, seen: u64 },

    /// A job spec failed validation; `field` is the path of the offending field.
    #[error("invalid job spec: {field}: {reason}")]
    InvalidSpec { field: String, reason: String },

    /// A slot request could not be served in time.
    #[error(
        "not enough slots for job {job}: {needed} needed, {free} free ({total} in the cluster); \
         gave up after {waited_ms} ms (slot.request.timeout)"
    )]
    NotEnoughSlots { job: String, needed: u32, free: u32, total: u32, waited_ms: u64 },

    #[error("job not found: {job}")]
    JobNotFound { job: String },

    #[error("{what} already exists")]
    AlreadyExists { what: String },

    /// A request that is well-formed but does not fit the receiver's current state.
    #[error("{reason}")]
    FailedPrecondition { reason: String },

    #[error("invalid request: {reason}")]
    InvalidArgument { reason: String },

    /// A peer could not be reached.
    #[error("cannot reach {address}: {reason}")]
    Unavailable { address: String, reason: String },

    /// The HA services (etcd or the local store) failed or refused a write.
    #[error("HA services: {reason}")]
    Ha { reason: String },

    /// A leader-only write was refused because leadership was lost.
    #[error("leadership lost: {reason}")]
    LeadershipLost { reason: String },

    /// A checkpoint acknowledgement was refused: the checkpoint is not pending (unknown,
    /// expired, failed, abandoned) or the task is not part of the job's current attempt.
    #[error("checkpoint {checkpoint_id} of job {job_id} rejected: {reason}")]
    CheckpointRejected { job_id: String, checkpoint_id: u64, reason: String },

    #[error("operation cancelled: {reason}")]
    Cancelled { reason: String },

    #[error("internal error: {reason}")]
    Internal { reason: String },
}

const DETAIL_PREFIX: &[u8] = b"keel-error:";

/// Formats an error with its whole cause chain (`a: b: c`), skipping causes whose text the
/// outer message already contains. Never format an error without its causes.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

impl KeelError {
    pub fn not_leader(role: impl Into<String>, leader: Option<String>) -> Self {
        KeelError::NotLeader { role: role.into(), leader }
    }

    pub fn invalid_spec(field: impl Into<String>, reason: impl Into<String>) -> Self {
        KeelError::InvalidSpec { field: field.into(), reason: reason.into() }
    }

    pub fn internal(reason: impl std::fmt::Display) -> Self {
        KeelError::Internal { reason: reason.to_string() }
    }

    pub fn ha(reason: impl std::fmt::Display) -> Self {
        KeelError::Ha { reason: reason.to_string() }
    }

    pub fn precondition(reason: impl Into<String>) -> Self {
        KeelError::FailedPrecondition { reason: reason.into() }
    }

    pub fn unavailable(address: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        KeelError::Unavailable { address: address.into(), reason: reason.to_string() }
    }

    /// The gRPC status code for this kind.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            KeelError::NotLeader { .. } => Code::Unavailable,
            KeelError::StaleEpoch { .. } => Code::FailedPrecondition,
            KeelError::InvalidSpec { .. } | KeelError::InvalidArgument { .. } => Code::InvalidArgument,
            KeelError::NotEnoughSlots { .. } => Code::ResourceExhausted,
            KeelError::JobNotFound { .. } => Code::NotFound,
            KeelError::AlreadyExists { .. } => Code::AlreadyExists,
            KeelError::FailedPrecondition { .. }
            | KeelError::LeadershipLost { .. }
            | KeelError::CheckpointRejected { .. } => Code::FailedPrecondition,
            KeelError::Unavailable { .. } => Code::Unavailable,
            KeelError::Ha { .. } => Code::Unavailable,
            KeelError::Cancelled { .. } => Code::Cancelled,
            KeelError::Internal { .. } => Code::Internal,
        }
    }

    /// True when the same call may succeed later or against another address.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KeelError::NotLeader { .. } | KeelError::Unavailable { .. } | KeelError::Ha { .. })
    }

    /// Rebuilds the error a Keel server raised. A status that did not come from a Keel server
    /// (a transport error, a proxy) is mapped by its code; `address` names the peer.
    pub fn from_status(status: &tonic::Status, address: &str) -> Self {
        let details = status.details();
        if let Some(json) = details.strip_prefix(DETAIL_PREFIX) {
            if let Ok(err) = serde_json::from_slice::<KeelError>(json) {
                return err;
            }
        }
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                KeelError::Unavailable { address: address.to_string(), reason: message }
            }
            tonic::Code::Cancelled => KeelError::Cancelled { reason: message },
            tonic::Code::InvalidArgument => KeelError::InvalidArgument { reason: message },
            tonic::Code::NotFound => KeelError::JobNotFound { job: message },
            _ => KeelError::Internal { reason: format!("{}: {message}", status.code()) },
        }
    }
}

impl From<KeelError> for tonic::Status {
    fn from(err: KeelError) -> Self {
        let mut details = DETAIL_PREFIX.to_vec();
        // Serialising a plain enum of strings and integers cannot fail; fall back to no detail.
        if let Ok(json) = serde_json::to_vec(&err) {
            details.extend_from_slice(&json);
        }
        tonic::Status::with_details(err.code(), err.to_string(), details.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_trip_through_a_status() {
        let errors = vec![
            KeelError::not_leader("jobmanager", Some("127.0.0.1:6123".into())),
            KeelError::not_leader("resourcemanager", None),
            KeelError::StaleEpoch { role: "jobmanager".into(), received: 3, seen: 7 },
            KeelError::invalid_spec("sources[0].connector", "unknown connector 'kafak'"),
            KeelError::NotEnoughSlots { job: "demo".into(), needed: 4, free: 2, total: 2, waited_ms: 1000 },
            KeelError::JobNotFound { job: "x".into() },
            KeelError::unavailable("127.0.0.1:1", "connection refused"),
            KeelError::CheckpointRejected {
                job_id: "j".into(),
                checkpoint_id: 7,
                reason: "checkpoint 7 expired".into(),
            },
        ];
        for err in errors {
            let status: tonic::Status = err.clone().into();
            assert_eq!(status.code(), err.code());
            assert_eq!(KeelError::from_status(&status, "peer"), err);
        }
    }

    #[test]
    fn a_foreign_status_is_mapped_by_code_and_names_the_peer() {
        let status = tonic::Status::unavailable("connection refused");
        let err = KeelError::from_status(&status, "10.0.0.1:9");
        assert_eq!(
            err,
            KeelError::Unavailable { address: "10.0.0.1:9".into(), reason: "connection refused".into() }
        );
        assert!(err.is_retryable());
    }
}
