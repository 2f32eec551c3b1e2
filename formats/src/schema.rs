//! Column declarations and the checked [`Schema`].
//!
//! A spec declares columns as a list of mappings:
//!
//! ```yaml
//! columns:
//!   - {name: id, type: BIGINT}
//!   - {name: name, type: STRING}
//!   - {name: ts, type: TIMESTAMP, metadata: timestamp}
//!   - {name: properties, type: 'ROW<`owner` STRING, engine STRING>'}   # json only
//! ```
//!
//! Types (case-insensitive; aliases in brackets): `STRING` (`VARCHAR`, `VARCHAR(n)`),
//! `BOOLEAN` (`BOOL`), `INT` (`INTEGER`), `BIGINT`, `DOUBLE`, `TIMESTAMP` (`TIMESTAMP(3)`,
//! `TIMESTAMP_LTZ`, `TIMESTAMP_LTZ(3)`; milliseconds, UTC), `BYTES` (`VARBINARY`), `MAP`
//! (`MAP<STRING, BYTES>`, the type of Kafka headers), `DATE` (a calendar date, no zone),
//! `DECIMAL(p, s)` (`DECIMAL(p)` = `DECIMAL(p, 0)`, `DECIMAL` = `DECIMAL(10, 0)` as in Flink;
//! `NUMERIC` and `DEC` alike; an exact number of at most `p` digits, `s` of them after the
//! point, `1 <= p <= 38`, `0 <= s <= p`), `ROW<name TYPE, ...>` (also `ROW(name TYPE, ...)`,
//! as Flink writes both: a nested record with named, typed fields, which may be rows
//! themselves; a field name that is not a plain identifier is written in backquotes,
//! `` ROW<`owner id` STRING> ``, a backquote inside it doubled; rows nest at most
//! [`MAX_ROW_DEPTH`] deep; only the json format carries ROW columns).
//!
//! A column with `metadata` is not part of the message key or value but of the Kafka record
//! around it (Flink's `METADATA FROM '<key>'`):
//!
//! | metadata | column type | read | written by a sink |
//! | --- | --- | --- | --- |
//! | `topic` | STRING | yes | no (ignored, like Flink's `VIRTUAL`) |
//! | `partition` | INT or BIGINT | yes | no (ignored) |
//! | `offset` | BIGINT or INT (an offset past 2^31 - 1 cannot be read into INT: the record is malformed) | yes | no (ignored) |
//! | `timestamp` | TIMESTAMP or BIGINT (epoch ms) | yes (null when the record has none) | yes, as the record timestamp |
//! | `timestamp-type` | STRING | yes: `NoTimestampType`, `CreateTime` or `LogAppendTime`, as Flink | no (ignored) |
//! | `headers` | MAP | yes (a header without a value is a null entry) | yes, as the record headers (a null entry is a header without a value) |
//! | `leader-epoch` | INT or BIGINT | yes (null when unknown) | no (ignored) |

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use keel_proto::{KeelError, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value as Yaml;

/// A column type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataType {
    String,
    Boolean,
    /// 32-bit signed integer (held as `i64` in a [`crate::Value::Int`]).
    Int,
    BigInt,
    Double,
    /// Milliseconds since the epoch, UTC.
    Timestamp,
    Bytes,
    /// `MAP<STRING, BYTES>`: Kafka headers.
    Map,
    /// A calendar date: days since 1970-01-01 (proleptic Gregorian calendar, no zone).
    Date,
    /// An exact decimal number of at most `precision` digits, `scale` of them after the
    /// point: `1 <= precision <= 38`, `0 <= scale <= precision` ([`DataType::decimal`] checks).
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// `ROW<name TYPE, ...>`: a nested record of named, typed fields (at least one; names
    /// unique, case-sensitive). Build one with [`DataType::row`], which checks the names.
    Row(Arc<[RowField]>),
}

/// One field of a [`DataType::Row`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowField {
    pub name: String,
    pub data_type: DataType,
}

impl RowField {
    pub fn new(name: impl Into<String>, data_type: DataType) -> RowField {
        RowField { name: name.into(), data_type }
    }
}

impl DataType {
    /// One of each kind of type but ROW (which has no constant form); DECIMAL stands for every
    /// precision and scale (as [`DataType::DEFAULT_DECIMAL`]).
    pub const ALL: &'static [DataType] = &[
        DataType::String,
        DataType::Boolean,
        DataType::Int,
        DataType::BigInt,
        DataType::Double,
        DataType::Timestamp,
        DataType::Bytes,
        DataType::Map,
        DataType::Date,
        DataType::DEFAULT_DECIMAL,
    ];

    /// `DECIMAL` without precision and scale: `DECIMAL(10, 0)`, as in Flink.
    pub const DEFAULT_DECIMAL: DataType = DataType::Decimal { precision: 10, scale: 0 };

    /// The largest DECIMAL precision (Arrow's Decimal128, Flink's DECIMAL).
    pub const MAX_DECIMAL_PRECISION: u8 = 38;

    /// `DECIMAL(precision, scale)`, checked: `1 <= precision <= 38`, `0 <= scale <= precision`.
    pub fn decimal(precision: u8, scale: i8) -> std::result::Result<DataType, String> {
        if !(1..=Self::MAX_DECIMAL_PRECISION).contains(&precision) {
            return Err(format!(
                "DECIMAL precision must be between 1 and {}, found {precision}",
                Self::MAX_DECIMAL_PRECISION
            ));
        }
        if scale < 0 || scale as u8 > precision {
            return Err(format!(
                "DECIMAL scale must be between 0 and the precision ({precision}), found {scale}"
            ));
        }
        Ok(DataType::Decimal { precision, scale })
    }

    /// `ROW<...>` of `fields`, checked: at least one field, names neither empty nor repeated.
    pub fn row(fields: Vec<RowField>) -> std::result::Result<DataType, String> {
        if fields.is_empty() {
            return Err("a ROW needs at least one field".to_string());
        }
        for (i, f) in fields.iter().enumerate() {
            if f.name.is_empty() {
                return Err("a ROW field name must not be empty".to_string());
            }
            if fields[..i].iter().any(|p| p.name == f.name) {
                return Err(format!("ROW field '{}' is declared twice", f.name));
            }
        }
        Ok(DataType::Row(fields.into()))
    }

    /// The fields of a ROW type; `None` for every other type.
    pub fn row_fields(&self) -> Option<&[RowField]> {
        match self {
            DataType::Row(fields) => Some(fields),
            _ => None,
        }
    }

    /// The name of the type's kind (`DECIMAL` for every precision and scale, `ROW` for every
    /// row; [`fmt::Display`] writes the full canonical name, `DECIMAL(10, 2)`,
    /// `ROW<owner STRING, engine STRING>`).
    pub fn name(&self) -> &'static str {
        match self {
            DataType::String => "STRING",
            DataType::Boolean => "BOOLEAN",
            DataType::Int => "INT",
            DataType::BigInt => "BIGINT",
            DataType::Double => "DOUBLE",
            DataType::Timestamp => "TIMESTAMP",
            DataType::Bytes => "BYTES",
            DataType::Map => "MAP<STRING, BYTES>",
            DataType::Date => "DATE",
            DataType::Decimal { .. } => "DECIMAL",
            DataType::Row(_) => "ROW",
        }
    }

    /// Parses a type name (case-insensitive, with the aliases listed in the module docs).
    pub fn parse(text: &str) -> Option<DataType> {
        Self::parse_checked(text).ok()
    }

    /// Parses a type name; the error says what is wrong (an unknown name, a DECIMAL precision
    /// or scale out of range, a malformed ROW).
    fn parse_checked(text: &str) -> std::result::Result<DataType, String> {
        let mut p = TypeParser { text, pos: 0, depth: 0 };
        let t = p.parse_type()?;
        p.skip_ws();
        if p.pos < text.len() {
            return Err(format!(
                "unexpected {} after the type {t} in '{text}'",
                p.rest().chars().next().map_or_else(String::new, |c| format!("'{c}'"))
            ));
        }
        Ok(t)
    }

    /// Parses the name of a type other than ROW (whitespace is ignored).
    fn parse_flat(text: &str) -> std::result::Result<DataType, String> {
        let unknown = || format!("unknown type '{text}'; known types: {}", DataType::known_list());
        let upper: String =
            text.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_uppercase();
        let t = match upper.as_str() {
            "STRING" | "VARCHAR" => DataType::String,
            "BOOLEAN" | "BOOL" => DataType::Boolean,
            "INT" | "INTEGER" => DataType::Int,
            "BIGINT" => DataType::BigInt,
            "DOUBLE" => DataType::Double,
            "TIMESTAMP" | "TIMESTAMP(3)" | "TIMESTAMP_LTZ" | "TIMESTAMP_LTZ(3)" => DataType::Timestamp,
            "BYTES" | "VARBINARY" => DataType::Bytes,
            "MAP" | "MAP<STRING,BYTES>" => DataType::Map,
            "DATE" => DataType::Date,
            "DECIMAL" | "DEC" | "NUMERIC" => DataType::DEFAULT_DECIMAL,
            other => {
                if let Some(args) = ["DECIMAL(", "DEC(", "NUMERIC("]
                    .iter()
                    .find_map(|p| other.strip_prefix(p))
                    .and_then(|rest| rest.strip_suffix(')'))
                {
                    return Self::decimal_of(args).ok_or_else(unknown)?;
                }
                let n =
                    other.strip_prefix("VARCHAR(").and_then(|r| r.strip_suffix(')')).ok_or_else(unknown)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unknown());
                }
                DataType::String
            }
        };
        Ok(t)
    }

    /// The `p` or `p,s` of `DECIMAL(p, s)` (whitespace already removed): `None` when they are
    /// not numbers, an error when they are out of range.
    fn decimal_of(args: &str) -> Option<std::result::Result<DataType, String>> {
        let (p, s) = args.split_once(',').map_or((args, None), |(p, s)| (p, Some(s)));
        // Digits only; a number too long for u64 is out of range all the same.
        let number = |t: &str| {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().unwrap_or(u64::MAX))
        };
        let p = number(p)?;
        let s = match s {
            Some(s) => number(s)?,
            None => 0,
        };
        let max = u64::from(Self::MAX_DECIMAL_PRECISION);
        if !(1..=max).contains(&p) {
            return Some(Err(format!("DECIMAL precision must be between 1 and {max}, found {p}")));
        }
        if s > p {
            return Some(Err(format!("DECIMAL scale must be between 0 and the precision ({p}), found {s}")));
        }
        // Both are at most 38 now.
        Some(DataType::decimal(p as u8, s as i8))
    }

    fn known_list() -> String {
        let mut names: Vec<&str> = DataType::ALL
            .iter()
            .map(|t| if matches!(t, DataType::Decimal { .. }) { "DECIMAL(p, s)" } else { t.name() })
            .collect();
        names.dedup();
        names.push("ROW<name TYPE, ...>");
        names.join(", ")
    }
}

/// A plain identifier (`owner`, `_x1`): a ROW field name written without backquotes.
fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads one type at a time from a type name, for ROW's nested fields.
struct TypeParser<'a> {
    text: &'a str,
    /// A byte offset into `text`, always at a char boundary.
    pos: usize,
    /// How many ROWs the parser is inside.
    depth: usize,
}

/// How deep ROW types may nest (a bound on the recursion of everything that walks a type).
pub const MAX_ROW_DEPTH: usize = 32;

impl<'a> TypeParser<'a> {
    fn rest(&self) -> &'a str {
        self.text.get(self.pos..).unwrap_or_default()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// Consumes `c` if it comes next.
    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// One type: a ROW, read field by field, or any other type name, which ends before a `,`,
    /// `>` or `)` outside its own brackets (`DECIMAL(10, 2)`, `MAP<STRING, BYTES>`).
    fn parse_type(&mut self) -> std::result::Result<DataType, String> {
        self.skip_ws();
        let rest = self.rest();
        if rest.len() >= 3 && rest.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("ROW")) {
            let after = rest.get(3..).unwrap_or_default().trim_start();
            if after.starts_with('<') || after.starts_with('(') {
                self.pos += 3;
                return self.parse_row();
            }
        }
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '<' | '(' => depth += 1,
                '>' | ')' | ',' if depth == 0 => {
                    end = i;
                    break;
                }
                '>' | ')' => depth -= 1,
                _ => {}
            }
        }
        let name = rest.get(..end).unwrap_or_default();
        self.pos += end;
        if name.trim().is_empty() {
            return Err(match rest.chars().next() {
                Some(c) => format!("expected a type, found '{c}' in '{}'", self.text),
                None => format!("expected a type at the end of '{}'", self.text),
            });
        }
        DataType::parse_flat(name)
    }

    /// The fields of a ROW, from its opening `<` or `(` to the matching closer.
    fn parse_row(&mut self) -> std::result::Result<DataType, String> {
        self.depth += 1;
        if self.depth > MAX_ROW_DEPTH {
            let text = crate::text::cut(self.text);
            return Err(format!("ROW types nest at most {MAX_ROW_DEPTH} deep, in '{text}'"));
        }
        let row = self.parse_row_fields();
        self.depth -= 1;
        row
    }

    fn parse_row_fields(&mut self) -> std::result::Result<DataType, String> {
        self.skip_ws();
        let close = if self.eat('<') {
            '>'
        } else if self.eat('(') {
            ')'
        } else {
            return Err(format!("expected '<' after ROW in '{}'", self.text));
        };
        let mut fields = Vec::new();
        loop {
            self.skip_ws();
            if fields.is_empty() && self.eat(close) {
                return Err(format!("a ROW needs at least one field, in '{}'", self.text));
            }
            let name = self.field_name()?;
            let data_type = self.parse_type()?;
            fields.push(RowField { name, data_type });
            self.skip_ws();
            if self.eat(',') {
                continue;
            }
            if self.eat(close) {
                break;
            }
            return Err(match self.rest().chars().next() {
                Some(c) => {
                    format!("expected ',' or '{close}' after ROW field, found '{c}' in '{}'", self.text)
                }
                None => format!("the ROW is not closed with '{close}' in '{}'", self.text),
            });
        }
        DataType::row(fields).map_err(|e| format!("{e}, in '{}'", self.text))
    }

    /// A field name: a plain identifier, or any text in backquotes (a doubled backquote stands
    /// for one).
    fn field_name(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        if self.eat('`') {
            let mut name = String::new();
            loop {
                let Some(c) = self.rest().chars().next() else {
                    return Err(format!("a backquoted ROW field name is not closed in '{}'", self.text));
                };
                self.pos += c.len_utf8();
                if c == '`' && !self.eat('`') {
                    return Ok(name);
                }
                name.push(c);
            }
        }
        let rest = self.rest();
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let name = rest.get(..end).unwrap_or_default();
        if !is_plain_name(name) {
            return Err(match rest.chars().next() {
                Some(c) => format!("expected a ROW field name, found '{c}' in '{}'", self.text),
                None => format!("expected a ROW field name at the end of '{}'", self.text),
            });
        }
        self.pos += end;
        Ok(name.to_string())
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataType::Decimal { precision, scale } => write!(f, "DECIMAL({precision}, {scale})"),
            DataType::Row(fields) => {
                f.write_str("ROW<")?;
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if is_plain_name(&field.name) {
                        f.write_str(&field.name)?;
                    } else {
                        write!(f, "`{}`", field.name.replace('`', "``"))?;
                    }
                    write!(f, " {}", field.data_type)?;
                }
                f.write_str(">")
            }
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for DataType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        DataType::parse_checked(s)
    }
}

impl TryFrom<String> for DataType {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DataType> for String {
    fn from(t: DataType) -> String {
        t.to_string()
    }
}

/// The part of a Kafka record a metadata column stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetadataKey {
    Topic,
    Partition,
    Offset,
    Timestamp,
    /// How the record's timestamp was set: `NoTimestampType`, `CreateTime`, `LogAppendTime`.
    #[serde(rename = "timestamp-type")]
    TimestampType,
    Headers,
    /// The leader epoch of the partition when the record was written (null when unknown).
    #[serde(rename = "leader-epoch")]
    LeaderEpoch,
}

impl MetadataKey {
    pub const ALL: &'static [MetadataKey] = &[
        MetadataKey::Topic,
        MetadataKey::Partition,
        MetadataKey::Offset,
        MetadataKey::Timestamp,
        MetadataKey::TimestampType,
        MetadataKey::Headers,
        MetadataKey::LeaderEpoch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MetadataKey::Topic => "topic",
            MetadataKey::Partition => "partition",
            MetadataKey::Offset => "offset",
            MetadataKey::Timestamp => "timestamp",
            MetadataKey::TimestampType => "timestamp-type",
            MetadataKey::Headers => "headers",
            MetadataKey::LeaderEpoch => "leader-epoch",
        }
    }

    pub fn parse(text: &str) -> Option<MetadataKey> {
        MetadataKey::ALL.iter().copied().find(|k| k.name().eq_ignore_ascii_case(text.trim()))
    }

    /// The column types this metadata can be read into.
    pub fn allowed_types(self) -> &'static [DataType] {
        match self {
            MetadataKey::Topic | MetadataKey::TimestampType => &[DataType::String],
            MetadataKey::Partition | MetadataKey::Offset | MetadataKey::LeaderEpoch => {
                &[DataType::Int, DataType::BigInt]
            }
            MetadataKey::Timestamp => &[DataType::Timestamp, DataType::BigInt],
            MetadataKey::Headers => &[DataType::Map],
        }
    }

    /// Whether a sink writes it (the record timestamp and headers); the others (topic,
    /// partition, offset, timestamp-type, leader-epoch) are read-only and a sink ignores them.
    pub fn writable(self) -> bool {
        matches!(self, MetadataKey::Timestamp | MetadataKey::Headers)
    }
}

impl fmt::Display for MetadataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One declared column, as a spec writes it. The spec crate can embed `Vec<ColumnDef>`
/// directly; [`ColumnDef::list_from_yaml`] parses the same shape from a YAML value with errors
/// that name the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataKey>,
}

impl ColumnDef {
    pub fn new(name: impl Into<String>, data_type: DataType) -> ColumnDef {
        ColumnDef { name: name.into(), data_type, metadata: None }
    }

    pub fn metadata(name: impl Into<String>, data_type: DataType, key: MetadataKey) -> ColumnDef {
        ColumnDef { name: name.into(), data_type, metadata: Some(key) }
    }

    /// Parses a spec's `columns:` list. `field` is the path of that list (`sources[0].columns`);
    /// errors name the entry and key (`sources[0].columns[2].type`). Only the shape is checked
    /// here; [`Schema::from_columns`] checks names and metadata types.
    pub fn list_from_yaml(field: &str, value: &Yaml) -> Result<Vec<ColumnDef>> {
        let items = match value {
            Yaml::Sequence(items) => items,
            other => {
                return Err(KeelError::invalid_spec(
                    field,
                    format!(
                        "must be a list of columns like {{name: id, type: BIGINT}}, found {}",
                        yaml_kind(other)
                    ),
                ))
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let base = format!("{field}[{i}]");
            let map = match item {
                Yaml::Mapping(map) => map,
                other => {
                    return Err(KeelError::invalid_spec(
                        base,
                        format!(
                            "must be a mapping like {{name: id, type: BIGINT}}, found {}",
                            yaml_kind(other)
                        ),
                    ))
                }
            };
            let mut name = None;
            let mut data_type = None;
            let mut metadata = None;
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.as_str(),
                    other => {
                        return Err(KeelError::invalid_spec(
                            &base,
                            format!("keys must be strings, found {}", yaml_kind(other)),
                        ))
                    }
                };
                let sub = format!("{base}.{key}");
                match key {
                    "name" => name = Some(yaml_scalar(v, &sub)?),
                    "type" => {
                        let text = yaml_scalar(v, &sub)?;
                        data_type =
                            Some(text.parse::<DataType>().map_err(|e| KeelError::invalid_spec(&sub, e))?);
                    }
                    "metadata" => {
                        let text = yaml_scalar(v, &sub)?;
                        metadata = Some(MetadataKey::parse(&text).ok_or_else(|| {
                            KeelError::invalid_spec(
                                &sub,
                                format!(
                                    "unknown metadata '{text}'; known: {}",
                                    MetadataKey::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                                ),
                            )
                        })?);
                    }
                    other => {
                        return Err(KeelError::invalid_spec(
                            sub,
                            format!("unknown key '{other}'; a column takes name, type and metadata"),
                        ))
                    }
                }
            }
            let name = name.ok_or_else(|| {
                KeelError::invalid_spec(format!("{base}.name"), "every column needs a name")
            })?;
            let data_type = data_type.ok_or_else(|| {
                KeelError::invalid_spec(
                    format!("{base}.type"),
                    format!("every column needs a type; known types: {}", DataType::known_list()),
                )
            })?;
            out.push(ColumnDef { name, data_type, metadata });
        }
        Ok(out)
    }
}

fn yaml_scalar(value: &Yaml, field: &str) -> Result<String> {
    match value {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Number(n) => Ok(n.to_string()),
        Yaml::Bool(b) => Ok(b.to_string()),
        Yaml::Tagged(t) => yaml_scalar(&t.value, field),
        other => Err(KeelError::invalid_spec(field, format!("must be a string, found {}", yaml_kind(other)))),
    }
}

pub(crate) fn yaml_kind(value: &Yaml) -> &'static str {
    match value {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(_) => "a tagged value",
    }
}

/// Checked columns: unique non-empty names, metadata columns of a type their metadata fits,
/// each metadata at most once. (De)serialises as its list of [`ColumnDef`]s, checked again when
/// read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<ColumnDef>", into = "Vec<ColumnDef>")]
pub struct Schema {
    columns: Vec<ColumnDef>,
}

impl Schema {
    /// Checks `columns`; `field` is the path of the columns list (`sources[0].columns`) and
    /// errors name the entry (`sources[0].columns[3].metadata`).
    pub fn from_columns(field: &str, columns: &[ColumnDef]) -> Result<Schema> {
        if columns.is_empty() {
            return Err(KeelError::invalid_spec(field, "declare at least one column"));
        }
        for (i, c) in columns.iter().enumerate() {
            let base = format!("{field}[{i}]");
            if c.name.trim().is_empty() {
                return Err(KeelError::invalid_spec(format!("{base}.name"), "must not be empty"));
            }
            if c.name.chars().any(char::is_control) {
                return Err(KeelError::invalid_spec(
                    format!("{base}.name"),
                    format!("{:?} contains a control character", c.name),
                ));
            }
            if let Some(j) = columns[..i].iter().position(|p| p.name == c.name) {
                return Err(KeelError::invalid_spec(
                    format!("{base}.name"),
                    format!("duplicate column name '{}' (also {field}[{j}])", c.name),
                ));
            }
            if let Some(key) = c.metadata {
                if !key.allowed_types().contains(&c.data_type) {
                    let allowed =
                        key.allowed_types().iter().map(|t| t.name()).collect::<Vec<_>>().join(" or ");
                    return Err(KeelError::invalid_spec(
                        format!("{base}.type"),
                        format!("metadata '{key}' is read into {allowed}, not {}", c.data_type),
                    ));
                }
                if let Some(j) = columns[..i].iter().position(|p| p.metadata == Some(key)) {
                    return Err(KeelError::invalid_spec(
                        format!("{base}.metadata"),
                        format!("metadata '{key}' is already read into column '{}'", columns[j].name),
                    ));
                }
            }
        }
        Ok(Schema { columns: columns.to_vec() })
    }

    pub fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    pub fn column(&self, index: usize) -> Option<&ColumnDef> {
        self.columns.get(index)
    }

    /// The position of column `name` (exact, case-sensitive match).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Indices of the columns carried in the message key or value (those without metadata).
    pub fn physical_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns.iter().enumerate().filter(|(_, c)| c.metadata.is_none()).map(|(i, _)| i)
    }

    /// `id BIGINT, name STRING, ...`, for error messages.
    pub fn describe(&self) -> String {
        self.columns
            .iter()
            .map(|c| match c.metadata {
                Some(k) => format!("{} {} (metadata {k})", c.name, c.data_type),
                None => format!("{} {}", c.name, c.data_type),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The column names, comma-separated, for error messages.
    pub fn names(&self) -> String {
        self.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl TryFrom<Vec<ColumnDef>> for Schema {
    type Error = KeelError;
    fn try_from(columns: Vec<ColumnDef>) -> Result<Schema> {
        Schema::from_columns("columns", &columns)
    }
}

impl From<Schema> for Vec<ColumnDef> {
    fn from(schema: Schema) -> Vec<ColumnDef> {
        schema.columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Yaml {
        serde_yaml::from_str(text).expect("test yaml")
    }

    fn invalid_field(err: KeelError) -> (String, String) {
        match err {
            KeelError::InvalidSpec { field, reason } => (field, reason),
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_column_list_parses_into_column_defs() {
        let cols = ColumnDef::list_from_yaml(
            "sources[0].columns",
            &yaml(
                "- {name: id, type: BIGINT}\n- {name: name, type: string}\n- {name: age, type: INT}\n\
                 - {name: ts, type: TIMESTAMP, metadata: timestamp}\n- {name: part, type: INT, metadata: partition}\n",
            ),
        )
        .expect("parses");
        assert_eq!(
            cols,
            vec![
                ColumnDef::new("id", DataType::BigInt),
                ColumnDef::new("name", DataType::String),
                ColumnDef::new("age", DataType::Int),
                ColumnDef::metadata("ts", DataType::Timestamp, MetadataKey::Timestamp),
                ColumnDef::metadata("part", DataType::Int, MetadataKey::Partition),
            ]
        );
        let schema = Schema::from_columns("sources[0].columns", &cols).expect("valid");
        assert_eq!(schema.index_of("age"), Some(2));
        assert_eq!(schema.physical_indices().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn serde_round_trips_column_defs_with_canonical_type_names() {
        let cols: Vec<ColumnDef> = serde_yaml::from_str(
            "- {name: a, type: varchar(20)}\n- {name: h, type: 'MAP<STRING, BYTES>', metadata: headers}\n",
        )
        .expect("deserialises");
        assert_eq!(cols[0].data_type, DataType::String);
        assert_eq!(cols[1].metadata, Some(MetadataKey::Headers));
        let text = serde_yaml::to_string(&cols).expect("serialises");
        assert!(text.contains("type: STRING"), "{text}");
        let back: Vec<ColumnDef> = serde_yaml::from_str(&text).expect("round trip");
        assert_eq!(back, cols);
        let json = serde_json::to_string(&cols).expect("json");
        let back: Vec<ColumnDef> = serde_json::from_str(&json).expect("json round trip");
        assert_eq!(back, cols);
    }

    #[test]
    fn a_schema_serialises_as_its_columns_and_is_checked_when_read() {
        let schema = Schema::from_columns(
            "c",
            &[
                ColumnDef::new("id", DataType::BigInt),
                ColumnDef::metadata("o", DataType::BigInt, MetadataKey::Offset),
            ],
        )
        .expect("valid");
        let json = serde_json::to_string(&schema).expect("serialises");
        assert_eq!(
            json,
            r#"[{"name":"id","type":"BIGINT"},{"name":"o","type":"BIGINT","metadata":"offset"}]"#
        );
        assert_eq!(serde_json::from_str::<Schema>(&json).expect("reads back"), schema);
        let dup = r#"[{"name":"id","type":"INT"},{"name":"id","type":"INT"}]"#;
        let err = serde_json::from_str::<Schema>(dup).expect_err("duplicate");
        assert!(err.to_string().contains("duplicate column name"), "{err}");
    }

    #[test]
    fn type_aliases_are_accepted_and_unknown_types_are_refused() {
        for (text, t) in [
            ("integer", DataType::Int),
            ("TIMESTAMP_LTZ(3)", DataType::Timestamp),
            ("VARCHAR(200)", DataType::String),
            ("bool", DataType::Boolean),
            ("varbinary", DataType::Bytes),
            ("map < string , bytes >", DataType::Map),
        ] {
            assert_eq!(DataType::parse(text), Some(t), "{text}");
        }
        for bad in ["INTT", "VARCHAR()", "VARCHAR(x)", "TIMESTAMP(6)", "DECIMAL(10,2", "DATE(3)", ""] {
            assert_eq!(DataType::parse(bad), None, "{bad}");
        }
    }

    /// DATE and DECIMAL parse in every spelling the module docs list (DECIMAL's default
    /// precision 10 and scale 0, the aliases NUMERIC and DEC), keep their precision and scale
    /// through Display and serde, and map to Date32 and Decimal128(p, s).
    #[test]
    fn date_and_decimal_names_parse_with_flinks_defaults() -> Result<()> {
        let dec = |precision, scale| DataType::Decimal { precision, scale };
        for (text, t) in [
            ("DATE", DataType::Date),
            ("date", DataType::Date),
            ("DECIMAL", dec(10, 0)),
            ("DECIMAL(5)", dec(5, 0)),
            ("DECIMAL(10, 2)", dec(10, 2)),
            ("decimal( 38 ,38 )", dec(38, 38)),
            ("NUMERIC(12,4)", dec(12, 4)),
            ("numeric", dec(10, 0)),
            ("DEC(1)", dec(1, 0)),
            ("dec", dec(10, 0)),
        ] {
            assert_eq!(DataType::parse(text), Some(t), "{text}");
        }
        assert_eq!(dec(10, 2).to_string(), "DECIMAL(10, 2)");
        assert_eq!(DataType::parse(&dec(10, 2).to_string()), Some(dec(10, 2)));
        let cols: Vec<ColumnDef> =
            serde_yaml::from_str("- {name: p, type: 'numeric(7,3)'}\n- {name: d, type: date}\n")
                .map_err(|e| KeelError::invalid_spec("yaml", e.to_string()))?;
        assert_eq!(cols, vec![ColumnDef::new("p", dec(7, 3)), ColumnDef::new("d", DataType::Date)]);
        let json =
            serde_json::to_string(&cols).map_err(|e| KeelError::invalid_spec("json", e.to_string()))?;
        assert_eq!(json, r#"[{"name":"p","type":"DECIMAL(7, 3)"},{"name":"d","type":"DATE"}]"#);
        assert_eq!(crate::batch::arrow_type(&dec(7, 3)), arrow_schema::DataType::Decimal128(7, 3));
        assert_eq!(crate::batch::arrow_type(&DataType::Date), arrow_schema::DataType::Date32);
        assert_eq!(DataType::decimal(38, 0), Ok(dec(38, 0)));
        assert!(DataType::decimal(0, 0).is_err());
        assert!(DataType::decimal(5, 6).is_err());
        assert!(DataType::decimal(5, -1).is_err());
        Ok(())
    }

    /// A DECIMAL precision outside 1..=38 or a scale outside 0..=precision is refused at the
    /// column's `type` key, saying which bound was crossed; unknown names still list DATE and
    /// DECIMAL among the known types.
    #[test]
    fn a_decimal_out_of_range_is_refused_naming_the_field_and_the_bound() {
        for (text, needle) in [
            ("DECIMAL(0, 0)", "precision must be between 1 and 38, found 0"),
            ("DECIMAL(39)", "precision must be between 1 and 38, found 39"),
            ("DECIMAL(99999999999999999999999, 2)", "precision must be between 1 and 38"),
            ("DECIMAL(5, 6)", "scale must be between 0 and the precision (5), found 6"),
            ("NUMERIC(10, -1)", "unknown type"),
            ("DECIMAL(a, 2)", "unknown type"),
            ("DECIMAL(10, 2, 3)", "unknown type"),
        ] {
            let err = ColumnDef::list_from_yaml(
                "sinks[1].columns",
                &yaml(&format!("- {{name: p, type: '{text}'}}")),
            )
            .expect_err(text);
            let (field, reason) = invalid_field(err);
            assert_eq!(field, "sinks[1].columns[0].type", "{text}");
            assert!(reason.contains(needle), "{text}: {reason}");
        }
        let reason = "x".parse::<DataType>().expect_err("unknown");
        assert!(reason.contains("DATE, DECIMAL(p, s)"), "{reason}");
    }

    /// ROW types parse in both bracket forms, with backquoted and plain field names, nested
    /// rows closed by `>>` or `>>>`, whitespace or none, case-insensitive type names; their
    /// Display is canonical (`ROW<name TYPE, ...>`, backquotes only where needed) and parses
    /// back to the same type; serde writes it; Arrow maps it to a struct of the fields.
    #[test]
    fn row_types_parse_in_every_spelling_and_display_round_trips() -> Result<()> {
        let parse = |t: &str| t.parse::<DataType>().map_err(|e| KeelError::invalid_spec(t, e));
        let field = |n: &str, t: DataType| RowField::new(n, t);
        let owner_engine =
            DataType::row(vec![field("owner", DataType::String), field("engine", DataType::String)])
                .map_err(|e| KeelError::invalid_spec("row", e))?;
        for text in [
            "ROW<`owner` STRING, engine STRING>",
            "ROW(owner STRING, engine VARCHAR(100))",
            "row<owner string,engine varchar>",
            "  ROW < `owner`   STRING , `engine` STRING >  ",
            // How the SQL front-end joins the DDL's tokens.
            "ROW<`owner`STRING,engine STRING>",
        ] {
            assert_eq!(parse(text)?, owner_engine, "{text}");
        }
        assert_eq!(owner_engine.to_string(), "ROW<owner STRING, engine STRING>");
        assert_eq!(owner_engine.name(), "ROW");

        let nested = parse("ROW<a INT, b ROW<c DECIMAL(10, 2), d ROW(e MAP<STRING, BYTES>)>>")?;
        let want = DataType::Row(
            vec![
                field("a", DataType::Int),
                field(
                    "b",
                    DataType::Row(
                        vec![
                            field("c", DataType::Decimal { precision: 10, scale: 2 }),
                            field("d", DataType::Row(vec![field("e", DataType::Map)].into())),
                        ]
                        .into(),
                    ),
                ),
            ]
            .into(),
        );
        assert_eq!(nested, want);
        let text = nested.to_string();
        assert_eq!(text, "ROW<a INT, b ROW<c DECIMAL(10, 2), d ROW<e MAP<STRING, BYTES>>>>");
        assert_eq!(parse(&text)?, nested);
        assert_eq!(parse("ROW<x ROW<y ROW<z INT>>>")?.to_string(), "ROW<x ROW<y ROW<z INT>>>");

        let odd = parse("ROW<`owner id` STRING, `a``b` INT, `ROW` BOOLEAN, `1st` DATE, _x2 BIGINT>")?;
        let names: Vec<&str> = odd.row_fields().unwrap_or_default().iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["owner id", "a`b", "ROW", "1st", "_x2"]);
        assert_eq!(
            odd.to_string(),
            "ROW<`owner id` STRING, `a``b` INT, ROW BOOLEAN, `1st` DATE, _x2 BIGINT>"
        );
        assert_eq!(parse(&odd.to_string())?, odd);

        let cols: Vec<ColumnDef> =
            serde_yaml::from_str("- {name: properties, type: 'row<`owner` string, engine string>'}\n")
                .map_err(|e| KeelError::invalid_spec("yaml", e.to_string()))?;
        assert_eq!(cols, vec![ColumnDef::new("properties", owner_engine.clone())]);
        let json =
            serde_json::to_string(&cols).map_err(|e| KeelError::invalid_spec("json", e.to_string()))?;
        assert_eq!(json, r#"[{"name":"properties","type":"ROW<owner STRING, engine STRING>"}]"#);
        let back: Vec<ColumnDef> =
            serde_json::from_str(&json).map_err(|e| KeelError::invalid_spec("json", e.to_string()))?;
        assert_eq!(back, cols);

        let arrow_field = |n: &str, t| arrow_schema::Field::new(n, t, true);
        assert_eq!(
            crate::batch::arrow_type(&owner_engine),
            arrow_schema::DataType::Struct(
                vec![
                    arrow_field("owner", arrow_schema::DataType::Utf8),
                    arrow_field("engine", arrow_schema::DataType::Utf8)
                ]
                .into()
            )
        );
        Ok(())
    }

    /// A malformed ROW type is refused at the column's `type` key, saying what is wrong;
    /// [`DataType::row`] refuses no fields, empty names and repeated names.
    #[test]
    fn a_malformed_row_type_is_refused_naming_the_field_and_the_fault() -> Result<()> {
        for (text, needle) in [
            ("ROW<>", "a ROW needs at least one field"),
            ("ROW()", "a ROW needs at least one field"),
            ("ROW<a>", "expected a type, found '>'"),
            ("ROW<a INT", "the ROW is not closed with '>'"),
            ("ROW<a INT)", "expected ',' or '>' after ROW field, found ')'"),
            ("ROW(a INT>", "expected ',' or ')' after ROW field, found '>'"),
            ("ROW<a INT,>", "expected a ROW field name, found '>'"),
            ("ROW<a INT, a STRING>", "ROW field 'a' is declared twice"),
            ("ROW<a INTT>", "unknown type 'INTT'"),
            ("ROW<a DECIMAL(50)>", "DECIMAL precision must be between 1 and 38, found 50"),
            ("ROW<`a INT>", "a backquoted ROW field name is not closed"),
            ("ROW<1a INT>", "expected a ROW field name, found '1'"),
            ("ROW<a INT> x", "unexpected 'x' after the type ROW<a INT>"),
            ("ROW<a INT 'comment'>", "unknown type 'INT 'comment''"),
            ("ROW", "unknown type 'ROW'"),
        ] {
            let doc = yaml(&format!("- {{name: p, type: \"{text}\"}}"));
            let Err(err) = ColumnDef::list_from_yaml("sources[0].columns", &doc) else {
                return Err(KeelError::invalid_spec(text, "was accepted"));
            };
            let (field, reason) = invalid_field(err);
            assert_eq!(field, "sources[0].columns[0].type", "{text}");
            assert!(reason.contains(needle), "{text}: {reason}");
        }
        assert!(DataType::row(Vec::new()).is_err());
        assert!(DataType::row(vec![RowField::new("", DataType::Int)]).is_err());
        // Nesting is bounded, so that a hostile type name cannot exhaust the stack.
        let nested = |depth: usize| format!("{}INT{}", "ROW<a ".repeat(depth), ">".repeat(depth));
        let deepest =
            nested(MAX_ROW_DEPTH).parse::<DataType>().map_err(|e| KeelError::invalid_spec("deep", e))?;
        assert_eq!(deepest.to_string(), nested(MAX_ROW_DEPTH));
        let reason = nested(MAX_ROW_DEPTH + 1).parse::<DataType>().err().unwrap_or_default();
        assert!(reason.starts_with("ROW types nest at most 32 deep"), "{reason}");
        let reason = nested(100_000).parse::<DataType>().err().unwrap_or_default();
        assert!(reason.starts_with("ROW types nest at most 32 deep"), "{reason}");
        let reason = "x".parse::<DataType>().err().unwrap_or_default();
        assert!(reason.contains("ROW<name TYPE, ...>"), "{reason}");
        Ok(())
    }

    /// `timestamp-type` (STRING) and `leader-epoch` (INT or BIGINT) are metadata keys, read-only
    /// like topic, partition and offset, and refuse other column types.
    #[test]
    fn timestamp_type_and_leader_epoch_are_read_only_metadata() -> Result<()> {
        let cols = ColumnDef::list_from_yaml(
            "s.columns",
            &yaml("- {name: tt, type: STRING, metadata: timestamp-type}\n- {name: e, type: INT, metadata: Leader-Epoch}\n"),
        )?;
        assert_eq!(cols[0].metadata, Some(MetadataKey::TimestampType));
        assert_eq!(cols[1].metadata, Some(MetadataKey::LeaderEpoch));
        Schema::from_columns("s.columns", &cols)?;
        let json =
            serde_json::to_string(&cols).map_err(|e| KeelError::invalid_spec("json", e.to_string()))?;
        assert!(
            json.contains(r#""metadata":"timestamp-type""#) && json.contains(r#""metadata":"leader-epoch""#)
        );
        assert!(!MetadataKey::TimestampType.writable() && !MetadataKey::LeaderEpoch.writable());
        Schema::from_columns(
            "s.columns",
            &[ColumnDef::metadata("e", DataType::BigInt, MetadataKey::LeaderEpoch)],
        )?;
        let bad = [ColumnDef::metadata("tt", DataType::Int, MetadataKey::TimestampType)];
        let (field, reason) = invalid_field(Schema::from_columns("s.columns", &bad).expect_err("INT"));
        assert_eq!(field, "s.columns[0].type");
        assert!(reason.contains("metadata 'timestamp-type' is read into STRING, not INT"), "{reason}");
        let bad = [ColumnDef::metadata("e", DataType::String, MetadataKey::LeaderEpoch)];
        let (_, reason) = invalid_field(Schema::from_columns("s.columns", &bad).expect_err("STRING"));
        assert!(reason.contains("INT or BIGINT"), "{reason}");
        Ok(())
    }

    #[test]
    fn a_bad_type_is_reported_at_its_entry_and_key() {
        let err = ColumnDef::list_from_yaml(
            "sources[0].columns",
            &yaml("- {name: id, type: BIGINT}\n- {name: n, type: STRING}\n- {name: age, type: INTT}\n"),
        )
        .expect_err("bad type");
        let (field, reason) = invalid_field(err);
        assert_eq!(field, "sources[0].columns[2].type");
        assert!(reason.contains("unknown type 'INTT'"), "{reason}");
    }

    #[test]
    fn shape_errors_name_the_field() {
        let cases = [
            ("{name: id}", "sources[0].columns"),
            ("- id BIGINT", "sources[0].columns[0]"),
            ("- {type: INT}", "sources[0].columns[0].name"),
            ("- {name: a}", "sources[0].columns[0].type"),
            ("- {name: a, type: INT, nullable: true}", "sources[0].columns[0].nullable"),
            ("- {name: a, type: INT, metadata: leader_epoch}", "sources[0].columns[0].metadata"),
        ];
        for (text, want) in cases {
            let err = ColumnDef::list_from_yaml("sources[0].columns", &yaml(text)).expect_err(text);
            assert_eq!(invalid_field(err).0, want, "{text}");
        }
    }

    #[test]
    fn schema_checks_names_and_metadata_types() {
        let dup = [ColumnDef::new("a", DataType::Int), ColumnDef::new("a", DataType::String)];
        let (field, reason) = invalid_field(Schema::from_columns("s.columns", &dup).expect_err("dup"));
        assert_eq!(field, "s.columns[1].name");
        assert!(reason.contains("duplicate"), "{reason}");

        let bad_meta = [ColumnDef::metadata("t", DataType::Int, MetadataKey::Topic)];
        let (field, reason) = invalid_field(Schema::from_columns("s.columns", &bad_meta).expect_err("type"));
        assert_eq!(field, "s.columns[0].type");
        assert!(reason.contains("STRING"), "{reason}");

        let twice = [
            ColumnDef::metadata("o1", DataType::BigInt, MetadataKey::Offset),
            ColumnDef::metadata("o2", DataType::BigInt, MetadataKey::Offset),
        ];
        let (field, _) = invalid_field(Schema::from_columns("s.columns", &twice).expect_err("twice"));
        assert_eq!(field, "s.columns[1].metadata");

        let (field, _) = invalid_field(Schema::from_columns("s.columns", &[]).expect_err("empty"));
        assert_eq!(field, "s.columns");

        let blank = [ColumnDef::new(" ", DataType::Int)];
        let (field, _) = invalid_field(Schema::from_columns("s.columns", &blank).expect_err("blank"));
        assert_eq!(field, "s.columns[0].name");
    }
}
