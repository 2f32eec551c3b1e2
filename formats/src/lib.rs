//! Rows, schemas and the record formats of Keel's Kafka connector, plus two small transforms.
//!
//! Layout:
//! - [`schema`]: [`DataType`], [`MetadataKey`], [`ColumnDef`] (what a spec's `columns:` entry
//!   deserialises to) and the checked [`Schema`].
//! - [`value`]: [`Value`] and [`Row`], one row as values (tests, tools, messages); a task
//!   moves columnar batches ([`batch`]).
//! - [`options`]: [`FormatOptions`] for one side of a message (`format`/`value.format`,
//!   `key.format` and each format's own options) and [`RecordFormat`], the whole key/value
//!   layout (`key.fields`, `key.fields-prefix`, `value.fields-prefix`, `value.fields-include`),
//!   both read from a connector's Flink-style options.
//! - [`record`]: [`RecordDecoder`] (Kafka message → a row of a [`BatchBuilder`]) and [`RecordEncoder`]
//!   (a batch's rows → keys and values in one reused buffer, with each row's timestamp and
//!   headers).
//! - `json`, `csv`, `raw`: the three formats (private; reached through the record codecs).
//! - [`expr`]: SQL expressions (`sqlparser` with [`expr::FlinkDialect`]) compiled against a
//!   schema to Arrow kernels: [`expr::parse_expr`], [`expr::compile`], [`expr::CompiledExpr`].
//! - [`filter`]: [`Filter`], a SQL condition (`age >= 18 AND name IS NOT NULL`).
//! - [`projection`]: [`Projection`], select items `<expr> [AS <name>]` (`select: [id, name AS
//!   full_name, UPPER(city) AS city]`), and the by-name mapping of one schema onto another.
//! - [`error`]: [`DecodeError`] and [`EncodeError`], the per-record errors; configuration errors
//!   are [`keel_proto::KeelError::InvalidSpec`] naming the field.
//! - [`batch`]: the Arrow form of a schema's rows, [`BatchBuilder`], and the one-row view.
//! - `time`, `text`: timestamp, date, number, DECIMAL and BYTES (base64) text forms (private
//!   helpers).
//!
//! # Spec shapes
//!
//! ```yaml
//! sources:
//!   - name: people
//!     connector: kafka
//!     topic: people
//!     format: csv                    # or value.format; raw | json | csv
//!     csv.field-delimiter: ","       # format options: <format>.* or value.<format>.*
//!     columns:
//!       - {name: id, type: BIGINT}
//!       - {name: name, type: STRING}
//!       - {name: age, type: INT}
//!       - {name: ts, type: TIMESTAMP, metadata: timestamp}
//!       - {name: part, type: INT, metadata: partition}
//!     filter: "age >= 18 AND name IS NOT NULL"
//!     select: [id, name AS full_name, "age + 1 AS next_age"]
//! ```
//!
//! Where `filter` and `select` sit in a spec is the spec crate's choice; [`Filter::parse`] and
//! [`Projection::parse`] take the path of the field so errors name it.
//!
//! # Text forms of values
//!
//! | type | JSON | CSV | raw |
//! | --- | --- | --- | --- |
//! | STRING | string (any other JSON value is read as its JSON text) | field | the whole payload, UTF-8 |
//! | BOOLEAN | `true`/`false` (or the strings) | `true`/`false` | - |
//! | INT, BIGINT | number (or a numeric string) | digits | - |
//! | DOUBLE | number; NaN and infinities as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` | same | - |
//! | TIMESTAMP | `"2024-05-01 12:00:00.000"` (UTC; `json.timestamp-format.standard: ISO-8601` writes `2024-05-01T12:00:00.000Z`); reads either form, an offset, or epoch milliseconds as a number | same, SQL form | - |
//! | BYTES | base64 string | base64 | the whole payload |
//! | MAP (headers) | object of base64 strings (null for a null header value) | that JSON object as one field | - |
//! | DATE | `"2024-05-01"` (a string only, as Flink) | `2024-05-01` | - |
//! | DECIMAL(p, s) | number with exactly `s` fraction digits (`12.50`); reads a number (its own text, no double in between) or a numeric string | `12.50` | - |
//! | ROW<...> | object of the fields by name, in declared order (undeclared fields skipped when read) | refused (a print or file sink's line: the JSON object as one field) | refused |
//!
//! DECIMAL text is read with arrow-cast's `parse_decimal` (sign, fraction, exponent): digits
//! past the scale round half up (away from zero), as Flink does; a value with more than
//! `p - s` integer digits (also once rounded) does not fit and the record is malformed.
//!
//! A null is JSON `null` (a missing field, also inside a ROW, reads as null unless
//! `json.fail-on-missing-field`); in CSV it is an empty unquoted field (an empty string is
//! written quoted, `""`, as PostgreSQL does), or `csv.null-literal` when set.

pub mod batch;
pub mod error;
pub mod expr;
pub mod filter;
pub mod options;
pub mod projection;
pub mod record;
pub mod schema;
pub mod value;

mod csv;
mod json;
mod raw;
mod text;
mod time;

pub use batch::{arrow_schema, BatchBuilder};
pub use error::{DecodeError, EncodeError, Part};
pub use expr::{CompiledExpr, ExprError, FlinkDialect};
pub use filter::Filter;
pub use options::{
    CsvOptions, FieldsInclude, FormatKind, FormatOptions, FormatSide, JsonOptions, RawOptions, RecordFormat,
    TimestampStandard,
};
pub use projection::Projection;
pub use record::{
    EncodedBatch, EncodedRecord, KafkaMessage, OutRecord, RecordDecoder, RecordEncoder, TimestampType,
};
pub use schema::{ColumnDef, DataType, MetadataKey, Schema};
pub use value::{Headers, Row, Value};

/// Formats a timestamp (epoch milliseconds, UTC) as `yyyy-MM-dd HH:mm:ss.SSS`.
pub fn format_timestamp(epoch_ms: i64) -> String {
    let mut out = String::with_capacity(23);
    time::format(epoch_ms, TimestampStandard::Sql, &mut out);
    out
}

/// Parses a timestamp written as `yyyy-MM-dd[( |T)HH:mm[:ss[.fraction]]][Z|±HH:mm]` (UTC
/// unless an offset is given) into epoch milliseconds.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    time::parse(text)
}
