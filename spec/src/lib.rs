//! Job specs: parsing and validation with errors that name the field.
//!
//! Layout:
//! - [`JobSpec`] / [`ConnectorSpec`]: a job as the user wrote it (YAML), checked. Every error is a
//!   [`KeelError::InvalidSpec`] whose `field` is the path of the offending value
//!   (`parallelism`, `sources[0].rows-per-second`, `sinks[1].from`) and whose reason says why.
//! - [`connectors`]: the connectors Keel knows, the options each accepts, and their typed
//!   configurations ([`SourceConfig`], [`SinkConfig`]) that the TaskManager builds tasks from.
//!
//! A spec may also carry a top-level `config:` mapping of configuration keys that apply to this
//! job alone (the checkpointing keys of `keel_config::JOB_CONFIG_KEYS`); errors name
//! `config.<key>`.
//!
//! Option values may be any YAML scalar; they are kept as strings, as in Flink's `WITH (...)`
//! clause. A nested mapping is flattened with dots, so `properties: {bootstrap.servers: b:9092}`
//! means `properties.bootstrap.servers: b:9092`.

pub mod connectors;
pub mod pipeline;

use std::collections::{BTreeMap, BTreeSet};

use keel_proto::{KeelError, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

pub use connectors::{DatagenOptions, FileOptions, KafkaOptions, PrintOptions, SinkConfig, SourceConfig};

/// The default of `maxParallelism`.
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;
/// The highest `maxParallelism` accepted (Flink's limit, 2^15).
pub const MAX_MAX_PARALLELISM: u32 = 32768;

const TOP_LEVEL_KEYS: &[&str] = &["name", "parallelism", "maxParallelism", "config", "sources", "sinks"];

/// The keys of a source or sink entry that are not connector options.
pub const ENTRY_KEYS: &[&str] = &["name", "connector", "from", "columns", "filter", "select"];

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    pub name: String,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub sources: Vec<ConnectorSpec>,
    pub sinks: Vec<ConnectorSpec>,
    /// Configuration keys set for this job alone (`config:`), checked against
    /// `keel_config::JOB_CONFIG_KEYS`; values as strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// One source or sink of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorSpec {
    pub name: String,
    pub connector: String,
    /// Sinks only: the source that feeds this sink. After [`JobSpec::parse`] it is always set for
    /// sinks (filled in with the only source when the spec left it out) and `None` for sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Every other key of the entry, with its value as a string.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Declared columns (`columns:`), for connectors with a format (kafka).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<keel_formats::ColumnDef>,
    /// Sinks only: a filter on the source's columns (`filter: "age >= 18"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Sinks only: a projection of the source's columns (`select: [id, name as full_name]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub select: Vec<String>,
}

impl JobSpec {
    /// Parses and validates a job spec. Errors are `KeelError::InvalidSpec { field, reason }`;
    /// a YAML syntax error has `field = "spec"` and a reason with its line and column.
    pub fn parse(yaml: &str) -> Result<JobSpec> {
        let value: Value = serde_yaml::from_str(yaml).map_err(|e| {
            let reason = match e.location() {
                Some(loc) if !e.to_string().contains("line") => {
                    format!("not valid YAML at line {} column {}: {e}", loc.line(), loc.column())
                }
                _ => format!("not valid YAML: {e}"),
            };
            KeelError::invalid_spec("spec", reason)
        })?;
        let map = match value {
            Value::Mapping(map) => map,
            Value::Null => {
                return Err(KeelError::invalid_spec("spec", "the spec is empty"));
            }
            other => {
                return Err(KeelError::invalid_spec(
                    "spec",
                    format!("the top level must be a mapping of keys, found {}", kind(&other)),
                ))
            }
        };

        let mut name = None;
        let mut parallelism = None;
        let mut max_parallelism = None;
        let mut sources = None;
        let mut sinks = None;
        let mut config = None;
        for (k, v) in &map {
            let key = key_string(k, "spec")?;
            match key.as_str() {
                "name" => name = Some(v),
                "parallelism" => parallelism = Some(v),
                "maxParallelism" => max_parallelism = Some(v),
                "sources" => sources = Some(v),
                "sinks" => sinks = Some(v),
                "config" => config = Some(v),
                other => {
                    return Err(KeelError::invalid_spec(
                        other,
                        format!("unknown key; accepted top-level keys: {}", TOP_LEVEL_KEYS.join(", ")),
                    ))
                }
            }
        }

        let name = match name {
            None => return Err(KeelError::invalid_spec("name", "the job needs a name")),
            Some(v) => scalar_string(v, "name")?,
        };
        check_name(&name, "name")?;

        let parallelism = match parallelism {
            None | Some(Value::Null) => 1,
            Some(v) => integer(v, "parallelism")?,
        };
        if parallelism == 0 {
            return Err(KeelError::invalid_spec("parallelism", "must be at least 1"));
        }
        let parallelism = u32::try_from(parallelism).map_err(|_| {
            KeelError::invalid_spec(
                "parallelism",
                format!("{parallelism} is too large (maxParallelism is at most {MAX_MAX_PARALLELISM})"),
            )
        })?;

        let (max_parallelism, explicit) = match max_parallelism {
            None | Some(Value::Null) => (u64::from(DEFAULT_MAX_PARALLELISM), false),
            Some(v) => (integer(v, "maxParallelism")?, true),
        };
        if max_parallelism > u64::from(MAX_MAX_PARALLELISM) {
            return Err(KeelError::invalid_spec(
                "maxParallelism",
                format!("{max_parallelism} is above the limit of {MAX_MAX_PARALLELISM}"),
            ));
        }
        let max_parallelism = max_parallelism as u32;
        if max_parallelism < parallelism {
            let what = if explicit {
                format!("{max_parallelism}")
            } else {
                format!("the default {max_parallelism}")
            };
            return Err(KeelError::invalid_spec(
                "maxParallelism",
                format!(
                    "{what} is lower than parallelism {parallelism}; maxParallelism must be >= parallelism"
                ),
            ));
        }

        let sources = connector_list(sources, "sources", Side::Source)?;
        let mut sinks = connector_list(sinks, "sinks", Side::Sink)?;

        // Sinks name the source that feeds them; with a single source it may be left out.
        let source_names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        for (i, sink) in sinks.iter_mut().enumerate() {
            let field = format!("sinks[{i}].from");
            match &sink.from {
                Some(from) => {
                    if !source_names.contains(&from.as_str()) {
                        return Err(KeelError::invalid_spec(
                            field,
                            format!("no source is named '{from}'; sources: {}", source_names.join(", ")),
                        ));
                    }
                }
                None if sources.len() == 1 => sink.from = Some(sources[0].name.clone()),
                None => {
                    return Err(KeelError::invalid_spec(
                        field,
                        format!(
                            "required when the job has several sources; one of: {}",
                            source_names.join(", ")
                        ),
                    ))
                }
            }
        }

        let config = job_config(config)?;
        let spec = JobSpec { name, parallelism, max_parallelism, sources, sinks, config };
        for i in 0..spec.sources.len() {
            spec.source_config(i)?;
        }
        for i in 0..spec.sinks.len() {
            spec.sink_config(i)?;
        }
        for i in 0..spec.sources.len() {
            spec.source_plan(i)?;
        }
        for i in 0..spec.sinks.len() {
            spec.sink_plan(i)?;
        }
        let prefixes = spec.transactional_id_prefixes();
        for (i, (field, prefix)) in prefixes.iter().enumerate() {
            if let Some((other, _)) = prefixes.iter().take(i).find(|(_, p)| p == prefix) {
                return Err(KeelError::invalid_spec(
                    field,
                    format!("{prefix:?} is also the prefix of {other}; each exactly-once sink needs its own"),
                ));
            }
        }
        Ok(spec)
    }

    /// The spec as YAML in the form a user writes (options at the entry level, columns as
    /// `{name, type, metadata}`), such that `JobSpec::parse(&spec.to_yaml())` gives `spec` back.
    /// An option whose key is one of [`ENTRY_KEYS`] cannot be written this way; callers that
    /// build specs refuse such options first.
    pub fn to_yaml(&self) -> String {
        use serde_yaml::Mapping;
        fn s(v: &str) -> Value {
            Value::String(v.to_string())
        }
        fn entry(c: &ConnectorSpec) -> Value {
            let mut m = Mapping::new();
            m.insert(s("name"), s(&c.name));
            m.insert(s("connector"), s(&c.connector));
            if let Some(from) = &c.from {
                m.insert(s("from"), s(from));
            }
            for (k, v) in &c.options {
                m.insert(s(k), s(v));
            }
            if !c.columns.is_empty() {
                let columns = c
                    .columns
                    .iter()
                    .map(|col| {
                        let mut cm = Mapping::new();
                        cm.insert(s("name"), s(&col.name));
                        cm.insert(s("type"), s(&col.data_type.to_string()));
                        if let Some(k) = col.metadata {
                            cm.insert(s("metadata"), s(k.name()));
                        }
                        Value::Mapping(cm)
                    })
                    .collect();
                m.insert(s("columns"), Value::Sequence(columns));
            }
            if let Some(f) = &c.filter {
                m.insert(s("filter"), s(f));
            }
            if !c.select.is_empty() {
                m.insert(s("select"), Value::Sequence(c.select.iter().map(|i| s(i)).collect()));
            }
            Value::Mapping(m)
        }
        let mut top = Mapping::new();
        top.insert(s("name"), s(&self.name));
        top.insert(s("parallelism"), Value::Number(self.parallelism.into()));
        top.insert(s("maxParallelism"), Value::Number(self.max_parallelism.into()));
        if !self.config.is_empty() {
            let config = self.config.iter().map(|(k, v)| (s(k), s(v))).collect::<Mapping>();
            top.insert(s("config"), Value::Mapping(config));
        }
        top.insert(s("sources"), Value::Sequence(self.sources.iter().map(entry).collect()));
        top.insert(s("sinks"), Value::Sequence(self.sinks.iter().map(entry).collect()));
        // Serialising a mapping of strings, numbers and lists cannot fail.
        serde_yaml::to_string(&Value::Mapping(top)).unwrap_or_default()
    }

    /// The plan in words, for `keel explain`: each source with its connector, format and
    /// columns; each sink with its input, filter, projection, output columns and connector.
    /// The spec is assumed valid (from [`JobSpec::parse`]); a part that does not plan is shown
    /// with its error.
    pub fn explain(&self) -> String {
        use std::fmt::Write as _;
        fn columns(schema: &keel_formats::Schema) -> String {
            schema
                .columns()
                .iter()
                .map(|c| match c.metadata {
                    Some(k) => format!("{} {} (metadata {})", c.name, c.data_type, k),
                    None => format!("{} {}", c.name, c.data_type),
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        fn connector(c: &ConnectorSpec) -> String {
            let mut out = c.connector.clone();
            for key in [
                "topic",
                "topic-pattern",
                "format",
                "key.format",
                "value.format",
                "key.fields",
                "sink.delivery-guarantee",
                "rows-per-second",
                "number-of-rows",
                "path",
            ] {
                if let Some(v) = c.options.get(key) {
                    let _ = write!(out, ", {key} {v}");
                }
            }
            out
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "job {} (parallelism {}, maxParallelism {})",
            self.name, self.parallelism, self.max_parallelism
        );
        for (k, v) in &self.config {
            let _ = writeln!(out, "  config {k} = {v}");
        }
        for (i, s) in self.sources.iter().enumerate() {
            let _ = writeln!(out, "source {}: {}", s.name, connector(s));
            match self.source_plan(i) {
                Ok(p) => {
                    let _ = writeln!(out, "  columns: {}", columns(&p.schema));
                }
                Err(e) => {
                    let _ = writeln!(out, "  error: {e}");
                }
            }
        }
        for (i, s) in self.sinks.iter().enumerate() {
            let _ =
                writeln!(out, "sink {} <- {}: {}", s.name, s.from.as_deref().unwrap_or("?"), connector(s));
            if let Some(f) = &s.filter {
                let _ = writeln!(out, "  filter: {f}");
            }
            if !s.select.is_empty() {
                let _ = writeln!(out, "  select: {}", s.select.join(", "));
            }
            match self.sink_plan(i) {
                Ok(p) => {
                    let _ = writeln!(out, "  columns: {}", columns(&p.schema));
                }
                Err(e) => {
                    let _ = writeln!(out, "  error: {e}");
                }
            }
        }
        out
    }

    /// The `sink.transactional-id-prefix` of every exactly-once Kafka sink, with its field
    /// (`sinks[1].sink.transactional-id-prefix`).
    pub fn transactional_id_prefixes(&self) -> Vec<(String, String)> {
        (0..self.sinks.len())
            .filter_map(|i| {
                let plan = self.sink_plan(i).ok()?;
                match plan.kafka?.delivery_guarantee {
                    keel_kafka::DeliveryGuarantee::ExactlyOnce { transactional_id_prefix } => {
                        Some((format!("sinks[{i}].sink.transactional-id-prefix"), transactional_id_prefix))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Checks the `transaction.timeout.ms` of every exactly-once Kafka sink against its
    /// brokers' `transaction.max.timeout.ms` and against `checkpoint_interval + failover_budget`
    /// (see `keel_kafka::txn_timeout`). Errors name `sinks[i].properties.transaction.timeout.ms`.
    /// Blocking: asks each sink's cluster, for up to `broker_timeout`; a cluster that does not
    /// answer skips only the broker bound (the job's tasks report an unreachable cluster), and
    /// is returned with the error, `(sink field, error)`, for the caller to log.
    pub fn check_transaction_timeouts(
        &self,
        checkpoint_interval: std::time::Duration,
        failover_budget: std::time::Duration,
        broker_timeout: std::time::Duration,
    ) -> Result<Vec<(String, KeelError)>> {
        let mut unasked = Vec::new();
        for i in 0..self.sinks.len() {
            let Some(opts) = self.sink_plan(i).ok().and_then(|p| p.kafka) else {
                continue;
            };
            if !matches!(opts.delivery_guarantee, keel_kafka::DeliveryGuarantee::ExactlyOnce { .. }) {
                continue;
            }
            let broker_max = match keel_kafka::broker_transaction_max_timeout(&opts, broker_timeout) {
                Ok(max) => Some(max),
                Err(error) => {
                    unasked.push((opts.field_prefix.clone(), error));
                    None
                }
            };
            keel_kafka::check_transaction_timeout(&opts, broker_max, checkpoint_interval, failover_budget)?;
        }
        Ok(unasked)
    }

    /// Slots a version of this job needs: one per subtask (the operators of a subtask are
    /// chained in one task).
    pub fn slots_needed(&self) -> u32 {
        self.parallelism
    }

    /// The typed configuration of source `index`. Errors name `sources[index].<option>`.
    pub fn source_config(&self, index: usize) -> Result<SourceConfig> {
        let field = format!("sources[{index}]");
        let spec =
            self.sources.get(index).ok_or_else(|| KeelError::invalid_spec(&field, "no such source"))?;
        connectors::source_config(spec, &field)
    }

    /// The typed configuration of sink `index`. Errors name `sinks[index].<option>`.
    pub fn sink_config(&self, index: usize) -> Result<SinkConfig> {
        let field = format!("sinks[{index}]");
        let spec = self.sinks.get(index).ok_or_else(|| KeelError::invalid_spec(&field, "no such sink"))?;
        connectors::sink_config(spec, &field)
    }

    /// The rows source `index` emits: its schema, and (kafka) how messages decode into rows.
    pub fn source_plan(&self, index: usize) -> Result<pipeline::SourcePlan> {
        pipeline::source_plan(self, index)
    }

    /// What sink `index` does with the rows of its source: filter, projection, its schema, and
    /// (kafka) how rows encode into messages.
    pub fn sink_plan(&self, index: usize) -> Result<pipeline::SinkPlan> {
        pipeline::sink_plan(self, index)
    }

    /// Indices of the sinks fed by source `source` (by its name).
    pub fn sinks_of(&self, source: &str) -> Vec<usize> {
        self.sinks
            .iter()
            .enumerate()
            .filter(|(_, s)| s.from.as_deref() == Some(source))
            .map(|(i, _)| i)
            .collect()
    }
}

/// The `config:` mapping: flattened with dots, every key one of `keel_config::JOB_CONFIG_KEYS`
/// and every value parsed. Errors name `config.<key>`.
fn job_config(value: Option<&Value>) -> Result<BTreeMap<String, String>> {
    let map = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Mapping(map)) => map,
        Some(other) => {
            return Err(KeelError::invalid_spec(
                "config",
                format!("must be a mapping of configuration keys to values, found {}", kind(other)),
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let key = key_string(k, "config")?;
        flatten_option(&key, v, "config", &mut out)?;
    }
    for (key, value) in &out {
        keel_config::check_job_config(key, value)
            .map_err(|reason| KeelError::invalid_spec(format!("config.{key}"), reason))?;
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Sink,
}

fn connector_list(value: Option<&Value>, field: &str, side: Side) -> Result<Vec<ConnectorSpec>> {
    let what = if side == Side::Source { "source" } else { "sink" };
    let items = match value {
        None | Some(Value::Null) => {
            return Err(KeelError::invalid_spec(field, format!("the job needs at least one {what}")))
        }
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            return Err(KeelError::invalid_spec(
                field,
                format!("must be a list of {what}s, found {}", kind(other)),
            ))
        }
    };
    if items.is_empty() {
        return Err(KeelError::invalid_spec(field, format!("the job needs at least one {what}")));
    }
    let mut out: Vec<ConnectorSpec> = Vec::with_capacity(items.len());
    let mut seen = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let base = format!("{field}[{i}]");
        let spec = connector_entry(item, &base, side)?;
        if !seen.insert(spec.name.clone()) {
            return Err(KeelError::invalid_spec(
                format!("{base}.name"),
                format!("duplicate {what} name '{}'", spec.name),
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

fn connector_entry(item: &Value, base: &str, side: Side) -> Result<ConnectorSpec> {
    let map = match item {
        Value::Mapping(map) => map,
        other => {
            return Err(KeelError::invalid_spec(
                base,
                format!("must be a mapping with name, connector and options, found {}", kind(other)),
            ))
        }
    };
    let mut name = None;
    let mut connector = None;
    let mut from = None;
    let mut options = BTreeMap::new();
    let mut columns = Vec::new();
    let mut filter = None;
    let mut select = Vec::new();
    for (k, v) in map {
        let key = key_string(k, base)?;
        let field = format!("{base}.{key}");
        match key.as_str() {
            "name" => name = Some(scalar_string(v, &field)?),
            "connector" => connector = Some(scalar_string(v, &field)?),
            "from" if side == Side::Sink => from = Some(scalar_string(v, &field)?),
            "from" => {
                return Err(KeelError::invalid_spec(
                    field,
                    "only sinks take `from` (the source that feeds them)",
                ))
            }
            "columns" => columns = keel_formats::ColumnDef::list_from_yaml(&field, v)?,
            "filter" if side == Side::Sink => filter = Some(scalar_string(v, &field)?),
            "select" if side == Side::Sink => {
                let items = match v {
                    Value::Sequence(items) => items,
                    other => {
                        return Err(KeelError::invalid_spec(
                            field,
                            format!("must be a list of column names, found {}", kind(other)),
                        ))
                    }
                };
                for (j, item) in items.iter().enumerate() {
                    select.push(scalar_string(item, &format!("{field}[{j}]"))?);
                }
            }
            "filter" | "select" => {
                return Err(KeelError::invalid_spec(
                    field,
                    format!("only sinks take `{key}` (it applies to the rows a sink receives)"),
                ))
            }
            _ => flatten_option(&key, v, base, &mut options)?,
        }
    }
    let name = name.ok_or_else(|| {
        KeelError::invalid_spec(format!("{base}.name"), "every source and sink needs a name")
    })?;
    check_name(&name, &format!("{base}.name"))?;
    let connector = connector.ok_or_else(|| {
        KeelError::invalid_spec(
            format!("{base}.connector"),
            format!("missing; known connectors: {}", known_connectors(side)),
        )
    })?;
    let known = match side {
        Side::Source => connectors::SOURCE_CONNECTORS,
        Side::Sink => connectors::SINK_CONNECTORS,
    };
    if !known.contains(&connector.as_str()) {
        let other_side = match side {
            Side::Source => connectors::SINK_CONNECTORS.contains(&connector.as_str()),
            Side::Sink => connectors::SOURCE_CONNECTORS.contains(&connector.as_str()),
        };
        let reason = if other_side {
            format!(
                "'{connector}' is a {} connector; known {} connectors: {}",
                if side == Side::Source { "sink" } else { "source" },
                if side == Side::Source { "source" } else { "sink" },
                known_connectors(side)
            )
        } else {
            format!("unknown connector '{connector}'; known connectors: {}", known_connectors(side))
        };
        return Err(KeelError::invalid_spec(format!("{base}.connector"), reason));
    }
    Ok(ConnectorSpec { name, connector, from, options, columns, filter, select })
}

fn known_connectors(side: Side) -> String {
    match side {
        Side::Source => connectors::SOURCE_CONNECTORS.join(", "),
        Side::Sink => connectors::SINK_CONNECTORS.join(", "),
    }
}

/// Stores an option, flattening nested mappings with dots.
fn flatten_option(key: &str, value: &Value, base: &str, out: &mut BTreeMap<String, String>) -> Result<()> {
    let field = format!("{base}.{key}");
    match value {
        Value::Mapping(inner) => {
            for (k, v) in inner {
                let sub = key_string(k, &field)?;
                flatten_option(&format!("{key}.{sub}"), v, base, out)?;
            }
            Ok(())
        }
        Value::Null => Err(KeelError::invalid_spec(field, "has no value")),
        other => {
            let text = scalar_string(other, &field)?;
            if out.insert(key.to_string(), text).is_some() {
                return Err(KeelError::invalid_spec(field, "given twice"));
            }
            Ok(())
        }
    }
}

fn key_string(key: &Value, field: &str) -> Result<String> {
    match key {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => {
            Err(KeelError::invalid_spec(field, format!("keys must be plain strings, found {}", kind(other))))
        }
    }
}

/// A scalar as text (strings, numbers and booleans); anything else is an error.
fn scalar_string(value: &Value, field: &str) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Tagged(t) => scalar_string(&t.value, field),
        Value::Null => Err(KeelError::invalid_spec(field, "has no value")),
        other => Err(KeelError::invalid_spec(
            field,
            format!("must be a single value (string, number or boolean), found {}", kind(other)),
        )),
    }
}

/// A non-negative integer, written as a YAML number or a string of digits.
fn integer(value: &Value, field: &str) -> Result<u64> {
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            KeelError::invalid_spec(field, format!("must be a non-negative integer, got {n}"))
        }),
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| {
            KeelError::invalid_spec(field, format!("must be a non-negative integer, got {s:?}"))
        }),
        other => Err(KeelError::invalid_spec(
            field,
            format!("must be a non-negative integer, found {}", kind(other)),
        )),
    }
}

/// Names of jobs, sources and sinks: `[A-Za-z0-9._-]+`.
fn check_name(name: &str, field: &str) -> Result<()> {
    if name.is_empty() {
        return Err(KeelError::invalid_spec(field, "must not be empty"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(KeelError::invalid_spec(
            field,
            format!("{name:?} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests;
