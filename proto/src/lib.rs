//! Keel's wire protocol.
//!
//! Layout:
//! - [`pb`]: the messages and the three services (ResourceManager, JobManager, TaskManager)
//!   generated from `proto/keel.proto`.
//! - [`error`]: [`KeelError`], the typed error every service returns; it crosses gRPC as a JSON
//!   detail in the status, so a client gets back the same variant the server raised.
//! - [`state`]: job and task states and their names.

pub mod error;
pub mod state;

#[allow(clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("keel.v1");
}

pub use error::{error_chain, KeelError, Result};
pub use state::{JobState, TaskStateExt};
