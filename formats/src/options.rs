//! Format options, read from a connector's Flink-style options.
//!
//! | option | meaning |
//! | --- | --- |
//! | `format` or `value.format` | format of the message value: `raw`, `json`, `csv` (required; both may be given only if equal) |
//! | `key.format` | format of the message key (requires `key.fields`) |
//! | `key.fields` | `;`-separated columns written to / read from the key (requires `key.format`) |
//! | `key.fields-prefix` | prefix of the key columns' names, stripped in the key payload (requires `value.fields-include: EXCEPT_KEY`) |
//! | `value.fields-prefix` | prefix of the value columns' names, stripped in the value payload |
//! | `value.fields-include` | `ALL` (default: key columns are in the value too) or `EXCEPT_KEY` |
//!
//! Format options of the value format are written `<format>.<option>` or
//! `value.<format>.<option>` (both forms may be given only with the same value); those of the key
//! format `key.<format>.<option>`:
//!
//! | format | options |
//! | --- | --- |
//! | `raw` | `raw.charset` (only `UTF-8`) |
//! | `json` | `json.ignore-parse-errors` (false), `json.fail-on-missing-field` (false), `json.timestamp-format.standard` (`SQL` or `ISO-8601`), `json.encode.ignore-null-fields` (false) |
//! | `csv` | `csv.field-delimiter` (`,`; one ASCII character, `\t` allowed), `csv.quote-character` (`"`), `csv.disable-quote-character` (false), `csv.ignore-parse-errors` (false), `csv.null-literal` (none) |
//!
//! Options of a format that neither side uses are refused, as are unknown options of a format
//! in use. Every error is `KeelError::InvalidSpec` naming `<field_prefix>.<option>`.

use std::collections::BTreeMap;
use std::fmt;

use keel_proto::{KeelError, Result};

use crate::schema::{DataType, Schema};

/// The formats Keel reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatKind {
    Raw,
    Json,
    Csv,
}

impl FormatKind {
    pub const ALL: &'static [FormatKind] = &[FormatKind::Raw, FormatKind::Json, FormatKind::Csv];

    pub fn name(self) -> &'static str {
        match self {
            FormatKind::Raw => "raw",
            FormatKind::Json => "json",
            FormatKind::Csv => "csv",
        }
    }

    pub fn parse(text: &str) -> Option<FormatKind> {
        FormatKind::ALL.iter().copied().find(|f| f.name().eq_ignore_ascii_case(text.trim()))
    }

    fn options(self) -> &'static [&'static str] {
        match self {
            FormatKind::Raw => &["charset"],
            FormatKind::Json => &[
                "ignore-parse-errors",
                "fail-on-missing-field",
                "timestamp-format.standard",
                "encode.ignore-null-fields",
            ],
            FormatKind::Csv => &[
                "field-delimiter",
                "quote-character",
                "disable-quote-character",
                "ignore-parse-errors",
                "null-literal",
            ],
        }
    }
}

impl fmt::Display for FormatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Formats of Flink's Kafka connector that Keel knows by name but does not implement; their
/// options are recognised so that the error says "not supported" rather than "unknown".
const OTHER_FLINK_FORMATS: &[&str] =
    &["avro", "avro-confluent", "debezium-json", "canal-json", "maxwell-json", "protobuf"];

/// Which side of the message a format describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSide {
    /// `key.format`, options `key.<format>.*`.
    Key,
    /// `format` or `value.format`, options `<format>.*` or `value.<format>.*`.
    Value,
}

/// `json.timestamp-format.standard`: how TIMESTAMP values are written (both are read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampStandard {
    /// `2024-05-01 12:00:00.000`
    #[default]
    Sql,
    /// `2024-05-01T12:00:00.000Z`
    Iso8601,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawOptions {}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonOptions {
    /// Skip (and count) a message that does not parse instead of failing the task.
    pub ignore_parse_errors: bool,
    /// A declared field missing from the object is an error instead of a null.
    pub fail_on_missing_field: bool,
    pub timestamp_standard: TimestampStandard,
    /// Leave null fields out of written objects.
    pub encode_ignore_null_fields: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    pub field_delimiter: u8,
    /// `None` when `csv.disable-quote-character` is set.
    pub quote_character: Option<u8>,
    pub ignore_parse_errors: bool,
    pub null_literal: Option<String>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            field_delimiter: b',',
            quote_character: Some(b'"'),
            ignore_parse_errors: false,
            null_literal: None,
        }
    }
}

/// The format of one side of a message, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatOptions {
    Raw(RawOptions),
    Json(JsonOptions),
    Csv(CsvOptions),
}

impl FormatOptions {
    pub fn kind(&self) -> FormatKind {
        match self {
            FormatOptions::Raw(_) => FormatKind::Raw,
            FormatOptions::Json(_) => FormatKind::Json,
            FormatOptions::Csv(_) => FormatKind::Csv,
        }
    }

    /// Whether a message that does not parse is skipped (and counted) rather than an error.
    pub fn ignore_parse_errors(&self) -> bool {
        match self {
            FormatOptions::Raw(_) => false,
            FormatOptions::Json(o) => o.ignore_parse_errors,
            FormatOptions::Csv(o) => o.ignore_parse_errors,
        }
    }

    /// Reads the format of `side` and its options from `options`; `None` when that side has no
    /// format. `field_prefix` is the path of the connector (`sources[0]`); errors name
    /// `<field_prefix>.<option>`.
    pub fn from_options(
        field_prefix: &str,
        side: FormatSide,
        options: &BTreeMap<String, String>,
    ) -> Result<Option<FormatOptions>> {
        let field = |key: &str| format!("{field_prefix}.{key}");
        let (format_key, text) = match side {
            FormatSide::Key => match options.get("key.format") {
                None => return Ok(None),
                Some(t) => ("key.format", t),
            },
            FormatSide::Value => {
                match (options.get("format"), options.get("value.format")) {
                    (None, None) => return Ok(None),
                    (Some(t), None) => ("format", t),
                    (None, Some(t)) => ("value.format", t),
                    (Some(a), Some(b)) => {
                        if !a.trim().eq_ignore_ascii_case(b.trim()) {
                            return Err(KeelError::invalid_spec(
                            field("value.format"),
                            format!("'{b}' contradicts format '{a}'; give only one of format and value.format"),
                        ));
                        }
                        ("value.format", b)
                    }
                }
            }
        };
        let kind = match FormatKind::parse(text) {
            Some(kind) => kind,
            None => {
                let supported = FormatKind::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
                let reason = if OTHER_FLINK_FORMATS.contains(&text.trim()) {
                    format!("format '{text}' is not supported yet; supported formats: {supported}")
                } else {
                    format!("unknown format '{text}'; supported formats: {supported}")
                };
                return Err(KeelError::invalid_spec(field(format_key), reason));
            }
        };

        // Collect this format's options for this side, checking that each is known and that the
        // two spellings of a value option agree.
        let prefixes: &[String] = &match side {
            FormatSide::Key => vec![format!("key.{}.", kind.name())],
            FormatSide::Value => vec![format!("{}.", kind.name()), format!("value.{}.", kind.name())],
        };
        let mut own: BTreeMap<&str, (&str, &str)> = BTreeMap::new(); // option -> (full key, value)
        for (key, value) in options {
            let Some(opt) = prefixes.iter().find_map(|p| key.strip_prefix(p.as_str())) else { continue };
            if !kind.options().contains(&opt) {
                return Err(KeelError::invalid_spec(
                    field(key),
                    format!(
                        "unknown option '{opt}' of format {kind}; its options: {}",
                        kind.options().join(", ")
                    ),
                ));
            }
            if let Some((other_key, other_value)) = own.get(opt) {
                if other_value.trim() != value.trim() {
                    return Err(KeelError::invalid_spec(
                        field(key),
                        format!("'{value}' contradicts {other_key}: '{other_value}'; give only one of them"),
                    ));
                }
            }
            own.insert(opt, (key.as_str(), value.as_str()));
        }
        let get = |opt: &str| own.get(opt).copied();
        let boolean = |opt: &str| -> Result<bool> {
            match get(opt) {
                None => Ok(false),
                Some((key, v)) => match v.trim().to_ascii_lowercase().as_str() {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => {
                        Err(KeelError::invalid_spec(field(key), format!("must be true or false, got {v:?}")))
                    }
                },
            }
        };

        let format = match kind {
            FormatKind::Raw => {
                if let Some((key, v)) = get("charset") {
                    let v = v.trim().to_ascii_uppercase();
                    if v != "UTF-8" && v != "UTF8" {
                        return Err(KeelError::invalid_spec(
                            field(key),
                            format!("only UTF-8 is supported, got {v:?}"),
                        ));
                    }
                }
                FormatOptions::Raw(RawOptions {})
            }
            FormatKind::Json => {
                let timestamp_standard = match get("timestamp-format.standard") {
                    None => TimestampStandard::Sql,
                    Some((key, v)) => match v.trim().to_ascii_uppercase().as_str() {
                        "SQL" => TimestampStandard::Sql,
                        "ISO-8601" | "ISO8601" => TimestampStandard::Iso8601,
                        _ => {
                            return Err(KeelError::invalid_spec(
                                field(key),
                                format!("must be SQL or ISO-8601, got {v:?}"),
                            ))
                        }
                    },
                };
                FormatOptions::Json(JsonOptions {
                    ignore_parse_errors: boolean("ignore-parse-errors")?,
                    fail_on_missing_field: boolean("fail-on-missing-field")?,
                    timestamp_standard,
                    encode_ignore_null_fields: boolean("encode.ignore-null-fields")?,
                })
            }
            FormatKind::Csv => {
                let single = |opt: &str, default: u8| -> Result<u8> {
                    let Some((key, v)) = get(opt) else { return Ok(default) };
                    let c = match v {
                        "\\t" => b'\t',
                        _ if v.len() == 1 && v.is_ascii() => v.as_bytes()[0],
                        _ => {
                            return Err(KeelError::invalid_spec(
                                field(key),
                                format!("must be a single ASCII character (or \\t), got {v:?}"),
                            ))
                        }
                    };
                    if c == b'\r' || c == b'\n' {
                        return Err(KeelError::invalid_spec(field(key), "must not be a line break"));
                    }
                    Ok(c)
                };
                let field_delimiter = single("field-delimiter", b',')?;
                let quote = single("quote-character", b'"')?;
                let quote_character = if boolean("disable-quote-character")? {
                    if let Some((key, _)) = get("quote-character") {
                        return Err(KeelError::invalid_spec(
                            field(key),
                            "contradicts csv.disable-quote-character: true",
                        ));
                    }
                    None
                } else {
                    if quote == field_delimiter {
                        let key = get("quote-character").or(get("field-delimiter")).map_or("csv", |(k, _)| k);
                        return Err(KeelError::invalid_spec(
                            field(key),
                            "the quote character must differ from the field delimiter",
                        ));
                    }
                    Some(quote)
                };
                let null_literal = get("null-literal").map(|(_, v)| v.to_string());
                FormatOptions::Csv(CsvOptions {
                    field_delimiter,
                    quote_character,
                    ignore_parse_errors: boolean("ignore-parse-errors")?,
                    null_literal,
                })
            }
        };
        Ok(Some(format))
    }
}

/// `value.fields-include`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldsInclude {
    /// Every physical column is in the value, key columns included.
    #[default]
    All,
    /// Key columns are only in the key.
    ExceptKey,
}

/// How a schema's columns map onto a Kafka message: which go into the key and with which format,
/// which into the value. Built once per source or sink and checked against its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFormat {
    pub value: FormatOptions,
    /// Set exactly when `key_fields` is not empty.
    pub key: Option<FormatOptions>,
    /// Column names (prefix included), in key order.
    pub key_fields: Vec<String>,
    pub key_fields_prefix: String,
    pub value_fields_prefix: String,
    pub value_fields_include: FieldsInclude,
}

/// One column of a key or value payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PayloadField {
    /// Position in the schema (and the row).
    pub index: usize,
    /// The name inside the payload (the column name without its key/value prefix).
    pub name: String,
    pub data_type: DataType,
}

impl RecordFormat {
    /// Reads and checks the format options of a Kafka source or sink against its schema.
    /// `field_prefix` is the path of the connector (`sources[0]`). A ROW column in a csv or raw
    /// payload is refused, naming the column's type (`sources[0].columns[2].type`): only json
    /// carries nested rows.
    pub fn from_options(
        field_prefix: &str,
        options: &BTreeMap<String, String>,
        schema: &Schema,
    ) -> Result<RecordFormat> {
        Self::read(field_prefix, options, schema, false)
    }

    /// The format of a `print` or `file` sink: one CSV line per row, with default options
    /// (a ROW column is written as its JSON object, as a MAP is). `field_prefix` is the sink's
    /// path (`sinks[1]`).
    pub fn text_lines(field_prefix: &str, schema: &Schema) -> Result<RecordFormat> {
        let options: BTreeMap<String, String> = [("format".to_string(), "csv".to_string())].into();
        Self::read(field_prefix, &options, schema, true)
    }

    /// [`RecordFormat::from_options`]; with `rows_as_text` a csv payload may hold ROW columns
    /// (written as JSON text).
    fn read(
        field_prefix: &str,
        options: &BTreeMap<String, String>,
        schema: &Schema,
        rows_as_text: bool,
    ) -> Result<RecordFormat> {
        let field = |key: &str| format!("{field_prefix}.{key}");
        let value =
            FormatOptions::from_options(field_prefix, FormatSide::Value, options)?.ok_or_else(|| {
                KeelError::invalid_spec(
                    field("format"),
                    "required: the format of the message value, one of raw, json, csv",
                )
            })?;
        let key = FormatOptions::from_options(field_prefix, FormatSide::Key, options)?;
        check_stray_format_options(
            field_prefix,
            options,
            value.kind(),
            key.as_ref().map(FormatOptions::kind),
        )?;

        let value_fields_include = match options.get("value.fields-include") {
            None => FieldsInclude::All,
            Some(v) => match v.trim().to_ascii_uppercase().as_str() {
                "ALL" => FieldsInclude::All,
                "EXCEPT_KEY" => FieldsInclude::ExceptKey,
                _ => {
                    return Err(KeelError::invalid_spec(
                        field("value.fields-include"),
                        format!("must be ALL or EXCEPT_KEY, got {v:?}"),
                    ))
                }
            },
        };
        let key_fields_prefix = options.get("key.fields-prefix").cloned().unwrap_or_default();
        let value_fields_prefix = options.get("value.fields-prefix").cloned().unwrap_or_default();

        let mut key_fields: Vec<String> = Vec::new();
        if let Some(text) = options.get("key.fields") {
            for name in text.split(';').map(str::trim) {
                if name.is_empty() {
                    return Err(KeelError::invalid_spec(
                        field("key.fields"),
                        format!("{text:?} has an empty name; write names separated by ';', like id;region"),
                    ));
                }
                let Some(index) = schema.index_of(name) else {
                    return Err(KeelError::invalid_spec(
                        field("key.fields"),
                        format!("unknown column '{name}'; columns: {}", schema.names()),
                    ));
                };
                if let Some(key) = schema.column(index).and_then(|c| c.metadata) {
                    return Err(KeelError::invalid_spec(
                        field("key.fields"),
                        format!("'{name}' is a metadata column ({key}); key fields must be physical columns"),
                    ));
                }
                if key_fields.iter().any(|k| k == name) {
                    return Err(KeelError::invalid_spec(
                        field("key.fields"),
                        format!("'{name}' is listed twice"),
                    ));
                }
                key_fields.push(name.to_string());
            }
        }
        match (&key, key_fields.is_empty()) {
            (Some(_), true) => {
                return Err(KeelError::invalid_spec(
                    field("key.format"),
                    "a key format needs key.fields, the columns that make the key",
                ))
            }
            (None, false) => {
                return Err(KeelError::invalid_spec(
                    field("key.fields"),
                    "key fields need key.format, the format of the message key",
                ))
            }
            _ => {}
        }
        if !key_fields_prefix.is_empty() {
            if value_fields_include != FieldsInclude::ExceptKey {
                return Err(KeelError::invalid_spec(
                    field("key.fields-prefix"),
                    "needs value.fields-include: EXCEPT_KEY (key columns are renamed in the key only)",
                ));
            }
            if let Some(bad) =
                key_fields.iter().find(|k| !k.starts_with(&key_fields_prefix) || **k == key_fields_prefix)
            {
                return Err(KeelError::invalid_spec(
                    field("key.fields"),
                    format!("key field '{bad}' does not start with key.fields-prefix '{key_fields_prefix}'"),
                ));
            }
        }

        let format = RecordFormat {
            value,
            key,
            key_fields,
            key_fields_prefix,
            value_fields_prefix,
            value_fields_include,
        };

        if !rows_as_text {
            let sides = [(Some(&format.value), format.value_payload(schema))]
                .into_iter()
                .chain(std::iter::once((format.key.as_ref(), format.key_payload(schema))));
            for (side, payload) in sides {
                let Some(side) = side.filter(|f| f.kind() != FormatKind::Json) else { continue };
                if let Some(p) = payload.iter().find(|p| matches!(p.data_type, DataType::Row(_))) {
                    let name = schema.column(p.index).map_or(p.name.as_str(), |c| c.name.as_str());
                    return Err(KeelError::invalid_spec(
                        format!("{field_prefix}.columns[{}].type", p.index),
                        format!(
                            "ROW columns need the json format; column '{name}' is {} and its format is {}",
                            p.data_type,
                            side.kind()
                        ),
                    ));
                }
            }
        }

        // Payload shapes: prefixes and raw's single column.
        for c in format.value_fields(schema) {
            if !c.1.starts_with(&format.value_fields_prefix)
                || (!format.value_fields_prefix.is_empty() && c.1 == format.value_fields_prefix)
            {
                return Err(KeelError::invalid_spec(
                    field("value.fields-prefix"),
                    format!(
                        "value column '{}' does not start with value.fields-prefix '{}'",
                        c.1, format.value_fields_prefix
                    ),
                ));
            }
        }
        let value_payload = format.value_payload(schema);
        check_raw(
            &format.value,
            &value_payload,
            &field(if options.contains_key("value.format") { "value.format" } else { "format" }),
            "value",
        )?;
        if let Some(key) = &format.key {
            check_raw(key, &format.key_payload(schema), &field("key.format"), "key")?;
        }
        if value_payload.is_empty() && format.value.kind() == FormatKind::Csv {
            return Err(KeelError::invalid_spec(
                field("format"),
                "csv needs at least one physical column in the value",
            ));
        }
        Ok(format)
    }

    /// (index, column name) of the columns in the value.
    fn value_fields<'s>(&'s self, schema: &'s Schema) -> impl Iterator<Item = (usize, &'s str)> + 's {
        schema.physical_indices().filter_map(move |i| {
            let name = schema.column(i)?.name.as_str();
            let is_key = self.key_fields.iter().any(|k| k == name);
            (self.value_fields_include == FieldsInclude::All || !is_key).then_some((i, name))
        })
    }

    pub(crate) fn value_payload(&self, schema: &Schema) -> Vec<PayloadField> {
        self.value_fields(schema)
            .filter_map(|(i, name)| {
                let c = schema.column(i)?;
                let external = name.strip_prefix(self.value_fields_prefix.as_str()).unwrap_or(name);
                Some(PayloadField { index: i, name: external.to_string(), data_type: c.data_type.clone() })
            })
            .collect()
    }

    pub(crate) fn key_payload(&self, schema: &Schema) -> Vec<PayloadField> {
        self.key_fields
            .iter()
            .filter_map(|name| {
                let index = schema.index_of(name)?;
                let c = schema.column(index)?;
                let external = name.strip_prefix(self.key_fields_prefix.as_str()).unwrap_or(name);
                Some(PayloadField { index, name: external.to_string(), data_type: c.data_type.clone() })
            })
            .collect()
    }
}

fn check_raw(format: &FormatOptions, payload: &[PayloadField], field: &str, part: &str) -> Result<()> {
    if format.kind() != FormatKind::Raw {
        return Ok(());
    }
    match payload {
        [only] if matches!(only.data_type, DataType::String | DataType::Bytes) => Ok(()),
        [only] => Err(KeelError::invalid_spec(
            field,
            format!(
                "raw carries one STRING or BYTES column; the {part} column '{}' is {}",
                only.name, only.data_type
            ),
        )),
        _ => Err(KeelError::invalid_spec(
            field,
            format!(
                "raw carries exactly one STRING or BYTES column in the {part}; it has {}: {}",
                payload.len(),
                payload.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Refuses options of formats no side uses (`csv.field-delimiter` with `format: json`).
fn check_stray_format_options(
    field_prefix: &str,
    options: &BTreeMap<String, String>,
    value: FormatKind,
    key: Option<FormatKind>,
) -> Result<()> {
    let all_formats = FormatKind::ALL.iter().map(|f| f.name()).chain(OTHER_FLINK_FORMATS.iter().copied());
    let names: Vec<&str> = all_formats.collect();
    for k in options.keys() {
        let (side, rest) = if let Some(rest) = k.strip_prefix("key.") {
            (Some(FormatSide::Key), rest)
        } else if let Some(rest) = k.strip_prefix("value.") {
            (Some(FormatSide::Value), rest)
        } else {
            (None, k.as_str())
        };
        let Some(fmt) = names.iter().find(|f| rest.strip_prefix(**f).is_some_and(|r| r.starts_with('.')))
        else {
            continue;
        };
        let in_use = match side {
            Some(FormatSide::Key) => key.map(FormatKind::name) == Some(*fmt),
            Some(FormatSide::Value) | None => value.name() == *fmt,
        };
        if !in_use {
            let which = match side {
                Some(FormatSide::Key) => match key {
                    Some(k) => format!("the key format is {k}"),
                    None => "there is no key.format".to_string(),
                },
                _ => format!("the value format is {value}"),
            };
            return Err(KeelError::invalid_spec(
                format!("{field_prefix}.{k}"),
                format!("an option of format {fmt}, but {which}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnDef, MetadataKey};

    pub(crate) fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn people() -> Schema {
        Schema::from_columns(
            "s.columns",
            &[
                ColumnDef::new("id", DataType::BigInt),
                ColumnDef::new("name", DataType::String),
                ColumnDef::new("age", DataType::Int),
                ColumnDef::metadata("ts", DataType::Timestamp, MetadataKey::Timestamp),
            ],
        )
        .expect("schema")
    }

    fn spec_err(r: Result<impl fmt::Debug>) -> (String, String) {
        match r {
            Err(KeelError::InvalidSpec { field, reason }) => (field, reason),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn value_format_options_are_read_in_both_spellings() {
        let o = opts(&[("format", "json"), ("json.ignore-parse-errors", "true")]);
        let f = FormatOptions::from_options("sources[0]", FormatSide::Value, &o).expect("ok");
        assert!(f.as_ref().is_some_and(FormatOptions::ignore_parse_errors));

        let o = opts(&[("value.format", "JSON"), ("value.json.ignore-parse-errors", "true")]);
        let f = FormatOptions::from_options("sources[0]", FormatSide::Value, &o).expect("ok");
        assert!(f.as_ref().is_some_and(FormatOptions::ignore_parse_errors));

        let o = opts(&[
            ("format", "json"),
            ("json.ignore-parse-errors", "true"),
            ("value.json.ignore-parse-errors", "false"),
        ]);
        let (field, reason) = spec_err(FormatOptions::from_options("sources[0]", FormatSide::Value, &o));
        assert_eq!(field, "sources[0].value.json.ignore-parse-errors");
        assert!(reason.contains("contradicts"), "{reason}");
    }

    #[test]
    fn key_format_options_are_only_the_key_prefixed_ones() {
        let o =
            opts(&[("key.format", "csv"), ("key.csv.field-delimiter", "|"), ("csv.field-delimiter", ";")]);
        let key = FormatOptions::from_options("s", FormatSide::Key, &o).expect("ok");
        match key {
            Some(FormatOptions::Csv(c)) => assert_eq!(c.field_delimiter, b'|'),
            other => panic!("{other:?}"),
        }
        assert_eq!(FormatOptions::from_options("s", FormatSide::Value, &o).expect("ok"), None);
    }

    #[test]
    fn csv_options_are_parsed_and_checked() {
        let o = opts(&[
            ("format", "csv"),
            ("csv.field-delimiter", "\\t"),
            ("csv.quote-character", "'"),
            ("csv.null-literal", "\\N"),
            ("csv.ignore-parse-errors", "TRUE"),
        ]);
        let f = FormatOptions::from_options("s", FormatSide::Value, &o).expect("ok");
        assert_eq!(
            f,
            Some(FormatOptions::Csv(CsvOptions {
                field_delimiter: b'\t',
                quote_character: Some(b'\''),
                ignore_parse_errors: true,
                null_literal: Some("\\N".into()),
            }))
        );
        for (pairs, want) in [
            (vec![("csv.field-delimiter", ",,")], "s.csv.field-delimiter"),
            (vec![("csv.field-delimiter", "é")], "s.csv.field-delimiter"),
            (vec![("csv.field-delimiter", "\n")], "s.csv.field-delimiter"),
            (vec![("csv.quote-character", ",")], "s.csv.quote-character"),
            (vec![("csv.ignore-parse-errors", "yes")], "s.csv.ignore-parse-errors"),
            (vec![("csv.allow-comments", "true")], "s.csv.allow-comments"),
            (
                vec![("csv.disable-quote-character", "true"), ("csv.quote-character", "'")],
                "s.csv.quote-character",
            ),
        ] {
            let mut o = opts(&pairs);
            o.insert("format".into(), "csv".into());
            let (field, _) = spec_err(FormatOptions::from_options("s", FormatSide::Value, &o));
            assert_eq!(field, want, "{pairs:?}");
        }
    }

    #[test]
    fn unknown_and_unsupported_formats_are_named() {
        let (field, reason) = spec_err(FormatOptions::from_options(
            "sinks[1]",
            FormatSide::Value,
            &opts(&[("value.format", "avro")]),
        ));
        assert_eq!(field, "sinks[1].value.format");
        assert!(reason.contains("not supported yet"), "{reason}");
        let (field, reason) =
            spec_err(FormatOptions::from_options("s", FormatSide::Key, &opts(&[("key.format", "xml")])));
        assert_eq!(field, "s.key.format");
        assert!(reason.contains("unknown format 'xml'"), "{reason}");
        let (field, _) = spec_err(FormatOptions::from_options(
            "s",
            FormatSide::Value,
            &opts(&[("format", "json"), ("value.format", "csv")]),
        ));
        assert_eq!(field, "s.value.format");
    }

    #[test]
    fn record_format_requires_a_value_format() {
        let (field, _) = spec_err(RecordFormat::from_options("sources[0]", &opts(&[]), &people()));
        assert_eq!(field, "sources[0].format");
    }

    #[test]
    fn options_of_an_unused_format_are_refused() {
        let (field, reason) = spec_err(RecordFormat::from_options(
            "s",
            &opts(&[("format", "json"), ("csv.field-delimiter", ";")]),
            &people(),
        ));
        assert_eq!(field, "s.csv.field-delimiter");
        assert!(reason.contains("value format is json"), "{reason}");
        let (field, _) = spec_err(RecordFormat::from_options(
            "s",
            &opts(&[("format", "json"), ("key.json.ignore-parse-errors", "true")]),
            &people(),
        ));
        assert_eq!(field, "s.key.json.ignore-parse-errors");
    }

    #[test]
    fn key_fields_are_checked_against_the_schema() {
        let schema = people();
        for (pairs, want, needle) in [
            (
                vec![("key.format", "json"), ("key.fields", "id;nope")],
                "s.key.fields",
                "unknown column 'nope'",
            ),
            (vec![("key.format", "json"), ("key.fields", "ts")], "s.key.fields", "metadata"),
            (vec![("key.format", "json"), ("key.fields", "id;id")], "s.key.fields", "twice"),
            (vec![("key.format", "json"), ("key.fields", "id;")], "s.key.fields", "empty"),
            (vec![("key.format", "json")], "s.key.format", "key.fields"),
            (vec![("key.fields", "id")], "s.key.fields", "key.format"),
            (
                vec![("key.format", "json"), ("key.fields", "id"), ("key.fields-prefix", "k_")],
                "s.key.fields-prefix",
                "EXCEPT_KEY",
            ),
            (
                vec![
                    ("key.format", "json"),
                    ("key.fields", "id"),
                    ("key.fields-prefix", "k_"),
                    ("value.fields-include", "EXCEPT_KEY"),
                ],
                "s.key.fields",
                "does not start",
            ),
            (vec![("value.fields-include", "SOME")], "s.value.fields-include", "ALL or EXCEPT_KEY"),
            (vec![("key.format", "raw"), ("key.fields", "id")], "s.key.format", "BIGINT"),
            (vec![("value.fields-prefix", "v_")], "s.value.fields-prefix", "'id'"),
        ] {
            let mut o = opts(&pairs);
            o.insert("format".into(), "json".into());
            let (field, reason) = spec_err(RecordFormat::from_options("s", &o, &schema));
            assert_eq!(field, want, "{pairs:?}");
            assert!(reason.contains(needle), "{pairs:?}: {reason}");
        }
    }

    #[test]
    fn raw_needs_exactly_one_string_or_bytes_column() {
        let (field, reason) =
            spec_err(RecordFormat::from_options("s", &opts(&[("format", "raw")]), &people()));
        assert_eq!(field, "s.format");
        assert!(reason.contains("it has 3: id, name, age"), "{reason}");
        let one = Schema::from_columns(
            "c",
            &[
                ColumnDef::new("line", DataType::String),
                ColumnDef::metadata("o", DataType::BigInt, MetadataKey::Offset),
            ],
        )
        .expect("schema");
        let f = RecordFormat::from_options(
            "s",
            &opts(&[("value.format", "raw"), ("raw.charset", "utf-8")]),
            &one,
        )
        .expect("raw with one column");
        assert_eq!(f.value, FormatOptions::Raw(RawOptions {}));
    }

    #[test]
    fn the_seed_example_3_layout_strips_prefixes_in_the_payloads() {
        let schema = Schema::from_columns(
            "c",
            &[ColumnDef::new("key_id", DataType::Int), ColumnDef::new("val_name", DataType::String)],
        )
        .expect("schema");
        let f = RecordFormat::from_options(
            "s",
            &opts(&[
                ("key.format", "json"),
                ("value.format", "json"),
                ("key.fields", "key_id"),
                ("key.fields-prefix", "key_"),
                ("value.fields-prefix", "val_"),
                ("value.fields-include", "EXCEPT_KEY"),
            ]),
            &schema,
        )
        .expect("valid");
        let key: Vec<_> = f.key_payload(&schema).into_iter().map(|p| (p.index, p.name)).collect();
        let value: Vec<_> = f.value_payload(&schema).into_iter().map(|p| (p.index, p.name)).collect();
        assert_eq!(key, vec![(0, "id".to_string())]);
        assert_eq!(value, vec![(1, "name".to_string())]);
    }
}
