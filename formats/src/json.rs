//! `json`: one JSON object per message, one field per payload column.

use std::fmt;
use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use serde_json::Value as Json;

use crate::error::FieldError;
use crate::options::{JsonOptions, PayloadField};
use crate::schema::DataType;
use crate::value::{Headers, Value};

/// Parses `bytes` as an object and stores each payload column's value into `row`.
///
/// The object is read in one pass: declared fields are converted as they come (a MAP keeps
/// its entries' order and repeated keys), other fields are skipped without being built. A field
/// given twice takes its last value.
pub(crate) fn decode(
    bytes: &[u8],
    fields: &[PayloadField],
    opts: &JsonOptions,
    row: &mut [Value],
) -> Result<(), String> {
    let mut slots: Vec<Option<Result<Value, String>>> = vec![None; fields.len()];
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = de::Deserializer::deserialize_any(&mut de, ObjectVisitor { fields, slots: &mut slots })
        .and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(match e.classify() {
            serde_json::error::Category::Data => e.to_string(),
            _ => format!("not valid JSON: {e}"),
        });
    }
    for (f, slot) in fields.iter().zip(slots) {
        let value = match slot {
            None if opts.fail_on_missing_field => {
                return Err(format!("field '{}' is missing (json.fail-on-missing-field is true)", f.name))
            }
            None => Value::Null,
            Some(Ok(v)) => v,
            Some(Err(reason)) => return Err(format!("field '{}': {reason}", f.name)),
        };
        if let Some(slot) = row.get_mut(f.index) {
            *slot = value;
        }
    }
    Ok(())
}

struct ObjectVisitor<'a> {
    fields: &'a [PayloadField],
    slots: &'a mut [Option<Result<Value, String>>],
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match self.fields.iter().position(|f| f.name == key) {
                Some(i) => {
                    let v = if self.fields[i].data_type == DataType::Map {
                        map.next_value_seed(MapSeed)?
                    } else {
                        let json: Json = map.next_value()?;
                        from_json(&json, self.fields[i].data_type)
                    };
                    if let Some(slot) = self.slots.get_mut(i) {
                        *slot = Some(v);
                    }
                }
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a MAP value: an object of base64 strings (or nulls), in order, repeats kept; any other
/// JSON value is a type mismatch reported as the field's error.
struct MapSeed;

impl<'de> DeserializeSeed<'de> for MapSeed {
    type Value = Result<Value, String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MapSeed {
    type Value = Result<Value, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of base64 strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Headers = Vec::new();
        let mut failed = None;
        while let Some(k) = map.next_key::<String>()? {
            let v: Json = map.next_value()?;
            if failed.is_some() {
                continue;
            }
            match &v {
                Json::Null => out.push((k, None)),
                Json::String(s) => match crate::base64::decode(s) {
                    Some(bytes) => out.push((k, Some(bytes))),
                    None => {
                        failed = Some(format!("entry '{k}': expected BYTES as base64, found {}", shown(&v)))
                    }
                },
                other => {
                    failed = Some(format!("entry '{k}': expected a base64 string, found {}", shown(other)))
                }
            }
        }
        Ok(failed.map_or(Ok(Value::Map(out)), Err))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Value::Null))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Err(mismatch(DataType::Map, &Json::Bool(v))))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Err(mismatch(DataType::Map, &Json::from(v))))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Err(mismatch(DataType::Map, &Json::from(v))))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Err(mismatch(DataType::Map, &Json::from(v))))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Err(mismatch(DataType::Map, &Json::from(v))))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Err("expected MAP<STRING, BYTES>, found an array".to_string()))
    }
}

/// A short rendering of a JSON value for error messages.
fn shown(v: &Json) -> String {
    let mut text = v.to_string();
    if text.len() > 64 {
        let mut cut = 61;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

fn mismatch(ty: DataType, v: &Json) -> String {
    format!("expected {ty}, found {}", shown(v))
}

fn from_json(v: &Json, ty: DataType) -> Result<Value, String> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let value = match ty {
        DataType::String => match v {
            Json::String(s) => Value::String(s.clone()),
            other => Value::String(other.to_string()),
        },
        DataType::Boolean => match v {
            Json::Bool(b) => Value::Bool(*b),
            Json::String(s) if s.eq_ignore_ascii_case("true") => Value::Bool(true),
            Json::String(s) if s.eq_ignore_ascii_case("false") => Value::Bool(false),
            other => return Err(mismatch(ty, other)),
        },
        DataType::Int | DataType::BigInt => {
            let n = match v {
                Json::Number(n) => n.as_i64().or_else(|| {
                    n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64)
                }),
                Json::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            let n = n.ok_or_else(|| mismatch(ty, v))?;
            if ty == DataType::Int && i32::try_from(n).is_err() {
                return Err(format!("{n} is out of range for INT"));
            }
            Value::Int(n)
        }
        DataType::Double => match v {
            Json::Number(n) => Value::Double(n.as_f64().ok_or_else(|| mismatch(ty, v))?),
            Json::String(s) => Value::Double(s.trim().parse::<f64>().map_err(|_| mismatch(ty, v))?),
            other => return Err(mismatch(ty, other)),
        },
        DataType::Timestamp => match v {
            Json::Number(n) => Value::Timestamp(n.as_i64().ok_or_else(|| mismatch(ty, v))?),
            Json::String(s) => Value::Timestamp(crate::time::parse(s).ok_or_else(|| {
                format!("expected TIMESTAMP like \"2024-05-01 12:00:00.000\", found {}", shown(v))
            })?),
            other => return Err(mismatch(ty, other)),
        },
        DataType::Bytes => match v {
            Json::String(s) => Value::Bytes(
                crate::base64::decode(s)
                    .ok_or_else(|| format!("expected BYTES as base64, found {}", shown(v)))?,
            ),
            other => return Err(mismatch(ty, other)),
        },
        // MAP values are read by `MapSeed`, which keeps the entries' order.
        DataType::Map => return Err(mismatch(ty, v)),
    };
    Ok(value)
}

/// Writes the payload columns of `row` as one JSON object, in declared order.
pub(crate) fn encode(
    row: &[Value],
    fields: &[PayloadField],
    opts: &JsonOptions,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    out.push(b'{');
    let mut first = true;
    let mut text = String::new();
    for f in fields {
        let value = row.get(f.index).unwrap_or(&Value::Null);
        if value.is_null() && opts.encode_ignore_null_fields {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, &f.name);
        out.push(b':');
        text.clear();
        write_value(value, f, opts, &mut text, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// Writes a JSON string literal.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn type_error(f: &PayloadField, value: &Value) -> FieldError {
    FieldError::new(&f.name, format!("a {} value in a {} column", value.kind(), f.data_type))
}

fn write_value(
    value: &Value,
    f: &PayloadField,
    opts: &JsonOptions,
    text: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    match (f.data_type, value) {
        (_, Value::Null) => out.extend_from_slice(b"null"),
        (DataType::String, Value::String(s)) => write_str(out, s),
        (DataType::Boolean, Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        (DataType::Int | DataType::BigInt, Value::Int(n)) => {
            let _ = write!(text, "{n}");
            out.extend_from_slice(text.as_bytes());
        }
        (DataType::Double, Value::Double(d)) => {
            if d.is_finite() {
                write_f64(*d, text);
                out.extend_from_slice(text.as_bytes());
            } else {
                write_str(out, non_finite(*d));
            }
        }
        (DataType::Double, Value::Int(n)) => {
            write_f64(*n as f64, text);
            out.extend_from_slice(text.as_bytes());
        }
        (DataType::Timestamp, Value::Timestamp(ms)) => {
            crate::time::format(*ms, opts.timestamp_standard, text);
            write_str(out, text);
        }
        (DataType::Bytes, Value::Bytes(b)) => {
            crate::base64::encode(b, text);
            write_str(out, text);
        }
        (DataType::Map, Value::Map(entries)) => write_map(entries, out),
        _ => return Err(type_error(f, value)),
    }
    Ok(())
}

/// A MAP as a JSON object of base64 strings (null for a null value).
pub(crate) fn write_map(entries: &Headers, out: &mut Vec<u8>) {
    out.push(b'{');
    let mut text = String::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        match v {
            None => out.extend_from_slice(b"null"),
            Some(bytes) => {
                text.clear();
                crate::base64::encode(bytes, &mut text);
                write_str(out, &text);
            }
        }
    }
    out.push(b'}');
}

/// Parses a MAP written by [`write_map`].
pub(crate) fn parse_map(text: &str) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = MapSeed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    v.map_err(|e| format!("expected a MAP as a JSON object of base64 strings: {e}"))?
}

/// Shortest text that reads back as the same `f64` (`1.0`, `0.1`, `1e300`).
pub(crate) fn write_f64(d: f64, text: &mut String) {
    let _ = write!(text, "{d:?}");
}

pub(crate) fn non_finite(d: f64) -> &'static str {
    if d.is_nan() {
        "NaN"
    } else if d > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}
