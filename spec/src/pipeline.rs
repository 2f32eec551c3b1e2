//! What flows through a job: the rows each source emits and what each sink does with them.
//!
//! - A `datagen` source emits one column, `id BIGINT` (its sequence numbers).
//! - A `kafka` source emits the declared `columns`; without any, a single `value BYTES` column
//!   read with the `raw` format. Its [`RecordFormat`] says how a message decodes into a row.
//! - A sink receives the rows of its source (`from`), keeps those matching its `filter`, and
//!   projects them with its `select` (all columns when absent). A `kafka` sink encodes the
//!   resulting rows with its own format options; `file` and `print` write one CSV line per row
//!   (for a single column, just its value).
//! - A `kafka` sink may declare `columns`: then its rows must be those columns, by name and
//!   type, in that order, and metadata columns among them (`timestamp`, `headers`) are written
//!   as the record's timestamp and headers rather than into the payload. (A SQL sink table
//!   compiles to exactly this: the SELECT list is named and ordered after its columns.)

use std::collections::BTreeMap;

use keel_formats::{ColumnDef, DataType, Filter, Projection, RecordFormat, Schema};
use keel_proto::{KeelError, Result};

use crate::JobSpec;

/// The rows of one source.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub name: String,
    pub schema: Schema,
    /// Kafka sources: how messages decode into rows.
    pub format: Option<RecordFormat>,
    /// Kafka sources: connection, subscription and startup options.
    pub kafka: Option<keel_kafka::KafkaSourceOptions>,
}

/// What one sink does with its source's rows.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    /// Index of the source that feeds it.
    pub source: usize,
    pub filter: Option<Filter>,
    pub projection: Option<Projection>,
    /// The rows the sink writes.
    pub schema: Schema,
    /// How rows become bytes: the Kafka message layout, or one line of text for file/print.
    pub format: RecordFormat,
    pub kafka: Option<keel_kafka::KafkaSinkOptions>,
}

fn options_with_default_raw(options: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut o = options.clone();
    if !o.contains_key("format") && !o.contains_key("value.format") {
        o.insert("format".into(), "raw".into());
    }
    o
}

pub(crate) fn source_plan(spec: &JobSpec, index: usize) -> Result<SourcePlan> {
    let base = format!("sources[{index}]");
    let s = spec.sources.get(index).ok_or_else(|| KeelError::invalid_spec(&base, "no such source"))?;
    match s.connector.as_str() {
        "datagen" => {
            if !s.columns.is_empty() {
                return Err(KeelError::invalid_spec(
                    format!("{base}.columns"),
                    "a datagen source has one fixed column, `id BIGINT`; remove `columns`",
                ));
            }
            let schema =
                Schema::from_columns(&format!("{base}.columns"), &[ColumnDef::new("id", DataType::BigInt)])?;
            Ok(SourcePlan { name: s.name.clone(), schema, format: None, kafka: None })
        }
        "kafka" => {
            let columns = if s.columns.is_empty() {
                let format = s.options.get("format").or(s.options.get("value.format"));
                if format.is_some_and(|f| f != "raw") {
                    return Err(KeelError::invalid_spec(
                        format!("{base}.columns"),
                        "required with a json or csv format: declare the columns and their types",
                    ));
                }
                vec![ColumnDef::new("value", DataType::Bytes)]
            } else {
                s.columns.clone()
            };
            let schema = Schema::from_columns(&format!("{base}.columns"), &columns)?;
            let options = options_with_default_raw(&s.options);
            let format = RecordFormat::from_options(&base, &options, &schema)?;
            let kafka = keel_kafka::KafkaSourceOptions::from_spec(&base, &s.options)?;
            Ok(SourcePlan { name: s.name.clone(), schema, format: Some(format), kafka: Some(kafka) })
        }
        other => {
            Err(KeelError::invalid_spec(format!("{base}.connector"), format!("'{other}' is not a source")))
        }
    }
}

pub(crate) fn sink_plan(spec: &JobSpec, index: usize) -> Result<SinkPlan> {
    let base = format!("sinks[{index}]");
    let s = spec.sinks.get(index).ok_or_else(|| KeelError::invalid_spec(&base, "no such sink"))?;
    let from = s.from.as_deref().unwrap_or_default();
    let source = spec.sources.iter().position(|src| src.name == from).ok_or_else(|| {
        KeelError::invalid_spec(format!("{base}.from"), format!("no source is named '{from}'"))
    })?;
    let input = source_plan(spec, source)?.schema;
    let filter = match &s.filter {
        Some(text) => Some(Filter::parse(&format!("{base}.filter"), text, &input)?),
        None => None,
    };
    let projection = if s.select.is_empty() {
        None
    } else {
        Some(Projection::parse(&format!("{base}.select"), &s.select, &input)?)
    };
    let schema = projection.as_ref().map(|p| p.output_schema().clone()).unwrap_or(input);
    if !s.columns.is_empty() && s.connector != "kafka" {
        return Err(KeelError::invalid_spec(
            format!("{base}.columns"),
            "only kafka sinks take `columns`; use `select` to shape the rows",
        ));
    }
    let (format, kafka) = if s.connector == "kafka" {
        let schema_for_format = if s.columns.is_empty() {
            schema.clone()
        } else {
            declared_sink_columns(&base, &s.columns, &schema)?
        };
        let format =
            RecordFormat::from_options(&base, &options_with_default_raw(&s.options), &schema_for_format)?;
        let kafka = keel_kafka::KafkaSinkOptions::from_spec(&base, &s.options)?;
        return Ok(SinkPlan {
            name: s.name.clone(),
            source,
            filter,
            projection,
            schema: schema_for_format,
            format,
            kafka: Some(kafka),
        });
    } else {
        (RecordFormat::text_lines(&base, &schema)?, None)
    };
    Ok(SinkPlan { name: s.name.clone(), source, filter, projection, schema, format, kafka })
}

/// A Kafka sink's declared `columns`: the rows it receives (its source's, filtered and
/// projected) must have these columns, by name and type, in this order; the declaration adds
/// what the rows cannot carry: which columns are metadata the sink writes (`timestamp`,
/// `headers`). Errors name `sinks[i].columns[j]`.
fn declared_sink_columns(base: &str, columns: &[ColumnDef], rows: &Schema) -> Result<Schema> {
    let field = format!("{base}.columns");
    let declared = Schema::from_columns(&field, columns)?;
    let got = rows.columns();
    let describe = |cols: &[ColumnDef]| {
        cols.iter().map(|c| format!("{} {}", c.name, c.data_type)).collect::<Vec<_>>().join(", ")
    };
    for (j, want) in declared.columns().iter().enumerate() {
        match got.get(j) {
            Some(have) if have.name == want.name && have.data_type == want.data_type => {}
            _ => {
                return Err(KeelError::invalid_spec(
                    format!("{field}[{j}]"),
                    format!(
                    "the sink's rows are ({}) but its columns are ({}): select the columns in this order, \
                         with these names and types",
                    describe(got),
                    describe(declared.columns())
                ),
                ))
            }
        }
    }
    if got.len() > declared.columns().len() {
        return Err(KeelError::invalid_spec(
            &field,
            format!(
                "the sink's rows are ({}) but its columns are ({}): the rows have more columns",
                describe(got),
                describe(declared.columns())
            ),
        ));
    }
    Ok(declared)
}
