//! [`SourcePosition`]: where a Kafka source stands, the state it checkpoints.
//!
//! The type lives in `keel-state` (the one home of checkpoint state, which the JobManager
//! uses to redistribute partitions in a rescale); it is re-exported here.

pub use keel_state::kafka::SourcePosition;
