//! Keel's Kafka connector: a source reader and a sink writer with the option names and the
//! semantics of Flink's Kafka connector.
//!
//! Layout:
//! - [`options`]: the connector options of a job spec (`topic`, `properties.*`, `scan.*`,
//!   `sink.*`), checked and typed: [`KafkaSourceOptions`], [`KafkaSinkOptions`].
//! - [`assign`](mod@assign): which subtask reads which partition ([`assign()`], [`owner`]) and the
//!   uneven-spread warning ([`spread_warning`]). Pure functions, no broker.
//! - [`position`]: [`SourcePosition`], the next offset of each partition: a source's checkpoint
//!   state.
//! - [`source`]: [`KafkaSourceReader`]: start offsets, polling, partition discovery, offset
//!   commits on checkpoint completion.
//! - [`sink`]: [`KafkaSinkWriter`]: partitioners and delivery guarantees.
//! - [`eos`]: [`ExactlyOnceSink`]: `exactly-once` on Kafka transactions, with [`spool`] files
//!   that let a restored task write again what a dead attempt pre-committed.
//! - [`txn_timeout`]: the submission check of an exactly-once sink's `transaction.timeout.ms`
//!   against the broker's `transaction.max.timeout.ms` and the checkpoint interval.
//! - [`metrics`]: the source and sink metrics (Flink's names) as atomics, and their snapshots.
//!
//! Both the reader and the writer are synchronous: every call may block on the network (up to
//! the configured timeouts). Run them on a thread of their own (or `spawn_blocking`), never on
//! an async runtime's worker.
//!
//! Every error is a [`keel_proto::KeelError`]: bad options are `InvalidSpec` naming the field
//! (`sources[0].scan.startup.mode`), an unreachable cluster is `Unavailable` naming the
//! bootstrap servers, and broker-side failures name the topic and partition.

pub mod assign;
pub mod eos;
pub mod metrics;
pub mod options;
pub mod position;
pub mod sink;
pub mod source;
pub mod spool;
pub mod txn_timeout;

mod client;
mod fetch;

pub use assign::{assign, owner, spread_warning, TopicPartition};
pub use eos::{ExactlyOnceSink, ExactlyOnceState, SegmentState};
pub use metrics::{
    KafkaSinkMetrics, KafkaSourceMetrics, PartitionMetricsSnapshot, SinkMetricsSnapshot,
    SourceMetricsSnapshot,
};
pub use options::{
    DeliveryGuarantee, KafkaSinkOptions, KafkaSourceOptions, OffsetReset, SinkPartitioner, StartupMode,
    Subscription, TopicSelection,
};
pub use position::SourcePosition;
pub use sink::KafkaSinkWriter;
pub use source::{KafkaRecord, KafkaSourceReader, SourceHeaders, SourceMessage, TimestampType};
pub use txn_timeout::{broker_transaction_max_timeout, check_transaction_timeout, transaction_timeout};
