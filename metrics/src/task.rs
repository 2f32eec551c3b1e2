//! Ready-made metric bundles for a Kafka source, one of its partitions, and a sink.
//!
//! Each bundle owns its [`MetricGroup`]: dropping the bundle unregisters its metrics.
//!
//! ```text
//! let task = registry.group(&[("job", job), ("job_id", id), ("task", name), ("subtask", "0")]);
//! let source = SourceMetrics::register(task.group(&[("source", "orders")]));
//! let p3 = PartitionMetrics::register(&source.group, "orders", 3);
//! // per record:
//! source.record_in(bytes);
//! ```

use crate::names;
use crate::registry::{Counter, ElapsedGauge, Gauge, Meter, MetricGroup};

/// The metrics of one source of a subtask.
#[derive(Debug)]
pub struct SourceMetrics {
    pub num_records_in: Counter,
    pub num_records_in_per_second: Meter,
    pub num_bytes_in: Counter,
    pub num_bytes_in_per_second: Meter,
    /// Records skipped as malformed (`ignore-parse-errors`).
    pub num_records_in_errors: Counter,
    pub pending_records: Gauge,
    pub current_fetch_event_time_lag: Gauge,
    pub current_emit_event_time_lag: Gauge,
    /// Marked on every record; reads as milliseconds since the latest one.
    pub source_idle_time: ElapsedGauge,
    pub commits_succeeded: Counter,
    pub commits_failed: Counter,
    pub group: MetricGroup,
}

impl SourceMetrics {
    pub fn register(group: MetricGroup) -> SourceMetrics {
        let num_records_in = group.counter(names::NUM_RECORDS_IN);
        let num_bytes_in = group.counter(names::NUM_BYTES_IN);
        SourceMetrics {
            num_records_in_per_second: group.meter(names::NUM_RECORDS_IN_PER_SECOND, &num_records_in),
            num_bytes_in_per_second: group.meter(names::NUM_BYTES_IN_PER_SECOND, &num_bytes_in),
            num_records_in,
            num_bytes_in,
            num_records_in_errors: group.counter(names::NUM_RECORDS_IN_ERRORS),
            pending_records: group.gauge(names::PENDING_RECORDS),
            current_fetch_event_time_lag: group.gauge(names::CURRENT_FETCH_EVENT_TIME_LAG),
            current_emit_event_time_lag: group.gauge(names::CURRENT_EMIT_EVENT_TIME_LAG),
            source_idle_time: group.elapsed(names::SOURCE_IDLE_TIME),
            commits_succeeded: group.counter(names::COMMITS_SUCCEEDED),
            commits_failed: group.counter(names::COMMITS_FAILED),
            group,
        }
    }

    /// Counts one record of `bytes` key and value bytes and marks the source active.
    pub fn record_in(&self, bytes: usize) {
        self.num_records_in.inc();
        self.num_bytes_in.add(bytes as u64);
        self.source_idle_time.mark();
    }
}

/// The offsets of one partition a source reads; registered under `topic` and `partition`
/// labels when the partition is assigned, unregistered when this is dropped.
#[derive(Debug)]
pub struct PartitionMetrics {
    pub current_offset: Gauge,
    pub committed_offset: Gauge,
    pub group: MetricGroup,
}

impl PartitionMetrics {
    pub fn register(source: &MetricGroup, topic: &str, partition: i32) -> PartitionMetrics {
        let group = source.group(&[("topic", topic), ("partition", &partition.to_string())]);
        PartitionMetrics {
            current_offset: group.gauge(names::CURRENT_OFFSET),
            committed_offset: group.gauge(names::COMMITTED_OFFSET),
            group,
        }
    }
}

/// The metrics of one sink of a subtask.
#[derive(Debug)]
pub struct SinkMetrics {
    pub num_records_out: Counter,
    pub num_records_out_per_second: Meter,
    pub num_bytes_out: Counter,
    pub num_bytes_out_per_second: Meter,
    pub current_send_time: Gauge,
    pub group: MetricGroup,
}

impl SinkMetrics {
    pub fn register(group: MetricGroup) -> SinkMetrics {
        let num_records_out = group.counter(names::NUM_RECORDS_OUT);
        let num_bytes_out = group.counter(names::NUM_BYTES_OUT);
        SinkMetrics {
            num_records_out_per_second: group.meter(names::NUM_RECORDS_OUT_PER_SECOND, &num_records_out),
            num_bytes_out_per_second: group.meter(names::NUM_BYTES_OUT_PER_SECOND, &num_bytes_out),
            num_records_out,
            num_bytes_out,
            current_send_time: group.gauge(names::CURRENT_SEND_TIME),
            group,
        }
    }

    /// Counts one written record of `bytes` key and value bytes.
    pub fn record_out(&self, bytes: usize) {
        self.num_records_out.inc();
        self.num_bytes_out.add(bytes as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn bundles_register_every_seed_metric_and_unregister_on_drop() {
        let r = Registry::new();
        let task = r.group(&[("job", "j"), ("subtask", "0")]);
        let source = SourceMetrics::register(task.group(&[("source", "in")]));
        let partition = PartitionMetrics::register(&source.group, "orders", 3);
        let sink = SinkMetrics::register(task.group(&[("sink", "out")]));
        source.record_in(10);
        sink.record_out(4);
        partition.current_offset.set_i64(1042);

        let names: Vec<String> = r.snapshot().into_iter().map(|s| s.name).collect();
        for want in names::KNOWN.iter().map(|(n, _, _)| *n) {
            assert!(names.iter().any(|n| n == want), "{want} not registered: {names:?}");
        }
        assert_eq!(r.get("numRecordsIn", &[("job", "j"), ("subtask", "0"), ("source", "in")]), Some(1.0));
        assert_eq!(r.get("numBytesOut", &[("job", "j"), ("subtask", "0"), ("sink", "out")]), Some(4.0));
        assert_eq!(
            r.get(
                "currentOffset",
                &[("job", "j"), ("subtask", "0"), ("source", "in"), ("topic", "orders"), ("partition", "3")]
            ),
            Some(1042.0)
        );
        drop(partition);
        drop(source);
        drop(sink);
        assert!(r.snapshot().is_empty(), "{:?}", r.snapshot());
    }
}
