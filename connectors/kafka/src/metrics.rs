//! Source and sink metrics with Flink's names, kept in atomics that the reader or writer
//! updates and anyone may read through a snapshot. Rates (`numRecordsInPerSecond`, ...) are
//! derived from the counters by the metrics layer that renders them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::assign::TopicPartition;

/// Milliseconds since the epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const UNKNOWN: i64 = -1;

fn known(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

/// The metrics of one Kafka source reader (Flink's `KafkaSourceReader` group).
#[derive(Debug)]
pub struct KafkaSourceMetrics {
    pub(crate) num_records_in: AtomicU64,
    pub(crate) num_bytes_in: AtomicU64,
    pub(crate) pending_records: AtomicI64,
    pub(crate) fetch_lag_ms: AtomicI64,
    pub(crate) emit_lag_ms: AtomicI64,
    pub(crate) last_record_at_ms: AtomicI64,
    pub(crate) commits_succeeded: AtomicU64,
    pub(crate) commits_failed: AtomicU64,
    partitions: RwLock<BTreeMap<TopicPartition, Arc<PartitionMetrics>>>,
}

/// Per-partition gauges.
#[derive(Debug)]
pub(crate) struct PartitionMetrics {
    pub(crate) current_offset: AtomicI64,
    pub(crate) committed_offset: AtomicI64,
}

/// The source metrics at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceMetricsSnapshot {
    /// Records handed out by `poll`.
    pub num_records_in: u64,
    /// Bytes of those records (key, value and headers).
    pub num_bytes_in: u64,
    /// Sum over the assigned partitions of (high watermark − position), from the client's
    /// statistics; `None` until the first statistics arrive.
    pub pending_records: Option<i64>,
    /// When the last record was fetched: fetch time − the record's timestamp (ms).
    pub current_fetch_event_time_lag: Option<i64>,
    /// When the last record was handed out: that time − the record's timestamp (ms).
    pub current_emit_event_time_lag: Option<i64>,
    /// Time since the last record was handed out (or since the reader opened) (ms).
    pub source_idle_time: i64,
    pub commits_succeeded: u64,
    pub commits_failed: u64,
    pub partitions: Vec<PartitionMetricsSnapshot>,
}

/// One partition's gauges (Flink's `KafkaSourceReader.topic.<t>.partition.<p>` group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionMetricsSnapshot {
    pub topic: String,
    pub partition: i32,
    /// The reader's position: the next offset it will hand out.
    pub current_offset: Option<i64>,
    /// The last offset committed to the consumer group by this reader.
    pub committed_offset: Option<i64>,
}

impl KafkaSourceMetrics {
    pub fn new() -> Arc<KafkaSourceMetrics> {
        Arc::new(KafkaSourceMetrics {
            num_records_in: AtomicU64::new(0),
            num_bytes_in: AtomicU64::new(0),
            pending_records: AtomicI64::new(UNKNOWN),
            fetch_lag_ms: AtomicI64::new(UNKNOWN),
            emit_lag_ms: AtomicI64::new(UNKNOWN),
            last_record_at_ms: AtomicI64::new(now_ms()),
            commits_succeeded: AtomicU64::new(0),
            commits_failed: AtomicU64::new(0),
            partitions: RwLock::new(BTreeMap::new()),
        })
    }

    /// The gauges of `tp`, created when new.
    pub(crate) fn partition(&self, tp: &TopicPartition) -> Arc<PartitionMetrics> {
        if let Ok(map) = self.partitions.read() {
            if let Some(m) = map.get(tp) {
                return m.clone();
            }
        }
        let fresh = Arc::new(PartitionMetrics {
            current_offset: AtomicI64::new(UNKNOWN),
            committed_offset: AtomicI64::new(UNKNOWN),
        });
        match self.partitions.write() {
            Ok(mut map) => map.entry(tp.clone()).or_insert(fresh).clone(),
            Err(_) => fresh,
        }
    }

    pub(crate) fn set_committed(&self, tp: &TopicPartition, offset: i64) {
        let existing = self.partitions.read().ok().and_then(|m| m.get(tp).cloned());
        if let Some(m) = existing {
            m.committed_offset.store(offset, Ordering::Relaxed);
        }
    }

    pub fn num_records_in(&self) -> u64 {
        self.num_records_in.load(Ordering::Relaxed)
    }

    pub fn commits_succeeded(&self) -> u64 {
        self.commits_succeeded.load(Ordering::Relaxed)
    }

    pub fn commits_failed(&self) -> u64 {
        self.commits_failed.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> SourceMetricsSnapshot {
        let partitions = self
            .partitions
            .read()
            .map(|map| {
                map.iter()
                    .map(|(tp, m)| PartitionMetricsSnapshot {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        current_offset: known(m.current_offset.load(Ordering::Relaxed)),
                        committed_offset: known(m.committed_offset.load(Ordering::Relaxed)),
                    })
                    .collect()
            })
            .unwrap_or_default();
        SourceMetricsSnapshot {
            num_records_in: self.num_records_in.load(Ordering::Relaxed),
            num_bytes_in: self.num_bytes_in.load(Ordering::Relaxed),
            pending_records: known(self.pending_records.load(Ordering::Relaxed)),
            current_fetch_event_time_lag: known(self.fetch_lag_ms.load(Ordering::Relaxed)),
            current_emit_event_time_lag: known(self.emit_lag_ms.load(Ordering::Relaxed)),
            source_idle_time: (now_ms() - self.last_record_at_ms.load(Ordering::Relaxed)).max(0),
            commits_succeeded: self.commits_succeeded.load(Ordering::Relaxed),
            commits_failed: self.commits_failed.load(Ordering::Relaxed),
            partitions,
        }
    }
}

/// The metrics of one Kafka sink writer.
#[derive(Debug)]
pub struct KafkaSinkMetrics {
    pub(crate) num_records_out: AtomicU64,
    pub(crate) num_bytes_out: AtomicU64,
    pub(crate) records_acked: AtomicU64,
    pub(crate) delivery_errors: AtomicU64,
    pub(crate) send_time_us: AtomicI64,
    pub(crate) transaction_failures: AtomicU64,
    pub(crate) producers_recreated: AtomicU64,
}

/// The sink metrics at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkMetricsSnapshot {
    /// Records handed to the producer.
    pub num_records_out: u64,
    /// Bytes of those records (key, value and headers).
    pub num_bytes_out: u64,
    /// Records the broker acknowledged.
    pub records_acked: u64,
    /// Records whose delivery failed.
    pub delivery_errors: u64,
    /// How long the last acknowledged record took from `send` to its acknowledgement (µs).
    pub current_send_time_us: Option<i64>,
    /// `exactly-once`: transactional calls (begin, adding the marker, commit, abort) that failed
    /// other than by fencing, e.g. timed out. Each makes the sink recreate its producer.
    #[serde(default)]
    pub transaction_failures: u64,
    /// `exactly-once`: producers recreated (and fenced their predecessor with
    /// `init_transactions`) after such a failure.
    #[serde(default)]
    pub producers_recreated: u64,
}

impl KafkaSinkMetrics {
    pub fn new() -> Arc<KafkaSinkMetrics> {
        Arc::new(KafkaSinkMetrics {
            num_records_out: AtomicU64::new(0),
            num_bytes_out: AtomicU64::new(0),
            records_acked: AtomicU64::new(0),
            delivery_errors: AtomicU64::new(0),
            send_time_us: AtomicI64::new(UNKNOWN),
            transaction_failures: AtomicU64::new(0),
            producers_recreated: AtomicU64::new(0),
        })
    }

    pub fn snapshot(&self) -> SinkMetricsSnapshot {
        SinkMetricsSnapshot {
            num_records_out: self.num_records_out.load(Ordering::Relaxed),
            num_bytes_out: self.num_bytes_out.load(Ordering::Relaxed),
            records_acked: self.records_acked.load(Ordering::Relaxed),
            delivery_errors: self.delivery_errors.load(Ordering::Relaxed),
            current_send_time_us: known(self.send_time_us.load(Ordering::Relaxed)),
            transaction_failures: self.transaction_failures.load(Ordering::Relaxed),
            producers_recreated: self.producers_recreated.load(Ordering::Relaxed),
        }
    }
}
