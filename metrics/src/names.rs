//! The metric names Keel reports, with their kinds and help texts.
//!
//! Names and meanings follow Flink (the Kafka connector's list and Flink's standard source and
//! sink metrics); units are Flink's.
//!
//! A leaf module: the registry and the exposition read it, it reads neither.

/// How a metric is exposed to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total` in Prometheus).
    Counter,
    /// Any value, including rates.
    Gauge,
}

pub const NUM_RECORDS_IN: &str = "numRecordsIn";
pub const NUM_RECORDS_IN_PER_SECOND: &str = "numRecordsInPerSecond";
pub const NUM_BYTES_IN: &str = "numBytesIn";
pub const NUM_BYTES_IN_PER_SECOND: &str = "numBytesInPerSecond";
pub const NUM_RECORDS_IN_ERRORS: &str = "numRecordsInErrors";
pub const PENDING_RECORDS: &str = "pendingRecords";
pub const CURRENT_FETCH_EVENT_TIME_LAG: &str = "currentFetchEventTimeLag";
pub const CURRENT_EMIT_EVENT_TIME_LAG: &str = "currentEmitEventTimeLag";
pub const SOURCE_IDLE_TIME: &str = "sourceIdleTime";
pub const CURRENT_OFFSET: &str = "currentOffset";
pub const COMMITTED_OFFSET: &str = "committedOffset";
pub const COMMITS_SUCCEEDED: &str = "commitsSucceeded";
pub const COMMITS_FAILED: &str = "commitsFailed";
pub const NUM_RECORDS_OUT: &str = "numRecordsOut";
pub const NUM_RECORDS_OUT_PER_SECOND: &str = "numRecordsOutPerSecond";
pub const NUM_BYTES_OUT: &str = "numBytesOut";
pub const NUM_BYTES_OUT_PER_SECOND: &str = "numBytesOutPerSecond";
pub const CURRENT_SEND_TIME: &str = "currentSendTime";

/// Every known metric: name, kind, help.
pub const KNOWN: &[(&str, Kind, &str)] = &[
    (NUM_RECORDS_IN, Kind::Counter, "Records the source has read (Flink numRecordsIn)."),
    (NUM_RECORDS_IN_PER_SECOND, Kind::Gauge, "Records read per second over the last minute (Flink numRecordsInPerSecond)."),
    (NUM_BYTES_IN, Kind::Counter, "Bytes of message keys and values the source has read (Flink numBytesIn)."),
    (NUM_BYTES_IN_PER_SECOND, Kind::Gauge, "Bytes read per second over the last minute (Flink numBytesInPerSecond)."),
    (NUM_RECORDS_IN_ERRORS, Kind::Counter, "Records the source skipped because they did not parse (Flink numRecordsInErrors)."),
    (PENDING_RECORDS, Kind::Gauge, "Records in Kafka not yet read by the source: high watermark minus position, summed over its partitions (Flink pendingRecords)."),
    (CURRENT_FETCH_EVENT_TIME_LAG, Kind::Gauge, "Milliseconds between a record's timestamp and its fetch from Kafka, for the latest record (Flink currentFetchEventTimeLag)."),
    (CURRENT_EMIT_EVENT_TIME_LAG, Kind::Gauge, "Milliseconds between a record's timestamp and its emission by the source, for the latest record (Flink currentEmitEventTimeLag)."),
    (SOURCE_IDLE_TIME, Kind::Gauge, "Milliseconds since the source last read a record (Flink sourceIdleTime)."),
    (CURRENT_OFFSET, Kind::Gauge, "The consumer's position in the partition: the offset of the next record to read (Flink currentOffset)."),
    (COMMITTED_OFFSET, Kind::Gauge, "The offset last committed to the consumer group for the partition (Flink committedOffset)."),
    (COMMITS_SUCCEEDED, Kind::Counter, "Offset commits to the consumer group that succeeded (Flink commitsSucceeded)."),
    (COMMITS_FAILED, Kind::Counter, "Offset commits to the consumer group that failed (Flink commitsFailed)."),
    (NUM_RECORDS_OUT, Kind::Counter, "Records the sink has written (Flink numRecordsOut)."),
    (NUM_RECORDS_OUT_PER_SECOND, Kind::Gauge, "Records written per second over the last minute (Flink numRecordsOutPerSecond)."),
    (NUM_BYTES_OUT, Kind::Counter, "Bytes of message keys and values the sink has written (Flink numBytesOut)."),
    (NUM_BYTES_OUT_PER_SECOND, Kind::Gauge, "Bytes written per second over the last minute (Flink numBytesOutPerSecond)."),
    (CURRENT_SEND_TIME, Kind::Gauge, "Milliseconds the latest record took from send to acknowledgement by Kafka (Flink currentSendTime)."),
];

/// The help text of a known metric.
pub fn help(name: &str) -> Option<&'static str> {
    KNOWN.iter().find(|(n, _, _)| *n == name).map(|(_, _, h)| *h)
}
