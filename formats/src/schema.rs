//! Column declarations and the checked [`Schema`].
//!
//! A spec declares columns as a list of mappings:
//!
//! ```yaml
//! columns:
//!   - {name: id, type: BIGINT}
//!   - {name: name, type: STRING}
//!   - {name: ts, type: TIMESTAMP, metadata: timestamp}
//! ```
//!
//! Types (case-insensitive; aliases in brackets): `STRING` (`VARCHAR`, `VARCHAR(n)`),
//! `BOOLEAN` (`BOOL`), `INT` (`INTEGER`), `BIGINT`, `DOUBLE`, `TIMESTAMP` (`TIMESTAMP(3)`,
//! `TIMESTAMP_LTZ`, `TIMESTAMP_LTZ(3)`; milliseconds, UTC), `BYTES` (`VARBINARY`), `MAP`
//! (`MAP<STRING, BYTES>`, the type of Kafka headers).
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
//! | `headers` | MAP | yes (a header without a value is a null entry) | yes, as the record headers (a null entry is a header without a value) |

use std::fmt;
use std::str::FromStr;

use keel_proto::{KeelError, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::Value as Yaml;

/// A column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
}

impl DataType {
    pub const ALL: &'static [DataType] = &[
        DataType::String,
        DataType::Boolean,
        DataType::Int,
        DataType::BigInt,
        DataType::Double,
        DataType::Timestamp,
        DataType::Bytes,
        DataType::Map,
    ];

    /// The canonical name, as written back into a spec.
    pub fn name(self) -> &'static str {
        match self {
            DataType::String => "STRING",
            DataType::Boolean => "BOOLEAN",
            DataType::Int => "INT",
            DataType::BigInt => "BIGINT",
            DataType::Double => "DOUBLE",
            DataType::Timestamp => "TIMESTAMP",
            DataType::Bytes => "BYTES",
            DataType::Map => "MAP<STRING, BYTES>",
        }
    }

    /// Parses a type name (case-insensitive, with the aliases listed in the module docs).
    pub fn parse(text: &str) -> Option<DataType> {
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
            other => {
                let n = other.strip_prefix("VARCHAR(")?.strip_suffix(')')?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                DataType::String
            }
        };
        Some(t)
    }

    fn known_list() -> String {
        DataType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        DataType::parse(s)
            .ok_or_else(|| format!("unknown type '{s}'; known types: {}", DataType::known_list()))
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
        t.name().to_string()
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
    Headers,
}

impl MetadataKey {
    pub const ALL: &'static [MetadataKey] = &[
        MetadataKey::Topic,
        MetadataKey::Partition,
        MetadataKey::Offset,
        MetadataKey::Timestamp,
        MetadataKey::Headers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MetadataKey::Topic => "topic",
            MetadataKey::Partition => "partition",
            MetadataKey::Offset => "offset",
            MetadataKey::Timestamp => "timestamp",
            MetadataKey::Headers => "headers",
        }
    }

    pub fn parse(text: &str) -> Option<MetadataKey> {
        MetadataKey::ALL.iter().copied().find(|k| k.name().eq_ignore_ascii_case(text.trim()))
    }

    /// The column types this metadata can be read into.
    pub fn allowed_types(self) -> &'static [DataType] {
        match self {
            MetadataKey::Topic => &[DataType::String],
            MetadataKey::Partition | MetadataKey::Offset => &[DataType::Int, DataType::BigInt],
            MetadataKey::Timestamp => &[DataType::Timestamp, DataType::BigInt],
            MetadataKey::Headers => &[DataType::Map],
        }
    }

    /// Whether a sink writes it (the record timestamp and headers); the others are read-only
    /// and a sink ignores them.
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
        for bad in ["INTT", "VARCHAR()", "VARCHAR(x)", "TIMESTAMP(6)", "DECIMAL(10,2)", ""] {
            assert_eq!(DataType::parse(bad), None, "{bad}");
        }
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
            ("- {name: a, type: INT, metadata: leader-epoch}", "sources[0].columns[0].metadata"),
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
