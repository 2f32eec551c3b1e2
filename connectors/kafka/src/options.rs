//! The options of `connector: kafka`, checked and typed.
//!
//! Names and meanings follow Flink's Kafka connector. Every error is
//! `KeelError::InvalidSpec { field: "<field_prefix>.<option>", reason }`, where `field_prefix`
//! is where the connector sits in the job spec (`sources[0]`).
//!
//! # Source
//!
//! | option | meaning |
//! | --- | --- |
//! | `topic` | `;`-separated topics. A topic may be narrowed to some partitions with `:` and a `,`-separated list: `orders:0,2;payments` reads partitions 0 and 2 of `orders` and all of `payments` (`:` cannot occur in a Kafka topic name). |
//! | `topic-pattern` | a regular expression (Rust `regex` syntax) that must match a whole topic name; names starting with `__` (internal topics) never match. Not together with `topic`. |
//! | `properties.bootstrap.servers` | required |
//! | `properties.group.id` | the consumer group: where `group-offsets` reads from and where offsets are committed when a checkpoint completes; required for `group-offsets` |
//! | `properties.auto.offset.reset` | `earliest`, `latest` or `none`: where to start a partition that has no committed offset (`group-offsets`), and where to go when a position is out of range. Unset (or `none`) means: fail with an error that names the partition. |
//! | `properties.isolation.level` | passed through; librdkafka's default is `read_committed` (the Java client's is `read_uncommitted`), so records of open or aborted transactions are not read unless it is set to `read_uncommitted` |
//! | `properties.default.api.timeout.ms` | Keel's timeout for each blocking request (metadata, offset look-ups), default 30000; an unreachable cluster fails `open` after it, and a running source fails when no broker has answered for longer |
//! | `properties.*` | everything else goes to librdkafka verbatim (`properties.fetch.max.bytes` → `fetch.max.bytes`), checked at parse time; `enable.auto.commit` is forced to false (offsets are committed only on checkpoint completion); `key.deserializer` and `value.deserializer` are ignored |
//! | `scan.startup.mode` | `earliest-offset`, `latest-offset`, `group-offsets` (default), `timestamp`, `specific-offsets` |
//! | `scan.startup.timestamp-millis` | required by `timestamp`: start at the first record whose timestamp is at or after it |
//! | `scan.startup.specific-offsets` | required by `specific-offsets`: `partition:0,offset:42;partition:1,offset:300`; with several topics each entry names its topic: `topic:orders,partition:0,offset:42`. Partitions not listed start at the group's committed offset, else per `properties.auto.offset.reset`, else at the earliest offset (Flink's behaviour). |
//! | `scan.topic-partition-discovery.interval` | how often to look for new partitions (and new topics matching the pattern); a Flink duration (`30 s`, `5 min`, `1000` = ms), default 5 min; zero or negative disables |
//!
//! A position restored from a checkpoint wins over every startup mode.
//!
//! # Sink
//!
//! | option | meaning |
//! | --- | --- |
//! | `topic` | the one topic written to |
//! | `properties.bootstrap.servers` | required |
//! | `properties.max.block.ms` | Keel's timeout for the metadata request of `open`, default 30000 |
//! | `properties.*` | to librdkafka verbatim; without `properties.partitioner` the key hash is `murmur2_random`, the Java client's, so a key lands on the same partition as with Flink |
//! | `sink.partitioner` | `default` (by key hash), `fixed` (subtask i writes partition i % partitions), `round-robin` |
//! | `sink.delivery-guarantee` | `none`, `at-least-once` (default), `exactly-once` (needs `sink.transactional-id-prefix`, unique among running jobs, and checkpointing) |
//! | `sink.transactional-id-prefix` | see above |
//!
//! # The clients' queues
//!
//! librdkafka's defaults are sized for a process with one big client: a consumer prefetches
//! up to `queued.min.messages` = 100,000 messages per partition or `queued.max.messages.kbytes`
//! = 64 MiB, in responses of up to `fetch.max.bytes` = 50 MiB, and a producer queues up to
//! `queue.buffering.max.messages` = 100,000 messages or `queue.buffering.max.kbytes` = 1 GiB.
//! Every queued message also costs librdkafka a few hundred bytes of its own, so a Kafka
//! pass-through TaskManager grew to 76 MB where a datagen job takes 12 MB. Keel bounds the
//! queues by the batch the caller handles (`B` = `batch_records`) instead, unless the spec sets
//! the property (`properties.*` always wins):
//!
//! | client | property | Keel's default | why |
//! | --- | --- | --- | --- |
//! | source | `queued.min.messages` | 2 × B (2048) | the fetcher keeps this many messages ready: 2 polls' worth, enough to cover a fetch round trip at half a million records per second (measured: a raw pass-through at 550k records/s) |
//! | source | `queued.max.messages.kbytes` | 8192 (8 MiB) | bounds the prefetched bytes (records of 1 KB hit it at the same 8192); librdkafka also keeps `fetch.max.bytes` at or below it unless the spec sets that |
//! | source | `fetch.message.max.bytes` | 262144 (256 KiB) | bytes per partition and fetch (librdkafka grows it for a larger record): librdkafka keeps a structure of about 370 bytes per fetched message, which `queued.max.messages.kbytes` does not count, so a 1 MB fetch of 20-byte records held about 7 MB; measured: TaskManager peak RSS of a CSV pass-through 54-65 -> 37 MiB, CPU per record not worse |
//! | source | `fetch.queue.backoff.ms` | 2 | how long the fetcher waits before it looks again at a queue that is above those bounds; librdkafka's 1000 ms would leave a small queue empty for most of a second |
//! | sink | `queue.buffering.max.messages` | 8 × B (8192) | records handed over and not yet acknowledged: 8 batches, what `linger.ms` (5 ms) plus an acknowledgement's round trip hold at over half a million records per second; each costs librdkafka a few hundred bytes besides the record (measured: raw pass-through peak RSS 31-33 -> 27-30 MiB with 16 -> 8 batches, 585k -> 530k records/s; 4 batches cut it to 390k) |
//! | sink | `queue.buffering.max.kbytes` | 8192 (8 MiB) | bounds the queued bytes of large records |
//!
//! A full producer queue is backpressure (`send` waits for acknowledgements), a full consumer
//! queue only pauses fetching.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_proto::{KeelError, Result};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use regex::Regex;

use crate::assign::TopicPartition;

/// Default of `scan.topic-partition-discovery.interval`.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Default of `properties.default.api.timeout.ms` (source) and `properties.max.block.ms` (sink).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Records per batch the caller reads or writes unless it says otherwise
/// ([`KafkaSourceOptions::batch_records`], [`KafkaSinkOptions::batch_records`]): the
/// TaskManager's poll batch. The clients' queues are sized from it.
pub const DEFAULT_BATCH_RECORDS: usize = 1024;

/// Records the source's fetcher keeps ready, in batches of the caller.
const SOURCE_QUEUED_BATCHES: usize = 2;
/// Prefetched bytes of a source, at most (KiB).
const SOURCE_QUEUE_KBYTES: usize = 8 * 1024;
/// Bytes fetched per partition and request at first (librdkafka grows it for a larger record):
/// librdkafka keeps one ~370-byte structure per fetched message, so a 1 MB fetch of 20-byte
/// records held about 7 MB, far past `queued.max.messages.kbytes`, which counts payload only.
const SOURCE_PARTITION_FETCH_BYTES: usize = 256 * 1024;
/// How long the fetcher backs off from a full queue (ms).
const SOURCE_QUEUE_BACKOFF_MS: u32 = 2;
/// Records a sink's producer may hold unacknowledged, per batch of the caller.
const SINK_QUEUED_BATCHES: usize = 8;
/// Bytes a sink's producer may hold unacknowledged (KiB).
const SINK_QUEUE_KBYTES: usize = 8 * 1024;

/// librdkafka properties Keel sets on a source's consumer unless the spec sets them: the
/// queue bounds of [the module doc](self), for `batch_records` records per poll.
pub fn source_queue_defaults(batch_records: usize) -> Vec<(&'static str, String)> {
    let messages = batch_records.max(1).saturating_mul(SOURCE_QUEUED_BATCHES).clamp(1_000, 10_000_000);
    vec![
        ("queued.min.messages", messages.to_string()),
        ("queued.max.messages.kbytes", SOURCE_QUEUE_KBYTES.to_string()),
        ("fetch.queue.backoff.ms", SOURCE_QUEUE_BACKOFF_MS.to_string()),
        ("fetch.message.max.bytes", SOURCE_PARTITION_FETCH_BYTES.to_string()),
    ]
}

/// librdkafka properties Keel sets on a sink's producer unless the spec sets them: the queue
/// bounds of [the module doc](self), for `batch_records` records per batch.
///
/// The byte bound is never below twice the largest record the producer accepts
/// (`message.max.bytes` of `properties`): librdkafka refuses a record larger than the queue's
/// byte bound as "queue full" forever, which would stall the sink instead of failing it.
pub fn sink_queue_defaults(
    batch_records: usize,
    properties: &BTreeMap<String, String>,
) -> Vec<(&'static str, String)> {
    let messages = batch_records.max(1).saturating_mul(SINK_QUEUED_BATCHES).clamp(1_000, 10_000_000);
    let largest_kbytes = properties
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(0, |b| b.div_ceil(1024).saturating_mul(2));
    vec![
        ("queue.buffering.max.messages", messages.to_string()),
        ("queue.buffering.max.kbytes", SINK_QUEUE_KBYTES.max(largest_kbytes).to_string()),
    ]
}

/// Sets each of `defaults` on `config` unless `properties` (the spec's `properties.*`, without
/// the prefix) sets it.
pub(crate) fn set_defaults(
    config: &mut ClientConfig,
    properties: &BTreeMap<String, String>,
    defaults: &[(&'static str, String)],
) {
    for (key, value) in defaults {
        if !properties.contains_key(*key) {
            config.set(*key, value);
        }
    }
}

/// Properties Flink overwrites and Keel ignores likewise (bytes are handed out as they are).
const IGNORED_PROPERTIES: &[&str] =
    &["key.deserializer", "value.deserializer", "key.serializer", "value.serializer"];

/// What a source reads.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// Listed topics, each whole or narrowed to some partitions.
    Topics(Vec<TopicSelection>),
    /// Every topic whose whole name matches.
    Pattern { pattern: String, regex: Regex },
}

/// One entry of `topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSelection {
    pub topic: String,
    /// `None`: every partition, including ones added later.
    pub partitions: Option<Vec<i32>>,
}

impl Subscription {
    /// True when `topic` is read (some or all of its partitions).
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Subscription::Topics(list) => list.iter().any(|t| t.topic == topic),
            Subscription::Pattern { regex, .. } => !topic.starts_with("__") && regex.is_match(topic),
        }
    }
}

/// `scan.startup.mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupMode {
    EarliestOffset,
    LatestOffset,
    GroupOffsets,
    /// Milliseconds since the epoch.
    Timestamp(i64),
    SpecificOffsets(BTreeMap<TopicPartition, i64>),
}

impl StartupMode {
    pub fn name(&self) -> &'static str {
        match self {
            StartupMode::EarliestOffset => "earliest-offset",
            StartupMode::LatestOffset => "latest-offset",
            StartupMode::GroupOffsets => "group-offsets",
            StartupMode::Timestamp(_) => "timestamp",
            StartupMode::SpecificOffsets(_) => "specific-offsets",
        }
    }
}

/// `properties.auto.offset.reset` (`none` is the absence of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

/// A Kafka source's options.
#[derive(Debug, Clone)]
pub struct KafkaSourceOptions {
    pub subscription: Subscription,
    pub bootstrap_servers: String,
    pub group_id: Option<String>,
    pub startup_mode: StartupMode,
    pub auto_offset_reset: Option<OffsetReset>,
    /// `None`: discovery disabled.
    pub discovery_interval: Option<Duration>,
    /// Timeout of each blocking request.
    pub request_timeout: Duration,
    /// librdkafka properties (without the `properties.` prefix), as given, minus the ones Keel
    /// interprets itself (`auto.offset.reset`, `enable.auto.commit`, `default.api.timeout.ms`,
    /// the (de)serializers).
    pub client_properties: BTreeMap<String, String>,
    /// Where the options sit in the spec (`sources[0]`), for error messages.
    pub field_prefix: String,
    /// Records the caller asks for per poll ([`crate::KafkaSourceReader::poll_each`]); the
    /// consumer's prefetch is sized from it ([the module doc](self)). Not a spec option:
    /// [`DEFAULT_BATCH_RECORDS`] unless the caller sets it before opening the reader.
    pub batch_records: usize,
}

/// `sink.partitioner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPartitioner {
    /// librdkafka's partitioner: by key hash (murmur2 unless `properties.partitioner` says
    /// otherwise); records without a key go to a random partition.
    Default,
    /// Subtask `i` writes every record to partition `i % partitions`.
    Fixed,
    /// Each subtask cycles over all partitions, starting at its own index.
    RoundRobin,
}

/// `sink.delivery-guarantee`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryGuarantee {
    /// Fire and forget: flush does not wait, delivery errors are only logged and counted.
    None,
    /// Flush waits until everything sent before is acknowledged; a delivery error fails it.
    AtLeastOnce,
    /// Kafka transactions, one per checkpoint (not implemented yet).
    ExactlyOnce { transactional_id_prefix: String },
}

impl DeliveryGuarantee {
    pub fn name(&self) -> &'static str {
        match self {
            DeliveryGuarantee::None => "none",
            DeliveryGuarantee::AtLeastOnce => "at-least-once",
            DeliveryGuarantee::ExactlyOnce { .. } => "exactly-once",
        }
    }
}

/// A Kafka sink's options.
#[derive(Debug, Clone)]
pub struct KafkaSinkOptions {
    pub topic: String,
    pub bootstrap_servers: String,
    pub partitioner: SinkPartitioner,
    pub delivery_guarantee: DeliveryGuarantee,
    /// Timeout of the metadata request at open.
    pub request_timeout: Duration,
    /// librdkafka properties (without the `properties.` prefix).
    pub client_properties: BTreeMap<String, String>,
    pub field_prefix: String,
    /// Records the caller writes per batch; the producer's queue is sized from it
    /// ([the module doc](self)). Not a spec option: [`DEFAULT_BATCH_RECORDS`] unless the caller sets it
    /// before opening the writer.
    pub batch_records: usize,
}

struct Fields<'a> {
    prefix: &'a str,
    options: &'a BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    fn field(&self, option: &str) -> String {
        if self.prefix.is_empty() {
            option.to_string()
        } else {
            format!("{}.{option}", self.prefix)
        }
    }

    fn err(&self, option: &str, reason: impl Into<String>) -> KeelError {
        KeelError::invalid_spec(self.field(option), reason)
    }

    /// The trimmed value, `None` when absent or blank.
    fn get(&self, option: &str) -> Option<&'a str> {
        self.options.get(option).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// `properties.*` without the prefix, minus `drop`, keeping values as written.
    fn properties(&self, drop: &[&str]) -> BTreeMap<String, String> {
        self.options
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("properties.").map(|k| (k, v)))
            .filter(|(k, _)| !k.is_empty() && !drop.contains(k) && !IGNORED_PROPERTIES.contains(k))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    fn timeout_ms(&self, option: &str) -> Result<Option<Duration>> {
        match self.get(option) {
            None => Ok(None),
            Some(text) => match text.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
                _ => {
                    Err(self.err(option, format!("must be a positive number of milliseconds, got {text:?}")))
                }
            },
        }
    }

    /// librdkafka checks every property name and value; an error names the property.
    fn check_client_properties(&self, properties: &BTreeMap<String, String>) -> Result<()> {
        let mut config = ClientConfig::new();
        for (k, v) in properties {
            config.set(k, v);
        }
        match config.create_native_config() {
            Ok(_) => Ok(()),
            Err(KafkaError::ClientConfig(_, description, key, _)) => Err(self.err(
                &format!("properties.{key}"),
                format!(
                    "the Kafka client (librdkafka) rejects it: {description}; properties.* are passed to \
                     librdkafka, so Java-only client properties are not supported"
                ),
            )),
            Err(e) => Err(self.err(
                "properties",
                format!("the Kafka client (librdkafka) rejects them: {}", keel_proto::error_chain(&e)),
            )),
        }
    }

    fn bootstrap_servers(&self) -> Result<String> {
        self.get("properties.bootstrap.servers").map(str::to_string).ok_or_else(|| {
            self.err("properties.bootstrap.servers", "the kafka connector requires it (host:port,host:port)")
        })
    }
}

fn normalized(text: &str) -> String {
    text.trim().to_ascii_lowercase().replace('_', "-")
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`.
fn check_topic_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("a topic name is empty".into());
    }
    if name.len() > 249 {
        return Err(format!("topic name {name:?} is longer than 249 characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "topic name {name:?} contains {c:?}; topic names consist of a-z, A-Z, 0-9, '.', '_', '-'"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid topic name"));
    }
    Ok(())
}

/// Parses `topic`: `a;b:0,2;c`.
fn parse_topics(text: &str) -> std::result::Result<Vec<TopicSelection>, String> {
    let mut out: Vec<TopicSelection> = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, partitions) = match entry.split_once(':') {
            None => (entry, None),
            Some((name, list)) => {
                let mut parts = Vec::new();
                for p in list.split(',').map(str::trim) {
                    let n: i32 = p.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                        format!("partition {p:?} of topic {:?} is not a partition number", name.trim())
                    })?;
                    if !parts.contains(&n) {
                        parts.push(n);
                    }
                }
                parts.sort_unstable();
                (name.trim(), Some(parts))
            }
        };
        check_topic_name(name)?;
        if out.iter().any(|t| t.topic == name) {
            return Err(format!("topic {name:?} is listed twice"));
        }
        out.push(TopicSelection { topic: name.to_string(), partitions });
    }
    if out.is_empty() {
        return Err("names no topic".into());
    }
    Ok(out)
}

/// Parses `scan.startup.specific-offsets`. `default_topic` is the only topic when there is one.
fn parse_specific_offsets(
    text: &str,
    default_topic: Option<&str>,
) -> std::result::Result<BTreeMap<TopicPartition, i64>, String> {
    let mut out = BTreeMap::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (mut topic, mut partition, mut offset) = (None, None, None);
        for pair in entry.split(',').map(str::trim) {
            let (key, value) = pair
                .split_once(':')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("{pair:?} in entry {entry:?} is not key:value"))?;
            match key {
                "topic" => topic = Some(value.to_string()),
                "partition" => {
                    partition = Some(value.parse::<i32>().ok().filter(|p| *p >= 0).ok_or_else(|| {
                        format!("partition {value:?} in entry {entry:?} is not a partition number")
                    })?)
                }
                "offset" => {
                    offset =
                        Some(
                            value.parse::<i64>().ok().filter(|o| *o >= 0).ok_or_else(|| {
                                format!("offset {value:?} in entry {entry:?} is not an offset")
                            })?,
                        )
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} in entry {entry:?}; keys: topic, partition, offset"
                    ))
                }
            }
        }
        let topic = match (topic, default_topic) {
            (Some(t), _) => t,
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(format!(
                    "entry {entry:?} names no topic; with several topics or a topic-pattern write \
                     topic:<name>,partition:<n>,offset:<n>"
                ))
            }
        };
        let partition = partition.ok_or_else(|| format!("entry {entry:?} has no partition"))?;
        let offset = offset.ok_or_else(|| format!("entry {entry:?} has no offset"))?;
        out.insert(TopicPartition::new(topic, partition), offset);
    }
    if out.is_empty() {
        return Err("names no offsets; e.g. partition:0,offset:42;partition:1,offset:300".into());
    }
    Ok(out)
}

/// Parses a Flink duration (`500 ms`, `30s`, `5 min`, `1 h`, `2 d`; a bare number is
/// milliseconds). Negative values are allowed; the caller decides what they mean.
pub fn parse_flink_duration(text: &str) -> std::result::Result<i128, String> {
    let t = text.trim();
    let (negative, rest) = match t.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, t),
    };
    let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (number, unit) = rest.split_at(digits_end);
    if number.is_empty() {
        return Err(format!("{text:?} does not start with a number"));
    }
    let number: i128 = number.parse().map_err(|_| format!("{text:?}: the number is too large"))?;
    let nanos_per_unit: i128 = match unit.trim().to_ascii_lowercase().as_str() {
        "ns" | "nano" | "nanos" | "nanosecond" | "nanoseconds" => 1,
        "µs" | "us" | "micro" | "micros" | "microsecond" | "microseconds" => 1_000,
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1_000_000,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hour" | "hours" => 3_600_000_000_000,
        "d" | "day" | "days" => 86_400_000_000_000,
        other => {
            return Err(format!(
            "{text:?} has an unknown unit {other:?}; units: ms, s, min, h, d (a bare number is milliseconds)"
        ))
        }
    };
    let nanos = number.checked_mul(nanos_per_unit).ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(if negative { -nanos } else { nanos })
}

impl KafkaSourceOptions {
    /// Reads the source options of a `connector: kafka` entry. `field_prefix` is where the
    /// entry sits in the spec (`sources[0]`); errors name `<field_prefix>.<option>`.
    pub fn from_spec(field_prefix: &str, options: &BTreeMap<String, String>) -> Result<KafkaSourceOptions> {
        let f = Fields { prefix: field_prefix, options };
        let bootstrap_servers = f.bootstrap_servers()?;

        let subscription = match (f.get("topic"), f.get("topic-pattern")) {
            (Some(_), Some(_)) => {
                return Err(f.err("topic-pattern", "use either `topic` or `topic-pattern`, not both"));
            }
            (None, None) => {
                return Err(f.err("topic", "the kafka source requires `topic` (or `topic-pattern`)"));
            }
            (Some(text), None) => Subscription::Topics(parse_topics(text).map_err(|r| f.err("topic", r))?),
            (None, Some(pattern)) => {
                let regex = Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| f.err("topic-pattern", format!("not a valid regular expression: {e}")))?;
                Subscription::Pattern { pattern: pattern.to_string(), regex }
            }
        };

        let group_id = f.get("properties.group.id").map(str::to_string);
        let auto_offset_reset = match f.get("properties.auto.offset.reset").map(normalized).as_deref() {
            None | Some("none") => None,
            Some("earliest") => Some(OffsetReset::Earliest),
            Some("latest") => Some(OffsetReset::Latest),
            Some(other) => {
                return Err(f.err(
                    "properties.auto.offset.reset",
                    format!("must be earliest, latest or none, got {other:?}"),
                ))
            }
        };
        if let Some(v) = f.get("properties.enable.auto.commit") {
            if normalized(v) != "false" {
                tracing::warn!(
                    field = %f.field("properties.enable.auto.commit"),
                    "enable.auto.commit is forced to false: offsets are committed when checkpoints complete"
                );
            }
        }
        let request_timeout =
            f.timeout_ms("properties.default.api.timeout.ms")?.unwrap_or(DEFAULT_REQUEST_TIMEOUT);

        let single_topic = match &subscription {
            Subscription::Topics(list) if list.len() == 1 => list.first().map(|t| t.topic.as_str()),
            _ => None,
        };
        let mode_text = f.get("scan.startup.mode").map(normalized);
        let startup_mode = match mode_text.as_deref().unwrap_or("group-offsets") {
            "earliest-offset" => StartupMode::EarliestOffset,
            "latest-offset" => StartupMode::LatestOffset,
            "group-offsets" => StartupMode::GroupOffsets,
            "timestamp" => {
                let option = "scan.startup.timestamp-millis";
                let text = f.get(option).ok_or_else(|| {
                    f.err(option, "scan.startup.mode timestamp requires it (milliseconds since the epoch)")
                })?;
                let ts = text.parse::<i64>().ok().filter(|t| *t >= 0).ok_or_else(|| {
                    f.err(option, format!("must be milliseconds since the epoch, got {text:?}"))
                })?;
                StartupMode::Timestamp(ts)
            }
            "specific-offsets" => {
                let option = "scan.startup.specific-offsets";
                let text = f.get(option).ok_or_else(|| {
                    f.err(option, "scan.startup.mode specific-offsets requires it, e.g. partition:0,offset:42;partition:1,offset:300")
                })?;
                let offsets = parse_specific_offsets(text, single_topic).map_err(|r| f.err(option, r))?;
                for tp in offsets.keys() {
                    if !subscription.matches(&tp.topic) {
                        return Err(
                            f.err(option, format!("topic {:?} is not one the source reads", tp.topic))
                        );
                    }
                }
                StartupMode::SpecificOffsets(offsets)
            }
            other => {
                return Err(f.err(
                    "scan.startup.mode",
                    format!(
                    "unknown startup mode {other:?}; one of earliest-offset, latest-offset, group-offsets, \
                         timestamp, specific-offsets"
                ),
                ))
            }
        };
        if startup_mode == StartupMode::GroupOffsets && group_id.is_none() {
            let why = if mode_text.is_none() {
                "group-offsets (the default scan.startup.mode)"
            } else {
                "group-offsets"
            };
            return Err(f.err(
                "properties.group.id",
                format!("{why} requires properties.group.id; or choose another scan.startup.mode"),
            ));
        }

        let discovery_option = "scan.topic-partition-discovery.interval";
        let discovery_interval = match f.get(discovery_option) {
            None => Some(DEFAULT_DISCOVERY_INTERVAL),
            Some(text) => {
                let nanos = parse_flink_duration(text).map_err(|r| f.err(discovery_option, r))?;
                if nanos <= 0 {
                    None
                } else {
                    let nanos = u64::try_from(nanos).map_err(|_| f.err(discovery_option, "is too large"))?;
                    Some(Duration::from_nanos(nanos))
                }
            }
        };

        if f.get("scan.header-filter").is_some() {
            return Err(f.err("scan.header-filter", "is not supported by Keel yet"));
        }
        if let Some(v) = f.get("scan.check.duplicated.group.id") {
            if normalized(v) != "false" {
                return Err(f.err("scan.check.duplicated.group.id", "is not supported by Keel yet"));
            }
        }

        let client_properties =
            f.properties(&["auto.offset.reset", "enable.auto.commit", "default.api.timeout.ms"]);
        f.check_client_properties(&client_properties)?;

        Ok(KafkaSourceOptions {
            subscription,
            bootstrap_servers,
            group_id,
            startup_mode,
            auto_offset_reset,
            discovery_interval,
            request_timeout,
            client_properties,
            field_prefix: field_prefix.to_string(),
            batch_records: DEFAULT_BATCH_RECORDS,
        })
    }
}

impl KafkaSinkOptions {
    /// Reads the sink options of a `connector: kafka` entry. `field_prefix` is where the entry
    /// sits in the spec (`sinks[0]`); errors name `<field_prefix>.<option>`.
    pub fn from_spec(field_prefix: &str, options: &BTreeMap<String, String>) -> Result<KafkaSinkOptions> {
        let f = Fields { prefix: field_prefix, options };
        let bootstrap_servers = f.bootstrap_servers()?;
        let topic = f.get("topic").ok_or_else(|| f.err("topic", "the kafka sink requires `topic`"))?;
        check_topic_name(topic)
            .map_err(|r| f.err("topic", format!("{r} (a sink writes to exactly one topic)")))?;

        let partitioner = match f.get("sink.partitioner").map(normalized).as_deref() {
            None | Some("default") => SinkPartitioner::Default,
            Some("fixed") => SinkPartitioner::Fixed,
            Some("round-robin") => SinkPartitioner::RoundRobin,
            Some(other) => {
                return Err(f.err(
                    "sink.partitioner",
                    format!("unknown partitioner {other:?}; one of default, fixed, round-robin"),
                ))
            }
        };
        let delivery_guarantee = match f.get("sink.delivery-guarantee").map(normalized).as_deref() {
            None | Some("at-least-once") => DeliveryGuarantee::AtLeastOnce,
            Some("none") => DeliveryGuarantee::None,
            Some("exactly-once") => {
                let prefix = f.get("sink.transactional-id-prefix").ok_or_else(|| {
                    f.err("sink.transactional-id-prefix", "sink.delivery-guarantee exactly-once requires it")
                })?;
                DeliveryGuarantee::ExactlyOnce { transactional_id_prefix: prefix.to_string() }
            }
            Some(other) => {
                return Err(f.err(
                    "sink.delivery-guarantee",
                    format!("unknown delivery guarantee {other:?}; one of none, at-least-once, exactly-once"),
                ))
            }
        };
        let request_timeout = f.timeout_ms("properties.max.block.ms")?.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let client_properties = f.properties(&["max.block.ms"]);
        if client_properties.contains_key("transactional.id") {
            return Err(f.err(
                "properties.transactional.id",
                "Keel names the transactions itself: set sink.delivery-guarantee: exactly-once and \
                 sink.transactional-id-prefix instead",
            ));
        }
        if let DeliveryGuarantee::ExactlyOnce { transactional_id_prefix } = &delivery_guarantee {
            if transactional_id_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(
                    f.err("sink.transactional-id-prefix", "must not contain spaces or control characters")
                );
            }
        }
        f.check_client_properties(&client_properties)?;
        Ok(KafkaSinkOptions {
            topic: topic.to_string(),
            bootstrap_servers,
            partitioner,
            delivery_guarantee,
            request_timeout,
            client_properties,
            field_prefix: field_prefix.to_string(),
            batch_records: DEFAULT_BATCH_RECORDS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        m.entry("properties.bootstrap.servers".into()).or_insert_with(|| "b:9092".into());
        m
    }

    fn source(pairs: &[(&str, &str)]) -> Result<KafkaSourceOptions> {
        KafkaSourceOptions::from_spec("sources[0]", &opts(pairs))
    }

    fn field_of(e: KeelError) -> (String, String) {
        match e {
            KeelError::InvalidSpec { field, reason } => (field, reason),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    /// Defaults: group-offsets, 5 min discovery, 30 s timeout, no reset; properties pass through
    /// minus the ones Keel interprets.
    #[test]
    fn source_defaults_and_properties() {
        let o = source(&[
            ("topic", "orders"),
            ("properties.group.id", "g"),
            ("properties.fetch.max.bytes", "1048576"),
            ("properties.enable.auto.commit", "true"),
            ("properties.key.deserializer", "org.apache.kafka.common.serialization.ByteArrayDeserializer"),
        ])
        .expect("valid");
        assert_eq!(o.startup_mode, StartupMode::GroupOffsets);
        assert_eq!(o.discovery_interval, Some(DEFAULT_DISCOVERY_INTERVAL));
        assert_eq!(o.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(o.auto_offset_reset, None);
        assert_eq!(o.group_id.as_deref(), Some("g"));
        assert!(o.client_properties.contains_key("fetch.max.bytes"));
        assert!(o.client_properties.contains_key("group.id"));
        assert!(o.client_properties.contains_key("bootstrap.servers"));
        assert!(!o.client_properties.contains_key("enable.auto.commit"));
        assert!(!o.client_properties.contains_key("key.deserializer"));
    }

    #[test]
    fn topics_partitions_and_patterns() {
        let o =
            source(&[("topic", "a; b:2,0 ;c;"), ("scan.startup.mode", "earliest-offset")]).expect("valid");
        let Subscription::Topics(list) = &o.subscription else { panic!("topics expected") };
        assert_eq!(
            list,
            &vec![
                TopicSelection { topic: "a".into(), partitions: None },
                TopicSelection { topic: "b".into(), partitions: Some(vec![0, 2]) },
                TopicSelection { topic: "c".into(), partitions: None },
            ]
        );
        let o = source(&[("topic-pattern", "orders-.*"), ("scan.startup.mode", "earliest-offset")])
            .expect("valid");
        assert!(o.subscription.matches("orders-eu"));
        assert!(!o.subscription.matches("x-orders-eu"), "the pattern must match the whole name");
        assert!(!o.subscription.matches("__consumer_offsets"));
        let o = source(&[("topic-pattern", ".*"), ("scan.startup.mode", "earliest-offset")]).expect("valid");
        assert!(!o.subscription.matches("__consumer_offsets"), "internal topics never match");

        for (text, needle) in [
            ("a;a", "listed twice"),
            ("a:x", "not a partition number"),
            ("a:-1", "not a partition number"),
            ("bad/name", "contains '/'"),
            (" ; ", "names no topic"),
        ] {
            let (field, reason) =
                field_of(source(&[("topic", text), ("properties.group.id", "g")]).expect_err(text));
            assert_eq!(field, "sources[0].topic");
            assert!(reason.contains(needle), "{text}: {reason}");
        }
        let (field, _) = field_of(source(&[("topic", "a"), ("topic-pattern", "a.*")]).expect_err("both"));
        assert_eq!(field, "sources[0].topic-pattern");
        let (field, reason) = field_of(source(&[("topic-pattern", "(")]).expect_err("bad regex"));
        assert_eq!(field, "sources[0].topic-pattern");
        assert!(reason.contains("regular expression"), "{reason}");
    }

    /// Each startup mode parses with its companion option; a missing or bad companion names it.
    #[test]
    fn startup_modes() {
        let o = source(&[("topic", "t"), ("scan.startup.mode", "latest-offset")]).expect("valid");
        assert_eq!(o.startup_mode, StartupMode::LatestOffset);
        let o = source(&[
            ("topic", "t"),
            ("scan.startup.mode", "timestamp"),
            ("scan.startup.timestamp-millis", "1655395200000"),
        ])
        .expect("valid");
        assert_eq!(o.startup_mode, StartupMode::Timestamp(1655395200000));
        let o = source(&[
            ("topic", "t"),
            ("scan.startup.mode", "specific-offsets"),
            ("scan.startup.specific-offsets", "partition:0,offset:42;partition:1,offset:300"),
        ])
        .expect("valid");
        assert_eq!(
            o.startup_mode,
            StartupMode::SpecificOffsets(BTreeMap::from([
                (TopicPartition::new("t", 0), 42),
                (TopicPartition::new("t", 1), 300)
            ]))
        );
        let o = source(&[
            ("topic", "t;u"),
            ("scan.startup.mode", "specific-offsets"),
            ("scan.startup.specific-offsets", "topic:u,partition:3,offset:1"),
        ])
        .expect("valid");
        assert_eq!(
            o.startup_mode,
            StartupMode::SpecificOffsets(BTreeMap::from([(TopicPartition::new("u", 3), 1)]))
        );

        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case<'_>] = &[
            (&[("scan.startup.mode", "timestamp")], "sources[0].scan.startup.timestamp-millis", "requires"),
            (
                &[("scan.startup.mode", "timestamp"), ("scan.startup.timestamp-millis", "soon")],
                "sources[0].scan.startup.timestamp-millis",
                "milliseconds",
            ),
            (
                &[("scan.startup.mode", "specific-offsets")],
                "sources[0].scan.startup.specific-offsets",
                "requires",
            ),
            (
                &[
                    ("scan.startup.mode", "specific-offsets"),
                    ("scan.startup.specific-offsets", "partition:0"),
                ],
                "sources[0].scan.startup.specific-offsets",
                "no offset",
            ),
            (
                &[
                    ("scan.startup.mode", "specific-offsets"),
                    ("scan.startup.specific-offsets", "topic:zz,partition:0,offset:1"),
                ],
                "sources[0].scan.startup.specific-offsets",
                "not one the source reads",
            ),
            (&[("scan.startup.mode", "earliest")], "sources[0].scan.startup.mode", "unknown startup mode"),
            (&[], "sources[0].properties.group.id", "default scan.startup.mode"),
            (&[("scan.startup.mode", "group-offsets")], "sources[0].properties.group.id", "requires"),
        ];
        for (pairs, want_field, needle) in cases {
            let mut all = vec![("topic", "t")];
            all.extend_from_slice(pairs);
            let (field, reason) = field_of(source(&all).expect_err(want_field));
            assert_eq!(&field, want_field, "{pairs:?}");
            assert!(reason.contains(needle), "{pairs:?}: {reason}");
        }
        // Several topics: specific offsets must name theirs.
        let (field, reason) = field_of(
            source(&[
                ("topic", "t;u"),
                ("scan.startup.mode", "specific-offsets"),
                ("scan.startup.specific-offsets", "partition:0,offset:1"),
            ])
            .expect_err("ambiguous"),
        );
        assert_eq!(field, "sources[0].scan.startup.specific-offsets");
        assert!(reason.contains("names no topic"), "{reason}");
    }

    #[test]
    fn auto_offset_reset_and_timeouts() {
        let o = source(&[
            ("topic", "t"),
            ("properties.group.id", "g"),
            ("properties.auto.offset.reset", "Earliest"),
        ])
        .expect("valid");
        assert_eq!(o.auto_offset_reset, Some(OffsetReset::Earliest));
        assert!(!o.client_properties.contains_key("auto.offset.reset"));
        let o =
            source(&[("topic", "t"), ("properties.group.id", "g"), ("properties.auto.offset.reset", "none")])
                .expect("valid");
        assert_eq!(o.auto_offset_reset, None);
        let (field, _) = field_of(
            source(&[
                ("topic", "t"),
                ("properties.group.id", "g"),
                ("properties.auto.offset.reset", "smallest"),
            ])
            .expect_err("bad reset"),
        );
        assert_eq!(field, "sources[0].properties.auto.offset.reset");
        let o = source(&[
            ("topic", "t"),
            ("properties.group.id", "g"),
            ("properties.default.api.timeout.ms", "1500"),
        ])
        .expect("valid");
        assert_eq!(o.request_timeout, Duration::from_millis(1500));
        assert!(!o.client_properties.contains_key("default.api.timeout.ms"));
        let (field, _) = field_of(
            source(&[
                ("topic", "t"),
                ("properties.group.id", "g"),
                ("properties.default.api.timeout.ms", "0"),
            ])
            .expect_err("zero timeout"),
        );
        assert_eq!(field, "sources[0].properties.default.api.timeout.ms");
    }

    /// A property librdkafka does not know, or a value it rejects, is an error naming it.
    #[test]
    fn unknown_client_properties_are_rejected_by_name() {
        let (field, reason) = field_of(
            source(&[("topic", "t"), ("properties.group.id", "g"), ("properties.sasl.jaas.config", "x")])
                .expect_err("java-only"),
        );
        assert_eq!(field, "sources[0].properties.sasl.jaas.config");
        assert!(reason.contains("librdkafka"), "{reason}");
        let (field, _) = field_of(
            source(&[("topic", "t"), ("properties.group.id", "g"), ("properties.fetch.max.bytes", "lots")])
                .expect_err("bad value"),
        );
        assert_eq!(field, "sources[0].properties.fetch.max.bytes");
    }

    #[test]
    fn discovery_interval_is_a_flink_duration() {
        for (text, want) in [
            ("10 s", Some(Duration::from_secs(10))),
            ("10s", Some(Duration::from_secs(10))),
            ("5 min", Some(Duration::from_secs(300))),
            ("1500", Some(Duration::from_millis(1500))),
            ("250 ms", Some(Duration::from_millis(250))),
            ("1 h", Some(Duration::from_secs(3600))),
            ("0", None),
            ("-1", None),
            ("-1 ms", None),
        ] {
            let o = source(&[
                ("topic", "t"),
                ("scan.startup.mode", "earliest-offset"),
                ("scan.topic-partition-discovery.interval", text),
            ])
            .expect(text);
            assert_eq!(o.discovery_interval, want, "{text}");
        }
        for text in ["soon", "5 fortnights", "ms"] {
            let (field, _) = field_of(
                source(&[
                    ("topic", "t"),
                    ("scan.startup.mode", "earliest-offset"),
                    ("scan.topic-partition-discovery.interval", text),
                ])
                .expect_err(text),
            );
            assert_eq!(field, "sources[0].scan.topic-partition-discovery.interval");
        }
    }

    #[test]
    fn unsupported_source_options_are_refused_not_ignored() {
        let (field, _) = field_of(
            source(&[("topic", "t"), ("properties.group.id", "g"), ("scan.header-filter", "a:b")])
                .expect_err("filter"),
        );
        assert_eq!(field, "sources[0].scan.header-filter");
        let (field, _) = field_of(
            source(&[
                ("topic", "t"),
                ("properties.group.id", "g"),
                ("scan.check.duplicated.group.id", "true"),
            ])
            .expect_err("duplicate check"),
        );
        assert_eq!(field, "sources[0].scan.check.duplicated.group.id");
    }

    /// The queue bounds follow the batch size (2 batches' worth prefetched, 8 unacknowledged),
    /// never below 1000 messages nor above librdkafka's maximum, and options read from a spec
    /// carry the default batch size.
    #[test]
    fn queue_defaults_follow_the_batch_size() {
        let get = |defaults: Vec<(&'static str, String)>, key: &str| {
            defaults.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
        };
        assert_eq!(get(source_queue_defaults(1024), "queued.min.messages").as_deref(), Some("2048"));
        assert_eq!(get(source_queue_defaults(1024), "fetch.message.max.bytes").as_deref(), Some("262144"));
        assert_eq!(get(source_queue_defaults(1), "queued.min.messages").as_deref(), Some("1000"));
        assert_eq!(
            get(source_queue_defaults(usize::MAX), "queued.min.messages").as_deref(),
            Some("10000000")
        );
        let none = BTreeMap::new();
        assert_eq!(
            get(sink_queue_defaults(1024, &none), "queue.buffering.max.messages").as_deref(),
            Some("8192")
        );
        assert_eq!(
            get(sink_queue_defaults(0, &none), "queue.buffering.max.messages").as_deref(),
            Some("1000")
        );
        assert_eq!(
            get(sink_queue_defaults(1024, &none), "queue.buffering.max.kbytes").as_deref(),
            Some("8192")
        );
        // A producer allowed records of 20 MB gets a queue that holds two of them.
        let large: BTreeMap<String, String> =
            [("message.max.bytes".to_string(), "20000000".to_string())].into();
        assert_eq!(
            get(sink_queue_defaults(1024, &large), "queue.buffering.max.kbytes").as_deref(),
            Some("39064")
        );
        assert_eq!(
            source(&[("topic", "t"), ("properties.group.id", "g")]).map(|o| o.batch_records).ok(),
            Some(DEFAULT_BATCH_RECORDS)
        );
    }

    #[test]
    fn sink_options() {
        let sink = |pairs: &[(&str, &str)]| KafkaSinkOptions::from_spec("sinks[1]", &opts(pairs));
        let o = sink(&[("topic", "out")]).expect("valid");
        assert_eq!(o.partitioner, SinkPartitioner::Default);
        assert_eq!(o.delivery_guarantee, DeliveryGuarantee::AtLeastOnce);
        assert_eq!(o.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let o = sink(&[
            ("topic", "out"),
            ("sink.partitioner", "round-robin"),
            ("sink.delivery-guarantee", "none"),
            ("properties.max.block.ms", "2000"),
        ])
        .expect("valid");
        assert_eq!(o.partitioner, SinkPartitioner::RoundRobin);
        assert_eq!(o.delivery_guarantee, DeliveryGuarantee::None);
        assert_eq!(o.request_timeout, Duration::from_millis(2000));
        assert!(!o.client_properties.contains_key("max.block.ms"));
        let o = sink(&[
            ("topic", "out"),
            ("sink.delivery-guarantee", "EXACTLY_ONCE"),
            ("sink.transactional-id-prefix", "job-a"),
        ])
        .expect("valid");
        assert_eq!(
            o.delivery_guarantee,
            DeliveryGuarantee::ExactlyOnce { transactional_id_prefix: "job-a".into() }
        );

        for (pairs, want_field) in [
            (
                vec![("topic", "out"), ("sink.delivery-guarantee", "exactly-once")],
                "sinks[1].sink.transactional-id-prefix",
            ),
            (vec![("topic", "out"), ("sink.partitioner", "org.my.Partitioner")], "sinks[1].sink.partitioner"),
            (
                vec![("topic", "out"), ("sink.delivery-guarantee", "twice")],
                "sinks[1].sink.delivery-guarantee",
            ),
            (vec![("topic", "a;b")], "sinks[1].topic"),
            (vec![("sink.partitioner", "fixed")], "sinks[1].topic"),
        ] {
            let (field, _) = field_of(sink(&pairs).expect_err(want_field));
            assert_eq!(field, want_field, "{pairs:?}");
        }
        let (field, _) = field_of(
            KafkaSinkOptions::from_spec(
                "sinks[0]",
                &BTreeMap::from([("topic".to_string(), "t".to_string())]),
            )
            .expect_err("no bootstrap"),
        );
        assert_eq!(field, "sinks[0].properties.bootstrap.servers");
    }
}
