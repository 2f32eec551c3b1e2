//! [`Value`] and [`Row`]: one value per column of a [`crate::Schema`], by position.

use std::fmt;

/// Kafka headers (and the MAP type): keys with optional byte values, in message order. Kafka
/// allows a key to repeat, so this is a list, not a map.
pub type Headers = Vec<(String, Option<Vec<u8>>)>;

/// One value of a row. INT and BIGINT columns both hold [`Value::Int`] (an INT column's values
/// are checked to fit 32 bits when they are read from a message).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    String(String),
    Bytes(Vec<u8>),
    /// Milliseconds since the Unix epoch, UTC.
    Timestamp(i64),
    Map(Headers),
    /// Days since 1970-01-01 (a DATE).
    Date(i32),
    /// An exact decimal number: `unscaled / 10^scale` (a DECIMAL; `12.50` is `1250` at scale 2).
    Decimal {
        unscaled: i128,
        scale: i8,
    },
    /// The field values of a ROW, in the row type's field order.
    Row(Vec<Value>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Bool(_) => "BOOLEAN",
            Value::Int(_) => "INT",
            Value::Double(_) => "DOUBLE",
            Value::String(_) => "STRING",
            Value::Bytes(_) => "BYTES",
            Value::Timestamp(_) => "TIMESTAMP",
            Value::Map(_) => "MAP",
            Value::Date(_) => "DATE",
            Value::Decimal { .. } => "DECIMAL",
            Value::Row(_) => "ROW",
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) | Value::Timestamp(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

/// Human-readable text (as a print sink would show it): strings unquoted, BYTES as base64,
/// timestamps in the SQL form, dates as `2024-05-01`, decimals with all their scale's digits
/// (`12.50`), maps as `{k=base64, ...}`, rows as their field values in brackets
/// (`[Alibaba Cloud, Flink]`, as a [`Row`]).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(v) => write!(f, "{v}"),
            Value::Double(v) => write!(f, "{v}"),
            Value::String(s) => f.write_str(s),
            Value::Bytes(b) => {
                let mut out = String::new();
                crate::text::push_base64(b, &mut out);
                f.write_str(&out)
            }
            Value::Timestamp(ms) => f.write_str(&crate::format_timestamp(*ms)),
            Value::Date(days) => {
                let mut out = String::new();
                crate::time::format_date(*days, &mut out);
                f.write_str(&out)
            }
            Value::Decimal { unscaled, scale } => {
                let mut out = String::new();
                crate::text::push_decimal(*unscaled, *scale, &mut out);
                f.write_str(&out)
            }
            Value::Row(values) => write_values(f, values),
            Value::Map(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match v {
                        Some(bytes) => {
                            let mut out = String::new();
                            crate::text::push_base64(bytes, &mut out);
                            write!(f, "{k}={out}")?;
                        }
                        None => write!(f, "{k}=NULL")?,
                    }
                }
                f.write_str("}")
            }
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Double(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A row: the values of a schema's columns, in the schema's order. Building one is one `Vec`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub values: Vec<Value>,
}

impl Row {
    pub fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// A row of `len` nulls.
    pub fn nulls(len: usize) -> Row {
        Row { values: vec![Value::Null; len] }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The value of column `index`; `Null` past the end.
    pub fn get(&self, index: usize) -> &Value {
        const NULL: Value = Value::Null;
        self.values.get(index).unwrap_or(&NULL)
    }

    pub fn into_values(self) -> Vec<Value> {
        self.values
    }
}

impl From<Vec<Value>> for Row {
    fn from(values: Vec<Value>) -> Self {
        Row { values }
    }
}

impl fmt::Display for Row {
    /// The values in brackets, as a print sink shows them: `[1, alice, 30]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_values(f, &self.values)
    }
}

/// `[v1, v2, ...]`.
fn write_values(f: &mut fmt::Formatter<'_>, values: &[Value]) -> fmt::Result {
    f.write_str("[")?;
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{v}")?;
    }
    f.write_str("]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_display_like_a_print_sink() {
        let row = Row::new(vec![
            Value::Int(1),
            Value::from("ann"),
            Value::Null,
            Value::Double(2.5),
            Value::Timestamp(0),
            Value::Bytes(b"hi".to_vec()),
            Value::Map(vec![("k".into(), Some(b"v".to_vec())), ("n".into(), None)]),
            Value::Date(-1),
            Value::Decimal { unscaled: -1250, scale: 3 },
            Value::Row(vec![Value::from("Alibaba Cloud"), Value::Null, Value::Row(vec![Value::Int(2)])]),
        ]);
        assert_eq!(
            row.to_string(),
            "[1, ann, NULL, 2.5, 1970-01-01 00:00:00.000, aGk=, {k=dg==, n=NULL}, 1969-12-31, -1.250, \
             [Alibaba Cloud, NULL, [2]]]"
        );
        assert_eq!(row.get(99), &Value::Null);
    }
}
