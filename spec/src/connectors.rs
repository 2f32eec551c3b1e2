//! The connectors Keel knows, the options each accepts, and their typed configurations.
//!
//! | connector | side | options |
//! | --- | --- | --- |
//! | `datagen` | source | `rows-per-second` (> 0, default 10000, total over all subtasks), `number-of-rows` (total, absent = unbounded), `start` (first sequence number, default 0) |
//! | `kafka` | source, sink | Flink's Kafka connector options (`topic`, `topic-pattern`, `properties.*`, `scan.*`, `sink.*`, formats) |
//! | `print` | sink | `print-identifier`, `standard-error` |
//! | `blackhole` | sink | none |
//! | `file` | sink | `path` (required: a directory; subtask `i` appends to `<path>/part-<i>`) |

use std::collections::BTreeMap;

use keel_proto::{KeelError, Result};
use serde::{Deserialize, Serialize};

use crate::ConnectorSpec;

pub const SOURCE_CONNECTORS: &[&str] = &["datagen", "kafka"];
pub const SINK_CONNECTORS: &[&str] = &["print", "blackhole", "file", "kafka"];

/// Default `rows-per-second` of `datagen`.
pub const DATAGEN_DEFAULT_ROWS_PER_SECOND: f64 = 10_000.0;

/// A source, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SourceConfig {
    Datagen(DatagenOptions),
    Kafka(KafkaOptions),
}

/// A sink, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SinkConfig {
    Print(PrintOptions),
    Blackhole,
    File(FileOptions),
    Kafka(KafkaOptions),
}

impl SourceConfig {
    pub fn connector(&self) -> &'static str {
        match self {
            SourceConfig::Datagen(_) => "datagen",
            SourceConfig::Kafka(_) => "kafka",
        }
    }
}

impl SinkConfig {
    pub fn connector(&self) -> &'static str {
        match self {
            SinkConfig::Print(_) => "print",
            SinkConfig::Blackhole => "blackhole",
            SinkConfig::File(_) => "file",
            SinkConfig::Kafka(_) => "kafka",
        }
    }
}

/// `datagen`: a sequence of numbers, split over the subtasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatagenOptions {
    /// Total rate over all subtasks.
    pub rows_per_second: f64,
    /// Total number of rows over all subtasks; `None` = unbounded.
    pub number_of_rows: Option<u64>,
    /// The first sequence number.
    pub start: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrintOptions {
    pub print_identifier: Option<String>,
    pub standard_error: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOptions {
    /// The output directory.
    pub path: String,
}

/// `kafka`, checked for the presence of its required options and for known option names only;
/// the Kafka runtime reads the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaOptions {
    pub topic: Option<String>,
    pub topic_pattern: Option<String>,
    pub bootstrap_servers: String,
    /// Every option as written (including the ones above).
    pub options: BTreeMap<String, String>,
}

const DATAGEN_OPTIONS: &[&str] = &["number-of-rows", "rows-per-second", "start"];
const PRINT_OPTIONS: &[&str] = &["print-identifier", "standard-error"];
const FILE_OPTIONS: &[&str] = &["path"];

/// Formats of Flink's Kafka connector; each has options prefixed with its name (`json.*`), also
/// as `key.<format>.*` and `value.<format>.*`.
const KAFKA_FORMATS: &[&str] =
    &["csv", "json", "avro", "avro-confluent", "debezium-json", "canal-json", "maxwell-json", "raw"];
const KAFKA_COMMON_OPTIONS: &[&str] = &[
    "topic",
    "format",
    "key.format",
    "key.fields",
    "key.fields-prefix",
    "value.format",
    "value.fields-include",
    "value.fields-prefix",
];
/// Options of a Kafka source only (a SQL table used as a sink ignores its `scan.*` options, as
/// in Flink, where one table serves both).
pub const KAFKA_SOURCE_OPTIONS: &[&str] = &[
    "topic-pattern",
    "scan.startup.mode",
    "scan.startup.specific-offsets",
    "scan.startup.timestamp-millis",
    "scan.topic-partition-discovery.interval",
    "scan.header-filter",
    "scan.check.duplicated.group.id",
];
/// Options of a Kafka sink only (ignored when a SQL table is read).
pub const KAFKA_SINK_OPTIONS: &[&str] =
    &["sink.partitioner", "sink.delivery-guarantee", "sink.transactional-id-prefix", "sink.parallelism"];

pub(crate) fn source_config(spec: &ConnectorSpec, base: &str) -> Result<SourceConfig> {
    match spec.connector.as_str() {
        "datagen" => {
            check_keys(spec, base, DATAGEN_OPTIONS)?;
            let rows_per_second = match spec.options.get("rows-per-second") {
                None => DATAGEN_DEFAULT_ROWS_PER_SECOND,
                Some(text) => {
                    let field = format!("{base}.rows-per-second");
                    let v: f64 = text.trim().parse().map_err(|_| {
                        KeelError::invalid_spec(&field, format!("must be a positive number, got {text:?}"))
                    })?;
                    if !v.is_finite() || v <= 0.0 {
                        return Err(KeelError::invalid_spec(
                            field,
                            format!("must be a positive number, got {text:?}"),
                        ));
                    }
                    v
                }
            };
            let number_of_rows = match spec.options.get("number-of-rows") {
                None => None,
                Some(text) => Some(text.trim().parse::<u64>().map_err(|_| {
                    KeelError::invalid_spec(
                        format!("{base}.number-of-rows"),
                        format!("must be a non-negative integer, got {text:?}"),
                    )
                })?),
            };
            let start = match spec.options.get("start") {
                None => 0,
                Some(text) => text.trim().parse::<i64>().map_err(|_| {
                    KeelError::invalid_spec(
                        format!("{base}.start"),
                        format!("must be an integer, got {text:?}"),
                    )
                })?,
            };
            if let Some(n) = number_of_rows {
                if start.checked_add_unsigned(n).is_none() {
                    return Err(KeelError::invalid_spec(
                        format!("{base}.number-of-rows"),
                        format!("start {start} + number-of-rows {n} overflows a 64-bit integer"),
                    ));
                }
            }
            Ok(SourceConfig::Datagen(DatagenOptions { rows_per_second, number_of_rows, start }))
        }
        "kafka" => kafka(spec, base, true).map(SourceConfig::Kafka),
        other => Err(KeelError::invalid_spec(
            format!("{base}.connector"),
            format!("unknown connector '{other}'; known connectors: {}", SOURCE_CONNECTORS.join(", ")),
        )),
    }
}

pub(crate) fn sink_config(spec: &ConnectorSpec, base: &str) -> Result<SinkConfig> {
    match spec.connector.as_str() {
        "print" => {
            check_keys(spec, base, PRINT_OPTIONS)?;
            let standard_error = match spec.options.get("standard-error") {
                None => false,
                Some(text) => parse_bool(text).ok_or_else(|| {
                    KeelError::invalid_spec(
                        format!("{base}.standard-error"),
                        format!("must be true or false, got {text:?}"),
                    )
                })?,
            };
            Ok(SinkConfig::Print(PrintOptions {
                print_identifier: spec.options.get("print-identifier").cloned(),
                standard_error,
            }))
        }
        "blackhole" => {
            check_keys(spec, base, &[])?;
            Ok(SinkConfig::Blackhole)
        }
        "file" => {
            check_keys(spec, base, FILE_OPTIONS)?;
            let path = spec.options.get("path").map(|p| p.trim()).unwrap_or_default();
            if path.is_empty() {
                return Err(KeelError::invalid_spec(
                    format!("{base}.path"),
                    "the file connector requires `path`, the output directory",
                ));
            }
            Ok(SinkConfig::File(FileOptions { path: path.to_string() }))
        }
        "kafka" => kafka(spec, base, false).map(SinkConfig::Kafka),
        other => Err(KeelError::invalid_spec(
            format!("{base}.connector"),
            format!("unknown connector '{other}'; known connectors: {}", SINK_CONNECTORS.join(", ")),
        )),
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Every option key must be one of `accepted`.
fn check_keys(spec: &ConnectorSpec, base: &str, accepted: &[&str]) -> Result<()> {
    for key in spec.options.keys() {
        if !accepted.contains(&key.as_str()) {
            let list = if accepted.is_empty() {
                "it takes no options".to_string()
            } else {
                format!("accepted options: {}", accepted.join(", "))
            };
            return Err(KeelError::invalid_spec(
                format!("{base}.{key}"),
                format!("unknown option '{key}' for connector '{}'; {list}", spec.connector),
            ));
        }
    }
    Ok(())
}

fn kafka_key_known(key: &str, source: bool) -> bool {
    if KAFKA_COMMON_OPTIONS.contains(&key) {
        return true;
    }
    let side = if source { KAFKA_SOURCE_OPTIONS } else { KAFKA_SINK_OPTIONS };
    if side.contains(&key) {
        return true;
    }
    if key.strip_prefix("properties.").is_some_and(|rest| !rest.is_empty()) {
        return true;
    }
    let unprefixed = key.strip_prefix("key.").or_else(|| key.strip_prefix("value.")).unwrap_or(key);
    KAFKA_FORMATS.iter().any(|f| {
        unprefixed
            .strip_prefix(f)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty())
    })
}

fn kafka(spec: &ConnectorSpec, base: &str, source: bool) -> Result<KafkaOptions> {
    for key in spec.options.keys() {
        if !kafka_key_known(key, source) {
            let side = if source { KAFKA_SOURCE_OPTIONS } else { KAFKA_SINK_OPTIONS };
            let mut names: Vec<&str> = KAFKA_COMMON_OPTIONS.iter().chain(side).copied().collect();
            names.sort_unstable();
            return Err(KeelError::invalid_spec(
                format!("{base}.{key}"),
                format!(
                    "unknown option '{key}' for connector 'kafka' as a {}; accepted options: {}, \
                     properties.* (passed to the Kafka client), and format options \
                     <format>.*, key.<format>.*, value.<format>.* for formats {}",
                    if source { "source" } else { "sink" },
                    names.join(", "),
                    KAFKA_FORMATS.join(", ")
                ),
            ));
        }
    }
    let get = |k: &str| spec.options.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let topic = get("topic");
    let topic_pattern = if source { get("topic-pattern") } else { None };
    if topic.is_none() && topic_pattern.is_none() {
        let reason = if source {
            "the kafka source requires `topic` (or `topic-pattern`)"
        } else {
            "the kafka sink requires `topic`"
        };
        return Err(KeelError::invalid_spec(format!("{base}.topic"), reason));
    }
    let bootstrap_servers = get("properties.bootstrap.servers").ok_or_else(|| {
        KeelError::invalid_spec(
            format!("{base}.properties.bootstrap.servers"),
            "the kafka connector requires `properties.bootstrap.servers` (host:port,...)",
        )
    })?;
    Ok(KafkaOptions { topic, topic_pattern, bootstrap_servers, options: spec.options.clone() })
}
