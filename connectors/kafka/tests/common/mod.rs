//! Helpers of the broker tests: options with short timeouts, reading until a count.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_kafka::{KafkaRecord, KafkaSinkOptions, KafkaSourceMetrics, KafkaSourceOptions, KafkaSourceReader};

/// How long a test waits for records it expects.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Logs to the test output, filtered by `RUST_LOG` (nothing by default).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn options(bootstrap: &str, pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    init_logs();
    let mut m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.insert("properties.bootstrap.servers".into(), bootstrap.into());
    m.entry("properties.default.api.timeout.ms".into()).or_insert_with(|| "10000".into());
    m.entry("properties.statistics.interval.ms".into()).or_insert_with(|| "200".into());
    m
}

pub fn source_options(bootstrap: &str, pairs: &[(&str, &str)]) -> KafkaSourceOptions {
    KafkaSourceOptions::from_spec("sources[0]", &options(bootstrap, pairs)).expect("valid source options")
}

pub fn sink_options(bootstrap: &str, pairs: &[(&str, &str)]) -> KafkaSinkOptions {
    init_logs();
    let mut m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.insert("properties.bootstrap.servers".into(), bootstrap.into());
    m.entry("properties.max.block.ms".into()).or_insert_with(|| "10000".into());
    KafkaSinkOptions::from_spec("sinks[0]", &m).expect("valid sink options")
}

pub fn open(bootstrap: &str, pairs: &[(&str, &str)]) -> KafkaSourceReader {
    KafkaSourceReader::open(source_options(bootstrap, pairs), 0, 1, None, KafkaSourceMetrics::new())
        .expect("open the reader")
}

/// Polls until at least `n` records arrived (fails after [`READ_TIMEOUT`]).
pub fn read_n(reader: &mut KafkaSourceReader, n: usize) -> Vec<KafkaRecord> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records within {READ_TIMEOUT:?}: {:?}",
            out.len(),
            numbers(&out)
        );
        out.extend(reader.poll(n - out.len(), Duration::from_millis(200)).expect("poll"));
    }
    out
}

/// Polls for `window` and returns whatever arrived (to check that nothing more comes).
pub fn read_for(reader: &mut KafkaSourceReader, window: Duration) -> Vec<KafkaRecord> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        out.extend(reader.poll(1000, Duration::from_millis(100)).expect("poll"));
    }
    out
}

pub fn number(r: &KafkaRecord) -> u64 {
    r.value
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .expect("a numbered record")
}

/// The values of `records` as numbers, sorted.
pub fn numbers(records: &[KafkaRecord]) -> Vec<u64> {
    let mut v: Vec<u64> = records.iter().map(number).collect();
    v.sort_unstable();
    v
}
