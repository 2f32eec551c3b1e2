//! Checkpoint state, in one place for the JobManager and the TaskManager.
//!
//! Layout:
//! - [`snapshot`]: [`TaskSnapshot`], the state of one subtask at a checkpoint: its sources'
//!   splits ([`SourceSnapshot`]) and its sinks' state ([`SinkSnapshot`]). The TaskManager
//!   acknowledges it and restores from it; the JobManager stores and redistributes it.
//! - [`sequence`]: [`SequenceSplit`], the split of a `datagen` sequence (an arithmetic
//!   progression), and [`SequenceReader`], which emits a subtask's splits smallest first.
//! - [`kafka`]: partitions and their owner rule, [`SourcePosition`] (a Kafka source's offsets)
//!   and [`ExactlyOnceState`] (an exactly-once sink's open transactions). The Kafka connector
//!   re-exports them.
//! - [`metadata`]: [`CheckpointMetadata`], the `_metadata` file of a completed checkpoint, and
//!   the restore states it gives an attempt of any parallelism.
//! - [`rescale`]: [`redistribute`], the splits of a checkpoint's subtasks dealt out to another
//!   number of subtasks (a rescale, an upgrade that changes the parallelism, a restore at
//!   another parallelism).
//!
//! No I/O here: every function is pure and tested without a network.
//!
//! Why a crate of its own: these are JSON shapes kept on disk (checkpoint metadata, spool
//! references) and carried as opaque bytes in gRPC (`state_handle`, `restore_state`), not
//! protobuf messages, so they do not belong in `keel-proto` (which only lends its error type);
//! and the JobManager needs the Kafka parts without linking librdkafka, so they cannot stay in
//! `keel-kafka` (which re-exports them).

pub mod kafka;
pub mod metadata;
pub mod rescale;
pub mod sequence;
pub mod snapshot;

pub use kafka::{ExactlyOnceState, SegmentState, SourcePosition, TopicPartition};
pub use metadata::{CheckpointMetadata, SubtaskMetadata};
pub use rescale::redistribute;
pub use sequence::{SequenceReader, SequenceSplit};
pub use snapshot::{SinkSnapshot, SourceSnapshot, TaskSnapshot};

use keel_proto::KeelError;

/// Why checkpoint state cannot be read or redistributed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a task snapshot: {0}")]
    NotASnapshot(String),
    #[error("cannot encode a task snapshot: {0}")]
    Encode(String),
    #[error("checkpoint {checkpoint_id} {reason}")]
    Inconsistent { checkpoint_id: u64, reason: String },
    #[error("the state of source '{source_name}' cannot be redistributed: {reason}")]
    Source { source_name: String, reason: String },
    #[error("a parallelism of 0")]
    ZeroParallelism,
}

impl From<StateError> for KeelError {
    fn from(e: StateError) -> KeelError {
        match e {
            StateError::Encode(_) => KeelError::internal(e.to_string()),
            _ => KeelError::InvalidArgument { reason: e.to_string() },
        }
    }
}
